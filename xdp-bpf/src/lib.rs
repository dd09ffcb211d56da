//! Spindle's ingress eBPF programs, owned by the running gateway:
//! - [`Guard`] (`src/bpf/guard.bpf.c`): on the interface the gateway listens on, TC ingress
//!   by default or native XDP, lets through only the service and what the node needs, holds
//!   each source to a rate of new connections, and counts every verdict per CPU;
//! - [`FastPath`] (`src/bpf/fast_path.bpf.c`): on a node's veths, hands routed packets
//!   straight into the peer namespace with `bpf_redirect_peer`;
//! - [`Steering`] (`src/bpf/steer.bpf.c`): an `SK_REUSEPORT` program that picks the
//!   gateway shard (`http.shards`) a new connection goes to;
//! - [`LocalRedirect`] (`src/bpf/local.bpf.c`, optional): sock_ops + sk_msg, handing the
//!   messages of same-host clients' connections socket to socket.
//!
//! Programs and maps live only in this process's descriptors (nothing is pinned), attached
//! through kernel links ([`hook`]), so they vanish when the gateway exits, even by SIGKILL.
//! Map layouts are defined once, in `src/bpf/ingress_maps.h`, mirrored in [`maps`].
//!
//! Needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (or root); TCX links need Linux 6.6+. This
//! crate decides no policy (which ports, what rate): the gateway's configuration does.

mod fast_path;
mod guard;
pub mod hook;
mod local;
pub mod maps;
mod steer;

pub use fast_path::{FastPath, FastPathCounters};
pub use guard::{Guard, GuardCounters, GuardMode, GuardSettings, Verdict, local_port_range};
pub use hook::{Attached, Hook, Removed};
pub use local::{LocalCounters, LocalRedirect, own_cgroup};
pub use steer::{SteerMode, Steering, SteeringCounters};

/// Why an ingress program could not be loaded, attached or read.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("{what}: {cause}{hint}", hint = privilege_hint(cause))]
    Bpf {
        what: String,
        cause: libbpf_rs::Error,
    },
    #[error("{what}: {cause}{hint}", hint = os_privilege_hint(cause))]
    Os { what: String, cause: std::io::Error },
    #[error("no network interface named `{interface}` here")]
    NoInterface { interface: String },
    #[error(
        "native XDP is not available on {interface} ({cause}); use `hook: tc`, which drops at \
         about the same cost (generic XDP is refused: it costs more than it saves)"
    )]
    NoNativeXdp {
        interface: String,
        cause: std::io::Error,
    },
    #[error(
        "{interface} already has Spindle's {program} on its {hook} hook, held by process {pid} \
         (another gateway guarding the same interface?)"
    )]
    InUse {
        interface: String,
        hook: &'static str,
        program: String,
        pid: i32,
    },
    #[error("{0}")]
    Invalid(String),
}

fn privilege_hint(e: &libbpf_rs::Error) -> &'static str {
    if e.kind() == libbpf_rs::ErrorKind::PermissionDenied {
        " (needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN, or root)"
    } else {
        ""
    }
}

fn os_privilege_hint(e: &std::io::Error) -> &'static str {
    if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) {
        " (needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN, or root)"
    } else {
        ""
    }
}

fn bpf(what: impl Into<String>) -> impl FnOnce(libbpf_rs::Error) -> IngressError {
    let what = what.into();
    move |cause| IngressError::Bpf { what, cause }
}

/// Object storage for a skeleton that lives as long as the value owning it: skeletons
/// borrow their storage, and a gateway keeps its programs for its whole life, so a leaked box
/// of a few hundred bytes per program set is the simplest owner.
fn storage() -> &'static mut std::mem::MaybeUninit<libbpf_rs::OpenObject> {
    Box::leak(Box::new(std::mem::MaybeUninit::uninit()))
}

/// Reads per-CPU counter `index` of `map`, summed over CPUs.
fn per_cpu<M: libbpf_rs::MapCore>(map: &M, index: u32) -> Result<u64, IngressError> {
    use bpf_kit::Pod;
    let values = map
        .lookup_percpu(index.as_bytes(), libbpf_rs::MapFlags::ANY)
        .map_err(bpf("reading a per-CPU counter"))?
        .unwrap_or_default();
    Ok(bpf_kit::sum_per_cpu(&values))
}

#[cfg(test)]
mod tests;
