//! Control messages between the gateway and one of its workers, on the worker's control
//! socket (a Unix stream socket at [`crate::worker::CONTROL_FD`]), never on its data socket:
//! the data socket carries only descriptors, and on the kernel dataplane its traffic is
//! redirected by the sk_msg program, which knows nothing of control traffic.
//!
//! The gateway asks a running worker to prepare an image of its warm instance
//! ([`ControlMessage::Prepare`]); the worker answers at its next quiescent point, between two
//! invocations, with [`ControlMessage::Prepared`] — the image's metadata, while the sealed
//! image memfd travels with the same message as `SCM_RIGHTS` — or with
//! [`ControlMessage::PrepareFailed`] and the reason.
//!
//! A worker that cannot start (its module does not compile or link, `_initialize` traps, ...)
//! says why with [`ControlMessage::StartFailed`] before it exits, instead of its ready
//! message, so the gateway reports the worker's own words rather than how it exited.
//!
//! Frame (little-endian): magic `b"SPCT"`, version u8, kind u8, two zero bytes, payload
//! length u32, then the payload. Payloads: `Prepare` none; `Prepared` the microseconds
//! waited for the quiescent point (u64), the microseconds the capture took (u64), then a
//! non-empty [`crate::ImageMeta`] encoding; `PrepareFailed` a UTF-8 message of at most
//! [`MAX_MESSAGE`] bytes; `StartFailed` one of at most [`MAX_START_MESSAGE`] bytes. Decoding checks the header before anything is allocated, so a peer
//! cannot make the other side allocate more than [`MAX_PAYLOAD`] bytes.

use thiserror::Error;

pub const CONTROL_MAGIC: [u8; 4] = *b"SPCT";
pub const CONTROL_VERSION: u8 = 1;
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 12;
/// Largest payload: above the largest image metadata (a 4 GiB memory's page bitmap is
/// 128 KiB, the most globals another 72 KiB), so every real image fits.
pub const MAX_PAYLOAD: usize = 256 << 10;
/// Longest failure message.
pub const MAX_MESSAGE: usize = 4096;
/// Longest start-failure message: room for a module's every missing import, one a line.
pub const MAX_START_MESSAGE: usize = 32 << 10;

const KIND_PREPARE: u8 = 1;
const KIND_PREPARED: u8 = 2;
const KIND_PREPARE_FAILED: u8 = 3;
const KIND_START_FAILED: u8 = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// Gateway → worker: capture an image of the warm instance between two invocations.
    Prepare,
    /// Worker → gateway: the image was captured; its memfd comes with this frame.
    Prepared {
        /// Time spent waiting for the invocation in progress (if any) to end.
        waited_us: u64,
        /// Time the capture itself took (memory copied into the sealed memfd, globals read).
        capture_us: u64,
        /// The image's `ImageMeta` encoding.
        meta: Vec<u8>,
    },
    /// Worker → gateway: no image; why.
    PrepareFailed { message: String },
    /// Worker → gateway, instead of becoming ready: the instance could not be built or made
    /// ready; why, as the worker would print it.
    StartFailed { message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ControlError {
    #[error("not a control frame (bad magic)")]
    BadMagic,
    #[error("control protocol version {0} is not supported (this build speaks version 1)")]
    UnsupportedVersion(u8),
    #[error("unknown control message kind {0}")]
    UnknownKind(u8),
    #[error("reserved header bytes are not zero")]
    Reserved,
    #[error("control payload of {0} bytes is larger than the {MAX_PAYLOAD} allowed")]
    TooLarge(u32),
    #[error("{kind} payload of {len} bytes is malformed: {why}")]
    BadPayload {
        kind: &'static str,
        len: usize,
        why: &'static str,
    },
}

/// A checked frame header: which message follows and how many payload bytes to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    kind: u8,
    pub payload_len: usize,
}

impl Header {
    /// Checks magic, version, kind, reserved bytes and the payload bound.
    pub fn decode(buf: &[u8; HEADER_LEN]) -> Result<Header, ControlError> {
        if buf[..4] != CONTROL_MAGIC {
            return Err(ControlError::BadMagic);
        }
        if buf[4] != CONTROL_VERSION {
            return Err(ControlError::UnsupportedVersion(buf[4]));
        }
        let kind = buf[5];
        if !(KIND_PREPARE..=KIND_START_FAILED).contains(&kind) {
            return Err(ControlError::UnknownKind(kind));
        }
        if buf[6..8] != [0, 0] {
            return Err(ControlError::Reserved);
        }
        let len = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
        if len as usize > MAX_PAYLOAD {
            return Err(ControlError::TooLarge(len));
        }
        Ok(Header {
            kind,
            payload_len: len as usize,
        })
    }

    /// True for the one message that carries an fd (the image memfd).
    pub fn carries_fd(&self) -> bool {
        self.kind == KIND_PREPARED
    }
}

