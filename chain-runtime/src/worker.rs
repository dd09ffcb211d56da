//! The worker process: one instance of one function of one chain.
//!
//! The gateway starts it with seven descriptors already open (the hand-off, see
//! [`crate::instance::Handoff`] and `proto::worker`): the chain's arena (its payload, and its
//! slot metadata, which the worker can only map read-only), this instance's end of
//! a connected loopback TCP socket, the config text and the module bytes as the gateway read
//! them at start (sealed memfds, so a restart runs exactly what the gateway started with even
//! if the files changed), this instance's statistics page (see [`crate::stats`]) and its end
//! of a Unix control socket. The
//! worker builds its instance once ([`crate::instance::InstanceBuilder`]), announces itself
//! with a ready message, then loops: read a descriptor, check it against the arena, run the guest on the slot, write the
//! output back into the slot, and send the descriptor on (to the next function or back to the
//! gateway). Every descriptor gets exactly one answer, so the gateway never waits on a lost one.
//!
//! A control thread answers the gateway's requests on the control socket ([`crate::control`]).
//! A prepare must capture the instance on the serving thread (wasmer's `Store` is not `Send`)
//! and between two invocations: the control thread rings a doorbell (an eventfd) and waits;
//! the serving loop, whenever it has no descriptor left to handle and would block, waits on
//! the data socket and the doorbell together, and on the doorbell captures the image
//! ([`FunctionHost::snapshot`]) and hands it back; after each invocation it also takes any
//! prepare already queued, so under load one waits for a single invocation. The instance keeps serving afterwards; the
//! image is a sealed copy.
//!
//! [`FunctionHost::snapshot`]: crate::host::FunctionHost::snapshot
//!
//! A worker forked from its function's zygote ([`crate::zygote`]) gets the same fds at the
//! same numbers and runs the same serving loop ([`serve_instance`]) on an instance restored
//! from the zygote's image.

use std::cell::Cell;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use proto::worker::{WATCHDOG_EXIT, ready_message};
use proto::{Descriptor, GATEWAY_FN, Status};
use shm::{ArenaError, ArenaView, SlotRef};

use crate::confine::{Role, confine};
use crate::control::{self, Prepared};
use crate::host::{Outcome, SlotIo, SlotMapping};
use crate::instance::{Handoff, Instance, InstanceBuilder, InstanceError, adopt_preopens};
use crate::resume::{RemoteImage, ResumedMemory};
use crate::stats::{ErrorKind, ForkCounters, StatsError, StatsPage};

/// Descriptors read per syscall at most when several are queued.
const READ_BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    Stats(#[from] StatsError),
    #[error("arena: {0}")]
    Arena(#[from] shm::ArenaError),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("image: {0}")]
    Image(String),
    #[error(
        "thread id {0} is also the id glibc still holds for this forked child's main thread \
         (its zygote's, since reused): recursive locks could not tell the two apart"
    )]
    StaleThreadId(libc::pid_t),
    /// A start failure already told to the gateway, which reports it: the process need not
    /// print it too.
    #[error(transparent)]
    Reported(Box<WorkerError>),
}

impl WorkerError {
    /// `self`, marked as told to the gateway when `reported`.
    pub(crate) fn reported(self, reported: bool) -> WorkerError {
        if reported {
            WorkerError::Reported(Box::new(self))
        } else {
            self
        }
    }
}

/// What identifies a worker; the gateway passes it on the command line.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    /// The config's path: names it in messages and anchors relative module paths.
    pub config: std::path::PathBuf,
    pub chain: String,
    pub function: String,
    pub instance: u32,
    /// Resume from the image descriptor the gateway passed (`proto::worker::IMAGE_FD`)
    /// instead of building cold.
    pub from_image: bool,
}

/// How long a resuming worker gives its image's parent to connect and to answer each fetch.
const PARENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The node page cache the gateway passed (`proto::worker::CACHE_FD`), if it is one for this
/// image; a cache that cannot be used is logged and the worker resumes without it.
fn open_cache(
    handoff: &Handoff<std::os::fd::OwnedFd>,
    descriptor: &proto::ImageDescriptor,
) -> Option<Arc<rdma_fork::NodeCache>> {
    let fd = handoff.cache.as_ref()?.try_clone().ok()?;
    match rdma_fork::NodeCache::open(fd, descriptor) {
        Ok(cache) => Some(Arc::new(cache)),
        Err(e) => {
            tracing::warn!("node page cache unusable, resuming without it: {e}");
            None
        }
    }
}

