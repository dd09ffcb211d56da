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
//! | args / environ | Only the `args` and `env` given to [`WasiCtx::new`]. The host's own environment is never passed through. |
//! | clocks | `REALTIME`, `MONOTONIC`, `PROCESS_CPUTIME`, `THREAD_CPUTIME` read from the host (`clock_gettime`). Any other id gives `INVAL`. |
//! | `random_get` | Real entropy from `getrandom(2)`. |
//! | fd 0 (stdin) | A byte buffer set by the host ([`WasiCtx::set_stdin`], empty by default). Reads hit EOF at its end. |
//! | fd 1 / fd 2 | Output sinks. By default each complete line is logged through `tracing`, with a cap on line length. The host can capture a stream instead, up to a limit ([`WasiCtx::capture_stdout`]). |
//! | fds 0–2 | Character devices. They can't seek (`SPIPE`) and can be closed (after that, `BADF`). Rights: stdin has `FD_READ`, stdout/stderr have `FD_WRITE`, and all three have `FD_FILESTAT_GET` and `POLL_FD_READWRITE`. |
//! | filesystem | Nothing is preopened. `fd_prestat_get` gives `BADF` for every fd, which is how wasi-libc and Rust std learn that no directories exist. Every `path_*` call fails: `NOTCAPABLE` when given a stdio fd, `BADF` for any other fd. |
//! | sockets | Every `sock_*` call gives `NOTCAPABLE` on stdio and `BADF` elsewhere. |
//! | other fd operations | Calls that need rights we never grant (advise, allocate, sync, readdir, renumber, set size/times) give `NOTCAPABLE` on stdio and `BADF` elsewhere. |
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

use std::time::{Duration, Instant};

use wasmer::{
    AsStoreMut, ExternType, Function, FunctionEnv, FunctionEnvMut, FunctionType, Imports, Memory,
    MemoryView, Module, RuntimeError, Type, Value,
};

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
    pub const BADF: u16 = 8;
    pub const FAULT: u16 = 21;
    pub const INVAL: u16 = 28;
    pub const IO: u16 = 29;
    pub const NOSYS: u16 = 52;
    pub const NOTSUP: u16 = 58;
    pub const OVERFLOW: u16 = 61;
    pub const SPIPE: u16 = 70;
    pub const NOTCAPABLE: u16 = 76;
}
use errno::*;

type Errno = u16;
type HostResult = Result<i32, RuntimeError>;

const FILETYPE_CHARACTER_DEVICE: u8 = 2;

const RIGHT_FD_READ: u64 = 1 << 1;
const RIGHT_FD_WRITE: u64 = 1 << 6;
const RIGHT_FD_FILESTAT_GET: u64 = 1 << 21;
const RIGHT_POLL_FD_READWRITE: u64 = 1 << 27;
// No FD_SEEK/FD_TELL: with them missing on a character device, wasi-libc's isatty() is
// true and stdout is line buffered. Logged output then shows up line by line, and
// `fd_seek` can honestly answer SPIPE.
const STDIN_RIGHTS: u64 = RIGHT_FD_READ | RIGHT_FD_FILESTAT_GET | RIGHT_POLL_FD_READWRITE;
const STDOUT_RIGHTS: u64 = RIGHT_FD_WRITE | RIGHT_FD_FILESTAT_GET | RIGHT_POLL_FD_READWRITE;

const EVENTTYPE_CLOCK: u8 = 0;
const EVENTTYPE_FD_READ: u8 = 1;
const EVENTTYPE_FD_WRITE: u8 = 2;
const EVENT_SIZE: u64 = 32;
const SUBCLOCK_ABSTIME: u16 = 1;
const EVENT_FD_READWRITE_HANGUP: u16 = 1;

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

/// Where fd 1 or fd 2 output goes.
#[derive(Debug)]
pub enum OutputSink {
    /// Every complete line is emitted with `tracing::info!`. A line longer than
    /// [`LOG_LINE_MAX`] keeps its start and is marked as truncated.
    Log {
        function: String,
        stream: &'static str,
        /// The current, not yet terminated line.
        pending: Vec<u8>,
        /// Bytes of the current line dropped beyond [`LOG_LINE_MAX`].
        dropped: u64,
    },
    /// Output is collected for the host, up to `limit` bytes. Anything beyond that is
    /// discarded and `truncated` is set, so the host can fail the request instead of
    /// returning a silently cut response. The guest is still told its writes succeeded.
    /// Otherwise its behaviour would depend on the host's slot size, and Rust's `write_all`
    /// would turn the short write into a panic with confusing output.
    Capture {
        buf: Vec<u8>,
        limit: usize,
        truncated: bool,
    },
}

impl OutputSink {
    pub fn log(function: &str, stream: &'static str) -> Self {
        OutputSink::Log {
            function: function.to_owned(),
            stream,
            pending: Vec::new(),
            dropped: 0,
        }
    }

    pub fn capture(limit: usize) -> Self {
        OutputSink::Capture {
            buf: Vec::new(),
            limit,
            truncated: false,
        }
    }

    /// True if a `Capture` sink has discarded output beyond its limit.
    pub fn truncated(&self) -> bool {
        matches!(
            self,
            OutputSink::Capture {
                truncated: true,
                ..
            }
        )
    }

