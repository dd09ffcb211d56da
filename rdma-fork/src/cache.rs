//! The node page cache: pages of one remote image that some child on this node fetched,
//! kept so later children on the node read them locally instead of from the parent.
//!
//! Children are separate processes, each with its own fault handler, so the cache lives in
//! one file that every child of the image maps: a memfd the node service creates per image
//! ([`NodeCache::create`]) and hands to each child as an fd (`proto::worker::CACHE_FD`).
//!
//! # Layout
//!
//! ```text
//! 0       header (one page): magic "SPDLNCAC", version, page size, image handle, memory
//!         bytes, flags (PURGED, REVOKED), order length, shared counters (fills, purges)
//! 4096    claimed bitmap   (one bit per page, AtomicU64 words)
//!         ready bitmap     (one bit per page)
//!         ordered bitmap   (one bit per page: already in the order log)
//!         order log        (one AtomicU32 per page: page + 1 in first-fault order, 0 = not
//!                           yet written)
//! D       data: page i at D + i * 4096 (D page aligned), holes where nothing was filled
//! ```
//!
//! The metadata (header to order log) is mapped shared; the data is only ever `pread` and
//! `pwrite`, never mapped, so a bad offset is an error and never a SIGBUS. The data area is
//! exactly the image's size, so the cache never holds more than one copy of the image.
//!
//! # Fill protocol
//!
//! A page is read only once its **ready** bit is set, and a writer sets it only after its
//! `pwrite` returned, with `Release`; a reader loads it with `Acquire` before its `pread`.
//! (Both sides' data moves through the kernel's page cache under its own locks; the bitmap
//! orders the syscalls.) A writer first takes the page's **claim** bit (`fetch_or`): only
//! the process that turned it on writes the page, so no page is ever written twice or read
//! while written. Nobody ever waits on a claim: a child that finds a page claimed but not
//! ready fetches it itself and does not fill it, so a writer that died mid-fill costs later
//! children a miss on that page, never a hang.
//!
//! # Purge
//!
//! A purge is final for this cache: it sets `PURGED` (and `REVOKED` when the parent revoked
//! or expired the image), clears the ready bits and punches the data out
//! (`fallocate(PUNCH_HOLE)`), returning the memory. Readers check the flags before and,
//! after a `SeqCst` fence, again after each `pread`, and drop what they read when a purge
//! began meanwhile; writers check them after publishing and punch their own page out when a
//! purge overtook them. After a plain purge children still work (every page is a miss and
//! nothing is filled); after a revoke they fail. A purged cache stays purged: `spindle run` creates one
//! cache per `--resume` image at start, so after a plain purge its children of that image run
//! without a cache (a revoked image has no new children anyway).
//!
//! # Validity
//!
//! A cache never vouches for an image on its own: a child authenticates with the parent
//! first (one round trip, which renews the lease; [`connect_checked`]), and a refusal as
//! revoked or expired purges the cache and fails the child.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::time::Duration;

