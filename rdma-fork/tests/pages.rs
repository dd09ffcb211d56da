//! The page server and client over real TCP on 127.0.0.1 with real sealed memfds: the data
//! path, every refusal, hostile and broken peers on both sides, and image lifetimes.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use proto::ImageDescriptor;
use proto::image::module_hash;
use proto::pages::{
    Frame, FrameError, MAX_READ_PAGES, PAGE_SIZE, PROTOCOL_VERSION, RefuseReason, fresh_nonce,
    proof, read_frame, write_frame,
};
use rdma_fork::client::{ClientError, PageClient, Step, Violation};
use rdma_fork::registry::{ImageHandle, ImageRegistry, PublishedImage, Refusal, Stats};
use rdma_fork::server::{PageServer, RunningServer, ServerConfig};

const PAGE: usize = PAGE_SIZE as usize;
const TIMEOUT: Duration = Duration::from_secs(5);
/// 20 Wasm pages: more than one full read.
const PAGES: usize = 320;

/// Page `i` holds data unless `i % 4 == 0`; the bytes depend on page and offset.
fn pattern(pages: usize) -> Vec<u8> {
    let mut m = vec![0u8; pages * PAGE];
    for (i, page) in m.chunks_mut(PAGE).enumerate() {
        if i % 4 != 0 {
            for (j, b) in page.iter_mut().enumerate() {
                *b = ((i as u8).wrapping_mul(31) ^ (j as u8)) | 1;
            }
        }
    }
    m
}

struct Fixture {
    registry: Arc<ImageRegistry>,
    server: Option<RunningServer>,
    handle: ImageHandle,
    memory: Vec<u8>,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with(ServerConfig::default(), Duration::from_secs(60))
    }

    fn with(config: ServerConfig, lease: Duration) -> Fixture {
        let registry = Arc::new(ImageRegistry::new());
        let memory = pattern(PAGES);
        let handle = registry
            .publish(PublishedImage::from_memory("fixture", &memory, lease).unwrap())
            .unwrap();
        let server = PageServer::bind_with("127.0.0.1:0", registry.clone(), config)
            .unwrap()
            .spawn()
            .unwrap();
        Fixture {
            registry,
            server: Some(server),
            handle,
            memory,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.server.as_ref().unwrap().local_addr()
    }

    fn descriptor(&self) -> ImageDescriptor {
        descriptor_for(&self.handle, self.addr())
    }

    fn publish(&self, memory: &[u8], lease: Duration) -> ImageDescriptor {
        let h = self
            .registry
            .publish(PublishedImage::from_memory("extra", memory, lease).unwrap())
            .unwrap();
        descriptor_for(&h, self.addr())
    }

    fn connect(&self) -> PageClient {
        PageClient::connect(&self.descriptor(), TIMEOUT).unwrap()
    }

    fn stats(&self) -> Stats {
        self.registry.stats()
    }

    fn pages(&self, first: usize, count: usize) -> &[u8] {
        &self.memory[first * PAGE..(first + count) * PAGE]
    }
}

fn descriptor_for(h: &ImageHandle, parent: SocketAddr) -> ImageDescriptor {
    h.descriptor(
        parent,
        module_hash(b"\0asm\x01\0\0\0"),
        "wasmer-7.4-cranelift",
    )
}

fn read(c: &mut PageClient, first: u32, count: u32) -> Result<Vec<u8>, ClientError> {
    let mut buf = vec![0xa5u8; count as usize * PAGE];
    c.read(first, count, &mut buf).map(|()| buf)
}

/// Polls `cond` for up to 3 s.
#[track_caller]
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "timed out waiting for {what}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

#[track_caller]
fn assert_refused(r: Result<PageClient, ClientError>, want: RefuseReason) -> String {
    match r {
        Err(ClientError::Refused {
            reason, message, ..
        }) if reason == want => message,
        Err(e) => panic!("expected a {want:?} refusal, got {e}"),
        Ok(_) => panic!("expected a {want:?} refusal, got a connection"),
    }
}

// ---- raw protocol, for playing a hostile child ----

fn raw(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s
}

fn encode(f: &Frame) -> Vec<u8> {
    let mut b = Vec::new();
    f.encode(&mut b);
    b
}

fn hello(handle: u64, client_nonce: [u8; 16]) -> Frame {
    Frame::Hello {
        version: PROTOCOL_VERSION,
        handle,
        client_nonce,
    }
}

/// Sends Hello and answers the challenge with the right key; returns the Proof's MAC.
fn raw_handshake(s: &mut TcpStream, h: &ImageHandle, client_nonce: [u8; 16]) -> [u8; 32] {
    write_frame(s, &hello(h.id, client_nonce)).unwrap();
    let Frame::Challenge { server_nonce } = read_frame(s).unwrap() else {
        panic!("no challenge")
    };
    let mac = proof(&h.key, h.id, &server_nonce, &client_nonce);
    write_frame(s, &Frame::Proof { mac }).unwrap();
    assert!(matches!(read_frame(s).unwrap(), Frame::Welcome { .. }));
    mac
}

/// The server's last words on `s`: a `Refused` with `want`, then end of stream.
#[track_caller]
fn expect_refusal(s: &mut TcpStream, want: RefuseReason) -> String {
    let message = loop {
        match read_frame(s) {
            Ok(Frame::Refused { reason, message }) => {
                assert_eq!(reason, want, "{message}");
                break message;
            }
            Ok(Frame::Challenge { .. } | Frame::Welcome { .. }) => continue,
            other => panic!("expected Refused({want:?}), got {other:?}"),
        }
    };
    let mut rest = Vec::new();
    // End of stream or a reset (our unread bytes make the close a reset): either way closed.
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "bytes after Refused");
    message
}

// ---- the data path ----

