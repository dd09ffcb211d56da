//! The image descriptor: the name of a prepared (forkable) Wasm instance image.
//!
//! `fork_prepare` on the parent node yields one; `fork_resume` on any node needs nothing else
//! to start a child: where the parent's page server listens, which handle to ask for, the key
//! that proves the right to ask, which module and engine the child must instantiate to make
//! sense of the pages, and how big the memory is. It is a separate message from the 32-byte
//! chain descriptor, which names a request's payload and never leaves a node.
//!
//! The descriptor is a credential: `key` (and, with RDMA, `rdma.rkey`) grants reading the
//! parent instance's whole linear memory. It travels only over trusted control channels
//! (gateway ↔ node service) and is never sent to a page server, which gets a challenge-response
//! proof instead (see [`crate::pages`]). `Debug` redacts the secrets so a descriptor can be
//! logged; the text form ([`Display`](fmt::Display)) is the full credential and must not be.
//!
//! On the wire (all integers little-endian, no padding):
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `b"SPDLIMG\0"` |
//! | 2 | format version, [`ImageDescriptor::VERSION`] |
//! | 8 | handle |
//! | 32 | key |
//! | 32 | module hash (SHA-256 of the module bytes) |
//! | 8 | memory bytes |
//! | 4 | page size |
//! | 1 + 6 or 1 + 18 | parent address: tag 4 + IPv4 + port, or tag 6 + IPv6 + port |
//! | 1 + n | engine identity, n ≤ [`MAX_ENGINE`] |
//! | 1 (+ 42) | RDMA presence 0 or 1, then gid 16, lid 2, qp_num 4, rkey 4, remote_addr 8, len 8 |
//!
//! Decoding checks every byte: a descriptor that decodes is one a child can act on without
//! further shape checks (whether the handle still exists is the page server's to say).

use core::fmt;
use core::str::FromStr;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use sha2::{Digest, Sha256};

/// First bytes of every encoded image descriptor.
pub const MAGIC: [u8; 8] = *b"SPDLIMG\0";

/// Bytes per page, in the descriptor and on the page-server wire: the unit a child faults
/// in.
pub const PAGE_SIZE: u32 = 4096;

/// Longest engine identity string, in bytes.
pub const MAX_ENGINE: usize = 128;

/// A Wasm linear memory grows in 64 KiB pages.
pub const WASM_PAGE: u64 = 65536;

/// A wasm32 memory is at most 65536 Wasm pages.
pub const MAX_MEMORY: u64 = 1 << 32;

/// Prefix of the text form.
pub const TEXT_PREFIX: &str = "spindle-image:";

/// The InfiniBand queue-pair number field is 24 bits wide.
const MAX_QP_NUM: u32 = 0x00ff_ffff;

const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;

const FIXED_LEN: usize = 8 + 2 + 8 + 32 + 32 + 8 + 4;
const RDMA_LEN: usize = 16 + 2 + 4 + 4 + 8 + 8;

/// Longest possible encoding (IPv6 parent, longest engine, RDMA present).
pub const MAX_ENCODED: usize = FIXED_LEN + 1 + 18 + 1 + MAX_ENGINE + 1 + RDMA_LEN;

/// SHA-256 of a module's bytes, as [`ImageDescriptor::module_hash`] carries it.
pub fn module_hash(module: &[u8]) -> [u8; 32] {
    Sha256::digest(module).into()
}

