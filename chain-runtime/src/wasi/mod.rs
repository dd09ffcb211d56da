//! WASI preview 1 (`wasi_snapshot_preview1`, and the older `wasi_unstable`) for guest
//! functions, written directly as wasmer host functions.
//!
//! We don't use `wasmer-wasix`. It brings a virtual filesystem, networking, threads and an
//! async runtime, and every call goes through machinery we would then have to switch off
//! again. A function here only needs stdio, args/env, clocks and randomness. Because these
//! are plain typed host functions, each call is a direct call from compiled code into
//! ordinary Rust.
//!
//! # Sandbox (deny by default)
//!
//! The guest gets exactly what this table lists and nothing more. Nothing reaches the
//! host's filesystem, sockets, processes or signals.
//!
//! | Area | What the guest sees |
//! |------|---------------------|
//! | args / environ | Only the `args` and `env` given to [`WasiCtx::new`] (the function's name and its `args:`, its `env:`). The host's own environment is never passed through. |
//! | clocks | `REALTIME`, `MONOTONIC`, `PROCESS_CPUTIME`, `THREAD_CPUTIME` read from the host (`clock_gettime`). Any other id gives `INVAL`. |
//! | `random_get` | Real entropy from `getrandom(2)`. |
//! | fd 0 (stdin) | A byte buffer set by the host ([`WasiCtx::set_stdin`], empty by default). Reads hit EOF at its end. |
//! | fd 1 / fd 2 | Output sinks. By default each complete line is logged through `tracing`, with a cap on line length. The host can capture a stream instead, up to a limit ([`WasiCtx::capture_stdout`]). |
//! | fds 0–2 | Character devices. They can't seek (`SPIPE`) and can be closed (after that, `BADF`). Rights: stdin has `FD_READ`, stdout/stderr have `FD_WRITE`, and all three have `FD_FILESTAT_GET` and `POLL_FD_READWRITE`. |
//! | filesystem | Only the preopened directories given to [`WasiCtx::with_preopens`] (the function's `files:`), at fds `3..3 + n`, read-only ([`fs`]): `fd_prestat_get`/`fd_prestat_dir_name` name them and give `BADF` past them (how wasi-libc and Rust std find them); `path_open` opens files and directories beneath them for reading, resolved by the kernel so nothing outside can be reached (`NOTCAPABLE`); reads, seeks, stat, `fd_readdir`, `path_filestat_get` and `path_readlink` work on what it opened. Whatever would write gets `ROFS` (opening to write, create, truncate or append; creating, removing, renaming, linking, setting times) or `BADF` (writing, resizing through a read-only fd). Without preopens every fd above stdio is `BADF`, and any fd call on stdio that needs a file (`path_*`, readdir, advise, sync...) gives `NOTCAPABLE`. |
//! | sockets | Every `sock_*` call gives `NOTCAPABLE` on stdio and files, `BADF` elsewhere. |
//! | `poll_oneoff` | Clock subscriptions (relative or absolute, on `REALTIME`/`MONOTONIC`) and stdio read/write readiness. A sleep blocks the worker thread and lasts at most [`MAX_POLL_SLEEP`]. A longer timeout fires early rather than keeping the worker from its deadline. |
//! | `proc_exit` | Traps with [`ProcExit`], which the host recovers with `RuntimeError::downcast_ref`. `proc_raise` gives `NOSYS`. |
//! | unknown imports | Any other `wasi_snapshot_preview1`/`wasi_unstable` function still links. It returns `NOSYS` if its result is a single `i32`, and traps otherwise. So any preview-1 module instantiates. |
//!
//! Every guest pointer and length is checked against the current memory size before it is
//! used. A bad one gives `FAULT`; the host never panics. A call that touches several regions
//! checks all of them before it has any side effect. So a faulting `fd_write` emits nothing,
//! and a faulting `fd_read` consumes no input.
//!
//! Transfers are bounded so a guest can't make the host allocate or loop without limit. At
//! most [`IOV_MAX`] iovecs are processed per call, and the total is kept within `u32` (a
//! short read or write, which callers must handle anyway). Guest data is copied in bounded
//! chunks.

use std::time::Duration;

use wasmer::{
    AsStoreMut, ExternType, FunctionEnv, FunctionType, Imports, Memory, Module, RuntimeError,
};