#[test]
fn pages_round_trip_and_zero_pages_are_never_read() {
    // A memfd laid out by hand: page 8 is zero by the bitmap but holds junk in the memfd
    // (so serving it from the file would show), page 13 is marked non-zero but is all
    // zeros (the wire sends it as a zero bit anyway).
    let mut memory = pattern(PAGES);
    memory[13 * PAGE..14 * PAGE].fill(0);
    let fd = memfd_create(
        "hand-made",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .unwrap();
    let file = File::from(fd);
    file.set_len((PAGES * PAGE) as u64).unwrap();
    let mut nonzero = vec![0u64; PAGES.div_ceil(64)];
    for i in 0..PAGES {
        if i % 4 != 0 || i == 13 {
            nonzero[i / 64] |= 1 << (i % 64);
            file.write_all_at(&memory[i * PAGE..(i + 1) * PAGE], (i * PAGE) as u64)
                .unwrap();
        }
    }
    file.write_all_at(&[0xee; PAGE], (8 * PAGE) as u64).unwrap();
    let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE;
    fcntl(&file, FcntlArg::F_ADD_SEALS(seals)).unwrap();

    let registry = Arc::new(ImageRegistry::new());
    let h = registry
        .publish(PublishedImage {
            memfd: file.into(),
            memory_bytes: (PAGES * PAGE) as u64,
            nonzero,
            lease: Duration::from_secs(60),
            meta: Vec::new(),
        })
        .unwrap();
    let server = PageServer::bind("127.0.0.1:0", registry.clone())
        .unwrap()
        .spawn()
        .unwrap();
    let d = descriptor_for(&h, server.local_addr());
    let mut c = PageClient::connect(&d, TIMEOUT).unwrap();
    assert_eq!(c.page_count(), PAGES as u64);
    assert_eq!(registry.stats().handshakes_ok, 1);
    assert_eq!(registry.stats().children_attached, 1);

    let mut got = read(&mut c, 0, MAX_READ_PAGES).unwrap();
    got.extend(read(&mut c, MAX_READ_PAGES, (PAGES as u32) - MAX_READ_PAGES).unwrap());
    assert!(got == memory, "the pages differ from the image");
    assert!(got[8 * PAGE..9 * PAGE].iter().all(|&b| b == 0));
    // Single pages, one zero, one not, one at the very end.
    assert_eq!(read(&mut c, 8, 1).unwrap(), memory[8 * PAGE..9 * PAGE]);
    assert_eq!(read(&mut c, 9, 1).unwrap(), memory[9 * PAGE..10 * PAGE]);
    assert_eq!(
        read(&mut c, PAGES as u32 - 1, 1).unwrap(),
        memory[(PAGES - 1) * PAGE..]
    );

    let zero_by_map = PAGES / 4; // pages 0, 4, 8, ...
    let zeros_sent = zero_by_map + 1; // and page 13
    let s = registry.stats();
    assert_eq!(s.reads, 5);
    assert_eq!(s.pages_served, PAGES as u64 + 3);
    assert_eq!(s.zero_pages_served, zeros_sent as u64 + 1, "page 8 again");
    // Only pages the bitmap marks were read: everything but the zero-map pages, and again
    // pages 9 and the last one.
    assert_eq!(
        s.memfd_bytes_read,
        ((PAGES - zero_by_map + 2) * PAGE) as u64
    );
    let cs = c.stats();
    assert_eq!(
        (cs.round_trips, cs.pages, cs.zero_pages),
        (5, PAGES as u64 + 3, zeros_sent as u64 + 1)
    );
    // Zero pages cost no data bytes on the wire: 241 data pages, and per read a 13-byte
    // header plus the zero map (32, 8, 1, 1, 1 bytes).
    let data_pages = PAGES - zeros_sent + 2;
    assert_eq!(
        s.bytes_served,
        (data_pages * PAGE + 5 * 13 + 32 + 8 + 3) as u64
    );
    // Challenge (37 bytes) and Welcome (17) besides.
    assert_eq!(cs.bytes_received, s.bytes_served + 37 + 17);
    assert_eq!(s.refusals.total(), 0);

    c.close().unwrap();
    wait_until("the connection to end", || {
        registry.stats().connections_open == 0
    });
    assert_eq!(registry.stats().children_attached, 0);
    server.shutdown().unwrap();
}

#[test]
fn many_children_read_at_once() {
    let f = Fixture::new();
    let f = &f;
    thread::scope(|s| {
        for k in 0..8u32 {
            s.spawn(move || {
                let mut c = f.connect();
                for r in 0..20u32 {
                    let first = (k * 37 + r * 13) % (PAGES as u32 - 16);
                    let got = read(&mut c, first, 16).unwrap();
                    assert!(got == f.pages(first as usize, 16), "child {k} read {r}");
                }
            });
        }
    });
    let s = f.stats();
    assert_eq!((s.handshakes_ok, s.reads), (8, 160));
    assert_eq!(s.refusals.total(), 0);
}

#[test]
fn client_refuses_bad_reads_locally() {
    let f = Fixture::new();
    let mut c = f.connect();
    let mut buf = vec![0u8; PAGE];
    for (first, count, len) in [
        (0, 0, 0),
        (0, MAX_READ_PAGES + 1, (MAX_READ_PAGES as usize + 1) * PAGE),
        (PAGES as u32, 1, PAGE),
        (u32::MAX, 1, PAGE),
        (0, 2, PAGE),
    ] {
        buf.resize(len, 0);
        assert!(matches!(
            c.read(first, count, &mut buf),
            Err(ClientError::InvalidRead { .. })
        ));
    }
    // A local refusal does not spend the connection.
    assert_eq!(read(&mut c, 1, 1).unwrap(), f.pages(1, 1));
    assert_eq!(f.stats().refusals.total(), 0);
}

// ---- refusals ----

#[test]
fn wrong_key_is_refused_and_counted() {
    let f = Fixture::new();
    let mut d = f.descriptor();
    d.key[0] ^= 1;
    let msg = assert_refused(PageClient::connect(&d, TIMEOUT), RefuseReason::BadProof);
    assert!(msg.contains("proof"), "{msg}");
    let s = f.stats();
    assert_eq!((s.refusals.bad_proof, s.refusals.total()), (1, 1));
    assert_eq!((s.handshakes_ok, s.children_attached), (0, 0));
    // The image is unharmed.
    assert_eq!(read(&mut f.connect(), 2, 1).unwrap(), f.pages(2, 1));
}

#[test]
fn unknown_handle_is_refused_and_counted() {
    let f = Fixture::new();
    let mut d = f.descriptor();
    d.handle ^= 0x8000_0000;
    let msg = assert_refused(
        PageClient::connect(&d, TIMEOUT),
        RefuseReason::UnknownHandle,
    );
    assert!(msg.contains(&format!("{:#018x}", d.handle)), "{msg}");
    assert_eq!(f.stats().refusals.unknown_handle, 1);
}

#[test]
fn revoked_handle_is_refused_before_connect() {
    let f = Fixture::new();
    f.registry.revoke(f.handle.id).unwrap();
    assert_refused(
        PageClient::connect(&f.descriptor(), TIMEOUT),
        RefuseReason::Revoked,
    );
    let s = f.stats();
    assert_eq!((s.refusals.revoked, s.refusals.total()), (1, 1));
    // Nobody holds it: the memfd is closed.
    assert_eq!(s.images_alive, 0);
}

#[test]
fn revoke_while_connected_refuses_the_next_read() {
    let f = Fixture::new();
    let mut c = f.connect();
    assert_eq!(read(&mut c, 5, 2).unwrap(), f.pages(5, 2));
    f.registry.revoke(f.handle.id).unwrap();
    // Still open: the connection holds it until it hears.
    assert_eq!(f.stats().images_alive, 1);
    match read(&mut c, 5, 2) {
        Err(ClientError::Refused {
            during: Step::Read,
            reason: RefuseReason::Revoked,
            ..
        }) => {}
        other => panic!("expected Revoked, got {other:?}"),
    }
    assert!(!c.is_usable());
    assert!(matches!(read(&mut c, 5, 2), Err(ClientError::Unusable)));
    assert_eq!(f.stats().refusals.revoked, 1);
    wait_until("the revoked image's memfd to close", || {
        f.stats().images_alive == 0
    });
    assert_eq!(f.stats().children_attached, 0);
}

#[test]
fn expired_lease_is_refused_and_counted() {
    let f = Fixture::new();
    let d = f.publish(&pattern(16), Duration::from_millis(50));
    thread::sleep(Duration::from_millis(80));
    let msg = assert_refused(PageClient::connect(&d, TIMEOUT), RefuseReason::Expired);
    assert!(msg.contains("expired"), "{msg}");
    assert_eq!(f.stats().refusals.expired, 1);
}

#[test]
fn replayed_proof_is_refused() {
    let f = Fixture::new();
    let nonce = [7u8; 16];
    let mut first = raw(f.addr());
    let mac = raw_handshake(&mut first, &f.handle, nonce);
    // Same Hello, same recorded Proof, new connection: the server's nonce differs.
    let mut second = raw(f.addr());
    write_frame(&mut second, &hello(f.handle.id, nonce)).unwrap();
    let Frame::Challenge { .. } = read_frame(&mut second).unwrap() else {
        panic!("no challenge")
    };
    second.write_all(&encode(&Frame::Proof { mac })).unwrap();
    expect_refusal(&mut second, RefuseReason::BadProof);
    assert_eq!(f.stats().refusals.bad_proof, 1);
    assert_eq!(f.stats().handshakes_ok, 1);
    // One proof per connection: the first is still fine, and a Proof now is out of order.
    write_frame(
        &mut first,
        &Frame::Read {
            first_page: 3,
            count: 1,
        },
    )
    .unwrap();
    assert!(read_frame(&mut first).unwrap().page_iter().is_some());
    first.write_all(&encode(&Frame::Proof { mac })).unwrap();
    expect_refusal(&mut first, RefuseReason::BadRequest);
}

#[test]
fn server_nonces_are_fresh() {
    let f = Fixture::new();
    let challenge = || {
        let mut s = raw(f.addr());
        write_frame(&mut s, &hello(f.handle.id, [0; 16])).unwrap();
        match read_frame(&mut s).unwrap() {
            Frame::Challenge { server_nonce } => server_nonce,
            other => panic!("{other:?}"),
        }
    };
    let (a, b) = (challenge(), challenge());
    assert_ne!(a, b);
}

/// What a hostile peer sends, and in which state.
enum State {
    Fresh,
    AfterHello,
    InSession,
}

#[test]
fn malformed_and_unexpected_frames_close_only_their_connection() {
    let f = Fixture::new();
    let stop = AtomicBool::new(false);
    let good_reads = AtomicU64::new(0);
    let f = &f;
    thread::scope(|scope| {
        // A good child reading all along.
        let good = scope.spawn(|| {
            let mut c = f.connect();
            let mut i = 0u32;
            while !stop.load(Relaxed) {
                let first = (i * 7) % (PAGES as u32 - 8);
                let got = read(&mut c, first, 8).expect("the good child is served");
                assert!(got == f.pages(first as usize, 8));
                good_reads.fetch_add(1, Relaxed);
                i += 1;
            }
        });

        let h = &f.handle;
        let frame = |f: Frame| encode(&f);
        let hello_bytes = frame(hello(h.id, [1; 16]));
        let truncated_hello = hello_bytes[..10].to_vec();
        let short_hello = [&5u32.to_le_bytes()[..], &hello_bytes[4..9]].concat();
        let mut long_hello = hello_bytes.clone();
        long_hello[0] += 1;
        long_hello.push(0);
        let bad_version = frame(Frame::Hello {
            version: 2,
            handle: h.id,
            client_nonce: [1; 16],
        });
        let read_frame_bytes = |first: u32, count: u32| {
            [
                &9u32.to_le_bytes()[..],
                &[6],
                &first.to_le_bytes(),
                &count.to_le_bytes(),
            ]
            .concat()
        };
        let small_pages = Frame::pages_from(0, &[0u8; PAGE]).unwrap();
        let refused = frame(Frame::Refused {
            reason: RefuseReason::Internal,
            message: "x".into(),
        });
        use RefuseReason::BadRequest as Bad;
        type C = fn(&Stats) -> u64;
        let malformed: C = |s| s.refusals.malformed;
        let bad_request: C = |s| s.refusals.bad_request;
        let cases: Vec<(&str, State, Vec<u8>, bool, C)> = vec![
            (
                "http garbage",
                State::Fresh,
                b"GET / HTTP/1.1\r\n\r\n".to_vec(),
                false,
                malformed,
            ),
            (
                "unknown kind",
                State::Fresh,
                vec![1, 0, 0, 0, 99],
                false,
                malformed,
            ),
            (
                "empty frame",
                State::Fresh,
                vec![0, 0, 0, 0],
                false,
                malformed,
            ),
            (
                "u32::MAX length",
                State::Fresh,
                u32::MAX.to_le_bytes().to_vec(),
                false,
                malformed,
            ),
            (
                "1 MiB length",
                State::Fresh,
                (1u32 << 20).to_le_bytes().to_vec(),
                false,
                malformed,
            ),
            (
                "truncated Hello, then EOF",
                State::Fresh,
                truncated_hello,
                true,
                malformed,
            ),
            (
                "half a header, then EOF",
                State::Fresh,
                vec![27, 0],
                true,
                malformed,
            ),
            (
                "Hello missing fields",
                State::Fresh,
                short_hello,
                false,
                malformed,
            ),
            (
                "Hello with a trailing byte",
                State::Fresh,
                long_hello,
                false,
                malformed,
            ),
            (
                "unknown version",
                State::Fresh,
                bad_version,
                false,
                bad_request,
            ),
            (
                "Read before Hello",
                State::Fresh,
                read_frame_bytes(0, 1),
                false,
                bad_request,
            ),
            (
                "Proof before Hello",
                State::Fresh,
                frame(Frame::Proof { mac: [0; 32] }),
                false,
                bad_request,
            ),
            (
                "Bye before Hello",
                State::Fresh,
                frame(Frame::Bye),
                false,
                bad_request,
            ),
            (
                "Challenge from a client",
                State::Fresh,
                frame(Frame::Challenge {
                    server_nonce: [0; 32],
                }),
                false,
                bad_request,
            ),
            (
                "Refused from a client",
                State::Fresh,
                refused.clone(),
                false,
                bad_request,
            ),
            (
                "Pages from a client",
                State::Fresh,
                frame(small_pages),
                false,
                bad_request,
            ),
            (
                "Pages with data from a client",
                State::Fresh,
                frame(Frame::pages_from(0, &[1u8; PAGE]).unwrap()),
                false,
                malformed,
            ),
            (
                "Hello twice",
                State::AfterHello,
                hello_bytes.clone(),
                false,
                bad_request,
            ),
            (
                "Read before Proof",
                State::AfterHello,
                read_frame_bytes(0, 1),
                false,
                bad_request,
            ),
            (
                "Bye before Proof",
                State::AfterHello,
                frame(Frame::Bye),
                false,
                bad_request,
            ),
            (
                "Welcome from a client",
                State::AfterHello,
                frame(Frame::Welcome {
                    memory_bytes: 0,
                    page_size: 4096,
                }),
                false,
                bad_request,
            ),
            (
                "garbage for a Proof",
                State::AfterHello,
                vec![3, 0, 0, 0, 3, 1, 2],
                false,
                malformed,
            ),
            (
                "Hello in session",
                State::InSession,
                hello_bytes.clone(),
                false,
                bad_request,
            ),
            (
                "Proof in session",
                State::InSession,
                frame(Frame::Proof { mac: [0; 32] }),
                false,
                bad_request,
            ),
            (
                "Refused in session",
                State::InSession,
                refused,
                false,
                bad_request,
            ),
            (
                "Read past the end",
                State::InSession,
                read_frame_bytes(PAGES as u32 - 1, 2),
                false,
                bad_request,
            ),
            (
                "Read far past the end",
                State::InSession,
                read_frame_bytes(1 << 30, 1),
                false,
                bad_request,
            ),
            (
                "Read of 0 pages",
                State::InSession,
                read_frame_bytes(0, 0),
                false,
                bad_request,
            ),
            (
                "Read of 257 pages",
                State::InSession,
                read_frame_bytes(0, MAX_READ_PAGES + 1),
                false,
                bad_request,
            ),
            (
                "Read wrapping past 2^32",
                State::InSession,
                read_frame_bytes(u32::MAX, 2),
                false,
                bad_request,
            ),
            (
                "oversized in session",
                State::InSession,
                (MAX_READ_PAGES * 4096).to_le_bytes().to_vec(),
                false,
                malformed,
            ),
            (
                "truncated Read, then EOF",
                State::InSession,
                read_frame_bytes(0, 1)[..6].to_vec(),
                true,
                malformed,
            ),
        ];
        for (name, state, bytes, eof, counter) in cases {
            let before = f.stats();
            let mut s = raw(f.addr());
            match state {
                State::Fresh => {}
                State::AfterHello => {
                    write_frame(&mut s, &hello(h.id, [2; 16])).unwrap();
                    assert!(matches!(
                        read_frame(&mut s).unwrap(),
                        Frame::Challenge { .. }
                    ));
                }
                State::InSession => {
                    raw_handshake(&mut s, h, [3; 16]);
                }
            }
            s.write_all(&bytes).unwrap();
            if eof {
                s.shutdown(Shutdown::Write).unwrap();
            }
            let msg = expect_refusal(&mut s, Bad);
            let after = f.stats();
            assert_eq!(counter(&after), counter(&before) + 1, "{name}: {msg}");
            assert_eq!(
                after.refusals.total(),
                before.refusals.total() + 1,
                "{name}: {msg}"
            );
        }
        assert!(good_reads.load(Relaxed) > 0);
        let during = good_reads.load(Relaxed);
        wait_until("the good child to keep reading", || {
            good_reads.load(Relaxed) > during + 5
        });
        stop.store(true, Relaxed);
        good.join().unwrap();
    });
    let s = f.stats();
    assert_eq!(
        s.refusals.total(),
        s.refusals.malformed + s.refusals.bad_request
    );
    wait_until("hostile connections to close", || {
        f.stats().connections_open == 0
    });
}

#[test]
fn silent_and_trickling_peers_are_cut_off() {
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let f = Fixture::with(config, Duration::from_secs(60));
    // Silent from the start.
    let start = Instant::now();
    let mut silent = raw(f.addr());
    let mut buf = [0u8; 16];
    assert_eq!(silent.read(&mut buf).unwrap_or(0), 0);
    assert!(start.elapsed() < Duration::from_secs(2));
    // A Hello one byte every 50 ms takes longer than the handshake deadline.
    let start = Instant::now();
    let mut slow = raw(f.addr());
    for b in encode(&hello(f.handle.id, [4; 16])) {
        if slow.write_all(&[b]).is_err() {
            break;
        }
        thread::sleep(Duration::from_millis(50));
        if start.elapsed() > Duration::from_secs(3) {
            panic!("the trickling peer was never cut off");
        }
    }
    let _ = slow.read(&mut buf);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    // Idle after the handshake.
    let mut c = f.connect();
    thread::sleep(Duration::from_millis(500));
    assert!(matches!(
        read(&mut c, 1, 1),
        Err(ClientError::ConnectionLost { .. })
    ));
    wait_until("three timeouts", || f.stats().timeouts == 3);
    wait_until("all connections to close", || {
        f.stats().connections_open == 0
    });
}

#[test]
fn connection_limit_refuses_busy() {
    let config = ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    };
    let f = Fixture::with(config, Duration::from_secs(60));
    let mut first = f.connect();
    let idle = raw(f.addr());
    wait_until("two connections", || f.stats().connections_open == 2);
    let msg = assert_refused(
        PageClient::connect(&f.descriptor(), TIMEOUT),
        RefuseReason::Busy,
    );
    assert!(msg.contains("limit of 2"), "{msg}");
    assert_eq!(f.stats().refusals.busy, 1);
    // Those in keep being served; a slot that frees up is reused.
    assert_eq!(read(&mut first, 1, 1).unwrap(), f.pages(1, 1));
    drop(idle);
    wait_until("one connection", || f.stats().connections_open == 1);
    let mut second = f.connect();
    assert_eq!(read(&mut second, 2, 1).unwrap(), f.pages(2, 1));
}

