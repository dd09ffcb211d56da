//! A hostile worker against its chain's arena, over the real binary: it reaches the very
//! files behind its own mappings (as it could through /proc/self/map_files) and tries to
//! resize them, to write the allocator state, and to scribble over payloads. Only the last
//! is possible, and the gateway keeps allocating, serving requests and /metrics.

mod common;

use std::fs::{File, OpenOptions};
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use common::Spindle;
use nix::errno::Errno;
use nix::sys::mman::{MapFlags, ProtFlags, mmap, mprotect, munmap};

const SLOTS: usize = 8;

const CONFIG: &str = r#"
functions:
  - name: uppercase
    module: {wasm:uppercase}
chains:
  - name: up
    route: /up
    steps: [uppercase]
    arena: { slot_size: 4KiB, slots: 8 }
"#;

/// Opens, read-write, the file behind the worker's mapping whose name ends `suffix` (memfd
/// names show as `/memfd:NAME (deleted)`), with that mapping's length.
fn open_mapped(worker: i32, suffix: &str) -> (File, usize) {
    let maps = std::fs::read_to_string(format!("/proc/{worker}/maps")).unwrap();
    let range = maps
        .lines()
        .find(|l| l.ends_with(suffix))
        .and_then(|l| l.split(' ').next())
        .unwrap_or_else(|| panic!("no mapping ending {suffix:?} in the worker:\n{maps}"));
    let (start, end) = range.split_once('-').unwrap();
    let len = usize::from_str_radix(end, 16).unwrap() - usize::from_str_radix(start, 16).unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{worker}/map_files/{range}"))
        .unwrap_or_else(|e| panic!("opening the worker's {suffix:?} read-write: {e}"));
    (file, len)
}

fn map_shared(
    file: &File,
    len: usize,
    prot: ProtFlags,
) -> nix::Result<std::ptr::NonNull<libc::c_void>> {
    // SAFETY: a fresh mapping at an address the kernel picks, so it aliases nothing of ours;
    // it is only used through raw-pointer writes, mprotect and munmap below.
    unsafe {
        mmap(
            None,
            NonZeroUsize::new(len).unwrap(),
            prot,
            MapFlags::MAP_SHARED,
            file.as_fd(),
            0,
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cannot_resize_the_arena_or_write_its_allocator_state() {
    const TEST: &str = "a_worker_cannot_resize_the_arena_or_write_its_allocator_state";
    let spindle = Spindle::start("arena-hostile", CONFIG).await;
    assert_eq!(spindle.post("/up", "before").await.text(), "BEFORE");
    if !testkit::require_root(
        TEST,
        "opening another process's mappings through /proc/PID/map_files",
    ) {
        return;
    }
    let worker = spindle.worker_pids("uppercase")[0];
    let (meta, meta_len) = open_mapped(worker, "memfd:spindle-up-meta (deleted)");
    let (payload, payload_len) = open_mapped(worker, "memfd:spindle-up (deleted)");

    // (a) Neither file can be resized: shrinking would turn the gateway's next access into
    // a SIGBUS, growing would waste memory.
    for (file, what) in [(&meta, "metadata"), (&payload, "payload")] {
        for len in [0, 1 << 30] {
            let err = file.set_len(len).expect_err(what);
            assert_eq!(
                err.raw_os_error(),
                Some(libc::EPERM),
                "{what} to {len}: {err}"
            );
        }
    }

    // (b) The metadata (slot states, generations, request ids) cannot be written by any
    // route: not through a new shared mapping, not by making the worker-style read-only
    // mapping writable, not by write(2).
    let err = map_shared(
        &meta,
        meta_len,
        ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
    )
    .expect_err("writable shared mapping of the metadata");
    assert_eq!(err, Errno::EPERM);
    let ro = map_shared(&meta, meta_len, ProtFlags::PROT_READ).unwrap();
    // SAFETY: `ro` is our own fresh mapping of meta_len bytes; nothing references it.
    let err = unsafe { mprotect(ro, meta_len, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE) }
        .expect_err("mprotect of a read-only mapping to writable");
    assert!(matches!(err, Errno::EACCES | Errno::EPERM), "{err}");
    // SAFETY: unmapped once, not used after.
    unsafe { munmap(ro, meta_len).unwrap() };
    let err = meta.write_at(&[0xff; 64], 64).expect_err("write(2)");
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");

    // (c) Payload bytes are the workers' to write: trash every slot while nothing is in
    // flight. That may corrupt requests' bodies, never which slot is whose.
    let scribble = map_shared(
        &payload,
        payload_len,
        ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
    )
    .expect("workers map the payload read-write");
    // SAFETY: our own fresh mapping of payload_len bytes, written through a raw pointer
    // only (the bytes are shared with other processes), then unmapped and not used again.
    unsafe {
        std::ptr::write_bytes(scribble.as_ptr().cast::<u8>(), 0xff, payload_len);
        munmap(scribble, payload_len).unwrap();
    }
    drop((meta, payload));

    // More requests than slots, several at once: every slot goes round, and each request
    // gets its own answer.
    let spindle = Arc::new(spindle);
    for round in 0..3 {
        let mut requests = tokio::task::JoinSet::new();
        for i in 0..SLOTS {
            let spindle = Arc::clone(&spindle);
            requests.spawn(async move {
                let body = format!("round {round} request {i}");
                (spindle.post("/up", body.clone()).await, body)
            });
        }
        while let Some(done) = requests.join_next().await {
            let (reply, body) = done.unwrap();
            assert_eq!(reply.status, 200, "{body}: {}", reply.text());
            assert_eq!(reply.text(), body.to_uppercase());
        }
    }
    let page = spindle.get("/metrics").await;
    assert_eq!(page.status, 200);
    let free = spindle
        .metric(r#"spindle_arena_slots{chain="up",state="free"}"#)
        .await;
    assert_eq!(
        free,
        Some(SLOTS as f64),
        "every slot came back:\n{}",
        page.text()
    );
    assert!(
        page.text().contains(
            r#"spindle_function_errors_total{chain="up",function="uppercase",kind="request_mismatch"} 0"#
        ),
        "the replay counter is exported from the start"
    );
    assert_eq!(
        spindle
            .metric(r#"spindle_instance_restarts_total{chain="up",function="uppercase"}"#)
            .await,
        Some(0.0),
        "the worker survived its own attempts"
    );
}
