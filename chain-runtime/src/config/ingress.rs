//! The `ingress:` section: the eBPF programs at the gateway's ingress (crate `xdp-bpf`).
//! Off unless asked; every part needs CAP_BPF, CAP_PERFMON (the verifier allows the guard's
//! packet-pointer arithmetic only with it) and CAP_NET_ADMIN, or root.
//!
//! ```yaml
//! ingress:
//!   guard:                       # drop what the node does not serve, throttle new connections
//!     interface: eth0            # required: where the gateway's clients arrive
//!     hook: tc                   # tc (default): TC ingress, TCX link | xdp: native XDP only
//!                                #   (refused on lo and on devices without it); on a veth
//!                                #   XDP sends all the guard passes through the veth's XDP
//!                                #   ring, which a flood overflowed (legitimate p99 0.3-0.75
//!                                #   s vs 2 ms with tc, docs/benchmarks.md): xdp is for NICs
//!     mode: auto                 # auto (default): rate_only on lo, strict elsewhere;
//!                                # strict: only TCP to the service ports, answers to this
//!                                #   node's own connections (TCP, DNS), ARP, ICMP, DHCP pass;
//!                                # rate_only: only new connections are held to their rate
//!     syn_rate: 1000             # new connections per second per source, 1..=10000000,
//!                                #   default 1000
//!     syn_burst: 1000            # new connections a source may open at once, 1..=10000000,
//!                                #   default syn_rate
//!     syn_rate_all: 20000        # optional: new connections per second of all sources
//!                                #   together, 1..=10000000 (default: no such limit); a
//!                                #   flood from spoofed sources stays under every source's
//!                                #   own rate, only this holds it (legitimate new
//!                                #   connections are held with it; SYN cookies keep the
//!                                #   kernel safe either way)
//!     syn_burst_all: 20000       # at once, default syn_rate_all
//!     sources: 65536             # sources tracked (LRU), 1..=4194304, default 65536
//!     allow_tcp: [9100]          # more service ports; the listen port and node.peer_listen's
//!                                #   are always allowed (16 TCP ports in all)
//!     allow_udp: [5353]          # UDP ports served, at most 16
//!   steering: reuseport          # with http.shards > 1, which shard takes a new connection:
//!                                # reuseport (default): the kernel's hash of the connection;
//!                                # incoming_cpu: SO_INCOMING_CPU, shard threads pinned;
//!                                # cpu: an SK_REUSEPORT program, the shard pinned to the CPU
//!                                #   that received the SYN; source_hash: an SK_REUSEPORT
//!                                #   program, one shard per client address
//!   local_redirect: false        # optional, default false: true, or { cgroup: /sys/fs/cgroup/x }:
//!                                #   connections to the listen port from processes on this
//!                                #   host (in that cgroup v2 directory, default the gateway's
//!                                #   own) go socket to socket (sock_ops + sk_msg), skipping
//!                                #   TCP/IP for their payload; measured in docs/benchmarks.md
//!   fast_path:                   # the node's routing fast path (bpf_redirect_peer)
//!     interfaces: [veth-a, veth-b]   # the node's ends of its veths, 1..=64
//!     netns: /run/netns/node     # optional, absolute: the namespace they are in (default:
//!                                #   the gateway's own)
//! ```

use std::collections::HashMap;
use std::path::PathBuf;

use saphyr::{MarkedYaml, YamlData};

use super::yaml::{describe, pos, untag};
use super::{Checker, Shards};

pub const INGRESS_KEYS: &[&str] = &["guard", "steering", "fast_path", "local_redirect"];
pub const LOCAL_REDIRECT_KEYS: &[&str] = &["cgroup"];
pub const GUARD_KEYS: &[&str] = &[
    "interface",
    "hook",
    "mode",
    "syn_rate",
    "syn_burst",
    "syn_rate_all",
    "syn_burst_all",
    "sources",
    "allow_tcp",
    "allow_udp",
];
pub const FAST_PATH_KEYS: &[&str] = &["interfaces", "netns"];

