//! The gateway's side of a function's zygote (see `chain_runtime::zygote`): start it by exec
//! like a worker, restart it when it dies, and ask it for forked instances.
//!
//! While the zygote is down (starting, crashed, restarting) [`Zygote::fork`] says so at once
//! and the supervisor starts the instance by exec instead: a dead zygote never stops
//! instances from starting, and the instances it forked keep running without it (they are the
//! gateway's children).
//!
//! Once a spawn request is sent the zygote may have cloned: when no usable answer follows (see
//! [`ForkError::child_may_exist`]) the caller gives that request's fds up, and the connection,
//! which can no longer pair replies with requests, is handed to a task that makes the zygote
//! exit and kills and reaps every child a late reply names.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chain_runtime::instance::ZygoteHandoff;
use proto::zygote::{Reply, SpawnRequest};
use tokio::io::unix::AsyncFd;
use tokio::sync::{Mutex, watch};

use crate::dataplane::ChainRuntime;
use crate::metrics::Metrics;
use crate::process::{ForkedChild, WorkerProcess, watch_fd};
use crate::supervisor::{
    FunctionInputs, READY_TIMEOUT, STOP_GRACE, WorkerCommand, describe_exit, exec_worker_process,
    sleep_or_shutdown, stopping,
};

/// How long the zygote may take to answer one spawn request, unless its owner says otherwise.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    #[error("the zygote is not running")]
    Down,
    #[error("sending the spawn request: {0}")]
    Send(std::io::Error),
    #[error("reading the zygote's reply: {0}")]
    Io(std::io::Error),
    #[error("the zygote did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the zygote refused the request: {0}")]
    Refused(String),
    #[error("the zygote could not fork: {0}")]
    Failed(String),
    #[error("the zygote answered out of turn: {0:?}")]
    Unexpected(Reply),
    #[error("cannot adopt forked pid {pid} (killed it): {source}")]
    Adopt { pid: u32, source: std::io::Error },
}

impl ForkError {
    /// Whether a child holding the request's fds may exist although no [`ForkedChild`] came
    /// back: the request reached the zygote but what followed is unknown (no reply in time, a
    /// lost or garbled one, one out of turn), or the child could not be adopted. Those fds
    /// must then not be handed to anyone else. `Down`, `Send`, `Refused` and `Failed` mean no
    /// child was made.
    pub fn child_may_exist(&self) -> bool {
        match self {
            ForkError::Down | ForkError::Send(_) | ForkError::Refused(_) | ForkError::Failed(_) => {
                false
            }
            ForkError::Io(_) | ForkError::Timeout(_) | ForkError::Unexpected(_) => true,
            ForkError::Adopt { .. } => true,
        }
    }
}

/// Where the zygote's start stands; instances wait for the first start to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Up,
    Down,
}

/// One function's zygote, shared by the supervisors of the function's instances.
pub struct Zygote {
    /// The gateway's end of the socket while the zygote is up; the lock keeps one request
    /// and its reply on the socket at a time.
    socket: Mutex<Option<AsyncFd<OwnedFd>>>,
    state: watch::Sender<State>,
    /// Set when the first start failed because the function's instance cannot be built
    /// ([`Reply::BuildFailed`]): why. No worker of the function can start then.
    build_failure: std::sync::Mutex<Option<String>>,
    /// How long one spawn request may wait for its reply.
    reply_timeout: Duration,
}

impl Zygote {
    /// A zygote (not started yet: see [`supervise`]) whose spawn requests time out after
    /// `reply_timeout` ([`DEFAULT_REPLY_TIMEOUT`] outside tests).
    pub fn new(reply_timeout: Duration) -> Arc<Zygote> {
        Arc::new(Zygote {
            socket: Mutex::new(None),
            state: watch::Sender::new(State::Starting),
            build_failure: std::sync::Mutex::new(None),
            reply_timeout,
        })
    }

