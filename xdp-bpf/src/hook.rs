//! Putting programs on an interface's hooks, and finding what is there.
//!
//! Every attachment is a kernel **link** held by a file descriptor of this process: TCX links
//! for TC (Linux 6.6+; libbpf-rs has no safe wrapper, so `bpf_link_create` directly) and XDP
//! links in native mode. The kernel removes a link when its last descriptor closes, so
//! nothing stays behind when the gateway exits, even by SIGKILL. What can stay is an
//! attachment nobody's descriptor owns: a link pinned in bpffs, or a program attached
//! without a link by an older tool; [`clear_stale`] removes Spindle's own such leftovers
//! before attaching, and refuses when a live process holds one (another gateway).

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use libbpf_rs::libbpf_sys;
use libbpf_rs::query::{LinkInfoIter, LinkTypeInfo, ProgInfoIter};

use crate::IngressError;

/// Program names (as the kernel keeps them, at most 15 bytes) start with this.
pub(crate) const PROGRAM_PREFIX: &str = "spindle_";

/// Which hook of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// TC ingress, through a TCX link.
    TcIngress,
    /// XDP in the driver (native mode only: generic XDP costs more than it saves).
    Xdp,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::TcIngress => "tc",
            Hook::Xdp => "xdp",
        }
    }
}

/// A program on a hook, for as long as this value lives: the kernel link's descriptor.
#[derive(Debug)]
pub(crate) struct Attachment(#[allow(dead_code)] OwnedFd);

/// The interface's index in the calling thread's network namespace.
pub fn ifindex(interface: &str) -> Result<u32, IngressError> {
    let name = CString::new(interface).map_err(|_| IngressError::NoInterface {
        interface: interface.to_string(),
    })?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(IngressError::NoInterface {
            interface: interface.to_string(),
        });
    }
    Ok(index)
}

/// Attaches program `prog` (named `name`) to `hook` of `ifindex` (after [`clear_stale`]):
/// a TCX link for TC ingress, an XDP link in driver mode for XDP.
pub(crate) fn attach(
    prog: BorrowedFd<'_>,
    name: &str,
    ifindex: u32,
    interface: &str,
    hook: Hook,
) -> Result<Attachment, IngressError> {
    let mut opts = libbpf_sys::bpf_link_create_opts {
        sz: size_of::<libbpf_sys::bpf_link_create_opts>() as _,
        ..Default::default()
    };
    let attach_type = match hook {
        Hook::TcIngress => libbpf_sys::BPF_TCX_INGRESS,
        Hook::Xdp => {
            opts.flags = libbpf_sys::XDP_FLAGS_DRV_MODE;
            libbpf_sys::BPF_XDP
        }
    };
    // SAFETY: a plain syscall wrapper over a program fd that outlives the call and an
    // options struct initialised with its size, as libbpf's OPTS convention asks.
    let fd = unsafe {
        libbpf_sys::bpf_link_create(prog.as_raw_fd(), ifindex as i32, attach_type, &opts)
    };
    if fd < 0 {
        let e = std::io::Error::from_raw_os_error(-fd);
        return Err(match hook {
            Hook::Xdp if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                IngressError::NoNativeXdp {
                    interface: interface.to_string(),
                    cause: e,
                }
            }
            Hook::Xdp => IngressError::Os {
                what: format!("attaching {name} to XDP of {interface}"),
                cause: e,
            },
            Hook::TcIngress => IngressError::Os {
                what: format!(
                    "attaching {name} to TC ingress of {interface} (TCX needs Linux 6.6+)"
                ),
                cause: e,
            },
        });
    }
    // SAFETY: a new link fd that nothing else owns.
    Ok(Attachment(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// A Spindle program found on a hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub prog_id: u32,
    pub name: String,
    /// The link it is attached through, if any.
    pub link_id: Option<u32>,
}

/// Spindle's programs on `hook` of `ifindex`, as the kernel lists them.
pub fn attached(ifindex: u32, hook: Hook) -> Result<Vec<Attached>, IngressError> {
    let prog_ids = match hook {
        Hook::TcIngress => tcx_programs(ifindex)?,
        Hook::Xdp => xdp_programs(ifindex)?,
    };
    if prog_ids.is_empty() {
        return Ok(Vec::new());
    }
    let names: std::collections::HashMap<u32, String> = ProgInfoIter::default()
        .filter(|p| prog_ids.contains(&p.id))
        .map(|p| (p.id, p.name.to_string_lossy().into_owned()))
        .collect();
    let links: Vec<(u32, u32)> = LinkInfoIter::default()
        .filter(|l| match (&l.info, hook) {
            (LinkTypeInfo::Tcx(t), Hook::TcIngress) => t.ifindex == ifindex,
            (LinkTypeInfo::Xdp(x), Hook::Xdp) => x.ifindex == ifindex,
            _ => false,
        })
        .map(|l| (l.prog_id, l.id))
        .collect();
    Ok(prog_ids
        .into_iter()
        .filter_map(|id| {
            let name = names.get(&id)?.clone();
            name.starts_with(PROGRAM_PREFIX).then(|| Attached {
                prog_id: id,
                link_id: links.iter().find(|(p, _)| *p == id).map(|(_, l)| *l),
                name,
            })
        })
        .collect())
}

fn tcx_programs(ifindex: u32) -> Result<Vec<u32>, IngressError> {
    query_programs(ifindex as i32, libbpf_sys::BPF_TCX_INGRESS).map_err(|cause| IngressError::Os {
        what: format!("listing the TC ingress programs of interface {ifindex}"),
        cause,
    })
}

/// The ids of the programs attached at `attach_type` of `target` (an ifindex for TCX, a
/// cgroup fd for cgroup hooks), as BPF_PROG_QUERY lists them.
fn query_programs(
    target: i32,
    attach_type: libbpf_sys::bpf_attach_type,
) -> std::io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut opts = libbpf_sys::bpf_prog_query_opts {
        sz: size_of::<libbpf_sys::bpf_prog_query_opts>() as _,
        prog_ids: ids.as_mut_ptr(),
        ..Default::default()
    };
    opts.__bindgen_anon_1.count = ids.len() as u32;
    // SAFETY: `opts` points at `ids`, whose length it states; both outlive the call.
    let rc = unsafe { libbpf_sys::bpf_prog_query_opts(target, attach_type, &mut opts) };
    if rc < 0 {
        return Err(std::io::Error::from_raw_os_error(-rc));
    }
    // SAFETY: the kernel wrote the count back into the union it read it from.
    let n = unsafe { opts.__bindgen_anon_1.count } as usize;
    Ok(ids[..n.min(ids.len())].to_vec())
}