use nix::fcntl::{FallocateFlags, FcntlArg, SealFlag, fallocate, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
use proto::ImageDescriptor;
use proto::pages::RefuseReason;
use tracing::{info, warn};

use crate::client::{ClientError, PageClient};
use crate::lazy::FaultLog;
use crate::lifecycle::{Live, Resource};
use crate::{FetchError, PAGE_SIZE, PageSource};

const PAGE: u64 = PAGE_SIZE as u64;
/// "SPDLNCAC", little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"SPDLNCAC");
pub const VERSION: u32 = 1;

/// Header field offsets (bytes).
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_PAGE_SIZE: usize = 12;
const OFF_HANDLE: usize = 16;
const OFF_MEMORY: usize = 24;
const OFF_FLAGS: usize = 32;
const OFF_ORDER_LEN: usize = 40;
const OFF_FILLS: usize = 48;
const OFF_PURGES: usize = 56;

const FLAG_PURGED: u64 = 1;
const FLAG_REVOKED: u64 = 2;

/// Why a cache could not be made or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    #[error("the cache fd is {len} bytes, too small for a cache header")]
    TooSmall { len: u64 },
    #[error("not a node page cache (magic {found:#018x}, want {MAGIC:#018x})")]
    BadMagic { found: u64 },
    #[error("node page cache format version {0} is not supported (this build knows {VERSION})")]
    Version(u32),
    #[error("the cache uses {0}-byte pages, not {PAGE_SIZE}")]
    PageSize(u32),
    #[error("the cache is for image {cache:#018x}, not {image:#018x}")]
    OtherImage { cache: u64, image: u64 },
    #[error("the cache holds {cache} bytes of memory, the image {image}")]
    MemorySize { cache: u64, image: u64 },
    #[error("the cache fd is {len} bytes; its layout needs exactly {expected}")]
    FileSize { len: u64, expected: u64 },
    #[error("the image memory of {0} bytes is not a whole number of pages")]
    NotPageMultiple(u64),
    #[error("the cache memfd must be sealed against shrinking (seals {seals:#x})")]
    NotSealed { seals: i32 },
    #[error("the cache was purged because the parent revoked or expired the image")]
    Revoked,
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> CacheError {
    move |source| CacheError::Io { op, source }
}

fn nix_err(op: &'static str) -> impl FnOnce(nix::errno::Errno) -> CacheError {
    move |e| CacheError::Io {
        op,
        source: e.into(),
    }
}

/// Where each part of a cache file sits, from the image size alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    pages: u64,
    words: usize,
    claimed: usize,
    ready: usize,
    ordered: usize,
    order: usize,
    /// Length of the mapped metadata, and offset of the data.
    data: u64,
}

impl Layout {
    fn new(memory_bytes: u64) -> Result<Self, CacheError> {
        if !memory_bytes.is_multiple_of(PAGE) || memory_bytes > proto::image::MAX_MEMORY {
            return Err(CacheError::NotPageMultiple(memory_bytes));
        }
        let pages = memory_bytes / PAGE;
        let words = pages.div_ceil(64) as usize;
        let claimed = PAGE_SIZE;
        let ready = claimed + words * 8;
        let ordered = ready + words * 8;
        let order = ordered + words * 8;
        let end = order as u64 + pages * 4;
        Ok(Layout {
            pages,
            words,
            claimed,
            ready,
            ordered,
            order,
            data: end.div_ceil(PAGE) * PAGE,
        })
    }

    fn file_len(&self) -> u64 {
        self.data + self.pages * PAGE
    }
}

/// Why a cache is purged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PurgeReason {
    /// The node service dropped the cache (memory pressure, image retired): children that
    /// hold it go on without it.
    Explicit,
    /// The parent refused the handle as revoked or expired: children holding it fail.
    Revoked,
}

/// Counters shared by every process using one cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SharedStats {
    /// Pages written into the cache.
    pub pages_filled: u64,
    /// Purges (0 or 1: a purge is final, but several children may race to make it).
    pub purges: u64,
    /// Pages set ready now.
    pub pages_ready: u64,
    /// Entries in the fault-order log.
    pub order_len: u64,
}

/// One image's page cache on this node, mapped in this process. See the module docs.
pub struct NodeCache {
    file: File,
    meta: NonNull<u8>,
    layout: Layout,
    handle: u64,
    _live: Live,
}

// SAFETY: the mapping is shared memory touched only through atomics (see the accessors), and
// the file is used with positioned reads and writes, which need no synchronisation.
unsafe impl Send for NodeCache {}
// SAFETY: as above: every access through &NodeCache is an atomic operation or a syscall.
unsafe impl Sync for NodeCache {}

impl fmt::Debug for NodeCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCache")
            .field("handle", &format_args!("{:#018x}", self.handle))
            .field("pages", &self.layout.pages)
            .field("stats", &self.shared_stats())
            .finish()
    }
}

