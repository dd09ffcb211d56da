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
//! TCP).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chain_runtime::config::Config;
use chain_runtime::host::{BufferIo, Outcome};
use chain_runtime::instance::InstanceBuilder;
use chain_runtime::resume::RemoteImage;
use nix::sys::signal::{SigSet, Signal};
use proto::ImageDescriptor;
use rdma_fork::NodeCache;
use rdma_fork::registry::{ImageRegistry, PublishedImage};
use rdma_fork::server::PageServer;
use rdma_fork::transport::TransportPref;

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
    let capacity = builder.chain().spec.slot_size as usize;
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

pub fn resume(args: ResumeArgs) -> anyhow::Result<()> {
    let descriptor = read_descriptor(&args.descriptor)?;

    let builder = builder(&args.config, &args.chain, &args.function)?;
    let capacity = builder.chain().spec.slot_size as usize;
    let module_path = builder.stage().function.module.clone();
    let bytes = std::fs::read(&module_path)
        .with_context(|| format!("reading module {}", module_path.display()))?;
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
    // The node's one-time compile is inside resume_remote but not in its timings.
    let started = Instant::now();
    let (mut instance, memory) = builder.resume_remote(&bytes, &image)?;
    let compile_and_restore_us = started.elapsed().as_micros() as u64;
    let t = memory.timings;
    let call = Instant::now();
    let output = invoke(instance.host_mut(), args.body.as_bytes(), capacity);
    let call_us = call.elapsed().as_micros() as u64;
    if let Some(failure) = memory.failure() {
        bail!("fetching pages from the parent failed: {failure}");
    }
    let output = output?;
    let resident = memory.resident_pages()?;
    let smaps_rss_pages = memory.smaps_rss_pages()?;
    let (transport, transport_fallback) = (memory.transport, memory.transport_fallback.clone());
    let s = memory.finish().context("stopping the fault handler")?;
    let report = serde_json::json!({
        "output": String::from_utf8_lossy(&output),
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
        "prefetch": if image.prefetch { "order" } else { "off" },
        "order_prefetched": s.order_prefetched,
        "copy_races": s.copy_races,
        "prefetch_wire_bytes_received": s.prefetch_wire_bytes_received,
        "cache_hits": s.cache_hits,
        "cache_misses": s.cache_misses,
        "cache_filled": s.cache_filled,
        "transport": transport,
        "transport_fallback": transport_fallback,
        "compile_us_once_per_node": compile_and_restore_us.saturating_sub(t.restored_us),
        "timings_us": {
            "connect_and_authenticate": t.connect_and_authenticate_us,
            "metadata": t.metadata_us,
            "restored": t.restored_us,
            "first_response": t.restored_us + call_us,
        },
    });
    println!("{report}");
    drop(instance);
    Ok(())
}
