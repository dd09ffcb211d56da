use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

use std::num::NonZeroUsize;

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{MapFlags, ProtFlags, mmap};
use nix::sys::stat::fstat;
use nix::unistd::{Whence, lseek};

use super::*;
use crate::config::{Config, FunctionSpec, ModuleMode};
use crate::host::{BufferIo, COMPILES, CompiledModule, FunctionHost, HostError, Outcome};
use crate::instance::InstanceBuilder;

/// Runs one request; panics unless it succeeds.
fn call(host: &mut FunctionHost, input: &[u8]) -> Vec<u8> {
    let mut io = BufferIo::new(256, input);
    match host.invoke(&mut io) {
        Outcome::Done { .. } => io.output,
        failed => panic!("request {input:?} failed: {failed:?}"),
    }
}

fn module_file(tag: &str, wat: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("spindle-snap-{tag}-{}.wat", std::process::id()));
    std::fs::write(&path, wat).unwrap();
    path
}

fn spec_for(tag: &str, module: PathBuf) -> FunctionSpec {
    FunctionSpec {
        name: tag.to_string(),
        module,
        instances: crate::config::Instances::fixed(1),
        wait_queue: 256,
        memory_limit: 1 << 20,
        timeout: Duration::from_secs(1),
        fuel: Some(5_000_000),
        mode: ModuleMode::Reactor,
        env: vec![("GREETING".into(), "hi".into())],
        start: crate::config::StartMode::Fork,
        isolation: crate::config::Isolation::Reuse,
        idle_spin: std::time::Duration::ZERO,
        args: Vec::new(),
        files: Vec::new(),
    }
}

fn spec(tag: &str, wat: &str) -> FunctionSpec {
    spec_for(tag, module_file(tag, wat))
}

/// A child of `parent` built from `snap` with the image mapped (what `from_snapshot` does).
fn fork(
    parent: &FunctionHost,
    snap: &Snapshot,
    spec: &FunctionSpec,
) -> Result<FunctionHost, HostError> {
    FunctionHost::fork(
        spec,
        None,
        crate::wasi::Preopens::none(),
        &parent.compiled_module(),
        snap.meta(),
        MemoryFill::Map(snap.image()),
        Some(snap.clone()),
    )
}

/// State in three places: a non-exported mutable i64 global counting requests, a word that
/// `_initialize` increments (so it reads 2 if a child ran `_initialize` again) and a word
/// summing input lengths; plus the allocator's bump pointer (another non-exported global).
/// Answers 16 bytes: calls (u64), the `_initialize` word, the sum. Input `trap` traps.
const COUNTER: &str = r#"(module
    (import "spindle" "output" (func $output (param i32 i32)))
    (memory (export "memory") 2)
    (global $bump (mut i32) (i32.const 1024))
    (global $calls (mut i64) (i64.const 0))
    (data (i32.const 40000) "image")
    (func (export "_initialize")
        (i32.store (i32.const 100) (i32.add (i32.load (i32.const 100)) (i32.const 1))))
    (func (export "spindle_alloc") (param $n i32) (result i32)
        (local $p i32)
        (local.set $p (global.get $bump))
        (global.set $bump (i32.add (global.get $bump) (local.get $n)))
        (local.get $p))
    (func (export "spindle_handle") (param $p i32) (param $n i32) (result i32)
        (if (i32.eq (i32.load (local.get $p)) (i32.const 0x70617274)) (then unreachable))
        (global.set $calls (i64.add (global.get $calls) (i64.const 1)))
        (i32.store (i32.const 104) (i32.add (i32.load (i32.const 104)) (local.get $n)))
        (i64.store (i32.const 200) (global.get $calls))
        (i32.store (i32.const 208) (i32.load (i32.const 100)))
        (i32.store (i32.const 212) (i32.load (i32.const 104)))
        (call $output (i32.const 200) (i32.const 16))
        (i32.const 0)))"#;

/// (calls, `_initialize` runs, sum of input lengths) from a COUNTER answer.
fn counter(out: &[u8]) -> (u64, u32, u32) {
    assert_eq!(out.len(), 16, "{out:?}");
    (
        u64::from_le_bytes(out[..8].try_into().unwrap()),
        u32::from_le_bytes(out[8..12].try_into().unwrap()),
        u32::from_le_bytes(out[12..].try_into().unwrap()),
    )
}

/// A warm COUNTER parent: three requests of 1, 2 and 3 bytes.
fn warm_counter(tag: &str) -> (FunctionSpec, FunctionHost) {
    let spec = spec(tag, COUNTER);
    let mut parent = FunctionHost::new(&spec, None).unwrap();
    for input in [&b"a"[..], b"bb", b"ccc"] {
        call(&mut parent, input);
    }
    (spec, parent)
}

fn read_all(fd: BorrowedFd<'_>) -> Vec<u8> {
    let file = File::from(fd.try_clone_to_owned().unwrap());
    let mut buf = vec![0; file.metadata().unwrap().len() as usize];
    file.read_exact_at(&mut buf, 0).unwrap();
    buf
}

