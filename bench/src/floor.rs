//! The floor for one hop: two processes ping-ponging 32 bytes (a descriptor's size) over
//! loopback TCP and over a Unix socketpair, with blocking reads and with reads that spin on
//! a non-blocking socket. A chain hop cannot be cheaper than one such one-way trip (a write,
//! a wake-up and a read), so the hops mode reports its per-hop slope beside this floor,
//! measured in the same run under the same background load.
//!
//! The echo side is a forked child that only calls `read`, `write` and `_exit` on a socket
//! it inherited: no exec, no allocation, nothing but system calls after the fork, so forking
//! from the multi-threaded bench process is sound, and what is measured is the kernel's
//! path and the wake-up, not a runtime.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use hdrhistogram::Histogram;
use nix::libc;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork};
use serde::{Deserialize, Serialize};

/// The message: one descriptor.
pub const MESSAGE_BYTES: usize = 32;
/// Round trips before the measured ones (caches, the scheduler's placement).
const WARMUP_ROUND_TRIPS: usize = 1000;

/// Which socket and how the readers wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FloorVariant {
    /// `tcp` (loopback, TCP_NODELAY) or `unix` (socketpair, SOCK_STREAM).
    pub transport: Transport,
    /// Both sides spin on a non-blocking read (`true`) or block in `read` (`false`).
    pub spinning: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Unix,
}

impl FloorVariant {
    /// Blocking first (the one comparable to a worker, which blocks), then spinning.
    pub const ALL: [FloorVariant; 4] = [
        FloorVariant {
            transport: Transport::Tcp,
            spinning: false,
        },
        FloorVariant {
            transport: Transport::Unix,
            spinning: false,
        },
        FloorVariant {
            transport: Transport::Tcp,
            spinning: true,
        },
        FloorVariant {
            transport: Transport::Unix,
            spinning: true,
        },
    ];

    pub fn label(&self) -> String {
        let t = match self.transport {
            Transport::Tcp => "loopback TCP",
            Transport::Unix => "Unix socketpair",
        };
        format!(
            "{t}, {}",
            if self.spinning {
                "spinning"
            } else {
                "blocking"
            }
        )
    }
}

/// One variant's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FloorSample {
    pub round_trips: usize,
    /// One-way latency (round trip / 2), µs.
    pub one_way_p50_us: f64,
    pub one_way_p99_us: f64,
    pub one_way_mean_us: f64,
}

/// Measures `round_trips` 32-byte round trips of `variant` against a forked echo process.
pub fn ping_pong(variant: FloorVariant, round_trips: usize) -> io::Result<FloorSample> {
    let (mine, theirs) = socket_pair(variant.transport)?;
    if variant.spinning {
        set_nonblocking(mine.as_raw_fd())?;
        set_nonblocking(theirs.as_raw_fd())?;
    }
    let total = WARMUP_ROUND_TRIPS + round_trips;
    // SAFETY: the child runs only `echo`, which makes async-signal-safe system calls (prctl,
    // read, write, _exit) on a descriptor it owns and touches no lock or allocator, so the
    // state other threads held at the fork cannot be observed.
    let child = match unsafe { fork() }.map_err(io::Error::from)? {
        ForkResult::Child => echo(theirs.as_raw_fd(), mine.as_raw_fd(), total),
        ForkResult::Parent { child } => child,
    };
    drop(theirs);
    let result = drive(mine.as_raw_fd(), total, variant.spinning);
    // On success the child has echoed `total` messages and exits on its own; on failure stop it.
    drop(mine);
    if result.is_err() {
        let _ = kill(child, Signal::SIGKILL);
    }
    let status = waitpid(child, None).map_err(io::Error::from)?;
    let histogram = result?;
    if status != WaitStatus::Exited(child, 0) {
        return Err(io::Error::other(format!(
            "the echo process ended with {status:?}"
        )));
    }
    let half = |ns: u64| ns as f64 / 2.0 / 1000.0;
    Ok(FloorSample {
        round_trips,
        one_way_p50_us: half(histogram.value_at_quantile(0.5)),
        one_way_p99_us: half(histogram.value_at_quantile(0.99)),
        one_way_mean_us: histogram.mean() / 2.0 / 1000.0,
    })
}

