//! `isolation: fresh_per_request`: every request of a reactor runs in a fresh copy of its
//! warm image. After each call the instance is reset in place, in the same process, to the
//! image (as Faasm resets a Faaslet and wasmtime's pooling allocator resets a slot), instead
//! of one instance carrying what each request leaves behind into the next.
//!
//! # The image, mapped copy-on-write
//!
//! The pristine state is a [`Snapshot`] of the warm instance, taken where a zygote takes its
//! own: after instantiation and `_initialize`, before any request.
//!
//! - A worker forked from its zygote already runs on the zygote's image:
//!   [`InstanceBuilder::from_snapshot`](crate::instance::InstanceBuilder::from_snapshot)
//!   mapped its sealed memfd `MAP_PRIVATE | MAP_FIXED` over linear memory. So the image it is
//!   reset to is the zygote's, never something of this child.
//! - An exec'd worker captures its own cold instance ([`snapshot::capture`]) and maps the new
//!   image over the live memory in place, with the code children restore with
//!   ([`snapshot::restore`]). The contents are the same, so the guest cannot tell.
//!
//! From then on, each page the guest writes becomes a private copy of this process, and each
//! page it has not written is still the memfd's page.
//!
//! # A reset ([`Pristine::reset`], then the host's part in `FunctionHost::prepare`)
//!
//! 1. **Memory size.** If the guest grew memory, it is shrunk back. Wasmer has no shrink, but
//!    its `LinearMemory::reset` (length 0) followed by `grow` to the image's size does it: the
//!    memory is static style, so the base never moves and `grow` only `mprotect`s. The pages
//!    past the image get a fresh `PROT_NONE` reservation. That drops their contents, and an
//!    access past the restored size traps again, as it did before the grow.
//! 2. **Written pages.** `PAGEMAP_SCAN` (Linux 6.7+) finds the private pages of the image
//!    range: present or swapped, not file pages. Pages the guest only read are still the
//!    memfd's, and they stay mapped. Each private page is put back one of two ways:
//!    - *copied back*: `pread` from the image memfd overwrites it with the image's bytes. The
//!      page stays this process's, so the next request that writes it takes no fault.
//!    - *dropped*: `MADV_DONTNEED` returns it, and it reads as the image again at its next
//!      touch. The next write to it is a copy-on-write fault (allocate a page, copy 4 KiB).
//!
//!    Copying back is cheaper per page than dropping, and it saves the fault. But a
//!    copied-back page stays private, so later scans find it again even when no request
//!    writes it any more: the set copied back is everything written since the last drop.
//!    So pages are copied back while that set is at most [`KEEP_RESIDENT_PAGES`] (2 MiB).
//!    Past that, and at every [`DROP_EVERY`]th reset, they are all dropped, and the set
//!    shrinks to what requests really write. A reset thus costs in proportion to the pages
//!    written (bounded by 2 MiB of copying for up to 63 resets after a burst), and the pages
//!    are counted. What stays resident is at most what a reused instance would keep: the
//!    pages requests wrote. A kernel without `PAGEMAP_SCAN` gets the whole image range dropped at
//!    every reset instead, and pages that were only read fault in again.
//! 3. **Globals.** Every mutable numeric global gets its image value, exported or not
//!    (`__stack_pointer`, an allocator's, the metering middleware's).
//! 4. **WASI** (host): stdio fds the guest closed are open again, as in the image. A partial
//!    log line is flushed. Stdin and the exit code are cleared. That is all the WASI state
//!    there is: nothing is preopened (see [`crate::wasi`]).
//! 5. **`spindle_on_fork`** (host) runs again if the guest exports it. Each request is a new
//!    copy of the image, so it must not draw the random numbers the last one drew.
//!
//! Every call is followed by a reset, including calls that trapped, ran out of fuel or failed
//! to allocate. A trap needs no teardown: nothing the guest did survives the reset.
//!
//! # Limits
//!
//! - **Tables and passive segments** are instance state outside memory and globals. A module
//!   whose code can change them ([`instance_state_op`]: `table.set`, `table.grow`,
//!   `table.fill`, `table.copy`, `table.init`, `elem.drop`, `data.drop`) is not reset in place.
//!   It is rebuilt from the image after every call instead: instantiate, map, write the
//!   globals, as a forked child does. That is correct but slower, and the metrics count it as
//!   `rebuild`.
//! - What capture refuses ([`SnapshotError`]) cannot be reset to either: externref tables,
//!   mutable reference globals, tables changed by `_initialize`, shared or several memories.
//!   Such a function fails to start, with the reason.
//! - An instance resumed from a remote image has no local image to drop pages back to (its
//!   memory is filled through userfaultfd), so it is refused ([`ResetError::NoLocalImage`]).
//! - The watchdog's timeout ends the process, not the call. Its replacement starts from the
//!   image too: the zygote's when forked, a cold build when exec'd.