#[test]
fn child_starts_with_the_parents_state_without_running_initialize() {
    let (spec, mut parent) = warm_counter("state");
    let snap = parent.snapshot().unwrap();
    let mut child = fork(&parent, &snap, &spec).unwrap();
    // 4th call overall: $calls (a non-exported global) came across, `_initialize` ran once
    // (in the parent), and the sum built by the parent's requests is there.
    assert_eq!(counter(&call(&mut child, b"dddd")), (4, 1, 10));
    // The bump pointer (non-exported) came across too: the child allocates after the
    // parent's buffers, so its input did not overwrite the parent's at 1024.
    let memory = child.memory_copy().unwrap();
    assert_eq!(&memory[1024..1030], b"abbccc");
    assert_eq!(&memory[1030..1034], b"dddd");
    assert_eq!(&memory[40000..40005], b"image");
}

#[test]
fn children_are_independent_of_each_other_and_of_the_parent() {
    let (spec, mut parent) = warm_counter("indep");
    let snap = parent.snapshot().unwrap();
    let image_before = read_all(snap.image());
    let mut a = fork(&parent, &snap, &spec).unwrap();
    let mut b = fork(&parent, &snap, &spec).unwrap();
    assert_eq!(counter(&call(&mut a, b"xxxxxxxxxx")), (4, 1, 16));
    assert_eq!(counter(&call(&mut a, b"x")), (5, 1, 17));
    // b sees none of a's writes, nor the parent's after the snapshot.
    assert_eq!(counter(&call(&mut parent, b"pp")), (4, 1, 8));
    assert_eq!(counter(&call(&mut b, b"y")), (4, 1, 7));
    assert_eq!(counter(&call(&mut parent, b"p")), (5, 1, 9));
    // Nobody's writes reached the image.
    assert_eq!(read_all(snap.image()), image_before, "image changed");
    let mut c = fork(&parent, &snap, &spec).unwrap();
    assert_eq!(counter(&call(&mut c, b"")), (4, 1, 6));
}

#[test]
fn image_holds_only_the_nonzero_pages_and_is_sealed() {
    let (_, mut parent) = warm_counter("pages");
    let memory = parent.memory_copy().unwrap();
    let snap = parent.snapshot().unwrap();
    let meta = snap.meta();
    assert_eq!(meta.memory.bytes, memory.len() as u64);
    assert_eq!(memory.len(), 2 * 65536);

    // The map says exactly which pages of the parent's memory are non-zero: here the
    // counters and buffers in page 0 and the data segment in page 9.
    let expected: Vec<u64> = (0..memory.len() as u64 / IMAGE_PAGE)
        .filter(|&p| {
            memory[(p * IMAGE_PAGE) as usize..][..IMAGE_PAGE as usize]
                .iter()
                .any(|&b| b != 0)
        })
        .collect();
    assert_eq!(expected, [0, 9]);
    assert_eq!(meta.memory.nonzero.iter_set().collect::<Vec<_>>(), expected);

    // The memfd has the parent's bytes, data only where the map says, holes elsewhere.
    let fd = snap.image();
    assert_eq!(read_all(fd), memory);
    let mut data_pages = Vec::new();
    let mut at = 0i64;
    // SEEK_DATA fails with ENXIO once no data lies past `at`.
    while let Ok(start) = lseek(fd, at, Whence::SeekData) {
        let end = lseek(fd, start, Whence::SeekHole).unwrap();
        assert!(end > start);
        data_pages.extend((start as u64 / IMAGE_PAGE)..(end as u64).div_ceil(IMAGE_PAGE));
        at = end;
    }
    assert_eq!(data_pages, expected, "SEEK_DATA ranges");
    let st = fstat(fd).unwrap();
    assert_eq!(
        st.st_blocks as u64 * 512,
        expected.len() as u64 * IMAGE_PAGE
    );

    // Sealed: no writes, no resizing, no writable shared mapping, no more seals removed.
    let seals = SealFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GET_SEALS).unwrap());
    let all = SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_SEAL;
    assert!(seals.contains(all), "{seals:?}");
    let file = File::from(fd.try_clone_to_owned().unwrap());
    assert!(file.write_at(b"x", 0).is_err());
    assert!(file.set_len(0).is_err());
    // SAFETY: a new mapping chosen by the kernel; never touched (the call must fail).
    let shared = unsafe {
        mmap(
            None,
            NonZeroUsize::new(4096).unwrap(),
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            fd,
            0,
        )
    };
    assert!(
        shared.is_err(),
        "a writable shared mapping of a sealed image"
    );
}

#[test]
fn forking_compiles_nothing_and_shares_the_parents_module() {
    let compiles = || COMPILES.with(|c| c.get());
    let before = compiles();
    let (spec, mut parent) = warm_counter("nocompile");
    assert_eq!(compiles(), before + 1, "the parent compiled once");
    let snap = parent.snapshot().unwrap();
    let mut children: Vec<_> = (0..4)
        .map(|_| fork(&parent, &snap, &spec).unwrap())
        .collect();
    for child in &mut children {
        assert!(CompiledModule::same(
            &child.compiled_module(),
            &parent.compiled_module()
        ));
        assert_eq!(
            child.compiled_module().engine().id(),
            parent.compiled_module().engine().id()
        );
        call(child, b"z");
    }
    // A trapped child is rebuilt from the image, still without compiling.
    let child = &mut children[0];
    let mut io = BufferIo::new(256, b"trap");
    assert!(matches!(child.invoke(&mut io), Outcome::Failed { .. }));
    assert_eq!(
        counter(&call(child, b"q")),
        (4, 1, 7),
        "rebuilt from the image, not cold"
    );
    assert_eq!(compiles(), before + 1, "forks compiled nothing");
}