/// A prepared instance image, as a child node needs to know it.
///
/// Fields are public because it is a plain message; [`ImageDescriptor::validate`] states the
/// rules, which [`ImageDescriptor::decode`] always applies. `encode` does not validate: an
/// invalid descriptor encodes to bytes the other end refuses.
#[derive(Clone, PartialEq, Eq)]
pub struct ImageDescriptor {
    /// Image handle id on the parent's page server. Not secret: guessing one gains nothing
    /// without the key.
    pub handle: u64,
    /// Per-handle secret, 256 random bits (make one with
    /// [`fresh_nonce::<32>`](crate::pages::fresh_nonce)).
    pub key: [u8; 32],
    /// The parent node's page server. Only address and port travel: an IPv6 flow label or
    /// scope id means nothing on another node, so they decode as 0.
    pub parent: SocketAddr,
    /// SHA-256 of the module bytes ([`module_hash`]): the child must instantiate the same
    /// module for the pages to make sense.
    pub module_hash: [u8; 32],
    /// Engine/ABI identity (e.g. `wasmer-7.4/cranelift/x86_64/spindle-abi-1`): printable
    /// ASCII, 1..=[`MAX_ENGINE`] bytes. A child whose engine string differs must not resume.
    pub engine: String,
    /// Linear memory size: a multiple of [`WASM_PAGE`], at most [`MAX_MEMORY`].
    pub memory_bytes: u64,
    /// Transfer page size: always [`PAGE_SIZE`]; carried so a later format can change it.
    pub page_size: u32,
    /// Where to read the memory by one-sided RDMA READ, if the parent registered it.
    pub rdma: Option<RdmaInfo>,
}

/// The parent's RDMA device, and possibly its registered region and queue pair, for one-sided
/// RDMA READ.
///
/// A Spindle page server fills in only its device (`gid`, `lid`) and `len` (the memory's
/// size), with `qp_num`, `rkey` and `remote_addr` 0: every child gets its own queue pair, and
/// the region (registered at the first child's request) and its rkey go only to a child that
/// proved the key, in [`RdmaAccept`](crate::pages::Frame::RdmaAccept). Its presence says the
/// parent can serve RDMA READ, so a child asks for it (`RdmaConnect`) instead of using TCP.
///
/// `rkey` is a capability like the descriptor's key (the NIC checks nothing else), so `Debug`
/// redacts it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RdmaInfo {
    pub gid: [u8; 16],
    pub lid: u16,
    /// 24-bit queue-pair (or DCT) number.
    pub qp_num: u32,
    pub rkey: u32,
    /// Address of the first byte of linear memory in the parent's registered region.
    pub remote_addr: u64,
    /// Length of the registered region: at least `memory_bytes`.
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageDescriptorError {
    #[error("not an image descriptor (magic bytes are not SPDLIMG\\0)")]
    BadMagic,
    #[error("image descriptor format version {0} is not supported (this build knows 1)")]
    UnsupportedVersion(u16),
    #[error("image descriptor truncated: {field} at byte {offset} is missing")]
    Truncated { field: &'static str, offset: usize },
    #[error("image descriptor has {extra} trailing bytes after its last field")]
    TrailingBytes { extra: usize },
    #[error("unknown parent address family tag {0} (known: 4, 6)")]
    BadAddressFamily(u8),
    #[error("unknown RDMA presence byte {0} (known: 0 absent, 1 present)")]
    BadRdmaTag(u8),
    #[error("engine identity is empty")]
    EngineEmpty,
    #[error("engine identity is {0} bytes, longer than {MAX_ENGINE}")]
    EngineTooLong(usize),
    #[error("engine identity byte {at} is {byte:#04x}, not printable ASCII")]
    EngineNotAscii { at: usize, byte: u8 },
    #[error("memory size {0} is not a multiple of 64 KiB Wasm pages")]
    MemoryNotWasmPages(u64),
    #[error("memory size {0} exceeds the 4 GiB a wasm32 memory can have")]
    MemoryTooLarge(u64),
    #[error("page size {0} is not supported (only 4096)")]
    BadPageSize(u32),
    #[error("RDMA queue-pair number {0:#x} does not fit in 24 bits")]
    RdmaBadQpNum(u32),
    #[error(
        "RDMA region at {remote_addr:#x} of {len} bytes wraps past the end of the address space"
    )]
    RdmaRangeOverflow { remote_addr: u64, len: u64 },
    #[error("RDMA region of {len} bytes is shorter than the {memory_bytes}-byte memory")]
    RdmaTooShort { len: u64, memory_bytes: u64 },
}