use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::time::Duration;

use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags, madvise, mmap_anonymous};
use wasmer::{Memory, Pages, Store};

use crate::snapshot::{self, IMAGE_PAGE, Snapshot, SnapshotError};

/// Wasm page size in bytes.
const WASM_PAGE: usize = wasmer::WASM_PAGE_SIZE;

/// Most private pages a reset copies back from the image (keeping them resident); above
/// this it drops them all. Measured here (docs/benchmarks.md): copying back costs ~0.21 µs a
/// page; dropping costs ~0.27 µs, plus a ~1.4 µs copy-on-write fault at the next write. Also
/// the most memory a fresh instance keeps private beyond a reused one's.
pub const KEEP_RESIDENT_PAGES: u64 = 512;

/// Every this many resets, the private pages are dropped even when few, so pages no request
/// writes any more stop being copied back.
pub const DROP_EVERY: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("cannot take the warm image to reset to: {0}")]
    Capture(#[from] SnapshotError),
    #[error(
        "an instance resumed from a remote image has no local image to reset to \
         (isolation: fresh_per_request needs a zygote's or its own image)"
    )]
    NoLocalImage,
    #[error("linear memory moved from {image:#x} to {now:#x}; it can only be reset in place")]
    Moved { image: usize, now: usize },
    #[error("linear memory is {now} bytes, smaller than the image's {image}")]
    Shrunk { now: u64, image: u64 },
    #[error("cannot {what}: {source}")]
    Sys {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot restore the memory size: {0}")]
    Size(#[from] wasmer::MemoryError),
    #[error("spindle_on_fork failed after the reset: {0}")]
    OnFork(String),
}

fn sys(what: &'static str) -> impl FnOnce(nix::errno::Errno) -> ResetError {
    move |e| ResetError::Sys {
        what,
        source: e.into(),
    }
}

/// What one reset did, for the statistics page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResetReport {
    /// From the end of the call to an instance ready for the next one.
    pub elapsed: Duration,
    /// The instance was rebuilt from the image rather than reset in place.
    pub rebuilt: bool,
    /// Written pages put back to the image, copied back or dropped (0 where the kernel
    /// cannot say which: no `PAGEMAP_SCAN`, or a rebuild).
    pub pages: u64,
    /// They were copied back (and stay resident), not dropped.
    pub copied: bool,
    /// The guest had grown memory, and it was shrunk back to the image's size.
    pub shrank: bool,
}

/// What the memory part of a reset did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MemoryReset {
    /// Written pages put back (0 when unknown, see [`ResetReport::pages`]).
    pub pages: u64,
    /// Copied back rather than dropped.
    pub copied: bool,
    /// Wasm pages the guest had grown, discarded.
    pub grown: u64,
}

/// The image one live instance is reset to, and where its memory is.
pub(crate) struct Pristine {
    image: Snapshot,
    /// Base address of linear memory (never 0): wasmer's static style keeps it for the
    /// instance's life. An address, not a pointer: nothing is accessed through it, it is
    /// compared with the memory's and handed to the kernel.
    base: usize,
    /// Bytes of the image (the memory's size after each reset).
    len: usize,
    scan: Scan,
    /// Resets so far (every [`DROP_EVERY`]th drops).
    resets: u64,
    /// Runs of private pages found by the last scan (kept for its capacity).
    runs: Vec<(usize, usize)>,
}

/// How the written pages of the image range are found.
enum Scan {
    /// `PAGEMAP_SCAN` on this process's `/proc/self/pagemap`, opened in this process (a
    /// forked child opens its own: the file is bound to the mm that opened it).
    Pagemap(File),
    /// No `PAGEMAP_SCAN` here: drop the whole range.
    WholeRange,
}

