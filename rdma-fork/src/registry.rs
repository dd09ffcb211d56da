//! The images a parent node exports: what the page server may serve, to whom, for how long.
//!
//! `fork_prepare` leaves an immutable image of a warm instance's linear memory — a sealed
//! memfd laid out like the memory (page `i` at offset `i * 4096`, holes where the memory is
//! zero) and a bitmap of its non-zero pages — and [`ImageRegistry::publish`] gives it a name:
//! a random handle id and a fresh 256-bit key, the two halves of an
//! [`ImageDescriptor`]. The key never leaves this node except inside
//! descriptors on trusted control channels; the page server only checks proofs of it.
//!
//! # Lifetime
//!
//! An image lives while its lease is unexpired **or** children are still attached to it, so
//! a child that started fetching is never cut off by a lease running out under it: MITOSIS
//! ties the image to the parent's handle, but a remote node's parent cannot see its children,
//! so a lease bounds how long a forgotten image pins memory. A lapsed lease refuses new
//! children; once the last attached child leaves, the image is reaped on the spot (or by
//! [`ImageRegistry::reap`], for images nobody attached to). [`ImageRegistry::revoke`] ends an
//! image at once: attached children are refused at their next read.
//!
//! A reaped or revoked id leaves a tombstone for [`ImageRegistry::with_tombstone_ttl`], so a
//! late child is told `Expired` or `Revoked` rather than `UnknownHandle`, which would send
//! an operator looking for a routing bug. Tombstones hold no memfd.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use proto::ImageDescriptor;
use proto::image::{MAX_MEMORY, WASM_PAGE};
use proto::pages::{PAGE_SIZE, RandomnessError, RefuseReason, fresh_nonce};

use crate::lifecycle::{self, Resource};

const PAGE: u64 = PAGE_SIZE as u64;

/// Seals an image memfd must carry: without them the parent could change or shorten the
/// bytes under children that already hold some of its pages.
const REQUIRED_SEALS: SealFlag = SealFlag::F_SEAL_SHRINK.union(SealFlag::F_SEAL_WRITE);

/// How long a tombstone outlives its image, by default.
pub const DEFAULT_TOMBSTONE_TTL: Duration = Duration::from_secs(600);

/// An image handed to [`ImageRegistry::publish`].
pub struct PublishedImage {
    /// Sealed (at least against shrinking and writing) memfd, laid out like the memory: page
    /// `i` at offset `i * PAGE_SIZE`. Read with `pread` only, never written.
    pub memfd: OwnedFd,
    /// Size of the linear memory: a whole number of Wasm pages, at most 4 GiB.
    pub memory_bytes: u64,
    /// Non-zero pages: bit `i % 64` of word `i / 64` is set when page `i` holds data.
    /// Exactly `pages.div_ceil(64)` words, no bits past the last page. Clear bits are served
    /// as zero without reading the memfd.
    pub nonzero: Vec<u64>,
    /// How long the image stays open to new children; renewed by [`ImageRegistry::renew`]
    /// and by every child's successful handshake.
    pub lease: Duration,
    /// The image's metadata (a `proto::ImageMeta` encoding) that children ask for with
    /// `MetaRequest`; empty for an image of pages only, which refuses that request.
    pub meta: Vec<u8>,
}

impl PublishedImage {
    /// An image of `memory` (a whole number of Wasm pages) in a new sealed memfd called
    /// `name`, writing only its non-zero pages. For tests and tools: a snapshot taker writes
    /// its own memfd and bitmap.
    pub fn from_memory(name: &str, memory: &[u8], lease: Duration) -> Result<Self, PublishError> {
        use nix::sys::memfd::{MFdFlags, memfd_create};
        let memory_bytes = memory.len() as u64;
        check_memory_bytes(memory_bytes)?;
        let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
            .map_err(|e| io_err("memfd_create", e.into()))?;
        let file = File::from(fd);
        file.set_len(memory_bytes)
            .map_err(|e| io_err("sizing the memfd", e))?;
        let mut nonzero = vec![0u64; (memory_bytes / PAGE).div_ceil(64) as usize];
        for (i, page) in memory.chunks(PAGE as usize).enumerate() {
            if page.iter().any(|&b| b != 0) {
                nonzero[i / 64] |= 1 << (i % 64);
                file.write_all_at(page, i as u64 * PAGE)
                    .map_err(|e| io_err("writing the image", e))?;
            }
        }
        let seals = REQUIRED_SEALS | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(&file, FcntlArg::F_ADD_SEALS(seals)).map_err(|e| io_err("sealing", e.into()))?;
        Ok(PublishedImage {
            memfd: file.into(),
            memory_bytes,
            nonzero,
            lease,
            meta: Vec::new(),
        })
    }
}

