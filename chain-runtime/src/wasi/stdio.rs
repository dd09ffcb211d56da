//! The fd calls: on fds 0-2, reads from the stdin buffer, writes to the output sinks, and the
//! metadata calls wasi-libc and Rust std make at startup; on every other fd, the files and
//! directories of [`super::fs`].

use nix::unistd::Whence;
use wasmer::FunctionEnvMut;

use super::errno::*;
use super::memory::{Mem, iovecs};
use super::{COPY_CHUNK, Errno, Flavor, WasiCtx};

/// fds 0, 1 and 2; every other fd is the file table's.
pub(super) fn is_stdio(fd: u32) -> bool {
    fd <= 2
}

pub(super) const FILETYPE_CHARACTER_DEVICE: u8 = 2;

pub(super) const RIGHT_FD_READ: u64 = 1 << 1;
pub(super) const RIGHT_FD_WRITE: u64 = 1 << 6;
const RIGHT_FD_FILESTAT_GET: u64 = 1 << 21;
const RIGHT_POLL_FD_READWRITE: u64 = 1 << 27;
// No FD_SEEK/FD_TELL: with them missing on a character device, wasi-libc's isatty() is
// true and stdout is line buffered. Logged output then shows up line by line, and
// `fd_seek` can honestly answer SPIPE.
const STDIN_RIGHTS: u64 = RIGHT_FD_READ | RIGHT_FD_FILESTAT_GET | RIGHT_POLL_FD_READWRITE;
const STDOUT_RIGHTS: u64 = RIGHT_FD_WRITE | RIGHT_FD_FILESTAT_GET | RIGHT_POLL_FD_READWRITE;

fn rights_of(fd: u32) -> u64 {
    if fd == 0 { STDIN_RIGHTS } else { STDOUT_RIGHTS }
}

