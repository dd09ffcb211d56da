//! The peer-control channel's wire: mutual authentication with the cluster key, then
//! encrypted, authenticated, ordered frames.
//!
//! The channel carries image descriptors, and a descriptor holds its image's key: whoever
//! reads one can fetch the image's pages, and whoever forges a scale request can make a node
//! run code of someone else's choosing. So:
//!
//! 1. **Mutual challenge-response.** The server sends `SPDLPEER`, version, a fresh 32-byte
//!    nonce `sn`; the client answers with its own nonce `cn` and
//!    `HMAC(K, "spindle-peer-v1/client" || sn || cn)`; the server checks it and answers
//!    `HMAC(K, "spindle-peer-v1/server" || sn || cn)`, which the client checks before it
//!    sends anything else. The key never travels, and a recorded handshake replays nowhere
//!    (each side's nonce is fresh).
//! 2. **Session key** `S = HMAC(K, "spindle-peer-v1/session" || sn || cn)`, new per connection
//!    (HMAC-SHA256 as a PRF over both fresh nonces).
//! 3. **Frames:** `len: u32 LE | ChaCha20-Poly1305(S, nonce, message, aad = len)`, the nonce
//!    being the direction (0 client → server, 1 server → client) and an implicit sequence
//!    number per direction from 0: never the same nonce twice under one key. A frame that is
//!    altered, replayed, reordered, reflected back to its sender or cut fails its tag and
//!    ends the connection.

use chacha20poly1305::ChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, Payload};
use hmac::{KeyInit, Mac};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

type Hmac = hmac::Hmac<sha2::Sha256>;

const MAGIC: &[u8; 8] = b"SPDLPEER";
const VERSION: u8 = 1;
/// Largest message either side sends or accepts.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Poly1305's tag.
const TAG: usize = 16;

/// Why the channel failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a Spindle peer-control channel (bad magic)")]
    BadMagic,
    #[error("peer-control protocol version {0}, this node speaks {VERSION}")]
    Version(u8),
    #[error("the peer did not prove it holds the cluster key")]
    BadProof,
    #[error("a frame failed its authentication tag (altered, replayed or out of order)")]
    BadTag,
    #[error("frame of {0} bytes exceeds {MAX_MESSAGE}")]
    TooLarge(usize),
    #[error(transparent)]
    Random(#[from] proto::pages::RandomnessError),
}

/// The shared cluster key, as read from its file.
#[derive(Clone)]
pub struct ClusterKey(Vec<u8>);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(redacted)")
    }
}

/// Why the cluster key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cluster key {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cluster key {0} is readable by group or others (mode {1:o}): it must be private to its owner (chmod 600)"
    )]
    Exposed(std::path::PathBuf, u32),
    #[error("cluster key {0} holds {1} bytes; at least 32 are needed")]
    TooShort(std::path::PathBuf, usize),
}

impl ClusterKey {
    /// Reads the key file: its contents (trailing whitespace trimmed, so `openssl rand -hex 32
    /// > key` works), at least 32 bytes, not readable by group or others.
    pub fn load(path: &std::path::Path) -> Result<Self, KeyError> {
        use std::os::unix::fs::MetadataExt;
        let read = |source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(read)?.mode();
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed(path.to_path_buf(), mode & 0o777));
        }
        let mut bytes = std::fs::read(path).map_err(read)?;
        while bytes.last().is_some_and(u8::is_ascii_whitespace) {
            bytes.pop();
        }
        if bytes.len() < 32 {
            return Err(KeyError::TooShort(path.to_path_buf(), bytes.len()));
        }
        Ok(ClusterKey(bytes))
    }

    #[cfg(test)]
    pub fn from_bytes(b: &[u8]) -> Self {
        ClusterKey(b.to_vec())
    }

    /// `HMAC-SHA256(K, label || sn || cn)`, before finalizing.
    fn mac_of(&self, label: &[u8], sn: &[u8; 32], cn: &[u8; 32]) -> Hmac {
        let mut m = <Hmac as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key");
        m.update(label);
        m.update(sn);
        m.update(cn);
        m
    }

    fn mac(&self, label: &[u8], sn: &[u8; 32], cn: &[u8; 32]) -> [u8; 32] {
        self.mac_of(label, sn, cn).finalize().into_bytes().into()
    }

    /// Whether `proof` is the MAC of these inputs, compared in constant time.
    fn verify(&self, label: &[u8], sn: &[u8; 32], cn: &[u8; 32], proof: &[u8; 32]) -> bool {
        self.mac_of(label, sn, cn).verify_slice(proof).is_ok()
    }
}

/// Which way a frame goes, part of every nonce so a frame can never be
/// reflected back to its sender.
#[derive(Clone, Copy)]
enum Dir {
    ToServer = 0,
    ToClient = 1,
}

