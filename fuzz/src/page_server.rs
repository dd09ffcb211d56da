//! rdma-fork's page server and page client over real loopback TCP, the two ends of a remote
//! fork: a forked child fetches its parent's memory pages from the parent's server.
//! - An unauthenticated client sending arbitrary bytes gets answered and closed within the
//!   server's deadlines, and the server keeps serving a genuine child afterwards.
//! - An authenticated client sending arbitrary requests gets exactly the image's bytes for
//!   every read in range, a refusal for any other, and the metadata when it asks.
//! - A child connecting to a parent that answers with arbitrary bytes gets an error or pages,
//!   never a panic or a hang past its timeout.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use proto::ImageDescriptor;
use proto::pages::{
    Frame, MAX_READ_PAGES, PAGE_SIZE, PROTOCOL_VERSION, RefuseReason, proof, read_frame,
};
use rdma_fork::client::PageClient;
use rdma_fork::registry::{ImageRegistry, PublishedImage};
use rdma_fork::server::{PageServer, RunningServer, ServerConfig};

const PAGE: usize = PAGE_SIZE as usize;
const PAGES: usize = 16;
/// Well past the server's deadlines below: reaching it means something hangs.
const STUCK: Duration = Duration::from_secs(10);
const META: &[u8] = b"the image's metadata";

/// A frame's kind, for messages (frames that hold keys have no `Debug`).
fn frame_kind(f: &Frame) -> String {
    let mut out = Vec::new();
    f.encode(&mut out);
    match out.get(4) {
        Some(kind) => format!("a frame of kind {kind}"),
        None => "an empty frame".to_owned(),
    }
}

struct Parent {
    _server: RunningServer,
    descriptor: ImageDescriptor,
    memory: Vec<u8>,
}

fn parent() -> &'static Parent {
    thread_local! {
        // Leaked: one server per thread for the life of the process.
        static PARENT: &'static Parent = Box::leak(Box::new(start_parent()));
    }
    PARENT.with(|p| *p)
}

fn start_parent() -> Parent {
    let mut memory = vec![0u8; PAGES * PAGE];
    for (i, page) in memory.chunks_mut(PAGE).enumerate() {
        if i % 3 != 0 {
            page.iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (i as u8).wrapping_mul(37) ^ j as u8 | 1);
        }
    }
    let registry = Arc::new(ImageRegistry::new());
    let mut image = PublishedImage::from_memory("fuzz", &memory, Duration::from_secs(24 * 3600))
        .expect("an image");
    // Opaque to the server: whatever it holds is what `Meta` must carry.
    image.meta = META.to_vec();
    let handle = registry.publish(image).expect("publishing");
    let config = ServerConfig {
        handshake_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(2),
        write_timeout: Duration::from_secs(2),
        ..ServerConfig::default()
    };
    let server = PageServer::bind_with("127.0.0.1:0", registry, config)
        .expect("binding")
        .spawn()
        .expect("spawning");
    let descriptor = server.descriptor(
        &handle,
        proto::image::module_hash(b"\0asm\x01\0\0\0"),
        "fuzz-engine",
    );
    Parent {
        _server: server,
        descriptor,
        memory,
    }
}

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let rest = &rest[..rest.len().min(16 * 1024)];
    match mode % 3 {
        0 => unauthenticated(rest),
        1 => authenticated(rest),
        _ => hostile_parent(rest),
    }
}

fn connect() -> TcpStream {
    let s = TcpStream::connect(parent().descriptor.parent).expect("connecting to the page server");
    s.set_read_timeout(Some(STUCK)).unwrap();
    s.set_write_timeout(Some(STUCK)).unwrap();
    s
}

/// Reads until the server closes; panics if it never does.
fn drain(s: &mut TcpStream) {
    let started = Instant::now();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("the page server kept a connection open past {STUCK:?}")
            }
            Err(_) => return, // reset: closed too
        }
        assert!(
            started.elapsed() < STUCK,
            "the page server kept talking past {STUCK:?}"
        );
    }
}

fn unauthenticated(bytes: &[u8]) {
    let mut s = connect();
    // The server may close before taking everything: a failed write is its answer.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(Shutdown::Write);
    drain(&mut s);
    genuine_child_reads();
}

fn genuine_child_reads() {
    let p = parent();
    let mut child = PageClient::connect(&p.descriptor, STUCK).expect("a genuine child connects");
    let mut page = vec![0u8; PAGE];
    child.read(1, 1, &mut page).expect("a genuine child reads");
    assert_eq!(page, p.memory[PAGE..2 * PAGE]);
}

#[derive(Arbitrary, Debug)]
enum Request {
    Read {
        first_page: u32,
        count: u32,
    },
    /// A read within the image.
    ReadIn {
        first_page: u8,
        count: u8,
    },
    Meta,
    /// Any frame bytes; the session may end.
    Raw(Vec<u8>),
    Bye,
}