/// Why a text form did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageTextError {
    #[error("an image descriptor's text form starts with `spindle-image:`")]
    MissingPrefix,
    #[error("image descriptor text is {len} bytes, longer than any valid descriptor")]
    TooLong { len: usize },
    #[error("{found:?} at byte {at} is not a lowercase hex digit")]
    BadHexDigit { at: usize, found: char },
    #[error("image descriptor hex has an odd number of digits ({0})")]
    OddHexLength(usize),
    #[error(transparent)]
    Invalid(#[from] ImageDescriptorError),
}

impl ImageDescriptor {
    /// The format version this build writes and the only one it reads. Not a field: a
    /// descriptor in memory is always this version.
    pub const VERSION: u16 = 1;

    /// The rules `decode` applies to the fields, for producers that want to check before
    /// sending.
    pub fn validate(&self) -> Result<(), ImageDescriptorError> {
        use ImageDescriptorError as E;
        check_engine(self.engine.as_bytes())?;
        if !self.memory_bytes.is_multiple_of(WASM_PAGE) {
            return Err(E::MemoryNotWasmPages(self.memory_bytes));
        }
        if self.memory_bytes > MAX_MEMORY {
            return Err(E::MemoryTooLarge(self.memory_bytes));
        }
        if self.page_size != PAGE_SIZE {
            return Err(E::BadPageSize(self.page_size));
        }
        if let Some(r) = &self.rdma {
            if r.qp_num > MAX_QP_NUM {
                return Err(E::RdmaBadQpNum(r.qp_num));
            }
            if r.remote_addr.checked_add(r.len).is_none() {
                return Err(E::RdmaRangeOverflow {
                    remote_addr: r.remote_addr,
                    len: r.len,
                });
            }
            if r.len < self.memory_bytes {
                return Err(E::RdmaTooShort {
                    len: r.len,
                    memory_bytes: self.memory_bytes,
                });
            }
        }
        Ok(())
    }

