//! Denied: filesystem, sockets and fd operations needing rights we never grant. The
//! signatures are still exact, so that the imports link.

use super::errno::*;
use super::{Errno, WasiCtx};

/// The stdio fds exist but lack the needed right. Any other fd doesn't exist.
fn denied(ctx: &WasiCtx, fd: u32) -> Result<(), Errno> {
    ctx.open_stdio(fd)?;
    Err(NOTCAPABLE)
}

fn denied2(ctx: &WasiCtx, a: u32, b: u32) -> Result<(), Errno> {
    if ctx.open_stdio(a).is_err() || ctx.open_stdio(b).is_err() {
        Err(BADF)
    } else {
        Err(NOTCAPABLE)
    }
}

host_fns! {
    fd_advise(fd: u32, _: u64, _: u64, _: u32) |ctx| denied(ctx, fd);
    fd_allocate(fd: u32, _: u64, _: u64) |ctx| denied(ctx, fd);
    fd_datasync(fd: u32) |ctx| denied(ctx, fd);
    fd_sync(fd: u32) |ctx| denied(ctx, fd);
    fd_filestat_set_size(fd: u32, _: u64) |ctx| denied(ctx, fd);
    fd_filestat_set_times(fd: u32, _: u64, _: u64, _: u32) |ctx| denied(ctx, fd);
    fd_readdir(fd: u32, _: u32, _: u32, _: u64, _: u32) |ctx| denied(ctx, fd);
    fd_renumber(fd: u32, to: u32) |ctx| denied2(ctx, fd, to);
    path_create_directory(fd: u32, _: u32, _: u32) |ctx| denied(ctx, fd);
    path_filestat_get(fd: u32, _: u32, _: u32, _: u32, _: u32) |ctx| denied(ctx, fd);
    path_filestat_set_times(fd: u32, _: u32, _: u32, _: u32, _: u64, _: u64, _: u32) |ctx| denied(ctx, fd);
    path_link(old_fd: u32, _: u32, _: u32, _: u32, new_fd: u32, _: u32, _: u32) |ctx| denied2(ctx, old_fd, new_fd);
    path_open(fd: u32, _: u32, _: u32, _: u32, _: u32, _: u64, _: u64, _: u32, _: u32) |ctx| denied(ctx, fd);
    path_readlink(fd: u32, _: u32, _: u32, _: u32, _: u32, _: u32) |ctx| denied(ctx, fd);
    path_remove_directory(fd: u32, _: u32, _: u32) |ctx| denied(ctx, fd);
    path_rename(fd: u32, _: u32, _: u32, new_fd: u32, _: u32, _: u32) |ctx| denied2(ctx, fd, new_fd);
    path_symlink(_: u32, _: u32, fd: u32, _: u32, _: u32) |ctx| denied(ctx, fd);
    path_unlink_file(fd: u32, _: u32, _: u32) |ctx| denied(ctx, fd);
    sock_accept(fd: u32, _: u32, _: u32) |ctx| denied(ctx, fd);
    sock_recv(fd: u32, _: u32, _: u32, _: u32, _: u32, _: u32) |ctx| denied(ctx, fd);
    sock_send(fd: u32, _: u32, _: u32, _: u32, _: u32) |ctx| denied(ctx, fd);
    sock_shutdown(fd: u32, _: u32) |ctx| denied(ctx, fd);
}
