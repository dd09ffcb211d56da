//! Lazily populated memory: a userfaultfd over a child's linear memory and the handler that
//! fills each missing page from a [`PageSource`] on first touch.
//!
//! # Shape
//!
//! [`serve_faults`] runs the handler on a thread over a userfaultfd that may belong to
//! another process (Firecracker's model: the sandboxed child registers its memory and hands
//! the uffd to the node service, see [`crate::handoff`]). [`LazyRegion`] is the in-process
//! form: it registers a region of this process and serves it the same way.
//!
//! Per fault the handler installs the faulting page and up to `readahead` following pages
//! that are still missing: runs of data pages are fetched with one [`PageSource::fetch`] and
//! installed with one `UFFDIO_COPY` (which wakes the faulting thread), runs of known-zero
//! pages with one `UFFDIO_ZEROPAGE`, so zero pages are never fetched. A bitmap of installed
//! pages keeps anything from being fetched or copied twice; an `EEXIST` from a copy that
//! raced another installer is counted, not fatal. Eager mode installs the whole region up
//! front (the baseline to compare lazy forks against). Fault-order prefetch
//! ([`ServeOptions::prefetch`]) installs a given list of pages from a thread and a source of
//! its own, racing demand faults through the same bitmap; [`ServeOptions::fault_log`] hears
//! of each demand fault, to build such a list for later children.
//!
//! The uffd is created with `UFFD_FEATURE_EVENT_REMOVE`, so when the child discards pages
//! (`MADV_DONTNEED`) the handler clears their bits and serves them again on the next touch,
//! as a private mapping of the image would.
//!
//! # Fault-error policy
//!
//! A faulting thread waits in the kernel until the handler installs its page; there is no
//! way to fail one fault short of SIGBUS mode, which wasmer's trap handler would take for a
//! guest trap. So when the source fails for a page a thread is waiting on, the handler:
//!
//! 1. marks the region **failed** (the first error's message is kept, [`Stats::failure`]),
//! 2. SIGKILLs the peer when it serves another process and was given its pidfd
//!    ([`ServeOptions::peer`]): the child never runs on made-up memory,
//! 3. answers the fault with a zero page, so no thread waits forever,
//! 4. from then on answers every missing page with a zero page without fetching (a failed
//!    instance must finish or die fast, not wait on a dead source).
//!
//! In-process ([`LazyRegion`]) only 1, 3 and 4 apply: the caller must check
//! [`LazyRegion::failed`] before any result of the instance leaves the process, and discard
//! the instance. A failed *prefetch* (no thread waits on those pages) only counts a fetch
//! error; the pages stay missing and are fetched again on demand. In eager mode every page
//! must go in, so a failed fetch there fails the region like a demand fault. An unexpected
//! ioctl error on a demand page is handled like a fetch error.
//!
//! # Teardown
//!
//! The kernel does not tell a uffd's reader that the faulting process died: `poll` never
//! reports `POLLHUP` and `read` keeps returning `EAGAIN` (measured on 6.18), only the ioctls
//! start failing with `ESRCH`. So an out-of-process handler watches the child's pidfd
//! ([`PidFd`]) and ends when it becomes readable; it also ends on `ESRCH`, on the uffd's EOF
//! or error, and on [`FaultServer::stop`]. Dropping the last uffd descriptor unregisters the
//! region: threads still waiting are woken and later touches get ordinary zero-filled pages.

use std::ffi::c_void;
use std::fmt;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags, madvise, mmap_anonymous, munmap};
use tracing::{debug, error, info, trace, warn};
use userfaultfd::{Event, EventBuffer, FeatureFlags, IoctlFlags, Uffd, UffdBuilder};

use crate::lifecycle::{Live, Resource};
use crate::{PAGE_SIZE, PageSource, measure};

/// Upper bound on [`ServeOptions::readahead`]: 4 MiB per fault is far past any useful value.
pub const MAX_READAHEAD: u32 = 1024;

/// Largest run installed with one call in eager mode (256 KiB).
const EAGER_CHUNK: u64 = 64;

/// `UFFDIO_COPY` reports `EAGAIN` while the child changes its mappings; retry this often.
const MAX_RETRIES: u32 = 100;

/// Why a region could not be set up or served.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("region {base:#x}+{len:#x} is not page aligned, or empty")]
    Misaligned { base: usize, len: usize },
    #[error("region is {region} bytes, the image {image}")]
    LengthMismatch { region: usize, image: u64 },
    #[error("source pages are {source_page} bytes, system pages {system}")]
    PageSize { source_page: usize, system: usize },
    #[error("{pages} pages of the region are already populated; discard them first")]
    AlreadyPopulated { pages: usize },
    #[error("invalid options: {0}")]
    InvalidOptions(&'static str),
    #[error("{op}: {source}")]
    Uffd {
        op: &'static str,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("{op}: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: Errno,
    },
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the uffd does not offer {missing:?} for this region")]
    MissingIoctls { missing: IoctlFlags },
    #[error("the faulting process is gone")]
    PeerGone,
    #[error("the fault handler thread panicked")]
    HandlerPanicked,
}

fn sys(op: &'static str) -> impl FnOnce(Errno) -> LazyError {
    move |source| LazyError::Sys { op, source }
}

fn uffd_err(op: &'static str) -> impl FnOnce(userfaultfd::Error) -> LazyError {
    move |source| LazyError::Uffd { op, source }
}

