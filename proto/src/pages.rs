//! The page-server protocol: how a forked child fetches its parent's memory pages over TCP.
//!
//! A child resumed from an [`ImageDescriptor`](crate::image::ImageDescriptor) connects to the
//! descriptor's `parent` address and fetches pages lazily as it faults on them. One
//! connection serves one image handle:
//!
//! ```text
//! child                                   page server
//!   Hello { version, handle, client_nonce } ->
//!                                        <- Challenge { server_nonce }   (or Refused)
//!   Proof { mac }                          ->
//!                                        <- Welcome { memory_bytes, page_size } (or Refused)
//!   MetaRequest                            ->      (any time after Welcome)
//!                                        <- Meta { bytes }               (an ImageMeta)
//!   Read { first_page, count }             ->      (any number of times)
//!                                        <- Pages { .. }                 (or Refused)
//!   RdmaConnect { version, qp }            ->      (optional, after Welcome)
//!                                        <- RdmaAccept { qp, region }    (or RdmaUnavailable)
//!   Bye                                    ->
//! ```
//!
//! `RdmaConnect` asks for one-sided RDMA READ of the image: the child sends its
//! reliable-connection queue pair ([`QpInfo`]); a server with a device registers the image
//! and answers with its own queue pair, already ready to answer READs, and the region
//! ([`RegionInfo`]: address, rkey, length). The connection then stays open as the queue
//! pair's control channel: closing it tears the parent's queue pair down. A server without
//! RDMA answers `RdmaUnavailable` with its reason and keeps serving `Read`s, so the child
//! falls back to TCP on the same connection. The rkey only ever travels in `RdmaAccept`, to a
//! child that proved the key; `RdmaConnect` before `Welcome` is refused like any frame out of
//! order.
//!
//! `Refused` is always the server's last frame on a connection; it closes after sending it.
//! The child checks that `Welcome` agrees with its descriptor before trusting any page.
//!
//! Every frame is `u32 LE length of (kind + payload) | u8 kind | payload`, at most
//! [`MAX_FRAME`]; a read answers at most [`MAX_READ_PAGES`] pages, and all-zero pages travel
//! as one bit each.
//!
//! # Threat model
//!
//! - The image descriptor, which holds the per-handle key, travels only over trusted control
//!   channels (gateway ↔ node service). The page server never receives the key: a child proves
//!   it knows the key by answering the server's challenge with [`proof`], and the server checks
//!   with [`verify_proof`]. These two functions are the only way to compute or check a proof.
//! - The handle id is not secret; without the key it opens nothing.
//! - The server draws a fresh random 32-byte nonce per connection ([`fresh_nonce`]), so a proof
//!   recorded on one connection is useless on a new one: replays are refused. The client nonce
//!   keeps a server (or anyone posing as one) from choosing the whole message the client MACs.
//!   A server allows one proof per connection and refuses with `BadProof` otherwise.
//! - Authentication happens once, at the start of the connection; nothing binds it to the TCP
//!   channel. An on-path attacker who can relay or hijack the connection can read pages.
//! - Page contents are NOT encrypted on the wire: anyone who can observe the network between
//!   the nodes sees the parent's memory. Integrity of pages relies on the TCP connection
//!   (checksums, not cryptography). Run it only on a network the operator trusts for that.

use std::io::{self, Read, Write};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::image::Cursor;
pub use crate::image::PAGE_SIZE;

/// Protocol version a child sends in `Hello`. Decoding accepts any version so the server can
/// refuse an unknown one with a message instead of dropping the connection.
pub const PROTOCOL_VERSION: u16 = 1;

const PAGE: usize = PAGE_SIZE as usize;

/// Most pages one `Read` may ask for (1 MiB): bounds a frame and a server's per-read work.
pub const MAX_READ_PAGES: u32 = 256;

/// Bytes of a `Pages` zero map: one bit per page, for the largest read.
pub const ZERO_MAP_BYTES: usize = MAX_READ_PAGES as usize / 8;

/// Largest value of the length field (kind + payload): a full `Pages` frame plus slack.
pub const MAX_FRAME: u32 = (1 << 20) + 64;

/// Bytes of the length field in front of every frame.
pub const HEADER_LEN: usize = 4;

/// Longest `Refused` message, in bytes.
pub const MAX_MESSAGE: usize = 1024;

/// Version of the queue-pair exchange a child sends in `RdmaConnect`. Decoding accepts any
/// version so the server can answer an unknown one with `RdmaUnavailable` and its reason.
pub const RDMA_VERSION: u8 = 1;

/// Domain-separation label at the front of every proof's MAC input.
const PROOF_LABEL: &[u8] = b"spindle-pages-v1";

const _: () =
    assert!(1 + 8 + ZERO_MAP_BYTES + MAX_READ_PAGES as usize * PAGE <= MAX_FRAME as usize);
const _: () = assert!(1 + 1 + 2 + MAX_MESSAGE <= MAX_FRAME as usize);
const _: () = assert!(1 + 2 + MAX_MESSAGE <= MAX_FRAME as usize);

mod kind {
    pub const HELLO: u8 = 1;
    pub const CHALLENGE: u8 = 2;
    pub const PROOF: u8 = 3;
    pub const WELCOME: u8 = 4;
    pub const REFUSED: u8 = 5;
    pub const READ: u8 = 6;
    pub const PAGES: u8 = 7;
    pub const BYE: u8 = 8;
    pub const META_REQUEST: u8 = 9;
    pub const META: u8 = 10;
    pub const RDMA_CONNECT: u8 = 11;
    pub const RDMA_ACCEPT: u8 = 12;
    pub const RDMA_UNAVAILABLE: u8 = 13;
}

/// QP numbers and PSNs are 24-bit on the wire of InfiniBand and RoCE.
const MAX_24: u32 = 0x00ff_ffff;

/// One side's reliable-connection queue pair, as its peer needs it to move its own to
/// RTR/RTS, as carried in [`Frame::RdmaConnect`] and [`Frame::RdmaAccept`]: gid 16, lid 2,
/// qp_num 4, psn 4, mtu 1, little-endian, [`QpInfo::WIRE_LEN`] bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpInfo {
    pub gid: [u8; 16],
    pub lid: u16,
    /// 24-bit queue-pair number.
    pub qp_num: u32,
    /// 24-bit first packet sequence number this side sends with.
    pub psn: u32,
    /// Active path MTU as `ibv_mtu` (1 = 256 B .. 5 = 4096 B); the pair uses the smaller.
    pub mtu: u8,
}

impl QpInfo {
    pub const WIRE_LEN: usize = 16 + 2 + 4 + 4 + 1;

    /// Appends the wire layout; does not check (see [`QpInfo::check`]).
    pub fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.gid);
        out.extend_from_slice(&self.lid.to_le_bytes());
        out.extend_from_slice(&self.qp_num.to_le_bytes());
        out.extend_from_slice(&self.psn.to_le_bytes());
        out.push(self.mtu);
    }

    /// Reads the wire layout and checks the fields.
    pub fn from_wire(b: &[u8; Self::WIRE_LEN]) -> Result<Self, &'static str> {
        let mut c = Cursor::new(b);
        // Infallible: the array is exactly WIRE_LEN bytes.
        let qp = QpInfo {
            gid: c.array().unwrap_or_default(),
            lid: c.u16().unwrap_or_default(),
            qp_num: c.u32().unwrap_or_default(),
            psn: c.u32().unwrap_or_default(),
            mtu: c.u8().unwrap_or_default(),
        };
        qp.check()?;
        Ok(qp)
    }

    /// The field checks: 24-bit QP number and PSN, an MTU `ibv_mtu` knows.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.qp_num > MAX_24 {
            return Err("QP number wider than 24 bits");
        }
        if self.psn > MAX_24 {
            return Err("PSN wider than 24 bits");
        }
        if !(1..=5).contains(&self.mtu) {
            return Err("path MTU is not 256..4096 (ibv_mtu 1..5)");
        }
        Ok(())
    }
}