impl NodeCache {
    /// Creates an empty cache for the image `descriptor` names: a memfd sized for it and
    /// sealed against resizing, so no holder can shrink it under the others' mappings.
    /// What the node service hands each child of the image.
    pub fn create(descriptor: &ImageDescriptor) -> Result<OwnedFd, CacheError> {
        let layout = Layout::new(descriptor.memory_bytes)?;
        let fd = memfd_create(
            "spindle-page-cache",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(nix_err("memfd_create"))?;
        let file = File::from(fd);
        file.set_len(layout.file_len())
            .map_err(io_err("sizing the cache"))?;
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(&file, FcntlArg::F_ADD_SEALS(seals)).map_err(nix_err("sealing the cache"))?;
        write_header(&file, descriptor)?;
        Ok(file.into())
    }

    /// Adopts a cache fd for the image `descriptor` names, after checking that it is one
    /// (magic, version, page size), for this image (handle, size), laid out as this build
    /// lays it out, sealed against shrinking, and not revoked.
    pub fn open(fd: OwnedFd, descriptor: &ImageDescriptor) -> Result<Self, CacheError> {
        let seals = fcntl(&fd, FcntlArg::F_GET_SEALS)
            .map_err(nix_err("F_GET_SEALS"))
            .inspect_err(|_| crate::lifecycle::cache_refused())?;
        if !SealFlag::from_bits_retain(seals).contains(SealFlag::F_SEAL_SHRINK) {
            crate::lifecycle::cache_refused();
            return Err(CacheError::NotSealed { seals });
        }
        Self::adopt(File::from(fd), descriptor)
    }

    /// Creates a cache in a new file at `path` (on tmpfs: `/dev/shm`), for tools that run each
    /// child as its own command (`spindle fork resume --cache`). Unlike a memfd, a file
    /// cannot be sealed: whoever may write it may shrink it under its users.
    pub fn create_file(path: &Path, descriptor: &ImageDescriptor) -> Result<(), CacheError> {
        let layout = Layout::new(descriptor.memory_bytes)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err("creating the cache file"))?;
        file.set_len(layout.file_len())
            .map_err(io_err("sizing the cache file"))?;
        write_header(&file, descriptor)
    }