impl Pristine {
    /// Records `image` as what the instance in `store` (memory `memory`) is reset to. The
    /// caller guarantees that the image's memfd is mapped `MAP_PRIVATE` over the first
    /// `image.meta().memory.bytes` of the memory, and that no guest call is running.
    pub(crate) fn new(
        store: &mut Store,
        memory: &Memory,
        image: Snapshot,
    ) -> Result<Pristine, ResetError> {
        let view = memory.view(&*store);
        let bytes = image.meta().memory.bytes;
        if view.data_size() < bytes {
            return Err(ResetError::Shrunk {
                now: view.data_size(),
                image: bytes,
            });
        }
        let base = view.data_ptr() as usize;
        if base == 0 {
            return Err(SnapshotError::Mismatch("linear memory has a null base".into()).into());
        }
        let len = bytes as usize;
        let scan = match sandbox::open_own_proc_file("/proc/self/pagemap") {
            Ok(file) => match scan_written(&file, base, len, |_, _| Ok(())) {
                Ok(_) => Scan::Pagemap(file),
                Err(e) => {
                    tracing::debug!(
                        "PAGEMAP_SCAN unavailable ({e}): resets drop the whole image range"
                    );
                    Scan::WholeRange
                }
            },
            Err(e) => {
                tracing::debug!(
                    "/proc/self/pagemap unavailable ({e}): resets drop the whole image range"
                );
                Scan::WholeRange
            }
        };
        Ok(Pristine {
            image,
            base,
            len,
            scan,
            resets: 0,
            runs: Vec::new(),
        })
    }

    /// The image this instance is reset to.
    pub(crate) fn image(&self) -> &Snapshot {
        &self.image
    }

    /// Whether resets find the written pages (and count them), rather than drop the whole
    /// image range.
    pub(crate) fn scans(&self) -> bool {
        matches!(self.scan, Scan::Pagemap(_))
    }

    /// Puts memory (size and contents) and every mutable global back to the image. The
    /// caller guarantees no guest call is running and no reference into linear memory is
    /// alive (it holds the store mutably, between invocations, on this thread).
    pub(crate) fn reset(
        &mut self,
        store: &mut Store,
        memory: &Memory,
    ) -> Result<MemoryReset, ResetError> {
        let (base, size) = {
            let view = memory.view(&*store);
            (view.data_ptr() as usize, view.data_size() as usize)
        };
        let image_base = self.base;
        if base != image_base {
            return Err(ResetError::Moved {
                image: image_base,
                now: base,
            });
        }
        let mut grown = 0;
        if size > self.len {
            // SAFETY: [base + len, base + size) is the part of linear memory the guest grew,
            // inside wasmer's static reservation (the base did not move, and static memories
            // are reserved whole up front); nothing references it (see this fn's contract). A
            // PROT_NONE anonymous reservation is what wasmer left there before the grow, and
            // wasmer's munmap of the reservation at drop removes it too.
            unsafe { reserve(image_base + self.len, size - self.len) }?;
            // Wasmer's own way down: length 0, then grow to the image's size (an mprotect of
            // pages that are read-write already; their contents stay).
            memory.reset(&mut *store)?;
            memory.grow(&mut *store, Pages((self.len / WASM_PAGE) as u32))?;
            let view = memory.view(&*store);
            if view.data_ptr() as usize != image_base || view.data_size() as usize != self.len {
                return Err(ResetError::Moved {
                    image: image_base,
                    now: view.data_ptr() as usize,
                });
            }
            grown = ((size - self.len) / WASM_PAGE) as u64;
        } else if size < self.len {
            return Err(ResetError::Shrunk {
                now: size as u64,
                image: self.len as u64,
            });
        }
        let (pages, copied) = self.put_back_written()?;
        snapshot::write_globals(store, self.image.meta());
        Ok(MemoryReset {
            pages,
            copied,
            grown,
        })
    }

