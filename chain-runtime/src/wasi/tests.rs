use super::memory::le_u32;
use super::poll::{EVENTTYPE_CLOCK, EVENTTYPE_FD_READ, EVENTTYPE_FD_WRITE};
use super::stdio::{FILETYPE_CHARACTER_DEVICE, RIGHT_FD_READ, RIGHT_FD_WRITE};
use super::table::known_function;
use super::*;
use std::path::PathBuf;
use std::time::Instant;
use wasmer::{Instance, Store, Type, Value};

const FIXTURE: &str = include_str!("../../tests/wasi_fixtures/preview1.wat");

struct Harness {
    store: Store,
    instance: Instance,
    env: FunctionEnv<WasiCtx>,
    memory: Memory,
}

impl Harness {
    fn new(wat: &str, ctx: WasiCtx) -> Self {
        Self::from_bytes(wat.as_bytes(), ctx)
    }

    fn from_bytes(bytes: &[u8], ctx: WasiCtx) -> Self {
        let mut store = Store::default();
        let module = Module::new(&store, bytes).expect("module compiles");
        let env = FunctionEnv::new(&mut store, ctx);
        let mut imports = Imports::new();
        add_imports(&mut store, &env, &module, &mut imports).expect("wasi imports");
        let instance = Instance::new(&mut store, &module, &imports).expect("instantiates");
        let memory = instance
            .exports
            .get_memory("memory")
            .expect("memory export")
            .clone();
        env.as_mut(&mut store).set_memory(memory.clone());
        Harness {
            store,
            instance,
            env,
            memory,
        }
    }

    fn ctx(&mut self) -> &mut WasiCtx {
        self.env.as_mut(&mut self.store)
    }

    fn call(&mut self, name: &str, args: &[Value]) -> Result<Box<[Value]>, RuntimeError> {
        let f = self
            .instance
            .exports
            .get_function(name)
            .expect("export")
            .clone();
        f.call(&mut self.store, args)
    }

    /// Calls an exported wrapper and returns its errno.
    fn errno(&mut self, name: &str, args: &[Value]) -> i32 {
        let out = self
            .call(name, args)
            .unwrap_or_else(|e| panic!("{name} trapped: {e}"));
        out[0].unwrap_i32()
    }

    fn write(&self, ptr: u32, data: &[u8]) {
        self.memory
            .view(&self.store)
            .write(u64::from(ptr), data)
            .unwrap();
    }

    fn read(&self, ptr: u32, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.memory
            .view(&self.store)
            .read(u64::from(ptr), &mut buf)
            .unwrap();
        buf
    }

    fn u32_at(&self, ptr: u32) -> u32 {
        le_u32(&self.read(ptr, 4))
    }

    fn u64_at(&self, ptr: u32) -> u64 {
        u64::from_le_bytes(self.read(ptr, 8).try_into().unwrap())
    }

    fn mem_size(&self) -> u32 {
        self.memory.view(&self.store).data_size() as u32
    }

    fn iovec(&self, at: u32, bufs: &[(u32, u32)]) {
        let mut raw = Vec::new();
        for (p, l) in bufs {
            raw.extend_from_slice(&p.to_le_bytes());
            raw.extend_from_slice(&l.to_le_bytes());
        }
        self.write(at, &raw);
    }
}

fn i(v: u32) -> Value {
    Value::I32(v as i32)
}

fn l(v: u64) -> Value {
    Value::I64(v as i64)
}

fn ctx() -> WasiCtx {
    WasiCtx::new("test-fn", vec!["prog".into()], vec![])
}

fn fixture(ctx: WasiCtx) -> Harness {
    Harness::new(FIXTURE, ctx)
}

fn read_strings(h: &Harness, ptrs: u32, count: u32) -> Vec<String> {
    (0..count)
        .map(|k| {
            let p = h.u32_at(ptrs + 4 * k);
            let mut s = Vec::new();
            let mut at = p;
            loop {
                let b = h.read(at, 1)[0];
                if b == 0 {
                    break;
                }
                s.push(b);
                at += 1;
            }
            String::from_utf8(s).unwrap()
        })
        .collect()
}

#[test]
fn args_and_environ_round_trip() {
    let ctx = WasiCtx::new(
        "f",
        vec!["prog".into(), "hello".into(), "wörld".into()],
        vec![("A".into(), "1".into()), ("BB".into(), "x=y".into())],
    );
    let mut h = fixture(ctx);

    assert_eq!(h.errno("args_sizes_get", &[i(0), i(4)]), 0);
    let (argc, size) = (h.u32_at(0), h.u32_at(4));
    assert_eq!(argc, 3);
    assert_eq!(size as usize, "prog\0hello\0wörld\0".len());
    assert_eq!(h.errno("args_get", &[i(100), i(200)]), 0);
    assert_eq!(read_strings(&h, 100, argc), ["prog", "hello", "wörld"]);
    assert_eq!(h.read(200, size as usize), b"prog\0hello\0w\xc3\xb6rld\0");

    assert_eq!(h.errno("environ_sizes_get", &[i(8), i(12)]), 0);
    let (count, size) = (h.u32_at(8), h.u32_at(12));
    assert_eq!((count, size), (2, "A=1\0BB=x=y\0".len() as u32));
    assert_eq!(h.errno("environ_get", &[i(300), i(400)]), 0);
    assert_eq!(read_strings(&h, 300, count), ["A=1", "BB=x=y"]);
}