    /// Opens the cache file at `path`, creating it when there is none (see
    /// [`create_file`](Self::create_file)). The file cannot be sealed: the caller must make
    /// sure no other process truncates it while it is open (a truncated file makes the
    /// next access to the cache fault with SIGBUS).
    pub fn open_file(path: &Path, descriptor: &ImageDescriptor) -> Result<Self, CacheError> {
        match Self::create_file(path, descriptor) {
            Ok(()) => {}
            Err(CacheError::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {
            }
            Err(e) => return Err(e),
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("opening the cache file"))?;
        Self::adopt(file, descriptor)
    }

    fn adopt(file: File, descriptor: &ImageDescriptor) -> Result<Self, CacheError> {
        Self::check_and_map(file, descriptor).inspect_err(|_| crate::lifecycle::cache_refused())
    }

    fn check_and_map(file: File, descriptor: &ImageDescriptor) -> Result<Self, CacheError> {
        let len = file.metadata().map_err(io_err("fstat on the cache"))?.len();
        if len < PAGE {
            return Err(CacheError::TooSmall { len });
        }
        let mut header = [0u8; 64];
        file.read_exact_at(&mut header, 0)
            .map_err(io_err("reading the cache header"))?;
        let u64_at = |o: usize| u64::from_le_bytes(header[o..o + 8].try_into().unwrap_or_default());
        let u32_at = |o: usize| u32::from_le_bytes(header[o..o + 4].try_into().unwrap_or_default());
        let found = u64_at(OFF_MAGIC);
        if found != MAGIC {
            return Err(CacheError::BadMagic { found });
        }
        if u32_at(OFF_VERSION) != VERSION {
            return Err(CacheError::Version(u32_at(OFF_VERSION)));
        }
        if u32_at(OFF_PAGE_SIZE) != PAGE_SIZE as u32 {
            return Err(CacheError::PageSize(u32_at(OFF_PAGE_SIZE)));
        }
        let handle = u64_at(OFF_HANDLE);
        if handle != descriptor.handle {
            return Err(CacheError::OtherImage {
                cache: handle,
                image: descriptor.handle,
            });
        }
        let memory = u64_at(OFF_MEMORY);
        if memory != descriptor.memory_bytes {
            return Err(CacheError::MemorySize {
                cache: memory,
                image: descriptor.memory_bytes,
            });
        }
        let layout = Layout::new(memory)?;
        if len != layout.file_len() {
            return Err(CacheError::FileSize {
                len,
                expected: layout.file_len(),
            });
        }
        let map_len =
            NonZeroUsize::new(layout.data as usize).ok_or(CacheError::TooSmall { len })?;
        // SAFETY: a new shared mapping of the file's metadata at an address of the kernel's
        // choosing; the file is at least that long (checked above). A memfd from `open` is
        // sealed against shrinking (checked there), so it stays that long. A plain file from
        // `open_file` cannot be sealed: its callers (`spindle fork resume --cache`, a
        // benchmark tool) must own it exclusively, as `open_file`'s doc says; one that
        // another process truncates makes the next access here fault (SIGBUS), not read
        // stale memory.
        let meta = unsafe {
            mmap(
                None,
                map_len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &file,
                0,
            )
        }
        .map_err(nix_err("mapping the cache metadata"))?;
        let cache = NodeCache {
            file,
            meta: meta.cast(),
            layout,
            handle,
            _live: Live::new(Resource::Memfd),
        };
        if cache.flags() & FLAG_REVOKED != 0 {
            return Err(CacheError::Revoked);
        }
        Ok(cache)
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset.is_multiple_of(8) && offset + 8 <= self.layout.data as usize);
        // SAFETY: `offset` is 8-aligned and inside the metadata mapping (every caller computes
        // it from the layout), which lives as long as `self`; the memory is only ever accessed
        // atomically, by this and other processes.
        unsafe { AtomicU64::from_ptr(self.meta.as_ptr().add(offset).cast()) }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset.is_multiple_of(4) && offset + 4 <= self.layout.data as usize);
        // SAFETY: as u64_at, for a 4-aligned word.
        unsafe { AtomicU32::from_ptr(self.meta.as_ptr().add(offset).cast()) }
    }

    fn bit(&self, area: usize, page: u64) -> (&AtomicU64, u64) {
        (
            self.u64_at(area + (page / 64) as usize * 8),
            1 << (page % 64),
        )
    }

    fn flags(&self) -> u64 {
        self.u64_at(OFF_FLAGS).load(Ordering::Acquire)
    }

    /// Pages in the image.
    pub fn pages(&self) -> u64 {
        self.layout.pages
    }

    /// The image handle this cache is for.
    pub fn handle(&self) -> u64 {
        self.handle
    }

    /// True once purged (for any reason): nothing is read from it or written to it.
    pub fn is_purged(&self) -> bool {
        self.flags() & FLAG_PURGED != 0
    }

    /// True once purged because the parent revoked or expired the image.
    pub fn is_revoked(&self) -> bool {
        self.flags() & FLAG_REVOKED != 0
    }

    /// True when `page` is in the cache now.
    pub fn is_ready(&self, page: u64) -> bool {
        if page >= self.layout.pages {
            return false;
        }
        let (word, bit) = self.bit(self.layout.ready, page);
        word.load(Ordering::Acquire) & bit != 0
    }

    /// Reads `page` into `dst` (one page) if it is in the cache; `Ok(false)` when it is not
    /// (or a purge began meanwhile), [`CacheError::Revoked`] once the image is revoked.
    pub fn read(&self, page: u64, dst: &mut [u8]) -> Result<bool, CacheError> {
        let flags = self.flags();
        if flags & FLAG_REVOKED != 0 {
            return Err(CacheError::Revoked);
        }
        if flags != 0 || !self.is_ready(page) || dst.len() != PAGE_SIZE {
            return Ok(false);
        }
        self.file
            .read_exact_at(dst, self.layout.data + page * PAGE)
            .map_err(io_err("reading the cache"))?;
        // A purge that punched the page out while we read set its flag first.
        fence(Ordering::SeqCst);
        match self.flags() {
            0 => Ok(true),
            f if f & FLAG_REVOKED != 0 => Err(CacheError::Revoked),
            _ => Ok(false),
        }
    }

    /// Offers `data` (one page, the image's bytes for `page`) to the cache; true when this
    /// call put it there. A page somebody else claimed, or any page once purged, is left.
    pub fn fill(&self, page: u64, data: &[u8]) -> Result<bool, CacheError> {
        if page >= self.layout.pages || data.len() != PAGE_SIZE || self.flags() != 0 {
            return Ok(false);
        }
        let (claim, bit) = self.bit(self.layout.claimed, page);
        if claim.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            return Ok(false);
        }
        let offset = self.layout.data + page * PAGE;
        self.file
            .write_all_at(data, offset)
            .map_err(io_err("writing the cache"))?;
        let (ready, bit) = self.bit(self.layout.ready, page);
        ready.fetch_or(bit, Ordering::Release);
        fence(Ordering::SeqCst);
        if self.flags() != 0 {
            // A purge overtook this fill: take the page out again so it does not outlive it.
            ready.fetch_and(!bit, Ordering::AcqRel);
            self.punch(offset, PAGE)?;
            return Ok(false);
        }
        self.u64_at(OFF_FILLS).fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Appends `page` to the fault-order log unless it is there already.
    pub fn record_fault(&self, page: u64) {
        if page >= self.layout.pages || self.flags() != 0 {
            return;
        }
        let (word, bit) = self.bit(self.layout.ordered, page);
        if word.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            return;
        }
        let at = self.u64_at(OFF_ORDER_LEN).fetch_add(1, Ordering::AcqRel);
        // One entry per page at most (the ordered bit), so `at` stays below the page count.
        if at < self.layout.pages {
            self.u32_at(self.layout.order + at as usize * 4)
                .store(page as u32 + 1, Ordering::Release);
        }
    }

    /// The pages of the fault-order log, in the order children first faulted them. Entries
    /// being written right now are left out.
    pub fn fault_order(&self) -> Vec<u64> {
        let len = self
            .u64_at(OFF_ORDER_LEN)
            .load(Ordering::Acquire)
            .min(self.layout.pages);
        (0..len as usize)
            .filter_map(|i| {
                match self
                    .u32_at(self.layout.order + i * 4)
                    .load(Ordering::Acquire)
                {
                    0 => None,
                    p => Some(u64::from(p - 1)),
                }
            })
            .collect()
    }

    /// Purges the cache: flags it, clears every ready bit, the order log and punches all data
    /// out. Final (see the module docs).
    pub fn purge(&self, reason: PurgeReason) -> Result<(), CacheError> {
        let flag = match reason {
            PurgeReason::Explicit => FLAG_PURGED,
            PurgeReason::Revoked => FLAG_PURGED | FLAG_REVOKED,
        };
        let before = self.u64_at(OFF_FLAGS).fetch_or(flag, Ordering::SeqCst);
        if before & FLAG_PURGED == 0 {
            self.u64_at(OFF_PURGES).fetch_add(1, Ordering::Relaxed);
        }
        for w in 0..self.layout.words {
            self.u64_at(self.layout.ready + w * 8)
                .store(0, Ordering::Release);
            self.u64_at(self.layout.ordered + w * 8)
                .store(0, Ordering::Release);
        }
        self.u64_at(OFF_ORDER_LEN).store(0, Ordering::Release);
        fence(Ordering::SeqCst);
        self.punch(self.layout.data, self.layout.pages * PAGE)?;
        info!(handle = %format_args!("{:#018x}", self.handle), ?reason, "node page cache purged");
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> Result<(), CacheError> {
        if len == 0 {
            return Ok(());
        }
        fallocate(
            self.file.as_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
        .map_err(nix_err("punching pages out of the cache"))
    }

    /// The counters every process using this cache shares.
    pub fn shared_stats(&self) -> SharedStats {
        let ready = (0..self.layout.words)
            .map(|w| {
                u64::from(
                    self.u64_at(self.layout.ready + w * 8)
                        .load(Ordering::Relaxed)
                        .count_ones(),
                )
            })
            .sum();
        SharedStats {
            pages_filled: self.u64_at(OFF_FILLS).load(Ordering::Relaxed),
            purges: self.u64_at(OFF_PURGES).load(Ordering::Relaxed),
            pages_ready: ready,
            order_len: self
                .u64_at(OFF_ORDER_LEN)
                .load(Ordering::Relaxed)
                .min(self.layout.pages),
        }
    }

    /// Bytes of data the cache file holds in memory now (its allocated blocks past the
    /// metadata): what a purge gives back.
    pub fn resident_bytes(&self) -> Result<u64, CacheError> {
        use std::os::unix::fs::MetadataExt;
        let blocks = self
            .file
            .metadata()
            .map_err(io_err("fstat on the cache"))?
            .blocks();
        Ok((blocks * 512).saturating_sub(self.layout.data))
    }
}

impl Drop for NodeCache {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours; nothing borrows it past `self` (every accessor's
        // reference is tied to `&self`).
        if let Err(e) = unsafe { munmap(self.meta.cast(), self.layout.data as usize) } {
            warn!("munmap of a node page cache: {e}");
        }
    }
}

impl FaultLog for NodeCache {
    fn record(&self, page: u64) {
        self.record_fault(page);
    }
}

fn write_header(file: &File, d: &ImageDescriptor) -> Result<(), CacheError> {
    let mut header = [0u8; 64];
    header[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&VERSION.to_le_bytes());
    header[OFF_PAGE_SIZE..OFF_PAGE_SIZE + 4].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    header[OFF_HANDLE..OFF_HANDLE + 8].copy_from_slice(&d.handle.to_le_bytes());
    header[OFF_MEMORY..OFF_MEMORY + 8].copy_from_slice(&d.memory_bytes.to_le_bytes());
    file.write_all_at(&header, 0)
        .map_err(io_err("writing the cache header"))?;
    // The magic last: a process that opens a file being created sees no magic until the
    // rest of the header is in place.
    file.write_all_at(&MAGIC.to_le_bytes(), OFF_MAGIC as u64)
        .map_err(io_err("writing the cache header"))
}

/// Connects to the descriptor's parent and authenticates (which renews the image's lease)
/// before anything is read from `cache`; a refusal as revoked or expired purges the cache.
pub fn connect_checked(
    descriptor: &ImageDescriptor,
    timeout: Duration,
    cache: Option<&NodeCache>,
) -> Result<PageClient, ClientError> {
    let result = PageClient::connect(descriptor, timeout);
    if let (Err(ClientError::Refused { reason, .. }), Some(cache)) = (&result, cache)
        && matches!(reason, RefuseReason::Revoked | RefuseReason::Expired)
        && let Err(e) = cache.purge(PurgeReason::Revoked)
    {
        warn!("purging the node page cache: {e}");
    }
    result
}

/// A [`CachedSource`]'s counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Pages read from the cache.
    pub hits: u64,
    /// Data pages read from the inner source.
    pub misses: u64,
    /// Pages this source put into the cache.
    pub pages_filled: u64,
    /// Purges this source made (a refusal of the inner source as revoked or expired).
    pub purges: u64,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    filled: AtomicU64,
    purges: AtomicU64,
}