/// Defines host functions whose whole body is one errno-valued expression, one line per
/// WASI call. The parameter list is the call's exact signature (that's what makes the import
/// link), with `_` for what the call ignores. The expression is a `Result<(), Errno>`;
/// `|ctx|` gives it the `WasiCtx`, and `|ctx, mem|` guest memory too, which traps if the host
/// never attached it (see `with_mem`). Long parameter lists are allowed: the arity is WASI's.
macro_rules! host_fns {
    (@one $(#[$attr:meta])* $name:ident($($arg:tt: $ty:ty),*) |$ctx:tt| $body:expr) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        pub(super) fn $name(
            mut env: ::wasmer::FunctionEnvMut<'_, $crate::wasi::WasiCtx>,
            $($arg: $ty),*
        ) -> i32 {
            let $ctx = env.data_mut();
            $crate::wasi::code($body)
        }
    };
    (@one $(#[$attr:meta])* $name:ident($($arg:tt: $ty:ty),*) |$ctx:tt, $mem:tt| $body:expr) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        pub(super) fn $name(
            mut env: ::wasmer::FunctionEnvMut<'_, $crate::wasi::WasiCtx>,
            $($arg: $ty),*
        ) -> $crate::wasi::HostResult {
            $crate::wasi::memory::with_mem(&mut env, |$ctx, $mem| $crate::wasi::code($body))
        }
    };
    ($($(#[$attr:meta])* $name:ident($($arg:tt: $ty:ty),*) |$($bind:tt),+| $body:expr;)*) => {
        $(host_fns!(@one $(#[$attr])* $name($($arg: $ty),*) |$($bind),+| $body);)*
    };
}

mod args;
mod clocks;
mod denied;
pub(crate) mod fs;
mod memory;
mod paths;
mod poll;
pub mod preopen;
mod sink;
mod stdio;
mod table;

pub use preopen::{Preopen, PreopenError, Preopens};
pub use sink::OutputSink;
pub use table::KNOWN_FUNCTIONS;

use sink::take_captured;
use table::{known_function, nosys_stub};

/// Import namespace of WASI preview 1.
pub const PREVIEW1: &str = "wasi_snapshot_preview1";
/// Import namespace of the pre-snapshot ("preview 0") ABI. Same calls and errno values.
/// Only the `filestat` and `subscription` layouts differ.
pub const UNSTABLE: &str = "wasi_unstable";

/// True for the import namespaces [`add_imports`] provides.
pub fn is_wasi_namespace(namespace: &str) -> bool {
    namespace == PREVIEW1 || namespace == UNSTABLE
}

/// Longest single sleep in `poll_oneoff`. A host function can't be interrupted by the
/// worker's deadline machinery, so an unbounded guest sleep would pin the worker.
pub const MAX_POLL_SLEEP: Duration = Duration::from_secs(10);
/// Longest line (in bytes) a `Log` sink keeps. A guest writing without newlines would
/// otherwise grow `pending` without bound.
pub const LOG_LINE_MAX: usize = 4096;
/// iovecs processed per `fd_read`/`fd_write`, as Linux does. Any beyond are left untouched,
/// which the guest sees as a short transfer.
pub const IOV_MAX: u32 = 1024;
/// Guest bytes are copied through a host buffer of at most this size.
const COPY_CHUNK: u64 = 64 * 1024;

/// WASI errno values. Preview 0 and preview 1 use the same numbers.
pub mod errno {
    pub const SUCCESS: u16 = 0;
    pub const ACCES: u16 = 2;
    pub const AGAIN: u16 = 6;
    pub const BADF: u16 = 8;
    pub const EXIST: u16 = 20;
    pub const FAULT: u16 = 21;
    pub const FBIG: u16 = 22;
    pub const INTR: u16 = 27;
    pub const INVAL: u16 = 28;
    pub const IO: u16 = 29;
    pub const ISDIR: u16 = 31;
    pub const LOOP: u16 = 32;
    pub const MFILE: u16 = 33;
    pub const NAMETOOLONG: u16 = 37;
    pub const NFILE: u16 = 41;
    pub const NODEV: u16 = 43;
    pub const NOENT: u16 = 44;
    pub const NOMEM: u16 = 48;
    pub const NOSPC: u16 = 51;
    pub const NOSYS: u16 = 52;
    pub const NOTDIR: u16 = 54;
    pub const NOTEMPTY: u16 = 55;
    pub const NOTSUP: u16 = 58;
    pub const NXIO: u16 = 60;
    pub const OVERFLOW: u16 = 61;
    pub const PERM: u16 = 63;
    pub const ROFS: u16 = 69;
    pub const SPIPE: u16 = 70;
    pub const TXTBSY: u16 = 74;
    pub const NOTCAPABLE: u16 = 76;
}
use errno::*;

type Errno = u16;
type HostResult = Result<i32, RuntimeError>;

/// The trap payload raised by `proc_exit`; the host downcasts the `RuntimeError` to find it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("proc_exit({0})")]
pub struct ProcExit(pub u32);

/// Why the WASI imports of a module could not be provided.
#[derive(Debug, thiserror::Error)]
pub enum WasiError {
    #[error("WASI import `{module}.{name}` is a {kind}, but WASI only defines functions")]
    NotAFunction {
        module: String,
        name: String,
        kind: String,
    },
    #[error(
        "WASI import `{module}.{name}` is declared as {declared}, but WASI defines it as {expected}"
    )]
    SignatureMismatch {
        module: String,
        name: String,
        declared: FunctionType,
        expected: FunctionType,
    },
}

/// Per-instance WASI state. Lives in the instance's `FunctionEnv`.
#[derive(Debug)]
pub struct WasiCtx {
    args: Vec<String>,
    /// `KEY=VALUE`, the form `environ_get` hands out.
    env: Vec<String>,
    stdin: Vec<u8>,
    stdin_pos: usize,
    stdout: OutputSink,
    stderr: OutputSink,
    closed: [bool; 3],
    /// Every fd above stdio: the preopened directories and what was opened beneath them.
    files: fs::FdTable,
    memory: Option<Memory>,
    exit_code: Option<u32>,
}

impl WasiCtx {
    /// `args` is the guest's whole argv; by convention `args[0]` is a program name. Strings
    /// are passed verbatim: one with an interior NUL reaches the guest cut at the NUL.
    pub fn new(function: &str, args: Vec<String>, env: Vec<(String, String)>) -> Self {
        WasiCtx {
            args,
            env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
            stdin: Vec::new(),
            stdin_pos: 0,
            stdout: OutputSink::log(function, "stdout"),
            stderr: OutputSink::log(function, "stderr"),
            closed: [false; 3],
            files: fs::FdTable::default(),
            memory: None,
            exit_code: None,
        }
    }

    /// Gives the guest `preopens` as its fds `3..3 + n` (read-only, see [`fs`]).
    pub fn with_preopens(mut self, preopens: Preopens) -> Self {
        self.files = fs::FdTable::new(preopens);
        self
    }

    /// True when the guest's fds above stdio are exactly the preopens, each where it began
    /// (what a child built from an image of this instance gets); otherwise how they differ.
    pub fn files_as_started(&self) -> Result<(), String> {
        if self.files.is_initial() {
            Ok(())
        } else {
            Err(self.files.describe_changes())
        }
    }

    /// The guest paths of the preopened directories, in fd order.
    pub fn preopen_paths(&self) -> Vec<String> {
        self.files.preopens().guest_paths()
    }

    /// Must be called after instantiation and before the guest runs. Until then every call
    /// that touches guest memory traps.
    pub fn set_memory(&mut self, memory: Memory) {
        self.memory = Some(memory);
    }

    pub fn set_stdin(&mut self, data: Vec<u8>) {
        self.stdin = data;
        self.stdin_pos = 0;
    }

    /// Replaces the stdout sink with a fresh capture buffer. Any partial line logged so far
    /// is flushed first.
    pub fn capture_stdout(&mut self, limit: usize) {
        self.stdout.flush();
        self.stdout = OutputSink::capture(limit);
    }

    pub fn capture_stderr(&mut self, limit: usize) {
        self.stderr.flush();
        self.stderr = OutputSink::capture(limit);
    }

    /// Captured stdout so far (empty for a `Log` sink). The truncation flag remains set until
    /// the next `capture_stdout`.
    pub fn take_stdout(&mut self) -> Vec<u8> {
        take_captured(&mut self.stdout)
    }

    pub fn take_stderr(&mut self) -> Vec<u8> {
        take_captured(&mut self.stderr)
    }

    pub fn stdout_truncated(&self) -> bool {
        self.stdout.truncated()
    }

    pub fn stderr_truncated(&self) -> bool {
        self.stderr.truncated()
    }

    /// The code passed to `proc_exit`, if the guest called it.
    pub fn exit_code(&self) -> Option<u32> {
        self.exit_code
    }

    /// Logs any partial line left in `Log` sinks. Call this when the guest has finished.
    pub fn flush_logs(&mut self) {
        self.stdout.flush();
        self.stderr.flush();
    }

    /// Puts the per-request state back as a fresh copy of the image had it (a reset in
    /// place, [`crate::fresh`]): the stdio fds closed exactly when `stdio_closed` says, every
    /// file the request opened closed and every preopen back at its fd, a partial log line
    /// flushed (it belongs to the request that wrote it), no stdin, no exit code. Args,
    /// environment and the sinks' kind are fixed at creation and stay.
    pub fn reset_for_request(&mut self, stdio_closed: [bool; 3]) {
        self.flush_logs();
        self.closed = stdio_closed;
        self.files.reset();
        self.stdin = Vec::new();
        self.stdin_pos = 0;
        self.exit_code = None;
    }

    fn open_stdio(&self, fd: u32) -> Result<u32, Errno> {
        match fd {
            0..=2 if !self.closed[fd as usize] => Ok(fd),
            _ => Err(BADF),
        }
    }

    fn output(&mut self, fd: u32) -> Result<&mut OutputSink, Errno> {
        match self.open_stdio(fd)? {
            1 => Ok(&mut self.stdout),
            2 => Ok(&mut self.stderr),
            _ => Err(BADF),
        }
    }

    fn stdin_remaining(&self) -> &[u8] {
        &self.stdin[self.stdin_pos.min(self.stdin.len())..]
    }
}

impl Drop for WasiCtx {
    /// A guest that traps mid-line still has its last words logged.
    fn drop(&mut self) {
        self.flush_logs();
    }
}

/// Which ABI a namespace speaks. They differ only in a couple of struct layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Preview1,
    Unstable,
}

impl Flavor {
    fn subscription_size(self) -> u64 {
        match self {
            Flavor::Preview1 => 48,
            Flavor::Unstable => 56,
        }
    }

    /// Offsets of (clock id, timeout, flags) in a clock subscription. Preview 0 has an extra
    /// u64 `identifier` before the clock id.
    fn clock_fields(self) -> (u64, u64, u64) {
        match self {
            Flavor::Preview1 => (16, 24, 40),
            Flavor::Unstable => (24, 32, 48),
        }
    }

    /// Preview 0 has a 32-bit `nlink`, which makes `filestat` 8 bytes shorter. `filetype`
    /// is at offset 16 in both.
    fn filestat_size(self) -> usize {
        match self {
            Flavor::Preview1 => 64,
            Flavor::Unstable => 56,
        }
    }
}

fn code(result: Result<(), Errno>) -> i32 {
    i32::from(result.err().unwrap_or(SUCCESS))
}

/// The types WASI's functions have in this layer, to check a module's imports against
/// without linking it (see `crate::abi`).
pub struct Signatures {
    store: wasmer::Store,
    env: FunctionEnv<WasiCtx>,
}

impl Signatures {
    pub fn new(engine: &wasmer::Engine) -> Self {
        let mut store = wasmer::Store::new(engine.clone());
        let env = FunctionEnv::new(&mut store, WasiCtx::new("", Vec::new(), Vec::new()));
        Signatures { store, env }
    }

    /// The type of `namespace.name`, if this layer implements it.
    pub fn get(&mut self, namespace: &str, name: &str) -> Option<FunctionType> {
        let flavor = match namespace {
            PREVIEW1 => Flavor::Preview1,
            UNSTABLE => Flavor::Unstable,
            _ => return None,
        };
        let f = known_function(&mut self.store, &self.env, flavor, name)?;
        Some(f.ty(&self.store))
    }
}

/// Adds a host function for every `wasi_snapshot_preview1` (and the older `wasi_unstable`,
/// same semantics) import that `module` declares. Imports from other namespaces are left
/// to the caller.
///
/// A known function declared with a different signature is an error. Such a module was
/// not built against WASI preview 1, so it is better to say so than to fail at link time
/// with a bare type mismatch.
pub fn add_imports(
    store: &mut impl AsStoreMut,
    env: &FunctionEnv<WasiCtx>,
    module: &Module,
    imports: &mut Imports,
) -> Result<(), WasiError> {
    for import in module.imports() {
        let flavor = match import.module() {
            PREVIEW1 => Flavor::Preview1,
            UNSTABLE => Flavor::Unstable,
            _ => continue,
        };
        let ExternType::Function(declared) = import.ty() else {
            return Err(WasiError::NotAFunction {
                module: import.module().to_owned(),
                name: import.name().to_owned(),
                kind: format!("{:?}", import.ty()),
            });
        };
        let func = match known_function(store, env, flavor, import.name()) {
            Some(func) => {
                let expected = func.ty(&*store);
                if &expected != declared {
                    return Err(WasiError::SignatureMismatch {
                        module: import.module().to_owned(),
                        name: import.name().to_owned(),
                        declared: declared.clone(),
                        expected,
                    });
                }
                func
            }
            None => nosys_stub(store, env, import.module(), import.name(), declared),
        };
        imports.define(import.module(), import.name(), func);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