/// Runs the worker until the gateway closes the socket. Takes over fds 3 to 9 and 12 (and 11,
/// a node page cache, when resuming), and the function's preopened directories from 15 on.
/// Until its instance is ready, a failure is also told to the gateway on the control socket
/// ([`control::report_start_failure`]) before the fds close.
pub fn run(args: &WorkerArgs) -> Result<(), WorkerError> {
    let mut handoff = Handoff::inherited(args.from_image)?;
    let (instance, resumed) = match build(args, &mut handoff) {
        Ok(built) => built,
        Err(e) => {
            let reported = control::report_start_failure(handoff.control.as_fd(), &e);
            return Err(e.reported(reported));
        }
    };
    let Handoff {
        arena,
        arena_meta,
        socket,
        stats,
        control,
        ..
    } = handoff;
    serve_instance(
        instance,
        resumed,
        ServingFds {
            stale_tid: None,
            arena,
            arena_meta,
            socket,
            stats,
            control,
        },
        args.instance,
    )
}

/// Everything from the hand-off to a built instance: config, preopens, confinement, then a
/// cold build or a resume.
fn build(
    args: &WorkerArgs,
    handoff: &mut Handoff<OwnedFd>,
) -> Result<(Instance, Option<ResumedMemory>), WorkerError> {
    let (text, module) = handoff.read_inputs()?;
    let builder =
        InstanceBuilder::from_config_text(&text, &args.config, &args.chain, &args.function)?;
    let preopens = adopt_preopens(&builder.stage().function.files, &mut handoff.preopens)?;
    let builder = builder.with_preopens(preopens);
    // A resumed instance's lazy memory needs a userfaultfd that also catches the kernel's
    // faults on it, which only a privileged process may create: made before the privileges
    // go (using it needs none).
    let userfaultfd = match args.from_image {
        true => Some(rdma_fork::create_uffd().map_err(|e| WorkerError::Image(e.to_string()))?),
        false => None,
    };
    // Before the module is compiled or any guest code runs, and while this is the only
    // thread (joining a mount namespace needs that).
    let role = if args.from_image {
        Role::Resumed
    } else {
        Role::Worker
    };
    confine(builder.sandbox(), handoff.namespaces.take(), role)?;
    let built = match handoff.read_image()? {
        None => (builder.cold(&module)?, None),
        Some(descriptor) => {
            let descriptor: proto::ImageDescriptor = descriptor
                .trim_end()
                .parse()
                .map_err(|e| WorkerError::Image(format!("{e}")))?;
            let mut image = RemoteImage::new(descriptor, PARENT_TIMEOUT);
            image.cache = open_cache(handoff, &image.descriptor);
            // bench/fork.sh: from a warm cache, order prefetch cut table1m's first response
            // from ~3.0 ms (cache hits on demand) to ~1.2 ms; without a cache there is no
            // order log to prefetch from.
            image.prefetch = image.cache.is_some();
            let (instance, memory) = builder.resume_remote_into(&module, &image, userfaultfd)?;
            if let Some(failure) = memory.failure() {
                // Pages touched while resuming (spindle_on_fork) never arrived: not ready.
                return Err(WorkerError::Image(format!(
                    "fetching pages from the image's parent failed: {failure}"
                )));
            }
            tracing::info!(function = %args.function, parent = %image.descriptor.parent,
                restored_us = memory.timings.restored_us, "resumed from a remote image");
            (instance, Some(memory))
        }
    };
    Ok(built)
}

