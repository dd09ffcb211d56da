//! Both ends of a worker's control socket ([`proto::worker::CONTROL_FD`]): framed
//! [`proto::control`] messages over a Unix stream socket, the image memfd of a `Prepared`
//! answer riding on its first byte as `SCM_RIGHTS`.
//!
//! The worker's side ([`serve`]) runs on its own thread: it blocks on the control socket
//! while the serving loop blocks on the data socket, and each prepare runs when the serving
//! loop is between invocations (the caller's `prepare` closure queues the request for the
//! serving thread, rings its doorbell and waits for the answer). The gateway's side is [`request_prepare`].
//!
//! std's ancillary-data API on `UnixStream` is still unstable, so this uses nix's
//! `sendmsg`/`recvmsg`.

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::errno::Errno;
use proto::control::{ControlError, ControlMessage, HEADER_LEN, Header};

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("{op}: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: Errno,
    },
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the control socket")]
    Closed,
    #[error("no answer on the control socket within {0:?}")]
    TimedOut(Duration),
    #[error("malformed control message: {0}")]
    Malformed(#[from] ControlError),
    #[error("malformed control message: {0}")]
    BadFds(&'static str),
}

impl ChannelError {
    /// True when the peer sent bytes that do not follow the protocol (as opposed to the
    /// socket failing or closing).
    pub fn is_malformed(&self) -> bool {
        matches!(self, ChannelError::Malformed(_) | ChannelError::BadFds(_))
    }
}

/// Sends `message`, with `fd` attached when given.
pub fn send(
    stream: &UnixStream,
    message: &ControlMessage,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), ChannelError> {
    let frame = message.encode();
    let fds: Vec<RawFd> = fd.iter().map(AsRawFd::as_raw_fd).collect();
    rdma_fork::send_with_fds(stream.as_fd(), &frame, &fds).map_err(|source| ChannelError::Sys {
        op: "sendmsg",
        source,
    })
}

/// Receives one message and the fd it carries. `Ok(None)`: the peer closed the socket
/// between messages. A frame that breaks the protocol is an error, after which the stream is
/// out of step: the caller must close it.
pub fn recv(
    stream: &UnixStream,
) -> Result<Option<(ControlMessage, Option<OwnedFd>)>, ChannelError> {
    let mut header = [0u8; HEADER_LEN];
    // Room for as many descriptors as one message can carry (SCM_MAX_FD): every one a peer
    // sends is received, owned and closed when unwanted, never left open by a cut buffer.
    let mut space = nix::cmsg_space!([RawFd; rdma_fork::handoff::SCM_MAX_FD]);
    let got = match rdma_fork::recv_with_fds(stream.as_fd(), &mut header, &mut space) {
        Ok(got) => got,
        Err(Errno::EAGAIN) => {
            let timeout = stream.read_timeout()?.unwrap_or_default();
            return Err(ChannelError::TimedOut(timeout));
        }
        Err(source) => {
            return Err(ChannelError::Sys {
                op: "recvmsg",
                source,
            });
        }
    };
    let (got, mut fds, truncated) = (got.bytes, got.fds, got.fds_cut);
    if got == 0 {
        return Ok(None);
    }
    if truncated {
        return Err(ChannelError::BadFds(
            "more descriptors than any message carries",
        ));
    }
    read_rest(stream, &mut header[got..])?;
    let header = Header::decode(&header)?;
    let mut payload = vec![0u8; header.payload_len];
    read_rest(stream, &mut payload)?;
    let message = ControlMessage::decode(header, &payload)?;
    let fd = match (header.carries_fd(), fds.len()) {
        (true, 1) => fds.pop(),
        (false, 0) => None,
        (true, _) => {
            return Err(ChannelError::BadFds(
                "an image answer without exactly one fd",
            ));
        }
        (false, _) => {
            return Err(ChannelError::BadFds(
                "a descriptor on a message that carries none",
            ));
        }
    };
    Ok(Some((message, fd)))
}

fn read_rest(mut stream: &UnixStream, buf: &mut [u8]) -> Result<(), ChannelError> {
    stream.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ChannelError::Closed,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            ChannelError::TimedOut(stream.read_timeout().ok().flatten().unwrap_or_default())
        }
        _ => ChannelError::Io(e),
    })
}

/// What a worker's `prepare` produced: the image memfd and the answer to send with it.
pub struct Prepared {
    pub memfd: OwnedFd,
    pub waited_us: u64,
    pub capture_us: u64,
    pub meta: Vec<u8>,
}

