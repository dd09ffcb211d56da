//! Per-instance function statistics in shared memory: the worker counts invocations and errors
//! and records execution times; the gateway reads them when Prometheus scrapes. A page per
//! (function, instance) lives for the gateway's whole run, so counters keep growing across
//! worker restarts, as Prometheus counters must.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use memmap2::{MmapOptions, MmapRaw};
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};

/// Upper bounds of the execution-time histogram: 1 µs · 2^k, k = 0..=24 (1 µs .. ~16.8 s).
pub const EXEC_BUCKETS: usize = 25;
const MAGIC: u64 = u64::from_le_bytes(*b"SPDLSTAT");

/// Why an invocation failed, as counted by the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    GuestError = 0,
    Trap = 1,
    Timeout = 2,
    Refused = 3,
    BadRoute = 4,
    /// A descriptor refused because its request id is not the one the gateway recorded
    /// with its slot: a live slot replayed under another request's id.
    RequestMismatch = 5,
}

const ERROR_KINDS: usize = 6;

impl ErrorKind {
    pub const ALL: [ErrorKind; ERROR_KINDS] = [
        ErrorKind::GuestError,
        ErrorKind::Trap,
        ErrorKind::Timeout,
        ErrorKind::Refused,
        ErrorKind::BadRoute,
        ErrorKind::RequestMismatch,
    ];

    /// The `kind` label value.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::GuestError => "guest_error",
            ErrorKind::Trap => "trap",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Refused => "refused_descriptor",
            ErrorKind::BadRoute => "bad_route",
            ErrorKind::RequestMismatch => "request_mismatch",
        }
    }
}

#[repr(C)]
struct Block {
    magic: AtomicU64,
    invocations: AtomicU64,
    errors: [AtomicU64; ERROR_KINDS],
    exec_sum_ns: AtomicU64,
    /// Non-cumulative counts per bucket.
    exec_buckets: [AtomicU64; EXEC_BUCKETS],
    /// Calls slower than the last bound: they appear only in `+Inf` and the count.
    exec_overflow: AtomicU64,
    /// How the memory of incarnations resumed from a remote image was filled, summed over
    /// incarnations ([`ForkCounters`] order).
    fork: [AtomicU64; FORK_COUNTERS],
    /// The running incarnation's open remote-fork resources ([`LIVE_RESOURCES`] order),
    /// overwritten after each call: gauges, meaningful only while the worker runs.
    live: [AtomicU64; 4],
    /// Resets of an `isolation: fresh_per_request` instance ([`ResetCounters`]).
    resets_in_place: AtomicU64,
    reset_rebuilds: AtomicU64,
    reset_pages_copied: AtomicU64,
    reset_pages_dropped: AtomicU64,
    reset_shrinks: AtomicU64,
    reset_sum_ns: AtomicU64,
    /// Non-cumulative counts per bucket (the bounds of the execution-time histogram).
    reset_buckets: [AtomicU64; EXEC_BUCKETS],
    reset_overflow: AtomicU64,
    /// Payload bytes the worker copied in user space ([`Copies`] order): slot → guest
    /// (input), guest → slot (output).
    copied: [AtomicU64; COPY_KINDS],
}

const COPY_KINDS: usize = 4;

/// Payload bytes copied by a worker, summed over its incarnations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copies {
    /// Slot → the guest's linear memory (or a command module's stdin buffer).
    pub input: u64,
    /// The guest's linear memory (or a command's stdout buffer) → slot.
    pub output: u64,
    /// Input bytes a guest read in place, from the slot mapped into its memory (no copy).
    pub in_place_input: u64,
    /// Output bytes a guest wrote in place, straight into the mapped slot (no copy).
    pub in_place_output: u64,
}

/// The `resource` label of each live-resource gauge, in stats-page order (the order of
/// `rdma_fork::lifecycle::Snapshot`'s fields).
pub const LIVE_RESOURCES: [&str; 4] = [
    "memfd",
    "uffd_registration",
    "page_server_connection",
    "page_client_connection",
];

