//! The network and mount namespaces every confined process of one gateway shares.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::fcntl::{OFlag, open};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::stat::Mode;

use crate::{SandboxError, os};

/// Where the empty root is built, inside the new mount namespace only (the mount is private
/// to it, so the host's directory is untouched).
const STAGING: &str = "/tmp";
const OLD_ROOT: &str = "/tmp/.old-root";

/// One empty network namespace and one mount namespace with an empty, read-only root.
///
/// Holding the two namespace fds keeps the namespaces alive with no process in them; they go
/// when the last holder (this value, or a process that joined) is gone.
#[derive(Debug)]
pub struct SharedNamespaces {
    net: OwnedFd,
    mount: OwnedFd,
}

impl SharedNamespaces {
    /// Makes the namespaces on a short-lived thread of its own: `unshare` moves only the
    /// calling thread (a thread may leave its process's mount namespace because it gets its
    /// own copy of the filesystem context), so the caller and its other threads stay where
    /// they are. Needs CAP_SYS_ADMIN.
    pub fn create() -> Result<SharedNamespaces, SandboxError> {
        std::thread::Builder::new()
            .name("spindle-sandbox-ns".into())
            .spawn(build_on_this_thread)
            .map_err(|e| SandboxError::Check(format!("starting the namespace thread: {e}")))?
            .join()
            .map_err(|_| SandboxError::Check("the namespace thread panicked".into()))?
    }

    pub fn net(&self) -> BorrowedFd<'_> {
        self.net.as_fd()
    }

    pub fn mount(&self) -> BorrowedFd<'_> {
        self.mount.as_fd()
    }
}

fn build_on_this_thread() -> Result<SharedNamespaces, SandboxError> {
    unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS)
        .map_err(os("unshare(CLONE_NEWNET | CLONE_NEWNS)"))?;
    // The namespaces are the objects these fds name; what the root becomes below is what a
    // process joining them sees.
    let ns = |path: &str, step| {
        open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).map_err(os(step))
    };
    let net = ns(
        "/proc/thread-self/ns/net",
        "opening the new network namespace",
    )?;
    let mount_ns = ns(
        "/proc/thread-self/ns/mnt",
        "opening the new mount namespace",
    )?;

    let none: Option<&str> = None;
    // Nothing mounted or unmounted below may reach the host's namespace.
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(os("making every mount private"))?;
    let locked = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("spindle-empty-root"),
        STAGING,
        Some("tmpfs"),
        locked,
        Some("size=16k,nr_inodes=16,mode=0555"),
    )
    .map_err(os("mounting the empty root's tmpfs"))?;
    for dir in [OLD_ROOT, "/tmp/proc"] {
        nix::unistd::mkdir(dir, Mode::from_bits_truncate(0o555))
            .map_err(os("making a directory in the empty root"))?;
    }
    nix::unistd::pivot_root(STAGING, OLD_ROOT).map_err(os("pivot_root into the empty root"))?;
    nix::unistd::chdir("/").map_err(os("chdir to the empty root"))?;
    umount2("/.old-root", MntFlags::MNT_DETACH).map_err(os("detaching the host's root"))?;
    // An empty directory left behind would be harmless; removing it keeps the root empty.
    std::fs::remove_dir("/.old-root").map_err(|e| {
        os("removing the old root's mount point")(nix::Error::from_raw(
            e.raw_os_error().unwrap_or(0),
        ))
    })?;
    // Only processes of the reader's own uid, and only their /proc/PID directories: no
    // /proc/sys, /proc/kcore, /proc/sysrq-trigger.
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        locked,
        Some("hidepid=invisible,subset=pid"),
    )
    .map_err(os("mounting the confined /proc"))?;
    mount(
        none,
        "/",
        none,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | locked,
        none,
    )
    .map_err(os("making the empty root read-only"))?;
    Ok(SharedNamespaces {
        net,
        mount: mount_ns,
    })
}

/// Joins the network and mount namespaces `net` and `mount` name (made by
/// [`SharedNamespaces::create`], possibly in another process that passed the fds on), and
/// moves to the new root. Needs CAP_SYS_ADMIN and CAP_SYS_CHROOT, and a single-threaded
/// process (the kernel refuses a mount-namespace change otherwise).
pub fn join(net: BorrowedFd<'_>, mount: BorrowedFd<'_>) -> Result<(), SandboxError> {
    // setns checks each fd names a namespace of the kind given: a wrong fd is EINVAL here,
    // never a silent no-op.
    setns(net, CloneFlags::CLONE_NEWNET).map_err(os("joining the sandbox network namespace"))?;
    setns(mount, CloneFlags::CLONE_NEWNS).map_err(os("joining the sandbox mount namespace"))?;
    nix::unistd::chdir("/").map_err(os("chdir to the sandbox root"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Credentials;
    use crate::test_child::in_child;
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, TcpListener, TcpStream};

    #[test]
    fn joined_namespaces_have_an_empty_root_no_network_and_keep_handed_sockets() {
        if !testkit::require_root(
            "joined_namespaces_have_an_empty_root_no_network_and_keep_handed_sockets",
            "namespaces, setuid",
        ) {
            return;
        }
        let shared = SharedNamespaces::create().unwrap();
        // Made before joining, in the host's network namespace, like a worker's socket.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let address = listener.local_addr().unwrap();
        let mut handed = TcpStream::connect(address).unwrap();
        let (mut gateway_end, _) = listener.accept().unwrap();
        // The caller's own namespaces are untouched by creating the shared ones.
        assert!(std::path::Path::new("/etc/passwd").exists());
        in_child(move || {
            join(shared.net(), shared.mount()).map_err(|e| e.to_string())?;
            let root: Vec<_> = std::fs::read_dir("/")
                .map_err(|e| e.to_string())?
                .map(|e| e.map(|e| e.file_name()).map_err(|e| e.to_string()))
                .collect::<Result<_, _>>()?;
            if root != ["proc"] {
                return Err(format!("root holds {root:?}"));
            }
            match std::fs::File::open("/etc/shadow") {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                other => return Err(format!("/etc/shadow: {other:?}")),
            }
            if std::fs::create_dir("/made-by-a-worker").is_ok() {
                return Err("the empty root is writable".into());
            }
            match TcpStream::connect(address) {
                Err(e) if e.raw_os_error() == Some(libc::ENETUNREACH) => {}
                other => return Err(format!("connect to {address}: {other:?}")),
            }
            let interfaces =
                std::fs::read_to_string("/proc/self/net/dev").map_err(|e| e.to_string())?;
            if interfaces
                .lines()
                .skip(2)
                .map(|l| l.trim_start())
                .any(|l| !l.starts_with("lo:"))
            {
                return Err(format!("interfaces besides lo:\n{interfaces}"));
            }
            handed.write_all(b"ping").map_err(|e| e.to_string())?;
            // /proc shows only this uid's processes once the uid is dropped.
            Credentials {
                uid: 200_321,
                gid: 200_321,
            }
            .assume()
            .map_err(|e| e.to_string())?;
            let pids: Vec<u32> = std::fs::read_dir("/proc")
                .map_err(|e| e.to_string())?
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
            if pids != [std::process::id()] {
                return Err(format!(
                    "/proc lists {pids:?}, not only {}",
                    std::process::id()
                ));
            }
            Ok(())
        });
        let mut got = [0; 4];
        gateway_end.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
    }
}
