//! The eBPF programs at the gateway's ingress (`ingress:`, crate `xdp-bpf`): the guard on
//! the interface clients arrive on, connection steering over the front's shards, and the
//! node's routing fast path. Loaded and attached once, before the gateway serves; their
//! counters are read at scrape time. They go with the process (kernel links), so a gateway
//! that exits, even by SIGKILL, leaves nothing attached.
//!
//! It owns the programs' lifetime and their metrics; it must not decide what the guard
//! allows beyond the ports the gateway itself serves (the configuration does).

use std::os::fd::AsFd;

use chain_runtime::config::{GuardHook, GuardMode, IngressSpec, Steering};
use prometheus::proto::{MetricFamily, MetricType};
use xdp_bpf::{FastPath, Guard, GuardSettings, Hook, IngressError, SteerMode};

use crate::metrics::{counter, family};
use crate::shards::Listeners;

/// Why the ingress programs could not be set up: each names the part of `ingress:`.
#[derive(Debug, thiserror::Error)]
pub enum IngressStartError {
    #[error("ingress.guard on {interface}: {cause}")]
    Guard {
        interface: String,
        cause: IngressError,
    },
    #[error("ingress.guard: reading this namespace's ephemeral port range: {0}")]
    PortRange(std::io::Error),
    #[error("ingress.steering {mode}: {cause}")]
    Steering {
        mode: &'static str,
        cause: std::io::Error,
    },
    #[error("ingress.steering {mode}: {cause}")]
    SteeringProgram {
        mode: &'static str,
        cause: IngressError,
    },
    #[error("ingress.fast_path: {0}")]
    FastPath(IngressError),
    #[error("ingress.local_redirect: {0}")]
    LocalRedirect(IngressError),
    #[error("ingress.local_redirect: finding the gateway's cgroup: {0}")]
    OwnCgroup(std::io::Error),
}

/// The ingress programs of one gateway, for as long as it runs.
pub struct Ingress {
    guard: Option<Guard>,
    steering: Option<(Steering, Option<xdp_bpf::Steering>)>,
    fast_path: Option<FastPath>,
    local_redirect: Option<xdp_bpf::LocalRedirect>,
}

/// What the guard must let through whatever the configuration says: the gateway's own
/// listening ports.
pub struct ServicePorts(pub Vec<u16>);

impl Ingress {
    /// Attaches what `spec` asks for. `listeners` are the front's (steered when there are
    /// several); `shard_cpus[i]` is the CPU shard i's thread is pinned to, when steering pins.
    pub fn start(
        spec: &IngressSpec,
        service: &ServicePorts,
        listeners: &Listeners,
        shard_cpus: &[usize],
    ) -> Result<Self, IngressStartError> {
        let guard = spec
            .guard
            .as_ref()
            .map(|g| {
                let mut tcp_ports = service.0.clone();
                for port in &g.allow_tcp {
                    if !tcp_ports.contains(port) {
                        tcp_ports.push(*port);
                    }
                }
                let settings = GuardSettings {
                    mode: match g.effective_mode() {
                        GuardMode::RateOnly => xdp_bpf::GuardMode::RateOnly,
                        GuardMode::Strict | GuardMode::Auto => xdp_bpf::GuardMode::Strict,
                    },
                    syn_per_second: g.syn_rate,
                    syn_burst: g.syn_burst,
                    syn_total: g.syn_all,
                    sources: g.sources,
                    tcp_ports,
                    udp_ports: g.allow_udp.clone(),
                    ephemeral: xdp_bpf::local_port_range().map_err(IngressStartError::PortRange)?,
                };
                let err = |cause| IngressStartError::Guard {
                    interface: g.interface.clone(),
                    cause,
                };
                let mut guard = Guard::load(&settings).map_err(err)?;
                let hook = match g.hook {
                    GuardHook::Tc => Hook::TcIngress,
                    GuardHook::Xdp => Hook::Xdp,
                };
                let removed = guard.attach(&g.interface, hook).map_err(err)?;
                for r in removed {
                    tracing::warn!(
                        "removed a stale {} (program {}, {}) from {}",
                        r.name,
                        r.prog_id,
                        r.how,
                        g.interface
                    );
                }
                tracing::info!(
                    interface = %g.interface, hook = hook.name(),
                    mode = ?settings.mode, ports = ?settings.tcp_ports,
                    syn_rate = g.syn_rate, syn_burst = g.syn_burst, "ingress guard attached"
                );
                Ok(guard)
            })
            .transpose()?;

        let steering = if listeners.shards() > 1 {
            let mode = spec.steering;
            let program = match mode {
                Steering::Reuseport => None,
                Steering::IncomingCpu => {
                    listeners.set_incoming_cpus(shard_cpus).map_err(|cause| {
                        IngressStartError::Steering {
                            mode: mode.name(),
                            cause,
                        }
                    })?;
                    None
                }
                Steering::Cpu | Steering::SourceHash => {
                    let fds: Vec<_> = listeners.sockets().map(|s| s.as_fd()).collect();
                    let how = if mode == Steering::Cpu {
                        SteerMode::Cpu
                    } else {
                        SteerMode::SourceHash
                    };
                    Some(
                        xdp_bpf::Steering::attach(&fds, how, shard_cpus).map_err(|cause| {
                            IngressStartError::SteeringProgram {
                                mode: mode.name(),
                                cause,
                            }
                        })?,
                    )
                }
            };
            tracing::info!(
                steering = mode.name(),
                shards = listeners.shards(),
                "front shards steered"
            );
            Some((mode, program))
        } else {
            None
        };

        let fast_path = spec
            .fast_path
            .as_ref()
            .map(|f| {
                let fast =
                    FastPath::attach(&f.interfaces, f.netns.as_deref()).map_err(IngressStartError::FastPath)?;
                for r in fast.removed() {
                    tracing::warn!("removed a stale {} (program {}, {})", r.name, r.prog_id, r.how);
                }
                tracing::info!(interfaces = ?f.interfaces, netns = ?f.netns, "ingress fast path attached");
                Ok(fast)
            })
            .transpose()?;

        let local_redirect = spec
            .local_redirect
            .as_ref()
            .map(|l| {
                let cgroup = match &l.cgroup {
                    Some(path) => path.clone(),
                    None => xdp_bpf::own_cgroup().map_err(IngressStartError::OwnCgroup)?,
                };
                let port = listeners.local_addr().port();
                let local = xdp_bpf::LocalRedirect::attach(&cgroup, &[port])
                    .map_err(IngressStartError::LocalRedirect)?;
                tracing::info!(cgroup = %cgroup.display(), port, "same-host connections go socket to socket");
                Ok(local)
            })
            .transpose()?;

        Ok(Ingress {
            guard,
            steering,
            fast_path,
            local_redirect,
        })
    }