const FORK_COUNTERS: usize = 9;

/// Page counters of instances resumed from a remote image, summed over the incarnations of
/// one instance (each one adds what its own memory saw). All zero for an instance that never
/// resumed from an image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForkCounters {
    /// Incarnations that resumed from an image.
    pub resumes: u64,
    /// Missing-page faults the handler answered.
    pub faults: u64,
    /// Data pages installed (fetched from the parent or read from the node cache).
    pub pages_copied: u64,
    /// Pages the image marks zero, installed without fetching.
    pub zero_pages: u64,
    /// Pages installed ahead of a fault (readahead and fault-order prefetch).
    pub prefetched: u64,
    /// Bytes received from the parent's page server (frames included; demand and prefetch
    /// connections).
    pub bytes_fetched: u64,
    /// Pages read from the node page cache instead of the parent.
    pub cache_hits: u64,
    /// Data pages the node cache did not have.
    pub cache_misses: u64,
    /// Node page caches the worker could not use (malformed, another image's, revoked).
    pub caches_refused: u64,
}

impl ForkCounters {
    fn to_array(self) -> [u64; FORK_COUNTERS] {
        [
            self.resumes,
            self.faults,
            self.pages_copied,
            self.zero_pages,
            self.prefetched,
            self.bytes_fetched,
            self.cache_hits,
            self.cache_misses,
            self.caches_refused,
        ]
    }

    fn from_array(a: [u64; FORK_COUNTERS]) -> Self {
        let [
            resumes,
            faults,
            pages_copied,
            zero_pages,
            prefetched,
            bytes_fetched,
            cache_hits,
            cache_misses,
            caches_refused,
        ] = a;
        ForkCounters {
            resumes,
            faults,
            pages_copied,
            zero_pages,
            prefetched,
            bytes_fetched,
            cache_hits,
            cache_misses,
            caches_refused,
        }
    }

    /// What grew from `earlier` to `self`, field by field (a counter never shrinks; a smaller
    /// value counts as no growth).
    pub fn since(self, earlier: ForkCounters) -> ForkCounters {
        let (now, then) = (self.to_array(), earlier.to_array());
        ForkCounters::from_array(std::array::from_fn(|i| now[i].saturating_sub(then[i])))
    }
}

/// What the resets of an `isolation: fresh_per_request` instance did (see
/// [`crate::fresh`]), summed over its incarnations. All zero for an instance that reuses.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResetCounters {
    /// Resets in place: memory and globals put back to the image.
    pub in_place: u64,
    /// Instances rebuilt from the image instead (a module that changes tables or segments,
    /// or a reset in place that failed).
    pub rebuilds: u64,
    /// Written pages resets in place copied back from the image (they stay resident).
    pub pages_copied: u64,
    /// Written pages resets in place dropped back to the image (`MADV_DONTNEED`; 0 where the
    /// kernel has no `PAGEMAP_SCAN` to tell which).
    pub pages_dropped: u64,
    /// Resets that shrank memory the guest had grown back to the image's size.
    pub shrinks: u64,
    pub sum_seconds: f64,
    /// Reset durations (both kinds), non-cumulative, on the execution-time bounds.
    pub buckets: [u64; EXEC_BUCKETS],
    /// Resets slower than the last bound.
    pub overflow: u64,
}

impl ResetCounters {
    /// Resets of either kind.
    pub fn count(&self) -> u64 {
        self.in_place + self.rebuilds
    }

    fn add(&mut self, other: &ResetCounters) {
        self.in_place += other.in_place;
        self.rebuilds += other.rebuilds;
        self.pages_copied += other.pages_copied;
        self.pages_dropped += other.pages_dropped;
        self.shrinks += other.shrinks;
        self.sum_seconds += other.sum_seconds;
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.overflow += other.overflow;
    }
}