#[test]
fn clocks() {
    let mut h = fixture(ctx());
    assert_eq!(h.errno("clock_time_get", &[i(1), l(0), i(0)]), 0);
    let t1 = h.u64_at(0);
    std::thread::sleep(Duration::from_millis(2));
    assert_eq!(h.errno("clock_time_get", &[i(1), l(0), i(0)]), 0);
    let t2 = h.u64_at(0);
    assert!(t2 >= t1 + 2_000_000, "monotonic {t1} -> {t2}");

    assert_eq!(h.errno("clock_time_get", &[i(0), l(1), i(8)]), 0);
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let guest = Duration::from_nanos(h.u64_at(8));
    assert!(
        wall.abs_diff(guest) < Duration::from_secs(5),
        "realtime {guest:?} vs {wall:?}"
    );

    for id in 0..4 {
        assert_eq!(h.errno("clock_res_get", &[i(id), i(16)]), 0, "clock {id}");
        assert!(h.u64_at(16) > 0);
        assert_eq!(
            h.errno("clock_time_get", &[i(id), l(0), i(16)]),
            0,
            "clock {id}"
        );
    }
    assert_eq!(h.errno("clock_time_get", &[i(4), l(0), i(0)]), INVAL as i32);
    assert_eq!(h.errno("clock_res_get", &[i(99), i(0)]), INVAL as i32);
}

#[test]
fn random_get_fills_buffer() {
    let mut h = fixture(ctx());
    assert_eq!(h.errno("random_get", &[i(64), i(64)]), 0);
    let a = h.read(64, 64);
    assert!(a.iter().any(|&b| b != 0), "64 random bytes all zero");
    assert_eq!(h.errno("random_get", &[i(64), i(64)]), 0);
    assert_ne!(a, h.read(64, 64));
    // Bigger than one copy chunk, ending exactly at the end of memory.
    let size = h.mem_size();
    assert_eq!(h.errno("random_get", &[i(0), i(size)]), 0);
    assert_eq!(h.errno("random_get", &[i(0), i(0)]), 0);
}

#[test]
fn fd_write_two_iovecs_to_captured_stdout() {
    let mut h = fixture(ctx());
    h.ctx().capture_stdout(1024);
    h.write(1000, b"hello ");
    h.write(2000, b"world\n");
    h.iovec(100, &[(1000, 6), (2000, 6)]);
    assert_eq!(h.errno("fd_write", &[i(1), i(100), i(2), i(200)]), 0);
    assert_eq!(h.u32_at(200), 12);
    assert_eq!(h.ctx().take_stdout(), b"hello world\n");
    assert!(!h.ctx().stdout_truncated());

    // stdin isn't writable, and unknown fds don't exist.
    assert_eq!(
        h.errno("fd_write", &[i(0), i(100), i(2), i(200)]),
        BADF as i32
    );
    assert_eq!(
        h.errno("fd_write", &[i(3), i(100), i(2), i(200)]),
        BADF as i32
    );

    // Zero iovecs is a valid empty write.
    assert_eq!(h.errno("fd_write", &[i(1), i(100), i(0), i(200)]), 0);
    assert_eq!(h.u32_at(200), 0);
}

#[test]
fn capture_limit_sets_truncated_flag() {
    let mut h = fixture(ctx());
    h.ctx().capture_stdout(8);
    h.ctx().capture_stderr(100);
    h.write(1000, b"hello world\n");
    h.iovec(100, &[(1000, 12)]);
    assert_eq!(h.errno("fd_write", &[i(1), i(100), i(1), i(200)]), 0);
    // The guest is told everything was written; the host sees the flag.
    assert_eq!(h.u32_at(200), 12);
    assert!(h.ctx().stdout_truncated());
    assert_eq!(h.ctx().take_stdout(), b"hello wo");
    assert_eq!(h.errno("fd_write", &[i(2), i(100), i(1), i(200)]), 0);
    assert!(!h.ctx().stderr_truncated());
    assert_eq!(h.ctx().take_stderr(), b"hello world\n");
}

