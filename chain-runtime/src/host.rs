//! The Wasm function host: one compiled module and (for reactors) one long-lived instance,
//! invoked once per request.
//!
//! Two kinds of module are accepted (see docs/guest-abi.md):
//! - **reactor**: exports `memory`, `spindle_alloc` and `spindle_handle`; instantiated once,
//!   `_initialize` called once, then `spindle_handle` per request. The input is copied straight
//!   from the caller's buffer (the arena slot) into linear memory and the output straight from
//!   linear memory back; there is no intermediate buffer.
//! - **command**: a plain WASI program with `_start`. Each request gets a fresh instance, the
//!   input on stdin and the response from stdout, as WAGI/Spin do. This costs an instantiation
//!   per request and two extra copies, in exchange for running modules not written for Spindle.
//!
//! Limits: a per-call instruction budget (wasmer's metering middleware: the guest traps when it
//! runs out, which is how an endless loop becomes a timeout) and a linear-memory cap enforced
//! through the engine's tunables (memory.grow past it fails, as in any Wasm runtime).
//! A trap leaves the guest in an unknown state, so the instance is rebuilt before the next call
//! (with `isolation: fresh_per_request`, the reset after every call already puts it back: see
//! [`crate::fresh`]).
//!
//! A warm reactor can be captured between invocations ([`FunctionHost::snapshot`]) and new
//! instances built from the image without compiling again (see [`crate::snapshot`]); the
//! compiled module they share is a [`CompiledModule`].

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use proto::Status;
use wasmer::sys::vm::{VMMemory, VMMemoryDefinition, VMTable, VMTableDefinition};
use wasmer::sys::{BaseTunables, Cranelift, NativeEngineExt, Tunables};
use wasmer::wasmparser::Operator;
use wasmer::{
    Engine, Exports, Extern, Function, FunctionEnv, FunctionEnvMut, Imports, Instance, Memory,
    MemoryType, Module, Pages, RuntimeError, Store, TableType, TypedFunction, Value,
    WASM_PAGE_SIZE,
};
use wasmer::{MemoryError, MemoryStyle, TableStyle};
use wasmer_middlewares::metering::{self, MeteringPoints};

use crate::abi::{self, LinkProblems, SPINDLE_IMPORTS};
use crate::config::{FunctionSpec, Isolation, ModuleMode};
use crate::fresh::{self, Pristine, ResetError, ResetReport};
use crate::inplace;
use crate::snapshot::{
    self, CaptureContext, MemoryFill, Snapshot, SnapshotError, SnapshotMeta, TableContents,
    WasiLayout,
};
use crate::wasi::{self, Preopens, ProcExit, WasiCtx};

/// Largest error message kept from a guest; the rest is cut so a guest cannot flood the slot.
const MAX_ERROR_LEN: usize = 4096;
/// Optional reactor export called in every instance built from a snapshot, before its first
/// request, so the guest can reseed what its children must not share (PRNG state).
pub const ON_FORK_EXPORT: &str = "spindle_on_fork";
/// The optional export of modules that handle large inputs where they are (docs/guest-abi.md
/// "In-place calls").
pub const INPLACE_EXPORT: &str = "spindle_handle_inplace";

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot read module {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot compile module {path}: {message}")]
    Compile { path: String, message: String },
    #[error("module {path} {message}")]
    Abi { path: String, message: String },
    #[error("module {path} cannot run as function `{function}`:\n{problems}")]
    Link {
        path: String,
        function: String,
        problems: LinkProblems,
    },
    #[error(transparent)]
    Preopen(#[from] wasi::PreopenError),
    #[error("cannot instantiate module {path}: {message}")]
    Instantiate { path: String, message: String },
    #[error("cannot fork module {path} from its snapshot: {source}")]
    Fork { path: String, source: SnapshotError },
    #[error("module {path} cannot run with isolation: fresh_per_request: {source}")]
    Fresh { path: String, source: ResetError },
}

/// What one invocation produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `output_len` bytes were written to the output; `next` is the function id the guest
    /// chose (dynamic chains only).
    Done {
        output_len: usize,
        next: Option<u32>,
    },
    /// The request failed in this function; `message` is for the client.
    Failed { status: Status, message: String },
}

/// Where an invocation reads its input and writes its output. The worker implements it over an
/// arena slot (input and output share the slot: the input is fully consumed before any output
/// is written); tests implement it over vectors.
pub trait SlotIo {
    fn input_len(&self) -> usize;
    fn read_input(&self, dst: &mut [u8]);
    fn capacity(&self) -> usize;
    /// Writes the hop's output. `src.len() <= capacity()` is checked by the caller.
    fn write_output(&mut self, src: &[u8]);
    /// The slot as a file range the host may map into guest memory for an in-place call
    /// ([`crate::inplace`]); None (the default) when it cannot be mapped.
    fn mapping(&self) -> Option<SlotMapping> {
        None
    }
    /// Counts a call served in place: `input` bytes read and `output` bytes written where
    /// they are, without a copy.
    fn served_in_place(&mut self, _input: usize, _output: usize) {}
}

/// Where a slot's bytes are, for mapping them into a guest's memory.
#[derive(Debug, Clone, Copy)]
pub struct SlotMapping {
    /// The arena's payload memfd: open for at least as long as the `SlotIo` that returned it.
    pub fd: std::os::fd::RawFd,
    /// Page-aligned offset of the slot in it.
    pub offset: u64,
    /// The slot's capacity, whole pages.
    pub capacity: usize,
}

/// A request's input and output as plain buffers: [`SlotIo`] for running a host outside a
/// worker (the fork CLI, tests). `output` holds what the guest wrote.
pub struct BufferIo {
    pub input: Vec<u8>,
    pub output: Vec<u8>,
    pub capacity: usize,
}

impl BufferIo {
    /// `input` as the request, room for `capacity` bytes of output.
    pub fn new(capacity: usize, input: &[u8]) -> Self {
        BufferIo {
            input: input.to_vec(),
            output: Vec::new(),
            capacity,
        }
    }
}

impl SlotIo for BufferIo {
    fn input_len(&self) -> usize {
        self.input.len()
    }

    fn read_input(&self, dst: &mut [u8]) {
        dst.copy_from_slice(&self.input[..dst.len()]);
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn write_output(&mut self, src: &[u8]) {
        self.output = src.to_vec();
    }
}

/// Per-call state the `spindle.*` host functions see.
struct GuestCtx {
    memory: Option<Memory>,
    /// Raw pointer to the caller's `SlotIo`, valid only during `FunctionHost::invoke`.
    io: Option<NonNull<dyn SlotIo>>,
    output_len: usize,
    error: Option<String>,
    next: Option<u32>,
    /// Functions this chain may route to by name (dynamic chains); None for static chains.
    routes: Option<Arc<Vec<(String, u32)>>>,
    /// Which stdio fds the guest closed through WASI (a snapshot must carry it: the closed
    /// flags live in the host's `WasiCtx`, not in linear memory).
    stdio_closed: [bool; 3],
    /// The guest's `fd_close` import (wrapped to keep `stdio_closed`), if it has one; a
    /// child closes the same fds through it.
    fd_close: Option<Function>,
    /// Inside `spindle_handle_inplace`: `spindle.output` is refused (the output is already
    /// in place, in the mapped slot).
    inplace: bool,
}

// SAFETY: the `io` pointer is only set and dereferenced on the thread that runs the guest, for
// the duration of one `invoke` call; wasmer requires env data to be Send only because a store
// may move between threads between calls, and no pointer survives a call.
unsafe impl Send for GuestCtx {}

/// Caps every linear memory a module declares at the function's configured limit.
struct MemoryLimit {
    base: BaseTunables,
    max_pages: Pages,
}

impl MemoryLimit {
    fn adjust(&self, ty: &MemoryType) -> Result<MemoryType, MemoryError> {
        if ty.minimum > self.max_pages {
            return Err(MemoryError::Generic(format!(
                "module needs {} pages of memory at start, the limit is {} pages",
                ty.minimum.0, self.max_pages.0
            )));
        }
        let maximum = ty.maximum.map_or(self.max_pages, |m| m.min(self.max_pages));
        Ok(MemoryType {
            maximum: Some(maximum),
            ..*ty
        })
    }
}

impl Tunables for MemoryLimit {
    fn memory_style(&self, memory: &MemoryType) -> MemoryStyle {
        let adjusted = self.adjust(memory).unwrap_or(*memory);
        self.base.memory_style(&adjusted)
    }

    fn table_style(&self, table: &TableType) -> TableStyle {
        self.base.table_style(table)
    }

    fn create_host_memory(
        &self,
        ty: &MemoryType,
        style: &MemoryStyle,
    ) -> Result<VMMemory, MemoryError> {
        self.base.create_host_memory(&self.adjust(ty)?, style)
    }

    unsafe fn create_vm_memory(
        &self,
        ty: &MemoryType,
        style: &MemoryStyle,
        vm_definition_location: NonNull<VMMemoryDefinition>,
    ) -> Result<VMMemory, MemoryError> {
        let ty = self.adjust(ty)?;
        // SAFETY: forwarded unchanged from our caller, who upholds the trait's contract.
        unsafe {
            self.base
                .create_vm_memory(&ty, style, vm_definition_location)
        }
    }

