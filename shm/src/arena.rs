//! The per-chain shared-memory arena: fixed-size slots in a sealed memfd, shared by the
//! gateway and the chain's worker processes.
//!
//! # Layout
//!
//! The memfd is mapped `MAP_SHARED` in full by every process. Offsets from the start:
//!
//! ```text
//! 0     Header, 64 bytes (read-only after create)
//!         0 magic u64 = "SPDLAREN"   8 version u32   12 flags u32 (bit 0: hugetlb)
//!        16 slot_size u32   20 slot_count u32   24 payload_offset u64   32 map_len u64
//! 64    Free list, its own 64-byte cache line
//!         64 head AtomicU64 = tag << 32 | index   72 free count AtomicU32
//! 128   Slot metadata, 16 bytes per slot:
//!         +0 state AtomicU64 = generation << 32 | (0 free, 1 in use)
//!         +8 next AtomicU32 (free-list link, NIL = u32::MAX)   +12 padding
//! P     Payload: slot i at P + i * slot_size. P = 128 + 16 * slot_count rounded up to
//!       the page size; slot_size is a multiple of 64, so every slot is cache-line aligned.
//! map_len = P + slot_size * slot_count, rounded up to 2 MiB when backed by hugetlb.
//! ```
//!
//! # Ownership protocol
//!
//! A slot belongs to whoever holds the descriptor naming its current generation; ownership
//! moves by sending the descriptor. [`Arena::alloc`] and [`Arena::release`] are lock-free
//! (a tagged Treiber stack in the mapping) and work across processes. Release bumps the
//! generation, so stale or forged descriptors are rejected by [`Arena::check`],
//! [`Arena::read`] and [`Arena::write`] instead of touching a reused slot.
//!
//! The checks are not a lock: a peer that ignores the protocol can scribble over a slot's
//! payload bytes, and the arena is corrupted if a peer writes its metadata directly. What
//! no peer can do is make this process access memory outside its mapping: slot size,
//! slot count and offsets are validated once when mapping and cached locally, every index
//! read from shared memory is range-checked, and payload bytes are only ever copied through
//! raw pointers (never exposed as Rust slices, which would assert nobody else writes them).
//! The memfd is sealed against shrinking, so a peer cannot turn accesses into SIGBUS.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

use memmap2::{MmapOptions, MmapRaw};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::unistd::{SysconfVar, ftruncate, sysconf};

use proto::Descriptor;

const MAGIC: u64 = u64::from_le_bytes(*b"SPDLAREN");
const VERSION: u32 = 1;
const FLAG_HUGETLB: u32 = 1;

/// Slot index meaning "end of the free list".
const NIL: u32 = u32::MAX;
const FREE: u32 = 0;
const IN_USE: u32 = 1;
/// Generation 0 is never handed out, so an all-zero descriptor never names a live slot.
const FIRST_GENERATION: u32 = 1;

pub const SLOT_ALIGN: u32 = 64;
pub const MAX_SLOTS: u32 = 1 << 24;
/// Upper bound on the whole mapping; far above any sane chain, low enough to catch typos.
pub const MAX_ARENA_BYTES: u64 = 1 << 36;
const HUGE_PAGE: usize = 2 << 20;

#[repr(C, align(64))]
struct Header {
    magic: AtomicU64,
    version: AtomicU32,
    flags: AtomicU32,
    slot_size: AtomicU32,
    slot_count: AtomicU32,
    payload_offset: AtomicU64,
    map_len: AtomicU64,
    free: FreeList,
}

/// Every alloc and release writes this line; keep it away from the read-mostly header.
#[repr(C, align(64))]
struct FreeList {
    head: AtomicU64,
    count: AtomicU32,
}

#[repr(C)]
struct SlotMeta {
    state: AtomicU64,
    next: AtomicU32,
    _pad: u32,
}

const HEADER_SIZE: usize = size_of::<Header>();
const _: () = assert!(HEADER_SIZE == 128 && size_of::<SlotMeta>() == 16);
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

#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    #[error("invalid arena parameters: {0}")]
    InvalidParams(String),
    #[error("not a valid arena: {0}")]
    BadHeader(String),
    #[error("arena full: every slot is in use")]
    Full,
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

/// Where things are in a mapping for given parameters; the one place offsets are computed.
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    payload_offset: usize,
    /// Bytes actually used; the mapping may be longer (hugepage rounding).
    used_len: usize,
}