#[test]
fn public_builder_forks_an_instance_of_the_configured_function() {
    let dir = std::env::temp_dir().join(format!("spindle-snap-builder-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("counter.wat"), COUNTER).unwrap();
    let yaml = "functions:\n  - name: counter\n    module: counter.wat\n\
                chains:\n  - name: c\n    route: /c\n    steps: [counter]\n";
    std::fs::write(dir.join("spindle.yaml"), yaml).unwrap();
    let config = Config::load(&dir.join("spindle.yaml")).unwrap();
    let mut parent = InstanceBuilder::new(&config, "c", "counter")
        .unwrap()
        .cold_from_file()
        .unwrap();
    call(parent.host_mut(), b"12345");
    let snap = parent.host_mut().snapshot().unwrap();
    let module = parent.host_mut().compiled_module();
    let mut child = InstanceBuilder::new(&config, "c", "counter")
        .unwrap()
        .from_snapshot(&snap, &module)
        .unwrap();
    assert_eq!(child.stage().function.name, "counter");
    assert_eq!(counter(&call(child.host_mut(), b"6")), (2, 1, 6));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn caller_fills_fresh_memory_for_the_lazy_path() {
    let (spec, mut parent) = warm_counter("caller");
    let snap = parent.snapshot().unwrap();
    let image = read_all(snap.image());
    let mut seen = None;
    let mut fill = |region: MemoryRegion| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        // SAFETY: the region is the child's linear memory, valid and unaliased during the
        // callback (the contract of MemoryFill::Caller).
        let memory =
            unsafe { std::slice::from_raw_parts_mut(region.base().as_ptr(), region.len()) };
        seen = Some((region.len(), memory.iter().all(|&b| b == 0)));
        memory.copy_from_slice(&image);
        Ok(())
    };
    let mut child = FunctionHost::fork(
        &spec,
        None,
        crate::wasi::Preopens::none(),
        &parent.compiled_module(),
        snap.meta(),
        MemoryFill::Caller(&mut fill),
        None,
    )
    .unwrap();
    assert_eq!(
        seen,
        Some((image.len(), true)),
        "the callback got the whole memory, untouched (no data segments)"
    );
    assert_eq!(counter(&call(&mut child, b"k")), (4, 1, 7));

    let mut failing = |_: MemoryRegion| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Err("no pages today".into())
    };
    let err = FunctionHost::fork(
        &spec,
        None,
        crate::wasi::Preopens::none(),
        &parent.compiled_module(),
        snap.meta(),
        MemoryFill::Caller(&mut failing),
        None,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("no pages today"), "{err}");
}

/// A PRNG seeded from `random_get` in `_initialize`; each request answers the next 8 bytes
/// of xorshift64. `{hook}` may add exports.
fn prng(hook: &str) -> String {
    format!(
        r#"(module
        (import "spindle" "output" (func $output (param i32 i32)))
        (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
        (memory (export "memory") 1)
        (func (export "_initialize") (drop (call $random_get (i32.const 0) (i32.const 8))))
        (func (export "spindle_alloc") (param i32) (result i32) (i32.const 1024))
        (func (export "spindle_handle") (param i32 i32) (result i32)
            (local $s i64)
            (local.set $s (i64.load (i32.const 0)))
            (local.set $s (i64.xor (local.get $s) (i64.shr_u (local.get $s) (i64.const 12))))
            (local.set $s (i64.xor (local.get $s) (i64.shl (local.get $s) (i64.const 25))))
            (local.set $s (i64.xor (local.get $s) (i64.shr_u (local.get $s) (i64.const 27))))
            (i64.store (i32.const 0) (local.get $s))
            (call $output (i32.const 0) (i32.const 8))
            (i32.const 0))
        {hook})"#
    )
}

#[test]
fn without_on_fork_children_draw_the_same_numbers_and_with_it_they_do_not() {
    let spec = spec("nohook", &prng(""));
    let mut parent = FunctionHost::new(&spec, None).unwrap();
    call(&mut parent, b"");
    let snap = parent.snapshot().unwrap();
    let draws: Vec<_> = (0..2)
        .map(|_| call(&mut fork(&parent, &snap, &spec).unwrap(), b""))
        .collect();
    assert_eq!(draws[0], draws[1], "the snapshot hazard: shared PRNG state");
    assert_eq!(
        call(&mut parent, b""),
        draws[0],
        "and the parent's own next draw"
    );

    let hook = r#"(func (export "spindle_on_fork") (drop (call $random_get (i32.const 0) (i32.const 8))))"#;
    let spec = self::spec("hook", &prng(hook));
    let mut parent = FunctionHost::new(&spec, None).unwrap();
    call(&mut parent, b"");
    let snap = parent.snapshot().unwrap();
    let draws: Vec<_> = (0..2)
        .map(|_| call(&mut fork(&parent, &snap, &spec).unwrap(), b""))
        .collect();
    assert_ne!(draws[0], draws[1], "reseeded in spindle_on_fork");
}

#[test]
fn forkrand_children_reseed_and_keep_the_served_counter() {
    testkit::build_examples();
    let path = testkit::wasm("forkrand");
    if !path.exists() {
        testkit::cannot_run(
            "forkrand_children_reseed_and_keep_the_served_counter",
            format!("{} not built", path.display()),
        );
        return;
    }
    let spec = spec_for("forkrand", path);
    let mut parent = FunctionHost::new(&spec, None).unwrap();
    for _ in 0..2 {
        call(&mut parent, b"");
    }
    let snap = parent.snapshot().unwrap();
    let parse = |out: Vec<u8>| -> (u64, u64, u64) {
        let text = String::from_utf8(out).unwrap();
        let field = |name: &str| -> u64 {
            let key = format!("\"{name}\":");
            let rest = &text[text.find(&key).unwrap() + key.len()..];
            rest[..rest.find([',', '}']).unwrap()].parse().unwrap()
        };
        (field("served"), field("random"), field("forks"))
    };
    let a = parse(call(&mut fork(&parent, &snap, &spec).unwrap(), b""));
    let b = parse(call(&mut fork(&parent, &snap, &spec).unwrap(), b""));
    let p = parse(call(&mut parent, b""));
    assert_eq!((a.0, a.2), (3, 1), "served counter inherited; one reseed");
    assert_eq!((b.0, b.2), (3, 1));
    assert_eq!((p.0, p.2), (3, 0), "the parent was never forked");
    assert_ne!(a.1, b.1, "children draw different numbers");
    assert_ne!(a.1, p.1);
    assert_ne!(b.1, p.1);
}

/// The sleepy example (bench/scale.sh's I/O-bound guest) really waits: wasi-libc's
/// clock_nanosleep reaches poll_oneoff as a relative monotonic clock subscription and the host
/// blocks for it, in a cold instance and in a forked child. It does not spin: 200 ms fit in a
/// budget of 1M instructions.
#[test]
fn sleepy_blocks_in_poll_oneoff_cold_and_forked() {
    testkit::build_examples();
    let path = testkit::wasm("sleepy");
    if !path.exists() {
        testkit::cannot_run(
            "sleepy_blocks_in_poll_oneoff_cold_and_forked",
            format!("{} not built", path.display()),
        );
        return;
    }
    let mut spec = spec_for("sleepy", path);
    spec.memory_limit = 64 << 20;
    spec.fuel = Some(1_000_000);
    let timed = |host: &mut FunctionHost, input: &[u8]| {
        let t = std::time::Instant::now();
        let out = call(host, input);
        assert_eq!(out, input, "echoes its input");
        t.elapsed()
    };
    let check = |host: &mut FunctionHost, who: &str| {
        for (input, ms) in [
            (&b"hello spindle"[..], 2),
            (b"sleep=5", 5),
            (b"sleep=200 x", 200),
        ] {
            let took = timed(host, input);
            let want = Duration::from_millis(ms);
            assert!(
                took >= want && took < want + Duration::from_millis(500),
                "{who}: {:?} took {took:?}, want {want:?}",
                String::from_utf8_lossy(input)
            );
        }
    };
    let mut parent = FunctionHost::new(&spec, None).unwrap();
    check(&mut parent, "cold instance");
    let snap = parent.snapshot().unwrap();
    check(&mut fork(&parent, &snap, &spec).unwrap(), "forked child");

    let mut io = BufferIo::new(256, b"sleep=1001");
    match parent.invoke(&mut io) {
        Outcome::Failed { message, .. } => assert!(message.contains("bad sleep"), "{message}"),
        other => panic!("sleep=1001 must fail: {other:?}"),
    }
}

/// Every example reactor (real wasi-libc C: function-pointer tables, stdio FILEs, malloc)
/// captures after a request and forks into a child that answers exactly as the parent does;
/// the cart keeps the parent's items.
#[test]
fn every_example_reactor_forks_and_answers_like_its_parent() {
    testkit::build_examples();
    let dir = testkit::repo_root().join("examples/wasm");
    let mut forked = 0;
    for name in [
        "uppercase",
        "reverse",
        "frame",
        "wordcount",
        "jsonfield",
        "sha256",
        "grayscale",
        "faulty",
        "sleepy",
        "frontend",
        "cart",
        "catalog",
        "currency",
    ] {
        let path = dir.join(format!("{name}.wasm"));
        if !path.exists() {
            continue;
        }
        let mut spec = spec_for(name, path);
        spec.memory_limit = 64 << 20;
        spec.env = vec![("FIELD".into(), "a".into())];
        let mut parent = FunctionHost::new(&spec, None).unwrap();
        let (warm, probe): (&[u8], &[u8]) = match name {
            "cart" => (b"cart add mug", b"cart show"),
            "jsonfield" => (br#"{"a":"x"}"#, br#"{"a":[1,2]}"#),
            "currency" => (b"convert 12 EUR", b"convert 3 GBP"),
            "catalog" => (b"product OLJCESPC7Z", b"product 66VCHSJNUP"),
            "faulty" => (b"print", b"hello"),
            _ => (b"hello world\n", b"more words here\n"),
        };
        let mut io = BufferIo::new(256, warm);
        parent.invoke(&mut io);
        let snap = parent
            .snapshot()
            .unwrap_or_else(|e| panic!("{name}: capture refused: {e}"));
        let mut child = fork(&parent, &snap, &spec).unwrap_or_else(|e| panic!("{name}: {e}"));
        let answer = |host: &mut FunctionHost| {
            let mut io = BufferIo::new(256, probe);
            (host.invoke(&mut io), io.output)
        };
        let from_child = answer(&mut child);
        assert_eq!(from_child, answer(&mut parent), "{name}");
        if name == "cart" {
            assert_eq!(from_child.1, b"cart: 1 item: mug");
        }
        forked += 1;
    }
    if forked == 0 {
        testkit::cannot_run(
            "every_example_reactor_forks_and_answers_like_its_parent",
            format!("no example modules in {}", dir.display()),
        );
    }
}

#[test]
fn on_fork_failure_fails_the_fork() {
    let hook = r#"(func (export "spindle_on_fork") (loop $l (br $l)))"#;
    let spec = spec("badhook", &prng(hook));
    let mut parent = FunctionHost::new(&spec, None).unwrap();
    let snap = parent.snapshot().unwrap();
    let err = fork(&parent, &snap, &spec).err().expect("refused");
    assert!(err.to_string().contains("spindle_on_fork failed"), "{err}");
}

#[test]
fn closed_stdio_is_carried_to_the_child() {
    // Input "c" closes stdout; any other input answers fd_write's errno on stdout.
    let wat = r#"(module
        (import "spindle" "output" (func $output (param i32 i32)))
        (import "wasi_snapshot_preview1" "fd_close" (func $close (param i32) (result i32)))
        (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
        (memory (export "memory") 1)
        (data (i32.const 64) "\n")
        (func (export "spindle_alloc") (param i32) (result i32) (i32.const 1024))
        (func (export "spindle_handle") (param $p i32) (param $n i32) (result i32)
            (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 99))
                (then (i32.store (i32.const 0) (call $close (i32.const 1))))
                (else
                    (i32.store (i32.const 16) (i32.const 64))
                    (i32.store (i32.const 20) (i32.const 1))
                    (i32.store (i32.const 0)
                        (call $write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))))
            (call $output (i32.const 0) (i32.const 4))
            (i32.const 0)))"#;
    let spec = spec("stdio", wat);
    let mut parent = FunctionHost::new(&spec, None).unwrap();
    assert_eq!(call(&mut parent, b"w"), 0u32.to_le_bytes(), "stdout open");
    let open = parent.snapshot().unwrap();
    assert_eq!(open.meta().wasi.stdio_closed, [false; 3]);
    assert_eq!(call(&mut parent, b"c"), 0u32.to_le_bytes(), "closed");
    let closed = parent.snapshot().unwrap();
    assert_eq!(closed.meta().wasi.stdio_closed, [false, true, false]);
    let badf = u32::from(crate::wasi::errno::BADF).to_le_bytes();
    assert_eq!(
        call(&mut fork(&parent, &closed, &spec).unwrap(), b"w"),
        badf
    );
    assert_eq!(
        call(&mut fork(&parent, &open, &spec).unwrap(), b"w"),
        0u32.to_le_bytes()
    );
}

