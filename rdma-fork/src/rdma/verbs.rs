//! The verbs path (sideway): device discovery, the parent's exported image region and the
//! child's READ-backed page source.
//!
//! Why sideway: it reaches `ibv_*` through its own small shim (rdma-mummy-sys) that loads
//! rdma-core at run time, so a build with the `rdma` feature needs no RDMA libraries, runs on
//! machines without them and fails with `EOPNOTSUPP` there; and it has what a remote fork
//! needs: registering existing memory and one-sided RDMA READ.
//!
//! Both sides use one reliable-connection queue pair per child. The parent's queue pair only
//! answers READs (responder resources, `REMOTE_READ` on the image region); the child's only
//! issues them, into a registered staging buffer it copies from (the fault handler's
//! destination changes every call; registering it each time would cost more than the copy).
//!
//! Nothing here can run on a machine without an RDMA device: every entry point that does not
//! take an [`RdmaDevice`] probes first and returns its [`NoRdma`].

use std::collections::hash_map::RandomState;
use std::ffi::c_void;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::mman::{MapFlags, ProtFlags, mmap, mmap_anonymous, munmap};
use proto::PageBitmap;
use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::{
    BasicCompletionQueue, PollCompletionQueueError, WorkCompletionStatus,
};
use sideway::ibverbs::device::{DeviceInfo, DeviceList, GetDeviceListErrorKind};
use sideway::ibverbs::device_context::{DeviceContext, Mtu, PortState};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, PostSendGuard, QueuePair, QueuePairAttribute, QueuePairState,
    SetScatterGatherEntry, WorkRequestFlags,
};
use tracing::{debug, info, warn};

use super::plan::{MAX_READ_BYTES, plan_reads};
use super::{QpInfo, RegionInfo, check_qp, check_region, probe};
use crate::client::{PageClient, RdmaAnswer};
use crate::transport::{Errno, NoRdma};
use crate::{FetchError, PAGE_SIZE, PageSource};

/// READs a child keeps in flight at once (also its send queue depth).
const QUEUE_DEPTH: u32 = 16;
/// The child's registered staging buffer: four of the largest READs.
const STAGING_BYTES: usize = 4 * MAX_READ_BYTES as usize;
/// How long one batch of READs may take before the connection is given up.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(5);
/// Outstanding READs a side asks for (initiator) or grants (responder), capped by the device.
const MAX_RD_ATOMIC: i32 = 16;

/// Why the verbs path failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RdmaError {
    #[error(transparent)]
    NoRdma(#[from] NoRdma),
    /// The peer's queue pair or region failed [`check_qp`] / [`check_region`].
    #[error("invalid RDMA connection field: {0}")]
    Invalid(&'static str),
    /// A verbs call failed; `detail` is the library's error chain.
    #[error("{op}: {detail}")]
    Verbs { op: &'static str, detail: String },
    #[error("mapping {what}: {source}")]
    Map {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("an image of {len} bytes is not a whole, non-zero number of pages")]
    BadImage { len: u64 },
    #[error("the parent registered {region} bytes; the image needs {image}")]
    RegionTooSmall { region: u64, image: u64 },
    #[error("READ {wr_id} completed with status {status} (vendor error {vendor_err:#x})")]
    Completion {
        wr_id: u64,
        status: u32,
        vendor_err: u32,
    },
    #[error("READs did not complete within {0:?}")]
    CompletionTimeout(Duration),
    #[error("the RDMA connection failed earlier and is not used again")]
    Broken,
    /// The parent's page server answered `RdmaUnavailable`, with its reason.
    #[error("parent: {0}")]
    ParentHasNoRdma(String),
    /// Reaching or authenticating with the parent's page server, or its answer, failed.
    #[error("parent: {0}")]
    Parent(#[from] crate::client::ClientError),
}

/// An error and its sources, one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

fn verbs<E: std::error::Error + 'static>(op: &'static str) -> impl FnOnce(E) -> RdmaError {
    move |e| RdmaError::Verbs {
        op,
        detail: chain(&e),
    }
}

/// An opened RDMA device and the active port this node uses.
#[derive(Clone)]
pub struct RdmaDevice {
    ctx: Arc<DeviceContext>,
    name: String,
    port: u8,
    gid_index: u8,
    gid: [u8; 16],
    lid: u16,
    /// Active MTU as `ibv_mtu`.
    mtu: u8,
    /// READs this device lets one queue pair have outstanding (initiator, responder).
    rd_atom: (u8, u8),
}

impl fmt::Debug for RdmaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdmaDevice")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("gid_index", &self.gid_index)
            .field("lid", &self.lid)
            .field("mtu", &self.mtu)
            .finish_non_exhaustive()
    }
}