// ---- lifetimes ----

#[test]
fn expired_image_serves_attached_children_and_is_reaped_after_them() {
    let f = Fixture::new();
    let memory = pattern(16);
    let d = f.publish(&memory, Duration::from_millis(200));
    assert_eq!(f.stats().images_alive, 2);
    let mut c = PageClient::connect(&d, TIMEOUT).unwrap();
    thread::sleep(Duration::from_millis(300));
    assert_eq!(f.registry.lookup(d.handle).unwrap_err(), Refusal::Expired);
    assert_refused(PageClient::connect(&d, TIMEOUT), RefuseReason::Expired);
    // The attached child still reads, and keeps the memfd open through reaping.
    assert_eq!(read(&mut c, 0, 16).unwrap(), memory);
    assert_eq!(f.registry.reap(), 0);
    assert_eq!(f.registry.status(d.handle).unwrap().connections, 1);
    assert_eq!(f.stats().images_alive, 2);
    c.close().unwrap();
    wait_until("the expired image's memfd to close", || {
        f.stats().images_alive == 1
    });
    assert_eq!(f.registry.lookup(d.handle).unwrap_err(), Refusal::Expired);
    assert_eq!(f.stats().children_attached, 0);
}

#[test]
fn handshake_renews_the_lease_and_the_server_reaps() {
    let config = ServerConfig {
        reap_interval: Duration::from_millis(20),
        ..ServerConfig::default()
    };
    let f = Fixture::with(config, Duration::from_secs(60));
    let d = f.publish(&pattern(16), Duration::from_millis(400));
    // Children every 200 ms keep it alive well past its first lease.
    for _ in 0..4 {
        thread::sleep(Duration::from_millis(200));
        PageClient::connect(&d, TIMEOUT).unwrap().close().unwrap();
    }
    assert!(f.registry.lookup(d.handle).is_ok());
    // Left alone, the server's periodic reap closes it.
    wait_until("the server to reap the image", || {
        f.stats().images_alive == 1
    });
    assert_eq!(f.registry.lookup(d.handle).unwrap_err(), Refusal::Expired);
}