/// The worker's side: answers control requests on `stream` until the gateway closes it.
/// `prepare` captures an image at a quiescent point or says why it cannot. A request that
/// breaks the protocol is answered with a failure, counted in `refused`, and ends the
/// channel (the stream is out of step); the worker itself keeps serving.
pub fn serve(
    stream: &UnixStream,
    mut prepare: impl FnMut() -> Result<Prepared, String>,
    refused: &mut u64,
) -> Result<(), ChannelError> {
    loop {
        let request = match recv(stream) {
            Ok(None) => return Ok(()),
            Ok(Some(request)) => request,
            Err(e) => {
                if e.is_malformed() {
                    *refused += 1;
                    let answer = ControlMessage::PrepareFailed {
                        message: format!("the worker refused a control request: {e}"),
                    };
                    // Best effort: the channel ends either way.
                    let _ = send(stream, &answer, None);
                }
                return Err(e);
            }
        };
        match request {
            (ControlMessage::Prepare, None) => match prepare() {
                Ok(p) => {
                    let answer = ControlMessage::Prepared {
                        waited_us: p.waited_us,
                        capture_us: p.capture_us,
                        meta: p.meta,
                    };
                    use std::os::fd::AsFd;
                    send(stream, &answer, Some(p.memfd.as_fd()))?;
                }
                Err(message) => send(stream, &ControlMessage::PrepareFailed { message }, None)?,
            },
            (other, _) => {
                *refused += 1;
                let answer = ControlMessage::PrepareFailed {
                    message: format!("a worker does not accept {other:?}"),
                };
                send(stream, &answer, None)?;
                return Err(ChannelError::BadFds("an answer sent to the worker"));
            }
        }
    }
}

/// What a worker answered to [`request_prepare`].
pub enum PrepareAnswer {
    Prepared(Prepared),
    /// The worker could not capture (e.g. uncapturable state: a `SnapshotError`'s message).
    Failed(String),
}

/// The gateway's side: asks the worker at the other end of `stream` to prepare an image, and
/// waits at most `timeout` for the answer.
pub fn request_prepare(
    stream: &UnixStream,
    timeout: Duration,
) -> Result<PrepareAnswer, ChannelError> {
    stream.set_read_timeout(Some(timeout))?;
    send(stream, &ControlMessage::Prepare, None)?;
    match recv(stream)? {
        None => Err(ChannelError::Closed),
        Some((
            ControlMessage::Prepared {
                waited_us,
                capture_us,
                meta,
            },
            Some(memfd),
        )) => Ok(PrepareAnswer::Prepared(Prepared {
            memfd,
            waited_us,
            capture_us,
            meta,
        })),
        Some((ControlMessage::PrepareFailed { message }, None)) => {
            Ok(PrepareAnswer::Failed(message))
        }
        Some(_) => Err(ChannelError::BadFds("a request sent to the gateway")),
    }
}

/// The worker's side, before it is ready: tells the gateway why this instance cannot start
/// (a [`ControlMessage::StartFailed`] with `error` and its causes), so the gateway reports the
/// reason rather than how the process ended. Best effort: a gateway that is gone or not
/// reading (1 s) learns it from the exit status instead. True when it was sent.
pub fn report_start_failure(
    control: BorrowedFd<'_>,
    error: &(dyn std::error::Error + 'static),
) -> bool {
    let message = error_chain(error);
    let sent = control
        .try_clone_to_owned()
        .map(UnixStream::from)
        .and_then(|stream| {
            stream.set_write_timeout(Some(Duration::from_secs(1)))?;
            let frame = ControlMessage::StartFailed { message }.encode();
            io::Write::write_all(&mut &stream, &frame)
        });
    match sent {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!("could not tell the gateway why the start failed: {e}");
            false
        }
    }
}

/// `error` and every cause it does not already spell out, joined with `: ` (as anyhow's
/// `{:#}`, without the repeats of errors that print their source themselves).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let more = e.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = e.source();
    }
    text
}