fn layout(slot_size: u32, slot_count: u32) -> Result<Layout, ArenaError> {
    let bad = |m: String| Err(ArenaError::InvalidParams(m));
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
    let page = page_size();
    let meta_end = HEADER_SIZE + slot_count as usize * size_of::<SlotMeta>();
    let payload_offset = meta_end.next_multiple_of(page);
    let total = payload_offset as u64 + slot_size as u64 * slot_count as u64;
    if total > MAX_ARENA_BYTES {
        return bad(format!(
            "{slot_count} slots of {slot_size} bytes need {total} bytes, over the \
             {MAX_ARENA_BYTES}-byte limit"
        ));
    }
    Ok(Layout {
        payload_offset,
        used_len: total as usize,
    })
}

/// One chain's slot arena. `Send + Sync`: share it via `Arc`.
pub struct Arena {
    map: MmapRaw,
    fd: OwnedFd,
    // Validated copies; never re-read from the shared header, which peers could change.
    slot_size: u32,
    slot_count: u32,
    payload_offset: usize,
    hugepages: bool,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("fd", &self.fd.as_raw_fd())
            .field("slot_size", &self.slot_size)
            .field("slot_count", &self.slot_count)
            .field("free_slots", &self.free_slots())
            .field("hugepages", &self.hugepages)
            .finish()
    }
}

impl Arena {
    /// Creates a new arena in a fresh memfd named `name`, on 2 MiB hugepages if the system
    /// has them available, otherwise on normal pages.
    pub fn create(name: &str, slot_size: u32, slot_count: u32) -> Result<Arena, ArenaError> {
        Self::create_with(name, slot_size, slot_count, true)
    }

    fn create_with(
        name: &str,
        slot_size: u32,
        slot_count: u32,
        try_hugepages: bool,
    ) -> Result<Arena, ArenaError> {
        let layout = layout(slot_size, slot_count)?;
        let cname = CString::new(name)
            .map_err(|_| ArenaError::InvalidParams(format!("name {name:?} contains NUL")))?;
        // Hugetlb usually has no pages reserved: ftruncate or mmap fails, which is not an
        // error for us, just a reason to use normal pages.
        let huge = try_hugepages
            .then(|| Self::map_new(&cname, layout.used_len.next_multiple_of(HUGE_PAGE), true))
            .and_then(Result::ok);
        let (fd, map, hugepages) = match huge {
            Some((fd, map)) => (fd, map, true),
            None => {
                let (fd, map) = Self::map_new(&cname, layout.used_len, false)?;
                (fd, map, false)
            }
        };
        let arena = Arena {
            map,
            fd,
            slot_size,
            slot_count,
            payload_offset: layout.payload_offset,
            hugepages,
        };
        arena.init(hugepages);
        Ok(arena)
    }

