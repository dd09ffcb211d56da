//! Worker supervision: start every function instance as its own process, wait until each is
//! ready, restart any that exits, and stop them all on shutdown.
//!
//! A worker is this same binary re-executed as `spindle worker`. It is handed its resources as
//! fds (`chain_runtime::instance::Handoff`): the chain's arena, its end of a connected loopback
//! TCP socket (the gateway keeps the other end), sealed memfds with the config text and its
//! module's bytes as the gateway read them at start (so restarts are immune to later edits of
//! either file), its statistics page, and its end of a Unix control socket pair (the gateway's
//! end goes on the node service's [`ControlBoard`] while the worker is ready, see
//! [`crate::node`]). The gateway makes the connection itself (listen on an
//! ephemeral loopback port, connect, accept, close the listener), so no port stays open for
//! other processes to use.
//!
//! A function whose start mode is fork has a zygote ([`crate::zygote`]): every start and
//! restart of its instances asks the zygote to fork one, handing it the same socket end,
//! statistics page and control socket end an exec'd worker would get; while the zygote is down
//! they start by exec. A fork that may have made a child without reporting it never leaves its
//! fds to an exec'd worker: they are shut down and the start begins again with fresh ones.
//! Either way the instance is a child of the gateway ([`WorkerProcess`]) and supervised alike.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chain_runtime::config::StartMode;
use chain_runtime::config::{Config, FunctionSpec};
use chain_runtime::instance::{Handoff, Namespaces};
use chain_runtime::wasi::{PreopenError, Preopens};
use hyper::StatusCode;
use proto::worker::WATCHDOG_EXIT;
use proto::zygote::SpawnRequest;
use tokio::process::Command;
use tokio::sync::{oneshot, watch};

use crate::dataplane::{ChainRuntime, Holder, read_worker, write_worker};
use crate::metrics::Metrics;
use crate::node::{ControlBoard, ControlLease, InstanceKey};
use crate::process::WorkerProcess;
use crate::queue::{INSTANCE_QUEUE_CAPACITY, InstanceQueue};
use crate::zygote::Zygote;
use sockmap_bpf::{ConnectionEntry, SockKey};

/// How long a worker may take to compile and instantiate its module.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a worker that did not become ready gets to say why on its control socket and to
/// exit by itself, before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// How long a stopping worker gets after SIGTERM before SIGKILL.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(2);
/// An instance that served at least this long before it died is restarted at once; one that
/// died sooner is crash-looping and backs off.
const HEALTHY_RUN: Duration = Duration::from_secs(1);
/// How long descriptors a dead worker wrote may take to drain from its socket.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot create the worker socket: {0}")]
    Socket(std::io::Error),
    #[error("cannot start the worker process: {0}")]
    Spawn(std::io::Error),
    #[error("worker exited before it was ready ({0}); its log is above")]
    ExitedEarly(String),
    /// The worker (or the function's zygote) said why its instance could not start.
    #[error("{message}")]
    StartFailed { message: String },
    #[error("worker was not ready within {0:?}")]
    NotReady(Duration),
    #[error("gateway is shutting down")]
    ShuttingDown,
    /// The zygote may have forked a child with this start's sockets: they were shut down,
    /// and the instance starts again with new ones.
    #[error("gave up this start's sockets: {0}")]
    ForkAbandoned(crate::zygote::ForkError),
}

/// What every worker of this gateway is started with.
#[derive(Clone)]
pub struct WorkerCommand {
    pub exe: PathBuf,
    pub config: PathBuf,
    /// Sealed memfd with the config text the gateway started with.
    pub config_text: Arc<OwnedFd>,
    /// Functions whose instances resume from a remote image instead of building cold.
    pub images: std::collections::HashMap<String, Arc<ResumeFds>>,
    /// Where each ready worker's control socket is put, for the node service to reach it.
    pub controls: Arc<ControlBoard>,
    /// The namespaces confined workers and zygotes join (`sandbox:`); `None` when the config
    /// turns the sandbox off or this gateway is not root and could not make them.
    pub sandbox: Option<Arc<sandbox::SharedNamespaces>>,
    /// The dataplane threads each worker connection's socket tasks run on
    /// ([`crate::shards`]); `None`: on the caller's runtime.
    pub dataplane: Option<Arc<crate::shards::Shards>>,
}

