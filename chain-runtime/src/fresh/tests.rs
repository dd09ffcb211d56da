use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::config::{FunctionSpec, Isolation, ModuleMode, StartMode};
use crate::host::{BufferIo, FunctionHost, Outcome};
use crate::snapshot::MemoryFill;

/// State in every place a request can leave it: a non-exported mutable global counting
/// calls, a counter in linear memory (page 1), one more page of memory per call (whose
/// first word it reports before marking it), and stdout, which input `c` closes. Answers
/// five u32: calls, memory counter, memory size in pages, the errno of an empty write to
/// stdout, and what the newly grown page held. Input `t` traps after changing all of it;
/// input `p` first reads just past the image's two pages (out of bounds unless memory kept
/// a growth).
const COUNTING: &str = r#"(module
    (import "spindle" "output" (func $output (param i32 i32)))
    (import "wasi_snapshot_preview1" "fd_close" (func $close (param i32) (result i32)))
    (import "wasi_snapshot_preview1" "fd_write"
        (func $write (param i32 i32 i32 i32) (result i32)))
    (memory (export "memory") 2 8)
    (global $calls (mut i32) (i32.const 0))
    (func (export "spindle_alloc") (param i32) (result i32) (i32.const 1024))
    (func (export "spindle_handle") (param $p i32) (param $n i32) (result i32)
        (local $cmd i32) (local $old i32) (local $seen i32)
        (local.set $cmd (i32.load8_u (local.get $p)))
        (if (i32.eq (local.get $cmd) (i32.const 0x70))
            (then (drop (i32.load (i32.const 131072)))))
        (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
        (i32.store (i32.const 4096) (i32.add (i32.load (i32.const 4096)) (i32.const 1)))
        (local.set $old (memory.grow (i32.const 1)))
        (local.set $seen (i32.load (i32.mul (local.get $old) (i32.const 65536))))
        (i32.store (i32.mul (local.get $old) (i32.const 65536)) (i32.const 0xdead))
        (if (i32.eq (local.get $cmd) (i32.const 0x63))
            (then (drop (call $close (i32.const 1)))))
        (i32.store (i32.const 8192) (i32.const 8300))
        (i32.store (i32.const 8196) (i32.const 0))
        (i32.store (i32.const 200) (global.get $calls))
        (i32.store (i32.const 204) (i32.load (i32.const 4096)))
        (i32.store (i32.const 208) (memory.size))
        (i32.store (i32.const 212)
            (call $write (i32.const 1) (i32.const 8192) (i32.const 1) (i32.const 8200)))
        (i32.store (i32.const 216) (local.get $seen))
        (if (i32.eq (local.get $cmd) (i32.const 0x74)) (then unreachable))
        (call $output (i32.const 200) (i32.const 20))
        (i32.const 0)))"#;

/// One COUNTING answer.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    calls: u32,
    in_memory: u32,
    pages: u32,
    stdout_errno: u32,
    grown_page: u32,
}

fn seen(out: &[u8]) -> Seen {
    assert_eq!(out.len(), 20, "{out:?}");
    let word = |i: usize| u32::from_le_bytes(out[i * 4..i * 4 + 4].try_into().unwrap());
    Seen {
        calls: word(0),
        in_memory: word(1),
        pages: word(2),
        stdout_errno: word(3),
        grown_page: word(4),
    }
}

/// What a fresh copy of the COUNTING image answers to any request that does not close
/// stdout.
const FIRST: Seen = Seen {
    calls: 1,
    in_memory: 1,
    pages: 3,
    stdout_errno: 0,
    grown_page: 0,
};

fn spec(tag: &str, wat: &str, isolation: Isolation) -> FunctionSpec {
    let path: PathBuf =
        std::env::temp_dir().join(format!("spindle-fresh-{tag}-{}.wat", std::process::id()));
    std::fs::write(&path, wat).unwrap();
    FunctionSpec {
        name: tag.to_string(),
        module: path,
        instances: crate::config::Instances::fixed(1),
        wait_queue: 256,
        memory_limit: 1 << 20,
        timeout: Duration::from_secs(1),
        fuel: Some(5_000_000),
        mode: ModuleMode::Reactor,
        env: vec![],
        start: StartMode::Exec,
        isolation,
        idle_spin: std::time::Duration::ZERO,
        args: Vec::new(),
        files: Vec::new(),
    }
}

