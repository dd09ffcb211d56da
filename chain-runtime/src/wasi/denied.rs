//! Denied: sockets. The signatures are still exact, so that the imports link.

use super::errno::*;
use super::stdio::is_stdio;
use super::{Errno, WasiCtx};

/// Stdio and files exist but are no sockets: they lack every socket right. Any other fd
/// doesn't exist.
fn denied(ctx: &WasiCtx, fd: u32) -> Result<(), Errno> {
    if is_stdio(fd) {
        ctx.open_stdio(fd)?;
    } else if !ctx.files.contains(fd) {
        return Err(BADF);
    }
    Err(NOTCAPABLE)
}

host_fns! {
    sock_accept(fd: u32, _: u32, _: u32) |ctx| denied(ctx, fd);
    sock_recv(fd: u32, _: u32, _: u32, _: u32, _: u32, _: u32) |ctx| denied(ctx, fd);
    sock_send(fd: u32, _: u32, _: u32, _: u32, _: u32) |ctx| denied(ctx, fd);
    sock_shutdown(fd: u32, _: u32) |ctx| denied(ctx, fd);
}