/// What an instance serves with, however its process was started.
pub(crate) struct ServingFds {
    /// In a child forked by a zygote: the thread id glibc still caches for the main thread
    /// (the zygote's, see `crate::zygote`), which no other thread of this process may have.
    pub stale_tid: Option<libc::pid_t>,
    /// The chain's arena payload memfd.
    pub arena: OwnedFd,
    /// The chain's arena metadata memfd.
    pub arena_meta: OwnedFd,
    /// The instance's end of its connected socket to the gateway.
    pub socket: OwnedFd,
    /// The instance's statistics page.
    pub stats: OwnedFd,
    /// The instance's end of its control socket pair with the gateway.
    pub control: OwnedFd,
}

/// The serving life of a built instance, shared by exec'd workers and those forked from a
/// zygote: announce readiness, then answer descriptors until the gateway closes the socket.
pub(crate) fn serve_instance(
    instance: Instance,
    resumed: Option<ResumedMemory>,
    fds: ServingFds,
    number: u32,
) -> Result<(), WorkerError> {
    // Until the ready message is out, a failure is told to the gateway on the control socket
    // (the control thread owns the socket itself from when it starts).
    let report = fds.control.try_clone()?;
    let started = start_serving(instance, resumed, fds, number);
    let (mut worker, reader, writer) = match started {
        Ok(ready) => ready,
        Err(e) => {
            let reported = control::report_start_failure(report.as_fd(), &e);
            return Err(e.reported(reported));
        }
    };
    drop(report);
    worker.serve(reader, writer)
}

type Reader = BufReader<TcpStream>;
type Writer = BufWriter<TcpStream>;

/// Everything before the first descriptor: the statistics page and the arena mapped, the
/// instance made ready (`prepare`), the control thread and the watchdog started, the ready
/// message sent.
fn start_serving(
    instance: Instance,
    resumed: Option<ResumedMemory>,
    fds: ServingFds,
    number: u32,
) -> Result<(Worker, Reader, Writer), WorkerError> {
    let stats = StatsPage::from_fd(fds.stats)?;
    let arena = ArenaView::from_fds(fds.arena_meta, fds.arena)?;
    let socket = TcpStream::from(fds.socket);
    socket.set_nodelay(true)?;

    let (chain_id, fn_id) = (instance.chain().id, instance.stage().fn_id);
    let function = instance.stage().function.name.clone();
    let idle_spin = instance.stage().function.idle_spin;
    let mut instance = instance;
    // Ready for the first request before saying so: with `isolation: fresh_per_request`
    // this arms the reset (an exec'd instance captures its image here).
    instance.host_mut().prepare().map_err(InstanceError::from)?;
    let mut worker = Worker {
        instance,
        resumed,
        arena,
        refused: 0,
        stats,
        busy_since: Arc::new(AtomicU64::new(0)),
        epoch: Instant::now(),
        doorbell: start_control(UnixStream::from(fds.control), &function)?,
        fork_published: ForkCounters::default(),
        idle: IdleSpin::new(idle_spin),
    };
    // Pages the resume itself touched (spindle_on_fork, WASI set-up) count too.
    worker.publish_fork_counters();
    worker.start_watchdog();
    if let Some(stale) = fds.stale_tid {
        // The serving loop starts no threads after these two (control, watchdog).
        crate::zygote::check_no_thread_has(stale)?;
    }
    let mut writer = BufWriter::with_capacity(READ_BATCH * Descriptor::SIZE, socket.try_clone()?);
    writer.write_all(&ready_message(chain_id, fn_id, number).to_bytes())?;
    writer.flush()?;
    tracing::info!(chain = %worker.instance.chain().spec.name, function = %worker.function_name(),
        instance = number, "worker ready");
    let reader = BufReader::with_capacity(READ_BATCH * Descriptor::SIZE, socket);
    Ok((worker, reader, writer))
}

/// A prepare the control thread asked for: when it asked, and where the answer goes.
type PrepareRequest = (Instant, Sender<Result<Prepared, String>>);

/// How the control thread reaches the serving loop.
struct Doorbell {
    /// Readable while prepares are waiting.
    ring: Arc<EventFd>,
    requests: Receiver<PrepareRequest>,
}

