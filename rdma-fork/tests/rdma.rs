//! The RDMA transport as far as a machine without an RDMA device can take it: the fallback
//! decision and its reason, the queue-pair metadata exchange over real TCP on 127.0.0.1 (round
//! trip, every refusal, vanished and stalled peers), and the verbs entry points refusing
//! cleanly with the probe's reason. No test here claims a READ happened: that needs a NIC.

use rdma_fork::transport::{Fallback, Transport, TransportPref, choose};

#[cfg(not(feature = "rdma"))]
#[test]
fn without_the_feature_rdma_falls_back_to_tcp() {
    let (t, why) = choose(TransportPref::Rdma);
    assert!(matches!(t, Transport::Tcp));
    assert_eq!(why, Some(Fallback::NotBuilt));
    assert_eq!(why.unwrap().to_string(), "built without the rdma feature");
    assert!(matches!(choose(TransportPref::Tcp), (Transport::Tcp, None)));
}

/// A descriptor of a 1-page image at a parent that is not there, with or without an RDMA
/// region.
fn descriptor(rdma: bool) -> proto::ImageDescriptor {
    proto::ImageDescriptor {
        handle: 9,
        key: [3; 32],
        parent: "127.0.0.1:9".parse().unwrap(),
        module_hash: [1; 32],
        engine: "test".into(),
        memory_bytes: 65536,
        page_size: 4096,
        rdma: rdma.then_some(proto::image::RdmaInfo {
            gid: [0xfe; 16],
            lid: 1,
            qp_num: 17,
            rkey: 0x1234,
            remote_addr: 0x7f00_0000_0000,
            len: 65536,
        }),
    }
}

/// Why resuming reads pages over TCP here, as `resume_remote` gets it.
fn rdma_pages_reason(rdma_region: bool) -> Option<Fallback> {
    let nonzero = proto::PageBitmap::new(16);
    let timeout = std::time::Duration::from_secs(1);
    let d = descriptor(rdma_region);
    match rdma_fork::transport::rdma_pages(TransportPref::Rdma, &d, &nonzero, timeout) {
        Ok(_) => panic!("an RDMA source was set up on a machine without RDMA"),
        Err(why) => why,
    }
}

#[test]
fn page_source_selection_falls_back_to_tcp_with_its_reason() {
    let nonzero = proto::PageBitmap::new(16);
    let timeout = std::time::Duration::from_secs(1);
    let asked_tcp =
        rdma_fork::transport::rdma_pages(TransportPref::Tcp, &descriptor(true), &nonzero, timeout);
    assert!(matches!(asked_tcp, Err(None)), "TCP asked for: no reason");
    let why = rdma_pages_reason(false).unwrap();
    assert_eq!(why, Fallback::NoRegion);
    assert!(why.to_string().contains("carries no RDMA region"), "{why}");
    let why = rdma_pages_reason(true).unwrap();
    if cfg!(feature = "rdma") {
        // This machine has no RDMA device; the probe says why (see the tests below).
        assert!(matches!(why, Fallback::Unavailable(_)), "{why}");
    } else {
        assert_eq!(why, Fallback::NotBuilt);
    }
}

/// `rdma_pages` against a real page server on 127.0.0.1, with a descriptor that says the
/// parent has RDMA (injected: the server has no device): the child's own checks come first,
/// so it falls back with the local reason and never contacts the parent. The parent's own
/// answer (`RdmaUnavailable`) over an authenticated connection is checked in
/// `tests/pages.rs` and below.
#[test]
fn rdma_pages_against_a_real_parent_checks_locally_first() {
    use rdma_fork::registry::{ImageRegistry, PublishedImage};
    use rdma_fork::server::PageServer;
    use std::sync::Arc;
    let registry = Arc::new(ImageRegistry::new());
    let memory: Vec<u8> = (0..16 * 4096).map(|i| (i % 251) as u8).collect();
    let handle = registry
        .publish(
            PublishedImage::from_memory("rdma-pages", &memory, std::time::Duration::from_secs(60))
                .unwrap(),
        )
        .unwrap();
    let server = PageServer::bind("127.0.0.1:0", registry.clone())
        .unwrap()
        .spawn()
        .unwrap();
    let Some(server_why) = server.rdma().unavailable().cloned() else {
        eprintln!("this machine has an RDMA device: nothing to check about the fallback");
        return;
    };
    let mut d = server.descriptor(&handle, [1; 32], "test");
    assert_eq!(d.rdma, None, "a server without a device advertises none");
    d.rdma = descriptor(true).rdma;
    let nonzero = proto::PageBitmap::new(16);
    let why = match rdma_fork::transport::rdma_pages(
        TransportPref::Rdma,
        &d,
        &nonzero,
        std::time::Duration::from_secs(2),
    ) {
        Ok(_) => panic!("an RDMA source was set up on a machine without RDMA"),
        Err(why) => why.expect("RDMA was asked for: a reason"),
    };
    // The same reason the server has: this machine's.
    assert_eq!(why, server_why);
    if cfg!(feature = "rdma") {
        assert!(matches!(why, Fallback::Unavailable(_)), "{why}");
    } else {
        assert_eq!(why, Fallback::NotBuilt);
    }
    let s = registry.stats();
    assert_eq!(s.handshakes_ok, 0, "the parent was contacted: {s:?}");
    assert_eq!(s.connections_open, 0);
    assert_eq!((s.rdma_unavailable, s.rdma_connects_ok), (0, 0));
}

