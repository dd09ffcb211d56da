//! The node page cache for real: a page server on 127.0.0.1, children whose memory is filled
//! through userfaultfd from a [`CachedSource`], and children in other processes (this test
//! binary run again with `RDMA_FORK_CACHE_CHILD` set) sharing one cache memfd.

mod common;

use std::fmt::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{PAGES, hash, image, is_zero_page, nonzero_pages};
use nix::fcntl::{FcntlArg, FdFlag, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use proto::ImageDescriptor;
use proto::image::module_hash;
use proto::pages::RefuseReason;
use rdma_fork::cache::{CacheError, CachedSource, NodeCache, PurgeReason, connect_checked};
use rdma_fork::client::ClientError;
use rdma_fork::registry::{ImageRegistry, PublishedImage};
use rdma_fork::server::{PageServer, RunningServer};
use rdma_fork::{
    AnonRegion, FetchError, LazyRegion, PAGE_SIZE, PageBitmap, PageSource, Prefetch, RemoteSource,
    ServeOptions,
};

const TIMEOUT: Duration = Duration::from_secs(5);

struct Parent {
    registry: Arc<ImageRegistry>,
    _server: RunningServer,
    descriptor: ImageDescriptor,
}

impl Parent {
    fn start() -> Parent {
        let registry = Arc::new(ImageRegistry::new());
        let image =
            PublishedImage::from_memory("cache-test", &image(), Duration::from_secs(60)).unwrap();
        let handle = registry.publish(image).unwrap();
        let server = PageServer::bind("127.0.0.1:0", registry.clone())
            .unwrap()
            .spawn()
            .unwrap();
        let descriptor = handle.descriptor(
            server.local_addr(),
            module_hash(b"\0asm\x01\0\0\0"),
            "wasmer-7.4-cranelift",
        );
        Parent {
            registry,
            _server: server,
            descriptor,
        }
    }
}

fn nonzero() -> PageBitmap {
    PageBitmap::nonzero_pages(&image())
}

/// A child's page source: authenticate with the parent first, then the cache over it.
fn child_source(
    d: &ImageDescriptor,
    cache: &Arc<NodeCache>,
) -> Result<Arc<CachedSource>, ClientError> {
    let client = connect_checked(d, TIMEOUT, Some(cache))?;
    let remote = RemoteSource::from_client(client, nonzero());
    Ok(Arc::new(
        CachedSource::new(cache.clone(), Arc::new(remote)).unwrap(),
    ))
}

fn lazy(mem: &AnonRegion, source: Arc<dyn PageSource>, options: ServeOptions) -> LazyRegion {
    // SAFETY: each caller's AnonRegion is a fresh mapping nothing else uses, and it outlives
    // the LazyRegion (declared first, dropped last).
    unsafe { LazyRegion::new(mem.base(), mem.len(), source, options) }.unwrap()
}

fn page(mem: &AnonRegion, p: usize) -> &[u8] {
    // SAFETY: inside the mapping; reading faults the page in through the handler, which
    // writes only pages still missing, before they become visible.
    unsafe { std::slice::from_raw_parts(mem.as_ptr().add(p * PAGE_SIZE), PAGE_SIZE) }
}

fn root(test: &str) -> bool {
    testkit::require_root(test, "userfaultfd with kernel-mode faults")
}

/// The pages a child touches, in a per-child order so concurrent children collide on
/// different pages at different times.
fn touch_order(seed: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..PAGES).collect();
    order.rotate_left(seed * 13 % PAGES);
    if seed % 2 == 1 {
        order.reverse();
    }
    order
}

/// A child in this process or another: touch `order`, report each page's hash.
fn run_child(source: Arc<dyn PageSource>, order: &[usize], options: ServeOptions) -> String {
    let mem = AnonRegion::new(PAGES * PAGE_SIZE).unwrap();
    let region = lazy(&mem, source, options);
    let mut report = String::new();
    for &p in order {
        writeln!(report, "page {p} {:016x}", hash(page(&mem, p))).unwrap();
    }
    assert!(!region.failed(), "{:?}", region.failure());
    region.finish().unwrap();
    report
}

fn expected(order: &[usize]) -> String {
    let image = image();
    order.iter().fold(String::new(), |mut s, &p| {
        let bytes = &image[p * PAGE_SIZE..][..PAGE_SIZE];
        writeln!(s, "page {p} {:016x}", hash(bytes)).unwrap();
        s
    })
}