fn write_impl(
    ctx: &mut WasiCtx,
    mem: &Mem<'_>,
    fd: u32,
    iovs: u32,
    iovs_len: u32,
    nwritten: u32,
) -> Result<(), Errno> {
    if !is_stdio(fd) {
        return ctx.files.write(fd);
    }
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

fn read_impl(
    ctx: &mut WasiCtx,
    mem: &Mem<'_>,
    fd: u32,
    iovs: u32,
    iovs_len: u32,
    nread: u32,
) -> Result<(), Errno> {
    if !is_stdio(fd) {
        return ctx.files.read(mem, fd, iovs, iovs_len, None, nread);
    }
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

fn stream_only(ctx: &WasiCtx, fd: u32) -> Result<(), Errno> {
    ctx.open_stdio(fd)?;
    Err(SPIPE)
}

#[allow(clippy::too_many_arguments)]
fn pread_impl(
    ctx: &WasiCtx,
    mem: &Mem<'_>,
    fd: u32,
    iovs: u32,
    iovs_len: u32,
    offset: u64,
    nread: u32,
) -> Result<(), Errno> {
    if is_stdio(fd) {
        return stream_only(ctx, fd);
    }
    ctx.files.read(mem, fd, iovs, iovs_len, Some(offset), nread)
}

fn pwrite_impl(ctx: &WasiCtx, fd: u32) -> Result<(), Errno> {
    if is_stdio(fd) {
        return stream_only(ctx, fd);
    }
    ctx.files.write(fd)
}

/// `whence` as the namespace numbers it: preview 1 has SET, CUR, END; preview 0 had CUR,
/// END, SET.
fn whence(flavor: Flavor, whence: u32) -> Result<Whence, Errno> {
    let order = match flavor {
        Flavor::Preview1 => [Whence::SeekSet, Whence::SeekCur, Whence::SeekEnd],
        Flavor::Unstable => [Whence::SeekCur, Whence::SeekEnd, Whence::SeekSet],
    };
    order.get(whence as usize).copied().ok_or(INVAL)
}

#[allow(clippy::too_many_arguments)]
fn seek_impl(
    ctx: &WasiCtx,
    mem: &Mem<'_>,
    flavor: Flavor,
    fd: u32,
    offset: u64,
    how: u32,
    result: u32,
) -> Result<(), Errno> {
    if is_stdio(fd) {
        return stream_only(ctx, fd);
    }
    ctx.files
        .seek(mem, fd, offset as i64, whence(flavor, how)?, result)
}

fn tell_impl(ctx: &WasiCtx, mem: &Mem<'_>, fd: u32, result: u32) -> Result<(), Errno> {
    if is_stdio(fd) {
        return stream_only(ctx, fd);
    }
    ctx.files.seek(mem, fd, 0, Whence::SeekCur, result)
}

fn fdstat_impl(ctx: &WasiCtx, mem: &Mem<'_>, fd: u32, stat: u32) -> Result<(), Errno> {
    if !is_stdio(fd) {
        return ctx.files.fdstat_get(mem, fd, stat);
    }
    let fd = ctx.open_stdio(fd)?;
    // fdstat: filetype u8 @0, flags u16 @2, rights_base u64 @8, rights_inheriting u64 @16.
    let mut buf = [0u8; 24];
    buf[0] = FILETYPE_CHARACTER_DEVICE;
    buf[8..16].copy_from_slice(&rights_of(fd).to_le_bytes());
    mem.write(stat, &buf)
}

fn filestat_impl(
    ctx: &WasiCtx,
    mem: &Mem<'_>,
    flavor: Flavor,
    fd: u32,
    stat: u32,
) -> Result<(), Errno> {
    if !is_stdio(fd) {
        return ctx.files.filestat_get(mem, flavor, fd, stat);
    }
    ctx.open_stdio(fd)?;
    let mut buf = [0u8; 64];
    buf[16] = FILETYPE_CHARACTER_DEVICE;
    mem.write(stat, &buf[..flavor.filestat_size()])
}

host_fns! {
    fd_write(fd: u32, iovs: u32, iovs_len: u32, nwritten: u32) |ctx, mem|
        write_impl(ctx, mem, fd, iovs, iovs_len, nwritten);
    fd_read(fd: u32, iovs: u32, iovs_len: u32, nread: u32) |ctx, mem|
        read_impl(ctx, mem, fd, iovs, iovs_len, nread);
    /// Positional I/O on a stream: POSIX says ESPIPE. On a file, at the offset given.
    fd_pread(fd: u32, iovs: u32, iovs_len: u32, offset: u64, nread: u32) |ctx, mem|
        pread_impl(ctx, mem, fd, iovs, iovs_len, offset, nread);
    fd_pwrite(fd: u32, _: u32, _: u32, _: u64, _: u32) |ctx| pwrite_impl(ctx, fd);
    fd_seek(fd: u32, offset: u64, whence: u32, result: u32) |ctx, mem|
        seek_impl(ctx, mem, Flavor::Preview1, fd, offset, whence, result);
    fd_seek_unstable(fd: u32, offset: u64, whence: u32, result: u32) |ctx, mem|
        seek_impl(ctx, mem, Flavor::Unstable, fd, offset, whence, result);
    fd_tell(fd: u32, result: u32) |ctx, mem| tell_impl(ctx, mem, fd, result);
    fd_fdstat_get(fd: u32, stat: u32) |ctx, mem| fdstat_impl(ctx, mem, fd, stat);
    fd_filestat_get(fd: u32, stat: u32) |ctx, mem|
        filestat_impl(ctx, mem, Flavor::Preview1, fd, stat);
    fd_filestat_get_unstable(fd: u32, stat: u32) |ctx, mem|
        filestat_impl(ctx, mem, Flavor::Unstable, fd, stat);
    /// The preopened directories, from fd 3 on. BADF past the last is how wasi-libc and Rust
    /// std stop scanning for them (and the whole answer when there are none).
    fd_prestat_get(fd: u32, buf: u32) |ctx, mem| ctx.files.prestat_get(mem, fd, buf);
    fd_prestat_dir_name(fd: u32, path: u32, len: u32) |ctx, mem|
        ctx.files.prestat_dir_name(mem, fd, path, len);
}

/// Stdio streams never block and hold no flags. Clearing flags is a no-op and succeeds;
/// setting any (APPEND, NONBLOCK, SYNC...) is unsupported.
pub(super) fn fd_fdstat_set_flags(
    mut env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    flags: u32,
) -> i32 {
    if !is_stdio(fd) {
        return super::code(env.data_mut().files.fdstat_set_flags(fd, flags));
    }
    i32::from(match env.data().open_stdio(fd) {
        Ok(_) if flags == 0 => SUCCESS,
        Ok(_) => NOTSUP,
        Err(e) => e,
    })
}

/// Rights can only shrink. Rights aren't tracked per fd, so only the no-op request succeeds.
pub(super) fn fd_fdstat_set_rights(
    mut env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    base: u64,
    inheriting: u64,
) -> i32 {
    if !is_stdio(fd) {
        return super::code(env.data_mut().files.fdstat_set_rights(fd, base, inheriting));
    }
    i32::from(match env.data().open_stdio(fd) {
        Ok(fd) if base & !rights_of(fd) != 0 || inheriting != 0 => NOTCAPABLE,
        Ok(fd) if base == rights_of(fd) => SUCCESS,
        Ok(_) => NOTSUP,
        Err(e) => e,
    })
}

pub(super) fn fd_close(mut env: FunctionEnvMut<'_, WasiCtx>, fd: u32) -> i32 {
    let ctx = env.data_mut();
    if !is_stdio(fd) {
        return super::code(ctx.files.close(fd));
    }
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
