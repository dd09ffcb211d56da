//! `spindle fork local-bench`: "a new instance is needed → its first response", cold exec
//! against local fork from a zygote, through the gateway's own start paths
//! (`supervisor::exec_worker_process`, `zygote::supervise` and `Zygote::fork`) with a real
//! arena, socket and statistics page, beside the floors measured in the same run (a bare
//! fork + exit, and fork + exec of /bin/true). Rounds are interleaved; each round's p50 and
//! p99 are taken, and the medians of those over rounds are printed, with a breakdown, the
//! forks per second one zygote sustains, and the memory of a forked worker against a cold
//! one (/proc/PID/smaps_rollup). One JSON object per result on stdout; a summary on stderr.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chain_runtime::config::Config;
use chain_runtime::instance::{Handoff, InstanceBuilder, sealed_memfd};
use chain_runtime::plan::Plan;
use chain_runtime::stats::StatsPage;
use gateway::dataplane::ChainRuntime;
use gateway::metrics::Metrics;
use gateway::process::WorkerProcess;
use gateway::supervisor::{FunctionInputs, WorkerCommand, exec_worker_process, socket_pair};
use gateway::zygote::Zygote;
use nix::sys::signal::Signal;
use proto::zygote::SpawnRequest;
use proto::{Descriptor, Status};
use serde_json::json;
use shm::Arena;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a start may take to answer before the bench gives up instead of hanging.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads one descriptor's bytes, or fails after [`STEP_TIMEOUT`].
async fn read_descriptor(
    socket: &mut tokio::net::TcpStream,
    what: &str,
) -> anyhow::Result<[u8; Descriptor::SIZE]> {
    let mut buf = [0u8; Descriptor::SIZE];
    tokio::time::timeout(STEP_TIMEOUT, socket.read_exact(&mut buf))
        .await
        .with_context(|| format!("no {what} within {STEP_TIMEOUT:?}"))?
        .with_context(|| format!("reading the {what}"))?;
    Ok(buf)
}

#[derive(clap::Args)]
pub struct LocalBenchArgs {
    config: PathBuf,
    #[arg(long)]
    chain: String,
    #[arg(long)]
    function: String,
    /// Interleaved rounds; medians over rounds are reported.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Forked starts per round (cold starts per round: a fifth of this, at least 2).
    #[arg(long, default_value_t = 40)]
    samples: usize,
    /// Children forked back to back for the forks-per-second figure.
    #[arg(long, default_value_t = 100)]
    burst: usize,
    /// The request body of each first request.
    #[arg(long, default_value = "x")]
    body: String,
}

/// One start: microseconds from "needed" to each step.
#[derive(Default, Clone, Copy)]
struct Start {
    /// Fork: the clone system call in the zygote. Exec: `spawn` returning.
    syscall_us: f64,
    /// Fork: the zygote's reply with the pid.
    launched_us: f64,
    ready_us: f64,
    first_response_us: f64,
}

struct Bench {
    cmd: WorkerCommand,
    chain: Arc<ChainRuntime>,
    inputs: Arc<FunctionInputs>,
    zygote: Arc<Zygote>,
    stage: usize,
    chain_id: u16,
    fn_id: u32,
    body: Vec<u8>,
    next_request: u64,
}

pub fn run(args: LocalBenchArgs) -> anyhow::Result<()> {
    // One thread: the bare-fork floor forks this process, and the children the zygote clones
    // get their parent-death signal from this thread.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(bench(args))
}

