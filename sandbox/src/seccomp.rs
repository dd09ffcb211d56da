//! The system calls a confined process may make.
//!
//! The lists are what the worker loop, wasmer (compile, instantiate, traps through signal
//! handlers, memory growth), Rust's std and glibc need, found by running the whole test
//! suite with [`LOG_ENV`] set (a call outside the list is then logged by the kernel, as
//! `type=1326` audit records, instead of killing) until none was logged. Anything else kills
//! the process with SIGSYS: the gateway sees a signalled worker, answers its requests with
//! 502 and starts another.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use crate::SandboxError;

/// Set to `1` to make calls outside the list logged (kernel audit) rather than fatal: how the
/// lists are checked against a new workload. Never for production.
pub const LOG_ENV: &str = "SPINDLE_SECCOMP_LOG";

/// Which process a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// A worker serving one instance: may start threads, never processes.
    Worker,
    /// A zygote: a worker's calls plus the one `clone` that forks a child for the gateway
    /// (`CLONE_PARENT | SIGCHLD`). Each child stacks [`Profile::Worker`] on top.
    Zygote,
    /// A worker resumed from a remote image: also opens TCP connections to the image's parent
    /// and handles its own userfaultfd.
    Resumed,
}

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// Calls allowed with any arguments.
const ALWAYS: &[libc::c_long] = &[
    // I/O on the fds it was handed.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_getdents64,
    // Paths resolve inside the empty root; only its /proc has anything in it. openat2
    // resolves a guest's paths beneath its preopened directories (RESOLVE_BENEATH).
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_readlinkat,
    libc::SYS_getcwd,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_ppoll,
    libc::SYS_pselect6,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_pipe2,
    libc::SYS_memfd_create,
    // Memory: wasmer maps, protects, grows and discards linear memory and code.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mincore,
    libc::SYS_msync,
    libc::SYS_brk,
    libc::SYS_membarrier,
    // Signals: wasmer turns faults in guest code into traps with handlers on an alternate
    // stack; the watchdog and abort signal the process itself.
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getppid,
    // Threads and time.
    libc::SYS_clone3,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_get_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_prlimit64,
    libc::SYS_getrusage,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    libc::SYS_uname,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
];

#[cfg(target_arch = "x86_64")]
const ALWAYS_X86_64: &[libc::c_long] = &[
    libc::SYS_poll,
    libc::SYS_select,
    libc::SYS_dup2,
    libc::SYS_pipe,
    libc::SYS_open,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_readlink,
    libc::SYS_getdents,
    libc::SYS_arch_prctl,
    libc::SYS_epoll_wait,
    libc::SYS_time,
];
#[cfg(not(target_arch = "x86_64"))]
const ALWAYS_X86_64: &[libc::c_long] = &[];

/// `prctl` options a worker uses: naming itself, its parent-death signal, dumpable (to open
/// its own pagemap), and reading what it has.
const PRCTL_OPTIONS: &[libc::c_int] = &[
    libc::PR_SET_NAME,
    libc::PR_GET_NAME,
    libc::PR_SET_PDEATHSIG,
    libc::PR_GET_PDEATHSIG,
    libc::PR_SET_DUMPABLE,
    libc::PR_GET_DUMPABLE,
    // Asked again by each filter install; it only ever restricts.
    libc::PR_SET_NO_NEW_PRIVS,
    libc::PR_GET_NO_NEW_PRIVS,
    libc::PR_SET_VMA,
];

/// ioctl requests: setting non-blocking and close-on-exec, isatty (tracing's colour check),
/// and PAGEMAP_SCAN (fresh_per_request resets). The casts are no-ops with glibc on x86_64
/// but not with every libc the crate builds for (the request constants' type differs).
#[allow(clippy::unnecessary_cast)]
const IOCTLS: &[u64] = &[
    libc::FIONBIO as u64,
    libc::FIOCLEX as u64,
    libc::FIONCLEX as u64,
    libc::TCGETS as u64,
    PAGEMAP_SCAN,
];
/// `_IOWR('f', 16, struct pm_scan_arg)` (linux/fs.h; libc does not have it yet).
const PAGEMAP_SCAN: u64 = 0xc060_6610;

/// What a call outside the list gets: killed, or logged and allowed under [`LOG_ENV`].
fn refusal() -> SeccompAction {
    if std::env::var(LOG_ENV).as_deref() == Ok("1") {
        SeccompAction::Log
    } else {
        SeccompAction::KillProcess
    }
}

