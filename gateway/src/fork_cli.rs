//! `spindle fork serve|resume`: prepare an image of a warm instance and serve its pages, and
//! resume a child from such an image on any node, its memory filled lazily over the network.
//!
//! `serve` is the parent side: it builds the function's instance cold, warms it with the
//! given requests, captures an image at that quiescent point (`fork_prepare`), publishes it
//! in a page server and prints the image descriptor (the credential a child needs) as one
//! line on stdout. It serves until SIGINT/SIGTERM, then prints the page server's counters as
//! one JSON line.
//!
//! `resume` is the child side (`fork_resume`): it compiles the module from its own config
//! (a node compiles each module once; nothing compiled is ever received from another node),
//! fetches the image's metadata from the parent, checks module, engine and WASI layout
//! against its own, builds the instance from the metadata with its linear memory registered
//! with userfaultfd, and answers one request; pages arrive from the parent on first touch
//! (`--eager`: every page that holds data is fetched first, without userfaultfd, the baseline
//! lazy fork is measured against). It prints the answer and where the time went as one JSON
//! line. `--cache FILE` shares a node page cache between the children resumed with it (each
//! reads what earlier ones fetched), `--prefetch order` installs the pages earlier children
//! faulted ahead of faults, and `--transport rdma` asks for RDMA (the report says why it is
//! TCP). `--children N` resumes N children back to back after the one compile and prints a
//! throughput and child-memory summary instead (`--hold`: all N alive at once).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chain_runtime::config::Config;
use chain_runtime::host::CompiledModule;
use chain_runtime::host::{BufferIo, Outcome};
use chain_runtime::instance::{Instance, InstanceBuilder};
use chain_runtime::resume::{RemoteImage, ResumeStats, ResumedMemory};
use nix::sys::signal::{SigSet, Signal};
use proto::ImageDescriptor;
use rdma_fork::NodeCache;
use rdma_fork::registry::{ImageRegistry, PublishedImage};
use rdma_fork::server::PageServer;
use rdma_fork::transport::TransportPref;

use crate::local_bench;

/// How long a child may take to connect, authenticate and get each answer from the parent.
const PARENT_TIMEOUT: Duration = Duration::from_secs(5);

fn invoke(
    host: &mut chain_runtime::host::FunctionHost,
    input: &[u8],
    capacity: usize,
) -> anyhow::Result<Vec<u8>> {
    let mut io = BufferIo::new(capacity, input);
    match host.invoke(&mut io) {
        Outcome::Done { output_len, .. } => {
            io.output.truncate(output_len);
            Ok(io.output)
        }
        Outcome::Failed { status, message } => bail!("{status:?}: {message}"),
    }
}