impl ControlMessage {
    fn kind(&self) -> u8 {
        match self {
            ControlMessage::Prepare => KIND_PREPARE,
            ControlMessage::Prepared { .. } => KIND_PREPARED,
            ControlMessage::PrepareFailed { .. } => KIND_PREPARE_FAILED,
            ControlMessage::StartFailed { .. } => KIND_START_FAILED,
        }
    }

    /// The whole frame. A failure message longer than [`MAX_MESSAGE`] is cut at a character
    /// boundary; a metadata too large for a frame is the caller's bug and is sent as a
    /// failure instead, so every encoded frame decodes.
    pub fn encode(&self) -> Vec<u8> {
        let mut payload = Vec::new();
        let mut kind = self.kind();
        match self {
            ControlMessage::Prepare => {}
            ControlMessage::Prepared {
                waited_us,
                capture_us,
                meta,
            } if 16 + meta.len() <= MAX_PAYLOAD && !meta.is_empty() => {
                payload.extend_from_slice(&waited_us.to_le_bytes());
                payload.extend_from_slice(&capture_us.to_le_bytes());
                payload.extend_from_slice(meta);
            }
            ControlMessage::Prepared { meta, .. } => {
                kind = KIND_PREPARE_FAILED;
                payload.extend_from_slice(
                    format!(
                        "image metadata of {} bytes does not fit a frame",
                        meta.len()
                    )
                    .as_bytes(),
                );
            }
            ControlMessage::PrepareFailed { message } => {
                payload.extend_from_slice(cut(message, MAX_MESSAGE).as_bytes());
            }
            ControlMessage::StartFailed { message } => {
                payload.extend_from_slice(cut(message, MAX_START_MESSAGE).as_bytes());
            }
        }
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&CONTROL_MAGIC);
        out.push(CONTROL_VERSION);
        out.push(kind);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// The message of `header` from its payload (exactly `header.payload_len` bytes).
    pub fn decode(header: Header, payload: &[u8]) -> Result<ControlMessage, ControlError> {
        let bad = |kind, why| ControlError::BadPayload {
            kind,
            len: payload.len(),
            why,
        };
        if payload.len() != header.payload_len {
            return Err(bad("frame", "length differs from the header's"));
        }
        match header.kind {
            KIND_PREPARE if payload.is_empty() => Ok(ControlMessage::Prepare),
            KIND_PREPARE => Err(bad("prepare", "carries a payload")),
            KIND_PREPARED => {
                if payload.len() <= 16 {
                    return Err(bad("prepared", "no image metadata"));
                }
                let u64_at =
                    |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().expect("8"));
                Ok(ControlMessage::Prepared {
                    waited_us: u64_at(0),
                    capture_us: u64_at(8),
                    meta: payload[16..].to_vec(),
                })
            }
            KIND_PREPARE_FAILED => {
                if payload.len() > MAX_MESSAGE {
                    return Err(bad("prepare-failed", "message too long"));
                }
                let message = std::str::from_utf8(payload)
                    .map_err(|_| bad("prepare-failed", "message is not UTF-8"))?;
                Ok(ControlMessage::PrepareFailed {
                    message: message.to_owned(),
                })
            }
            KIND_START_FAILED => {
                if payload.len() > MAX_START_MESSAGE {
                    return Err(bad("start-failed", "message too long"));
                }
                let message = std::str::from_utf8(payload)
                    .map_err(|_| bad("start-failed", "message is not UTF-8"))?;
                Ok(ControlMessage::StartFailed {
                    message: message.to_owned(),
                })
            }
            other => Err(ControlError::UnknownKind(other)),
        }
    }
}