/// A [`PageSource`] that serves pages from a [`NodeCache`] and fetches the rest from
/// `inner`, putting what it fetched into the cache (unless built with
/// [`without_fill`](Self::without_fill)).
pub struct CachedSource {
    cache: Arc<NodeCache>,
    inner: Arc<dyn PageSource>,
    fill: bool,
    counters: Counters,
}

impl CachedSource {
    /// `inner` must be the image `cache` is for (same length).
    pub fn new(cache: Arc<NodeCache>, inner: Arc<dyn PageSource>) -> Result<Self, CacheError> {
        if inner.len() != cache.pages() * PAGE {
            return Err(CacheError::MemorySize {
                cache: cache.pages() * PAGE,
                image: inner.len(),
            });
        }
        Ok(CachedSource {
            cache,
            inner,
            fill: true,
            counters: Counters::default(),
        })
    }

    /// Reads hits but leaves misses out of the cache.
    pub fn without_fill(mut self) -> Self {
        self.fill = false;
        self
    }

    pub fn cache(&self) -> &Arc<NodeCache> {
        &self.cache
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        CacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            pages_filled: c.filled.load(Ordering::Relaxed),
            purges: c.purges.load(Ordering::Relaxed),
        }
    }

    fn revoked() -> FetchError {
        FetchError::Unavailable(CacheError::Revoked.to_string())
    }

    /// Fetches a run of misses from the inner source and offers them to the cache.
    fn fetch_misses(&self, first: u64, dst: &mut [u8]) -> Result<(), FetchError> {
        let count = (dst.len() / PAGE_SIZE) as u32;
        if let Err(e) = self.inner.fetch(first, count, dst) {
            if let FetchError::Refused {
                reason: RefuseReason::Revoked | RefuseReason::Expired,
                ..
            } = &e
            {
                self.counters.purges.fetch_add(1, Ordering::Relaxed);
                if let Err(p) = self.cache.purge(PurgeReason::Revoked) {
                    warn!("purging the node page cache: {p}");
                }
            }
            return Err(e);
        }
        self.counters
            .misses
            .fetch_add(u64::from(count), Ordering::Relaxed);
        if self.fill {
            for (i, page) in dst.chunks_exact(PAGE_SIZE).enumerate() {
                match self.cache.fill(first + i as u64, page) {
                    Ok(true) => {
                        self.counters.filled.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(false) => {}
                    // The page itself was fetched: a cache that cannot be written costs
                    // later children a miss, not this one its memory.
                    Err(e) => warn!("filling the node page cache: {e}"),
                }
            }
        }
        Ok(())
    }
}

