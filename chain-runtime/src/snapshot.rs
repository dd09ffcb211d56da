//! Images of warm reactor instances, and instances built from them without compiling again:
//! the local half of remote fork (MITOSIS-style; Faasm's Proto-Faaslets for Wasm).
//!
//! A [`Snapshot`] is taken by [`FunctionHost::snapshot`](crate::host::FunctionHost::snapshot)
//! between two invocations. It holds everything instantiation does not recreate by itself:
//!
//! - **linear memory**: its size, and its contents in a sealed memfd into which only the
//!   non-zero 4 KiB pages were written (zero pages are holes, so the image costs what the
//!   guest actually touched), plus a map of which pages are non-zero;
//! - **every global**, exported or not (`__stack_pointer`, the allocator's bump pointer,
//!   metering counters), in creation order with its type;
//! - **table sizes** (the contents must be exactly what instantiation produces: see below);
//! - the **WASI layout** the child must rebuild: args, environment, which stdio fds are open;
//! - the **identity** it belongs to: the module bytes' SHA-256 and the engine/ABI string
//!   ([`engine_identity`]).
//!
//! A child ([`InstanceBuilder::from_snapshot`](crate::instance::InstanceBuilder::from_snapshot))
//! reuses the parent's compiled [`CompiledModule`](crate::host::CompiledModule): it
//! instantiates it (microseconds), grows memory to the image's size, maps the memfd
//! `MAP_PRIVATE | MAP_FIXED` over the memory (copy-on-write: a child's writes reach neither
//! the image nor any other child), writes the globals back, skips `_initialize`, and calls
//! the guest's optional `spindle_on_fork` export so it can reseed what must not be shared.
//!
//! What cannot be captured makes capture fail ([`SnapshotError`]) rather than be dropped:
//! tables whose contents changed at run time (a child re-applies the elem segments, so a
//! `table.set`/`table.grow` would be lost), externref tables and globals (host objects),
//! mutable funcref globals (pointers into the parent's instance), shared or several
//! memories, memory beyond the configured limit, and command modules (no instance lives
//! between requests). Host-side output not yet written (a partial log line) stays the
//! parent's.

use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::Arc;

pub use proto::PageBitmap;

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, mmap_anonymous};
use nix::sys::stat::fstat;
use wasmer::sys::vm::{LinearMemory, StoreObject, TableElement, VMMemory, VMTable};
use wasmer::{AsStoreMut, Engine, Memory, MemoryStyle, Mutability, Store, TableType, Type};

/// Version of the guest ABI and of this image layout. A child refuses an image whose
/// [`engine_identity`] (which includes it) differs, so bump it whenever either changes.
pub const GUEST_ABI_VERSION: u32 = 1;

/// Granularity of the non-zero page map and of the holes in the image memfd: the host page.
pub const IMAGE_PAGE: u64 = 4096;

/// Wasm page size in bytes.
const WASM_PAGE: u64 = wasmer::WASM_PAGE_SIZE as u64;

/// The seals an image memfd must carry before a child maps it: without SHRINK a later
/// truncation would turn the child's accesses into SIGBUS (which wasmer's handler would take
/// for a guest trap); without WRITE the image would not be immutable.
const REQUIRED_SEALS: SealFlag = SealFlag::F_SEAL_SHRINK.union(SealFlag::F_SEAL_WRITE);

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("a command module has no instance between requests to capture (only reactors fork)")]
    CommandModule,
    #[error("the reactor trapped and was discarded; there is no warm instance to capture")]
    NoInstance,
    #[error("a call into the guest is in progress; capture only between invocations")]
    CallInProgress,
    #[error("module has {0} memories; a snapshot supports exactly one")]
    Memories(usize),
    #[error("the linear memory is {0}, which cannot be mapped over in place")]
    MemoryStyle(&'static str),
    #[error("linear memory is {pages} pages, above the configured limit of {limit} pages")]
    MemoryOverLimit { pages: u64, limit: u32 },
    #[error("table {index} holds externrefs (host objects), which cannot be captured")]
    ExternrefTable { index: usize },
    #[error(
        "table {index} grew at run time ({pristine} -> {now} elements); a child would get the {pristine} elements of instantiation"
    )]
    TableGrew {
        index: usize,
        pristine: u32,
        now: u32,
    },
    #[error(
        "table {index} element {element} was changed at run time; a child would get the element from instantiation"
    )]
    TableChanged { index: usize, element: u32 },
    #[error("global {index} is a mutable {ty} reference, which cannot be captured")]
    ReferenceGlobal { index: usize, ty: Type },
    #[error("cannot {what}: {source}")]
    Image {
        what: &'static str,
        source: std::io::Error,
    },
    #[error(
        "the guest has files open that a child could not get back ({0}); close them before \
         the instance is captured (by the end of `_initialize`, or of a request), or use \
         `start: exec`"
    )]
    OpenFiles(String),
    #[error("image does not fit this instance: {0}")]
    Mismatch(String),
    #[error("image is malformed: {0}")]
    Malformed(String),
    #[error("the caller could not fill linear memory: {0}")]
    Fill(Box<dyn std::error::Error + Send + Sync>),
}

