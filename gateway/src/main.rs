//! `spindle`: serve HTTP through chains of Wasm functions.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use chain_runtime::config::StartMode;
use chain_runtime::config::{Config, DataplaneMode};
use chain_runtime::instance::sealed_memfd;
use chain_runtime::plan::Plan;
use chain_runtime::worker::{self, WorkerArgs};
use chain_runtime::zygote::ZygoteArgs;
use clap::{Parser, Subcommand};
use gateway::dataplane::{ChainRuntime, KernelRoute};
use gateway::http::{DataplaneStatus, Gateway};
use gateway::metrics::Metrics;
use gateway::node::{AdminListener, ControlBoard, NodeService};
use gateway::supervisor::{FunctionInputs, WorkerCommand};
use shm::Arena;
use tokio::sync::watch;

mod fork_cli;
mod local_bench;
mod sandbox_probe;

const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// How long a client may take to send request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests in flight get to finish once shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long peers get to stop the instances they run from this node's images.
const PEER_RELEASE_TIMEOUT: Duration = Duration::from_secs(3);

/// Spindle serves HTTP requests through chains of WebAssembly functions on one node.
/// Request bodies are copied once into a shared-memory arena; functions pass 32-byte
/// descriptors instead of payloads.
#[derive(Parser)]
#[command(name = "spindle", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the gateway and every function instance of CONFIG, then serve HTTP until
    /// SIGINT/SIGTERM. Readiness: GET /readyz; metrics: GET /metrics.
    Run {
        /// The YAML chain configuration.
        config: PathBuf,
        /// Address to serve on [default: `listen` from the config, else 127.0.0.1:8080].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// How descriptors move between functions: auto (eBPF sk_msg redirect when it loads,
        /// else userspace), sockmap (eBPF or fail), userspace (the gateway routes every hop)
        /// [default: `dataplane` from the config, else auto].
        #[arg(long)]
        dataplane: Option<DataplaneMode>,
        /// Start FUNCTION's instances from a remote image instead of cold: FUNCTION=DESCRIPTOR,
        /// the descriptor as `spindle fork serve` or an admin prepare (POST /images) printed
        /// it, or FUNCTION=@FILE (repeatable).
        #[arg(long, value_name = "FUNCTION=DESCRIPTOR")]
        resume: Vec<String>,
        /// Serve the pages of images prepared from this gateway's running instances on ADDR
        /// (a specific address of this node that children can reach; port 0: any). Prepare
        /// through the --admin socket.
        #[arg(long, value_name = "ADDR", requires = "admin")]
        serve_images: Option<SocketAddr>,
        /// The node service's admin API: HTTP/1.1 on a Unix socket created at PATH with mode
        /// 0600. POST /images?chain=C&function=F[&instance=N][&lease=10m] prepares an image of
        /// that running instance and answers its descriptor (a credential); GET /images lists
        /// images; DELETE /images/HANDLE revokes one.
        #[arg(long, value_name = "PATH")]
        admin: Option<PathBuf>,
        /// How long a zygote may take to answer a spawn request (tests shorten it).
        #[arg(long, hide = true, value_parser = spindle_bench::parse_duration,
              default_value = "5s")]
        zygote_reply_timeout: Duration,
        #[command(flatten)]
        peers: gateway::peers::PeerArgs,
    },
    /// Check CONFIG and print every problem as file:line:col: message, each function's module
    /// included (compiled and checked against what Spindle provides and its mode calls, not
    /// run). Exit status 1 if any.
    Validate { config: PathBuf },
    /// Ask a running gateway to reload its config (as SIGHUP does) and print what changed:
    /// functions whose module or call settings changed roll to new instances while the old
    /// ones drain (docs/autoscaling.md). Exit status 1 if nothing, or not everything, changed.
    Reload {
        /// The gateway's admin socket (`spindle run --admin PATH`).
        #[arg(long)]
        admin: PathBuf,
    },
    /// Compare, in one run and under the same load: a bare hyper server (the ceiling), Spindle on
    /// the userspace and the eBPF (sockmap) dataplanes, the Knative-style baseline, and any
    /// URL. Prints a Markdown table; writes JSON, Markdown and an SVG chart on request.
    /// With --rounds N the targets run interleaved (A B C A B C …) and every figure is a
    /// median with its spread; with --hops it measures per-hop latency instead
    /// (docs/benchmarks.md).
    Bench {
        /// Chain configuration for the Spindle and Knative-style targets
        /// [default: configs/hello.yaml].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Comma-separated: ceiling, userspace, sockmap, knative, or http://HOST:PORT/PATH
        /// [default: ceiling,userspace,sockmap,knative; with --hops: userspace,sockmap].
        #[arg(long, value_delimiter = ',')]
        targets: Option<Vec<spindle_bench::Target>>,
        /// Measured window per target and round (e.g. 10s, 500ms, 2m), after the warm-up.
        #[arg(long, value_parser = spindle_bench::parse_duration, default_value = "10s")]
        duration: Duration,
        /// Load before each measured window, discarded.
        #[arg(long, value_parser = spindle_bench::parse_duration, default_value = "2s")]
        warmup: Duration,
        /// Interleaved rounds: every target once per round, in order (published figures
        /// use 5 or more).
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Concurrent keep-alive connections.
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Open loop at this many requests/s (latency counted from the intended send time, so
        /// queueing is not hidden); closed loop when absent.
        #[arg(long)]
        rate: Option<u64>,
        /// Request path [default: the config's first chain route].
        #[arg(long)]
        path: Option<String>,
        /// Request body [default: "hello spindle"].
        #[arg(long, conflicts_with = "payload_sizes")]
        payload: Option<String>,
        /// Payload sweep: comma-separated sizes (13,4KiB,64KiB,1MiB,8MiB); each gets a
        /// generated deterministic body and is measured on every target.
        #[arg(long, value_name = "SIZES")]
        payload_sizes: Option<String>,
        /// The expected response body [default: each target's first check response].
        #[arg(long, conflicts_with = "expect_file")]
        expect_body: Option<String>,
        /// The expected response body, from a file.
        #[arg(long)]
        expect_file: Option<PathBuf>,
        /// Compare each connection's first response and every Nth after it with the expected
        /// body (a mismatch is a `wrong_body` error); 1: every response, 0: none.
        #[arg(long, default_value_t = 16)]
        verify_every: u64,
        /// Before each round, watch /proc/stat this long with no target running; its rate is
        /// subtracted from the whole-system CPU figure. 0s: no system CPU figure.
        #[arg(long, value_parser = spindle_bench::parse_duration, default_value = "2s")]
        idle_baseline: Duration,
        /// Per-hop mode: chains of these many copies of one function, one connection, closed
        /// loop; fits µs per hop and measures the ping-pong floor in the same run.
        #[arg(long, value_delimiter = ',', value_name = "N,N,...",
              conflicts_with_all = ["rate", "connections", "payload_sizes", "plot", "path", "config", "expect_body", "expect_file"])]
        hops: Option<Vec<usize>>,
        /// The function of every hop in --hops mode.
        #[arg(long, default_value = "examples/wasm/uppercase.wasm")]
        hops_module: PathBuf,
        /// Round trips per ping-pong floor variant and round in --hops mode.
        #[arg(long, default_value_t = 50_000)]
        floor_round_trips: usize,
        /// Write the report as JSON (stable field names, see docs/benchmarks.md).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write the Markdown table here too (it is always printed).
        #[arg(long)]
        markdown: Option<PathBuf>,
        /// SVG chart: throughput per target and latency CDFs.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// The bench's ceiling server (started by `spindle bench`).
    #[command(name = "bench-ceiling", hide = true)]
    BenchCeiling {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Run the Knative-style baseline (ingress -> queue-proxy -> function server per step,
    /// each its own process) on the same config and Wasm functions, for comparison:
    /// `spindle knative-baseline run --config CONFIG [--listen ADDR]`. `help` lists the roles.
    #[command(name = "knative-baseline", disable_help_flag = true)]
    KnativeBaseline {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Remote fork of a warm instance: `fork serve` prepares an image of it and serves its
    /// pages; `fork resume` starts a child from the image on any node, fetching pages lazily.
    #[command(subcommand)]
    Fork(ForkCommand),
    /// From inside the confinement FUNCTION's workers get (or one layer of it), try what an
    /// escaped guest would (open /etc/shadow, connect out, ptrace or signal the gateway,
    /// setuid 0, unshare, fork, exec) and print what the kernel said to each. Needs root.
    #[command(name = "sandbox-probe")]
    SandboxProbe(sandbox_probe::ProbeArgs),
    /// Run one function instance (started by `spindle run`, not by hand).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        chain: String,
        #[arg(long)]
        function: String,
        #[arg(long, required_unless_present = "zygote")]
        instance: Option<u32>,
        /// Resume from the image descriptor at fd 8 instead of building cold.
        #[arg(long, conflicts_with = "zygote")]
        from_image: bool,
        /// Be the function's zygote: build one warm instance, capture it and fork instances
        /// from it when the gateway asks on fd 10 (see chain_runtime::zygote).
        #[arg(long, conflicts_with = "instance")]
        zygote: bool,
    },
}

#[derive(Subcommand)]
enum ForkCommand {
    /// Build FUNCTION of CHAIN cold, warm it with the --warm requests, capture its image
    /// (fork_prepare) and serve the image's pages on --listen. Prints the image descriptor
    /// (a credential: pass it only over trusted channels) as one line on stdout; on
    /// SIGINT/SIGTERM stops and prints the page server's counters as one JSON line.
    Serve(fork_cli::ServeArgs),
    /// Start a child of the image DESCRIPTOR (the text `fork serve` printed, or @FILE) as
    /// FUNCTION of CHAIN in CONFIG, answer one request with --body, and print the answer and
    /// where the time went as one JSON line (fork_resume).
    Resume(fork_cli::ResumeArgs),
    /// Measure local fork against cold exec on this node: "a new instance is needed" to its
    /// first response, with breakdown, floors, forks per second from one zygote and the
    /// memory of a forked worker against a cold one. One JSON line per result.
    #[command(name = "local-bench")]
    LocalBench(local_bench::LocalBenchArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate { config } => validate(&config),
        Command::Reload { admin } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")
            .and_then(|rt| rt.block_on(reload_through(&admin))),
        Command::Bench {
            config,
            targets,
            duration,
            warmup,
            rounds,
            connections,
            rate,
            path,
            payload,
            payload_sizes,
            expect_body,
            expect_file,
            verify_every,
            idle_baseline,
            hops,
            hops_module,
            floor_round_trips,
            json,
            markdown,
            plot,
        } => std::env::current_exe()
            .context("locating the spindle binary")
            .and_then(|exe| {
                // Runs on this (main) thread: the targets' parent-death signal is tied to it.
                if let Some(hops) = hops {
                    let defaults = spindle_bench::HopsOptions::default();
                    let opts = spindle_bench::HopsOptions {
                        hops,
                        targets: targets.unwrap_or(defaults.targets.clone()),
                        rounds,
                        duration,
                        warmup,
                        module: hops_module,
                        payload: payload.map_or(defaults.payload.clone(), String::into_bytes),
                        verify_every,
                        floor_round_trips,
                        json,
                        markdown,
                    };
                    return spindle_bench::run_hops(&opts, &exe)
                        .map(drop)
                        .map_err(Into::into);
                }
                let defaults = spindle_bench::BenchOptions::default();
                let payload_sizes = payload_sizes
                    .map(|list| spindle_bench::parse_sizes(&list))
                    .transpose()?;
                let expect = match (expect_body, expect_file) {
                    (Some(body), _) => Some(spindle_bench::Expect::Body(body.into_bytes())),
                    (None, Some(file)) => Some(spindle_bench::Expect::File(file)),
                    (None, None) => None,
                };
                let opts = spindle_bench::BenchOptions {
                    config: config.unwrap_or(defaults.config.clone()),
                    targets: targets.unwrap_or(defaults.targets.clone()),
                    duration,
                    warmup,
                    rounds,
                    connections,
                    rate,
                    path,
                    payload: payload.map_or(defaults.payload.clone(), String::into_bytes),
                    payload_sizes,
                    expect,
                    verify_every,
                    idle_baseline,
                    json,
                    markdown,
                    plot,
                };
                spindle_bench::run(&opts, &exe)
                    .map(drop)
                    .map_err(Into::into)
            }),
        Command::BenchCeiling { listen } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")
            .and_then(|rt| {
                rt.block_on(spindle_bench::serve_ceiling(listen))
                    .with_context(|| format!("ceiling server on {listen}"))
            }),
        Command::KnativeBaseline { args } => knative_baseline::main_entry(args).map_err(Into::into),
        Command::Fork(ForkCommand::Serve(args)) => fork_cli::serve(args),
        Command::Fork(ForkCommand::Resume(args)) => fork_cli::resume(args),
        Command::Fork(ForkCommand::LocalBench(args)) => local_bench::run(args),
        Command::SandboxProbe(args) => sandbox_probe::run(args),
        Command::Worker {
            config,
            chain,
            function,
            zygote: true,
            ..
        } => {
            let args = ZygoteArgs {
                config,
                chain,
                function,
            };
            // /proc's name for it: tests and operators tell it from the workers it forks.
            let _ = nix::sys::prctl::set_name(c"spindle-zygote");
            chain_runtime::zygote::run(&args)
                .with_context(|| format!("zygote of {}/{}", args.chain, args.function))
        }
        Command::Worker {
            config,
            chain,
            function,
            instance,
            from_image,
            zygote: false,
        } => {
            let args = WorkerArgs {
                config,
                chain,
                function,
                instance: instance.expect("clap requires --instance without --zygote"),
                from_image,
            };
            worker::run(&args).with_context(|| {
                format!(
                    "worker {}/{} instance {}",
                    args.chain, args.function, args.instance
                )
            })
        }
        Command::Run {
            config,
            listen,
            dataplane,
            resume,
            serve_images,
            admin,
            zygote_reply_timeout,
            peers,
        } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")
            .and_then(|rt| {
                let node = NodeArgs {
                    serve_images,
                    admin,
                    zygote_reply_timeout,
                    peers,
                };
                rt.block_on(run(&config, listen, dataplane, &resume, node))
            }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if told_the_gateway(&e) => {
            // The gateway reports it, with the function's name: printed here too, it would
            // only say the same again.
            tracing::debug!("{e:#}");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A worker's or zygote's start failure that it already sent to the gateway.
fn told_the_gateway(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<worker::WorkerError>(),
        Some(worker::WorkerError::Reported(_))
    ) || matches!(
        e.downcast_ref::<chain_runtime::zygote::ZygoteError>(),
        Some(chain_runtime::zygote::ZygoteError::Reported(_))
    )
}

/// CPUs this process may run on (its affinity mask), for `http.shards: auto`.
/// The `ingress:` programs, attached; `None` when the file asks for none.
fn ingress_programs(
    config: &Config,
    node_args: &NodeArgs,
    listeners: &gateway::shards::Listeners,
    cpus: &[usize],
) -> anyhow::Result<Option<Arc<gateway::ingress::Ingress>>> {
    let spec = &config.ingress;
    if spec.guard.is_none()
        && spec.fast_path.is_none()
        && spec.local_redirect.is_none()
        && listeners.shards() == 1
    {
        return Ok(None);
    }
    // The guard always lets the gateway's own listeners be reached.
    let mut ports = vec![listeners.local_addr().port()];
    let peer_listen = node_args.peers.peer_listen.or(config.node.peer_listen);
    for addr in [peer_listen, node_args.serve_images].into_iter().flatten() {
        if !ports.contains(&addr.port()) {
            ports.push(addr.port());
        }
    }
    let ingress = gateway::ingress::Ingress::start(
        spec,
        &gateway::ingress::ServicePorts(ports),
        listeners,
        cpus,
    )?;
    Ok(Some(Arc::new(ingress)))
}

fn usable_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// How resumed instances fetch pages, with the reason it is not RDMA. Resuming fetches over
/// TCP today whatever the probe finds, and says so rather than claim RDMA.
fn fork_pages_transport() -> (&'static str, String) {
    use rdma_fork::transport::{Transport, TransportPref, choose};
    match choose(TransportPref::Rdma) {
        (_, Some(fallback)) => ("tcp", fallback.to_string()),
        (Transport::Tcp, None) => ("tcp", "TCP chosen".to_owned()),
        #[allow(unreachable_patterns)]
        (t, None) => (
            "tcp",
            format!(
                "an RDMA device is present ({}), but resuming does not fetch over RDMA yet",
                t.label()
            ),
        ),
    }
}

/// `--resume FUNCTION=DESCRIPTOR|@FILE` arguments, checked (a defined function, a descriptor
/// that parses), each descriptor pinned in a sealed memfd for the function's workers.
fn resume_images(
    config: &Config,
    args: &[String],
) -> anyhow::Result<std::collections::HashMap<String, Arc<gateway::supervisor::ResumeFds>>> {
    let mut images = std::collections::HashMap::new();
    for arg in args {
        let Some((function, value)) = arg.split_once('=') else {
            bail!("--resume {arg}: expected FUNCTION=DESCRIPTOR or FUNCTION=@FILE");
        };
        let Some(spec) = config.function(function) else {
            bail!("--resume {arg}: no function {function} in the config");
        };
        if spec.isolation == chain_runtime::config::Isolation::FreshPerRequest {
            bail!(
                "--resume {function}: `isolation: fresh_per_request` resets to a local image, \
                 which an instance resumed from a remote one does not have"
            );
        }
        let descriptor =
            fork_cli::read_descriptor(value).with_context(|| format!("--resume {function}"))?;
        let pinned = sealed_memfd("spindle-image", descriptor.to_string().as_bytes())
            .context("pinning the image descriptor")?;
        let cache = rdma_fork::NodeCache::create(&descriptor)
            .with_context(|| format!("--resume {function}: creating the node page cache"))?;
        let fds = gateway::supervisor::ResumeFds {
            descriptor: pinned,
            cache,
        };
        if images.insert(function.to_owned(), Arc::new(fds)).is_some() {
            bail!("--resume {function} given twice");
        }
    }
    Ok(images)
}

/// The config's checks, then each function's module compiled and checked against what
/// Spindle gives it and what its mode calls (`chain_runtime::abi`), without running it.
fn validate(path: &Path) -> anyhow::Result<()> {
    match Config::load_checking(path, &mut chain_runtime::abi::check_file) {
        Ok(config) => {
            println!(
                "{}: ok ({} functions, {} chains)",
                path.display(),
                config.functions.len(),
                config.chains.len()
            );
            Ok(())
        }
        Err(errors) => {
            println!("{errors}");
            bail!("{} problem(s) in {}", errors.0.len(), path.display())
        }
    }
}

/// POST /reload on the admin socket at `admin`; prints the answer.
async fn reload_through(admin: &Path) -> anyhow::Result<()> {
    use http_body_util::BodyExt;
    let stream = tokio::net::UnixStream::connect(admin)
        .await
        .with_context(|| format!("connecting to the admin socket {}", admin.display()))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .context("talking HTTP on the admin socket")?;
    tokio::spawn(connection);
    let request = hyper::Request::post("/reload")
        .header(hyper::header::HOST, "spindle-admin")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .context("building the request")?;
    let response = sender
        .send_request(request)
        .await
        .context("sending POST /reload")?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .context("reading the answer")?
        .to_bytes();
    let body = String::from_utf8_lossy(&body);
    if status.is_success() {
        println!("{}", body.trim_end());
        Ok(())
    } else {
        bail!("{} ({status})", body.trim_end())
    }
}

/// Loads the kernel dataplane and declares every function to it; `Err` says why it cannot be
/// used.
fn load_kernel_dataplane(plan: &Plan) -> anyhow::Result<Arc<sockmap_bpf::KernelDataplane>> {
    // Both ends of every worker connection go in the socket map.
    let sockets: u64 = plan
        .chains
        .iter()
        .flat_map(|c| &c.stages)
        .map(|s| 2 * u64::from(gateway::dataplane::instance_slots(&s.function)))
        .sum();
    if sockets > u64::from(sockmap_bpf::MAX_SOCKETS) {
        bail!(
            "{sockets} worker sockets exceed the eBPF socket map's {} entries",
            sockmap_bpf::MAX_SOCKETS
        );
    }
    let kernel = sockmap_bpf::KernelDataplane::load()?;
    let mut slot_base = 0u32;
    for chain in &plan.chains {
        for stage in &chain.stages {
            let info = sockmap_bpf::FnInfo {
                chain: u32::from(chain.id),
                instances: gateway::dataplane::instance_slots(&stage.function),
                slot_base,
                slots: chain.spec.total_slots(),
            };
            kernel.register_function(stage.fn_id, info)?;
        }
        slot_base = slot_base.saturating_add(chain.spec.total_slots());
    }
    Ok(Arc::new(kernel))
}

/// Where each chain's slots start in the kernel's holder table (same order as above).
fn slot_bases(plan: &Plan) -> Vec<u32> {
    plan.chains
        .iter()
        .scan(0u32, |base, c| {
            let this = *base;
            *base = base.saturating_add(c.spec.total_slots());
            Some(this)
        })
        .collect()
}

/// Fills every free fd number up to the highest one a worker is handed with /dev/null, for
/// the gateway's whole life. Spawning a worker dup2s its fds onto those fixed numbers in the
/// child; had std's spawn machinery (its close-on-exec error pipe, /dev/null for stdin) got
/// one of those numbers, the dup2 would replace it and a failed exec would write its error
/// into the worker's arena instead of reporting it.
fn reserve_worker_fd_numbers() -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, IntoRawFd};
    loop {
        // std opens with O_CLOEXEC: no worker inherits these.
        let null = std::fs::File::open("/dev/null")?;
        if null.as_raw_fd() > proto::worker::HIGHEST_FIXED_FD {
            return Ok(());
        }
        // Deliberately never closed.
        let _ = null.into_raw_fd();
    }
}

/// `spindle run`'s node service options, and how long its zygotes may take to answer.
struct NodeArgs {
    serve_images: Option<SocketAddr>,
    admin: Option<PathBuf>,
    zygote_reply_timeout: Duration,
    peers: gateway::peers::PeerArgs,
}

async fn run(
    config_path: &Path,
    listen: Option<SocketAddr>,
    dataplane: Option<DataplaneMode>,
    resume: &[String],
    node_args: NodeArgs,
) -> anyhow::Result<()> {
    reserve_worker_fd_numbers().context("reserving the fd numbers workers are handed")?;
    // Installed first: a SIGHUP during start-up (which can take long) must not end the
    // gateway; it is acted on once serving.
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let config_path = config_path
        .canonicalize()
        .with_context(|| format!("cannot open config {}", config_path.display()))?;
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read config {}", config_path.display()))?;
    let config = Config::parse(&text, &config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let plan = Plan::new(&config);
    let listen = match listen.or(config.listen) {
        Some(addr) => addr,
        None => DEFAULT_LISTEN.parse().expect("valid default address"),
    };
    let shards = config.http.shards.count(usable_cpus());
    let listeners = gateway::shards::Listeners::bind(listen, shards)?;
    let cpus = gateway::shards::usable_cpus();
    // Before any worker starts: a guard the kernel or the privileges refuse stops the
    // start-up at once, with the reason.
    let ingress = ingress_programs(&config, &node_args, &listeners, &cpus)?;
    let pin = (shards > 1 && config.ingress.steering.pins_shards()).then_some(cpus.as_slice());
    let dataplane_threads =
        gateway::shards::Shards::spawn(shards, pin).context("starting the dataplane threads")?;
    // Before any worker starts: binding sets the process-wide umask for a moment.
    let admin = node_args
        .admin
        .as_deref()
        .map(AdminListener::bind)
        .transpose()?;

    let (kernel, status) = match dataplane.unwrap_or(config.dataplane) {
        DataplaneMode::Userspace => (None, DataplaneStatus::userspace(None)),
        DataplaneMode::Sockmap => {
            let kernel = load_kernel_dataplane(&plan)
                .context("dataplane sockmap: cannot use the eBPF dataplane")?;
            (Some(kernel), DataplaneStatus::sockmap())
        }
        DataplaneMode::Auto => match load_kernel_dataplane(&plan) {
            Ok(kernel) => (Some(kernel), DataplaneStatus::sockmap()),
            Err(e) => {
                let reason = format!("{e:#}");
                tracing::warn!("eBPF dataplane unavailable, routing in userspace: {reason}");
                (None, DataplaneStatus::userspace(Some(reason)))
            }
        },
    };
    tracing::info!("dataplane: {}", status.mode);
    let mut status = status;
    if !resume.is_empty() {
        status.fork_pages = Some(fork_pages_transport());
    }

    let metrics = Arc::new(Metrics::new());
    let bases = slot_bases(&plan);
    let mut chains = Vec::new();
    for chain in &plan.chains {
        let spec = &chain.spec;
        let arena = Arena::create_classes(
            &format!("spindle-{}", spec.name),
            &gateway::payload::arena_spec(spec),
        )
        .with_context(|| format!("creating the arena of chain {}", spec.name))?;
        tracing::info!(
            chain = %spec.name, route = %spec.route, slots = spec.slots, slot_size = spec.slot_size,
            large_slots = spec.large.map_or(0, |l| l.slots),
            large_slot_size = spec.large.map_or(0, |l| l.slot_size),
            hugepages = arena.uses_hugepages(), "arena created"
        );
        let route = kernel.as_ref().map(|k| KernelRoute {
            dataplane: Arc::clone(k),
            slot_base: bases[usize::from(chain.id)],
        });
        let runtime = ChainRuntime::new(chain.clone(), Arc::new(arena), route)
            .with_context(|| format!("creating the statistics pages of chain {}", spec.name))?;
        chains.push(Arc::new(runtime));
    }

    let cmd = WorkerCommand {
        exe: std::env::current_exe().context("locating the spindle binary")?,
        config: config_path.clone(),
        config_text: Arc::new(
            sealed_memfd("spindle-config", text.as_bytes()).context("pinning the config")?,
        ),
        images: resume_images(&config, resume)?,
        controls: Arc::new(ControlBoard::default()),
        sandbox: gateway::supervisor::sandbox_namespaces(&config).context(
            "making the sandbox namespaces (`sandbox: { enabled: false }` runs workers unconfined)",
        )?,
        dataplane: Some(Arc::clone(&dataplane_threads)),
    };
    // Namespaces and a uid change come together (both need root); seccomp needs nothing.
    let confined = cmd.sandbox.is_some();
    metrics.set_sandbox(confined, confined, config.sandbox.enabled);
    // Up before any worker, so a page server that cannot bind stops the start-up early.
    let node = match &admin {
        None => None,
        Some(_) => {
            let node = NodeService::start(
                chains.clone(),
                Arc::clone(&cmd.controls),
                node_args.serve_images,
            )?;
            match node.page_server_addr() {
                Some(addr) => tracing::info!("serving image pages on {addr}"),
                None => tracing::info!("not serving images (no --serve-images)"),
            }
            if let Some(path) = &node_args.admin {
                tracing::info!("admin API on unix:{}", path.display());
            }
            Some(Arc::new(node))
        }
    };
    let cluster = gateway::peers::Cluster::start(
        &config,
        &node_args.peers,
        listeners.local_addr(),
        &chains,
        node.clone(),
    )
    .await?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut starting = Vec::new();
    let mut supervisors = Vec::new();
    let mut running = Vec::new();
    for chain in &chains {
        for (stage, st) in chain.stages.iter().enumerate() {
            let function = &chain.plan.stages[stage].function;
            let path = &function.module;
            let bytes = std::fs::read(path)
                .with_context(|| format!("reading module {}", path.display()))?;
            let inputs = Arc::new(FunctionInputs::pin(function, &bytes)?);
            // Instances resumed from a remote image keep starting by exec for now.
            let forks = chain.plan.stages[stage].function.start == StartMode::Fork
                && !cmd.images.contains_key(&st.name);
            let generation = gateway::scaler::Generation::start(
                1,
                cmd.clone(),
                chain,
                &metrics,
                inputs,
                stage,
                forks.then_some(node_args.zygote_reply_timeout),
                &shutdown_rx,
            );
            metrics
                .function_generation
                .with_label_values(&[chain.plan.spec.name.as_str(), st.name.as_str()])
                .set(1);
            let (mut pool, rolls) = gateway::scaler::Pool::new(
                Arc::clone(chain),
                Arc::clone(&metrics),
                generation,
                stage,
                shutdown_rx.clone(),
            );
            pool.set_peers(cluster.pool_peers(usize::from(chain.plan.id), stage));
            running.push(gateway::reload::Running {
                chain: Arc::clone(chain),
                stage,
                rolls,
                spec: chain.plan.stages[stage].function.clone(),
                module_digest: gateway::reload::digest(&bytes),
                generation: 1,
            });
            let initial = pool.initial();
            for instance in 0..initial as usize {
                let rx = pool.start_instance().expect("min <= max instance slots");
                starting.push((
                    chain.plan.spec.name.clone(),
                    st.name.clone(),
                    instance,
                    initial as usize,
                    rx,
                ));
            }
            supervisors.push(tokio::spawn(pool.run()));
        }
        // Sends requests that waited for an instance on once one can take them.
        tokio::spawn(Arc::clone(chain).dispatch_waiting());
        // Kills instances that hold a request long past its deadline (e.g. a stopped worker).
        tokio::spawn(Arc::clone(chain).reap_overdue());
    }
    let total = starting.len();
    for (n, (chain, function, instance, of, rx)) in starting.into_iter().enumerate() {
        match rx.await {
            Ok(Ok(took)) => tracing::info!(
                "[{}/{total}] {chain}/{function} instance {}/{of} up in {} ms",
                n + 1,
                instance + 1,
                took.as_millis()
            ),
            Ok(Err(e)) => {
                let _ = shutdown_tx.send(true);
                bail!("function {function} of chain {chain} failed to start: {e}");
            }
            Err(_) => bail!("supervisor of {chain}/{function} ended during start-up"),
        }
    }

    // Reloads run one at a time in their own task; SIGHUP and the admin API ask for them.
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
    let (sighup_tx, sighup_rx) = tokio::sync::mpsc::channel(1);
    let reloader = gateway::reload::Reloader {
        config_path: config_path.clone(),
        config: config.clone(),
        cmd: cmd.clone(),
        metrics: Arc::clone(&metrics),
        shutdown: shutdown_rx.clone(),
        zygote_reply_timeout: node_args.zygote_reply_timeout,
        functions: running,
    };
    tokio::spawn(reloader.serve(reload_rx, sighup_rx));
    if let Some(node) = &node {
        node.accept_reloads(reload_tx);
    }

    let mut gateway = Gateway::new(chains, Arc::clone(&metrics), status)
        .with_cluster(Arc::new(cluster))
        .with_ingress(ingress);
    let mut admin_task = None;
    if let (Some(node), Some(admin)) = (node, admin) {
        admin_task = Some(tokio::spawn(Arc::clone(&node).serve_admin(admin)));
        gateway = gateway.with_node(node);
    }
    let gateway = Arc::new(gateway);
    tracing::info!(
        "spindle serving {} chain(s) on http://{} ({})",
        gateway.chains.len(),
        listeners.local_addr(),
        match listeners.shards() {
            1 => "one dataplane thread".to_string(),
            n => format!("{n} dataplane threads"),
        }
    );
    for c in &gateway.chains {
        tracing::info!("  {} -> chain {}", c.plan.spec.route, c.plan.spec.name);
    }

    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let front = gateway::front::Front::new(
        config.http,
        metrics.http_connections_open.clone(),
        metrics.http_connections_refused.clone(),
        metrics.http_connections_closed.clone(),
    );
    dataplane_threads.serve(
        listeners,
        gateway::shards::FrontContext {
            gateway: Arc::clone(&gateway),
            front,
            header_read_timeout: HEADER_READ_TIMEOUT,
            drain_timeout: DRAIN_TIMEOUT,
        },
    );
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                tracing::info!("SIGHUP: reloading {}", config_path.display());
                // A reload already waiting covers this one too.
                let _ = sighup_tx.try_send(());
            }
        }
    }

    // Stop accepting, let requests in flight finish (workers still up), then stop workers.
    tracing::info!("shutting down: draining requests in flight");
    dataplane_threads.stop_front().await;
    if let Some(task) = admin_task {
        // Dropping the task's future drops the listener, which removes the socket file.
        task.abort();
        let _ = task.await;
    }
    // Peers retire what they run from this node's images while its page server still serves.
    gateway.cluster.release(PEER_RELEASE_TIMEOUT).await;
    tracing::info!("stopping workers");
    let _ = shutdown_tx.send(true);
    // Each supervisor stops (SIGTERM, then SIGKILL) and reaps its worker before returning.
    for handle in supervisors {
        let _ = handle.await;
    }
    // The workers' sockets are closed: nothing is left on the dataplane threads.
    dataplane_threads.shut_down().await;
    tracing::info!("stopped");
    Ok(())
}
