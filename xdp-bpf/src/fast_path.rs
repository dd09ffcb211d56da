//! The node's routing fast path: `fast_path.bpf.c` on the TC ingress of a set of veths.

use std::os::fd::AsFd;
use std::path::Path;

use bpf_kit::Pod;
use libbpf_rs::MapCore;
use libbpf_rs::MapFlags;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};

use crate::hook::{self, Attachment, Hook, Removed};
use crate::maps::FAST_PATH_COUNTERS;
use crate::{IngressError, bpf, per_cpu, storage};

mod skel {
    #![allow(clippy::all, unsafe_op_in_unsafe_fn, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/fast_path.skel.rs"));
}
use skel::{FastPathSkel, FastPathSkelBuilder};

/// The fast path's counters, summed over CPUs, in the order of [`FAST_PATH_COUNTERS`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastPathCounters(pub [u64; FAST_PATH_COUNTERS.len()]);

impl FastPathCounters {
    /// (what happened, packets) for every counter.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        FAST_PATH_COUNTERS
            .iter()
            .zip(self.0)
            .map(|((_, what), n)| (*what, n))
    }

    pub fn get(&self, what: &str) -> u64 {
        self.iter().find(|(w, _)| *w == what).map_or(0, |(_, n)| n)
    }
}

#[derive(Default)]
struct Attached {
    links: Vec<(String, u32, Attachment)>,
    removed: Vec<Removed>,
}

/// The program on every managed veth. Dropping it detaches it everywhere.
pub struct FastPath {
    skel: FastPathSkel<'static>,
    attachments: Vec<(String, Attachment)>,
    /// What earlier runs left, removed before attaching.
    removed: Vec<Removed>,
}

impl FastPath {
    /// Attaches the fast path to the TC ingress of each of `interfaces` (the node's ends of
    /// its veths), in the network namespace at `netns` or the calling thread's. Packets the
    /// node routes from one of them out of another go straight to that one's peer.
    pub fn attach(interfaces: &[String], netns: Option<&Path>) -> Result<Self, IngressError> {
        if interfaces.is_empty() {
            return Err(IngressError::Invalid(
                "the fast path needs at least one interface".into(),
            ));
        }
        let open = FastPathSkelBuilder::default()
            .open(storage())
            .map_err(bpf("opening the fast path's eBPF object"))?;
        let skel = open
            .load()
            .map_err(bpf("loading the fast path's eBPF program"))?;
        let prog = skel.progs.spindle_fast_path.as_fd();
        let attach_all = || -> Result<Attached, IngressError> {
            let mut attached = Attached::default();
            for interface in interfaces {
                let index = hook::ifindex(interface)?;
                attached
                    .removed
                    .extend(hook::clear_stale(index, interface, Hook::TcIngress)?);
                let link =
                    hook::attach(prog, "spindle_fast_path", index, interface, Hook::TcIngress)?;
                attached.links.push((interface.clone(), index, link));
            }
            Ok(attached)
        };
        let attached = match netns {
            Some(path) => hook::in_netns(path, attach_all)?,
            None => attach_all()?,
        };
        // Until the devices are recorded the program passes everything to the stack.
        for (_, index, _) in &attached.links {
            skel.maps
                .fast_path_devices
                .update(index.as_bytes(), 1u32.as_bytes(), MapFlags::ANY)
                .map_err(bpf("recording a fast-path device"))?;
        }
        let (attachments, removed) = (
            attached
                .links
                .into_iter()
                .map(|(name, _, link)| (name, link))
                .collect(),
            attached.removed,
        );
        Ok(FastPath {
            skel,
            attachments,
            removed,
        })
    }

    pub fn interfaces(&self) -> impl Iterator<Item = &str> {
        self.attachments.iter().map(|(i, _)| i.as_str())
    }

    pub fn removed(&self) -> &[Removed] {
        &self.removed
    }

    pub fn counters(&self) -> Result<FastPathCounters, IngressError> {
        let mut out = FastPathCounters::default();
        for (i, n) in out.0.iter_mut().enumerate() {
            *n = per_cpu(&self.skel.maps.fast_path_counters, i as u32)?;
        }
        Ok(out)
    }
}
