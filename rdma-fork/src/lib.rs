//! Remote fork of warm Wasm instances, MITOSIS-style: a child instance on another node starts
//! with an empty linear memory whose pages are fetched from the parent's image on first touch.
//!
//! This crate owns the memory side of a remote fork:
//!
//! - **Page sources** ([`PageSource`]): where a child's pages come from. [`MemfdSource`] reads
//!   a sealed memfd image on this node; the page client ([`client`]) fetches from the parent
//!   node.
//! - **Lazy pages** ([`lazy`]): a userfaultfd registered over the child's linear memory and a
//!   handler thread that answers each missing-page fault with `UFFDIO_COPY` (data, with
//!   readahead) or `UFFDIO_ZEROPAGE` (pages the image knows are zero), either inside the
//!   child ([`LazyRegion`]) or, Firecracker-style, in the node service on a userfaultfd the
//!   sandboxed child handed over a Unix socket ([`handoff`], [`serve_faults`]).
//! - **The page server** ([`registry`], [`server`]): the images a node publishes, under random
//!   handle ids and per-handle keys with leases, and the TCP server that serves their pages
//!   to authenticated children ([`proto::pages`]); and the client ([`client`]) a child's node
//!   fetches them with.
//! - **RDMA** (`rdma`, behind the `rdma` feature): one-sided RDMA READ of the parent's
//!   registered image, chosen by [`transport::rdma_pages`] with TCP as the fallback; the
//!   page server registers images and connects children's queue pairs on an authenticated
//!   connection's `RdmaConnect` ([`server::ServerRdma`]).
//!
//! It must not build Wasm instances or capture their state (`chain-runtime` does: it hands
//! this crate a memory region and an image) and must not route requests (the gateway does).
//!
//! Two kernel facts shape the design (see `lazy`): the userfaultfd is never user-mode-only
//! (WASI host calls read guest memory from the kernel and must be served, not get `EFAULT`)
//! and never in SIGBUS mode (wasmer's trap handler would take the SIGBUS for a guest trap).

pub mod cache;
pub mod client;
pub mod handoff;
pub mod lazy;
pub mod lifecycle;
pub mod measure;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod registry;
pub mod remote;
pub mod server;
pub mod source;
mod wire;

/// Which page transport a child's node uses, decided once at start-up so that the decision
/// and, above all, the reason for falling back to TCP can be logged and shown (`/readyz`,
/// `/metrics`). Not feature-gated: a build without `rdma` still answers, with its reason.
pub mod transport {
    use std::fmt;