/// Sends `frame` as raw bytes.
fn send(s: &mut TcpStream, frame: &Frame) {
    let mut out = Vec::new();
    frame.encode(&mut out);
    s.write_all(&out).expect("writing to the page server");
}

fn handshake() -> TcpStream {
    let p = parent();
    let mut s = connect();
    let client_nonce = [9u8; 16];
    send(
        &mut s,
        &Frame::Hello {
            version: PROTOCOL_VERSION,
            handle: p.descriptor.handle,
            client_nonce,
        },
    );
    let Frame::Challenge { server_nonce } = read_frame(&mut s).expect("a challenge") else {
        panic!("no challenge");
    };
    let mac = proof(
        &p.descriptor.key,
        p.descriptor.handle,
        &server_nonce,
        &client_nonce,
    );
    send(&mut s, &Frame::Proof { mac });
    match read_frame(&mut s).expect("a welcome") {
        Frame::Welcome { memory_bytes, .. } => assert_eq!(memory_bytes, p.memory.len() as u64),
        other => panic!("the proof answered by {}", frame_kind(&other)),
    }
    s
}

fn authenticated(data: &[u8]) {
    let mut s = handshake();
    let mut u = Unstructured::new(data);
    while !u.is_empty() {
        let Ok(request) = Request::arbitrary(&mut u) else {
            break;
        };
        match request {
            Request::Read { first_page, count } => {
                if !read(&mut s, first_page, count) {
                    break;
                }
            }
            Request::ReadIn { first_page, count } => {
                let first = u32::from(first_page) % PAGES as u32;
                let count = 1 + u32::from(count) % (PAGES as u32 - first);
                assert!(read(&mut s, first, count));
            }
            Request::Meta => {
                send(&mut s, &Frame::MetaRequest);
                match read_frame(&mut s) {
                    Ok(Frame::Meta { bytes }) => assert_eq!(bytes, META),
                    Ok(other) => panic!("a MetaRequest answered by {}", frame_kind(&other)),
                    Err(e) => panic!("a MetaRequest answered by no frame: {e}"),
                }
            }
            Request::Raw(bytes) => {
                let _ = s.write_all(&bytes);
                break;
            }
            Request::Bye => {
                send(&mut s, &Frame::Bye);
                break;
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    drain(&mut s);
}

/// A read: the image's bytes when in range, else a refusal that ends the session. Returns
/// whether the session goes on.
fn read(s: &mut TcpStream, first_page: u32, count: u32) -> bool {
    let p = parent();
    send(s, &Frame::Read { first_page, count });
    let valid = (1..=MAX_READ_PAGES).contains(&count)
        && u64::from(first_page) + u64::from(count) <= PAGES as u64;
    match read_frame(s) {
        Ok(frame @ Frame::Pages { .. }) => {
            assert!(
                valid,
                "pages {first_page}+{count} served from an image of {PAGES}"
            );
            let Frame::Pages {
                first_page: got_first,
                count: got_count,
                ..
            } = &frame
            else {
                unreachable!()
            };
            assert_eq!((*got_first, *got_count), (first_page, count));
            for (page, contents) in frame.page_iter().expect("a valid Pages frame") {
                let want = &p.memory[page as usize * PAGE..(page as usize + 1) * PAGE];
                match contents {
                    Some(bytes) => assert_eq!(bytes, want, "page {page} differs"),
                    None => assert!(want.iter().all(|&b| b == 0), "page {page} is not zero"),
                }
            }
            true
        }
        Ok(Frame::Refused { reason, .. }) => {
            assert!(!valid, "a valid read of {first_page}+{count} was refused");
            assert_eq!(reason, RefuseReason::BadRequest);
            false
        }
        Ok(other) => panic!("a read answered by {}", frame_kind(&other)),
        Err(e) => panic!("a read answered by no frame: {e}"),
    }
}

/// A parent that says what the input says once the child has said hello.
fn hostile_parent(script: &[u8]) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding");
    let mut descriptor = parent().descriptor.clone();
    descriptor.parent = listener.local_addr().unwrap();
    let script = script.to_vec();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("the child connects");
        s.set_read_timeout(Some(STUCK)).unwrap();
        let _ = read_frame(&mut s);
        let _ = s.write_all(&script);
        let _ = s.shutdown(Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    let started = Instant::now();
    if let Ok(mut child) = PageClient::connect(&descriptor, Duration::from_secs(2)) {
        let mut page = vec![0u8; PAGE];
        let _ = child.read(0, 1, &mut page);
        let mut two = vec![0u8; 2 * PAGE];
        let _ = child.read(3, 2, &mut two);
        let _ = child.meta();
        let _ = child.close();
    }
    assert!(
        started.elapsed() < STUCK,
        "a child hung on a hostile parent"
    );
    server.join().expect("the hostile parent thread");
}
