//! Socket I/O bounded by a deadline, shared by the page server and the page client.
//!
//! A socket timeout bounds one `read` or `write` call, not a frame: a peer that trickles one
//! byte per timeout would hold the other side for ever. [`Timed`] re-arms the timeout with
//! what is left of a deadline before every call, so a whole frame (or handshake) takes at
//! most until the deadline, whatever the peer does.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A stream whose reads and writes fail with `TimedOut` once `deadline` has passed; counts
/// the bytes that moved.
pub(crate) struct Timed<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
    pub(crate) read: u64,
    pub(crate) written: u64,
}

impl<'a> Timed<'a> {
    pub(crate) fn new(stream: &'a TcpStream, deadline: Instant) -> Self {
        Timed {
            stream,
            deadline,
            read: 0,
            written: 0,
        }
    }

    pub(crate) fn within(stream: &'a TcpStream, timeout: Duration) -> Self {
        Timed::new(stream, deadline_after(timeout))
    }

    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            // The socket API takes a zero timeout as "none"; past the deadline means stop.
            return Err(io::ErrorKind::TimedOut.into());
        }
        Ok(left)
    }
}

/// `now + timeout`, saturating far in the future instead of overflowing.
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        let n = (&*self.stream).read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

impl Write for Timed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        let n = (&*self.stream).write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Whether an I/O error means the deadline (or a socket timeout) ran out: an expired
/// `SO_RCVTIMEO`/`SO_SNDTIMEO` shows up as `EAGAIN`.
pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}