/// The parent's registered image mapping: the READ target. Wire layout: remote_addr 8,
/// rkey 4, len 8, little-endian, [`RegionInfo::WIRE_LEN`] bytes.
///
/// `rkey` is a capability (the NIC checks nothing else), so `Debug` redacts it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// Address of the image's first byte in the parent's registered region.
    pub remote_addr: u64,
    pub rkey: u32,
    /// Bytes registered: a whole number of pages.
    pub len: u64,
}

impl RegionInfo {
    pub const WIRE_LEN: usize = 8 + 4 + 8;

    /// Appends the wire layout; does not check (see [`RegionInfo::check`]).
    pub fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.remote_addr.to_le_bytes());
        out.extend_from_slice(&self.rkey.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
    }

    /// Reads the wire layout and checks the fields.
    pub fn from_wire(b: &[u8; Self::WIRE_LEN]) -> Result<Self, &'static str> {
        let mut c = Cursor::new(b);
        // Infallible: the array is exactly WIRE_LEN bytes.
        let r = RegionInfo {
            remote_addr: c.u64().unwrap_or_default(),
            rkey: c.u32().unwrap_or_default(),
            len: c.u64().unwrap_or_default(),
        };
        r.check()?;
        Ok(r)
    }

    /// The field checks: whole pages, not empty, no address wrap.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.len == 0 || !self.len.is_multiple_of(u64::from(PAGE_SIZE)) {
            return Err("region length is not a whole, non-zero number of pages");
        }
        if self.remote_addr.checked_add(self.len).is_none() {
            return Err("region wraps the address space");
        }
        Ok(())
    }
}

impl std::fmt::Debug for RegionInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionInfo")
            .field("remote_addr", &format_args!("{:#x}", self.remote_addr))
            .field("rkey", &"<redacted>")
            .field("len", &self.len)
            .finish()
    }
}

/// One message on a page-server connection.
#[derive(Clone, PartialEq, Eq)]
pub enum Frame {
    /// Client → server, first frame: which image, and the client's half of the challenge.
    Hello {
        version: u16,
        handle: u64,
        client_nonce: [u8; 16],
    },
    /// Server → client: a fresh random nonce for this connection.
    Challenge { server_nonce: [u8; 32] },
    /// Client → server: [`proof`] over the handle and both nonces.
    Proof { mac: [u8; 32] },
    /// Server → client after a valid proof: the memory the handle serves.
    Welcome { memory_bytes: u64, page_size: u32 },
    /// Server → client, last frame: why the server stops. `encode` cuts `message` to
    /// [`MAX_MESSAGE`] bytes (at a character boundary) so a long diagnostic cannot make the
    /// frame undecodable.
    Refused {
        reason: RefuseReason,
        message: String,
    },
    /// Client → server: pages `first_page .. first_page + count`, count in
    /// `1..=MAX_READ_PAGES`.
    Read { first_page: u32, count: u32 },
    /// Server → client: the pages of one `Read`. Bit `i` of `zero_map` (byte `i / 8`, bit
    /// `i % 8`, least significant first) is set when page `first_page + i` is all zero and so
    /// omitted from `data`; `data` is the other pages, in order. Bits at and past `count` are
    /// zero. Build one with [`Frame::pages_from`], read one with [`Frame::page_iter`].
    Pages {
        first_page: u32,
        count: u32,
        zero_map: [u8; ZERO_MAP_BYTES],
        data: Vec<u8>,
    },
    /// Client → server: done, the server may close.
    Bye,
    /// Client → server, after `Welcome`: send the image's metadata.
    MetaRequest,
    /// Server → client: the image's metadata, a [`crate::meta::ImageMeta`] encoding (decoded
    /// by the client with `ImageMeta::decode`; opaque to the framing).
    Meta { bytes: Vec<u8> },
    /// Client → server, after `Welcome`: read the image by RDMA READ; `qp` is the child's
    /// queue pair, `version` [`RDMA_VERSION`].
    RdmaConnect { version: u8, qp: QpInfo },
    /// Server → client: the parent's queue pair (in RTS: READs may start) and the region.
    RdmaAccept { qp: QpInfo, region: RegionInfo },
    /// Server → client: no RDMA on this connection, and why; the connection keeps serving
    /// `Read`s. `encode` cuts `reason` to [`MAX_MESSAGE`] bytes at a character boundary.
    RdmaUnavailable { reason: String },
}

/// Why a server refused (`Refused.reason`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefuseReason {
    /// No image with this handle on this server.
    UnknownHandle = 1,
    /// The proof did not verify.
    BadProof = 2,
    /// The image's lifetime ended.
    Expired = 3,
    /// The parent closed the handle.
    Revoked = 4,
    /// A frame out of order, an unknown version, or a read past the memory's end.
    BadRequest = 5,
    /// The server is at its connection or bandwidth limit; retry later or elsewhere.
    Busy = 6,
    /// The server failed on its side.
    Internal = 7,
}

impl TryFrom<u8> for RefuseReason {
    type Error = FrameError;

    fn try_from(v: u8) -> Result<Self, FrameError> {
        Ok(match v {
            1 => RefuseReason::UnknownHandle,
            2 => RefuseReason::BadProof,
            3 => RefuseReason::Expired,
            4 => RefuseReason::Revoked,
            5 => RefuseReason::BadRequest,
            6 => RefuseReason::Busy,
            7 => RefuseReason::Internal,
            other => return Err(FrameError::UnknownReason(other)),
        })
    }
}