impl PageSource for CachedSource {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn is_zero(&self, page: u64) -> bool {
        self.inner.is_zero(page)
    }

    fn fetch(&self, first_page: u64, count: u32, dst: &mut [u8]) -> Result<(), FetchError> {
        crate::check_fetch(self.cache.pages(), first_page, count, dst)?;
        // Hits are read page by page; each run of misses goes to the inner source at once.
        let mut miss_start: Option<u64> = None;
        let end = first_page + u64::from(count);
        for page in first_page..=end {
            let hit = page < end && {
                let at = (page - first_page) as usize * PAGE_SIZE;
                match self.cache.read(page, &mut dst[at..at + PAGE_SIZE]) {
                    Ok(hit) => hit,
                    Err(CacheError::Revoked) => return Err(Self::revoked()),
                    Err(e) => {
                        warn!("reading the node page cache: {e}");
                        false
                    }
                }
            };
            if hit {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
            }
            match (hit || page == end, miss_start) {
                (true, Some(start)) => {
                    let from = (start - first_page) as usize * PAGE_SIZE;
                    let to = (page - first_page) as usize * PAGE_SIZE;
                    self.fetch_misses(start, &mut dst[from..to])?;
                    miss_start = None;
                }
                (false, None) => miss_start = Some(page),
                _ => {}
            }
        }
        if self.cache.is_revoked() {
            return Err(Self::revoked());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(memory_bytes: u64) -> ImageDescriptor {
        ImageDescriptor {
            handle: 0x1234_5678_9abc_def0,
            key: [7; 32],
            parent: "127.0.0.1:1".parse().unwrap(),
            module_hash: [1; 32],
            engine: "test".into(),
            memory_bytes,
            page_size: PAGE_SIZE as u32,
            rdma: None,
        }
    }

    fn cache(pages: u64) -> NodeCache {
        let d = descriptor(pages * PAGE);
        NodeCache::open(NodeCache::create(&d).unwrap(), &d).unwrap()
    }

    #[test]
    fn layout_puts_data_after_page_aligned_metadata_and_holds_one_image() {
        let l = Layout::new(16 * 65536).unwrap();
        assert_eq!((l.pages, l.words), (256, 4));
        assert_eq!(
            (l.claimed, l.ready, l.ordered, l.order),
            (4096, 4128, 4160, 4192)
        );
        assert_eq!(l.data, 8192);
        assert_eq!(l.file_len(), 8192 + 256 * PAGE);
        let max = Layout::new(proto::image::MAX_MEMORY).unwrap();
        assert_eq!(max.file_len() - max.data, proto::image::MAX_MEMORY);
        assert!(Layout::new(100).is_err());
        assert!(Layout::new(proto::image::MAX_MEMORY + PAGE).is_err());
    }

    #[test]
    fn a_page_is_filled_once_and_read_back() {
        let c = cache(8);
        let page = vec![0x5au8; PAGE_SIZE];
        let mut buf = vec![0u8; PAGE_SIZE];
        assert!(!c.read(3, &mut buf).unwrap(), "empty cache");
        assert!(c.fill(3, &page).unwrap());
        assert!(!c.fill(3, &[0x11; PAGE_SIZE]).unwrap(), "claimed already");
        assert!(c.read(3, &mut buf).unwrap());
        assert_eq!(buf, page);
        assert!(!c.fill(8, &page).unwrap(), "out of range");
        assert!(!c.fill(2, &page[..100]).unwrap(), "not a page");
        assert!(!c.read(8, &mut buf).unwrap());
        assert_eq!(c.shared_stats().pages_filled, 1);
        assert_eq!(c.shared_stats().pages_ready, 1);
    }

    #[test]
    fn the_fault_order_keeps_first_faults_only() {
        let c = cache(8);
        for p in [5, 1, 5, 7, 1, 0, 99] {
            c.record_fault(p);
        }
        assert_eq!(c.fault_order(), [5, 1, 7, 0]);
        c.purge(PurgeReason::Explicit).unwrap();
        assert!(c.fault_order().is_empty());
        c.record_fault(2);
        assert!(c.fault_order().is_empty(), "a purged cache records nothing");
    }

    #[test]
    fn a_purged_cache_neither_serves_nor_takes_pages() {
        let c = cache(4);
        assert!(c.fill(0, &[1; PAGE_SIZE]).unwrap());
        c.purge(PurgeReason::Explicit).unwrap();
        let mut buf = vec![0u8; PAGE_SIZE];
        assert!(!c.read(0, &mut buf).unwrap());
        assert!(!c.fill(1, &[1; PAGE_SIZE]).unwrap());
        assert_eq!(c.resident_bytes().unwrap(), 0);
        c.purge(PurgeReason::Revoked).unwrap();
        assert!(matches!(c.read(0, &mut buf), Err(CacheError::Revoked)));
        assert_eq!(c.shared_stats().purges, 1, "one purge, then a revoke of it");
    }
}