// ---- refusals at capture ----

/// A reactor around `extra` items and a `spindle_handle` body.
fn reactor(extra: &str, body: &str) -> String {
    format!(
        r#"(module
        (import "spindle" "output" (func $output (param i32 i32)))
        (memory (export "memory") 1)
        {extra}
        (func $f)
        (func $g)
        (func (export "spindle_alloc") (param i32) (result i32) (i32.const 1024))
        (func (export "spindle_handle") (param $p i32) (param $n i32) (result i32)
            {body}
            (i32.const 0)))"#
    )
}

#[test]
fn command_modules_are_refused() {
    let wat = r#"(module (memory (export "memory") 1) (func (export "_start")))"#;
    let mut spec = spec("cmd", wat);
    spec.mode = ModuleMode::Command;
    let mut host = FunctionHost::new(&spec, None).unwrap();
    assert!(matches!(host.snapshot(), Err(SnapshotError::CommandModule)));
}

#[test]
fn a_trapped_reactor_has_nothing_to_capture_until_rebuilt() {
    let mut host = FunctionHost::new(&spec("trapped", &reactor("", "unreachable")), None).unwrap();
    let mut io = BufferIo::new(256, b"x");
    assert!(matches!(host.invoke(&mut io), Outcome::Failed { .. }));
    assert!(matches!(host.snapshot(), Err(SnapshotError::NoInstance)));
    host.prepare().unwrap();
    host.snapshot().unwrap();
}