fn builder(config: &Path, chain: &str, function: &str) -> anyhow::Result<InstanceBuilder> {
    let config = Config::load(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(InstanceBuilder::new(&config, chain, function)?)
}

#[derive(clap::Args)]
pub struct ServeArgs {
    config: PathBuf,
    #[arg(long)]
    chain: String,
    #[arg(long)]
    function: String,
    /// Where the page server listens (port 0: any; the descriptor names the port).
    #[arg(long)]
    listen: SocketAddr,
    /// A request body to run before capturing (repeatable, in order).
    #[arg(long)]
    warm: Vec<String>,
    /// How long the image stays open to new children (renewed by each child).
    #[arg(long, value_parser = spindle_bench::parse_duration, default_value = "10m")]
    lease: Duration,
}

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Blocked before any thread starts, so every thread inherits the mask and sigwait below
    // is the only place these signals land.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().context("blocking SIGINT/SIGTERM")?;

    let builder = builder(&args.config, &args.chain, &args.function)?;
    let capacity = builder.chain().spec.max_payload() as usize;
    let mut instance = builder.cold_from_file()?;
    for body in &args.warm {
        let out = invoke(instance.host_mut(), body.as_bytes(), capacity)
            .context("a warm-up request failed")?;
        eprintln!("warm-up: {}", String::from_utf8_lossy(&out));
    }
    let prepared = Instant::now();
    let snapshot = instance
        .host_mut()
        .snapshot()
        .context("capturing the image")?;
    let meta = snapshot.meta();
    let image = PublishedImage {
        memfd: snapshot
            .image()
            .try_clone_to_owned()
            .context("duplicating the image memfd")?,
        memory_bytes: meta.memory.bytes,
        nonzero: meta.memory.nonzero.words().to_vec(),
        lease: args.lease,
        meta: meta.to_image_meta().encode(),
    };
    let registry = Arc::new(ImageRegistry::new());
    let handle = registry.publish(image).context("publishing the image")?;
    let prepare_us = prepared.elapsed().as_micros();
    let server = PageServer::bind(args.listen, Arc::clone(&registry))
        .with_context(|| format!("page server on {}", args.listen))?
        .spawn()
        .context("starting the page server")?;
    let descriptor = server.descriptor(&handle, meta.module_sha256, meta.engine.clone());
    eprintln!(
        "image of {}/{}: {} of {} pages hold data, prepared in {prepare_us} µs; serving pages on {}",
        args.chain,
        args.function,
        meta.memory.nonzero.count(),
        meta.memory.nonzero.pages(),
        server.local_addr()
    );
    let mut out = std::io::stdout().lock();
    writeln!(out, "{descriptor}")?;
    out.flush()?;

    signals.wait().context("waiting for SIGINT/SIGTERM")?;
    server.shutdown().context("stopping the page server")?;
    let s = registry.stats();
    let r = &s.refusals;
    writeln!(
        out,
        "{}",
        serde_json::json!({
            "handshakes_ok": s.handshakes_ok,
            "reads": s.reads,
            "pages_served": s.pages_served,
            "zero_pages_served": s.zero_pages_served,
            "bytes_served": s.bytes_served,
            "memfd_bytes_read": s.memfd_bytes_read,
            "timeouts": s.timeouts,
            "refusals": {
                "unknown_handle": r.unknown_handle,
                "bad_proof": r.bad_proof,
                "expired": r.expired,
                "revoked": r.revoked,
                "bad_request": r.bad_request,
                "malformed": r.malformed,
                "busy": r.busy,
                "internal": r.internal,
            },
        })
    )?;
    Ok(())
}

#[derive(clap::Args)]
pub struct ResumeArgs {
    descriptor: String,
    #[arg(long)]
    config: PathBuf,
    #[arg(long)]
    chain: String,
    #[arg(long)]
    function: String,
    #[arg(long, default_value = "")]
    body: String,
    /// Fetch every page before running (for comparison with lazy).
    #[arg(long)]
    eager: bool,
    /// Pages fetched along with each faulting page (0: only what is touched).
    #[arg(long, default_value_t = 0)]
    readahead: u32,
    /// This node's page cache for the image: a file (on tmpfs, e.g. /dev/shm), created when
    /// absent, shared by every child resumed with the same path.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Read the cache's hits and log faults, but put no fetched page into it.
    #[arg(long, requires = "cache")]
    no_cache_fill: bool,
    /// `order`: install the pages earlier children faulted (the cache's log), in their
    /// order, over a second connection ahead of faults.
    #[arg(long, value_enum, default_value_t = PrefetchArg::Off, requires = "cache")]
    prefetch: PrefetchArg,
    /// `rdma`: pages by one-sided RDMA READ when built in and a device is usable (the
    /// report says why not otherwise).
    #[arg(long, value_enum, default_value_t = TransportArg::Tcp)]
    transport: TransportArg,
    /// Children resumed back to back from the descriptor after one compile; more than one
    /// prints one JSON summary (throughput, per-fork bytes, faults and CPU, child memory
    /// against a cold instance) instead of the single child's report.
    #[arg(long, default_value_t = 1)]
    children: usize,
    /// Keep every child alive until the last has answered, so the process's memory growth
    /// per live child is measured (each holds a connection to the parent).
    #[arg(long)]
    hold: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PrefetchArg {
    Off,
    Order,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TransportArg {
    Tcp,
    Rdma,
}

/// An image descriptor given as its text, or as `@FILE` whose first line is the text (what
/// `fork serve` prints first; its counters follow when it stops).
pub fn read_descriptor(value: &str) -> anyhow::Result<ImageDescriptor> {
    let text = match value.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the image descriptor from {path}"))?,
        None => value.to_owned(),
    };
    let first = text.lines().next().unwrap_or_default();
    first.parse().context("image descriptor")
}

/// What a node holds to resume children of one image: the function resolved in its config,
/// its module compiled once, and how to reach the image.
struct ChildNode {
    builder: InstanceBuilder,
    compiled: CompiledModule,
    image: RemoteImage,
    capacity: usize,
    compile_us: u64,
}

/// One resumed child that answered its first request. Its memory must outlive every call
/// into its instance, so both stay together until [`Child::finish`].
struct Child {
    instance: Instance,
    memory: ResumedMemory,
    output: Vec<u8>,
    call_us: u64,
    /// From the start of the resume (connect) to the answer.
    first_response_us: u64,
}

impl ChildNode {
    fn open(args: &ResumeArgs) -> anyhow::Result<Self> {
        let descriptor = read_descriptor(&args.descriptor)?;
        let builder = builder(&args.config, &args.chain, &args.function)?;
        let capacity = builder.chain().spec.max_payload() as usize;
        let module_path = builder.stage().function.module.clone();
        let bytes = std::fs::read(&module_path)
            .with_context(|| format!("reading module {}", module_path.display()))?;
        builder.check_image_module(proto::image::module_hash(&bytes), &descriptor)?;
        let cache = match &args.cache {
            Some(path) => Some(Arc::new(
                NodeCache::open_file(path, &descriptor)
                    .with_context(|| format!("the node page cache {}", path.display()))?,
            )),
            None => None,
        };
        let image = RemoteImage {
            eager: args.eager,
            readahead: args.readahead,
            cache,
            fill_cache: !args.no_cache_fill,
            prefetch: args.prefetch == PrefetchArg::Order,
            transport: match args.transport {
                TransportArg::Tcp => TransportPref::Tcp,
                TransportArg::Rdma => TransportPref::Rdma,
            },
            ..RemoteImage::new(descriptor, PARENT_TIMEOUT)
        };
        let started = Instant::now();
        let compiled = builder.compile(&bytes)?;
        Ok(ChildNode {
            builder,
            compiled,
            image,
            capacity,
            compile_us: started.elapsed().as_micros() as u64,
        })
    }