/// The engine/ABI string an image belongs to: a child accepts only an image whose string
/// equals its own, so compiled code, the instance layout (globals appear in creation
/// order, including the metering middleware's) and the guest ABI all match.
pub fn engine_identity(engine: &Engine, metered: bool) -> String {
    format!(
        "wasmer-{} {} {}-{} metering={} spindle-abi={}",
        wasmer::sys::vm::VERSION,
        engine.deterministic_id(),
        std::env::consts::ARCH,
        std::env::consts::OS,
        if metered { "on" } else { "off" },
        GUEST_ABI_VERSION,
    )
}

/// An immutable image of a warm reactor instance. Cloning is cheap (shared); the image
/// memfd closes when the last clone goes (children that mapped it keep their mapping).
#[derive(Clone)]
pub struct Snapshot(Arc<SnapshotInner>);

struct SnapshotInner {
    meta: SnapshotMeta,
    image: OwnedFd,
}

impl Snapshot {
    /// Everything but the memory contents.
    pub fn meta(&self) -> &SnapshotMeta {
        &self.0.meta
    }

    /// The sealed memfd of linear memory: `meta().memory.bytes` long, non-zero pages only.
    pub fn image(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.0.image.as_fd()
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("meta", &self.0.meta)
            .field("image", &self.0.image.as_raw_fd())
            .finish()
    }
}

/// What a child needs besides the memory contents (and all a remote child receives before
/// it fetches pages). Every field is checked against the child before use, so a malformed
/// or foreign one is an error, never undefined behaviour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// SHA-256 of the module's bytes.
    pub module_sha256: [u8; 32],
    /// [`engine_identity`] of the engine the parent ran on.
    pub engine: String,
    pub memory: MemoryLayout,
    /// Every global of the instance, in creation order.
    pub globals: Vec<GlobalImage>,
    /// Every table, in creation order; their contents are those of instantiation.
    pub tables: Vec<TableImage>,
    pub wasi: WasiLayout,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    /// Size of linear memory in bytes (a whole number of Wasm pages).
    pub bytes: u64,
    /// Which [`IMAGE_PAGE`]s hold a non-zero byte (the rest are holes in the image).
    pub nonzero: PageBitmap,
}

/// Rebuilds a page map received from elsewhere, refusing one that does not describe exactly
/// `pages` pages.
pub fn page_map(pages: u64, words: Vec<u64>) -> Result<PageBitmap, SnapshotError> {
    let len = words.len();
    PageBitmap::from_words(pages, words).ok_or_else(|| {
        SnapshotError::Malformed(format!(
            "page map of {len} words does not describe {pages} pages"
        ))
    })
}

/// One global's type and raw value (`VMGlobalDefinition`'s 16 bytes, as wasmer-wasix keeps
/// them). An immutable reference global is recreated by instantiation and is not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalImage {
    pub ty: Type,
    pub mutability: Mutability,
    pub value: u128,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableImage {
    /// Element type (always `FuncRef`: externref tables are refused).
    pub element: Type,
    pub size: u32,
}

/// The WASI state a child rebuilds: it must be identical, because wasi-libc caches what it
/// read (environ, the preopen numbering) in linear memory, which the child inherits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WasiLayout {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The guest paths of the preopened directories, in fd order (from fd 3): the guest's
    /// libc keeps its table of them in linear memory, so a child must have the same ones.
    pub preopens: Vec<String>,
    /// Stdio fds (0, 1, 2) the guest closed. Above them only the preopens are open (a
    /// capture refuses an instance with anything else open, see `SnapshotError::OpenFiles`).
    pub stdio_closed: [bool; 3],
}