// ---- broken parents ----

#[test]
fn server_shutdown_mid_fetch_is_a_clean_error() {
    let mut f = Fixture::new();
    let d = f.descriptor();
    let again = d.clone();
    let (tx, rx) = mpsc::channel();
    let fetcher = thread::spawn(move || {
        let mut c = PageClient::connect(&d, TIMEOUT).unwrap();
        let mut buf = vec![0u8; MAX_READ_PAGES as usize * PAGE];
        let mut n = 0;
        loop {
            if let Err(e) = c.read(0, MAX_READ_PAGES, &mut buf) {
                return (e, n, Instant::now());
            }
            n += 1;
            if n == 3 {
                tx.send(()).unwrap();
            }
        }
    });
    rx.recv().unwrap();
    let start = Instant::now();
    f.server.take().unwrap().shutdown().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        start.elapsed()
    );
    let (err, n, at) = fetcher.join().unwrap();
    assert!(n >= 3);
    assert!(
        matches!(
            err,
            ClientError::ConnectionLost {
                during: Step::Read,
                ..
            }
        ),
        "{err}"
    );
    assert!(at.duration_since(start) < Duration::from_secs(2));
    assert!(matches!(
        PageClient::connect(&again, TIMEOUT),
        Err(ClientError::Connect { .. })
    ));
}