impl RdmaDevice {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> u8 {
        self.port
    }

    pub fn gid(&self) -> [u8; 16] {
        self.gid
    }

    pub fn lid(&self) -> u16 {
        self.lid
    }

    fn qp_info(&self, qp: &BasicQueuePair, psn: u32) -> QpInfo {
        QpInfo {
            gid: self.gid,
            lid: self.lid,
            qp_num: qp.qp_number(),
            psn,
            mtu: self.mtu,
        }
    }
}

/// Asks the verbs library for a device with an active port, without the sysfs check of
/// [`probe`] (which is what callers want; this is for tests and diagnostics).
pub fn probe_verbs() -> Result<RdmaDevice, NoRdma> {
    let list = DeviceList::new().map_err(|e| NoRdma::DeviceList {
        errno: Errno(match &e.0 {
            GetDeviceListErrorKind::Ibverbs(io) => io.raw_os_error().unwrap_or(0),
            _ => 0,
        }),
    })?;
    if list.is_empty() {
        return Err(NoRdma::NoDevice);
    }
    let mut checked = Vec::new();
    for dev in &list {
        let name = dev.name();
        match open_port(&name, || dev.open()) {
            Ok(Some(found)) => {
                info!(device = %found.name, port = found.port, "RDMA device found");
                return Ok(found);
            }
            Ok(None) => checked.push(format!("{name}: no active port")),
            Err(why) => checked.push(why.to_string()),
        }
    }
    Err(NoRdma::NoActivePort {
        checked: checked.join("; "),
    })
}

/// Opens a device and picks its first active port.
fn open_port<E: std::error::Error + 'static>(
    name: &str,
    open: impl FnOnce() -> Result<Arc<DeviceContext>, E>,
) -> Result<Option<RdmaDevice>, NoRdma> {
    let fail = |what: &'static str| {
        move |e: &(dyn std::error::Error + 'static)| NoRdma::Device {
            device: name.to_string(),
            what,
            detail: chain(e),
        }
    };
    let ctx = open().map_err(|e| fail("open")(&e))?;
    let attr = ctx.query_device().map_err(|e| fail("query device")(&e))?;
    let rd_atom = (
        attr.max_qp_init_rd_atom().clamp(1, MAX_RD_ATOMIC) as u8,
        attr.max_qp_rd_atom().clamp(1, MAX_RD_ATOMIC) as u8,
    );
    for port in 1..=attr.phys_port_cnt() {
        let pa = ctx.query_port(port).map_err(|e| fail("query port")(&e))?;
        if pa.port_state() != PortState::Active {
            debug!(device = name, port, state = ?pa.port_state(), "port not active");
            continue;
        }
        let (gid_index, gid) = pick_gid(&ctx, port).map_err(|e| fail("query GID")(&*e))?;
        return Ok(Some(RdmaDevice {
            name: name.to_string(),
            port,
            gid_index,
            gid,
            lid: pa.lid(),
            mtu: pa.active_mtu() as u32 as u8,
            rd_atom,
            ctx,
        }));
    }
    Ok(None)
}

/// The GID to address this port by: a routable one if the table has it (RoCEv2 over IP),
/// else the first non-zero one, else index 0 (InfiniBand, where the LID routes).
fn pick_gid(
    ctx: &Arc<DeviceContext>,
    port: u8,
) -> Result<(u8, [u8; 16]), Box<dyn std::error::Error>> {
    if let Ok(table) = ctx.query_gid_table() {
        let on_port: Vec<_> = table
            .iter()
            .filter(|g| g.port_num() == u32::from(port) && !g.gid().is_zero())
            .collect();
        let best = on_port
            .iter()
            .find(|g| !g.gid().is_unicast_link_local())
            .or(on_port.first());
        if let Some(g) = best
            && let Ok(index) = u8::try_from(g.gid_index())
        {
            return Ok((index, g.gid().raw));
        }
    }
    Ok((0, ctx.query_gid(port, 0)?.raw))
}