#[test]
fn a_table_grown_at_run_time_is_refused() {
    let wat = reactor(
        "(table $t 1 funcref) (elem (i32.const 0) $f)",
        "(drop (table.grow $t (ref.null func) (i32.const 1)))",
    );
    let mut host = FunctionHost::new(&spec("tgrow", &wat), None).unwrap();
    let before = host.snapshot().unwrap();
    assert_eq!(
        before.meta().tables,
        [TableImage {
            element: Type::FuncRef,
            size: 1
        }]
    );
    call(&mut host, b"x");
    let err = host.snapshot().unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::TableGrew {
                index: 0,
                pristine: 1,
                now: 2
            }
        ),
        "{err}"
    );
}

#[test]
fn a_table_element_set_at_run_time_is_refused() {
    let wat = reactor(
        "(table $t 2 funcref) (elem (i32.const 0) $f) (elem declare func $g)",
        "(table.set $t (i32.const 1) (ref.func $g))",
    );
    let mut host = FunctionHost::new(&spec("tset", &wat), None).unwrap();
    host.snapshot().unwrap();
    call(&mut host, b"x");
    let err = host.snapshot().unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::TableChanged {
                index: 0,
                element: 1
            }
        ),
        "{err}"
    );

    // Setting an element back to what instantiation put there is no change.
    let wat = reactor(
        "(table $t 2 funcref) (elem (i32.const 0) $f)",
        "(table.set $t (i32.const 0) (ref.func $f))",
    );
    let mut host = FunctionHost::new(&spec("tsame", &wat), None).unwrap();
    call(&mut host, b"x");
    host.snapshot().unwrap();
}