#[test]
fn fd_read_stdin_until_eof() {
    let input: Vec<u8> = (0..1000u32).map(|k| (k * 7 % 251) as u8).collect();
    let mut c = ctx();
    c.set_stdin(input.clone());
    let mut h = fixture(c);
    h.iovec(100, &[(1000, 100), (3000, 100)]);
    let mut got = Vec::new();
    let mut calls = 0;
    loop {
        assert_eq!(h.errno("fd_read", &[i(0), i(100), i(2), i(200)]), 0);
        let n = h.u32_at(200) as usize;
        calls += 1;
        if n == 0 {
            break;
        }
        got.extend(h.read(1000, n.min(100)));
        if n > 100 {
            got.extend(h.read(3000, n - 100));
        }
        assert!(calls < 100, "no EOF");
    }
    assert_eq!(got, input);
    assert_eq!(calls, 6); // 5 x 200 bytes, then EOF
    // EOF is sticky, and only stdin is readable.
    assert_eq!(h.errno("fd_read", &[i(0), i(100), i(2), i(200)]), 0);
    assert_eq!(h.u32_at(200), 0);
    assert_eq!(
        h.errno("fd_read", &[i(1), i(100), i(2), i(200)]),
        BADF as i32
    );
    assert_eq!(
        h.errno("fd_read", &[i(7), i(100), i(2), i(200)]),
        BADF as i32
    );
}

#[test]
fn no_preopens() {
    let mut h = fixture(ctx());
    for fd in 0..8 {
        assert_eq!(
            h.errno("fd_prestat_get", &[i(fd), i(0)]),
            BADF as i32,
            "fd {fd}"
        );
        assert_eq!(
            h.errno("fd_prestat_dir_name", &[i(fd), i(0), i(16)]),
            BADF as i32
        );
    }
    // The path API is denied whatever fd is tried.
    let open = |fd| {
        [
            i(fd),
            i(0),
            i(0),
            i(4),
            i(0),
            l(u64::MAX),
            l(u64::MAX),
            i(0),
            i(64),
        ]
    };
    assert_eq!(h.errno("path_open", &open(3)), BADF as i32);
    assert_eq!(h.errno("path_open", &open(0)), NOTCAPABLE as i32);
    assert_eq!(
        h.errno("sock_accept", &[i(1), i(0), i(0)]),
        NOTCAPABLE as i32
    );
    assert_eq!(h.errno("sock_accept", &[i(5), i(0), i(0)]), BADF as i32);
}

#[test]
fn stdio_fd_metadata_and_close() {
    let mut h = fixture(ctx());
    for fd in 0..3 {
        h.write(0, &[0xAA; 64]);
        assert_eq!(h.errno("fd_fdstat_get", &[i(fd), i(0)]), 0);
        assert_eq!(h.read(0, 1)[0], FILETYPE_CHARACTER_DEVICE);
        assert_eq!(h.read(2, 2), [0, 0]); // flags
        let rights = h.u64_at(8);
        assert_eq!(rights & RIGHT_FD_READ != 0, fd == 0);
        assert_eq!(rights & RIGHT_FD_WRITE != 0, fd != 0);
        assert_eq!(h.u64_at(16), 0);

        h.write(100, &[0xAA; 64]);
        assert_eq!(h.errno("fd_filestat_get", &[i(fd), i(100)]), 0);
        let stat = h.read(100, 64);
        assert_eq!(stat[16], FILETYPE_CHARACTER_DEVICE);
        assert!(stat.iter().enumerate().all(|(k, &b)| k == 16 || b == 0));

        assert_eq!(h.errno("fd_seek", &[i(fd), l(0), i(0), i(0)]), SPIPE as i32);
        assert_eq!(
            h.errno("fd_pwrite", &[i(fd), i(0), i(0), l(0), i(0)]),
            SPIPE as i32
        );
        assert_eq!(h.errno("fd_fdstat_set_flags", &[i(fd), i(0)]), 0);
        assert_eq!(
            h.errno("fd_fdstat_set_flags", &[i(fd), i(1)]),
            NOTSUP as i32
        );
    }
    assert_eq!(h.errno("fd_fdstat_get", &[i(3), i(0)]), BADF as i32);
    assert_eq!(h.errno("fd_filestat_get", &[i(3), i(0)]), BADF as i32);
    assert_eq!(h.errno("fd_seek", &[i(3), l(0), i(0), i(0)]), BADF as i32);

    h.ctx().capture_stdout(64);
    assert_eq!(h.errno("fd_close", &[i(1)]), 0);
    assert_eq!(h.errno("fd_close", &[i(1)]), BADF as i32);
    assert_eq!(h.errno("fd_close", &[i(9)]), BADF as i32);
    h.write(1000, b"x");
    h.iovec(100, &[(1000, 1)]);
    assert_eq!(
        h.errno("fd_write", &[i(1), i(100), i(1), i(200)]),
        BADF as i32
    );
    assert_eq!(h.errno("fd_fdstat_get", &[i(1), i(0)]), BADF as i32);
    assert!(h.ctx().take_stdout().is_empty());

    assert_eq!(h.errno("proc_raise", &[i(6)]), NOSYS as i32);
    assert_eq!(h.errno("sched_yield", &[]), 0);
}