/// A fresh 24-bit starting PSN (not a secret: it only keeps stale packets out).
fn fresh_psn() -> u32 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (h.finish() & 0x00ff_ffff) as u32
}

/// A memory mapping owned by this value; unmapped on drop.
struct Mapping {
    ptr: NonNull<c_void>,
    len: usize,
}

// SAFETY: plain memory owned by this value, like a Box<[u8]>; it hands out only its address,
// whose users (the NIC, and `RdmaSource` under its mutex) synchronise themselves.
unsafe impl Send for Mapping {}
// SAFETY: as above; &Mapping gives nothing but the address and length.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn anonymous(len: usize) -> Result<Self, RdmaError> {
        let size = NonZeroUsize::new(len).ok_or(RdmaError::BadImage { len: 0 })?;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing cannot
        // overlap anything.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }
        .map_err(|e| RdmaError::Map {
            what: "the staging buffer",
            source: e.into(),
        })?;
        Ok(Mapping { ptr, len })
    }

    /// A read-only shared mapping of `len` bytes of the image memfd: the pages the NIC
    /// reads are the page cache pages of the sealed image, not a copy.
    fn image(fd: BorrowedFd<'_>, len: u64) -> Result<Self, RdmaError> {
        let bad = RdmaError::BadImage { len };
        let size = usize::try_from(len)
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or(bad)?;
        // SAFETY: a new shared read-only mapping at an address of the kernel's choosing; a
        // sealed memfd cannot shrink under it (the registry only publishes sealed images).
        let ptr = unsafe {
            mmap(
                None,
                size,
                ProtFlags::PROT_READ,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }
        .map_err(|e| RdmaError::Map {
            what: "the image",
            source: e.into(),
        })?;
        Ok(Mapping {
            ptr,
            len: size.get(),
        })
    }

    fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours; every memory region over it is deregistered first
        // (field order of its owners) and nothing else borrows it past this value.
        if let Err(e) = unsafe { munmap(self.ptr, self.len) } {
            warn!("munmap: {e}");
        }
    }
}

/// A completion queue and an RC queue pair on it, in INIT with `access`.
fn new_qp(
    dev: &RdmaDevice,
    pd: &Arc<ProtectionDomain>,
    depth: u32,
    access: AccessFlags,
) -> Result<(Arc<BasicCompletionQueue>, BasicQueuePair), RdmaError> {
    let cq = dev
        .ctx
        .create_cq_builder()
        .setup_cqe(depth * 2)
        .build()
        .map_err(verbs("create CQ"))?;
    let mut qp = pd
        .create_qp_builder()
        .setup_send_cq(Arc::clone(&cq))
        .setup_recv_cq(Arc::clone(&cq))
        .setup_max_send_wr(depth)
        .setup_max_recv_wr(1)
        .build()
        .map_err(verbs("create QP"))?;
    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::Init)
        .setup_pkey_index(0)
        .setup_port(dev.port)
        .setup_access_flags(access);
    qp.modify(&attr).map_err(verbs("QP to INIT"))?;
    Ok((cq, qp))
}

/// INIT → RTR → RTS towards `remote`. `initiator`/`responder`: outstanding READs this side
/// issues / answers.
fn connect_qp(
    qp: &mut BasicQueuePair,
    dev: &RdmaDevice,
    local_psn: u32,
    remote: &QpInfo,
    initiator: u8,
    responder: u8,
) -> Result<(), RdmaError> {
    // Both MTUs passed `check_qp` (1..=5), so the conversion cannot panic.
    let mtu = Mtu::from(u32::from(dev.mtu.min(remote.mtu)));
    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::ReadyToReceive)
        .setup_path_mtu(mtu)
        .setup_dest_qp_num(remote.qp_num)
        .setup_rq_psn(remote.psn)
        .setup_max_dest_read_atomic(responder)
        .setup_min_rnr_timer(12);
    let mut ah = AddressHandleAttribute::new();
    ah.setup_dest_lid(remote.lid)
        .setup_port(dev.port)
        .setup_service_level(0);
    if remote.gid != [0; 16] {
        ah.setup_grh_dest_gid(&Gid { raw: remote.gid })
            .setup_grh_src_gid_index(dev.gid_index)
            .setup_grh_hop_limit(64);
    }
    attr.setup_address_vector(&ah);
    qp.modify(&attr).map_err(verbs("QP to RTR"))?;

    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::ReadyToSend)
        .setup_sq_psn(local_psn)
        .setup_timeout(14)
        .setup_retry_cnt(7)
        .setup_rnr_retry(7)
        .setup_max_read_atomic(initiator);
    qp.modify(&attr).map_err(verbs("QP to RTS"))
}