#[test]
fn externref_tables_and_reference_globals_are_refused() {
    let wat = reactor("(table 1 externref)", "");
    let mut host = FunctionHost::new(&spec("xtable", &wat), None).unwrap();
    let err = host.snapshot().unwrap_err();
    assert!(
        matches!(err, SnapshotError::ExternrefTable { index: 0 }),
        "{err}"
    );

    let wat = reactor("(global $e (mut externref) (ref.null extern))", "");
    let mut host = FunctionHost::new(&spec("xglobal", &wat), None).unwrap();
    let err = host.snapshot().unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::ReferenceGlobal {
                ty: Type::ExternRef,
                ..
            }
        ),
        "{err}"
    );

    let wat = reactor("(global $r (mut funcref) (ref.func $f))", "");
    let mut host = FunctionHost::new(&spec("fglobal", &wat), None).unwrap();
    let err = host.snapshot().unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::ReferenceGlobal {
                ty: Type::FuncRef,
                ..
            }
        ),
        "{err}"
    );

    // An immutable funcref is recreated by instantiation: captured, not written back.
    let wat = reactor("(global $c funcref (ref.func $f))", "");
    let mut host = FunctionHost::new(&spec("cglobal", &wat), None).unwrap();
    host.snapshot().unwrap();
}

#[test]
fn shared_memory_is_refused() {
    let wat = reactor("", "").replace(
        r#"(memory (export "memory") 1)"#,
        r#"(memory (export "memory") 1 1 shared)"#,
    );
    let mut host = match FunctionHost::new(&spec("shared", &wat), None) {
        Ok(host) => host,
        // Without the threads feature the module does not even compile: refused earlier.
        Err(HostError::Compile { .. }) => return,
        Err(e) => panic!("{e}"),
    };
    let err = host.snapshot().unwrap_err();
    assert!(matches!(err, SnapshotError::MemoryStyle("shared")), "{err}");
}

#[test]
fn memory_beyond_the_limit_is_refused_at_capture_and_at_restore() {
    // Grows to 3 pages on its first request.
    let wat = reactor("", "(drop (memory.grow (i32.const 2)))");
    let spec = spec("limit", &wat);
    let mut host = FunctionHost::new(&spec, None).unwrap();
    call(&mut host, b"x");
    let err = host.snapshot_with_limit(2).unwrap_err();
    assert!(
        matches!(err, SnapshotError::MemoryOverLimit { pages: 3, limit: 2 }),
        "{err}"
    );

    // An image claiming more memory than the child's cap (16 pages) is refused before
    // anything is mapped.
    let snap = host.snapshot().unwrap();
    let mut meta = snap.meta().clone();
    meta.memory.bytes = 32 * 65536;
    meta.memory.nonzero = page_map(32 * 16, vec![0; 8]).unwrap();
    let err = FunctionHost::fork(
        &spec,
        None,
        crate::wasi::Preopens::none(),
        &host.compiled_module(),
        &meta,
        MemoryFill::Map(snap.image()),
        None,
    )
    .err()
    .unwrap();
    assert!(
        matches!(
            err,
            HostError::Fork {
                source: SnapshotError::MemoryOverLimit {
                    pages: 32,
                    limit: 16
                },
                ..
            }
        ),
        "{err}"
    );
}

// ---- refusals at restore ----