    /// Number of [`PAGE_SIZE`] pages in the memory (what `pages::Frame::Read` indexes).
    pub fn page_count(&self) -> u64 {
        self.memory_bytes / u64::from(self.page_size.max(1))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(MAX_ENCODED);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&Self::VERSION.to_le_bytes());
        b.extend_from_slice(&self.handle.to_le_bytes());
        b.extend_from_slice(&self.key);
        b.extend_from_slice(&self.module_hash);
        b.extend_from_slice(&self.memory_bytes.to_le_bytes());
        b.extend_from_slice(&self.page_size.to_le_bytes());
        match self.parent {
            SocketAddr::V4(a) => {
                b.push(FAMILY_V4);
                b.extend_from_slice(&a.ip().octets());
                b.extend_from_slice(&a.port().to_le_bytes());
            }
            SocketAddr::V6(a) => {
                b.push(FAMILY_V6);
                b.extend_from_slice(&a.ip().octets());
                b.extend_from_slice(&a.port().to_le_bytes());
            }
        }
        // An over-long engine is cut at 255 bytes, which decode then refuses as too long.
        let engine = self.engine.as_bytes();
        let n = engine.len().min(usize::from(u8::MAX));
        b.push(n as u8);
        b.extend_from_slice(&engine[..n]);
        match &self.rdma {
            None => b.push(0),
            Some(r) => {
                b.push(1);
                b.extend_from_slice(&r.gid);
                b.extend_from_slice(&r.lid.to_le_bytes());
                b.extend_from_slice(&r.qp_num.to_le_bytes());
                b.extend_from_slice(&r.rkey.to_le_bytes());
                b.extend_from_slice(&r.remote_addr.to_le_bytes());
                b.extend_from_slice(&r.len.to_le_bytes());
            }
        }
        b
    }

    pub fn decode(buf: &[u8]) -> Result<ImageDescriptor, ImageDescriptorError> {
        use ImageDescriptorError as E;
        // A short buffer that agrees with the magic so far is a truncated descriptor, not a
        // foreign one.
        let head = &buf[..buf.len().min(MAGIC.len())];
        if head != &MAGIC[..head.len()] {
            return Err(E::BadMagic);
        }
        let mut c = Cursor::new(buf);
        let t = |field, c: &Cursor| E::Truncated {
            field,
            offset: c.pos(),
        };
        c.take(MAGIC.len()).ok_or_else(|| t("magic", &c))?;
        let version = c.u16().ok_or_else(|| t("version", &c))?;
        if version != Self::VERSION {
            return Err(E::UnsupportedVersion(version));
        }
        let handle = c.u64().ok_or_else(|| t("handle", &c))?;
        let key = c.array().ok_or_else(|| t("key", &c))?;
        let module_hash = c.array().ok_or_else(|| t("module hash", &c))?;
        let memory_bytes = c.u64().ok_or_else(|| t("memory size", &c))?;
        let page_size = c.u32().ok_or_else(|| t("page size", &c))?;
        let parent = match c.u8().ok_or_else(|| t("address family", &c))? {
            FAMILY_V4 => {
                let ip: [u8; 4] = c.array().ok_or_else(|| t("IPv4 address", &c))?;
                let port = c.u16().ok_or_else(|| t("port", &c))?;
                SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port))
            }
            FAMILY_V6 => {
                let ip: [u8; 16] = c.array().ok_or_else(|| t("IPv6 address", &c))?;
                let port = c.u16().ok_or_else(|| t("port", &c))?;
                SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, 0, 0))
            }
            other => return Err(E::BadAddressFamily(other)),
        };
        let engine_len = usize::from(c.u8().ok_or_else(|| t("engine length", &c))?);
        if engine_len > MAX_ENGINE {
            return Err(E::EngineTooLong(engine_len));
        }
        let engine = c.take(engine_len).ok_or_else(|| t("engine", &c))?;
        check_engine(engine)?;
        let engine = engine.iter().copied().map(char::from).collect();
        let rdma = match c.u8().ok_or_else(|| t("RDMA presence", &c))? {
            0 => None,
            1 => Some(RdmaInfo {
                gid: c.array().ok_or_else(|| t("RDMA gid", &c))?,
                lid: c.u16().ok_or_else(|| t("RDMA lid", &c))?,
                qp_num: c.u32().ok_or_else(|| t("RDMA qp_num", &c))?,
                rkey: c.u32().ok_or_else(|| t("RDMA rkey", &c))?,
                remote_addr: c.u64().ok_or_else(|| t("RDMA remote_addr", &c))?,
                len: c.u64().ok_or_else(|| t("RDMA len", &c))?,
            }),
            other => return Err(E::BadRdmaTag(other)),
        };
        if c.remaining() != 0 {
            return Err(E::TrailingBytes {
                extra: c.remaining(),
            });
        }
        let d = ImageDescriptor {
            handle,
            key,
            parent,
            module_hash,
            engine,
            memory_bytes,
            page_size,
            rdma,
        };
        d.validate()?;
        Ok(d)
    }
}

fn check_engine(engine: &[u8]) -> Result<(), ImageDescriptorError> {
    use ImageDescriptorError as E;
    if engine.is_empty() {
        return Err(E::EngineEmpty);
    }
    if engine.len() > MAX_ENGINE {
        return Err(E::EngineTooLong(engine.len()));
    }
    // Printable only: the string ends up in logs and error messages.
    match engine.iter().position(|b| !(0x20..=0x7e).contains(b)) {
        Some(at) => Err(E::EngineNotAscii {
            at,
            byte: engine[at],
        }),
        None => Ok(()),
    }
}