/// How a child's linear memory gets the image's contents.
pub enum MemoryFill<'a> {
    /// Map this sealed memfd (`meta.memory.bytes` long) copy-on-write over the memory:
    /// what [`InstanceBuilder::from_snapshot`](crate::instance::InstanceBuilder::from_snapshot)
    /// does with [`Snapshot::image`].
    Map(BorrowedFd<'a>),
    /// The caller populates it (the remote/lazy path: register the region with
    /// userfaultfd, or copy pages in). The callback runs once (not at all for an empty
    /// memory), after memory has grown to
    /// the image size and been replaced by fresh, never-touched anonymous pages (so every
    /// first access is a missing-page fault), and before the globals are restored and
    /// `spindle_on_fork` runs: by the time it returns, any access must be answerable,
    /// because `spindle_on_fork` may touch any page.
    Caller(&'a mut dyn FnMut(MemoryRegion) -> Result<(), Box<dyn std::error::Error + Send + Sync>>),
}

/// A child's linear memory, handed to a [`MemoryFill::Caller`] callback.
#[derive(Debug, Clone, Copy)]
pub struct MemoryRegion {
    base: NonNull<u8>,
    len: usize,
}

impl MemoryRegion {
    /// Start of linear memory. It stays at this address for the instance's life (wasmer's
    /// static memory style never moves), until the instance is dropped; that includes the
    /// rebuild after a trap, which for a caller-filled child is a cold instance.
    pub fn base(&self) -> NonNull<u8> {
        self.base
    }

    /// Bytes from `base` that belong to the image (the memory's size after the restore;
    /// pages the guest grows later are not part of it).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A table as instantiation left it, to compare with later: a funcref element is identified
/// by its code pointer and signature (both fixed by the compiled artifact and the engine,
/// so equal across instances of one `CompiledModule`), not by its per-instance vmctx.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableContents {
    ty: TableType,
    size: u32,
    /// `None` for tables that are not funcref (captured only to be refused).
    elements: Option<Vec<Option<(usize, wasmer::sys::vm::VMSignatureHash)>>>,
}

/// Reads every table in `store` (one instance's, in creation order).
pub(crate) fn table_contents(store: &mut Store) -> Vec<TableContents> {
    let objects = store.objects_mut().as_sys();
    <VMTable as StoreObject>::list(objects)
        .iter()
        .map(|table| {
            let ty = *table.ty();
            let size = table.size();
            let elements = (ty.ty == Type::FuncRef).then(|| {
                (0..size)
                    .map(|i| match table.get(i) {
                        Some(TableElement::FuncRef(Some(f))) => {
                            // SAFETY: a funcref in a live table points at an anyfunc owned by
                            // an instance (or host function) of this store, which outlives
                            // this borrow of the store; it is only read.
                            let anyfunc = unsafe { f.0.as_ref() };
                            Some((anyfunc.func_ptr as usize, anyfunc.type_signature_hash))
                        }
                        _ => None,
                    })
                    .collect()
            });
            TableContents { ty, size, elements }
        })
        .collect()
}

/// The one linear memory of the instance in `store`, checked to be mappable in place:
/// owned (not shared), static style (wasmer reserved the whole 4 GiB + guard up front, so
/// the base never moves and growth only changes protections, never copies).
fn check_memory(store: &mut Store) -> Result<(), SnapshotError> {
    let objects = store.objects_mut().as_sys();
    let memories = <VMMemory as StoreObject>::list(objects);
    let [memory] = memories.as_slice() else {
        return Err(SnapshotError::Memories(memories.len()));
    };
    if memory.ty().shared {
        return Err(SnapshotError::MemoryStyle("shared"));
    }
    match memory.style() {
        MemoryStyle::Static => Ok(()),
        MemoryStyle::Dynamic { .. } => Err(SnapshotError::MemoryStyle("dynamic")),
    }
}

/// What the host knows about the instance being captured, beyond its store.
pub(crate) struct CaptureContext<'a> {
    pub module_sha256: [u8; 32],
    pub engine: String,
    pub max_pages: u32,
    pub pristine_tables: &'a [TableContents],
    pub wasi: WasiLayout,
}

