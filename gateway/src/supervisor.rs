//! Worker supervision: start every function instance as its own process, wait until each is
//! ready, restart any that exits, and stop them all on shutdown.
//!
//! A worker is this same binary re-executed as `spindle worker`. It receives its chain's arena
//! memfd at fd 3 and its end of a connected loopback TCP socket at fd 4; the gateway keeps the
//! other end. The gateway makes the connection itself (listen on an ephemeral loopback port,
//! connect, accept, close the listener), so no port stays open for other processes to use.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chain_runtime::worker::{ARENA_FD, SOCKET_FD, WATCHDOG_EXIT};
use hyper::StatusCode;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};

use crate::dataplane::{ChainRuntime, Holder, read_worker, write_worker};
use crate::metrics::Metrics;

/// How long a worker may take to compile and instantiate its module.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a stopping worker gets after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot create the worker socket: {0}")]
    Socket(std::io::Error),
    #[error("cannot start the worker process: {0}")]
    Spawn(std::io::Error),
    #[error("worker exited before it was ready ({0}); its log is above")]
    ExitedEarly(String),
    #[error("worker was not ready within {0:?}")]
    NotReady(Duration),
}

/// What every worker of this gateway is started with.
#[derive(Clone)]
pub struct WorkerCommand {
    pub exe: PathBuf,
    pub config: PathBuf,
    pub config_digest: u64,
}

/// A connected pair of loopback TCP sockets: (gateway end, worker end).
fn socket_pair() -> std::io::Result<(TcpStream, TcpStream)> {
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

/// Duplicates `fd` to a number above the ones a worker's stdio and fixed fds use, so the
/// dup2 calls in the child cannot clobber each other.
fn dup_high(fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    fd.try_clone_to_owned().and_then(|owned| {
        // SAFETY: F_DUPFD_CLOEXEC returns a new fd we take ownership of, or -1.
        let high = unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
        if high < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `high` is a fresh fd owned by nobody else.
        Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(high) })
    })
}

/// One running worker process and its gateway-side socket tasks.
struct Running {
    child: Child,
    reader: tokio::task::JoinHandle<()>,
}

