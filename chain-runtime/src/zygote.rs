//! The zygote: one process per function that compiles the module once, builds one instance
//! cold (instantiate + `_initialize`), captures its image ([`FunctionHost::snapshot`]),
//! drops the instance and from then on only forks: each spawn request (see `proto::zygote`)
//! becomes a child that restores an instance from the image (memory mapped copy-on-write,
//! globals restored, `spindle_on_fork` called) and serves exactly like an exec'd worker
//! ([`crate::worker`]). The zygote itself never serves a request.
//!
//! # How a child is made, and why this way
//!
//! The gateway must supervise a forked child exactly as it supervises an exec'd worker: read
//! its exit status (a watchdog exit is a 504, anything else a 502), restart it, and have it
//! die with the gateway (parent-death signal). Three ways were weighed:
//!
//! - **fork + the zygote reaps, the gateway watches a pidfd.** A pidfd of a process that is
//!   not one's child tells *that* it exited, not *how*: the status would have to travel
//!   back over the zygote's socket, and would be lost with the zygote. Worse, the child's
//!   parent-death signal would be tied to the zygote, so killing the zygote would kill every
//!   instance it forked.
//! - **fork + double fork onto a subreaper gateway.** The grandchild becomes the gateway's
//!   child, but two forks per instance, a parent-death signal that can only be set after the
//!   re-parenting, and a gateway that inherits every stray orphan of its subtree.
//! - **`clone(CLONE_PARENT)`** (chosen): the child's parent is the zygote's parent, the
//!   gateway, from the first instruction. The gateway opens a pidfd on its own child (race
//!   free: only it can reap the pid), waits on it and reads the real status with
//!   `waitid(P_PIDFD)`; the child's parent-death signal is tied to the gateway, and a dead
//!   zygote leaves its children running. One fork per instance.
//!
//! `CLONE_PARENT` exists only as the raw `clone` system call, which skips what glibc's
//! `fork()` (`_Fork`) does around it: the atfork handlers that take and reset malloc's and
//! stdio's locks, and, in the child, storing its new thread id in the thread's control block
//! (`struct pthread::tid`, which `fork` gets the kernel to write by `CLONE_CHILD_SETTID`) and
//! registering its robust-mutex list (`set_robust_list`).
//!
//! The locks matter only if *another* thread could hold one at the moment of the call. So the
//! zygote is kept single-threaded: rayon's global pool (Cranelift uses it) is built on the
//! calling thread alone, the compile's own short-lived pool is waited out, and every spawn
//! checks `/proc/self/task` and refuses to fork if a second thread has appeared. The zygote
//! forks from its only thread, in its request loop, holding no lock and no guard.
//!
//! The child's main thread keeps the zygote's thread id (= the zygote's pid) in its control
//! block. glibc does not use that field for `getpid`, `gettid` or `raise` (since 2.34 `raise`
//! and `pthread_kill` on the calling thread ask the kernel with `gettid`), so signalling
//! oneself and `abort` work. It does use it as the *owner id* of recursive and error-checking
//! mutexes, among them ld.so's `_dl_load_lock` (taken by `dlopen` and by `dl_iterate_phdr`,
//! which unwinding and backtraces call), and as the target of `pthread_kill` from another
//! thread. Within the child the stale id is consistent, since it names no other thread: a
//! recursive lock still recognises its owner and excludes the child's other threads, whose
//! ids are their own. That breaks only if a thread of the child had the stale id as its real
//! one: possible once the zygote has exited and been reaped (a crash, a restart) and the
//! kernel reuses its pid as a thread id inside a long-lived child. Then two threads would
//! share a lock owner id and could be inside `_dl_load_lock` at once. The child therefore
//! checks, once its serving threads (control, watchdog; it starts no others) are running,
//! that none has the stale id, and exits before it reports ready if one has (the gateway
//! starts the instance again). Robust mutexes: none is used across processes here, and the
//! missing robust list only means a robust mutex a dying child holds is not marked
//! owner-dead; no code in the child relies on that.
//!
//! # The child
//!
//! Sets its parent-death signal and checks the gateway is still its parent, closes its copy
//! of the zygote's socket and the zygote's fd-number reservations, places the three fds the
//! request carried at `SOCKET_FD`, `STATS_FD` and `CONTROL_FD` (4, 7 and 9), restores its
//! instance and runs
//! [`crate::worker`]'s serving loop. It never returns into the zygote's code: it ends with
//! `exit`.