fn call(host: &mut FunctionHost, input: &[u8]) -> Vec<u8> {
    let mut io = BufferIo::new(256, input);
    match host.invoke(&mut io) {
        Outcome::Done { .. } => io.output,
        failed => panic!("request {input:?} failed: {failed:?}"),
    }
}

fn failure(host: &mut FunctionHost, input: &[u8]) -> String {
    match host.invoke(&mut BufferIo::new(256, input)) {
        Outcome::Failed { message, .. } => message,
        done => panic!("request {input:?} did not fail: {done:?}"),
    }
}

/// Whether this kernel answers PAGEMAP_SCAN (Linux 6.7+).
fn has_pagemap_scan() -> bool {
    let pagemap = File::open("/proc/self/pagemap").unwrap();
    let probe = [0u64; 512];
    scan_written(&pagemap, probe.as_ptr() as usize & !4095, 4096, |_, _| {
        Ok(())
    })
    .is_ok()
}

/// Runs `prepare` (what the worker does after answering) and returns the resets so far.
fn resets(host: &mut FunctionHost) -> Vec<ResetReport> {
    host.prepare().unwrap();
    host.take_resets().collect()
}

#[test]
fn every_request_sees_a_fresh_copy_while_reuse_accumulates() {
    let mut fresh = FunctionHost::new(
        &spec("count-fresh", COUNTING, Isolation::FreshPerRequest),
        None,
    )
    .unwrap();
    let mut reused =
        FunctionHost::new(&spec("count-reuse", COUNTING, Isolation::Reuse), None).unwrap();
    for i in 1..=4u32 {
        assert_eq!(seen(&call(&mut fresh, b"x")), FIRST, "fresh request {i}");
        assert_eq!(
            seen(&call(&mut reused, b"x")),
            Seen {
                calls: i,
                in_memory: i,
                pages: 2 + i,
                ..FIRST
            },
            "reused request {i}"
        );
    }
    // The first invoke armed the instance; each later one reset it first, and the worker's
    // prepare resets after the last.
    let done = resets(&mut fresh);
    assert_eq!(done.len(), 4, "{done:?}");
    for r in &done {
        assert!(!r.rebuilt, "reset in place, not rebuilt: {r:?}");
        assert!(r.shrank, "the guest grew memory every call: {r:?}");
        // Page 0 (input and output), 1 (the counter), 2 (the iovec and nwritten); the grown
        // page is discarded, not counted. 0 on a kernel without PAGEMAP_SCAN.
        let expected = if has_pagemap_scan() { 3 } else { 0 };
        assert_eq!(r.pages, expected, "{r:?}");
    }
    assert!(
        resets(&mut reused).is_empty(),
        "a reused instance never resets"
    );
}

#[test]
fn a_trap_is_reset_in_place_like_any_call() {
    let mut host = FunctionHost::new(
        &spec("count-trap", COUNTING, Isolation::FreshPerRequest),
        None,
    )
    .unwrap();
    assert_eq!(seen(&call(&mut host, b"x")), FIRST);
    assert!(failure(&mut host, b"t").contains("unreachable"));
    let done = resets(&mut host);
    assert_eq!(done.len(), 2);
    assert!(done.iter().all(|r| !r.rebuilt), "{done:?}");
    assert_eq!(seen(&call(&mut host, b"x")), FIRST);
}

#[test]
fn memory_grown_by_a_request_is_gone_and_out_of_bounds_again() {
    let mut host = FunctionHost::new(
        &spec("count-grow", COUNTING, Isolation::FreshPerRequest),
        None,
    )
    .unwrap();
    // Grows to 3 pages and marks page 2.
    assert_eq!(seen(&call(&mut host, b"x")), FIRST);
    // Back at 2 pages, page 2 must trap (its mapping is inaccessible again) ...
    assert!(failure(&mut host, b"p").contains("out of bounds"));
    // ... and when grown again it is zero, not the last request's mark.
    assert_eq!(seen(&call(&mut host, b"x")), FIRST);
    let mut reused =
        FunctionHost::new(&spec("count-grow-reuse", COUNTING, Isolation::Reuse), None).unwrap();
    call(&mut reused, b"x");
    let probe = seen(&call(&mut reused, b"p"));
    assert_eq!(
        probe.pages, 4,
        "reused: the growth stays, so the probe reads"
    );
}

