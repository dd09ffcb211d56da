//! The messages between the gateway and a zygote: the process that holds one function's
//! compiled module and the image of a warm instance, and forks new instances of it on request
//! (local fork).
//!
//! They travel on a Unix `SOCK_SEQPACKET` socket (the zygote's end at
//! [`crate::worker::ZYGOTE_FD`]), one message per packet, so a packet's length is its
//! message's length and a short read is visible. A [`SpawnRequest`] carries the new worker's
//! resources as `SCM_RIGHTS` fds in this order: its end of the socket to the gateway, its
//! statistics page, then its end of the control socket pair ([`SPAWN_FDS`]). Every request gets exactly one [`Reply`]; the zygote
//! sends one unasked [`Reply::Ready`] once it can fork, or [`Reply::BuildFailed`] (and exits)
//! when the function's instance cannot be built at all. Integers are little-endian.

/// "ZYGQ": a request.
const REQUEST_MAGIC: u32 = u32::from_le_bytes(*b"ZYGQ");
/// "ZYGA": an answer.
const REPLY_MAGIC: u32 = u32::from_le_bytes(*b"ZYGA");
pub const VERSION: u16 = 1;
/// Fds a spawn request carries: the worker's socket end, its statistics page, then its end of
/// the control socket pair.
pub const SPAWN_FDS: usize = 3;
/// Longest error text a reply carries; longer text is cut at a character boundary. Room for
/// a build failure that lists every missing import of a module, one a line.
pub const MAX_MESSAGE: usize = 32 << 10;
/// Bytes of the largest packet either side sends; a receive buffer this size never
/// truncates a valid one.
pub const MAX_PACKET: usize = Reply::HEADER + MAX_MESSAGE;

const KIND_SPAWN: u16 = 1;
const KIND_READY: u16 = 1;
const KIND_SPAWNED: u16 = 2;
const KIND_REFUSED: u16 = 3;
const KIND_FAILED: u16 = 4;
const KIND_BUILD_FAILED: u16 = 5;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZygoteWireError {
    #[error("message of {got} bytes is truncated: {what} needs {need}")]
    Truncated {
        what: &'static str,
        got: usize,
        need: usize,
    },
    #[error("message of {got} bytes is too long: {what} is {need}")]
    TooLong {
        what: &'static str,
        got: usize,
        need: usize,
    },
    #[error("bad magic {0:#010x}: not a zygote message")]
    BadMagic(u32),
    #[error("protocol version {0}, this build speaks {VERSION}")]
    Version(u16),
    #[error("pid {0} is not a process id (1..=2^31-1)")]
    BadPid(u32),
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("reserved field is {0:#x}, must be zero")]
    Reserved(u32),
    #[error("error text is not UTF-8")]
    NotUtf8,
}

/// Asks the zygote to fork instance `instance` (its `incarnation`-th start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpawnRequest {
    pub instance: u32,
    pub incarnation: u64,
}

impl SpawnRequest {
    pub const SIZE: usize = 24;

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&KIND_SPAWN.to_le_bytes());
        b[8..12].copy_from_slice(&self.instance.to_le_bytes());
        // 12..16 reserved, zero.
        b[16..24].copy_from_slice(&self.incarnation.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, ZygoteWireError> {
        let what = "a spawn request";
        if b.len() >= 6 {
            // Foreign bytes are named as such before their length is.
            check_header(b, REQUEST_MAGIC)?;
        }
        if b.len() < Self::SIZE {
            return Err(ZygoteWireError::Truncated {
                what,
                got: b.len(),
                need: Self::SIZE,
            });
        }
        if b.len() > Self::SIZE {
            return Err(ZygoteWireError::TooLong {
                what,
                got: b.len(),
                need: Self::SIZE,
            });
        }
        let kind = u16_at(b, 6);
        if kind != KIND_SPAWN {
            return Err(ZygoteWireError::UnknownKind(kind));
        }
        let reserved = u32_at(b, 12);
        if reserved != 0 {
            return Err(ZygoteWireError::Reserved(reserved));
        }
        Ok(SpawnRequest {
            instance: u32_at(b, 8),
            incarnation: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
        })
    }
}