/// A consistent-enough copy of one page (each field is read atomically).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub invocations: u64,
    pub errors: [u64; ERROR_KINDS],
    pub exec_sum_seconds: f64,
    pub exec_buckets: [u64; EXEC_BUCKETS],
    pub exec_overflow: u64,
    pub fork: ForkCounters,
    /// Open remote-fork resources of the running incarnation, see [`LIVE_RESOURCES`].
    pub live: [u64; 4],
    pub reset: ResetCounters,
    pub copied: Copies,
}

impl Snapshot {
    pub fn add(&mut self, other: &Snapshot) {
        self.invocations += other.invocations;
        for (a, b) in self.errors.iter_mut().zip(other.errors) {
            *a += b;
        }
        self.exec_sum_seconds += other.exec_sum_seconds;
        for (a, b) in self.exec_buckets.iter_mut().zip(other.exec_buckets) {
            *a += b;
        }
        self.exec_overflow += other.exec_overflow;
        let (a, b) = (self.fork.to_array(), other.fork.to_array());
        self.fork = ForkCounters::from_array(std::array::from_fn(|i| a[i] + b[i]));
        for (a, b) in self.live.iter_mut().zip(other.live) {
            *a += b;
        }
        self.reset.add(&other.reset);
        self.copied.input += other.copied.input;
        self.copied.output += other.copied.output;
        self.copied.in_place_input += other.copied.in_place_input;
        self.copied.in_place_output += other.copied.in_place_output;
    }
}

/// Upper bound of bucket `i` in seconds.
pub fn bucket_bound(i: usize) -> f64 {
    1e-6 * f64::from(1u32 << i)
}

pub struct StatsPage {
    map: MmapRaw,
}

// SAFETY: the mapping is only accessed through atomics.
unsafe impl Send for StatsPage {}
unsafe impl Sync for StatsPage {}

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("stats page: {0}")]
    Io(#[from] std::io::Error),
    #[error("stats page: not a Spindle stats page")]
    BadPage,
}