/// Starts the thread that answers the gateway's control requests on `socket` until the
/// gateway closes it. Each prepare is queued for the serving loop and the doorbell rung.
fn start_control(socket: UnixStream, function: &str) -> Result<Doorbell, WorkerError> {
    // Non-blocking: the serving loop drains it without ever blocking on it.
    let ring = Arc::new(
        EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(std::io::Error::from)?,
    );
    let (tx, requests) = channel::<PrepareRequest>();
    let bell = Arc::clone(&ring);
    let name = function.to_owned();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let mut refused = 0;
            let prepare = || {
                let (answer_tx, answer) = channel();
                tx.send((Instant::now(), answer_tx))
                    .map_err(|_| "the worker is stopping".to_owned())?;
                bell.write(1)
                    .map_err(|e| format!("ringing the serving loop: {e}"))?;
                // The serving loop answers once it is between two invocations.
                answer
                    .recv()
                    .unwrap_or_else(|_| Err("the worker is stopping".to_owned()))
            };
            match control::serve(&socket, prepare, &mut refused) {
                Ok(()) => tracing::debug!(function = %name, "control socket closed"),
                Err(e) => tracing::warn!(function = %name, refused_total = refused,
                    "control channel ended: {e}"),
            }
        })?;
    Ok(Doorbell { ring, requests })
}

/// What woke a serving loop waiting for work.
enum Wake {
    Descriptor,
    Prepare,
}

struct Worker {
    instance: Instance,
    /// How the memory of an instance resumed from a remote image is being filled.
    resumed: Option<ResumedMemory>,
    arena: ArenaView,
    refused: u64,
    stats: StatsPage,
    /// Milliseconds since `epoch` when the current call started, 0 when idle.
    busy_since: Arc<AtomicU64>,
    epoch: Instant,
    doorbell: Doorbell,
    /// The resumed-memory counters as last added to the statistics page.
    fork_published: ForkCounters,
    idle: IdleSpin,
}

/// When a worker that ran out of descriptors polls for the next one instead of sleeping.
///
/// Sleeping in `poll` and being woken costs two context switches and, on a VM, an IPI to a
/// halted vCPU: ~10 µs per descriptor at moderate load, where descriptors arrive a few µs
/// apart. Spinning avoids that only when the next descriptor is close, and burns a core when
/// it is not. So the worker keeps a moving average of how long its idle periods last
/// (buffer empty → next descriptor or prepare, sleeping included) and spins only while that
/// average is under the function's `idle_spin_us`, for at most twice the average: at
/// saturation and under bursts it spins briefly and rarely sleeps; at low load (average gap
/// above the limit) and when idle it never spins, so a quiet instance costs nothing.
struct IdleSpin {
    limit: Duration,
    /// Moving average (weight 1/8) of idle periods, in nanoseconds.
    average_ns: u64,
}

/// One idle period of the serving loop.
struct IdlePeriod {
    since: Instant,
}

impl IdleSpin {
    fn new(limit: Duration) -> Self {
        IdleSpin {
            limit,
            // Starts as "long": spinning begins only once short gaps were seen.
            average_ns: (limit.as_nanos() as u64).saturating_mul(4),
        }
    }

    fn started(&self) -> IdlePeriod {
        IdlePeriod {
            since: Instant::now(),
        }
    }

    fn ended(&mut self, period: IdlePeriod) {
        if !self.limit.is_zero() {
            self.record(period.since.elapsed());
        }
    }

    fn record(&mut self, idle: Duration) {
        let ns = idle.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.average_ns = self.average_ns - self.average_ns / 8 + ns / 8;
    }

    /// How long this idle period may spin, if at all.
    fn budget(&self) -> Option<Duration> {
        let average = Duration::from_nanos(self.average_ns);
        (!self.limit.is_zero() && average < self.limit).then(|| (average * 2).min(self.limit))
    }
}

impl Worker {
    fn function_name(&self) -> &str {
        &self.instance.stage().function.name
    }