/// Captures the instance in `store`, whose exported memory is `memory`. The caller
/// guarantees no guest call is running (it holds the store mutably between invocations).
pub(crate) fn capture(
    store: &mut Store,
    memory: &Memory,
    cx: CaptureContext<'_>,
) -> Result<Snapshot, SnapshotError> {
    check_memory(store)?;
    let tables = capture_tables(store, cx.pristine_tables)?;
    let globals = capture_globals(store)?;

    let view = memory.view(&*store);
    let bytes = view.data_size();
    let pages = bytes / WASM_PAGE;
    if pages > u64::from(cx.max_pages) {
        return Err(SnapshotError::MemoryOverLimit {
            pages,
            limit: cx.max_pages,
        });
    }
    // SAFETY: no guest code runs (the caller holds the store between invocations, on this
    // thread), so nothing writes linear memory while this shared slice lives, and the
    // slice is dropped before the store is used again (nothing can grow the memory).
    let data = unsafe { view.data_unchecked() };
    let (nonzero, image) = write_image(data)?;

    Ok(Snapshot(Arc::new(SnapshotInner {
        meta: SnapshotMeta {
            module_sha256: cx.module_sha256,
            engine: cx.engine,
            memory: MemoryLayout { bytes, nonzero },
            globals,
            tables,
            wasi: cx.wasi,
        },
        image,
    })))
}

fn capture_tables(
    store: &mut Store,
    pristine: &[TableContents],
) -> Result<Vec<TableImage>, SnapshotError> {
    let now = table_contents(store);
    if now.len() != pristine.len() {
        return Err(SnapshotError::Mismatch(format!(
            "instance has {} tables, instantiation makes {}",
            now.len(),
            pristine.len()
        )));
    }
    let mut images = Vec::with_capacity(now.len());
    for (index, (now, pristine)) in now.iter().zip(pristine).enumerate() {
        let (Some(now_elems), Some(pristine_elems)) = (&now.elements, &pristine.elements) else {
            return Err(SnapshotError::ExternrefTable { index });
        };
        if now.size != pristine.size {
            return Err(SnapshotError::TableGrew {
                index,
                pristine: pristine.size,
                now: now.size,
            });
        }
        if let Some(element) = now_elems
            .iter()
            .zip(pristine_elems)
            .position(|(a, b)| a != b)
        {
            return Err(SnapshotError::TableChanged {
                index,
                element: element as u32,
            });
        }
        images.push(TableImage {
            element: now.ty.ty,
            size: now.size,
        });
    }
    Ok(images)
}

fn capture_globals(store: &mut Store) -> Result<Vec<GlobalImage>, SnapshotError> {
    let objects = store.objects_mut();
    let values = objects.as_u128_globals();
    let types: Vec<_> = objects.as_sys().iter_globals().map(|g| *g.ty()).collect();
    types
        .iter()
        .zip(values)
        .enumerate()
        .map(|(index, (ty, value))| {
            if ty.ty.is_num() {
                // The definition is 16 bytes whatever the type; bytes past the type's width
                // are not part of the value (they may hold anything), so they are dropped
                // and the image is canonical.
                let width = match ty.ty {
                    Type::I32 | Type::F32 => 32,
                    Type::I64 | Type::F64 => 64,
                    _ => 128,
                };
                let value = if width == 128 {
                    value
                } else {
                    value & ((1u128 << width) - 1)
                };
                return Ok(GlobalImage {
                    ty: ty.ty,
                    mutability: ty.mutability,
                    value,
                });
            }
            // An immutable funcref is re-created by instantiation, pointing at the child's
            // own function; an externref (even immutable: host-provided) or any mutable
            // reference would be a pointer into the parent.
            if ty.ty == Type::FuncRef && ty.mutability == Mutability::Const {
                return Ok(GlobalImage {
                    ty: ty.ty,
                    mutability: ty.mutability,
                    value: 0,
                });
            }
            Err(SnapshotError::ReferenceGlobal { index, ty: ty.ty })
        })
        .collect()
}