#[test]
fn a_child_that_does_not_match_the_image_is_refused() {
    let (spec, mut parent) = warm_counter("mismatch");
    let snap = parent.snapshot().unwrap();
    let fork_err =
        |spec: &FunctionSpec, module: &CompiledModule, meta: &SnapshotMeta, fd: BorrowedFd<'_>| {
            FunctionHost::fork(
                spec,
                None,
                crate::wasi::Preopens::none(),
                module,
                meta,
                MemoryFill::Map(fd),
                None,
            )
            .err()
            .expect("refused")
            .to_string()
        };
    let module = parent.compiled_module();

    // Another environment: wasi-libc may have cached the parent's in memory.
    let mut other_env = spec.clone();
    other_env.env.push(("MORE".into(), "x".into()));
    let err = fork_err(&other_env, &module, snap.meta(), snap.image());
    assert!(err.contains("WASI args"), "{err}");

    // A different engine configuration than the module was compiled for.
    let mut unmetered = spec.clone();
    unmetered.fuel = None;
    assert!(fork_err(&unmetered, &module, snap.meta(), snap.image()).contains("metering"));
    let mut smaller = spec.clone();
    smaller.memory_limit = 1 << 17;
    assert!(fork_err(&smaller, &module, snap.meta(), snap.image()).contains("memory limit"));

    // An image of another module.
    let other =
        FunctionHost::new(&spec_for("other", module_file("other", &prng(""))), None).unwrap();
    let err = fork_err(&spec, &other.compiled_module(), snap.meta(), snap.image());
    assert!(err.contains("another module"), "{err}");

    // A malformed page map, and an image fd that is not sealed.
    let mut meta = snap.meta().clone();
    meta.memory.nonzero = page_map(3, vec![0]).unwrap();
    assert!(fork_err(&spec, &module, &meta, snap.image()).contains("page map"));
    let (_, empty) = write_image(&[]).unwrap();
    let plain = {
        let file = File::from(memfd_create("plain", MFdFlags::MFD_CLOEXEC).unwrap());
        file.set_len(snap.meta().memory.bytes).unwrap();
        OwnedFd::from(file)
    };
    let err = fork_err(&spec, &module, snap.meta(), plain.as_fd());
    assert!(err.contains("not a memfd sealed"), "{err}");
    let err = fork_err(&spec, &module, snap.meta(), empty.as_fd());
    assert!(err.contains("bytes"), "wrong size: {err}");
}

#[test]
fn page_map_words_are_checked() {
    assert!(page_map(64, vec![u64::MAX]).is_ok());
    assert!(page_map(65, vec![0]).is_err(), "too few words");
    assert!(page_map(3, vec![0b1000]).is_err(), "bit past the end");
    let map = page_map(70, vec![1, 0b10]).unwrap();
    assert_eq!(map.iter_set().collect::<Vec<_>>(), [0, 65]);
    assert_eq!(map.count(), 2);
    assert!(!map.is_set(1000));
}

/// Informal timing (run with --ignored --nocapture): cold start vs fork of forkrand and of
/// a 16 MiB warm heap. Not a test of speed.
#[test]
#[ignore]
fn fork_timing() {
    use std::time::Instant;
    testkit::build_examples();
    let spec = spec_for("time-forkrand", testkit::wasm("forkrand"));
    let t = Instant::now();
    let mut parent = FunctionHost::new(&spec, None).unwrap();
    let cold = t.elapsed();
    call(&mut parent, b"");
    let t = Instant::now();
    let snap = parent.snapshot().unwrap();
    let capture = t.elapsed();
    let n = 200;
    let t = Instant::now();
    let children: Vec<_> = (0..n)
        .map(|_| fork(&parent, &snap, &spec).unwrap())
        .collect();
    let per_fork = t.elapsed() / n;
    println!(
        "forkrand: cold {cold:?}, capture {capture:?} ({} of {} pages), fork {per_fork:?}",
        snap.meta().memory.nonzero.count(),
        snap.meta().memory.nonzero.pages()
    );
    drop(children);

    // 16 MiB of memory, every 4th 4 KiB page written.
    let wat = reactor(
        "",
        r#"(local $i i32)
           (drop (memory.grow (i32.const 255)))
           (loop $l
             (i32.store (local.get $i) (i32.const 1))
             (local.set $i (i32.add (local.get $i) (i32.const 16384)))
             (br_if $l (i32.lt_u (local.get $i) (i32.const 16777216))))"#,
    );
    let mut big = self::spec("time-big", &wat);
    big.memory_limit = 64 << 20;
    big.fuel = Some(1_000_000_000);
    let mut parent = FunctionHost::new(&big, None).unwrap();
    call(&mut parent, b"x");
    let t = Instant::now();
    let snap = parent.snapshot().unwrap();
    let capture = t.elapsed();
    let t = Instant::now();
    let children: Vec<_> = (0..n)
        .map(|_| fork(&parent, &snap, &big).unwrap())
        .collect();
    let per_fork = t.elapsed() / n;
    println!(
        "16 MiB heap: capture {capture:?} ({} of {} pages non-zero), fork {per_fork:?}",
        snap.meta().memory.nonzero.count(),
        snap.meta().memory.nonzero.pages()
    );
    drop(children);
}

/// What a remote child gets: the metadata through its wire form (and the node's own WASI
/// layout), the memory from elsewhere.
#[test]
fn metadata_survives_the_wire_and_a_child_built_from_it_continues_the_parent() {
    let (spec, mut parent) = warm_counter("wire");
    let snap = parent.snapshot().unwrap();
    let bytes = snap.meta().to_image_meta().encode();
    let wire = proto::ImageMeta::decode(&bytes).unwrap();
    assert_eq!(wire.nonzero.count(), snap.meta().memory.nonzero.count());
    let meta = SnapshotMeta::from_image_meta(&wire, snap.meta().wasi.clone()).unwrap();
    assert_eq!(&meta, snap.meta(), "nothing lost on the way");

    let image = read_all(snap.image());
    let mut fill = |region: MemoryRegion| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        // SAFETY: the region is the child's linear memory, valid and unaliased during the
        // callback (the contract of MemoryFill::Caller).
        let memory =
            unsafe { std::slice::from_raw_parts_mut(region.base().as_ptr(), region.len()) };
        memory.copy_from_slice(&image);
        Ok(())
    };
    let mut child = FunctionHost::fork(
        &spec,
        None,
        crate::wasi::Preopens::none(),
        &parent.compiled_module(),
        &meta,
        MemoryFill::Caller(&mut fill),
        None,
    )
    .unwrap();
    assert_eq!(counter(&call(&mut child, b"k")), (4, 1, 7));

    let mut other = snap.meta().wasi.clone();
    other.env.push(("SECRET".into(), "differs".into()));
    let err = SnapshotMeta::from_image_meta(&wire, other).unwrap_err();
    assert!(matches!(err, SnapshotError::Mismatch(_)), "{err}");
}