impl fmt::Debug for ImageDescriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageDescriptor")
            .field("handle", &self.handle)
            .field("key", &format_args!("<redacted>"))
            .field("parent", &self.parent)
            .field("module_hash", &format_args!("{}", Hex(&self.module_hash)))
            .field("engine", &self.engine)
            .field("memory_bytes", &self.memory_bytes)
            .field("page_size", &self.page_size)
            .field("rdma", &self.rdma)
            .finish()
    }
}

impl fmt::Debug for RdmaInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdmaInfo")
            .field("gid", &format_args!("{}", Hex(&self.gid)))
            .field("lid", &self.lid)
            .field("qp_num", &self.qp_num)
            .field("rkey", &format_args!("<redacted>"))
            .field("remote_addr", &format_args!("{:#x}", self.remote_addr))
            .field("len", &self.len)
            .finish()
    }
}

/// The text form, `spindle-image:` + lowercase hex of [`ImageDescriptor::encode`]. It
/// contains the key: never log it (log the `Debug` form).
impl fmt::Display for ImageDescriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{TEXT_PREFIX}{}", Hex(&self.encode()))
    }
}

/// Parses exactly the text `Display` writes: no surrounding whitespace, no uppercase digits,
/// so one descriptor has one text form.
impl FromStr for ImageDescriptor {
    type Err = ImageTextError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix(TEXT_PREFIX)
            .ok_or(ImageTextError::MissingPrefix)?;
        // Bound the work an HTTP caller can make us do before looking at the digits.
        if hex.len() > 2 * MAX_ENCODED {
            return Err(ImageTextError::TooLong { len: s.len() });
        }
        let bytes = decode_hex(hex).map_err(|e| match e {
            ImageTextError::BadHexDigit { at, found } => ImageTextError::BadHexDigit {
                at: at + TEXT_PREFIX.len(),
                found,
            },
            other => other,
        })?;
        Ok(ImageDescriptor::decode(&bytes)?)
    }
}

/// Lowercase hex of a byte string.
struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(2 * self.0.len());
        for &b in self.0 {
            s.push(char::from(DIGITS[usize::from(b >> 4)]));
            s.push(char::from(DIGITS[usize::from(b & 0xf)]));
        }
        f.write_str(&s)
    }
}

