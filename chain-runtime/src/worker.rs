//! The worker process: one instance of one function of one chain.
//!
//! The gateway starts it with five descriptors already open (the hand-off, see
//! [`crate::instance::Handoff`] and `proto::worker`): the chain's arena, this instance's end of
//! a connected loopback TCP socket, the config text and the module bytes as the gateway read
//! them at start (sealed memfds, so a restart runs exactly what the gateway started with even
//! if the files changed), and this instance's statistics page (see [`crate::stats`]). The
//! worker builds its instance once ([`crate::instance::InstanceBuilder`]), announces itself
//! with a ready message, then loops: read a descriptor, check it against the arena, run the guest on the slot, write the
//! output back into the slot, and send the descriptor on (to the next function or back to the
//! gateway). Every descriptor gets exactly one answer, so the gateway never waits on a lost one.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proto::worker::{WATCHDOG_EXIT, ready_message};
use proto::{Descriptor, GATEWAY_FN, Status};
use shm::{Arena, SlotRef};

use crate::host::{Outcome, SlotIo};
use crate::instance::{Handoff, Instance, InstanceBuilder, InstanceError};
use crate::resume::{RemoteImage, ResumedMemory};
use crate::stats::{ErrorKind, StatsError, StatsPage};

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

/// Runs the worker until the gateway closes the socket. Takes over fds 3 to 7.
pub fn run(args: &WorkerArgs) -> Result<(), WorkerError> {
    let handoff = Handoff::inherited(args.from_image)?;
    let (text, module) = handoff.read_inputs()?;
    let builder =
        InstanceBuilder::from_config_text(&text, &args.config, &args.chain, &args.function)?;
    let (instance, resumed) = match handoff.read_image()? {
        None => (builder.cold(&module)?, None),
        Some(descriptor) => {
            let descriptor: proto::ImageDescriptor = descriptor
                .trim_end()
                .parse()
                .map_err(|e| WorkerError::Image(format!("{e}")))?;
            let mut image = RemoteImage::new(descriptor, PARENT_TIMEOUT);
            image.cache = open_cache(&handoff, &image.descriptor);
            // bench/fork.sh: from a warm cache, order prefetch cut table1m's first response
            // from ~3.0 ms (cache hits on demand) to ~1.2 ms; without a cache there is no
            // order log to prefetch from.
            image.prefetch = image.cache.is_some();
            let (instance, memory) = builder.resume_remote(&module, &image)?;
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
    drop(module);
    let Handoff {
        arena,
        socket,
        stats,
        ..
    } = handoff;
    let stats = StatsPage::from_fd(stats)?;
    let arena = Arena::from_fd(arena)?;
    let socket = TcpStream::from(socket);
    socket.set_nodelay(true)?;

    let (chain_id, fn_id) = (instance.chain().id, instance.stage().fn_id);
    let mut worker = Worker {
        instance,
        resumed,
        arena,
        refused: 0,
        stats,
        busy_since: Arc::new(AtomicU64::new(0)),
        epoch: Instant::now(),
    };
    worker.start_watchdog();
    let mut writer = BufWriter::with_capacity(READ_BATCH * Descriptor::SIZE, socket.try_clone()?);
    writer.write_all(&ready_message(chain_id, fn_id, args.instance).to_bytes())?;
    writer.flush()?;
    tracing::info!(chain = %worker.instance.chain().spec.name, function = %worker.function_name(),
        instance = args.instance, "worker ready");
    worker.serve(
        BufReader::with_capacity(READ_BATCH * Descriptor::SIZE, socket),
        writer,
    )
}

struct Worker {
    instance: Instance,
    /// How the memory of an instance resumed from a remote image is being filled.
    resumed: Option<ResumedMemory>,
    arena: Arena,
    refused: u64,
    stats: StatsPage,
    /// Milliseconds since `epoch` when the current call started, 0 when idle.
    busy_since: Arc<AtomicU64>,
    epoch: Instant,
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
            match reader.read_exact(&mut buf) {
                Ok(()) => {}
                // The gateway closed our socket: it is shutting down or replaced us.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            let reply = self.handle(Descriptor::from_bytes(&buf));
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
            }
        }
    }

    /// Turns one received descriptor into the one to send on.
    fn handle(&mut self, mut d: Descriptor) -> Descriptor {
        let slot = match self.check(&d) {
            Ok(slot) => slot,
            Err(reason) => {
                self.refused += 1;
                self.stats.record_refused();
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
        };
        self.busy_since.store(
            (self.epoch.elapsed().as_millis() as u64).max(1),
            Ordering::Release,
        );
        let started = Instant::now();
        let outcome = self.instance.host_mut().invoke(&mut io);
        let elapsed = started.elapsed();
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

    fn check(&self, d: &Descriptor) -> Result<SlotRef, String> {
        if d.next_fn != self.instance.stage().fn_id {
            return Err(format!(
                "addressed to function {}, this is {}",
                d.next_fn,
                self.instance.stage().fn_id
            ));
        }
        if d.chain != self.instance.chain().id {
            return Err(format!(
                "names chain {}, this worker serves chain {}",
                d.chain,
                self.instance.chain().id
            ));
        }
        if d.status != Status::Ok as u8 {
            return Err(format!("carries status {}", d.status));
        }
        self.arena.check(d).map_err(|e| e.to_string())
    }

    /// Writes "function NAME: message" into the slot and sends the descriptor to the gateway.
    fn fail(&self, d: &mut Descriptor, slot: SlotRef, status: Status, message: &str) {
        let text = format!("function {}: {message}", self.function_name());
        let bytes = &text.as_bytes()[..text.len().min(self.arena.slot_size() as usize)];
        let written = self.arena.write(slot, 0, bytes).is_ok();
        d.len = if written { bytes.len() as u32 } else { 0 };
        d.status = status as u8;
        d.next_fn = GATEWAY_FN;
    }
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

/// A slot viewed as the guest's input and output buffer.
struct ArenaSlot<'a> {
    arena: &'a Arena,
    slot: SlotRef,
    input_len: usize,
}

impl SlotIo for ArenaSlot<'_> {
    fn input_len(&self) -> usize {
        self.input_len
    }

    fn read_input(&self, dst: &mut [u8]) {
        // The slot was checked on receipt and only the gateway releases it, after this
        // descriptor comes back; a failure here means the protocol was broken elsewhere.
        if let Err(e) = self.arena.read(self.slot, 0, dst) {
            tracing::error!("reading input from the arena: {e}");
            dst.fill(0);
        }
    }

    fn capacity(&self) -> usize {
        self.arena.slot_size() as usize
    }

    fn write_output(&mut self, src: &[u8]) {
        if let Err(e) = self.arena.write(self.slot, 0, src) {
            tracing::error!("writing output to the arena: {e}");
        }
    }
}