    fn create_host_table(&self, ty: &TableType, style: &TableStyle) -> Result<VMTable, String> {
        self.base.create_host_table(ty, style)
    }

    unsafe fn create_vm_table(
        &self,
        ty: &TableType,
        style: &TableStyle,
        vm_definition_location: NonNull<VMTableDefinition>,
    ) -> Result<VMTable, String> {
        // SAFETY: forwarded unchanged from our caller, who upholds the trait's contract.
        unsafe { self.base.create_vm_table(ty, style, vm_definition_location) }
    }
}

/// Builds the engine for one function: cranelift, fuel metering when a budget is configured,
/// and the memory cap.
fn engine_for(spec: &FunctionSpec) -> Engine {
    let mut compiler = Cranelift::default();
    if let Some(fuel) = spec.fuel {
        use wasmer::sys::CompilerConfig;
        compiler.push_middleware(Arc::new(metering::Metering::new(fuel, |_: &Operator| 1)));
    }
    let mut engine: Engine = compiler.into();
    // Snapshot restore maps images over linear memory in place, which needs wasmer's static
    // memory style (never moved); BaseTunables gives it to every memory of at most 4 GiB,
    // and this cap keeps them there.
    engine.set_tunables(MemoryLimit {
        base: BaseTunables::new(),
        max_pages: Pages(max_pages(spec)),
    });
    engine
}

/// Largest linear memory the tunables of `spec`'s engine allow, in Wasm pages.
fn max_pages(spec: &FunctionSpec) -> u32 {
    (spec.memory_limit / WASM_PAGE_SIZE as u64).clamp(1, 65536) as u32
}

#[cfg(test)]
thread_local! {
    /// Cranelift compiles run on this thread: tests assert that forking does none.
    pub(crate) static COMPILES: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// A function's module compiled for its engine: what every instance of the function is built
/// from, cold or forked. Cloning shares the compiled code; nothing is compiled again.
#[derive(Clone)]
pub struct CompiledModule(Arc<Compiled>);

struct Compiled {
    engine: Engine,
    module: Module,
    sha256: [u8; 32],
    identity: String,
    max_pages: u32,
    metered: bool,
    /// Tables as instantiation leaves them (the same for every instance: code pointers come
    /// from the shared artifact), recorded by the first instantiation.
    pristine_tables: OnceLock<Vec<TableContents>>,
    /// An instruction of the module that changes instance state a reset in place cannot put
    /// back ([`fresh::instance_state_op`]): such an instance is rebuilt after every call.
    state_op: Option<&'static str>,
}

impl CompiledModule {
    /// The one place a module is compiled.
    pub(crate) fn compile(spec: &FunctionSpec, bytes: &[u8]) -> Result<Self, HostError> {
        use sha2::Digest;
        let engine = engine_for(spec);
        #[cfg(test)]
        COMPILES.with(|c| c.set(c.get() + 1));
        let module = Module::new(&engine, bytes).map_err(|e| HostError::Compile {
            path: spec.module.display().to_string(),
            message: e.to_string(),
        })?;
        let metered = spec.fuel.is_some();
        // A parse of the code, no compile: negligible beside Cranelift's.
        let state_op = fresh::instance_state_op(bytes);
        Ok(CompiledModule(Arc::new(Compiled {
            state_op,
            identity: snapshot::engine_identity(&engine, metered),
            sha256: sha2::Sha256::digest(bytes).into(),
            max_pages: max_pages(spec),
            metered,
            engine,
            module,
            pristine_tables: OnceLock::new(),
        })))
    }

    /// SHA-256 of the module's bytes.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.0.sha256
    }

    /// The engine/ABI string images of this module carry ([`snapshot::engine_identity`]).
    pub fn engine_identity(&self) -> &str {
        &self.0.identity
    }

    /// The compiled module (a cheap handle onto shared code).
    pub fn module(&self) -> &Module {
        &self.0.module
    }

    pub fn engine(&self) -> &Engine {
        &self.0.engine
    }

    /// True when both are the same compilation.
    pub fn same(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }

    /// Refuses a function spec whose engine would differ from the one this module was
    /// compiled for: the engine fixes metering and the memory cap.
    fn check_spec(&self, spec: &FunctionSpec) -> Result<(), SnapshotError> {
        if spec.mode != ModuleMode::Reactor {
            return Err(SnapshotError::CommandModule);
        }
        if spec.fuel.is_some() != self.0.metered {
            return Err(SnapshotError::Mismatch(format!(
                "function {} has metering {}, the compiled module {}",
                spec.name,
                if spec.fuel.is_some() { "on" } else { "off" },
                if self.0.metered { "on" } else { "off" },
            )));
        }
        if max_pages(spec) != self.0.max_pages {
            return Err(SnapshotError::Mismatch(format!(
                "function {} has a memory limit of {} pages, the compiled module's engine {}",
                spec.name,
                max_pages(spec),
                self.0.max_pages
            )));
        }
        Ok(())
    }
}

/// A reactor's live instance and the exports the host calls.
struct Reactor {
    store: Store,
    instance: Instance,
    alloc: TypedFunction<i32, i32>,
    handle: TypedFunction<(i32, i32), i32>,
    /// The optional `spindle_handle_inplace(ptr, len, cap) -> out_len` export.
    handle_inplace: Option<TypedFunction<(i32, i32, i32), i32>>,
    /// Whether linear memory has wasmer's static style (its base never moves): required
    /// for in-place calls.
    static_memory: bool,
    /// The window of guest memory slots are mapped over, once reserved.
    window: Option<inplace::Window>,
    guest: FunctionEnv<GuestCtx>,
    wasi: FunctionEnv<WasiCtx>,
    /// Where linear memory's contents came from.
    memory_from: MemorySource,
    /// `isolation: fresh_per_request`, once armed: the image it is reset to.
    pristine: Option<Pristine>,
    /// The guest ran since the instance was built or last reset.
    dirty: bool,
}

/// How a reactor's linear memory got its contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MemorySource {
    /// Instantiation (and `_initialize`).
    Cold,
    /// The host's `origin` image, mapped copy-on-write.
    Origin,
    /// An image mapped or filled by the caller (a remote one: userfaultfd).
    Other,
}

pub struct FunctionHost {
    name: String,
    module_path: String,
    fuel: Option<u64>,
    /// The guest's whole argv: the function's name, then its `args:`.
    argv: Vec<String>,
    env: Vec<(String, String)>,
    /// The directories of `files:`, opened: every instance's preopens.
    preopens: Preopens,
    routes: Option<Arc<Vec<(String, u32)>>>,
    compiled: CompiledModule,
    mode: ModuleMode,
    reactor: Option<Reactor>,
    /// The image this host was forked from: a trapped reactor is rebuilt from it (as the
    /// image was, not cold), so every instance of a forked child starts where the parent was.
    /// With `isolation: fresh_per_request` it is also what every request starts from (an
    /// exec'd host captures its own when it arms).
    origin: Option<Snapshot>,
    isolation: Isolation,
    /// Resets done since the caller last took them ([`FunctionHost::take_resets`]).
    resets: Vec<ResetReport>,
    /// Where the slots served in place live between calls ([`crate::inplace`]).
    homes: inplace::Homes,
}

impl FunctionHost {
    /// Compiles the function's module and, for reactors, instantiates it and runs `_initialize`.
    /// Outside this crate instances come from [`crate::instance::InstanceBuilder`].
    /// `routes` lists the functions a dynamic chain may name with `spindle.next`.
    /// The preopened directories are opened from the paths `spec` names.
    #[cfg(test)]
    pub(crate) fn new(
        spec: &FunctionSpec,
        routes: Option<Vec<(String, u32)>>,
    ) -> Result<Self, HostError> {
        let bytes = std::fs::read(&spec.module).map_err(|source| HostError::Read {
            path: spec.module.display().to_string(),
            source,
        })?;
        Self::from_bytes(spec, &bytes, routes, Preopens::open(&spec.files)?)
    }

    /// Like [`FunctionHost::new`], with the module's bytes already read (the worker gets them
    /// from the gateway, so every instance runs the bytes the gateway started with).
    pub(crate) fn from_bytes(
        spec: &FunctionSpec,
        bytes: &[u8],
        routes: Option<Vec<(String, u32)>>,
        preopens: Preopens,
    ) -> Result<Self, HostError> {
        let compiled = CompiledModule::compile(spec, bytes)?;
        Self::from_compiled(spec, &compiled, routes, preopens)
    }

    /// Like [`FunctionHost::from_bytes`] with the module compiled already (shared, not
    /// compiled again).
    pub(crate) fn from_compiled(
        spec: &FunctionSpec,
        compiled: &CompiledModule,
        routes: Option<Vec<(String, u32)>>,
        preopens: Preopens,
    ) -> Result<Self, HostError> {
        let mut host = Self::unstarted(spec, routes, compiled.clone(), preopens)?;
        host.check_abi(spec)?;
        match host.mode {
            ModuleMode::Reactor => host.reactor = Some(host.instantiate_reactor()?),
            // Every request instantiates anew; one instantiation now says at start whether
            // that can work at all (no guest code runs but a `start` function).
            ModuleMode::Command => host.try_instantiate_command()?,
        }
        Ok(host)
    }

