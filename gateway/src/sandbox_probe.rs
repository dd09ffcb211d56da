//! `spindle sandbox-probe`: from inside the confinement a function's workers get, tries what
//! a guest that escaped wasmer would try first, and prints what the kernel said to each.
//!
//! Every attempt runs in a child of its own, forked from this single-threaded process and
//! confined before the attempt, so one that kills its process (seccomp) does not end the
//! probe. `--layers` picks which layers to apply, to show what each one stops on its own;
//! `all` is exactly a worker's confinement (`chain_runtime::confine`, the code workers run).

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;

use anyhow::{Context, bail};
use chain_runtime::config::Config;
use chain_runtime::confine::{FunctionSandbox, Role, confine};
use chain_runtime::instance::Namespaces;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::ForkResult;

#[derive(clap::Args)]
pub struct ProbeArgs {
    /// The config whose sandbox settings (uid) to use.
    config: PathBuf,
    /// The function whose workers' confinement to probe.
    #[arg(long)]
    function: String,
    /// Which layers to apply: all (a worker's confinement), or one of namespaces,
    /// credentials, seccomp.
    #[arg(long, value_enum, default_value = "all")]
    layers: Layers,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Layers {
    All,
    Namespaces,
    Credentials,
    Seccomp,
}

/// What "create a file in /" makes, if it is allowed to.
const PROBE_FILE: &str = "/spindle-sandbox-probe";

/// Exit status of a child whose confinement itself failed.
const CONFINE_FAILED: i32 = 255;

/// What a child tries once confined; `Ok` means the kernel let it.
type Attempt = fn(&Outside) -> nix::Result<()>;

/// What an attempt needs to know about the world outside.
struct Outside {
    /// The probe process: root, in the host's namespaces (the gateway's stand-in).
    outside: nix::unistd::Pid,
    /// A listening socket in the host's network namespace.
    listener: SocketAddr,
}

const ATTEMPTS: &[(&str, Attempt)] = &[
    ("open /etc/shadow", |_| {
        nix::fcntl::open(
            "/etc/shadow",
            nix::fcntl::OFlag::O_RDONLY,
            nix::sys::stat::Mode::empty(),
        )
        .map(drop)
    }),
    ("read the gateway's /proc/PID/environ", |cx| {
        let path = format!("/proc/{}/environ", cx.outside);
        nix::fcntl::open(
            path.as_str(),
            nix::fcntl::OFlag::O_RDONLY,
            nix::sys::stat::Mode::empty(),
        )
        .map(drop)
    }),
    // The probe removes the file afterwards, from outside: a confined child may not be
    // allowed to unlink it.
    ("create a file in /", |_| {
        nix::fcntl::open(
            PROBE_FILE,
            nix::fcntl::OFlag::O_CREAT | nix::fcntl::OFlag::O_EXCL | nix::fcntl::OFlag::O_WRONLY,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .map(drop)
    }),
    ("socket(AF_INET) + connect to the host", |cx| {
        std::net::TcpStream::connect(cx.listener)
            .map(drop)
            .map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
    }),
    ("ptrace the gateway", |cx| {
        // SEIZE, not ATTACH: if it is allowed, the tracee is not stopped, and the tracer's
        // exit detaches it.
        // SAFETY: PTRACE_SEIZE takes no pointers (addr and data are 0).
        let rc = unsafe { libc::ptrace(libc::PTRACE_SEIZE, cx.outside.as_raw(), 0usize, 0usize) };
        nix::errno::Errno::result(rc).map(drop)
    }),
    ("signal the gateway (kill 0)", |cx| {
        nix::sys::signal::kill(cx.outside, None)
    }),
    ("setuid(0)", |_| {
        nix::unistd::setuid(nix::unistd::Uid::from_raw(0))
    }),
    ("unshare a mount namespace", |_| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
    }),
    ("fork", |_| {
        // SAFETY: the new child only _exits.
        match unsafe { nix::unistd::fork() }? {
            // SAFETY: ends the new child at once.
            ForkResult::Child => unsafe { libc::_exit(0) },
            ForkResult::Parent { .. } => Ok(()),
        }
    }),
    ("exec /bin/true", |_| {
        nix::unistd::execv(c"/bin/true", &[c"/bin/true"]).map(drop)
    }),
];

pub fn run(args: ProbeArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let config = Config::parse(&text, &args.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let Some(uid) = config.function_uid(&args.function) else {
        bail!("no function {} in {}", args.function, args.config.display());
    };
    if !nix::unistd::geteuid().is_root() {
        bail!("the probe confines its children as the gateway does, which needs root");
    }
    let namespaces =
        sandbox::SharedNamespaces::create().context("making the sandbox namespaces")?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("listening on loopback")?;
    let cx = Outside {
        outside: nix::unistd::getpid(),
        listener: listener.local_addr()?,
    };
    let function = FunctionSandbox {
        enabled: true,
        uid,
        preopens: 0,
    };
    for (name, attempt) in ATTEMPTS {
        let outcome = in_confined_child(args.layers, function, &namespaces, || attempt(&cx));
        // In the host's root, where a layer that allows the create put it.
        let _ = std::fs::remove_file(PROBE_FILE);
        println!("{name}: {}", outcome?);
    }
    Ok(())
}

/// Forks; the child confines itself as `layers` says and exits with the attempt's errno (0:
/// allowed). Returns the outcome as printed.
fn in_confined_child(
    layers: Layers,
    function: FunctionSandbox,
    namespaces: &sandbox::SharedNamespaces,
    attempt: impl FnOnce() -> nix::Result<()>,
) -> anyhow::Result<String> {
    // SAFETY: this process is single-threaded (the namespace thread was joined), so the child
    // may do anything; it never returns from this function (it _exits).
    match unsafe { nix::unistd::fork() }.context("fork")? {
        ForkResult::Child => {
            let confined = confine_as(layers, function, namespaces);
            let code = match confined {
                Err(e) => {
                    eprintln!("confining the probe: {e:#}");
                    CONFINE_FAILED
                }
                Ok(()) => match attempt() {
                    Ok(()) => 0,
                    Err(errno) => errno as i32,
                },
            };
            // SAFETY: ends the child without running this process's exit handlers.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => Ok(match waitpid(child, None).context("waitpid")? {
            WaitStatus::Exited(_, 0) => "allowed".to_string(),
            WaitStatus::Exited(_, CONFINE_FAILED) => bail!("a child could not be confined"),
            WaitStatus::Exited(_, errno) => {
                format!("denied ({:?})", nix::errno::Errno::from_raw(errno))
            }
            WaitStatus::Signaled(_, Signal::SIGSYS, _) => "killed (SIGSYS: seccomp)".to_string(),
            other => format!("ended unexpectedly: {other:?}"),
        }),
    }
}

fn confine_as(
    layers: Layers,
    function: FunctionSandbox,
    namespaces: &sandbox::SharedNamespaces,
) -> anyhow::Result<()> {
    let credentials = sandbox::Credentials {
        uid: function.uid,
        gid: function.uid,
    };
    match layers {
        Layers::All => {
            let owned = Namespaces {
                net: namespaces.net().try_clone_to_owned()?,
                mount: namespaces.mount().try_clone_to_owned()?,
            };
            confine(function, Some(owned), Role::Worker)?;
        }
        Layers::Namespaces => sandbox::join(namespaces.net(), namespaces.mount())?,
        Layers::Credentials => credentials.assume()?,
        Layers::Seccomp => sandbox::restrict_syscalls(sandbox::Profile::Worker)?,
    }
    Ok(())
}