    /// A guest can block in a host call (poll_oneoff) or burn time without fuel configured:
    /// past its timeout nothing inside the process can stop it safely, so the process exits
    /// and the gateway fails its request with 504 and starts a fresh instance.
    fn start_watchdog(&self) {
        let timeout = self.instance.stage().function.timeout;
        let busy = Arc::clone(&self.busy_since);
        let epoch = self.epoch;
        let name = self.function_name().to_owned();
        let tick = (timeout / 4).clamp(Duration::from_millis(5), Duration::from_millis(100));
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(tick);
                    let started = busy.load(Ordering::Acquire);
                    if started == 0 {
                        continue;
                    }
                    let now = epoch.elapsed().as_millis() as u64;
                    if now.saturating_sub(started) > timeout.as_millis() as u64 {
                        tracing::error!(function = %name, timeout_ms = timeout.as_millis() as u64,
                            "call exceeded its timeout; exiting so the gateway restarts this instance");
                        // SAFETY: _exit ends the process without running destructors that could
                        // race with the stuck guest thread. Raw libc because nix has no _exit.
                        unsafe { libc::_exit(WATCHDOG_EXIT) };
                    }
                }
            })
            .expect("spawning the watchdog thread");
    }

    fn serve(
        &mut self,
        mut reader: BufReader<TcpStream>,
        mut writer: BufWriter<TcpStream>,
    ) -> Result<(), WorkerError> {
        let mut buf = [0u8; Descriptor::SIZE];
        loop {
            // Nothing buffered: this is where the loop would block, so a prepare runs here.
            if reader.buffer().is_empty() {
                let idle = self.idle.started();
                if !matches!(self.spin(reader.get_ref(), &idle), Some(Wake::Descriptor)) {
                    while let Wake::Prepare = self.wait(reader.get_ref())? {
                        // Reset before draining: a request queued after the drain rings
                        // again.
                        let _ = self.doorbell.ring.read();
                        self.answer_prepares()?;
                    }
                }
                self.idle.ended(idle);
            }
            match reader.read_exact(&mut buf) {
                Ok(()) => {}
                // The gateway closed our socket: it is shutting down or replaced us.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            let reply = self.handle(Descriptor::from_bytes(&buf));
            self.publish_fork_counters();
            self.publish_resets();
            // Under load the loop may not come to block for a while: a prepare queued meanwhile
            // is answered between these two invocations, not after the whole read batch.
            // (Its doorbell stays rung: the next wait wakes once and finds nothing.)
            self.answer_prepares()?;
            if let Some(failure) = self.resumed.as_ref().and_then(ResumedMemory::failure) {
                // Pages that never arrived read as zeros: nothing computed from them may
                // leave. Exiting lets the gateway fail what this instance held (502).
                return Err(WorkerError::Image(format!(
                    "fetching pages from the image's parent failed: {failure}"
                )));
            }
            // A 32-byte reply always fits the buffer, so a failed call consumed none of it
            // and retrying cannot duplicate bytes.
            retry_redirect(|| writer.write_all(&reply.to_bytes()))?;
            // Replies to a burst that arrived together leave in one write; nothing waits
            // behind a descriptor when no more are queued.
            if reader.buffer().is_empty() {
                retry_redirect(|| writer.flush())?;
                if let Err(e) = self.instance.host_mut().prepare() {
                    tracing::error!(function = %self.function_name(), "rebuilding the instance: {e}");
                }
                self.publish_resets();
            }
        }
    }

    /// Polls `socket` and the doorbell without sleeping for as long as [`IdleSpin`] allows
    /// this idle period; None when nothing came (or spinning is off), and the caller sleeps.
    fn spin(&self, socket: &TcpStream, idle: &IdlePeriod) -> Option<Wake> {
        let budget = self.idle.budget()?;
        loop {
            let mut fds = [
                PollFd::new(self.doorbell.ring.as_fd(), PollFlags::POLLIN),
                PollFd::new(socket.as_fd(), PollFlags::POLLIN),
            ];
            if poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0) {
                let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
                return Some(if ready(&fds[0]) {
                    Wake::Prepare
                } else {
                    Wake::Descriptor
                });
            }
            if idle.since.elapsed() >= budget {
                return None;
            }
            std::hint::spin_loop();
        }
    }

    /// Blocks until a descriptor can be read from `socket` or a prepare is waiting.
    fn wait(&self, socket: &TcpStream) -> std::io::Result<Wake> {
        loop {
            let mut fds = [
                PollFd::new(self.doorbell.ring.as_fd(), PollFlags::POLLIN),
                PollFd::new(socket.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
            if ready(&fds[0]) {
                return Ok(Wake::Prepare);
            }
            // Readable, or closed or failed: the read that follows reports which.
            if ready(&fds[1]) {
                return Ok(Wake::Descriptor);
            }
        }
    }

    /// Captures an image for every prepare waiting: no invocation is in progress here.
    /// Answers the prepares queued now (none: one atomic load). Fails, after telling the
    /// gateway, when capturing made a resumed memory fetch pages that never arrived: such an
    /// image holds zeros where the parent's data should be, and so does this instance.
    fn answer_prepares(&mut self) -> Result<(), WorkerError> {
        while let Ok((asked, answer)) = self.doorbell.requests.try_recv() {
            let waited = asked.elapsed();
            let started = Instant::now();
            let snapshot = self.instance.host_mut().snapshot();
            let captured = started.elapsed();
            // Capturing reads every page: for a resumed instance that fetches what it had not
            // touched yet, and a fetch may fail.
            if let Some(failure) = self.resumed.as_ref().and_then(ResumedMemory::failure) {
                let why = format!("fetching pages from the image's parent failed: {failure}");
                let _ = answer.send(Err(why.clone()));
                return Err(WorkerError::Image(why));
            }
            let prepared = snapshot
                .map_err(|e| {
                    tracing::warn!(function = %self.function_name(), "prepare refused: {e}");
                    e.to_string()
                })
                .and_then(|snapshot| {
                    let memfd = snapshot
                        .image()
                        .try_clone_to_owned()
                        .map_err(|e| format!("duplicating the image memfd: {e}"))?;
                    let meta = snapshot.meta();
                    tracing::info!(function = %self.function_name(),
                        pages_with_data = meta.memory.nonzero.count(),
                        waited_us = waited.as_micros() as u64,
                        capture_us = captured.as_micros() as u64, "image prepared");
                    Ok(Prepared {
                        memfd,
                        waited_us: waited.as_micros() as u64,
                        capture_us: captured.as_micros() as u64,
                        meta: meta.to_image_meta().encode(),
                    })
                });
            // The control thread gone means the gateway closed the channel: nobody to tell.
            let _ = answer.send(prepared);
        }
        Ok(())
    }

    /// Adds what this incarnation's resumed memory counted since the last call to the
    /// statistics page, so /metrics shows faults, fetched pages and cache hits as they
    /// happen. Nothing for an instance that did not resume from an image.
    fn publish_fork_counters(&mut self) {
        let Some(memory) = &self.resumed else {
            return;
        };
        let s = memory.stats();
        let now = ForkCounters {
            resumes: 1,
            faults: s.faults,
            pages_copied: s.pages_copied,
            zero_pages: s.zero_pages,
            prefetched: s.prefetched + s.order_prefetched,
            bytes_fetched: s.wire_bytes_received + s.prefetch_wire_bytes_received,
            cache_hits: s.cache_hits,
            cache_misses: s.cache_misses,
            // This process's own count: each incarnation is a new process.
            caches_refused: rdma_fork::lifecycle::caches_refused(),
        };
        self.stats.add_fork(now.since(self.fork_published));
        self.fork_published = now;
        let l = rdma_fork::lifecycle::snapshot();
        self.stats.set_live(
            [
                l.memfds,
                l.uffd_registrations,
                l.server_connections,
                l.client_connections,
            ]
            .map(|v| v.max(0) as u64),
        );
    }

    /// Adds the resets of a `fresh_per_request` instance done since the last call to the
    /// statistics page (nothing for an instance that reuses).
    fn publish_resets(&mut self) {
        let Worker {
            instance, stats, ..
        } = self;
        for report in instance.host_mut().take_resets() {
            stats.record_reset(&report);
        }
    }

    /// Turns one received descriptor into the one to send on.
    fn handle(&mut self, mut d: Descriptor) -> Descriptor {
        let slot = match self.check(&d) {
            Ok(slot) => slot,
            Err(Refusal { reason, replayed }) => {
                self.refused += 1;
                if replayed {
                    self.stats.record_request_mismatch();
                } else {
                    self.stats.record_refused();
                }
                tracing::warn!(function = %self.function_name(), request = d.request_id,
                    refused_total = self.refused, "refused descriptor: {reason}");
                d.status = Status::Refused as u8;
                d.next_fn = GATEWAY_FN;
                return d;
            }
        };
        let mut io = ArenaSlot {
            arena: &self.arena,
            slot,
            input_len: d.len as usize,
            copied: Cell::new([0; 4]),
        };
        self.busy_since.store(
            (self.epoch.elapsed().as_millis() as u64).max(1),
            Ordering::Release,
        );
        let started = Instant::now();
        let outcome = self.instance.host_mut().invoke(&mut io);
        let elapsed = started.elapsed();
        let [copied_in, copied_out, in_place_in, in_place_out] = io.copied.get();
        self.stats.add_copied(copied_in, copied_out);
        self.stats.add_in_place(in_place_in, in_place_out);
        self.busy_since.store(0, Ordering::Release);
        let error = match &outcome {
            Outcome::Done { .. } => None,
            Outcome::Failed { status, .. } => Some(match status {
                Status::Trap => ErrorKind::Trap,
                Status::Timeout => ErrorKind::Timeout,
                Status::BadRoute => ErrorKind::BadRoute,
                Status::Refused => ErrorKind::Refused,
                _ => ErrorKind::GuestError,
            }),
        };
        self.stats.record(elapsed, error);
        d.hop = d.hop.saturating_add(1);
        match outcome {
            Outcome::Done { output_len, next } => {
                d.len = output_len as u32;
                let next = if self.instance.chain().is_dynamic() {
                    next.unwrap_or(GATEWAY_FN)
                } else {
                    self.instance
                        .chain()
                        .static_next(self.instance.stage().fn_id)
                        .unwrap_or(GATEWAY_FN)
                };
                if next != GATEWAY_FN && d.hop >= self.instance.chain().max_hops() {
                    let message = format!(
                        "request passed through {} functions, the chain's max_hops",
                        d.hop
                    );
                    self.fail(&mut d, slot, Status::BadRoute, &message);
                } else {
                    d.next_fn = next;
                }
            }
            Outcome::Failed { status, message } => self.fail(&mut d, slot, status, &message),
        }
        d
    }

    fn check(&self, d: &Descriptor) -> Result<SlotRef, Refusal> {
        check_descriptor(
            &self.arena,
            self.instance.stage().fn_id,
            self.instance.chain().id,
            d,
        )
    }

    /// Writes "function NAME: message" into the slot and sends the descriptor to the gateway.
    fn fail(&self, d: &mut Descriptor, slot: SlotRef, status: Status, message: &str) {
        let text = format!("function {}: {message}", self.function_name());
        let bytes = &text.as_bytes()[..text.len().min(self.arena.capacity(slot.index) as usize)];
        let written = self.arena.write(slot, 0, bytes).is_ok();
        d.len = if written { bytes.len() as u32 } else { 0 };
        d.status = status as u8;
        d.next_fn = GATEWAY_FN;
    }
}

/// Whether a worker serving function `fn_id` of chain `chain` accepts descriptor `d`: it must
/// be addressed to that function of that chain, carry status Ok, and name a slot the arena
/// holds at its generation for its request id (`shm::ArenaView::check`). Public for the fuzz
/// target that checks it against a model (fuzz/src/descriptor_worker.rs).
pub fn check_descriptor(
    arena: &ArenaView,
    fn_id: u32,
    chain: u16,
    d: &Descriptor,
) -> Result<SlotRef, Refusal> {
    let refused = |reason| Refusal {
        reason,
        replayed: false,
    };
    if d.next_fn != fn_id {
        return Err(refused(format!(
            "addressed to function {}, this is {fn_id}",
            d.next_fn
        )));
    }
    if d.chain != chain {
        return Err(refused(format!(
            "names chain {}, this worker serves chain {chain}",
            d.chain
        )));
    }
    if d.status != Status::Ok as u8 {
        return Err(refused(format!("carries status {}", d.status)));
    }
    arena.check(d).map_err(|e| Refusal {
        replayed: matches!(e, ArenaError::RequestMismatch { .. }),
        reason: e.to_string(),
    })
}

/// Runs a socket write, retrying the errors a kernel redirect can hit after its verdict: the
/// target's socket went away (EPIPE) or had no memory (ENOMEM). The kernel counted those
/// bytes as unwritten, so the retry gets a fresh verdict — a destination that is gone now
/// sends the descriptor back to the gateway marked undeliverable. Our own connection being
/// gone looks the same, so retries are bounded.
fn retry_redirect(mut write: impl FnMut() -> std::io::Result<()>) -> std::io::Result<()> {
    const ATTEMPTS: u32 = 200;
    let mut attempt = 0;
    loop {
        match write() {
            Err(e)
                if attempt < ATTEMPTS
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EPIPE | libc::ENOMEM | libc::EAGAIN)
                    ) =>
            {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            other => return other,
        }
    }
}