    /// What the operator asked for.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum TransportPref {
        /// Pages over the TCP page server only.
        Tcp,
        /// One-sided RDMA READ when a usable device is present, TCP otherwise.
        Rdma,
    }

    /// The transport in force.
    #[derive(Debug)]
    pub enum Transport {
        Tcp,
        /// An opened RDMA device with an active port.
        #[cfg(feature = "rdma")]
        Rdma(crate::rdma::RdmaDevice),
    }

    impl Transport {
        /// A short label for logs and metrics: `tcp` or `rdma`.
        pub fn label(&self) -> &'static str {
            match self {
                Transport::Tcp => "tcp",
                #[cfg(feature = "rdma")]
                Transport::Rdma(_) => "rdma",
            }
        }
    }

    /// An errno shown with its text: `95 (Operation not supported)`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Errno(pub i32);

    impl fmt::Display for Errno {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let text = std::io::Error::from_raw_os_error(self.0).to_string();
            // io::Error appends " (os error N)"; show the number once.
            let text = text.split(" (os error").next().unwrap_or("");
            write!(f, "{} ({text})", self.0)
        }
    }

    /// Why no RDMA device can be used on this node, in the words an operator needs.
    #[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
    #[non_exhaustive]
    pub enum NoRdma {
        #[error(
            "no RDMA device: /sys/class/infiniband does not exist (no RDMA driver or soft-RoCE loaded)"
        )]
        NoSysfs,
        #[error("no RDMA device: listing devices failed with errno {errno}")]
        DeviceList { errno: Errno },
        #[error("no RDMA device: the device list is empty")]
        NoDevice,
        #[error("RDMA device {device}: {what} failed: {detail}")]
        Device {
            device: String,
            what: &'static str,
            detail: String,
        },
        #[error("no RDMA device has an active port (checked: {checked})")]
        NoActivePort { checked: String },
    }

    /// Why [`choose`] (or [`rdma_pages`]) fell back to TCP.
    #[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
    #[non_exhaustive]
    pub enum Fallback {
        #[error("built without the rdma feature")]
        NotBuilt,
        #[error(transparent)]
        Unavailable(#[from] NoRdma),
        #[error(
            "the image descriptor carries no RDMA region (the parent did not register its image)"
        )]
        NoRegion,
        /// The parent's page server answered `RdmaUnavailable`: its reason.
        #[error("parent: {0}")]
        ParentHasNoRdma(String),
        #[error("setting up RDMA with the parent failed: {0}")]
        Setup(String),
    }

    /// A page source reading `descriptor`'s image by one-sided RDMA READ, when RDMA is
    /// `requested`, built in, the descriptor says the parent has RDMA, a device is usable
    /// here and the parent accepts; otherwise why not, for the caller to log and use TCP.
    /// The checks run in that order: local ones first (no connection is opened for a child
    /// that could not use RDMA anyway), then the parent's answer. The queue pairs are wired
    /// over an authenticated page-server connection (`RdmaConnect`, see [`proto::pages`]),
    /// which then lives as long as the source; `nonzero` is the image's page map (zero
    /// pages are never read).
    pub fn rdma_pages(
        requested: TransportPref,
        descriptor: &proto::ImageDescriptor,
        nonzero: &proto::PageBitmap,
        timeout: std::time::Duration,
    ) -> Result<std::sync::Arc<dyn crate::PageSource>, Option<Fallback>> {
        if requested == TransportPref::Tcp {
            return Err(None);
        }
        if descriptor.rdma.is_none() {
            return Err(Some(Fallback::NoRegion));
        }
        // Without the feature only the TCP arm exists and these go unused.
        let _ = (nonzero, timeout);
        match choose(requested) {
            (Transport::Tcp, why) => Err(why),
            #[cfg(feature = "rdma")]
            (Transport::Rdma(dev), _) => {
                crate::rdma::RdmaSource::connect_parent(&dev, descriptor, nonzero.clone(), timeout)
                    .map(|s| std::sync::Arc::new(s) as std::sync::Arc<dyn crate::PageSource>)
                    .map_err(|e| {
                        let why = setup_fallback(e);
                        tracing::warn!(parent = %descriptor.parent, "RDMA set-up: {why}");
                        Some(why)
                    })
            }
        }
    }

    /// The fallback for an RDMA set-up with the parent that failed: the parent's own reason
    /// when it has no RDMA, else what went wrong.
    #[cfg(feature = "rdma")]
    pub fn setup_fallback(e: crate::rdma::RdmaError) -> Fallback {
        match e {
            crate::rdma::RdmaError::ParentHasNoRdma(reason) => Fallback::ParentHasNoRdma(reason),
            e => Fallback::Setup(e.to_string()),
        }
    }

    /// The transport for `requested`, and why it is TCP when RDMA was asked for. Asking for
    /// TCP gives TCP and no reason.
    pub fn choose(requested: TransportPref) -> (Transport, Option<Fallback>) {
        match requested {
            TransportPref::Tcp => (Transport::Tcp, None),
            TransportPref::Rdma => rdma_or_fallback(),
        }
    }

    #[cfg(feature = "rdma")]
    fn rdma_or_fallback() -> (Transport, Option<Fallback>) {
        match crate::rdma::probe() {
            Ok(dev) => {
                tracing::info!(device = dev.name(), port = dev.port(), "pages over RDMA");
                (Transport::Rdma(dev), None)
            }
            Err(why) => {
                tracing::warn!("RDMA requested, falling back to TCP: {why}");
                (Transport::Tcp, Some(Fallback::Unavailable(why)))
            }
        }
    }

    #[cfg(not(feature = "rdma"))]
    fn rdma_or_fallback() -> (Transport, Option<Fallback>) {
        tracing::warn!("RDMA requested, falling back to TCP: built without the rdma feature");
        (Transport::Tcp, Some(Fallback::NotBuilt))
    }
}

