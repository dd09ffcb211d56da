//! The host side of a function's preopened directories (`files:` in the config): one
//! directory fd per entry, opened once by whoever can still see the host's filesystem (the
//! gateway, before any worker joins the sandbox's empty mount namespace; a tool run outside
//! the sandbox opens them itself), and shared by every instance the process builds. A forked
//! child inherits them with the rest of its fds.
//!
//! The fds are `O_PATH`: they name the directory and let paths be resolved beneath it
//! ([`super::fs`]), nothing more; reading a directory's entries opens it anew beneath itself.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag, open, openat2};
use nix::sys::stat::{Mode, SFlag, fstat};

use crate::config::PreopenDir;

/// Why a function's directories could not be opened or adopted.
#[derive(Debug, thiserror::Error)]
pub enum PreopenError {
    #[error("cannot open the directory `{}` (files: {guest}): {source}", host.display())]
    Open {
        guest: String,
        host: PathBuf,
        source: std::io::Error,
    },
    #[error("`{}` (files: {guest}) is not a directory", host.display())]
    NotADirectory { guest: String, host: PathBuf },
    #[error(
        "this kernel cannot resolve paths beneath a directory (openat2: {0}); `files:` needs \
         Linux 5.6 or later"
    )]
    NoOpenat2(nix::errno::Errno),
    #[error("the function has {expected} preopened directories, but {got} fds were passed")]
    Count { expected: usize, got: usize },
    #[error("fd {fd} passed for `{guest}` is not a directory")]
    BadFd { fd: i32, guest: String },
}

/// One preopened directory: where the guest sees it and the host directory's fd.
#[derive(Debug)]
pub struct Preopen {
    pub guest: String,
    pub dir: OwnedFd,
}

/// A function's preopened directories, in config order (the `i`-th is the guest's fd
/// `3 + i`). Cloning shares the fds.
#[derive(Debug, Clone, Default)]
pub struct Preopens(Arc<[Preopen]>);

impl Preopens {
    /// No directories: what a function without `files:` gets.
    pub fn none() -> Self {
        Preopens::default()
    }

    /// Opens every directory of `dirs` from this process's view of the filesystem, and checks
    /// that the kernel can resolve paths beneath them.
    pub fn open(dirs: &[PreopenDir]) -> Result<Self, PreopenError> {
        let mut opened = Vec::with_capacity(dirs.len());
        for d in dirs {
            let fd = open(
                &d.host,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| match e {
                nix::errno::Errno::ENOTDIR => PreopenError::NotADirectory {
                    guest: d.guest.clone(),
                    host: d.host.clone(),
                },
                e => PreopenError::Open {
                    guest: d.guest.clone(),
                    host: d.host.clone(),
                    source: e.into(),
                },
            })?;
            opened.push(Preopen {
                guest: d.guest.clone(),
                dir: fd,
            });
        }
        if let Some(first) = opened.first() {
            probe_openat2(first.dir.as_fd())?;
        }
        Ok(Preopens(opened.into()))
    }

    /// Adopts `fds` (opened by the gateway, in config order) as the directories of `dirs`,
    /// after checking there is one per entry and each is a directory.
    pub fn adopt(dirs: &[PreopenDir], fds: Vec<OwnedFd>) -> Result<Self, PreopenError> {
        if fds.len() != dirs.len() {
            return Err(PreopenError::Count {
                expected: dirs.len(),
                got: fds.len(),
            });
        }
        let mut adopted = Vec::with_capacity(dirs.len());
        for (d, fd) in dirs.iter().zip(fds) {
            let is_dir = fstat(&fd).is_ok_and(|st| {
                SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
            });
            if !is_dir {
                use std::os::fd::AsRawFd;
                return Err(PreopenError::BadFd {
                    fd: fd.as_raw_fd(),
                    guest: d.guest.clone(),
                });
            }
            adopted.push(Preopen {
                guest: d.guest.clone(),
                dir: fd,
            });
        }
        Ok(Preopens(adopted.into()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, index: usize) -> Option<&Preopen> {
        self.0.get(index)
    }

    /// The guest paths, in fd order.
    pub fn guest_paths(&self) -> Vec<String> {
        self.0.iter().map(|p| p.guest.clone()).collect()
    }

    /// The directory fds, in fd order (for handing to another process).
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.0.iter().map(|p| p.dir.as_fd()).collect()
    }
}

/// `openat2` with `RESOLVE_BENEATH` on `dir` works here: without it no guest path could be
/// resolved safely, so a function with files must not start.
fn probe_openat2(dir: BorrowedFd<'_>) -> Result<(), PreopenError> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    match openat2(dir, ".", how) {
        Ok(_) => Ok(()),
        Err(
            e @ (nix::errno::Errno::ENOSYS | nix::errno::Errno::EINVAL | nix::errno::Errno::EPERM),
        ) => Err(PreopenError::NoOpenat2(e)),
        // Anything else (EACCES, say) is about this directory, and a guest will be told so.
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("preopen-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn opens_directories_and_refuses_files_and_missing_paths() {
        let d = dir("open");
        std::fs::write(d.join("f"), "x").unwrap();
        let spec = |guest: &str, host: PathBuf| PreopenDir {
            guest: guest.into(),
            host,
        };
        let p = Preopens::open(&[spec("/a", d.clone()), spec("/b", d.clone())]).unwrap();
        assert_eq!(p.guest_paths(), ["/a", "/b"]);
        assert_eq!(p.fds().len(), 2);
        let err = Preopens::open(&[spec("/f", d.join("f"))]).unwrap_err();
        assert!(matches!(err, PreopenError::NotADirectory { .. }), "{err}");
        let err = Preopens::open(&[spec("/m", d.join("missing"))]).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");

        // Adopting checks the count and the kind.
        let fds = |p: &Preopens| {
            p.fds()
                .into_iter()
                .map(|fd| fd.try_clone_to_owned().unwrap())
                .collect::<Vec<_>>()
        };
        let dirs = [spec("/a", d.clone()), spec("/b", d.clone())];
        assert_eq!(Preopens::adopt(&dirs, fds(&p)).unwrap().len(), 2);
        let err = Preopens::adopt(&dirs[..1], fds(&p)).unwrap_err();
        assert!(
            matches!(
                err,
                PreopenError::Count {
                    expected: 1,
                    got: 2
                }
            ),
            "{err}"
        );
        let file = OwnedFd::from(std::fs::File::open(d.join("f")).unwrap());
        let err = Preopens::adopt(&dirs[..1], vec![file]).unwrap_err();
        assert!(matches!(err, PreopenError::BadFd { .. }), "{err}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