/// Makes the namespaces `config`'s confined workers join, once per gateway. A gateway that
/// is not root cannot: its workers then get only the layers that need no privilege
/// (no_new_privs, seccomp, closed fds), and the log says so.
pub fn sandbox_namespaces(
    config: &Config,
) -> Result<Option<Arc<sandbox::SharedNamespaces>>, sandbox::SandboxError> {
    if !config.sandbox.enabled {
        tracing::warn!(
            "sandbox: off (`sandbox: {{ enabled: false }}`): workers run as this gateway's user, in its namespaces, without seccomp"
        );
        return Ok(None);
    }
    if !nix::unistd::geteuid().is_root() {
        tracing::warn!(
            "sandbox: not root, so workers keep this gateway's uid and namespaces; only no_new_privs, seccomp and closed fds apply"
        );
        return Ok(None);
    }
    // A root without these (a container's default set, say) would fail later, and worse:
    // without CAP_KILL the gateway cannot stop a worker that runs as another uid.
    let missing = missing_sandbox_capabilities();
    if !missing.is_empty() {
        return Err(sandbox::SandboxError::Check(format!(
            "running as root without {}: the sandbox needs them to make its namespaces, change \
             workers' uids and stop them (docs/security.md; deploy/kubernetes/README.md lists \
             what each is for)",
            missing.join(", ")
        )));
    }
    let namespaces = sandbox::SharedNamespaces::create()?;
    tracing::info!(
        uid_base = config.sandbox.uid_base,
        "sandbox: workers join an empty network and mount namespace, run as uid/gid uid_base + function index, under seccomp"
    );
    Ok(Some(Arc::new(namespaces)))
}

/// The capabilities the sandbox needs that this process lacks in its effective set.
fn missing_sandbox_capabilities() -> Vec<&'static str> {
    const NEEDED: [(u32, &str); 6] = [
        (1, "CAP_DAC_OVERRIDE"),
        (5, "CAP_KILL"),
        (6, "CAP_SETGID"),
        (7, "CAP_SETUID"),
        (18, "CAP_SYS_CHROOT"),
        (21, "CAP_SYS_ADMIN"),
    ];
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        });
    match effective {
        Some(caps) => NEEDED
            .iter()
            .filter(|(bit, _)| caps & (1 << bit) == 0)
            .map(|(_, name)| *name)
            .collect(),
        // Unknown: let the steps themselves say what fails.
        None => Vec::new(),
    }
}

impl WorkerCommand {
    /// The sandbox namespaces to hand to a process.
    pub fn namespaces(&self) -> Option<Namespaces<BorrowedFd<'_>>> {
        self.sandbox.as_ref().map(|ns| Namespaces {
            net: ns.net(),
            mount: ns.mount(),
        })
    }
}

/// What every instance of a function resumed from a remote image gets, besides the usual.
pub struct ResumeFds {
    /// Sealed memfd with the image descriptor (`proto::worker::IMAGE_FD`).
    pub descriptor: OwnedFd,
    /// The node page cache of that image (`rdma_fork::NodeCache`, at
    /// `proto::worker::CACHE_FD`), shared by all of them: pages one instance fetched from
    /// the parent, the next one reads locally.
    pub cache: OwnedFd,
}

/// What a function's workers and zygote are built from, pinned by the gateway when it started
/// (or reloaded) the function: its module's bytes, and its preopened directories opened in the
/// gateway's own mount namespace (a confined worker's is empty). Every start of the
/// function's processes gets these same fds, whatever happens to the files since.
pub struct FunctionInputs {
    /// Sealed memfd with the module's bytes.
    pub module: OwnedFd,
    /// The directories of `files:`, in config order.
    pub preopens: Preopens,
}

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("pinning the module of function {function}: {source}")]
    Module {
        function: String,
        source: std::io::Error,
    },
    #[error("function {function}: {source}")]
    Preopens {
        function: String,
        source: PreopenError,
    },
}

