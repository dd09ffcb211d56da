//! The process a worker runs in, however it was started: exec'd by the gateway (a tokio
//! [`Child`]) or forked by a zygote with `CLONE_PARENT`, which makes it the gateway's child
//! too but not one tokio knows. Both are waited for and signalled the same way, so the
//! supervisor treats them alike (restart, 502/504 for what they held, parent-death signal).

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use tokio::io::unix::AsyncFd;
use tokio::process::Child;

/// A running (or exited, not yet waited for) worker process.
pub enum WorkerProcess {
    Exec(Child),
    Forked(ForkedChild),
}

impl WorkerProcess {
    /// The pid while the process has not been waited for.
    pub fn id(&self) -> Option<u32> {
        match self {
            WorkerProcess::Exec(c) => c.id(),
            WorkerProcess::Forked(c) => c.status.is_none().then_some(c.pid),
        }
    }

    /// Waits for the process to exit (cancel-safe) and reaps it.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self {
            WorkerProcess::Exec(c) => c.wait().await,
            WorkerProcess::Forked(c) => c.wait().await,
        }
    }

    /// Sends `signal` unless the process was already waited for (its pid may be reused then).
    pub fn signal(&self, signal: Signal) -> std::io::Result<()> {
        match self {
            WorkerProcess::Exec(c) => match c.id() {
                // Our own child, not yet reaped (id() is Some): the pid cannot name another
                // process.
                Some(pid) => {
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as libc::pid_t), signal)
                        .map_err(Into::into)
                }
                None => Ok(()),
            },
            WorkerProcess::Forked(c) => c.signal(signal),
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns once the process is reaped.
    pub async fn stop(&mut self, grace: Duration) {
        let _ = self.signal(Signal::SIGTERM);
        if tokio::time::timeout(grace, self.wait()).await.is_err() {
            let _ = self.signal(Signal::SIGKILL);
            let _ = self.wait().await;
        }
    }
}

/// A child of the gateway that a zygote forked, watched through a pidfd: readable once it
/// exits, and `waitid(P_PIDFD)` on it reaps it with its real exit status. Dropping it
/// unreaped kills it and reaps it in the background.
pub struct ForkedChild {
    pid: u32,
    /// `None` only while being dropped.
    pidfd: Option<AsyncFd<OwnedFd>>,
    status: Option<ExitStatus>,
}

impl ForkedChild {
    /// Adopts `pid`, which must be a child of this process (made by `clone(CLONE_PARENT)`
    /// from a child of ours) that nothing has reaped: then the pid cannot have been reused,
    /// because only this process can reap it and tokio reaps only the children it spawned.
    pub fn adopt(pid: u32) -> std::io::Result<ForkedChild> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; raw syscall
        // because nix has no pidfd_open.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd (pidfds are close-on-exec) and nothing else
        // owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        // Check the claim: waitid only works on our own children.
        match waitid(
            Id::PIDFd(fd.as_fd()),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        ) {
            Ok(_) => {}
            Err(nix::errno::Errno::ECHILD) => {
                return Err(std::io::Error::other(format!(
                    "pid {pid} is not a child of the gateway"
                )));
            }
            Err(e) => return Err(e.into()),
        }
        Ok(ForkedChild {
            pid,
            pidfd: Some(watch_fd(fd)?),
            status: None,
        })
    }

    async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let pidfd = self.pidfd.as_ref().expect("present until drop");
        loop {
            let mut ready = pidfd.readable().await?;
            match reap(pidfd.get_ref()) {
                Ok(Some(status)) => {
                    self.status = Some(status);
                    return Ok(status);
                }
                Ok(None) => ready.clear_ready(),
                Err(e) => return Err(e),
            }
        }
    }

    fn signal(&self, signal: Signal) -> std::io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        let Some(pidfd) = &self.pidfd else {
            return Ok(());
        };
        // SAFETY: pidfd_send_signal(pidfd, sig, NULL info, 0 flags): a pidfd names exactly
        // this process even after it exited, so no other process can be signalled. Raw
        // syscall because nix has no pidfd_send_signal.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.get_ref().as_raw_fd(),
                signal as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            )
        };
        match r {
            0 => Ok(()),
            // Exited already (a zombie until reaped): nothing to signal.
            _ if std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    }
}

/// Kills and reaps `pid`, a child of this process that nothing else will wait for (one a
/// zygote forked for a request whose fds were given up): through a [`ForkedChild`] when a
/// pidfd can be opened, else by pid. The pid is stable either way: only this process can
/// reap its child. A pid that is not our child is left alone. Needs a tokio runtime.
pub fn kill_and_reap(pid: u32) {
    // 0, or a pid negative as a pid_t, would name a process group (or every process).
    if pid == 0 || pid > i32::MAX as u32 {
        tracing::warn!(pid, "not a process id: nothing killed");
        return;
    }
    match ForkedChild::adopt(pid) {
        // Dropping it unreaped kills it and reaps it in the background.
        Ok(child) => drop(child),
        Err(e) => {
            tracing::debug!(
                pid,
                "no pidfd for an abandoned child ({e}); killing it by pid"
            );
            kill_and_reap_by_pid(pid);
        }
    }
}

