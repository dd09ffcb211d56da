//! Lazy regions in this process, against the kernel's userfaultfd: real faults on real
//! memory, counted and checked byte for byte against the image.

mod common;

use std::io::{Read, Write};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{Failing, PAGES, image, is_zero_page, nonzero_pages, source};
use rdma_fork::{
    AnonRegion, LazyError, LazyRegion, PAGE_SIZE, PageSource, ServeOptions, StopReason, discard,
    resident_pages,
};

fn root(test: &str) -> bool {
    testkit::require_root(test, "userfaultfd with kernel-mode faults")
}

fn lazy(mem: &AnonRegion, source: Arc<dyn PageSource>, options: ServeOptions) -> LazyRegion {
    // SAFETY: each test's AnonRegion is a fresh mapping nothing else uses, and it outlives
    // the LazyRegion (declared first, dropped last).
    unsafe { LazyRegion::new(mem.base(), mem.len(), source, options) }.unwrap()
}

fn readahead(n: u32) -> ServeOptions {
    ServeOptions {
        readahead: n,
        ..ServeOptions::default()
    }
}

/// Reads one byte of `page`: the touch that faults it in.
fn touch(mem: &AnonRegion, page: usize) -> u8 {
    // SAFETY: inside the mapping; the read blocks until the handler installs the page.
    unsafe { mem.as_ptr().add(page * PAGE_SIZE).read_volatile() }
}

fn page(mem: &AnonRegion, page: usize) -> &[u8] {
    // SAFETY: inside the mapping; the handler writes only pages that are still missing,
    // before they become visible, so nothing changes under this shared view.
    unsafe { std::slice::from_raw_parts(mem.as_ptr().add(page * PAGE_SIZE), PAGE_SIZE) }
}

fn resident(mem: &AnonRegion) -> usize {
    resident_pages(mem.as_ptr(), mem.len()).unwrap()
}

#[test]
fn touched_pages_only_are_fetched_and_zero_pages_never() {
    if !root("touched_pages_only_are_fetched_and_zero_pages_never") {
        return;
    }
    let image = image();
    let mem = AnonRegion::new(PAGES * PAGE_SIZE).unwrap();
    let region = lazy(&mem, source(), readahead(0));
    assert_eq!(resident(&mem), 0);

    let touched = [0, 1, 2, 5, 7, 12, 17, 30, 33, 47, 59, 61, 63];
    for &p in &touched {
        touch(&mem, p);
    }
    for &p in &touched {
        assert_eq!(
            page(&mem, p),
            &image[p * PAGE_SIZE..][..PAGE_SIZE],
            "page {p}"
        );
    }
    let zero = touched.iter().filter(|&&p| is_zero_page(p)).count() as u64;
    let data = touched.len() as u64 - zero;
    assert!(zero >= 5 && data >= 5, "the subset mixes both kinds");
    let stats = region.stats();
    assert_eq!(stats.faults, touched.len() as u64);
    assert_eq!(stats.stale_faults, 0);
    assert_eq!(stats.zero_pages, zero);
    assert_eq!(stats.pages_copied, data);
    assert_eq!(stats.bytes_fetched, data * PAGE_SIZE as u64);
    assert_eq!(stats.prefetched, 0);
    assert_eq!((stats.fetch_errors, stats.copy_races), (0, 0));
    assert!(!stats.failed);
    // mincore counts installed zero pages too, so the allowance is zero: exactly the
    // touched pages have page-table entries (THP is off for the region).
    assert_eq!(resident(&mem), touched.len());

    let served = region.finish().unwrap();
    assert_eq!(served.reason, StopReason::Stopped);
    assert_eq!(served.stats, stats);
}