/// Why a descriptor was refused, and whether it named a live slot under another request's id
/// (a replay, counted apart from other refusals).
#[derive(Debug)]
pub struct Refusal {
    pub reason: String,
    pub replayed: bool,
}

/// A slot viewed as the guest's input and output buffer.
struct ArenaSlot<'a> {
    arena: &'a ArenaView,
    slot: SlotRef,
    input_len: usize,
    /// Payload bytes copied [slot → guest, guest → slot], then read and written in place,
    /// for the statistics page.
    copied: Cell<[u64; 4]>,
}

impl ArenaSlot<'_> {
    fn count(&self, direction: usize, bytes: usize) {
        let mut c = self.copied.get();
        c[direction] += bytes as u64;
        self.copied.set(c);
    }
}

impl SlotIo for ArenaSlot<'_> {
    fn input_len(&self) -> usize {
        self.input_len
    }

    fn read_input(&self, dst: &mut [u8]) {
        // The slot was checked on receipt and only the gateway releases it, after this
        // descriptor comes back; a failure here means the protocol was broken elsewhere.
        match self.arena.read(self.slot, 0, dst) {
            Ok(()) => self.count(0, dst.len()),
            Err(e) => {
                tracing::error!("reading input from the arena: {e}");
                dst.fill(0);
            }
        }
    }

    fn capacity(&self) -> usize {
        // The slot's class decides: a large slot holds a large answer.
        self.arena.capacity(self.slot.index) as usize
    }

    fn write_output(&mut self, src: &[u8]) {
        match self.arena.write(self.slot, 0, src) {
            Ok(()) => self.count(1, src.len()),
            Err(e) => tracing::error!("writing output to the arena: {e}"),
        }
    }

    fn mapping(&self) -> Option<SlotMapping> {
        let (offset, capacity) = self.arena.mappable_range(self.slot).ok()??;
        Some(SlotMapping {
            fd: self.arena.payload_fd().as_raw_fd(),
            offset,
            capacity: capacity as usize,
        })
    }

    fn served_in_place(&mut self, input: usize, output: usize) {
        self.count(2, input);
        self.count(3, output);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_spin_starts_off_follows_the_gaps_and_never_passes_its_limit() {
        let limit = Duration::from_micros(50);
        let mut spin = IdleSpin::new(limit);
        assert_eq!(
            spin.budget(),
            None,
            "no spinning before short gaps were seen"
        );
        for _ in 0..64 {
            spin.record(Duration::from_micros(5));
        }
        let budget = spin.budget().expect("short gaps: spin");
        assert!(budget >= Duration::from_micros(9) && budget <= Duration::from_micros(11));
        for _ in 0..64 {
            spin.record(Duration::from_micros(40));
        }
        assert_eq!(
            spin.budget(),
            Some(limit),
            "twice the average, capped at the limit"
        );
        for _ in 0..64 {
            spin.record(Duration::from_millis(1));
        }
        assert_eq!(
            spin.budget(),
            None,
            "gaps longer than the limit: sleep at once"
        );
        // Off means off, whatever the gaps.
        let mut off = IdleSpin::new(Duration::ZERO);
        off.record(Duration::from_nanos(1));
        assert_eq!(off.budget(), None);
    }
}