/// Opens `data.txt` beneath preopen fd 3, reads it, and keeps the fd open in a global;
/// answers the fd number (u32) and what it read. Input `c` closes the kept fd instead.
const FILE_READER: &str = r#"(module
    (import "spindle" "output" (func $out (param i32 i32)))
    (import "wasi_snapshot_preview1" "path_open" (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "fd_close" (func $close (param i32) (result i32)))
    (memory (export "memory") 1)
    (data (i32.const 100) "data.txt")
    (global $fd (mut i32) (i32.const -1))
    (func (export "spindle_alloc") (param i32) (result i32) (i32.const 1024))
    (func (export "spindle_handle") (param $p i32) (param $n i32) (result i32)
        (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 99))
            (then (drop (call $close (global.get $fd))) (global.set $fd (i32.const -1))
                  (return (i32.const 0))))
        (if (i32.ne (call $open (i32.const 3) (i32.const 1) (i32.const 100) (i32.const 8)
                (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 200))
                (i32.const 0))
            (then (return (i32.const 1))))
        (global.set $fd (i32.load (i32.const 200)))
        (i32.store (i32.const 2044) (global.get $fd))
        (i32.store (i32.const 300) (i32.const 2048))
        (i32.store (i32.const 304) (i32.const 64))
        (drop (call $read (global.get $fd) (i32.const 300) (i32.const 1) (i32.const 308)))
        (call $out (i32.const 2044) (i32.add (i32.const 4) (i32.load (i32.const 308))))
        (i32.const 0)))"#;

fn file_reader(tag: &str, isolation: crate::config::Isolation) -> (FunctionSpec, PathBuf) {
    let dir = std::env::temp_dir().join(format!("spindle-snap-files-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("data.txt"), "from the host").unwrap();
    let spec = FunctionSpec {
        isolation,
        files: vec![crate::config::PreopenDir {
            guest: "/data".into(),
            host: dir.clone(),
        }],
        args: vec!["--flag".into()],
        ..spec(tag, FILE_READER)
    };
    (spec, dir)
}

/// (fd, contents) of a FILE_READER answer.
fn read_answer(out: &[u8]) -> (u32, String) {
    (
        u32::from_le_bytes(out[..4].try_into().unwrap()),
        String::from_utf8(out[4..].to_vec()).unwrap(),
    )
}

#[test]
fn an_instance_holding_files_is_not_captured_and_children_get_the_preopens() {
    let (spec, dir) = file_reader("files", crate::config::Isolation::Reuse);
    let mut parent = FunctionHost::new(&spec, None).unwrap();
    assert_eq!(
        read_answer(&call(&mut parent, b"r")),
        (4, "from the host".into())
    );
    match parent.snapshot() {
        Err(SnapshotError::OpenFiles(why)) => assert_eq!(
            why,
            "1 file(s) or directories open, 0 of 1 preopened directories closed, moved or changed"
        ),
        other => panic!("captured with a file open: {:?}", other.map(|_| ())),
    }
    call(&mut parent, b"c");
    let snap = parent.snapshot().unwrap();
    assert_eq!(snap.meta().wasi.preopens, ["/data"]);
    assert_eq!(snap.meta().wasi.args, [spec.name.as_str(), "--flag"]);
    let preopens = crate::wasi::Preopens::open(&spec.files).unwrap();
    let mut child = FunctionHost::fork(
        &spec,
        None,
        preopens,
        &parent.compiled_module(),
        snap.meta(),
        MemoryFill::Map(snap.image()),
        Some(snap.clone()),
    )
    .unwrap();
    assert_eq!(
        read_answer(&call(&mut child, b"r")),
        (4, "from the host".into())
    );
    // A child whose function has other directories would see another fd table than the
    // parent's libc recorded in memory.
    let other = FunctionSpec {
        files: vec![],
        ..spec.clone()
    };
    let err = fork(&parent, &snap, &other).err().expect("refused");
    assert!(
        err.to_string()
            .contains("image has the preopened directories [\"/data\"], this function []"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fresh_per_request_closes_what_a_request_opened() {
    for (isolation, second_fd) in [
        (crate::config::Isolation::Reuse, 5),
        (crate::config::Isolation::FreshPerRequest, 4),
    ] {
        let (spec, dir) = file_reader(isolation.label(), isolation);
        let mut host = FunctionHost::new(&spec, None).unwrap();
        host.prepare().unwrap();
        assert_eq!(read_answer(&call(&mut host, b"r")).0, 4, "{isolation:?}");
        host.prepare().unwrap();
        assert_eq!(
            read_answer(&call(&mut host, b"r")),
            (second_fd, "from the host".into()),
            "{isolation:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