pub use cache::{CacheError, CacheStats, CachedSource, NodeCache, PurgeReason};
pub use handoff::{
    Handoff, HandoffError, ReceivedFds, recv_uffd, recv_with_fds, send_uffd, send_with_fds,
};
pub use lazy::{
    AnonRegion, FaultLog, FaultServer, LazyError, LazyRegion, PidFd, Prefetch, ServeOptions,
    Served, Stats, StatsSnapshot, StopReason, create_uffd, discard, register_region, serve_faults,
};
pub use measure::{resident_pages, smaps_rss_kib};
pub use remote::RemoteSource;
pub use source::{MemfdSource, PageBitmap, SourceError};
/// What [`create_uffd`] returns, for callers that make one ahead of its use.
pub use userfaultfd::Uffd;

/// The page size everything here works in: the kernel's base page on x86-64 and most arm64
/// configurations. [`lazy`] checks it against the running system.
pub const PAGE_SIZE: usize = 4096;

/// Where a lazily forked child's pages come from. Implementations must be cheap to call from
/// the fault-handler thread and must never panic on what they read: a failure is a
/// [`FetchError`], which the handler turns into its fault-error policy (see [`lazy`]).
pub trait PageSource: Send + Sync {
    /// Bytes per page; must equal [`PAGE_SIZE`].
    fn page_size(&self) -> usize {
        PAGE_SIZE
    }

    /// Length of the image in bytes, a multiple of [`page_size`](Self::page_size).
    fn len(&self) -> u64;

    /// True when the image is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when `page` is known to be all zero. Such pages are answered with
    /// `UFFDIO_ZEROPAGE` and never fetched. Pages out of range are not zero.
    fn is_zero(&self, page: u64) -> bool;

    /// Fills `dst` (exactly `count * page_size()` bytes) with pages
    /// `first_page .. first_page + count`.
    fn fetch(&self, first_page: u64, count: u32, dst: &mut [u8]) -> Result<(), FetchError>;
}

/// The request checks every [`PageSource::fetch`] makes first: the pages exist in an image
/// of `pages` pages and `dst` holds exactly `count` of them.
pub fn check_fetch(pages: u64, first_page: u64, count: u32, dst: &[u8]) -> Result<(), FetchError> {
    if first_page
        .checked_add(u64::from(count))
        .is_none_or(|end| end > pages)
    {
        return Err(FetchError::OutOfRange {
            first_page,
            count,
            pages,
        });
    }
    let need = u64::from(count) * PAGE_SIZE as u64;
    if dst.len() as u64 != need {
        return Err(FetchError::BadBuffer {
            count,
            need,
            got: dst.len(),
        });
    }
    Ok(())
}

/// Why a [`PageSource`] could not deliver pages.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    #[error("pages {first_page}..+{count} are outside the image of {pages} pages")]
    OutOfRange {
        first_page: u64,
        count: u32,
        pages: u64,
    },
    #[error("destination holds {got} bytes, {count} pages need {need}")]
    BadBuffer { count: u32, need: u64, got: usize },
    #[error("the image ends early, at byte {offset}")]
    ShortRead { offset: u64 },
    #[error("reading the image: {0}")]
    Io(#[from] std::io::Error),
    #[error("page source unavailable: {0}")]
    Unavailable(String),
    /// The parent refused the pages (the image was revoked, expired, ...).
    #[error("the parent refused ({reason:?}): {message}")]
    Refused {
        reason: proto::pages::RefuseReason,
        message: String,
    },
}
