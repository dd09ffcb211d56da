//! The page client: how a forked child fetches its parent's pages from the page server.
//!
//! One [`PageClient`] is one authenticated connection for one image. It trusts nothing the
//! server says beyond what it can check: `Welcome` must agree with the descriptor the child
//! was forked from, and every `Pages` answer must be for exactly the range asked. Every
//! round trip runs against the client's timeout, so a parent that dies — or a machine that
//! vanishes without a reset — gives the child an error, never a hang. Any failure leaves
//! the connection unusable (the stream may be mid-frame); the caller reconnects.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use proto::ImageDescriptor;
use proto::image::ImageDescriptorError;
use proto::pages::{
    Frame, FrameError, MAX_READ_PAGES, PAGE_SIZE, PROTOCOL_VERSION, QpInfo, RDMA_VERSION,
    RandomnessError, RefuseReason, RegionInfo, fresh_nonce, proof, read_frame, write_frame,
};

use crate::lifecycle::{Live, Resource};
use crate::server::frame_name;
use crate::wire::{Timed, is_timeout};

const PAGE: usize = PAGE_SIZE as usize;

/// Where in the conversation something went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Connect,
    Handshake,
    Read,
    /// `RdmaConnect` and its answer.
    RdmaSetup,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Connect => "connect",
            Step::Handshake => "handshake",
            Step::Read => "read",
            Step::RdmaSetup => "RDMA set-up",
        })
    }
}

/// Why a page fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the image descriptor cannot be used: {0}")]
    BadDescriptor(#[from] ImageDescriptorError),
    #[error("connecting to the page server at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("the page server refused during {during} ({reason:?}): {message}")]
    Refused {
        during: Step,
        reason: RefuseReason,
        message: String,
    },
    /// The parent closed or reset the connection: it died, or shut its server down.
    #[error("lost the connection to the page server during {during}: {source}")]
    ConnectionLost {
        during: Step,
        #[source]
        source: io::Error,
    },
    #[error("the page server did not answer within {after:?} during {during}")]
    Timeout { during: Step, after: Duration },
    #[error("the page server broke the protocol during {during}: {violation}")]
    Protocol { during: Step, violation: Violation },
    #[error(
        "cannot read {count} pages from page {first_page} into {dst_len} bytes of a {pages}-page memory (at most {MAX_READ_PAGES} pages per read)"
    )]
    InvalidRead {
        first_page: u32,
        count: u32,
        dst_len: usize,
        pages: u64,
    },
    #[error("the connection is unusable after an earlier error; reconnect")]
    Unusable,
    #[error(transparent)]
    Randomness(#[from] RandomnessError),
}

/// What the server did that it must not.
#[derive(Debug, thiserror::Error)]
pub enum Violation {
    #[error("expected {expected}, got a {got} frame")]
    UnexpectedFrame {
        expected: &'static str,
        got: &'static str,
    },
    #[error(
        "Welcome offers {memory_bytes} bytes in {page_size}-byte pages; the descriptor says {expected_bytes} in {expected_page_size}"
    )]
    WelcomeMismatch {
        memory_bytes: u64,
        page_size: u32,
        expected_bytes: u64,
        expected_page_size: u32,
    },
    #[error("asked for {count} pages from {first_page}, got {got_count} from {got_first}")]
    WrongRange {
        first_page: u32,
        count: u32,
        got_first: u32,
        got_count: u32,
    },
    #[error("malformed frame: {0}")]
    Malformed(FrameError),
}

/// The page server's answer to [`PageClient::rdma_connect`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RdmaAnswer {
    /// The parent's queue pair, ready to answer READs, and the image's registered region.
    /// The connection is now that queue pair's control channel: keep the client open while
    /// reading, and drop it to disconnect.
    Accept { qp: QpInfo, region: RegionInfo },
    /// The parent serves no RDMA, and why; the connection still serves `read`s.
    Unavailable(String),
}

/// A client's traffic so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Bytes read off the connection, frame headers and handshake included.
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// Pages delivered by reads, zero pages included.
    pub pages: u64,
    /// Of `pages`, those that came as a zero-map bit.
    pub zero_pages: u64,
    /// `Read`/`Pages` exchanges.
    pub round_trips: u64,
}

/// An authenticated connection to a parent's page server, for one image.
pub struct PageClient {
    stream: TcpStream,
    parent: SocketAddr,
    handle: u64,
    pages: u64,
    timeout: Duration,
    stats: ClientStats,
    broken: bool,
    _live: Live,
}