#[test]
fn writes_fault_in_the_image_then_land() {
    if !root("writes_fault_in_the_image_then_land") {
        return;
    }
    let image = image();
    let mem = AnonRegion::new(PAGES * PAGE_SIZE).unwrap();
    let region = lazy(&mem, source(), readahead(0));
    for p in [3, 4, 7] {
        // SAFETY: inside the mapping; the write faults the page in first.
        unsafe { mem.as_ptr().add(p * PAGE_SIZE + 10).write_volatile(0) };
    }
    for p in [3, 4, 7] {
        let got = page(&mem, p);
        assert_eq!(got[10], 0);
        assert_eq!(got[..10], image[p * PAGE_SIZE..][..10]);
        assert_eq!(got[11..], image[p * PAGE_SIZE + 11..][..PAGE_SIZE - 11]);
    }
    let stats = region.stats();
    assert_eq!(
        (stats.faults, stats.pages_copied, stats.zero_pages),
        (3, 2, 1)
    );
}

#[test]
fn readahead_turns_sequential_faults_into_prefetches() {
    if !root("readahead_turns_sequential_faults_into_prefetches") {
        return;
    }
    let image = image();
    for (ra, faults) in [(0u32, PAGES as u64), (7, 8), (15, 4), (100, 1)] {
        let mem = AnonRegion::new(PAGES * PAGE_SIZE).unwrap();
        let region = lazy(&mem, source(), readahead(ra));
        for p in 0..PAGES {
            touch(&mem, p);
        }
        for p in 0..PAGES {
            assert_eq!(
                page(&mem, p),
                &image[p * PAGE_SIZE..][..PAGE_SIZE],
                "page {p}"
            );
        }
        let stats = region.stats();
        // A fault installs its page and the next `ra`; the toucher may race ahead into the
        // window while it is being installed, which shows as stale faults, never as more
        // demand faults.
        assert_eq!(stats.faults, faults, "readahead {ra}");
        assert_eq!(stats.prefetched, PAGES as u64 - faults, "readahead {ra}");
        assert_eq!(stats.pages_copied, nonzero_pages() as u64);
        assert_eq!(stats.zero_pages, (PAGES - nonzero_pages()) as u64);
        assert_eq!(stats.bytes_fetched, (nonzero_pages() * PAGE_SIZE) as u64);
        assert_eq!(resident(&mem), PAGES);
    }
}

#[test]
fn readahead_never_installs_a_page_twice() {
    if !root("readahead_never_installs_a_page_twice") {
        return;
    }
    // Touch backwards in steps: windows overlap pages installed before.
    let mem = AnonRegion::new(PAGES * PAGE_SIZE).unwrap();
    let region = lazy(&mem, source(), readahead(8));
    for p in (0..PAGES).rev().step_by(3) {
        touch(&mem, p);
    }
    // The last window may still be going in; the final numbers come with the join.
    let stats = region.finish().unwrap().stats;
    let installed = stats.pages_copied + stats.zero_pages;
    assert_eq!(installed, stats.faults + stats.prefetched);
    assert_eq!(installed as usize, resident(&mem));
    assert_eq!(stats.copy_races, 0);
    assert_eq!(stats.bytes_fetched, stats.pages_copied * PAGE_SIZE as u64);
}

#[test]
fn eager_populates_everything_before_returning() {
    if !root("eager_populates_everything_before_returning") {
        return;
    }
    let image = image();
    let mem = AnonRegion::new(PAGES * PAGE_SIZE).unwrap();
    let region = lazy(
        &mem,
        source(),
        ServeOptions {
            eager: true,
            ..ServeOptions::default()
        },
    );
    assert_eq!(resident(&mem), PAGES);
    for p in 0..PAGES {
        assert_eq!(
            page(&mem, p),
            &image[p * PAGE_SIZE..][..PAGE_SIZE],
            "page {p}"
        );
    }
    let stats = region.stats();
    assert_eq!((stats.faults, stats.stale_faults), (0, 0));
    assert_eq!(stats.pages_copied, nonzero_pages() as u64);
    assert_eq!(stats.zero_pages, (PAGES - nonzero_pages()) as u64);
    assert_eq!(stats.bytes_fetched, (nonzero_pages() * PAGE_SIZE) as u64);
}

