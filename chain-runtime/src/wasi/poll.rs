//! `poll_oneoff`: clock sleeps, stdio readiness and files (always ready to read).

use std::time::{Duration, Instant};

use nix::time::ClockId;

use super::clocks::{CLOCK_MONOTONIC, CLOCK_REALTIME, clock_now, host_clock};
use super::errno::*;
use super::memory::Mem;
use super::{Errno, Flavor, MAX_POLL_SLEEP, WasiCtx};

pub(super) const EVENTTYPE_CLOCK: u8 = 0;
pub(super) const EVENTTYPE_FD_READ: u8 = 1;
pub(super) const EVENTTYPE_FD_WRITE: u8 = 2;
const EVENT_SIZE: u64 = 32;
const SUBCLOCK_ABSTIME: u16 = 1;
const EVENT_FD_READWRITE_HANGUP: u16 = 1;

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
        EVENTTYPE_FD_READ | EVENTTYPE_FD_WRITE
            if !super::stdio::is_stdio(mem.read_u32(at + 16)?) =>
        {
            let fd = mem.read_u32(at + 16)?;
            // A regular file is always ready to read (what is left of it); none is writable.
            let ready = match tag {
                EVENTTYPE_FD_READ => ctx.files.readable(fd),
                _ => ctx.files.write(fd).map(|()| 0),
            };
            match ready {
                Ok(nbytes) => Readiness::Now {
                    error: SUCCESS,
                    kind: tag,
                    nbytes,
                    flags: 0,
                },
                Err(e) => now(e, tag),
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
        realtime: clock_now(ClockId::CLOCK_REALTIME)?,
        monotonic: clock_now(ClockId::CLOCK_MONOTONIC)?,
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

host_fns! {
    poll_oneoff(subs: u32, events: u32, nsubs: u32, nevents: u32) |ctx, mem|
        poll_impl(ctx, mem, Flavor::Preview1, subs, events, nsubs, nevents);
    poll_oneoff_unstable(subs: u32, events: u32, nsubs: u32, nevents: u32) |ctx, mem|
        poll_impl(ctx, mem, Flavor::Unstable, subs, events, nsubs, nevents);
}
