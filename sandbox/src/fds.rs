//! Closing every fd a confined process was not meant to have.

use std::os::fd::RawFd;

use crate::{SandboxError, os};

/// Closes every fd above stdio that is not in `keep`. Whatever else is open here was leaked
/// into the process (an fd some library opened without close-on-exec in the parent, say):
/// the caller names every fd it still owns, so nothing it holds is closed behind its back.
pub fn close_all_except(keep: &[RawFd]) -> Result<(), SandboxError> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|&&fd| fd > 2)
        .map(|&fd| fd as u32)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first = 3u32;
    for fd in keep.into_iter().chain([u32::MAX]) {
        if fd > first {
            close_range(first, fd - 1)?;
        }
        first = fd.saturating_add(1);
    }
    Ok(())
}

fn close_range(first: u32, last: u32) -> Result<(), SandboxError> {
    // SAFETY: close_range only closes fds in [first, last]; the caller's contract is that it
    // owns none of them (every fd it owns is in `keep`), so no live OwnedFd is invalidated.
    // Raw syscall: neither nix nor glibc 2.36's headers as bound by libc expose it.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    if rc < 0 {
        return Err(os("close_range")(nix::Error::last()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_child::in_child;
    use std::os::fd::IntoRawFd;

    fn is_open(fd: RawFd) -> bool {
        // SAFETY: F_GETFD reads one fd's flags and touches no memory.
        unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
    }

    #[test]
    fn closes_what_is_not_kept_and_keeps_what_is() {
        let kept = std::fs::File::open("/dev/null").unwrap().into_raw_fd();
        let dropped = std::fs::File::open("/dev/null").unwrap().into_raw_fd();
        let above = std::fs::File::open("/dev/null").unwrap().into_raw_fd();
        in_child(|| {
            close_all_except(&[kept, 1]).map_err(|e| e.to_string())?;
            match (
                is_open(0),
                is_open(2),
                is_open(kept),
                is_open(dropped),
                is_open(above),
            ) {
                (true, true, true, false, false) => Ok(()),
                seen => Err(format!("stdio, kept, dropped, above open: {seen:?}")),
            }
        });
    }
}