/// The parent's side: its image mapping registered for remote READ, and the queue pairs
/// children connect with.
pub struct RdmaExport {
    // Field order is drop order: the region is deregistered before the mapping goes.
    mr: Arc<MemoryRegion>,
    pd: Arc<ProtectionDomain>,
    dev: RdmaDevice,
    image: Mapping,
}

impl RdmaExport {
    /// Probes for a device and exports `len` bytes of the sealed image memfd `image`.
    pub fn open(image: BorrowedFd<'_>, len: u64) -> Result<Self, RdmaError> {
        let dev = probe()?;
        Self::open_on(&dev, image, len)
    }

    /// Exports the image on `dev`: maps it read-only and registers it with `REMOTE_READ`
    /// only (no local write: the mapping is read-only and the NIC must never write it).
    pub fn open_on(dev: &RdmaDevice, image: BorrowedFd<'_>, len: u64) -> Result<Self, RdmaError> {
        if len == 0 || !len.is_multiple_of(PAGE_SIZE as u64) {
            return Err(RdmaError::BadImage { len });
        }
        let image = Mapping::image(image, len)?;
        let pd = dev.ctx.alloc_pd().map_err(verbs("allocate PD"))?;
        // SAFETY: the mapping is valid for `image.len` bytes and outlives the region (field
        // order above); it is read-only, and the region grants remote read only.
        let mr = unsafe { pd.reg_mr(image.addr() as usize, image.len, AccessFlags::RemoteRead) }
            .map_err(verbs("register the image"))?;
        info!(
            device = dev.name(),
            bytes = len,
            "image exported for RDMA READ"
        );
        Ok(RdmaExport {
            mr,
            pd,
            dev: dev.clone(),
            image,
        })
    }

    /// What a child needs to READ the image.
    pub fn region(&self) -> RegionInfo {
        RegionInfo {
            remote_addr: self.image.addr(),
            rkey: self.mr.rkey(),
            len: self.image.len as u64,
        }
    }

    /// Wires one child's queue pair `remote` (from its `RdmaConnect` on the page server) and
    /// returns ours, already in RTS: the child may READ as soon as it has the answer. The
    /// page-server connection that asked must own the returned value for as long as it
    /// lives (dropping it destroys the queue pair).
    pub fn accept_qp(&self, remote: &QpInfo) -> Result<(ParentConn, QpInfo), RdmaError> {
        check_qp(remote)?;
        let (cq, mut qp) = new_qp(&self.dev, &self.pd, 1, AccessFlags::RemoteRead)?;
        let psn = fresh_psn();
        let local = self.dev.qp_info(&qp, psn);
        // The parent issues nothing; it answers up to the device's responder limit.
        connect_qp(&mut qp, &self.dev, psn, remote, 1, self.dev.rd_atom.1)?;
        debug!(child_qp = remote.qp_num, "child queue pair connected");
        Ok((ParentConn { qp, _cq: cq }, local))
    }
}

/// One child's queue pair on the parent. Dropping it disconnects the child.
pub struct ParentConn {
    qp: BasicQueuePair,
    _cq: Arc<BasicCompletionQueue>,
}

impl ParentConn {
    pub fn qp_num(&self) -> u32 {
        self.qp.qp_number()
    }
}

/// The child's queue pair and staging buffer, used by one fetch at a time.
struct ChildConn {
    // Field order is drop order: the queue pair stops before the buffer is deregistered and
    // unmapped, so a READ still in flight after a failure never lands in freed memory.
    qp: BasicQueuePair,
    cq: Arc<BasicCompletionQueue>,
    staging_mr: Arc<MemoryRegion>,
    _pd: Arc<ProtectionDomain>,
    staging: Mapping,
    /// The authenticated page-server connection the queue pairs were set up on: the parent
    /// tears its queue pair down when it closes.
    _control: PageClient,
    broken: bool,
}