/// Runs as the child process when the environment says so, and exits.
fn child_main() {
    let Ok(seed) = std::env::var("RDMA_FORK_CACHE_CHILD") else {
        return;
    };
    let seed: usize = seed.parse().unwrap();
    let d: ImageDescriptor = std::env::var("RDMA_FORK_DESCRIPTOR")
        .unwrap()
        .parse()
        .unwrap();
    let fd: i32 = std::env::var("RDMA_FORK_CACHE_FD")
        .unwrap()
        .parse()
        .unwrap();
    // SAFETY: the parent left this fd open across exec for this process alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let cache = Arc::new(NodeCache::open(fd, &d).unwrap());
    let source = child_source(&d, &cache).unwrap();
    let report = run_child(source.clone(), &touch_order(seed), ServeOptions::default());
    let s = source.stats();
    // libtest's "test … " has no line end yet under --nocapture.
    print!("\n{report}");
    println!("stats {} {} {}", s.hits, s.misses, s.pages_filled);
    std::process::exit(0);
}

/// Starts this test binary as a child of the image, sharing `cache` (a memfd) with it.
fn spawn_child(test: &str, d: &ImageDescriptor, cache: &OwnedFd, seed: usize) -> Child {
    // A copy without close-on-exec, so the child inherits it; closed here once spawned.
    let copy = cache.try_clone().unwrap();
    fcntl(&copy, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("RDMA_FORK_CACHE_CHILD", seed.to_string())
        .env("RDMA_FORK_DESCRIPTOR", d.to_string())
        .env("RDMA_FORK_CACHE_FD", copy.as_raw_fd().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    drop(copy);
    child
}

/// The child's report lines and its (hits, misses, filled).
fn wait_child(child: Child) -> (String, (u64, u64, u64)) {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "child: {}", out.status);
    let text = String::from_utf8(out.stdout).unwrap();
    let mut pages = String::new();
    let mut stats = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("stats ") {
            let n: Vec<u64> = rest.split(' ').map(|x| x.parse().unwrap()).collect();
            stats = Some((n[0], n[1], n[2]));
        } else if line.starts_with("page ") {
            writeln!(pages, "{line}").unwrap();
        }
    }
    (pages, stats.expect("the child printed its stats"))
}

#[test]
fn a_second_child_in_another_process_reads_the_cache_not_the_network() {
    const TEST: &str = "a_second_child_in_another_process_reads_the_cache_not_the_network";
    child_main();
    if !root(TEST) {
        return;
    }
    let parent = Parent::start();
    let d = &parent.descriptor;
    let fd = NodeCache::create(d).unwrap();
    let cache = Arc::new(NodeCache::open(fd.try_clone().unwrap(), d).unwrap());
    let data = nonzero_pages() as u64;

    // The first child on the node fetches every data page it touches and fills the cache.
    let first = child_source(d, &cache).unwrap();
    let order = touch_order(0);
    let report = run_child(first.clone(), &order, ServeOptions::default());
    assert_eq!(report, expected(&order));
    let s = first.stats();
    assert_eq!((s.hits, s.misses, s.pages_filled), (0, data, data));
    assert_eq!(cache.shared_stats().pages_ready, data);
    let served = parent.registry.stats();
    assert_eq!(served.pages_served, data);

    // The second, another process, authenticates (one more handshake) and fetches nothing.
    let (report, stats) = wait_child(spawn_child(TEST, d, &fd, 1));
    assert_eq!(report, expected(&touch_order(1)), "identical memory");
    assert_eq!(stats, (data, 0, 0));
    let after = parent.registry.stats();
    assert_eq!(after.handshakes_ok, served.handshakes_ok + 1);
    assert_eq!(
        (after.bytes_served, after.pages_served, after.reads),
        (served.bytes_served, served.pages_served, served.reads),
        "no page crossed the network for the second child"
    );
    assert!(cache.resident_bytes().unwrap() >= data * PAGE_SIZE as u64);
}

#[test]
fn concurrent_children_in_other_processes_fill_one_cache_correctly() {
    const TEST: &str = "concurrent_children_in_other_processes_fill_one_cache_correctly";
    child_main();
    if !root(TEST) {
        return;
    }
    let parent = Parent::start();
    let d = &parent.descriptor;
    let fd = NodeCache::create(d).unwrap();
    let children: Vec<Child> = (0..4).map(|seed| spawn_child(TEST, d, &fd, seed)).collect();
    let mut filled = 0;
    for (seed, child) in children.into_iter().enumerate() {
        let (report, (hits, misses, by_child)) = wait_child(child);
        assert_eq!(report, expected(&touch_order(seed)), "child {seed}");
        assert_eq!(hits + misses, nonzero_pages() as u64, "child {seed}");
        filled += by_child;
    }
    let cache = NodeCache::open(fd, d).unwrap();
    let data = nonzero_pages() as u64;
    assert_eq!(filled, data, "every page was written by exactly one child");
    assert_eq!(cache.shared_stats().pages_filled, data);
    // What the cache holds is the image, byte for byte.
    let image = image();
    let mut buf = vec![0u8; PAGE_SIZE];
    for p in 0..PAGES {
        let hit = cache.read(p as u64, &mut buf).unwrap();
        assert_eq!(hit, !is_zero_page(p), "page {p}");
        if hit {
            assert_eq!(buf, image[p * PAGE_SIZE..][..PAGE_SIZE], "page {p}");
        }
    }
}

