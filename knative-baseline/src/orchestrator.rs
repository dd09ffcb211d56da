//! The orchestrator: what Kubernetes does for Knative here — start every pod (a function
//! server and its queue-proxy) and the ingress as separate processes, wait for their readiness
//! probes, and stop them all.
//!
//! Start order follows the dependencies: all function servers at once (each compiles its
//! module), then their queue-proxies, then the ingress. Every child binds its own port (port
//! 0 for pods) and reports it on its first stdout line, then answers an HTTP probe before the
//! next phase starts. Any failure kills everything started so far and names the component,
//! with its last lines of stderr.
//!
//! Children are spawned from one dedicated thread that lives as long as the [`Baseline`]:
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked a child exits, so forking from the
//! caller's thread would kill the pods when, say, a short-lived spawn thread ends. With it, the
//! children die with the orchestrator process even on SIGKILL, and never earlier.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chain_runtime::config::Config;
use chain_runtime::plan::Plan;
use nix::errno::Errno;
use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, getpid, getppid};

use crate::BaselineError;
use crate::ingress::PodsArg;
use crate::net::parse_announcement;

/// Lines of each child's stderr kept for error messages.
const TAIL_LINES: usize = 20;
/// How long stopped children get to exit on SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Pause between readiness probes of a component that is not ready yet (start-up only).
const PROBE_INTERVAL: Duration = Duration::from_millis(10);

/// How the baseline is deployed; Knative's per-revision knobs.
#[derive(Debug, Clone)]
pub struct Options {
    /// `containerConcurrency` of every pod's queue-proxy: 0 (Knative's default) = unlimited.
    pub container_concurrency: u32,
    /// Limit for the whole start-up: compiling every module and every readiness probe.
    pub start_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            container_concurrency: 0,
            start_timeout: Duration::from_secs(120),
        }
    }
}

/// One pod: a function server (user container) and its queue-proxy.
#[derive(Debug, Clone)]
pub struct Pod {
    pub chain: String,
    pub function: String,
    /// 0-based, below the function's `instances`.
    pub instance: u32,
    pub function_addr: SocketAddr,
    pub function_pid: u32,
    /// Where the ingress sends this pod's requests; serves `/_queue/stats`.
    pub queue_proxy_addr: SocketAddr,
    pub queue_proxy_pid: u32,
}

/// `run`'s arguments.
#[derive(Debug, Clone)]
pub struct RunArgs {
    pub config: PathBuf,
    pub listen: SocketAddr,
    pub options: Options,
}