    fn unstarted(
        spec: &FunctionSpec,
        routes: Option<Vec<(String, u32)>>,
        compiled: CompiledModule,
        preopens: Preopens,
    ) -> Result<Self, HostError> {
        let paths: Vec<&str> = spec.files.iter().map(|f| f.guest.as_str()).collect();
        if preopens.guest_paths() != paths {
            return Err(HostError::Preopen(wasi::PreopenError::Count {
                expected: spec.files.len(),
                got: preopens.len(),
            }));
        }
        Ok(FunctionHost {
            name: spec.name.clone(),
            module_path: spec.module.display().to_string(),
            fuel: spec.fuel,
            argv: spec.argv(),
            env: spec.env.clone(),
            preopens,
            routes: routes.map(Arc::new),
            compiled,
            mode: spec.mode,
            reactor: None,
            origin: None,
            isolation: if spec.mode == ModuleMode::Reactor {
                spec.isolation
            } else {
                // A command gets a fresh instance per request anyway (and the config
                // refuses the combination).
                Isolation::Reuse
            },
            resets: Vec::new(),
            homes: inplace::Homes::default(),
        })
    }

    /// Builds a reactor for `spec` from an image of another instance of the same compiled
    /// module, without compiling: instantiate, then [`snapshot::restore`] (memory filled as
    /// `fill` says, globals written back), close the stdio fds the parent had closed, skip
    /// `_initialize`, and call `spindle_on_fork` if exported. `origin` (the snapshot `meta`
    /// comes from, when the caller has it) is what a trapped instance is rebuilt from.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fork(
        spec: &FunctionSpec,
        routes: Option<Vec<(String, u32)>>,
        preopens: Preopens,
        compiled: &CompiledModule,
        meta: &SnapshotMeta,
        fill: MemoryFill<'_>,
        origin: Option<Snapshot>,
    ) -> Result<Self, HostError> {
        let mut host = Self::unstarted(spec, routes, compiled.clone(), preopens)?;
        let refuse = |source| HostError::Fork {
            path: host_path(spec),
            source,
        };
        compiled.check_spec(spec).map_err(refuse)?;
        if meta.module_sha256 != *compiled.sha256() {
            return Err(refuse(SnapshotError::Mismatch(
                "image is of another module (SHA-256 differs)".into(),
            )));
        }
        if meta.engine != compiled.engine_identity() {
            return Err(refuse(SnapshotError::Mismatch(format!(
                "image is for engine `{}`, this one is `{}`",
                meta.engine,
                compiled.engine_identity()
            ))));
        }
        let layout = host.layout([false; 3]);
        if (&meta.wasi.args, &meta.wasi.env) != (&layout.args, &layout.env) {
            return Err(refuse(SnapshotError::Mismatch(format!(
                "image has WASI args {:?} and env {:?}, this function {:?} and {:?}",
                meta.wasi.args, meta.wasi.env, layout.args, layout.env
            ))));
        }
        if meta.wasi.preopens != layout.preopens {
            return Err(refuse(SnapshotError::Mismatch(format!(
                "image has the preopened directories {:?}, this function {:?}",
                meta.wasi.preopens, layout.preopens
            ))));
        }
        host.check_abi(spec)?;
        // Only the origin's own memfd makes the memory the origin's image.
        let from_origin = match (&fill, &origin) {
            (MemoryFill::Map(fd), Some(o)) => fd.as_raw_fd() == o.image().as_raw_fd(),
            _ => false,
        };
        let mut reactor = host.fork_reactor(meta, fill)?;
        if from_origin {
            reactor.memory_from = MemorySource::Origin;
        }
        host.reactor = Some(reactor);
        host.origin = origin;
        Ok(host)
    }

    /// The compiled module, to build more instances of this function from (cheap clone).
    pub fn compiled_module(&self) -> CompiledModule {
        self.compiled.clone()
    }

    /// Captures this warm reactor: memory, globals, table sizes and WASI layout, checked to
    /// be everything the instance holds (see [`crate::snapshot`]). Call it between
    /// invocations (`&mut self` already rules out a call in progress on this host). The
    /// instance keeps serving unchanged; the image is a sealed copy.
    pub fn snapshot(&mut self) -> Result<Snapshot, SnapshotError> {
        self.capture(self.compiled.0.max_pages)
    }

    /// [`FunctionHost::snapshot`] against another memory cap: tests reach the over-limit
    /// refusal with it (the engine's tunables keep a real instance under its own cap).
    #[cfg(test)]
    pub(crate) fn snapshot_with_limit(
        &mut self,
        max_pages: u32,
    ) -> Result<Snapshot, SnapshotError> {
        self.capture(max_pages)
    }

    /// Pages of the reactor's linear memory (its current size, not the reservation) that are
    /// in place now: what an instance's memory costs, comparable between a cold instance and
    /// a forked one. None without a reactor or an exported memory.
    pub fn memory_resident_pages(&mut self) -> Option<std::io::Result<usize>> {
        let reactor = self.reactor.as_mut()?;
        let memory = reactor.guest.as_ref(&reactor.store).memory.clone()?;
        let view = memory.view(&reactor.store);
        Some(rdma_fork::resident_pages(
            view.data_ptr() as *const u8,
            view.data_size() as usize,
        ))
    }

    /// A copy of the reactor's linear memory, for tests to compare images with.
    #[cfg(test)]
    pub(crate) fn memory_copy(&mut self) -> Option<Vec<u8>> {
        let reactor = self.reactor.as_mut()?;
        let memory = reactor.guest.as_ref(&reactor.store).memory.clone()?;
        let view = memory.view(&reactor.store);
        let mut buf = vec![0; view.data_size() as usize];
        view.read(0, &mut buf).ok()?;
        Some(buf)
    }

    fn capture(&mut self, max_pages: u32) -> Result<Snapshot, SnapshotError> {
        if self.mode != ModuleMode::Reactor {
            return Err(SnapshotError::CommandModule);
        }
        let Some(reactor) = self.reactor.as_mut() else {
            return Err(SnapshotError::NoInstance);
        };
        if let Some(pristine) = &reactor.pristine {
            // Requests leave nothing in a fresh_per_request instance: its image is the one it
            // is reset to (and no request's data can reach a child through it).
            let pages = pristine.image().meta().memory.bytes / WASM_PAGE_SIZE as u64;
            if pages > u64::from(max_pages) {
                return Err(SnapshotError::MemoryOverLimit {
                    pages,
                    limit: max_pages,
                });
            }
            return Ok(pristine.image().clone());
        }
        let ctx = reactor.guest.as_ref(&reactor.store);
        if ctx.io.is_some() {
            return Err(SnapshotError::CallInProgress);
        }
        let stdio_closed = ctx.stdio_closed;
        let memory = ctx.memory.clone().ok_or(SnapshotError::NoInstance)?;
        // A child gets the preopens and nothing else: a file open here would be gone there.
        reactor
            .wasi
            .as_ref(&reactor.store)
            .files_as_started()
            .map_err(SnapshotError::OpenFiles)?;
        let pristine = self
            .compiled
            .0
            .pristine_tables
            .get()
            .ok_or(SnapshotError::NoInstance)?;
        let wasi = wasi_layout(
            &self.argv,
            &self.env,
            self.preopens.guest_paths(),
            stdio_closed,
        );
        snapshot::capture(
            &mut reactor.store,
            &memory,
            CaptureContext {
                module_sha256: self.compiled.0.sha256,
                engine: self.compiled.0.identity.clone(),
                max_pages,
                pristine_tables: pristine,
                wasi,
            },
        )
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn abi_error(&self, message: impl Into<String>) -> HostError {
        HostError::Abi {
            path: self.module_path.clone(),
            message: message.into(),
        }
    }

    /// Checks the module's imports, memory and exports against what Spindle and this function
    /// give it and call ([`abi::check`]) before any instance exists, so a wrong module fails
    /// at start with every problem it has.
    fn check_abi(&self, spec: &FunctionSpec) -> Result<(), HostError> {
        let problems = abi::check(&self.compiled, spec);
        if problems.is_empty() {
            return Ok(());
        }
        Err(HostError::Link {
            path: self.module_path.clone(),
            function: self.name.clone(),
            problems: LinkProblems(problems),
        })
    }

    /// This host's WASI layout with `stdio_closed`: what its instances see, and what an
    /// image of one records.
    fn layout(&self, stdio_closed: [bool; 3]) -> WasiLayout {
        wasi_layout(
            &self.argv,
            &self.env,
            self.preopens.guest_paths(),
            stdio_closed,
        )
    }

    /// A command's instantiation, once, at start: an instantiation that fails would fail every
    /// request, so it fails the start instead.
    fn try_instantiate_command(&self) -> Result<(), HostError> {
        let mut store = Store::new(self.compiled.engine().clone());
        let (imports, ..) = self.link(&mut store, self.wasi_ctx())?;
        Instance::new(&mut store, self.compiled.module(), &imports)
            .map(drop)
            .map_err(|e| self.inst_err(instantiate_message(e)))
    }

    /// Builds the import object: Spindle's host functions and WASI.
    fn link(
        &self,
        store: &mut Store,
        wasi_ctx: WasiCtx,
    ) -> Result<(Imports, FunctionEnv<GuestCtx>, FunctionEnv<WasiCtx>), HostError> {
        let guest = FunctionEnv::new(
            store,
            GuestCtx {
                memory: None,
                io: None,
                output_len: 0,
                error: None,
                next: None,
                routes: self.routes.clone(),
                stdio_closed: [false; 3],
                fd_close: None,
                inplace: false,
            },
        );
        let wasi_env = FunctionEnv::new(store, wasi_ctx);
        let mut imports = Imports::new();
        let mut ns = Exports::new();
        ns.insert(
            "output",
            Function::new_typed_with_env(store, &guest, host_output),
        );
        ns.insert(
            "error",
            Function::new_typed_with_env(store, &guest, host_error),
        );
        ns.insert(
            "next",
            Function::new_typed_with_env(store, &guest, host_next),
        );
        imports.register_namespace(SPINDLE_IMPORTS, ns);
        wasi::add_imports(store, &wasi_env, self.compiled.module(), &mut imports)
            .map_err(|e| self.abi_error(e.to_string()))?;
        track_stdio_close(store, &guest, &mut imports);
        Ok((imports, guest, wasi_env))
    }

    fn wasi_ctx(&self) -> WasiCtx {
        let WasiLayout { args, env, .. } = self.layout([false; 3]);
        WasiCtx::new(&self.name, args, env).with_preopens(self.preopens.clone())
    }

    fn inst_err(&self, message: String) -> HostError {
        HostError::Instantiate {
            path: self.module_path.clone(),
            message,
        }
    }

    /// A warm reactor built cold: instantiate and run `_initialize`, or, for a host forked
    /// from an image, rebuilt from that image.
    fn instantiate_reactor(&self) -> Result<Reactor, HostError> {
        if let Some(origin) = &self.origin {
            let mut reactor = self.fork_reactor(origin.meta(), MemoryFill::Map(origin.image()))?;
            reactor.memory_from = MemorySource::Origin;
            return Ok(reactor);
        }
        let mut reactor = self.instantiate()?;
        if let Ok(init) = reactor
            .instance
            .exports
            .get_typed_function::<(), ()>(&reactor.store, "_initialize")
        {
            self.refuel(&mut reactor.store, &reactor.instance);
            if let Err(e) = init.call(&mut reactor.store) {
                // Metering stops a guest with a plain `unreachable` trap: say what it was.
                let why = match self.fuel {
                    Some(budget)
                        if metering::get_remaining_points(
                            &mut reactor.store,
                            &reactor.instance,
                        ) == MeteringPoints::Exhausted =>
                    {
                        format!("ran out of fuel (budget {budget} instructions)")
                    }
                    _ => trap_text(&e),
                };
                return Err(self.inst_err(format!("`_initialize` trapped: {why}")));
            }
        }
        Ok(reactor)
    }

    /// A reactor from an image: see [`FunctionHost::fork`].
    fn fork_reactor(
        &self,
        meta: &SnapshotMeta,
        fill: MemoryFill<'_>,
    ) -> Result<Reactor, HostError> {
        let mut reactor = self.instantiate()?;
        let memory = reactor
            .guest
            .as_ref(&reactor.store)
            .memory
            .clone()
            .ok_or_else(|| self.inst_err("no memory attached".into()))?;
        snapshot::restore(&mut reactor.store, &memory, meta, fill).map_err(|source| {
            HostError::Fork {
                path: self.module_path.clone(),
                source,
            }
        })?;
        if meta.wasi.stdio_closed.contains(&true) {
            let Some(fd_close) = reactor.guest.as_ref(&reactor.store).fd_close.clone() else {
                return Err(HostError::Fork {
                    path: self.module_path.clone(),
                    source: SnapshotError::Mismatch(
                        "image closed stdio, but the module imports no fd_close".into(),
                    ),
                });
            };
            for fd in (0..3).filter(|&fd| meta.wasi.stdio_closed[fd as usize]) {
                fd_close
                    .call(&mut reactor.store, &[Value::I32(fd)])
                    .map_err(|e| self.inst_err(format!("closing stdio fd {fd}: {e}")))?;
            }
        }
        call_on_fork(&mut reactor, self.fuel).map_err(|e| match e {
            OnForkError::Signature(m) => self.abi_error(m),
            OnForkError::Failed(m) => self.inst_err(m),
        })?;
        reactor.memory_from = MemorySource::Other;
        Ok(reactor)
    }

    /// Instantiates the module and binds the reactor exports; runs no guest code but a
    /// `start` function.
    fn instantiate(&self) -> Result<Reactor, HostError> {
        let mut store = Store::new(self.compiled.engine().clone());
        let (imports, guest, wasi_env) = self.link(&mut store, self.wasi_ctx())?;
        let instance = Instance::new(&mut store, self.compiled.module(), &imports)
            .map_err(|e| self.inst_err(instantiate_message(e)))?;
        // Recorded before any export runs, so it is what every instantiation produces.
        self.compiled
            .0
            .pristine_tables
            .get_or_init(|| snapshot::table_contents(&mut store));
        let memory = instance
            .exports
            .get_memory("memory")
            .map_err(|e| self.inst_err(e.to_string()))?;
        guest.as_mut(&mut store).memory = Some(memory.clone());
        wasi_env.as_mut(&mut store).set_memory(memory.clone());
        let alloc = instance
            .exports
            .get_typed_function::<i32, i32>(&store, "spindle_alloc")
            .map_err(|e| self.abi_error(format!("spindle_alloc must be (i32) -> i32: {e}")))?;
        let handle = instance
            .exports
            .get_typed_function::<(i32, i32), i32>(&store, "spindle_handle")
            .map_err(|e| {
                self.abi_error(format!("spindle_handle must be (i32, i32) -> i32: {e}"))
            })?;
        let handle_inplace = match instance.exports.get_function(INPLACE_EXPORT) {
            Err(_) => None,
            Ok(f) => Some(f.typed::<(i32, i32, i32), i32>(&store).map_err(|e| {
                self.abi_error(format!(
                    "{INPLACE_EXPORT} must be (i32, i32, i32) -> i32: {e}"
                ))
            })?),
        };
        let static_memory = matches!(
            BaseTunables::new().memory_style(&memory.ty(&store)),
            MemoryStyle::Static
        );
        Ok(Reactor {
            store,
            instance,
            alloc,
            handle,
            handle_inplace,
            static_memory,
            window: None,
            guest,
            wasi: wasi_env,
            memory_from: MemorySource::Cold,
            pristine: None,
            dirty: false,
        })
    }

    fn refuel(&self, store: &mut Store, instance: &Instance) {
        if let Some(fuel) = self.fuel {
            metering::set_remaining_points(store, instance, fuel);
        }
    }

    /// Runs the function on one request. Never panics on guest misbehaviour: every failure
    /// becomes `Outcome::Failed`, and a trapped reactor is rebuilt before returning.
    pub fn invoke(&mut self, io: &mut dyn SlotIo) -> Outcome {
        match self.mode {
            ModuleMode::Reactor => self.invoke_reactor(io),
            ModuleMode::Command => self.invoke_command(io),
        }
    }

    /// Makes the instance ready for the next request: rebuilds a reactor discarded after a
    /// trap; with `isolation: fresh_per_request`, resets it to its image after a call (or
    /// rebuilds it from the image), and the first time arms it (see [`crate::fresh`]). The
    /// worker calls this before it reports ready and after answering, so none of it is
    /// charged to a request unless requests queue up; `invoke` does it too if it was not
    /// done.
    pub fn prepare(&mut self) -> Result<(), HostError> {
        if self.mode != ModuleMode::Reactor {
            return Ok(());
        }
        if self.reactor.as_ref().is_some_and(|r| r.dirty) {
            self.reset_fresh()?;
        }
        if self.reactor.is_none() {
            self.reactor = Some(self.instantiate_reactor()?);
        }
        if self.isolation == Isolation::FreshPerRequest {
            self.arm()?;
        }
        Ok(())
    }

    /// The resets done since the last call (the worker adds them to its statistics page).
    pub fn take_resets(&mut self) -> std::vec::Drain<'_, ResetReport> {
        self.resets.drain(..)
    }

    fn fresh_err(&self, source: impl Into<ResetError>) -> HostError {
        HostError::Fresh {
            path: self.module_path.clone(),
            source: source.into(),
        }
    }

    /// Gives the live reactor the image it will be reset to, once: the origin's when its
    /// memory is the origin's mapping (a forked child: the zygote's image), else (cold) a
    /// capture of it now, mapped over its memory in place, after which `spindle_on_fork` runs
    /// as in any fresh copy of an image.
    fn arm(&mut self) -> Result<(), HostError> {
        let Some(reactor) = self.reactor.as_mut() else {
            return Ok(());
        };
        if reactor.pristine.is_some() {
            return Ok(());
        }
        let source = reactor.memory_from;
        let image = match (source, &self.origin) {
            (MemorySource::Origin, Some(origin)) => origin.clone(),
            (MemorySource::Cold, _) => {
                let image = self
                    .capture(self.compiled.0.max_pages)
                    .map_err(|e| self.fresh_err(e))?;
                let fuel = self.fuel;
                let reactor = self.reactor.as_mut().expect("checked above");
                let memory = reactor.guest.as_ref(&reactor.store).memory.clone();
                let mapped = memory.ok_or(SnapshotError::NoInstance).and_then(|memory| {
                    snapshot::restore(
                        &mut reactor.store,
                        &memory,
                        image.meta(),
                        MemoryFill::Map(image.image()),
                    )
                });
                if let Err(e) = mapped {
                    // The memory may be half replaced: this instance must not serve.
                    self.reactor = None;
                    return Err(self.fresh_err(e));
                }
                reactor.memory_from = MemorySource::Origin;
                self.origin = Some(image.clone());
                if let Err(e) = call_on_fork(reactor, fuel) {
                    self.reactor = None;
                    return Err(self.fresh_err(ResetError::OnFork(e.to_string())));
                }
                image
            }
            _ => return Err(self.fresh_err(ResetError::NoLocalImage)),
        };
        let reactor = self.reactor.as_mut().expect("checked above");
        let armed = reactor
            .guest
            .as_ref(&reactor.store)
            .memory
            .clone()
            .ok_or(ResetError::Capture(SnapshotError::NoInstance))
            .and_then(|memory| Pristine::new(&mut reactor.store, &memory, image));
        match armed {
            Ok(pristine) => {
                tracing::debug!(function = %self.name,
                    image_kib = pristine.image().meta().memory.bytes / 1024,
                    from = if source == MemorySource::Cold { "own capture" } else { "origin" },
                    written_pages_found = if pristine.scans() { "PAGEMAP_SCAN" } else { "no: whole range" },
                    "fresh_per_request: resets armed");
                reactor.pristine = Some(pristine);
                Ok(())
            }
            Err(e) => Err(self.fresh_err(e)),
        }
    }

    /// Resets a reactor the guest ran in to its image in place, or, when that cannot be done
    /// (a module that changes tables or segments; a reset that failed), rebuilds it from the
    /// image. Records what it did.
    fn reset_fresh(&mut self) -> Result<(), HostError> {
        let started = Instant::now();
        let state_op = self.compiled.0.state_op;
        let fuel = self.fuel;
        let Some(reactor) = self.reactor.as_mut() else {
            return Ok(());
        };
        let in_place = match state_op {
            Some(_) => None,
            None => match reset_in_place(reactor, fuel) {
                Ok(reset) => Some(reset),
                Err(e) => {
                    tracing::warn!(function = %self.name,
                        "reset in place failed, rebuilding from the image: {e}");
                    None
                }
            },
        };
        let report = match in_place {
            Some(reset) => {
                reactor.dirty = false;
                ResetReport {
                    elapsed: started.elapsed(),
                    rebuilt: false,
                    pages: reset.pages,
                    copied: reset.copied,
                    shrank: reset.grown > 0,
                }
            }
            None => {
                self.reactor = None;
                self.reactor = Some(self.instantiate_reactor()?);
                self.arm()?;
                ResetReport {
                    elapsed: started.elapsed(),
                    rebuilt: true,
                    ..ResetReport::default()
                }
            }
        };
        self.resets.push(report);
        Ok(())
    }

    fn invoke_reactor(&mut self, io: &mut dyn SlotIo) -> Outcome {
        if let Err(e) = self.prepare() {
            return failed(Status::Trap, e.to_string());
        }
        let outcome = {
            let reactor = self.reactor.as_mut().expect("reactor instantiated above");
            let fuel = self.fuel;
            if let Some(fuel) = fuel {
                metering::set_remaining_points(&mut reactor.store, &reactor.instance, fuel);
            }
            // In place only where nothing resets memory under the window (see inplace.rs),
            // and only when mapping beats copying; otherwise (or when the window cannot be
            // set up) the copy path.
            let fresh = self.isolation == Isolation::FreshPerRequest;
            let in_place = (!fresh && io.input_len() >= inplace::MIN_INPLACE_BYTES)
                .then(|| run_inplace(reactor, &mut self.homes, io, fuel, &self.name))
                .flatten();
            match in_place {
                Some(done) => done,
                None => run_reactor(reactor, io, fuel),
            }
        };
        let (outcome, trapped) = outcome;
        if self.isolation == Isolation::FreshPerRequest {
            // Trapped or not, the next `prepare` puts everything back to the image.
            if let Some(reactor) = self.reactor.as_mut() {
                reactor.dirty = true;
            }
        } else if trapped {
            // The guest stopped mid-way: its heap and globals may be inconsistent.
            self.reactor = None;
        }
        outcome
    }

    fn invoke_command(&mut self, io: &mut dyn SlotIo) -> Outcome {
        let mut input = vec![0u8; io.input_len()];
        io.read_input(&mut input);
        let mut wasi_ctx = self.wasi_ctx();
        wasi_ctx.set_stdin(input);
        wasi_ctx.capture_stdout(io.capacity());
        wasi_ctx.capture_stderr(MAX_ERROR_LEN);
        // A fresh store per request: stores keep every instance alive until dropped.
        let mut store = Store::new(self.compiled.engine().clone());
        let (imports, guest, wasi_env) = match self.link(&mut store, wasi_ctx) {
            Ok(linked) => linked,
            Err(e) => return failed(Status::Trap, e.to_string()),
        };
        let instance = match Instance::new(&mut store, self.compiled.module(), &imports) {
            Ok(i) => i,
            Err(e) => return failed(Status::Trap, format!("cannot instantiate: {e}")),
        };
        match instance.exports.get_memory("memory") {
            Ok(memory) => {
                guest.as_mut(&mut store).memory = Some(memory.clone());
                wasi_env.as_mut(&mut store).set_memory(memory.clone());
            }
            Err(e) => return failed(Status::Trap, format!("command exports no memory: {e}")),
        }
        let start = match instance
            .exports
            .get_typed_function::<(), ()>(&store, "_start")
        {
            Ok(f) => f,
            Err(e) => return failed(Status::Trap, format!("_start must be () -> (): {e}")),
        };
        self.refuel(&mut store, &instance);
        let exit_code = match start.call(&mut store) {
            Ok(()) => 0,
            Err(trap) => match trap.downcast::<ProcExit>() {
                Ok(ProcExit(code)) => code,
                Err(trap) => return classify_trap(&mut store, &instance, self.fuel, trap),
            },
        };
        let ctx = wasi_env.as_mut(&mut store);
        ctx.flush_logs();
        if exit_code != 0 {
            let stderr = String::from_utf8_lossy(&ctx.take_stderr())
                .trim_end()
                .to_string();
            return failed(
                Status::GuestError,
                format!("exited with status {exit_code}: {stderr}"),
            );
        }
        if ctx.stdout_truncated() {
            return failed(
                Status::GuestError,
                format!(
                    "wrote more than the chain's slot size ({} bytes) to stdout",
                    io.capacity()
                ),
            );
        }
        let stdout = ctx.take_stdout();
        io.write_output(&stdout);
        Outcome::Done {
            output_len: stdout.len(),
            next: None,
        }
    }
}