#[test]
fn out_of_bounds_pointers_fault() {
    let mut h = fixture(ctx());
    h.ctx().capture_stdout(1024);
    h.ctx().set_stdin(b"abc".to_vec());
    let end = h.mem_size();
    let f = FAULT as i32;
    assert_eq!(h.errno("args_sizes_get", &[i(end - 2), i(0)]), f);
    assert_eq!(h.errno("args_sizes_get", &[i(0), i(u32::MAX)]), f);
    assert_eq!(h.errno("args_get", &[i(end), i(0)]), f);
    assert_eq!(h.errno("args_get", &[i(0), i(end - 2)]), f); // "prog\0" doesn't fit
    assert_eq!(h.errno("environ_sizes_get", &[i(u32::MAX - 1), i(0)]), f);
    assert_eq!(h.errno("clock_time_get", &[i(1), l(0), i(end - 4)]), f);
    assert_eq!(h.errno("clock_res_get", &[i(1), i(end)]), f);
    assert_eq!(h.errno("random_get", &[i(end - 10), i(20)]), f);
    assert_eq!(h.errno("random_get", &[i(16), i(u32::MAX)]), f);
    assert_eq!(h.errno("fd_fdstat_get", &[i(1), i(end - 8)]), f);
    assert_eq!(h.errno("fd_filestat_get", &[i(1), i(end - 63)]), f);

    // A bad iovec array, a bad buffer in the second iovec, a bad result pointer. None of
    // them may emit anything.
    h.write(1000, b"data");
    assert_eq!(h.errno("fd_write", &[i(1), i(end - 4), i(1), i(200)]), f);
    h.iovec(100, &[(1000, 4), (end - 2, 4)]);
    assert_eq!(h.errno("fd_write", &[i(1), i(100), i(2), i(200)]), f);
    h.iovec(100, &[(1000, 4), (u32::MAX, u32::MAX)]);
    assert_eq!(h.errno("fd_write", &[i(1), i(100), i(2), i(200)]), f);
    h.iovec(100, &[(1000, 4)]);
    assert_eq!(h.errno("fd_write", &[i(1), i(100), i(1), i(end)]), f);
    assert!(
        h.ctx().take_stdout().is_empty(),
        "faulting write had side effects"
    );

    // Same for reads: a fault consumes no input.
    h.iovec(100, &[(1000, 1), (end, 1)]);
    assert_eq!(h.errno("fd_read", &[i(0), i(100), i(2), i(200)]), f);
    h.iovec(100, &[(1000, 8)]);
    assert_eq!(h.errno("fd_read", &[i(0), i(100), i(1), i(u32::MAX)]), f);
    assert_eq!(h.errno("fd_read", &[i(0), i(100), i(1), i(200)]), 0);
    assert_eq!(h.read(1000, h.u32_at(200) as usize), b"abc");

    assert_eq!(
        h.errno("poll_oneoff", &[i(end - 40), i(0), i(1), i(200)]),
        f
    );
    assert_eq!(
        h.errno("poll_oneoff", &[i(0), i(end - 16), i(1), i(200)]),
        f
    );
    assert_eq!(h.errno("poll_oneoff", &[i(0), i(100), i(1), i(end)]), f);
    // Still alive and well.
    assert_eq!(h.errno("sched_yield", &[]), 0);
}

#[test]
fn proc_exit_surfaces_as_proc_exit() {
    let mut h = fixture(ctx());
    let err = h
        .call("proc_exit", &[i(3)])
        .expect_err("proc_exit must stop execution");
    assert_eq!(err.downcast_ref::<ProcExit>(), Some(&ProcExit(3)), "{err}");
    assert_eq!(h.ctx().exit_code(), Some(3));
    assert_eq!(err.downcast::<ProcExit>().unwrap(), ProcExit(3));
}

#[test]
fn unknown_import_links_and_returns_nosys() {
    let mut h = fixture(ctx());
    assert_eq!(h.errno("made_up", &[i(5)]), NOSYS as i32);
    let err = h
        .call("made_up_void", &[i(5)])
        .expect_err("no errno channel: must trap");
    assert!(
        err.message().contains("spindle_made_up_void"),
        "{}",
        err.message()
    );
}

/// Writes a preview-1 clock subscription (48 bytes).
fn clock_sub(h: &Harness, at: u32, userdata: u64, id: u32, timeout: u64, abstime: bool) {
    let mut s = [0u8; 48];
    s[0..8].copy_from_slice(&userdata.to_le_bytes());
    s[8] = EVENTTYPE_CLOCK;
    s[16..20].copy_from_slice(&id.to_le_bytes());
    s[24..32].copy_from_slice(&timeout.to_le_bytes());
    s[40..42].copy_from_slice(&u16::from(abstime).to_le_bytes());
    h.write(at, &s);
}

fn fd_sub(h: &Harness, at: u32, userdata: u64, kind: u8, fd: u32) {
    let mut s = [0u8; 48];
    s[0..8].copy_from_slice(&userdata.to_le_bytes());
    s[8] = kind;
    s[16..20].copy_from_slice(&fd.to_le_bytes());
    h.write(at, &s);
}