const CHILD_ENV: &str = "RDMA_FORK_PAGESRV_CHILD";

/// Not a test of its own: the server process that `killed_server_process_...` starts.
#[test]
fn child_server_process() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let registry = Arc::new(ImageRegistry::new());
    let h = registry
        .publish(
            PublishedImage::from_memory("child", &pattern(PAGES), Duration::from_secs(60)).unwrap(),
        )
        .unwrap();
    let server = PageServer::bind("127.0.0.1:0", registry)
        .unwrap()
        .spawn()
        .unwrap();
    // The descriptor text is the full credential: fine for a test, never for a log.
    println!("DESCRIPTOR {}", descriptor_for(&h, server.local_addr()));
    std::io::stdout().flush().unwrap();
    // Killed long before this; the bound keeps an orphan from lingering.
    thread::sleep(Duration::from_secs(30));
}

#[test]
fn killed_server_process_gives_a_clean_error_mid_fetch() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_server_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let d: ImageDescriptor = loop {
        let line = lines
            .next()
            .expect("the child printed its descriptor")
            .unwrap();
        // The harness's "test ... " lead-in shares the line.
        if let Some((_, text)) = line.split_once("DESCRIPTOR ") {
            break text.parse().unwrap();
        }
    };
    let memory = pattern(PAGES);
    let (tx, rx) = mpsc::channel();
    let fetcher = thread::spawn(move || {
        let mut c = PageClient::connect(&d, TIMEOUT).unwrap();
        let mut buf = vec![0u8; MAX_READ_PAGES as usize * PAGE];
        let mut n = 0u32;
        loop {
            let first = (n * 17) % (PAGES as u32 - MAX_READ_PAGES);
            if let Err(e) = c.read(first, MAX_READ_PAGES, &mut buf) {
                return (e, n, Instant::now());
            }
            let want = &memory[first as usize * PAGE..(first + MAX_READ_PAGES) as usize * PAGE];
            assert!(buf == want);
            n += 1;
            if n == 3 {
                tx.send(()).unwrap();
            }
        }
    });
    rx.recv().unwrap();
    let killed = Instant::now();
    child.kill().unwrap();
    child.wait().unwrap();
    let (err, n, at) = fetcher.join().unwrap();
    assert!(n >= 3);
    assert!(matches!(err, ClientError::ConnectionLost { .. }), "{err}");
    assert!(
        at.duration_since(killed) < Duration::from_secs(1),
        "{:?}",
        at.duration_since(killed)
    );
}

/// A fake parent that handshakes like a page server (proof unchecked) and then misbehaves.
enum Fake {
    /// Never answers anything.
    Silent,
    /// Welcome with another memory size.
    WrongWelcome,
    /// Answers a Read with pages from elsewhere.
    WrongRange,
    /// Answers a Read with a Welcome.
    WrongKind,
    /// Sends half of the Pages frame, then goes silent.
    HalfThenSilent,
    /// Sends half of the Pages frame, then dies.
    HalfThenClose,
}