    /// The programs' counters as metric families (empty when none runs).
    pub fn families(&self) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        if let Some(guard) = &self.guard
            && let Some((interface, hook)) = guard.attached_to()
        {
            if let Ok(counters) = guard.counters() {
                let samples = counters
                    .iter()
                    .map(|(verdict, reason, n)| {
                        counter(
                            &[
                                ("hook", hook.name()),
                                ("interface", interface),
                                ("reason", reason),
                                ("verdict", verdict),
                            ],
                            n as f64,
                        )
                    })
                    .collect();
                out.push(family(
                    "spindle_ingress_guard_packets_total",
                    "Packets the ingress guard saw, by verdict and reason: pass (service, \
                     reply, control, udp_allowed, unguarded) or drop (port, throttled, \
                     fragment, malformed, protocol, throttled_all); counted per CPU in the kernel",
                    MetricType::COUNTER,
                    samples,
                ));
            }
            if let Ok(sources) = guard.throttled_sources(TOP_THROTTLED) {
                let samples: Vec<_> = sources
                    .iter()
                    .map(|(ip, bucket)| {
                        counter(
                            &[("interface", interface), ("source", &ip.to_string())],
                            bucket.throttled as f64,
                        )
                    })
                    .collect();
                if !samples.is_empty() {
                    out.push(family(
                        "spindle_ingress_guard_throttled_by_source_total",
                        "New connections the guard refused, for the sources it refused most \
                         (at most 10, while they stay in its source table)",
                        MetricType::COUNTER,
                        samples,
                    ));
                }
            }
        }
        if let Some((mode, Some(program))) = &self.steering
            && let Ok(counters) = program.counters()
        {
            let mut samples: Vec<_> = counters
                .per_shard
                .iter()
                .enumerate()
                .map(|(shard, n)| {
                    counter(
                        &[("mode", mode.name()), ("shard", &shard.to_string())],
                        *n as f64,
                    )
                })
                .collect();
            samples.push(counter(
                &[("mode", mode.name()), ("shard", "fallback")],
                counters.fallbacks as f64,
            ));
            out.push(family(
                "spindle_ingress_steered_connections_total",
                "New connections the SK_REUSEPORT program put on each front shard; `fallback`: \
                 selections the kernel refused, left to its own hash",
                MetricType::COUNTER,
                samples,
            ));
        }
        if let Some(fast) = &self.fast_path
            && let Ok(counters) = fast.counters()
        {
            let samples = counters
                .iter()
                .map(|(outcome, n)| counter(&[("outcome", outcome)], n as f64))
                .collect();
            out.push(family(
                "spindle_ingress_fast_path_packets_total",
                "Packets the node's fast path saw on its veths: redirected straight into the \
                 peer namespace, or left to the node's stack and why",
                MetricType::COUNTER,
                samples,
            ));
        }
        if let Some(local) = &self.local_redirect
            && let Ok(counters) = local.counters()
        {
            let samples = counters
                .iter()
                .map(|(event, n)| counter(&[("event", event)], n as f64))
                .collect();
            out.push(family(
                "spindle_ingress_local_redirect_total",
                "Same-host acceleration: sockets of same-host connections to the listen port \
                 put in its socket hash (or that did not fit), and messages handed socket to \
                 socket or passed over TCP (their peer not in the map)",
                MetricType::COUNTER,
                samples,
            ));
        }
        out
    }
}

/// Sources named in `spindle_ingress_guard_throttled_by_source_total`.
const TOP_THROTTLED: usize = 10;