const DEFAULT_SYN_RATE: i64 = 1000;
const MAX_SYN_RATE: i64 = 10_000_000;
const DEFAULT_SOURCES: i64 = 65_536;
/// About 160 MiB of LRU hash at the most.
const MAX_SOURCES: i64 = 4_194_304;
/// The guard program's port lists hold 16 each; two TCP entries are the gateway's own.
pub const MAX_GUARD_PORTS: usize = 16;
const MAX_FAST_PATH_INTERFACES: usize = 64;
/// IFNAMSIZ - 1.
const MAX_INTERFACE_NAME: usize = 15;

/// The ingress programs asked for (`ingress:`); all off by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngressSpec {
    pub guard: Option<GuardSpec>,
    pub steering: Steering,
    pub fast_path: Option<FastPathSpec>,
    pub local_redirect: Option<LocalRedirectSpec>,
}

/// `ingress.local_redirect`: same-host clients' connections, socket to socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalRedirectSpec {
    /// The cgroup v2 directory whose processes' connections are accelerated; `None`: the
    /// gateway's own cgroup.
    pub cgroup: Option<PathBuf>,
}

/// `ingress.guard`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardSpec {
    pub interface: String,
    pub hook: GuardHook,
    pub mode: GuardMode,
    pub syn_rate: u32,
    pub syn_burst: u32,
    /// All sources together: (rate, burst), if limited.
    pub syn_all: Option<(u32, u32)>,
    pub sources: u32,
    pub allow_tcp: Vec<u16>,
    pub allow_udp: Vec<u16>,
}

impl GuardSpec {
    /// The mode the guard runs in: `auto` is rate-only on `lo` (the gateway's connections to
    /// its workers run there too), strict elsewhere.
    pub fn effective_mode(&self) -> GuardMode {
        match self.mode {
            GuardMode::Auto if self.interface == "lo" => GuardMode::RateOnly,
            GuardMode::Auto => GuardMode::Strict,
            other => other,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardHook {
    Tc,
    Xdp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardMode {
    Auto,
    Strict,
    RateOnly,
}

/// `ingress.steering`: how the kernel picks a shard for a new connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Steering {
    /// The kernel's own hash of the connection's addresses and ports.
    #[default]
    Reuseport,
    /// `SO_INCOMING_CPU` on each shard's listener, its thread pinned to that CPU.
    IncomingCpu,
    /// The SK_REUSEPORT program: the shard pinned to the CPU that received the SYN.
    Cpu,
    /// The SK_REUSEPORT program: a hash of the client's address.
    SourceHash,
}

impl Steering {
    pub fn name(self) -> &'static str {
        match self {
            Steering::Reuseport => "reuseport",
            Steering::IncomingCpu => "incoming_cpu",
            Steering::Cpu => "cpu",
            Steering::SourceHash => "source_hash",
        }
    }

    /// Whether each shard's thread is pinned to a CPU of its own.
    pub fn pins_shards(self) -> bool {
        matches!(self, Steering::IncomingCpu | Steering::Cpu)
    }
}

/// `ingress.fast_path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastPathSpec {
    pub interfaces: Vec<String>,
    pub netns: Option<PathBuf>,
}

impl Checker<'_> {
    pub(super) fn ingress(&mut self, node: &MarkedYaml<'_>, shards: Shards) -> IngressSpec {
        let mut spec = IngressSpec::default();
        let Some(fields) = self.fields(node, "`ingress`", Some(INGRESS_KEYS)) else {
            return spec;
        };
        spec.guard = fields.get("guard").and_then(|n| self.guard(n));
        if let Some(n) = fields.get("steering")
            && let Some(word) = self.string(n, "ingress.steering")
        {
            let steering = match word {
                "reuseport" => Some(Steering::Reuseport),
                "incoming_cpu" => Some(Steering::IncomingCpu),
                "cpu" => Some(Steering::Cpu),
                "source_hash" => Some(Steering::SourceHash),
                other => {
                    self.error(
                        pos(n),
                        format!(
                            "unknown `ingress.steering` `{other}`: expected reuseport, \
                             incoming_cpu, cpu or source_hash"
                        ),
                    );
                    None
                }
            };
            if let Some(steering) = steering {
                spec.steering = steering;
                if shards == Shards::Fixed(1) {
                    self.error(
                        pos(n),
                        format!(
                            "`ingress.steering: {}` picks among shards: it needs `http.shards` \
                             above 1 (or `auto`)",
                            steering.name()
                        ),
                    );
                }
            }
        }
        spec.fast_path = fields.get("fast_path").and_then(|n| self.fast_path(n));
        spec.local_redirect = fields
            .get("local_redirect")
            .and_then(|n| self.local_redirect(n));
        spec
    }

