//! Rust mirrors of `src/bpf/ingress_maps.h`. A test compiles the header with the system C
//! compiler and compares every size, offset and constant, so the two cannot drift.

use bpf_kit::Pod;

pub const GUARD_MAX_PORTS: usize = 16;
pub const MAX_SHARDS: usize = 64;
pub const STEER_MAX_CPUS: u32 = 1024;

pub const GUARD_STRICT: u32 = 1;
pub const GUARD_RATE_ONLY: u32 = 2;

pub const STEER_CPU: u32 = 1;
pub const STEER_SOURCE_HASH: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardConfig {
    pub mode: u32,
    pub pad: u32,
    pub syn_interval_ns: u64,
    pub syn_tolerance_ns: u64,
    pub total_interval_ns: u64,
    pub total_tolerance_ns: u64,
    pub ephemeral_low: u16,
    pub ephemeral_high: u16,
    pub tcp_ports: [u16; GUARD_MAX_PORTS],
    pub udp_ports: [u16; GUARD_MAX_PORTS],
    pub pad2: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Source {
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub tat_ns: u64,
    pub admitted: u64,
    pub throttled: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerConfig {
    pub mode: u32,
    pub shards: u32,
}

// SAFETY: repr(C) structs of integers and integer arrays, laid out without padding (the
// explicit pad fields fill the holes; checked against the header below).
unsafe impl Pod for GuardConfig {}
// SAFETY: as above.
unsafe impl Pod for Source {}
// SAFETY: as above.
unsafe impl Pod for Bucket {}
// SAFETY: as above.
unsafe impl Pod for SteerConfig {}

/// The guard's counters, in the order of `enum spindle_guard_counter`: (C name, verdict,
/// reason) — the metric labels.
pub const GUARD_COUNTERS: [(&str, &str, &str); 11] = [
    ("SPINDLE_GUARD_PASS_SERVICE", "pass", "service"),
    ("SPINDLE_GUARD_PASS_REPLY", "pass", "reply"),
    ("SPINDLE_GUARD_PASS_CONTROL", "pass", "control"),
    ("SPINDLE_GUARD_PASS_UDP", "pass", "udp_allowed"),
    ("SPINDLE_GUARD_PASS_UNGUARDED", "pass", "unguarded"),
    ("SPINDLE_GUARD_DROP_PORT", "drop", "port"),
    ("SPINDLE_GUARD_DROP_THROTTLED", "drop", "throttled"),
    ("SPINDLE_GUARD_DROP_FRAGMENT", "drop", "fragment"),
    ("SPINDLE_GUARD_DROP_MALFORMED", "drop", "malformed"),
    ("SPINDLE_GUARD_DROP_PROTOCOL", "drop", "protocol"),
    ("SPINDLE_GUARD_DROP_THROTTLED_ALL", "drop", "throttled_all"),
];

/// The fast path's counters, in the order of `enum spindle_fast_path_counter`: (C name,
/// what happened to the packet).
pub const FAST_PATH_COUNTERS: [(&str, &str); 7] = [
    ("SPINDLE_FAST_REDIRECTED", "redirected"),
    ("SPINDLE_FAST_NOT_IP", "not_ip"),
    ("SPINDLE_FAST_LOCAL", "local_or_unroutable"),
    ("SPINDLE_FAST_NOT_MANAGED", "not_managed"),
    ("SPINDLE_FAST_NO_NEIGHBOUR", "no_neighbour"),
    ("SPINDLE_FAST_TTL", "ttl_expiring"),
    ("SPINDLE_FAST_MALFORMED", "malformed"),
];

/// The same-host acceleration's counters, in the order of `enum spindle_local_counter`:
/// (C name, what they count).
pub const LOCAL_COUNTERS: [(&str, &str); 4] = [
    ("SPINDLE_LOCAL_SOCKETS_ADDED", "sockets_added"),
    ("SPINDLE_LOCAL_ADD_FAILED", "add_failed"),
    ("SPINDLE_LOCAL_REDIRECTED", "redirected"),
    ("SPINDLE_LOCAL_PASSED", "passed"),
];

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalKey {
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u32,
    pub remote_port: u32,
}

// SAFETY: a repr(C) struct of byte arrays and u32s without padding (checked below).
unsafe impl Pod for LocalKey {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn matches_c_header() {
        let header = concat!(env!("CARGO_MANIFEST_DIR"), "/src/bpf/ingress_maps.h");
        let mut check = bpf_kit::LayoutCheck::new(header)
            .size("spindle_guard_config", size_of::<GuardConfig>())
            .size("spindle_source", size_of::<Source>())
            .size("spindle_bucket", size_of::<Bucket>())
            .size("spindle_steer_config", size_of::<SteerConfig>());
        for (field, offset, size) in [
            ("mode", offset_of!(GuardConfig, mode), 4),
            ("pad", offset_of!(GuardConfig, pad), 4),
            (
                "syn_interval_ns",
                offset_of!(GuardConfig, syn_interval_ns),
                8,
            ),
            (
                "syn_tolerance_ns",
                offset_of!(GuardConfig, syn_tolerance_ns),
                8,
            ),
            (
                "total_interval_ns",
                offset_of!(GuardConfig, total_interval_ns),
                8,
            ),
            (
                "total_tolerance_ns",
                offset_of!(GuardConfig, total_tolerance_ns),
                8,
            ),
            ("ephemeral_low", offset_of!(GuardConfig, ephemeral_low), 2),
            ("ephemeral_high", offset_of!(GuardConfig, ephemeral_high), 2),
            (
                "tcp_ports",
                offset_of!(GuardConfig, tcp_ports),
                2 * GUARD_MAX_PORTS,
            ),
            (
                "udp_ports",
                offset_of!(GuardConfig, udp_ports),
                2 * GUARD_MAX_PORTS,
            ),
            ("pad2", offset_of!(GuardConfig, pad2), 4),
        ] {
            check = check.field("spindle_guard_config", field, offset, size);
        }
        check = check
            .field("spindle_source", "addr", offset_of!(Source, addr), 16)
            .field("spindle_bucket", "tat_ns", offset_of!(Bucket, tat_ns), 8)
            .field(
                "spindle_bucket",
                "admitted",
                offset_of!(Bucket, admitted),
                8,
            )
            .field(
                "spindle_bucket",
                "throttled",
                offset_of!(Bucket, throttled),
                8,
            )
            .field(
                "spindle_steer_config",
                "mode",
                offset_of!(SteerConfig, mode),
                4,
            )
            .field(
                "spindle_steer_config",
                "shards",
                offset_of!(SteerConfig, shards),
                4,
            )
            .constant("SPINDLE_GUARD_MAX_PORTS", GUARD_MAX_PORTS as i64)
            .constant("SPINDLE_MAX_SHARDS", MAX_SHARDS as i64)
            .constant("SPINDLE_STEER_MAX_CPUS", STEER_MAX_CPUS.into())
            .constant("SPINDLE_GUARD_STRICT", GUARD_STRICT.into())
            .constant("SPINDLE_GUARD_RATE_ONLY", GUARD_RATE_ONLY.into())
            .constant("SPINDLE_STEER_CPU", STEER_CPU.into())
            .constant("SPINDLE_STEER_SOURCE_HASH", STEER_SOURCE_HASH.into())
            .constant("SPINDLE_STEER_COUNTERS", MAX_SHARDS as i64 + 1)
            .constant("SPINDLE_GUARD_COUNTERS", GUARD_COUNTERS.len() as i64)
            .constant("SPINDLE_FAST_COUNTERS", FAST_PATH_COUNTERS.len() as i64);
        for (i, (name, _, _)) in GUARD_COUNTERS.iter().enumerate() {
            check = check.constant(name, i as i64);
        }
        for (i, (name, _)) in FAST_PATH_COUNTERS.iter().enumerate() {
            check = check.constant(name, i as i64);
        }
        for (i, (name, _)) in LOCAL_COUNTERS.iter().enumerate() {
            check = check.constant(name, i as i64);
        }
        check = check
            .size("spindle_local_key", size_of::<LocalKey>())
            .field(
                "spindle_local_key",
                "local",
                offset_of!(LocalKey, local),
                16,
            )
            .field(
                "spindle_local_key",
                "remote",
                offset_of!(LocalKey, remote),
                16,
            )
            .field(
                "spindle_local_key",
                "local_port",
                offset_of!(LocalKey, local_port),
                4,
            )
            .field(
                "spindle_local_key",
                "remote_port",
                offset_of!(LocalKey, remote_port),
                4,
            )
            .constant("SPINDLE_LOCAL_COUNTERS", LOCAL_COUNTERS.len() as i64);
        match check.run() {
            Err(bpf_kit::LayoutError::NoCompiler(e)) => testkit::cannot_run("matches_c_header", e),
            other => other.unwrap(),
        }
    }
}