/// Why [`ImageRegistry::publish`] refused an image. The memfd has been closed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("memory of {0} bytes is not a whole number of 64 KiB Wasm pages")]
    MemoryNotWasmPages(u64),
    #[error("memory of {0} bytes is larger than a wasm32 memory (4 GiB)")]
    MemoryTooLarge(u64),
    #[error("the non-zero bitmap has {words} words; {pages} pages need {expected}")]
    BitmapSize {
        words: usize,
        pages: u64,
        expected: usize,
    },
    #[error("the non-zero bitmap marks pages past the last of {pages}")]
    BitmapPastEnd { pages: u64 },
    #[error("the memfd must be sealed against shrinking and writing (seals {seals:#x})")]
    NotSealed { seals: i32 },
    #[error("the memfd is {len} bytes, shorter than the {memory_bytes}-byte memory")]
    MemfdTooShort { len: u64, memory_bytes: u64 },
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Randomness(#[from] RandomnessError),
}

fn io_err(op: &'static str, source: io::Error) -> PublishError {
    PublishError::Io { op, source }
}

fn check_memory_bytes(memory_bytes: u64) -> Result<(), PublishError> {
    if !memory_bytes.is_multiple_of(WASM_PAGE) {
        return Err(PublishError::MemoryNotWasmPages(memory_bytes));
    }
    if memory_bytes > MAX_MEMORY {
        return Err(PublishError::MemoryTooLarge(memory_bytes));
    }
    Ok(())
}

/// What the parent needs to name a published image: the halves of an [`ImageDescriptor`].
/// `Debug` redacts the key.
#[derive(Clone, PartialEq, Eq)]
pub struct ImageHandle {
    /// Random, never 0. Not a secret.
    pub id: u64,
    /// Fresh per image; a child proves it knows it. A credential.
    pub key: [u8; 32],
    pub memory_bytes: u64,
}

impl ImageHandle {
    /// The descriptor children fork from: this image, served at `parent`, made from the
    /// module with `module_hash` on `engine`. No RDMA region: the page server's
    /// [`descriptor`](crate::server::RunningServer::descriptor) adds its device when it has
    /// one.
    pub fn descriptor(
        &self,
        parent: SocketAddr,
        module_hash: [u8; 32],
        engine: impl Into<String>,
    ) -> ImageDescriptor {
        ImageDescriptor {
            handle: self.id,
            key: self.key,
            parent,
            module_hash,
            engine: engine.into(),
            memory_bytes: self.memory_bytes,
            page_size: PAGE_SIZE,
            rdma: None,
        }
    }
}

impl fmt::Debug for ImageHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageHandle")
            .field("id", &format_args!("{:#018x}", self.id))
            .field("key", &format_args!("<redacted>"))
            .field("memory_bytes", &self.memory_bytes)
            .finish()
    }
}

/// Why an image cannot be served. Each maps to one [`RefuseReason`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no image with this handle")]
    Unknown,
    #[error("the image's lease expired")]
    Expired,
    #[error("the parent revoked the image")]
    Revoked,
}

impl Refusal {
    pub fn reason(self) -> RefuseReason {
        match self {
            Refusal::Unknown => RefuseReason::UnknownHandle,
            Refusal::Expired => RefuseReason::Expired,
            Refusal::Revoked => RefuseReason::Revoked,
        }
    }
}

/// A published image: its memfd, size and non-zero map. Shared by the registry and every
/// connection serving it; the memfd closes when the last holder drops it.
pub struct Entry {
    id: u64,
    key: [u8; 32],
    file: File,
    memory_bytes: u64,
    nonzero: Vec<u64>,
    meta: Vec<u8>,
    revoked: AtomicBool,
    counters: Arc<Counters>,
    /// This image's share of the registry's `pages_served` and `bytes_served`.
    pages_served: AtomicU64,
    bytes_served: AtomicU64,
    /// The image registered for RDMA READ, made at the first child's `RdmaConnect`.
    #[cfg(feature = "rdma")]
    rdma: Mutex<Option<Arc<crate::rdma::RdmaExport>>>,
    _live: lifecycle::Live,
}