    /// How many more bytes this sink will keep. `fd_write` copies no more than this out of
    /// guest memory.
    fn room(&self) -> u64 {
        match self {
            OutputSink::Log { .. } => u64::MAX,
            OutputSink::Capture { buf, limit, .. } => limit.saturating_sub(buf.len()) as u64,
        }
    }

    /// Guest output that did not fit in `room()` was dropped.
    fn discard(&mut self) {
        if let OutputSink::Capture { truncated, .. } = self {
            *truncated = true;
        }
    }

    fn write(&mut self, data: &[u8]) {
        self.write_with(data, &mut log_line);
    }

    /// `emit` is a parameter so that tests can observe lines without a tracing subscriber.
    fn write_with(&mut self, data: &[u8], emit: &mut dyn FnMut(&str, &'static str, &str)) {
        match self {
            OutputSink::Log {
                function,
                stream,
                pending,
                dropped,
            } => {
                let mut rest = data;
                while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
                    append_capped(pending, dropped, &rest[..nl]);
                    emit_line(function, stream, pending, dropped, emit);
                    rest = &rest[nl + 1..];
                }
                append_capped(pending, dropped, rest);
            }
            OutputSink::Capture {
                buf,
                limit,
                truncated,
            } => {
                let take = data.len().min(limit.saturating_sub(buf.len()));
                buf.extend_from_slice(&data[..take]);
                if take < data.len() {
                    *truncated = true;
                }
            }
        }
    }

    fn flush(&mut self) {
        self.flush_with(&mut log_line);
    }