/// [`kill_and_reap`] without a pidfd (none could be opened: fds exhausted, say).
fn kill_and_reap_by_pid(pid: u32) {
    let target = move || Id::Pid(nix::unistd::Pid::from_raw(pid as libc::pid_t));
    let peek = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    match waitid(target(), peek) {
        Ok(_) => {}
        Err(nix::errno::Errno::ECHILD) => {
            tracing::warn!(
                pid,
                "abandoned pid is not a child of the gateway: left alone"
            );
            return;
        }
        Err(e) => {
            // Not known to be our child: signalling the pid could hit another process.
            tracing::warn!(pid, "checking an abandoned child: {e}; left alone");
            return;
        }
    }
    // Our unreaped child (checked just above, and only we reap it): the pid names it.
    if let Err(e) = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as libc::pid_t),
        Signal::SIGKILL,
    ) {
        tracing::warn!(pid, "killing an abandoned child: {e}");
    }
    tokio::spawn(async move {
        loop {
            match waitid(target(), WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG) {
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR) => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(pid, "reaping an abandoned child: {e}");
                    return;
                }
            }
        }
    });
}

/// Registers `fd` with the runtime for readiness (pidfds and the zygote's socket).
pub(crate) fn watch_fd(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd, so the fd stays open and names the same file
    // until the AsyncFd is dropped, and OwnedFd::as_raw_fd always returns that fd.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// Reaps the process behind `pidfd` if it exited; `None` while it runs.
fn reap(pidfd: &OwnedFd) -> std::io::Result<Option<ExitStatus>> {
    loop {
        return match waitid(
            Id::PIDFd(pidfd.as_fd()),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
        ) {
            Ok(WaitStatus::Exited(_, code)) => Ok(Some(ExitStatus::from_raw((code & 0xff) << 8))),
            Ok(WaitStatus::Signaled(_, signal, core)) => Ok(Some(ExitStatus::from_raw(
                signal as i32 | if core { 0x80 } else { 0 },
            ))),
            Ok(_) => Ok(None),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => Err(e.into()),
        };
    }
}

impl Drop for ForkedChild {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        let _ = self.signal(Signal::SIGKILL);
        let Some(pidfd) = self.pidfd.take() else {
            return;
        };
        // A zombie must not stay behind: reap it once the kill lands.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    loop {
                        let Ok(mut ready) = pidfd.readable().await else {
                            return;
                        };
                        match reap(pidfd.get_ref()) {
                            Ok(None) => ready.clear_ready(),
                            _ => return,
                        }
                    }
                });
            }
            Err(_) => {
                let fd = pidfd.into_inner();
                let _ = waitid(Id::PIDFd(fd.as_fd()), WaitPidFlag::WEXITED);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_process_that_is_not_our_child_is_refused() {
        // pid 1 exists but is nobody's child here.
        let err = ForkedChild::adopt(1).err().expect("refused");
        assert!(err.to_string().contains("not a child"), "{err}");
    }

    /// Whether `pid` is still a process (running or a zombie) in this pid namespace.
    fn exists(pid: u32) -> bool {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    }

    async fn gone(pid: u32) -> bool {
        for _ in 0..200 {
            if !exists(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn abandoned_children_are_killed_and_reaped_with_or_without_a_pidfd() {
        for by_pid in [false, true] {
            let child = std::process::Command::new("/bin/sh")
                .args(["-c", "exec sleep 30"])
                .spawn()
                .unwrap();
            let pid = child.id();
            std::mem::forget(child);
            if by_pid {
                kill_and_reap_by_pid(pid);
            } else {
                kill_and_reap(pid);
            }
            // Killed is not enough: a zombie keeps its /proc entry until reaped.
            assert!(gone(pid).await, "pid {pid} (by pid: {by_pid}) not reaped");
        }
        // Not our child: neither signalled nor waited for.
        kill_and_reap_by_pid(1);
        assert!(exists(1));
    }

    #[tokio::test]
    async fn forked_child_is_waited_for_with_its_real_status() {
        // A std-spawned child is ours and unknown to tokio: the same situation as a child
        // the zygote cloned with CLONE_PARENT.
        let spawn = |script: &str| {
            let child = std::process::Command::new("/bin/sh")
                .args(["-c", script])
                .spawn()
                .unwrap();
            let pid = child.id();
            // Not waited by std: its reaping is the ForkedChild's job now.
            std::mem::forget(child);
            WorkerProcess::Forked(ForkedChild::adopt(pid).unwrap())
        };
        let mut exits = spawn("exit 124");
        assert_eq!(exits.wait().await.unwrap().code(), Some(124));
        assert_eq!(exits.id(), None, "no pid once reaped");

        let mut sleeps = spawn("exec sleep 30");
        assert!(sleeps.id().is_some());
        sleeps.signal(Signal::SIGKILL).unwrap();
        let status = sleeps.wait().await.unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));

        let mut stopped = spawn("exec sleep 30");
        stopped.stop(Duration::from_secs(2)).await;
        assert_eq!(stopped.wait().await.unwrap().signal(), Some(libc::SIGTERM));
    }
}