impl FunctionInputs {
    /// Pins `bytes` (the module `spec` names, as read) and opens `spec`'s directories.
    pub fn pin(spec: &FunctionSpec, bytes: &[u8]) -> Result<FunctionInputs, PinError> {
        let module =
            chain_runtime::instance::sealed_memfd(&spec.name, bytes).map_err(|source| {
                PinError::Module {
                    function: spec.name.clone(),
                    source,
                }
            })?;
        let preopens = Preopens::open(&spec.files).map_err(|source| PinError::Preopens {
            function: spec.name.clone(),
            source,
        })?;
        Ok(FunctionInputs { module, preopens })
    }
}

/// A connected pair of loopback TCP sockets: (gateway end, worker end).
pub fn socket_pair() -> std::io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let worker_end = TcpStream::connect(listener.local_addr()?)?;
    let expected_peer = worker_end.local_addr()?;
    loop {
        let (gateway_end, peer) = listener.accept()?;
        // Another local process could race us to the port: accept only our own connection.
        if peer == expected_peer {
            gateway_end.set_nodelay(true)?;
            worker_end.set_nodelay(true)?;
            return Ok((gateway_end, worker_end));
        }
    }
}

/// One running worker process and its gateway-side socket tasks.
struct Running {
    child: WorkerProcess,
    /// How it was started (fork falls back to exec while the zygote is down), as the
    /// `mode` label of the start metrics: `fork` (local, from the zygote), `resume` (from a
    /// remote image) or `exec` (cold).
    mode: &'static str,
    reader: tokio::task::JoinHandle<()>,
    /// The worker socket's entry in the kernel dataplane, if it routes this chain.
    kernel_entry: Option<KernelEntry>,
    /// The worker's control socket on the board, while it runs.
    control: Option<ControlLease>,
    /// Its outbound queue: its writer reports a failed write through it.
    queue: Arc<InstanceQueue>,
}

/// A worker connection registered with the kernel dataplane. Dropping it removes the
/// entries, so a dead instance never stays addressable.
struct KernelEntry {
    chain: Arc<ChainRuntime>,
    entry: ConnectionEntry,
}

impl Drop for KernelEntry {
    fn drop(&mut self) {
        if let Some(k) = &self.chain.kernel {
            k.dataplane.remove_connection(&self.entry);
        }
    }
}

pub(crate) fn describe_exit(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(libc::SIGSYS)) => format!(
            "killed by signal {} (SIGSYS: a system call outside the sandbox's seccomp list)",
            libc::SIGSYS
        ),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

