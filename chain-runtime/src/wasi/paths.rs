//! The `path_*` calls and the fd calls that only files have (listing, syncing, advice,
//! resizing, renumbering): on the preopened directories and what was opened beneath them
//! ([`super::fs`]), read-only. Stdio has none of their rights (`NOTCAPABLE`).

use super::errno::*;
use super::memory::Mem;
use super::stdio::is_stdio;
use super::{Errno, Flavor, WasiCtx};

/// On a stdio fd, NOTCAPABLE (BADF once closed); on any other, what `f` says of it.
fn on_file<T>(
    ctx: &WasiCtx,
    fd: u32,
    f: impl FnOnce(&super::fs::FdTable) -> Result<T, Errno>,
) -> Result<T, Errno> {
    if is_stdio(fd) {
        ctx.open_stdio(fd)?;
        return Err(NOTCAPABLE);
    }
    f(&ctx.files)
}

/// A call that would change the directories `a` and `b` name.
fn mutate2(ctx: &WasiCtx, a: u32, b: u32) -> Result<(), Errno> {
    for fd in [a, b] {
        if is_stdio(fd) {
            ctx.open_stdio(fd)?;
        } else if !ctx.files.contains(fd) {
            return Err(BADF);
        }
    }
    if is_stdio(a) || is_stdio(b) {
        return Err(NOTCAPABLE);
    }
    match (ctx.files.mutate(a), ctx.files.mutate(b)) {
        (Err(NOTDIR), _) | (_, Err(NOTDIR)) => Err(NOTDIR),
        (e, _) => e,
    }
}

fn renumber(ctx: &mut WasiCtx, from: u32, to: u32) -> Result<(), Errno> {
    if is_stdio(from) || is_stdio(to) {
        // Stdio stays where it is: its closed state is tracked by number (snapshots).
        for fd in [from, to] {
            if is_stdio(fd) {
                ctx.open_stdio(fd)?;
            } else if !ctx.files.contains(fd) {
                return Err(BADF);
            }
        }
        return Err(NOTCAPABLE);
    }
    ctx.files.renumber(from, to)
}

#[allow(clippy::too_many_arguments)]
fn path_open_impl(
    ctx: &mut WasiCtx,
    mem: &Mem<'_>,
    fd: u32,
    lookup: u32,
    path: u32,
    path_len: u32,
    oflags: u32,
    base: u64,
    inheriting: u64,
    fdflags: u32,
    opened: u32,
) -> Result<(), Errno> {
    if is_stdio(fd) {
        ctx.open_stdio(fd)?;
        return Err(NOTCAPABLE);
    }
    ctx.files.path_open(
        mem, fd, lookup, path, path_len, oflags, base, inheriting, fdflags, opened,
    )
}

#[allow(clippy::too_many_arguments)]
fn path_filestat_impl(
    ctx: &WasiCtx,
    mem: &Mem<'_>,
    flavor: Flavor,
    fd: u32,
    flags: u32,
    path: u32,
    path_len: u32,
    buf: u32,
) -> Result<(), Errno> {
    on_file(ctx, fd, |t| {
        t.path_filestat_get(mem, flavor, fd, flags, path, path_len, buf)
    })
}

host_fns! {
    fd_advise(fd: u32, _: u64, _: u64, advice: u32) |ctx| on_file(ctx, fd, |t| t.advise(fd, advice));
    fd_allocate(fd: u32, _: u64, _: u64) |ctx| on_file(ctx, fd, |t| t.resize(fd));
    fd_datasync(fd: u32) |ctx| on_file(ctx, fd, |t| t.sync(fd));
    fd_sync(fd: u32) |ctx| on_file(ctx, fd, |t| t.sync(fd));
    fd_filestat_set_size(fd: u32, _: u64) |ctx| on_file(ctx, fd, |t| t.resize(fd));
    fd_filestat_set_times(fd: u32, _: u64, _: u64, _: u32) |ctx|
        on_file(ctx, fd, |t| t.sync(fd).and(Err(ROFS)));
    fd_readdir(fd: u32, buf: u32, buf_len: u32, cookie: u64, used: u32) |ctx, mem|
        on_file(ctx, fd, |t| t.readdir(mem, fd, buf, buf_len, cookie, used));
    fd_renumber(fd: u32, to: u32) |ctx| renumber(ctx, fd, to);
    path_create_directory(fd: u32, _: u32, _: u32) |ctx| on_file(ctx, fd, |t| t.mutate(fd));
    path_filestat_get(fd: u32, flags: u32, path: u32, path_len: u32, buf: u32) |ctx, mem|
        path_filestat_impl(ctx, mem, Flavor::Preview1, fd, flags, path, path_len, buf);
    path_filestat_get_unstable(fd: u32, flags: u32, path: u32, path_len: u32, buf: u32) |ctx, mem|
        path_filestat_impl(ctx, mem, Flavor::Unstable, fd, flags, path, path_len, buf);
    path_filestat_set_times(fd: u32, _: u32, _: u32, _: u32, _: u64, _: u64, _: u32) |ctx|
        on_file(ctx, fd, |t| t.mutate(fd));
    path_link(old_fd: u32, _: u32, _: u32, _: u32, new_fd: u32, _: u32, _: u32) |ctx|
        mutate2(ctx, old_fd, new_fd);
    path_open(fd: u32, lookup: u32, path: u32, path_len: u32, oflags: u32, base: u64, inheriting: u64, fdflags: u32, opened: u32) |ctx, mem|
        path_open_impl(ctx, mem, fd, lookup, path, path_len, oflags, base, inheriting, fdflags, opened);
    path_readlink(fd: u32, path: u32, path_len: u32, buf: u32, buf_len: u32, used: u32) |ctx, mem|
        on_file(ctx, fd, |t| t.readlink(mem, fd, path, path_len, buf, buf_len, used));
    path_remove_directory(fd: u32, _: u32, _: u32) |ctx| on_file(ctx, fd, |t| t.mutate(fd));
    path_rename(fd: u32, _: u32, _: u32, new_fd: u32, _: u32, _: u32) |ctx| mutate2(ctx, fd, new_fd);
    path_symlink(_: u32, _: u32, fd: u32, _: u32, _: u32) |ctx| on_file(ctx, fd, |t| t.mutate(fd));
    path_unlink_file(fd: u32, _: u32, _: u32) |ctx| on_file(ctx, fd, |t| t.mutate(fd));
}
