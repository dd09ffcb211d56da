//! The RDMA transport as far as a machine without an RDMA device can take it: the fallback
//! decision and its reason, the parent's `RdmaUnavailable` answer mapped to the fallback, the
//! field checks on a peer's queue pair and region, and the verbs entry points refusing
//! cleanly with the probe's reason. The queue-pair/region frames over real TCP are in
//! `tests/pages.rs`, READ planning in `rdma::plan`'s tests. No test here claims a READ
//! happened: that needs a NIC.

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
    use std::os::fd::AsFd;
    use std::path::Path;
    use std::time::Duration;

    use nix::sys::memfd::{MFdFlags, memfd_create};
    use rdma_fork::rdma::{
        NoRdma, QpInfo, RdmaError, RdmaExport, RegionInfo, SYSFS_CLASS, check_qp, check_region,
        probe, probe_verbs,
    };

    use super::*;

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

    /// What both sides apply to the peer's queue pair and region (the frames' decoder does
    /// too, see `proto::pages`): out-of-range fields are refused, never used.
    #[test]
    fn out_of_range_peer_fields_are_refused() {
        assert!(check_qp(&qp(1)).is_ok());
        assert!(check_region(&REGION).is_ok());
        let invalid = |r: Result<(), RdmaError>| matches!(r, Err(RdmaError::Invalid(_)));
        for bad in [
            QpInfo {
                qp_num: 1 << 24,
                ..qp(1)
            },
            QpInfo {
                psn: 1 << 24,
                ..qp(1)
            },
            QpInfo { mtu: 0, ..qp(1) },
            QpInfo { mtu: 6, ..qp(1) },
        ] {
            assert!(invalid(check_qp(&bad)), "{bad:?}");
        }
        for (remote_addr, len) in [(u64::MAX - 4095, 8192), (0x1000, 0), (0x1000, 4095)] {
            let bad = RegionInfo {
                remote_addr,
                len,
                ..REGION
            };
            assert!(invalid(check_region(&bad)), "{bad:?}");
        }
        let e = check_qp(&QpInfo { mtu: 0, ..qp(1) }).unwrap_err();
        assert!(e.to_string().contains("MTU"), "{e}");
        // The rkey is a capability: never in logs.
        assert!(!format!("{REGION:?}").contains("305419896"));
        assert!(!format!("{REGION:?}").contains("12345678"));
    }
}
