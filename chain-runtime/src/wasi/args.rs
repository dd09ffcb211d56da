//! `args_*` and `environ_*`: the argv and environment given to `WasiCtx::new`, nothing of
//! the host's.

use super::Errno;
use super::errno::*;
use super::memory::Mem;

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

host_fns! {
    args_sizes_get(argc: u32, buf_size: u32) |ctx, mem|
        strings_sizes(mem, &ctx.args, argc, buf_size);
    args_get(argv: u32, buf: u32) |ctx, mem| strings_get(mem, &ctx.args, argv, buf);
    environ_sizes_get(count: u32, buf_size: u32) |ctx, mem|
        strings_sizes(mem, &ctx.env, count, buf_size);
    environ_get(environ: u32, buf: u32) |ctx, mem| strings_get(mem, &ctx.env, environ, buf);
}