/// How a region is served.
#[derive(Debug, Default)]
pub struct ServeOptions {
    /// Pages after a faulting page installed with it when still missing; 0 = off.
    pub readahead: u32,
    /// Install the whole region before serving faults.
    pub eager: bool,
    /// The process owning the region, when it is not this one: the handler ends when it
    /// exits and SIGKILLs it on a fetch error (see the module docs).
    pub peer: Option<PidFd>,
    /// Told each page a demand fault asks for, in fault order (e.g. a node page cache's
    /// order log, from which later children prefetch).
    pub fault_log: Option<Arc<dyn FaultLog>>,
    /// Pages to install ahead of faults, on a thread and a source of their own.
    pub prefetch: Option<Prefetch>,
}

/// Where the handler reports demand faults (see [`ServeOptions::fault_log`]).
pub trait FaultLog: Send + Sync + fmt::Debug {
    /// `page` faulted (it was missing and is about to be installed).
    fn record(&self, page: u64);
}

/// Fault-order prefetch: a thread installs `order`'s pages with `UFFDIO_COPY` (runs of
/// consecutive pages with one fetch and one copy) while demand faults keep the handler's
/// own source. A page a demand fault installed first is skipped, or its copy finds it
/// present (`EEXIST`, counted in [`StatsSnapshot::copy_races`]). A failed prefetch counts a
/// fetch error and ends the prefetch; it never fails the region (nobody waits on those
/// pages).
pub struct Prefetch {
    /// Pages in the order to install them; out-of-range entries are ignored.
    pub order: Vec<u64>,
    /// Opens the prefetch thread's source on that thread (a second page-server connection,
    /// so demand faults never queue behind a prefetch), off the resume's critical path.
    pub source: Box<dyn FnOnce() -> Result<Arc<dyn PageSource>, String> + Send>,
}

impl fmt::Debug for Prefetch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prefetch")
            .field("pages", &self.order.len())
            .finish_non_exhaustive()
    }
}

/// Most pages one prefetch fetch carries (64 KiB: one round trip's worth on this path).
const PREFETCH_RUN: u64 = 16;

/// Counters of one served region, updated by the handler and readable at any time.
///
/// Pages are counted just before the ioctl that installs them and wakes the faulting thread
/// (and taken back if the install falls short), so a thread resuming from a fault sees its
/// page, and everything installed before it, counted. The rest of a readahead window may
/// still be in flight then; [`FaultServer::join`] gives the final numbers.
#[derive(Debug, Default)]
pub struct Stats {
    faults: AtomicU64,
    stale_faults: AtomicU64,
    pages_copied: AtomicU64,
    zero_pages: AtomicU64,
    prefetched: AtomicU64,
    bytes_fetched: AtomicU64,
    fetch_errors: AtomicU64,
    failed_pages: AtomicU64,
    copy_races: AtomicU64,
    removed_pages: AtomicU64,
    order_prefetched: AtomicU64,
    failed: AtomicBool,
    failure: OnceLock<String>,
}

/// A copy of [`Stats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Fault events on a page that was missing (each installed it).
    pub faults: u64,
    /// Fault events on a page already installed by then (a racing thread's, woken already).
    pub stale_faults: u64,
    /// Pages installed with `UFFDIO_COPY`.
    pub pages_copied: u64,
    /// Known-zero pages installed with `UFFDIO_ZEROPAGE`.
    pub zero_pages: u64,
    /// Pages installed by readahead (data or zero) rather than by their own fault.
    pub prefetched: u64,
    /// Bytes read from the source.
    pub bytes_fetched: u64,
    /// Failed [`PageSource::fetch`] calls (demand, readahead or eager).
    pub fetch_errors: u64,
    /// Pages answered with zeros because the region had failed.
    pub failed_pages: u64,
    /// Copies that found their page already present (`EEXIST`).
    pub copy_races: u64,
    /// Installed pages the child discarded (`MADV_DONTNEED`), to be served again.
    pub removed_pages: u64,
    /// Pages installed by fault-order prefetch ([`ServeOptions::prefetch`]), data or zero.
    pub order_prefetched: u64,
    /// The region failed (see the module docs); its content is not to be trusted.
    pub failed: bool,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            faults: self.faults.load(Relaxed),
            stale_faults: self.stale_faults.load(Relaxed),
            pages_copied: self.pages_copied.load(Relaxed),
            zero_pages: self.zero_pages.load(Relaxed),
            prefetched: self.prefetched.load(Relaxed),
            bytes_fetched: self.bytes_fetched.load(Relaxed),
            fetch_errors: self.fetch_errors.load(Relaxed),
            failed_pages: self.failed_pages.load(Relaxed),
            copy_races: self.copy_races.load(Relaxed),
            removed_pages: self.removed_pages.load(Relaxed),
            order_prefetched: self.order_prefetched.load(Relaxed),
            failed: self.failed(),
        }
    }

    /// True once the region has failed.
    pub fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The error that failed the region.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Relaxed);
}

fn sub(counter: &AtomicU64, n: u64) {
    if n != 0 {
        counter.fetch_sub(n, Relaxed);
    }
}

/// A pidfd: a handle on a process that cannot be confused with a later process reusing its
/// pid. Readable once the process has exited.
#[derive(Debug)]
pub struct PidFd(OwnedFd);