use std::ffi::CStr;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use nix::sys::stat::{SFlag, fstat};
use proto::worker::{CONTROL_FD, SOCKET_FD, STATS_FD};
use proto::zygote::{MAX_PACKET, Reply, SPAWN_FDS, SpawnRequest, ZygoteWireError};

use crate::confine::{Role, child_filter, confine};
use crate::host::CompiledModule;
use crate::instance::{
    Instance, InstanceBuilder, InstanceError, ZygoteHandoff, adopt_preopens, dup_at_least,
};
use crate::snapshot::{Snapshot, SnapshotError};
use crate::worker::{ServingFds, WorkerError, serve_instance};

/// How long the compile's worker threads may take to exit before the zygote gives up.
const THREADS_SETTLE: Duration = Duration::from_secs(5);
/// The kernel's limit of fds per message (SCM_MAX_FD): room for that many means a packet's
/// fds are never cut, so none are installed here without being seen (and closed).

#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    #[error(transparent)]
    Instance(#[from] InstanceError),
    /// The function's instance could not be built: no worker of it can start.
    #[error(transparent)]
    Build(InstanceError),
    // The sources print after these (anyhow's chain at the binary's edge).
    #[error("capturing the warm instance")]
    Snapshot(#[from] SnapshotError),
    #[error("zygote socket")]
    Io(#[from] std::io::Error),
    #[error("cannot keep the zygote single-threaded: {0}")]
    Threads(String),
    /// A failure already told to the gateway, which reports it.
    #[error(transparent)]
    Reported(Box<ZygoteError>),
}

/// What identifies a zygote; the gateway passes it on the command line.
#[derive(Debug, Clone)]
pub struct ZygoteArgs {
    /// The config's path: names it in messages and anchors relative module paths.
    pub config: PathBuf,
    pub chain: String,
    pub function: String,
}

/// Runs the zygote until the gateway closes its socket. Takes over fds 3, 5, 6 and 10, and
/// the function's preopened directories from 15 on. A failure before it is ready is told to
/// the gateway first: [`Reply::BuildFailed`] when the function's instance itself cannot be
/// built (no worker of it could start), [`Reply::Failed`] for the zygote's own reasons.
pub fn run(args: &ZygoteArgs) -> Result<(), ZygoteError> {
    // Before anything can start rayon's global pool with threads of its own.
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .use_current_thread()
        .build_global()
        .map_err(|e| ZygoteError::Threads(format!("building rayon's pool: {e}")))?;
    let mut handoff = ZygoteHandoff::inherited()?;
    let reserved = reserve_fd_numbers()?;
    let gateway = nix::unistd::getppid();
    let began = Instant::now();
    let warm = match warm_up(args, &mut handoff) {
        Ok(warm) => warm,
        Err(e) => {
            let message = crate::control::error_chain(&e);
            let reply = match e {
                ZygoteError::Build(_) => Reply::BuildFailed(message),
                _ => Reply::Failed(message),
            };
            return match send_packet(handoff.zygote.as_fd(), &reply.to_bytes(), &[]) {
                Ok(()) => Err(ZygoteError::Reported(Box::new(e))),
                Err(send) => {
                    tracing::debug!("could not tell the gateway why the zygote failed: {send}");
                    Err(e)
                }
            };
        }
    };
    let (builder, snapshot, compiled) = warm;
    let build_ns = began.elapsed().as_nanos() as u64;
    // The config and module memfds stay open at their numbers, as in an exec'd worker: a
    // forked child's fd table matches one.
    let ZygoteHandoff {
        arena,
        arena_meta,
        zygote,
        ..
    } = handoff;
    let mut state = Zygote {
        builder,
        snapshot,
        compiled,
        arena: Some((arena, arena_meta)),
        socket: Some(zygote),
        reserved,
        gateway,
        refused: 0,
    };
    tracing::info!(function = %args.function, build_ms = build_ns / 1_000_000,
        "zygote ready: module compiled, warm image captured");
    state.send(&Reply::Ready {
        pid: std::process::id(),
        build_ns,
    })?;
    state.serve()
}

/// Config, preopens, confinement, then one warm instance built cold and captured; back to a
/// single thread.
fn warm_up(
    args: &ZygoteArgs,
    handoff: &mut ZygoteHandoff<OwnedFd>,
) -> Result<(InstanceBuilder, Snapshot, CompiledModule), ZygoteError> {
    let (text, module) = handoff.read_inputs()?;
    let builder =
        InstanceBuilder::from_config_text(&text, &args.config, &args.chain, &args.function)?;
    let preopens = adopt_preopens(&builder.stage().function.files, &mut handoff.preopens)?;
    let builder = builder.with_preopens(preopens);
    // Before `_initialize`, the first guest code; every child inherits the confinement.
    confine(builder.sandbox(), handoff.namespaces.take(), Role::Zygote)?;
    let mut warm = builder.clone().cold(&module).map_err(ZygoteError::Build)?;
    let snapshot = warm.host_mut().snapshot()?;
    let compiled = warm.host_mut().compiled_module();
    drop(warm);
    drop(module);
    wait_single_threaded(THREADS_SETTLE)?;
    // Every page left in the heap is one more page-table entry each fork copies and one more
    // copy-on-write fault a child may take: hand the compile's freed memory back first.
    // SAFETY: malloc_trim only returns free heap memory to the kernel; no allocation is
    // live across it that it could touch. Raw libc: nix has no malloc_trim.
    unsafe { libc::malloc_trim(0) };
    Ok((builder, snapshot, compiled))
}

struct Zygote {
    builder: InstanceBuilder,
    snapshot: Snapshot,
    compiled: CompiledModule,
    /// The arena's payload and metadata memfds. `None` only in a child, which took them (at
    /// `ARENA_FD` and `ARENA_META_FD`, like an exec'd worker's).
    arena: Option<(OwnedFd, OwnedFd)>,
    /// `None` only in a child, which closed it.
    socket: Option<OwnedFd>,
    reserved: Vec<OwnedFd>,
    gateway: nix::unistd::Pid,
    refused: u64,
}

/// One packet read from the zygote socket.
pub struct Received {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// The packet or its fds did not fit the buffers (and were cut).
    pub truncated: bool,
}

impl Zygote {
    fn socket(&self) -> BorrowedFd<'_> {
        self.socket
            .as_ref()
            .expect("only a child closes the socket, and it never returns here")
            .as_fd()
    }

    fn send(&self, reply: &Reply) -> std::io::Result<()> {
        send_packet(self.socket(), &reply.to_bytes(), &[])
    }

    fn serve(&mut self) -> Result<(), ZygoteError> {
        loop {
            let Some(packet) = receive(self.socket())? else {
                // The gateway closed its end: it is shutting down or replaced this zygote.
                return Ok(());
            };
            let reply = match check_request(packet) {
                Err(reason) => {
                    self.refused += 1;
                    tracing::warn!(
                        refused_total = self.refused,
                        "refused spawn request: {reason}"
                    );
                    Reply::Refused(reason)
                }
                Ok((request, [socket, stats, control])) => {
                    self.spawn(request, socket, stats, control)
                }
            };
            if let Err(e) = self.send(&reply) {
                if let Reply::Spawned { pid, .. } = reply {
                    // The gateway will not learn this child's pid, so it could not
                    // supervise it: it must not serve. While the gateway lives the child is
                    // its unreaped child, so the pid still names it; a gateway that is gone
                    // (the usual reason the send failed) has had it reparented and maybe
                    // reaped, its pid free for reuse: then leave it to its death signal.
                    if nix::unistd::getppid() == self.gateway {
                        tracing::error!(pid, "cannot report a forked child ({e}); killing it");
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid as libc::pid_t),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
                return Err(e.into());
            }
        }
    }

    /// Forks the child for `request`; in the parent, the fds it carried close on return.
    fn spawn(
        &mut self,
        request: SpawnRequest,
        socket: OwnedFd,
        stats: OwnedFd,
        control: OwnedFd,
    ) -> Reply {
        if let Err(e) = check_single_threaded() {
            return Reply::Failed(e);
        }
        // This single thread's id: what the child's control block will still say.
        let zygote_tid = nix::unistd::gettid().as_raw();
        let began = Instant::now();
        // SAFETY: clone without CLONE_VM and with a null stack is fork with a chosen parent:
        // the child continues here on a copy of this thread's stack. This process has only
        // this thread (checked just above; see the module doc for why that is the condition),
        // and this thread holds no lock here: no guard is alive in this loop, and the
        // allocator and stdio are not in use across the call, so skipping glibc's atfork
        // handlers leaves no lock held in the child. The child's thread control block keeps
        // this thread's id (no CLONE_CHILD_SETTID: glibc's field is private) and it has no
        // robust list: the stale id is what recursive/error-checking mutexes (ld.so's
        // _dl_load_lock too) record as their owner, consistent within the child as long as
        // none of its threads has that id as its own, which the child checks once its
        // threads run (`check_no_thread_has`; the module doc has the pid-reuse case). Raw
        // syscall because neither nix nor glibc offers clone with CLONE_PARENT and fork
        // semantics.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone,
                (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
        let fork_ns = began.elapsed().as_nanos() as u64;
        match pid {
            0 => self.become_worker(request, socket, stats, control, zygote_tid),
            pid if pid > 0 => {
                tracing::debug!(
                    instance = request.instance,
                    pid,
                    fork_us = fork_ns / 1000,
                    "forked"
                );
                Reply::Spawned {
                    pid: pid as u32,
                    fork_ns,
                }
            }
            _ => Reply::Failed(format!("clone failed: {}", std::io::Error::last_os_error())),
        }
    }

    /// The child's whole life; never returns into the zygote's loop. A failure before its
    /// instance is ready is told to the gateway on the control socket, as an exec'd worker
    /// does.
    fn become_worker(
        &mut self,
        request: SpawnRequest,
        socket: OwnedFd,
        stats: OwnedFd,
        control: OwnedFd,
        stale_tid: libc::pid_t,
    ) -> ! {
        // Every number a child's fds go to is taken now (reservations, hand-off, preopens),
        // so this copy lands above them and placing the fds cannot overwrite it.
        let report = control.try_clone();
        let result = match self.child_build(request, socket, stats, control, stale_tid) {
            Ok((instance, fds)) => {
                drop(report);
                serve_instance(instance, None, fds, request.instance)
            }
            Err(e) => {
                let reported = report
                    .as_ref()
                    .is_ok_and(|r| crate::control::report_start_failure(r.as_fd(), &e));
                Err(e.reported(reported))
            }
        };
        let code = match result {
            Ok(()) => 0,
            Err(WorkerError::Reported(e)) => {
                tracing::debug!(function = %self.builder.stage().function.name,
                    instance = request.instance, "forked worker did not start (told the gateway): {e}");
                1
            }
            Err(e) => {
                tracing::error!(function = %self.builder.stage().function.name,
                    instance = request.instance, "forked worker: {e}");
                1
            }
        };
        std::process::exit(code)
    }

    /// The child's instance from the zygote's image, and its fds where a worker has them.
    fn child_build(
        &mut self,
        request: SpawnRequest,
        socket: OwnedFd,
        stats: OwnedFd,
        control: OwnedFd,
        stale_tid: libc::pid_t,
    ) -> Result<(Instance, ServingFds), WorkerError> {
        // A worker must not outlive its gateway, even one killed with SIGKILL.
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
            .map_err(std::io::Error::from)?;
        if nix::unistd::getppid() != self.gateway {
            return Err(WorkerError::Image(
                "the gateway exited while this instance was being forked".into(),
            ));
        }
        let name: &CStr = c"spindle";
        // Only the name in /proc (comm): the zygote's is "spindle-zygote".
        let _ = nix::sys::prctl::set_name(name);
        drop(self.socket.take());
        // Free the fixed numbers, then put the worker's fds at theirs.
        self.reserved.clear();
        let mut placed = place_fds(&[
            (socket.as_fd(), SOCKET_FD),
            (stats.as_fd(), STATS_FD),
            (control.as_fd(), CONTROL_FD),
        ])?
        .into_iter();
        drop((socket, stats, control));
        let (socket, stats, control) = (
            placed.next().expect("three placed"),
            placed.next().expect("three placed"),
            placed.next().expect("three placed"),
        );
        let (arena, arena_meta) = self.arena.take().expect("taken once, by the child");
        // The zygote's filter allows forking; a child's must not.
        child_filter(self.builder.sandbox())?;
        let began = Instant::now();
        let instance = self
            .builder
            .clone()
            .from_snapshot(&self.snapshot, &self.compiled)?;
        tracing::debug!(
            instance = request.instance,
            incarnation = request.incarnation,
            restore_us = began.elapsed().as_micros() as u64,
            "restored from the zygote's image"
        );
        let fds = ServingFds {
            stale_tid: Some(stale_tid),
            arena,
            arena_meta,
            socket,
            stats,
            control,
        };
        Ok((instance, fds))
    }
}

/// Checks a received packet is a spawn request with the fds it must carry.
fn check_request(packet: Received) -> Result<(SpawnRequest, [OwnedFd; SPAWN_FDS]), String> {
    if packet.truncated {
        return Err(format!("packet cut: longer than {MAX_PACKET} bytes"));
    }
    let request = SpawnRequest::from_bytes(&packet.bytes).map_err(|e| e.to_string())?;
    let fds: [OwnedFd; SPAWN_FDS] = packet.fds.try_into().map_err(|fds: Vec<OwnedFd>| {
        format!(
            "a spawn request carries {SPAWN_FDS} fds (socket, stats page, control socket), got {}",
            fds.len()
        )
    })?;
    for (fd, kind, what) in [
        (&fds[0], SFlag::S_IFSOCK, "the worker's socket"),
        (&fds[1], SFlag::S_IFREG, "the statistics memfd"),
        (&fds[2], SFlag::S_IFSOCK, "the control socket"),
    ] {
        let is_kind =
            fstat(fd).is_ok_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == kind);
        if !is_kind {
            return Err(format!("fd {} is not {what}", fd.as_raw_fd()));
        }
    }
    Ok((request, fds))
}

/// Puts a duplicate of each source fd at its target number and returns them in order. Safe
/// when a source sits at another's target: every source is first copied above all targets.
pub(crate) fn place_fds(pairs: &[(BorrowedFd<'_>, RawFd)]) -> std::io::Result<Vec<OwnedFd>> {
    let above = pairs.iter().map(|p| p.1).max().unwrap_or(0) + 1;
    let copies = pairs
        .iter()
        .map(|(fd, _)| dup_at_least(*fd, above))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut placed = Vec::with_capacity(pairs.len());
    for (copy, (_, target)) in copies.iter().zip(pairs) {
        // SAFETY: dup2 onto a number this process does not own otherwise: the caller freed
        // the targets (or they hold what is being replaced, owned by nobody after this).
        // Raw libc: nix's dup2 needs the target as an OwnedFd and its dup2_raw does not check
        // dup2's result.
        let fd = unsafe { libc::dup2(copy.as_raw_fd(), *target) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: dup2 succeeded, so `fd` (== target) is open and this is its only owner.
        placed.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    Ok(placed)
}

/// Fills every free fd number up to `proto::worker::MOUNT_NS_FD` with /dev/null
/// (close-on-exec), so that nothing the zygote opens itself (the image memfd, say) sits where
/// a child must place its socket or statistics page. Returned so a child can free them again.
/// Not past it: the preopens' numbers above are the gateway's fds or free, and the
/// confinement closes the free ones, which must then not be owned here.
fn reserve_fd_numbers() -> std::io::Result<Vec<OwnedFd>> {
    let mut reserved = Vec::new();
    loop {
        let null = OwnedFd::from(std::fs::File::open("/dev/null")?);
        if null.as_raw_fd() > proto::worker::MOUNT_NS_FD {
            return Ok(reserved);
        }
        reserved.push(null);
    }
}

fn thread_count() -> Result<usize, String> {
    std::fs::read_dir("/proc/self/task")
        .map(|dir| dir.count())
        .map_err(|e| format!("reading /proc/self/task: {e}"))
}

/// Fails if a thread of this process has `tid` as its id: in a forked child, the id its main
/// thread's control block still holds (see the module doc).
pub(crate) fn check_no_thread_has(tid: libc::pid_t) -> Result<(), WorkerError> {
    let tasks = std::fs::read_dir("/proc/self/task")?;
    for task in tasks {
        if task?.file_name().to_str().and_then(|t| t.parse().ok()) == Some(tid) {
            return Err(WorkerError::StaleThreadId(tid));
        }
    }
    Ok(())
}

fn check_single_threaded() -> Result<(), String> {
    match thread_count()? {
        1 => Ok(()),
        n => Err(format!(
            "the zygote has {n} threads; forking now could copy a lock another one holds"
        )),
    }
}

/// Waits for the threads of the compile's own rayon pool, which exit after it is dropped.
fn wait_single_threaded(limit: Duration) -> Result<(), ZygoteError> {
    let began = Instant::now();
    loop {
        match check_single_threaded() {
            Ok(()) => return Ok(()),
            Err(e) if began.elapsed() > limit => return Err(ZygoteError::Threads(e)),
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// A connected pair of close-on-exec Unix seqpacket sockets: (gateway end, zygote end).
pub fn socket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(std::io::Error::from)
}

/// Sends one packet, with `fds` attached by `SCM_RIGHTS`. On a non-blocking socket a full
/// buffer is `WouldBlock`.
pub fn send_packet(
    socket: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
    loop {
        match sendmsg::<()>(
            socket.as_raw_fd(),
            &[IoSlice::new(bytes)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Asks the zygote on `socket` to fork `request`'s instance with its `socket`, `stats` and
/// `control` (attached in that order, [`SPAWN_FDS`]).
pub fn send_spawn(
    zygote: BorrowedFd<'_>,
    request: &SpawnRequest,
    socket: BorrowedFd<'_>,
    stats: BorrowedFd<'_>,
    control: BorrowedFd<'_>,
) -> std::io::Result<()> {
    send_packet(zygote, &request.to_bytes(), &[socket, stats, control])
}

/// Receives one packet and the fds it carries (close-on-exec); `None` once the peer closed.
/// On a non-blocking socket an empty queue is `WouldBlock`.
pub fn receive(socket: BorrowedFd<'_>) -> std::io::Result<Option<Received>> {
    let mut buf = vec![0u8; MAX_PACKET];
    // Room for SCM_MAX_FD descriptors: only credentials or other unasked-for messages could
    // cut the control part.
    let mut space = nix::cmsg_space!([RawFd; rdma_fork::handoff::SCM_MAX_FD]);
    let got = rdma_fork::recv_with_fds(socket, &mut buf, &mut space)?;
    let truncated = got.data_cut || got.fds_cut;
    if got.bytes == 0 && got.fds.is_empty() && !truncated {
        return Ok(None);
    }
    buf.truncate(got.bytes);
    Ok(Some(Received {
        bytes: buf,
        fds: got.fds,
        truncated,
    }))
}

/// Receives the zygote's next reply; a closed socket is `UnexpectedEof`.
pub fn receive_reply(zygote: BorrowedFd<'_>) -> std::io::Result<Reply> {
    let packet = receive(zygote)?.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the zygote closed its socket",
        )
    })?;
    if packet.truncated {
        return Err(std::io::Error::other(ZygoteWireError::TooLong {
            what: "a reply",
            got: packet.bytes.len(),
            need: MAX_PACKET,
        }));
    }
    Reply::from_bytes(&packet.bytes).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::sealed_memfd;

    fn request() -> SpawnRequest {
        SpawnRequest {
            instance: 3,
            incarnation: 9,
        }
    }

    fn tcp_socket() -> OwnedFd {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        OwnedFd::from(listener)
    }

    /// Sends `bytes` with `fds` over a real seqpacket pair and runs the zygote's check on
    /// what arrives.
    fn sent(bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<SpawnRequest, String> {
        let (gateway, zygote) = socket_pair().unwrap();
        send_packet(gateway.as_fd(), bytes, fds).unwrap();
        let packet = receive(zygote.as_fd()).unwrap().expect("a packet");
        check_request(packet).map(|(r, _)| r)
    }

    #[test]
    fn a_well_formed_request_is_accepted_with_its_fds() {
        let (socket, stats) = (tcp_socket(), sealed_memfd("stats", b"x").unwrap());
        let (control, _gateway_control) = std::os::unix::net::UnixStream::pair().unwrap();
        let (gateway, zygote) = socket_pair().unwrap();
        send_spawn(
            gateway.as_fd(),
            &request(),
            socket.as_fd(),
            stats.as_fd(),
            control.as_fd(),
        )
        .unwrap();
        let packet = receive(zygote.as_fd()).unwrap().unwrap();
        let (r, [s, m, _]) = check_request(packet).unwrap();
        assert_eq!(r, request());
        // Fresh fds of the same files, not the sender's numbers.
        assert_ne!(s.as_raw_fd(), socket.as_raw_fd());
        assert_eq!(fstat(&m).unwrap().st_ino, fstat(&stats).unwrap().st_ino);
    }

    #[test]
    fn bad_requests_are_refused_with_the_reason() {
        let (socket, stats) = (tcp_socket(), sealed_memfd("stats", b"x").unwrap());
        let (control, _gateway_control) = std::os::unix::net::UnixStream::pair().unwrap();
        let good = request().to_bytes();
        let all = [socket.as_fd(), stats.as_fd(), control.as_fd()];
        let err = sent(&good[..7], &all).unwrap_err();
        assert!(
            err.contains("truncated") && err.contains("7 bytes"),
            "{err}"
        );
        let err = sent(&good, &all[..2]).unwrap_err();
        assert!(
            err.contains("carries 3 fds") && err.contains("got 2"),
            "{err}"
        );
        let err = sent(&good, &[]).unwrap_err();
        assert!(err.contains("got 0"), "{err}");
        let err = sent(&good, &[stats.as_fd(), socket.as_fd(), control.as_fd()]).unwrap_err();
        assert!(err.contains("is not the worker's socket"), "{err}");
        let err = sent(&good, &[socket.as_fd(), socket.as_fd(), control.as_fd()]).unwrap_err();
        assert!(err.contains("is not the statistics memfd"), "{err}");
        let err = sent(&good, &[socket.as_fd(), stats.as_fd(), stats.as_fd()]).unwrap_err();
        assert!(err.contains("is not the control socket"), "{err}");
        let err = sent(b"GET / HTTP/1.1\r\n\r\n", &[]).unwrap_err();
        assert!(err.contains("bad magic"), "{err}");
        let many: Vec<BorrowedFd<'_>> = (0..40).map(|_| stats.as_fd()).collect();
        let err = sent(&good, &many).unwrap_err();
        assert!(err.contains("got 40"), "{err}");
        let err = sent(&vec![0u8; MAX_PACKET + 1], &[]).unwrap_err();
        assert!(err.contains("packet cut"), "{err}");
    }

    #[test]
    fn refused_requests_leave_the_socket_serving() {
        // After garbage, the next packet on the same socket is read whole and accepted.
        let (socket, stats) = (tcp_socket(), sealed_memfd("stats", b"x").unwrap());
        let (control, _gateway_control) = std::os::unix::net::UnixStream::pair().unwrap();
        let (gateway, zygote) = socket_pair().unwrap();
        send_packet(gateway.as_fd(), b"junk", &[stats.as_fd()]).unwrap();
        send_spawn(
            gateway.as_fd(),
            &request(),
            socket.as_fd(),
            stats.as_fd(),
            control.as_fd(),
        )
        .unwrap();
        let first = receive(zygote.as_fd()).unwrap().unwrap();
        assert!(check_request(first).is_err());
        let second = receive(zygote.as_fd()).unwrap().unwrap();
        assert_eq!(check_request(second).unwrap().0, request());
        drop(gateway);
        assert!(
            receive(zygote.as_fd()).unwrap().is_none(),
            "EOF once closed"
        );
    }

    #[test]
    fn replies_cross_the_socket_and_eof_is_reported() {
        let (gateway, zygote) = socket_pair().unwrap();
        let reply = Reply::Spawned {
            pid: 1234,
            fork_ns: 99,
        };
        send_packet(zygote.as_fd(), &reply.to_bytes(), &[]).unwrap();
        assert_eq!(receive_reply(gateway.as_fd()).unwrap(), reply);
        drop(zygote);
        let err = receive_reply(gateway.as_fd()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn fds_are_placed_at_their_numbers_even_when_a_source_sits_on_a_target() {
        let a = sealed_memfd("a", b"a").unwrap();
        let b = sealed_memfd("b", b"bb").unwrap();
        // Targets far above what the test harness opens; a copy of `b` sits on the first
        // target, so placing `a` there must not lose it.
        let (ta, tb) = (900, 901);
        let b_at_ta = place_fds(&[(b.as_fd(), ta)]).unwrap().remove(0);
        let placed = place_fds(&[(a.as_fd(), ta), (b_at_ta.as_fd(), tb)]).unwrap();
        // dup2 replaced the file at 900: `placed[0]` owns that number now.
        std::mem::forget(b_at_ta);
        assert_eq!(placed[0].as_raw_fd(), ta);
        assert_eq!(placed[1].as_raw_fd(), tb);
        let size = |fd: &OwnedFd| fstat(fd).unwrap().st_size;
        assert_eq!((size(&placed[0]), size(&placed[1])), (1, 2));
    }

    #[test]
    fn the_loop_refuses_bad_requests_counts_them_and_keeps_serving() {
        let dir = std::env::temp_dir().join(format!("zygote-loop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("echo.wat"),
            r#"(module
                (import "spindle" "output" (func $out (param i32 i32)))
                (memory (export "memory") 1)
                (func (export "spindle_alloc") (param i32) (result i32) (i32.const 1024))
                (func (export "spindle_handle") (param i32 i32) (result i32)
                  (call $out (local.get 0) (local.get 1)) (i32.const 0)))"#,
        )
        .unwrap();
        let yaml = "functions:\n  - name: echo\n    module: echo.wat\n\
                    chains:\n  - name: c\n    route: /c\n    steps: [echo]\n";
        std::fs::write(dir.join("spindle.yaml"), yaml).unwrap();
        let config = crate::config::Config::load(&dir.join("spindle.yaml")).unwrap();
        let builder = InstanceBuilder::new(&config, "c", "echo").unwrap();
        let mut warm = builder.clone().cold_from_file().unwrap();
        let (gateway, zygote) = socket_pair().unwrap();
        let mut state = Zygote {
            snapshot: warm.host_mut().snapshot().unwrap(),
            compiled: warm.host_mut().compiled_module(),
            builder,
            arena: Some((
                sealed_memfd("arena", b"x").unwrap(),
                sealed_memfd("arena-meta", b"x").unwrap(),
            )),
            socket: Some(zygote),
            reserved: Vec::new(),
            gateway: nix::unistd::getppid(),
            refused: 0,
        };
        let (socket, stats) = (tcp_socket(), sealed_memfd("stats", b"x").unwrap());
        let (control, _gateway_control) = std::os::unix::net::UnixStream::pair().unwrap();
        send_packet(gateway.as_fd(), &request().to_bytes()[..9], &[]).unwrap();
        send_packet(gateway.as_fd(), &request().to_bytes(), &[stats.as_fd()]).unwrap();
        // Well formed: answered (here, in a multithreaded test process, with the refusal to
        // fork), not dropped.
        send_spawn(
            gateway.as_fd(),
            &request(),
            socket.as_fd(),
            stats.as_fd(),
            control.as_fd(),
        )
        .unwrap();
        nix::sys::socket::shutdown(gateway.as_raw_fd(), nix::sys::socket::Shutdown::Write).unwrap();
        state.serve().unwrap();
        assert_eq!(state.refused, 2);
        let replies: Vec<Reply> = (0..3)
            .map(|_| receive_reply(gateway.as_fd()).unwrap())
            .collect();
        assert!(
            matches!(&replies[0], Reply::Refused(r) if r.contains("truncated")),
            "{replies:?}"
        );
        assert!(
            matches!(&replies[1], Reply::Refused(r) if r.contains("got 1")),
            "{replies:?}"
        );
        assert!(
            matches!(&replies[2], Reply::Failed(r) if r.contains("threads")),
            "{replies:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_thread_with_the_stale_zygote_tid_is_found() {
        let own = nix::unistd::gettid().as_raw();
        assert!(matches!(
            check_no_thread_has(own),
            Err(WorkerError::StaleThreadId(t)) if t == own
        ));
        // pid_max is at most 2^22: no thread has this id.
        check_no_thread_has(1 << 23).unwrap();
    }

    #[test]
    fn forking_is_refused_while_another_thread_runs() {
        // The test harness runs this on a thread of its own: the process is multithreaded,
        // exactly the state in which the zygote must not call clone.
        let err = check_single_threaded().unwrap_err();
        assert!(err.contains("threads"), "{err}");
    }
}
