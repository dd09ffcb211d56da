//! Confining a worker or zygote before its first guest instruction: which layers a process
//! gets, from the config's `sandbox:` and what the gateway passed. The `sandbox` crate
//! applies them; docs/security.md says what each stops.

use std::os::fd::{AsFd, OwnedFd, RawFd};

use proto::worker::{MOUNT_NS_FD, PREOPEN_FD};
use sandbox::{Confinement, Credentials, Layers, Profile};

use crate::instance::{InstanceError, Namespaces};

/// How one function's processes are confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunctionSandbox {
    pub enabled: bool,
    /// The uid and gid its processes run as.
    pub uid: u32,
    /// How many preopened directories it has (`files:`): their fds, from
    /// `proto::worker::PREOPEN_FD` on, stay open.
    pub preopens: usize,
}

/// Which process is being confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An exec'd worker building its instance cold.
    Worker,
    /// A zygote; its forked children inherit everything and add [`child_filter`].
    Zygote,
    /// A worker resuming from a remote image. It fetches pages over TCP from the image's
    /// parent (reconnecting if a connection drops) and serves its own userfaultfd, made
    /// before confinement: it keeps the host's network and mount namespaces, and gets the
    /// credentials, fd, no_new_privs and seccomp (`Resumed` profile) layers.
    Resumed,
}

/// Every fd a confined process keeps besides stdio: the fixed numbers of the hand-off (the
/// ones given, the rest unused or a zygote's placeholders) and its function's preopens.
fn kept_fds(preopens: usize) -> Vec<RawFd> {
    (3..=MOUNT_NS_FD)
        .chain(PREOPEN_FD..PREOPEN_FD + preopens as RawFd)
        .collect()
}

/// Confines the calling process as `sandbox` and `role` say, joining `namespaces` (then
/// closing them). A gateway that is root always passes the namespaces to a worker or zygote
/// of a confined function; one that is not root cannot make them, nor can this process drop
/// a uid it does not have: then only the layers that need no privilege apply.
pub fn confine(
    sandbox: FunctionSandbox,
    namespaces: Option<Namespaces<OwnedFd>>,
    role: Role,
) -> Result<Option<Layers>, InstanceError> {
    if !sandbox.enabled {
        return Ok(None);
    }
    let privileged = nix::unistd::geteuid().is_root();
    let joins = privileged && role != Role::Resumed;
    if joins && namespaces.is_none() {
        return Err(InstanceError::Sandbox(sandbox::SandboxError::Check(
            "the gateway passed no sandbox namespaces to a process running as root".into(),
        )));
    }
    let joined = namespaces.as_ref().filter(|_| joins);
    let layers = sandbox::confine(&Confinement {
        namespaces: joined.map(|ns| (ns.net.as_fd(), ns.mount.as_fd())),
        credentials: privileged.then_some(Credentials {
            uid: sandbox.uid,
            gid: sandbox.uid,
        }),
        keep_fds: &kept_fds(sandbox.preopens),
        profile: match role {
            Role::Worker => Profile::Worker,
            Role::Zygote => Profile::Zygote,
            Role::Resumed => Profile::Resumed,
        },
    })
    .map_err(InstanceError::Sandbox)?;
    drop(namespaces);
    tracing::debug!(?role, ?layers, uid = sandbox.uid, "confined");
    Ok(Some(layers))
}

/// In a zygote's forked child: a filter stacked on the zygote's that takes back forking and
/// adding filters, so the child may make exactly a worker's calls.
pub fn child_filter(sandbox: FunctionSandbox) -> Result<(), InstanceError> {
    if sandbox.enabled {
        sandbox::forbid_forking().map_err(InstanceError::Sandbox)?;
    }
    Ok(())
}