impl PageClient {
    /// Connects to `descriptor.parent` and proves the descriptor's key. `timeout` bounds the
    /// TCP connect and the handshake, and later each [`read`](Self::read).
    pub fn connect(descriptor: &ImageDescriptor, timeout: Duration) -> Result<Self, ClientError> {
        descriptor.validate()?;
        let parent = descriptor.parent;
        let stream = TcpStream::connect_timeout(&parent, timeout).map_err(|e| {
            if is_timeout(&e) {
                ClientError::Timeout {
                    during: Step::Connect,
                    after: timeout,
                }
            } else {
                ClientError::Connect {
                    addr: parent,
                    source: e,
                }
            }
        })?;
        let _ = stream.set_nodelay(true);
        let mut client = PageClient {
            stream,
            parent,
            handle: descriptor.handle,
            pages: descriptor.page_count(),
            timeout,
            stats: ClientStats::default(),
            broken: false,
            _live: Live::new(Resource::ClientConnection),
        };
        client.handshake(descriptor)?;
        Ok(client)
    }

    fn handshake(&mut self, d: &ImageDescriptor) -> Result<(), ClientError> {
        let step = Step::Handshake;
        let client_nonce = fresh_nonce::<16>()?;
        let mut t = Timed::within(&self.stream, self.timeout);
        let res = (|| {
            send(
                &mut t,
                &Frame::Hello {
                    version: PROTOCOL_VERSION,
                    handle: d.handle,
                    client_nonce,
                },
                step,
                self.timeout,
            )?;
            let server_nonce = match recv(&mut t, step, self.timeout)? {
                Frame::Challenge { server_nonce } => server_nonce,
                other => return Err(unexpected(step, "Challenge", other)),
            };
            let mac = proof(&d.key, d.handle, &server_nonce, &client_nonce);
            send(&mut t, &Frame::Proof { mac }, step, self.timeout)?;
            match recv(&mut t, step, self.timeout)? {
                Frame::Welcome {
                    memory_bytes,
                    page_size,
                } if memory_bytes == d.memory_bytes && page_size == d.page_size => Ok(()),
                Frame::Welcome {
                    memory_bytes,
                    page_size,
                } => Err(ClientError::Protocol {
                    during: step,
                    violation: Violation::WelcomeMismatch {
                        memory_bytes,
                        page_size,
                        expected_bytes: d.memory_bytes,
                        expected_page_size: d.page_size,
                    },
                }),
                other => Err(unexpected(step, "Welcome", other)),
            }
        })();
        self.stats.bytes_received += t.read;
        self.stats.bytes_sent += t.written;
        if res.is_err() {
            self.broken = true;
        }
        res
    }