fn socket_pair(transport: Transport) -> io::Result<(OwnedFd, OwnedFd)> {
    match transport {
        Transport::Tcp => {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let client = TcpStream::connect(listener.local_addr()?)?;
            let (server, _) = listener.accept()?;
            // Without it Nagle holds the second of two small writes for the delayed ACK.
            client.set_nodelay(true)?;
            server.set_nodelay(true)?;
            Ok((OwnedFd::from(client), OwnedFd::from(server)))
        }
        Transport::Unix => {
            let (a, b) = UnixStream::pair()?;
            Ok((OwnedFd::from(a), OwnedFd::from(b)))
        }
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor this function's caller owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes; spins on EAGAIN when the socket is non-blocking.
/// Returns false on EOF or error. Only system calls: it also runs in the forked child.
fn read_full(fd: RawFd, buf: &mut [u8]) -> bool {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: reads into the unfilled tail of `buf`, whose length bounds the count.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n > 0 {
            got += n as usize;
        } else if n == 0 {
            return false;
        } else {
            // (last_os_error only reads errno: no allocation, fine in the child.)
            let errno = io::Error::last_os_error().raw_os_error();
            if errno != Some(libc::EAGAIN) && errno != Some(libc::EINTR) {
                return false;
            }
            std::hint::spin_loop();
        }
    }
    true
}

/// Writes all of `buf` (spinning on EAGAIN). Only system calls, as [`read_full`].
fn write_full(fd: RawFd, buf: &[u8]) -> bool {
    let mut put = 0;
    while put < buf.len() {
        // SAFETY: writes from the unsent tail of `buf`, whose length bounds the count.
        let n = unsafe { libc::write(fd, buf[put..].as_ptr().cast(), buf.len() - put) };
        if n > 0 {
            put += n as usize;
        } else {
            let errno = io::Error::last_os_error().raw_os_error();
            if n == 0 || (errno != Some(libc::EAGAIN) && errno != Some(libc::EINTR)) {
                return false;
            }
            std::hint::spin_loop();
        }
    }
    true
}

/// The forked child: echo `count` messages, then exit. Never returns.
fn echo(fd: RawFd, parents_end: RawFd, count: usize) -> ! {
    // SAFETY: prctl, close, read, write and _exit are plain system calls, async-signal-safe;
    // the buffer is on this stack. PDEATHSIG: if the bench dies mid-measurement, so does this.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        // The parent's end, inherited: closing it lets the parent's drop give us EOF.
        libc::close(parents_end);
    }
    let mut buf = [0u8; MESSAGE_BYTES];
    let mut code = 0;
    for _ in 0..count {
        if !read_full(fd, &mut buf) || !write_full(fd, &buf) {
            code = 1;
            break;
        }
    }
    // SAFETY: ends the child without running the parent's atexit handlers or destructors.
    unsafe { libc::_exit(code) }
}

fn drive(fd: RawFd, total: usize, spinning: bool) -> io::Result<Histogram<u64>> {
    // Nanoseconds, 1 ns to 10 s, 3 significant digits.
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let mut message = [0u8; MESSAGE_BYTES];
    let mut reply = [0u8; MESSAGE_BYTES];
    for i in 0..total {
        message[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let sent = Instant::now();
        if !write_full(fd, &message) || !read_full(fd, &mut reply) {
            return Err(io::Error::other(format!(
                "ping-pong ({}) broke after {i} round trips",
                if spinning { "spinning" } else { "blocking" }
            )));
        }
        let rtt = sent.elapsed();
        if reply != message {
            return Err(io::Error::other(
                "the echo process answered different bytes",
            ));
        }
        if i >= WARMUP_ROUND_TRIPS {
            histogram.saturating_record(u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX).max(1));
        }
    }
    Ok(histogram)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_every_variant_and_leaves_no_child() {
        for variant in FloorVariant::ALL {
            let s = ping_pong(variant, 2000).unwrap();
            assert_eq!(s.round_trips, 2000);
            // A loopback round trip is microseconds; 0 or seconds would mean a broken clock
            // or a measurement of something else.
            assert!(
                s.one_way_p50_us > 0.1 && s.one_way_p50_us < 5000.0,
                "{}: {s:?}",
                variant.label()
            );
            assert!(s.one_way_p99_us >= s.one_way_p50_us, "{s:?}");
        }
        // ping_pong reaps its echo child and fails unless it exited 0 after echoing all.
    }
}