    /// Resumes one child (connect + authenticate, metadata, restore) and runs `body` in it.
    /// An answer computed from pages that failed to arrive is an error, never an output.
    fn resume_one(&self, body: &[u8]) -> anyhow::Result<Child> {
        let started = Instant::now();
        let (mut instance, memory) = self
            .builder
            .clone()
            .resume_remote_compiled(&self.compiled, &self.image)?;
        let call = Instant::now();
        let output = invoke(instance.host_mut(), body, self.capacity);
        let call_us = call.elapsed().as_micros() as u64;
        let first_response_us = started.elapsed().as_micros() as u64;
        if let Some(failure) = memory.failure() {
            bail!("fetching pages from the parent failed: {failure}");
        }
        Ok(Child {
            output: output?,
            instance,
            memory,
            call_us,
            first_response_us,
        })
    }
}

impl Child {
    /// The child's linear memory resident now (page tables, and smaps' Rss in pages), then
    /// its final counters once its fault
    /// handler stopped; the instance is dropped last (it must not run without its memory).
    fn finish(self) -> anyhow::Result<(usize, u64, ResumeStats)> {
        let resident = self.memory.resident_pages()?;
        let smaps_rss_pages = self.memory.smaps_rss_pages()?;
        let stats = self.memory.finish().context("stopping the fault handler")?;
        drop(self.instance);
        Ok((resident, smaps_rss_pages, stats))
    }
}

pub fn resume(args: ResumeArgs) -> anyhow::Result<()> {
    let node = ChildNode::open(&args)?;
    if args.children == 0 {
        bail!("--children must be at least 1");
    }
    if args.children > 1 || args.hold {
        return resume_many(&node, &args);
    }
    let child = node.resume_one(args.body.as_bytes())?;
    let t = child.memory.timings;
    let call_us = child.call_us;
    let output = String::from_utf8_lossy(&child.output).into_owned();
    let (transport, transport_fallback) = (
        child.memory.transport,
        child.memory.transport_fallback.clone(),
    );
    let (resident, smaps_rss_pages, s) = child.finish()?;
    let report = serde_json::json!({
        "output": output,
        "mode": if args.eager { "eager" } else { "lazy" },
        "readahead": args.readahead,
        "memory_pages": s.memory_pages,
        "image_nonzero_pages": s.image_nonzero_pages,
        "resident_pages": resident,
        "smaps_rss_pages": smaps_rss_pages,
        "faults": s.faults,
        "pages_copied": s.pages_copied,
        "zero_pages": s.zero_pages,
        "prefetched": s.prefetched,
        "bytes_fetched": s.bytes_fetched,
        "wire_bytes_received": s.wire_bytes_received,
        "round_trips": s.round_trips,
        "prefetch": if node.image.prefetch { "order" } else { "off" },
        "order_prefetched": s.order_prefetched,
        "copy_races": s.copy_races,
        "prefetch_wire_bytes_received": s.prefetch_wire_bytes_received,
        "cache_hits": s.cache_hits,
        "cache_misses": s.cache_misses,
        "cache_filled": s.cache_filled,
        "transport": transport,
        "transport_fallback": transport_fallback,
        "compile_us_once_per_node": node.compile_us,
        "timings_us": {
            "connect_and_authenticate": t.connect_and_authenticate_us,
            "metadata": t.metadata_us,
            "restored": t.restored_us,
            "first_response": t.restored_us + call_us,
        },
    });
    println!("{report}");
    Ok(())
}

/// Answers kept in the summary of a multi-child run (the first ones, in order).
const OUTPUTS_KEPT: usize = 8;

/// Counters summed over the children of a multi-child run.
#[derive(Default)]
struct Totals {
    resident_pages: u64,
    faults: u64,
    pages_copied: u64,
    zero_pages: u64,
    bytes_fetched: u64,
    wire_bytes_received: u64,
    round_trips: u64,
    cache_hits: u64,
}

impl Totals {
    fn add(&mut self, (resident, s): (usize, ResumeStats)) {
        self.resident_pages += resident as u64;
        self.faults += s.faults;
        self.pages_copied += s.pages_copied;
        self.zero_pages += s.zero_pages;
        self.bytes_fetched += s.bytes_fetched;
        self.wire_bytes_received += s.wire_bytes_received;
        self.round_trips += s.round_trips;
        self.cache_hits += s.cache_hits;
    }
}

/// `--children N`: the node's one compile, then N children resumed back to back from the
/// same descriptor, each answering one request, beside a cold instance of the same function
/// built from the same compiled module in this process. Children live in this process, so
/// a child's memory is (a) its linear memory's resident pages (mincore over the mapping,
/// against the pages its guest touched) and, with `--hold`, (b) this process's
/// Private_Dirty and Rss growth while all N are alive at once, per child.
fn resume_many(node: &ChildNode, args: &ResumeArgs) -> anyhow::Result<()> {
    let n = args.children;
    let body = args.body.as_bytes();

    // Two cold instances, the second measured: the first absorbs what any first instance
    // costs once per process (engine statics, the module's pristine tables), which a
    // child of a warm node does not pay either. Both stay alive to the end so the children
    // cannot reuse their freed heap and look cheaper than they are.
    let mut colds = Vec::new();
    let mut cold_memory = None;
    for _ in 0..2 {
        let before = local_bench::rollup("self")?;
        let started = Instant::now();
        let mut cold = node.builder.clone().cold_compiled(&node.compiled)?;
        let output = invoke(cold.host_mut(), body, node.capacity).context("the cold instance")?;
        let first_response_us = started.elapsed().as_micros() as u64;
        let resident = cold
            .host_mut()
            .memory_resident_pages()
            .context("the cold instance has no linear memory")??;
        let after = local_bench::rollup("self")?;
        cold_memory = Some(serde_json::json!({
            "output": String::from_utf8_lossy(&output),
            "first_response_us_after_compile": first_response_us,
            "resident_pages": resident,
            "private_dirty_kib": after.private_dirty.saturating_sub(before.private_dirty),
            "rss_kib": after.rss.saturating_sub(before.rss),
        }));
        colds.push(cold);
    }

    let mut first_response = Vec::with_capacity(n);
    // Connected and authenticated, metadata in, restored: where a fork's time goes.
    let mut steps: [Vec<f64>; 3] = Default::default();
    let mut outputs = Vec::new();
    let mut totals = Totals::default();
    let mut held = Vec::new();
    let mut held_from = None;
    let cpu_before = cpu_time_us()?;
    let loop_start_unix_us = unix_us();
    let began = Instant::now();
    for i in 0..n {
        let child = node
            .resume_one(body)
            .with_context(|| format!("child {} of {n}", i + 1))?;
        first_response.push(child.first_response_us as f64);
        let t = child.memory.timings;
        steps[0].push(t.connect_and_authenticate_us as f64);
        steps[1].push(t.metadata_us as f64);
        steps[2].push(t.restored_us as f64);
        if outputs.len() < OUTPUTS_KEPT {
            outputs.push(String::from_utf8_lossy(&child.output).into_owned());
        }
        if args.hold {
            held.push(child);
            if i == 0 {
                // From after the first child: what it costs once per process (its fault
                // thread's first stack, the first connection) is not a per-child cost.
                held_from = Some(local_bench::rollup("self")?);
            }
        } else {
            let (resident, _, stats) = child.finish()?;
            totals.add((resident, stats));
        }
    }
    let wall = began.elapsed();
    let loop_end_unix_us = unix_us();
    let held_growth = match held_from {
        Some(from) if n > 1 => {
            let to = local_bench::rollup("self")?;
            let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / (n - 1) as f64;
            Some(serde_json::json!({
                "children_alive": n,
                "private_dirty_kib_per_child": per(to.private_dirty, from.private_dirty),
                "rss_kib_per_child": per(to.rss, from.rss),
            }))
        }
        _ => None,
    };
    for child in held {
        let (resident, _, stats) = child.finish()?;
        totals.add((resident, stats));
    }
    let cpu_after = cpu_time_us()?;
    let cpu_user_us = cpu_after.0.saturating_sub(cpu_before.0);
    let cpu_sys_us = cpu_after.1.saturating_sub(cpu_before.1);
    drop(colds);

    first_response.sort_by(f64::total_cmp);
    for step in &mut steps {
        step.sort_by(f64::total_cmp);
    }
    let per = |total: u64| total as f64 / n as f64;
    let summary = serde_json::json!({
        "children": n,
        "mode": if args.eager { "eager" } else { "lazy" },
        "cache": args.cache.is_some(),
        "hold": args.hold,
        "wall_us": wall.as_micros() as u64,
        "loop_start_unix_us": loop_start_unix_us,
        "loop_end_unix_us": loop_end_unix_us,
        "forks_per_s": n as f64 / wall.as_secs_f64(),
        "first_response_us": {
            "p50": local_bench::percentile(&first_response, 0.5),
            "p99": local_bench::percentile(&first_response, 0.99),
        },
        "steps_us_p50": {
            "connect_and_authenticate": local_bench::percentile(&steps[0], 0.5),
            "metadata": local_bench::percentile(&steps[1], 0.5),
            "restored": local_bench::percentile(&steps[2], 0.5),
        },
        "bytes_fetched": totals.bytes_fetched,
        "per_fork": {
            "bytes_fetched": per(totals.bytes_fetched),
            "wire_bytes_received": per(totals.wire_bytes_received),
            "round_trips": per(totals.round_trips),
            "faults": per(totals.faults),
            "pages_copied": per(totals.pages_copied),
            "zero_pages": per(totals.zero_pages),
            "cache_hits": per(totals.cache_hits),
            "cpu_us": per(cpu_user_us + cpu_sys_us),
            "cpu_user_us": per(cpu_user_us),
            "cpu_sys_us": per(cpu_sys_us),
        },
        "child_memory": {
            "resident_pages_per_child": per(totals.resident_pages),
            // Lazy without readahead these are the pages the guest touched (one fault
            // each); eager, every page that holds data plus any zero page touched.
            "pages_installed_per_child": per(totals.pages_copied + totals.zero_pages),
            "held": held_growth,
        },
        "cold": cold_memory,
        "compile_us_once_per_node": node.compile_us,
        "outputs_first": outputs,
    });
    println!("{summary}");
    Ok(())
}

/// (user, system) CPU time of this process so far, all threads (the fault handlers too).
fn cpu_time_us() -> anyhow::Result<(u64, u64)> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage writes one rusage into the pointer it is given, which points at
    // storage of exactly that type; RUSAGE_SELF is always valid. nix here is built without
    // its `resource` feature.
    let r = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("getrusage");
    }
    // SAFETY: getrusage returned 0, so it filled the struct.
    let usage = unsafe { usage.assume_init() };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Ok((us(usage.ru_utime), us(usage.ru_stime)))
}

/// Wall-clock microseconds since the epoch: lets a benchmark line up the loops of several
/// processes (aggregate forks/s over the span from the first start to the last end).
fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}