#[test]
fn closed_stdout_is_open_again_for_the_next_request() {
    let mut fresh = FunctionHost::new(
        &spec("count-close", COUNTING, Isolation::FreshPerRequest),
        None,
    )
    .unwrap();
    let mut reused =
        FunctionHost::new(&spec("count-close-reuse", COUNTING, Isolation::Reuse), None).unwrap();
    for host in [&mut fresh, &mut reused] {
        assert_eq!(seen(&call(host, b"c")).stdout_errno, 8, "BADF once closed");
    }
    assert_eq!(seen(&call(&mut fresh, b"x")), FIRST);
    assert_eq!(seen(&call(&mut reused, b"x")).stdout_errno, 8);
}

#[test]
fn a_forked_child_resets_to_its_zygotes_image_not_to_its_own_state() {
    let spec = spec("count-fork", COUNTING, Isolation::FreshPerRequest);
    // The zygote's way: a cold instance, never prepared, captured. Warm it first with two
    // requests under reuse, so the image is recognisably this parent's.
    let reuse = FunctionSpec {
        isolation: Isolation::Reuse,
        idle_spin: std::time::Duration::ZERO,
        ..spec.clone()
    };
    let mut parent = FunctionHost::new(&reuse, None).unwrap();
    call(&mut parent, b"x");
    call(&mut parent, b"x");
    let image = parent.snapshot().unwrap();
    let mut child = FunctionHost::fork(
        &spec,
        None,
        crate::wasi::Preopens::none(),
        &parent.compiled_module(),
        image.meta(),
        MemoryFill::Map(image.image()),
        Some(image.clone()),
    )
    .unwrap();
    for _ in 0..3 {
        // Third call of the image every time: 2 + 1, memory 4 + 1 pages.
        assert_eq!(
            seen(&call(&mut child, b"x")),
            Seen {
                calls: 3,
                in_memory: 3,
                pages: 5,
                ..FIRST
            }
        );
    }
    // What the child resets to, and would hand out as its image, is the zygote's memfd.
    let again = child.snapshot().unwrap();
    assert_eq!(again.image().as_raw_fd(), image.image().as_raw_fd());
    assert!(resets(&mut child).iter().all(|r| !r.rebuilt));
}

#[test]
fn the_image_of_a_fresh_instance_holds_no_request() {
    let spec = spec("count-image", COUNTING, Isolation::FreshPerRequest);
    let mut host = FunctionHost::new(&spec, None).unwrap();
    for _ in 0..3 {
        call(&mut host, b"x");
    }
    let image = host.snapshot().unwrap();
    let reuse = FunctionSpec {
        isolation: Isolation::Reuse,
        idle_spin: std::time::Duration::ZERO,
        ..spec.clone()
    };
    let mut child = FunctionHost::fork(
        &reuse,
        None,
        crate::wasi::Preopens::none(),
        &host.compiled_module(),
        image.meta(),
        MemoryFill::Map(image.image()),
        Some(image.clone()),
    )
    .unwrap();
    assert_eq!(seen(&call(&mut child, b"x")), FIRST);
}

/// Counts `spindle_on_fork` runs in a global and in memory; answers both.
const ON_FORK: &str = r#"(module
    (import "spindle" "output" (func $output (param i32 i32)))
    (memory (export "memory") 1)
    (global $forks (mut i32) (i32.const 0))
    (func (export "spindle_on_fork")
        (global.set $forks (i32.add (global.get $forks) (i32.const 1)))
        (i32.store (i32.const 300) (i32.add (i32.load (i32.const 300)) (i32.const 1))))
    (func (export "spindle_alloc") (param i32) (result i32) (i32.const 1024))
    (func (export "spindle_handle") (param i32 i32) (result i32)
        (i32.store (i32.const 200) (global.get $forks))
        (i32.store (i32.const 204) (i32.load (i32.const 300)))
        (call $output (i32.const 200) (i32.const 8)) (i32.const 0)))"#;

