//! The peer-control channel (gateway/src/peers/wire.rs): the handshake never completes
//! against bytes that do not prove the cluster key, from either side; on an authenticated
//! session every frame delivered untouched arrives exactly as sent and in order, and every
//! frame altered, cut, replayed or reflected ends the session with an error, never a panic,
//! a hang or a different message.
//!
//! `crate::wire` is the gateway's module: compiled from its source by `#[path]` in the fuzz
//! target (no wasmer), `gateway::peers::wire` in the gateway's replay test.

use std::path::PathBuf;
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

use crate::wire::{ClusterKey, Session};

/// Longest message an input sends: frames stay small, so many fit one input.
const MAX_TEST_MESSAGE: usize = 512;
const TAG: usize = 16;

fn key() -> &'static ClusterKey {
    static KEY: OnceLock<ClusterKey> = OnceLock::new();
    KEY.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        let path =
            std::env::temp_dir().join(format!("spindle-fuzz-cluster-key-{}", std::process::id()));
        std::fs::write(&path, [7u8; 32]).expect("writing the key file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
        let key = ClusterKey::load(&path).expect("loading the key file");
        let _ = std::fs::remove_file(PathBuf::from(&path));
        key
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let rest = &rest[..rest.len().min(8192)];
    runtime().block_on(async {
        match mode % 3 {
            0 => unauthenticated(rest, true).await,
            1 => unauthenticated(rest, false).await,
            _ => session(rest).await,
        }
    });
}

/// `bytes` as everything the other side of a handshake says, then end of stream.
async fn unauthenticated(bytes: &[u8], we_serve: bool) {
    let (ours, mut theirs) = duplex(1 << 16);
    let speak = async move {
        let _ = theirs.write_all(bytes).await;
        let _ = theirs.shutdown().await;
        // Keep reading what our side says so its writes never block, until it is done.
        let mut sink = Vec::new();
        let _ = theirs.read_to_end(&mut sink).await;
    };
    let handshake = async move {
        if we_serve {
            Session::server(ours, key()).await.map(drop)
        } else {
            Session::client(ours, key()).await.map(drop)
        }
    };
    let ((), result) = tokio::join!(speak, handshake);
    assert!(
        result.is_err(),
        "a handshake completed against bytes that never saw the key"
    );
}

/// What happens to one frame between the sender and the receiver.
#[derive(Arbitrary, Debug)]
enum Fate {
    Deliver,
    /// XORs a nonzero mask into one byte (position modulo the frame's length).
    Flip(u16, u8),
    /// Delivers only this many bytes (modulo the frame's length), then ends the stream.
    Cut(u16),
    /// Not delivered; the next frame is then out of sequence.
    Drop,
    /// Delivered twice.
    Twice,
    /// An earlier frame in the same direction is delivered instead.
    Replay(u8),
    /// Sent back to its own sender.
    Reflect,
}

#[derive(Arbitrary, Debug)]
struct Step {
    to_server: bool,
    message: Vec<u8>,
    fate: Fate,
}

/// One end of an authenticated session, the relay's two ends beside it, and the frames it
/// sent so far.
struct Side {
    session: Session<DuplexStream>,
    /// Where the relay reads what this side sends and writes what it receives.
    relay: DuplexStream,
    sent: Vec<Vec<u8>>,
}

async fn read_frame(from: &mut DuplexStream, message_len: usize) -> Vec<u8> {
    let mut frame = vec![0u8; 4 + message_len + TAG];
    from.read_exact(&mut frame)
        .await
        .expect("the relay reads a whole frame");
    assert_eq!(
        u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize,
        message_len + TAG
    );
    frame
}

async fn relay_handshake(c: &mut DuplexStream, s: &mut DuplexStream) {
    for (len, to_client) in [(41, true), (73, false), (32, true)] {
        let mut buf = vec![0u8; len];
        let (from, to) = if to_client {
            (&mut *s, &mut *c)
        } else {
            (&mut *c, &mut *s)
        };
        from.read_exact(&mut buf)
            .await
            .expect("relaying the handshake");
        to.write_all(&buf).await.expect("relaying the handshake");
    }
}

async fn session(data: &[u8]) {
    let (c_end, mut c_relay) = duplex(1 << 16);
    let (s_end, mut s_relay) = duplex(1 << 16);
    let (client, server, ()) = tokio::join!(
        Session::client(c_end, key()),
        Session::server(s_end, key()),
        relay_handshake(&mut c_relay, &mut s_relay)
    );
    let mut client = Side {
        session: client.expect("client handshake"),
        relay: c_relay,
        sent: Vec::new(),
    };
    let mut server = Side {
        session: server.expect("server handshake"),
        relay: s_relay,
        sent: Vec::new(),
    };
    let mut u = Unstructured::new(data);
    // Arbitrary gives default values once the input runs out: stop there.
    while !u.is_empty() {
        let Ok(mut step) = Step::arbitrary(&mut u) else {
            break;
        };
        step.message.truncate(MAX_TEST_MESSAGE);
        let (from, to) = if step.to_server {
            (&mut client, &mut server)
        } else {
            (&mut server, &mut client)
        };
        from.session
            .send(&step.message)
            .await
            .expect("sending a message");
        let frame = read_frame(&mut from.relay, step.message.len()).await;
        from.sent.push(frame.clone());
        let ends = match step.fate {
            Fate::Deliver => {
                to.relay.write_all(&frame).await.unwrap();
                let got = to
                    .session
                    .recv()
                    .await
                    .expect("an untouched frame is received");
                assert_eq!(got, step.message);
                false
            }
            Fate::Flip(at, mask) => {
                let mut bad = frame;
                let at = at as usize % bad.len();
                bad[at] ^= mask | 1;
                to.relay.write_all(&bad).await.unwrap();
                // A changed length may ask for more than there is: end the stream after it.
                to.relay.shutdown().await.unwrap();
                true
            }
            Fate::Cut(n) => {
                let n = n as usize % frame.len();
                to.relay.write_all(&frame[..n]).await.unwrap();
                to.relay.shutdown().await.unwrap();
                true
            }
            Fate::Drop => {
                // The next frame in this direction arrives out of sequence.
                from.session.send(b"after a lost frame").await.unwrap();
                let next = read_frame(&mut from.relay, 18).await;
                to.relay.write_all(&next).await.unwrap();
                true
            }
            Fate::Twice => {
                to.relay.write_all(&frame).await.unwrap();
                assert_eq!(
                    to.session.recv().await.expect("the first copy"),
                    step.message
                );
                to.relay.write_all(&frame).await.unwrap();
                true
            }
            Fate::Replay(i) => {
                let old = from.sent[i as usize % from.sent.len()].clone();
                let fresh = old == frame;
                to.relay.write_all(&old).await.unwrap();
                if fresh {
                    // Replaying the frame just sent is delivering it.
                    assert_eq!(
                        to.session.recv().await.expect("the frame itself"),
                        step.message
                    );
                    false
                } else {
                    true
                }
            }
            Fate::Reflect => {
                // The sender receives its own frame: the direction is in the nonce.
                let (from_relay, from_session) = (&mut from.relay, &mut from.session);
                from_relay.write_all(&frame).await.unwrap();
                assert!(
                    from_session.recv().await.is_err(),
                    "a reflected frame was accepted"
                );
                return;
            }
        };
        if ends {
            assert!(
                to.session.recv().await.is_err(),
                "an altered or out-of-sequence frame was accepted"
            );
            return;
        }
    }
}
