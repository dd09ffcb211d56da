//! Becoming an unprivileged user.

use nix::unistd::{Gid, Uid, getresgid, getresuid, setgroups, setresgid, setresuid};

use crate::{SandboxError, os};

/// The uid and gid a confined process runs as. Neither may be 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
}

impl Credentials {
    /// Drops supplementary groups, then sets the real, effective and saved gid and uid. With
    /// no uid 0 left and no `SECBIT_KEEP_CAPS`, the kernel empties the permitted, effective
    /// and ambient capability sets; changing uid also makes the process non-dumpable, which
    /// is then asked for explicitly as well. Verified after: every id must read back, and
    /// getting root back must fail.
    pub fn assume(self) -> Result<(), SandboxError> {
        if self.uid == 0 || self.gid == 0 {
            return Err(SandboxError::Check(format!(
                "refusing to confine to uid {} gid {}: 0 is root",
                self.uid, self.gid
            )));
        }
        let (uid, gid) = (Uid::from_raw(self.uid), Gid::from_raw(self.gid));
        // Groups first: after the uid changes, there is no privilege left to change them.
        setgroups(&[]).map_err(os("dropping supplementary groups"))?;
        setresgid(gid, gid, gid).map_err(os("setresgid"))?;
        setresuid(uid, uid, uid).map_err(os("setresuid"))?;
        nix::sys::prctl::set_dumpable(false).map_err(os("PR_SET_DUMPABLE 0"))?;
        let ids = getresuid().map_err(os("getresuid"))?;
        let gids = getresgid().map_err(os("getresgid"))?;
        if [ids.real, ids.effective, ids.saved] != [uid; 3]
            || [gids.real, gids.effective, gids.saved] != [gid; 3]
        {
            return Err(SandboxError::Check(format!(
                "credentials did not change: uids {ids:?}, gids {gids:?}"
            )));
        }
        if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
            return Err(SandboxError::Check(
                "root could be regained after dropping it".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_child::in_child;

    #[test]
    fn root_is_refused_as_a_target() {
        let e = Credentials { uid: 0, gid: 5 }.assume().unwrap_err();
        assert!(e.to_string().contains("0 is root"), "{e}");
    }

    #[test]
    fn a_confined_process_has_no_capability_and_cannot_open_roots_files() {
        if !testkit::require_root(
            "a_confined_process_has_no_capability_and_cannot_open_roots_files",
            "namespaces, setuid",
        ) {
            return;
        }
        in_child(|| {
            Credentials {
                uid: 200_123,
                gid: 200_124,
            }
            .assume()
            .map_err(|e| e.to_string())?;
            let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
            for line in [
                "CapEff:\t0000000000000000",
                "CapPrm:\t0000000000000000",
                "Groups:\t \n",
            ] {
                if !status.contains(line) {
                    return Err(format!("no {line:?} in:\n{status}"));
                }
            }
            match std::fs::File::open("/etc/shadow") {
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Ok(()),
                other => Err(format!("/etc/shadow: {other:?}")),
            }
        });
    }
}