fn xdp_programs(ifindex: u32) -> Result<Vec<u32>, IngressError> {
    let mut info = libbpf_sys::bpf_xdp_query_opts {
        sz: size_of::<libbpf_sys::bpf_xdp_query_opts>() as _,
        ..Default::default()
    };
    // SAFETY: `info` is initialised with its size and outlives the call.
    let rc = unsafe { libbpf_sys::bpf_xdp_query(ifindex as i32, 0, &mut info) };
    if rc < 0 {
        return Err(IngressError::Os {
            what: format!("listing the XDP programs of interface {ifindex}"),
            cause: std::io::Error::from_raw_os_error(-rc),
        });
    }
    Ok([
        info.prog_id,
        info.drv_prog_id,
        info.skb_prog_id,
        info.hw_prog_id,
    ]
    .into_iter()
    .filter(|&id| id != 0)
    .collect::<std::collections::BTreeSet<_>>()
    .into_iter()
    .collect())
}

/// What [`clear_stale`] removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removed {
    pub name: String,
    pub prog_id: u32,
    /// Pinned link, or a program attached without one.
    pub how: &'static str,
}

/// Removes Spindle's programs on `hook` of `ifindex` that no running process owns (a pinned
/// link, or a link-less attachment); refuses, naming the process, when one does.
pub(crate) fn clear_stale(
    ifindex: u32,
    interface: &str,
    hook: Hook,
) -> Result<Vec<Removed>, IngressError> {
    let mut removed = Vec::new();
    for found in attached(ifindex, hook)? {
        match found.link_id {
            Some(link_id) => {
                if let Some(pid) = link_holder(link_id) {
                    return Err(IngressError::InUse {
                        interface: interface.to_string(),
                        hook: hook.name(),
                        program: found.name,
                        pid,
                    });
                }
                // SAFETY: a plain syscall wrapper; the returned fd is owned below.
                let fd = unsafe { libbpf_sys::bpf_link_get_fd_by_id(link_id) };
                if fd < 0 {
                    continue; // gone meanwhile
                }
                // SAFETY: a new fd that nothing else owns.
                let link = unsafe { OwnedFd::from_raw_fd(fd) };
                // SAFETY: a plain syscall wrapper over the fd owned above.
                let rc = unsafe { libbpf_sys::bpf_link_detach(link.as_raw_fd()) };
                if rc < 0 {
                    return Err(IngressError::Os {
                        what: format!("detaching a stale {} from {interface}", found.name),
                        cause: std::io::Error::from_raw_os_error(-rc),
                    });
                }
                removed.push(Removed {
                    name: found.name,
                    prog_id: found.prog_id,
                    how: "pinned link",
                });
            }
            None => {
                detach_linkless(found.prog_id, ifindex, hook).map_err(|cause| {
                    IngressError::Os {
                        what: format!("detaching a stale {} from {interface}", found.name),
                        cause,
                    }
                })?;
                removed.push(Removed {
                    name: found.name,
                    prog_id: found.prog_id,
                    how: "attached without a link",
                });
            }
        }
    }
    Ok(removed)
}

