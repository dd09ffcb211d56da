//! Resuming an instance from a remote image (`fork_resume`): the module is compiled on this
//! node (never received: an image names its module by SHA-256), the image's metadata comes
//! from the parent's page server, and linear memory is filled from it — lazily on first
//! touch through userfaultfd, or eagerly before the first call.
//!
//! The fault handler runs on a thread of this process. A fetch that fails answers the fault
//! with zeros and marks the memory failed ([`ResumedMemory::failure`]): whoever runs the
//! instance must check it before letting an answer out, and stop using the instance.
//!
//! With the node's page cache for the image ([`RemoteImage::cache`]) the child still
//! authenticates with the parent first (which renews the lease; a revoked or expired image
//! purges the cache and fails the resume), then reads the pages other children fetched from
//! the cache, puts the ones it fetches there, and logs its faults in the cache's order log,
//! from which later children prefetch ([`RemoteImage::prefetch`]) on a second connection.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use proto::ImageDescriptor;
use proto::pages::MAX_READ_PAGES;
use rdma_fork::cache::{CachedSource, NodeCache, connect_checked};
use rdma_fork::client::ClientError;
use rdma_fork::lazy::{FaultLog, FaultServer, Prefetch, ServeOptions};
use rdma_fork::transport::{TransportPref, rdma_pages};
use rdma_fork::{PageSource, RemoteSource};

use crate::host::CompiledModule;
use crate::instance::{Instance, InstanceBuilder, InstanceError};
use crate::snapshot::{MemoryFill, MemoryRegion, SnapshotError, SnapshotMeta};

/// How to resume from a remote image.
#[derive(Debug, Clone)]
pub struct RemoteImage {
    pub descriptor: ImageDescriptor,
    /// Fetch every page that holds data before the first call, without userfaultfd.
    pub eager: bool,
    /// Pages fetched along with each faulting page (lazy only; 0: only what is touched).
    pub readahead: u32,
    /// For connecting, authenticating and each answer of the parent.
    pub timeout: Duration,
    /// This node's page cache for the image, when the node keeps one.
    pub cache: Option<Arc<NodeCache>>,
    /// Put the pages this child fetches into `cache` for later children (off: read its
    /// hits and log faults only).
    pub fill_cache: bool,
    /// Lazy only, with `cache`: install the pages earlier children faulted, in their order,
    /// ahead of this child's faults, over a second connection to the parent.
    pub prefetch: bool,
    /// Pages by RDMA READ when asked for and possible, otherwise TCP
    /// ([`ResumedMemory::transport_fallback`] says why).
    pub transport: TransportPref,
}

