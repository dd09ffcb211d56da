//! `args_*` and `environ_*`: the argv and environment given to `WasiCtx::new`, nothing of
//! the host's.

use wasmer::FunctionEnvMut;

use super::errno::*;
use super::memory::{Mem, with_mem};
use super::{Errno, HostResult, WasiCtx, code};

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

pub(super) fn args_sizes_get(
    mut env: FunctionEnvMut<'_, WasiCtx>,
    argc: u32,
    buf_size: u32,
) -> HostResult {
    with_mem(&mut env, |ctx, mem| {
        code(strings_sizes(mem, &ctx.args, argc, buf_size))
    })
}

pub(super) fn args_get(mut env: FunctionEnvMut<'_, WasiCtx>, argv: u32, buf: u32) -> HostResult {
    with_mem(&mut env, |ctx, mem| {
        code(strings_get(mem, &ctx.args, argv, buf))
    })
}

pub(super) fn environ_sizes_get(
    mut env: FunctionEnvMut<'_, WasiCtx>,
    count: u32,
    buf_size: u32,
) -> HostResult {
    with_mem(&mut env, |ctx, mem| {
        code(strings_sizes(mem, &ctx.env, count, buf_size))
    })
}

pub(super) fn environ_get(
    mut env: FunctionEnvMut<'_, WasiCtx>,
    environ: u32,
    buf: u32,
) -> HostResult {
    with_mem(&mut env, |ctx, mem| {
        code(strings_get(mem, &ctx.env, environ, buf))
    })
}