#[test]
fn revoking_the_image_purges_the_cache_and_refuses_the_next_child() {
    if !root("revoking_the_image_purges_the_cache_and_refuses_the_next_child") {
        return;
    }
    let parent = Parent::start();
    let d = &parent.descriptor;
    let fd = NodeCache::create(d).unwrap();
    let cache = Arc::new(NodeCache::open(fd.try_clone().unwrap(), d).unwrap());
    let order = touch_order(2);
    let first = child_source(d, &cache).unwrap();
    assert_eq!(
        run_child(first, &order, ServeOptions::default()),
        expected(&order)
    );
    assert!(cache.resident_bytes().unwrap() > 0);

    parent.registry.revoke(d.handle).unwrap();
    let err = child_source(d, &cache)
        .err()
        .expect("a revoked image is refused");
    assert!(
        matches!(
            err,
            ClientError::Refused {
                reason: RefuseReason::Revoked,
                ..
            }
        ),
        "{err}"
    );
    assert!(cache.is_revoked());
    assert_eq!(cache.shared_stats().pages_ready, 0);
    assert_eq!(cache.shared_stats().purges, 1);
    assert_eq!(
        cache.resident_bytes().unwrap(),
        0,
        "the pages were punched out"
    );
    let mut buf = vec![0u8; PAGE_SIZE];
    assert!(matches!(cache.read(1, &mut buf), Err(CacheError::Revoked)));
    let again = NodeCache::open(fd, d).unwrap_err();
    assert_eq!(
        again.to_string(),
        "the cache was purged because the parent revoked or expired the image"
    );
}

#[test]
fn a_revoke_seen_mid_run_purges_the_cache_from_the_fetch_path() {
    let parent = Parent::start();
    let d = &parent.descriptor;
    let cache = Arc::new(NodeCache::open(NodeCache::create(d).unwrap(), d).unwrap());
    let source = child_source(d, &cache).unwrap();
    let mut buf = vec![0u8; PAGE_SIZE];
    source.fetch(1, 1, &mut buf).unwrap();
    assert!(cache.is_ready(1));
    parent.registry.revoke(d.handle).unwrap();
    let err = source.fetch(3, 1, &mut buf).unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::Refused {
                reason: RefuseReason::Revoked,
                ..
            }
        ),
        "{err}"
    );
    assert!(cache.is_revoked() && !cache.is_ready(1));
    assert_eq!(source.stats().purges, 1);
    // A hit is refused too once the image is revoked: the child must not run on it.
    assert!(source.fetch(1, 1, &mut buf).is_err());
}

#[test]
fn after_an_explicit_purge_children_still_work_from_the_network() {
    let parent = Parent::start();
    let d = &parent.descriptor;
    let cache = Arc::new(NodeCache::open(NodeCache::create(d).unwrap(), d).unwrap());
    let source = child_source(d, &cache).unwrap();
    let image = image();
    let mut buf = vec![0u8; 3 * PAGE_SIZE];
    source.fetch(0, 3, &mut buf).unwrap();
    assert_eq!(cache.shared_stats().pages_ready, 3);
    cache.purge(PurgeReason::Explicit).unwrap();
    assert!(cache.is_purged() && !cache.is_revoked());
    assert_eq!(cache.resident_bytes().unwrap(), 0);
    buf.fill(0);
    source.fetch(0, 3, &mut buf).unwrap();
    assert_eq!(buf, image[..3 * PAGE_SIZE]);
    let s = source.stats();
    assert_eq!(
        (s.hits, s.misses, s.pages_filled),
        (0, 6, 3),
        "nothing refilled"
    );
}