/// Pages of a remote image, read by one-sided RDMA READ from the parent's registered region.
pub struct RdmaSource {
    conn: Mutex<ChildConn>,
    nonzero: PageBitmap,
    region: RegionInfo,
    len: u64,
}

impl RdmaSource {
    /// Connects to the page server of `descriptor.parent` on `dev`: authenticates with the
    /// descriptor's key, sends our queue pair in `RdmaConnect` and, on `RdmaAccept`, READs
    /// from the region it names. The authenticated connection is the queue pairs' control
    /// channel and lives as long as the source. A parent without RDMA gives
    /// [`RdmaError::ParentHasNoRdma`] with its reason. `timeout` bounds the connect and each
    /// round trip. `nonzero` is the image's page map: zero pages are never read.
    pub fn connect_parent(
        dev: &RdmaDevice,
        descriptor: &proto::ImageDescriptor,
        nonzero: PageBitmap,
        timeout: Duration,
    ) -> Result<Self, RdmaError> {
        let local = ChildSide::new(dev, &nonzero)?;
        let mut client = PageClient::connect(descriptor, timeout)?;
        match client.rdma_connect(local.info(dev))? {
            RdmaAnswer::Unavailable(reason) => Err(RdmaError::ParentHasNoRdma(reason)),
            // The parent's queue pair is in RTS before it answers: no Ready step.
            RdmaAnswer::Accept { qp, region } => local.finish(dev, &qp, region, nonzero, client),
        }
    }
}

/// A child's resources before the exchange: its queue pair in INIT and the staging buffer.
struct ChildSide {
    qp: BasicQueuePair,
    cq: Arc<BasicCompletionQueue>,
    staging_mr: Arc<MemoryRegion>,
    pd: Arc<ProtectionDomain>,
    staging: Mapping,
    psn: u32,
    len: u64,
}

impl ChildSide {
    fn new(dev: &RdmaDevice, nonzero: &PageBitmap) -> Result<Self, RdmaError> {
        let len = nonzero
            .pages()
            .checked_mul(PAGE_SIZE as u64)
            .ok_or(RdmaError::BadImage { len: u64::MAX })?;
        let pd = dev.ctx.alloc_pd().map_err(verbs("allocate PD"))?;
        let staging = Mapping::anonymous(STAGING_BYTES)?;
        // SAFETY: the staging mapping is valid for its length and outlives the region (field
        // order of ChildConn); only the NIC (local write) and the locked fetch touch it.
        let staging_mr = unsafe {
            pd.reg_mr(
                staging.addr() as usize,
                staging.len,
                AccessFlags::LocalWrite,
            )
        }
        .map_err(verbs("register the staging buffer"))?;
        let (cq, qp) = new_qp(dev, &pd, QUEUE_DEPTH, AccessFlags::LocalWrite)?;
        Ok(ChildSide {
            qp,
            cq,
            staging_mr,
            pd,
            staging,
            psn: fresh_psn(),
            len,
        })
    }

    fn info(&self, dev: &RdmaDevice) -> QpInfo {
        dev.qp_info(&self.qp, self.psn)
    }

    /// Checks the parent's answer and moves our queue pair to RTR/RTS towards it.
    fn finish(
        self,
        dev: &RdmaDevice,
        remote: &QpInfo,
        region: RegionInfo,
        nonzero: PageBitmap,
        control: PageClient,
    ) -> Result<RdmaSource, RdmaError> {
        let ChildSide {
            mut qp,
            cq,
            staging_mr,
            pd,
            staging,
            psn,
            len,
        } = self;
        // Decoding the answer checked both already; again here, where they are used.
        check_qp(remote)?;
        check_region(&region)?;
        if region.len < len {
            return Err(RdmaError::RegionTooSmall {
                region: region.len,
                image: len,
            });
        }
        // The child issues READs and answers none.
        connect_qp(&mut qp, dev, psn, remote, dev.rd_atom.0, 0)?;
        info!(
            parent_qp = remote.qp_num,
            bytes = len,
            "pages over RDMA READ"
        );
        Ok(RdmaSource {
            conn: Mutex::new(ChildConn {
                qp,
                cq,
                staging_mr,
                _pd: pd,
                staging,
                _control: control,
                broken: false,
            }),
            nonzero,
            region,
            len,
        })
    }
}