impl From<RefuseReason> for u8 {
    fn from(r: RefuseReason) -> u8 {
        r as u8
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Not an error in the stream: wait for at least `needed` more bytes and decode again.
    #[error("incomplete frame: at least {needed} more bytes needed")]
    Incomplete { needed: usize },
    #[error("frame length {len} exceeds the maximum {MAX_FRAME}")]
    Oversized { len: u32 },
    #[error("frame length 0: every frame has a kind byte")]
    Empty,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("{kind} frame truncated: {field} missing")]
    Truncated {
        kind: &'static str,
        field: &'static str,
    },
    #[error("{kind} frame has {extra} trailing bytes")]
    TrailingBytes { kind: &'static str, extra: usize },
    #[error("{kind} frame page count {count} is outside 1..={MAX_READ_PAGES}")]
    BadCount { kind: &'static str, count: u32 },
    #[error("{kind} frame pages {first_page} + {count} run past page 2^32")]
    PageRangeOverflow {
        kind: &'static str,
        first_page: u32,
        count: u32,
    },
    #[error("Pages frame zero map has bits set past its {count} pages")]
    ZeroMapPadding { count: u32 },
    #[error("Pages frame carries {got} data bytes; its zero map calls for {expected}")]
    PagesDataLength { expected: usize, got: usize },
    #[error("unknown refuse reason code {0} (known: 1..=7)")]
    UnknownReason(u8),
    #[error("Refused message is {len} bytes, longer than {MAX_MESSAGE}")]
    MessageTooLong { len: usize },
    #[error("Refused message is not UTF-8")]
    MessageNotUtf8,
    #[error("{kind} frame: {what}")]
    BadRdmaField {
        kind: &'static str,
        what: &'static str,
    },
    #[error("RdmaUnavailable reason is {len} bytes, longer than {MAX_MESSAGE}")]
    ReasonTooLong { len: usize },
    #[error("RdmaUnavailable reason is not UTF-8")]
    ReasonNotUtf8,
    /// The peer closed the connection cleanly between two frames.
    #[error("connection closed")]
    Closed,
    #[error("page-server connection: {0}")]
    Io(#[from] io::Error),
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Hello { .. } => kind::HELLO,
            Frame::Challenge { .. } => kind::CHALLENGE,
            Frame::Proof { .. } => kind::PROOF,
            Frame::Welcome { .. } => kind::WELCOME,
            Frame::Refused { .. } => kind::REFUSED,
            Frame::Read { .. } => kind::READ,
            Frame::Pages { .. } => kind::PAGES,
            Frame::Bye => kind::BYE,
            Frame::MetaRequest => kind::META_REQUEST,
            Frame::Meta { .. } => kind::META,
            Frame::RdmaConnect { .. } => kind::RDMA_CONNECT,
            Frame::RdmaAccept { .. } => kind::RDMA_ACCEPT,
            Frame::RdmaUnavailable { .. } => kind::RDMA_UNAVAILABLE,
        }
    }

    /// Appends the frame, header included, to `out`. Does not check the frame (see
    /// [`Frame::check`]); [`write_frame`] does.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER_LEN]);
        out.push(self.kind());
        match self {
            Frame::Hello {
                version,
                handle,
                client_nonce,
            } => {
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(&handle.to_le_bytes());
                out.extend_from_slice(client_nonce);
            }
            Frame::Challenge { server_nonce } => out.extend_from_slice(server_nonce),
            Frame::Proof { mac } => out.extend_from_slice(mac),
            Frame::Welcome {
                memory_bytes,
                page_size,
            } => {
                out.extend_from_slice(&memory_bytes.to_le_bytes());
                out.extend_from_slice(&page_size.to_le_bytes());
            }
            Frame::Refused { reason, message } => {
                out.push(u8::from(*reason));
                put_text(out, message);
            }
            Frame::Read { first_page, count } => {
                out.extend_from_slice(&first_page.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
            }
            Frame::Pages {
                first_page,
                count,
                zero_map,
                data,
            } => {
                out.extend_from_slice(&first_page.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
                out.extend_from_slice(&zero_map[..zero_map_len(*count).min(ZERO_MAP_BYTES)]);
                out.extend_from_slice(data);
            }
            Frame::Bye | Frame::MetaRequest => {}
            Frame::Meta { bytes } => out.extend_from_slice(bytes),
            Frame::RdmaConnect { version, qp } => {
                out.push(*version);
                qp.put(out);
            }
            Frame::RdmaAccept { qp, region } => {
                qp.put(out);
                region.put(out);
            }
            Frame::RdmaUnavailable { reason } => put_text(out, reason),
        }
        // A length past u32 (only from a bogus Pages frame) becomes one the reader refuses
        // as oversized rather than a wrapped one that would desynchronise the stream.
        let len = u32::try_from(out.len() - start - HEADER_LEN).unwrap_or(u32::MAX);
        out[start..start + HEADER_LEN].copy_from_slice(&len.to_le_bytes());
    }

    /// Decodes the frame at the front of `buf`, returning it and the bytes it took. Bytes
    /// after it are left for the next call. A buffer that does not yet hold the whole frame
    /// gives [`FrameError::Incomplete`]; an oversized length is refused as soon as the header
    /// is in, without waiting for the payload.
    pub fn decode(buf: &[u8]) -> Result<(Frame, usize), FrameError> {
        let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
            return Err(FrameError::Incomplete {
                needed: HEADER_LEN - buf.len(),
            });
        };
        let len = check_len(u32::from_le_bytes(*header))?;
        let total = HEADER_LEN + len;
        let Some(body) = buf.get(HEADER_LEN..total) else {
            return Err(FrameError::Incomplete {
                needed: total - buf.len(),
            });
        };
        Ok((decode_body(body)?, total))
    }

    /// The rules `decode` applies beyond the byte layout, for a frame built in memory. A
    /// `Refused` message over [`MAX_MESSAGE`] passes: `encode` cuts it.
    pub fn check(&self) -> Result<(), FrameError> {
        match self {
            Frame::Read { first_page, count } => check_range("Read", *first_page, *count),
            Frame::Pages {
                first_page,
                count,
                zero_map,
                data,
            } => {
                check_range("Pages", *first_page, *count)?;
                let map = &zero_map[..zero_map_len(*count)];
                if map.iter().zip(valid_bits(*count)).any(|(b, v)| b & !v != 0)
                    || zero_map[map.len()..].iter().any(|&b| b != 0)
                {
                    return Err(FrameError::ZeroMapPadding { count: *count });
                }
                let zeros: u32 = map.iter().map(|b| b.count_ones()).sum();
                let expected = (*count - zeros) as usize * PAGE;
                if data.len() != expected {
                    return Err(FrameError::PagesDataLength {
                        expected,
                        got: data.len(),
                    });
                }
                Ok(())
            }
            Frame::RdmaConnect { qp, .. } => qp.check().map_err(|what| FrameError::BadRdmaField {
                kind: "RdmaConnect",
                what,
            }),
            Frame::RdmaAccept { qp, region } => {
                qp.check()
                    .and_then(|()| region.check())
                    .map_err(|what| FrameError::BadRdmaField {
                        kind: "RdmaAccept",
                        what,
                    })
            }
            _ => Ok(()),
        }
    }

    /// The `Pages` answer for the pages in `bytes` (a whole number of pages, 1 to
    /// [`MAX_READ_PAGES`] of them), starting at page `first_page`; all-zero pages are omitted.
    pub fn pages_from(first_page: u32, bytes: &[u8]) -> Result<Frame, FrameError> {
        if !bytes.len().is_multiple_of(PAGE) {
            return Err(FrameError::PagesDataLength {
                expected: bytes.len().next_multiple_of(PAGE),
                got: bytes.len(),
            });
        }
        let count = u32::try_from(bytes.len() / PAGE).unwrap_or(u32::MAX);
        check_range("Pages", first_page, count)?;
        let mut zero_map = [0u8; ZERO_MAP_BYTES];
        let mut data = Vec::with_capacity(bytes.len());
        for (i, page) in bytes.chunks_exact(PAGE).enumerate() {
            if is_zero(page) {
                zero_map[i / 8] |= 1 << (i % 8);
            } else {
                data.extend_from_slice(page);
            }
        }
        Ok(Frame::Pages {
            first_page,
            count,
            zero_map,
            data,
        })
    }

    /// The pages of a `Pages` frame as `(page number, contents)`, contents `None` for an
    /// all-zero page. `None` for any other frame or one that fails [`Frame::check`].
    pub fn page_iter(&self) -> Option<PageIter<'_>> {
        match self {
            Frame::Pages {
                first_page,
                count,
                zero_map,
                data,
            } if self.check().is_ok() => Some(PageIter {
                first_page: *first_page,
                count: *count,
                zero_map,
                data,
                i: 0,
            }),
            _ => None,
        }
    }
}