    /// Puts the private pages of the image range back to the image's contents: copied back
    /// while few, else dropped (see the module doc). Returns how many and whether copied.
    fn put_back_written(&mut self) -> Result<(u64, bool), ResetError> {
        let base = self.base;
        self.resets += 1;
        let Scan::Pagemap(pagemap) = &self.scan else {
            // SAFETY: [base, base + len) is the private mapping of the image over linear
            // memory; nothing references it (see `reset`'s contract). MADV_DONTNEED on a
            // private file mapping drops this process's copies: the next access reads the
            // memfd's page, and the mapping and its protection stay.
            unsafe { drop_pages(base, self.len) }?;
            return Ok((0, false));
        };
        let runs = &mut self.runs;
        runs.clear();
        let pages = scan_written(pagemap, base, self.len, |start, len| {
            runs.push((start, len));
            Ok(())
        })?;
        let copy = pages <= KEEP_RESIDENT_PAGES && !self.resets.is_multiple_of(DROP_EVERY);
        for &(start, len) in runs.iter() {
            if copy {
                // SAFETY: [start, start + len) lies in the private mapping of the image over
                // linear memory (PAGEMAP_SCAN reports only ranges inside the range it was
                // given), read-write, and nothing references it (see `reset`'s contract).
                unsafe { copy_from_image(self.image.image(), start, len, start - base) }?;
            } else {
                // SAFETY: as above; see the whole-range drop for what MADV_DONTNEED does.
                unsafe { drop_pages(start, len) }?;
            }
        }
        Ok((pages, copy))
    }
}