impl RemoteImage {
    /// Lazy, no readahead, no cache, TCP.
    pub fn new(descriptor: ImageDescriptor, timeout: Duration) -> Self {
        RemoteImage {
            descriptor,
            eager: false,
            readahead: 0,
            timeout,
            cache: None,
            fill_cache: true,
            prefetch: false,
            transport: TransportPref::Tcp,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("the image is of another module than {module} (its SHA-256 differs)")]
    ForeignModule { module: String },
    #[error("connecting to the parent: {0}")]
    Connect(ClientError),
    #[error("fetching the image metadata: {0}")]
    Meta(ClientError),
    #[error("the parent's image metadata: {0}")]
    BadMeta(#[from] proto::MetaError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("the node page cache: {0}")]
    Cache(#[from] rdma_fork::CacheError),
}

/// Microseconds from the start of the resume (the module compile is not part of it).
#[derive(Debug, Clone, Copy, Default)]
pub struct ResumeTimings {
    pub connect_and_authenticate_us: u64,
    pub metadata_us: u64,
    pub restored_us: u64,
}

/// What a resumed instance's memory came from and how it is being filled.
pub struct ResumedMemory {
    base: usize,
    len: usize,
    image_nonzero_pages: u64,
    /// The authenticated TCP connection (metadata, and pages unless over RDMA).
    source: Arc<RemoteSource>,
    cached: Option<Arc<CachedSource>>,
    /// The prefetch thread's sources, once it opened them: counted with the demand ones.
    prefetch_source: Arc<OnceLock<PrefetchSources>>,
    faults: Option<FaultServer>,
    eager_pages: u64,
    pub timings: ResumeTimings,
    /// `tcp` or `rdma`: how demand pages travel.
    pub transport: &'static str,
    /// Why pages travel over TCP although RDMA was asked for.
    pub transport_fallback: Option<String>,
}

/// Counters of one resumed memory, final once the handler stopped.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResumeStats {
    pub memory_pages: u64,
    pub image_nonzero_pages: u64,
    pub faults: u64,
    pub pages_copied: u64,
    pub zero_pages: u64,
    pub prefetched: u64,
    pub bytes_fetched: u64,
    pub wire_bytes_received: u64,
    pub round_trips: u64,
    /// Pages read from the node page cache.
    pub cache_hits: u64,
    /// Data pages the cache did not have (fetched from the parent).
    pub cache_misses: u64,
    /// Pages this child put into the cache.
    pub cache_filled: u64,
    /// Pages installed by fault-order prefetch.
    pub order_prefetched: u64,
    /// Installs that found their page present already (prefetch and faults racing).
    pub copy_races: u64,
    /// Bytes the prefetch connection received.
    pub prefetch_wire_bytes_received: u64,
}

impl ResumedMemory {
    /// Why fetching pages failed, once it has: the instance's memory holds zeros where the
    /// parent's data should be, so nothing it computes may be used.
    pub fn failure(&self) -> Option<String> {
        let f = self.faults.as_ref()?;
        if f.failed() {
            Some(f.failure().unwrap_or_default().to_owned())
        } else {
            None
        }
    }

    /// Pages of the memory in place now (installed zero pages included).
    pub fn resident_pages(&self) -> std::io::Result<usize> {
        rdma_fork::resident_pages(self.base as *const u8, self.len)
    }

    /// Pages of the memory that `/proc/self/smaps` charges as `Rss` (data pages installed;
    /// zero pages share the kernel's zero page and are not counted).
    pub fn smaps_rss_pages(&self) -> std::io::Result<u64> {
        Ok(
            rdma_fork::smaps_rss_kib(self.base as *const u8, self.len)? * 1024
                / rdma_fork::PAGE_SIZE as u64,
        )
    }

    fn counters(&self, lazy: Option<rdma_fork::StatsSnapshot>) -> ResumeStats {
        let c = self.source.stats();
        let mut s = ResumeStats {
            memory_pages: (self.len / rdma_fork::PAGE_SIZE) as u64,
            image_nonzero_pages: self.image_nonzero_pages,
            wire_bytes_received: c.bytes_received,
            round_trips: c.round_trips,
            ..ResumeStats::default()
        };
        if let Some(cached) = &self.cached {
            let k = cached.stats();
            (s.cache_hits, s.cache_misses, s.cache_filled) = (k.hits, k.misses, k.pages_filled);
        }
        if let Some(p) = self.prefetch_source.get() {
            s.prefetch_wire_bytes_received = p.remote.stats().bytes_received;
            let k = p.cached.stats();
            s.cache_hits += k.hits;
            s.cache_misses += k.misses;
            s.cache_filled += k.pages_filled;
        }
        match lazy {
            Some(f) => {
                s.faults = f.faults;
                s.pages_copied = f.pages_copied;
                s.zero_pages = f.zero_pages;
                s.prefetched = f.prefetched;
                s.bytes_fetched = f.bytes_fetched;
                s.order_prefetched = f.order_prefetched;
                s.copy_races = f.copy_races;
            }
            None => {
                s.pages_copied = self.eager_pages;
                s.bytes_fetched = self.eager_pages * rdma_fork::PAGE_SIZE as u64;
            }
        }
        s
    }

    /// Counters so far (a readahead window being installed may not be counted yet).
    pub fn stats(&self) -> ResumeStats {
        self.counters(self.faults.as_ref().map(|f| f.stats()))
    }

    /// Stops the fault handler (call once the instance makes no more calls) and returns the
    /// final counters.
    pub fn finish(mut self) -> Result<ResumeStats, rdma_fork::LazyError> {
        let lazy = match self.faults.take() {
            Some(f) => {
                f.stop();
                Some(f.join()?.stats)
            }
            None => None,
        };
        Ok(self.counters(lazy))
    }
}

impl InstanceBuilder {
    /// Resumes this function from a remote image, compiling `module` (its bytes as this
    /// node's config names them) here. Returns the instance and its memory's state, which
    /// must outlive every call into the instance.
    pub fn resume_remote(
        self,
        module: &[u8],
        image: &RemoteImage,
    ) -> Result<(Instance, ResumedMemory), InstanceError> {
        self.resume_remote_into(module, image, None)
    }

    /// [`InstanceBuilder::resume_remote`] with a userfaultfd made earlier (lazy images only;
    /// `None` makes one when it is needed). A process that drops its privileges before it
    /// resumes makes the userfaultfd first: one that catches the kernel's faults on guest
    /// memory too (a `read(2)` into it, say) needs privilege to create, none to use.
    pub fn resume_remote_into(
        self,
        module: &[u8],
        image: &RemoteImage,
        userfaultfd: Option<rdma_fork::Uffd>,
    ) -> Result<(Instance, ResumedMemory), InstanceError> {
        // Checked before compiling too: a foreign image costs no compile.
        self.check_image_module(proto::image::module_hash(module), &image.descriptor)?;
        let compiled = self.compile(module)?;
        self.resume(&compiled, image, userfaultfd)
    }

    /// [`InstanceBuilder::resume_remote`] with the module compiled already
    /// ([`InstanceBuilder::compile`]): how a node resumes every child after its first, since
    /// it compiles each module once. Timings start here.
    pub fn resume_remote_compiled(
        self,
        compiled: &CompiledModule,
        image: &RemoteImage,
    ) -> Result<(Instance, ResumedMemory), InstanceError> {
        self.resume(compiled, image, None)
    }

    fn resume(
        self,
        compiled: &CompiledModule,
        image: &RemoteImage,
        mut premade_uffd: Option<rdma_fork::Uffd>,
    ) -> Result<(Instance, ResumedMemory), InstanceError> {
        self.check_image_module(*compiled.sha256(), &image.descriptor)?;
        let started = Instant::now();
        let us = |t: Instant| t.elapsed().as_micros() as u64;
        let d = &image.descriptor;
        let cache = image.cache.as_deref();
        let mut client = connect_checked(d, image.timeout, cache).map_err(ResumeError::Connect)?;
        let mut timings = ResumeTimings {
            connect_and_authenticate_us: us(started),
            ..ResumeTimings::default()
        };
        let wire = client.meta().map_err(ResumeError::Meta)?;
        let wire = proto::ImageMeta::decode(&wire).map_err(ResumeError::BadMeta)?;
        let meta = SnapshotMeta::from_image_meta(&wire, self.wasi_layout())
            .map_err(ResumeError::Snapshot)?;
        timings.metadata_us = us(started);
        let source = Arc::new(
            RemoteSource::from_client(client, wire.nonzero.clone())
                .reconnecting(d.clone(), image.timeout),
        );
        let (pages, transport, transport_fallback): (Arc<dyn PageSource>, _, _) =
            match rdma_pages(image.transport, d, &wire.nonzero, image.timeout) {
                Ok(rdma) => (rdma, "rdma", None),
                Err(why) => {
                    let why = why.map(|w| w.to_string());
                    if let Some(why) = &why {
                        tracing::warn!(parent = %d.parent, "pages over TCP: {why}");
                    }
                    (source.clone(), "tcp", why)
                }
            };
        let cached = match &image.cache {
            Some(cache) => {
                let c =
                    CachedSource::new(cache.clone(), pages.clone()).map_err(ResumeError::Cache)?;
                Some(Arc::new(if image.fill_cache {
                    c
                } else {
                    c.without_fill()
                }))
            }
            None => None,
        };
        let pages: Arc<dyn PageSource> = match &cached {
            Some(c) => c.clone(),
            None => pages,
        };
        let prefetch_source = Arc::new(OnceLock::new());

        let mut region = None;
        let mut faults = None;
        let mut eager_pages = 0u64;
        let mut fill = |r: MemoryRegion| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            region = Some((r.base().as_ptr() as usize, r.len()));
            if image.eager {
                // SAFETY: the region is the child's linear memory, freshly mapped, writable
                // and unaliased during the callback (the contract of MemoryFill::Caller).
                let memory = unsafe { std::slice::from_raw_parts_mut(r.base().as_ptr(), r.len()) };
                eager_pages = fetch_all(pages.as_ref(), memory)?;
                return Ok(());
            }
            let uffd = match premade_uffd.take() {
                Some(uffd) => uffd,
                None => rdma_fork::create_uffd()?,
            };
            // SAFETY: the region is the child's linear memory, freshly mapped and untouched,
            // and stays mapped for the instance's life; the fault server below answers
            // every fault in it.
            unsafe { rdma_fork::register_region(&uffd, r.base(), r.len())? };
            let options = ServeOptions {
                readahead: image.readahead,
                fault_log: image.cache.clone().map(|c| c as Arc<dyn FaultLog>),
                prefetch: image
                    .prefetch
                    .then(|| prefetch(image, &wire.nonzero, &prefetch_source))
                    .flatten(),
                ..ServeOptions::default()
            };
            faults = Some(rdma_fork::serve_faults(
                uffd,
                r.base().as_ptr() as usize,
                r.len(),
                pages.clone(),
                options,
            )?);
            Ok(())
        };
        let instance = self.from_snapshot_parts(&meta, compiled, MemoryFill::Caller(&mut fill))?;
        timings.restored_us = us(started);
        let (base, len) = region.unwrap_or_default();
        Ok((
            instance,
            ResumedMemory {
                base,
                len,
                image_nonzero_pages: wire.nonzero.count(),
                source,
                cached,
                prefetch_source,
                faults,
                eager_pages,
                timings,
                transport,
                transport_fallback,
            },
        ))
    }
}

impl InstanceBuilder {
    /// Refuses an image of another module than this function's (`sha256`: its bytes'
    /// SHA-256), typed as every resume refuses it; a node checks before it compiles.
    pub fn check_image_module(
        &self,
        sha256: [u8; 32],
        descriptor: &ImageDescriptor,
    ) -> Result<(), InstanceError> {
        if sha256 != descriptor.module_hash {
            return Err(ResumeError::ForeignModule {
                module: self.stage().function.module.display().to_string(),
            }
            .into());
        }
        Ok(())
    }
}

/// The fault-order prefetch of `image`: the cache's order log, read through the cache (hits
/// stay local, what it fetches is cached) over a second connection, opened at the first
/// miss. None when there is no cache or nothing logged yet.
fn prefetch(
    image: &RemoteImage,
    nonzero: &proto::PageBitmap,
    stash: &Arc<OnceLock<PrefetchSources>>,
) -> Option<Prefetch> {
    let cache = image.cache.clone()?;
    let order = cache.fault_order();
    if order.is_empty() {
        return None;
    }
    let (d, timeout, nonzero, stash) = (
        image.descriptor.clone(),
        image.timeout,
        nonzero.clone(),
        stash.clone(),
    );
    let fill = image.fill_cache;
    Some(Prefetch {
        order,
        source: Box::new(move || {
            let remote = Arc::new(RemoteSource::connect_on_first_fetch(&d, nonzero, timeout));
            let cached = CachedSource::new(cache, remote.clone()).map_err(|e| e.to_string())?;
            let cached = Arc::new(if fill { cached } else { cached.without_fill() });
            let _ = stash.set(PrefetchSources {
                remote,
                cached: cached.clone(),
            });
            Ok(cached as Arc<dyn PageSource>)
        }),
    })
}

/// What the fault-order prefetch reads through: its own parent connection, behind the cache.
struct PrefetchSources {
    remote: Arc<RemoteSource>,
    cached: Arc<CachedSource>,
}

/// Fills `memory` with every page of `source` that holds data, one read per run of them;
/// returns how many pages were fetched.
fn fetch_all(source: &dyn PageSource, memory: &mut [u8]) -> Result<u64, rdma_fork::FetchError> {
    let page = rdma_fork::PAGE_SIZE;
    let pages = (memory.len() / page) as u64;
    let mut fetched = 0;
    let mut p = 0;
    while p < pages {
        if source.is_zero(p) {
            p += 1;
            continue;
        }
        let run = (p..pages)
            .take(MAX_READ_PAGES as usize)
            .take_while(|&q| !source.is_zero(q))
            .count() as u64;
        let bytes = &mut memory[p as usize * page..(p + run) as usize * page];
        source.fetch(p, run as u32, bytes)?;
        fetched += run;
        p += run;
    }
    Ok(fetched)
}