// Page data would flood a log; show its size instead.
impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Frame::MetaRequest => f.write_str("MetaRequest"),
            Frame::Meta { bytes } => f.debug_struct("Meta").field("len", &bytes.len()).finish(),
            Frame::Hello {
                version,
                handle,
                client_nonce,
            } => f
                .debug_struct("Hello")
                .field("version", version)
                .field("handle", handle)
                .field("client_nonce", client_nonce)
                .finish(),
            Frame::Challenge { server_nonce } => f
                .debug_struct("Challenge")
                .field("server_nonce", server_nonce)
                .finish(),
            Frame::Proof { mac } => f.debug_struct("Proof").field("mac", mac).finish(),
            Frame::Welcome {
                memory_bytes,
                page_size,
            } => f
                .debug_struct("Welcome")
                .field("memory_bytes", memory_bytes)
                .field("page_size", page_size)
                .finish(),
            Frame::Refused { reason, message } => f
                .debug_struct("Refused")
                .field("reason", reason)
                .field("message", message)
                .finish(),
            Frame::Read { first_page, count } => f
                .debug_struct("Read")
                .field("first_page", first_page)
                .field("count", count)
                .finish(),
            Frame::Pages {
                first_page,
                count,
                zero_map,
                data,
            } => f
                .debug_struct("Pages")
                .field("first_page", first_page)
                .field("count", count)
                .field(
                    "zeros",
                    &zero_map.iter().map(|b| b.count_ones()).sum::<u32>(),
                )
                .field("data_len", &data.len())
                .finish(),
            Frame::Bye => f.write_str("Bye"),
            Frame::RdmaConnect { version, qp } => f
                .debug_struct("RdmaConnect")
                .field("version", version)
                .field("qp", qp)
                .finish(),
            Frame::RdmaAccept { qp, region } => f
                .debug_struct("RdmaAccept")
                .field("qp", qp)
                .field("region", region)
                .finish(),
            Frame::RdmaUnavailable { reason } => f
                .debug_struct("RdmaUnavailable")
                .field("reason", reason)
                .finish(),
        }
    }
}

/// Iterator over a `Pages` frame's pages; see [`Frame::page_iter`].
#[derive(Debug, Clone)]
pub struct PageIter<'a> {
    first_page: u32,
    count: u32,
    zero_map: &'a [u8; ZERO_MAP_BYTES],
    data: &'a [u8],
    i: u32,
}

impl<'a> Iterator for PageIter<'a> {
    type Item = (u32, Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.i >= self.count {
            return None;
        }
        let i = self.i as usize;
        let page = self.first_page + self.i;
        self.i += 1;
        if self.zero_map[i / 8] & (1 << (i % 8)) != 0 {
            return Some((page, None));
        }
        // `check` passed, so the data holds every non-zero page.
        let (head, rest) = self.data.split_at_checked(PAGE)?;
        self.data = rest;
        Some((page, Some(head)))
    }
}

/// `u16 LE length | UTF-8`, cut to [`MAX_MESSAGE`] bytes at a character boundary.
fn put_text(out: &mut Vec<u8>, text: &str) {
    let mut end = text.len().min(MAX_MESSAGE);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&text.as_bytes()[..end]);
}

fn zero_map_len(count: u32) -> usize {
    (count as usize).div_ceil(8)
}

/// Masks of the bits that may be set in each byte of a zero map for `count` pages.
fn valid_bits(count: u32) -> impl Iterator<Item = u8> {
    let full = count as usize / 8;
    let tail = count % 8;
    std::iter::repeat_n(0xff, full).chain((tail != 0).then(|| (1u8 << tail) - 1))
}

fn check_range(kind: &'static str, first_page: u32, count: u32) -> Result<(), FrameError> {
    if !(1..=MAX_READ_PAGES).contains(&count) {
        return Err(FrameError::BadCount { kind, count });
    }
    if first_page.checked_add(count).is_none() {
        return Err(FrameError::PageRangeOverflow {
            kind,
            first_page,
            count,
        });
    }
    Ok(())
}

fn check_len(len: u32) -> Result<usize, FrameError> {
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME {
        return Err(FrameError::Oversized { len });
    }
    Ok(len as usize)
}

fn is_zero(page: &[u8]) -> bool {
    // OR-folding fixed chunks lets the compiler vectorise; a byte-wise `all` would not.
    page.chunks(64)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Decodes `kind | payload` (the frame without its length header).
fn decode_body(body: &[u8]) -> Result<Frame, FrameError> {
    let mut c = Cursor::new(body);
    let k = c.u8().ok_or(FrameError::Empty)?;
    let name = match k {
        kind::HELLO => "Hello",
        kind::CHALLENGE => "Challenge",
        kind::PROOF => "Proof",
        kind::WELCOME => "Welcome",
        kind::REFUSED => "Refused",
        kind::READ => "Read",
        kind::PAGES => "Pages",
        kind::BYE => "Bye",
        kind::META_REQUEST => "MetaRequest",
        kind::META => "Meta",
        kind::RDMA_CONNECT => "RdmaConnect",
        kind::RDMA_ACCEPT => "RdmaAccept",
        kind::RDMA_UNAVAILABLE => "RdmaUnavailable",
        other => return Err(FrameError::UnknownKind(other)),
    };
    let t = |field| FrameError::Truncated { kind: name, field };
    let frame = match k {
        kind::HELLO => Frame::Hello {
            version: c.u16().ok_or(t("version"))?,
            handle: c.u64().ok_or(t("handle"))?,
            client_nonce: c.array().ok_or(t("client_nonce"))?,
        },
        kind::CHALLENGE => Frame::Challenge {
            server_nonce: c.array().ok_or(t("server_nonce"))?,
        },
        kind::PROOF => Frame::Proof {
            mac: c.array().ok_or(t("mac"))?,
        },
        kind::WELCOME => Frame::Welcome {
            memory_bytes: c.u64().ok_or(t("memory_bytes"))?,
            page_size: c.u32().ok_or(t("page_size"))?,
        },
        kind::REFUSED => {
            let reason = RefuseReason::try_from(c.u8().ok_or(t("reason"))?)?;
            let len = usize::from(c.u16().ok_or(t("message length"))?);
            if len > MAX_MESSAGE {
                return Err(FrameError::MessageTooLong { len });
            }
            let bytes = c.take(len).ok_or(t("message"))?;
            let message = std::str::from_utf8(bytes)
                .map_err(|_| FrameError::MessageNotUtf8)?
                .to_owned();
            Frame::Refused { reason, message }
        }
        kind::READ => {
            let f = Frame::Read {
                first_page: c.u32().ok_or(t("first_page"))?,
                count: c.u32().ok_or(t("count"))?,
            };
            f.check()?;
            f
        }
        kind::PAGES => {
            let first_page = c.u32().ok_or(t("first_page"))?;
            let count = c.u32().ok_or(t("count"))?;
            // Before the zero map: its length depends on the count.
            check_range(name, first_page, count)?;
            let map = c.take(zero_map_len(count)).ok_or(t("zero_map"))?;
            let mut zero_map = [0u8; ZERO_MAP_BYTES];
            zero_map[..map.len()].copy_from_slice(map);
            let f = Frame::Pages {
                first_page,
                count,
                zero_map,
                data: c.rest().to_vec(),
            };
            f.check()?;
            f
        }
        kind::META_REQUEST => Frame::MetaRequest,
        kind::META => Frame::Meta {
            bytes: c.rest().to_vec(),
        },
        kind::RDMA_CONNECT => {
            let version = c.u8().ok_or(t("version"))?;
            let qp = c.array().ok_or(t("qp"))?;
            Frame::RdmaConnect {
                version,
                qp: QpInfo::from_wire(&qp)
                    .map_err(|what| FrameError::BadRdmaField { kind: name, what })?,
            }
        }
        kind::RDMA_ACCEPT => {
            let qp = c.array().ok_or(t("qp"))?;
            let region = c.array().ok_or(t("region"))?;
            let bad = |what| FrameError::BadRdmaField { kind: name, what };
            Frame::RdmaAccept {
                qp: QpInfo::from_wire(&qp).map_err(bad)?,
                region: RegionInfo::from_wire(&region).map_err(bad)?,
            }
        }
        kind::RDMA_UNAVAILABLE => {
            let len = usize::from(c.u16().ok_or(t("reason length"))?);
            if len > MAX_MESSAGE {
                return Err(FrameError::ReasonTooLong { len });
            }
            let bytes = c.take(len).ok_or(t("reason"))?;
            let reason = std::str::from_utf8(bytes)
                .map_err(|_| FrameError::ReasonNotUtf8)?
                .to_owned();
            Frame::RdmaUnavailable { reason }
        }
        _ => Frame::Bye,
    };
    if c.remaining() != 0 {
        return Err(FrameError::TrailingBytes {
            kind: name,
            extra: c.remaining(),
        });
    }
    Ok(frame)
}

/// Reads one frame, blocking. The length is checked before the payload buffer is allocated,
/// so a hostile header cannot make the reader reserve 4 GiB. End of stream before the first
/// header byte is [`FrameError::Closed`]; anywhere else it is an `UnexpectedEof` I/O error.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = check_len(u32::from_le_bytes(header))?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    decode_body(&body)
}