async fn bench(args: LocalBenchArgs) -> anyhow::Result<()> {
    let config_path = args.config.canonicalize().context("opening the config")?;
    let text = std::fs::read_to_string(&config_path)?;
    let config = Config::parse(&text, &config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let builder = InstanceBuilder::new(&config, &args.chain, &args.function)?;
    let (chain_id, fn_id) = (builder.chain().id, builder.stage().fn_id);
    let plan = Plan::new(&config);
    let chain_plan = plan.chains[usize::from(chain_id)].clone();
    let stage = chain_plan
        .stages
        .iter()
        .position(|s| s.fn_id == fn_id)
        .expect("the builder found it");
    let spec = &chain_plan.spec;
    let arena = Arena::create_classes("spindle-bench", &gateway::payload::arena_spec(spec))?;
    let chain = Arc::new(ChainRuntime::new(
        chain_plan.clone(),
        Arc::new(arena),
        None,
    )?);
    let function = &chain_plan.stages[stage].function;
    let inputs = Arc::new(FunctionInputs::pin(
        function,
        &std::fs::read(&function.module)
            .with_context(|| format!("reading {}", function.module.display()))?,
    )?);
    let cmd = WorkerCommand {
        exe: std::env::current_exe()?,
        config: config_path.clone(),
        config_text: Arc::new(sealed_memfd("spindle-config", text.as_bytes())?),
        images: Default::default(),
        controls: Default::default(),
        sandbox: gateway::supervisor::sandbox_namespaces(&config)?,
        // Socket tasks run on this command's own runtime.
        dataplane: None,
    };
    let zygote = Zygote::new(gateway::zygote::DEFAULT_REPLY_TIMEOUT);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let began = Instant::now();
    let supervisor = tokio::spawn(gateway::zygote::supervise(
        Arc::clone(&zygote),
        cmd.clone(),
        Arc::clone(&chain),
        Arc::new(Metrics::new()),
        Arc::clone(&inputs),
        stage,
        stop_rx,
    ));
    if let Err(why) = zygote.first_start().await {
        match why {
            Some(why) => bail!("the function cannot start: {why}"),
            None => bail!("the zygote did not start (its log is above)"),
        }
    }
    let zygote_up_ms = began.elapsed().as_secs_f64() * 1e3;
    let mut bench = Bench {
        cmd,
        chain,
        inputs,
        zygote,
        stage,
        chain_id,
        fn_id,
        body: args.body.into_bytes(),
        next_request: 1,
    };

    let cold_samples = (args.samples / 5).max(2);
    let (mut forks, mut colds) = (Vec::new(), Vec::new());
    let (mut fork_floor, mut exec_floor) = (Vec::new(), Vec::new());
    let (mut fork_mem, mut cold_mem) = (None, None);
    for round in 0..args.rounds {
        let mut round_forks = Vec::new();
        for i in 0..args.samples {
            let (start, pid, mut child, _socket) = bench.start(true).await?;
            if round == 0 && i == 0 {
                fork_mem = Some(memory(pid).context("forked worker's memory")?);
            }
            child
                .signal(Signal::SIGKILL)
                .context("killing a forked worker")?;
            child.wait().await.context("reaping a forked worker")?;
            round_forks.push(start);
        }
        let mut round_colds = Vec::new();
        for i in 0..cold_samples {
            let (start, pid, mut child, _socket) = bench.start(false).await?;
            if round == 0 && i == 0 {
                cold_mem = Some(memory(pid).context("cold worker's memory")?);
            }
            child
                .signal(Signal::SIGKILL)
                .context("killing a cold worker")?;
            child.wait().await.context("reaping a cold worker")?;
            round_colds.push(start);
        }
        let mut bare = Vec::new();
        let mut exec = Vec::new();
        for _ in 0..args.samples {
            bare.push(bare_fork_us().context("bare fork floor")?);
        }
        for _ in 0..cold_samples {
            exec.push(exec_true_us().context("fork+exec floor")?);
        }
        fork_floor.push(bare);
        exec_floor.push(exec);
        forks.push(round_forks);
        colds.push(round_colds);
        eprintln!("round {}/{} done", round + 1, args.rounds);
    }
    let burst = bench.burst(args.burst).await?;
    let _ = stop_tx.send(true);
    let _ = supervisor.await;

    let report = |name: &str, rounds: &[Vec<Start>]| {
        let field = |f: fn(&Start) -> f64| -> (f64, f64) {
            let per_round: Vec<Vec<f64>> =
                rounds.iter().map(|r| r.iter().map(f).collect()).collect();
            medians_of(&per_round)
        };
        let (syscall, launched, ready, first) = (
            field(|s| s.syscall_us),
            field(|s| s.launched_us),
            field(|s| s.ready_us),
            field(|s| s.first_response_us),
        );
        json!({
            "result": name, "rounds": rounds.len(), "samples_per_round": rounds[0].len(),
            "syscall_us": {"p50": syscall.0, "p99": syscall.1},
            "launched_us": {"p50": launched.0, "p99": launched.1},
            "ready_us": {"p50": ready.0, "p99": ready.1},
            "first_response_us": {"p50": first.0, "p99": first.1},
        })
    };
    let fork = report("local_fork", &forks);
    let cold = report("cold_exec", &colds);
    let (bare_p50, bare_p99) = medians_of(&fork_floor);
    let (exec_p50, exec_p99) = medians_of(&exec_floor);
    let lines = [
        json!({"result": "zygote", "up_ms": zygote_up_ms}),
        fork.clone(),
        cold.clone(),
        json!({"result": "floor_bare_fork", "us": {"p50": bare_p50, "p99": bare_p99}}),
        json!({"result": "floor_fork_exec_true", "us": {"p50": exec_p50, "p99": exec_p99}}),
        burst,
        json!({"result": "memory_kib", "forked": fork_mem, "cold": cold_mem}),
    ];
    for line in &lines {
        println!("{line}");
    }
    let f = fork["first_response_us"]["p50"].as_f64().unwrap_or(0.0);
    let c = cold["first_response_us"]["p50"].as_f64().unwrap_or(0.0);
    eprintln!(
        "first response p50: local fork {f:.0} us, cold exec {c:.0} us ({:.0}x); floors: bare \
         fork {bare_p50:.0} us, fork+exec /bin/true {exec_p50:.0} us",
        c / f.max(1.0)
    );
    Ok(())
}

impl Bench {
    /// Starts one instance (forked or cold), sends it one request and returns the timings,
    /// its pid and the process, still running while the returned socket is open (a worker
    /// exits when its socket closes).
    async fn start(
        &mut self,
        fork: bool,
    ) -> anyhow::Result<(Start, u32, WorkerProcess, tokio::net::TcpStream)> {
        let stats = &self.chain.stages[self.stage].instances[0].stats_fd;
        let (gateway_end, worker_end) = socket_pair().context("worker socket")?;
        // The bench never prepares: the worker's control thread just sees EOF.
        let (_control, worker_control) =
            std::os::unix::net::UnixStream::pair().context("control socket")?;
        let t0 = Instant::now();
        let mut start = Start::default();
        let child = if fork {
            let request = SpawnRequest {
                instance: 0,
                incarnation: self.next_request,
            };
            let (child, fork_took) = self
                .zygote
                .fork(
                    request,
                    worker_end.as_fd(),
                    stats.as_fd(),
                    worker_control.as_fd(),
                )
                .await?;
            start.syscall_us = fork_took.as_secs_f64() * 1e6;
            WorkerProcess::Forked(child)
        } else {
            let plan = Handoff {
                arena: self.chain.arena.payload_fd(),
                arena_meta: self.chain.arena.meta_fd(),
                socket: worker_end.as_fd(),
                config: self.cmd.config_text.as_fd(),
                module: self.inputs.module.as_fd(),
                stats: stats.as_fd(),
                control: worker_control.as_fd(),
                image: None,
                cache: None,
                namespaces: self.cmd.namespaces(),
                preopens: self.inputs.preopens.fds(),
            }
            .exec_plan()?;
            let args = [
                "worker",
                "--config",
                &self.cmd.config.display().to_string(),
                "--chain",
                &self.chain.plan.spec.name,
                "--function",
                &self.chain.stages[self.stage].name,
                "--instance",
                "0",
            ]
            .map(str::to_owned);
            let child = exec_worker_process(&self.cmd, &args, plan.placements())
                .context("exec'ing a cold worker")?;
            start.syscall_us = t0.elapsed().as_secs_f64() * 1e6;
            child
        };
        start.launched_us = t0.elapsed().as_secs_f64() * 1e6;
        drop(worker_end);
        let pid = child.id().unwrap_or(0);
        gateway_end.set_nonblocking(true)?;
        let mut socket = tokio::net::TcpStream::from_std(gateway_end)?;
        read_descriptor(&mut socket, "ready message").await?;
        start.ready_us = t0.elapsed().as_secs_f64() * 1e6;
        let arena = &self.chain.arena;
        let slot = arena.alloc(self.next_request)?;
        arena.write(slot, 0, &self.body)?;
        let request = Descriptor {
            next_fn: self.fn_id,
            chain: self.chain_id,
            request_id: self.next_request,
            slot: slot.index,
            generation: slot.generation,
            len: self.body.len() as u32,
            ..Descriptor::default()
        };
        self.next_request += 1;
        socket.write_all(&request.to_bytes()).await?;
        let buf = read_descriptor(&mut socket, "first response").await?;
        start.first_response_us = t0.elapsed().as_secs_f64() * 1e6;
        let reply = Descriptor::from_bytes(&buf);
        arena.release(slot)?;
        if reply.status != Status::Ok as u8 {
            bail!("the first request failed with status {}", reply.status);
        }
        Ok((start, pid, child, socket))
    }

    /// Forks `n` children back to back from one zygote: forks per second (zygote replies)
    /// and ready instances per second (every ready message in).
    async fn burst(&mut self, n: usize) -> anyhow::Result<serde_json::Value> {
        let mut stats = Vec::with_capacity(n);
        for i in 0..n {
            stats.push(StatsPage::create(&format!("spindle-bench-{i}"))?.1);
        }
        let mut sockets = Vec::with_capacity(n);
        let mut children = Vec::with_capacity(n);
        let began = Instant::now();
        let mut fork_us = Vec::with_capacity(n);
        for stat in &stats {
            let (gateway_end, worker_end) = socket_pair()?;
            let (_control, worker_control) = std::os::unix::net::UnixStream::pair()?;
            let request = SpawnRequest {
                instance: 0,
                incarnation: self.next_request,
            };
            self.next_request += 1;
            let (child, took) = self
                .zygote
                .fork(
                    request,
                    worker_end.as_fd(),
                    stat.as_fd(),
                    worker_control.as_fd(),
                )
                .await?;
            fork_us.push(took.as_secs_f64() * 1e6);
            children.push(WorkerProcess::Forked(child));
            gateway_end.set_nonblocking(true)?;
            sockets.push(tokio::net::TcpStream::from_std(gateway_end)?);
        }
        let forked = began.elapsed();
        for socket in &mut sockets {
            read_descriptor(socket, "ready message").await?;
        }
        let ready = began.elapsed();
        for child in &mut children {
            child.signal(Signal::SIGKILL).context("killing the burst")?;
        }
        for child in &mut children {
            child.wait().await.context("reaping the burst")?;
        }
        fork_us.sort_by(f64::total_cmp);
        Ok(json!({
            "result": "burst", "children": n,
            "forks_per_s": n as f64 / forked.as_secs_f64(),
            "ready_per_s": n as f64 / ready.as_secs_f64(),
            "fork_syscall_us_p50": percentile(&fork_us, 0.5),
        }))
    }
}

/// (median over rounds of each round's p50, median over rounds of each round's p99).
fn medians_of(rounds: &[Vec<f64>]) -> (f64, f64) {
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    for round in rounds {
        let mut sorted = round.clone();
        sorted.sort_by(f64::total_cmp);
        p50s.push(percentile(&sorted, 0.5));
        p99s.push(percentile(&sorted, 0.99));
    }
    p50s.sort_by(f64::total_cmp);
    p99s.sort_by(f64::total_cmp);
    (percentile(&p50s, 0.5), percentile(&p99s, 0.5))
}

/// Nearest-rank percentile of sorted samples.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// A process's memory from /proc/WHO/smaps_rollup, in KiB (0 for a field it lacks).
#[derive(Clone, Copy)]
pub(crate) struct Rollup {
    pub rss: u64,
    pub pss: u64,
    pub private_dirty: u64,
}

/// `who`: a pid, or `self`.
pub(crate) fn rollup(who: &str) -> anyhow::Result<Rollup> {
    let path = format!("/proc/{who}/smaps_rollup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_default()
    };
    Ok(Rollup {
        rss: field("Rss:"),
        pss: field("Pss:"),
        private_dirty: field("Private_Dirty:"),
    })
}

/// Rss, Pss and Private_Dirty of `pid` in KiB.
fn memory(pid: u32) -> anyhow::Result<serde_json::Value> {
    let m = rollup(&pid.to_string())?;
    Ok(json!({ "rss": m.rss, "pss": m.pss, "private_dirty": m.private_dirty }))
}

/// The floor under any fork: fork this (small, single-threaded) process, the child exits at
/// once, wait for it.
fn bare_fork_us() -> anyhow::Result<f64> {
    let began = Instant::now();
    // SAFETY: this process runs one thread (a current-thread runtime), so fork copies no
    // lock held elsewhere; the child only calls _exit, which is async-signal-safe.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => {
            // SAFETY: ends the child at once, running nothing of the parent's state. Raw
            // libc because nix has no _exit.
            unsafe { libc::_exit(0) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            nix::sys::wait::waitpid(child, None)?;
        }
    }
    Ok(began.elapsed().as_secs_f64() * 1e6)
}

/// The floor under exec: fork + exec /bin/true and wait for it.
fn exec_true_us() -> anyhow::Result<f64> {
    let began = Instant::now();
    let status = std::process::Command::new("/bin/true").status()?;
    if !status.success() {
        bail!("/bin/true failed: {status}");
    }
    Ok(began.elapsed().as_secs_f64() * 1e6)
}
