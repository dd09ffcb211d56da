//! The per-chain shared-memory arena: fixed-size slots shared by the gateway and the chain's
//! worker processes, and the allocator state only the gateway may change.
//!
//! # Layout
//!
//! Two memfds, because a process holding a memfd opened read-write can always map it
//! writable again: the only way to keep workers from writing part of the arena is to put
//! that part in a file the kernel will not let anyone map writable any more.
//!
//! ```text
//! metadata memfd (normal pages): written by the gateway alone, mapped read-only by workers
//! 0     Header, 64 bytes (fixed at create)
//!         0 magic u64 = "SPDLAREN"   8 version u32   12 flags u32 (bit 0: payload on hugetlb)
//!        16 slot_size u32   20 slot_count u32   24 payload_len u64   32 meta_len u64
//!        40 large_slot_size u32   44 large_slot_count u32   48 large_offset u64
//!        (the large class; all 0 when the arena has only small slots)
//! 64    Slot records, 16 bytes per slot, small slots then large ones:
//!         +0 state AtomicU64 = generation << 32 | (0 free, 1 in use)
//!         +8 request_id AtomicU64: the request the slot was last allocated for
//! meta_len = 64 + 16 * (slot_count + large_slot_count) rounded up to the page size.
//! Sealed SHRINK | GROW | FUTURE_WRITE | SEAL once the gateway has mapped it writable: its
//! own mapping keeps working; write(2), a new writable shared mmap and mprotect of a
//! read-only shared mapping to writable all fail, for every process.
//!
//! payload memfd (2 MiB hugetlb pages when available and the arena has no large class):
//! mapped read-write by everyone
//! 0     small slot i (i < slot_count) at i * slot_size; slot_size is a multiple of 64, so
//!       every slot is cache-line aligned.
//! large_offset = slot_count * slot_size rounded up to the page size
//!       large slot i (slot_count <= i < slot_count + large_slot_count) at
//!       large_offset + (i - slot_count) * large_slot_size; large_slot_size is a multiple
//!       of the page size, so every large slot is page-aligned (a worker can map one over
//!       a window of its guest's memory, and the gateway can drop its pages on release).
//! payload_len = large_offset + large_slot_size * large_slot_count (slot_count * slot_size
//! without a large class), rounded up to 2 MiB when backed by hugetlb.
//! Sealed SHRINK | GROW | SEAL: nobody can truncate it under the others (SIGBUS) or add a
//! write seal that would stop the next worker from mapping it.
//!
//! gateway memory only: one free list per class, a tagged Treiber stack (head = tag << 32 |
//! index, one next link per slot) and the free count.
//! ```
//!
//! # Size classes
//!
//! Slot indices form one space across both classes, so a descriptor needs no class field:
//! the index says which class the slot is in, and the class says how many bytes `len` may
//! be. A memfd is sparse, so large slots cost nothing until written, and
//! [`Arena::release`] gives a large slot's pages past its first MiB back to the kernel
//! (`MADV_REMOVE`) before it is free again, so memory does not stay at the high-water mark
//! of the largest request seen, while mid-sized bodies do not fault their pages in anew on
//! every request. Hugetlb is not used with a large class: huge pages are reserved for the whole
//! mapping up front (which would make the sparse large class cost its full size), and a
//! large slot must be mappable at 4 KiB granularity.
//!
//! # Ownership protocol
//!
//! A slot belongs to whoever holds the descriptor naming its current generation and request
//! id; ownership moves by sending the descriptor. Only the gateway allocates and releases
//! ([`Arena::alloc`], [`Arena::release`]: lock-free across its threads); workers map the same
//! slots through an [`ArenaView`], which can check descriptors and copy payload bytes but has
//! no way to change allocator state. Release bumps the generation, and alloc records the
//! request id, so stale, replayed or forged descriptors are rejected by `check`, `read` and
//! `write` instead of touching a slot that belongs to another request.
//!
//! The checks are not a lock: a peer that ignores the protocol can scribble over any slot's
//! payload bytes, and nothing stops that short of a mapping per slot. What no peer can do is
//! change a slot's state, generation or request id, corrupt the free list, or make another
//! process access memory outside its mapping: slot size, slot count and lengths are
//! validated once when mapping and cached locally, every index is range-checked, and payload
//! bytes are only ever copied through raw pointers (never exposed as Rust slices, which
//! would assert nobody else writes them).

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*, fence};

use memmap2::{MmapOptions, MmapRaw};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::unistd::{SysconfVar, ftruncate, sysconf};

use proto::Descriptor;

const MAGIC: u64 = u64::from_le_bytes(*b"SPDLAREN");
/// 2: metadata and payload in separate memfds, request id recorded per slot.
/// 3: an optional class of large slots after the small ones.
const VERSION: u32 = 3;
const FLAG_HUGETLB: u32 = 1;

/// Slot index meaning "end of the free list".
const NIL: u32 = u32::MAX;
const FREE: u32 = 0;
const IN_USE: u32 = 1;
/// Generation 0 is never handed out, so an all-zero descriptor never names a live slot.
const FIRST_GENERATION: u32 = 1;

pub const SLOT_ALIGN: u32 = 64;
pub const MAX_SLOTS: u32 = 1 << 24;
/// Upper bound on the payload mapping; far above any sane chain, low enough to catch typos.
pub const MAX_ARENA_BYTES: u64 = 1 << 36;
const HUGE_PAGE: usize = 2 << 20;

/// What a worker needs so that no other worker can change it under it: every seal but
/// F_SEAL_SEAL (which only matters to whoever could still add seals).
const META_SEALS: SealFlag = SealFlag::F_SEAL_SHRINK
    .union(SealFlag::F_SEAL_GROW)
    .union(SealFlag::F_SEAL_FUTURE_WRITE);

#[repr(C, align(64))]
struct Header {
    magic: AtomicU64,
    version: AtomicU32,
    flags: AtomicU32,
    slot_size: AtomicU32,
    slot_count: AtomicU32,
    payload_len: AtomicU64,
    meta_len: AtomicU64,
    large_slot_size: AtomicU32,
    large_slot_count: AtomicU32,
    large_offset: AtomicU64,
}

/// What workers read to decide whether a descriptor names a live slot.
#[repr(C)]
struct SlotMeta {
    state: AtomicU64,
    request_id: AtomicU64,
}

const HEADER_SIZE: usize = size_of::<Header>();
const _: () = assert!(HEADER_SIZE == 64 && size_of::<SlotMeta>() == 16);
const _: () = assert!(align_of::<Header>() == 64 && align_of::<SlotMeta>() == 8);

fn pack(hi: u32, lo: u32) -> u64 {
    (hi as u64) << 32 | lo as u64
}

fn unpack(v: u64) -> (u32, u32) {
    ((v >> 32) as u32, v as u32)
}

fn next_generation(g: u32) -> u32 {
    g.checked_add(1).unwrap_or(FIRST_GENERATION)
}

fn page_size() -> usize {
    sysconf(SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| usize::try_from(p).ok())
        .unwrap_or(4096)
}

/// A slot handed out by [`Arena::alloc`]: its index and the generation it was allocated at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotRef {
    pub index: u32,
    pub generation: u32,
}

/// Which size class a slot belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SlotClass {
    /// The chain's ordinary slots, indices `0..small.count`.
    Small,
    /// The optional class of large slots, indices after the small ones.
    Large,
}

impl SlotClass {
    pub const ALL: [SlotClass; 2] = [SlotClass::Small, SlotClass::Large];

    /// The `class` label value in metrics.
    pub fn label(self) -> &'static str {
        match self {
            SlotClass::Small => "small",
            SlotClass::Large => "large",
        }
    }
}

/// How many slots of which size one class has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassSpec {
    /// Bytes per slot: a multiple of 64 (small), of the page size (large).
    pub slot_size: u32,
    pub slot_count: u32,
}

/// An arena's classes: always small slots, optionally larger ones for big payloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArenaSpec {
    pub small: ClassSpec,
    pub large: Option<ClassSpec>,
}

impl ArenaSpec {
    /// Only small slots, as arenas were before size classes.
    pub fn single(slot_size: u32, slot_count: u32) -> ArenaSpec {
        ArenaSpec {
            small: ClassSpec {
                slot_size,
                slot_count,
            },
            large: None,
        }
    }
}

/// Validated geometry of one class: where its slots start in the index space and the
/// payload memfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    first_index: u32,
    count: u32,
    slot_size: u32,
    /// Byte offset of the class's first slot in the payload memfd.
    offset: usize,
}

impl Geometry {
    fn contains(&self, index: u32) -> bool {
        index
            .checked_sub(self.first_index)
            .is_some_and(|i| i < self.count)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    #[error("invalid arena parameters: {0}")]
    InvalidParams(String),
    #[error("not a valid arena: {0}")]
    BadHeader(String),
    #[error("arena full: every slot of the class is in use")]
    Full,
    #[error("the arena has no {0:?} slot class")]
    NoSuchClass(SlotClass),
    #[error("slot {index} out of range (arena has {count} slots)")]
    OutOfRange { index: u32, count: u32 },
    #[error("slot {index} generation {generation} is stale (current {current})")]
    StaleSlot {
        index: u32,
        generation: u32,
        current: u32,
    },
    #[error(
        "slot {index} generation {generation} is not in use (slot is free at generation \
         {current}): released twice or used after release"
    )]
    NotInUse {
        index: u32,
        generation: u32,
        current: u32,
    },
    #[error(
        "slot {index} was allocated for request {recorded}, not request {request_id}: \
         a replayed or forged descriptor"
    )]
    RequestMismatch {
        index: u32,
        request_id: u64,
        recorded: u64,
    },
    #[error("access of {len} bytes at offset {offset} exceeds slot size {slot_size}")]
    OutOfBounds {
        offset: usize,
        len: usize,
        slot_size: u32,
    },
    #[error("descriptor len {len} exceeds slot size {slot_size}")]
    LenTooLarge { len: u32, slot_size: u32 },
    #[error("descriptor reserved field is {0:#x}, must be 0")]
    ReservedNotZero(u32),
    #[error("arena metadata corrupted: {0}")]
    Corrupted(String),
    #[error("{op} failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

fn os_err(op: &'static str) -> impl FnOnce(Errno) -> ArenaError {
    move |errno| ArenaError::Io {
        op,
        source: io::Error::from(errno),
    }
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> ArenaError {
    move |source| ArenaError::Io { op, source }
}

/// How big each memfd is for given parameters; the one place sizes are computed.
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    meta_len: usize,
    /// Bytes of payload actually used; the payload memfd may be longer (hugepage rounding).
    payload_used: usize,
    small: Geometry,
    large: Option<Geometry>,
}

impl Layout {
    fn slot_count(&self) -> u32 {
        self.small.count + self.large.map_or(0, |l| l.count)
    }
}