impl Entry {
    pub fn handle(&self) -> u64 {
        self.id
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    /// The image's encoded metadata; empty when it was published without.
    pub fn meta(&self) -> &[u8] {
        &self.meta
    }

    pub fn page_count(&self) -> u64 {
        self.memory_bytes / PAGE
    }

    /// Whether `page` holds data (false past the end).
    pub fn is_nonzero(&self, page: u64) -> bool {
        page < self.page_count() && self.nonzero[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Set by [`ImageRegistry::revoke`]; a connection checks it before every read.
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Relaxed)
    }

    pub(crate) fn key(&self) -> &[u8; 32] {
        &self.key
    }

    /// The image's memfd registered on `dev` for remote READ: made on the first call (one
    /// registration per image, shared by every child's queue pair), retried after a failure.
    #[cfg(feature = "rdma")]
    pub(crate) fn rdma_export(
        &self,
        dev: &crate::rdma::RdmaDevice,
    ) -> Result<Arc<crate::rdma::RdmaExport>, crate::rdma::RdmaError> {
        use std::os::fd::AsFd;
        let mut slot = self.rdma.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(export) = &*slot {
            return Ok(export.clone());
        }
        let export = Arc::new(crate::rdma::RdmaExport::open_on(
            dev,
            self.file.as_fd(),
            self.memory_bytes,
        )?);
        *slot = Some(export.clone());
        Ok(export)
    }

    /// Counts one `Pages` answer of `pages` pages in `bytes` frame bytes, for this image and
    /// the registry.
    pub(crate) fn count_served(&self, pages: u64, zero_pages: u64, bytes: u64) {
        let c = &self.counters;
        c.reads.fetch_add(1, Relaxed);
        c.pages_served.fetch_add(pages, Relaxed);
        c.zero_pages_served.fetch_add(zero_pages, Relaxed);
        c.bytes_served.fetch_add(bytes, Relaxed);
        self.pages_served.fetch_add(pages, Relaxed);
        self.bytes_served.fetch_add(bytes, Relaxed);
    }

    /// Fills `dst` (whole pages) with the pages from `first_page` on: non-zero pages read
    /// from the memfd in runs, one `pread` per run; zero pages written as zeros, not read.
    /// Returns the bytes read from the memfd. Errors on a range past the end or a short read.
    pub fn read_pages(&self, first_page: u64, dst: &mut [u8]) -> io::Result<u64> {
        let count = dst.len() as u64 / PAGE;
        if !(dst.len() as u64).is_multiple_of(PAGE)
            || first_page
                .checked_add(count)
                .is_none_or(|end| end > self.page_count())
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "page range outside the image",
            ));
        }
        let mut read = 0;
        let mut i = 0;
        while i < count {
            let start = i;
            let data = self.is_nonzero(first_page + i);
            while i < count && self.is_nonzero(first_page + i) == data {
                i += 1;
            }
            let run = &mut dst[(start * PAGE) as usize..(i * PAGE) as usize];
            if data {
                self.file.read_exact_at(run, (first_page + start) * PAGE)?;
                read += run.len() as u64;
            } else {
                run.fill(0);
            }
        }
        self.counters.memfd_bytes_read.fetch_add(read, Relaxed);
        Ok(read)
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.counters.images_alive.fetch_sub(1, Relaxed);
    }
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("id", &format_args!("{:#018x}", self.id))
            .field("memory_bytes", &self.memory_bytes)
            .field("revoked", &self.is_revoked())
            .finish_non_exhaustive()
    }
}

/// Refusal buckets, one per reason a connection is refused, plus the two that are not
/// about the image (malformed frames, busy server).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bucket {
    UnknownHandle,
    BadProof,
    Expired,
    Revoked,
    BadRequest,
    Malformed,
    Busy,
    Internal,
}

impl From<Refusal> for Bucket {
    fn from(r: Refusal) -> Bucket {
        match r {
            Refusal::Unknown => Bucket::UnknownHandle,
            Refusal::Expired => Bucket::Expired,
            Refusal::Revoked => Bucket::Revoked,
        }
    }
}

const BUCKETS: usize = 8;