fn host_path(spec: &FunctionSpec) -> String {
    spec.module.display().to_string()
}

/// Why `spindle_on_fork` did not run through.
#[derive(Debug)]
enum OnForkError {
    /// Exported with another type than `() -> ()`.
    Signature(String),
    /// It trapped or ran out of fuel.
    Failed(String),
}

impl std::fmt::Display for OnForkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OnForkError::Signature(m) | OnForkError::Failed(m) => f.write_str(m),
        }
    }
}

/// Calls the guest's `spindle_on_fork` (with a full fuel budget) if it exports one: in every
/// fresh copy of an image, before its first request.
fn call_on_fork(reactor: &mut Reactor, fuel: Option<u64>) -> Result<(), OnForkError> {
    if reactor
        .instance
        .exports
        .get_function(ON_FORK_EXPORT)
        .is_err()
    {
        return Ok(());
    }
    let on_fork = reactor
        .instance
        .exports
        .get_typed_function::<(), ()>(&reactor.store, ON_FORK_EXPORT)
        .map_err(|e| OnForkError::Signature(format!("{ON_FORK_EXPORT} must be () -> (): {e}")))?;
    if let Some(fuel) = fuel {
        metering::set_remaining_points(&mut reactor.store, &reactor.instance, fuel);
    }
    on_fork
        .call(&mut reactor.store)
        .map_err(|e| OnForkError::Failed(format!("{ON_FORK_EXPORT} failed: {e}")))
}