    /// memfd of `len` bytes, sealed against resizing, mapped shared.
    fn map_new(name: &CString, len: usize, huge: bool) -> Result<(OwnedFd, MmapRaw), ArenaError> {
        let mut flags = MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING;
        if huge {
            flags |= MFdFlags::MFD_HUGETLB | MFdFlags::MFD_HUGE_2MB;
        }
        let fd = memfd_create(name.as_c_str(), flags).map_err(os_err("memfd_create"))?;
        // `len` <= MAX_ARENA_BYTES, so it fits off_t.
        ftruncate(&fd, len as nix::libc::off_t).map_err(os_err("ftruncate"))?;
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).map_err(os_err("fcntl(F_ADD_SEALS)"))?;
        let map = MmapOptions::new()
            .len(len)
            .map_raw(&fd)
            .map_err(|source| ArenaError::Io { op: "mmap", source })?;
        Ok((fd, map))
    }

    /// Fills in a freshly created (zeroed) mapping: all slots free, chained 0 -> 1 -> ... -> NIL.
    fn init(&self, hugepages: bool) {
        let h = self.header();
        for i in 0..self.slot_count {
            let m = self.meta(i).expect("index < slot_count");
            m.state.store(pack(FIRST_GENERATION, FREE), Relaxed);
            m.next
                .store(if i + 1 < self.slot_count { i + 1 } else { NIL }, Relaxed);
        }
        h.free.head.store(pack(0, 0), Relaxed);
        h.free.count.store(self.slot_count, Relaxed);
        h.version.store(VERSION, Relaxed);
        h.flags
            .store(if hugepages { FLAG_HUGETLB } else { 0 }, Relaxed);
        h.slot_size.store(self.slot_size, Relaxed);
        h.slot_count.store(self.slot_count, Relaxed);
        h.payload_offset.store(self.payload_offset as u64, Relaxed);
        h.map_len.store(self.map.len() as u64, Relaxed);
        // Last, so a header with the magic is always complete.
        h.magic.store(MAGIC, Release);
    }

    /// Maps an arena created by another process (the fd arrived over a socket or by
    /// inheritance). Anything that is not a well-formed, sealed arena is an error.
    pub fn from_fd(fd: OwnedFd) -> Result<Arena, ArenaError> {
        let bad = |m: String| Err(ArenaError::BadHeader(m));
        let file = File::from(fd);
        let file_len = file
            .metadata()
            .map_err(|source| ArenaError::Io {
                op: "fstat",
                source,
            })?
            .len();
        if file_len < HEADER_SIZE as u64
            || file_len > MAX_ARENA_BYTES.next_multiple_of(HUGE_PAGE as u64)
        {
            return bad(format!("file size {file_len} cannot hold an arena"));
        }
        let shrink_sealed = fcntl(&file, FcntlArg::F_GET_SEALS)
            .is_ok_and(|seals| SealFlag::from_bits_retain(seals).contains(SealFlag::F_SEAL_SHRINK));
        if !shrink_sealed {
            return bad("fd is not a memfd sealed against shrinking".into());
        }
        let map = MmapOptions::new()
            .len(file_len as usize)
            .map_raw(&file)
            .map_err(|source| ArenaError::Io { op: "mmap", source })?;
        let fd = OwnedFd::from(file);

        // SAFETY: the mapping is page-aligned (so 64-aligned) and at least HEADER_SIZE
        // bytes long (checked above); Header is only atomics, so peers writing it
        // concurrently is not a data race.
        let h = unsafe { &*(map.as_ptr() as *const Header) };
        let magic = h.magic.load(Acquire);
        if magic != MAGIC {
            return bad(format!("magic {magic:#018x}, expected {MAGIC:#018x}"));
        }
        let version = h.version.load(Relaxed);
        if version != VERSION {
            return bad(format!("version {version}, this build speaks {VERSION}"));
        }
        let slot_size = h.slot_size.load(Relaxed);
        let slot_count = h.slot_count.load(Relaxed);
        let layout =
            layout(slot_size, slot_count).map_err(|e| ArenaError::BadHeader(e.to_string()))?;
        let payload_offset = h.payload_offset.load(Relaxed);
        if payload_offset != layout.payload_offset as u64 {
            return bad(format!(
                "payload offset {payload_offset}, expected {} for {slot_count} slots",
                layout.payload_offset
            ));
        }
        let map_len = h.map_len.load(Relaxed);
        if map_len != file_len || file_len < layout.used_len as u64 {
            return bad(format!(
                "header says {map_len} bytes, file has {file_len}, {slot_count} slots of \
                 {slot_size} need {}",
                layout.used_len
            ));
        }
        let hugepages = h.flags.load(Relaxed) & FLAG_HUGETLB != 0;
        Ok(Arena {
            map,
            fd,
            slot_size,
            slot_count,
            payload_offset: layout.payload_offset,
            hugepages,
        })
    }

    /// The memfd, to pass to worker processes (dup it, or send it with SCM_RIGHTS).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn slot_size(&self) -> u32 {
        self.slot_size
    }

    pub fn slot_count(&self) -> u32 {
        self.slot_count
    }

    pub fn uses_hugepages(&self) -> bool {
        self.hugepages
    }

    /// Free slots across all processes. Exact when no alloc/release is in flight; while
    /// they are, it stays within `0..=slot_count`.
    pub fn free_slots(&self) -> u32 {
        self.header().free.count.load(Relaxed)
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping starts page-aligned (>= align_of::<Header>()) and is at least
        // HEADER_SIZE bytes (create sized it, from_fd checked it); it lives as long as
        // `self`. Header is all atomics, so concurrent writers elsewhere are not a race.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    /// Metadata of slot `index`, or None if out of range.
    fn meta(&self, index: u32) -> Option<&SlotMeta> {
        if index >= self.slot_count {
            return None;
        }
        let off = HEADER_SIZE + index as usize * size_of::<SlotMeta>();
        // SAFETY: index < slot_count, so the entry lies in [HEADER_SIZE, payload_offset),
        // inside the mapping; HEADER_SIZE and the 16-byte stride keep it 8-aligned on a
        // page-aligned base. SlotMeta is atomics plus padding nobody accesses.
        Some(unsafe { &*(self.map.as_ptr().add(off) as *const SlotMeta) })
    }

    fn meta_checked(&self, index: u32) -> Result<&SlotMeta, ArenaError> {
        self.meta(index).ok_or(ArenaError::OutOfRange {
            index,
            count: self.slot_count,
        })
    }

    /// Takes a free slot. O(1), lock-free; `Full` if every slot is in use.
    pub fn alloc(&self) -> Result<SlotRef, ArenaError> {
        let index = self.pop()?;
        self.header().free.count.fetch_sub(1, Relaxed);
        let meta = self.meta(index).expect("pop range-checks the index");
        let (generation, state) = unpack(meta.state.load(Acquire));
        if state != FREE {
            return Err(ArenaError::Corrupted(format!(
                "slot {index} was on the free list while in use"
            )));
        }
        meta.state.store(pack(generation, IN_USE), Release);
        Ok(SlotRef { index, generation })
    }

    /// Returns a slot to the free list. Succeeds exactly once per allocation; a repeated,
    /// stale or out-of-range release is an error and changes nothing.
    pub fn release(&self, slot: SlotRef) -> Result<(), ArenaError> {
        let meta = self.meta_checked(slot.index)?;
        let in_use = pack(slot.generation, IN_USE);
        let freed = pack(next_generation(slot.generation), FREE);
        if let Err(actual) = meta.state.compare_exchange(in_use, freed, AcqRel, Acquire) {
            return Err(self.state_error(slot, actual));
        }
        // Count before pushing so the counter never dips below the stack's true size.
        self.header().free.count.fetch_add(1, Relaxed);
        self.push(slot.index, meta);
        Ok(())
    }

    fn pop(&self) -> Result<u32, ArenaError> {
        let head = &self.header().free.head;
        let mut cur = head.load(Acquire);
        loop {
            let (tag, index) = unpack(cur);
            if index == NIL {
                return Err(ArenaError::Full);
            }
            let meta = self.meta(index).ok_or_else(|| {
                ArenaError::Corrupted(format!("free-list head {index} out of range"))
            })?;
            // If another process pops `index` first, this may read a stale link, but then
            // the head's tag has moved on and the CAS below fails.
            let next = meta.next.load(Relaxed);
            #[cfg(test)]
            if tests::YIELD_IN_POP.get() {
                std::thread::yield_now();
            }
            match head.compare_exchange_weak(cur, pack(tag.wrapping_add(1), next), AcqRel, Acquire)
            {
                Ok(_) => return Ok(index),
                Err(actual) => cur = actual,
            }
        }
    }

    fn push(&self, index: u32, meta: &SlotMeta) {
        let head = &self.header().free.head;
        let mut cur = head.load(Relaxed);
        loop {
            let (tag, top) = unpack(cur);
            meta.next.store(top, Relaxed);
            // Release: the link and the previous owner's payload writes are visible to the
            // next popper.
            match head.compare_exchange_weak(
                cur,
                pack(tag.wrapping_add(1), index),
                Release,
                Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    fn state_error(&self, slot: SlotRef, state: u64) -> ArenaError {
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
    fn validate(&self, slot: SlotRef) -> Result<(), ArenaError> {
        let state = self.meta_checked(slot.index)?.state.load(Acquire);
        if state == pack(slot.generation, IN_USE) {
            Ok(())
        } else {
            Err(self.state_error(slot, state))
        }
    }

    /// Validates a received descriptor against this arena: slot in range and in use at the
    /// descriptor's generation, `len <= slot_size`, `reserved == 0`. Call it on every
    /// descriptor; the chain id is the caller's business (it picked this arena by it).
    pub fn check(&self, d: &Descriptor) -> Result<SlotRef, ArenaError> {
        if d.reserved != 0 {
            return Err(ArenaError::ReservedNotZero(d.reserved));
        }
        if d.len > self.slot_size {
            return Err(ArenaError::LenTooLarge {
                len: d.len,
                slot_size: self.slot_size,
            });
        }
        let slot = SlotRef {
            index: d.slot,
            generation: d.generation,
        };
        self.validate(slot)?;
        Ok(slot)
    }

    /// Pointer to `len` bytes at `offset` in a validated slot.
    fn span(&self, slot: SlotRef, offset: usize, len: usize) -> Result<*mut u8, ArenaError> {
        self.validate(slot)?;
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.slot_size as usize)
        {
            return Err(ArenaError::OutOfBounds {
                offset,
                len,
                slot_size: self.slot_size,
            });
        }
        let at = self.payload_offset + slot.index as usize * self.slot_size as usize + offset;
        // SAFETY: index < slot_count (validate) and offset + len <= slot_size, so
        // [at, at + len) lies within payload_offset + slot_count * slot_size <= map.len().
        Ok(unsafe { self.map.as_mut_ptr().add(at) })
    }

    /// Copies `src` into the slot at `offset`. The caller must own the slot.
    pub fn write(&self, slot: SlotRef, offset: usize, src: &[u8]) -> Result<(), ArenaError> {
        let dst = self.span(slot, offset, src.len())?;
        // SAFETY: `dst` is valid for src.len() bytes (span); `src` is a Rust slice, which
        // cannot overlap the mapping because we never hand out slices into it.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
        Ok(())
    }

    /// Copies `dst.len()` bytes from the slot at `offset` into `dst`.
    pub fn read(&self, slot: SlotRef, offset: usize, dst: &mut [u8]) -> Result<(), ArenaError> {
        let src = self.span(slot, offset, dst.len())?;
        // SAFETY: as in `write`, with the roles swapped.
        unsafe { ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Start of the slot's payload, after the same generation check as [`Arena::read`],
    /// for copying straight between the slot and another buffer (e.g. Wasm linear memory).
    ///
    /// The pointer is valid for reads and writes of [`Arena::slot_size`] bytes, 64-byte
    /// aligned, for as long as this `Arena` is alive. Dereferencing it is `unsafe` and
    /// sound only if the caller:
    /// - owns the slot (holds its current descriptor) for the whole access, so no other
    ///   thread or well-behaved process touches the bytes meanwhile;
    /// - uses raw-pointer copies (`ptr::copy_nonoverlapping`, `read_volatile`, ...) and
    ///   never turns it into `&[u8]`/`&mut [u8]`: another process may still write there.
    pub fn slot_ptr(&self, slot: SlotRef) -> Result<*mut u8, ArenaError> {
        self.span(slot, 0, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::FdFlag;
    use std::os::fd::FromRawFd;
    use std::os::unix::process::CommandExt;
    use std::process::Command;
    use std::sync::Arc;
    use std::thread;

    fn arena(slot_size: u32, slot_count: u32) -> Arena {
        Arena::create("spindle-test", slot_size, slot_count).unwrap()
    }

    fn desc(s: SlotRef, len: u32) -> Descriptor {
        Descriptor {
            slot: s.index,
            generation: s.generation,
            len,
            ..Default::default()
        }
    }

    #[test]
    fn is_send_sync() {
        fn assert<T: Send + Sync>() {}
        assert::<Arena>();
        assert::<Arc<Arena>>();
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
        let base = a.map.as_ptr() as usize;
        assert_eq!(base % page_size(), 0);
        assert_eq!(a.payload_offset % page_size(), 0);
        assert!(a.payload_offset >= HEADER_SIZE + 1000 * 16);
        for i in [0, 1, 999] {
            let p = a.slot_ptr(a_alloc_at(&a, i)).unwrap() as usize;
            assert_eq!(p % 64, 0);
            assert_eq!(p - base, a.payload_offset + i as usize * 192);
        }
        assert!(a.payload_offset + 192 * 1000 <= a.map.len());
    }

    /// Allocates until slot `i` comes up (fresh arenas hand out 0, 1, 2, ...).
    fn a_alloc_at(a: &Arena, i: u32) -> SlotRef {
        loop {
            let s = a.alloc().unwrap();
            if s.index == i {
                return s;
            }
        }
    }

    #[test]
    fn alloc_until_full_then_release_all() {
        let a = arena(64, 16);
        assert_eq!(a.free_slots(), 16);
        let slots: Vec<_> = (0..16).map(|_| a.alloc().unwrap()).collect();
        let mut idx: Vec<_> = slots.iter().map(|s| s.index).collect();
        idx.sort();
        assert_eq!(
            idx,
            (0..16).collect::<Vec<_>>(),
            "each slot handed out once"
        );
        assert!(slots.iter().all(|s| s.generation == FIRST_GENERATION));
        assert_eq!(a.free_slots(), 0);
        assert!(matches!(a.alloc(), Err(ArenaError::Full)));
        for s in &slots {
            a.release(*s).unwrap();
        }
        assert_eq!(a.free_slots(), 16);
        let again = a.alloc().unwrap();
        assert_eq!(again.generation, FIRST_GENERATION + 1);
    }

    #[test]
    fn release_exactly_once() {
        let a = arena(64, 4);
        let s = a.alloc().unwrap();
        a.release(s).unwrap();
        let err = a.release(s).unwrap_err();
        assert!(
            matches!(err, ArenaError::NotInUse { current: 2, .. }),
            "{err}"
        );
        assert_eq!(a.free_slots(), 4, "double release must not add a free slot");

        // Reallocated (LIFO: same slot): the old ref is now stale and must not free it.
        let s2 = a.alloc().unwrap();
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
        let s = a.alloc().unwrap();
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

    #[test]
    fn read_write_checked() {
        let a = arena(256, 2);
        let s = a.alloc().unwrap();
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
        let s = match a.alloc() {
            Ok(s) => s,
            Err(ArenaError::Full) => {
                thread::yield_now();
                return false;
            }
            Err(e) => panic!("alloc: {e}"),
        };
        let stamp = (owner << 40 | round).to_le_bytes();
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
        a.check(&desc(s, a.slot_size())).unwrap();
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
                        let Ok(s) = a.alloc() else {
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
        let mut all: Vec<_> = (0..8).map(|_| a.alloc().unwrap().index).collect();
        all.sort();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
        assert!(a.alloc().is_err());
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

    const CHILD_FD_ENV: &str = "SPINDLE_SHM_TEST_CHILD_FD";
    const CHILD_CYCLES: u64 = 30_000;

    #[test]
    fn cross_process() {
        if let Ok(fd) = std::env::var(CHILD_FD_ENV) {
            // Child role: the fd was inherited from the parent test process.
            let fd: i32 = fd.parse().unwrap();
            // SAFETY: the parent made exactly this descriptor survive exec for us; nothing
            // else in this process knows about it.
            let a = Arena::from_fd(unsafe { OwnedFd::from_raw_fd(fd) }).unwrap();
            let me = std::process::id() as u64;
            YIELD_IN_POP.set(true);
            let mut round = 0;
            while round < CHILD_CYCLES {
                round += own_and_verify(&a, me, round) as u64;
            }
            return;
        }

        let a = arena(128, 8);
        let fd = a.fd().as_raw_fd();
        let name = format!(
            "{}::cross_process",
            module_path!().split_once("::").unwrap().1
        );
        let children: Vec<_> = (0..2)
            .map(|_| {
                let mut cmd = Command::new(std::env::current_exe().unwrap());
                cmd.args(["--exact", &name, "--nocapture", "--test-threads=1"])
                    .env(CHILD_FD_ENV, fd.to_string());
                // SAFETY: runs between fork and exec; nix's fcntl is one fcntl(2) call and an
                // errno read, so it is async-signal-safe and allocates nothing, and it only
                // touches the child's copy of the descriptor table, so the arena fd stays
                // close-on-exec in the parent and in any other process it spawns. `fd` is open
                // in that copy: the parent holds the arena until the children are spawned.
                unsafe {
                    cmd.pre_exec(move || {
                        let fd = BorrowedFd::borrow_raw(fd);
                        fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).map_err(io::Error::from)?;
                        Ok(())
                    });
                }
                cmd.spawn().unwrap()
            })
            .collect();
        // Keep contending until both children are done, so the processes really overlap.
        let me = std::process::id() as u64;
        let mut round = 0;
        let mut running = children;
        while round < CHILD_CYCLES || !running.is_empty() {
            round += own_and_verify(&a, me, round) as u64;
            if round.is_multiple_of(1024) {
                running.retain_mut(|c| match c.try_wait().unwrap() {
                    None => true,
                    Some(status) => {
                        assert!(status.success(), "child failed: {status}");
                        false
                    }
                });
            }
        }
        eprintln!("parent ran {round} cycles alongside the children");
        assert_eq!(a.free_slots(), 8);
        let mut all: Vec<_> = (0..8).map(|_| a.alloc().unwrap().index).collect();
        all.sort();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn from_fd_shares_the_arena() {
        let a = arena(64, 4);
        let b = Arena::from_fd(a.fd().try_clone_to_owned().unwrap()).unwrap();
        assert_eq!((b.slot_size(), b.slot_count()), (64, 4));
        assert_eq!(b.uses_hugepages(), a.uses_hugepages());
        let s = a.alloc().unwrap();
        a.write(s, 0, b"ping").unwrap();
        let got = b.check(&desc(s, 4)).unwrap();
        let mut buf = [0; 4];
        b.read(got, 0, &mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        b.release(got).unwrap();
        assert_eq!(a.free_slots(), 4);
        assert!(a.release(s).is_err());
    }

    fn sealed_memfd(len: u64, contents: &[u8]) -> OwnedFd {
        let (fd, map) =
            Arena::map_new(&CString::new("not-an-arena").unwrap(), len as usize, false).unwrap();
        // SAFETY: fresh mapping of `len` >= contents.len() bytes (true in these tests).
        unsafe { ptr::copy_nonoverlapping(contents.as_ptr(), map.as_mut_ptr(), contents.len()) };
        fd
    }

    #[test]
    fn from_fd_rejects_non_arenas() {
        let err = Arena::from_fd(sealed_memfd(1 << 20, b"definitely not an arena")).unwrap_err();
        assert!(err.to_string().contains("magic"), "{err}");

        let err = Arena::from_fd(sealed_memfd(16, b"")).unwrap_err();
        assert!(matches!(err, ArenaError::BadHeader(_)), "{err}");

        let null = File::open("/dev/null").unwrap();
        assert!(Arena::from_fd(null.into()).is_err());

        // Unsealed memfd holding a real header: a peer could shrink it under us.
        let a = arena(64, 4);
        let mut copy = vec![0u8; a.map.len()];
        // SAFETY: reading our own mapping, which is map.len() bytes long.
        unsafe { ptr::copy_nonoverlapping(a.map.as_ptr(), copy.as_mut_ptr(), copy.len()) };
        let mut f = File::from(memfd_create(c"unsealed", MFdFlags::MFD_CLOEXEC).unwrap());
        std::io::Write::write_all(&mut f, &copy).unwrap();
        let err = Arena::from_fd(f.into()).unwrap_err();
        assert!(err.to_string().contains("sealed"), "{err}");
    }

    #[test]
    fn from_fd_rejects_tampered_header() {
        type Tamper = fn(&Header);
        let tampers: [(Tamper, &str); 5] = [
            (|h| h.version.store(99, Relaxed), "version 99"),
            (|h| h.slot_size.store(100, Relaxed), "multiple of 64"),
            (|h| h.slot_count.store(1 << 20, Relaxed), "payload offset"),
            (|h| h.slot_size.store(1 << 20, Relaxed), "need"),
            (|h| h.map_len.store(1 << 30, Relaxed), "header says"),
        ];
        for (tamper, what) in tampers {
            let a = arena(64, 4);
            tamper(a.header());
            let err = Arena::from_fd(a.fd().try_clone_to_owned().unwrap()).unwrap_err();
            assert!(err.to_string().contains(what), "expected {what:?}: {err}");
        }
    }

    #[test]
    fn corrupt_free_list_is_an_error_not_ub() {
        let a = arena(64, 4);
        a.header().free.head.store(pack(0, 1000), Relaxed);
        assert!(matches!(a.alloc(), Err(ArenaError::Corrupted(_))));
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
            assert!(Arena::map_new(&CString::new("huge").unwrap(), HUGE_PAGE, true).is_err());
        }
        if a.uses_hugepages() {
            assert_eq!(a.map.len() % HUGE_PAGE, 0);
        }
        let normal = Arena::create_with("normal", 4096, 1024, false).unwrap();
        assert!(!normal.uses_hugepages());
        for a in [&a, &normal] {
            let s = a.alloc().unwrap();
            a.write(s, 4000, &[7; 96]).unwrap();
            let b = Arena::from_fd(a.fd().try_clone_to_owned().unwrap()).unwrap();
            assert_eq!(b.uses_hugepages(), a.uses_hugepages());
            let mut buf = [0; 96];
            b.read(s, 4000, &mut buf).unwrap();
            assert_eq!(buf, [7; 96]);
        }
    }
}