/// Writes one frame, blocking. Refuses (before writing anything) a frame that fails
/// [`Frame::check`], so a local bug shows up here rather than as the peer hanging up.
pub fn write_frame(w: &mut impl Write, frame: &Frame) -> Result<(), FrameError> {
    frame.check()?;
    let mut buf = Vec::new();
    frame.encode(&mut buf);
    w.write_all(&buf)?;
    Ok(())
}

fn proof_mac(
    key: &[u8; 32],
    handle: u64,
    server_nonce: &[u8; 32],
    client_nonce: &[u8; 16],
) -> Hmac<Sha256> {
    // Infallible: HMAC takes keys of any length.
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC-SHA256 accepts a 32-byte key");
    mac.update(PROOF_LABEL);
    mac.update(&handle.to_le_bytes());
    mac.update(server_nonce);
    mac.update(client_nonce);
    mac
}

/// The child's answer to a challenge:
/// `HMAC-SHA256(key, b"spindle-pages-v1" || handle LE || server_nonce || client_nonce)`.
pub fn proof(
    key: &[u8; 32],
    handle: u64,
    server_nonce: &[u8; 32],
    client_nonce: &[u8; 16],
) -> [u8; 32] {
    proof_mac(key, handle, server_nonce, client_nonce)
        .finalize()
        .into_bytes()
        .into()
}

/// Whether `mac` is the proof for these inputs, compared in constant time.
pub fn verify_proof(
    key: &[u8; 32],
    handle: u64,
    server_nonce: &[u8; 32],
    client_nonce: &[u8; 16],
    mac: &[u8; 32],
) -> bool {
    proof_mac(key, handle, server_nonce, client_nonce)
        .verify_slice(mac)
        .is_ok()
}

/// The OS random source failed; no nonce (or key) can be made.
#[derive(Debug, thiserror::Error)]
#[error("the OS random source failed: {0}")]
pub struct RandomnessError(getrandom::Error);

