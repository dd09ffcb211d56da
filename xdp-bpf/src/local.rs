//! Same-host acceleration: `local.bpf.c`'s sock_ops program on a cgroup and its sk_msg
//! program on the socket hash the sock_ops program fills.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use bpf_kit::Pod;
use libbpf_rs::libbpf_sys;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags};

use crate::maps::{GUARD_MAX_PORTS, LOCAL_COUNTERS};
use crate::{IngressError, bpf, per_cpu, storage};

mod skel {
    #![allow(clippy::all, unsafe_op_in_unsafe_fn, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/local.skel.rs"));
}
use skel::{LocalSkel, LocalSkelBuilder};

/// The counters, summed over CPUs, in the order of [`LOCAL_COUNTERS`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalCounters(pub [u64; LOCAL_COUNTERS.len()]);

impl LocalCounters {
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        LOCAL_COUNTERS
            .iter()
            .zip(self.0)
            .map(|((_, what), n)| (*what, n))
    }

    pub fn get(&self, what: &str) -> u64 {
        self.iter().find(|(w, _)| *w == what).map_or(0, |(_, n)| n)
    }
}

/// The cgroup v2 directory of the calling process (its `0::` line in /proc/self/cgroup,
/// under wherever cgroup2 is mounted): the default cgroup to accelerate.
pub fn own_cgroup() -> std::io::Result<std::path::PathBuf> {
    let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::NotFound, what.to_string());
    let membership = std::fs::read_to_string("/proc/self/cgroup")?;
    let relative = membership
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| {
            invalid("this process is in no cgroup v2 (no `0::` line in /proc/self/cgroup)")
        })?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    // Fields: id parent major:minor root mount-point options ... - fstype source options.
    let mount = mounts
        .lines()
        .find_map(|l| {
            let (fields, rest) = l.split_once(" - ")?;
            (rest.split_whitespace().next()? == "cgroup2")
                .then(|| fields.split_whitespace().nth(4).map(str::to_owned))
                .flatten()
        })
        .ok_or_else(|| invalid("no cgroup2 file system is mounted"))?;
    Ok(Path::new(&mount).join(relative.trim_start_matches('/')))
}

/// Both programs, attached; dropping this detaches the sock_ops program (and the map, with
/// the sk_msg program on it, goes with the last socket in it).
pub struct LocalRedirect {
    skel: LocalSkel<'static>,
    _cgroup_link: OwnedFd,
}

impl LocalRedirect {
    /// Accelerates connections to `ports` whose both ends are on this host, made by
    /// processes in the cgroup at `cgroup` (a cgroup v2 directory; its descendants too).
    pub fn attach(cgroup: &Path, ports: &[u16]) -> Result<Self, IngressError> {
        if ports.is_empty() || ports.len() > GUARD_MAX_PORTS {
            return Err(IngressError::Invalid(format!(
                "local redirection takes 1..={GUARD_MAX_PORTS} service ports, got {}",
                ports.len()
            )));
        }
        let open = LocalSkelBuilder::default()
            .open(storage())
            .map_err(bpf("opening the same-host acceleration's eBPF object"))?;
        let skel = open
            .load()
            .map_err(bpf("loading the same-host acceleration's eBPF programs"))?;
        for (i, port) in ports.iter().enumerate() {
            skel.maps
                .local_ports
                .update(
                    (i as u32).as_bytes(),
                    u32::from(*port).as_bytes(),
                    MapFlags::ANY,
                )
                .map_err(bpf("writing the service ports"))?;
        }
        skel.progs
            .spindle_local_redirect
            .attach_sockmap(skel.maps.local_sockets.as_fd().as_raw_fd())
            .map_err(bpf("attaching the sk_msg program to its socket hash"))?;
        let dir = std::fs::File::open(cgroup).map_err(|cause| IngressError::Os {
            what: format!("opening cgroup {}", cgroup.display()),
            cause,
        })?;
        let opts = libbpf_sys::bpf_link_create_opts {
            sz: size_of::<libbpf_sys::bpf_link_create_opts>() as _,
            ..Default::default()
        };
        // SAFETY: a plain syscall wrapper over a program fd and a cgroup fd that outlive the
        // call, with options initialised with their size.
        let fd = unsafe {
            libbpf_sys::bpf_link_create(
                skel.progs.spindle_local_sockops.as_fd().as_raw_fd(),
                dir.as_raw_fd(),
                libbpf_sys::BPF_CGROUP_SOCK_OPS,
                &opts,
            )
        };
        if fd < 0 {
            return Err(IngressError::Os {
                what: format!(
                    "attaching the sock_ops program to cgroup {} (a cgroup v2 directory)",
                    cgroup.display()
                ),
                cause: std::io::Error::from_raw_os_error(-fd),
            });
        }
        // SAFETY: a new link fd that nothing else owns.
        let link = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(LocalRedirect {
            skel,
            _cgroup_link: link,
        })
    }

    pub fn counters(&self) -> Result<LocalCounters, IngressError> {
        let mut out = LocalCounters::default();
        for (i, n) in out.0.iter_mut().enumerate() {
            *n = per_cpu(&self.skel.maps.local_counters, i as u32)?;
        }
        Ok(out)
    }
}