/// (userdata, error, type, nbytes, flags)
fn event(h: &Harness, at: u32) -> (u64, u16, u8, u64, u16) {
    let e = h.read(at, 32);
    (
        u64::from_le_bytes(e[0..8].try_into().unwrap()),
        u16::from_le_bytes(e[8..10].try_into().unwrap()),
        e[10],
        u64::from_le_bytes(e[16..24].try_into().unwrap()),
        u16::from_le_bytes(e[24..26].try_into().unwrap()),
    )
}

#[test]
fn poll_oneoff_relative_clock_sleeps() {
    let mut h = fixture(ctx());
    clock_sub(&h, 1024, 0xABCD, 1, 1_000_000, false);
    h.write(2048, &[0xFF; 64]);
    let t = Instant::now();
    assert_eq!(
        h.errno("poll_oneoff", &[i(1024), i(2048), i(1), i(3000)]),
        0
    );
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(1), "slept only {took:?}");
    assert!(took < Duration::from_secs(2), "slept {took:?}");
    assert_eq!(h.u32_at(3000), 1);
    assert_eq!(event(&h, 2048), (0xABCD, 0, EVENTTYPE_CLOCK, 0, 0));

    // Two clocks: only the earlier one fires.
    clock_sub(&h, 1024, 1, 1, 200_000_000, false);
    clock_sub(&h, 1072, 2, 0, 3_000_000, false);
    let t = Instant::now();
    assert_eq!(
        h.errno("poll_oneoff", &[i(1024), i(2048), i(2), i(3000)]),
        0
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(3) && took < Duration::from_millis(200),
        "{took:?}"
    );
    assert_eq!(h.u32_at(3000), 1);
    assert_eq!(event(&h, 2048).0, 2);

    // An absolute deadline in the past fires at once.
    assert_eq!(h.errno("clock_time_get", &[i(1), l(0), i(0)]), 0);
    let now = h.u64_at(0);
    clock_sub(&h, 1024, 7, 1, now - 1, true);
    let t = Instant::now();
    assert_eq!(
        h.errno("poll_oneoff", &[i(1024), i(2048), i(1), i(3000)]),
        0
    );
    assert!(t.elapsed() < Duration::from_millis(100));
    assert_eq!((h.u32_at(3000), event(&h, 2048).0), (1, 7));

    // An absolute deadline 5 ms ahead sleeps until then.
    assert_eq!(h.errno("clock_time_get", &[i(1), l(0), i(0)]), 0);
    clock_sub(&h, 1024, 8, 1, h.u64_at(0) + 5_000_000, true);
    let t = Instant::now();
    assert_eq!(
        h.errno("poll_oneoff", &[i(1024), i(2048), i(1), i(3000)]),
        0
    );
    assert!(t.elapsed() >= Duration::from_millis(4), "{:?}", t.elapsed());
    assert_eq!(event(&h, 2048).0, 8);
}

#[test]
fn poll_oneoff_fds_are_ready_without_sleeping() {
    let mut c = ctx();
    c.set_stdin(b"12345".to_vec());
    let mut h = fixture(c);
    clock_sub(&h, 1024, 1, 1, 5_000_000_000, false);
    fd_sub(&h, 1072, 2, EVENTTYPE_FD_READ, 0);
    fd_sub(&h, 1120, 3, EVENTTYPE_FD_WRITE, 1);
    fd_sub(&h, 1168, 4, EVENTTYPE_FD_READ, 9);
    fd_sub(&h, 1216, 5, EVENTTYPE_FD_READ, 1);
    clock_sub(&h, 1264, 6, 2, 1, false);
    clock_sub(&h, 1312, 7, 42, 1, false);
    let t = Instant::now();
    assert_eq!(
        h.errno("poll_oneoff", &[i(1024), i(2048), i(7), i(3000)]),
        0
    );
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "slept on the 5 s clock"
    );
    assert_eq!(h.u32_at(3000), 6);
    assert_eq!(event(&h, 2048), (2, 0, EVENTTYPE_FD_READ, 5, 0));
    let (ud, err, kind, _, _) = event(&h, 2048 + 32);
    assert_eq!((ud, err, kind), (3, 0, EVENTTYPE_FD_WRITE));
    assert_eq!(event(&h, 2048 + 64), (4, BADF, EVENTTYPE_FD_READ, 0, 0));
    assert_eq!(event(&h, 2048 + 96), (5, NOTSUP, EVENTTYPE_FD_READ, 0, 0));
    assert_eq!(event(&h, 2048 + 128), (6, NOTSUP, EVENTTYPE_CLOCK, 0, 0));
    assert_eq!(event(&h, 2048 + 160), (7, INVAL, EVENTTYPE_CLOCK, 0, 0));

    // No subscriptions, or an unknown tag, are invalid.
    assert_eq!(
        h.errno("poll_oneoff", &[i(1024), i(2048), i(0), i(3000)]),
        INVAL as i32
    );
    h.write(1024 + 8, &[9]);
    assert_eq!(
        h.errno("poll_oneoff", &[i(1024), i(2048), i(1), i(3000)]),
        INVAL as i32
    );
}

