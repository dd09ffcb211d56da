//! The ingress guard: loading `guard.bpf.c` with the gateway's settings, attaching it, and
//! reading what it did.

use std::net::{IpAddr, Ipv6Addr};

use bpf_kit::Pod;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use std::os::fd::AsFd;

use libbpf_rs::{MapCore, MapFlags};

use crate::hook::{self, Attachment, Hook, Removed};
use crate::maps::{self, Bucket, GUARD_COUNTERS, GUARD_MAX_PORTS, GuardConfig, Source};
use crate::{IngressError, bpf, per_cpu, storage};

mod skel {
    #![allow(clippy::all, unsafe_op_in_unsafe_fn, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/guard.skel.rs"));
}
use skel::{GuardSkel, GuardSkelBuilder};

/// What the guard does with what is not a new connection to a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardMode {
    /// Drop everything the node neither serves nor needs.
    Strict,
    /// Only throttle new connections to the service ports; pass everything else (for `lo`,
    /// where the gateway's own connections to its workers run too).
    RateOnly,
}

/// The guard's settings, from the gateway's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardSettings {
    pub mode: GuardMode,
    /// New connections per second each source may open, on average.
    pub syn_per_second: u32,
    /// New connections a source may open at once.
    pub syn_burst: u32,
    /// New connections per second and at once of all sources together, if limited.
    pub syn_total: Option<(u32, u32)>,
    /// Sources tracked at once (an LRU: the least recent is forgotten first).
    pub sources: u32,
    /// TCP ports new connections may reach: the service ports.
    pub tcp_ports: Vec<u16>,
    /// UDP ports that are served.
    pub udp_ports: Vec<u16>,
    /// Where answers to this host's own connections arrive, inclusive.
    pub ephemeral: (u16, u16),
}

impl GuardSettings {
    fn config(&self) -> Result<GuardConfig, IngressError> {
        let ports = |list: &[u16], what: &str| -> Result<[u16; GUARD_MAX_PORTS], IngressError> {
            if list.len() > GUARD_MAX_PORTS {
                return Err(IngressError::Invalid(format!(
                    "{} {what} ports; the guard holds at most {GUARD_MAX_PORTS}",
                    list.len()
                )));
            }
            if list.contains(&0) {
                return Err(IngressError::Invalid(format!(
                    "{what} port 0 is not a port"
                )));
            }
            let mut out = [0; GUARD_MAX_PORTS];
            out[..list.len()].copy_from_slice(list);
            Ok(out)
        };
        if self.syn_per_second == 0 || self.syn_burst == 0 {
            return Err(IngressError::Invalid(
                "the new-connection rate and burst must be at least 1".into(),
            ));
        }
        if self.ephemeral.0 > self.ephemeral.1 {
            return Err(IngressError::Invalid(format!(
                "ephemeral port range {}-{} is empty",
                self.ephemeral.0, self.ephemeral.1
            )));
        }
        let interval = 1_000_000_000 / u64::from(self.syn_per_second);
        let (total_interval, total_tolerance) = match self.syn_total {
            None => (0, 0),
            Some((0, _)) | Some((_, 0)) => {
                return Err(IngressError::Invalid(
                    "the new-connection rate and burst of all sources must be at least 1".into(),
                ));
            }
            Some((rate, burst)) => {
                let interval = 1_000_000_000 / u64::from(rate);
                (interval, interval * u64::from(burst - 1))
            }
        };
        Ok(GuardConfig {
            mode: match self.mode {
                GuardMode::Strict => maps::GUARD_STRICT,
                GuardMode::RateOnly => maps::GUARD_RATE_ONLY,
            },
            syn_interval_ns: interval,
            syn_tolerance_ns: interval * u64::from(self.syn_burst - 1),
            total_interval_ns: total_interval,
            total_tolerance_ns: total_tolerance,
            ephemeral_low: self.ephemeral.0,
            ephemeral_high: self.ephemeral.1,
            tcp_ports: ports(&self.tcp_ports, "TCP")?,
            udp_ports: ports(&self.udp_ports, "UDP")?,
            ..GuardConfig::default()
        })
    }
}

/// The calling thread's network namespace's ephemeral port range
/// (`net.ipv4.ip_local_port_range`, which IPv6 uses too).
pub fn local_port_range() -> std::io::Result<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(low)), Some(Ok(high))) => Ok((low, high)),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("ip_local_port_range is `{}`", text.trim()),
        )),
    }
}

/// What the guard decided for one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
}

/// The guard's counters, summed over CPUs, in the order of [`GUARD_COUNTERS`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardCounters(pub [u64; GUARD_COUNTERS.len()]);

impl GuardCounters {
    /// (verdict, reason, packets) for every counter.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> + '_ {
        GUARD_COUNTERS
            .iter()
            .zip(self.0)
            .map(|((_, verdict, reason), n)| (*verdict, *reason, n))
    }

    /// Packets counted under `reason`.
    pub fn get(&self, reason: &str) -> u64 {
        self.iter()
            .find(|(_, r, _)| *r == reason)
            .map_or(0, |(_, _, n)| n)
    }

    pub fn dropped(&self) -> u64 {
        self.iter()
            .filter(|(v, _, _)| *v == "drop")
            .map(|(_, _, n)| n)
            .sum()
    }

    pub fn passed(&self) -> u64 {
        self.iter()
            .filter(|(v, _, _)| *v == "pass")
            .map(|(_, _, n)| n)
            .sum()
    }
}