fn detach_linkless(prog_id: u32, ifindex: u32, hook: Hook) -> std::io::Result<()> {
    // SAFETY: plain syscall wrappers; the fd is owned right away.
    let fd = unsafe { libbpf_sys::bpf_prog_get_fd_by_id(prog_id) };
    if fd < 0 {
        return Ok(()); // unloaded meanwhile
    }
    // SAFETY: a new fd that nothing else owns.
    let prog = unsafe { OwnedFd::from_raw_fd(fd) };
    let rc = match hook {
        Hook::TcIngress => {
            let opts = libbpf_sys::bpf_prog_detach_opts {
                sz: size_of::<libbpf_sys::bpf_prog_detach_opts>() as _,
                ..Default::default()
            };
            // SAFETY: initialised options that outlive the call; `prog` is a live fd.
            unsafe {
                libbpf_sys::bpf_prog_detach_opts(
                    prog.as_raw_fd(),
                    ifindex as i32,
                    libbpf_sys::BPF_TCX_INGRESS,
                    &opts,
                )
            }
        }
        Hook::Xdp => {
            let opts = libbpf_sys::bpf_xdp_attach_opts {
                sz: size_of::<libbpf_sys::bpf_xdp_attach_opts>() as _,
                old_prog_fd: prog.as_raw_fd(),
                ..Default::default()
            };
            // SAFETY: as above. XDP_FLAGS_REPLACE with old_prog_fd removes only that program.
            unsafe {
                libbpf_sys::bpf_xdp_detach(ifindex as i32, libbpf_sys::XDP_FLAGS_REPLACE, &opts)
            }
        }
    };
    if rc < 0 {
        return Err(std::io::Error::from_raw_os_error(-rc));
    }
    Ok(())
}

/// A process (this one included: what it attached earlier is not stale either) with a file
/// descriptor on link `link_id`, if any.
fn link_holder(link_id: u32) -> Option<i32> {
    let needle = format!("link_id:\t{link_id}\n");
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_to_string(fd.path()).is_ok_and(|info| info.contains(&needle)) {
                return Some(pid);
            }
        }
    }
    None
}

/// Runs `f` on a thread that has joined the network namespace at `netns` (a file such as
/// /run/netns/NAME or /proc/PID/ns/net), so interface names and attachments are that
/// namespace's. Links made there stay valid after the thread ends: they belong to this
/// process's descriptors, not to the thread.
pub fn in_netns<T: Send>(
    netns: &Path,
    f: impl FnOnce() -> Result<T, IngressError> + Send,
) -> Result<T, IngressError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(netns).map_err(|cause| IngressError::Os {
                    what: format!("opening network namespace {}", netns.display()),
                    cause,
                })?;
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                    |e| IngressError::Os {
                        what: format!(
                            "joining network namespace {} (needs CAP_SYS_ADMIN)",
                            netns.display()
                        ),
                        cause: e.into(),
                    },
                )?;
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The names of the sock_ops programs attached to the cgroup v2 directory `cgroup` (Spindle's
/// and others'), to see that the same-host acceleration went with its gateway.
pub fn sock_ops_programs(cgroup: &Path) -> Result<Vec<String>, IngressError> {
    let dir = std::fs::File::open(cgroup).map_err(|cause| IngressError::Os {
        what: format!("opening cgroup {}", cgroup.display()),
        cause,
    })?;
    let wanted =
        query_programs(dir.as_raw_fd(), libbpf_sys::BPF_CGROUP_SOCK_OPS).map_err(|cause| {
            IngressError::Os {
                what: format!(
                    "listing the sock_ops programs of cgroup {}",
                    cgroup.display()
                ),
                cause,
            }
        })?;
    Ok(ProgInfoIter::default()
        .filter(|p| wanted.contains(&p.id))
        .map(|p| p.name.to_string_lossy().into_owned())
        .collect())
}