fn fake_parent(fake: Fake, memory_bytes: u64) -> (SocketAddr, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let linger = |s: &mut TcpStream| {
            // Hold the connection open, silent, until the client gives up.
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = s.read_to_end(&mut Vec::new());
        };
        if let Fake::Silent = fake {
            return linger(&mut s);
        }
        let Ok(Frame::Hello { .. }) = read_frame(&mut s) else {
            return;
        };
        let server_nonce = fresh_nonce::<32>().unwrap();
        write_frame(&mut s, &Frame::Challenge { server_nonce }).unwrap();
        let Ok(Frame::Proof { .. }) = read_frame(&mut s) else {
            return;
        };
        let offered = match fake {
            Fake::WrongWelcome => memory_bytes * 2,
            _ => memory_bytes,
        };
        let _ = write_frame(
            &mut s,
            &Frame::Welcome {
                memory_bytes: offered,
                page_size: PAGE_SIZE,
            },
        );
        let Ok(Frame::Read { first_page, count }) = read_frame(&mut s) else {
            return;
        };
        let data = vec![1u8; count as usize * PAGE];
        let pages = encode(&Frame::pages_from(first_page, &data).unwrap());
        match fake {
            Fake::WrongRange => s
                .write_all(&encode(&Frame::pages_from(first_page + 1, &data).unwrap()))
                .unwrap(),
            Fake::WrongKind => write_frame(
                &mut s,
                &Frame::Welcome {
                    memory_bytes,
                    page_size: PAGE_SIZE,
                },
            )
            .unwrap(),
            Fake::HalfThenSilent => {
                s.write_all(&pages[..pages.len() / 2]).unwrap();
                linger(&mut s);
            }
            Fake::HalfThenClose => s.write_all(&pages[..pages.len() / 2]).unwrap(),
            Fake::Silent | Fake::WrongWelcome => {}
        }
    });
    (addr, t)
}

#[test]
fn broken_parents_give_typed_errors_within_the_timeout() {
    let timeout = Duration::from_millis(300);
    let handle = ImageHandle {
        id: 42,
        key: [9; 32],
        memory_bytes: (PAGES * PAGE) as u64,
    };
    let run = |fake: Fake| {
        let (addr, t) = fake_parent(fake, handle.memory_bytes);
        let d = descriptor_for(&handle, addr);
        let start = Instant::now();
        let res = PageClient::connect(&d, timeout).and_then(|mut c| read(&mut c, 2, 4).map(|_| c));
        let took = start.elapsed();
        assert!(took < timeout * 3, "took {took:?}");
        let err = res.err().expect("a broken parent gives an error");
        t.join().unwrap();
        err
    };
    let e = run(Fake::Silent);
    assert!(
        matches!(
            e,
            ClientError::Timeout {
                during: Step::Handshake,
                ..
            }
        ),
        "{e}"
    );
    let e = run(Fake::WrongWelcome);
    assert!(
        matches!(
            e,
            ClientError::Protocol {
                violation: Violation::WelcomeMismatch { .. },
                ..
            }
        ),
        "{e}"
    );
    let e = run(Fake::WrongRange);
    assert!(
        matches!(
            e,
            ClientError::Protocol {
                during: Step::Read,
                violation: Violation::WrongRange { got_first: 3, .. }
            }
        ),
        "{e}"
    );
    let e = run(Fake::WrongKind);
    assert!(
        matches!(
            e,
            ClientError::Protocol {
                violation: Violation::UnexpectedFrame {
                    expected: "Pages",
                    got: "Welcome"
                },
                ..
            }
        ),
        "{e}"
    );
    let e = run(Fake::HalfThenSilent);
    assert!(
        matches!(
            e,
            ClientError::Timeout {
                during: Step::Read,
                ..
            }
        ),
        "{e}"
    );
    let e = run(Fake::HalfThenClose);
    assert!(
        matches!(
            e,
            ClientError::ConnectionLost {
                during: Step::Read,
                ..
            }
        ),
        "{e}"
    );
    // Nobody listening at all.
    let gone = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let e = PageClient::connect(&descriptor_for(&handle, gone), timeout)
        .err()
        .unwrap();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    assert!(e.to_string().contains(&gone.to_string()), "{e}");
}

#[test]
fn frame_error_and_client_error_messages_say_what_happened() {
    let e = ClientError::Refused {
        during: Step::Handshake,
        reason: RefuseReason::Expired,
        message: "handle 0x2a: the image's lease expired".into(),
    };
    let s = e.to_string();
    assert!(
        s.contains("handshake") && s.contains("Expired") && s.contains("lease"),
        "{s}"
    );
    let e = ClientError::Protocol {
        during: Step::Read,
        violation: Violation::Malformed(FrameError::UnknownKind(77)),
    };
    assert!(e.to_string().contains("unknown frame kind 77"));
}