    fn guard(&mut self, node: &MarkedYaml<'_>) -> Option<GuardSpec> {
        let fields = self.fields(node, "`ingress.guard`", Some(GUARD_KEYS))?;
        let interface = self
            .required(&fields, "interface", "`ingress.guard`")
            .and_then(|n| self.interface(n, "ingress.guard.interface"));
        let hook = match fields.get("hook") {
            None => GuardHook::Tc,
            Some(n) => match self.string(n, "ingress.guard.hook") {
                Some("tc") => GuardHook::Tc,
                Some("xdp") => {
                    if interface.as_deref() == Some("lo") {
                        self.error(
                            pos(n),
                            "`hook: xdp` on lo would be generic XDP, which costs more than it \
                             saves (about 1.3 us per request measured); use `hook: tc`",
                        );
                    }
                    GuardHook::Xdp
                }
                Some(other) => {
                    self.error(
                        pos(n),
                        format!("unknown `ingress.guard.hook` `{other}`: expected tc or xdp"),
                    );
                    GuardHook::Tc
                }
                None => GuardHook::Tc,
            },
        };
        let mode = match fields.get("mode") {
            None => GuardMode::Auto,
            Some(n) => match self.string(n, "ingress.guard.mode") {
                Some("auto") => GuardMode::Auto,
                Some("strict") => GuardMode::Strict,
                Some("rate_only") => GuardMode::RateOnly,
                Some(other) => {
                    self.error(
                        pos(n),
                        format!(
                            "unknown `ingress.guard.mode` `{other}`: expected auto, strict or \
                             rate_only"
                        ),
                    );
                    GuardMode::Auto
                }
                None => GuardMode::Auto,
            },
        };
        let int = |this: &mut Self, key: &str, max: i64, default: i64| -> i64 {
            fields
                .get(key)
                .and_then(|n| this.int_in(n, &format!("ingress.guard.{key}"), 1, max))
                .unwrap_or(default)
        };
        let syn_rate = int(self, "syn_rate", MAX_SYN_RATE, DEFAULT_SYN_RATE);
        let syn_burst = int(self, "syn_burst", MAX_SYN_RATE, syn_rate);
        let sources = int(self, "sources", MAX_SOURCES, DEFAULT_SOURCES);
        let syn_all = match (fields.get("syn_rate_all"), fields.get("syn_burst_all")) {
            (None, None) => None,
            (None, Some(_)) => {
                let at = fields
                    .field("syn_burst_all")
                    .map(|f| f.key_at)
                    .unwrap_or(fields.at);
                self.error(at, "`syn_burst_all` needs `syn_rate_all`");
                None
            }
            (Some(_), _) => {
                let rate = int(self, "syn_rate_all", MAX_SYN_RATE, DEFAULT_SYN_RATE);
                Some((
                    rate as u32,
                    int(self, "syn_burst_all", MAX_SYN_RATE, rate) as u32,
                ))
            }
        };
        // The gateway's listen port and its peer port take two of the TCP entries.
        let allow_tcp = fields
            .get("allow_tcp")
            .map(|n| self.ports(n, "ingress.guard.allow_tcp", MAX_GUARD_PORTS - 2))
            .unwrap_or_default();
        let allow_udp = fields
            .get("allow_udp")
            .map(|n| self.ports(n, "ingress.guard.allow_udp", MAX_GUARD_PORTS))
            .unwrap_or_default();
        Some(GuardSpec {
            interface: interface?,
            hook,
            mode,
            syn_rate: syn_rate as u32,
            syn_burst: syn_burst as u32,
            syn_all,
            sources: sources as u32,
            allow_tcp,
            allow_udp,
        })
    }