/// Overwrites `[start, start + len)` with the image's bytes at `offset` (holes read as
/// zeros), with `pread` straight from the memfd's page cache.
///
/// # Safety
/// The range must be writable memory of this process that nothing references.
unsafe fn copy_from_image(
    image: std::os::fd::BorrowedFd<'_>,
    start: usize,
    len: usize,
    offset: usize,
) -> Result<(), ResetError> {
    let mut done = 0;
    while done < len {
        // SAFETY: the destination is the caller's (writable, unreferenced) range, of which
        // `len - done` bytes are left; pread writes at most that many. Raw libc: nix's pread
        // needs a `&mut [u8]`, which would assert more than is known of guest memory.
        let n = unsafe {
            libc::pread(
                image.as_raw_fd(),
                (start + done) as *mut libc::c_void,
                len - done,
                (offset + done) as libc::off_t,
            )
        };
        match n {
            n if n > 0 => done += n as usize,
            0 => {
                return Err(ResetError::Sys {
                    what: "copy the image back (it ended early)",
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(ResetError::Sys {
                        what: "copy the image back",
                        source: e,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Replaces `[addr, addr + len)` by a fresh inaccessible reservation, discarding its contents.
///
/// # Safety
/// The range must be memory this process owns and nothing references.
unsafe fn reserve(addr: usize, len: usize) -> Result<(), ResetError> {
    let (Some(at), Some(length)) = (NonZeroUsize::new(addr), NonZeroUsize::new(len)) else {
        return Ok(());
    };
    // SAFETY: the caller's contract; MAP_FIXED replaces exactly that range.
    let got = unsafe {
        mmap_anonymous(
            Some(at),
            length,
            ProtFlags::PROT_NONE,
            MapFlags::MAP_PRIVATE | MapFlags::MAP_FIXED | MapFlags::MAP_NORESERVE,
        )
    }
    .map_err(sys("discard the grown memory"))?;
    if got.as_ptr() as usize != addr {
        return Err(ResetError::Moved {
            image: addr,
            now: got.as_ptr() as usize,
        });
    }
    Ok(())
}

/// `MADV_DONTNEED` over `[start, start + len)`.
///
/// # Safety
/// The range must be memory this process owns whose contents nothing needs.
unsafe fn drop_pages(start: usize, len: usize) -> Result<(), ResetError> {
    let Some(ptr) = NonNull::new(start as *mut std::ffi::c_void) else {
        return Ok(());
    };
    // SAFETY: the caller's contract.
    unsafe { madvise(ptr, len, MmapAdvise::MADV_DONTNEED) }.map_err(sys("drop written pages"))
}

// `PAGEMAP_SCAN` (linux/fs.h, Linux 6.7): not in the libc crate yet.
const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
const PAGE_IS_PFNZERO: u64 = 1 << 5;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)` with the generic ioctl layout (x86, Arm, RISC-V).
/// Elsewhere the number is wrong, the ioctl fails, and resets drop the whole range.
const PAGEMAP_SCAN: u64 =
    (3 << 30) | ((size_of::<PmScanArg>() as u64) << 16) | ((b'f' as u64) << 8) | 16;

/// Regions per `PAGEMAP_SCAN` call; more are found by calling again from where it stopped.
const SCAN_REGIONS: usize = 32;

/// Calls `found(start, len)` for every run of written pages in `[base, base + len)`: pages of
/// this process's own (anonymous: a private copy of a file page, or a page of an anonymous
/// mapping), present or swapped out, but not the shared zero page. Returns how many pages
/// were found.
fn scan_written(
    pagemap: &File,
    base: usize,
    len: usize,
    mut found: impl FnMut(usize, usize) -> Result<(), ResetError>,
) -> Result<u64, ResetError> {
    let end = base as u64 + len as u64;
    let mut regions = [PageRegion::default(); SCAN_REGIONS];
    let mut from = base as u64;
    let mut pages = 0;
    while from < end {
        let mut arg = PmScanArg {
            size: size_of::<PmScanArg>() as u64,
            start: from,
            end,
            vec: regions.as_mut_ptr() as u64,
            vec_len: SCAN_REGIONS as u64,
            // Not a file page and not the zero page (inverted, then required) ...
            category_inverted: PAGE_IS_FILE | PAGE_IS_PFNZERO,
            category_mask: PAGE_IS_FILE | PAGE_IS_PFNZERO,
            // ... and present or swapped out: what the guest wrote.
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            ..PmScanArg::default()
        };
        // SAFETY: PAGEMAP_SCAN reads and writes `arg` (a pm_scan_arg of the size it states)
        // and writes at most `vec_len` page_regions to `vec`, which points at `regions`; both
        // outlive the call. It only reads this process's page tables over [start, end).
        // Raw libc: nix has no binding for this ioctl.
        let n = unsafe {
            libc::ioctl(
                pagemap.as_raw_fd(),
                PAGEMAP_SCAN as libc::Ioctl,
                &mut arg as *mut PmScanArg,
            )
        };
        if n < 0 {
            return Err(ResetError::Sys {
                what: "scan the page map (PAGEMAP_SCAN)",
                source: std::io::Error::last_os_error(),
            });
        }
        let n = (n as usize).min(SCAN_REGIONS);
        for r in &regions[..n] {
            let (start, stop) = (r.start.max(base as u64), r.end.min(end));
            if start < stop {
                found(start as usize, (stop - start) as usize)?;
                pages += (stop - start) / IMAGE_PAGE;
            }
        }
        if n < SCAN_REGIONS || arg.walk_end >= end {
            break;
        }
        if arg.walk_end <= from {
            return Err(ResetError::Sys {
                what: "scan the page map (PAGEMAP_SCAN made no progress)",
                source: std::io::Error::from(std::io::ErrorKind::InvalidData),
            });
        }
        from = arg.walk_end;
    }
    Ok(pages)
}

/// The first instruction in `wasm` (binary or text) that changes instance state outside
/// linear memory and globals, which a reset in place cannot put back: table contents and
/// sizes, and dropped element or data segments. `None` when there is none.
pub(crate) fn instance_state_op(wasm: &[u8]) -> Option<&'static str> {
    use wasmer::wasmparser::{Operator, Parser, Payload};
    let Ok(binary) = wasmer::wat2wasm(wasm) else {
        return Some("unreadable code");
    };
    for payload in Parser::new(0).parse_all(&binary) {
        let body = match payload {
            Ok(Payload::CodeSectionEntry(body)) => body,
            Ok(_) => continue,
            Err(_) => return Some("unreadable code"),
        };
        let Ok(mut ops) = body.get_operators_reader() else {
            return Some("unreadable code");
        };
        while !ops.eof() {
            let op = match ops.read() {
                Ok(Operator::TableSet { .. }) => "table.set",
                Ok(Operator::TableGrow { .. }) => "table.grow",
                Ok(Operator::TableFill { .. }) => "table.fill",
                Ok(Operator::TableCopy { .. }) => "table.copy",
                Ok(Operator::TableInit { .. }) => "table.init",
                Ok(Operator::ElemDrop { .. }) => "elem.drop",
                Ok(Operator::DataDrop { .. }) => "data.drop",
                Ok(_) => continue,
                Err(_) => "unreadable code",
            };
            return Some(op);
        }
    }
    None
}

#[cfg(test)]
mod tests;