/// The reset of an armed reactor: memory and globals ([`Pristine::reset`]), then the host's
/// per-request state (WASI's and Spindle's), then `spindle_on_fork`.
fn reset_in_place(
    reactor: &mut Reactor,
    fuel: Option<u64>,
) -> Result<fresh::MemoryReset, ResetError> {
    let pristine = reactor
        .pristine
        .as_mut()
        .ok_or(ResetError::Capture(SnapshotError::NoInstance))?;
    let memory = reactor
        .guest
        .as_ref(&reactor.store)
        .memory
        .clone()
        .ok_or(ResetError::Capture(SnapshotError::NoInstance))?;
    let reset = pristine.reset(&mut reactor.store, &memory)?;
    let closed = pristine.image().meta().wasi.stdio_closed;
    reactor
        .wasi
        .as_mut(&mut reactor.store)
        .reset_for_request(closed);
    let ctx = reactor.guest.as_mut(&mut reactor.store);
    ctx.stdio_closed = closed;
    ctx.output_len = 0;
    ctx.error = None;
    ctx.next = None;
    call_on_fork(reactor, fuel).map_err(|e| ResetError::OnFork(e.to_string()))?;
    Ok(reset)
}

/// The guest's args, environment and preopens: one definition for the `WasiCtx` an instance
/// gets and the layout a snapshot records, so a child is checked against what it will really
/// see.
pub(crate) fn wasi_layout(
    argv: &[String],
    env: &[(String, String)],
    preopens: Vec<String>,
    stdio_closed: [bool; 3],
) -> WasiLayout {
    WasiLayout {
        args: argv.to_vec(),
        env: env.to_vec(),
        preopens,
        stdio_closed,
    }
}