impl PidFd {
    /// Opens a pidfd for `pid` (which must be a live process or an unreaped child).
    pub fn open(pid: u32) -> io::Result<Self> {
        let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from(Errno::ESRCH))?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; nix
        // has no wrapper for it.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor to us; nobody else owns it.
        Ok(PidFd(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// Sends SIGKILL to the process.
    pub fn kill(&self) -> io::Result<()> {
        // SAFETY: pidfd_send_signal reads only its arguments (a null siginfo is allowed).
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsFd for PidFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Creates a userfaultfd the way this crate needs it: close-on-exec, non-blocking (the
/// handler polls it), kernel-mode faults included (not user-mode-only), no SIGBUS mode,
/// and `UFFD_FEATURE_EVENT_REMOVE`.
pub fn create_uffd() -> Result<Uffd, LazyError> {
    UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .require_features(FeatureFlags::EVENT_REMOVE)
        .require_ioctls(IoctlFlags::REGISTER | IoctlFlags::UNREGISTER)
        .create()
        .map_err(uffd_err(
            "creating a userfaultfd (faults from the kernel need CAP_SYS_PTRACE, or \
             vm.unprivileged_userfaultfd=1, or read-write access to /dev/userfaultfd)",
        ))
}

/// Registers `[base, base + len)` with `uffd` for missing-page faults.
///
/// # Safety
///
/// The range must be anonymous private memory of this process that nothing but its intended
/// user (a Wasm linear memory) touches, and whose missing pages may be filled by whoever
/// serves `uffd`: registering memory Rust objects live in would let the handler overwrite
/// them, and a thread touching it blocks until the fault is served.
pub unsafe fn register_region(uffd: &Uffd, base: NonNull<u8>, len: usize) -> Result<(), LazyError> {
    check_range(base.as_ptr() as usize, len)?;
    let ioctls = uffd
        .register(base.as_ptr().cast(), len)
        .map_err(uffd_err("registering the region"))?;
    let need = IoctlFlags::COPY | IoctlFlags::ZEROPAGE | IoctlFlags::WAKE;
    if !ioctls.contains(need) {
        let _ = uffd.unregister(base.as_ptr().cast(), len);
        return Err(LazyError::MissingIoctls {
            missing: need.difference(ioctls),
        });
    }
    Ok(())
}

/// Drops the pages of `[base, base + len)` (`MADV_DONTNEED`): the next touch of a private
/// anonymous mapping sees zeros, or faults into a registered uffd.
///
/// # Safety
///
/// The range must be mapped and hold nothing anyone still needs.
pub unsafe fn discard(base: NonNull<u8>, len: usize) -> Result<(), LazyError> {
    // SAFETY: the caller guarantees the range is mapped and its content disposable.
    unsafe { madvise(base.cast(), len, MmapAdvise::MADV_DONTNEED) }
        .map_err(sys("madvise(MADV_DONTNEED)"))
}

fn check_range(base: usize, len: usize) -> Result<(), LazyError> {
    if len == 0
        || !base.is_multiple_of(PAGE_SIZE)
        || !len.is_multiple_of(PAGE_SIZE)
        || base.checked_add(len).is_none()
    {
        return Err(LazyError::Misaligned { base, len });
    }
    Ok(())
}

/// A private anonymous mapping, untouched: what a fresh linear memory looks like. For tests
/// and benchmarks; unmapped on drop. Transparent huge pages are off for it, so a fault is
/// always one base page.
#[derive(Debug)]
pub struct AnonRegion {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain memory owned by this value, like a Box<[u8]>; it hands out
// only raw pointers, whose users synchronise themselves.
unsafe impl Send for AnonRegion {}
// SAFETY: as above; &AnonRegion gives nothing but the address and length.
unsafe impl Sync for AnonRegion {}

impl AnonRegion {
    /// Maps `len` bytes (rounded up to a page).
    pub fn new(len: usize) -> Result<Self, LazyError> {
        let len = len.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let size = NonZeroUsize::new(len).ok_or(LazyError::Misaligned { base: 0, len })?;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing cannot
        // overlap anything.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
            )
        }
        .map_err(sys("mmap"))?;
        // SAFETY: the range is the mapping just made; the advice does not touch contents.
        if let Err(e) = unsafe { madvise(ptr, len, MmapAdvise::MADV_NOHUGEPAGE) } {
            debug!("MADV_NOHUGEPAGE: {e}");
        }
        Ok(AnonRegion {
            ptr: ptr.cast(),
            len,
        })
    }

    pub fn base(&self) -> NonNull<u8> {
        self.ptr
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AnonRegion {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and nothing borrows it past this value.
        if let Err(e) = unsafe { munmap(self.ptr.cast(), self.len) } {
            warn!("munmap of an AnonRegion: {e}");
        }
    }
}

/// One bit per page, set once the page is installed.
struct AtomicBitmap(Vec<AtomicU64>);

impl AtomicBitmap {
    fn new(pages: u64) -> Self {
        AtomicBitmap((0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }
    fn get(&self, page: u64) -> bool {
        self.0[(page / 64) as usize].load(std::sync::atomic::Ordering::Acquire) & (1 << (page % 64))
            != 0
    }
    fn set(&self, page: u64) {
        self.0[(page / 64) as usize]
            .fetch_or(1 << (page % 64), std::sync::atomic::Ordering::AcqRel);
    }
    /// Clears the bit; true when it was set.
    fn clear(&self, page: u64) -> bool {
        let bit = 1 << (page % 64);
        self.0[(page / 64) as usize].fetch_and(!bit, std::sync::atomic::Ordering::AcqRel) & bit != 0
    }
}

/// The handler could not go on: the faulting process's memory is gone.
struct Gone;

/// The errno inside a userfaultfd error (the crate uses an older nix's `Errno`), 0 if none.
fn errno(e: &userfaultfd::Error) -> i32 {
    match e {
        userfaultfd::Error::CopyFailed(n) | userfaultfd::Error::ZeropageFailed(n) => *n as i32,
        userfaultfd::Error::SystemError(n) => *n as i32,
        _ => 0,
    }
}

enum InstallError {
    Gone,
    Failed(String),
}

/// What the handler thread shares with its [`FaultServer`].
struct Core {
    uffd: Uffd,
    base: usize,
    pages: u64,
    source: Arc<dyn PageSource>,
    installed: AtomicBitmap,
    stats: Stats,
    readahead: u32,
    peer: Option<PidFd>,
    killed: AtomicBool,
    fault_log: Option<Arc<dyn FaultLog>>,
    /// Set by [`FaultServer::stop`]: the prefetch thread ends at its next run.
    stopping: AtomicBool,
    _live: Live,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Zero,
    Data,
}

impl Core {
    fn addr(&self, page: u64) -> *mut c_void {
        (self.base + page as usize * PAGE_SIZE) as *mut c_void
    }

    fn kind(&self, page: u64) -> Kind {
        if self.source.is_zero(page) {
            Kind::Zero
        } else {
            Kind::Data
        }
    }

    /// Marks the region failed and, when serving another process, kills it.
    fn fail(&self, why: String) {
        if self.stats.failure.set(why.clone()).is_ok() {
            error!(base = self.base, "lazy region failed: {why}");
        }
        self.stats
            .failed
            .store(true, std::sync::atomic::Ordering::Release);
        if let Some(peer) = &self.peer
            && !self.killed.swap(true, Relaxed)
        {
            match peer.kill() {
                Ok(()) => warn!("killed the faulting process after: {why}"),
                Err(e) => error!("could not kill the faulting process: {e}"),
            }
        }
    }

    fn wake(&self, page: u64) {
        if let Err(e) = self.uffd.wake(self.addr(page), PAGE_SIZE) {
            trace!(page, "wake: {e}");
        }
    }

    /// Installs `data` at `first` with `UFFDIO_COPY`; returns the pages this call installed.
    ///
    /// The pages are counted before the ioctl that wakes the faulting thread (and taken
    /// back if not installed after all), so a thread that resumes sees its page counted.
    fn install_copy(&self, first: u64, data: &[u8]) -> Result<u64, InstallError> {
        let total = (data.len() / PAGE_SIZE) as u64;
        add(&self.stats.pages_copied, total);
        let mut installed = 0;
        let result = self.copy_pages(first, data, &mut installed);
        sub(&self.stats.pages_copied, total - installed);
        result.map(|()| installed)
    }

    fn copy_pages(&self, first: u64, data: &[u8], installed: &mut u64) -> Result<(), InstallError> {
        let mut off = 0usize;
        let mut retries = 0;
        while off < data.len() {
            let len = data.len() - off;
            let page = first + (off / PAGE_SIZE) as u64;
            // SAFETY: the source is `len` readable bytes of `data`; the destination is a
            // page-aligned part of the registered region, which the kernel checks and writes
            // into the faulting process's memory (never into ours unless it is ours, and
            // then only pages that are still missing).
            let r = unsafe {
                self.uffd
                    .copy(data[off..].as_ptr().cast(), self.addr(page), len, true)
            };
            let done = match r {
                Ok(n) => n,
                Err(userfaultfd::Error::PartiallyCopied(n)) => n,
                Err(e) => match errno(&e) {
                    libc::EEXIST => {
                        // Somebody installed this page first: it is there, all we want.
                        add(&self.stats.copy_races, 1);
                        self.installed.set(page);
                        self.wake(page);
                        off += PAGE_SIZE;
                        continue;
                    }
                    libc::ESRCH => return Err(InstallError::Gone),
                    libc::EAGAIN => 0,
                    _ => return Err(InstallError::Failed(format!("UFFDIO_COPY: {e:?}"))),
                },
            };
            // A partial copy reports the bytes done; `EAGAIN` before any progress (the child
            // is changing its mappings) comes back as 0 or a negative count: retry.
            if done == 0 || done > len || !done.is_multiple_of(PAGE_SIZE) {
                retries += 1;
                if retries > MAX_RETRIES {
                    return Err(InstallError::Failed(format!(
                        "UFFDIO_COPY kept returning EAGAIN at page {page}"
                    )));
                }
                std::thread::yield_now();
                continue;
            }
            let n = (done / PAGE_SIZE) as u64;
            for p in page..page + n {
                self.installed.set(p);
            }
            *installed += n;
            off += done;
        }
        Ok(())
    }

    /// Installs zero pages `first .. first + count`, counted (like [`install_copy`]'s) in
    /// `counter` before the waking ioctl; returns the pages this call installed.
    fn install_zero(
        &self,
        first: u64,
        count: u64,
        counter: &AtomicU64,
    ) -> Result<u64, InstallError> {
        add(counter, count);
        let mut installed = 0;
        let result = self.zero_pages(first, count, &mut installed);
        sub(counter, count - installed);
        result.map(|()| installed)
    }

    fn zero_pages(&self, first: u64, count: u64, installed: &mut u64) -> Result<(), InstallError> {
        let len = count as usize * PAGE_SIZE;
        // SAFETY: the range is page aligned and inside the registered region.
        match unsafe { self.uffd.zeropage(self.addr(first), len, true) } {
            Ok(n) if n == len => {
                for p in first..first + count {
                    self.installed.set(p);
                }
                *installed = count;
                return Ok(());
            }
            Ok(_) => {}
            Err(e) => match errno(&e) {
                libc::EEXIST | libc::EAGAIN => {}
                libc::ESRCH => return Err(InstallError::Gone),
                _ => return Err(InstallError::Failed(format!("UFFDIO_ZEROPAGE: {e:?}"))),
            },
        }
        // Part of the run is present (a race or a partial call): go page by page.
        for page in first..first + count {
            let mut retries = 0;
            loop {
                // SAFETY: one page of the registered region.
                match unsafe { self.uffd.zeropage(self.addr(page), PAGE_SIZE, true) } {
                    Ok(_) => {
                        *installed += 1;
                        break;
                    }
                    Err(e) => match errno(&e) {
                        libc::EEXIST => {
                            add(&self.stats.copy_races, 1);
                            self.wake(page);
                            break;
                        }
                        libc::EAGAIN if retries < MAX_RETRIES => {
                            retries += 1;
                            std::thread::yield_now();
                        }
                        libc::ESRCH => return Err(InstallError::Gone),
                        _ => return Err(InstallError::Failed(format!("UFFDIO_ZEROPAGE: {e:?}"))),
                    },
                }
            }
            self.installed.set(page);
        }
        Ok(())
    }

    /// Answers a demand fault on `page` with zeros after a failure; a dead end if even that
    /// fails, but then at least the thread is woken to fault again.
    fn answer_failed(&self, page: u64) -> Result<(), Gone> {
        match self.install_zero(page, 1, &self.stats.failed_pages) {
            Ok(_) => {}
            Err(InstallError::Gone) => return Err(Gone),
            Err(InstallError::Failed(e)) => {
                error!(page, "could not even zero-fill a failed page: {e}");
                self.wake(page);
            }
        }
        Ok(())
    }

    /// Fetches and installs data pages `first .. first + count` through `buf`.
    fn fetch_and_copy(&self, first: u64, count: u64, buf: &mut [u8]) -> Result<u64, FetchFailed> {
        let bytes = &mut buf[..count as usize * PAGE_SIZE];
        if let Err(e) = self.source.fetch(first, count as u32, bytes) {
            add(&self.stats.fetch_errors, 1);
            return Err(FetchFailed::Fetch(format!(
                "fetching pages {first}..+{count}: {e}"
            )));
        }
        add(&self.stats.bytes_fetched, bytes.len() as u64);
        match self.install_copy(first, bytes) {
            Ok(n) => Ok(n),
            Err(InstallError::Gone) => Err(FetchFailed::Gone),
            Err(InstallError::Failed(e)) => Err(FetchFailed::Fetch(e)),
        }
    }

    /// Installs a run of `n` pages of one kind at `at`: zero pages, or data through `buf`.
    fn install_run(&self, at: u64, n: u64, kind: Kind, buf: &mut [u8]) -> Result<u64, FetchFailed> {
        match kind {
            Kind::Zero => self
                .install_zero(at, n, &self.stats.zero_pages)
                .map_err(|e| match e {
                    InstallError::Gone => FetchFailed::Gone,
                    InstallError::Failed(e) => FetchFailed::Fetch(e),
                }),
            Kind::Data => self.fetch_and_copy(at, n, buf),
        }
    }

    /// The run of missing pages of one kind starting at `start`, ending before `end`.
    fn run(&self, start: u64, end: u64, kind: Kind, max: u64) -> u64 {
        let mut n = 1;
        while start + n < end
            && n < max
            && !self.installed.get(start + n)
            && self.kind(start + n) == kind
        {
            n += 1;
        }
        n
    }

    fn on_fault(&self, addr: usize, buf: &mut [u8]) -> Result<(), Gone> {
        let Some(page) = addr
            .checked_sub(self.base)
            .map(|off| (off / PAGE_SIZE) as u64)
            .filter(|&p| p < self.pages)
        else {
            warn!(addr, "fault outside the served region");
            return Ok(());
        };
        if self.installed.get(page) {
            // Usually a second thread's fault on a page installed since: the copy woke it.
            // But the prefetch thread sets a page's bit after its install returns, so a
            // `MADV_DONTNEED` (REMOVE event) between the two can leave the bit set on a page
            // that is gone: trusting the bit then would re-fault forever. The page tables
            // say which it is.
            let present = crate::resident_pages(
                (self.base + page as usize * PAGE_SIZE) as *const u8,
                PAGE_SIZE,
            )
            .is_ok_and(|n| n == 1);
            if present {
                add(&self.stats.stale_faults, 1);
                self.wake(page);
                return Ok(());
            }
            self.installed.clear(page);
        }
        add(&self.stats.faults, 1);
        if let Some(log) = &self.fault_log {
            log.record(page);
        }
        if self.stats.failed() {
            return self.answer_failed(page);
        }
        let end = (page + 1 + u64::from(self.readahead)).min(self.pages);
        let max_data = (buf.len() / PAGE_SIZE) as u64;
        let mut at = page;
        while at < end {
            if at != page && self.installed.get(at) {
                at += 1;
                continue;
            }
            let kind = self.kind(at);
            let n = self.run(at, end, kind, max_data);
            let demand = at == page;
            // Counted ahead of the install, as install_copy counts its pages.
            let ahead = if demand { n - 1 } else { n };
            add(&self.stats.prefetched, ahead);
            let result = self.install_run(at, n, kind, buf);
            let got = match &result {
                Ok(k) if demand => k.saturating_sub(1),
                Ok(k) => *k,
                Err(_) => 0,
            };
            sub(&self.stats.prefetched, ahead - got.min(ahead));
            match result {
                Ok(_) => {}
                Err(FetchFailed::Gone) => return Err(Gone),
                Err(FetchFailed::Fetch(why)) if demand => {
                    self.fail(why);
                    return self.answer_failed(page);
                }
                Err(FetchFailed::Fetch(why)) => {
                    debug!("readahead stopped: {why}");
                    return Ok(());
                }
            }
            at += n;
        }
        Ok(())
    }

    /// The prefetch thread: installs `prefetch.order`'s missing pages ahead of faults.
    fn prefetch(&self, prefetch: Prefetch) {
        let source = match (prefetch.source)() {
            Ok(s) if s.len() == self.pages * PAGE_SIZE as u64 => s,
            Ok(s) => {
                warn!(
                    len = s.len(),
                    "prefetch source is of another image; no prefetch"
                );
                return;
            }
            Err(e) => {
                add(&self.stats.fetch_errors, 1);
                warn!("no prefetch: {e}");
                return;
            }
        };
        let mut buf = vec![0u8; PREFETCH_RUN as usize * PAGE_SIZE];
        let order = &prefetch.order;
        let mut i = 0;
        while i < order.len() {
            if self.stopping.load(Relaxed) || self.stats.failed() {
                return;
            }
            let page = order[i];
            i += 1;
            if page >= self.pages || self.installed.get(page) {
                continue;
            }
            let kind = if source.is_zero(page) {
                Kind::Zero
            } else {
                Kind::Data
            };
            // A run: the next entries of the order that are the next pages, of one kind.
            let mut n = 1;
            while n < PREFETCH_RUN
                && order.get(i).is_some_and(|&p| p == page + n)
                && page + n < self.pages
                && !self.installed.get(page + n)
                && source.is_zero(page + n) == (kind == Kind::Zero)
            {
                n += 1;
                i += 1;
            }
            let result = match kind {
                Kind::Zero => self
                    .install_zero(page, n, &self.stats.order_prefetched)
                    .map_err(|e| match e {
                        InstallError::Gone => FetchFailed::Gone,
                        InstallError::Failed(e) => FetchFailed::Fetch(e),
                    }),
                Kind::Data => {
                    let bytes = &mut buf[..n as usize * PAGE_SIZE];
                    match source.fetch(page, n as u32, bytes) {
                        Err(e) => {
                            add(&self.stats.fetch_errors, 1);
                            Err(FetchFailed::Fetch(format!("prefetching {page}..+{n}: {e}")))
                        }
                        Ok(()) => {
                            add(&self.stats.bytes_fetched, bytes.len() as u64);
                            add(&self.stats.order_prefetched, n);
                            let r = self.install_copy(page, bytes);
                            let got = r.as_ref().map_or(0, |k| *k);
                            sub(&self.stats.order_prefetched, n - got.min(n));
                            r.map_err(|e| match e {
                                InstallError::Gone => FetchFailed::Gone,
                                InstallError::Failed(e) => FetchFailed::Fetch(e),
                            })
                        }
                    }
                }
            };
            match result {
                Ok(_) => {}
                Err(FetchFailed::Gone) => return,
                Err(FetchFailed::Fetch(why)) => {
                    debug!("prefetch stopped: {why}");
                    return;
                }
            }
        }
        debug!(pages = order.len(), "prefetch done");
    }

    fn on_remove(&self, start: usize, end: usize) {
        let first = start.saturating_sub(self.base).div_ceil(PAGE_SIZE) as u64;
        let last = (end.saturating_sub(self.base) / PAGE_SIZE) as u64;
        let mut removed = 0;
        for page in first..last.min(self.pages) {
            if self.installed.clear(page) {
                removed += 1;
            }
        }
        add(&self.stats.removed_pages, removed);
    }

    /// Installs every missing page (eager mode); data that cannot be fetched fails the
    /// region and is installed as zeros.
    fn populate_all(&self) -> Result<(), Gone> {
        let mut buf = vec![0u8; EAGER_CHUNK as usize * PAGE_SIZE];
        let mut at = 0;
        while at < self.pages {
            if self.installed.get(at) {
                at += 1;
                continue;
            }
            let kind = self.kind(at);
            let max = if kind == Kind::Zero {
                u64::MAX
            } else {
                EAGER_CHUNK
            };
            let n = self.run(at, self.pages, kind, max);
            let result = if kind == Kind::Data && self.stats.failed() {
                Err(FetchFailed::Fetch(String::new()))
            } else {
                self.install_run(at, n, kind, &mut buf)
            };
            match result {
                Ok(_) => {}
                Err(FetchFailed::Gone) => return Err(Gone),
                Err(FetchFailed::Fetch(why)) => {
                    if !why.is_empty() {
                        self.fail(why);
                    }
                    for page in at..at + n {
                        if !self.installed.get(page) {
                            self.answer_failed(page)?;
                        }
                    }
                }
            }
            at += n;
        }
        Ok(())
    }
}

enum FetchFailed {
    Gone,
    Fetch(String),
}

/// Why a handler ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// [`FaultServer::stop`] (or dropping the server or region).
    Stopped,
    /// The peer's pidfd reported its exit.
    PeerExited,
    /// An ioctl found the faulting process's memory gone (`ESRCH`).
    PeerGone,
    /// The uffd reported EOF or an error.
    UffdClosed,
}

/// How a handler ended, and its final counters.
#[derive(Clone, Debug)]
pub struct Served {
    pub reason: StopReason,
    pub stats: StatsSnapshot,
    pub failure: Option<String>,
}

/// A running fault handler. Dropping it stops and joins the handler.
pub struct FaultServer {
    core: Arc<Core>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<Result<StopReason, LazyError>>>,
    prefetcher: Option<JoinHandle<()>>,
}

impl fmt::Debug for FaultServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultServer")
            .field("base", &format_args!("{:#x}", self.core.base))
            .field("pages", &self.core.pages)
            .field("stats", &self.core.stats.snapshot())
            .finish()
    }
}

/// Serves missing-page faults of `[base, base + len)` on `uffd` from `source` on a new
/// thread. `base` is an address in the address space `uffd` belongs to, which may be another
/// process's (received with [`crate::recv_uffd`]); `len` must equal the source's length. The
/// uffd is switched to non-blocking mode (shared with every holder of it).
pub fn serve_faults(
    uffd: Uffd,
    base: usize,
    len: usize,
    source: Arc<dyn PageSource>,
    options: ServeOptions,
) -> Result<FaultServer, LazyError> {
    let eager = options.eager;
    start(uffd, base, len, source, options, eager)
}

fn start(
    uffd: Uffd,
    base: usize,
    len: usize,
    source: Arc<dyn PageSource>,
    options: ServeOptions,
    eager_on_thread: bool,
) -> Result<FaultServer, LazyError> {
    check_range(base, len)?;
    let system = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(PAGE_SIZE as i64) as usize;
    if source.page_size() != PAGE_SIZE || system != PAGE_SIZE {
        return Err(LazyError::PageSize {
            source_page: source.page_size(),
            system,
        });
    }
    if source.len() != len as u64 {
        return Err(LazyError::LengthMismatch {
            region: len,
            image: source.len(),
        });
    }
    if options.readahead > MAX_READAHEAD {
        return Err(LazyError::InvalidOptions("readahead above MAX_READAHEAD"));
    }
    // poll(2) on a blocking uffd reports POLLERR, so the handler needs O_NONBLOCK whoever
    // created the descriptor.
    let flags = fcntl(&uffd, FcntlArg::F_GETFL).map_err(sys("F_GETFL on the uffd"))?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(&uffd, FcntlArg::F_SETFL(flags)).map_err(sys("F_SETFL on the uffd"))?;

    let stop = Arc::new(
        EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(sys("eventfd"))?,
    );
    let pages = (len / PAGE_SIZE) as u64;
    let core = Arc::new(Core {
        uffd,
        base,
        pages,
        source,
        installed: AtomicBitmap::new(pages),
        stats: Stats::default(),
        readahead: options.readahead,
        peer: options.peer,
        killed: AtomicBool::new(false),
        fault_log: options.fault_log,
        stopping: AtomicBool::new(false),
        _live: Live::new(Resource::UffdRegistration),
    });
    let thread = std::thread::Builder::new()
        .name("uffd-handler".into())
        .spawn({
            let core = core.clone();
            let stop = stop.clone();
            move || handler(&core, &stop, eager_on_thread)
        })
        .map_err(|source| LazyError::Io {
            op: "spawning the fault handler",
            source,
        })?;
    let mut server = FaultServer {
        core,
        stop,
        thread: Some(thread),
        prefetcher: None,
    };
    if let Some(prefetch) = options.prefetch {
        let core = server.core.clone();
        let spawned = std::thread::Builder::new()
            .name("uffd-prefetch".into())
            .spawn(move || core.prefetch(prefetch));
        match spawned {
            Ok(t) => server.prefetcher = Some(t),
            // Prefetch is an optimisation: the region is served without it.
            Err(e) => warn!("cannot spawn the prefetch thread: {e}"),
        }
    }
    info!(
        base,
        len,
        readahead = server.core.readahead,
        "serving lazy region"
    );
    Ok(server)
}

fn handler(core: &Core, stop: &EventFd, eager: bool) -> Result<StopReason, LazyError> {
    if eager && core.populate_all().is_err() {
        return Ok(StopReason::PeerGone);
    }
    let mut events = EventBuffer::new(32);
    let mut buf = vec![0u8; (1 + core.readahead as usize) * PAGE_SIZE];
    loop {
        let (uffd_ev, stop_ev, peer_ev) = {
            let mut fds = vec![
                PollFd::new(core.uffd.as_fd(), PollFlags::POLLIN),
                PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            ];
            if let Some(peer) = &core.peer {
                fds.push(PollFd::new(peer.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(sys("poll")(e)),
            }
            let ev = |i: usize| {
                fds.get(i)
                    .and_then(PollFd::revents)
                    .unwrap_or(PollFlags::empty())
            };
            (ev(0), ev(1), ev(2))
        };
        if uffd_ev.contains(PollFlags::POLLIN) {
            loop {
                let mut n = 0;
                let batch = match core.uffd.read_events(&mut events) {
                    Ok(batch) => batch,
                    Err(userfaultfd::Error::ReadEof) => return Ok(StopReason::UffdClosed),
                    Err(e) => return Err(uffd_err("reading uffd events")(e)),
                };
                for event in batch {
                    n += 1;
                    let outcome = match event {
                        Ok(Event::Pagefault { addr, .. }) => core.on_fault(addr as usize, &mut buf),
                        Ok(Event::Remove { start, end }) => {
                            core.on_remove(start as usize, end as usize);
                            Ok(())
                        }
                        Ok(other) => {
                            debug!("ignoring uffd event {other:?}");
                            Ok(())
                        }
                        Err(e) => {
                            warn!("bad uffd event: {e}");
                            Ok(())
                        }
                    };
                    if outcome.is_err() {
                        return Ok(StopReason::PeerGone);
                    }
                }
                if n == 0 {
                    break;
                }
            }
        }
        if uffd_ev.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL) {
            return Ok(StopReason::UffdClosed);
        }
        if stop_ev.contains(PollFlags::POLLIN) {
            return Ok(StopReason::Stopped);
        }
        if peer_ev.contains(PollFlags::POLLIN) {
            return Ok(StopReason::PeerExited);
        }
    }
}

impl FaultServer {
    /// The counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.core.stats.snapshot()
    }

    /// True once the region has failed (see the module docs).
    pub fn failed(&self) -> bool {
        self.core.stats.failed()
    }

    /// The error that failed the region.
    pub fn failure(&self) -> Option<String> {
        self.core.stats.failure().map(str::to_owned)
    }

    /// Asks the handler to end after the events it holds.
    pub fn stop(&self) {
        self.core.stopping.store(true, Relaxed);
        if let Err(e) = self.stop.write(1) {
            warn!("signalling the fault handler: {e}");
        }
    }

    /// True once the handler thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the handler to end (the peer exits, or [`stop`](Self::stop)); the uffd is
    /// closed when this returns.
    pub fn join(mut self) -> Result<Served, LazyError> {
        let reason = self.join_thread()?;
        Ok(Served {
            reason,
            stats: self.stats(),
            failure: self.failure(),
        })
    }

    fn join_thread(&mut self) -> Result<StopReason, LazyError> {
        let Some(thread) = self.thread.take() else {
            return Ok(StopReason::Stopped);
        };
        let reason = thread.join().map_err(|_| LazyError::HandlerPanicked)??;
        // The handler is gone, so nothing serves demand faults any more: end the prefetch
        // too (its next run, or its next ioctl's ESRCH when the peer died).
        self.core.stopping.store(true, Relaxed);
        if let Some(prefetcher) = self.prefetcher.take()
            && prefetcher.join().is_err()
        {
            error!("the prefetch thread panicked");
        }
        info!(base = self.core.base, ?reason, stats = ?self.stats(), "lazy region served");
        Ok(reason)
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
            if let Err(e) = self.join_thread() {
                warn!("fault handler: {e}");
            }
        }
    }
}

/// A region of this process filled lazily from a [`PageSource`]: the in-process form of
/// [`serve_faults`], for a child whose handler runs inside it.
///
/// Dropping it (or [`finish`](Self::finish)) stops the handler and unregisters the region:
/// pages not installed by then read as zeros afterwards, so drop it only when the memory is
/// no longer used, or call [`populate_all`](Self::populate_all) first.
#[derive(Debug)]
pub struct LazyRegion {
    base: usize,
    len: usize,
    server: FaultServer,
}

impl LazyRegion {
    /// Registers `[base, base + len)` and serves it from `source`; with `options.eager` the
    /// whole region is installed before this returns. The region must be page aligned, as
    /// long as the image and wholly unpopulated (a fresh mapping, or [`discard`]ed).
    ///
    /// # Safety
    ///
    /// As [`register_region`]: the range is anonymous private memory of this process used
    /// for nothing but the lazily filled memory, and stays mapped while this value lives.
    pub unsafe fn new(
        base: NonNull<u8>,
        len: usize,
        source: Arc<dyn PageSource>,
        options: ServeOptions,
    ) -> Result<Self, LazyError> {
        if options.peer.is_some() {
            return Err(LazyError::InvalidOptions(
                "a LazyRegion serves this process; peer is for serve_faults",
            ));
        }
        let addr = base.as_ptr() as usize;
        check_range(addr, len)?;
        if source.len() != len as u64 {
            return Err(LazyError::LengthMismatch {
                region: len,
                image: source.len(),
            });
        }
        let resident =
            measure::resident_pages(base.as_ptr(), len).map_err(|source| LazyError::Io {
                op: "mincore on the region",
                source,
            })?;
        if resident != 0 {
            return Err(LazyError::AlreadyPopulated { pages: resident });
        }
        let uffd = create_uffd()?;
        // SAFETY: forwarded from this function's contract.
        unsafe { register_region(&uffd, base, len)? };
        let eager = options.eager;
        let server = start(uffd, addr, len, source, options, false)?;
        let region = LazyRegion {
            base: addr,
            len,
            server,
        };
        if eager {
            region.populate_all()?;
        }
        Ok(region)
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.base as *mut u8
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Installs every page still missing, on the calling thread.
    pub fn populate_all(&self) -> Result<(), LazyError> {
        self.server
            .core
            .populate_all()
            .map_err(|Gone| LazyError::PeerGone)
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.server.stats()
    }

    /// True once the region has failed: its content is not the image's, and nothing the
    /// instance produced may be trusted.
    pub fn failed(&self) -> bool {
        self.server.failed()
    }

    pub fn failure(&self) -> Option<String> {
        self.server.failure()
    }

    /// Stops the handler and unregisters the region (see the type docs).
    pub fn finish(self) -> Result<Served, LazyError> {
        self.server.stop();
        self.server.join()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemfdSource;

    #[test]
    fn a_racing_copy_is_counted_not_fatal() {
        if !testkit::require_root("a_racing_copy_is_counted_not_fatal", "userfaultfd") {
            return;
        }
        let image: Vec<u8> = (0..4 * PAGE_SIZE).map(|i| (i % 251) as u8 + 1).collect();
        let source = Arc::new(MemfdSource::from_image("race", &image).unwrap());
        let mem = AnonRegion::new(image.len()).unwrap();
        // SAFETY: a fresh mapping used only by this test.
        let region =
            unsafe { LazyRegion::new(mem.base(), mem.len(), source, ServeOptions::default()) }
                .unwrap();
        // SAFETY: inside the mapping; the read faults and is served.
        let first = unsafe { mem.as_ptr().read_volatile() };
        assert_eq!(first, image[0]);
        // Install page 0 again, as a racing installer would.
        let core = &region.server.core;
        let installed = core.install_copy(0, &image[..PAGE_SIZE]).ok().unwrap();
        assert_eq!(installed, 0);
        assert!(
            matches!(core.install_zero(0, 2, &core.stats.zero_pages), Ok(1)),
            "page 1 was missing"
        );
        let stats = region.stats();
        assert_eq!(stats.copy_races, 2);
        assert_eq!(stats.pages_copied, 1);
        assert!(!stats.failed);
        region.finish().unwrap();
    }
}