    fn flush_with(&mut self, emit: &mut dyn FnMut(&str, &'static str, &str)) {
        if let OutputSink::Log {
            function,
            stream,
            pending,
            dropped,
        } = self
            && (!pending.is_empty() || *dropped > 0)
        {
            emit_line(function, stream, pending, dropped, emit);
        }
    }
}

fn append_capped(pending: &mut Vec<u8>, dropped: &mut u64, data: &[u8]) {
    let keep = data.len().min(LOG_LINE_MAX.saturating_sub(pending.len()));
    pending.extend_from_slice(&data[..keep]);
    *dropped += (data.len() - keep) as u64;
}

fn emit_line(
    function: &str,
    stream: &'static str,
    pending: &mut Vec<u8>,
    dropped: &mut u64,
    emit: &mut dyn FnMut(&str, &'static str, &str),
) {
    // Guests built for Windows consoles end lines with CRLF; the CR is noise in a log.
    let line = pending.strip_suffix(b"\r").unwrap_or(pending);
    let mut text = sanitize(line);
    if *dropped > 0 {
        text.push_str(&format!(" …[{dropped} bytes truncated]"));
    }
    emit(function, stream, &text);
    pending.clear();
    *dropped = 0;
}

/// Guest text goes into operator logs. Escape control characters so a guest can't forge
/// terminal escape sequences or split records. Newlines are already line boundaries here.
fn sanitize(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    if !text.chars().any(|c| c.is_control() && c != '\t') {
        return text.into_owned();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn log_line(function: &str, stream: &'static str, line: &str) {
    tracing::info!(function = %function, stream, "{line}");
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
            memory: None,
            exit_code: None,
        }
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

fn take_captured(sink: &mut OutputSink) -> Vec<u8> {
    match sink {
        OutputSink::Capture { buf, .. } => std::mem::take(buf),
        OutputSink::Log { .. } => Vec::new(),
    }
}

fn rights_of(fd: u32) -> u64 {
    if fd == 0 { STDIN_RIGHTS } else { STDOUT_RIGHTS }
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

/// Bounds-checked guest memory. Any failure is `FAULT` for the guest.
struct Mem<'a> {
    view: MemoryView<'a>,
}

impl Mem<'_> {
    fn check(&self, addr: impl Into<u64>, len: impl Into<u64>) -> Result<(), Errno> {
        match addr.into().checked_add(len.into()) {
            Some(end) if end <= self.view.data_size() => Ok(()),
            _ => Err(FAULT),
        }
    }

    fn read(&self, addr: impl Into<u64>, buf: &mut [u8]) -> Result<(), Errno> {
        self.view.read(addr.into(), buf).map_err(|_| FAULT)
    }

    fn write(&self, addr: impl Into<u64>, data: &[u8]) -> Result<(), Errno> {
        self.view.write(addr.into(), data).map_err(|_| FAULT)
    }

    fn bytes<const N: usize>(&self, addr: u64) -> Result<[u8; N], Errno> {
        let mut buf = [0u8; N];
        self.read(addr, &mut buf)?;
        Ok(buf)
    }

    fn read_u8(&self, addr: u64) -> Result<u8, Errno> {
        Ok(self.bytes::<1>(addr)?[0])
    }

    fn read_u16(&self, addr: u64) -> Result<u16, Errno> {
        Ok(u16::from_le_bytes(self.bytes(addr)?))
    }

    fn read_u32(&self, addr: u64) -> Result<u32, Errno> {
        Ok(u32::from_le_bytes(self.bytes(addr)?))
    }

    fn read_u64(&self, addr: u64) -> Result<u64, Errno> {
        Ok(u64::from_le_bytes(self.bytes(addr)?))
    }

    fn write_u32(&self, addr: u32, value: u32) -> Result<(), Errno> {
        self.write(addr, &value.to_le_bytes())
    }

    fn write_u64(&self, addr: u32, value: u64) -> Result<(), Errno> {
        self.write(addr, &value.to_le_bytes())
    }
}

/// Runs `f` with the context and a view of guest memory. A missing memory means the host
/// skipped `set_memory`. That's a host bug, not a guest error, so it traps rather than
/// giving the guest an errno.
fn with_mem<R>(
    env: &mut FunctionEnvMut<'_, WasiCtx>,
    f: impl FnOnce(&mut WasiCtx, &Mem<'_>) -> R,
) -> Result<R, RuntimeError> {
    let (ctx, store) = env.data_and_store_mut();
    let Some(memory) = ctx.memory.as_ref() else {
        return Err(RuntimeError::new(
            "wasi: guest memory is not attached (WasiCtx::set_memory was not called after instantiation)",
        ));
    };
    let mem = Mem {
        view: memory.view(&store),
    };
    Ok(f(ctx, &mem))
}

fn code(result: Result<(), Errno>) -> i32 {
    i32::from(result.err().unwrap_or(SUCCESS))
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Reads and validates the iovec array (`{ buf: u32, len: u32 }` pairs), returning the
/// buffers to use. All of them are checked up front, so no caller acts on some and then
/// faults. The list stops early rather than let the byte total overflow the u32 count
/// returned to the guest.
fn iovecs(mem: &Mem<'_>, iovs: u32, count: u32) -> Result<Vec<(u32, u32)>, Errno> {
    let count = count.min(IOV_MAX);
    let size = u64::from(count) * 8;
    mem.check(iovs, size)?;
    let mut raw = vec![0u8; size as usize];
    mem.read(iovs, &mut raw)?;
    let mut out = Vec::with_capacity(count as usize);
    let mut total = 0u64;
    for entry in raw.chunks_exact(8) {
        let (ptr, len) = (le_u32(&entry[..4]), le_u32(&entry[4..]));
        mem.check(ptr, len)?;
        if total + u64::from(len) > u64::from(u32::MAX) {
            break;
        }
        total += u64::from(len);
        out.push((ptr, len));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// args / environ

fn strings_sizes(
    mem: &Mem<'_>,
    strings: &[String],
    count_ptr: u32,
    size_ptr: u32,
) -> Result<(), Errno> {
    let count = u32::try_from(strings.len()).map_err(|_| OVERFLOW)?;
    let size: u64 = strings.iter().map(|s| s.len() as u64 + 1).sum();
    let size = u32::try_from(size).map_err(|_| OVERFLOW)?;
    mem.check(count_ptr, 4u64)?;
    mem.check(size_ptr, 4u64)?;
    mem.write_u32(count_ptr, count)?;
    mem.write_u32(size_ptr, size)
}

/// Writes NUL-terminated `strings` to `buf` and a pointer to each one into the `ptrs` array.
fn strings_get(mem: &Mem<'_>, strings: &[String], ptrs: u32, buf: u32) -> Result<(), Errno> {
    let total: u64 = strings.iter().map(|s| s.len() as u64 + 1).sum();
    mem.check(ptrs, 4 * strings.len() as u64)?;
    mem.check(buf, total)?;
    let mut bytes = Vec::with_capacity(total as usize);
    let mut table = Vec::with_capacity(4 * strings.len());
    for s in strings {
        // Can't overflow: the check above put `buf + total` inside a <= 4 GiB memory.
        let at = buf + bytes.len() as u32;
        table.extend_from_slice(&at.to_le_bytes());
        bytes.extend_from_slice(s.as_bytes());
        bytes.push(0);
    }
    mem.write(buf, &bytes)?;
    mem.write(ptrs, &table)
}

fn args_sizes_get(mut env: FunctionEnvMut<'_, WasiCtx>, argc: u32, buf_size: u32) -> HostResult {
    with_mem(&mut env, |ctx, mem| {
        code(strings_sizes(mem, &ctx.args, argc, buf_size))
    })
}

fn args_get(mut env: FunctionEnvMut<'_, WasiCtx>, argv: u32, buf: u32) -> HostResult {
    with_mem(&mut env, |ctx, mem| {
        code(strings_get(mem, &ctx.args, argv, buf))
    })
}

fn environ_sizes_get(
    mut env: FunctionEnvMut<'_, WasiCtx>,
    count: u32,
    buf_size: u32,
) -> HostResult {
    with_mem(&mut env, |ctx, mem| {
        code(strings_sizes(mem, &ctx.env, count, buf_size))
    })
}

fn environ_get(mut env: FunctionEnvMut<'_, WasiCtx>, environ: u32, buf: u32) -> HostResult {
    with_mem(&mut env, |ctx, mem| {
        code(strings_get(mem, &ctx.env, environ, buf))
    })
}

// ---------------------------------------------------------------------------------------
// clocks, randomness, scheduling, process

const CLOCK_REALTIME: u32 = 0;
const CLOCK_MONOTONIC: u32 = 1;

fn host_clock(id: u32) -> Result<libc::clockid_t, Errno> {
    match id {
        0 => Ok(libc::CLOCK_REALTIME),
        1 => Ok(libc::CLOCK_MONOTONIC),
        2 => Ok(libc::CLOCK_PROCESS_CPUTIME_ID),
        3 => Ok(libc::CLOCK_THREAD_CPUTIME_ID),
        _ => Err(INVAL),
    }
}

fn timespec_nanos(ts: &libc::timespec) -> Result<u64, Errno> {
    let secs = u64::try_from(ts.tv_sec).map_err(|_| OVERFLOW)?;
    let nanos = u64::try_from(ts.tv_nsec).map_err(|_| OVERFLOW)?;
    secs.checked_mul(1_000_000_000)
        .and_then(|n| n.checked_add(nanos))
        .ok_or(OVERFLOW)
}

fn clock_now(clock: libc::clockid_t) -> Result<u64, Errno> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live, writable timespec on this stack frame, and clock_gettime
    // writes only into it.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return Err(IO);
    }
    timespec_nanos(&ts)
}

fn clock_resolution(clock: libc::clockid_t) -> Result<u64, Errno> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: as in `clock_now`: clock_getres writes only into the timespec we own.
    let rc = unsafe { libc::clock_getres(clock, &mut ts) };
    if rc != 0 {
        return Err(IO);
    }
    timespec_nanos(&ts)
}

fn clock_res_get(mut env: FunctionEnvMut<'_, WasiCtx>, id: u32, res: u32) -> HostResult {
    with_mem(&mut env, |_, mem| {
        code(
            host_clock(id)
                .and_then(clock_resolution)
                .and_then(|r| mem.write_u64(res, r)),
        )
    })
}

fn clock_time_get(
    mut env: FunctionEnvMut<'_, WasiCtx>,
    id: u32,
    _precision: u64,
    time: u32,
) -> HostResult {
    with_mem(&mut env, |_, mem| {
        code(
            host_clock(id)
                .and_then(clock_now)
                .and_then(|t| mem.write_u64(time, t)),
        )
    })
}

fn fill_random(buf: &mut [u8]) -> Result<(), Errno> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid, writable slice, and getrandom writes at most
        // `rest.len()` bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(IO);
        }
        filled += n as usize;
    }
    Ok(())
}

fn random_get(mut env: FunctionEnvMut<'_, WasiCtx>, buf: u32, len: u32) -> HostResult {
    with_mem(&mut env, |_, mem| {
        code((|| -> Result<(), Errno> {
            mem.check(buf, len)?;
            let mut chunk = vec![0u8; u64::from(len).min(COPY_CHUNK) as usize];
            let mut done = 0u64;
            while done < u64::from(len) {
                let n = (u64::from(len) - done).min(COPY_CHUNK) as usize;
                fill_random(&mut chunk[..n])?;
                mem.write(u64::from(buf) + done, &chunk[..n])?;
                done += n as u64;
            }
            Ok(())
        })())
    })
}

fn sched_yield(_env: FunctionEnvMut<'_, WasiCtx>) -> i32 {
    std::thread::yield_now();
    i32::from(SUCCESS)
}

fn proc_exit(mut env: FunctionEnvMut<'_, WasiCtx>, exit_code: u32) -> Result<(), RuntimeError> {
    env.data_mut().exit_code = Some(exit_code);
    Err(RuntimeError::user(Box::new(ProcExit(exit_code))))
}

/// Guests have no signals to deliver and no handlers to run.
fn proc_raise(_env: FunctionEnvMut<'_, WasiCtx>, _sig: u32) -> i32 {
    i32::from(NOSYS)
}

// ---------------------------------------------------------------------------------------
// stdio

fn write_impl(
    ctx: &mut WasiCtx,
    mem: &Mem<'_>,
    fd: u32,
    iovs: u32,
    iovs_len: u32,
    nwritten: u32,
) -> Result<(), Errno> {
    let sink = ctx.output(fd)?;
    let bufs = iovecs(mem, iovs, iovs_len)?;
    mem.check(nwritten, 4u64)?;
    let mut chunk = Vec::new();
    let mut total = 0u32;
    for (ptr, len) in bufs {
        let keep = u64::from(len).min(sink.room());
        let mut done = 0u64;
        while done < keep {
            let n = (keep - done).min(COPY_CHUNK) as usize;
            chunk.resize(n, 0);
            mem.read(u64::from(ptr) + done, &mut chunk)?;
            sink.write(&chunk);
            done += n as u64;
        }
        if keep < u64::from(len) {
            sink.discard();
        }
        // `iovecs` keeps the total within u32.
        total += len;
    }
    mem.write_u32(nwritten, total)
}

fn fd_write(
    mut env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    iovs: u32,
    iovs_len: u32,
    nwritten: u32,
) -> HostResult {
    with_mem(&mut env, |ctx, mem| {
        code(write_impl(ctx, mem, fd, iovs, iovs_len, nwritten))
    })
}

fn read_impl(
    ctx: &mut WasiCtx,
    mem: &Mem<'_>,
    fd: u32,
    iovs: u32,
    iovs_len: u32,
    nread: u32,
) -> Result<(), Errno> {
    if ctx.open_stdio(fd)? != 0 {
        return Err(BADF);
    }
    let bufs = iovecs(mem, iovs, iovs_len)?;
    mem.check(nread, 4u64)?;
    let mut total = 0u32;
    for (ptr, len) in bufs {
        let rest = ctx.stdin_remaining();
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(len as usize);
        mem.write(ptr, &rest[..n])?;
        ctx.stdin_pos += n;
        total += n as u32;
    }
    mem.write_u32(nread, total)
}

fn fd_read(
    mut env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    iovs: u32,
    iovs_len: u32,
    nread: u32,
) -> HostResult {
    with_mem(&mut env, |ctx, mem| {
        code(read_impl(ctx, mem, fd, iovs, iovs_len, nread))
    })
}

/// Positional I/O on a stream: POSIX says ESPIPE.
fn fd_pread(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _iovs: u32,
    _iovs_len: u32,
    _offset: u64,
    _nread: u32,
) -> i32 {
    stream_only(env.data(), fd)
}

fn fd_pwrite(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _iovs: u32,
    _iovs_len: u32,
    _offset: u64,
    _nwritten: u32,
) -> i32 {
    stream_only(env.data(), fd)
}

fn fd_seek(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _offset: u64,
    _whence: u32,
    _newoffset: u32,
) -> i32 {
    stream_only(env.data(), fd)
}

fn fd_tell(env: FunctionEnvMut<'_, WasiCtx>, fd: u32, _offset: u32) -> i32 {
    stream_only(env.data(), fd)
}

fn stream_only(ctx: &WasiCtx, fd: u32) -> i32 {
    i32::from(match ctx.open_stdio(fd) {
        Ok(_) => SPIPE,
        Err(e) => e,
    })
}

fn fd_fdstat_get(mut env: FunctionEnvMut<'_, WasiCtx>, fd: u32, stat: u32) -> HostResult {
    with_mem(&mut env, |ctx, mem| {
        code((|| -> Result<(), Errno> {
            let fd = ctx.open_stdio(fd)?;
            // fdstat: filetype u8 @0, flags u16 @2, rights_base u64 @8, rights_inheriting u64 @16.
            let mut buf = [0u8; 24];
            buf[0] = FILETYPE_CHARACTER_DEVICE;
            buf[8..16].copy_from_slice(&rights_of(fd).to_le_bytes());
            mem.write(stat, &buf)
        })())
    })
}

/// Stdio streams never block and hold no flags. Clearing flags is a no-op and succeeds;
/// setting any (APPEND, NONBLOCK, SYNC...) is unsupported.
fn fd_fdstat_set_flags(env: FunctionEnvMut<'_, WasiCtx>, fd: u32, flags: u32) -> i32 {
    i32::from(match env.data().open_stdio(fd) {
        Ok(_) if flags == 0 => SUCCESS,
        Ok(_) => NOTSUP,
        Err(e) => e,
    })
}

/// Rights can only shrink. Rights aren't tracked per fd, so only the no-op request succeeds.
fn fd_fdstat_set_rights(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    base: u64,
    inheriting: u64,
) -> i32 {
    i32::from(match env.data().open_stdio(fd) {
        Ok(fd) if base & !rights_of(fd) != 0 || inheriting != 0 => NOTCAPABLE,
        Ok(fd) if base == rights_of(fd) => SUCCESS,
        Ok(_) => NOTSUP,
        Err(e) => e,
    })
}

fn filestat_impl(
    ctx: &WasiCtx,
    mem: &Mem<'_>,
    flavor: Flavor,
    fd: u32,
    stat: u32,
) -> Result<(), Errno> {
    ctx.open_stdio(fd)?;
    let mut buf = [0u8; 64];
    buf[16] = FILETYPE_CHARACTER_DEVICE;
    mem.write(stat, &buf[..flavor.filestat_size()])
}

fn fd_filestat_get(mut env: FunctionEnvMut<'_, WasiCtx>, fd: u32, stat: u32) -> HostResult {
    with_mem(&mut env, |ctx, mem| {
        code(filestat_impl(ctx, mem, Flavor::Preview1, fd, stat))
    })
}

fn fd_filestat_get_unstable(
    mut env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    stat: u32,
) -> HostResult {
    with_mem(&mut env, |ctx, mem| {
        code(filestat_impl(ctx, mem, Flavor::Unstable, fd, stat))
    })
}

fn fd_close(mut env: FunctionEnvMut<'_, WasiCtx>, fd: u32) -> i32 {
    let ctx = env.data_mut();
    i32::from(match ctx.open_stdio(fd) {
        Ok(fd) => {
            // Closing ends the stream, so a partial last line is complete now.
            match fd {
                1 => ctx.stdout.flush(),
                2 => ctx.stderr.flush(),
                _ => {}
            }
            ctx.closed[fd as usize] = true;
            SUCCESS
        }
        Err(e) => e,
    })
}

/// No preopened directories exist. BADF on fd 3 is how wasi-libc and Rust std stop
/// scanning for them.
fn fd_prestat_get(_env: FunctionEnvMut<'_, WasiCtx>, _fd: u32, _prestat: u32) -> i32 {
    i32::from(BADF)
}

fn fd_prestat_dir_name(_env: FunctionEnvMut<'_, WasiCtx>, _fd: u32, _path: u32, _len: u32) -> i32 {
    i32::from(BADF)
}

// ---------------------------------------------------------------------------------------
// poll_oneoff

enum Readiness {
    /// Reported without waiting (ready fds, or an error for the subscription).
    Now {
        error: u16,
        kind: u8,
        nbytes: u64,
        flags: u16,
    },
    /// A clock that fires this long after the call started.
    At(Duration),
}

struct PollStart {
    realtime: u64,
    monotonic: u64,
}

fn parse_subscription(
    ctx: &WasiCtx,
    mem: &Mem<'_>,
    flavor: Flavor,
    start: &PollStart,
    at: u64,
) -> Result<(u64, Readiness), Errno> {
    let userdata = mem.read_u64(at)?;
    let tag = mem.read_u8(at + 8)?;
    let now = |error, kind| Readiness::Now {
        error,
        kind,
        nbytes: 0,
        flags: 0,
    };
    let readiness = match tag {
        EVENTTYPE_CLOCK => {
            let (id_off, timeout_off, flags_off) = flavor.clock_fields();
            let id = mem.read_u32(at + id_off)?;
            let timeout = mem.read_u64(at + timeout_off)?;
            let abstime = mem.read_u16(at + flags_off)? & SUBCLOCK_ABSTIME != 0;
            let base = match id {
                CLOCK_REALTIME => Some(start.realtime),
                CLOCK_MONOTONIC => Some(start.monotonic),
                _ => None,
            };
            match (base, host_clock(id)) {
                (Some(base), _) => {
                    let wait = if abstime {
                        timeout.saturating_sub(base)
                    } else {
                        timeout
                    };
                    Readiness::At(Duration::from_nanos(wait))
                }
                // CPU-time clocks exist, but there is no way to sleep until one reaches a value.
                (None, Ok(_)) => now(NOTSUP, EVENTTYPE_CLOCK),
                (None, Err(e)) => now(e, EVENTTYPE_CLOCK),
            }
        }
        EVENTTYPE_FD_READ | EVENTTYPE_FD_WRITE => {
            let fd = mem.read_u32(at + 16)?;
            match (tag, ctx.open_stdio(fd)) {
                (_, Err(e)) => now(e, tag),
                (EVENTTYPE_FD_READ, Ok(0)) => {
                    let left = ctx.stdin_remaining().len() as u64;
                    // All of stdin is already buffered. Once it has been read, the writer
                    // has hung up.
                    let flags = if left == 0 {
                        EVENT_FD_READWRITE_HANGUP
                    } else {
                        0
                    };
                    Readiness::Now {
                        error: SUCCESS,
                        kind: tag,
                        nbytes: left,
                        flags,
                    }
                }
                (EVENTTYPE_FD_WRITE, Ok(fd @ 1..=2)) => {
                    let sink = if fd == 1 { &ctx.stdout } else { &ctx.stderr };
                    let nbytes = sink.room().min(u64::from(u32::MAX));
                    Readiness::Now {
                        error: SUCCESS,
                        kind: tag,
                        nbytes,
                        flags: 0,
                    }
                }
                _ => now(NOTSUP, tag),
            }
        }
        _ => return Err(INVAL),
    };
    Ok((userdata, readiness))
}

fn poll_impl(
    ctx: &WasiCtx,
    mem: &Mem<'_>,
    flavor: Flavor,
    subs: u32,
    events: u32,
    nsubs: u32,
    nevents: u32,
) -> Result<(), Errno> {
    if nsubs == 0 {
        return Err(INVAL);
    }
    let sub_size = flavor.subscription_size();
    mem.check(subs, u64::from(nsubs) * sub_size)?;
    mem.check(events, u64::from(nsubs) * EVENT_SIZE)?;
    mem.check(nevents, 4u64)?;

    // One reading of each clock, so both passes compute the same deadlines.
    let started = Instant::now();
    let start = PollStart {
        realtime: clock_now(libc::CLOCK_REALTIME)?,
        monotonic: clock_now(libc::CLOCK_MONOTONIC)?,
    };
    let sub_at = |i: u32| u64::from(subs) + u64::from(i) * sub_size;

    // Pass 1: is anything ready now, and if not, when does the first clock fire?
    let mut any_now = false;
    let mut earliest: Option<Duration> = None;
    for i in 0..nsubs {
        match parse_subscription(ctx, mem, flavor, &start, sub_at(i))?.1 {
            Readiness::Now { .. } => any_now = true,
            Readiness::At(at) => earliest = Some(earliest.map_or(at, |e| e.min(at))),
        }
    }
    let fire_until = match earliest {
        Some(at) if !any_now => {
            let wake = at.min(MAX_POLL_SLEEP);
            let elapsed = started.elapsed();
            if wake > elapsed {
                std::thread::sleep(wake - elapsed);
            }
            // Even when the cap cut the sleep short, the earliest clock fires. Reporting no
            // event would break callers such as Rust's thread::sleep, which panics on that.
            at.max(started.elapsed())
        }
        _ => started.elapsed(),
    };

    // Pass 2: write one event per subscription that triggered, in subscription order.
    let mut count = 0u32;
    for i in 0..nsubs {
        let (userdata, readiness) = parse_subscription(ctx, mem, flavor, &start, sub_at(i))?;
        let (error, kind, nbytes, flags) = match readiness {
            Readiness::Now {
                error,
                kind,
                nbytes,
                flags,
            } => (error, kind, nbytes, flags),
            Readiness::At(at) if at <= fire_until => (SUCCESS, EVENTTYPE_CLOCK, 0, 0),
            Readiness::At(_) => continue,
        };
        // event: userdata u64 @0, error u16 @8, type u8 @10, fd_readwrite { nbytes u64 @16, flags u16 @24 }.
        let mut ev = [0u8; EVENT_SIZE as usize];
        ev[0..8].copy_from_slice(&userdata.to_le_bytes());
        ev[8..10].copy_from_slice(&error.to_le_bytes());
        ev[10] = kind;
        ev[16..24].copy_from_slice(&nbytes.to_le_bytes());
        ev[24..26].copy_from_slice(&flags.to_le_bytes());
        mem.write(u64::from(events) + u64::from(count) * EVENT_SIZE, &ev)?;
        count += 1;
    }
    mem.write_u32(nevents, count)
}

fn poll_oneoff(
    mut env: FunctionEnvMut<'_, WasiCtx>,
    subs: u32,
    events: u32,
    nsubs: u32,
    nevents: u32,
) -> HostResult {
    with_mem(&mut env, |ctx, mem| {
        code(poll_impl(
            ctx,
            mem,
            Flavor::Preview1,
            subs,
            events,
            nsubs,
            nevents,
        ))
    })
}

fn poll_oneoff_unstable(
    mut env: FunctionEnvMut<'_, WasiCtx>,
    subs: u32,
    events: u32,
    nsubs: u32,
    nevents: u32,
) -> HostResult {
    with_mem(&mut env, |ctx, mem| {
        code(poll_impl(
            ctx,
            mem,
            Flavor::Unstable,
            subs,
            events,
            nsubs,
            nevents,
        ))
    })
}

// ---------------------------------------------------------------------------------------
// Denied: filesystem, sockets and fd operations needing rights we never grant. The
// signatures are still exact, so that the imports link.

/// The stdio fds exist but lack the needed right. Any other fd doesn't exist.
fn denied(ctx: &WasiCtx, fd: u32) -> i32 {
    i32::from(match ctx.open_stdio(fd) {
        Ok(_) => NOTCAPABLE,
        Err(e) => e,
    })
}

fn denied2(ctx: &WasiCtx, a: u32, b: u32) -> i32 {
    if ctx.open_stdio(a).is_err() || ctx.open_stdio(b).is_err() {
        i32::from(BADF)
    } else {
        i32::from(NOTCAPABLE)
    }
}

fn fd_advise(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _offset: u64,
    _len: u64,
    _advice: u32,
) -> i32 {
    denied(env.data(), fd)
}

fn fd_allocate(env: FunctionEnvMut<'_, WasiCtx>, fd: u32, _offset: u64, _len: u64) -> i32 {
    denied(env.data(), fd)
}

fn fd_datasync(env: FunctionEnvMut<'_, WasiCtx>, fd: u32) -> i32 {
    denied(env.data(), fd)
}

fn fd_sync(env: FunctionEnvMut<'_, WasiCtx>, fd: u32) -> i32 {
    denied(env.data(), fd)
}

fn fd_filestat_set_size(env: FunctionEnvMut<'_, WasiCtx>, fd: u32, _size: u64) -> i32 {
    denied(env.data(), fd)
}

fn fd_filestat_set_times(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _atim: u64,
    _mtim: u64,
    _fst_flags: u32,
) -> i32 {
    denied(env.data(), fd)
}

fn fd_readdir(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _buf: u32,
    _buf_len: u32,
    _cookie: u64,
    _bufused: u32,
) -> i32 {
    denied(env.data(), fd)
}

fn fd_renumber(env: FunctionEnvMut<'_, WasiCtx>, fd: u32, to: u32) -> i32 {
    denied2(env.data(), fd, to)
}

fn path_create_directory(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _path: u32,
    _path_len: u32,
) -> i32 {
    denied(env.data(), fd)
}

fn path_filestat_get(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _flags: u32,
    _path: u32,
    _path_len: u32,
    _buf: u32,
) -> i32 {
    denied(env.data(), fd)
}

#[allow(clippy::too_many_arguments)]
fn path_filestat_set_times(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _flags: u32,
    _path: u32,
    _path_len: u32,
    _atim: u64,
    _mtim: u64,
    _fst_flags: u32,
) -> i32 {
    denied(env.data(), fd)
}

#[allow(clippy::too_many_arguments)]
fn path_link(
    env: FunctionEnvMut<'_, WasiCtx>,
    old_fd: u32,
    _old_flags: u32,
    _old_path: u32,
    _old_len: u32,
    new_fd: u32,
    _new_path: u32,
    _new_len: u32,
) -> i32 {
    denied2(env.data(), old_fd, new_fd)
}

#[allow(clippy::too_many_arguments)]
fn path_open(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _dirflags: u32,
    _path: u32,
    _path_len: u32,
    _oflags: u32,
    _rights_base: u64,
    _rights_inheriting: u64,
    _fdflags: u32,
    _opened_fd: u32,
) -> i32 {
    denied(env.data(), fd)
}

fn path_readlink(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _path: u32,
    _path_len: u32,
    _buf: u32,
    _buf_len: u32,
    _bufused: u32,
) -> i32 {
    denied(env.data(), fd)
}

fn path_remove_directory(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _path: u32,
    _path_len: u32,
) -> i32 {
    denied(env.data(), fd)
}

fn path_rename(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _old_path: u32,
    _old_len: u32,
    new_fd: u32,
    _new_path: u32,
    _new_len: u32,
) -> i32 {
    denied2(env.data(), fd, new_fd)
}

fn path_symlink(
    env: FunctionEnvMut<'_, WasiCtx>,
    _old_path: u32,
    _old_len: u32,
    fd: u32,
    _new_path: u32,
    _new_len: u32,
) -> i32 {
    denied(env.data(), fd)
}

fn path_unlink_file(env: FunctionEnvMut<'_, WasiCtx>, fd: u32, _path: u32, _path_len: u32) -> i32 {
    denied(env.data(), fd)
}

fn sock_accept(env: FunctionEnvMut<'_, WasiCtx>, fd: u32, _flags: u32, _accepted_fd: u32) -> i32 {
    denied(env.data(), fd)
}

fn sock_recv(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _ri_data: u32,
    _ri_data_len: u32,
    _ri_flags: u32,
    _ro_datalen: u32,
    _ro_flags: u32,
) -> i32 {
    denied(env.data(), fd)
}

fn sock_send(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _si_data: u32,
    _si_data_len: u32,
    _si_flags: u32,
    _so_datalen: u32,
) -> i32 {
    denied(env.data(), fd)
}

fn sock_shutdown(env: FunctionEnvMut<'_, WasiCtx>, fd: u32, _how: u32) -> i32 {
    denied(env.data(), fd)
}

// ---------------------------------------------------------------------------------------
// linking

/// Every WASI function this module implements (or denies) by name, for both namespaces.
pub const KNOWN_FUNCTIONS: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "fd_advise",
    "fd_allocate",
    "fd_close",
    "fd_datasync",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_fdstat_set_rights",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_pread",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_pwrite",
    "fd_read",
    "fd_readdir",
    "fd_renumber",
    "fd_seek",
    "fd_sync",
    "fd_tell",
    "fd_write",
    "path_create_directory",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_link",
    "path_open",
    "path_readlink",
    "path_remove_directory",
    "path_rename",
    "path_symlink",
    "path_unlink_file",
    "poll_oneoff",
    "proc_exit",
    "proc_raise",
    "sched_yield",
    "random_get",
    "sock_accept",
    "sock_recv",
    "sock_send",
    "sock_shutdown",
];