/// An authenticated connection: frames in both directions under the session key.
pub struct Session<S> {
    stream: S,
    cipher: ChaCha20Poly1305,
    send_dir: Dir,
    send_seq: u64,
    recv_seq: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// The client side of the handshake: proves the key and checks the server's proof.
    pub async fn client(mut stream: S, key: &ClusterKey) -> Result<Self, WireError> {
        let mut hello = [0u8; 8 + 1 + 32];
        stream.read_exact(&mut hello).await?;
        if &hello[..8] != MAGIC {
            return Err(WireError::BadMagic);
        }
        if hello[8] != VERSION {
            return Err(WireError::Version(hello[8]));
        }
        let sn: [u8; 32] = hello[9..].try_into().expect("32 bytes");
        let cn = proto::pages::fresh_nonce::<32>()?;
        let mut answer = Vec::with_capacity(8 + 1 + 32 + 32);
        answer.extend_from_slice(MAGIC);
        answer.push(VERSION);
        answer.extend_from_slice(&cn);
        answer.extend_from_slice(&key.mac(b"spindle-peer-v1/client", &sn, &cn));
        stream.write_all(&answer).await?;
        let mut proof = [0u8; 32];
        stream.read_exact(&mut proof).await?;
        if !key.verify(b"spindle-peer-v1/server", &sn, &cn, &proof) {
            return Err(WireError::BadProof);
        }
        Ok(Session {
            stream,
            cipher: session_cipher(key, &sn, &cn),
            send_dir: Dir::ToServer,
            send_seq: 0,
            recv_seq: 0,
        })
    }

    /// The server side: challenges, checks the client's proof, proves the key in turn.
    pub async fn server(mut stream: S, key: &ClusterKey) -> Result<Self, WireError> {
        let sn = proto::pages::fresh_nonce::<32>()?;
        let mut hello = Vec::with_capacity(41);
        hello.extend_from_slice(MAGIC);
        hello.push(VERSION);
        hello.extend_from_slice(&sn);
        stream.write_all(&hello).await?;
        let mut answer = [0u8; 8 + 1 + 32 + 32];
        stream.read_exact(&mut answer).await?;
        if &answer[..8] != MAGIC {
            return Err(WireError::BadMagic);
        }
        if answer[8] != VERSION {
            return Err(WireError::Version(answer[8]));
        }
        let cn: [u8; 32] = answer[9..41].try_into().expect("32 bytes");
        let proof: [u8; 32] = answer[41..].try_into().expect("32 bytes");
        if !key.verify(b"spindle-peer-v1/client", &sn, &cn, &proof) {
            // Zeros, a valid proof only with probability 2^-256: the client learns its key
            // was refused instead of seeing a bare hang-up.
            let _ = stream.write_all(&[0u8; 32]).await;
            return Err(WireError::BadProof);
        }
        stream
            .write_all(&key.mac(b"spindle-peer-v1/server", &sn, &cn))
            .await?;
        Ok(Session {
            stream,
            cipher: session_cipher(key, &sn, &cn),
            send_dir: Dir::ToClient,
            send_seq: 0,
            recv_seq: 0,
        })
    }

    fn recv_dir(&self) -> Dir {
        match self.send_dir {
            Dir::ToServer => Dir::ToClient,
            Dir::ToClient => Dir::ToServer,
        }
    }

    /// Sends one message.
    pub async fn send(&mut self, message: &[u8]) -> Result<(), WireError> {
        if message.len() > MAX_MESSAGE {
            return Err(WireError::TooLarge(message.len()));
        }
        let (dir, seq) = (self.send_dir, self.send_seq);
        self.send_seq += 1;
        let len = ((message.len() + TAG) as u32).to_le_bytes();
        let sealed = self
            .cipher
            .encrypt(
                &nonce(dir, seq).into(),
                Payload {
                    msg: message,
                    aad: &len,
                },
            )
            .map_err(|_| WireError::TooLarge(message.len()))?;
        let mut frame = Vec::with_capacity(4 + sealed.len());
        frame.extend_from_slice(&len);
        frame.extend_from_slice(&sealed);
        self.stream.write_all(&frame).await?;
        Ok(())
    }

    /// Receives one message; any frame that fails its tag ends the session.
    pub async fn recv(&mut self) -> Result<Vec<u8>, WireError> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).await?;
        let n = u32::from_le_bytes(len) as usize;
        if n > MAX_MESSAGE + TAG {
            return Err(WireError::TooLarge(n));
        }
        if n < TAG {
            return Err(WireError::BadTag);
        }
        let mut sealed = vec![0u8; n];
        self.stream.read_exact(&mut sealed).await?;
        let (dir, seq) = (self.recv_dir(), self.recv_seq);
        let message = self
            .cipher
            .decrypt(
                &nonce(dir, seq).into(),
                Payload {
                    msg: &sealed,
                    aad: &len,
                },
            )
            .map_err(|_| WireError::BadTag)?;
        self.recv_seq += 1;
        Ok(message)
    }
}

/// The connection's AEAD under `HMAC(K, "spindle-peer-v1/session" || sn || cn)`.
fn session_cipher(key: &ClusterKey, sn: &[u8; 32], cn: &[u8; 32]) -> ChaCha20Poly1305 {
    let session = key.mac(b"spindle-peer-v1/session", sn, cn);
    ChaCha20Poly1305::new(&session.into())
}

