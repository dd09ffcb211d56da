//! The connection metadata two nodes swap over the TCP control channel before any RDMA READ:
//! each side's queue-pair address (GID, LID, QP number, starting PSN, path MTU) and, from the
//! parent, the registered region (address, rkey, length).
//!
//! The page server carries the same information in its `RdmaConnect`/`RdmaAccept` frames
//! ([`proto::pages`]), which is how a child and a Spindle parent connect; this exchange is
//! for a bare control stream. Both use the one wire layout of [`QpInfo`] and [`RegionInfo`]
//! defined in `proto::pages`.
//!
//! A frame is `"SPRD" | version u8 | kind u8 | body length u16 BE | body`. Everything read is
//! peer input: lengths are checked before any allocation, every field is range-checked, and a
//! stalled or vanished peer ends in an error within the handshake timeout, never a hang.
//!
//! Order: the child sends [`Frame::ChildHello`], the parent answers [`Frame::ParentHello`];
//! once its queue pair can answer READs the parent sends [`Frame::Ready`].

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub use proto::pages::{QpInfo, RegionInfo};

pub const MAGIC: [u8; 4] = *b"SPRD";
/// The version this build speaks; a peer with another is refused.
pub const VERSION: u8 = 1;
/// The largest body accepted (the real ones are far smaller); checked before reading it.
pub const MAX_BODY: u16 = 256;
/// How long each handshake step may take by default.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

const HEADER: usize = 8;
const KIND_CHILD_HELLO: u8 = 1;
const KIND_PARENT_HELLO: u8 = 2;
const KIND_READY: u8 = 3;
const QP_INFO_LEN: usize = QpInfo::WIRE_LEN;
const REGION_INFO_LEN: usize = RegionInfo::WIRE_LEN;

/// A metadata frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    ChildHello(QpInfo),
    ParentHello(QpInfo, RegionInfo),
    /// The parent's queue pair is in RTS: READs may start.
    Ready,
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::ChildHello(_) => KIND_CHILD_HELLO,
            Frame::ParentHello(..) => KIND_PARENT_HELLO,
            Frame::Ready => KIND_READY,
        }
    }

    /// The frame's bytes, header included.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(QP_INFO_LEN + REGION_INFO_LEN);
        match self {
            Frame::ChildHello(qp) => qp.put(&mut body),
            Frame::ParentHello(qp, region) => {
                qp.put(&mut body);
                region.put(&mut body);
            }
            Frame::Ready => {}
        }
        let mut out = Vec::with_capacity(HEADER + body.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.kind());
        // Bodies are at most QP_INFO_LEN + REGION_INFO_LEN bytes.
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Parses a body of `kind`, checking its length and every field.
    fn decode(kind: u8, body: &[u8]) -> Result<Frame, ExchangeError> {
        let expect = |want: usize| {
            if body.len() == want {
                Ok(())
            } else {
                Err(ExchangeError::BadLength {
                    kind,
                    len: body.len(),
                    expected: want,
                })
            }
        };
        match kind {
            KIND_CHILD_HELLO => {
                expect(QP_INFO_LEN)?;
                Ok(Frame::ChildHello(get_qp(body)?))
            }
            KIND_PARENT_HELLO => {
                expect(QP_INFO_LEN + REGION_INFO_LEN)?;
                let qp = get_qp(&body[..QP_INFO_LEN])?;
                let region = RegionInfo::from_wire(&arr(&body[QP_INFO_LEN..]))
                    .map_err(ExchangeError::Invalid)?;
                Ok(Frame::ParentHello(qp, region))
            }
            KIND_READY => {
                expect(0)?;
                Ok(Frame::Ready)
            }
            other => Err(ExchangeError::UnknownKind(other)),
        }
    }
}

/// `N` bytes of a slice whose length the caller has checked.
fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&b[..N]);
    out
}

fn get_qp(b: &[u8]) -> Result<QpInfo, ExchangeError> {
    QpInfo::from_wire(&arr(b)).map_err(ExchangeError::Invalid)
}

/// The field checks a frame's queue-pair info must pass (also applied before sending).
pub fn check_qp(qp: &QpInfo) -> Result<(), ExchangeError> {
    qp.check().map_err(ExchangeError::Invalid)
}

/// The field checks a frame's region must pass: whole pages, not empty, no address wrap.
pub fn check_region(r: &RegionInfo) -> Result<(), ExchangeError> {
    r.check().map_err(ExchangeError::Invalid)
}

/// Why a metadata exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExchangeError {
    #[error("the peer closed the control connection before a frame")]
    Closed,
    #[error("the peer closed the control connection mid-frame ({got} of {need} bytes)")]
    Truncated { got: usize, need: usize },
    #[error("the peer did not answer within the handshake timeout")]
    TimedOut,
    #[error("not an RDMA metadata frame (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("RDMA metadata version {theirs} is not supported (this build speaks {ours})")]
    VersionMismatch { ours: u8, theirs: u8 },
    #[error("unknown RDMA metadata frame kind {0}")]
    UnknownKind(u8),
    #[error("expected frame kind {expected}, got {got}")]
    UnexpectedKind { expected: u8, got: u8 },
    #[error("frame body of {len} bytes exceeds the limit of {max}")]
    Oversized { len: u16, max: u16 },
    #[error("frame kind {kind} has a {len}-byte body, expected {expected}")]
    BadLength {
        kind: u8,
        len: usize,
        expected: usize,
    },
    #[error("invalid field: {0}")]
    Invalid(&'static str),
    #[error("control connection: {0}")]
    Io(#[source] io::Error),
}

fn io_error(e: io::Error) -> ExchangeError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ExchangeError::TimedOut,
        _ => ExchangeError::Io(e),
    }
}