/// Execs this binary with `args`, the hand-off's fds placed at their fixed numbers
/// (`placements`, from an exec plan), stdin on /dev/null and a parent-death signal.
pub fn exec_worker_process(
    cmd: &WorkerCommand,
    args: &[String],
    placements: &[(RawFd, RawFd)],
) -> std::io::Result<WorkerProcess> {
    // Owned before the fork: the closure below only iterates it.
    let placements = placements.to_vec();
    let gateway_pid = std::process::id() as libc::pid_t;
    let mut command = Command::new(&cmd.exe);
    command.args(args).stdin(Stdio::null()).kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe, non-allocating calls: dup2, and nix's set_pdeathsig and getppid,
    // each one system call (and an errno read) that takes no lock. The exec plan's sources
    // sit above every fixed number, so placing them cannot overwrite one with another; dup2
    // clears close-on-exec on the copies, which is how they survive exec. dup2 stays raw
    // libc: nix's dup2 takes the target as an OwnedFd, which these bare numbers are not, and
    // its dup2_raw does not check dup2's result.
    unsafe {
        command.pre_exec(move || {
            for &(from, to) in &placements {
                if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // A worker must not outlive its gateway, even one killed with SIGKILL. The signal
            // fires when the forking *thread* exits: tokio's worker threads live as long as the
            // runtime, so spawns must not move to spawn_blocking threads.
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)?;
            // The gateway died between fork and prctl: the signal would never come.
            if nix::unistd::getppid().as_raw() != gateway_pid {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    command.spawn().map(WorkerProcess::Exec)
}

async fn spawn_worker(
    cmd: &WorkerCommand,
    chain: &Arc<ChainRuntime>,
    inputs: &FunctionInputs,
    zygote: Option<&Zygote>,
    holder: Holder,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Running, SpawnError> {
    let stage = &chain.stages[holder.stage];
    let (gateway_end, worker_end) = socket_pair().map_err(SpawnError::Socket)?;
    tracing::debug!(target: "spindle::sockets", stage = holder.stage, instance = holder.instance,
        incarnation = holder.incarnation,
        gateway_end = ?gateway_end.local_addr().ok(), worker_end = ?worker_end.local_addr().ok(),
        "instance socket pair");
    // Registered before the worker runs: a socket added while its owner is already blocked
    // in read() would not see redirected data. The program sends it nothing until ready.
    let kernel_entry = match &chain.kernel {
        Some(k) => {
            let key = SockKey {
                fn_id: stage.fn_id,
                instance: holder.instance as u32,
            };
            let entry = k
                .dataplane
                .insert_connection(key, chain.plan.id, worker_end.as_fd(), gateway_end.as_fd())
                .map_err(|e| SpawnError::Socket(std::io::Error::other(e)))?;
            Some(KernelEntry {
                chain: Arc::clone(chain),
                entry,
            })
        }
        None => None,
    };
    let stats_fd = stage.instances[holder.instance].stats_fd.as_fd();
    let (control, worker_control) = UnixStream::pair().map_err(SpawnError::Socket)?;
    let forked = match zygote {
        Some(zygote) => {
            let request = SpawnRequest {
                instance: holder.instance as u32,
                incarnation: holder.incarnation,
            };
            match zygote
                .fork(
                    request,
                    worker_end.as_fd(),
                    stats_fd,
                    worker_control.as_fd(),
                )
                .await
            {
                Ok((child, fork_took)) => {
                    tracing::debug!(function = %stage.name, instance = holder.instance,
                        fork_us = fork_took.as_micros() as u64, "forked by the zygote");
                    Some(WorkerProcess::Forked(child))
                }
                Err(e) if e.child_may_exist() => {
                    // A child may hold copies of these fds: an exec'd worker on them would
                    // share its connection. Cut them off, so such a child reads EOF on both
                    // sockets, and start over with fresh pairs.
                    for shut in [
                        worker_end.shutdown(std::net::Shutdown::Both),
                        worker_control.shutdown(std::net::Shutdown::Both),
                    ] {
                        if let Err(e) = shut {
                            tracing::warn!(function = %stage.name, instance = holder.instance,
                                "shutting down a given-up worker socket: {e}");
                        }
                    }
                    return Err(SpawnError::ForkAbandoned(e));
                }
                Err(e) => {
                    tracing::warn!(function = %stage.name, instance = holder.instance,
                        "cannot fork from the zygote ({e}); starting this instance by exec");
                    None
                }
            }
        }
        None => None,
    };
    let (mut child, mode) = match forked {
        Some(child) => (child, StartMode::Fork.label()),
        None => {
            let image = cmd.images.get(&stage.name);
            let exec_plan = Handoff {
                arena: chain.arena.payload_fd(),
                arena_meta: chain.arena.meta_fd(),
                socket: worker_end.as_fd(),
                config: cmd.config_text.as_fd(),
                module: inputs.module.as_fd(),
                stats: stats_fd,
                control: worker_control.as_fd(),
                image: image.map(|i| i.descriptor.as_fd()),
                cache: image.map(|i| i.cache.as_fd()),
                // A resumed worker keeps the host's namespaces (chain_runtime::confine::Role).
                namespaces: if image.is_some() {
                    None
                } else {
                    cmd.namespaces()
                },
                preopens: inputs.preopens.fds(),
            }
            .exec_plan()
            .map_err(SpawnError::Socket)?;
            let mut args = vec![
                "worker".to_string(),
                "--config".into(),
                cmd.config.display().to_string(),
                "--chain".into(),
                chain.plan.spec.name.clone(),
                "--function".into(),
                stage.name.clone(),
                "--instance".into(),
                holder.instance.to_string(),
            ];
            args.extend(image.map(|_| "--from-image".to_string()));
            let child = exec_worker_process(cmd, &args, exec_plan.placements())
                .map_err(SpawnError::Spawn)?;
            let mode = if image.is_some() {
                "resume"
            } else {
                StartMode::Exec.label()
            };
            (child, mode)
        }
    };
    drop(worker_end);
    drop(worker_control);

    gateway_end
        .set_nonblocking(true)
        .map_err(SpawnError::Socket)?;
    let (ready_tx, ready_rx) = oneshot::channel();
    let queue = Arc::new(InstanceQueue::new(INSTANCE_QUEUE_CAPACITY));
    let link = {
        let (chain, queue) = (Arc::clone(chain), Arc::clone(&queue));
        // Made on the thread that runs it, so the socket is registered with that thread's
        // event loop. A socket tokio cannot take drops `ready_tx`: the start fails below.
        move || async move {
            match tokio::net::TcpStream::from_std(gateway_end) {
                Ok(stream) => {
                    let (read, write) = stream.into_split();
                    tokio::spawn(write_worker(Arc::clone(&chain), write, queue));
                    read_worker(chain, holder, read, ready_tx).await;
                }
                Err(e) => tracing::error!("registering a worker's socket: {e}"),
            }
        }
    };
    let reader = match &cmd.dataplane {
        Some(threads) => threads.spawn_link(link),
        None => tokio::spawn(link()),
    };

    let started = tokio::select! {
        ready = tokio::time::timeout(READY_TIMEOUT, ready_rx) => match ready {
            Ok(Ok(())) => {
                // Addressable only once ready: nothing is redirected into a worker that is still
                // compiling, or that fails to start and takes its queue with it.
                let addressable = match (&chain.kernel, &kernel_entry) {
                    (Some(k), Some(e)) => k
                        .dataplane
                        .set_ready(e.entry.worker(), true)
                        .map_err(|e| SpawnError::Socket(std::io::Error::other(e))),
                    _ => Ok(()),
                };
                // An error goes through the common exit below, which closes the queue.
                addressable.map(|()| {
                    stage.instances[holder.instance].pid.store(child.id().unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
                    chain.instance_up(holder.stage, holder.instance, holder.incarnation, Arc::clone(&queue));
                    let key = InstanceKey {
                        chain: chain.plan.spec.name.clone(),
                        function: stage.name.clone(),
                        instance: holder.instance,
                    };
                    let control = Some(cmd.controls.attach(key, control));
                    Running { child, mode, reader, kernel_entry, control, queue: Arc::clone(&queue) }
                })
            }
            // The socket closed or carried garbage before the ready message: the worker
            // failed, and said why on its control socket before it closed anything.
            Ok(Err(_)) => Err(start_failure(&mut child, &control, None).await),
            Err(_) => Err(SpawnError::NotReady(READY_TIMEOUT)),
        },
        status = child.wait() => Err(start_failure(&mut child, &control, Some(status)).await),
        // Dropping the process handle stops the half-started worker.
        _ = stopping(shutdown) => Err(SpawnError::ShuttingDown),
    };
    if started.is_err() {
        // Never made addressable: stop its writer, which nothing else would.
        queue.close();
    }
    started
}

/// What a worker that did not become ready ends as: the reason it wrote on its control
/// socket ([`chain_runtime::control::report_start_failure`]) if it wrote one, else its exit
/// status. Waits for it to exit (`exited`, if that was seen already), killing it after
/// [`EXIT_GRACE`].
async fn start_failure(
    child: &mut WorkerProcess,
    control: &UnixStream,
    exited: Option<std::io::Result<ExitStatus>>,
) -> SpawnError {
    let report = tokio::time::timeout(EXIT_GRACE, read_report(control)).await;
    let status = match exited {
        Some(status) => status,
        None => match tokio::time::timeout(EXIT_GRACE, child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                let _ = child.signal(nix::sys::signal::Signal::SIGKILL);
                child.wait().await
            }
        },
    };
    let status = status
        .map(|s| describe_exit(&s))
        .unwrap_or_else(|e| e.to_string());
    match report {
        Ok(Some(message)) => {
            tracing::debug!(%status, "a worker that did not start exited");
            SpawnError::StartFailed { message }
        }
        _ => SpawnError::ExitedEarly(status),
    }
}

/// Reads a worker's control socket until it closes (or a whole frame arrived) and decodes the
/// start failure it reported, if any.
async fn read_report(control: &UnixStream) -> Option<String> {
    use proto::control::{HEADER_LEN, Header, MAX_START_MESSAGE};
    use tokio::io::AsyncReadExt;
    control.set_nonblocking(true).ok()?;
    let mut stream = tokio::net::UnixStream::from_std(control.try_clone().ok()?).ok()?;
    let mut bytes = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        if bytes.len() >= HEADER_LEN {
            let header = Header::decode(bytes[..HEADER_LEN].try_into().ok()?).ok()?;
            if bytes.len() >= HEADER_LEN + header.payload_len {
                break;
            }
        }
        if bytes.len() > HEADER_LEN + MAX_START_MESSAGE {
            return None;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
        }
    }
    chain_runtime::control::start_failure(&bytes)
}

/// Starts one instance and keeps it running until shutdown or until `retire` turns true.
/// Reports the first start's result through `first_start` so the gateway can refuse to come
/// up with a broken function (an autoscaler's later start drops the receiver: the failure is
/// logged here instead). A retired instance takes nothing new, finishes what it holds (at most
/// the chain's deadline), and is stopped.
#[allow(clippy::too_many_arguments)]
pub async fn supervise(
    cmd: WorkerCommand,
    chain: Arc<ChainRuntime>,
    metrics: Arc<Metrics>,
    inputs: Arc<FunctionInputs>,
    zygote: Option<Arc<Zygote>>,
    stage: usize,
    instance: usize,
    first_start: oneshot::Sender<Result<Duration, SpawnError>>,
    mut shutdown: watch::Receiver<bool>,
    mut retire: watch::Receiver<bool>,
) {
    let chain_name = chain.plan.spec.name.clone();
    let fn_name = chain.stages[stage].name.clone();
    let up = metrics
        .instances_up
        .with_label_values(&[chain_name.as_str(), fn_name.as_str()]);
    let restarts = metrics
        .restarts
        .with_label_values(&[chain_name.as_str(), fn_name.as_str()]);
    let mut first_start = Some(first_start);
    let mut zygote = zygote;
    if let Some(z) = &zygote
        && let Err(why) = z.first_start().await
    {
        if let Some(message) = why {
            // The function's instance cannot be built: an exec'd worker would fail the same
            // way, so this start fails with the zygote's reason.
            let e = SpawnError::StartFailed { message };
            if let Some(tx) = first_start.take()
                && let Err(Err(e)) = tx.send(Err(e))
            {
                // Nobody waits for this start (an autoscaled one): say it here.
                tracing::error!(chain = %chain_name, function = %fn_name, instance,
                    "start failed: {e}");
            }
            return;
        }
        // A zygote whose first start failed is not retried (see zygote::supervise).
        tracing::warn!(chain = %chain_name, function = %fn_name, instance,
            "the function's zygote did not start; this instance starts by exec");
        zygote = None;
    }
    let mut backoff = Duration::from_millis(50);
    for incarnation in 1u64.. {
        if *retire.borrow() {
            return;
        }
        let holder = Holder {
            stage,
            instance,
            incarnation,
        };
        let began = Instant::now();
        let spawned = spawn_worker(
            &cmd,
            &chain,
            &inputs,
            zygote.as_deref(),
            holder,
            &mut shutdown,
        )
        .await;
        let mut running = match spawned {
            Ok(r) => r,
            Err(SpawnError::ShuttingDown) => return,
            // Not the instance's failure: the next try (by exec while the zygote restarts)
            // gets fresh sockets, the first start included.
            Err(e @ SpawnError::ForkAbandoned(_)) => {
                tracing::warn!(chain = %chain_name, function = %fn_name, instance, "{e}; starting it again");
                if sleep_or_shutdown(backoff, &mut shutdown).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(e) => {
                if let Some(tx) = first_start.take() {
                    if let Err(Err(e)) = tx.send(Err(e)) {
                        tracing::error!(chain = %chain_name, function = %fn_name, instance,
                            "start failed: {e}");
                    }
                    return;
                }
                tracing::error!(chain = %chain_name, function = %fn_name, instance, "restart failed: {e}");
                if sleep_or_shutdown(backoff, &mut shutdown).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        up.inc();
        metrics.instance_started(&chain_name, &fn_name, running.mode, began.elapsed());
        let ready_at = Instant::now();
        match first_start.take() {
            Some(tx) => {
                let _ = tx.send(Ok(began.elapsed()));
            }
            None => {
                tracing::info!(chain = %chain_name, function = %fn_name, instance, incarnation, "instance restarted")
            }
        }

        let link = &chain.stages[stage].instances[instance];
        let mut overdue = false;
        let mut unreachable = false;
        let status = loop {
            tokio::select! {
                status = running.child.wait() => break Some(status),
                _ = stopping(&mut shutdown) => break None,
                // Some(status) if it died while finishing: handled as any death, then not
                // restarted (the loop checks `retire` first).
                _ = retiring(&mut retire) => {
                    break finish_held(&chain, &mut running, holder, &mut shutdown).await;
                }
                // It holds a request past the chain's deadline and grace: it may still write
                // into that request's slot, so the slot cannot be reused until it is gone.
                // Its socket failed while it lives: nothing more reaches it, so what it holds
                // would never come back.
                _ = running.queue.failed() => {
                    unreachable = true;
                    tracing::warn!(chain = %chain_name, function = %fn_name, instance,
                        "writing to the instance's socket failed; restarting it");
                    let _ = running.child.signal(nix::sys::signal::Signal::SIGKILL);
                    break Some(running.child.wait().await);
                }
                _ = link.overdue.notified() => {
                    if link.overdue_incarnation.load(std::sync::atomic::Ordering::Relaxed)
                        != incarnation
                    {
                        continue; // meant for an earlier incarnation
                    }
                    overdue = true;
                    tracing::warn!(chain = %chain_name, function = %fn_name, instance,
                        "holds a request past its chain's deadline; killing it");
                    let _ = running.child.signal(nix::sys::signal::Signal::SIGKILL);
                    break Some(running.child.wait().await);
                }
            }
        };
        chain.instance_down(stage, instance);
        drop(running.control.take());
        chain.stages[stage].instances[instance]
            .pid
            .store(0, std::sync::atomic::Ordering::Relaxed);
        up.dec();
        let Some(status) = status else {
            running.child.stop(STOP_GRACE).await;
            drain(&mut running.reader).await;
            let why = if *shutdown.borrow() {
                "gateway is shutting down"
            } else {
                "the instance was retired before it finished the request"
            };
            chain.fail_held_by(holder, StatusCode::SERVICE_UNAVAILABLE, why);
            if !*shutdown.borrow() {
                tracing::info!(chain = %chain_name, function = %fn_name, instance, "instance retired");
            }
            return;
        };
        // Descriptors the worker wrote before dying are still in the socket: route them first.
        drain(&mut running.reader).await;
        // Out of the kernel map before anything else can take this instance's key.
        drop(running.kernel_entry.take());
        let (code, message) = match status {
            _ if overdue => (
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "function {fn_name} instance {instance} held a request past chain {}'s \
                     deadline of {} ms; instance killed and replaced",
                    chain_name,
                    chain.plan.spec.timeout.as_millis()
                ),
            ),
            _ if unreachable => (
                StatusCode::BAD_GATEWAY,
                format!(
                    "function {fn_name} instance {instance} could no longer be reached (its \
                     socket failed); instance restarted"
                ),
            ),
            Ok(s) if s.code() == Some(WATCHDOG_EXIT) => (
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "function {fn_name} exceeded its timeout of {} ms; instance restarted",
                    chain.stages[stage]
                        .timeout_ms
                        .load(std::sync::atomic::Ordering::Relaxed)
                ),
            ),
            Ok(s) => (
                StatusCode::BAD_GATEWAY,
                format!(
                    "function {fn_name} instance {instance} exited ({})",
                    describe_exit(&s)
                ),
            ),
            Err(e) => (
                StatusCode::BAD_GATEWAY,
                format!("function {fn_name} instance {instance} lost: {e}"),
            ),
        };
        let counter = if overdue {
            &chain.stages[stage].overdue_kills
        } else if code == StatusCode::GATEWAY_TIMEOUT {
            &chain.stages[stage].watchdog_timeouts
        } else {
            &chain.stages[stage].crashes
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let failed = chain.fail_held_by(holder, code, &message);
        tracing::warn!(chain = %chain_name, function = %fn_name, instance, failed_requests = failed, "{message}");
        restarts.inc();
        // An instance that served a while is replaced at once (its requests are failing
        // meanwhile); one that crashes right after starting should not spin the CPU.
        if ready_at.elapsed() >= HEALTHY_RUN {
            backoff = Duration::from_millis(50);
            continue;
        }
        if sleep_or_shutdown(backoff, &mut shutdown).await {
            return;
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Resolves once the instance is asked to retire.
async fn retiring(retire: &mut watch::Receiver<bool>) {
    if retire.wait_for(|r| *r).await.is_err() {
        // The pool is gone (shutdown): only the shutdown signal ends this instance.
        std::future::pending::<()>().await;
    }
}

/// How often a retiring instance is checked for requests it still holds: with the kernel
/// dataplane each check reads the holder record of every request in flight, so less often.
const RETIRE_POLL: Duration = Duration::from_millis(10);
const RETIRE_POLL_KERNEL: Duration = Duration::from_millis(50);

/// Takes a retiring instance out of every choice of instance and waits until it holds no
/// request (at most the chain's deadline, after which nothing it holds is still awaited).
/// Returns its exit status if it died meanwhile; None when it is ready to be stopped.
async fn finish_held(
    chain: &ChainRuntime,
    running: &mut Running,
    holder: Holder,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<std::io::Result<ExitStatus>> {
    chain.retire(holder.stage, holder.instance);
    if let (Some(k), Some(e)) = (&chain.kernel, &running.kernel_entry)
        && let Err(err) = k.dataplane.set_ready(e.entry.worker(), false)
    {
        tracing::warn!("taking a retiring instance out of the kernel's choice: {err}");
    }
    let deadline = Instant::now() + chain.plan.spec.timeout;
    let poll = if chain.kernel.is_some() {
        RETIRE_POLL_KERNEL
    } else {
        RETIRE_POLL
    };
    // Two empty checks a poll apart: a kernel verdict that read the instance as ready just
    // before it was taken out may still be recording a request for it.
    let mut empty = 0;
    while empty < 2 && Instant::now() < deadline {
        if chain.held_by_count(holder) == 0 {
            empty += 1;
        } else {
            empty = 0;
        }
        if empty == 2 {
            break;
        }
        tokio::select! {
            status = running.child.wait() => return Some(status),
            _ = tokio::time::sleep(poll) => {}
            _ = stopping(shutdown) => return None,
        }
    }
    None
}

/// Lets the reader route what a dead worker left in its socket. EOF normally ends it at once;
/// if another process still holds a copy of the worker's socket, EOF never comes, so give up.
async fn drain(reader: &mut tokio::task::JoinHandle<()>) {
    if tokio::time::timeout(DRAIN_TIMEOUT, &mut *reader)
        .await
        .is_err()
    {
        reader.abort();
        tracing::warn!("worker socket still open after the process exited; stopped reading it");
    }
}

/// Resolves once shutdown began. (Wraps `wait_for` so no watch guard lives across an await.)
pub(crate) async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Sleeps, returning true early if shutdown began.
pub(crate) async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    let stopped = tokio::select! {
        _ = tokio::time::sleep(d) => None,
        _ = stopping(shutdown) => Some(true),
    };
    stopped.unwrap_or_else(|| *shutdown.borrow())
}