impl StatsPage {
    /// Creates a zeroed page in a new memfd; the fd goes to each incarnation of the worker.
    /// The page's size is sealed: a worker (which holds the same memfd) can write its
    /// counters but cannot shrink the file under the gateway's mapping, which would make
    /// the gateway's next read at /metrics time a SIGBUS.
    pub fn create(name: &str) -> Result<(StatsPage, OwnedFd), StatsError> {
        let cname = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
        let fd = memfd_create(
            cname.as_c_str(),
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(std::io::Error::from)?;
        let file = File::from(fd);
        file.set_len(size_of::<Block>() as u64)?;
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(&file, FcntlArg::F_ADD_SEALS(seals)).map_err(std::io::Error::from)?;
        let page = StatsPage::map(&file)?;
        page.block().magic.store(MAGIC, Relaxed);
        Ok((page, file.into()))
    }

    /// Maps a page the gateway created.
    pub fn from_fd(fd: OwnedFd) -> Result<StatsPage, StatsError> {
        let file = File::from(fd);
        if file.metadata()?.len() < size_of::<Block>() as u64 {
            return Err(StatsError::BadPage);
        }
        let page = StatsPage::map(&file)?;
        if page.block().magic.load(Relaxed) != MAGIC {
            return Err(StatsError::BadPage);
        }
        Ok(page)
    }

    fn map(file: &File) -> Result<StatsPage, StatsError> {
        let map = MmapOptions::new()
            .len(size_of::<Block>())
            .map_raw(file.as_raw_fd())?;
        Ok(StatsPage { map })
    }

    fn block(&self) -> &Block {
        // SAFETY: the mapping is at least size_of::<Block>() bytes (checked or set at
        // creation), page-aligned (so aligned for AtomicU64), lives as long as `self`, and is
        // only ever accessed through these atomics, by every process that maps it.
        unsafe { &*self.map.as_ptr().cast::<Block>() }
    }

    /// Counts one invocation that ran for `elapsed`, failed with `error` if any.
    pub fn record(&self, elapsed: Duration, error: Option<ErrorKind>) {
        let b = self.block();
        b.invocations.fetch_add(1, Relaxed);
        if let Some(kind) = error {
            b.errors[kind as usize].fetch_add(1, Relaxed);
        }
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        b.exec_sum_ns.fetch_add(ns, Relaxed);
        observe(&b.exec_buckets, &b.exec_overflow, ns);
    }

    /// Counts one reset of a `fresh_per_request` instance.
    pub fn record_reset(&self, report: &crate::fresh::ResetReport) {
        let b = self.block();
        if report.rebuilt {
            b.reset_rebuilds.fetch_add(1, Relaxed);
        } else {
            b.resets_in_place.fetch_add(1, Relaxed);
        }
        if report.pages > 0 {
            let pages = if report.copied {
                &b.reset_pages_copied
            } else {
                &b.reset_pages_dropped
            };
            pages.fetch_add(report.pages, Relaxed);
        }
        if report.shrank {
            b.reset_shrinks.fetch_add(1, Relaxed);
        }
        let ns = u64::try_from(report.elapsed.as_nanos()).unwrap_or(u64::MAX);
        b.reset_sum_ns.fetch_add(ns, Relaxed);
        observe(&b.reset_buckets, &b.reset_overflow, ns);
    }

    /// Adds `delta` to the resumed-memory counters (the worker adds what grew since it last
    /// published, after each call).
    pub fn add_fork(&self, delta: ForkCounters) {
        for (dst, v) in self.block().fork.iter().zip(delta.to_array()) {
            if v > 0 {
                dst.fetch_add(v, Relaxed);
            }
        }
    }

    /// Sets the live-resource gauges ([`LIVE_RESOURCES`] order).
    pub fn set_live(&self, live: [u64; 4]) {
        for (dst, v) in self.block().live.iter().zip(live) {
            dst.store(v, Relaxed);
        }
    }

    /// Counts payload bytes copied by one call (input: slot → guest, output: guest → slot).
    pub fn add_copied(&self, input: u64, output: u64) {
        let b = self.block();
        for (dst, v) in b.copied.iter().zip([input, output]) {
            if v > 0 {
                dst.fetch_add(v, Relaxed);
            }
        }
    }

    /// Counts payload bytes one in-place call read and wrote without copying.
    pub fn add_in_place(&self, input: u64, output: u64) {
        let b = self.block();
        for (dst, v) in b.copied[2..].iter().zip([input, output]) {
            if v > 0 {
                dst.fetch_add(v, Relaxed);
            }
        }
    }

    /// Counts a descriptor refused before any guest ran (forged, stale or malformed).
    pub fn record_refused(&self) {
        self.block().errors[ErrorKind::Refused as usize].fetch_add(1, Relaxed);
    }

    /// Counts a descriptor refused because it named a live slot with another request's id.
    pub fn record_request_mismatch(&self) {
        self.block().errors[ErrorKind::RequestMismatch as usize].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        let b = self.block();
        let mut s = Snapshot {
            invocations: b.invocations.load(Relaxed),
            exec_sum_seconds: b.exec_sum_ns.load(Relaxed) as f64 / 1e9,
            ..Snapshot::default()
        };
        for (dst, src) in s.errors.iter_mut().zip(&b.errors) {
            *dst = src.load(Relaxed);
        }
        for (dst, src) in s.exec_buckets.iter_mut().zip(&b.exec_buckets) {
            *dst = src.load(Relaxed);
        }
        s.exec_overflow = b.exec_overflow.load(Relaxed);
        s.fork = ForkCounters::from_array(std::array::from_fn(|i| b.fork[i].load(Relaxed)));
        s.live = std::array::from_fn(|i| b.live[i].load(Relaxed));
        s.reset = ResetCounters {
            in_place: b.resets_in_place.load(Relaxed),
            rebuilds: b.reset_rebuilds.load(Relaxed),
            pages_copied: b.reset_pages_copied.load(Relaxed),
            pages_dropped: b.reset_pages_dropped.load(Relaxed),
            shrinks: b.reset_shrinks.load(Relaxed),
            sum_seconds: b.reset_sum_ns.load(Relaxed) as f64 / 1e9,
            buckets: std::array::from_fn(|i| b.reset_buckets[i].load(Relaxed)),
            overflow: b.reset_overflow.load(Relaxed),
        };
        s.copied = Copies {
            input: b.copied[0].load(Relaxed),
            output: b.copied[1].load(Relaxed),
            in_place_input: b.copied[2].load(Relaxed),
            in_place_output: b.copied[3].load(Relaxed),
        };
        s
    }
}

/// Counts a duration of `ns` in its histogram bucket: 1 µs · 2^k upper bounds.
fn observe(buckets: &[AtomicU64; EXEC_BUCKETS], overflow: &AtomicU64, ns: u64) {
    // Rounded up, so a bucket's count never includes a duration longer than its bound.
    let us = ns.div_ceil(1000);
    // Smallest k with us <= 2^k: bucket k covers (2^(k-1), 2^k] microseconds.
    let k = if us <= 1 {
        0
    } else {
        (64 - (us - 1).leading_zeros()) as usize
    };
    match buckets.get(k) {
        Some(bucket) => bucket.fetch_add(1, Relaxed),
        None => overflow.fetch_add(1, Relaxed),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_visible_through_another_mapping() {
        let (page, fd) = StatsPage::create("stats-test").unwrap();
        let other = StatsPage::from_fd(fd.try_clone().unwrap()).unwrap();
        other.record(Duration::from_micros(1), None);
        other.record(Duration::from_nanos(2_001), Some(ErrorKind::Trap));
        other.record(Duration::from_millis(5), None);
        other.record(Duration::from_secs(100), Some(ErrorKind::Timeout));
        other.record_refused();
        other.record_request_mismatch();
        let s = page.snapshot();
        assert_eq!(s.invocations, 4);
        assert_eq!(s.errors, [0, 1, 1, 1, 0, 1]);
        assert_eq!(s.exec_buckets[0], 1, "1 µs");
        assert_eq!(s.exec_buckets[2], 1, "2.001 µs -> (2, 4], never le=2e-6");
        assert_eq!(s.exec_buckets[13], 1, "5 ms -> (4.096, 8.192] ms");
        assert_eq!(s.exec_buckets.iter().sum::<u64>(), 3);
        assert_eq!(
            s.exec_overflow, 1,
            "100 s is beyond the last bound: only in +Inf"
        );
        assert!((s.exec_sum_seconds - 100.005003001).abs() < 1e-6);
        assert!(bucket_bound(13) >= 0.005 && bucket_bound(12) < 0.005);
        assert_eq!(s.fork, ForkCounters::default());
        assert_eq!(s.copied, Copies::default());
        other.add_copied(10, 0);
        other.add_copied(5, 7);
        other.add_in_place(3, 4);
        let s = page.snapshot();
        assert_eq!(
            s.copied,
            Copies {
                input: 15,
                output: 7,
                in_place_input: 3,
                in_place_output: 4,
            }
        );
        let mut sum = s.clone();
        sum.add(&s);
        assert_eq!((sum.copied.input, sum.copied.output), (30, 14));
    }

    #[test]
    fn a_worker_cannot_resize_the_page_under_the_gateway() {
        let (page, fd) = StatsPage::create("stats-hostile").unwrap();
        // What a hostile worker holding its fd 7 would try.
        let file = File::from(fd);
        for len in [0, 1, 1 << 20] {
            let err = file.set_len(len).expect_err("the size is sealed");
            assert_eq!(
                err.raw_os_error(),
                Some(libc::EPERM),
                "set_len({len}): {err}"
            );
        }
        let err = fcntl(&file, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE))
            .expect_err("and the seals themselves");
        assert_eq!(err, nix::errno::Errno::EPERM);
        // Counters still work both ways.
        let worker = StatsPage::from_fd(file.into()).unwrap();
        worker.record(Duration::from_micros(3), None);
        assert_eq!(page.snapshot().invocations, 1);
    }

    #[test]
    fn fork_counters_add_up_across_incarnations_and_mappings() {
        let (page, fd) = StatsPage::create("stats-fork").unwrap();
        let worker = StatsPage::from_fd(fd).unwrap();
        let first = ForkCounters {
            resumes: 1,
            faults: 10,
            pages_copied: 8,
            zero_pages: 2,
            bytes_fetched: 8 * 4096,
            ..ForkCounters::default()
        };
        worker.add_fork(first);
        let later = ForkCounters {
            faults: 12,
            pages_copied: 9,
            ..first
        };
        worker.add_fork(later.since(first));
        // A second incarnation, all of its pages from the node cache.
        worker.add_fork(ForkCounters {
            resumes: 1,
            faults: 3,
            pages_copied: 3,
            cache_hits: 3,
            ..ForkCounters::default()
        });
        let s = page.snapshot().fork;
        assert_eq!(
            (
                s.resumes,
                s.faults,
                s.pages_copied,
                s.zero_pages,
                s.cache_hits
            ),
            (2, 15, 12, 2, 3)
        );
        assert_eq!(s.bytes_fetched, 8 * 4096);
        assert_eq!(
            first.since(later),
            ForkCounters::default(),
            "never negative"
        );
        worker.set_live([1, 1, 0, 2]);
        assert_eq!(page.snapshot().live, [1, 1, 0, 2]);
        worker.set_live([1, 0, 0, 0]);
        assert_eq!(page.snapshot().live, [1, 0, 0, 0], "gauges are overwritten");
        let mut sum = page.snapshot();
        sum.add(&page.snapshot());
        assert_eq!(sum.fork.faults, 30);
    }

    #[test]
    fn resets_are_counted_by_kind_with_their_durations() {
        use crate::fresh::ResetReport;
        let (page, fd) = StatsPage::create("stats-reset").unwrap();
        let worker = StatsPage::from_fd(fd).unwrap();
        assert_eq!(page.snapshot().reset, ResetCounters::default());
        let in_place = ResetReport {
            elapsed: Duration::from_micros(3),
            pages: 5,
            copied: true,
            ..ResetReport::default()
        };
        worker.record_reset(&in_place);
        worker.record_reset(&ResetReport {
            shrank: true,
            copied: false,
            ..in_place
        });
        worker.record_reset(&ResetReport {
            elapsed: Duration::from_micros(40),
            rebuilt: true,
            ..ResetReport::default()
        });
        let r = page.snapshot().reset;
        assert_eq!((r.in_place, r.rebuilds, r.count()), (2, 1, 3));
        assert_eq!((r.pages_copied, r.pages_dropped, r.shrinks), (5, 5, 1));
        assert_eq!(r.buckets[2], 2, "3 µs -> (2, 4]");
        assert_eq!(r.buckets[6], 1, "40 µs -> (32, 64]");
        assert!((r.sum_seconds - 46e-6).abs() < 1e-9);
        let mut sum = page.snapshot();
        sum.add(&page.snapshot());
        assert_eq!(sum.reset.count(), 6);
        assert_eq!(page.snapshot().invocations, 0, "no invocation counted");
    }

    #[test]
    fn rejects_foreign_memory() {
        let path = std::env::temp_dir().join(format!("spindle-stats-{}", std::process::id()));
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let zeros = File::options().read(true).write(true).open(&path).unwrap();
        assert!(matches!(
            StatsPage::from_fd(zeros.into()),
            Err(StatsError::BadPage)
        ));
        let short = File::options().read(true).write(true).open(&path).unwrap();
        short.set_len(8).unwrap();
        assert!(matches!(
            StatsPage::from_fd(short.into()),
            Err(StatsError::BadPage)
        ));
        let _ = std::fs::remove_file(path);
    }
}