/// Fills `buf`; `before` bytes of the frame were read already (for the truncation report).
fn read_full<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    before: usize,
    need: usize,
) -> Result<(), ExchangeError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if before + got == 0 => return Err(ExchangeError::Closed),
            Ok(0) => {
                return Err(ExchangeError::Truncated {
                    got: before + got,
                    need,
                });
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(e)),
        }
    }
    Ok(())
}

/// Reads and checks one frame.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Frame, ExchangeError> {
    let mut header = [0u8; HEADER];
    read_full(r, &mut header, 0, HEADER)?;
    let magic: [u8; 4] = arr(&header[0..4]);
    if magic != MAGIC {
        return Err(ExchangeError::BadMagic(magic));
    }
    if header[4] != VERSION {
        return Err(ExchangeError::VersionMismatch {
            ours: VERSION,
            theirs: header[4],
        });
    }
    let kind = header[5];
    let len = u16::from_be_bytes(arr(&header[6..8]));
    if len > MAX_BODY {
        return Err(ExchangeError::Oversized { len, max: MAX_BODY });
    }
    let mut body = vec![0u8; usize::from(len)];
    read_full(r, &mut body, HEADER, HEADER + usize::from(len))?;
    Frame::decode(kind, &body)
}

/// Writes one frame in a single `write_all`.
pub fn write_frame<W: Write>(w: &mut W, frame: &Frame) -> Result<(), ExchangeError> {
    match frame {
        Frame::ChildHello(qp) => check_qp(qp)?,
        Frame::ParentHello(qp, region) => {
            check_qp(qp)?;
            check_region(region)?;
        }
        Frame::Ready => {}
    }
    w.write_all(&frame.encode()).map_err(io_error)?;
    w.flush().map_err(io_error)
}

/// Runs `f` with both timeouts of `stream` set to `timeout`, then restores the old ones.
fn with_timeout<T>(
    stream: &mut TcpStream,
    timeout: Duration,
    f: impl FnOnce(&mut TcpStream) -> Result<T, ExchangeError>,
) -> Result<T, ExchangeError> {
    let old = (
        stream.read_timeout().map_err(io_error)?,
        stream.write_timeout().map_err(io_error)?,
    );
    // A zero duration is refused by set_*_timeout; treat it as the shortest possible wait.
    let timeout = timeout.max(Duration::from_millis(1));
    stream.set_read_timeout(Some(timeout)).map_err(io_error)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_error)?;
    let out = f(stream);
    let restored = stream
        .set_read_timeout(old.0)
        .and_then(|()| stream.set_write_timeout(old.1));
    match (out, restored) {
        (Ok(v), Ok(())) => Ok(v),
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(io_error(e)),
    }
}

fn unexpected(frame: &Frame, expected: u8) -> ExchangeError {
    ExchangeError::UnexpectedKind {
        expected,
        got: frame.kind(),
    }
}

/// The parent's side: reads the child's queue pair, answers with its own and the region.
pub fn exchange_as_parent(
    stream: &mut TcpStream,
    local: QpInfo,
    region: RegionInfo,
) -> Result<QpInfo, ExchangeError> {
    exchange_as_parent_timeout(stream, local, region, HANDSHAKE_TIMEOUT)
}

/// [`exchange_as_parent`] with its own timeout for each step.
pub fn exchange_as_parent_timeout(
    stream: &mut TcpStream,
    local: QpInfo,
    region: RegionInfo,
    timeout: Duration,
) -> Result<QpInfo, ExchangeError> {
    with_timeout(stream, timeout, |s| {
        let remote = match read_frame(s)? {
            Frame::ChildHello(remote) => remote,
            other => return Err(unexpected(&other, KIND_CHILD_HELLO)),
        };
        write_frame(s, &Frame::ParentHello(local, region))?;
        Ok(remote)
    })
}

/// The child's side: sends its queue pair, reads the parent's and the region.
pub fn exchange_as_child(
    stream: &mut TcpStream,
    local: QpInfo,
) -> Result<(QpInfo, RegionInfo), ExchangeError> {
    exchange_as_child_timeout(stream, local, HANDSHAKE_TIMEOUT)
}

/// [`exchange_as_child`] with its own timeout for each step.
pub fn exchange_as_child_timeout(
    stream: &mut TcpStream,
    local: QpInfo,
    timeout: Duration,
) -> Result<(QpInfo, RegionInfo), ExchangeError> {
    with_timeout(stream, timeout, |s| {
        write_frame(s, &Frame::ChildHello(local))?;
        match read_frame(s)? {
            Frame::ParentHello(remote, region) => Ok((remote, region)),
            other => Err(unexpected(&other, KIND_PARENT_HELLO)),
        }
    })
}

/// The parent: its queue pair answers READs now.
pub fn send_ready(stream: &mut TcpStream, timeout: Duration) -> Result<(), ExchangeError> {
    with_timeout(stream, timeout, |s| write_frame(s, &Frame::Ready))
}

/// The child: waits for the parent's [`Frame::Ready`] before posting READs.
pub fn wait_ready(stream: &mut TcpStream, timeout: Duration) -> Result<(), ExchangeError> {
    with_timeout(stream, timeout, |s| match read_frame(s)? {
        Frame::Ready => Ok(()),
        other => Err(unexpected(&other, KIND_READY)),
    })
}