fn eq(arg: u8, value: u64) -> Result<SeccompCondition, SandboxError> {
    Ok(SeccompCondition::new(arg, Len::Qword, Op::Eq, value)?)
}

fn rules_for(profile: Profile) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SandboxError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &call in ALWAYS.iter().chain(ALWAYS_X86_64) {
        rules.insert(call, vec![]);
    }
    let one = |c: SeccompCondition| SeccompRule::new(vec![c]);
    rules.insert(
        libc::SYS_prctl,
        PRCTL_OPTIONS
            .iter()
            .map(|&o| one(SeccompCondition::new(0, Len::Dword, Op::Eq, o as u64)?))
            .collect::<Result<_, _>>()?,
    );
    // Threads only: a clone that shares the address space and thread group (pthread_create
    // when clone3 is unavailable) — never a new process.
    let thread = (libc::CLONE_VM | libc::CLONE_THREAD) as u64;
    let mut clones = vec![one(SeccompCondition::new(
        0,
        Len::Qword,
        Op::MaskedEq(thread),
        thread,
    )?)?];
    if profile == Profile::Zygote {
        clones.push(one(eq(0, (libc::CLONE_PARENT | libc::SIGCHLD) as u64)?)?);
        // Each child stacks the worker's filters on the zygote's (filters only ever add
        // restrictions); a worker's own list leaves this out, so it can add none.
        rules.insert(libc::SYS_seccomp, vec![]);
    }
    rules.insert(libc::SYS_clone, clones);
    let mut ioctls: Vec<SeccompRule> = IOCTLS
        .iter()
        .map(|&r| one(SeccompCondition::new(1, Len::Dword, Op::Eq, r)?))
        .collect::<Result<_, _>>()?;
    if profile == Profile::Resumed {
        // userfaultfd's requests are all `_IOC(.., 0xAA, ..)`: match the type byte.
        ioctls.push(one(SeccompCondition::new(
            1,
            Len::Dword,
            Op::MaskedEq(0xff00),
            0xaa00,
        )?)?);
        for call in [
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
            libc::SYS_userfaultfd,
        ] {
            rules.insert(call, vec![]);
        }
    }
    rules.insert(libc::SYS_ioctl, ioctls);
    Ok(rules)
}

/// The filters for `profile`, to install in this order: one that makes `clone3` fail with
/// ENOSYS (its flags sit behind a pointer no filter can read, so glibc is made to fall back
/// to `clone`, whose flags the allowlist checks), then the allowlist — last, because a
/// worker's does not allow installing filters.
fn filters(profile: Profile) -> Result<[BpfProgram; 2], SandboxError> {
    let allow = SeccompFilter::new(rules_for(profile)?, refusal(), SeccompAction::Allow, ARCH)?;
    let no_clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        ARCH,
    )?;
    Ok([no_clone3.try_into()?, allow.try_into()?])
}

/// For a child forked by a process confined as [`Profile::Zygote`]: one small filter stacked
/// on the zygote's that takes back what only the zygote needed — forking (a `clone` without
/// `CLONE_THREAD`) and installing filters — and so leaves the child with exactly a worker's
/// calls. Smaller than stacking [`Profile::Worker`]'s allowlist: installed in every child and
/// run on every call it makes.
pub fn forbid_forking() -> Result<(), SandboxError> {
    let refuse = refusal();
    let not_a_thread =
        SeccompCondition::new(0, Len::Qword, Op::MaskedEq(libc::CLONE_THREAD as u64), 0)?;
    let filter = SeccompFilter::new(
        BTreeMap::from([
            (libc::SYS_clone, vec![SeccompRule::new(vec![not_a_thread])?]),
            (libc::SYS_seccomp, vec![]),
        ]),
        SeccompAction::Allow,
        refuse,
        ARCH,
    )?;
    let program: BpfProgram = filter.try_into()?;
    seccompiler::apply_filter(&program)?;
    Ok(())
}