#[test]
fn metadata_is_served_after_the_handshake_and_refused_when_absent() {
    let registry = Arc::new(ImageRegistry::new());
    let memory = pattern(16);
    let meta = b"SPDLMETA: opaque to the server".to_vec();
    let with = registry
        .publish(PublishedImage {
            meta: meta.clone(),
            ..PublishedImage::from_memory("meta", &memory, Duration::from_secs(60)).unwrap()
        })
        .unwrap();
    let without = registry
        .publish(PublishedImage::from_memory("bare", &memory, Duration::from_secs(60)).unwrap())
        .unwrap();
    let server = PageServer::bind("127.0.0.1:0", registry.clone())
        .unwrap()
        .spawn()
        .unwrap();
    let mut c = PageClient::connect(&descriptor_for(&with, server.local_addr()), TIMEOUT).unwrap();
    assert_eq!(c.meta().unwrap(), meta);
    assert_eq!(
        read(&mut c, 1, 2).unwrap(),
        memory[PAGE..3 * PAGE],
        "pages still flow"
    );
    assert_eq!(c.meta().unwrap(), meta, "asked again");

    let mut c =
        PageClient::connect(&descriptor_for(&without, server.local_addr()), TIMEOUT).unwrap();
    match c.meta() {
        Err(ClientError::Refused {
            reason, message, ..
        }) => {
            assert_eq!(reason, RefuseReason::BadRequest);
            assert!(message.contains("without metadata"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(registry.stats().refusals.bad_request, 1);
}

#[test]
fn a_remote_source_connects_again_after_the_server_closed_its_idle_connection() {
    use rdma_fork::{PageBitmap, PageSource, RemoteSource};
    let config = ServerConfig {
        idle_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let f = Fixture::with(config, Duration::from_secs(60));
    let d = descriptor_for(&f.handle, f.server.as_ref().unwrap().local_addr());
    let nonzero = PageBitmap::nonzero_pages(&f.memory);
    let source = RemoteSource::connect(&d, nonzero, TIMEOUT).unwrap();
    let mut page = vec![0u8; PAGE];
    source.fetch(1, 1, &mut page).unwrap();
    assert_eq!(page, f.memory[PAGE..2 * PAGE]);
    // Idle past the server's deadline: it closes the session.
    wait_until("the idle connection was closed", || {
        f.registry.stats().connections_open == 0
    });
    source.fetch(2, 1, &mut page).unwrap();
    assert_eq!(
        page,
        f.memory[2 * PAGE..3 * PAGE],
        "served over a new connection"
    );
    assert_eq!(f.registry.stats().handshakes_ok, 2);
}

// ---- RDMA set-up on the page-server connection (no RDMA device on this machine) ----

use proto::pages::{QpInfo, RDMA_VERSION};
use rdma_fork::client::RdmaAnswer;

/// A child's queue pair as a NIC would describe it: only the frames carry it here.
const CHILD_QP: QpInfo = QpInfo {
    gid: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
    lid: 3,
    qp_num: 0x00_1234,
    psn: 0x00_5678,
    mtu: 3,
};

/// Why this build's page server has no RDMA, or `None` on a machine with a device.
fn server_reason(f: &Fixture) -> Option<String> {
    let why = f.server.as_ref().unwrap().rdma().unavailable()?.to_string();
    if cfg!(feature = "rdma") {
        if !std::path::Path::new("/sys/class/infiniband").exists() {
            assert!(
                why.contains("/sys/class/infiniband does not exist"),
                "{why}"
            );
        }
    } else {
        assert_eq!(why, "built without the rdma feature");
    }
    Some(why)
}

#[test]
fn rdma_connect_gets_the_servers_reason_and_the_connection_serves_reads() {
    let f = Fixture::new();
    let Some(why) = server_reason(&f) else {
        eprintln!("this machine has an RDMA device: nothing to check about the fallback");
        return;
    };
    // Without a device the descriptor says nothing about RDMA.
    let d = f
        .server
        .as_ref()
        .unwrap()
        .descriptor(&f.handle, [1; 32], "test");
    assert_eq!(d.rdma, None);
    assert_eq!(d.parent, f.addr());

    let mut c = f.connect();
    // Some reads before, the RDMA request, reads after, on the one connection.
    assert_eq!(read(&mut c, 0, 8).unwrap(), f.pages(0, 8));
    assert_eq!(
        c.rdma_connect(CHILD_QP).unwrap(),
        RdmaAnswer::Unavailable(why.clone())
    );
    assert!(c.is_usable());
    assert_eq!(read(&mut c, 8, 200).unwrap(), f.pages(8, 200));
    // Asking again gets the same answer; the connection still serves.
    assert_eq!(
        c.rdma_connect(CHILD_QP).unwrap(),
        RdmaAnswer::Unavailable(why)
    );
    assert_eq!(
        read(&mut c, PAGES as u32 - 1, 1).unwrap(),
        f.pages(PAGES - 1, 1)
    );
    c.close().unwrap();
    let s = f.stats();
    assert_eq!((s.rdma_unavailable, s.rdma_connects_ok), (2, 0));
    assert_eq!(s.refusals.total(), 0, "{s:?}");
    assert_eq!(s.reads, 3);
}

#[test]
fn rdma_connect_before_the_handshake_is_refused_and_counted() {
    let f = Fixture::new();
    let connect = Frame::RdmaConnect {
        version: RDMA_VERSION,
        qp: CHILD_QP,
    };
    // As the first frame.
    let mut s = raw(f.addr());
    write_frame(&mut s, &connect).unwrap();
    let m = expect_refusal(&mut s, RefuseReason::BadRequest);
    assert!(m.contains("unexpected RdmaConnect"), "{m}");
    // After Hello, in place of the Proof: still unauthenticated.
    let mut s = raw(f.addr());
    write_frame(&mut s, &hello(f.handle.id, [1; 16])).unwrap();
    assert!(matches!(
        read_frame(&mut s).unwrap(),
        Frame::Challenge { .. }
    ));
    write_frame(&mut s, &connect).unwrap();
    let m = expect_refusal(&mut s, RefuseReason::BadRequest);
    assert!(m.contains("expecting Proof"), "{m}");
    // With a wrong proof, the RdmaConnect behind it is never answered.
    let mut s = raw(f.addr());
    write_frame(&mut s, &hello(f.handle.id, [2; 16])).unwrap();
    assert!(matches!(
        read_frame(&mut s).unwrap(),
        Frame::Challenge { .. }
    ));
    let mut both = encode(&Frame::Proof { mac: [0; 32] });
    both.extend_from_slice(&encode(&connect));
    s.write_all(&both).unwrap();
    expect_refusal(&mut s, RefuseReason::BadProof);

    let st = f.stats();
    assert_eq!(st.refusals.bad_request, 2, "{st:?}");
    assert_eq!(st.refusals.bad_proof, 1, "{st:?}");
    assert_eq!((st.rdma_unavailable, st.rdma_connects_ok), (0, 0));
    assert_eq!(st.handshakes_ok, 0);
    // The server keeps serving.
    let mut c = f.connect();
    assert_eq!(read(&mut c, 1, 3).unwrap(), f.pages(1, 3));
}

#[test]
fn malformed_rdma_connect_frames_are_refused_and_counted() {
    let f = Fixture::new();
    let good = encode(&Frame::RdmaConnect {
        version: RDMA_VERSION,
        qp: CHILD_QP,
    });
    let with_len = |body: &[u8]| {
        let mut b = (body.len() as u32).to_le_bytes().to_vec();
        b.extend_from_slice(body);
        b
    };
    let body = &good[4..];
    let mut oversized = body.to_vec();
    oversized.resize(65, 0);
    let mut trailing = body.to_vec();
    trailing.push(0);
    let mut mtu0 = body.to_vec();
    mtu0[2 + 26] = 0; // kind, version, then the queue pair: mtu is its last byte
    let mut wide_qp = body.to_vec();
    wide_qp[2 + 16 + 2 + 3] = 1; // the top byte of qp_num (LE)
    // (bytes, close the write side after them, what the refusal says)
    let cases: Vec<(Vec<u8>, bool, &str)> = vec![
        (with_len(&body[..10]), false, "truncated"),
        (with_len(&oversized), false, "65"),
        (with_len(&trailing), false, "trailing"),
        (with_len(&mtu0), false, "MTU"),
        (with_len(&wide_qp), false, "24 bits"),
        // The header promises the whole frame; the stream ends after ten bytes.
        (good[..10].to_vec(), true, "truncated"),
    ];
    let n = cases.len() as u64;
    for (bytes, close, says) in cases {
        let mut s = raw(f.addr());
        raw_handshake(&mut s, &f.handle, [7; 16]);
        s.write_all(&bytes).unwrap();
        if close {
            s.shutdown(Shutdown::Write).unwrap();
        }
        let m = expect_refusal(&mut s, RefuseReason::BadRequest);
        assert!(m.contains(says), "{says}: {m}");
    }
    // A server's frame from a child is out of order, not malformed.
    let mut s = raw(f.addr());
    raw_handshake(&mut s, &f.handle, [8; 16]);
    write_frame(&mut s, &Frame::RdmaUnavailable { reason: "x".into() }).unwrap();
    let m = expect_refusal(&mut s, RefuseReason::BadRequest);
    assert!(m.contains("unexpected RdmaUnavailable"), "{m}");

    let st = f.stats();
    assert_eq!(st.refusals.malformed, n, "{st:?}");
    assert_eq!(st.refusals.bad_request, 1, "{st:?}");
    assert_eq!((st.rdma_unavailable, st.rdma_connects_ok), (0, 0));
    // The server keeps serving, RDMA answers included.
    let mut c = f.connect();
    assert!(matches!(
        c.rdma_connect(CHILD_QP),
        Ok(RdmaAnswer::Unavailable(_) | RdmaAnswer::Accept { .. })
    ));
    assert_eq!(read(&mut c, 5, 1).unwrap(), f.pages(5, 1));
}

/// An RdmaConnect of a version this server does not speak: refused only on a server with a
/// device (one without says why it has none, whatever the version).
#[test]
fn unknown_rdma_version_still_gets_an_answer() {
    let f = Fixture::new();
    let Some(why) = server_reason(&f) else { return };
    let mut s = raw(f.addr());
    raw_handshake(&mut s, &f.handle, [9; 16]);
    write_frame(
        &mut s,
        &Frame::RdmaConnect {
            version: RDMA_VERSION + 1,
            qp: CHILD_QP,
        },
    )
    .unwrap();
    assert_eq!(
        read_frame(&mut s).unwrap(),
        Frame::RdmaUnavailable { reason: why }
    );
    write_frame(
        &mut s,
        &Frame::Read {
            first_page: 2,
            count: 1,
        },
    )
    .unwrap();
    let Frame::Pages {
        first_page: 2,
        count: 1,
        ..
    } = read_frame(&mut s).unwrap()
    else {
        panic!("no pages after RdmaUnavailable")
    };
    assert_eq!(f.stats().rdma_unavailable, 1);
}

/// The accept side of the exchange, which a server without a device never sends: a fake
/// parent handshakes, checks the child's `RdmaConnect` as it arrived over TCP and answers
/// `answer` (raw bytes, so out-of-range fields can be sent). Hands `check` what the child
/// got and its client, then closes the client and waits for the fake parent.
fn rdma_connect_against(
    answer: Vec<u8>,
    check: impl FnOnce(Result<RdmaAnswer, ClientError>, &mut PageClient),
) {
    let handle = ImageHandle {
        id: 43,
        key: [4; 32],
        memory_bytes: (PAGES * PAGE) as u64,
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let memory_bytes = handle.memory_bytes;
    let parent = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        assert!(matches!(read_frame(&mut s).unwrap(), Frame::Hello { .. }));
        let server_nonce = fresh_nonce::<32>().unwrap();
        write_frame(&mut s, &Frame::Challenge { server_nonce }).unwrap();
        assert!(matches!(read_frame(&mut s).unwrap(), Frame::Proof { .. }));
        write_frame(
            &mut s,
            &Frame::Welcome {
                memory_bytes,
                page_size: PAGE_SIZE,
            },
        )
        .unwrap();
        assert_eq!(
            read_frame(&mut s).unwrap(),
            Frame::RdmaConnect {
                version: RDMA_VERSION,
                qp: CHILD_QP,
            }
        );
        s.write_all(&answer).unwrap();
        // Hold the connection until the child closes it.
        let _ = s.read_to_end(&mut Vec::new());
    });
    let mut c = PageClient::connect(&descriptor_for(&handle, addr), TIMEOUT).unwrap();
    let got = c.rdma_connect(CHILD_QP);
    check(got, &mut c);
    drop(c);
    parent.join().unwrap();
}

#[test]
fn rdma_accept_reaches_the_child_field_for_field_and_bad_regions_are_refused() {
    use proto::pages::RegionInfo;
    let parent_qp = QpInfo {
        gid: [
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x42,
        ],
        lid: 0xbeef,
        qp_num: 0x00ff_fffe,
        psn: 0x00ab_cdef,
        mtu: 5,
    };
    let region = RegionInfo {
        remote_addr: 0x7f12_3456_0000,
        rkey: 0x8765_4321,
        len: (PAGES * PAGE) as u64,
    };
    let accept = encode(&Frame::RdmaAccept {
        qp: parent_qp,
        region,
    });
    rdma_connect_against(accept.clone(), |got, c| {
        assert_eq!(
            got.unwrap(),
            RdmaAnswer::Accept {
                qp: parent_qp,
                region
            }
        );
        // The connection stays the queue pair's control channel.
        assert!(c.is_usable());
        assert_eq!(c.stats().round_trips, 1);
    });

    // A region the child must not READ from: the answer is refused and the connection is
    // not used again (its offsets: header 4, kind 1, queue pair, then addr 8, rkey 4, len 8).
    let at = 4 + 1 + QpInfo::WIRE_LEN;
    for (addr, len) in [(u64::MAX - 4095, 8192), (0x1000, 0), (0x1000, 4095)] {
        let mut bad = accept.clone();
        bad[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        bad[at + 12..at + 20].copy_from_slice(&u64::to_le_bytes(len));
        rdma_connect_against(bad, |got, c| {
            let e = got.unwrap_err();
            assert!(
                matches!(
                    e,
                    ClientError::Protocol {
                        during: Step::RdmaSetup,
                        violation: Violation::Malformed(FrameError::BadRdmaField {
                            kind: "RdmaAccept",
                            ..
                        })
                    }
                ),
                "{addr:#x} {len}: {e}"
            );
            assert!(!c.is_usable());
            assert!(matches!(
                c.rdma_connect(CHILD_QP),
                Err(ClientError::Unusable)
            ));
            // The rkey is a capability: not in the error either.
            assert!(!e.to_string().contains("8765") && !e.to_string().contains("2271560481"));
        });
    }
}