#[test]
fn spindle_on_fork_runs_once_in_every_fresh_copy() {
    let mut fresh =
        FunctionHost::new(&spec("onfork", ON_FORK, Isolation::FreshPerRequest), None).unwrap();
    let mut reused =
        FunctionHost::new(&spec("onfork-reuse", ON_FORK, Isolation::Reuse), None).unwrap();
    for _ in 0..3 {
        assert_eq!(call(&mut fresh, b""), [1, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(call(&mut reused, b""), [0; 8], "never forked");
    }
}

/// Changes a table at run time (and reports whether element 0 was still null), which a reset
/// in place cannot undo: such an instance is rebuilt from the image after every call.
const TABLE_SET: &str = r#"(module
    (import "spindle" "output" (func $output (param i32 i32)))
    (memory (export "memory") 1)
    (table $t 2 funcref)
    (global $calls (mut i32) (i32.const 0))
    (func $f)
    (elem declare func $f)
    (func (export "spindle_alloc") (param i32) (result i32) (i32.const 1024))
    (func (export "spindle_handle") (param i32 i32) (result i32)
        (i32.store (i32.const 200) (ref.is_null (table.get $t (i32.const 0))))
        (table.set $t (i32.const 0) (ref.func $f))
        (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
        (i32.store (i32.const 204) (global.get $calls))
        (call $output (i32.const 200) (i32.const 8)) (i32.const 0)))"#;

#[test]
fn a_module_that_changes_tables_is_rebuilt_from_the_image_instead() {
    let mut host =
        FunctionHost::new(&spec("table", TABLE_SET, Isolation::FreshPerRequest), None).unwrap();
    for _ in 0..3 {
        assert_eq!(call(&mut host, b""), [1, 0, 0, 0, 1, 0, 0, 0]);
    }
    let done = resets(&mut host);
    assert_eq!(done.len(), 3);
    assert!(done.iter().all(|r| r.rebuilt && r.pages == 0), "{done:?}");
    let mut reused =
        FunctionHost::new(&spec("table-reuse", TABLE_SET, Isolation::Reuse), None).unwrap();
    call(&mut reused, b"");
    assert_eq!(call(&mut reused, b""), [0, 0, 0, 0, 2, 0, 0, 0]);
}

/// Writes page 16 + i for i < the input's length, answering the sum of the bytes it found
/// there first (0 in a fresh copy of the image).
const TOUCH: &str = r#"(module
    (import "spindle" "output" (func $output (param i32 i32)))
    (memory (export "memory") 40)
    (func (export "spindle_alloc") (param i32) (result i32) (i32.const 1024))
    (func (export "spindle_handle") (param $p i32) (param $n i32) (result i32)
        (local $i i32) (local $sum i32) (local $at i32)
        (block $done (loop $page
            (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
            (local.set $at (i32.shl (i32.add (local.get $i) (i32.const 16)) (i32.const 12)))
            (local.set $sum (i32.add (local.get $sum) (i32.load8_u (local.get $at))))
            (i32.store8 (local.get $at) (i32.const 1))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $page)))
        (i32.store (i32.const 200) (local.get $sum))
        (call $output (i32.const 200) (i32.const 4)) (i32.const 0)))"#;

#[test]
fn few_written_pages_are_copied_back_and_many_or_every_64th_reset_dropped() {
    if !has_pagemap_scan() {
        eprintln!("no PAGEMAP_SCAN: every reset drops the whole range");
        return;
    }
    let spec = FunctionSpec {
        memory_limit: 3 << 20,
        ..spec("touch", TOUCH, Isolation::FreshPerRequest)
    };
    let mut host = FunctionHost::new(&spec, None).unwrap();
    let mut all = Vec::new();
    // Above KEEP_RESIDENT_PAGES (600 pages + the input's): dropped, and still fresh after.
    for _ in 0..2 {
        assert_eq!(call(&mut host, &[b'x'; 600]), [0; 4]);
        let done = resets(&mut host);
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].pages, done[0].copied), (601, false), "{done:?}");
        all.extend(done);
    }
    // Few: copied back, except at every DROP_EVERY-th reset; fresh either way.
    while all.len() < 2 * DROP_EVERY as usize + 2 {
        assert_eq!(call(&mut host, &[b'x'; 10]), [0; 4]);
        let done = resets(&mut host);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].pages, 11, "{done:?}");
        all.extend(done);
    }
    for (i, r) in all.iter().enumerate().skip(2) {
        let nth = i as u64 + 1;
        assert_eq!(
            r.copied,
            !nth.is_multiple_of(DROP_EVERY),
            "reset {nth}: {r:?}"
        );
    }
}