#[test]
fn wasi_unstable_layouts() {
    let wat = r#"(module
            (import "wasi_unstable" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
            (import "wasi_unstable" "fd_filestat_get" (func $stat (param i32 i32) (result i32)))
            (import "wasi_unstable" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "poll_oneoff") (param i32 i32 i32 i32) (result i32)
                (call $poll (local.get 0) (local.get 1) (local.get 2) (local.get 3)))
            (func (export "fd_filestat_get") (param i32 i32) (result i32)
                (call $stat (local.get 0) (local.get 1))))"#;
    let mut h = Harness::new(wat, ctx());
    // Preview 0 clock subscription: identifier @16, id @24, timeout @32, flags @48.
    let mut s = [0u8; 56];
    s[0..8].copy_from_slice(&77u64.to_le_bytes());
    s[8] = EVENTTYPE_CLOCK;
    s[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    s[24..28].copy_from_slice(&1u32.to_le_bytes());
    s[32..40].copy_from_slice(&2_000_000u64.to_le_bytes());
    h.write(1024, &s);
    let t = Instant::now();
    assert_eq!(
        h.errno("poll_oneoff", &[i(1024), i(2048), i(1), i(3000)]),
        0
    );
    assert!(t.elapsed() >= Duration::from_millis(2));
    assert_eq!(h.u32_at(3000), 1);
    assert_eq!(event(&h, 2048), (77, 0, EVENTTYPE_CLOCK, 0, 0));

    h.write(100, &[0xAA; 64]);
    assert_eq!(h.errno("fd_filestat_get", &[i(1), i(100)]), 0);
    let stat = h.read(100, 64);
    assert_eq!(stat[16], FILETYPE_CHARACTER_DEVICE);
    assert!(
        stat[..56]
            .iter()
            .enumerate()
            .all(|(k, &b)| k == 16 || b == 0)
    );
    assert!(
        stat[56..].iter().all(|&b| b == 0xAA),
        "wrote past the 56-byte preview-0 filestat"
    );
}

#[test]
fn known_signatures_match_witx() {
    use Type::{I32, I64};
    let sigs: &[(&str, &[Type], &[Type])] = &[
        ("args_get", &[I32, I32], &[I32]),
        ("args_sizes_get", &[I32, I32], &[I32]),
        ("environ_get", &[I32, I32], &[I32]),
        ("environ_sizes_get", &[I32, I32], &[I32]),
        ("clock_res_get", &[I32, I32], &[I32]),
        ("clock_time_get", &[I32, I64, I32], &[I32]),
        ("fd_advise", &[I32, I64, I64, I32], &[I32]),
        ("fd_allocate", &[I32, I64, I64], &[I32]),
        ("fd_close", &[I32], &[I32]),
        ("fd_datasync", &[I32], &[I32]),
        ("fd_fdstat_get", &[I32, I32], &[I32]),
        ("fd_fdstat_set_flags", &[I32, I32], &[I32]),
        ("fd_fdstat_set_rights", &[I32, I64, I64], &[I32]),
        ("fd_filestat_get", &[I32, I32], &[I32]),
        ("fd_filestat_set_size", &[I32, I64], &[I32]),
        ("fd_filestat_set_times", &[I32, I64, I64, I32], &[I32]),
        ("fd_pread", &[I32, I32, I32, I64, I32], &[I32]),
        ("fd_prestat_get", &[I32, I32], &[I32]),
        ("fd_prestat_dir_name", &[I32, I32, I32], &[I32]),
        ("fd_pwrite", &[I32, I32, I32, I64, I32], &[I32]),
        ("fd_read", &[I32, I32, I32, I32], &[I32]),
        ("fd_readdir", &[I32, I32, I32, I64, I32], &[I32]),
        ("fd_renumber", &[I32, I32], &[I32]),
        ("fd_seek", &[I32, I64, I32, I32], &[I32]),
        ("fd_sync", &[I32], &[I32]),
        ("fd_tell", &[I32, I32], &[I32]),
        ("fd_write", &[I32, I32, I32, I32], &[I32]),
        ("path_create_directory", &[I32, I32, I32], &[I32]),
        ("path_filestat_get", &[I32, I32, I32, I32, I32], &[I32]),
        (
            "path_filestat_set_times",
            &[I32, I32, I32, I32, I64, I64, I32],
            &[I32],
        ),
        ("path_link", &[I32, I32, I32, I32, I32, I32, I32], &[I32]),
        (
            "path_open",
            &[I32, I32, I32, I32, I32, I64, I64, I32, I32],
            &[I32],
        ),
        ("path_readlink", &[I32, I32, I32, I32, I32, I32], &[I32]),
        ("path_remove_directory", &[I32, I32, I32], &[I32]),
        ("path_rename", &[I32, I32, I32, I32, I32, I32], &[I32]),
        ("path_symlink", &[I32, I32, I32, I32, I32], &[I32]),
        ("path_unlink_file", &[I32, I32, I32], &[I32]),
        ("poll_oneoff", &[I32, I32, I32, I32], &[I32]),
        ("proc_exit", &[I32], &[]),
        ("proc_raise", &[I32], &[I32]),
        ("sched_yield", &[], &[I32]),
        ("random_get", &[I32, I32], &[I32]),
        ("sock_accept", &[I32, I32, I32], &[I32]),
        ("sock_recv", &[I32, I32, I32, I32, I32, I32], &[I32]),
        ("sock_send", &[I32, I32, I32, I32, I32], &[I32]),
        ("sock_shutdown", &[I32, I32], &[I32]),
    ];
    assert_eq!(sigs.len(), KNOWN_FUNCTIONS.len());
    let mut store = Store::default();
    let env = FunctionEnv::new(&mut store, ctx());
    for flavor in [Flavor::Preview1, Flavor::Unstable] {
        for (name, params, results) in sigs {
            assert!(
                KNOWN_FUNCTIONS.contains(name),
                "{name} missing from KNOWN_FUNCTIONS"
            );
            let f = known_function(&mut store, &env, flavor, name)
                .unwrap_or_else(|| panic!("{name} not implemented"));
            assert_eq!(
                f.ty(&store),
                FunctionType::new(params.to_vec(), results.to_vec()),
                "{name}"
            );
        }
    }
}