/// `message` cut to at most `max` bytes, at a character boundary.
fn cut(message: &str, max: usize) -> &str {
    let mut end = message.len().min(max);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::XorShift;

    fn roundtrip(m: &ControlMessage) -> ControlMessage {
        let frame = m.encode();
        let header = Header::decode(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(header.payload_len, frame.len() - HEADER_LEN);
        ControlMessage::decode(header, &frame[HEADER_LEN..]).unwrap()
    }

    #[test]
    fn every_message_round_trips() {
        for m in [
            ControlMessage::Prepare,
            ControlMessage::Prepared {
                waited_us: 7,
                capture_us: u64::MAX,
                meta: b"SPDLMETA...".to_vec(),
            },
            ControlMessage::PrepareFailed {
                message: "table 0 grew at run time".into(),
            },
            ControlMessage::StartFailed {
                message: "module m.wasm cannot run as function `f`:\n  - ...".into(),
            },
        ] {
            assert_eq!(roundtrip(&m), m);
        }
    }

    #[test]
    fn only_prepared_carries_an_fd() {
        let carries = |m: ControlMessage| {
            let f = m.encode();
            Header::decode(f[..HEADER_LEN].try_into().unwrap())
                .unwrap()
                .carries_fd()
        };
        assert!(!carries(ControlMessage::Prepare));
        assert!(carries(ControlMessage::Prepared {
            waited_us: 0,
            capture_us: 0,
            meta: vec![1]
        }));
        assert!(!carries(ControlMessage::PrepareFailed {
            message: String::new()
        }));
    }

    #[test]
    fn long_failure_messages_are_cut_at_a_character_boundary() {
        let message = "é".repeat(MAX_MESSAGE);
        let got = roundtrip(&ControlMessage::PrepareFailed { message });
        let ControlMessage::PrepareFailed { message } = got else {
            panic!("{got:?}")
        };
        assert!(message.len() <= MAX_MESSAGE && message.len() >= MAX_MESSAGE - 1);
        let message = "é".repeat(MAX_START_MESSAGE);
        let got = roundtrip(&ControlMessage::StartFailed { message });
        let ControlMessage::StartFailed { message } = got else {
            panic!("{got:?}")
        };
        assert!(message.len() <= MAX_START_MESSAGE && message.len() >= MAX_START_MESSAGE - 1);
    }

    #[test]
    fn metadata_that_cannot_fit_is_sent_as_a_failure() {
        let got = roundtrip(&ControlMessage::Prepared {
            waited_us: 0,
            capture_us: 0,
            meta: vec![0; MAX_PAYLOAD],
        });
        assert!(
            matches!(got, ControlMessage::PrepareFailed { .. }),
            "{got:?}"
        );
    }

    #[test]
    fn the_largest_image_metadata_fits_a_frame() {
        // 4 GiB of memory, the most globals and tables, the longest engine string.
        let pages = crate::image::MAX_MEMORY / u64::from(crate::image::PAGE_SIZE);
        let meta = crate::ImageMeta {
            module_hash: [0; 32],
            engine: "e".repeat(crate::image::MAX_ENGINE),
            memory_bytes: crate::image::MAX_MEMORY,
            nonzero: crate::PageBitmap::new(pages),
            globals: vec![
                crate::GlobalValue {
                    ty: crate::GlobalType::I32,
                    mutable: true,
                    bits: 0,
                };
                crate::meta::MAX_GLOBALS
            ],
            tables: vec![0; crate::meta::MAX_TABLES],
            wasi_digest: [0; 32],
            stdio_closed: 0,
        };
        let encoded = meta.encode();
        let got = roundtrip(&ControlMessage::Prepared {
            waited_us: 1,
            capture_us: 2,
            meta: encoded.clone(),
        });
        assert_eq!(
            got,
            ControlMessage::Prepared {
                waited_us: 1,
                capture_us: 2,
                meta: encoded
            }
        );
    }

    #[test]
    fn bad_headers_are_refused_before_any_allocation() {
        let good = ControlMessage::Prepare.encode();
        let header = |f: &dyn Fn(&mut [u8; HEADER_LEN])| {
            let mut h: [u8; HEADER_LEN] = good[..HEADER_LEN].try_into().unwrap();
            f(&mut h);
            Header::decode(&h)
        };
        assert_eq!(header(&|h| h[0] = b'X'), Err(ControlError::BadMagic));
        assert_eq!(
            header(&|h| h[4] = 2),
            Err(ControlError::UnsupportedVersion(2))
        );
        assert_eq!(header(&|h| h[5] = 0), Err(ControlError::UnknownKind(0)));
        assert_eq!(header(&|h| h[5] = 9), Err(ControlError::UnknownKind(9)));
        assert_eq!(header(&|h| h[7] = 1), Err(ControlError::Reserved));
        assert_eq!(
            header(&|h| h[8..12].copy_from_slice(&u32::MAX.to_le_bytes())),
            Err(ControlError::TooLarge(u32::MAX))
        );
    }

    #[test]
    fn bad_payloads_are_refused() {
        let decode = |kind: u8, payload: &[u8]| {
            let mut frame = ControlMessage::Prepare.encode();
            frame[5] = kind;
            frame[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
            let h = Header::decode(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
            ControlMessage::decode(h, payload)
        };
        assert!(
            decode(KIND_PREPARE, b"x").is_err(),
            "prepare has no payload"
        );
        assert!(decode(KIND_PREPARED, &[0; 16]).is_err(), "no metadata");
        assert!(
            decode(KIND_PREPARE_FAILED, &[0xff, 0xfe]).is_err(),
            "not UTF-8"
        );
        let h = Header::decode(
            ControlMessage::Prepare.encode()[..HEADER_LEN]
                .try_into()
                .unwrap(),
        )
        .unwrap();
        assert!(
            ControlMessage::decode(h, b"ab").is_err(),
            "length differs from the header's"
        );
    }

    #[test]
    fn random_frames_never_panic() {
        let mut rng = XorShift(0xc0_47_01);
        for _ in 0..20_000 {
            let mut frame = ControlMessage::PrepareFailed {
                message: "x".repeat(rng.below(64)),
            }
            .encode();
            // Flip a few bytes, header included.
            for _ in 0..rng.below(4) {
                let i = rng.below(frame.len());
                frame[i] ^= rng.next() as u8;
            }
            let Ok(h) = Header::decode(frame[..HEADER_LEN].try_into().unwrap()) else {
                continue;
            };
            let end = (HEADER_LEN + h.payload_len).min(frame.len());
            let _ = ControlMessage::decode(h, &frame[HEADER_LEN..end]);
        }
    }
}