fn decode_hex(hex: &str) -> Result<Vec<u8>, ImageTextError> {
    fn nibble(c: char) -> Option<u8> {
        match c {
            '0'..='9' => Some(c as u8 - b'0'),
            'a'..='f' => Some(c as u8 - b'a' + 10),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(hex.len() / 2);
    let mut high: Option<u8> = None;
    for (at, c) in hex.char_indices() {
        let n = nibble(c).ok_or(ImageTextError::BadHexDigit { at, found: c })?;
        match high.take() {
            None => high = Some(n),
            Some(h) => out.push(h << 4 | n),
        }
    }
    if high.is_some() {
        return Err(ImageTextError::OddHexLength(hex.len()));
    }
    Ok(out)
}

/// Bounds-checked little-endian reader over a byte slice; every read is `None` past the end,
/// so a decoder cannot index out of bounds.
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ImageDescriptorError as E;

    const ENGINE: &str = "wasmer-7.4/cranelift/x86_64/spindle-abi-1";

    fn v4() -> ImageDescriptor {
        ImageDescriptor {
            handle: 0x0102_0304_0506_0708,
            key: core::array::from_fn(|i| 0xa0 ^ i as u8),
            parent: "10.0.0.7:7300".parse().unwrap(),
            module_hash: module_hash(b"\0asm\x01\0\0\0"),
            engine: ENGINE.to_owned(),
            memory_bytes: 17 * WASM_PAGE,
            page_size: PAGE_SIZE,
            rdma: None,
        }
    }

    fn rdma() -> RdmaInfo {
        RdmaInfo {
            gid: core::array::from_fn(|i| i as u8),
            lid: 0x1234,
            qp_num: 0x00ab_cdef,
            rkey: 0xdead_beef,
            remote_addr: 0x7f00_0000_0000,
            len: 17 * WASM_PAGE,
        }
    }

    /// v4/v6 × with/without RDMA, plus the extremes of each bounded field.
    fn samples() -> Vec<ImageDescriptor> {
        let v6 = ImageDescriptor {
            parent: "[2001:db8::1:2]:65535".parse().unwrap(),
            ..v4()
        };
        vec![
            v4(),
            ImageDescriptor {
                rdma: Some(rdma()),
                ..v4()
            },
            v6.clone(),
            ImageDescriptor {
                rdma: Some(rdma()),
                ..v6.clone()
            },
            ImageDescriptor {
                engine: "x".repeat(MAX_ENGINE),
                memory_bytes: MAX_MEMORY,
                rdma: Some(RdmaInfo {
                    remote_addr: u64::MAX - MAX_MEMORY,
                    len: MAX_MEMORY,
                    qp_num: MAX_QP_NUM,
                    ..rdma()
                }),
                ..v6
            },
            ImageDescriptor {
                engine: " ~".to_owned(),
                memory_bytes: 0,
                ..v4()
            },
        ]
    }

    #[test]
    fn round_trip() {
        for d in samples() {
            let b = d.encode();
            assert!(b.len() <= MAX_ENCODED);
            assert_eq!(ImageDescriptor::decode(&b), Ok(d.clone()), "{d:?}");
        }
        let longest = &samples()[4];
        assert_eq!(longest.encode().len(), MAX_ENCODED);
    }

    #[test]
    fn layout_is_pinned() {
        let b = v4().encode();
        assert_eq!(&b[..8], b"SPDLIMG\0");
        assert_eq!(&b[8..10], &[1, 0]);
        assert_eq!(&b[10..18], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[18..50], &v4().key);
        assert_eq!(&b[82..90], &(17 * WASM_PAGE).to_le_bytes());
        assert_eq!(&b[90..94], &4096u32.to_le_bytes());
        assert_eq!(&b[94..101], &[4, 10, 0, 0, 7, 0x84, 0x1c]);
        assert_eq!(usize::from(b[101]), ENGINE.len());
        assert_eq!(b.last(), Some(&0));
        // SHA-256 of the empty string, so the hash function cannot silently change.
        assert_eq!(
            Hex(&module_hash(b"")).to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn v6_scope_and_flow_are_not_carried() {
        let d = ImageDescriptor {
            parent: SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 80, 7, 3)),
            ..v4()
        };
        let back = ImageDescriptor::decode(&d.encode()).unwrap();
        assert_eq!(
            back.parent,
            SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 80, 0, 0))
        );
    }

    #[test]
    fn every_strict_prefix_is_truncated() {
        for d in samples() {
            let b = d.encode();
            for n in 0..b.len() {
                match ImageDescriptor::decode(&b[..n]) {
                    Err(E::Truncated { offset, .. }) => assert!(offset <= n, "prefix {n}"),
                    other => panic!("prefix of {n}/{} bytes gave {other:?}", b.len()),
                }
            }
        }
    }

    #[test]
    fn trailing_bytes_refused() {
        let mut b = v4().encode();
        b.push(0);
        assert_eq!(
            ImageDescriptor::decode(&b),
            Err(E::TrailingBytes { extra: 1 })
        );
    }

    #[test]
    fn bad_magic_and_version() {
        let mut b = v4().encode();
        b[0] = b'X';
        assert_eq!(ImageDescriptor::decode(&b), Err(E::BadMagic));
        assert_eq!(ImageDescriptor::decode(b"SPX"), Err(E::BadMagic));
        let mut b = v4().encode();
        b[8] = 2;
        assert_eq!(ImageDescriptor::decode(&b), Err(E::UnsupportedVersion(2)));
    }

    #[test]
    fn bad_tags_refused() {
        let mut b = v4().encode();
        b[94] = 5;
        assert_eq!(ImageDescriptor::decode(&b), Err(E::BadAddressFamily(5)));
        let mut b = v4().encode();
        *b.last_mut().unwrap() = 2;
        assert_eq!(ImageDescriptor::decode(&b), Err(E::BadRdmaTag(2)));
    }

    /// Field edits that encode fine but must not decode, each with its own variant; also
    /// checked through `validate` so producers get the same answer.
    #[test]
    fn invalid_fields_refused() {
        let with_rdma = |r: RdmaInfo| ImageDescriptor {
            rdma: Some(r),
            ..v4()
        };
        let cases = [
            (
                ImageDescriptor {
                    engine: String::new(),
                    ..v4()
                },
                E::EngineEmpty,
            ),
            (
                ImageDescriptor {
                    engine: "y".repeat(MAX_ENGINE + 1),
                    ..v4()
                },
                E::EngineTooLong(MAX_ENGINE + 1),
            ),
            (
                ImageDescriptor {
                    engine: "wasmer\n".to_owned(),
                    ..v4()
                },
                E::EngineNotAscii { at: 6, byte: b'\n' },
            ),
            (
                ImageDescriptor {
                    engine: "wäsmer".to_owned(),
                    ..v4()
                },
                E::EngineNotAscii { at: 1, byte: 0xc3 },
            ),
            (
                ImageDescriptor {
                    memory_bytes: WASM_PAGE + 4096,
                    ..v4()
                },
                E::MemoryNotWasmPages(WASM_PAGE + 4096),
            ),
            (
                ImageDescriptor {
                    memory_bytes: MAX_MEMORY + WASM_PAGE,
                    ..v4()
                },
                E::MemoryTooLarge(MAX_MEMORY + WASM_PAGE),
            ),
            (
                ImageDescriptor {
                    page_size: 65536,
                    ..v4()
                },
                E::BadPageSize(65536),
            ),
            (
                with_rdma(RdmaInfo {
                    qp_num: 1 << 24,
                    ..rdma()
                }),
                E::RdmaBadQpNum(1 << 24),
            ),
            (
                with_rdma(RdmaInfo {
                    remote_addr: u64::MAX - 10,
                    ..rdma()
                }),
                E::RdmaRangeOverflow {
                    remote_addr: u64::MAX - 10,
                    len: 17 * WASM_PAGE,
                },
            ),
            (
                with_rdma(RdmaInfo {
                    len: 17 * WASM_PAGE - 1,
                    ..rdma()
                }),
                E::RdmaTooShort {
                    len: 17 * WASM_PAGE - 1,
                    memory_bytes: 17 * WASM_PAGE,
                },
            ),
        ];
        for (d, want) in cases {
            assert_eq!(ImageDescriptor::decode(&d.encode()), Err(want.clone()));
            assert_eq!(d.validate(), Err(want));
        }
        // Longer than a length byte can say: encode cuts it, decode still refuses it.
        let d = ImageDescriptor {
            engine: "z".repeat(300),
            ..v4()
        };
        assert_eq!(d.validate(), Err(E::EngineTooLong(300)));
        assert_eq!(
            ImageDescriptor::decode(&d.encode()),
            Err(E::EngineTooLong(255))
        );
        for d in samples() {
            assert_eq!(d.validate(), Ok(()));
        }
    }

    #[test]
    fn debug_redacts_secrets() {
        let d = ImageDescriptor {
            key: [0x5a; 32],
            rdma: Some(RdmaInfo {
                rkey: 0x1357_9bdf,
                ..rdma()
            }),
            ..v4()
        };
        let s = format!("{d:?}");
        assert!(s.contains("key: <redacted>"), "{s}");
        assert!(s.contains("rkey: <redacted>"), "{s}");
        assert!(!s.contains("5a5a"), "{s}");
        assert!(!s.contains("90, 90"), "{s}");
        assert!(!s.contains("1357") && !s.contains(&0x1357_9bdfu32.to_string()));
        assert!(s.contains(ENGINE) && s.contains("10.0.0.7:7300"));
    }

    #[test]
    fn text_round_trip() {
        for d in samples() {
            let s = d.to_string();
            assert!(s.starts_with("spindle-image:"));
            let hex = &s[TEXT_PREFIX.len()..];
            assert!(hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')));
            assert_eq!(hex.len(), 2 * d.encode().len());
            assert_eq!(s.parse::<ImageDescriptor>(), Ok(d));
        }
    }

    #[test]
    fn text_errors_say_what_is_wrong() {
        type T = ImageTextError;
        let s = v4().to_string();
        let parse = |s: &str| s.parse::<ImageDescriptor>();
        assert_eq!(parse(&s[1..]), Err(T::MissingPrefix));
        assert_eq!(parse(&format!(" {s}")), Err(T::MissingPrefix));
        assert_eq!(
            parse(
                &s.to_uppercase()
                    .replacen("SPINDLE-IMAGE", "spindle-image", 1)
            ),
            Err(T::BadHexDigit {
                at: TEXT_PREFIX.len() + 7,
                found: 'C'
            })
        );
        assert_eq!(
            parse(&format!("{s}\n")),
            Err(T::BadHexDigit {
                at: s.len(),
                found: '\n'
            })
        );
        assert_eq!(
            parse(&format!("{TEXT_PREFIX}53é0")),
            Err(T::BadHexDigit {
                at: 16, found: 'é'
            })
        );
        assert_eq!(
            parse(&s[..s.len() - 1]),
            Err(T::OddHexLength(s.len() - TEXT_PREFIX.len() - 1))
        );
        assert_eq!(
            parse(&s[..s.len() - 2]),
            Err(T::Invalid(E::Truncated {
                field: "RDMA presence",
                offset: 102 + ENGINE.len()
            }))
        );
        assert_eq!(
            parse(TEXT_PREFIX),
            Err(T::Invalid(E::Truncated {
                field: "magic",
                offset: 0
            }))
        );
        let long = format!("{TEXT_PREFIX}{}", "0".repeat(2 * MAX_ENCODED + 2));
        assert_eq!(parse(&long), Err(T::TooLong { len: long.len() }));
        // The messages name the problem.
        let msg = parse("spindle-image:zz").unwrap_err().to_string();
        assert!(msg.contains("'z'") && msg.contains("byte 14"), "{msg}");
    }

    use crate::test_rng::XorShift;

    /// Whatever arrives, decode answers: random buffers (mostly behind a valid magic and
    /// version, or they would all stop there) and random mutations of valid encodings. Every
    /// buffer that decodes must re-encode to itself (one encoding per descriptor).
    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let valid: Vec<Vec<u8>> = samples().iter().map(ImageDescriptor::encode).collect();
        let mut decoded = 0;
        for i in 0..200_000 {
            let buf = if i % 2 == 0 {
                let len = rng.below(MAX_ENCODED + 8);
                let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                if i % 4 == 0 && b.len() >= 10 {
                    b[..8].copy_from_slice(&MAGIC);
                    b[8..10].copy_from_slice(&1u16.to_le_bytes());
                }
                b
            } else {
                let mut b = valid[rng.below(valid.len())].clone();
                for _ in 0..1 + rng.below(4) {
                    match rng.below(4) {
                        0 if !b.is_empty() => {
                            let at = rng.below(b.len());
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
            };
            if let Ok(d) = ImageDescriptor::decode(&buf) {
                decoded += 1;
                assert_eq!(d.encode(), buf);
                assert_eq!(d.validate(), Ok(()));
            }
            let text = format!("{TEXT_PREFIX}{}", Hex(&buf));
            let _ = text.parse::<ImageDescriptor>();
        }
        assert!(
            decoded > 1000,
            "mutations should often stay valid: {decoded}"
        );
    }
}