#[test]
fn instructions_that_change_instance_state_are_found() {
    assert_eq!(instance_state_op(TABLE_SET.as_bytes()), Some("table.set"));
    assert_eq!(instance_state_op(COUNTING.as_bytes()), None);
    assert_eq!(instance_state_op(ON_FORK.as_bytes()), None);
    let data_drop = r#"(module (memory 1) (data $d "x") (func (data.drop $d)))"#;
    assert_eq!(instance_state_op(data_drop.as_bytes()), Some("data.drop"));
    let grow =
        r#"(module (table 1 funcref) (func (drop (table.grow (ref.null func) (i32.const 1)))))"#;
    assert_eq!(instance_state_op(grow.as_bytes()), Some("table.grow"));
    assert_eq!(instance_state_op(b"\0asm junk"), Some("unreadable code"));
}

#[test]
fn pagemap_scan_finds_exactly_the_written_pages_of_a_private_file_mapping() {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    use nix::sys::mman::{mmap, munmap};
    let page = IMAGE_PAGE as usize;
    let len = 64 * page;
    let fd = memfd_create("fresh-scan", MFdFlags::MFD_CLOEXEC).unwrap();
    let file = File::from(fd);
    file.set_len(len as u64).unwrap();
    // SAFETY: a new private mapping of a memfd this test owns, unmapped at the end.
    let base = unsafe {
        mmap(
            None,
            NonZeroUsize::new(len).unwrap(),
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_PRIVATE,
            &file,
            0,
        )
    }
    .unwrap();
    let at = base.as_ptr() as usize;
    let memory = at as *mut u8;
    // SAFETY: every offset is inside the mapping; nothing else uses it.
    unsafe {
        for p in 0..64 {
            // Read every page (file pages now mapped), write pages 3, 4, 5 and 40.
            std::ptr::read_volatile(memory.add(p * page));
        }
        for p in [3, 4, 5, 40] {
            memory.add(p * page).write_volatile(7);
        }
    }
    let pagemap = File::open("/proc/self/pagemap").unwrap();
    let mut runs = Vec::new();
    match scan_written(&pagemap, at, len, |start, n| {
        runs.push(((start - at) / page, n / page));
        Ok(())
    }) {
        Ok(pages) => {
            assert_eq!(runs, [(3, 3), (40, 1)]);
            assert_eq!(pages, 4);
            // Dropped, the written pages read as the file again and are no longer found.
            for (first, n) in &runs {
                // SAFETY: inside the mapping; nothing references it.
                unsafe { drop_pages(at + first * page, n * page) }.unwrap();
            }
            // SAFETY: inside the mapping.
            assert_eq!(unsafe { memory.add(3 * page).read_volatile() }, 0);
            assert_eq!(scan_written(&pagemap, at, len, |_, _| Ok(())).unwrap(), 0);
        }
        // Kernels before 6.7: resets fall back to dropping the whole range.
        Err(ResetError::Sys { source, .. }) if source.raw_os_error() == Some(libc::ENOTTY) => {
            eprintln!("no PAGEMAP_SCAN on this kernel: {source}")
        }
        Err(e) => panic!("{e}"),
    }
    // SAFETY: the mapping made above; nothing references it any more.
    unsafe { munmap(base, len) }.unwrap();
}

#[test]
fn an_instance_whose_memory_the_caller_filled_is_refused() {
    // What resuming from a remote image does: memory filled through the callback (there,
    // userfaultfd), no local image to drop pages back to.
    let spec = spec("caller-fill", COUNTING, Isolation::FreshPerRequest);
    let mut parent = FunctionHost::new(
        &FunctionSpec {
            isolation: Isolation::Reuse,
            idle_spin: std::time::Duration::ZERO,
            ..spec.clone()
        },
        None,
    )
    .unwrap();
    let image = parent.snapshot().unwrap();
    let contents = parent.memory_copy().unwrap();
    let mut fill =
        |region: snapshot::MemoryRegion| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            // SAFETY: the region is the child's fresh memory, `len` bytes, unreferenced.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    contents.as_ptr(),
                    region.base().as_ptr(),
                    region.len(),
                )
            };
            Ok(())
        };
    let mut child = FunctionHost::fork(
        &spec,
        None,
        crate::wasi::Preopens::none(),
        &parent.compiled_module(),
        image.meta(),
        MemoryFill::Caller(&mut fill),
        None,
    )
    .unwrap();
    let err = child.prepare().unwrap_err();
    assert!(
        matches!(
            &err,
            crate::host::HostError::Fresh {
                source: ResetError::NoLocalImage,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("no local image"), "{err}");
}