    /// Waits until the zygote's first start succeeded or failed: `Err(Some(why))` when the
    /// function's instance cannot be built at all (an exec'd worker would fail the same
    /// way), `Err(None)` when the zygote failed for a reason of its own.
    pub async fn first_start(&self) -> Result<(), Option<String>> {
        let mut state = self.state.subscribe();
        let settled = state.wait_for(|s| *s != State::Starting).await;
        if settled.is_ok_and(|s| *s == State::Up) {
            return Ok(());
        }
        let why = self
            .build_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        Err(why)
    }

    /// Forks instance `request.instance` with its socket end, statistics page and control socket
    /// end, and returns the child (already the gateway's) and how long the fork system call
    /// took. After an error for which [`ForkError::child_may_exist`] holds, a child may hold
    /// copies of the three fds: the caller must not hand them to another process.
    pub async fn fork(
        &self,
        request: SpawnRequest,
        socket: BorrowedFd<'_>,
        stats: BorrowedFd<'_>,
        control: BorrowedFd<'_>,
    ) -> Result<(ForkedChild, Duration), ForkError> {
        let mut guard = self.socket.lock().await;
        let zygote = guard.as_ref().ok_or(ForkError::Down)?;
        // An empty seqpacket socket always takes one small packet: this does not block. A
        // failed sendmsg sent nothing (a packet goes whole or not at all).
        chain_runtime::zygote::send_spawn(
            zygote.get_ref().as_fd(),
            &request,
            socket,
            stats,
            control,
        )
        .map_err(ForkError::Send)?;
        let reply = tokio::time::timeout(self.reply_timeout, next_reply(zygote)).await;
        let failed = match reply {
            Ok(Ok(Reply::Spawned { pid, fork_ns })) => {
                return match ForkedChild::adopt(pid) {
                    Ok(child) => Ok((child, Duration::from_nanos(fork_ns))),
                    Err(source) => {
                        // The reply was in turn: the connection stays usable.
                        crate::process::kill_and_reap(pid);
                        Err(ForkError::Adopt { pid, source })
                    }
                };
            }
            Ok(Ok(Reply::Refused(reason))) => return Err(ForkError::Refused(reason)),
            Ok(Ok(Reply::Failed(reason))) => return Err(ForkError::Failed(reason)),
            Ok(Ok(other)) => ForkError::Unexpected(other),
            Ok(Err(e)) => ForkError::Io(e),
            Err(_) => ForkError::Timeout(self.reply_timeout),
        };
        // Replies carry no request id: after a lost, late or out-of-turn one, the next reply
        // could pair with the wrong request, so this connection serves no more requests.
        // Its reply to this one may still come, naming a child that holds this request's fds.
        let abandoned = guard.take().expect("checked above");
        drop(guard);
        tokio::spawn(reap_late_children(abandoned));
        Err(failed)
    }
}

/// Reads the zygote's next reply from its socket.
async fn next_reply(zygote: &AsyncFd<OwnedFd>) -> std::io::Result<Reply> {
    loop {
        let mut ready = zygote.readable().await?;
        match ready.try_io(|fd| chain_runtime::zygote::receive_reply(fd.get_ref().as_fd())) {
            Ok(reply) => return reply,
            Err(_would_block) => continue,
        }
    }
}

/// Takes over a zygote connection that serves no more requests: shuts its sending side, so
/// the zygote reads EOF once it has answered what it already received and exits (its
/// supervisor then starts a fresh one), and kills and reaps every child a late
/// [`Reply::Spawned`] names until the zygote closes the socket.
async fn reap_late_children(zygote: AsyncFd<OwnedFd>) {
    if let Err(e) = nix::sys::socket::shutdown(
        zygote.get_ref().as_raw_fd(),
        nix::sys::socket::Shutdown::Write,
    ) {
        tracing::warn!("shutting down an abandoned zygote connection: {e}");
    }
    loop {
        match next_reply(&zygote).await {
            Ok(Reply::Spawned { pid, .. }) => {
                tracing::warn!(pid, "the zygote answered late: killing the child it forked");
                crate::process::kill_and_reap(pid);
            }
            Ok(other) => tracing::debug!("late zygote reply: {other:?}"),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return,
            // A garbled packet was read whole: the next one may still name a child.
            Err(e) if e.raw_os_error().is_none() => {
                tracing::warn!("abandoned zygote connection: {e}");
            }
            Err(e) => {
                tracing::warn!("abandoned zygote connection: {e}; no longer reading it");
                return;
            }
        }
    }
}