/// `N` bytes from the OS random source: nonces for `Hello` and `Challenge`, and image keys
/// (`fresh_nonce::<32>()`).
pub fn fresh_nonce<const N: usize>() -> Result<[u8; N], RandomnessError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(RandomnessError)?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> Vec<u8> {
        let mut p = vec![fill; PAGE];
        p[PAGE - 1] = fill.wrapping_add(1);
        p
    }

    fn samples() -> Vec<Frame> {
        let mixed: Vec<u8> = [page(1), vec![0; PAGE], page(2), vec![0; PAGE], page(3)].concat();
        let full: Vec<u8> = (0..MAX_READ_PAGES)
            .flat_map(|i| {
                if i % 3 == 0 {
                    vec![0; PAGE]
                } else {
                    page(i as u8)
                }
            })
            .collect();
        vec![
            Frame::Hello {
                version: PROTOCOL_VERSION,
                handle: 0x0102_0304_0506_0708,
                client_nonce: core::array::from_fn(|i| i as u8),
            },
            Frame::Challenge {
                server_nonce: core::array::from_fn(|i| 0xff - i as u8),
            },
            Frame::Proof { mac: [0x5a; 32] },
            Frame::Welcome {
                memory_bytes: 17 * 65536,
                page_size: PAGE_SIZE,
            },
            Frame::Refused {
                reason: RefuseReason::Revoked,
                message: "handle 7 closed by its parent".to_owned(),
            },
            Frame::Refused {
                reason: RefuseReason::Busy,
                message: String::new(),
            },
            Frame::Read {
                first_page: 3,
                count: 5,
            },
            Frame::Read {
                first_page: u32::MAX - MAX_READ_PAGES,
                count: MAX_READ_PAGES,
            },
            Frame::pages_from(10, &mixed).unwrap(),
            Frame::pages_from(0, &vec![0; PAGE]).unwrap(),
            Frame::pages_from(u32::MAX - 1, &page(9)).unwrap(),
            Frame::pages_from(0, &full).unwrap(),
            Frame::Bye,
            Frame::MetaRequest,
            Frame::Meta {
                bytes: b"SPDLMETA...".to_vec(),
            },
            Frame::RdmaConnect {
                version: RDMA_VERSION,
                qp: QP,
            },
            Frame::RdmaAccept {
                qp: QpInfo {
                    qp_num: 0xff_ffff,
                    psn: 0,
                    mtu: 1,
                    ..QP
                },
                region: REGION,
            },
            Frame::RdmaUnavailable {
                reason: "no RDMA device: /sys/class/infiniband does not exist".to_owned(),
            },
            Frame::RdmaUnavailable {
                reason: String::new(),
            },
        ]
    }

    const QP: QpInfo = QpInfo {
        gid: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
        lid: 0x0102,
        qp_num: 0x00ab_cdef,
        psn: 0x0012_3456,
        mtu: 5,
    };

    const REGION: RegionInfo = RegionInfo {
        remote_addr: 0x7f12_3456_0000,
        rkey: 0x1234_5678,
        len: 64 * 4096,
    };

    /// The layout of the RDMA frames, byte by byte: LE fields in the documented order.
    #[test]
    fn rdma_frames_layout() {
        let b = encoded(&Frame::RdmaConnect { version: 1, qp: QP });
        assert_eq!(b.len(), HEADER_LEN + 1 + 1 + QpInfo::WIRE_LEN);
        assert_eq!(&b[..4], &(2 + QpInfo::WIRE_LEN as u32).to_le_bytes());
        assert_eq!(b[4], kind::RDMA_CONNECT);
        assert_eq!(b[5], 1);
        assert_eq!(&b[6..22], &QP.gid);
        assert_eq!(&b[22..24], &[0x02, 0x01]);
        assert_eq!(&b[24..28], &[0xef, 0xcd, 0xab, 0]);
        assert_eq!(&b[28..32], &[0x56, 0x34, 0x12, 0]);
        assert_eq!(b[32], 5);
        let b = encoded(&Frame::RdmaAccept {
            qp: QP,
            region: REGION,
        });
        assert_eq!(
            b.len(),
            HEADER_LEN + 1 + QpInfo::WIRE_LEN + RegionInfo::WIRE_LEN
        );
        let r = &b[HEADER_LEN + 1 + QpInfo::WIRE_LEN..];
        assert_eq!(&r[..8], &REGION.remote_addr.to_le_bytes());
        assert_eq!(&r[8..12], &REGION.rkey.to_le_bytes());
        assert_eq!(&r[12..20], &REGION.len.to_le_bytes());
        // A client request fits the server's request limit (rdma_fork::server::MAX_REQUEST).
        const { assert!(2 + QpInfo::WIRE_LEN <= 64) };
        // The rkey is a capability: never in logs.
        let shown = format!(
            "{:?}",
            Frame::RdmaAccept {
                qp: QP,
                region: REGION
            }
        );
        assert!(
            !shown.contains("305419896") && !shown.contains("12345678"),
            "{shown}"
        );
    }

    #[test]
    fn bad_rdma_frames_refused() {
        let d = |b: Vec<u8>| Frame::decode(&b).map(|(f, _)| f);
        let connect = encoded(&Frame::RdmaConnect { version: 1, qp: QP });
        // Every truncation, through the length field and through a short stream.
        for n in 1..connect.len() - HEADER_LEN {
            let mut body = connect[HEADER_LEN..HEADER_LEN + n].to_vec();
            let got = d(framed(&body));
            assert!(
                matches!(
                    got,
                    Err(FrameError::Truncated {
                        kind: "RdmaConnect",
                        ..
                    })
                ),
                "{n}: {got:?}"
            );
            body.push(0);
            let _ = d(framed(&body));
        }
        let mut long = connect[HEADER_LEN..].to_vec();
        long.push(0);
        assert!(matches!(
            d(framed(&long)),
            Err(FrameError::TrailingBytes {
                kind: "RdmaConnect",
                extra: 1
            })
        ));
        // Out-of-range fields: QP number and PSN past 24 bits (top bytes), MTU 0 and 6.
        let patch = |frame: &[u8], at: usize, v: u8| {
            let mut b = frame.to_vec();
            b[at] = v;
            d(b)
        };
        for (at, v) in [(27, 1), (31, 1), (32, 0), (32, 6)] {
            assert!(
                matches!(
                    patch(&connect, at, v),
                    Err(FrameError::BadRdmaField {
                        kind: "RdmaConnect",
                        ..
                    })
                ),
                "byte {at} = {v}"
            );
        }
        let accept = encoded(&Frame::RdmaAccept {
            qp: QP,
            region: REGION,
        });
        let region_at = HEADER_LEN + 1 + QpInfo::WIRE_LEN;
        for (addr, len) in [(u64::MAX - 4095, 8192), (0, 0), (0, 4095)] {
            let mut b = accept.clone();
            b[region_at..region_at + 8].copy_from_slice(&u64::to_le_bytes(addr));
            b[region_at + 12..region_at + 20].copy_from_slice(&u64::to_le_bytes(len));
            assert!(
                matches!(
                    d(b),
                    Err(FrameError::BadRdmaField {
                        kind: "RdmaAccept",
                        ..
                    })
                ),
                "{addr:#x} {len}"
            );
        }
        // Nor does write_frame send such fields.
        let bad = Frame::RdmaConnect {
            version: 1,
            qp: QpInfo { psn: 1 << 24, ..QP },
        };
        let mut out = Vec::new();
        assert!(matches!(
            write_frame(&mut out, &bad),
            Err(FrameError::BadRdmaField { .. })
        ));
        assert!(out.is_empty());
        // Reasons: bounded, UTF-8, length matching.
        let mut b = vec![kind::RDMA_UNAVAILABLE];
        b.extend_from_slice(&(MAX_MESSAGE as u16 + 1).to_le_bytes());
        b.extend_from_slice(&[b'a'; MAX_MESSAGE + 1]);
        assert!(matches!(
            d(framed(&b)),
            Err(FrameError::ReasonTooLong { len: 1025 })
        ));
        assert!(matches!(
            d(framed(&[kind::RDMA_UNAVAILABLE, 2, 0, 0xff, 0xfe])),
            Err(FrameError::ReasonNotUtf8)
        ));
        assert!(matches!(
            d(framed(&[kind::RDMA_UNAVAILABLE, 3, 0, b'a'])),
            Err(FrameError::Truncated {
                kind: "RdmaUnavailable",
                field: "reason"
            })
        ));
        let reason = "é".repeat(MAX_MESSAGE);
        let (back, _) = Frame::decode(&encoded(&Frame::RdmaUnavailable {
            reason: reason.clone(),
        }))
        .unwrap();
        let Frame::RdmaUnavailable { reason: got } = back else {
            unreachable!()
        };
        assert_eq!(got.len(), MAX_MESSAGE);
        assert!(reason.starts_with(&got));
    }

    fn encoded(f: &Frame) -> Vec<u8> {
        let mut b = Vec::new();
        f.encode(&mut b);
        b
    }

    /// `len`-byte body `kind | payload` behind its header.
    fn framed(body: &[u8]) -> Vec<u8> {
        let mut b = (body.len() as u32).to_le_bytes().to_vec();
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn round_trip_every_frame() {
        let all = samples();
        let mut stream = Vec::new();
        for f in &all {
            let b = encoded(f);
            assert_eq!(
                b.len() - HEADER_LEN,
                u32::from_le_bytes(b[..4].try_into().unwrap()) as usize
            );
            let (back, used) = Frame::decode(&b).unwrap();
            assert_eq!((&back, used), (f, b.len()));
            assert_eq!(&read_frame(&mut &b[..]).unwrap(), f);
            write_frame(&mut stream, f).unwrap();
        }
        // Back to back in one buffer and one stream.
        let mut at = 0;
        let mut r = &stream[..];
        for f in &all {
            let (back, used) = Frame::decode(&stream[at..]).unwrap();
            assert_eq!(&back, f);
            at += used;
            assert_eq!(&read_frame(&mut r).unwrap(), f);
        }
        assert_eq!(at, stream.len());
        assert!(matches!(read_frame(&mut r), Err(FrameError::Closed)));
    }

    #[test]
    fn layout_is_pinned() {
        let b = encoded(&Frame::Read {
            first_page: 0x0102_0304,
            count: 2,
        });
        assert_eq!(b, [9, 0, 0, 0, 6, 4, 3, 2, 1, 2, 0, 0, 0]);
        assert_eq!(encoded(&Frame::Bye), [1, 0, 0, 0, 8]);
        let b = encoded(&Frame::Refused {
            reason: RefuseReason::BadProof,
            message: "no".to_owned(),
        });
        assert_eq!(b, [6, 0, 0, 0, 5, 2, 2, 0, b'n', b'o']);
        // Pages 0 and 2 of 3 are zero: map 0b101, one page of data.
        let f = Frame::pages_from(7, &[vec![0; PAGE], page(1), vec![0; PAGE]].concat()).unwrap();
        let b = encoded(&f);
        assert_eq!(b[4..14], [7, 7, 0, 0, 0, 3, 0, 0, 0, 0b101]);
        assert_eq!(b.len(), 14 + PAGE);
    }

    #[test]
    fn page_iter_gives_pages_in_order() {
        let pages = [page(1), vec![0; PAGE], page(2), vec![0; PAGE], page(3)];
        let f = Frame::pages_from(10, &pages.concat()).unwrap();
        let got: Vec<(u32, Option<&[u8]>)> = f.page_iter().unwrap().collect();
        let want: Vec<(u32, Option<&[u8]>)> = pages
            .iter()
            .enumerate()
            .map(|(i, p)| (10 + i as u32, (p[0] != 0).then_some(&p[..])))
            .collect();
        assert_eq!(got, want);
        assert!(Frame::Bye.page_iter().is_none());
        let Frame::Pages { data, .. } = &f else {
            unreachable!()
        };
        assert_eq!(data.len(), 3 * PAGE);
    }

    #[test]
    fn pages_from_refuses_bad_input() {
        assert!(matches!(
            Frame::pages_from(0, &[1; 100]),
            Err(FrameError::PagesDataLength {
                expected: PAGE,
                got: 100
            })
        ));
        assert!(matches!(
            Frame::pages_from(0, &[]),
            Err(FrameError::BadCount { count: 0, .. })
        ));
        assert!(matches!(
            Frame::pages_from(0, &vec![0; PAGE * (MAX_READ_PAGES as usize + 1)]),
            Err(FrameError::BadCount { count: 257, .. })
        ));
        assert!(matches!(
            Frame::pages_from(u32::MAX, &vec![0; PAGE]),
            Err(FrameError::PageRangeOverflow { .. })
        ));
    }

    #[test]
    fn every_prefix_is_incomplete() {
        for f in samples() {
            let b = encoded(&f);
            for n in 0..b.len() {
                let want = if n < HEADER_LEN {
                    HEADER_LEN - n
                } else {
                    b.len() - n
                };
                match Frame::decode(&b[..n]) {
                    Err(FrameError::Incomplete { needed }) => {
                        assert_eq!(needed, want, "{f:?} prefix {n}")
                    }
                    other => panic!("{f:?} prefix {n}: {other:?}"),
                }
                // Re-reading up to 1 MiB per prefix would take minutes; small frames suffice.
                if b.len() > 64 * 1024 {
                    continue;
                }
                // A blocking reader at end of stream mid-frame is an I/O error, not a frame.
                let got = read_frame(&mut &b[..n]);
                if n == 0 {
                    assert!(matches!(got, Err(FrameError::Closed)));
                } else {
                    assert!(
                        matches!(&got, Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof),
                        "{got:?}"
                    );
                }
            }
        }
    }

    /// Gives out its bytes, then fails the test if asked for more: proves the reader
    /// stopped at the header.
    struct HeaderOnly(Vec<u8>);
    impl Read for HeaderOnly {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            assert!(!self.0.is_empty(), "reader went past the header");
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0.drain(..n);
            Ok(n)
        }
    }

    #[test]
    fn oversized_refused_before_reading_payload() {
        for len in [u32::MAX, MAX_FRAME + 1] {
            let header = len.to_le_bytes();
            assert!(matches!(
                Frame::decode(&header),
                Err(FrameError::Oversized { len: l }) if l == len
            ));
            assert!(matches!(
                read_frame(&mut HeaderOnly(header.to_vec())),
                Err(FrameError::Oversized { len: l }) if l == len
            ));
        }
        // The limit itself is a length, not a refusal: the frame is merely incomplete.
        assert!(matches!(
            Frame::decode(&MAX_FRAME.to_le_bytes()),
            Err(FrameError::Incomplete { needed }) if needed == MAX_FRAME as usize
        ));
        assert!(matches!(
            Frame::decode(&[0, 0, 0, 0]),
            Err(FrameError::Empty)
        ));
        assert!(matches!(
            read_frame(&mut HeaderOnly(vec![0; 4])),
            Err(FrameError::Empty)
        ));
    }

    #[test]
    fn malformed_frames_refused() {
        let d = |body: &[u8]| Frame::decode(&framed(body)).map(|(f, _)| f);
        assert!(matches!(d(&[0]), Err(FrameError::UnknownKind(0))));
        assert!(matches!(d(&[99, 1, 2]), Err(FrameError::UnknownKind(99))));
        assert!(matches!(
            d(&[kind::HELLO, 1, 0, 1, 2, 3]),
            Err(FrameError::Truncated {
                kind: "Hello",
                field: "handle"
            })
        ));
        assert!(matches!(
            d(&[kind::BYE, 0]),
            Err(FrameError::TrailingBytes {
                kind: "Bye",
                extra: 1
            })
        ));
        let mut proof = encoded(&Frame::Proof { mac: [1; 32] })[4..].to_vec();
        proof.extend_from_slice(&[0, 0]);
        assert!(matches!(
            d(&proof),
            Err(FrameError::TrailingBytes {
                kind: "Proof",
                extra: 2
            })
        ));
        // Read counts.
        for count in [0u32, MAX_READ_PAGES + 1, u32::MAX] {
            let mut b = vec![kind::READ, 0, 0, 0, 0];
            b.extend_from_slice(&count.to_le_bytes());
            assert!(matches!(
                d(&b),
                Err(FrameError::BadCount { kind: "Read", count: c }) if c == count
            ));
        }
        let mut b = vec![kind::READ];
        b.extend_from_slice(&(u32::MAX - 1).to_le_bytes());
        b.extend_from_slice(&2u32.to_le_bytes());
        assert!(matches!(d(&b), Err(FrameError::PageRangeOverflow { .. })));
        // Refused: reason code, message length, encoding.
        assert!(matches!(
            d(&[kind::REFUSED, 0, 0, 0]),
            Err(FrameError::UnknownReason(0))
        ));
        assert!(matches!(
            d(&[kind::REFUSED, 8, 0, 0]),
            Err(FrameError::UnknownReason(8))
        ));
        assert!(matches!(
            d(&[kind::REFUSED, 1, 2, 0, 0xff, 0xfe]),
            Err(FrameError::MessageNotUtf8)
        ));
        let mut b = vec![kind::REFUSED, 1];
        b.extend_from_slice(&(MAX_MESSAGE as u16 + 1).to_le_bytes());
        b.extend_from_slice(&[b'a'; MAX_MESSAGE + 1]);
        assert!(matches!(
            d(&b),
            Err(FrameError::MessageTooLong { len: 1025 })
        ));
        assert!(matches!(
            d(&[kind::REFUSED, 1, 3, 0, b'a']),
            Err(FrameError::Truncated {
                kind: "Refused",
                field: "message"
            })
        ));
    }

    #[test]
    fn inconsistent_pages_refused() {
        let d = |body: &[u8]| Frame::decode(&framed(body)).map(|(f, _)| f);
        let header = |count: u32, map: &[u8]| {
            let mut b = vec![kind::PAGES, 0, 0, 0, 0];
            b.extend_from_slice(&count.to_le_bytes());
            b.extend_from_slice(map);
            b
        };
        // Three pages, page 1 zero: two pages of data expected.
        for (extra, got) in [
            (0, 0),
            (PAGE, PAGE),
            (3 * PAGE, 3 * PAGE),
            (2 * PAGE + 1, 2 * PAGE + 1),
        ] {
            let mut b = header(3, &[0b010]);
            b.resize(b.len() + extra, 1);
            assert!(
                matches!(
                    d(&b),
                    Err(FrameError::PagesDataLength { expected, got: g }) if expected == 2 * PAGE && g == got
                ),
                "{extra}"
            );
        }
        let mut ok = header(3, &[0b010]);
        ok.resize(ok.len() + 2 * PAGE, 1);
        assert!(d(&ok).is_ok());
        // A bit past the count, or a missing map byte.
        assert!(matches!(
            d(&header(3, &[0b1000])),
            Err(FrameError::ZeroMapPadding { count: 3 })
        ));
        assert!(matches!(
            d(&header(9, &[0xff])),
            Err(FrameError::Truncated {
                kind: "Pages",
                field: "zero_map"
            })
        ));
        assert!(matches!(
            d(&header(0, &[])),
            Err(FrameError::BadCount {
                kind: "Pages",
                count: 0
            })
        ));
        assert!(matches!(
            d(&header(MAX_READ_PAGES + 1, &[])),
            Err(FrameError::BadCount { count: 257, .. })
        ));
        // write_frame refuses the same inconsistencies before writing.
        let bad = Frame::Pages {
            first_page: 0,
            count: 2,
            zero_map: [0; ZERO_MAP_BYTES],
            data: vec![1; PAGE],
        };
        let mut out = Vec::new();
        assert!(matches!(
            write_frame(&mut out, &bad),
            Err(FrameError::PagesDataLength { .. })
        ));
        assert!(out.is_empty());
        assert!(bad.page_iter().is_none());
        let mut map = [0; ZERO_MAP_BYTES];
        map[5] = 1;
        let stray = Frame::Pages {
            first_page: 0,
            count: 1,
            zero_map: map,
            data: vec![1; PAGE],
        };
        assert!(matches!(
            stray.check(),
            Err(FrameError::ZeroMapPadding { .. })
        ));
    }

    #[test]
    fn long_refuse_message_is_cut_on_a_char_boundary() {
        let message = format!("a{}", "é".repeat(MAX_MESSAGE));
        let f = Frame::Refused {
            reason: RefuseReason::Internal,
            message: message.clone(),
        };
        let (back, _) = Frame::decode(&encoded(&f)).unwrap();
        let Frame::Refused { message: got, .. } = back else {
            unreachable!()
        };
        assert_eq!(got.len(), MAX_MESSAGE - 1);
        assert!(message.starts_with(&got));
    }

    #[test]
    fn reason_codes() {
        use RefuseReason::*;
        for r in [
            UnknownHandle,
            BadProof,
            Expired,
            Revoked,
            BadRequest,
            Busy,
            Internal,
        ] {
            assert_eq!(RefuseReason::try_from(u8::from(r)).unwrap(), r);
        }
        assert!(matches!(
            RefuseReason::try_from(0),
            Err(FrameError::UnknownReason(0))
        ));
    }

    #[test]
    fn debug_does_not_dump_pages() {
        let f = Frame::pages_from(0, &[page(1), vec![0; PAGE]].concat()).unwrap();
        let s = format!("{f:?}");
        assert_eq!(
            s,
            "Pages { first_page: 0, count: 2, zeros: 1, data_len: 4096 }"
        );
    }

    const KEY: [u8; 32] = [7; 32];
    const SERVER: [u8; 32] = [0x11; 32];
    const CLIENT: [u8; 16] = [0x22; 16];

    #[test]
    fn proof_verifies_only_with_the_same_inputs() {
        let mac = proof(&KEY, 42, &SERVER, &CLIENT);
        assert!(verify_proof(&KEY, 42, &SERVER, &CLIENT, &mac));
        for i in 0..32 {
            let mut k = KEY;
            k[i] ^= 1;
            assert!(
                !verify_proof(&k, 42, &SERVER, &CLIENT, &mac),
                "key byte {i}"
            );
            let mut s = SERVER;
            s[i] ^= 0x80;
            assert!(
                !verify_proof(&KEY, 42, &s, &CLIENT, &mac),
                "server nonce byte {i}"
            );
            let mut m = mac;
            m[i] ^= 1;
            assert!(
                !verify_proof(&KEY, 42, &SERVER, &CLIENT, &m),
                "mac byte {i}"
            );
        }
        for i in 0..16 {
            let mut c = CLIENT;
            c[i] ^= 1;
            assert!(
                !verify_proof(&KEY, 42, &SERVER, &c, &mac),
                "client nonce byte {i}"
            );
        }
        for bit in 0..64 {
            assert!(
                !verify_proof(&KEY, 42 ^ (1 << bit), &SERVER, &CLIENT, &mac),
                "handle bit {bit}"
            );
        }
        // Swapping the roles of the nonces' bytes is a different message too.
        assert_ne!(proof(&KEY, 42, &[0x22; 32], &[0x11; 16]), mac);
    }

    /// Pins the MAC input layout against an independent HMAC implementation (Python's
    /// `hmac`), so a refactor cannot silently change what a proof is.
    #[test]
    fn proof_known_answer() {
        let mac = proof(&KEY, 42, &SERVER, &CLIENT);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, KNOWN_PROOF);
    }

    // python3 -c 'import hmac,hashlib,struct; print(hmac.new(b"\x07"*32,
    //   b"spindle-pages-v1"+struct.pack("<Q",42)+b"\x11"*32+b"\x22"*16, hashlib.sha256).hexdigest())'
    const KNOWN_PROOF: &str = "55e02a3ca98d8e08786662347cf066b8b0f3e1ef04022752103704130f1bac99";

    #[test]
    fn recorded_proof_fails_on_a_new_connection() {
        let first = fresh_nonce::<32>().unwrap();
        let second = fresh_nonce::<32>().unwrap();
        assert_ne!(first, second, "two connections got the same server nonce");
        let recorded = proof(&KEY, 42, &first, &CLIENT);
        assert!(verify_proof(&KEY, 42, &first, &CLIENT, &recorded));
        assert!(!verify_proof(&KEY, 42, &second, &CLIENT, &recorded));
        // A replaying client cannot help it by reusing the old client nonce either: the
        // server's nonce is new.
        let c2 = fresh_nonce::<16>().unwrap();
        assert!(!verify_proof(&KEY, 42, &second, &c2, &recorded));
    }

    #[test]
    fn handshake_over_a_stream() {
        let key = fresh_nonce::<32>().unwrap();
        let client_nonce = fresh_nonce::<16>().unwrap();
        let server_nonce = fresh_nonce::<32>().unwrap();
        let mut wire = Vec::new();
        write_frame(
            &mut wire,
            &Frame::Hello {
                version: PROTOCOL_VERSION,
                handle: 9,
                client_nonce,
            },
        )
        .unwrap();
        write_frame(
            &mut wire,
            &Frame::Proof {
                mac: proof(&key, 9, &server_nonce, &client_nonce),
            },
        )
        .unwrap();
        let mut r = &wire[..];
        let Frame::Hello {
            handle,
            client_nonce: cn,
            ..
        } = read_frame(&mut r).unwrap()
        else {
            panic!("expected Hello")
        };
        let Frame::Proof { mac } = read_frame(&mut r).unwrap() else {
            panic!("expected Proof")
        };
        assert!(verify_proof(&key, handle, &server_nonce, &cn, &mac));
    }

    use crate::test_rng::XorShift;

    /// Whatever arrives, decode answers: random bodies behind a plausible header (a random
    /// header alone is nearly always oversized), random raw buffers, and mutations of valid
    /// frames. Anything that decodes re-encodes to the bytes it came from.
    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        let valid: Vec<Vec<u8>> = samples()
            .iter()
            .filter(|f| encoded(f).len() < 64 * 1024)
            .map(encoded)
            .collect();
        let mut decoded = 0;
        for i in 0..100_000 {
            let buf = match i % 3 {
                0 => {
                    let len = rng.below(80);
                    let mut body: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    if let Some(k) = body.first_mut() {
                        *k = 1 + (*k % 13);
                    }
                    framed(&body)
                }
                1 => (0..rng.below(40)).map(|_| rng.next() as u8).collect(),
                _ => {
                    let mut b = valid[rng.below(valid.len())].clone();
                    for _ in 0..1 + rng.below(3) {
                        match rng.below(4) {
                            0 if b.len() > HEADER_LEN => {
                                let at = HEADER_LEN + rng.below(b.len() - HEADER_LEN);
                                b[at] = rng.next() as u8;
                            }
                            1 if !b.is_empty() => {
                                let at = rng.below(b.len());
                                b[at] ^= 1 << rng.below(8);
                            }
                            2 => b.truncate(rng.below(b.len() + 1)),
                            _ => b.push(rng.next() as u8),
                        }
                    }
                    b
                }
            };
            match Frame::decode(&buf) {
                Ok((f, used)) => {
                    decoded += 1;
                    assert!(used <= buf.len());
                    assert_eq!(encoded(&f), buf[..used]);
                    assert!(f.check().is_ok());
                }
                Err(FrameError::Incomplete { needed }) => assert!(needed > 0),
                Err(_) => {}
            }
            let _ = read_frame(&mut &buf[..]);
        }
        assert!(decoded > 1000, "{decoded}");
    }
}
