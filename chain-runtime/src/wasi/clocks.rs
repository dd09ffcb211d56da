//! Clocks, randomness, scheduling and process exit: the calls answered by the host kernel
//! rather than by an fd.

use nix::sys::time::TimeSpec;
use nix::time::{ClockId, clock_getres, clock_gettime};
use wasmer::{FunctionEnvMut, RuntimeError};

use super::errno::*;
use super::memory::Mem;
use super::{COPY_CHUNK, Errno, ProcExit, WasiCtx};

pub(super) const CLOCK_REALTIME: u32 = 0;
pub(super) const CLOCK_MONOTONIC: u32 = 1;

pub(super) fn host_clock(id: u32) -> Result<ClockId, Errno> {
    match id {
        0 => Ok(ClockId::CLOCK_REALTIME),
        1 => Ok(ClockId::CLOCK_MONOTONIC),
        2 => Ok(ClockId::CLOCK_PROCESS_CPUTIME_ID),
        3 => Ok(ClockId::CLOCK_THREAD_CPUTIME_ID),
        _ => Err(INVAL),
    }
}

fn timespec_nanos(ts: &TimeSpec) -> Result<u64, Errno> {
    let secs = u64::try_from(ts.tv_sec()).map_err(|_| OVERFLOW)?;
    let nanos = u64::try_from(ts.tv_nsec()).map_err(|_| OVERFLOW)?;
    secs.checked_mul(1_000_000_000)
        .and_then(|n| n.checked_add(nanos))
        .ok_or(OVERFLOW)
}

/// A kernel call that reports on `clock` as a timespec: `clock_gettime` or `clock_getres`.
type ClockQuery = fn(ClockId) -> nix::Result<TimeSpec>;

fn clock_query(query: ClockQuery, clock: ClockId) -> Result<u64, Errno> {
    let ts = query(clock).map_err(|_| IO)?;
    timespec_nanos(&ts)
}

pub(super) fn clock_now(clock: ClockId) -> Result<u64, Errno> {
    clock_query(clock_gettime, clock)
}

fn clock_resolution(clock: ClockId) -> Result<u64, Errno> {
    clock_query(clock_getres, clock)
}

fn fill_random(buf: &mut [u8]) -> Result<(), Errno> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid, writable slice, and getrandom writes at most
        // `rest.len()` bytes into it. Raw libc because nix has no getrandom binding.
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

fn random_into(mem: &Mem<'_>, buf: u32, len: u32) -> Result<(), Errno> {
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
}

host_fns! {
    clock_res_get(id: u32, res: u32) |_, mem|
        host_clock(id).and_then(clock_resolution).and_then(|r| mem.write_u64(res, r));
    clock_time_get(id: u32, _: u64, time: u32) |_, mem|
        host_clock(id).and_then(clock_now).and_then(|t| mem.write_u64(time, t));
    random_get(buf: u32, len: u32) |_, mem| random_into(mem, buf, len);
    sched_yield() |_| {
        std::thread::yield_now();
        Ok(())
    };
    /// Guests have no signals to deliver and no handlers to run.
    proc_raise(_: u32) |_| Err(NOSYS);
}

pub(super) fn proc_exit(
    mut env: FunctionEnvMut<'_, WasiCtx>,
    exit_code: u32,
) -> Result<(), RuntimeError> {
    env.data_mut().exit_code = Some(exit_code);
    Err(RuntimeError::user(Box::new(ProcExit(exit_code))))
}