fn describe_exit(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

async fn spawn_worker(
    cmd: &WorkerCommand,
    chain: &Arc<ChainRuntime>,
    holder: Holder,
) -> Result<Running, SpawnError> {
    let stage = &chain.stages[holder.stage];
    let (gateway_end, worker_end) = socket_pair().map_err(SpawnError::Socket)?;
    let arena_fd = dup_high(chain.arena.fd()).map_err(SpawnError::Socket)?;
    let socket_fd = dup_high(worker_end.as_fd()).map_err(SpawnError::Socket)?;
    drop(worker_end);

    let mut command = Command::new(&cmd.exe);
    command
        .arg("worker")
        .arg("--config")
        .arg(&cmd.config)
        .arg("--config-digest")
        .arg(cmd.config_digest.to_string())
        .arg("--chain")
        .arg(&chain.plan.spec.name)
        .arg("--function")
        .arg(&stage.name)
        .arg("--instance")
        .arg(holder.instance.to_string())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let (arena_raw, socket_raw) = (arena_fd.as_raw_fd(), socket_fd.as_raw_fd());
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe calls (dup2, prctl, getppid). Both source fds are >= 10, so placing
    // them at 3 and 4 cannot overwrite one with the other; dup2 clears close-on-exec on the
    // copies, which is how they survive exec.
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(arena_raw, ARENA_FD) < 0 || libc::dup2(socket_raw, SOCKET_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // A worker must not outlive its gateway, even one killed with SIGKILL.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() == 1 {
                return Err(std::io::Error::other("gateway exited during worker start"));
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(SpawnError::Spawn)?;
    drop((arena_fd, socket_fd));

    gateway_end
        .set_nonblocking(true)
        .map_err(SpawnError::Socket)?;
    let stream = tokio::net::TcpStream::from_std(gateway_end).map_err(SpawnError::Socket)?;
    let (read, write) = stream.into_split();
    let (ready_tx, ready_rx) = oneshot::channel();
    let reader = tokio::spawn(read_worker(Arc::clone(chain), holder, read, ready_tx));
    let (queue_tx, queue_rx) = mpsc::unbounded_channel();
    tokio::spawn(write_worker(write, queue_rx));

    tokio::select! {
        ready = tokio::time::timeout(READY_TIMEOUT, ready_rx) => match ready {
            Ok(Ok(())) => {
                chain.instance_up(holder.stage, holder.instance, holder.incarnation, queue_tx);
                Ok(Running { child, reader })
            }
            Ok(Err(_)) => {
                let status = child.wait().await.map(|s| describe_exit(&s)).unwrap_or_else(|e| e.to_string());
                Err(SpawnError::ExitedEarly(status))
            }
            Err(_) => Err(SpawnError::NotReady(READY_TIMEOUT)),
        },
        status = child.wait() => {
            let status = status.map(|s| describe_exit(&s)).unwrap_or_else(|e| e.to_string());
            Err(SpawnError::ExitedEarly(status))
        }
    }
}

/// Starts one instance and keeps it running until shutdown. Reports the first start's result
/// through `first_start` so the gateway can refuse to come up with a broken function.
pub async fn supervise(
    cmd: WorkerCommand,
    chain: Arc<ChainRuntime>,
    metrics: Arc<Metrics>,
    stage: usize,
    instance: usize,
    first_start: oneshot::Sender<Result<Duration, SpawnError>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let chain_name = chain.plan.spec.name.clone();
    let fn_name = chain.stages[stage].name.clone();
    let timeout = chain.plan.stages[stage].function.timeout;
    let up = metrics
        .instances_up
        .with_label_values(&[chain_name.as_str(), fn_name.as_str()]);
    let restarts = metrics
        .restarts
        .with_label_values(&[chain_name.as_str(), fn_name.as_str()]);
    let mut first_start = Some(first_start);
    let mut backoff = Duration::from_millis(50);
    for incarnation in 1u64.. {
        let holder = Holder {
            stage,
            instance,
            incarnation,
        };
        let began = Instant::now();
        let mut running = match spawn_worker(&cmd, &chain, holder).await {
            Ok(r) => r,
            Err(e) => {
                if let Some(tx) = first_start.take() {
                    let _ = tx.send(Err(e));
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
        match first_start.take() {
            Some(tx) => {
                let _ = tx.send(Ok(began.elapsed()));
            }
            None => {
                tracing::info!(chain = %chain_name, function = %fn_name, instance, incarnation, "instance restarted")
            }
        }

        let status = tokio::select! {
            status = running.child.wait() => Some(status),
            _ = shutdown.wait_for(|stop| *stop) => None,
        };
        chain.instance_down(stage, instance);
        up.dec();
        let Some(status) = status else {
            stop_child(&mut running.child).await;
            let _ = running.reader.await;
            chain.fail_held_by(
                holder,
                StatusCode::SERVICE_UNAVAILABLE,
                "gateway is shutting down",
            );
            return;
        };
        // Descriptors the worker wrote before dying are still in the socket: route them first.
        let _ = running.reader.await;
        let (code, message) = match status {
            Ok(s) if s.code() == Some(WATCHDOG_EXIT) => (
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "function {fn_name} exceeded its timeout of {} ms; instance restarted",
                    timeout.as_millis()
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
        let failed = chain.fail_held_by(holder, code, &message);
        tracing::warn!(chain = %chain_name, function = %fn_name, instance, failed_requests = failed, "{message}");
        restarts.inc();
        // A worker that crashes right after starting should not spin the CPU.
        if began.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(50);
        }
        if sleep_or_shutdown(backoff, &mut shutdown).await {
            return;
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Sleeps, returning true early if shutdown began.
async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    let stopped = tokio::select! {
        _ = tokio::time::sleep(d) => None,
        _ = shutdown.wait_for(|stop| *stop) => Some(true),
    };
    stopped.unwrap_or_else(|| *shutdown.borrow())
}

async fn stop_child(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child's pid, which is not yet reaped (id() is Some).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}
