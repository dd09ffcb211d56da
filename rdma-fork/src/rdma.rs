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
//! parent has none. [`exchange`] is the same set-up over a bare TCP stream.
//!
//! - [`exchange`]: the connection metadata frames for a bare control stream (pure Rust,
//!   tested over real TCP; the queue-pair and region layout is `proto::pages`').
//! - [`plan`]: which READ work requests serve a page request (pure arithmetic, tested
//!   exhaustively): zero pages are never read, contiguous pages are coalesced.
//! - [`verbs`]: the device, protection domain, queue pairs and memory regions (sideway),
//!   the parent's [`RdmaExport`] and the child's [`RdmaSource`]. These need a device and
//!   cannot run on a machine without one; every entry point then returns [`NoRdma`].

pub mod exchange;
pub mod plan;
pub mod verbs;

use std::path::Path;

pub use crate::transport::NoRdma;
pub use exchange::{
    ExchangeError, Frame, HANDSHAKE_TIMEOUT, QpInfo, RegionInfo, exchange_as_child,
    exchange_as_child_timeout, exchange_as_parent, exchange_as_parent_timeout, read_frame,
    send_ready, wait_ready, write_frame,
};
pub use plan::{MAX_READ_BYTES, PlanError, ReadRequest, plan_reads};
pub use verbs::{ParentConn, RdmaDevice, RdmaError, RdmaExport, RdmaSource, probe_verbs};

/// Where the kernel lists RDMA devices; absent when no RDMA driver (nor soft-RoCE) is loaded.
pub const SYSFS_CLASS: &str = "/sys/class/infiniband";

/// Finds an RDMA device with an active port, or says plainly why there is none. Checks
/// [`SYSFS_CLASS`] first (no library is loaded when the kernel has no RDMA at all), then asks
/// the verbs library ([`probe_verbs`]).
pub fn probe() -> Result<RdmaDevice, NoRdma> {
    if !Path::new(SYSFS_CLASS).exists() {
        return Err(NoRdma::NoSysfs);
    }
    probe_verbs()
}