/// Sets `no_new_privs` and installs `profile`'s filters on the calling thread (and threads it
/// starts later), on top of any installed already.
pub fn install(profile: Profile) -> Result<(), SandboxError> {
    nix::sys::prctl::set_no_new_privs().map_err(crate::os("PR_SET_NO_NEW_PRIVS"))?;
    for filter in filters(profile)? {
        seccompiler::apply_filter(&filter)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_child::in_child;

    fn errno_of(rc: libc::c_long) -> i32 {
        if rc < 0 { nix::Error::last() as i32 } else { 0 }
    }

    #[test]
    fn a_worker_may_start_threads_but_not_processes_and_clone3_says_enosys() {
        in_child(|| {
            install(Profile::Worker).map_err(|e| e.to_string())?;
            // A thread: std → pthread_create → clone3 (ENOSYS) → clone(CLONE_VM|CLONE_THREAD..).
            let got = std::thread::spawn(|| 7)
                .join()
                .map_err(|_| "thread panicked")?;
            if got != 7 {
                return Err("thread result lost".into());
            }
            // SAFETY: clone3 with a null argument: refused by the filter before the kernel
            // would read it.
            let rc = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
            if errno_of(rc) != libc::ENOSYS {
                return Err(format!("clone3: rc {rc}, errno {}", errno_of(rc)));
            }
            Ok(())
        });
    }

    /// Installs `profile` in a child, runs `attempt` there and returns how the child ended.
    fn confined_outcome(
        profile: Profile,
        attempt: impl FnOnce() -> i32,
    ) -> nix::sys::wait::WaitStatus {
        assert!(
            std::env::var(LOG_ENV).is_err(),
            "{LOG_ENV} makes denied calls succeed"
        );
        // SAFETY: the child makes system calls only, then exits; see test_child.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let code = if install(profile).is_err() {
                    100
                } else {
                    attempt()
                };
                // SAFETY: ends the child without running the harness's handlers.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).unwrap()
            }
        }
    }

    fn signalled_sigsys(status: nix::sys::wait::WaitStatus) -> bool {
        matches!(
            status,
            nix::sys::wait::WaitStatus::Signaled(_, nix::sys::signal::SIGSYS, _)
        )
    }

    fn fork_for_the_gateway() -> i32 {
        // SAFETY: fork semantics (no CLONE_VM, null stack); the new child exits at once.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone,
                (libc::CLONE_PARENT | libc::SIGCHLD) as u64,
                0,
                0,
                0,
                0,
            )
        };
        if pid == 0 {
            // SAFETY: ends the forked child immediately.
            unsafe { libc::_exit(0) }
        }
        if pid > 0 { 0 } else { 1 }
    }

    #[test]
    fn a_call_outside_the_list_kills_the_process() {
        let status = confined_outcome(Profile::Worker, || {
            // SAFETY: socket(2) takes no pointers; the filter kills the process first.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            0
        });
        assert!(signalled_sigsys(status), "{status:?}");
    }

    #[test]
    fn a_zygote_may_fork_for_the_gateway_but_a_worker_may_not() {
        let zygote = confined_outcome(Profile::Zygote, fork_for_the_gateway);
        assert!(
            matches!(zygote, nix::sys::wait::WaitStatus::Exited(_, 0)),
            "{zygote:?}"
        );
        let worker = confined_outcome(Profile::Worker, fork_for_the_gateway);
        assert!(signalled_sigsys(worker), "{worker:?}");
    }

    #[test]
    fn a_zygotes_child_may_start_threads_but_neither_fork_nor_add_filters() {
        fn child(attempt: fn() -> i32) -> nix::sys::wait::WaitStatus {
            confined_outcome(Profile::Zygote, move || {
                if forbid_forking().is_err() {
                    return 101;
                }
                attempt()
            })
        }
        let thread = child(|| {
            if std::thread::spawn(|| 7).join().ok() == Some(7) {
                0
            } else {
                1
            }
        });
        assert!(
            matches!(thread, nix::sys::wait::WaitStatus::Exited(_, 0)),
            "{thread:?}"
        );
        assert!(signalled_sigsys(child(fork_for_the_gateway)));
        assert!(signalled_sigsys(child(|| if forbid_forking().is_ok() {
            0
        } else {
            1
        })));
    }

    #[test]
    fn only_a_resumed_worker_may_open_a_tcp_socket() {
        fn tcp() -> i32 {
            // SAFETY: socket(2) takes no pointers.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            if fd >= 0 { 0 } else { 1 }
        }
        let resumed = confined_outcome(Profile::Resumed, tcp);
        assert!(
            matches!(resumed, nix::sys::wait::WaitStatus::Exited(_, 0)),
            "{resumed:?}"
        );
        assert!(signalled_sigsys(confined_outcome(Profile::Worker, tcp)));
    }
}