#[test]
fn two_threads_faulting_the_same_pages_get_one_copy_each() {
    if !root("two_threads_faulting_the_same_pages_get_one_copy_each") {
        return;
    }
    let image = Arc::new(image());
    let mut stale = 0;
    for _round in 0..10 {
        let mem = Arc::new(AnonRegion::new(PAGES * PAGE_SIZE).unwrap());
        let region = lazy(&mem, source(), readahead(0));
        let barrier = Arc::new(Barrier::new(2));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (mem, image, barrier) = (mem.clone(), image.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    for p in 0..PAGES {
                        touch(&mem, p);
                        assert_eq!(page(&mem, p), &image[p * PAGE_SIZE..][..PAGE_SIZE]);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let stats = region.stats();
        assert_eq!(stats.faults, PAGES as u64, "one demand fault per page");
        assert_eq!(stats.pages_copied, nonzero_pages() as u64, "no double copy");
        assert_eq!(stats.zero_pages, (PAGES - nonzero_pages()) as u64);
        assert_eq!(stats.bytes_fetched, (nonzero_pages() * PAGE_SIZE) as u64);
        assert_eq!((stats.fetch_errors, stats.copy_races), (0, 0));
        assert!(!stats.failed);
        stale += stats.stale_faults;
        drop(region);
    }
    println!("stale faults over 10 rounds of 2 x {PAGES} racing touches: {stale}");
}

/// Runs `f` on a thread and fails the test if it does not finish: a fault that is never
/// answered would otherwise hang the test forever.
fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("a faulting thread hung")
}

#[test]
fn a_failed_fetch_answers_zeros_and_fails_the_region() {
    if !root("a_failed_fetch_answers_zeros_and_fails_the_region") {
        return;
    }
    let image = image();
    let failing = Arc::new(Failing {
        inner: source(),
        failing: [10].into(),
    });
    let mem = Arc::new(AnonRegion::new(PAGES * PAGE_SIZE).unwrap());
    let region = lazy(&mem, failing, readahead(0));
    let m = mem.clone();
    let pages = within(move || {
        [9, 10, 11, 12]
            .map(|p| {
                touch(&m, p);
                page(&m, p).to_vec()
            })
            .to_vec()
    });
    assert_eq!(
        pages[0],
        image[9 * PAGE_SIZE..][..PAGE_SIZE],
        "before the failure"
    );
    assert!(pages[1..].iter().all(|p| p.iter().all(|&b| b == 0)));
    assert!(region.failed());
    assert!(region.failure().unwrap().contains("page server lost"));
    let stats = region.stats();
    assert_eq!(stats.faults, 4);
    assert_eq!(stats.fetch_errors, 1, "nothing fetched once failed");
    assert_eq!(
        stats.failed_pages, 3,
        "10 failed, 11 and 12 answered without fetching"
    );
    assert_eq!(stats.pages_copied, 1);
    assert_eq!(stats.zero_pages, 0);
    assert_eq!(stats.bytes_fetched, PAGE_SIZE as u64);
    assert!(stats.failed);
    assert_eq!(region.finish().unwrap().reason, StopReason::Stopped);
}

#[test]
fn a_failed_prefetch_only_counts() {
    if !root("a_failed_prefetch_only_counts") {
        return;
    }
    let image = image();
    // Window of page 10 with readahead 4: [10 11] data, [12] zero, [13 14] data.
    let failing = Arc::new(Failing {
        inner: source(),
        failing: [13].into(),
    });
    let mem = Arc::new(AnonRegion::new(PAGES * PAGE_SIZE).unwrap());
    let region = lazy(&mem, failing, readahead(4));
    let m = mem.clone();
    // Page 63 (zero, the last: a window of one) is a barrier: the handler takes faults in
    // order, so once 63 is in, page 10's window is done.
    within(move || (touch(&m, 10), touch(&m, 63)));
    let stats = region.stats();
    assert_eq!(
        (stats.faults, stats.prefetched, stats.fetch_errors),
        (2, 2, 1)
    );
    assert!(!region.failed(), "no thread waited on the failed pages");
    assert_eq!(page(&mem, 11), &image[11 * PAGE_SIZE..][..PAGE_SIZE]);
    assert_eq!(resident(&mem), 4);
    // Page 14 was not installed either; its own fault fetches it (its window 14..19 holds
    // no failing page).
    let m = mem.clone();
    within(move || touch(&m, 14));
    assert!(!region.failed());
    assert_eq!(page(&mem, 14), &image[14 * PAGE_SIZE..][..PAGE_SIZE]);
    // Page 13 itself cannot be had: now the region fails.
    let m = mem.clone();
    within(move || touch(&m, 13));
    assert!(region.failed());
    assert_eq!(region.stats().fetch_errors, 2);
}

#[test]
fn kernel_mode_reads_are_served() {
    if !root("kernel_mode_reads_are_served") {
        return;
    }
    // A WASI fd_write hands guest memory to write(2): the kernel's copy faults, and must be
    // served (a user-mode-only uffd would make it EFAULT).
    let image = image();
    let mem = AnonRegion::new(PAGES * PAGE_SIZE).unwrap();
    let region = lazy(&mem, source(), readahead(0));
    let (mut rx, mut tx) = std::io::pipe().unwrap();
    let written = tx.write(page(&mem, 8)).unwrap();
    assert_eq!(written, PAGE_SIZE);
    let mut back = vec![0u8; PAGE_SIZE];
    rx.read_exact(&mut back).unwrap();
    assert_eq!(back, image[8 * PAGE_SIZE..][..PAGE_SIZE]);
    assert_eq!(region.stats().faults, 1);
}

#[test]
fn discarded_pages_are_served_again() {
    if !root("discarded_pages_are_served_again") {
        return;
    }
    let image = image();
    let mem = AnonRegion::new(PAGES * PAGE_SIZE).unwrap();
    let region = lazy(&mem, source(), readahead(0));
    touch(&mem, 3);
    // SAFETY: page 3 of the test's own mapping; its content is disposable.
    unsafe { discard(mem.base().add(3 * PAGE_SIZE), PAGE_SIZE).unwrap() };
    assert_eq!(resident(&mem), 0);
    touch(&mem, 3);
    assert_eq!(page(&mem, 3), &image[3 * PAGE_SIZE..][..PAGE_SIZE]);
    let stats = region.stats();
    assert_eq!(
        (stats.faults, stats.pages_copied, stats.removed_pages),
        (2, 2, 1)
    );
}

#[test]
fn bad_regions_are_refused() {
    if !root("bad_regions_are_refused") {
        return;
    }
    let mem = AnonRegion::new((PAGES + 1) * PAGE_SIZE).unwrap();
    // SAFETY (all three): the test's own fresh mapping.
    let wrong_len =
        unsafe { LazyRegion::new(mem.base(), mem.len(), source(), ServeOptions::default()) };
    assert!(matches!(wrong_len, Err(LazyError::LengthMismatch { .. })));
    let odd = unsafe {
        LazyRegion::new(
            mem.base().add(1),
            PAGES * PAGE_SIZE,
            source(),
            ServeOptions::default(),
        )
    };
    assert!(matches!(odd, Err(LazyError::Misaligned { .. })));
    touch(&mem, 5);
    let touched = unsafe {
        LazyRegion::new(
            mem.base(),
            PAGES * PAGE_SIZE,
            source(),
            ServeOptions::default(),
        )
    };
    assert!(matches!(
        touched,
        Err(LazyError::AlreadyPopulated { pages: 1 })
    ));
}