/// The live counters behind [`Stats`]; the server updates them.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) images_alive: AtomicU64,
    pub(crate) images_published: AtomicU64,
    pub(crate) connections_open: AtomicU64,
    pub(crate) children_attached: AtomicU64,
    pub(crate) handshakes_ok: AtomicU64,
    pub(crate) reads: AtomicU64,
    pub(crate) pages_served: AtomicU64,
    pub(crate) zero_pages_served: AtomicU64,
    pub(crate) bytes_served: AtomicU64,
    pub(crate) memfd_bytes_read: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) rdma_connects_ok: AtomicU64,
    pub(crate) rdma_unavailable: AtomicU64,
    refused: [AtomicU64; BUCKETS],
}

impl Counters {
    pub(crate) fn refused(&self, b: Bucket) {
        self.refused[b as usize].fetch_add(1, Relaxed);
    }
}

/// A snapshot of a registry's gauges and counters, shared by every server on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Gauge: images whose memfd is still open (live ones, and reaped or revoked ones a
    /// connection still holds).
    pub images_alive: u64,
    pub images_published: u64,
    /// Gauge: TCP connections being served, handshaking or not.
    pub connections_open: u64,
    /// Gauge: children past the handshake, attached to an image.
    pub children_attached: u64,
    pub handshakes_ok: u64,
    /// `Read`s answered with `Pages` (counted as the answer is written).
    pub reads: u64,
    pub pages_served: u64,
    /// Of `pages_served`, the ones sent as a zero-map bit.
    pub zero_pages_served: u64,
    /// Bytes of `Pages` frames sent, headers included.
    pub bytes_served: u64,
    /// Bytes `pread` from image memfds (zero pages are never read).
    pub memfd_bytes_read: u64,
    /// Connections closed because the peer went silent past a deadline.
    pub timeouts: u64,
    /// `RdmaConnect`s answered with `RdmaAccept`: a child's queue pair connected.
    pub rdma_connects_ok: u64,
    /// `RdmaConnect`s answered with `RdmaUnavailable` (no device here, an unknown exchange
    /// version, or the set-up failed); those children read over TCP.
    pub rdma_unavailable: u64,
    pub refusals: RefusalCounts,
}

/// Refusals sent, by cause. Each refused connection counts once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefusalCounts {
    pub unknown_handle: u64,
    pub bad_proof: u64,
    pub expired: u64,
    pub revoked: u64,
    /// Frames out of order, unknown version, reads out of range or with a bad count.
    pub bad_request: u64,
    /// Frames that do not decode: garbage, truncated, oversized length.
    pub malformed: u64,
    pub busy: u64,
    pub internal: u64,
}

impl RefusalCounts {
    pub fn total(&self) -> u64 {
        self.unknown_handle
            + self.bad_proof
            + self.expired
            + self.revoked
            + self.bad_request
            + self.malformed
            + self.busy
            + self.internal
    }
}

/// What the registry knows of a live image; see [`ImageRegistry::status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageStatus {
    /// Children attached now.
    pub connections: usize,
    /// Lease left; zero once it lapsed, `None` for a lease too long to represent.
    pub lease_left: Option<Duration>,
    /// Pages served from this image to its children so far (zero pages included).
    pub pages_served: u64,
    /// Bytes of `Pages` frames sent for this image, headers included.
    pub bytes_served: u64,
}

enum Slot {
    Live(Live),
    Gone { why: Refusal, since: Instant },
}

struct Live {
    entry: Arc<Entry>,
    lease: Duration,
    /// `None`: the lease runs past what `Instant` can hold.
    expires: Option<Instant>,
    connections: usize,
}

impl Live {
    fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|e| now >= e)
    }
}

/// The images this node exports. Thread-safe; share it as `Arc<ImageRegistry>`.
pub struct ImageRegistry {
    slots: Mutex<HashMap<u64, Slot>>,
    counters: Arc<Counters>,
    tombstone_ttl: Duration,
}

impl Default for ImageRegistry {
    fn default() -> Self {
        ImageRegistry::new()
    }
}

impl ImageRegistry {
    pub fn new() -> Self {
        ImageRegistry::with_tombstone_ttl(DEFAULT_TOMBSTONE_TTL)
    }

