//! Least privilege for the processes that run guest code (a function's workers and its
//! zygote), in the spirit of Firecracker's jailer: everything such a process does not need
//! is dropped before the first guest instruction runs, so a guest that escaped wasmer's
//! sandbox would hold an unprivileged, syscall-filtered process in an empty world.
//!
//! The layers, in the order [`confine`] applies them (docs/security.md says what each stops):
//!
//! 1. **Namespaces** ([`SharedNamespaces`]): a network namespace with no interface but a
//!    down loopback, and a mount namespace whose root is an empty, read-only tmpfs with only
//!    a `/proc` that shows the process's own uid (`hidepid=invisible,subset=pid`). They are
//!    made once per gateway and *joined* (`setns`, microseconds) by each zygote or exec'd
//!    worker; a forked child inherits them, so forking pays nothing for them. Sockets the
//!    process was handed keep working: a socket belongs to the namespace it was made in.
//! 2. **File descriptors**: every fd but stdio and the ones named is closed.
//! 3. **Credentials** ([`Credentials`]): supplementary groups dropped, gid and uid set
//!    (real, effective and saved) to an unprivileged pair; with no uid 0 left, the kernel
//!    clears every capability. The process is made non-dumpable.
//! 4. **`no_new_privs`** and a **seccomp** allowlist ([`Profile`]): no exec can gain
//!    privileges, and a system call outside the list kills the process (SIGSYS).
//!
//! Creating and joining namespaces and changing uid need root (CAP_SYS_ADMIN, CAP_SETUID);
//! a gateway that is not root cannot give layers 1 and 3 and says so ([`Layers`]); layers 2
//! and 4 need no privilege and always apply.
//!
//! This crate knows nothing of Spindle's config or hand-off: callers say which uid, which
//! fds and which profile.

mod creds;
mod fds;
mod namespaces;
mod seccomp;
#[cfg(test)]
mod test_child;

pub use creds::Credentials;
use fds::close_all_except;
pub use namespaces::{SharedNamespaces, join};
pub use seccomp::{
    LOG_ENV as SECCOMP_LOG_ENV, Profile, forbid_forking, install as restrict_syscalls,
};

use std::os::fd::{BorrowedFd, RawFd};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{step}: {source}")]
    Os {
        step: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("building the seccomp filter: {0}")]
    Seccomp(#[from] seccompiler::BackendError),
    #[error("installing the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
    #[error("{0}")]
    Check(String),
}

pub(crate) fn os(step: &'static str) -> impl FnOnce(nix::Error) -> SandboxError {
    move |source| SandboxError::Os { step, source }
}

/// What a process is confined to.
#[derive(Debug, Clone, Copy)]
pub struct Confinement<'a> {
    /// The namespaces to join (net, mount); `None` keeps the current ones.
    pub namespaces: Option<(BorrowedFd<'a>, BorrowedFd<'a>)>,
    /// The uid/gid to become; `None` keeps the current ones.
    pub credentials: Option<Credentials>,
    /// Fds that stay open besides stdio.
    pub keep_fds: &'a [RawFd],
    pub profile: Profile,
}

/// Which layers a confinement applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Layers {
    pub namespaces: bool,
    pub credentials: bool,
    pub seccomp: bool,
}

/// Applies `confinement` to the calling process, in the order the crate doc gives. Must be
/// called while the process has a single thread: joining a mount namespace requires it, and
/// the credentials and the seccomp filter would otherwise have to be synchronised onto
/// threads that may already be running untrusted work.
pub fn confine(confinement: &Confinement<'_>) -> Result<Layers, SandboxError> {
    let mut layers = Layers::default();
    if let Some((net, mount)) = confinement.namespaces {
        join(net, mount)?;
        layers.namespaces = true;
    }
    close_all_except(confinement.keep_fds)?;
    if let Some(credentials) = confinement.credentials {
        credentials.assume()?;
        layers.credentials = true;
    }
    seccomp::install(confinement.profile)?;
    layers.seccomp = true;
    Ok(layers)
}

/// Opens one of this process's own `/proc/self` files that the kernel makes readable only
/// to a dumpable process (`pagemap`, say), by being dumpable for just the `open`. A confined
/// process is non-dumpable so that a sibling with the same uid cannot read its memory
/// through `/proc/PID/mem`; the fd, once open, keeps working.
pub fn open_own_proc_file(path: &str) -> std::io::Result<std::fs::File> {
    match std::fs::File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let was = nix::sys::prctl::get_dumpable().map_err(std::io::Error::from)?;
            nix::sys::prctl::set_dumpable(true).map_err(std::io::Error::from)?;
            let opened = std::fs::File::open(path);
            nix::sys::prctl::set_dumpable(was).map_err(std::io::Error::from)?;
            opened
        }
        other => other,
    }
}