/// The gateway's side: the reason in what a worker that did not become ready wrote on its
/// control socket (every byte it wrote before closing it), if it sent one.
pub fn start_failure(bytes: &[u8]) -> Option<String> {
    let header: &[u8; HEADER_LEN] = bytes.get(..HEADER_LEN)?.try_into().ok()?;
    let header = Header::decode(header).ok()?;
    let payload = bytes.get(HEADER_LEN..HEADER_LEN + header.payload_len)?;
    match ControlMessage::decode(header, payload).ok()? {
        ControlMessage::StartFailed { message } => Some(message),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn memfd(data: &[u8]) -> OwnedFd {
        crate::instance::sealed_memfd("control-test", data).unwrap()
    }

    fn fd_contents(fd: &OwnedFd) -> Vec<u8> {
        let mut s = String::new();
        let mut f = std::fs::File::from(fd.try_clone().unwrap());
        f.read_to_string(&mut s).unwrap();
        s.into_bytes()
    }

    #[test]
    fn a_start_failure_reaches_the_other_end_with_its_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("building the instance")]
        struct Outer(#[source] io::Error);
        let (gateway, worker) = UnixStream::pair().unwrap();
        let error = Outer(io::Error::other("module m.wasm does not compile"));
        assert!(report_start_failure(worker.as_fd(), &error));
        drop(worker);
        let mut bytes = Vec::new();
        (&gateway).read_to_end(&mut bytes).unwrap();
        assert_eq!(
            start_failure(&bytes).as_deref(),
            Some("building the instance: module m.wasm does not compile")
        );
        // Anything else (nothing, a cut frame, another message) is no reason.
        assert_eq!(start_failure(&[]), None);
        assert_eq!(start_failure(&bytes[..bytes.len() - 1]), None);
        assert_eq!(start_failure(&ControlMessage::Prepare.encode()), None);
    }

    #[test]
    fn a_prepare_gets_the_image_memfd_and_its_metadata() {
        let (gateway, worker) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut refused = 0;
            let mut n = 0;
            let r = serve(
                &worker,
                || {
                    n += 1;
                    if n == 2 {
                        return Err("table 0 grew at run time".into());
                    }
                    Ok(Prepared {
                        memfd: memfd(b"pages"),
                        waited_us: 3,
                        capture_us: 4,
                        meta: b"meta".to_vec(),
                    })
                },
                &mut refused,
            );
            (r.is_ok(), refused)
        });
        let t = Duration::from_secs(5);
        let PrepareAnswer::Prepared(p) = request_prepare(&gateway, t).unwrap() else {
            panic!("expected an image");
        };
        assert_eq!(
            (p.waited_us, p.capture_us, &p.meta[..]),
            (3, 4, &b"meta"[..])
        );
        assert_eq!(fd_contents(&p.memfd), b"pages");
        let PrepareAnswer::Failed(why) = request_prepare(&gateway, t).unwrap() else {
            panic!("expected a failure");
        };
        assert_eq!(why, "table 0 grew at run time");
        drop(gateway);
        assert_eq!(
            server.join().unwrap(),
            (true, 0),
            "EOF ends the channel cleanly"
        );
    }

    #[test]
    fn a_malformed_request_is_refused_counted_and_ends_the_channel() {
        let (mut gateway, worker) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut refused = 0;
            let r = serve(&worker, || Err("never called".into()), &mut refused);
            (r.map_err(|e| e.is_malformed()), refused)
        });
        gateway.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let answer = recv(&gateway).unwrap().unwrap();
        let (ControlMessage::PrepareFailed { message }, None) = answer else {
            panic!("{answer:?}")
        };
        assert!(message.contains("bad magic"), "{message}");
        assert_eq!(server.join().unwrap(), (Err(true), 1));
        // Closed with our unread bytes still queued: a reset rather than an orderly EOF.
        let after = recv(&gateway);
        assert!(
            matches!(
                after,
                Ok(None)
                    | Err(ChannelError::Sys {
                        source: Errno::ECONNRESET,
                        ..
                    })
            ),
            "the worker closed the channel: {after:?}"
        );
    }

    #[test]
    fn an_fd_on_a_message_that_carries_none_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let fd = memfd(b"x");
        use std::os::fd::AsFd;
        send(&a, &ControlMessage::Prepare, Some(fd.as_fd())).unwrap();
        let err = recv(&b).unwrap_err();
        assert!(err.is_malformed(), "{err}");
    }

    #[test]
    fn an_answer_without_its_memfd_is_refused() {
        let (gateway, worker) = UnixStream::pair().unwrap();
        let answer = ControlMessage::Prepared {
            waited_us: 0,
            capture_us: 0,
            meta: vec![1],
        };
        send(&worker, &answer, None).unwrap();
        let err = request_prepare(&gateway, Duration::from_secs(5))
            .err()
            .unwrap();
        assert!(err.is_malformed(), "{err}");
    }

    #[test]
    fn a_silent_worker_times_out() {
        let (gateway, _worker) = UnixStream::pair().unwrap();
        let err = request_prepare(&gateway, Duration::from_millis(50))
            .err()
            .unwrap();
        assert!(matches!(err, ChannelError::TimedOut(_)), "{err}");
    }
}