fn layout(spec: &ArenaSpec) -> Result<Layout, ArenaError> {
    let bad = |m: String| Err(ArenaError::InvalidParams(m));
    let ClassSpec {
        slot_size,
        slot_count,
    } = spec.small;
    if slot_size == 0 {
        return bad("slot_size must be > 0".into());
    }
    if !slot_size.is_multiple_of(SLOT_ALIGN) {
        return bad(format!(
            "slot_size {slot_size} is not a multiple of {SLOT_ALIGN}"
        ));
    }
    if !(1..=MAX_SLOTS).contains(&slot_count) {
        return bad(format!("slot_count {slot_count} not in 1..={MAX_SLOTS}"));
    }
    let small_bytes = slot_size as u64 * slot_count as u64;
    let small = Geometry {
        first_index: 0,
        count: slot_count,
        slot_size,
        offset: 0,
    };
    let (payload, large) = match spec.large {
        None => (small_bytes, None),
        Some(l) => {
            let page = page_size() as u32;
            if l.slot_size <= slot_size || !l.slot_size.is_multiple_of(page) {
                return bad(format!(
                    "large slot_size {} must be a multiple of the page size ({page}) and \
                     larger than the small slot_size {slot_size}",
                    l.slot_size
                ));
            }
            if l.slot_count == 0 || l.slot_count > MAX_SLOTS - slot_count {
                return bad(format!(
                    "large slot_count {} not in 1..={}",
                    l.slot_count,
                    MAX_SLOTS - slot_count
                ));
            }
            let offset = small_bytes.next_multiple_of(page as u64);
            let end = offset + l.slot_size as u64 * l.slot_count as u64;
            (end, Some((offset, l)))
        }
    };
    if payload > MAX_ARENA_BYTES {
        return bad(format!(
            "the arena's slots need {payload} bytes, over the {MAX_ARENA_BYTES}-byte limit"
        ));
    }
    let large = large.map(|(offset, l)| Geometry {
        first_index: slot_count,
        count: l.slot_count,
        slot_size: l.slot_size,
        offset: offset as usize,
    });
    let total = slot_count as usize + large.map_or(0, |l| l.count as usize);
    let meta_len = (HEADER_SIZE + total * size_of::<SlotMeta>()).next_multiple_of(page_size());
    Ok(Layout {
        meta_len,
        payload_used: payload as usize,
        small,
        large,
    })
}

fn seals(fd: BorrowedFd<'_>) -> SealFlag {
    fcntl(fd, FcntlArg::F_GET_SEALS)
        .map(SealFlag::from_bits_retain)
        .unwrap_or(SealFlag::empty())
}

fn file_len(file: &File) -> Result<u64, ArenaError> {
    Ok(file.metadata().map_err(io_err("fstat"))?.len())
}

/// The two mappings and their validated geometry: what the gateway and a worker share.
/// Only the gateway's [`Arena`] has the metadata mapped writable, and only it writes there.
struct Mapping {
    meta: MmapRaw,
    payload: MmapRaw,
    // Validated copies; never re-read from the shared header.
    small: Geometry,
    large: Option<Geometry>,
    /// Slots of both classes.
    slot_count: u32,
    hugepages: bool,
}

impl Mapping {
    fn header(&self) -> &Header {
        // SAFETY: the metadata mapping is page-aligned (>= align_of::<Header>()) and at least
        // meta_len >= HEADER_SIZE bytes (create sized it, from_fds checked it); it lives as
        // long as `self`. Header is all atomics, so a writer elsewhere is not a data race.
        // Only the gateway's Arena calls this (its mapping is writable); a worker reads its
        // read-only header once, in ArenaView::from_fds.
        unsafe { &*(self.meta.as_ptr() as *const Header) }
    }

    /// Record of slot `index`, or None if out of range.
    fn slot_meta(&self, index: u32) -> Option<&SlotMeta> {
        if index >= self.slot_count {
            return None;
        }
        let off = HEADER_SIZE + index as usize * size_of::<SlotMeta>();
        // SAFETY: index < slot_count, so the record lies in [HEADER_SIZE, meta_len), inside
        // the mapping; HEADER_SIZE and the 16-byte stride keep it 8-aligned on a page-aligned
        // base. SlotMeta is atomics. A worker's mapping is read-only, and a worker only ever
        // loads them (Relaxed, 8 bytes: allowed on read-only memory), in `state` and `check`.
        Some(unsafe { &*(self.meta.as_ptr().add(off) as *const SlotMeta) })
    }

    /// The class of slot `index` and its geometry; None if out of range.
    fn class_of(&self, index: u32) -> Option<(SlotClass, &Geometry)> {
        if self.small.contains(index) {
            return Some((SlotClass::Small, &self.small));
        }
        self.large
            .as_ref()
            .filter(|l| l.contains(index))
            .map(|l| (SlotClass::Large, l))
    }

    fn geometry(&self, class: SlotClass) -> Option<&Geometry> {
        match class {
            SlotClass::Small => Some(&self.small),
            SlotClass::Large => self.large.as_ref(),
        }
    }

    /// Byte offset of slot `index` in the payload memfd and its capacity, range-checked.
    fn placement(&self, index: u32) -> Result<(usize, u32), ArenaError> {
        let (_, g) = self.class_of(index).ok_or(ArenaError::OutOfRange {
            index,
            count: self.slot_count,
        })?;
        let local = (index - g.first_index) as usize;
        Ok((g.offset + local * g.slot_size as usize, g.slot_size))
    }

    fn slot_meta_checked(&self, index: u32) -> Result<&SlotMeta, ArenaError> {
        self.slot_meta(index).ok_or(ArenaError::OutOfRange {
            index,
            count: self.slot_count,
        })
    }

    /// A slot's state word, synchronised with the gateway's last change of it. A Relaxed
    /// load then a fence rather than an Acquire load: in a worker the word is read-only
    /// memory, where std allows only Relaxed atomic loads. On x86 both compile to a plain mov.
    fn state(meta: &SlotMeta) -> u64 {
        let state = meta.state.load(Relaxed);
        fence(Acquire);
        state
    }

    fn state_error(slot: SlotRef, state: u64) -> ArenaError {
        let (current, s) = unpack(state);
        if s == IN_USE {
            ArenaError::StaleSlot {
                index: slot.index,
                generation: slot.generation,
                current,
            }
        } else {
            ArenaError::NotInUse {
                index: slot.index,
                generation: slot.generation,
                current,
            }
        }
    }

    /// `slot` is in range and currently allocated at its generation.
    fn validate(&self, slot: SlotRef) -> Result<&SlotMeta, ArenaError> {
        let meta = self.slot_meta_checked(slot.index)?;
        let state = Self::state(meta);
        if state == pack(slot.generation, IN_USE) {
            Ok(meta)
        } else {
            Err(Self::state_error(slot, state))
        }
    }

    fn check(&self, d: &Descriptor) -> Result<SlotRef, ArenaError> {
        if d.reserved != 0 {
            return Err(ArenaError::ReservedNotZero(d.reserved));
        }
        // The capacity depends on the slot's class, which its index names.
        let (_, capacity) = self.placement(d.slot)?;
        if d.len > capacity {
            return Err(ArenaError::LenTooLarge {
                len: d.len,
                slot_size: capacity,
            });
        }
        let slot = SlotRef {
            index: d.slot,
            generation: d.generation,
        };
        let meta = self.validate(slot)?;
        // Read after the state: alloc stores the id before publishing the state (Release),
        // so this sees the id of the allocation validated above or of a later one, and a
        // later one means the descriptor is stale anyway.
        let recorded = meta.request_id.load(Relaxed);
        if recorded != d.request_id {
            return Err(ArenaError::RequestMismatch {
                index: d.slot,
                request_id: d.request_id,
                recorded,
            });
        }
        Ok(slot)
    }

    /// Pointer to `len` bytes at `offset` in a validated slot.
    fn span(&self, slot: SlotRef, offset: usize, len: usize) -> Result<*mut u8, ArenaError> {
        self.validate(slot)?;
        let (start, capacity) = self.placement(slot.index)?;
        if offset
            .checked_add(len)
            .is_none_or(|end| end > capacity as usize)
        {
            return Err(ArenaError::OutOfBounds {
                offset,
                len,
                slot_size: capacity,
            });
        }
        let at = start + offset;
        // SAFETY: the slot is in range (placement), its class's slots lie within
        // payload_used <= payload.len() (layout, checked when mapping), and
        // offset + len <= its capacity, so [at, at + len) is inside the mapping.
        Ok(unsafe { self.payload.as_mut_ptr().add(at) })
    }

    fn write(&self, slot: SlotRef, offset: usize, src: &[u8]) -> Result<(), ArenaError> {
        let dst = self.span(slot, offset, src.len())?;
        // SAFETY: `dst` is valid for src.len() bytes (span) in the read-write payload
        // mapping; `src` is a Rust slice, which cannot overlap the mapping because we never
        // hand out slices into it.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
        Ok(())
    }