    /// Fetches pages `first_page .. first_page + count` (`count` in `1..=MAX_READ_PAGES`)
    /// into `dst`, which must be exactly `count` pages long; zero pages come out as zeros.
    /// One round trip.
    pub fn read(&mut self, first_page: u32, count: u32, dst: &mut [u8]) -> Result<(), ClientError> {
        let in_range = u64::from(first_page) + u64::from(count) <= self.pages;
        if !(1..=MAX_READ_PAGES).contains(&count) || !in_range || dst.len() != count as usize * PAGE
        {
            return Err(ClientError::InvalidRead {
                first_page,
                count,
                dst_len: dst.len(),
                pages: self.pages,
            });
        }
        if self.broken {
            return Err(ClientError::Unusable);
        }
        let mut t = Timed::within(&self.stream, self.timeout);
        let res = exchange(&mut t, first_page, count, dst, self.timeout);
        self.stats.bytes_received += t.read;
        self.stats.bytes_sent += t.written;
        match res {
            Ok(zeros) => {
                self.stats.round_trips += 1;
                self.stats.pages += u64::from(count);
                self.stats.zero_pages += u64::from(zeros);
                Ok(())
            }
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    /// Asks for the image's metadata (an encoded `proto::ImageMeta`, decoded by the caller).
    pub fn meta(&mut self) -> Result<Vec<u8>, ClientError> {
        if self.broken {
            return Err(ClientError::Unusable);
        }
        let step = Step::Read;
        let mut t = Timed::within(&self.stream, self.timeout);
        let res = send(&mut t, &Frame::MetaRequest, step, self.timeout)
            .and_then(|()| recv(&mut t, step, self.timeout));
        self.stats.bytes_received += t.read;
        self.stats.bytes_sent += t.written;
        match res {
            Ok(Frame::Meta { bytes }) => {
                self.stats.round_trips += 1;
                Ok(bytes)
            }
            Ok(other) => {
                self.broken = true;
                Err(unexpected(step, "Meta", other))
            }
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    /// Asks the parent for RDMA READ of the image, offering the child's queue pair `qp`
    /// (in INIT; the child moves it to RTR/RTS towards the answer's). One round trip. An
    /// `Unavailable` answer leaves the connection serving reads; any error leaves it unusable.
    pub fn rdma_connect(&mut self, qp: QpInfo) -> Result<RdmaAnswer, ClientError> {
        if self.broken {
            return Err(ClientError::Unusable);
        }
        let step = Step::RdmaSetup;
        let mut t = Timed::within(&self.stream, self.timeout);
        let res = send(
            &mut t,
            &Frame::RdmaConnect {
                version: RDMA_VERSION,
                qp,
            },
            step,
            self.timeout,
        )
        .and_then(|()| recv(&mut t, step, self.timeout));
        self.stats.bytes_received += t.read;
        self.stats.bytes_sent += t.written;
        let answer = match res {
            Ok(Frame::RdmaAccept { qp, region }) => Ok(RdmaAnswer::Accept { qp, region }),
            Ok(Frame::RdmaUnavailable { reason }) => Ok(RdmaAnswer::Unavailable(reason)),
            Ok(other) => Err(unexpected(step, "RdmaAccept or RdmaUnavailable", other)),
            Err(e) => Err(e),
        };
        match answer {
            Ok(a) => {
                self.stats.round_trips += 1;
                Ok(a)
            }
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    /// Says `Bye` and closes.
    pub fn close(mut self) -> Result<(), ClientError> {
        self.bye()
    }

    fn bye(&mut self) -> Result<(), ClientError> {
        if self.broken {
            return Ok(());
        }
        self.broken = true;
        let mut t = Timed::within(&self.stream, self.timeout);
        let res = send(&mut t, &Frame::Bye, Step::Read, self.timeout);
        self.stats.bytes_sent += t.written;
        let _ = self.stream.shutdown(Shutdown::Both);
        res
    }

    pub fn stats(&self) -> ClientStats {
        self.stats
    }

    pub fn handle(&self) -> u64 {
        self.handle
    }

    pub fn parent(&self) -> SocketAddr {
        self.parent
    }

    /// Pages in the image's memory.
    pub fn page_count(&self) -> u64 {
        self.pages
    }

    /// False once an error made the connection unusable (or after `close`).
    pub fn is_usable(&self) -> bool {
        !self.broken
    }
}

impl Drop for PageClient {
    fn drop(&mut self) {
        // A few bytes into an idle socket's buffer: does not block.
        let _ = self.bye();
    }
}

/// One `Read` → `Pages` exchange; returns how many pages were zero.
fn exchange(
    t: &mut Timed<'_>,
    first_page: u32,
    count: u32,
    dst: &mut [u8],
    timeout: Duration,
) -> Result<u32, ClientError> {
    let step = Step::Read;
    send(t, &Frame::Read { first_page, count }, step, timeout)?;
    let frame = recv(t, step, timeout)?;
    let (got_first, got_count) = match &frame {
        Frame::Pages {
            first_page, count, ..
        } => (*first_page, *count),
        _ => return Err(unexpected(step, "Pages", frame)),
    };
    if (got_first, got_count) != (first_page, count) {
        return Err(ClientError::Protocol {
            during: step,
            violation: Violation::WrongRange {
                first_page,
                count,
                got_first,
                got_count,
            },
        });
    }
    // `read_frame` checked the frame, so the iterator exists and covers the range.
    let Some(pages) = frame.page_iter() else {
        return Err(unexpected(step, "Pages", frame));
    };
    let mut zeros = 0;
    for ((_, data), out) in pages.zip(dst.chunks_exact_mut(PAGE)) {
        match data {
            Some(data) => out.copy_from_slice(data),
            None => {
                out.fill(0);
                zeros += 1;
            }
        }
    }
    Ok(zeros)
}

fn send(
    t: &mut Timed<'_>,
    frame: &Frame,
    during: Step,
    after: Duration,
) -> Result<(), ClientError> {
    write_frame(t, frame).map_err(|e| frame_error(e, during, after))
}

/// Reads a server frame; `Refused` becomes [`ClientError::Refused`].
fn recv(t: &mut Timed<'_>, during: Step, after: Duration) -> Result<Frame, ClientError> {
    match read_frame(t).map_err(|e| frame_error(e, during, after))? {
        Frame::Refused { reason, message } => Err(ClientError::Refused {
            during,
            reason,
            message,
        }),
        f => Ok(f),
    }
}

fn frame_error(e: FrameError, during: Step, after: Duration) -> ClientError {
    match e {
        FrameError::Io(e) if is_timeout(&e) => ClientError::Timeout { during, after },
        FrameError::Io(source) => ClientError::ConnectionLost { during, source },
        FrameError::Closed => ClientError::ConnectionLost {
            during,
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the page server closed the connection",
            ),
        },
        other => ClientError::Protocol {
            during,
            violation: Violation::Malformed(other),
        },
    }
}

fn unexpected(during: Step, expected: &'static str, got: Frame) -> ClientError {
    ClientError::Protocol {
        during,
        violation: Violation::UnexpectedFrame {
            expected,
            got: frame_name(&got),
        },
    }
}