impl ChildConn {
    /// Posts `batch` (each with its staging offset) and waits for every completion.
    fn read_batch(
        &mut self,
        batch: &[(super::plan::ReadRequest, u64)],
        timeout: Duration,
    ) -> Result<(), RdmaError> {
        let mut guard = self.qp.start_post_send();
        for (i, (rd, off)) in batch.iter().enumerate() {
            let wr = guard
                .construct_wr(i as u64, WorkRequestFlags::Signaled)
                .setup_read(rd.rkey, rd.remote_addr);
            // SAFETY: `off + length` lies inside the registered staging buffer (the caller
            // packs batches within it), which outlives every READ: each is completed below,
            // or the connection is marked broken and the buffer is freed only after the queue
            // pair is destroyed.
            unsafe { wr.setup_sge(self.staging_mr.lkey(), self.staging.addr() + off, rd.length) };
        }
        guard.post().map_err(verbs("post READs"))?;

        let deadline = Instant::now() + timeout;
        let mut done = 0;
        while done < batch.len() {
            match self.cq.start_poll() {
                Ok(poller) => {
                    for wc in poller {
                        if wc.status() != WorkCompletionStatus::Success as u32 {
                            return Err(RdmaError::Completion {
                                wr_id: wc.wr_id(),
                                status: wc.status(),
                                vendor_err: wc.vendor_err(),
                            });
                        }
                        done += 1;
                    }
                }
                Err(PollCompletionQueueError::CompletionQueueEmpty) => {
                    if Instant::now() >= deadline {
                        return Err(RdmaError::CompletionTimeout(timeout));
                    }
                    std::hint::spin_loop();
                }
                Err(e) => return Err(verbs("poll CQ")(e)),
            }
        }
        Ok(())
    }

    /// Reads `reads` into `dst` through the staging buffer, batch by batch.
    fn read_into(
        &mut self,
        reads: &[super::plan::ReadRequest],
        dst: &mut [u8],
    ) -> Result<(), RdmaError> {
        let mut batch = Vec::with_capacity(QUEUE_DEPTH as usize);
        let mut rest = reads;
        while !rest.is_empty() {
            batch.clear();
            let mut used = 0u64;
            while let Some(rd) = rest.first() {
                let len = u64::from(rd.length);
                if batch.len() == QUEUE_DEPTH as usize
                    || (used + len > self.staging.len as u64 && !batch.is_empty())
                {
                    break;
                }
                batch.push((*rd, used));
                used += len;
                rest = &rest[1..];
            }
            self.read_batch(&batch, COMPLETION_TIMEOUT)?;
            // SAFETY: every READ of the batch completed successfully; the staging buffer is
            // ours under the fetch lock and `used` bytes of it were written.
            let staging = unsafe {
                std::slice::from_raw_parts(self.staging.ptr.as_ptr().cast::<u8>(), used as usize)
            };
            for (rd, off) in &batch {
                let (off, at, n) = (*off as usize, rd.local_offset as usize, rd.length as usize);
                dst[at..at + n].copy_from_slice(&staging[off..off + n]);
            }
        }
        Ok(())
    }
}

impl PageSource for RdmaSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn is_zero(&self, page: u64) -> bool {
        self.nonzero.is_clear(page)
    }

    fn fetch(&self, first_page: u64, count: u32, dst: &mut [u8]) -> Result<(), FetchError> {
        crate::check_fetch(self.nonzero.pages(), first_page, count, dst)?;
        let max_read = MAX_READ_BYTES.min(STAGING_BYTES as u32);
        let reads = plan_reads(&self.region, &self.nonzero, first_page, count, max_read)
            .map_err(|e| FetchError::Unavailable(e.to_string()))?;
        for (i, page) in dst.chunks_mut(PAGE_SIZE).enumerate() {
            if !self.nonzero.is_set(first_page + i as u64) {
                page.fill(0);
            }
        }
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if conn.broken {
            return Err(FetchError::Unavailable(RdmaError::Broken.to_string()));
        }
        conn.read_into(&reads, dst).map_err(|e| {
            // A failed or timed-out READ leaves the queue pair in error (or a READ in
            // flight): never post on it again.
            conn.broken = true;
            warn!("RDMA fetch of pages {first_page}..+{count}: {e}");
            FetchError::Unavailable(e.to_string())
        })
    }
}