/// A trap's message and where it happened, without wasmer's `RuntimeError: ` prefix.
fn trap_text(e: &RuntimeError) -> String {
    let text = e.to_string();
    text.strip_prefix("RuntimeError: ")
        .map_or(text.clone(), str::to_owned)
}

/// Why an instantiation failed: a trap (in a `start` function or a segment out of bounds)
/// says so; a link or resource error is wasmer's text.
fn instantiate_message(e: wasmer::InstantiationError) -> String {
    match e {
        wasmer::InstantiationError::Start(trap) => {
            format!("it trapped while instantiating: {}", trap_text(&trap))
        }
        other => other.to_string(),
    }
}

/// Wraps the guest's WASI `fd_close` import (either namespace) so the host learns which
/// stdio fds the guest closed: that state lives in `WasiCtx`, and a snapshot must carry it.
fn track_stdio_close(store: &mut Store, guest: &FunctionEnv<GuestCtx>, imports: &mut Imports) {
    for ns in [wasi::PREVIEW1, wasi::UNSTABLE] {
        let Some(Extern::Function(inner)) = imports.get_export(ns, "fd_close") else {
            continue;
        };
        let wrapper = Function::new_typed_with_env(
            store,
            guest,
            move |mut env: FunctionEnvMut<GuestCtx>, fd: i32| -> Result<i32, RuntimeError> {
                let result = inner.call(&mut env, &[Value::I32(fd)])?;
                let errno = match *result {
                    [Value::I32(errno)] => errno,
                    _ => return Err(RuntimeError::new("wasi fd_close returned no errno")),
                };
                if errno == 0
                    && let Ok(fd @ 0..=2) = usize::try_from(fd)
                {
                    env.data_mut().stdio_closed[fd] = true;
                }
                Ok(errno)
            },
        );
        guest.as_mut(store).fd_close = Some(wrapper.clone());
        imports.define(ns, "fd_close", wrapper);
    }
}

fn failed(status: Status, message: impl Into<String>) -> Outcome {
    Outcome::Failed {
        status,
        message: message.into(),
    }
}

/// Turns a trap into an outcome: out of fuel is a timeout, anything else a trap.
fn classify_trap(
    store: &mut Store,
    instance: &Instance,
    fuel: Option<u64>,
    trap: RuntimeError,
) -> Outcome {
    if let Some(budget) = fuel
        && metering::get_remaining_points(store, instance) == MeteringPoints::Exhausted
    {
        return failed(
            Status::Timeout,
            format!("ran out of fuel (budget {budget} instructions per call)"),
        );
    }
    failed(Status::Trap, format!("trapped: {}", trap.message()))
}

/// Returns the outcome and whether the guest trapped (and so must be rebuilt).
fn run_reactor(reactor: &mut Reactor, io: &mut dyn SlotIo, fuel: Option<u64>) -> (Outcome, bool) {
    let Reactor {
        store,
        instance,
        alloc,
        handle,
        guest,
        ..
    } = reactor;
    let input_len = io.input_len();
    let Ok(len_i32) = i32::try_from(input_len) else {
        return (failed(Status::GuestError, "input larger than 2 GiB"), false);
    };
    let ptr = match alloc.call(store, len_i32) {
        Ok(p) => p,
        Err(trap) => return (classify_trap(store, instance, fuel, trap), true),
    };
    if ptr == 0 && input_len > 0 {
        let message = format!(
            "spindle_alloc could not allocate {input_len} bytes for the input (memory limit reached?)"
        );
        // Out of memory: rebuild, so the next request starts from a fresh heap.
        return (failed(Status::Trap, message), true);
    }
    {
        let Some(memory) = guest.as_mut(store).memory.clone() else {
            return (
                failed(Status::Trap, "instance has no memory attached"),
                true,
            );
        };
        let view = memory.view(&*store);
        let start = ptr as u32 as u64;
        if start + input_len as u64 > view.data_size() {
            let message = "spindle_alloc returned a buffer outside linear memory";
            return (failed(Status::Trap, message), true);
        }
        // SAFETY: the guest is not running (we are between calls on this thread), so nothing
        // else references linear memory; the range was checked against the memory size above,
        // and the slice is dropped before the next guest call can grow (move) the memory.
        let dst = unsafe { &mut view.data_unchecked_mut()[start as usize..][..input_len] };
        io.read_input(dst);
    }
    {
        let ctx = guest.as_mut(store);
        ctx.output_len = 0;
        ctx.error = None;
        ctx.next = None;
        let io_ptr: NonNull<dyn SlotIo + '_> = NonNull::from(&mut *io);
        // SAFETY: only the lifetime is erased; `ctx.io` is reset to None right after the
        // guest call below, before `io`'s borrow ends, so the pointer never outlives it.
        ctx.io = Some(unsafe {
            std::mem::transmute::<NonNull<dyn SlotIo + '_>, NonNull<dyn SlotIo + 'static>>(io_ptr)
        });
    }
    let result = handle.call(store, ptr, len_i32);
    let ctx = guest.as_mut(store);
    ctx.io = None;
    let (output_len, error, next) = (ctx.output_len, ctx.error.take(), ctx.next.take());
    let outcome = match &result {
        Err(_) if error.is_some() => {
            // A host function stopped the guest (e.g. output too large): report that, not the
            // trap it used to stop it.
            failed(Status::GuestError, error.unwrap_or_default())
        }
        Err(trap) => classify_trap(store, instance, fuel, trap.clone()),
        Ok(_) if error.is_some() => failed(Status::GuestError, error.unwrap_or_default()),
        Ok(0) => Outcome::Done { output_len, next },
        Ok(code) => failed(
            Status::GuestError,
            format!("spindle_handle returned {code} without an error message"),
        ),
    };
    (outcome, result.is_err())
}