    /// A registry that remembers why an image ended for `ttl` after it did.
    pub fn with_tombstone_ttl(ttl: Duration) -> Self {
        ImageRegistry {
            slots: Mutex::new(HashMap::new()),
            counters: Arc::default(),
            tombstone_ttl: ttl,
        }
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<u64, Slot>> {
        // Nothing panics while holding the lock; a poisoned map is still consistent.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks `image` and opens it to children under a new random handle id and key.
    pub fn publish(&self, image: PublishedImage) -> Result<ImageHandle, PublishError> {
        let PublishedImage {
            memfd,
            memory_bytes,
            nonzero,
            lease,
            meta,
        } = image;
        check_memory_bytes(memory_bytes)?;
        let pages = memory_bytes / PAGE;
        let expected = pages.div_ceil(64) as usize;
        if nonzero.len() != expected {
            return Err(PublishError::BitmapSize {
                words: nonzero.len(),
                pages,
                expected,
            });
        }
        if !pages.is_multiple_of(64) && nonzero.last().is_some_and(|w| w >> (pages % 64) != 0) {
            return Err(PublishError::BitmapPastEnd { pages });
        }
        // EINVAL here means not a memfd (or another file that cannot carry seals).
        let seals = fcntl(&memfd, FcntlArg::F_GET_SEALS).unwrap_or(0);
        if !SealFlag::from_bits_retain(seals).contains(REQUIRED_SEALS) {
            return Err(PublishError::NotSealed { seals });
        }
        let file = File::from(memfd);
        let len = file.metadata().map_err(|e| io_err("fstat", e))?.len();
        if len < memory_bytes {
            return Err(PublishError::MemfdTooShort { len, memory_bytes });
        }
        let key = fresh_nonce::<32>()?;
        self.counters.images_alive.fetch_add(1, Relaxed);
        let mut entry = Entry {
            id: 0,
            key,
            file,
            memory_bytes,
            nonzero,
            meta,
            revoked: AtomicBool::new(false),
            counters: self.counters.clone(),
            pages_served: AtomicU64::new(0),
            bytes_served: AtomicU64::new(0),
            #[cfg(feature = "rdma")]
            rdma: Mutex::new(None),
            _live: lifecycle::Live::new(Resource::Memfd),
        };
        let now = Instant::now();
        let mut slots = self.slots();
        // 2^64 ids: a collision is astronomically rare, but a reused id would hand one
        // image's children another's pages, so draw again rather than assume.
        entry.id = loop {
            let id = u64::from_le_bytes(fresh_nonce::<8>()?);
            if id != 0 && !slots.contains_key(&id) {
                break id;
            }
        };
        let handle = ImageHandle {
            id: entry.id,
            key,
            memory_bytes,
        };
        slots.insert(
            entry.id,
            Slot::Live(Live {
                entry: Arc::new(entry),
                lease,
                expires: now.checked_add(lease),
                connections: 0,
            }),
        );
        drop(slots);
        self.counters.images_published.fetch_add(1, Relaxed);
        tracing::debug!(handle = %format_args!("{:#018x}", handle.id), memory_bytes, ?lease, "image published");
        Ok(handle)
    }

    /// The image with this handle, if a new child may still attach to it.
    pub fn lookup(&self, handle: u64) -> Result<Arc<Entry>, Refusal> {
        let now = Instant::now();
        match self.slots().get(&handle) {
            None => Err(Refusal::Unknown),
            Some(Slot::Gone { why, .. }) => Err(*why),
            Some(Slot::Live(l)) if l.expired(now) => Err(Refusal::Expired),
            Some(Slot::Live(l)) => Ok(l.entry.clone()),
        }
    }

    /// Attaches a child that proved it holds the key: renews the lease and keeps the image
    /// alive until the returned [`Attachment`] drops. Refused if the image ended since
    /// [`lookup`](Self::lookup).
    pub fn attach(self: &Arc<Self>, entry: &Arc<Entry>) -> Result<Attachment, Refusal> {
        let now = Instant::now();
        let mut slots = self.slots();
        match slots.get_mut(&entry.id) {
            Some(Slot::Live(l)) if Arc::ptr_eq(&l.entry, entry) => {
                if l.expired(now) {
                    return Err(Refusal::Expired);
                }
                l.expires = now.checked_add(l.lease);
                l.connections += 1;
            }
            Some(Slot::Gone { why, .. }) => return Err(*why),
            _ => return Err(Refusal::Unknown),
        }
        drop(slots);
        self.counters.children_attached.fetch_add(1, Relaxed);
        Ok(Attachment {
            registry: self.clone(),
            entry: entry.clone(),
        })
    }

    fn detach(&self, entry: &Arc<Entry>) {
        let now = Instant::now();
        let mut slots = self.slots();
        if let Some(Slot::Live(l)) = slots.get_mut(&entry.id)
            && Arc::ptr_eq(&l.entry, entry)
        {
            l.connections = l.connections.saturating_sub(1);
            if l.connections == 0 && l.expired(now) {
                slots.insert(
                    entry.id,
                    Slot::Gone {
                        why: Refusal::Expired,
                        since: now,
                    },
                );
                tracing::debug!(handle = %format_args!("{:#018x}", entry.id), "image reaped after its last child left");
            }
        }
        drop(slots);
        self.counters.children_attached.fetch_sub(1, Relaxed);
    }

    /// Extends the lease by its length from now. A lapsed lease cannot be renewed: once
    /// children were refused `Expired`, the image stays ended.
    pub fn renew(&self, handle: u64) -> Result<(), Refusal> {
        let now = Instant::now();
        match self.slots().get_mut(&handle) {
            None => Err(Refusal::Unknown),
            Some(Slot::Gone { why, .. }) => Err(*why),
            Some(Slot::Live(l)) if l.expired(now) => Err(Refusal::Expired),
            Some(Slot::Live(l)) => {
                l.expires = now.checked_add(l.lease);
                Ok(())
            }
        }
    }

    /// Ends the image now, lease or not: new children are refused `Revoked`, attached ones
    /// at their next read. Its memfd closes when the last connection holding it ends.
    pub fn revoke(&self, handle: u64) -> Result<(), Refusal> {
        let mut slots = self.slots();
        match slots.get(&handle) {
            None => return Err(Refusal::Unknown),
            Some(Slot::Gone { why, .. }) => return Err(*why),
            Some(Slot::Live(l)) => l.entry.revoked.store(true, Relaxed),
        }
        slots.insert(
            handle,
            Slot::Gone {
                why: Refusal::Revoked,
                since: Instant::now(),
            },
        );
        tracing::debug!(handle = %format_args!("{handle:#018x}"), "image revoked");
        Ok(())
    }

    /// Drops images whose lease lapsed with no child attached (closing their memfds) and
    /// tombstones older than the TTL. Returns how many images it dropped. The page server
    /// calls it periodically.
    pub fn reap(&self) -> usize {
        let now = Instant::now();
        let ttl = self.tombstone_ttl;
        let mut reaped = 0;
        let mut slots = self.slots();
        slots.retain(|_, slot| match slot {
            Slot::Gone { since, .. } => now.saturating_duration_since(*since) < ttl,
            Slot::Live(_) => true,
        });
        for slot in slots.values_mut() {
            if let Slot::Live(l) = slot
                && l.connections == 0
                && l.expired(now)
            {
                *slot = Slot::Gone {
                    why: Refusal::Expired,
                    since: now,
                };
                reaped += 1;
            }
        }
        reaped
    }

    /// Attached children and lease left of a live image (one whose lease lapsed counts while
    /// children are attached).
    pub fn status(&self, handle: u64) -> Result<ImageStatus, Refusal> {
        let now = Instant::now();
        match self.slots().get(&handle) {
            None => Err(Refusal::Unknown),
            Some(Slot::Gone { why, .. }) => Err(*why),
            Some(Slot::Live(l)) => Ok(ImageStatus {
                connections: l.connections,
                lease_left: l.expires.map(|e| e.saturating_duration_since(now)),
                pages_served: l.entry.pages_served.load(Relaxed),
                bytes_served: l.entry.bytes_served.load(Relaxed),
            }),
        }
    }

    pub fn stats(&self) -> Stats {
        let c = &*self.counters;
        let r = |b: Bucket| c.refused[b as usize].load(Relaxed);
        Stats {
            images_alive: c.images_alive.load(Relaxed),
            images_published: c.images_published.load(Relaxed),
            connections_open: c.connections_open.load(Relaxed),
            children_attached: c.children_attached.load(Relaxed),
            handshakes_ok: c.handshakes_ok.load(Relaxed),
            reads: c.reads.load(Relaxed),
            pages_served: c.pages_served.load(Relaxed),
            zero_pages_served: c.zero_pages_served.load(Relaxed),
            bytes_served: c.bytes_served.load(Relaxed),
            memfd_bytes_read: c.memfd_bytes_read.load(Relaxed),
            timeouts: c.timeouts.load(Relaxed),
            rdma_connects_ok: c.rdma_connects_ok.load(Relaxed),
            rdma_unavailable: c.rdma_unavailable.load(Relaxed),
            refusals: RefusalCounts {
                unknown_handle: r(Bucket::UnknownHandle),
                bad_proof: r(Bucket::BadProof),
                expired: r(Bucket::Expired),
                revoked: r(Bucket::Revoked),
                bad_request: r(Bucket::BadRequest),
                malformed: r(Bucket::Malformed),
                busy: r(Bucket::Busy),
                internal: r(Bucket::Internal),
            },
        }
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }
}

/// A child attached to an image (see [`ImageRegistry::attach`]); detaches on drop.
pub struct Attachment {
    registry: Arc<ImageRegistry>,
    entry: Arc<Entry>,
}

impl Attachment {
    pub fn entry(&self) -> &Arc<Entry> {
        &self.entry
    }
}

impl fmt::Debug for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Attachment").field(&self.entry).finish()
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.registry.detach(&self.entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::memfd::{MFdFlags, memfd_create};

    const MIB: usize = 1 << 20;

    fn pattern(pages: usize) -> Vec<u8> {
        let mut m = vec![0u8; pages * PAGE as usize];
        for (i, page) in m.chunks_mut(PAGE as usize).enumerate() {
            if i % 3 != 0 {
                page.iter_mut()
                    .enumerate()
                    .for_each(|(j, b)| *b = (i * 7 + j) as u8 | 1);
            }
        }
        m
    }

    fn image(lease: Duration) -> PublishedImage {
        PublishedImage::from_memory("test", &pattern(MIB / PAGE as usize), lease).unwrap()
    }

    #[test]
    fn publish_names_images_with_fresh_ids_and_keys() {
        let reg = ImageRegistry::new();
        let a = reg.publish(image(Duration::from_secs(60))).unwrap();
        let b = reg.publish(image(Duration::from_secs(60))).unwrap();
        assert!(a.id != 0 && b.id != 0 && a.id != b.id);
        assert_ne!(a.key, b.key);
        assert_eq!(a.memory_bytes, MIB as u64);
        let e = reg.lookup(a.id).unwrap();
        assert_eq!(e.page_count(), 256);
        assert!(!e.is_nonzero(0) && e.is_nonzero(1) && !e.is_nonzero(256));
        let s = reg.stats();
        assert_eq!((s.images_alive, s.images_published), (2, 2));
        let dbg = format!("{a:?}");
        assert!(dbg.contains("<redacted>") && !dbg.contains(&format!("{:?}", a.key)));
    }

    #[test]
    fn read_pages_reads_only_nonzero_runs() {
        let reg = ImageRegistry::new();
        let mem = pattern(256);
        let h = reg
            .publish(PublishedImage::from_memory("t", &mem, Duration::from_secs(60)).unwrap())
            .unwrap();
        let e = reg.lookup(h.id).unwrap();
        let mut dst = vec![0xffu8; 10 * PAGE as usize];
        let read = e.read_pages(3, &mut dst).unwrap();
        assert_eq!(&dst[..], &mem[3 * PAGE as usize..13 * PAGE as usize]);
        // Pages 3, 6, 9, 12 are zero: 6 of the 10 are read.
        assert_eq!(read, 6 * PAGE);
        assert_eq!(reg.stats().memfd_bytes_read, 6 * PAGE);
        assert!(e.read_pages(250, &mut dst).is_err());
        assert!(e.read_pages(u64::MAX, &mut dst).is_err());
        assert!(e.read_pages(0, &mut dst[..100]).is_err());
    }

    #[test]
    fn publish_refuses_bad_images() {
        let reg = ImageRegistry::new();
        let ok = || image(Duration::from_secs(1));
        let cases: Vec<(PublishedImage, &str)> = vec![
            (
                PublishedImage {
                    memory_bytes: WASM_PAGE + PAGE,
                    ..ok()
                },
                "Wasm pages",
            ),
            (
                PublishedImage {
                    memory_bytes: MAX_MEMORY + WASM_PAGE,
                    ..ok()
                },
                "larger than",
            ),
            (
                PublishedImage {
                    nonzero: vec![0; 3],
                    ..ok()
                },
                "3 words",
            ),
            (
                PublishedImage {
                    memory_bytes: 2 * MIB as u64,
                    nonzero: vec![0; 8],
                    ..ok()
                },
                "shorter than",
            ),
            (
                PublishedImage {
                    memfd: memfd_create("plain", MFdFlags::MFD_CLOEXEC).unwrap(),
                    ..ok()
                },
                "sealed",
            ),
        ];
        for (img, want) in cases {
            let err = reg.publish(img).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should mention {want}");
        }
        // A bitmap bit past the last page: one Wasm page is 16 pages, one word.
        let one = PublishedImage::from_memory("one", &pattern(16), Duration::from_secs(1)).unwrap();
        let err = reg
            .publish(PublishedImage {
                nonzero: vec![1 << 16],
                ..one
            })
            .unwrap_err();
        assert!(
            matches!(err, PublishError::BitmapPastEnd { pages: 16 }),
            "{err}"
        );
        // Every refused memfd was closed; none counted as alive.
        assert_eq!(reg.stats().images_alive, 0);
    }

    #[test]
    fn revoke_leaves_a_tombstone_that_says_so() {
        let reg = Arc::new(ImageRegistry::with_tombstone_ttl(Duration::from_millis(50)));
        let h = reg.publish(image(Duration::from_secs(60))).unwrap();
        assert_eq!(reg.lookup(0xdead).unwrap_err(), Refusal::Unknown);
        let e = reg.lookup(h.id).unwrap();
        let att = reg.attach(&e).unwrap();
        assert_eq!(reg.status(h.id).unwrap().connections, 1);
        assert_eq!(reg.revoke(h.id), Ok(()));
        assert!(e.is_revoked());
        assert_eq!(reg.lookup(h.id).unwrap_err(), Refusal::Revoked);
        assert_eq!(reg.renew(h.id), Err(Refusal::Revoked));
        assert_eq!(reg.revoke(h.id), Err(Refusal::Revoked));
        assert_eq!(reg.attach(&e).unwrap_err(), Refusal::Revoked);
        // The attached child and this test still hold the memfd open.
        assert_eq!(reg.stats().images_alive, 1);
        drop(att);
        drop(e);
        assert_eq!(reg.stats().images_alive, 0);
        assert_eq!(reg.stats().children_attached, 0);
        std::thread::sleep(Duration::from_millis(60));
        reg.reap();
        assert_eq!(reg.lookup(h.id).unwrap_err(), Refusal::Unknown);
    }

    #[test]
    fn lease_expiry_renewal_and_reaping() {
        let reg = Arc::new(ImageRegistry::new());
        let lease = Duration::from_millis(150);
        let h = reg.publish(image(lease)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(reg.renew(h.id), Ok(()));
        std::thread::sleep(Duration::from_millis(100));
        // 200 ms after publishing, alive thanks to the renewal.
        let e = reg.lookup(h.id).unwrap();
        let att = reg.attach(&e).unwrap();
        drop(e);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(reg.lookup(h.id).unwrap_err(), Refusal::Expired);
        assert_eq!(reg.renew(h.id), Err(Refusal::Expired));
        // Attached: not reaped, memfd open.
        assert_eq!(reg.reap(), 0);
        assert_eq!(reg.stats().images_alive, 1);
        assert_eq!(
            reg.status(h.id).unwrap(),
            ImageStatus {
                connections: 1,
                lease_left: Some(Duration::ZERO),
                pages_served: 0,
                bytes_served: 0,
            }
        );
        att.entry().count_served(2, 1, 4200);
        let status = reg.status(h.id).unwrap();
        assert_eq!((status.pages_served, status.bytes_served), (2, 4200));
        assert_eq!(reg.stats().pages_served, 2);
        let mut page = vec![0u8; PAGE as usize];
        att.entry().read_pages(1, &mut page).unwrap();
        // The last child leaving reaps it on the spot.
        drop(att);
        assert_eq!(reg.stats().images_alive, 0);
        assert_eq!(reg.lookup(h.id).unwrap_err(), Refusal::Expired);

        // Nobody attached: reap() drops it.
        let h2 = reg.publish(image(Duration::from_millis(20))).unwrap();
        assert_eq!(reg.stats().images_alive, 1);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(reg.reap(), 1);
        assert_eq!(reg.stats().images_alive, 0);
        assert_eq!(reg.status(h2.id).unwrap_err(), Refusal::Expired);
    }

    #[test]
    fn huge_lease_never_expires() {
        let reg = ImageRegistry::new();
        let h = reg.publish(image(Duration::MAX)).unwrap();
        assert_eq!(reg.status(h.id).unwrap().lease_left, None);
        assert_eq!(reg.renew(h.id), Ok(()));
        assert_eq!(reg.reap(), 0);
        assert!(reg.lookup(h.id).is_ok());
    }
}
