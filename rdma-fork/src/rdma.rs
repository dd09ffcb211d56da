//! Pages by one-sided RDMA READ, MITOSIS-style: the parent registers its image mapping with
//! the NIC once, and a child's node reads the pages it needs straight out of the parent's
//! memory, with no CPU on the parent side in the data path.
//!
//! The TCP page server stays the control channel and the fallback: a child authenticates
//! with the page server as for TCP reads, then sends its queue pair in `RdmaConnect`
//! (`proto::pages`); the server ([`crate::server::ServerRdma`]) registers the image
//! ([`RdmaExport`]), connects a queue pair ([`RdmaExport::accept_qp`]) and answers with it and
//! the region, or says why it cannot. [`transport::rdma_pages`](crate::transport::rdma_pages)
//! falls back to TCP with a reason whenever [`probe`] finds no usable device here or the
//! parent has none. There is no other way to set up a queue pair: the rkey only ever reaches
//! a child that proved the image key.
//!
//! - [`QpInfo`] and [`RegionInfo`] (`proto::pages`): the queue-pair address and registered
//!   region the two sides swap; [`check_qp`] and [`check_region`] are the field checks both
//!   sides apply to what the peer sent.
//! - [`plan`]: which READ work requests serve a page request (pure arithmetic, tested
//!   exhaustively): zero pages are never read, contiguous pages are coalesced.
//! - [`verbs`]: the device, protection domain, queue pairs and memory regions (sideway),
//!   the parent's [`RdmaExport`] and the child's [`RdmaSource`]. These need a device and
//!   cannot run on a machine without one; every entry point then returns [`NoRdma`].

pub mod plan;
pub mod verbs;

use std::path::Path;

pub use crate::transport::NoRdma;
pub use plan::{MAX_READ_BYTES, PlanError, ReadRequest, plan_reads};
pub use proto::pages::{QpInfo, RegionInfo};
pub use verbs::{ParentConn, RdmaDevice, RdmaError, RdmaExport, RdmaSource, probe_verbs};

/// Where the kernel lists RDMA devices; absent when no RDMA driver (nor soft-RoCE) is loaded.
pub const SYSFS_CLASS: &str = "/sys/class/infiniband";

/// The field checks a peer's queue-pair info must pass: 24-bit QP number and PSN, a path MTU
/// of 256..4096.
pub fn check_qp(qp: &QpInfo) -> Result<(), RdmaError> {
    qp.check().map_err(RdmaError::Invalid)
}

/// The field checks a peer's region must pass: whole pages, not empty, no address wrap.
pub fn check_region(region: &RegionInfo) -> Result<(), RdmaError> {
    region.check().map_err(RdmaError::Invalid)
}

/// Finds an RDMA device with an active port, or says plainly why there is none. Checks
/// [`SYSFS_CLASS`] first (no library is loaded when the kernel has no RDMA at all), then asks
/// the verbs library ([`probe_verbs`]).
pub fn probe() -> Result<RdmaDevice, NoRdma> {
    if !Path::new(SYSFS_CLASS).exists() {
        return Err(NoRdma::NoSysfs);
    }
    probe_verbs()
}