    fn read(&self, slot: SlotRef, offset: usize, dst: &mut [u8]) -> Result<(), ArenaError> {
        let src = self.span(slot, offset, dst.len())?;
        // SAFETY: as in `write`, with the roles swapped.
        unsafe { ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
}

/// The methods the gateway's [`Arena`] and a worker's [`ArenaView`] share, all reading the
/// metadata only.
macro_rules! slot_access {
    () => {
        /// Bytes per small slot (the only class of an arena without a large one).
        pub fn slot_size(&self) -> u32 {
            self.map.small.slot_size
        }

        /// Slots of every class: descriptor slot indices are `0..slot_count()`.
        pub fn slot_count(&self) -> u32 {
            self.map.slot_count
        }

        /// Bytes per slot of `class` and how many there are; None for a class the arena
        /// does not have.
        pub fn class(&self, class: SlotClass) -> Option<ClassSpec> {
            self.map.geometry(class).map(|g| ClassSpec {
                slot_size: g.slot_size,
                slot_count: g.count,
            })
        }

        /// The largest payload any slot can hold.
        pub fn max_slot_size(&self) -> u32 {
            self.map
                .large
                .map_or(self.map.small.slot_size, |l| l.slot_size)
        }

        /// The class of slot `index` and its capacity in bytes; None if out of range.
        pub fn slot_class(&self, index: u32) -> Option<(SlotClass, u32)> {
            self.map.class_of(index).map(|(c, g)| (c, g.slot_size))
        }

        /// Capacity in bytes of slot `index` (its class's slot size); 0 if out of range, so
        /// every `len` but 0 fails against it.
        pub fn capacity(&self, index: u32) -> u32 {
            self.slot_class(index).map_or(0, |(_, size)| size)
        }

        /// Whether the payload memfd is on 2 MiB hugetlb pages.
        pub fn uses_hugepages(&self) -> bool {
            self.map.hugepages
        }

        /// Validates a received descriptor against this arena: slot in range and in use at
        /// the descriptor's generation, allocated for the descriptor's request id,
        /// `len <=` the capacity of the slot's class, `reserved == 0`. Call it on every descriptor; the chain id is
        /// the caller's business (it picked this arena by it).
        pub fn check(&self, d: &Descriptor) -> Result<SlotRef, ArenaError> {
            self.map.check(d)
        }

        /// Copies `src` into the slot at `offset`. The caller must own the slot.
        pub fn write(&self, slot: SlotRef, offset: usize, src: &[u8]) -> Result<(), ArenaError> {
            self.map.write(slot, offset, src)
        }

        /// Copies `dst.len()` bytes from the slot at `offset` into `dst`.
        pub fn read(&self, slot: SlotRef, offset: usize, dst: &mut [u8]) -> Result<(), ArenaError> {
            self.map.read(slot, offset, dst)
        }

        /// Where the slot's bytes are in the payload memfd, `(offset, capacity)`, after the
        /// same generation check as `read`, when the range can be mapped on its own
        /// (page-aligned, whole pages, normal pages; large slots always are): for mapping
        /// a slot into a guest's memory. `Ok(None)` for a slot that cannot be.
        pub fn mappable_range(&self, slot: SlotRef) -> Result<Option<(u64, u32)>, ArenaError> {
            self.map.validate(slot)?;
            let (offset, capacity) = self.map.placement(slot.index)?;
            let page = page_size();
            let whole_pages =
                offset.is_multiple_of(page) && (capacity as usize).is_multiple_of(page);
            Ok((whole_pages && !self.map.hugepages).then_some((offset as u64, capacity)))
        }

        /// Start of the slot's payload, after the same generation check as `read`, for
        /// copying straight between the slot and another buffer (e.g. Wasm linear memory).
        ///
        /// The pointer is valid for reads and writes of `capacity(slot.index)` bytes,
        /// 64-byte aligned (page-aligned for a large slot),
        /// for as long as this value is alive. Dereferencing it is `unsafe` and sound only
        /// if the caller:
        /// - owns the slot (holds its current descriptor) for the whole access, so no other
        ///   thread or well-behaved process touches the bytes meanwhile;
        /// - uses raw-pointer copies (`ptr::copy_nonoverlapping`, `read_volatile`, ...) and
        ///   never turns it into `&[u8]`/`&mut [u8]`: another process may still write there.
        pub fn slot_ptr(&self, slot: SlotRef) -> Result<*mut u8, ArenaError> {
            self.map.span(slot, 0, 0)
        }
    };
}

/// The gateway's side of one chain's arena: creates both memfds and is the only process
/// that allocates and releases slots. `Send + Sync`: share it via `Arc`.
pub struct Arena {
    map: Mapping,
    meta_fd: OwnedFd,
    payload_fd: OwnedFd,
    small_free: FreeList,
    large_free: Option<FreeList>,
    /// Free large slots allowed to keep their pages (see [`Arena::set_warm_large_slots`]).
    warm_budget: u32,
    /// Bytes at the start of each large slot a release never gives back.
    kept_prefix: usize,
    /// Free large slots that kept their pages, and per large slot whether it did.
    warm_free: AtomicU32,
    warm: Box<[std::sync::atomic::AtomicBool]>,
}

/// Free large slots that keep their pages by default: one, so a stream of large requests one
/// at a time reuses a slot whose pages are already there (writing 10 MiB into fresh memfd
/// pages costs ~13 ms here, into resident ones ~0.8 ms, and dropping them ~3.7 ms), while
/// at rest the arena holds at most one large slot's worth.
pub const DEFAULT_WARM_LARGE_SLOTS: u32 = 1;

/// Bytes at the start of every large slot whose pages a release keeps (see
/// [`Arena::set_kept_prefix`]): writing into given-back pages costs ~1.2 µs more per 4 KiB
/// page (`release_cost`), paid by every process that writes the slot on every request,
/// while 8 slots × 1 MiB is a small bound at rest.
pub const DEFAULT_KEPT_PREFIX: usize = 1 << 20;

/// The free list: every alloc and release writes the head's line, so it gets one of its
/// own. Lives in the gateway's memory only; no worker can see or touch it.
#[repr(C, align(64))]
struct FreeHead {
    /// tag << 32 | local index of the top free slot (NIL: none). The tag changes on every
    /// successful CAS, so a pop that read a stale link cannot succeed (ABA).
    head: AtomicU64,
    count: AtomicU32,
}

/// One class's free slots, by index local to the class.
struct FreeList {
    top: FreeHead,
    /// Per slot: the free slot below it on the stack.
    next: Box<[AtomicU32]>,
    /// Global index of the class's first slot.
    first_index: u32,
}

impl FreeList {
    fn new(g: &Geometry) -> FreeList {
        let count = g.count;
        FreeList {
            top: FreeHead {
                head: AtomicU64::new(pack(0, 0)),
                count: AtomicU32::new(count),
            },
            next: (0..count)
                .map(|i| AtomicU32::new(if i + 1 < count { i + 1 } else { NIL }))
                .collect(),
            first_index: g.first_index,
        }
    }

    /// Pops a free slot: its global index.
    fn pop(&self) -> Result<u32, ArenaError> {
        let head = &self.top.head;
        let mut cur = head.load(Acquire);
        loop {
            let (tag, local) = unpack(cur);
            if local == NIL {
                return Err(ArenaError::Full);
            }
            let link = self.next.get(local as usize).ok_or_else(|| {
                ArenaError::Corrupted(format!("free-list head {local} out of range"))
            })?;
            // If another thread pops `local` first, this may read a stale link, but then the
            // head's tag has moved on and the CAS below fails.
            let next = link.load(Relaxed);
            #[cfg(test)]
            if tests::YIELD_IN_POP.get() {
                std::thread::yield_now();
            }
            match head.compare_exchange_weak(cur, pack(tag.wrapping_add(1), next), AcqRel, Acquire)
            {
                Ok(_) => return Ok(self.first_index + local),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Pushes slot `index` (global, in this class: the caller checked).
    fn push(&self, index: u32) {
        let local = index - self.first_index;
        let head = &self.top.head;
        let link = &self.next[local as usize];
        let mut cur = head.load(Relaxed);
        loop {
            let (tag, top) = unpack(cur);
            link.store(top, Relaxed);
            // Release: the link and the previous owner's payload writes are visible to the
            // next popper.
            match head.compare_exchange_weak(
                cur,
                pack(tag.wrapping_add(1), local),
                Release,
                Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("meta_fd", &self.meta_fd.as_raw_fd())
            .field("payload_fd", &self.payload_fd.as_raw_fd())
            .field("small", &self.map.small)
            .field("large", &self.map.large)
            .field("free_slots", &self.free_slots())
            .field("hugepages", &self.map.hugepages)
            .finish()
    }
}

/// A memfd of `len` bytes mapped shared read-write; `huge` asks for 2 MiB hugetlb pages.
fn memfd_mapped(name: &CStr, len: usize, huge: bool) -> Result<(OwnedFd, MmapRaw), ArenaError> {
    let mut flags = MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING;
    if huge {
        flags |= MFdFlags::MFD_HUGETLB | MFdFlags::MFD_HUGE_2MB;
    }
    let fd = memfd_create(name, flags).map_err(os_err("memfd_create"))?;
    // `len` <= MAX_ARENA_BYTES rounded up to a hugepage, so it fits off_t.
    ftruncate(&fd, len as nix::libc::off_t).map_err(os_err("ftruncate"))?;
    let map = MmapOptions::new()
        .len(len)
        .map_raw(&fd)
        .map_err(io_err("mmap"))?;
    Ok((fd, map))
}

fn add_seals(fd: BorrowedFd<'_>, seals: SealFlag) -> Result<(), ArenaError> {
    fcntl(fd, FcntlArg::F_ADD_SEALS(seals)).map_err(os_err("fcntl(F_ADD_SEALS)"))?;
    Ok(())
}

impl Arena {
    /// Creates a new arena of `slot_count` slots of `slot_size` bytes (one class) in fresh
    /// memfds named after `name`, its payload on 2 MiB hugepages if the system has them
    /// available, otherwise on normal pages.
    pub fn create(name: &str, slot_size: u32, slot_count: u32) -> Result<Arena, ArenaError> {
        Self::create_with(name, &ArenaSpec::single(slot_size, slot_count), true)
    }

    /// Creates a new arena with the classes of `spec` (see the module docs: hugetlb only
    /// without a large class).
    pub fn create_classes(name: &str, spec: &ArenaSpec) -> Result<Arena, ArenaError> {
        Self::create_with(name, spec, true)
    }

    fn create_with(name: &str, spec: &ArenaSpec, try_hugepages: bool) -> Result<Arena, ArenaError> {
        let layout = layout(spec)?;
        let cname = |suffix: &str| {
            CString::new(format!("{name}{suffix}"))
                .map_err(|_| ArenaError::InvalidParams(format!("name {name:?} contains NUL")))
        };
        let payload_name = cname("")?;
        // Hugetlb usually has no pages reserved: ftruncate or mmap fails, which is not an
        // error for us, just a reason to use normal pages.
        let huge = (try_hugepages && layout.large.is_none())
            .then(|| {
                let len = layout.payload_used.next_multiple_of(HUGE_PAGE);
                memfd_mapped(&payload_name, len, true)
            })
            .and_then(Result::ok);
        let (payload_fd, payload, hugepages) = match huge {
            Some((fd, map)) => (fd, map, true),
            None => {
                let (fd, map) = memfd_mapped(&payload_name, layout.payload_used, false)?;
                (fd, map, false)
            }
        };
        add_seals(
            payload_fd.as_fd(),
            SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
        )?;
        let (meta_fd, meta) = memfd_mapped(&cname("-meta")?, layout.meta_len, false)?;
        let arena = Arena {
            map: Mapping {
                meta,
                payload,
                small: layout.small,
                large: layout.large,
                slot_count: layout.slot_count(),
                hugepages,
            },
            meta_fd,
            payload_fd,
            small_free: FreeList::new(&layout.small),
            large_free: layout.large.as_ref().map(FreeList::new),
            warm_budget: DEFAULT_WARM_LARGE_SLOTS,
            kept_prefix: DEFAULT_KEPT_PREFIX,
            warm_free: AtomicU32::new(0),
            warm: (0..layout.large.map_or(0, |l| l.count))
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
        };
        arena.init();
        // After our writable mapping exists (it keeps working) and before any worker can
        // see the fd: from here on nobody can write the file except through that mapping.
        add_seals(arena.meta_fd.as_fd(), META_SEALS | SealFlag::F_SEAL_SEAL)?;
        Ok(arena)
    }

    /// Fills in the freshly created (zeroed) metadata: header, all slots free.
    fn init(&self) {
        for i in 0..self.map.slot_count {
            let m = self.map.slot_meta(i).expect("index < slot_count");
            m.state.store(pack(FIRST_GENERATION, FREE), Relaxed);
        }
        let h = self.map.header();
        h.version.store(VERSION, Relaxed);
        h.flags
            .store(if self.map.hugepages { FLAG_HUGETLB } else { 0 }, Relaxed);
        h.slot_size.store(self.map.small.slot_size, Relaxed);
        h.slot_count.store(self.map.small.count, Relaxed);
        if let Some(l) = &self.map.large {
            h.large_slot_size.store(l.slot_size, Relaxed);
            h.large_slot_count.store(l.count, Relaxed);
            h.large_offset.store(l.offset as u64, Relaxed);
        }
        h.payload_len.store(self.map.payload.len() as u64, Relaxed);
        h.meta_len.store(self.map.meta.len() as u64, Relaxed);
        // Last, so a header with the magic is always complete.
        h.magic.store(MAGIC, Release);
    }

    /// The metadata memfd, for worker processes (dup it, or send it with SCM_RIGHTS). It is
    /// sealed against writes: workers can only map it read-only.
    pub fn meta_fd(&self) -> BorrowedFd<'_> {
        self.meta_fd.as_fd()
    }

    /// The payload memfd, for worker processes; they map it read-write.
    pub fn payload_fd(&self) -> BorrowedFd<'_> {
        self.payload_fd.as_fd()
    }

    slot_access!();

    /// How many free large slots may keep their pages when released (default
    /// [`DEFAULT_WARM_LARGE_SLOTS`]); every other released large slot gives its pages back
    /// to the kernel. 0: always drop them; `u32::MAX`: never (memory stays at the
    /// high-water mark).
    pub fn set_warm_large_slots(&mut self, n: u32) {
        self.warm_budget = n;
    }

    /// Whether large slot `index` holds pages from an earlier request (a heuristic for
    /// memory use only: nothing depends on it for correctness).
    /// How many bytes at the start of each large slot keep their pages when it is released
    /// without being the warm one ([`DEFAULT_KEPT_PREFIX`]; 0 gives every page back).
    pub fn set_kept_prefix(&mut self, bytes: usize) {
        self.kept_prefix = bytes;
    }

    fn warm_flag(&self, index: u32) -> Option<&std::sync::atomic::AtomicBool> {
        let first = self.map.large.as_ref()?.first_index;
        self.warm.get(index.checked_sub(first)? as usize)
    }

    fn free_list(&self, class: SlotClass) -> Option<&FreeList> {
        match class {
            SlotClass::Small => Some(&self.small_free),
            SlotClass::Large => self.large_free.as_ref(),
        }
    }

    /// Free slots of every class. Exact when no alloc/release is in flight; while they
    /// are, it stays within `0..=slot_count`.
    pub fn free_slots(&self) -> u32 {
        SlotClass::ALL.iter().map(|&c| self.free_slots_in(c)).sum()
    }

    /// Free slots of `class` (0 for a class the arena does not have).
    pub fn free_slots_in(&self, class: SlotClass) -> u32 {
        self.free_list(class)
            .map_or(0, |f| f.top.count.load(Relaxed))
    }

    /// Takes a free small slot for request `request_id`; see [`Arena::alloc_in`].
    pub fn alloc(&self, request_id: u64) -> Result<SlotRef, ArenaError> {
        self.alloc_in(SlotClass::Small, request_id)
    }

    /// Takes a free slot of `class` for request `request_id`, which is recorded with the
    /// slot: a descriptor naming the slot with another request id fails `check`. O(1),
    /// lock-free; `Full` if every slot of the class is in use, `NoSuchClass` if the arena
    /// has none of that class.
    pub fn alloc_in(&self, class: SlotClass, request_id: u64) -> Result<SlotRef, ArenaError> {
        let free = self
            .free_list(class)
            .ok_or(ArenaError::NoSuchClass(class))?;
        let index = free.pop()?;
        free.top.count.fetch_sub(1, Relaxed);
        let meta = self
            .map
            .slot_meta(index)
            .expect("pop range-checks the index");
        let (generation, state) = unpack(meta.state.load(Acquire));
        if state != FREE {
            return Err(ArenaError::Corrupted(format!(
                "slot {index} was on the free list while in use"
            )));
        }
        if let Some(flag) = self.warm_flag(index)
            && flag.swap(false, Relaxed)
        {
            self.warm_free.fetch_sub(1, Relaxed);
        }
        meta.request_id.store(request_id, Relaxed);
        // Release: a worker that sees the slot in use sees its request id too.
        meta.state.store(pack(generation, IN_USE), Release);
        Ok(SlotRef { index, generation })
    }

    /// Returns a slot to its class's free list. Succeeds exactly once per allocation; a
    /// repeated, stale or out-of-range release is an error and changes nothing. A large
    /// slot's pages are given back to the kernel first (see the module docs).
    pub fn release(&self, slot: SlotRef) -> Result<(), ArenaError> {
        let meta = self.map.slot_meta_checked(slot.index)?;
        let (class, _) = self
            .map
            .class_of(slot.index)
            .expect("slot_meta_checked range-checked the index");
        let in_use = pack(slot.generation, IN_USE);
        let freed = pack(next_generation(slot.generation), FREE);
        if let Err(actual) = meta.state.compare_exchange(in_use, freed, AcqRel, Acquire) {
            return Err(Mapping::state_error(slot, actual));
        }
        // Between the CAS and the push nobody owns the slot: every descriptor naming it is
        // stale now, and no alloc can hand it out yet, so dropping its pages cannot lose
        // anyone's bytes.
        if let Some(flag) = self.warm_flag(slot.index) {
            if self.warm_free.fetch_add(1, Relaxed) < self.warm_budget {
                flag.store(true, Relaxed);
            } else {
                self.warm_free.fetch_sub(1, Relaxed);
                self.drop_pages(slot.index);
            }
        }
        let free = self
            .free_list(class)
            .expect("a slot's class has a free list");
        // Count before pushing so the counter never dips below the stack's true size.
        free.top.count.fetch_add(1, Relaxed);
        free.push(slot.index);
        Ok(())
    }

    /// Gives the pages of slot `index` back to the kernel: the memfd range becomes a hole
    /// that reads as zeros, in every process that maps it. A failure only costs memory.
    fn drop_pages(&self, index: u32) {
        let Ok((offset, capacity)) = self.map.placement(index) else {
            return;
        };
        // Large slots and their sizes are page-aligned, so a page-rounded prefix keeps the
        // range whole pages.
        let page = page_size();
        let kept = (self.kept_prefix.div_ceil(page) * page).min(capacity as usize);
        let (offset, capacity) = (offset + kept, capacity as usize - kept);
        if capacity == 0 {
            return;
        }
        // SAFETY: [offset, offset + capacity) is the tail of one large slot past its kept
        // prefix, inside our shared mapping of the payload memfd (placement; large slots are
        // page-aligned and a whole number of pages, and the prefix is rounded to pages).
        // MADV_REMOVE frees the backing pages of exactly that range; nobody owns the
        // slot now (see release), and any byte read later reads zero, which is safe.
        let rc = unsafe {
            nix::libc::madvise(
                self.map.payload.as_mut_ptr().add(offset).cast(),
                capacity,
                nix::libc::MADV_REMOVE,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            tracing::warn!("releasing the pages of arena slot {index}: {e}");
        }
    }
}

/// A worker's side of a chain's arena: the gateway's slots, checked and copied, never
/// allocated. The metadata is mapped read-only (the kernel refuses anything else, see the
/// module docs), so nothing a worker does through this, or around it, changes which slot is
/// free or live. `Send + Sync`.
pub struct ArenaView {
    map: Mapping,
    /// Kept open, as the hand-off left them, for the view's life: closing them would take
    /// nothing away (a process can reopen a file it has mapped through /proc/self/map_files),
    /// and at their fixed numbers they show what the worker holds.
    fds: [OwnedFd; 2],
}

impl std::fmt::Debug for ArenaView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArenaView")
            .field("small", &self.map.small)
            .field("large", &self.map.large)
            .field("hugepages", &self.map.hugepages)
            .finish()
    }
}

impl ArenaView {
    /// Maps an arena the gateway created (the fds arrived over a socket or by inheritance):
    /// `meta` read-only, `payload` read-write. Anything that is not a well-formed arena
    /// sealed as [`Arena::create`] seals it is an error.
    pub fn from_fds(meta: OwnedFd, payload: OwnedFd) -> Result<ArenaView, ArenaError> {
        let bad = |m: String| Err(ArenaError::BadHeader(m));
        let meta = File::from(meta);
        let meta_len = file_len(&meta)?;
        if meta_len < HEADER_SIZE as u64 || meta_len > (1 << 30) {
            return bad(format!("metadata size {meta_len} cannot hold an arena"));
        }
        if !seals(meta.as_fd()).contains(META_SEALS) {
            return bad(
                "metadata fd is not a memfd sealed against writes and resizing: another \
                 process could change it"
                    .into(),
            );
        }
        let meta_map = MmapOptions::new()
            .len(meta_len as usize)
            .map_raw_read_only(&meta)
            .map_err(io_err("mmap"))?;

        // SAFETY: the mapping is page-aligned (so 64-aligned) and at least HEADER_SIZE bytes
        // long (checked above); Header is only atomics and is only loaded here, Relaxed and
        // at most 8 bytes at a time, which std allows on read-only memory.
        let h = unsafe { &*(meta_map.as_ptr() as *const Header) };
        let magic = h.magic.load(Relaxed);
        // Pairs with the Release store of the magic that completes the header.
        fence(Acquire);
        if magic != MAGIC {
            return bad(format!("magic {magic:#018x}, expected {MAGIC:#018x}"));
        }
        let version = h.version.load(Relaxed);
        if version != VERSION {
            return bad(format!("version {version}, this build speaks {VERSION}"));
        }
        let slot_size = h.slot_size.load(Relaxed);
        let slot_count = h.slot_count.load(Relaxed);
        let large = match (
            h.large_slot_size.load(Relaxed),
            h.large_slot_count.load(Relaxed),
        ) {
            (0, 0) => None,
            (slot_size, slot_count) => Some(ClassSpec {
                slot_size,
                slot_count,
            }),
        };
        let spec = ArenaSpec {
            small: ClassSpec {
                slot_size,
                slot_count,
            },
            large,
        };
        let layout = layout(&spec).map_err(|e| ArenaError::BadHeader(e.to_string()))?;
        let large_offset = h.large_offset.load(Relaxed);
        if layout.large.map_or(0, |l| l.offset as u64) != large_offset {
            return bad(format!(
                "header says the large slots start at {large_offset}, {slot_count} small \
                 slots of {slot_size} bytes put them at {:?}",
                layout.large.map(|l| l.offset)
            ));
        }
        if large.is_some() && h.flags.load(Relaxed) & FLAG_HUGETLB != 0 {
            return bad("a large slot class on hugetlb pages".into());
        }
        let header_meta_len = h.meta_len.load(Relaxed);
        if header_meta_len != meta_len || meta_len != layout.meta_len as u64 {
            return bad(format!(
                "header says {header_meta_len} bytes of metadata, file has {meta_len}, \
                 {} slots need {}",
                layout.slot_count(),
                layout.meta_len
            ));
        }
        let hugepages = h.flags.load(Relaxed) & FLAG_HUGETLB != 0;
        let payload_len = h.payload_len.load(Relaxed);
        let expected = if hugepages {
            layout.payload_used.next_multiple_of(HUGE_PAGE)
        } else {
            layout.payload_used
        } as u64;

        let payload = File::from(payload);
        let payload_file_len = file_len(&payload)?;
        if payload_len != expected || payload_file_len != expected {
            return bad(format!(
                "header says {payload_len} bytes of payload, file has {payload_file_len}, \
                 the slots need {expected}"
            ));
        }
        if !seals(payload.as_fd()).contains(SealFlag::F_SEAL_SHRINK) {
            return bad("payload fd is not a memfd sealed against shrinking".into());
        }
        let payload_map = MmapOptions::new()
            .len(expected as usize)
            .map_raw(&payload)
            .map_err(io_err("mmap"))?;
        Ok(ArenaView {
            map: Mapping {
                meta: meta_map,
                payload: payload_map,
                small: layout.small,
                large: layout.large,
                slot_count: layout.slot_count(),
                hugepages,
            },
            fds: [meta.into(), payload.into()],
        })
    }

    /// The payload memfd this view maps (for mapping a slot elsewhere, see
    /// `mappable_range`).
    pub fn payload_fd(&self) -> BorrowedFd<'_> {
        self.fds[1].as_fd()
    }

    slot_access!();
}
#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::FdFlag;
    use nix::sys::mman::{MapFlags, ProtFlags, mmap, mprotect, munmap};
    use std::num::NonZeroUsize;
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::FileExt;
    use std::os::unix::process::CommandExt;
    use std::process::Command;
    use std::sync::Arc;
    use std::thread;

    /// The request id the single-owner tests allocate for.
    const REQ: u64 = 42;

    fn arena(slot_size: u32, slot_count: u32) -> Arena {
        Arena::create("spindle-test", slot_size, slot_count).unwrap()
    }

    fn view(a: &Arena) -> ArenaView {
        ArenaView::from_fds(
            a.meta_fd().try_clone_to_owned().unwrap(),
            a.payload_fd().try_clone_to_owned().unwrap(),
        )
        .unwrap()
    }

    fn desc_for(s: SlotRef, request_id: u64, len: u32) -> Descriptor {
        Descriptor {
            slot: s.index,
            generation: s.generation,
            request_id,
            len,
            ..Default::default()
        }
    }

    fn desc(s: SlotRef, len: u32) -> Descriptor {
        desc_for(s, REQ, len)
    }

    #[test]
    fn is_send_sync() {
        fn assert<T: Send + Sync>() {}
        assert::<Arena>();
        assert::<Arc<Arena>>();
        assert::<ArenaView>();
    }

    #[test]
    fn rejects_bad_params() {
        for (size, count, what) in [
            (0, 8, "slot_size must be > 0"),
            (100, 8, "not a multiple of 64"),
            (64, 0, "slot_count 0"),
            (64, MAX_SLOTS + 1, "not in 1..="),
            (1 << 30, 1 << 10, "limit"),
        ] {
            let err = Arena::create("bad", size, count).unwrap_err();
            assert!(
                matches!(err, ArenaError::InvalidParams(_)) && err.to_string().contains(what),
                "({size}, {count}): {err}"
            );
        }
        assert!(matches!(
            Arena::create("nul\0name", 64, 1),
            Err(ArenaError::InvalidParams(_))
        ));
    }

    #[test]
    fn layout_is_aligned() {
        let a = arena(192, 1000);
        let base = a.map.payload.as_ptr() as usize;
        assert_eq!(base % page_size(), 0);
        assert_eq!(a.map.meta.len() % page_size(), 0);
        assert!(a.map.meta.len() >= HEADER_SIZE + 1000 * 16);
        for i in [0, 1, 999] {
            let p = a.slot_ptr(a_alloc_at(&a, i)).unwrap() as usize;
            assert_eq!(p % 64, 0);
            assert_eq!(p - base, i as usize * 192);
        }
        assert!(192 * 1000 <= a.map.payload.len());
    }

    /// Allocates until slot `i` comes up (fresh arenas hand out 0, 1, 2, ...).
    fn a_alloc_at(a: &Arena, i: u32) -> SlotRef {
        loop {
            let s = a.alloc(REQ).unwrap();
            if s.index == i {
                return s;
            }
        }
    }

    #[test]
    fn alloc_until_full_then_release_all() {
        let a = arena(64, 16);
        assert_eq!(a.free_slots(), 16);
        let slots: Vec<_> = (0..16).map(|_| a.alloc(REQ).unwrap()).collect();
        let mut idx: Vec<_> = slots.iter().map(|s| s.index).collect();
        idx.sort();
        assert_eq!(
            idx,
            (0..16).collect::<Vec<_>>(),
            "each slot handed out once"
        );
        assert!(slots.iter().all(|s| s.generation == FIRST_GENERATION));
        assert_eq!(a.free_slots(), 0);
        assert!(matches!(a.alloc(REQ), Err(ArenaError::Full)));
        for s in &slots {
            a.release(*s).unwrap();
        }
        assert_eq!(a.free_slots(), 16);
        let again = a.alloc(REQ).unwrap();
        assert_eq!(again.generation, FIRST_GENERATION + 1);
    }

    #[test]
    fn release_exactly_once() {
        let a = arena(64, 4);
        let s = a.alloc(REQ).unwrap();
        a.release(s).unwrap();
        let err = a.release(s).unwrap_err();
        assert!(
            matches!(err, ArenaError::NotInUse { current: 2, .. }),
            "{err}"
        );
        assert_eq!(a.free_slots(), 4, "double release must not add a free slot");

        // Reallocated (LIFO: same slot): the old ref is now stale and must not free it.
        let s2 = a.alloc(REQ).unwrap();
        assert_eq!((s2.index, s2.generation), (s.index, s.generation + 1));
        let err = a.release(s).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("slot {} generation 1 is stale (current 2)", s.index)
        );
        assert!(matches!(
            a.release(SlotRef {
                index: 4,
                generation: 1
            }),
            Err(ArenaError::OutOfRange { index: 4, count: 4 })
        ));
        assert_eq!(a.free_slots(), 3);
        a.release(s2).unwrap();
        assert_eq!(a.free_slots(), 4);
    }

    #[test]
    fn generation_wraps_past_zero() {
        assert_eq!(next_generation(u32::MAX), FIRST_GENERATION);
        assert_eq!(next_generation(7), 8);
    }

    #[test]
    fn check_rejects_forged_descriptors() {
        let a = arena(128, 4);
        let s = a.alloc(REQ).unwrap();
        let free_index = (s.index + 1) % 4;
        assert_eq!(a.check(&desc(s, 128)).unwrap(), s);

        let cases = [
            (
                Descriptor {
                    slot: 4,
                    ..desc(s, 0)
                },
                "out of range",
            ),
            (
                Descriptor {
                    slot: u32::MAX,
                    ..desc(s, 0)
                },
                "out of range",
            ),
            (
                Descriptor {
                    generation: s.generation + 1,
                    ..desc(s, 0)
                },
                "is stale",
            ),
            (
                Descriptor {
                    generation: 0,
                    ..desc(s, 0)
                },
                "is stale",
            ),
            (desc(s, 129), "exceeds slot size"),
            (desc(s, u32::MAX), "exceeds slot size"),
            (
                Descriptor {
                    reserved: 1,
                    ..desc(s, 0)
                },
                "reserved",
            ),
            (
                Descriptor {
                    slot: free_index,
                    ..desc(s, 0)
                },
                "not in use",
            ),
            (desc_for(s, REQ + 1, 0), "not request 43"),
            (desc_for(s, 0, 0), "not request 0"),
            (Descriptor::default(), "generation 0 is stale"),
        ];
        for (d, what) in cases {
            let err = a.check(&d).unwrap_err();
            assert!(err.to_string().contains(what), "{d:?}: {err}");
        }
        a.release(s).unwrap();
        assert!(matches!(
            a.check(&desc(s, 0)),
            Err(ArenaError::NotInUse { .. })
        ));
    }

    /// A worker holding a live slot's index and generation cannot use them for another
    /// request: the gateway recorded which request the slot is for, and every reallocation
    /// records the new one.
    #[test]
    fn a_replayed_descriptor_with_the_right_generation_is_refused() {
        let a = arena(64, 1);
        let v = view(&a);
        let first = a.alloc(7).unwrap();
        assert_eq!(v.check(&desc_for(first, 7, 0)).unwrap(), first);
        let err = v.check(&desc_for(first, 8, 0)).unwrap_err();
        assert!(
            matches!(
                err,
                ArenaError::RequestMismatch {
                    index: 0,
                    request_id: 8,
                    recorded: 7
                }
            ),
            "{err}"
        );
        a.release(first).unwrap();
        // Generation 2 now belongs to request 9; request 7's id with the new generation (a
        // descriptor patched up by a worker that saw the slot reused) is still refused.
        let second = a.alloc(9).unwrap();
        let patched = desc_for(second, 7, 0);
        assert!(matches!(
            v.check(&patched),
            Err(ArenaError::RequestMismatch { recorded: 9, .. })
        ));
        assert_eq!(v.check(&desc_for(second, 9, 0)).unwrap(), second);
    }

    #[test]
    fn read_write_checked() {
        let a = arena(256, 2);
        let s = a.alloc(REQ).unwrap();
        a.write(s, 0, b"hello ").unwrap();
        a.write(s, 6, b"world").unwrap();
        let mut buf = [0u8; 11];
        a.read(s, 0, &mut buf).unwrap();
        assert_eq!(&buf, b"hello world");

        a.write(s, 250, &[1; 6]).unwrap();
        for (off, len) in [(251, 6), (256, 1), (usize::MAX, 2)] {
            let err = a.write(s, off, &vec![0; len]).unwrap_err();
            assert!(matches!(err, ArenaError::OutOfBounds { .. }), "{err}");
        }
        assert!(a.read(s, 0, &mut [0; 257]).is_err());
        a.read(s, 256, &mut []).unwrap();

        let stale = SlotRef {
            generation: s.generation + 1,
            ..s
        };
        assert!(matches!(
            a.write(stale, 0, b"x"),
            Err(ArenaError::StaleSlot { .. })
        ));
        a.release(s).unwrap();
        assert!(matches!(
            a.read(s, 0, &mut buf),
            Err(ArenaError::NotInUse { .. })
        ));
        assert!(a.slot_ptr(s).is_err());
    }

    /// One cycle of the ownership check used by the concurrency tests: stamp the whole slot
    /// with `owner` and `round`, yield to let others run, and make sure nobody else
    /// wrote to it meanwhile.
    fn own_and_verify(a: &Arena, owner: u64, round: u64) -> bool {
        let request_id = owner << 40 | round;
        let s = match a.alloc(request_id) {
            Ok(s) => s,
            Err(ArenaError::Full) => {
                thread::yield_now();
                return false;
            }
            Err(e) => panic!("alloc: {e}"),
        };
        let stamp = request_id.to_le_bytes();
        let pattern: Vec<u8> = stamp
            .iter()
            .cycle()
            .take(a.slot_size() as usize)
            .copied()
            .collect();
        a.write(s, 0, &pattern).unwrap();
        if round.is_multiple_of(16) {
            thread::yield_now();
        }
        let mut back = vec![0u8; pattern.len()];
        a.read(s, 0, &mut back).unwrap();
        assert!(
            back == pattern,
            "slot {} double-owned: owner {owner:#x} round {round}",
            s.index
        );
        a.check(&desc_for(s, request_id, a.slot_size())).unwrap();
        a.release(s).unwrap();
        true
    }

    thread_local! {
        /// Widens the window between reading the head and CASing it in `pop`, so an
        /// ABA bug shows up even on machines with few cores.
        pub(super) static YIELD_IN_POP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    #[test]
    fn threads_never_share_a_slot() {
        const THREADS: u64 = 4;
        const CYCLES: u64 = 100_000;
        let a = Arc::new(arena(64, 8));
        let owners: Arc<Vec<AtomicU64>> = Arc::new((0..8).map(|_| AtomicU64::new(0)).collect());
        let handles: Vec<_> = (1..=THREADS)
            .map(|t| {
                let (a, owners) = (a.clone(), owners.clone());
                thread::spawn(move || {
                    YIELD_IN_POP.set(t != 1);
                    let mut done = 0;
                    while done < CYCLES {
                        let Ok(s) = a.alloc(t) else {
                            thread::yield_now();
                            continue;
                        };
                        let o = &owners[s.index as usize];
                        assert_eq!(o.swap(t, SeqCst), 0, "slot {} already owned", s.index);
                        a.write(s, 0, &[t as u8; 64]).unwrap();
                        let mut back = [0u8; 64];
                        a.read(s, 0, &mut back).unwrap();
                        assert_eq!(back, [t as u8; 64], "slot {} overwritten", s.index);
                        assert_eq!(o.swap(0, SeqCst), t);
                        a.release(s).unwrap();
                        done += 1;
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(a.free_slots(), 8);
        // The stack must still hold exactly 8 distinct slots.
        let mut all: Vec<_> = (0..8).map(|_| a.alloc(REQ).unwrap().index).collect();
        all.sort();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
        assert!(a.alloc(REQ).is_err());
    }

    #[test]
    fn threads_pattern_stress() {
        let a = Arc::new(arena(256, 8));
        let handles: Vec<_> = (1..=4u64)
            .map(|t| {
                let a = a.clone();
                thread::spawn(move || {
                    YIELD_IN_POP.set(t != 1);
                    let mut round = 0;
                    while round < 50_000 {
                        round += own_and_verify(&a, t, round) as u64;
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(a.free_slots(), 8);
    }

    const CHILD_FDS_ENV: &str = "SPINDLE_SHM_TEST_CHILD_FDS";
    const CHILD_SLOTS_ENV: &str = "SPINDLE_SHM_TEST_CHILD_SLOTS";

    /// The child's half of `another_process_sees_the_slots_and_cannot_touch_the_metadata`.
    fn cross_process_child(fds: &str) {
        let (meta, payload) = fds.split_once(',').unwrap();
        // SAFETY: the parent made exactly these descriptors survive exec for us; nothing
        // else in this process knows about them.
        let (meta, payload) = unsafe {
            (
                OwnedFd::from_raw_fd(meta.parse().unwrap()),
                OwnedFd::from_raw_fd(payload.parse().unwrap()),
            )
        };
        let meta_copy = meta.try_clone().unwrap();
        let v = ArenaView::from_fds(meta, payload).unwrap();
        let slots = std::env::var(CHILD_SLOTS_ENV).unwrap();
        for entry in slots.split(';') {
            let n: Vec<u64> = entry.split(',').map(|x| x.parse().unwrap()).collect();
            let s = SlotRef {
                index: n[0] as u32,
                generation: n[1] as u32,
            };
            let request_id = n[2];
            let got = v.check(&desc_for(s, request_id, 8)).unwrap();
            assert!(matches!(
                v.check(&desc_for(s, request_id ^ 1, 8)),
                Err(ArenaError::RequestMismatch { .. })
            ));
            let mut buf = [0u8; 8];
            v.read(got, 0, &mut buf).unwrap();
            assert_eq!(u64::from_le_bytes(buf), request_id, "the parent's bytes");
            v.write(got, 0, &(!request_id).to_le_bytes()).unwrap();
        }
        // Our own read-only mapping of the metadata cannot be made writable.
        let page = NonZeroUsize::new(page_size()).unwrap();
        let ro = map_shared(&meta_copy, ProtFlags::PROT_READ).unwrap();
        // SAFETY: `ro` is a fresh page-long mapping of our own that nothing references.
        let err = unsafe { mprotect(ro, page.get(), ProtFlags::PROT_READ | ProtFlags::PROT_WRITE) }
            .unwrap_err();
        assert!(matches!(err, Errno::EACCES | Errno::EPERM), "{err}");
        // SAFETY: as above; unmapped once, not used after.
        unsafe { munmap(ro, page.get()).unwrap() };
    }

    /// One page of `fd` mapped shared with `prot`.
    fn map_shared(fd: &OwnedFd, prot: ProtFlags) -> Result<ptr::NonNull<std::ffi::c_void>, Errno> {
        // SAFETY: a fresh mapping at an address the kernel picks, so it cannot alias anything
        // of ours; callers only use it through mprotect/munmap or raw-pointer accesses.
        unsafe {
            mmap(
                None,
                NonZeroUsize::new(page_size()).unwrap(),
                prot,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }
    }

    #[test]
    fn another_process_sees_the_slots_and_cannot_touch_the_metadata() {
        if let Ok(fds) = std::env::var(CHILD_FDS_ENV) {
            return cross_process_child(&fds);
        }
        let a = arena(128, 8);
        let slots: Vec<(SlotRef, u64)> = (0..5)
            .map(|i| {
                let request_id = 1000 + i;
                let s = a.alloc(request_id).unwrap();
                a.write(s, 0, &request_id.to_le_bytes()).unwrap();
                (s, request_id)
            })
            .collect();
        let list = slots
            .iter()
            .map(|(s, r)| format!("{},{},{r}", s.index, s.generation))
            .collect::<Vec<_>>()
            .join(";");
        let (meta, payload) = (a.meta_fd().as_raw_fd(), a.payload_fd().as_raw_fd());
        let name = format!(
            "{}::another_process_sees_the_slots_and_cannot_touch_the_metadata",
            module_path!().split_once("::").unwrap().1
        );
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", &name, "--nocapture", "--test-threads=1"])
            .env(CHILD_FDS_ENV, format!("{meta},{payload}"))
            .env(CHILD_SLOTS_ENV, list);
        // SAFETY: runs between fork and exec; nix's fcntl is one fcntl(2) call and an errno
        // read, so it is async-signal-safe and allocates nothing, and it only touches the
        // child's copy of the descriptor table, so the arena fds stay close-on-exec in the
        // parent. Both fds are open in that copy: the parent holds the arena throughout.
        unsafe {
            cmd.pre_exec(move || {
                for fd in [meta, payload] {
                    let fd = BorrowedFd::borrow_raw(fd);
                    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).map_err(io::Error::from)?;
                }
                Ok(())
            });
        }
        let status = cmd.status().unwrap();
        assert!(status.success(), "child failed: {status}");
        for (s, request_id) in slots {
            let mut buf = [0u8; 8];
            a.read(s, 0, &mut buf).unwrap();
            assert_eq!(u64::from_le_bytes(buf), !request_id, "the child's answer");
            a.release(s).unwrap();
        }
        assert_eq!(a.free_slots(), 8);
    }

    /// What a hostile worker holding both fds can and cannot do to the metadata memfd: every
    /// way of writing it or resizing it fails, even after reopening it read-write through
    /// /proc; the gateway's own mapping keeps working.
    #[test]
    fn the_metadata_memfd_cannot_be_written_resized_or_mapped_writable() {
        let a = arena(64, 4);
        let s = a.alloc(REQ).unwrap();
        let meta = a.meta_fd().try_clone_to_owned().unwrap();
        // A worker could reopen its fd read-write by path: the seals are on the file.
        let reopened: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{}", meta.as_raw_fd()))
            .unwrap()
            .into();
        for fd in [&meta, &reopened] {
            let err = map_shared(fd, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE).unwrap_err();
            assert_eq!(err, Errno::EPERM, "writable shared mmap");
            let err = ftruncate(fd, 0).unwrap_err();
            assert_eq!(err, Errno::EPERM, "ftruncate to 0");
            let err = ftruncate(fd, 1 << 30).unwrap_err();
            assert_eq!(err, Errno::EPERM, "ftruncate to grow");
            let file = File::from(fd.try_clone().unwrap());
            let err = file.write_at(&[0xff; 64], 0).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(Errno::EPERM as i32), "write(2)");
            let err = nix::fcntl::fallocate(
                fd,
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                0,
                page_size() as nix::libc::off_t,
            )
            .unwrap_err();
            assert_eq!(err, Errno::EPERM, "punching a hole");
            let err = fcntl(fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE)).unwrap_err();
            assert_eq!(err, Errno::EPERM, "adding a seal");

            let ro = map_shared(fd, ProtFlags::PROT_READ).unwrap();
            let page = page_size();
            // SAFETY: `ro` is a fresh page-long mapping of our own that nothing references.
            let err = unsafe { mprotect(ro, page, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE) }
                .unwrap_err();
            assert!(
                matches!(err, Errno::EACCES | Errno::EPERM),
                "mprotect: {err}"
            );
            // SAFETY: as above; unmapped once, not used after.
            unsafe { munmap(ro, page).unwrap() };
        }
        // A private writable mapping is allowed, and is the writer's own copy.
        // SAFETY: fresh mapping at a kernel-chosen address; only written through the pointer
        // below and unmapped after.
        let private = unsafe {
            mmap(
                None,
                NonZeroUsize::new(page_size()).unwrap(),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
                &meta,
                0,
            )
        }
        .unwrap();
        // SAFETY: the page is ours, private and writable; zeroing it is what a hostile
        // worker would try, on its own copy.
        unsafe {
            ptr::write_bytes(private.as_ptr().cast::<u8>(), 0, page_size());
            munmap(private, page_size()).unwrap();
        }
        assert_eq!(a.check(&desc(s, 0)).unwrap(), s, "the file is unchanged");
        a.release(s).unwrap();
        let again = a.alloc(REQ + 1).unwrap();
        assert_eq!(
            again.generation,
            s.generation + 1,
            "the gateway still writes it"
        );
    }

    /// Payload bytes are the workers' to write, and writing all of them breaks nothing the
    /// gateway relies on: every slot is still handed out once, at the right generation.
    #[test]
    fn scribbling_over_the_whole_payload_does_not_break_allocation() {
        let a = arena(256, 8);
        let v = view(&a);
        let held: Vec<_> = (0..3).map(|i| a.alloc(i).unwrap()).collect();
        a.release(held[1]).unwrap();
        let payload = File::from(a.payload_fd().try_clone_to_owned().unwrap());
        payload
            .write_all_at(&vec![0xff; a.map.payload.len()], 0)
            .unwrap();
        // Through the worker's own mapping too.
        for &s in [held[0], held[2]].iter() {
            v.write(s, 0, &[0xee; 256]).unwrap();
        }
        a.release(held[0]).unwrap();
        a.release(held[2]).unwrap();
        assert_eq!(a.free_slots(), 8);
        let mut all: Vec<_> = (0..8).map(|i| a.alloc(100 + i).unwrap()).collect();
        assert!(a.alloc(200).is_err(), "exactly 8 slots");
        all.sort_by_key(|s| s.index);
        let generations: Vec<_> = all.iter().map(|s| s.generation).collect();
        assert_eq!(generations, [2, 2, 2, 1, 1, 1, 1, 1]);
        for s in all {
            a.release(s).unwrap();
        }
    }

    #[test]
    fn a_view_shares_the_arena() {
        let a = arena(64, 4);
        let b = view(&a);
        assert_eq!((b.slot_size(), b.slot_count()), (64, 4));
        assert_eq!(b.uses_hugepages(), a.uses_hugepages());
        let s = a.alloc(REQ).unwrap();
        a.write(s, 0, b"ping").unwrap();
        let got = b.check(&desc(s, 4)).unwrap();
        let mut buf = [0; 4];
        b.read(got, 0, &mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        b.write(got, 0, b"pong").unwrap();
        a.read(s, 0, &mut buf).unwrap();
        assert_eq!(&buf, b"pong");
        a.release(s).unwrap();
        assert!(matches!(
            b.check(&desc(s, 4)),
            Err(ArenaError::NotInUse { .. })
        ));
        assert!(b.write(s, 0, b"late").is_err());
    }

    /// A memfd of `len` bytes holding `contents`, sealed with `seals`.
    fn memfd_with(len: usize, contents: &[u8], seals: SealFlag) -> OwnedFd {
        let (fd, map) = memfd_mapped(c"not-an-arena", len, false).unwrap();
        // SAFETY: fresh mapping of `len` >= contents.len() bytes (true in these tests).
        unsafe { ptr::copy_nonoverlapping(contents.as_ptr(), map.as_mut_ptr(), contents.len()) };
        add_seals(fd.as_fd(), seals).unwrap();
        fd
    }

    fn meta_copy(a: &Arena) -> Vec<u8> {
        let mut copy = vec![0u8; a.map.meta.len()];
        // SAFETY: reading our own mapping, which is meta.len() bytes long.
        unsafe { ptr::copy_nonoverlapping(a.map.meta.as_ptr(), copy.as_mut_ptr(), copy.len()) };
        copy
    }

    #[test]
    fn from_fds_rejects_non_arenas() {
        let a = arena(64, 4);
        let payload = || a.payload_fd().try_clone_to_owned().unwrap();
        let meta = || a.meta_fd().try_clone_to_owned().unwrap();
        let sealed = META_SEALS | SealFlag::F_SEAL_SEAL;

        let err = ArenaView::from_fds(
            memfd_with(1 << 20, b"definitely not an arena", sealed),
            payload(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("magic"), "{err}");

        let err = ArenaView::from_fds(memfd_with(16, b"", sealed), payload()).unwrap_err();
        assert!(matches!(err, ArenaError::BadHeader(_)), "{err}");

        let null = || OwnedFd::from(File::open("/dev/null").unwrap());
        assert!(ArenaView::from_fds(null(), payload()).is_err());
        assert!(ArenaView::from_fds(meta(), null()).is_err());

        // The real header in a memfd another process could still write: refused, however
        // well-formed it is.
        let copy = meta_copy(&a);
        let writable = memfd_with(
            copy.len(),
            &copy,
            SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW,
        );
        let err = ArenaView::from_fds(writable, payload()).unwrap_err();
        assert!(err.to_string().contains("sealed against writes"), "{err}");

        // Metadata and payload swapped, as a confused hand-off would pass them.
        assert!(ArenaView::from_fds(payload(), meta()).is_err());

        // A payload another process could shrink under us.
        let len = a.map.payload.len();
        let unsealed = memfd_with(len, &[], SealFlag::empty());
        let err = ArenaView::from_fds(meta(), unsealed).unwrap_err();
        assert!(err.to_string().contains("payload fd is not"), "{err}");
        // Or of the wrong size.
        let short = memfd_with(len - 64, &[], SealFlag::F_SEAL_SHRINK);
        let err = ArenaView::from_fds(meta(), short).unwrap_err();
        assert!(err.to_string().contains("bytes of payload"), "{err}");
    }

    #[test]
    fn from_fds_rejects_tampered_header() {
        type Tamper = fn(&Header);
        let tampers: [(Tamper, &str); 6] = [
            (|h| h.version.store(99, Relaxed), "version 99"),
            (|h| h.slot_size.store(100, Relaxed), "multiple of 64"),
            (|h| h.slot_count.store(1 << 20, Relaxed), "metadata"),
            (|h| h.slot_size.store(1 << 20, Relaxed), "payload"),
            (|h| h.meta_len.store(1 << 30, Relaxed), "header says"),
            (|h| h.payload_len.store(1 << 30, Relaxed), "header says"),
        ];
        for (tamper, what) in tampers {
            let a = arena(64, 4);
            // Through the gateway's own writable mapping: the only one there is.
            tamper(a.map.header());
            let err = ArenaView::from_fds(
                a.meta_fd().try_clone_to_owned().unwrap(),
                a.payload_fd().try_clone_to_owned().unwrap(),
            )
            .unwrap_err();
            assert!(err.to_string().contains(what), "expected {what:?}: {err}");
        }
    }

    #[test]
    fn corrupt_free_list_is_an_error_not_ub() {
        let a = arena(64, 4);
        a.small_free.top.head.store(pack(0, 1000), Relaxed);
        assert!(matches!(a.alloc(REQ), Err(ArenaError::Corrupted(_))));
    }

    fn hugepages_free() -> u64 {
        std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("HugePages_Free:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn hugetlb_or_fallback() {
        let a = arena(4096, 1024);
        eprintln!("arena hugepages: {}", a.uses_hugepages());
        if hugepages_free() == 0 {
            assert!(
                !a.uses_hugepages(),
                "no free hugepages, must have fallen back"
            );
            assert!(memfd_mapped(c"huge", HUGE_PAGE, true).is_err());
        }
        if a.uses_hugepages() {
            assert_eq!(a.map.payload.len() % HUGE_PAGE, 0);
        }
        let normal = Arena::create_with("normal", &ArenaSpec::single(4096, 1024), false).unwrap();
        assert!(!normal.uses_hugepages());
        for a in [&a, &normal] {
            let s = a.alloc(REQ).unwrap();
            a.write(s, 4000, &[7; 96]).unwrap();
            let b = view(a);
            assert_eq!(b.uses_hugepages(), a.uses_hugepages());
            let mut buf = [0; 96];
            b.read(s, 4000, &mut buf).unwrap();
            assert_eq!(buf, [7; 96]);
        }
    }

    // ---- size classes ----

    const SMALL: u32 = 1024;
    const LARGE: u32 = 64 * 1024;

    fn classed(small: u32, large: u32) -> Arena {
        Arena::create_classes(
            "spindle-test-classes",
            &ArenaSpec {
                small: ClassSpec {
                    slot_size: SMALL,
                    slot_count: small,
                },
                large: Some(ClassSpec {
                    slot_size: LARGE,
                    slot_count: large,
                }),
            },
        )
        .unwrap()
    }

    #[test]
    fn classes_allocate_from_their_own_index_ranges_until_exhausted() {
        let a = classed(4, 2);
        assert_eq!(a.slot_count(), 6);
        assert_eq!(a.max_slot_size(), LARGE);
        assert!(!a.uses_hugepages(), "a large class is never on hugetlb");
        assert_eq!(
            a.class(SlotClass::Large),
            Some(ClassSpec {
                slot_size: LARGE,
                slot_count: 2
            })
        );
        let large: Vec<_> = (0..2)
            .map(|i| a.alloc_in(SlotClass::Large, 100 + i).unwrap())
            .collect();
        let mut idx: Vec<_> = large.iter().map(|s| s.index).collect();
        idx.sort();
        assert_eq!(idx, [4, 5], "large slots come after the small ones");
        assert!(matches!(
            a.alloc_in(SlotClass::Large, 9),
            Err(ArenaError::Full)
        ));
        assert_eq!(a.free_slots_in(SlotClass::Large), 0);
        assert_eq!(a.free_slots_in(SlotClass::Small), 4);
        // An exhausted large class leaves the small one alone, and vice versa.
        let small: Vec<_> = (0..4).map(|i| a.alloc(200 + i).unwrap()).collect();
        assert!(small.iter().all(|s| s.index < 4));
        assert!(matches!(a.alloc(9), Err(ArenaError::Full)));
        assert_eq!(a.free_slots(), 0);
        for s in large.iter().chain(&small) {
            assert_eq!(
                a.slot_class(s.index).unwrap().0,
                if s.index < 4 {
                    SlotClass::Small
                } else {
                    SlotClass::Large
                }
            );
            a.release(*s).unwrap();
        }
        assert_eq!(a.free_slots_in(SlotClass::Large), 2);
        assert_eq!(a.free_slots_in(SlotClass::Small), 4);
        // A released large slot goes back to the large list only.
        let again = a.alloc_in(SlotClass::Large, 1).unwrap();
        assert!(again.index >= 4 && again.generation == FIRST_GENERATION + 1);
        assert_eq!(a.free_slots_in(SlotClass::Small), 4);
    }

    #[test]
    fn an_arena_without_a_large_class_says_so() {
        let a = arena(64, 2);
        assert!(matches!(
            a.alloc_in(SlotClass::Large, 1),
            Err(ArenaError::NoSuchClass(SlotClass::Large))
        ));
        assert_eq!(a.free_slots_in(SlotClass::Large), 0);
        assert_eq!(a.class(SlotClass::Large), None);
        assert_eq!(a.max_slot_size(), 64);
    }

    #[test]
    fn rejects_bad_class_params() {
        let spec = |large_size, large_count| ArenaSpec {
            small: ClassSpec {
                slot_size: 4096,
                slot_count: 4,
            },
            large: Some(ClassSpec {
                slot_size: large_size,
                slot_count: large_count,
            }),
        };
        for (size, count, what) in [
            (4096, 1, "larger than the small"),
            (3 * 4096 + 64, 1, "multiple of the page size"),
            (8192, 0, "large slot_count 0"),
            (8192, MAX_SLOTS, "large slot_count"),
            (1 << 30, 1 << 10, "limit"),
        ] {
            let err = Arena::create_classes("bad", &spec(size, count)).unwrap_err();
            assert!(
                matches!(err, ArenaError::InvalidParams(_)) && err.to_string().contains(what),
                "({size}, {count}): {err}"
            );
        }
    }

    /// `len` is checked against the capacity of the class the index names, on both sides;
    /// forged indices past either class are out of range.
    #[test]
    fn check_bounds_len_by_the_slot_class() {
        let a = classed(3, 2);
        let v = view(&a);
        let small = a.alloc(REQ).unwrap();
        let large = a.alloc_in(SlotClass::Large, REQ + 1).unwrap();
        for checker in [&a.map, &v.map] {
            assert_eq!(checker.check(&desc(small, SMALL)).unwrap(), small);
            let err = checker.check(&desc(small, SMALL + 1)).unwrap_err();
            assert!(
                matches!(
                    err,
                    ArenaError::LenTooLarge {
                        slot_size: SMALL,
                        ..
                    }
                ),
                "{err}"
            );
            let l = desc_for(large, REQ + 1, LARGE);
            assert_eq!(checker.check(&l).unwrap(), large);
            let err = checker
                .check(&desc_for(large, REQ + 1, LARGE + 1))
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    ArenaError::LenTooLarge {
                        slot_size: LARGE,
                        ..
                    }
                ),
                "{err}"
            );
            // A small slot's index with a large len, a large one's index past the end.
            for index in [5, 6, u32::MAX] {
                let err = checker
                    .check(&Descriptor {
                        slot: index,
                        ..desc(small, 0)
                    })
                    .unwrap_err();
                assert!(
                    matches!(err, ArenaError::OutOfRange { count: 5, .. }),
                    "{index}: {err}"
                );
            }
        }
        // Access bounds follow the class too.
        v.write(large, LARGE as usize - 4, b"tail").unwrap();
        assert!(matches!(
            v.write(large, LARGE as usize - 3, b"tail"),
            Err(ArenaError::OutOfBounds {
                slot_size: LARGE,
                ..
            })
        ));
        assert!(matches!(
            v.write(small, SMALL as usize - 3, b"tail"),
            Err(ArenaError::OutOfBounds {
                slot_size: SMALL,
                ..
            })
        ));
        let mut buf = [0u8; 4];
        a.read(large, LARGE as usize - 4, &mut buf).unwrap();
        assert_eq!(&buf, b"tail");
        assert_eq!(v.capacity(large.index), LARGE);
        assert_eq!(v.capacity(small.index), SMALL);
        assert_eq!(v.capacity(99), 0);
    }

    #[test]
    fn large_slots_are_mappable_small_unaligned_ones_are_not() {
        let a = classed(3, 1);
        let v = view(&a);
        let small = a.alloc(REQ).unwrap();
        let large = a.alloc_in(SlotClass::Large, REQ).unwrap();
        // 1 KiB small slots are not whole pages.
        assert_eq!(v.mappable_range(small).unwrap(), None);
        let (offset, capacity) = v.mappable_range(large).unwrap().unwrap();
        assert_eq!(capacity, LARGE);
        assert_eq!(offset as usize, a.map.large.unwrap().offset);
        // The range is the slot: bytes written through the view are at that file offset.
        v.write(large, 5, b"here").unwrap();
        let file = File::from(v.payload_fd().try_clone_to_owned().unwrap());
        let mut buf = [0u8; 4];
        file.read_exact_at(&mut buf, offset + 5).unwrap();
        assert_eq!(&buf, b"here");
        a.release(large).unwrap();
        assert!(matches!(
            v.mappable_range(large),
            Err(ArenaError::NotInUse { .. })
        ));
    }

    #[test]
    fn large_slots_are_page_aligned_after_the_small_ones() {
        let a = classed(3, 2);
        let base = a.map.payload.as_ptr() as usize;
        let small = a.alloc(REQ).unwrap();
        let p = a.slot_ptr(small).unwrap() as usize - base;
        assert!(p < 3 * SMALL as usize);
        for _ in 0..2 {
            let l = a.alloc_in(SlotClass::Large, REQ).unwrap();
            let off = a.slot_ptr(l).unwrap() as usize - base;
            assert_eq!(off % page_size(), 0);
            let want = (3 * SMALL as usize).next_multiple_of(page_size())
                + (l.index - 3) as usize * LARGE as usize;
            assert_eq!(off, want);
        }
        assert_eq!(
            a.map.payload.len(),
            a.map.large.unwrap().offset + 2 * LARGE as usize
        );
    }

    /// Resident pages of the payload memfd, from /proc/self/fdinfo? No: from the memfd's
    /// block count, which counts the pages the file holds.
    fn file_pages(a: &Arena) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let f = File::from(a.payload_fd().try_clone_to_owned().unwrap());
        f.metadata().unwrap().blocks() * 512 / page_size() as u64
    }

    #[test]
    fn a_release_keeps_the_pages_of_the_kept_prefix_and_gives_back_the_rest() {
        let page = page_size();
        let mut a = classed(2, 2);
        a.set_warm_large_slots(0);
        a.set_kept_prefix(page + 1); // rounds up to two pages
        let v = view(&a);
        let before = file_pages(&a);
        let l = a.alloc_in(SlotClass::Large, REQ).unwrap();
        v.write(l, 0, &vec![0x5a; LARGE as usize]).unwrap();
        a.release(l).unwrap();
        assert_eq!(
            file_pages(&a),
            before + 2,
            "two pages kept, the rest given back"
        );
        // A prefix larger than the slot keeps all of it.
        a.set_kept_prefix(usize::MAX / 2);
        let l = a.alloc_in(SlotClass::Large, REQ + 1).unwrap();
        v.write(l, 0, &vec![0x5a; LARGE as usize]).unwrap();
        a.release(l).unwrap();
        assert!(file_pages(&a) >= before + (LARGE as usize / page) as u64);
    }

    #[test]
    fn releasing_a_large_slot_gives_its_pages_back_and_reads_zero() {
        let slot_pages = (LARGE as usize / page_size()) as u64;
        // One free large slot keeps its pages, the next one released drops them (no kept
        // prefix here: test slots are smaller than the default one).
        let mut a = classed(2, 3);
        a.set_kept_prefix(0);
        let v = view(&a);
        let before = file_pages(&a);
        let [x, y] = [1, 2].map(|r| a.alloc_in(SlotClass::Large, r).unwrap());
        v.write(x, 0, &vec![0x5a; LARGE as usize]).unwrap();
        v.write(y, 0, &vec![0x5a; LARGE as usize]).unwrap();
        assert!(file_pages(&a) >= before + 2 * slot_pages);
        a.release(x).unwrap();
        a.release(y).unwrap();
        assert_eq!(file_pages(&a), before + slot_pages, "one warm slot kept");
        // Whatever the order, at rest no more than one slot's worth stays.
        for round in 0..3 {
            let slots: Vec<_> = (0..3)
                .map(|r| a.alloc_in(SlotClass::Large, 10 * round + r).unwrap())
                .collect();
            for s in &slots {
                v.write(*s, 0, &vec![1; LARGE as usize]).unwrap();
            }
            for s in slots {
                a.release(s).unwrap();
            }
            assert_eq!(file_pages(&a), before + slot_pages, "round {round}");
        }

        let mut a = classed(2, 2);
        a.set_warm_large_slots(0);
        a.set_kept_prefix(0);
        let v = view(&a);
        let before = file_pages(&a);
        let l = a.alloc_in(SlotClass::Large, REQ).unwrap();
        v.write(l, 0, &vec![0x5a; LARGE as usize]).unwrap();
        assert!(file_pages(&a) >= before + slot_pages);
        a.release(l).unwrap();
        assert_eq!(
            file_pages(&a),
            before,
            "the large slot's pages were dropped"
        );
        // The next owner sees zeros, not the previous request's bytes.
        let again = a.alloc_in(SlotClass::Large, REQ + 1).unwrap();
        let mut buf = vec![1u8; LARGE as usize];
        v.read(again, 0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        a.release(again).unwrap();

        // With no limit the pages stay (the high-water mark).
        let mut keep = classed(2, 1);
        keep.set_warm_large_slots(u32::MAX);
        let before = file_pages(&keep);
        let l = keep.alloc_in(SlotClass::Large, REQ).unwrap();
        keep.write(l, 0, &vec![1; LARGE as usize]).unwrap();
        keep.release(l).unwrap();
        assert!(file_pages(&keep) >= before + (LARGE as usize / page_size()) as u64);
    }

    /// How long releasing a written 16 MiB large slot takes with and without dropping its
    /// pages, and what the next request's writes then cost (fresh pages fault in again).
    /// `cargo test -p shm --release -- --ignored --nocapture release_cost`
    #[test]
    #[ignore]
    fn release_cost() {
        const SIZE: u32 = 16 << 20;
        for punch in [true, false] {
            let mut a = Arena::create_classes(
                "release-cost",
                &ArenaSpec {
                    small: ClassSpec {
                        slot_size: 4096,
                        slot_count: 1,
                    },
                    large: Some(ClassSpec {
                        slot_size: SIZE,
                        slot_count: 1,
                    }),
                },
            )
            .unwrap();
            a.set_warm_large_slots(if punch { 0 } else { u32::MAX });
            let data = vec![7u8; 10 << 20];
            let (mut release, mut write) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
            const ROUNDS: u32 = 20;
            for _ in 0..ROUNDS {
                let l = a.alloc_in(SlotClass::Large, 1).unwrap();
                let t = std::time::Instant::now();
                a.write(l, 0, &data).unwrap();
                write += t.elapsed();
                let t = std::time::Instant::now();
                a.release(l).unwrap();
                release += t.elapsed();
            }
            eprintln!(
                "drop pages on release {punch}: write 10 MiB {:?}, release {:?}, resident after {} pages",
                write / ROUNDS,
                release / ROUNDS,
                file_pages(&a)
            );
        }
    }
}