/// 96-bit nonce: direction, three zero bytes, sequence number (LE).
fn nonce(dir: Dir, seq: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[0] = dir as u8;
    n[4..].copy_from_slice(&seq.to_le_bytes());
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> ClusterKey {
        ClusterKey::from_bytes(&[b; 32])
    }

    async fn pair(
        client_key: ClusterKey,
        server_key: ClusterKey,
    ) -> (
        Result<Session<tokio::io::DuplexStream>, WireError>,
        Result<Session<tokio::io::DuplexStream>, WireError>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move { Session::server(b, &server_key).await });
        let client = Session::client(a, &client_key).await;
        (client, server.await.unwrap())
    }

    #[tokio::test]
    async fn messages_round_trip_encrypted_in_both_directions() {
        let (c, s) = pair(key(7), key(7)).await;
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        for i in 0..3u8 {
            let msg = vec![i; 100];
            c.send(&msg).await.unwrap();
            assert_eq!(s.recv().await.unwrap(), msg);
            s.send(b"ok").await.unwrap();
            assert_eq!(c.recv().await.unwrap(), b"ok");
        }
    }

    #[tokio::test]
    async fn a_wrong_key_fails_on_both_sides_before_any_message() {
        let (c, s) = pair(key(1), key(2)).await;
        assert!(matches!(s, Err(WireError::BadProof)), "{:?}", s.err());
        // The server refused without proving anything.
        assert!(matches!(c, Err(WireError::BadProof)), "{:?}", c.err());
    }

    #[tokio::test]
    async fn a_server_without_the_key_cannot_fake_its_proof() {
        // A server that skips checking and answers garbage instead of its proof.
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let fake = tokio::spawn(async move {
            let mut b = b;
            let mut hello = Vec::from(&MAGIC[..]);
            hello.push(VERSION);
            hello.extend_from_slice(&[9u8; 32]);
            b.write_all(&hello).await.unwrap();
            let mut answer = [0u8; 73];
            b.read_exact(&mut answer).await.unwrap();
            b.write_all(&[0u8; 32]).await.unwrap();
            b
        });
        let got = Session::client(&mut a, &key(3)).await;
        assert!(matches!(got, Err(WireError::BadProof)));
        drop(fake.await);
    }

    #[test]
    fn altered_replayed_and_reflected_frames_are_refused() {
        let c = ChaCha20Poly1305::new(&[5u8; 32].into());
        let msg = b"scale chain c function f to 2";
        let aad = [0u8; 4];
        let sealed = c
            .encrypt(&nonce(Dir::ToServer, 0).into(), Payload { msg, aad: &aad })
            .unwrap();
        assert!(
            !sealed.windows(msg.len()).any(|w| w == msg),
            "encrypted on the wire"
        );
        let open = |dir, seq, body: &[u8]| {
            c.decrypt(
                &nonce(dir, seq).into(),
                Payload {
                    msg: body,
                    aad: &aad,
                },
            )
            .is_ok()
        };
        assert!(open(Dir::ToServer, 0, &sealed));
        // Replayed as the next frame, reflected to the other direction, altered by a bit:
        assert!(!open(Dir::ToServer, 1, &sealed));
        assert!(!open(Dir::ToClient, 0, &sealed));
        let mut flipped = sealed.clone();
        flipped[3] ^= 1;
        assert!(!open(Dir::ToServer, 0, &flipped));
    }

    #[tokio::test]
    async fn a_replayed_frame_ends_the_session() {
        let (a, b) = tokio::io::duplex(1 << 16);
        // Tap the client's bytes: a proxy between client and server that replays frame 0.
        let (tap_client, tap_server) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move { Session::server(tap_server, &key(4)).await });
        let proxy = tokio::spawn(async move {
            let (mut from_client, mut to_client) = tokio::io::split(b);
            let (mut from_server, mut to_server) = tokio::io::split(tap_client);
            // hello: server -> client
            let mut hello = [0u8; 41];
            from_server.read_exact(&mut hello).await.unwrap();
            to_client.write_all(&hello).await.unwrap();
            let mut answer = [0u8; 73];
            from_client.read_exact(&mut answer).await.unwrap();
            to_server.write_all(&answer).await.unwrap();
            let mut proof = [0u8; 32];
            from_server.read_exact(&mut proof).await.unwrap();
            to_client.write_all(&proof).await.unwrap();
            // First frame: pass it on twice.
            let mut len = [0u8; 4];
            from_client.read_exact(&mut len).await.unwrap();
            let n = u32::from_le_bytes(len) as usize;
            let mut rest = vec![0u8; n];
            from_client.read_exact(&mut rest).await.unwrap();
            for _ in 0..2 {
                to_server.write_all(&len).await.unwrap();
                to_server.write_all(&rest).await.unwrap();
            }
        });
        let mut c = Session::client(a, &key(4)).await.unwrap();
        c.send(b"once").await.unwrap();
        let mut s = server.await.unwrap().unwrap();
        assert_eq!(s.recv().await.unwrap(), b"once");
        assert!(matches!(s.recv().await, Err(WireError::BadTag)));
        proxy.await.unwrap();
    }
}
