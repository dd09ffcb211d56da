//! Target processes: spawned so they cannot outlive the bench, stopped and reaped on every
//! path out (normal end, error, panic, Ctrl-C).

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, getpid, getppid};

use crate::cpu;

/// How long a target gets to shut down (drain, stop its workers) after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A started target. Dropping it stops the whole tree.
pub(crate) struct TargetProcess {
    child: Child,
    /// stdout + stderr of the target, unlinked: read for the failure reason, gone with us.
    log: File,
    pub command_line: String,
    reaped: Option<ExitStatus>,
}

impl TargetProcess {
    /// Starts `program args…`. Must run on a thread that outlives the target: the kernel's
    /// parent-death signal fires when the *thread* that forked exits, not the process.
    pub fn spawn(program: &Path, args: &[OsString]) -> std::io::Result<TargetProcess> {
        let log = log_file()?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log.try_clone()?));
        let parent = getpid();
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // calls (nix's set_pdeathsig and getppid: one system call and an errno read each, no
        // lock, no allocation) and builds an io::Error without allocating.
        unsafe {
            command.pre_exec(move || {
                // SIGKILL, not SIGTERM: if we are gone nobody will wait for a graceful stop.
                set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
                // We may have died between fork and prctl; then the signal never comes.
                if getppid() != parent {
                    return Err(Errno::ESRCH.into());
                }
                Ok(())
            });
        }
        let child = command.spawn()?;
        let command_line = std::iter::once(program.as_os_str().to_owned())
            .chain(args.iter().cloned())
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        Ok(TargetProcess {
            child,
            log,
            command_line,
            reaped: None,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The exit status if the target has already exited (reaping it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.reaped.is_none() {
            self.reaped = self.child.try_wait().ok().flatten();
        }
        self.reaped
    }

    /// The last lines the target wrote, for a skip reason.
    pub fn log_tail(&self, max_lines: usize) -> String {
        const WINDOW: u64 = 8192;
        let len = self.log.metadata().map(|m| m.len()).unwrap_or(0);
        let start = len.saturating_sub(WINDOW);
        let mut buf = vec![0; (len - start) as usize];
        // Positional read: the target appends through the same open file, so moving a shared
        // offset with seek could make it overwrite its own log.
        let n = self.log.read_at(&mut buf, start).unwrap_or(0);
        buf.truncate(n);
        let text = String::from_utf8_lossy(&buf);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let skip = lines.len().saturating_sub(max_lines);
        lines[skip..].join("\n")
    }

    /// SIGTERM, up to [`STOP_GRACE`] to exit, then SIGKILL; reap; then kill any descendant
    /// that outlived it (a target whose children lack a parent-death signal).
    pub fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let descendants: Vec<cpu::ProcKey> = cpu::tree(self.pid())
            .procs
            .into_keys()
            .filter(|(pid, _)| *pid != self.pid())
            .collect();
        // Our own unreaped child: the pid cannot have been reused.
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while self.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.exited().is_none() {
            let _ = self.child.kill();
            self.reaped = self.child.wait().ok();
        }
        let mut stragglers: Vec<cpu::ProcKey> = descendants
            .into_iter()
            .filter(|&key| cpu::is_alive(key))
            .collect();
        for key in &stragglers {
            // is_alive matched the start time, so this is still the process we saw in the tree
            // (the pid-reuse window is microseconds).
            let _ = kill(Pid::from_raw(key.0), Signal::SIGKILL);
        }
        // SIGKILL takes effect when the process is next scheduled; a straggler still burning
        // CPU while the next target is measured would skew it, so wait (briefly) to see it go.
        let deadline = Instant::now() + Duration::from_secs(1);
        while !stragglers.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            stragglers.retain(|&key| cpu::is_alive(key));
        }
    }
}

impl Drop for TargetProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

fn log_file() -> std::io::Result<File> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let path: PathBuf = std::env::temp_dir().join(format!(
        "spindle-bench-{}-{}.log",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(true)
        .open(&path)?;
    // The open descriptors keep it alive; nothing is left in /tmp even after SIGKILL.
    let _ = std::fs::remove_file(&path);
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> TargetProcess {
        TargetProcess::spawn(Path::new("sh"), &["-c".into(), script.into()]).unwrap()
    }

    #[test]
    fn captures_output_and_exit() {
        let mut p = sh("echo starting; echo 'error: cannot load eBPF program' >&2; exit 3");
        let deadline = Instant::now() + Duration::from_secs(5);
        while p.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(p.exited().and_then(|s| s.code()), Some(3));
        assert_eq!(p.log_tail(10), "starting\nerror: cannot load eBPF program");
        assert_eq!(p.log_tail(1), "error: cannot load eBPF program");
    }

    #[test]
    fn drop_stops_the_target_and_its_stragglers() {
        // The shell ignores nothing, dies on SIGTERM, and leaves `sleep` orphaned: only the
        // descendant sweep can stop that one.
        let p = sh("sleep 30 & echo $! ; wait");
        let deadline = Instant::now() + Duration::from_secs(5);
        let grandchild = loop {
            let tail = p.log_tail(1);
            if let Ok(pid) = tail.trim().parse::<i32>() {
                break pid;
            }
            assert!(Instant::now() < deadline, "no pid printed");
            std::thread::sleep(Duration::from_millis(10));
        };
        let root = p.pid();
        let started = cpu::tree(root);
        let key = *started
            .procs
            .keys()
            .find(|(pid, _)| *pid == grandchild)
            .expect("grandchild in the tree");
        let begun = Instant::now();
        drop(p);
        assert!(begun.elapsed() < STOP_GRACE, "SIGTERM should have sufficed");
        assert!(!cpu::is_alive(key), "orphaned sleep survived");
        assert!(
            std::fs::metadata(format!("/proc/{root}")).is_err(),
            "target not reaped"
        );
    }
}
