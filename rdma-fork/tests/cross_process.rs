//! The Firecracker model for real: a child process registers its memory, hands the uffd over
//! a Unix socket and touches pages; this process serves them from a MemfdSource. The child is
//! this test binary run again with `RDMA_FORK_CHILD` set.
//!
//! One test in this binary on purpose: it counts this process's open descriptors before and
//! after, which parallel tests would disturb.

mod common;

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use common::{Failing, PAGES, hash, image, is_zero_page, nonzero_pages, source};
use rdma_fork::{
    AnonRegion, PAGE_SIZE, PageSource, PidFd, ServeOptions, Served, StopReason, create_uffd,
    recv_uffd, register_region, resident_pages, send_uffd, serve_faults,
};

const TOUCHED: [usize; 10] = [0, 2, 3, 9, 17, 22, 31, 40, 57, 62];
const FAIL_PAGE: usize = 20;
const TEST: &str = "cross_process_handler";

fn touched(scenario: &str) -> Vec<usize> {
    match scenario {
        "touch" => TOUCHED.to_vec(),
        "sequential" => (0..PAGES).collect(),
        "fail" => vec![FAIL_PAGE - 1, FAIL_PAGE],
        other => panic!("unknown scenario {other}"),
    }
}

/// The child: map, register, hand the uffd over, touch, report, exit.
fn child(scenario: &str, socket: &str) -> Result<(), Box<dyn std::error::Error>> {
    let stream = UnixStream::connect(socket)?;
    let mem = AnonRegion::new(PAGES * PAGE_SIZE)?;
    let uffd = create_uffd()?;
    // SAFETY: a fresh mapping used for nothing but this test's touches.
    unsafe { register_region(&uffd, mem.base(), mem.len())? };
    send_uffd(&stream, &uffd, mem.as_ptr() as usize, mem.len())?;
    let mut report = String::new();
    for p in touched(scenario) {
        // SAFETY: inside the mapping; reading faults the page in through the parent.
        let bytes =
            unsafe { std::slice::from_raw_parts(mem.as_ptr().add(p * PAGE_SIZE), PAGE_SIZE) };
        writeln!(report, "page {p} {:016x}", hash(bytes))?;
    }
    writeln!(
        report,
        "resident {}",
        resident_pages(mem.as_ptr(), mem.len())?
    )?;
    (&stream).write_all(report.as_bytes())?;
    // `uffd` stays open until the process exits, as send_uffd asks.
    Ok(())
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

struct Outcome {
    status: ExitStatus,
    report: String,
    served: Served,
    handoff_len: usize,
}

/// Runs the child for `scenario` and serves its faults from `source`.
fn serve_child(scenario: &str, source: Arc<dyn PageSource>, readahead: u32) -> Outcome {
    let path: PathBuf =
        std::env::temp_dir().join(format!("rdma-fork-{}-{scenario}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env("RDMA_FORK_CHILD", scenario)
        .env("RDMA_FORK_SOCKET", &path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("child exited before connecting: {status}");
                }
                assert!(Instant::now() < deadline, "child never connected");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    drop(listener);
    let _ = std::fs::remove_file(&path);
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();

    let handoff = recv_uffd(&stream).unwrap();
    let handoff_len = handoff.len;
    // The child is ours and unreaped, so its pid cannot be reused under the pidfd.
    let peer = PidFd::open(child.id()).unwrap();
    let server = serve_faults(
        handoff.uffd,
        handoff.base,
        handoff.len,
        source,
        ServeOptions {
            readahead,
            peer: Some(peer),
            ..ServeOptions::default()
        },
    )
    .unwrap();

    let mut report = String::new();
    (&stream).read_to_string(&mut report).unwrap();
    let status = child.wait().unwrap();
    // The handler must notice the exit by itself; bound the wait so a miss fails, not hangs.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(server.join());
    });
    let served = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the handler did not end after its child exited")
        .unwrap();
    Outcome {
        status,
        report,
        served,
        handoff_len,
    }
}

#[test]
fn cross_process_handler() {
    if let Ok(scenario) = std::env::var("RDMA_FORK_CHILD") {
        let socket = std::env::var("RDMA_FORK_SOCKET").unwrap();
        let code = match child(&scenario, &socket) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("child {scenario}: {e}");
                2
            }
        };
        std::process::exit(code);
    }
    if !testkit::require_root(TEST, "userfaultfd with kernel-mode faults") {
        return;
    }
    let image = image();
    let fds_before = fd_count();

    // Demand paging of a subset, readahead off: exact counters, exact contents.
    let out = serve_child("touch", source(), 0);
    assert!(out.status.success(), "child: {}", out.status);
    assert_eq!(out.handoff_len, PAGES * PAGE_SIZE);
    let mut expected = String::new();
    for p in TOUCHED {
        writeln!(
            expected,
            "page {p} {:016x}",
            hash(&image[p * PAGE_SIZE..][..PAGE_SIZE])
        )
        .unwrap();
    }
    writeln!(expected, "resident {}", TOUCHED.len()).unwrap();
    assert_eq!(out.report, expected);
    let zero = TOUCHED.iter().filter(|&&p| is_zero_page(p)).count() as u64;
    let data = TOUCHED.len() as u64 - zero;
    assert!(zero >= 3 && data >= 3);
    let s = out.served.stats;
    assert_eq!(out.served.reason, StopReason::PeerExited);
    assert_eq!((s.faults, s.stale_faults), (TOUCHED.len() as u64, 0));
    assert_eq!(
        (s.pages_copied, s.zero_pages, s.prefetched),
        (data, zero, 0)
    );
    assert_eq!(s.bytes_fetched, data * PAGE_SIZE as u64);
    assert_eq!((s.fetch_errors, s.failed_pages, s.copy_races), (0, 0, 0));
    assert!(!s.failed);

    // Sequential touches with readahead 7: one fault per 8 pages.
    let out = serve_child("sequential", source(), 7);
    assert!(out.status.success(), "child: {}", out.status);
    assert!(out.report.ends_with(&format!("resident {PAGES}\n")));
    for (p, line) in out.report.lines().take(PAGES).enumerate() {
        let want = format!(
            "page {p} {:016x}",
            hash(&image[p * PAGE_SIZE..][..PAGE_SIZE])
        );
        assert_eq!(line, want);
    }
    let s = out.served.stats;
    assert_eq!((s.faults, s.prefetched), (8, PAGES as u64 - 8));
    assert_eq!(s.pages_copied, nonzero_pages() as u64);
    assert_eq!(s.bytes_fetched, (nonzero_pages() * PAGE_SIZE) as u64);

    // A fetch error kills the child before it can read made-up memory.
    let failing = Arc::new(Failing {
        inner: source(),
        failing: [FAIL_PAGE as u64].into(),
    });
    let out = serve_child("fail", failing, 0);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "child: {}",
        out.status
    );
    assert_eq!(out.report, "", "the child never got past the failed page");
    let s = out.served.stats;
    assert!(s.failed);
    assert!(
        out.served
            .failure
            .as_deref()
            .is_some_and(|f| f.contains("page server lost"))
    );
    assert!(matches!(
        out.served.reason,
        StopReason::PeerExited | StopReason::PeerGone
    ));
    assert_eq!((s.faults, s.pages_copied, s.fetch_errors), (2, 1, 1));

    // Every uffd, pidfd, eventfd, socket and memfd of the three rounds is closed.
    assert_eq!(fd_count(), fds_before, "descriptors leaked");
}