    fn fast_path(&mut self, node: &MarkedYaml<'_>) -> Option<FastPathSpec> {
        let fields = self.fields(node, "`ingress.fast_path`", Some(FAST_PATH_KEYS))?;
        let list = self.required(&fields, "interfaces", "`ingress.fast_path`")?;
        let items = self.list(list, "ingress.fast_path.interfaces", "interface")?;
        if items.len() > MAX_FAST_PATH_INTERFACES {
            self.error(
                pos(list),
                format!(
                    "`ingress.fast_path.interfaces` lists {} interfaces; give 1..={MAX_FAST_PATH_INTERFACES}",
                    items.len()
                ),
            );
        }
        let mut seen = HashMap::new();
        let mut interfaces = Vec::new();
        for item in items {
            if let Some(name) = self.interface(item, "ingress.fast_path.interfaces") {
                self.unique(&mut seen, &name, pos(item), |first| {
                    format!("interface `{name}` is listed twice (first at line {first})")
                });
                interfaces.push(name);
            }
        }
        let netns = fields.get("netns").and_then(|n| {
            let path = self.string(n, "ingress.fast_path.netns")?;
            if !path.starts_with('/') {
                self.error(
                    pos(n),
                    format!(
                        "`ingress.fast_path.netns` must be an absolute path such as \
                         /run/netns/node, found `{path}`"
                    ),
                );
                return None;
            }
            Some(PathBuf::from(path))
        });
        Some(FastPathSpec { interfaces, netns })
    }

    fn local_redirect(&mut self, node: &MarkedYaml<'_>) -> Option<LocalRedirectSpec> {
        if let YamlData::Value(saphyr::Scalar::Boolean(on)) = &untag(node).data {
            return on.then(LocalRedirectSpec::default);
        }
        let fields = self.fields(
            node,
            "`ingress.local_redirect` (true, false or { cgroup: PATH })",
            Some(LOCAL_REDIRECT_KEYS),
        )?;
        let cgroup = fields.get("cgroup").and_then(|n| {
            let path = self.string(n, "ingress.local_redirect.cgroup")?;
            if !path.starts_with('/') {
                self.error(
                    pos(n),
                    format!(
                        "`ingress.local_redirect.cgroup` must be an absolute path to a cgroup v2 \
                         directory, found `{path}`"
                    ),
                );
                return None;
            }
            Some(PathBuf::from(path))
        });
        Some(LocalRedirectSpec { cgroup })
    }

    fn interface(&mut self, node: &MarkedYaml<'_>, field: &str) -> Option<String> {
        let name = self.string(node, field)?;
        let ok = !name.is_empty()
            && name.len() <= MAX_INTERFACE_NAME
            && name != "."
            && name != ".."
            && !name
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace());
        if !ok {
            self.error(
                pos(node),
                format!(
                    "`{field}`: `{name}` is not an interface name (1..={MAX_INTERFACE_NAME} \
                     bytes, no `/`, `:` or spaces)"
                ),
            );
            return None;
        }
        Some(name.to_string())
    }

    fn ports(&mut self, node: &MarkedYaml<'_>, field: &str, max: usize) -> Vec<u16> {
        let YamlData::Sequence(items) = &untag(node).data else {
            self.error(
                pos(node),
                format!(
                    "`{field}` must be a list of ports, found {}",
                    describe(node)
                ),
            );
            return Vec::new();
        };
        if items.len() > max {
            self.error(
                pos(node),
                format!(
                    "`{field}` lists {} ports; the guard holds at most {max}",
                    items.len()
                ),
            );
        }
        let mut seen = HashMap::new();
        let mut ports = Vec::new();
        for item in items {
            if let Some(port) = self.int_in(item, field, 1, 65_535) {
                self.unique(&mut seen, &port.to_string(), pos(item), |first| {
                    format!("port {port} is listed twice in `{field}` (first at line {first})")
                });
                ports.push(port as u16);
            }
        }
        ports
    }
}