/// Starts the zygote of stage `stage` of `chain` and restarts it whenever it exits, until
/// shutdown.
pub async fn supervise(
    zygote: Arc<Zygote>,
    cmd: WorkerCommand,
    chain: Arc<ChainRuntime>,
    metrics: Arc<Metrics>,
    inputs: Arc<FunctionInputs>,
    stage: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let chain_name = chain.plan.spec.name.clone();
    let fn_name = chain.stages[stage].name.clone();
    let restarts = metrics
        .zygote_restarts
        .with_label_values(&[chain_name.as_str(), fn_name.as_str()]);
    let mut backoff = Duration::from_millis(50);
    let mut ever_up = false;
    loop {
        let began = Instant::now();
        let started = start(&cmd, &chain, &inputs, stage, &mut shutdown).await;
        let (mut process, socket) = match started {
            Ok(up) => up,
            Err(None) => return,
            Err(Some(StartFailure::Build(why))) if !ever_up => {
                // The function's instance cannot be built: its instances fail to start with
                // this reason (and report it), exec'd ones could do no better.
                tracing::warn!(chain = %chain_name, function = %fn_name,
                    "the zygote found that the function's instance cannot be built; its \
                     instances will not start");
                *zygote
                    .build_failure
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why);
                zygote.state.send_replace(State::Down);
                return;
            }
            Err(Some(e)) if !ever_up => {
                // What stops a first start (a module whose warm instance cannot be captured,
                // say) stops every later one: recompiling every few seconds would only burn
                // CPU.
                tracing::error!(chain = %chain_name, function = %fn_name,
                    "zygote failed to start ({e}); this function's instances start by exec");
                zygote.state.send_replace(State::Down);
                return;
            }
            Err(Some(e)) => {
                tracing::error!(chain = %chain_name, function = %fn_name,
                    "zygote failed to restart ({e}); instances start by exec until it does");
                zygote.state.send_replace(State::Down);
                restarts.inc();
                if sleep_or_shutdown(backoff, &mut shutdown).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let pid = process.id().unwrap_or(0);
        chain.stages[stage].zygote_pid.store(pid, Ordering::Relaxed);
        chain.stages[stage]
            .zygotes_up
            .fetch_add(1, Ordering::Relaxed);
        *zygote.socket.lock().await = Some(socket);
        zygote.state.send_replace(State::Up);
        ever_up = true;
        tracing::info!(chain = %chain_name, function = %fn_name,
            took_ms = began.elapsed().as_millis() as u64, "zygote up");

        let status = tokio::select! {
            status = process.wait() => Some(status),
            _ = stopping(&mut shutdown) => None,
        };
        // Closing our end is what tells a live zygote to exit.
        *zygote.socket.lock().await = None;
        // Only if it still names this zygote: after a reload, the new generation's zygote
        // may have taken its place.
        chain.stages[stage]
            .zygotes_up
            .fetch_sub(1, Ordering::Relaxed);
        let _ = chain.stages[stage].zygote_pid.compare_exchange(
            pid,
            0,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        zygote.state.send_replace(State::Down);
        let Some(status) = status else {
            process.stop(STOP_GRACE).await;
            return;
        };
        let how = status
            .map(|s| describe_exit(&s))
            .unwrap_or_else(|e| e.to_string());
        tracing::warn!(chain = %chain_name, function = %fn_name,
            "zygote exited ({how}); restarting it, instances start by exec meanwhile");
        restarts.inc();
        if began.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(50);
        }
        if sleep_or_shutdown(backoff, &mut shutdown).await {
            return;
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Why a zygote did not come up.
#[derive(Debug)]
enum StartFailure {
    /// The function's instance cannot be built ([`Reply::BuildFailed`]): why.
    Build(String),
    /// The zygote's own trouble (its image could not be captured, it crashed, ...).
    Other(String),
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartFailure::Build(why) | StartFailure::Other(why) => f.write_str(why),
        }
    }
}

impl StartFailure {
    fn from_reply(reply: Reply) -> StartFailure {
        match reply {
            Reply::BuildFailed(why) => StartFailure::Build(why),
            Reply::Failed(why) => StartFailure::Other(why),
            other => {
                StartFailure::Other(format!("answered {other:?} instead of its ready message"))
            }
        }
    }
}

/// One start: exec the zygote and wait for its ready message. `Err(None)`: shutting down.
async fn start(
    cmd: &WorkerCommand,
    chain: &Arc<ChainRuntime>,
    inputs: &FunctionInputs,
    stage: usize,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(WorkerProcess, AsyncFd<OwnedFd>), Option<StartFailure>> {
    let other =
        |what: &str, e: &dyn std::fmt::Display| Some(StartFailure::Other(format!("{what}: {e}")));
    let (gateway_end, zygote_end) =
        chain_runtime::zygote::socket_pair().map_err(|e| other("socket", &e))?;
    let plan = ZygoteHandoff {
        arena: chain.arena.payload_fd(),
        arena_meta: chain.arena.meta_fd(),
        config: cmd.config_text.as_fd(),
        module: inputs.module.as_fd(),
        zygote: zygote_end.as_fd(),
        namespaces: cmd.namespaces(),
        preopens: inputs.preopens.fds(),
    }
    .exec_plan()
    .map_err(|e| other("placing its fds", &e))?;
    let args = [
        "worker".to_string(),
        "--zygote".into(),
        "--config".into(),
        cmd.config.display().to_string(),
        "--chain".into(),
        chain.plan.spec.name.clone(),
        "--function".into(),
        chain.stages[stage].name.clone(),
    ];
    let mut process =
        exec_worker_process(cmd, &args, plan.placements()).map_err(|e| other("exec", &e))?;
    drop(plan);
    drop(zygote_end);
    nix::fcntl::fcntl(
        &gateway_end,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .map_err(|e| other("socket", &e))?;
    let socket = watch_fd(gateway_end).map_err(|e| other("socket", &e))?;
    let ready = async {
        loop {
            let mut ready = socket.readable().await?;
            match ready.try_io(|fd| chain_runtime::zygote::receive_reply(fd.get_ref().as_fd())) {
                Ok(reply) => return reply,
                Err(_would_block) => continue,
            }
        }
    };
    let mut shutting_down = false;
    let outcome = tokio::select! {
        reply = tokio::time::timeout(READY_TIMEOUT, ready) => match reply {
            Ok(Ok(Reply::Ready { .. })) => Ok(()),
            Ok(Ok(other)) => Err(Some(StartFailure::from_reply(other))),
            // Closed without a word: its exit status (below) says more.
            Ok(Err(_)) => Err(None),
            Err(_) => Err(Some(StartFailure::Other(format!("not ready within {READY_TIMEOUT:?}")))),
        },
        _ = process.wait() => Err(None),
        _ = stopping(shutdown) => {
            shutting_down = true;
            Err(None)
        }
    };
    match outcome {
        Ok(()) => Ok((process, socket)),
        Err(said) => {
            // What it said before it went, if it exited before its words were read here.
            let said = said.or_else(|| {
                chain_runtime::zygote::receive_reply(socket.get_ref().as_fd())
                    .ok()
                    .map(StartFailure::from_reply)
            });
            let exit = tokio::time::timeout(STOP_GRACE, process.wait()).await;
            process.stop(STOP_GRACE).await;
            if shutting_down {
                return Err(None);
            }
            Err(Some(match (said, exit) {
                (Some(said), _) => said,
                (None, Ok(Ok(status))) => StartFailure::Other(format!(
                    "exited before it was ready ({}); its log is above",
                    describe_exit(&status)
                )),
                (None, _) => StartFailure::Other("closed its socket before it was ready".into()),
            }))
        }
    }
}