/// Runs one call in place (see [`crate::inplace`]): the request's slot moved into the
/// guest's window, `spindle_handle_inplace(window, len, capacity)`, the slot moved back out
/// and zero pages over the window. None when this call cannot be served in place (no such
/// export, a dynamic memory, a slot that cannot be mapped, no room for the window, a failed
/// mapping): the caller copies instead, and nothing of the guest ran.
fn run_inplace(
    reactor: &mut Reactor,
    homes: &mut inplace::Homes,
    io: &mut dyn SlotIo,
    fuel: Option<u64>,
    function: &str,
) -> Option<(Outcome, bool)> {
    let handle = reactor.handle_inplace.clone()?;
    if !reactor.static_memory {
        return None;
    }
    let slot = io.mapping()?;
    let input_len = io.input_len();
    if input_len > slot.capacity {
        return None;
    }
    let capacity = i32::try_from(slot.capacity).ok()?;
    let memory = reactor.guest.as_ref(&reactor.store).memory.clone()?;
    let base = memory.view(&reactor.store).data_ptr();
    let window = match reactor.window {
        Some(w) if w.capacity >= slot.capacity => w,
        _ => {
            // Reserved once per instance, as a guest allocation it never frees; a rebuilt
            // instance reserves its own.
            let size = i32::try_from(slot.capacity + inplace::ALIGN).ok()?;
            let ptr = match reactor.alloc.call(&mut reactor.store, size) {
                Ok(0) => {
                    tracing::debug!(function, "no room for an in-place window: copying");
                    return None;
                }
                Ok(p) => p as u32,
                Err(trap) => {
                    let outcome = classify_trap(&mut reactor.store, &reactor.instance, fuel, trap);
                    return Some((outcome, true));
                }
            };
            let w = inplace::Window::inside(base as usize, ptr, slot.capacity)?;
            reactor.window = Some(w);
            w
        }
    };
    // Read again: the allocation above may have grown memory (never moving a static one).
    let (base, size) = {
        let view = memory.view(&reactor.store);
        (view.data_ptr(), view.data_size())
    };
    if u64::from(window.guest) + slot.capacity as u64 > size
        || !(base as usize + window.guest as usize).is_multiple_of(inplace::ALIGN)
    {
        reactor.window = None;
        return None;
    }
    let home = match homes.get(slot.fd, slot.offset, slot.capacity) {
        Ok(home) => home,
        Err(e) => {
            tracing::warn!(function, "mapping a slot for in-place calls: {e}; copying");
            return None;
        }
    };
    // SAFETY: the window lies inside linear memory (checked above), is 2 MiB-aligned on the
    // host and belongs to the guest's heap as an allocation nobody else uses; the guest is
    // not running and no Rust reference to linear memory is alive. It is moved back out
    // below before anything else runs.
    let at = unsafe { base.add(window.guest as usize) };
    // SAFETY: see above; `home` is the slot's home of that capacity.
    if let Err(e) = unsafe { inplace::enter(home, at, slot.capacity) } {
        tracing::warn!(function, "moving a slot into guest memory: {e}; copying");
        // A failed move may have left the window in any state: make it memory again.
        // SAFETY: as above.
        return match unsafe { inplace::fill_anonymous(at, slot.capacity) } {
            Ok(()) => None,
            Err(e) => Some((
                failed(Status::Trap, format!("restoring guest memory: {e}")),
                true,
            )),
        };
    }
    {
        let ctx = reactor.guest.as_mut(&mut reactor.store);
        ctx.output_len = 0;
        ctx.error = None;
        ctx.next = None;
        ctx.io = None;
        ctx.inplace = true;
    }
    let result = handle.call(
        &mut reactor.store,
        window.guest as i32,
        input_len as i32,
        capacity,
    );
    let ctx = reactor.guest.as_mut(&mut reactor.store);
    ctx.inplace = false;
    let (error, next) = (ctx.error.take(), ctx.next.take());
    // Static memory never moves; if it had, the mapping would be gone with the old region
    // and the guest's writes elsewhere: fail the call and drop the instance, and never map
    // over an address that is no longer ours.
    if memory.view(&reactor.store).data_ptr() != base {
        let message = "linear memory moved during an in-place call";
        return Some((failed(Status::Trap, message), true));
    }
    // SAFETY: the window entered above; the guest returned, nothing references it.
    if let Err(e) = unsafe { inplace::leave(at, home, slot.capacity) } {
        // The slot would stay in the guest's memory: this instance must not run again.
        let message = format!("restoring guest memory after an in-place call: {e}");
        return Some((failed(Status::Trap, message), true));
    }
    // A guest stopped mid-way (a trap, or a host function that refused) is rebuilt, as on
    // the copy path.
    let trapped = result.is_err();
    let outcome = match result {
        Err(_) if error.is_some() => failed(Status::GuestError, error.unwrap_or_default()),
        Err(trap) => classify_trap(&mut reactor.store, &reactor.instance, fuel, trap),
        Ok(_) if error.is_some() => failed(Status::GuestError, error.unwrap_or_default()),
        Ok(n) if n < 0 => failed(
            Status::GuestError,
            format!("{INPLACE_EXPORT} returned {n} without an error message"),
        ),
        Ok(n) if n > capacity => failed(
            Status::GuestError,
            format!("{INPLACE_EXPORT} returned {n} bytes of output, the slot holds {capacity}"),
        ),
        Ok(n) => {
            io.served_in_place(input_len, n as usize);
            Outcome::Done {
                output_len: n as usize,
                next,
            }
        }
    };
    Some((outcome, trapped))
}

/// Borrows `len` bytes of guest memory at `ptr`, or None when out of bounds.
///
/// # Safety
/// Only call from inside a host function: the guest is suspended on this thread, so no other
/// reference to linear memory exists, and the slice must be dropped before returning to it.
unsafe fn guest_bytes<'a>(
    view: &'a wasmer::MemoryView<'_>,
    ptr: i32,
    len: i32,
) -> Option<&'a [u8]> {
    let (start, len) = (ptr as u32 as u64, u64::try_from(len).ok()?);
    if start.checked_add(len)? > view.data_size() {
        return None;
    }
    // SAFETY: bounds checked above; exclusivity is the caller's contract.
    Some(unsafe { &view.data_unchecked()[start as usize..][..len as usize] })
}

/// The guest's memory; a `start` function can call imports before it is attached.
fn attached_memory(ctx: &GuestCtx) -> Result<Memory, RuntimeError> {
    ctx.memory
        .clone()
        .ok_or_else(|| RuntimeError::new("spindle imports are unavailable during instantiation"))
}

fn guest_fault(what: &str) -> RuntimeError {
    RuntimeError::new(format!(
        "spindle.{what}: pointer/length outside linear memory"
    ))
}

fn host_output(mut env: FunctionEnvMut<GuestCtx>, ptr: i32, len: i32) -> Result<(), RuntimeError> {
    let (ctx, store) = env.data_and_store_mut();
    if ctx.inplace {
        ctx.error = Some(format!(
            "spindle.output cannot be called from {INPLACE_EXPORT}: write the output in place \
             and return its length"
        ));
        return Err(RuntimeError::new("spindle.output in an in-place call"));
    }
    let memory = attached_memory(ctx)?;
    let Some(mut io) = ctx.io else {
        return Err(RuntimeError::new(
            "spindle.output called outside spindle_handle",
        ));
    };
    // SAFETY: `io` points at the `SlotIo` borrowed by `run_reactor` for the duration of this
    // guest call, on this thread; nothing else uses it until the call returns.
    let io = unsafe { io.as_mut() };
    let view = memory.view(&store);
    // SAFETY: called from a host function; the slice is dropped before returning to the guest.
    let bytes = unsafe { guest_bytes(&view, ptr, len) }.ok_or_else(|| guest_fault("output"))?;
    if bytes.len() > io.capacity() {
        ctx.error = Some(format!(
            "output of {} bytes exceeds the chain's slot size ({} bytes)",
            bytes.len(),
            io.capacity()
        ));
        return Err(RuntimeError::new("output too large"));
    }
    io.write_output(bytes);
    ctx.output_len = bytes.len();
    Ok(())
}

fn host_error(mut env: FunctionEnvMut<GuestCtx>, ptr: i32, len: i32) -> Result<(), RuntimeError> {
    let (ctx, store) = env.data_and_store_mut();
    let memory = attached_memory(ctx)?;
    let view = memory.view(&store);
    // SAFETY: called from a host function; the slice is dropped before returning to the guest.
    let bytes = unsafe { guest_bytes(&view, ptr, len) }.ok_or_else(|| guest_fault("error"))?;
    let mut message =
        String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_ERROR_LEN)]).into_owned();
    if message.is_empty() {
        message = "function reported an error".into();
    }
    ctx.error = Some(message);
    Ok(())
}