#[test]
fn malformed_cache_fds_are_refused_with_a_clear_error() {
    let parent = Parent::start();
    let d = &parent.descriptor;
    let sealed = |len: u64, header: &[u8]| -> OwnedFd {
        let fd = memfd_create("bad-cache", MFdFlags::MFD_ALLOW_SEALING).unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(len).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, header, 0).unwrap();
        fcntl(&file, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK)).unwrap();
        file.into()
    };
    let refused = rdma_fork::lifecycle::caches_refused();
    let good = NodeCache::create(d).unwrap();
    let good_len = std::fs::File::from(good.try_clone().unwrap())
        .metadata()
        .unwrap()
        .len();
    let mut header = vec![0u8; 64];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::from(good.try_clone().unwrap()),
        &mut header,
        0,
    )
    .unwrap();

    let err = NodeCache::open(sealed(good_len, &[0u8; 64]), d).unwrap_err();
    assert!(matches!(err, CacheError::BadMagic { found: 0 }), "{err}");
    assert!(
        err.to_string().starts_with("not a node page cache"),
        "{err}"
    );

    let err = NodeCache::open(sealed(100, &[]), d).unwrap_err();
    assert!(matches!(err, CacheError::TooSmall { len: 100 }), "{err}");

    let err = NodeCache::open(sealed(good_len + 4096, &header), d).unwrap_err();
    assert!(matches!(err, CacheError::FileSize { .. }), "{err}");
    assert!(
        err.to_string().contains("its layout needs exactly"),
        "{err}"
    );

    let mut other = header.clone();
    other[16..24].copy_from_slice(&(d.handle ^ 1).to_le_bytes());
    let err = NodeCache::open(sealed(good_len, &other), d).unwrap_err();
    assert!(matches!(err, CacheError::OtherImage { .. }), "{err}");

    let mut version = header.clone();
    version[8] = 9;
    let err = NodeCache::open(sealed(good_len, &version), d).unwrap_err();
    assert!(matches!(err, CacheError::Version(9)), "{err}");

    let unsealed = memfd_create("unsealed", MFdFlags::MFD_CLOEXEC).unwrap();
    let err = NodeCache::open(unsealed, d).unwrap_err();
    assert!(matches!(err, CacheError::NotSealed { .. }), "{err}");

    let pipe = nix::unistd::pipe().unwrap().0;
    assert!(NodeCache::open(pipe, d).is_err(), "not even a memfd");

    let bigger = ImageDescriptor {
        memory_bytes: d.memory_bytes * 2,
        ..d.clone()
    };
    let err = NodeCache::open(good, &bigger).unwrap_err();
    assert!(matches!(err, CacheError::MemorySize { .. }), "{err}");
    // Other tests of this binary may refuse caches meanwhile: at least these eight.
    assert!(rdma_fork::lifecycle::caches_refused() >= refused + 8);
}

#[test]
fn later_children_prefetch_in_fault_order_on_a_second_connection() {
    if !root("later_children_prefetch_in_fault_order_on_a_second_connection") {
        return;
    }
    let parent = Parent::start();
    let d = parent.descriptor.clone();
    let cache = Arc::new(NodeCache::open(NodeCache::create(&d).unwrap(), &d).unwrap());

    // The first child records its fault order (pages are not cached here, so the second
    // child's pages must come over the network).
    let order: Vec<usize> = [9, 3, 4, 5, 40, 41, 2, 60, 17].to_vec();
    let remote = Arc::new(RemoteSource::connect(&d, nonzero(), TIMEOUT).unwrap());
    let record = ServeOptions {
        fault_log: Some(cache.clone()),
        ..ServeOptions::default()
    };
    assert_eq!(run_child(remote, &order, record), expected(&order));
    let logged: Vec<u64> = order.iter().map(|&p| p as u64).collect();
    assert_eq!(cache.fault_order(), logged);

    // The second child prefetches that order on its own connection before touching.
    let handshakes = parent.registry.stats().handshakes_ok;
    let demand = Arc::new(RemoteSource::connect(&d, nonzero(), TIMEOUT).unwrap());
    let prefetch = {
        let d = d.clone();
        Prefetch {
            order: cache.fault_order(),
            source: Box::new(move || {
                RemoteSource::connect(&d, nonzero(), TIMEOUT)
                    .map(|s| Arc::new(s) as Arc<dyn PageSource>)
                    .map_err(|e| e.to_string())
            }),
        }
    };
    let mem = AnonRegion::new(PAGES * PAGE_SIZE).unwrap();
    let region = lazy(
        &mem,
        demand.clone(),
        ServeOptions {
            prefetch: Some(prefetch),
            ..ServeOptions::default()
        },
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while region.stats().order_prefetched < order.len() as u64 {
        assert!(
            Instant::now() < deadline,
            "prefetch never finished: {:?}",
            region.stats()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut report = String::new();
    for &p in &order {
        writeln!(report, "page {p} {:016x}", hash(page(&mem, p))).unwrap();
    }
    assert_eq!(report, expected(&order));
    let s = region.finish().unwrap().stats;
    assert_eq!(s.faults, 0, "every touched page was there before its touch");
    assert_eq!(s.order_prefetched, order.len() as u64);
    assert_eq!(
        parent.registry.stats().handshakes_ok,
        handshakes + 2,
        "demand and prefetch connections"
    );
    assert_eq!(demand.stats().round_trips, 0, "no demand fetch was needed");
}