#[test]
fn signature_mismatch_is_reported() {
    let wat =
        r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32) (result i32))))"#;
    let mut store = Store::default();
    let module = Module::new(&store, wat).unwrap();
    let env = FunctionEnv::new(&mut store, ctx());
    let mut imports = Imports::new();
    let err = add_imports(&mut store, &env, &module, &mut imports).unwrap_err();
    assert!(
        matches!(err, WasiError::SignatureMismatch { ref name, .. } if name == "fd_write"),
        "{err}"
    );

    let wat = r#"(module (import "wasi_snapshot_preview1" "memory" (memory 1)))"#;
    let module = Module::new(&store, wat).unwrap();
    let err = add_imports(&mut store, &env, &module, &mut imports).unwrap_err();
    assert!(matches!(err, WasiError::NotAFunction { .. }), "{err}");

    // Other namespaces are left for the caller.
    let wat = r#"(module (import "spindle" "fd_write" (func (param i32) (result i32))))"#;
    let module = Module::new(&store, wat).unwrap();
    let mut imports = Imports::new();
    add_imports(&mut store, &env, &module, &mut imports).unwrap();
    assert!(!imports.exists("spindle", "fd_write"));
}

#[test]
fn memory_not_attached_traps() {
    let mut store = Store::default();
    let module = Module::new(&store, FIXTURE).unwrap();
    let env = FunctionEnv::new(&mut store, ctx());
    let mut imports = Imports::new();
    add_imports(&mut store, &env, &module, &mut imports).unwrap();
    let instance = Instance::new(&mut store, &module, &imports).unwrap();
    let f = instance.exports.get_function("args_sizes_get").unwrap();
    let err = f.call(&mut store, &[i(0), i(4)]).unwrap_err();
    assert!(err.message().contains("set_memory"), "{}", err.message());
}

