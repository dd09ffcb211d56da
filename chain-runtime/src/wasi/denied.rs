//! Denied: filesystem, sockets and fd operations needing rights we never grant. The
//! signatures are still exact, so that the imports link.

use wasmer::FunctionEnvMut;

use super::WasiCtx;
use super::errno::*;

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

pub(super) fn fd_advise(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _offset: u64,
    _len: u64,
    _advice: u32,
) -> i32 {
    denied(env.data(), fd)
}

pub(super) fn fd_allocate(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _offset: u64,
    _len: u64,
) -> i32 {
    denied(env.data(), fd)
}

pub(super) fn fd_datasync(env: FunctionEnvMut<'_, WasiCtx>, fd: u32) -> i32 {
    denied(env.data(), fd)
}

pub(super) fn fd_sync(env: FunctionEnvMut<'_, WasiCtx>, fd: u32) -> i32 {
    denied(env.data(), fd)
}

pub(super) fn fd_filestat_set_size(env: FunctionEnvMut<'_, WasiCtx>, fd: u32, _size: u64) -> i32 {
    denied(env.data(), fd)
}

pub(super) fn fd_filestat_set_times(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _atim: u64,
    _mtim: u64,
    _fst_flags: u32,
) -> i32 {
    denied(env.data(), fd)
}

pub(super) fn fd_readdir(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _buf: u32,
    _buf_len: u32,
    _cookie: u64,
    _bufused: u32,
) -> i32 {
    denied(env.data(), fd)
}

pub(super) fn fd_renumber(env: FunctionEnvMut<'_, WasiCtx>, fd: u32, to: u32) -> i32 {
    denied2(env.data(), fd, to)
}

pub(super) fn path_create_directory(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _path: u32,
    _path_len: u32,
) -> i32 {
    denied(env.data(), fd)
}

pub(super) fn path_filestat_get(
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
pub(super) fn path_filestat_set_times(
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
pub(super) fn path_link(
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
pub(super) fn path_open(
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

pub(super) fn path_readlink(
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

pub(super) fn path_remove_directory(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _path: u32,
    _path_len: u32,
) -> i32 {
    denied(env.data(), fd)
}

pub(super) fn path_rename(
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

pub(super) fn path_symlink(
    env: FunctionEnvMut<'_, WasiCtx>,
    _old_path: u32,
    _old_len: u32,
    fd: u32,
    _new_path: u32,
    _new_len: u32,
) -> i32 {
    denied(env.data(), fd)
}

pub(super) fn path_unlink_file(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _path: u32,
    _path_len: u32,
) -> i32 {
    denied(env.data(), fd)
}

pub(super) fn sock_accept(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _flags: u32,
    _accepted_fd: u32,
) -> i32 {
    denied(env.data(), fd)
}

pub(super) fn sock_recv(
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

pub(super) fn sock_send(
    env: FunctionEnvMut<'_, WasiCtx>,
    fd: u32,
    _si_data: u32,
    _si_data_len: u32,
    _si_flags: u32,
    _so_datalen: u32,
) -> i32 {
    denied(env.data(), fd)
}

pub(super) fn sock_shutdown(env: FunctionEnvMut<'_, WasiCtx>, fd: u32, _how: u32) -> i32 {
    denied(env.data(), fd)
}