fn image_err(what: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError {
    move |source| SnapshotError::Image { what, source }
}

/// Writes the non-zero pages of `data` at their offsets into a new memfd as long as `data`
/// (so zero pages stay holes and cost nothing), then seals it.
fn write_image(data: &[u8]) -> Result<(PageBitmap, OwnedFd), SnapshotError> {
    let fd = memfd_create(
        "spindle-snapshot",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(|e| image_err("create the image memfd")(e.into()))?;
    let file = File::from(fd);
    file.set_len(data.len() as u64)
        .map_err(image_err("size the image memfd"))?;

    let page = IMAGE_PAGE as usize;
    let mut map = PageBitmap::new(data.len().div_ceil(page) as u64);
    let mut run: Option<usize> = None; // first page of the current run of non-zero pages
    let flush = |from: usize, to: usize| {
        file.write_all_at(
            &data[from * page..(to * page).min(data.len())],
            (from * page) as u64,
        )
        .map_err(image_err("write the image memfd"))
    };
    for (i, chunk) in data.chunks(page).enumerate() {
        if is_zero(chunk) {
            if let Some(from) = run.take() {
                flush(from, i)?;
            }
        } else {
            map.set(i as u64);
            run.get_or_insert(i);
        }
    }
    if let Some(from) = run {
        flush(from, map.pages() as usize)?;
    }

    let seals = SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_SEAL;
    fcntl(&file, FcntlArg::F_ADD_SEALS(seals))
        .map_err(|e| image_err("seal the image memfd")(e.into()))?;
    Ok((map, file.into()))
}

fn is_zero(chunk: &[u8]) -> bool {
    // Word-wise: the bulk of a warm image is scanned here.
    // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned middle.
    let (head, words, tail) = unsafe { chunk.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Checks `meta` against itself and against the child's fresh instance in `store` (before
/// any state is written), so that nothing below trusts it.
fn check_meta(
    store: &mut Store,
    memory: &Memory,
    meta: &SnapshotMeta,
) -> Result<(), SnapshotError> {
    let mismatch = |m: String| Err(SnapshotError::Mismatch(m));
    let bytes = meta.memory.bytes;
    if !bytes.is_multiple_of(WASM_PAGE) || bytes / WASM_PAGE > u64::from(u32::MAX) {
        return Err(SnapshotError::Malformed(format!(
            "memory size {bytes} is not a whole number of Wasm pages"
        )));
    }
    if meta.memory.nonzero.pages() != bytes.div_ceil(IMAGE_PAGE) {
        return Err(SnapshotError::Malformed(format!(
            "page map covers {} pages, memory has {}",
            meta.memory.nonzero.pages(),
            bytes.div_ceil(IMAGE_PAGE)
        )));
    }
    check_memory(store)?;
    let current = memory.view(&*store).data_size();
    if bytes < current {
        return mismatch(format!(
            "image memory is {bytes} bytes, smaller than a fresh instance's {current}"
        ));
    }
    if let Some(max) = memory.ty(&*store).maximum
        && bytes / WASM_PAGE > u64::from(max.0)
    {
        return Err(SnapshotError::MemoryOverLimit {
            pages: bytes / WASM_PAGE,
            limit: max.0,
        });
    }

    let tables: Vec<TableImage> = table_contents(store)
        .iter()
        .map(|t| TableImage {
            element: t.ty.ty,
            size: t.size,
        })
        .collect();
    if tables != meta.tables {
        return mismatch(format!(
            "tables {:?}, a fresh instance has {tables:?}",
            meta.tables
        ));
    }

    let objects = store.objects_mut().as_sys();
    let types: Vec<_> = objects.iter_globals().map(|g| *g.ty()).collect();
    let values = store.objects_mut().as_u128_globals();
    if types.len() != meta.globals.len() {
        return mismatch(format!(
            "{} globals, a fresh instance has {}",
            meta.globals.len(),
            types.len()
        ));
    }
    for (index, ((ty, fresh), image)) in types.iter().zip(values).zip(&meta.globals).enumerate() {
        if ty.ty != image.ty || ty.mutability != image.mutability {
            return mismatch(format!(
                "global {index} is {:?} {:?}, a fresh instance's is {:?} {:?}",
                image.mutability, image.ty, ty.mutability, ty.ty
            ));
        }
        if !ty.ty.is_num() && ty.mutability == Mutability::Var {
            return Err(SnapshotError::ReferenceGlobal { index, ty: ty.ty });
        }
        // Constants are recreated by instantiation; a different one means another module.
        if ty.ty.is_num() && ty.mutability == Mutability::Const && fresh != image.value {
            return mismatch(format!("constant global {index} differs"));
        }
    }
    Ok(())
}

/// Writes the image into the child's fresh instance in `store` (memory `memory`): grows
/// memory, fills it as `fill` says, restores the globals. Tables were checked to be as
/// instantiation made them, which is what the parent had.
pub(crate) fn restore(
    store: &mut Store,
    memory: &Memory,
    meta: &SnapshotMeta,
    fill: MemoryFill<'_>,
) -> Result<(), SnapshotError> {
    check_meta(store, memory, meta)?;
    let bytes = meta.memory.bytes;
    let current = memory.view(&*store).data_size();
    let grow_by = ((bytes - current) / WASM_PAGE) as u32;
    if grow_by > 0 {
        memory.grow(&mut *store, grow_by).map_err(|e| {
            SnapshotError::Mismatch(format!("cannot grow memory to {bytes} bytes: {e}"))
        })?;
    }
    let view = memory.view(&*store);
    if view.data_size() != bytes {
        return Err(SnapshotError::Mismatch(format!(
            "memory is {} bytes after growing, the image {bytes}",
            view.data_size()
        )));
    }
    let len = bytes as usize;
    let base = view.data_ptr();
    if len > 0 {
        match fill {
            MemoryFill::Map(fd) => {
                check_image_fd(fd, bytes)?;
                // SAFETY: [base, base + len) is the child's linear memory: inside wasmer's
                // static reservation (checked in check_meta), len == its current size, and
                // wasmer already made it read-write; the new mapping has the same size and
                // protection, so wasmer's VMMemoryDefinition stays valid, and wasmer's
                // munmap of the reservation at drop removes it too. No reference into
                // linear memory is alive: the guest has not run since instantiation and we
                // hold the store mutably on this thread. The fd is a sealed memfd of exactly
                // len bytes (checked above), so no access can fault past its end.
                unsafe { map_fixed(base, len, Some(fd)) }?;
            }
            MemoryFill::Caller(callback) => {
                // SAFETY: as for the image mapping above; anonymous pages replace the data
                // segments instantiation wrote, so the caller starts from untouched memory.
                unsafe { map_fixed(base, len, None) }?;
                let base = NonNull::new(base).ok_or_else(|| {
                    SnapshotError::Mismatch("linear memory has a null base".into())
                })?;
                callback(MemoryRegion { base, len }).map_err(SnapshotError::Fill)?;
            }
        }
    }

    write_globals(store, meta);
    Ok(())
}

/// Writes the image's value into every mutable numeric global of the instance in `store`
/// (constants are left alone): the globals half of [`restore`], and of a reset in place
/// ([`crate::fresh`]). `meta` must have been checked against this instance ([`restore`] does
/// it), so each raw value has the layout its destination expects.
pub(crate) fn write_globals(store: &mut Store, meta: &SnapshotMeta) {
    let objects = store.objects_mut();
    for (index, global) in meta.globals.iter().enumerate() {
        if global.mutability == Mutability::Var && global.ty.is_num() {
            objects.set_global_unchecked(index, global.value);
        }
    }
}

/// Refuses an image fd that is not a sealed memfd of exactly `bytes` bytes.
fn check_image_fd(fd: BorrowedFd<'_>, bytes: u64) -> Result<(), SnapshotError> {
    let st = fstat(fd).map_err(|e| image_err("stat the image")(e.into()))?;
    if st.st_size as u64 != bytes {
        return Err(SnapshotError::Mismatch(format!(
            "image file is {} bytes, memory {bytes}",
            st.st_size
        )));
    }
    let sealed = fcntl(fd, FcntlArg::F_GET_SEALS)
        .is_ok_and(|seals| SealFlag::from_bits_retain(seals).contains(REQUIRED_SEALS));
    if !sealed {
        return Err(SnapshotError::Mismatch(
            "image is not a memfd sealed against writes and shrinking".into(),
        ));
    }
    Ok(())
}

/// Maps `fd` (`None`: fresh anonymous memory) privately and read-write over
/// `[base, base + len)`, checked.
///
/// # Safety
/// `[base, base + len)` must be memory this process owns and nothing references: its old
/// contents are discarded.
unsafe fn map_fixed(
    base: *mut u8,
    len: usize,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), SnapshotError> {
    let (Some(addr), Some(length)) = (NonZeroUsize::new(base as usize), NonZeroUsize::new(len))
    else {
        return Err(SnapshotError::Mismatch(
            "linear memory has a null base or no length".into(),
        ));
    };
    let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
    let flags = MapFlags::MAP_FIXED | MapFlags::MAP_PRIVATE;
    // SAFETY: the caller's contract; MAP_FIXED replaces exactly that range.
    let got = unsafe {
        match fd {
            Some(fd) => mmap(Some(addr), length, prot, flags, fd, 0),
            None => mmap_anonymous(Some(addr), length, prot, flags),
        }
    }
    .map_err(|e| image_err("map the image over linear memory")(e.into()))?;
    if got.as_ptr().cast::<u8>() != base {
        // MAP_FIXED never places elsewhere; anything else is a kernel contract broken.
        return Err(SnapshotError::Mismatch(
            "mmap placed the image away from linear memory".into(),
        ));
    }
    Ok(())
}

impl WasiLayout {
    /// SHA-256 over the args, the environment and the preopens' guest paths, each
    /// length-prefixed: what a remote child compares with its own layout instead of receiving
    /// the contents (the environment may hold secrets, and the child rebuilds the layout from
    /// its own config anyway).
    pub fn digest(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut put = |s: &str| {
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        };
        put("args");
        for a in &self.args {
            put(a);
        }
        put("env");
        for (k, v) in &self.env {
            put(k);
            put(v);
        }
        put("preopens");
        for p in &self.preopens {
            put(p);
        }
        h.finalize().into()
    }
}

impl SnapshotMeta {
    /// The wire form a page server hands to remote children.
    pub fn to_image_meta(&self) -> proto::ImageMeta {
        use proto::{GlobalType, GlobalValue};
        let globals = self
            .globals
            .iter()
            .map(|g| {
                let ty = match g.ty {
                    Type::I32 => GlobalType::I32,
                    Type::I64 => GlobalType::I64,
                    Type::F32 => GlobalType::F32,
                    Type::F64 => GlobalType::F64,
                    Type::V128 => GlobalType::V128,
                    // Capture refuses every other reference global; an immutable funcref's
                    // value is a pointer into the parent that instantiation recreates.
                    _ => GlobalType::FuncRef,
                };
                let bits = if ty == GlobalType::FuncRef {
                    0
                } else {
                    g.value
                };
                GlobalValue {
                    ty,
                    mutable: g.mutability == Mutability::Var,
                    bits,
                }
            })
            .collect();
        let stdio_closed = self
            .wasi
            .stdio_closed
            .iter()
            .enumerate()
            .fold(0u8, |bits, (fd, &closed)| bits | (u8::from(closed) << fd));
        proto::ImageMeta {
            module_hash: self.module_sha256,
            engine: self.engine.clone(),
            memory_bytes: self.memory.bytes,
            nonzero: self.memory.nonzero.clone(),
            globals,
            tables: self.tables.iter().map(|t| t.size).collect(),
            wasi_digest: self.wasi.digest(),
            stdio_closed,
        }
    }

    /// Rebuilds what a remote parent sent, with this node's own WASI layout for `wasi`
    /// (args and environment from its config), which must hash to the parent's.
    pub fn from_image_meta(
        meta: &proto::ImageMeta,
        wasi: WasiLayout,
    ) -> Result<SnapshotMeta, SnapshotError> {
        use proto::GlobalType;
        if wasi.digest() != meta.wasi_digest {
            return Err(SnapshotError::Mismatch(
                "the parent ran with other args or environment than this node's config gives \
                 the function"
                    .into(),
            ));
        }
        let stdio_closed = [0, 1, 2].map(|fd| meta.stdio_closed & (1 << fd) != 0);
        let globals = meta
            .globals
            .iter()
            .map(|g| GlobalImage {
                ty: match g.ty {
                    GlobalType::I32 => Type::I32,
                    GlobalType::I64 => Type::I64,
                    GlobalType::F32 => Type::F32,
                    GlobalType::F64 => Type::F64,
                    GlobalType::V128 => Type::V128,
                    GlobalType::FuncRef => Type::FuncRef,
                },
                mutability: if g.mutable {
                    Mutability::Var
                } else {
                    Mutability::Const
                },
                value: g.bits,
            })
            .collect();
        Ok(SnapshotMeta {
            module_sha256: meta.module_hash,
            engine: meta.engine.clone(),
            memory: MemoryLayout {
                bytes: meta.memory_bytes,
                nonzero: meta.nonzero.clone(),
            },
            globals,
            tables: meta
                .tables
                .iter()
                .map(|&size| TableImage {
                    element: Type::FuncRef,
                    size,
                })
                .collect(),
            wasi: WasiLayout {
                stdio_closed,
                ..wasi
            },
        })
    }
}

#[cfg(test)]
mod tests;