#[test]
fn log_sink_splits_lines_and_caps_length() {
    let mut lines: Vec<(String, &'static str, String)> = Vec::new();
    let mut emit = |f: &str, s: &'static str, l: &str| lines.push((f.to_owned(), s, l.to_owned()));
    let mut sink = OutputSink::log("fn-a", "stderr");
    sink.write_with(b"first\nsec", &mut emit);
    sink.write_with(b"ond\r\n\nthird \x1b[31mred", &mut emit);
    let long = vec![b'x'; LOG_LINE_MAX + 100];
    sink.write_with(b"\n", &mut emit);
    sink.write_with(&long, &mut emit);
    sink.write_with(b"yyy\ntail", &mut emit);
    sink.flush_with(&mut emit);
    sink.flush_with(&mut emit); // nothing left: no empty line
    let text: Vec<&str> = lines.iter().map(|(_, _, l)| l.as_str()).collect();
    assert_eq!(text.len(), 6, "{text:?}");
    assert_eq!(&text[..4], ["first", "second", "", "third \\u{1b}[31mred"]);
    assert!(
        text[4].starts_with(&"x".repeat(LOG_LINE_MAX)),
        "cap keeps the head of the line"
    );
    assert!(
        text[4].ends_with(" …[103 bytes truncated]"),
        "{}",
        &text[4][LOG_LINE_MAX..]
    );
    assert_eq!(text[5], "tail");
    assert!(lines.iter().all(|(f, s, _)| f == "fn-a" && *s == "stderr"));
}

fn tool_works(cmd: &mut std::process::Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spindle-wasi-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const C_PROGRAM: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <fcntl.h>

int main(int argc, char **argv) {
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    char body[256];
    size_t n = fread(body, 1, sizeof body - 1, stdin);
    body[n] = 0;
    clock_gettime(CLOCK_MONOTONIC, &b);
    long long dt = (long long)(b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec);
    const char *who = getenv("WHO");
    printf("hello %s argc=%d arg1=%s body=%s mono_ok=%d\n",
           who ? who : "(null)", argc, argc > 1 ? argv[1] : "-", body, dt >= 0);
    printf("time_ok=%d nohome=%d\n", time(NULL) > 1600000000, getenv("HOME") == NULL);
    printf("open_denied=%d\n", open("/etc/passwd", O_RDONLY) < 0);
    fprintf(stderr, "to stderr\n");
    return argc > 2 ? atoi(argv[2]) : 0;
}
"#;

/// A real wasi-libc program: startup (fdstat, prestat scan), args, environ, clocks,
/// stdio buffering, a denied open(), and both ways of exiting.
#[test]
fn wasi_libc_program() {
    let dir = scratch_dir("libc");
    let probe = dir.join("probe.c");
    std::fs::write(&probe, "int main(void) { return 0; }\n").unwrap();
    let probe_ok = tool_works(
        std::process::Command::new("clang")
            .args(["--target=wasm32-wasi", "-o"])
            .arg(dir.join("probe.wasm"))
            .arg(&probe),
    );
    if !probe_ok {
        testkit::cannot_run(
            "wasi_libc_program",
            "`clang --target=wasm32-wasi` with wasi-libc is not available (scripts/setup.sh installs it)",
        );
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let src = dir.join("prog.c");
    let wasm = dir.join("prog.wasm");
    std::fs::write(&src, C_PROGRAM).unwrap();
    let out = std::process::Command::new("clang")
        .args(["--target=wasm32-wasi", "-O2", "-o"])
        .arg(&wasm)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "clang failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&wasm).unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    let run = |args: &[&str]| {
        let mut c = WasiCtx::new(
            "c-prog",
            args.iter().map(|s| s.to_string()).collect(),
            vec![("WHO".into(), "spindle".into())],
        );
        c.set_stdin(b"request-body".to_vec());
        c.capture_stdout(4096);
        c.capture_stderr(4096);
        let mut h = Harness::from_bytes(&bytes, c);
        let result = h.call("_start", &[]);
        let stdout = String::from_utf8(h.ctx().take_stdout()).unwrap();
        let stderr = String::from_utf8(h.ctx().take_stderr()).unwrap();
        (result, stdout, stderr)
    };

    let (result, stdout, stderr) = run(&["prog", "x"]);
    assert!(result.is_ok(), "_start failed: {:?}", result.err());
    assert_eq!(
        stdout,
        "hello spindle argc=2 arg1=x body=request-body mono_ok=1\ntime_ok=1 nohome=1\nopen_denied=1\n"
    );
    assert_eq!(stderr, "to stderr\n");

    let (result, stdout, _) = run(&["prog", "y", "7"]);
    let err = result.expect_err("non-zero exit must trap via proc_exit");
    assert_eq!(err.downcast_ref::<ProcExit>(), Some(&ProcExit(7)), "{err}");
    assert!(
        stdout.starts_with("hello spindle argc=3 arg1=y"),
        "output flushed before exit: {stdout:?}"
    );
}

/// The example WASI command, run end to end through this layer and nothing else. The
/// body is larger than its 4 KiB buffer, so stdin is read in several calls and stdout
/// is written in several.
#[test]
fn example_rot13_command_runs() {
    testkit::build_examples();
    let path = testkit::wasm("rot13_cmd");
    let Ok(bytes) = std::fs::read(&path) else {
        testkit::cannot_run(
            "example_rot13_command_runs",
            format!("{} not built", path.display()),
        );
        return;
    };
    let body: Vec<u8> = b"Hello, World! abcxyz ABCXYZ 0123\n".repeat(400);
    let expected: Vec<u8> = b"Uryyb, Jbeyq! nopklm NOPKLM 0123\n".repeat(400);
    let mut c = WasiCtx::new("rot13", vec!["rot13".into()], vec![]);
    c.set_stdin(body.clone());
    c.capture_stdout(body.len());
    let mut h = Harness::from_bytes(&bytes, c);
    match h.call("_start", &[]) {
        Ok(_) => {}
        Err(e) => assert_eq!(e.downcast_ref::<ProcExit>(), Some(&ProcExit(0)), "{e}"),
    }
    assert!(!h.ctx().stdout_truncated());
    assert!(h.ctx().take_stdout() == expected, "rot13 output differs");
}

/// Modules built by the examples must at least link against this layer.
#[test]
fn example_modules_link() {
    testkit::build_examples();
    let dir = testkit::repo_root().join("examples/wasm");
    let mut found = 0;
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "wasm") {
                continue;
            }
            found += 1;
            let mut store = Store::default();
            let module = Module::from_file(&store, &path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let env = FunctionEnv::new(&mut store, ctx());
            let mut imports = Imports::new();
            add_imports(&mut store, &env, &module, &mut imports)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
    if found == 0 {
        testkit::cannot_run(
            "example_modules_link",
            format!("no .wasm files in {}", dir.display()),
        );
    }
}

mod files;