/// What the zygote says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Sent once, unasked: the module is compiled and the image captured; `pid` is the
    /// zygote's and `build_ns` how long compile, instantiate, `_initialize` and capture took.
    Ready { pid: u32, build_ns: u64 },
    /// The request's child runs as `pid`; the fork system call took `fork_ns`.
    Spawned { pid: u32, fork_ns: u64 },
    /// The request was malformed; nothing was forked and the zygote keeps serving.
    Refused(String),
    /// The request was well formed but no child could be made (e.g. the kernel refused).
    /// Before `Ready`, unasked: the zygote could not become ready for a reason of its own (its
    /// warm instance cannot be captured, say), and exits; instances can still start by exec.
    Failed(String),
    /// Sent unasked instead of `Ready`: the function's instance cannot be built (the module
    /// does not compile or link, `_initialize` traps, ...), so no worker of it can start,
    /// forked or exec'd; the text says why. The zygote exits.
    BuildFailed(String),
}

impl Reply {
    pub const HEADER: usize = 24;

    pub fn to_bytes(&self) -> Vec<u8> {
        let (kind, pid, nanos, text) = match self {
            Reply::Ready { pid, build_ns } => (KIND_READY, *pid, *build_ns, ""),
            Reply::Spawned { pid, fork_ns } => (KIND_SPAWNED, *pid, *fork_ns, ""),
            Reply::Refused(t) => (KIND_REFUSED, 0, 0, t.as_str()),
            Reply::Failed(t) => (KIND_FAILED, 0, 0, t.as_str()),
            Reply::BuildFailed(t) => (KIND_BUILD_FAILED, 0, 0, t.as_str()),
        };
        let text = truncate(text, MAX_MESSAGE);
        let mut b = Vec::with_capacity(Self::HEADER + text.len());
        b.extend_from_slice(&REPLY_MAGIC.to_le_bytes());
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&kind.to_le_bytes());
        b.extend_from_slice(&pid.to_le_bytes());
        b.extend_from_slice(&(text.len() as u32).to_le_bytes());
        b.extend_from_slice(&nanos.to_le_bytes());
        b.extend_from_slice(text.as_bytes());
        b
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, ZygoteWireError> {
        let what = "a reply header";
        if b.len() < Self::HEADER {
            return Err(ZygoteWireError::Truncated {
                what,
                got: b.len(),
                need: Self::HEADER,
            });
        }
        check_header(b, REPLY_MAGIC)?;
        let kind = u16_at(b, 6);
        let pid = u32_at(b, 8);
        let text_len = u32_at(b, 12) as usize;
        let nanos = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"));
        let need = Self::HEADER + text_len.min(MAX_MESSAGE + 1);
        let what = "the reply with its text";
        if text_len > MAX_MESSAGE || b.len() > need {
            return Err(ZygoteWireError::TooLong {
                what,
                got: b.len(),
                need,
            });
        }
        if b.len() < need {
            return Err(ZygoteWireError::Truncated {
                what,
                got: b.len(),
                need,
            });
        }
        let text = || {
            std::str::from_utf8(&b[Self::HEADER..])
                .map(str::to_owned)
                .map_err(|_| ZygoteWireError::NotUtf8)
        };
        // A pid is signalled and waited for: 0 or one that is negative as a pid_t would name
        // a process group (or every process), never one child.
        let valid_pid = |pid: u32| {
            if pid == 0 || pid > i32::MAX as u32 {
                Err(ZygoteWireError::BadPid(pid))
            } else {
                Ok(pid)
            }
        };
        match kind {
            KIND_READY => Ok(Reply::Ready {
                pid: valid_pid(pid)?,
                build_ns: nanos,
            }),
            KIND_SPAWNED => Ok(Reply::Spawned {
                pid: valid_pid(pid)?,
                fork_ns: nanos,
            }),
            KIND_REFUSED => Ok(Reply::Refused(text()?)),
            KIND_FAILED => Ok(Reply::Failed(text()?)),
            KIND_BUILD_FAILED => Ok(Reply::BuildFailed(text()?)),
            other => Err(ZygoteWireError::UnknownKind(other)),
        }
    }
}