/// The loaded guard, attached to at most one interface.
pub struct Guard {
    skel: GuardSkel<'static>,
    attachment: Option<(Attachment, String, Hook)>,
}

impl Guard {
    /// Loads the program with `settings`; nothing is attached yet.
    pub fn load(settings: &GuardSettings) -> Result<Self, IngressError> {
        let config = settings.config()?;
        let mut open = GuardSkelBuilder::default()
            .open(storage())
            .map_err(bpf("opening the ingress guard's eBPF object"))?;
        open.maps
            .guard_sources
            .set_max_entries(settings.sources.max(1))
            .map_err(bpf("sizing the guard's source table"))?;
        let skel = open
            .load()
            .map_err(bpf("loading the ingress guard's eBPF program"))?;
        skel.maps
            .guard_config
            .update(0u32.as_bytes(), config.as_bytes(), MapFlags::ANY)
            .map_err(bpf("writing the guard's settings"))?;
        Ok(Guard {
            skel,
            attachment: None,
        })
    }

    /// Attaches the guard to `hook` of `interface` in the calling thread's network
    /// namespace, after removing Spindle programs an earlier run left there; returns what it
    /// removed. Refuses when a running process holds a Spindle program on that hook.
    pub fn attach(&mut self, interface: &str, hook: Hook) -> Result<Vec<Removed>, IngressError> {
        if hook == Hook::Xdp && interface == "lo" {
            return Err(IngressError::NoNativeXdp {
                interface: interface.to_string(),
                cause: std::io::Error::from_raw_os_error(libc::EOPNOTSUPP),
            });
        }
        let ifindex = hook::ifindex(interface)?;
        let removed = hook::clear_stale(ifindex, interface, hook)?;
        let prog = match hook {
            Hook::TcIngress => &self.skel.progs.spindle_guard_tc,
            Hook::Xdp => &self.skel.progs.spindle_guard_xdp,
        };
        let name = prog.name().to_string_lossy().into_owned();
        let attachment = hook::attach(prog.as_fd(), &name, ifindex, interface, hook)?;
        self.attachment = Some((attachment, interface.to_string(), hook));
        Ok(removed)
    }

    /// Where the guard is attached.
    pub fn attached_to(&self) -> Option<(&str, Hook)> {
        self.attachment.as_ref().map(|(_, i, h)| (i.as_str(), *h))
    }

    pub fn counters(&self) -> Result<GuardCounters, IngressError> {
        let mut out = GuardCounters::default();
        for (i, n) in out.0.iter_mut().enumerate() {
            *n = per_cpu(&self.skel.maps.guard_counters, i as u32)?;
        }
        Ok(out)
    }

    /// The `top` sources with the most throttled new connections, most first, with their
    /// bucket. Reads the whole source table in batches (a few syscalls per thousand sources).
    pub fn throttled_sources(&self, top: usize) -> Result<Vec<(IpAddr, Bucket)>, IngressError> {
        let mut found = Vec::new();
        let batches = self
            .skel
            .maps
            .guard_sources
            .lookup_batch(1024, MapFlags::ANY, MapFlags::ANY)
            .map_err(bpf("reading the guard's source table"))?;
        for (key, value) in batches {
            let (Some(source), Some(bucket)) =
                (Source::from_bytes(&key), Bucket::from_bytes(&value))
            else {
                continue;
            };
            if bucket.throttled > 0 {
                found.push((source_ip(&source), bucket));
            }
        }
        found.sort_by_key(|(_, bucket)| std::cmp::Reverse(bucket.throttled));
        found.truncate(top);
        Ok(found)
    }

    #[cfg(test)]
    pub(crate) fn tc_program_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.skel.progs.spindle_guard_tc.as_fd().as_raw_fd()
    }

    /// Runs the program attached at `hook` on `frame` (an Ethernet frame) in the kernel
    /// with BPF_PROG_TEST_RUN, without sending anything; the counters count it.
    pub fn decide(&self, frame: &[u8], hook: Hook) -> Result<Verdict, IngressError> {
        let prog = match hook {
            Hook::TcIngress => &self.skel.progs.spindle_guard_tc,
            Hook::Xdp => &self.skel.progs.spindle_guard_xdp,
        };
        let input = libbpf_rs::ProgramInput {
            data_in: Some(frame),
            ..Default::default()
        };
        let out = prog
            .test_run(input)
            .map_err(bpf("test-running the guard"))?;
        // TC_ACT_UNSPEC is -1; TC_ACT_SHOT 2; XDP_PASS 2, XDP_DROP 1.
        let pass = match hook {
            Hook::TcIngress => out.return_value as i32 == -1,
            Hook::Xdp => out.return_value == 2,
        };
        Ok(if pass { Verdict::Pass } else { Verdict::Drop })
    }
}

fn source_ip(source: &Source) -> IpAddr {
    let v6 = Ipv6Addr::from(source.addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The guard's key for `ip`, as the program builds it.
#[cfg(test)]
pub(crate) fn source_key(ip: IpAddr) -> Source {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    Source { addr: v6.octets() }
}