#[cfg(feature = "rdma")]
mod with_feature {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;
    use std::path::Path;
    use std::thread;
    use std::time::{Duration, Instant};

    use nix::sys::memfd::{MFdFlags, memfd_create};
    use proto::PageBitmap;
    use rdma_fork::rdma::exchange::{MAGIC, MAX_BODY, VERSION};
    use rdma_fork::rdma::{
        ExchangeError, Frame, NoRdma, QpInfo, RdmaError, RdmaExport, RdmaSource, RegionInfo,
        SYSFS_CLASS, exchange_as_child, exchange_as_child_timeout, exchange_as_parent,
        exchange_as_parent_timeout, probe, probe_verbs, read_frame, send_ready, wait_ready,
    };

    use super::*;

    const SHORT: Duration = Duration::from_millis(300);

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    fn qp(n: u32) -> QpInfo {
        QpInfo {
            gid: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, n as u8],
            lid: 7,
            qp_num: n,
            psn: 0x00ab_cdef,
            mtu: 3,
        }
    }

    const REGION: RegionInfo = RegionInfo {
        remote_addr: 0x7f12_3456_0000,
        rkey: 0x1234_5678,
        len: 64 * 4096,
    };

    /// A raw header: magic, version, kind, body length.
    fn header(version: u8, kind: u8, len: u16) -> Vec<u8> {
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&[version, kind]);
        h.extend_from_slice(&len.to_be_bytes());
        h
    }

    /// The parent's handshake against a raw child that sends `bytes` (then keeps or closes).
    fn parent_against(bytes: Vec<u8>, close: bool) -> ExchangeError {
        let (mut child, mut parent) = pair();
        let t = thread::spawn(move || {
            child.write_all(&bytes).unwrap();
            if close {
                drop(child);
                None
            } else {
                Some(child)
            }
        });
        let err = exchange_as_parent_timeout(&mut parent, qp(2), REGION, SHORT).unwrap_err();
        drop(t.join().unwrap());
        err
    }

    /// The child's handshake against a raw parent that answers `bytes` to the hello.
    fn child_against(bytes: Vec<u8>) -> ExchangeError {
        let (mut child, mut parent) = pair();
        let t = thread::spawn(move || {
            let hello = read_frame(&mut parent).unwrap();
            assert_eq!(hello, Frame::ChildHello(qp(1)));
            parent.write_all(&bytes).unwrap();
            parent
        });
        let err = exchange_as_child_timeout(&mut child, qp(1), SHORT).unwrap_err();
        drop(t.join().unwrap());
        err
    }

    #[test]
    fn probe_here_names_the_reason_and_choose_falls_back_to_tcp() {
        let Err(why) = probe() else {
            eprintln!("an RDMA device is present here: nothing to check about the fallback");
            return;
        };
        eprintln!("probe: {why}");
        if !Path::new(SYSFS_CLASS).exists() {
            assert_eq!(why, NoRdma::NoSysfs);
            assert!(
                why.to_string()
                    .contains("/sys/class/infiniband does not exist")
            );
        }
        let (t, fallback) = choose(TransportPref::Rdma);
        assert!(matches!(t, Transport::Tcp));
        assert_eq!(t.label(), "tcp");
        assert_eq!(fallback, Some(Fallback::Unavailable(why.clone())));
        assert_eq!(fallback.unwrap().to_string(), why.to_string());
        assert!(matches!(choose(TransportPref::Tcp), (Transport::Tcp, None)));
    }

    /// Past the sysfs check, the verbs library itself: without rdma-core or a device it
    /// fails the listing (EOPNOTSUPP from sideway's shim, ENOSYS from some kernels) or finds
    /// none.
    #[test]
    fn the_verbs_library_finds_no_device_here() {
        if Path::new(SYSFS_CLASS).exists() {
            eprintln!("{SYSFS_CLASS} exists: not a machine without RDMA");
            return;
        }
        let why = probe_verbs().unwrap_err();
        eprintln!("probe_verbs: {why}");
        match &why {
            NoRdma::DeviceList { errno } => {
                assert!(
                    [libc::EOPNOTSUPP, libc::ENOSYS, libc::ENODEV].contains(&errno.0),
                    "{why}"
                );
                assert!(why.to_string().contains(&format!("errno {}", errno.0)));
            }
            NoRdma::NoDevice => {}
            other => panic!("unexpected reason {other}"),
        }
    }

    #[test]
    fn entry_points_return_the_probe_reason_without_a_device() {
        let Err(why) = probe() else { return };
        let fd = memfd_create("rdma-test", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, 4 * 4096).unwrap();
        match RdmaExport::open(fd.as_fd(), 4 * 4096) {
            Err(RdmaError::NoRdma(r)) => assert_eq!(r, why),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("exported without a device"),
        }

        // The child's entry point refuses before writing a byte to the control channel.
        let (child, mut parent) = pair();
        match RdmaSource::connect(child, PageBitmap::new(4)) {
            Err(RdmaError::NoRdma(r)) => assert_eq!(r, why),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("connected without a device"),
        }
        parent.set_read_timeout(Some(SHORT)).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(
            parent.read(&mut buf).unwrap(),
            0,
            "the stream was closed, unused"
        );
    }

    /// What a child with a device would get from this parent: the page server's reason,
    /// through an authenticated connection, mapped to the fallback `rdma_pages` reports.
    #[test]
    fn a_parent_without_rdma_gives_its_reason_as_the_fallback() {
        use rdma_fork::client::{PageClient, RdmaAnswer};
        use rdma_fork::registry::{ImageRegistry, PublishedImage};
        use rdma_fork::server::PageServer;
        use rdma_fork::transport::setup_fallback;
        use std::sync::Arc;
        let registry = Arc::new(ImageRegistry::new());
        let handle = registry
            .publish(
                PublishedImage::from_memory("parent", &vec![1u8; 65536], Duration::from_secs(60))
                    .unwrap(),
            )
            .unwrap();
        let server = PageServer::bind("127.0.0.1:0", registry.clone())
            .unwrap()
            .spawn()
            .unwrap();
        let Some(server_why) = server.rdma().unavailable().map(|w| w.to_string()) else {
            return;
        };
        let d = server.descriptor(&handle, [1; 32], "test");
        let mut client = PageClient::connect(&d, Duration::from_secs(2)).unwrap();
        let RdmaAnswer::Unavailable(reason) = client.rdma_connect(qp(1)).unwrap() else {
            panic!("a parent without a device accepted a queue pair")
        };
        assert_eq!(reason, server_why);
        let why = setup_fallback(RdmaError::ParentHasNoRdma(reason.clone()));
        assert_eq!(why, Fallback::ParentHasNoRdma(reason.clone()));
        assert_eq!(why.to_string(), format!("parent: {reason}"));
        if !Path::new(SYSFS_CLASS).exists() {
            assert!(
                why.to_string()
                    .starts_with("parent: no RDMA device: /sys/class/infiniband does not exist")
            );
        }
        // Any other set-up failure is reported as such.
        assert!(matches!(
            setup_fallback(RdmaError::Broken),
            Fallback::Setup(_)
        ));
        assert_eq!(registry.stats().rdma_unavailable, 1);
    }

    #[test]
    fn exchange_round_trip_over_tcp() {
        let (mut child, mut parent) = pair();
        let t = thread::spawn(move || {
            let got = exchange_as_parent(&mut parent, qp(2), REGION).unwrap();
            send_ready(&mut parent, SHORT).unwrap();
            got
        });
        let (remote, region) = exchange_as_child(&mut child, qp(1)).unwrap();
        wait_ready(&mut child, SHORT).unwrap();
        assert_eq!(t.join().unwrap(), qp(1));
        assert_eq!(remote, qp(2));
        assert_eq!(region, REGION);
        // The handshake restored the stream's own (blocking) timeouts.
        assert_eq!(child.read_timeout().unwrap(), None);
        // The rkey is a capability: never in logs.
        assert!(!format!("{region:?}").contains("305419896"));
        assert!(!format!("{region:?}").contains("12345678"));
    }

    #[test]
    fn garbage_and_oversized_frames_are_refused() {
        assert!(matches!(
            parent_against(b"GET / HTTP/1.1\r\n\r\n".to_vec(), false),
            ExchangeError::BadMagic(m) if &m == b"GET "
        ));
        assert!(matches!(
            parent_against(header(VERSION, 1, MAX_BODY + 1), false),
            ExchangeError::Oversized { len, max: MAX_BODY } if len == MAX_BODY + 1
        ));
        assert!(matches!(
            parent_against(header(VERSION, 1, u16::MAX), false),
            ExchangeError::Oversized { .. }
        ));
        assert!(matches!(
            parent_against(header(VERSION, 9, 0), false),
            ExchangeError::UnknownKind(9)
        ));
        // A hello of the wrong length, and the wrong frame for this side.
        let mut short = header(VERSION, 1, 26);
        short.extend_from_slice(&[0; 26]);
        assert!(matches!(
            parent_against(short, false),
            ExchangeError::BadLength {
                kind: 1,
                len: 26,
                expected: 27
            }
        ));
        assert!(matches!(
            parent_against(Frame::Ready.encode(), false),
            ExchangeError::UnexpectedKind {
                expected: 1,
                got: 3
            }
        ));
        assert!(matches!(
            child_against(Frame::ChildHello(qp(3)).encode()),
            ExchangeError::UnexpectedKind {
                expected: 2,
                got: 1
            }
        ));
    }

    #[test]
    fn version_mismatch_is_refused() {
        let mut frame = Frame::ChildHello(qp(1)).encode();
        frame[4] = VERSION + 1;
        assert!(matches!(
            parent_against(frame, false),
            ExchangeError::VersionMismatch { ours: VERSION, theirs } if theirs == VERSION + 1
        ));
        let mut frame = Frame::ParentHello(qp(2), REGION).encode();
        frame[4] = 0;
        assert!(matches!(
            child_against(frame),
            ExchangeError::VersionMismatch { theirs: 0, .. }
        ));
    }

    #[test]
    fn out_of_range_fields_are_refused() {
        let patch = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut frame = Frame::ParentHello(qp(2), REGION).encode();
            f(&mut frame);
            child_against(frame)
        };
        // Body offsets: gid 8..24, lid 24..26, qp 26..30, psn 30..34, mtu 34, region 35..55.
        let invalid = |e: ExchangeError| matches!(e, ExchangeError::Invalid(_));
        assert!(invalid(patch(&|b| b[29] = 1))); // QP number > 24 bits (LE: top byte)
        assert!(invalid(patch(&|b| b[33] = 1))); // PSN > 24 bits
        assert!(invalid(patch(&|b| b[34] = 0))); // MTU 0
        assert!(invalid(patch(&|b| b[34] = 6))); // MTU past 4096
        assert!(invalid(patch(
            &|b| b[35..43].copy_from_slice(&u64::MAX.to_le_bytes())
        )));
        assert!(invalid(patch(
            &|b| b[47..55].copy_from_slice(&0u64.to_le_bytes())
        )));
        assert!(invalid(patch(
            &|b| b[47..55].copy_from_slice(&4095u64.to_le_bytes())
        )));
        // Nor does this side send such fields.
        let (mut child, _parent) = pair();
        let bad = QpInfo {
            psn: 1 << 24,
            ..qp(1)
        };
        assert!(matches!(
            exchange_as_child_timeout(&mut child, bad, SHORT),
            Err(ExchangeError::Invalid(_))
        ));
    }

    #[test]
    fn truncated_frames_and_vanished_peers_fail_cleanly() {
        // Half a header, then the peer closes.
        assert!(matches!(
            parent_against(MAGIC.to_vec(), true),
            ExchangeError::Truncated { got: 4, need: 8 }
        ));
        // A full header promising 27 bytes, ten of them, then close.
        let mut frame = Frame::ChildHello(qp(1)).encode();
        frame.truncate(18);
        assert!(matches!(
            parent_against(frame, true),
            ExchangeError::Truncated { got: 18, need: 35 }
        ));
        // The peer connects and closes without a byte.
        assert!(matches!(
            parent_against(vec![], true),
            ExchangeError::Closed
        ));

        // The parent reads the hello and closes mid-exchange: the child fails at once.
        let (mut child, mut parent) = pair();
        let t = thread::spawn(move || {
            read_frame(&mut parent).unwrap();
        });
        let start = Instant::now();
        let err = exchange_as_child_timeout(&mut child, qp(1), Duration::from_secs(5)).unwrap_err();
        t.join().unwrap();
        assert!(
            matches!(err, ExchangeError::Closed | ExchangeError::Io(_)),
            "{err}"
        );
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_stalled_peer_times_out() {
        // The peer sends part of a frame and then nothing, keeping the connection open.
        let start = Instant::now();
        let err = parent_against(MAGIC.to_vec(), false);
        assert!(matches!(err, ExchangeError::TimedOut), "{err}");
        let took = start.elapsed();
        assert!(took >= SHORT && took < SHORT * 5, "{took:?}");

        // The child waits for a Ready that never comes.
        let (mut child, _parent) = pair();
        let start = Instant::now();
        assert!(matches!(
            wait_ready(&mut child, SHORT),
            Err(ExchangeError::TimedOut)
        ));
        assert!(start.elapsed() < SHORT * 5);
    }
}