/// A started child process.
struct Proc {
    component: String,
    child: Child,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

impl Proc {
    fn tail(&self) -> String {
        let tail = self.stderr_tail.lock().unwrap_or_else(|e| e.into_inner());
        if tail.is_empty() {
            String::new()
        } else {
            let lines: Vec<&str> = tail.iter().map(String::as_str).collect();
            format!("\nits last output:\n  {}", lines.join("\n  "))
        }
    }
}

/// The thread every child is forked from (see the module docs for why).
struct Spawner {
    jobs: Option<mpsc::Sender<(Command, mpsc::SyncSender<std::io::Result<Child>>)>>,
    thread: Option<JoinHandle<()>>,
}

impl Spawner {
    fn new() -> Result<Spawner, BaselineError> {
        let (tx, rx) = mpsc::channel::<(Command, mpsc::SyncSender<std::io::Result<Child>>)>();
        let thread = std::thread::Builder::new()
            .name("kn-baseline-parent".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .map_err(|e| BaselineError::io("starting the spawner thread", e))?;
        Ok(Spawner {
            jobs: Some(tx),
            thread: Some(thread),
        })
    }

    fn spawn(&self, cmd: Command) -> std::io::Result<Child> {
        let gone = || std::io::Error::other("the spawner thread has stopped");
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .as_ref()
            .ok_or_else(gone)?
            .send((cmd, tx))
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A running Knative-style baseline. Dropping it stops and reaps every process.
pub struct Baseline {
    addr: SocketAddr,
    pods: Vec<Pod>,
    /// Function servers, then queue-proxies, then the ingress: stopped in reverse.
    procs: Vec<Proc>,
    exe: PathBuf,
    prefix: Vec<String>,
    // Declared last so it is dropped after `procs` are reaped in `Drop`.
    spawner: Spawner,
}

impl Baseline {
    /// Starts the baseline for `config` with the ingress on `listen` (port 0 picks one; see
    /// [`Baseline::addr`]). Every process is `exe` run with `prefix` then the role arguments:
    /// `["knative-baseline"]` for the `spindle` binary, `[]` for this crate's own binary.
    pub fn start(
        exe: &Path,
        prefix: &[&str],
        config: &Path,
        listen: SocketAddr,
    ) -> Result<Baseline, BaselineError> {
        Self::start_with(exe, prefix, config, listen, &Options::default())
    }

    pub fn start_with(
        exe: &Path,
        prefix: &[&str],
        config: &Path,
        listen: SocketAddr,
        options: &Options,
    ) -> Result<Baseline, BaselineError> {
        let began = Instant::now();
        let deadline = began + options.start_timeout;
        // Children resolve module paths against the config's directory; give them a path
        // that means the same from any working directory.
        let config = config.canonicalize().map_err(|e| {
            BaselineError::io(format!("cannot open config {}", config.display()), e)
        })?;
        let parsed = Config::load(&config)?;
        let plan = Plan::new(&parsed);
        let config_arg = config.display().to_string();

        // Dropped on any error below: that kills whatever was started.
        let mut baseline = Baseline {
            addr: listen,
            pods: Vec::new(),
            procs: Vec::new(),
            exe: exe.to_path_buf(),
            prefix: prefix.iter().map(|s| s.to_string()).collect(),
            spawner: Spawner::new()?,
        };

        // Phase 1: every function server (user container), compiling in parallel.
        struct Planned {
            chain: String,
            function: String,
            instance: u32,
            /// The revision timeout of the pod's queue-proxy: the chain's `timeout_ms`.
            timeout_ms: u128,
        }
        let mut planned = Vec::new();
        for chain in &plan.chains {
            for stage in &chain.stages {
                // An autoscaled function gets its maximum: the baseline provisions for peak.
                for instance in 0..stage.function.instances.max {
                    planned.push(Planned {
                        chain: chain.spec.name.clone(),
                        function: stage.function.name.clone(),
                        instance,
                        // The user's budget for the whole request, as Knative's
                        // `timeoutSeconds` is. Not the function's per-call `timeout_ms`: that
                        // would also count the time a request queues for the container, which
                        // Spindle's per-call watchdog never does (see the crate docs).
                        timeout_ms: chain.spec.timeout.as_millis(),
                    });
                }
            }
        }
        let fn_addrs = baseline.start_phase(
            planned.iter().map(|p| {
                (
                    format!("function server {}/{}#{}", p.chain, p.function, p.instance),
                    vec![
                        "function".to_string(),
                        "--config".into(),
                        config_arg.clone(),
                        "--chain".into(),
                        p.chain.clone(),
                        "--function".into(),
                        p.function.clone(),
                        "--listen".into(),
                        "127.0.0.1:0".into(),
                    ],
                )
            }),
            "/healthz",
            deadline,
        )?;

        // Phase 2: a queue-proxy in front of each.
        let qp_first = baseline.procs.len();
        let qp_addrs = baseline.start_phase(
            planned.iter().zip(&fn_addrs).map(|(p, upstream)| {
                (
                    format!("queue-proxy {}/{}#{}", p.chain, p.function, p.instance),
                    vec![
                        "queue-proxy".to_string(),
                        "--listen".into(),
                        "127.0.0.1:0".into(),
                        "--upstream".into(),
                        upstream.to_string(),
                        "--container-concurrency".into(),
                        options.container_concurrency.to_string(),
                        "--timeout-ms".into(),
                        p.timeout_ms.to_string(),
                        "--name".into(),
                        p.function.clone(),
                    ],
                )
            }),
            "/_queue/ready",
            deadline,
        )?;
        for (i, p) in planned.iter().enumerate() {
            baseline.pods.push(Pod {
                chain: p.chain.clone(),
                function: p.function.clone(),
                instance: p.instance,
                function_addr: fn_addrs[i],
                function_pid: baseline.procs[i].child.id(),
                queue_proxy_addr: qp_addrs[i],
                queue_proxy_pid: baseline.procs[qp_first + i].child.id(),
            });
        }

        // Phase 3: the ingress, told where every function's pods are.
        let mut ingress_args = vec![
            "ingress".to_string(),
            "--config".into(),
            config_arg,
            "--listen".into(),
            listen.to_string(),
        ];
        for chain in &plan.chains {
            for stage in &chain.stages {
                let addrs = baseline
                    .pods
                    .iter()
                    .filter(|p| p.chain == chain.spec.name && p.function == stage.function.name)
                    .map(|p| p.queue_proxy_addr)
                    .collect();
                ingress_args.push("--pods".into());
                ingress_args.push(
                    PodsArg {
                        function: stage.function.name.clone(),
                        chain: chain.spec.name.clone(),
                        addrs,
                    }
                    .to_string(),
                );
            }
        }
        let ingress =
            baseline.start_phase([("ingress".to_string(), ingress_args)], "/readyz", deadline)?;
        baseline.addr = ingress[0];
        tracing::info!(
            "knative-style baseline ready in {} ms: {} pod(s), {} process(es), ingress on http://{}",
            began.elapsed().as_millis(),
            baseline.pods.len(),
            baseline.procs.len(),
            baseline.addr
        );
        Ok(baseline)
    }

    /// The ingress's address: where clients send requests.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every process of the baseline (function servers, queue-proxies, ingress), for CPU
    /// accounting.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.child.id()).collect()
    }

    pub fn ingress_pid(&self) -> u32 {
        self.procs.last().map_or(0, |p| p.child.id())
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Fails, naming it, if any process of the baseline has exited.
    pub fn check(&mut self) -> Result<(), BaselineError> {
        for p in &mut self.procs {
            if let Ok(Some(status)) = p.child.try_wait() {
                return Err(BaselineError::Exited {
                    component: p.component.clone(),
                    status,
                    tail: p.tail(),
                });
            }
        }
        Ok(())
    }

    /// Stops every process (same as dropping the baseline).
    pub fn stop(self) {}

    /// Spawns one child per `(component, args)`, waits for each one's announced address, then
    /// probes `probe_path` on each until it answers 200.
    fn start_phase(
        &mut self,
        children: impl IntoIterator<Item = (String, Vec<String>)>,
        probe_path: &str,
        deadline: Instant,
    ) -> Result<Vec<SocketAddr>, BaselineError> {
        let first = self.procs.len();
        let (announced_tx, announced_rx) = mpsc::channel::<(usize, Option<SocketAddr>)>();
        for (component, args) in children {
            // Already in `self.procs` (so stopped on any error from here on) when it returns.
            let index = self.spawn(component, &args)?;
            let stdout = self.procs[index]
                .child
                .stdout
                .take()
                .expect("stdout is piped");
            let tx = announced_tx.clone();
            reader_thread("kn-baseline-stdout", move || {
                let mut reader = BufReader::new(stdout);
                let mut line = String::new();
                let addr = match reader.read_line(&mut line) {
                    Ok(n) if n > 0 => parse_announcement(&line),
                    _ => None,
                };
                let _ = tx.send((index, addr));
                // Keep the pipe open and empty so a stray print never blocks the child.
                let _ = std::io::copy(&mut reader, &mut std::io::sink());
            })
            .map_err(|e| BaselineError::io("starting a stdout reader thread", e))?;
        }
        drop(announced_tx);

        let count = self.procs.len() - first;
        let mut addrs: Vec<Option<SocketAddr>> = vec![None; count];
        let mut pending = count;
        while pending > 0 {
            let wait = deadline.saturating_duration_since(Instant::now());
            match announced_rx.recv_timeout(wait) {
                Ok((index, Some(addr))) => {
                    addrs[index - first] = Some(addr);
                    pending -= 1;
                }
                Ok((index, None)) => {
                    return Err(self.start_failure(index, "stopped before reporting its address"));
                }
                Err(_) => {
                    let index = first + addrs.iter().position(Option::is_none).unwrap_or(0);
                    return Err(self.start_failure(index, "did not report its address in time"));
                }
            }
        }
        let addrs: Vec<SocketAddr> = addrs
            .into_iter()
            .map(|a| a.expect("all announced"))
            .collect();

        for (i, addr) in addrs.iter().enumerate() {
            let index = first + i;
            loop {
                let remaining = deadline.saturating_duration_since(Instant::now());
                let attempt = probe(*addr, probe_path, remaining.min(Duration::from_secs(2)));
                match attempt {
                    Ok(200) => break,
                    _ if remaining.is_zero() => {
                        let why = match attempt {
                            Ok(code) => format!("GET {probe_path} still answers {code}"),
                            Err(e) => format!("GET {probe_path} fails: {e}"),
                        };
                        return Err(self.start_failure(index, &format!("not ready in time: {why}")));
                    }
                    _ => {
                        if let Ok(Some(_)) = self.procs[index].child.try_wait() {
                            return Err(self.start_failure(index, "exited"));
                        }
                        std::thread::sleep(PROBE_INTERVAL);
                    }
                }
            }
        }
        Ok(addrs)
    }

    /// Starts one child and adds it to `self.procs` before anything else can fail, so that
    /// whatever happens next, dropping the baseline stops and reaps it. Returns its index.
    fn spawn(&mut self, component: String, args: &[String]) -> Result<usize, BaselineError> {
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.prefix)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group: a terminal's Ctrl-C reaches only the orchestrator, which then
            // stops the children itself.
            .process_group(0);
        let parent = getpid();
        // SAFETY: the closure runs in the child between fork and exec, where a copy of a
        // multi-threaded parent may only do async-signal-safe work. It makes two system calls
        // through nix's thin wrappers (set_pdeathsig, getppid: one libc call and an errno read
        // each), which take no locks; it reads only the `parent` it owns, and allocates nothing
        // (an `io::Error` made from an OS error code is not boxed). set_pdeathsig passes the
        // signal to glibc's variadic `prctl` as an int, as C callers do, where glibc reads an
        // `unsigned long`: a misread could only make the kernel reject it (EINVAL), which
        // fails the spawn rather than leaving the child without its parent-death signal.
        unsafe {
            cmd.pre_exec(move || {
                // Die with the orchestrator, even one killed by SIGKILL.
                set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
                // The orchestrator died between fork and prctl: the signal would never come.
                if getppid() != parent {
                    return Err(Errno::ESRCH.into());
                }
                Ok(())
            });
        }
        let mut child = self
            .spawner
            .spawn(cmd)
            .map_err(|source| BaselineError::Spawn {
                component: component.clone(),
                exe: self.exe.clone(),
                source,
            })?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let stderr_tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let tail = Arc::clone(&stderr_tail);
        let tag = component.clone();
        let index = self.procs.len();
        self.procs.push(Proc {
            component,
            child,
            stderr_tail,
        });
        // If this fails the pipe closes with the closure; the child is stopped with the rest.
        reader_thread("kn-baseline-stderr", move || {
            forward_stderr(stderr, &tag, &tail)
        })
        .map_err(|e| BaselineError::io("starting a stderr reader thread", e))?;
        Ok(index)
    }

    fn start_failure(&mut self, index: usize, what: &str) -> BaselineError {
        let proc = &mut self.procs[index];
        let mut reason = what.to_string();
        // Give the stderr thread a moment to catch the child's last words.
        let settle = Instant::now() + Duration::from_millis(200);
        while Instant::now() < settle {
            if let Ok(Some(status)) = proc.child.try_wait() {
                reason = format!("{what} ({status})");
                break;
            }
            std::thread::sleep(PROBE_INTERVAL);
        }
        std::thread::sleep(Duration::from_millis(20));
        BaselineError::Start {
            component: proc.component.clone(),
            reason: format!("{reason}{}", proc.tail()),
        }
    }

    fn stop_all(&mut self) {
        // Ingress first, then queue-proxies, then containers: nothing forwards to a stopped
        // process for longer than it takes to signal the next one.
        for p in self.procs.iter_mut().rev() {
            if let Ok(None) = p.child.try_wait() {
                let pid = Pid::from_raw(p.child.id() as i32);
                // The pid is our unreaped child (try_wait just saw it running and only we reap
                // it), so it cannot name another process.
                let _ = kill(pid, Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        for p in self.procs.iter_mut().rev() {
            loop {
                match p.child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    _ => {
                        let _ = p.child.kill();
                        let _ = p.child.wait();
                        break;
                    }
                }
            }
        }
        self.procs.clear();
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        self.stop_all();
    }
}

impl std::fmt::Debug for Baseline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Baseline")
            .field("addr", &self.addr)
            .field("pods", &self.pods)
            .field("pids", &self.pids())
            .finish()
    }
}

#[cfg(test)]
thread_local! {
    /// Tests: the name of the reader thread that `reader_thread` fails to start on this thread.
    static FAIL_READER: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// Starts a detached thread that reads a child's output.
fn reader_thread(name: &'static str, body: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    #[cfg(test)]
    if FAIL_READER.get() == Some(name) {
        return Err(std::io::Error::other("injected failure"));
    }
    std::thread::Builder::new()
        .name(name.into())
        .spawn(body)
        .map(drop)
}

/// Copies a child's stderr to ours, each line tagged with the component, keeping the last
/// lines for error messages.
fn forward_stderr(stderr: impl Read, tag: &str, tail: &Mutex<VecDeque<String>>) {
    let reader = BufReader::new(stderr);
    for line in reader.lines() {
        let Ok(line) = line else { break };
        {
            let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line.clone());
        }
        // eprintln (not a raw stderr handle) so a test harness capturing this thread's output
        // shows a child's log only when the test fails.
        eprintln!("[{tag}] {line}");
    }
}

/// One HTTP/1.1 GET with `Connection: close`; returns the status code. Blocking on purpose:
/// the orchestrator is usable from sync and async callers alike.
fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<u16> {
    let timeout = timeout.max(Duration::from_millis(50));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = String::new();
    BufReader::new(stream).read_line(&mut head)?;
    head.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {head:?}")))
}

/// `knative-baseline run`: start everything, serve until SIGINT/SIGTERM, stop everything.
pub fn run(args: RunArgs) -> Result<(), BaselineError> {
    let exe = std::env::current_exe()
        .map_err(|e| BaselineError::io("locating the current executable", e))?;
    let mut baseline = Baseline::start_with(
        &exe,
        &[crate::SUBCOMMAND],
        &args.config,
        args.listen,
        &args.options,
    )?;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "knative-style baseline serving on http://{}",
            baseline.addr()
        );
        let _ = out.flush();
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| BaselineError::io("starting the async runtime", e))?;
    let result = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())
            .map_err(|e| BaselineError::io("installing the SIGTERM handler", e))?;
        let mut int = signal(SignalKind::interrupt())
            .map_err(|e| BaselineError::io("installing the SIGINT handler", e))?;
        // Supervision, not the data path: notice a process that died and stop with its name.
        let mut watch = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                biased;
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
                _ = watch.tick() => baseline.check()?,
            }
        }
    });
    tracing::info!("knative-style baseline: stopping");
    drop(baseline);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A baseline with no processes yet whose children are `sleep`, for driving `spawn` and
    /// `start_phase` directly.
    fn sleepers() -> Baseline {
        Baseline {
            addr: "127.0.0.1:0".parse().unwrap(),
            pods: Vec::new(),
            procs: Vec::new(),
            exe: PathBuf::from("sleep"),
            prefix: Vec::new(),
            spawner: Spawner::new().unwrap(),
        }
    }

    /// `pid` is a running (not zombie) child of this process.
    fn running_child(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
            let mut fields = after_comm.split_whitespace();
            let state = fields.next().unwrap();
            let ppid: u32 = fields.next().unwrap().parse().unwrap();
            ppid == std::process::id() && state != "Z"
        })
    }

    /// Makes the named reader thread fail to start, runs `f`, and checks that the child it
    /// started anyway is stopped and reaped when the baseline is dropped.
    fn reader_failure_still_stops_the_child(
        reader: &'static str,
        f: impl FnOnce(&mut Baseline) -> Result<(), BaselineError>,
    ) {
        let mut baseline = sleepers();
        FAIL_READER.set(Some(reader));
        let result = f(&mut baseline);
        FAIL_READER.set(None);
        let err = result.expect_err("the reader thread cannot start");
        assert!(err.to_string().contains("injected failure"), "{err}");
        let pids = baseline.pids();
        assert_eq!(pids.len(), 1, "the child is registered for cleanup");
        assert!(running_child(pids[0]), "pid {} should be running", pids[0]);
        drop(baseline);
        assert!(
            !running_child(pids[0]),
            "pid {} outlived the baseline",
            pids[0]
        );
    }

    #[test]
    fn child_is_stopped_when_its_stderr_reader_cannot_start() {
        reader_failure_still_stops_the_child("kn-baseline-stderr", |b| {
            b.spawn("sleeper".into(), &["60".into()]).map(drop)
        });
    }

    #[test]
    fn child_is_stopped_when_its_stdout_reader_cannot_start() {
        reader_failure_still_stops_the_child("kn-baseline-stdout", |b| {
            let deadline = Instant::now() + Duration::from_secs(10);
            b.start_phase([("sleeper".into(), vec!["60".into()])], "/", deadline)
                .map(drop)
        });
    }
}