fn check_header(b: &[u8], magic: u32) -> Result<(), ZygoteWireError> {
    let found = u32_at(b, 0);
    if found != magic {
        return Err(ZygoteWireError::BadMagic(found));
    }
    let version = u16_at(b, 4);
    if version != VERSION {
        return Err(ZygoteWireError::Version(version));
    }
    Ok(())
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::XorShift;

    #[test]
    fn requests_and_replies_round_trip() {
        let r = SpawnRequest {
            instance: 7,
            incarnation: u64::MAX - 3,
        };
        assert_eq!(SpawnRequest::from_bytes(&r.to_bytes()), Ok(r));
        for reply in [
            Reply::Ready {
                pid: 42,
                build_ns: 45_000_000,
            },
            Reply::Spawned {
                pid: 99,
                fork_ns: 120_000,
            },
            Reply::Refused("a spawn request carries 3 fds, got 1".into()),
            Reply::Failed("clone: EAGAIN".into()),
            Reply::BuildFailed("module m.wasm does not compile".into()),
        ] {
            assert_eq!(Reply::from_bytes(&reply.to_bytes()), Ok(reply));
        }
    }

    #[test]
    fn truncated_long_and_foreign_requests_are_named() {
        let good = SpawnRequest {
            instance: 1,
            incarnation: 2,
        }
        .to_bytes();
        assert_eq!(
            SpawnRequest::from_bytes(&good[..10]),
            Err(ZygoteWireError::Truncated {
                what: "a spawn request",
                got: 10,
                need: 24
            })
        );
        let mut long = good.to_vec();
        long.push(0);
        assert!(matches!(
            SpawnRequest::from_bytes(&long),
            Err(ZygoteWireError::TooLong { got: 25, .. })
        ));
        let mut bad = good;
        bad[0] ^= 1;
        assert!(matches!(
            SpawnRequest::from_bytes(&bad),
            Err(ZygoteWireError::BadMagic(_))
        ));
        let mut bad = good;
        bad[4] = 9;
        assert_eq!(
            SpawnRequest::from_bytes(&bad),
            Err(ZygoteWireError::Version(9))
        );
        let mut bad = good;
        bad[6] = 5;
        assert_eq!(
            SpawnRequest::from_bytes(&bad),
            Err(ZygoteWireError::UnknownKind(5))
        );
        let mut bad = good;
        bad[13] = 1;
        assert_eq!(
            SpawnRequest::from_bytes(&bad),
            Err(ZygoteWireError::Reserved(0x100))
        );
        // A reply is not a request.
        assert!(matches!(
            SpawnRequest::from_bytes(&Reply::Spawned { pid: 1, fork_ns: 2 }.to_bytes()),
            Err(ZygoteWireError::BadMagic(_))
        ));
    }

    #[test]
    fn replies_whose_text_length_lies_are_refused() {
        let mut b = Reply::Failed("boom".into()).to_bytes();
        b.pop();
        assert!(matches!(
            Reply::from_bytes(&b),
            Err(ZygoteWireError::Truncated { .. })
        ));
        let mut b = Reply::Failed("boom".into()).to_bytes();
        b.push(b'!');
        assert!(matches!(
            Reply::from_bytes(&b),
            Err(ZygoteWireError::TooLong { .. })
        ));
        let mut b = Reply::Failed("boom".into()).to_bytes();
        b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Reply::from_bytes(&b),
            Err(ZygoteWireError::TooLong { .. })
        ));
        let mut b = Reply::Failed("ok".into()).to_bytes();
        b[Reply::HEADER] = 0xff;
        assert_eq!(Reply::from_bytes(&b), Err(ZygoteWireError::NotUtf8));
    }

    #[test]
    fn pids_that_would_name_a_process_group_are_refused() {
        for pid in [0, 1 << 31, u32::MAX] {
            for reply in [
                Reply::Spawned { pid, fork_ns: 1 },
                Reply::Ready { pid, build_ns: 1 },
            ] {
                assert!(
                    matches!(Reply::from_bytes(&reply.to_bytes()), Err(ZygoteWireError::BadPid(p)) if p == pid),
                    "{pid}"
                );
            }
        }
        let ok = Reply::Spawned {
            pid: i32::MAX as u32,
            fork_ns: 1,
        };
        assert_eq!(Reply::from_bytes(&ok.to_bytes()).unwrap(), ok);
    }

    #[test]
    fn long_error_text_is_cut_to_the_limit_on_a_char_boundary() {
        let text = "é".repeat(MAX_MESSAGE);
        let b = Reply::Refused(text).to_bytes();
        assert!(b.len() <= MAX_PACKET);
        let Ok(Reply::Refused(back)) = Reply::from_bytes(&b) else {
            panic!("a cut reply still decodes");
        };
        assert_eq!(back.len(), MAX_MESSAGE);
    }

    #[test]
    fn random_bytes_never_panic_the_decoders() {
        let mut rng = XorShift(0x2f6b_1d3e_9a44_c501);
        for _ in 0..20_000 {
            let len = rng.below(64);
            let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if len >= 8 && rng.next().is_multiple_of(2) {
                // Get past the magic and version checks often enough to reach the rest.
                let magic = if rng.next().is_multiple_of(2) {
                    REQUEST_MAGIC
                } else {
                    REPLY_MAGIC
                };
                b[0..4].copy_from_slice(&magic.to_le_bytes());
                b[4..6].copy_from_slice(&VERSION.to_le_bytes());
            }
            let _ = SpawnRequest::from_bytes(&b);
            let _ = Reply::from_bytes(&b);
        }
    }
}
