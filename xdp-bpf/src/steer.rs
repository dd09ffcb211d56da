//! Connection steering for the gateway's `SO_REUSEPORT` shards: `steer.bpf.c` on their group.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use bpf_kit::Pod;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags};

use crate::maps::{self, MAX_SHARDS, STEER_MAX_CPUS, SteerConfig};
use crate::{IngressError, bpf, per_cpu, storage};

mod skel {
    #![allow(clippy::all, unsafe_op_in_unsafe_fn, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/steer.skel.rs"));
}
use skel::{SteerSkel, SteerSkelBuilder};

/// How the program picks a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SteerMode {
    /// The shard whose thread runs on the CPU that received the SYN.
    Cpu,
    /// A hash of the client's address: all of a client's connections on one shard.
    SourceHash,
}

/// Connections put on each shard, and selections the kernel refused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SteeringCounters {
    pub per_shard: Vec<u64>,
    pub fallbacks: u64,
}

/// The program on one reuseport group, for as long as the group lives (the group holds the
/// program; this value holds its maps for reading).
pub struct Steering {
    skel: SteerSkel<'static>,
    shards: usize,
    mode: SteerMode,
}

impl Steering {
    /// Attaches the program to the group of `listeners` (all bound to one address with
    /// `SO_REUSEPORT`, and listening), listener i being shard i. For [`SteerMode::Cpu`],
    /// `cpus[i]` is the CPU shard i's thread is pinned to; connections received on other
    /// CPUs go to shard `cpu % shards`.
    pub fn attach(
        listeners: &[BorrowedFd<'_>],
        mode: SteerMode,
        cpus: &[usize],
    ) -> Result<Self, IngressError> {
        if listeners.is_empty() || listeners.len() > MAX_SHARDS {
            return Err(IngressError::Invalid(format!(
                "steering needs 1..={MAX_SHARDS} listeners, got {}",
                listeners.len()
            )));
        }
        let open = SteerSkelBuilder::default()
            .open(storage())
            .map_err(bpf("opening the steering eBPF object"))?;
        let skel = open
            .load()
            .map_err(bpf("loading the steering eBPF program"))?;
        let shards = listeners.len() as u32;
        for cpu in 0..STEER_MAX_CPUS {
            let shard = cpus
                .iter()
                .position(|&c| c == cpu as usize)
                .map_or(cpu % shards, |i| i as u32 % shards);
            skel.maps
                .cpu_shards
                .update(cpu.as_bytes(), shard.as_bytes(), MapFlags::ANY)
                .map_err(bpf("writing the CPU-to-shard table"))?;
        }
        for (i, listener) in listeners.iter().enumerate() {
            let fd = listener.as_raw_fd() as u64;
            skel.maps
                .shard_listeners
                .update((i as u32).as_bytes(), fd.as_bytes(), MapFlags::ANY)
                .map_err(bpf(
                    "adding a shard listener to the steering map (is it listening with SO_REUSEPORT?)",
                ))?;
        }
        let config = SteerConfig {
            mode: match mode {
                SteerMode::Cpu => maps::STEER_CPU,
                SteerMode::SourceHash => maps::STEER_SOURCE_HASH,
            },
            shards,
        };
        skel.maps
            .steer_config
            .update(0u32.as_bytes(), config.as_bytes(), MapFlags::ANY)
            .map_err(bpf("writing the steering settings"))?;
        let prog_fd = skel.progs.spindle_steer.as_fd().as_raw_fd();
        // Attaching to one socket of the group attaches to the whole group.
        attach_reuseport_program(listeners[0], prog_fd).map_err(|cause| IngressError::Os {
            what: "attaching the steering program to the shards' SO_REUSEPORT group".into(),
            cause,
        })?;
        Ok(Steering {
            skel,
            shards: listeners.len(),
            mode,
        })
    }

    pub fn mode(&self) -> SteerMode {
        self.mode
    }

    pub fn counters(&self) -> Result<SteeringCounters, IngressError> {
        let mut per_shard = Vec::with_capacity(self.shards);
        for i in 0..self.shards {
            per_shard.push(per_cpu(&self.skel.maps.steer_counters, i as u32)?);
        }
        Ok(SteeringCounters {
            per_shard,
            fallbacks: per_cpu(&self.skel.maps.steer_counters, MAX_SHARDS as u32)?,
        })
    }
}

/// SO_ATTACH_REUSEPORT_EBPF on `socket`: `prog_fd` picks the socket of its group.
fn attach_reuseport_program(socket: BorrowedFd<'_>, prog_fd: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a plain setsockopt with a pointer to an int that outlives the call and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_EBPF,
            (&prog_fd as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
