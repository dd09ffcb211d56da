//! Handing a userfaultfd to the handler process (Firecracker's model): the sandboxed child
//! registers its linear memory and sends the uffd with `SCM_RIGHTS` over a Unix socket, so
//! the pages are fetched and installed by the node service, outside the sandbox.
//!
//! One message: 24 bytes `magic "SPDLUFFD" | base u64 | len u64` (little endian) carrying
//! exactly one descriptor. The receiver checks the descriptor really is a userfaultfd, so a
//! confused peer cannot make the handler poll and ioctl some other file. std's ancillary-data
//! API on `UnixStream` is still unstable, so this uses nix's `sendmsg`/`recvmsg`.

use std::io::{self, IoSlice, IoSliceMut, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use userfaultfd::Uffd;

const MAGIC: u64 = u64::from_le_bytes(*b"SPDLUFFD");
const MESSAGE: usize = 24;

/// Why a uffd could not be handed over.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("{op}: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: Errno,
    },
    #[error("reading the handoff message: {0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the socket before the handoff")]
    Closed,
    #[error("the handoff message does not start with the magic")]
    BadMagic,
    #[error("the handoff carried {0} descriptors, expected one")]
    FdCount(usize),
    #[error("the handoff's control data was truncated")]
    Truncated,
    #[error("the descriptor received is {0:?}, not a userfaultfd")]
    NotUserfaultfd(String),
}

/// A userfaultfd received from another process, and the region it is registered over (an
/// address range in the sender's address space).
#[derive(Debug)]
pub struct Handoff {
    pub uffd: Uffd,
    pub base: usize,
    pub len: usize,
}

/// Sends `uffd`, registered over `[base, base + len)` of this process, to the handler at the
/// other end of `stream`.
///
/// Keep `uffd` open for as long as the region is in use. Were every descriptor of it closed,
/// the region would silently turn into ordinary zero-filled memory; with this copy open a
/// dead handler leaves touches waiting (the process is still killable) instead.
pub fn send_uffd(
    stream: &UnixStream,
    uffd: &Uffd,
    base: usize,
    len: usize,
) -> Result<(), HandoffError> {
    let mut msg = [0u8; MESSAGE];
    msg[..8].copy_from_slice(&MAGIC.to_le_bytes());
    msg[8..16].copy_from_slice(&(base as u64).to_le_bytes());
    msg[16..].copy_from_slice(&(len as u64).to_le_bytes());
    send_with_fds(stream.as_fd(), &msg, &[uffd.as_raw_fd()]).map_err(|source| HandoffError::Sys {
        op: "sendmsg",
        source,
    })
}

