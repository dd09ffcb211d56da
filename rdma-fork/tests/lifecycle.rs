//! The lifecycle gauges return to zero once children end: every memfd, uffd registration and
//! page-server and page-client connection a child's resume opened is given back.
//!
//! One test in this binary on purpose: the gauges are process-wide, and parallel tests
//! would move them.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{PAGES, image};
use proto::image::module_hash;
use rdma_fork::cache::{CachedSource, NodeCache, connect_checked};
use rdma_fork::lifecycle::{self, Snapshot};
use rdma_fork::registry::{ImageRegistry, PublishedImage};
use rdma_fork::server::PageServer;
use rdma_fork::{
    AnonRegion, LazyRegion, PAGE_SIZE, PageBitmap, PageSource, Prefetch, RemoteSource, ServeOptions,
};

const TIMEOUT: Duration = Duration::from_secs(5);

fn wait_for(what: &str, cond: impl Fn(&Snapshot) -> bool) -> Snapshot {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = lifecycle::snapshot();
        if cond(&now) {
            return now;
        }
        assert!(Instant::now() < deadline, "{what}: {now:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One child: demand connection, prefetch connection, the cache, a lazy region.
fn child(d: &proto::ImageDescriptor, cache_fd: &std::os::fd::OwnedFd) {
    let nonzero = PageBitmap::nonzero_pages(&image());
    let cache = Arc::new(NodeCache::open(cache_fd.try_clone().unwrap(), d).unwrap());
    let client = connect_checked(d, TIMEOUT, Some(&cache)).unwrap();
    let remote = Arc::new(RemoteSource::from_client(client, nonzero.clone()));
    let source = Arc::new(CachedSource::new(cache.clone(), remote).unwrap());
    let prefetch = {
        let (d, cache) = (d.clone(), cache.clone());
        Prefetch {
            order: (0..PAGES as u64).collect(),
            source: Box::new(move || {
                let remote =
                    RemoteSource::connect(&d, nonzero, TIMEOUT).map_err(|e| e.to_string())?;
                CachedSource::new(cache, Arc::new(remote))
                    .map(|s| Arc::new(s) as Arc<dyn PageSource>)
                    .map_err(|e| e.to_string())
            }),
        }
    };
    let mem = AnonRegion::new(PAGES * PAGE_SIZE).unwrap();
    let options = ServeOptions {
        fault_log: Some(cache.clone()),
        prefetch: Some(prefetch),
        ..ServeOptions::default()
    };
    // SAFETY: a fresh mapping used only here, outliving the region.
    let region = unsafe { LazyRegion::new(mem.base(), mem.len(), source, options) }.unwrap();
    // SAFETY: inside the mapping; the read faults the page in.
    let _ = unsafe { mem.as_ptr().add(5 * PAGE_SIZE).read_volatile() };
    let deadline = Instant::now() + Duration::from_secs(5);
    while rdma_fork::resident_pages(mem.as_ptr(), mem.len()).unwrap() < PAGES {
        assert!(Instant::now() < deadline, "prefetch never finished");
        std::thread::sleep(Duration::from_millis(2));
    }
    // The prefetch connection is given back once its order is done; the demand one stays.
    let during = wait_for("the prefetch connection was closed", |s| {
        s.client_connections == 1 && s.server_connections == 1
    });
    assert_eq!(during.uffd_registrations, 1);
    // The published image and this child's cache mapping.
    assert_eq!(during.memfds, 2);
    region.finish().unwrap();
}

#[test]
fn gauges_return_to_zero_after_children_end() {
    if !testkit::require_root("gauges_return_to_zero_after_children_end", "userfaultfd") {
        return;
    }
    assert!(
        lifecycle::snapshot().is_idle(),
        "{:?}",
        lifecycle::snapshot()
    );
    let registry = Arc::new(ImageRegistry::new());
    let image =
        PublishedImage::from_memory("lifecycle", &image(), Duration::from_secs(60)).unwrap();
    let handle = registry.publish(image).unwrap();
    let server = PageServer::bind("127.0.0.1:0", registry.clone())
        .unwrap()
        .spawn()
        .unwrap();
    let d = handle.descriptor(server.local_addr(), module_hash(b"x"), "test");
    let cache_fd = NodeCache::create(&d).unwrap();
    for _ in 0..3 {
        child(&d, &cache_fd);
        // The server side closes when the children's connections do.
        let after = wait_for("the child's connections were closed", |s| {
            s.client_connections == 0 && s.server_connections == 0
        });
        assert_eq!(
            (after.uffd_registrations, after.memfds),
            (0, 1),
            "only the image is left"
        );
    }
    registry.revoke(d.handle).unwrap();
    drop(server);
    drop(registry);
    wait_for("everything was given back", Snapshot::is_idle);
}
