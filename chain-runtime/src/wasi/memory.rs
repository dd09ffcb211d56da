//! Guest memory access. Every pointer and length from the guest goes through `Mem`, so a bad
//! one becomes `FAULT` instead of a host panic.

use wasmer::{FunctionEnvMut, MemoryView, RuntimeError};

use super::errno::*;
use super::{Errno, IOV_MAX, WasiCtx};

/// Bounds-checked guest memory. Any failure is `FAULT` for the guest.
pub(super) struct Mem<'a> {
    view: MemoryView<'a>,
}

impl Mem<'_> {
    pub(super) fn check(&self, addr: impl Into<u64>, len: impl Into<u64>) -> Result<(), Errno> {
        match addr.into().checked_add(len.into()) {
            Some(end) if end <= self.view.data_size() => Ok(()),
            _ => Err(FAULT),
        }
    }

    pub(super) fn read(&self, addr: impl Into<u64>, buf: &mut [u8]) -> Result<(), Errno> {
        self.view.read(addr.into(), buf).map_err(|_| FAULT)
    }

    pub(super) fn write(&self, addr: impl Into<u64>, data: &[u8]) -> Result<(), Errno> {
        self.view.write(addr.into(), data).map_err(|_| FAULT)
    }

    fn bytes<const N: usize>(&self, addr: u64) -> Result<[u8; N], Errno> {
        let mut buf = [0u8; N];
        self.read(addr, &mut buf)?;
        Ok(buf)
    }

    pub(super) fn read_u8(&self, addr: u64) -> Result<u8, Errno> {
        Ok(self.bytes::<1>(addr)?[0])
    }

    pub(super) fn read_u16(&self, addr: u64) -> Result<u16, Errno> {
        Ok(u16::from_le_bytes(self.bytes(addr)?))
    }

    pub(super) fn read_u32(&self, addr: u64) -> Result<u32, Errno> {
        Ok(u32::from_le_bytes(self.bytes(addr)?))
    }

    pub(super) fn read_u64(&self, addr: u64) -> Result<u64, Errno> {
        Ok(u64::from_le_bytes(self.bytes(addr)?))
    }

    pub(super) fn write_u32(&self, addr: u32, value: u32) -> Result<(), Errno> {
        self.write(addr, &value.to_le_bytes())
    }

    pub(super) fn write_u64(&self, addr: u32, value: u64) -> Result<(), Errno> {
        self.write(addr, &value.to_le_bytes())
    }
}

/// Runs `f` with the context and a view of guest memory. A missing memory means the host
/// skipped `set_memory`. That's a host bug, not a guest error, so it traps rather than
/// giving the guest an errno.
pub(super) fn with_mem<R>(
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

pub(super) fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Reads and validates the iovec array (`{ buf: u32, len: u32 }` pairs), returning the
/// buffers to use. All of them are checked up front, so no caller acts on some and then
/// faults. The list stops early rather than let the byte total overflow the u32 count
/// returned to the guest.
pub(super) fn iovecs(mem: &Mem<'_>, iovs: u32, count: u32) -> Result<Vec<(u32, u32)>, Errno> {
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