fn host_next(mut env: FunctionEnvMut<GuestCtx>, ptr: i32, len: i32) -> Result<i32, RuntimeError> {
    let (ctx, store) = env.data_and_store_mut();
    let memory = attached_memory(ctx)?;
    let view = memory.view(&store);
    // SAFETY: called from a host function; the slice is dropped before returning to the guest.
    let name = unsafe { guest_bytes(&view, ptr, len) }.ok_or_else(|| guest_fault("next"))?;
    if name.is_empty() {
        ctx.next = None;
        return Ok(0);
    }
    let Some(routes) = &ctx.routes else {
        return Ok(-1);
    };
    match routes.iter().find(|(n, _)| n.as_bytes() == name) {
        Some((_, id)) => {
            ctx.next = Some(*id);
            Ok(0)
        }
        None => Ok(-1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A reactor with a bump allocator; `spindle_handle` behaviour is given per test.
    fn reactor(handle_body: &str) -> String {
        format!(
            r#"(module
                (import "spindle" "output" (func $output (param i32 i32)))
                (import "spindle" "error" (func $error (param i32 i32)))
                (import "spindle" "next" (func $next (param i32 i32) (result i32)))
                (memory (export "memory") 1)
                (global $bump (mut i32) (i32.const 1024))
                (data (i32.const 16) "bad thing")
                (data (i32.const 32) "second")
                (data (i32.const 48) "nowhere")
                (func (export "spindle_alloc") (param $n i32) (result i32)
                    (local $p i32)
                    (local.set $p (global.get $bump))
                    (global.set $bump (i32.add (global.get $bump) (local.get $n)))
                    (local.get $p))
                (func (export "spindle_handle") (param $p i32) (param $n i32) (result i32)
                    {handle_body}))"#
        )
    }

    fn spec(tag: &str, wat: &str, mode: ModuleMode) -> FunctionSpec {
        let path =
            std::env::temp_dir().join(format!("spindle-host-{tag}-{}.wat", std::process::id()));
        std::fs::write(&path, wat).unwrap();
        FunctionSpec {
            name: tag.to_string(),
            module: path,
            instances: crate::config::Instances::fixed(1),
            wait_queue: 256,
            memory_limit: 1 << 20,
            timeout: Duration::from_secs(1),
            fuel: Some(5_000_000),
            mode,
            env: vec![],
            start: crate::config::StartMode::Exec,
            isolation: crate::config::Isolation::Reuse,
            idle_spin: std::time::Duration::ZERO,
            args: Vec::new(),
            files: Vec::new(),
        }
    }

    const ECHO: &str = "(call $output (local.get $p) (local.get $n)) (i32.const 0)";

    #[test]
    fn reactor_echoes_through_linear_memory() {
        let mut host =
            FunctionHost::new(&spec("echo", &reactor(ECHO), ModuleMode::Reactor), None).unwrap();
        for input in [&b"hello"[..], b"", b"again"] {
            let mut io = BufferIo::new(64, input);
            assert_eq!(
                host.invoke(&mut io),
                Outcome::Done {
                    output_len: input.len(),
                    next: None
                }
            );
            assert_eq!(io.output, input);
        }
    }

    #[test]
    fn endless_loop_runs_out_of_fuel_and_instance_is_rebuilt() {
        let body = "(if (i32.eq (local.get $n) (i32.const 4)) (then (loop $l (br $l)))) (call $output (local.get $p) (local.get $n)) (i32.const 0)";
        let mut host =
            FunctionHost::new(&spec("fuel", &reactor(body), ModuleMode::Reactor), None).unwrap();
        let outcome = host.invoke(&mut BufferIo::new(64, b"loop"));
        assert!(
            matches!(&outcome, Outcome::Failed { status: Status::Timeout, message } if message.contains("fuel")),
            "{outcome:?}"
        );
        let mut io = BufferIo::new(64, b"fine!");
        assert_eq!(
            host.invoke(&mut io),
            Outcome::Done {
                output_len: 5,
                next: None
            }
        );
    }

    #[test]
    fn trap_and_reported_error_become_failures() {
        let body = "(if (i32.eq (local.get $n) (i32.const 1)) (then unreachable)) (call $error (i32.const 16) (i32.const 9)) (i32.const 1)";
        let mut host =
            FunctionHost::new(&spec("trap", &reactor(body), ModuleMode::Reactor), None).unwrap();
        let trap = host.invoke(&mut BufferIo::new(64, b"x"));
        assert!(
            matches!(&trap, Outcome::Failed { status: Status::Trap, message } if message.contains("unreachable")),
            "{trap:?}"
        );
        let error = host.invoke(&mut BufferIo::new(64, b"xy"));
        assert_eq!(
            error,
            Outcome::Failed {
                status: Status::GuestError,
                message: "bad thing".into()
            }
        );
    }

    #[test]
    fn nonzero_return_without_message_and_oversized_output_fail() {
        let body = "(if (i32.eq (local.get $n) (i32.const 1)) (then (return (i32.const 7)))) (call $output (i32.const 0) (i32.const 65)) (i32.const 0)";
        let mut host =
            FunctionHost::new(&spec("big", &reactor(body), ModuleMode::Reactor), None).unwrap();
        let code = host.invoke(&mut BufferIo::new(64, b"x"));
        assert!(
            matches!(&code, Outcome::Failed { status: Status::GuestError, message } if message.contains("returned 7")),
            "{code:?}"
        );
        let big = host.invoke(&mut BufferIo::new(64, b"xy"));
        assert!(
            matches!(&big, Outcome::Failed { status: Status::GuestError, message } if message.contains("slot size")),
            "{big:?}"
        );
    }

    #[test]
    fn out_of_bounds_output_traps_instead_of_reading_host_memory() {
        let body = "(call $output (i32.const 65530) (i32.const 100)) (i32.const 0)";
        let mut host =
            FunctionHost::new(&spec("oob", &reactor(body), ModuleMode::Reactor), None).unwrap();
        let outcome = host.invoke(&mut BufferIo::new(64, b"x"));
        assert!(
            matches!(&outcome, Outcome::Failed { status: Status::Trap, message } if message.contains("outside linear memory")),
            "{outcome:?}"
        );
    }

    #[test]
    fn dynamic_next_accepts_chain_members_only() {
        // Names "second" (accepted) when the input is 1 byte, "nowhere" (refused) otherwise;
        // outputs next's return value as one byte.
        let body = r#"(local $r i32)
            (if (i32.eq (local.get $n) (i32.const 1))
                (then (local.set $r (call $next (i32.const 32) (i32.const 6))))
                (else (local.set $r (call $next (i32.const 48) (i32.const 7)))))
            (i32.store8 (i32.const 0) (local.get $r))
            (call $output (i32.const 0) (i32.const 1)) (i32.const 0)"#;
        let routes = vec![("first".to_string(), 1), ("second".to_string(), 2)];
        let mut host = FunctionHost::new(
            &spec("next", &reactor(body), ModuleMode::Reactor),
            Some(routes),
        )
        .unwrap();
        let mut io = BufferIo::new(64, b"x");
        assert_eq!(
            host.invoke(&mut io),
            Outcome::Done {
                output_len: 1,
                next: Some(2)
            }
        );
        assert_eq!(io.output, [0]);
        let mut io = BufferIo::new(64, b"xy");
        assert_eq!(
            host.invoke(&mut io),
            Outcome::Done {
                output_len: 1,
                next: None
            }
        );
        assert_eq!(io.output, [0xff], "-1 for a function outside the chain");
    }

    #[test]
    fn memory_limit_caps_growth_and_initial_size() {
        // memory.grow by 20 pages fails under a 1 MiB (16 page) limit; report its result.
        let body = "(i32.store (i32.const 0) (memory.grow (i32.const 20))) (call $output (i32.const 0) (i32.const 4)) (i32.const 0)";
        let mut host =
            FunctionHost::new(&spec("grow", &reactor(body), ModuleMode::Reactor), None).unwrap();
        let mut io = BufferIo::new(64, b"x");
        assert_eq!(
            host.invoke(&mut io),
            Outcome::Done {
                output_len: 4,
                next: None
            }
        );
        assert_eq!(io.output, (-1i32).to_le_bytes());

        let too_big = reactor(ECHO).replace(
            "(memory (export \"memory\") 1)",
            "(memory (export \"memory\") 17)",
        );
        let err = FunctionHost::new(&spec("big-mem", &too_big, ModuleMode::Reactor), None)
            .err()
            .expect("refused");
        assert!(matches!(err, HostError::Link { .. }), "{err}");
        assert!(
            err.to_string().ends_with(
                "cannot run as function `big-mem`:\n  - memory `memory` needs 17 pages \
                 (1088KiB) at start, more than its `memory:` limit of 16 pages (1MiB)"
            ),
            "{err}"
        );
    }

    #[test]
    fn abi_problems_are_reported_at_start() {
        let command = r#"(module (memory (export "memory") 1) (func (export "_start")))"#;
        let err = FunctionHost::new(&spec("cmd-as-reactor", command, ModuleMode::Reactor), None)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("mode: command"), "{err}");
        let foreign = r#"(module (import "env" "f" (func)) (memory (export "memory") 1) (func (export "_start")))"#;
        let err = FunctionHost::new(&spec("foreign", foreign, ModuleMode::Command), None)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("env.f"), "{err}");
    }

    #[test]
    fn command_module_calling_spindle_imports_fails_cleanly() {
        let wat = r#"(module
            (import "spindle" "output" (func $output (param i32 i32)))
            (memory (export "memory") 1)
            (func (export "_start") (call $output (i32.const 0) (i32.const 4))))"#;
        let mut host =
            FunctionHost::new(&spec("cmd-spindle", wat, ModuleMode::Command), None).unwrap();
        let outcome = host.invoke(&mut BufferIo::new(64, b"x"));
        assert!(
            matches!(&outcome, Outcome::Failed { status: Status::Trap, message } if message.contains("outside spindle_handle")),
            "{outcome:?}"
        );
    }

    #[test]
    fn command_module_reads_stdin_and_writes_stdout() {
        // _start: read stdin into memory at 256 (one fd_read), write it back to stdout.
        let wat = r#"(module
            (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
            (memory (export "memory") 1)
            (func (export "_start")
                (i32.store (i32.const 0) (i32.const 256))
                (i32.store (i32.const 4) (i32.const 1024))
                (drop (call $read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
                (i32.store (i32.const 4) (i32.load (i32.const 8)))
                (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 12)))
                (if (i32.eq (i32.load8_u (i32.const 256)) (i32.const 33)) (then (call $exit (i32.const 3))))))"#;
        let mut host = FunctionHost::new(&spec("cmd", wat, ModuleMode::Command), None).unwrap();
        let mut io = BufferIo::new(64, b"from stdin");
        assert_eq!(
            host.invoke(&mut io),
            Outcome::Done {
                output_len: 10,
                next: None
            }
        );
        assert_eq!(io.output, b"from stdin");
        let failed = host.invoke(&mut BufferIo::new(64, b"!exit"));
        assert!(
            matches!(&failed, Outcome::Failed { status: Status::GuestError, message } if message.contains("status 3")),
            "{failed:?}"
        );
    }
}