/// Writes all of `bytes` to the stream `socket`, `fds` riding as `SCM_RIGHTS` on the first
/// byte (a short write sends the rest without them), retried on `EINTR`, never raising
/// SIGPIPE. The one place the workspace sends descriptors on a stream: the uffd hand-off and
/// the worker control channel.
pub fn send_with_fds(socket: BorrowedFd<'_>, bytes: &[u8], fds: &[RawFd]) -> Result<(), Errno> {
    let mut sent = 0;
    while sent < bytes.len() {
        let iov = [IoSlice::new(&bytes[sent..])];
        let with_fds = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if sent == 0 && !fds.is_empty() {
            &with_fds
        } else {
            &[]
        };
        match sendmsg::<()>(
            socket.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => sent += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The most descriptors the kernel passes in one message (`SCM_MAX_FD`, include/net/scm.h).
pub const SCM_MAX_FD: usize = 253;

/// What one [`recv_with_fds`] got.
pub struct ReceivedFds {
    /// Bytes received into the buffer.
    pub bytes: usize,
    /// The descriptors that came with them (close-on-exec), in order.
    pub fds: Vec<OwnedFd>,
    /// The message was longer than the buffer (`MSG_TRUNC`, datagram/seqpacket sockets).
    pub data_cut: bool,
    /// The control part did not fit `space` (`MSG_CTRUNC`). None are returned (nix does not
    /// parse a cut control buffer), so the kernel's installed ones would stay open: give
    /// `space` room for [`SCM_MAX_FD`] descriptors, the most one message can carry.
    pub fds_cut: bool,
}

/// One `recvmsg` on `socket` into `buf`, retried on `EINTR`, taking the `SCM_RIGHTS`
/// descriptors that came with the bytes (room for them: `space`, from `nix::cmsg_space!`).
/// The one place the workspace receives descriptors: the uffd hand-off, the worker control
/// channel and the zygote protocol all read through it.
pub fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    space: &mut [u8],
) -> Result<ReceivedFds, Errno> {
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => msg,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        };
        let fds_cut = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        let mut fds = Vec::new();
        if !fds_cut {
            for cmsg in msg.cmsgs()? {
                if let ControlMessageOwned::ScmRights(raw) = cmsg {
                    // SAFETY: SCM_RIGHTS just installed these descriptors in this process;
                    // nothing else refers to them yet.
                    fds.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
        }
        return Ok(ReceivedFds {
            bytes: msg.bytes,
            fds,
            data_cut: msg.flags.contains(MsgFlags::MSG_TRUNC),
            fds_cut,
        });
    }
}

/// Receives a uffd sent with [`send_uffd`].
pub fn recv_uffd(stream: &UnixStream) -> Result<Handoff, HandoffError> {
    let mut msg = [0u8; MESSAGE];
    // Room for as many descriptors as one message can carry (SCM_MAX_FD): every one a peer
    // sends is received, owned and closed when unwanted, never left open by a cut buffer.
    let mut space = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let got = recv_with_fds(stream.as_fd(), &mut msg, &mut space).map_err(|source| {
        HandoffError::Sys {
            op: "recvmsg",
            source,
        }
    })?;
    let (got, fds, truncated) = (got.bytes, got.fds, got.fds_cut);
    if got == 0 {
        return Err(HandoffError::Closed);
    }
    if truncated {
        return Err(HandoffError::Truncated);
    }
    if got < MESSAGE {
        (&*stream).read_exact(&mut msg[got..])?;
    }
    if u64::from_le_bytes(msg[..8].try_into().unwrap_or_default()) != MAGIC {
        return Err(HandoffError::BadMagic);
    }
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&msg[at..at + 8]);
        u64::from_le_bytes(b) as usize
    };
    let (base, len) = (word(8), word(16));
    let mut fds = fds;
    if fds.len() != 1 {
        return Err(HandoffError::FdCount(fds.len()));
    }
    let fd = fds.pop().ok_or(HandoffError::FdCount(0))?;
    let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    let target = target.to_string_lossy().into_owned();
    if target != "anon_inode:[userfaultfd]" {
        return Err(HandoffError::NotUserfaultfd(target));
    }
    // SAFETY: the descriptor is a userfaultfd we own; Uffd takes over closing it.
    let uffd = unsafe { Uffd::from_raw_fd(fd.into_raw_fd()) };
    Ok(Handoff { uffd, base, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_uffd_descriptor_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let mut msg = [0u8; MESSAGE];
        msg[..8].copy_from_slice(&MAGIC.to_le_bytes());
        let fds = [file.as_raw_fd()];
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(&msg)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        match recv_uffd(&b) {
            Err(HandoffError::NotUserfaultfd(t)) => assert_eq!(t, "/dev/null"),
            other => panic!("expected NotUserfaultfd, got {other:?}"),
        }
    }

    #[test]
    fn a_message_without_descriptor_or_magic_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut msg = [0u8; MESSAGE];
        msg[..8].copy_from_slice(&MAGIC.to_le_bytes());
        std::io::Write::write_all(&mut &a, &msg).unwrap();
        assert!(matches!(recv_uffd(&b), Err(HandoffError::FdCount(0))));
        std::io::Write::write_all(&mut &a, &[0u8; MESSAGE]).unwrap();
        assert!(matches!(recv_uffd(&b), Err(HandoffError::BadMagic)));
        drop(a);
        assert!(matches!(recv_uffd(&b), Err(HandoffError::Closed)));
    }
}