fn known_function(
    store: &mut impl AsStoreMut,
    env: &FunctionEnv<WasiCtx>,
    flavor: Flavor,
    name: &str,
) -> Option<Function> {
    macro_rules! host {
        ($f:expr) => {
            Function::new_typed_with_env(store, env, $f)
        };
    }
    Some(match name {
        "args_get" => host!(args_get),
        "args_sizes_get" => host!(args_sizes_get),
        "environ_get" => host!(environ_get),
        "environ_sizes_get" => host!(environ_sizes_get),
        "clock_res_get" => host!(clock_res_get),
        "clock_time_get" => host!(clock_time_get),
        "fd_advise" => host!(fd_advise),
        "fd_allocate" => host!(fd_allocate),
        "fd_close" => host!(fd_close),
        "fd_datasync" => host!(fd_datasync),
        "fd_fdstat_get" => host!(fd_fdstat_get),
        "fd_fdstat_set_flags" => host!(fd_fdstat_set_flags),
        "fd_fdstat_set_rights" => host!(fd_fdstat_set_rights),
        "fd_filestat_get" => match flavor {
            Flavor::Preview1 => host!(fd_filestat_get),
            Flavor::Unstable => host!(fd_filestat_get_unstable),
        },
        "fd_filestat_set_size" => host!(fd_filestat_set_size),
        "fd_filestat_set_times" => host!(fd_filestat_set_times),
        "fd_pread" => host!(fd_pread),
        "fd_prestat_get" => host!(fd_prestat_get),
        "fd_prestat_dir_name" => host!(fd_prestat_dir_name),
        "fd_pwrite" => host!(fd_pwrite),
        "fd_read" => host!(fd_read),
        "fd_readdir" => host!(fd_readdir),
        "fd_renumber" => host!(fd_renumber),
        "fd_seek" => host!(fd_seek),
        "fd_sync" => host!(fd_sync),
        "fd_tell" => host!(fd_tell),
        "fd_write" => host!(fd_write),
        "path_create_directory" => host!(path_create_directory),
        "path_filestat_get" => host!(path_filestat_get),
        "path_filestat_set_times" => host!(path_filestat_set_times),
        "path_link" => host!(path_link),
        "path_open" => host!(path_open),
        "path_readlink" => host!(path_readlink),
        "path_remove_directory" => host!(path_remove_directory),
        "path_rename" => host!(path_rename),
        "path_symlink" => host!(path_symlink),
        "path_unlink_file" => host!(path_unlink_file),
        "poll_oneoff" => match flavor {
            Flavor::Preview1 => host!(poll_oneoff),
            Flavor::Unstable => host!(poll_oneoff_unstable),
        },
        "proc_exit" => host!(proc_exit),
        "proc_raise" => host!(proc_raise),
        "sched_yield" => host!(sched_yield),
        "random_get" => host!(random_get),
        "sock_accept" => host!(sock_accept),
        "sock_recv" => host!(sock_recv),
        "sock_send" => host!(sock_send),
        "sock_shutdown" => host!(sock_shutdown),
        _ => return None,
    })
}

/// For an import we don't know, perhaps from a later WASI revision or a toolchain
/// extension. It must still link, so the module can run as long as it never calls it. If
/// the result is a single i32 it is taken to be an errno, and NOSYS is the honest answer.
/// With any other shape there is no error channel, so the call traps.
fn nosys_stub(
    store: &mut impl AsStoreMut,
    env: &FunctionEnv<WasiCtx>,
    module: &str,
    name: &str,
    ty: &FunctionType,
) -> Function {
    let returns_errno = ty.results() == [Type::I32];
    let what = format!("{module}.{name}");
    tracing::warn!(import = %what, signature = %ty, returns_errno, "unknown WASI import; linking a stub that denies it");
    Function::new_with_env(store, env, ty.clone(), move |_env, _args| {
        if returns_errno {
            Ok(vec![Value::I32(i32::from(NOSYS))])
        } else {
            Err(RuntimeError::new(format!(
                "wasi: `{what}` is not provided by this host, and its signature has no errno result to report that"
            )))
        }
    })
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
