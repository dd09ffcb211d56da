//! Forged descriptors: refused, counted, and the receiver keeps serving.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use chain_runtime::instance::{Handoff, Namespaces, sealed_memfd};
use chain_runtime::stats::{ErrorKind, StatsPage};
use common::Spindle;
use proto::worker::SOCKET_FD;
use proto::{Descriptor, GATEWAY_FN, Status};
use shm::Arena;

const CONFIG: &str = r#"
functions:
  - name: uppercase
    module: {wasm:uppercase}
chains:
  - name: up
    route: /up
    steps: [uppercase]
    arena: { slot_size: 1KiB, slots: 4 }
"#;

fn config_text() -> String {
    CONFIG.replace("{wasm:uppercase}", &common::wasm("uppercase"))
}

fn exchange(sock: &mut TcpStream, d: Descriptor) -> Descriptor {
    sock.write_all(&d.to_bytes()).unwrap();
    let mut buf = [0u8; Descriptor::SIZE];
    sock.read_exact(&mut buf).unwrap();
    Descriptor::from_bytes(&buf)
}

/// The test playing the gateway for one `uppercase` worker process it started, with the
/// hand-off the real gateway gives.
struct PlayedGateway {
    arena: Arena,
    sock: TcpStream,
    stats: StatsPage,
    child: std::process::Child,
    fn_id: u32,
}

impl PlayedGateway {
    fn start(tag: &str) -> PlayedGateway {
        common::build_examples();
        let dir = common::temp_dir(tag);
        let config = dir.join("spindle.yaml");
        let text = config_text();
        std::fs::write(&config, &text).unwrap();

        let arena = Arena::create("forged-test", 1024, 4).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let worker_end = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut sock, _) = listener.accept().unwrap();
        let config_fd = sealed_memfd("config", text.as_bytes()).unwrap();
        let (stats, stats_fd) = StatsPage::create("forged-stats").unwrap();
        let module_fd =
            sealed_memfd("module", &std::fs::read(common::wasm("uppercase")).unwrap()).unwrap();
        // Held for the worker's life; nothing is sent on it here.
        let (_control, worker_control) = std::os::unix::net::UnixStream::pair().unwrap();
        // A worker running as root is confined, and needs the namespaces a gateway passes.
        let namespaces = nix::unistd::geteuid()
            .is_root()
            .then(|| sandbox::SharedNamespaces::create().unwrap());
        let plan = Handoff {
            arena: arena.payload_fd(),
            arena_meta: arena.meta_fd(),
            socket: worker_end.as_fd(),
            config: config_fd.as_fd(),
            module: module_fd.as_fd(),
            stats: stats_fd.as_fd(),
            control: worker_control.as_fd(),
            image: None,
            cache: None,
            namespaces: namespaces.as_ref().map(|ns| Namespaces {
                net: ns.net(),
                mount: ns.mount(),
            }),
            preopens: Vec::new(),
        }
        .exec_plan()
        .unwrap();
        let placements = plan.placements().to_vec();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_spindle"));
        cmd.args(["worker", "--config"])
            .arg(&config)
            .args([
                "--chain",
                "up",
                "--function",
                "uppercase",
                "--instance",
                "0",
            ])
            .stdin(Stdio::null());
        // SAFETY: only dup2 between fork and exec; the plan's sources sit above every fixed
        // number, so they cannot collide. Raw libc: nix's dup2 takes the target as an
        // OwnedFd, which these bare numbers are not.
        unsafe {
            cmd.pre_exec(move || {
                for &(from, to) in &placements {
                    if libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop((plan, worker_end, worker_control));
        sock.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();

        let mut buf = [0u8; Descriptor::SIZE];
        sock.read_exact(&mut buf).unwrap();
        let ready = Descriptor::from_bytes(&buf);
        assert_eq!(
            ready.request_id, 0,
            "first message is the ready announcement"
        );
        PlayedGateway {
            arena,
            sock,
            stats,
            child,
            fn_id: ready.slot,
        }
    }

    /// Closes the socket (EOF) and checks that the worker exits cleanly.
    fn stop(mut self) {
        drop(self.sock);
        let status = self.child.wait().unwrap();
        assert!(status.success(), "worker exit: {status}");
    }
}

/// Plays the gateway for one worker process: forged descriptors written into the worker's
/// socket come back refused, and the worker still serves a valid one.
#[test]
fn worker_refuses_forged_descriptors_and_keeps_serving() {
    let mut gw = PlayedGateway::start("forged-worker");
    let fn_id = gw.fn_id;
    let slot = gw.arena.alloc(7).unwrap();
    gw.arena.write(slot, 0, b"abc").unwrap();
    let valid = Descriptor {
        next_fn: fn_id,
        chain: 0,
        request_id: 7,
        slot: slot.index,
        generation: slot.generation,
        len: 3,
        ..Descriptor::default()
    };
    let forgeries = [
        Descriptor { slot: 99, ..valid },
        Descriptor {
            generation: slot.generation + 1,
            ..valid
        },
        Descriptor {
            slot: (slot.index + 1) % 4,
            ..valid
        }, // a free slot
        Descriptor { len: 4096, ..valid },
        Descriptor {
            reserved: 1,
            ..valid
        },
        Descriptor {
            next_fn: fn_id + 1,
            ..valid
        },
        Descriptor { chain: 3, ..valid },
        Descriptor {
            status: Status::Trap as u8,
            ..valid
        },
    ];
    for (i, forged) in forgeries.iter().enumerate() {
        let forged = Descriptor {
            request_id: 100 + i as u64,
            ..*forged
        };
        let reply = exchange(&mut gw.sock, forged);
        assert_eq!(reply.request_id, forged.request_id);
        assert_eq!(reply.status, Status::Refused as u8, "forgery {i} refused");
        assert_eq!(reply.next_fn, GATEWAY_FN, "refusals go back to the gateway");
    }
    let reply = exchange(&mut gw.sock, valid);
    assert_eq!(
        (reply.status, reply.next_fn, reply.len, reply.hop),
        (Status::Ok as u8, GATEWAY_FN, 3, 1)
    );
    let mut out = [0u8; 3];
    gw.arena.read(slot, 0, &mut out).unwrap();
    assert_eq!(&out, b"ABC");
    // The worker counted both, in the page the gateway would export.
    let counted = gw.stats.snapshot();
    assert_eq!(counted.invocations, 1);
    assert_eq!(
        counted.errors[ErrorKind::Refused as usize],
        forgeries.len() as u64
    );
    gw.arena.release(slot).unwrap();
    gw.stop();
}

/// A live slot's index and generation are not enough to use it: the worker refuses a
/// descriptor that names them under another request's id (a replay, as a compromised worker
/// that saw the descriptor would send it), sends it back refused, counts it as a request
/// mismatch, and runs nothing on the slot; the genuine descriptor still works.
#[test]
fn worker_refuses_a_live_slot_replayed_under_another_request_id() {
    let mut gw = PlayedGateway::start("forged-replay");
    let live = gw.arena.alloc(41).unwrap();
    gw.arena.write(live, 0, b"abc").unwrap();
    let genuine = Descriptor {
        next_fn: gw.fn_id,
        chain: 0,
        request_id: 41,
        slot: live.index,
        generation: live.generation,
        len: 3,
        ..Descriptor::default()
    };
    for request_id in [42, 40, 0x41 << 32 | 41] {
        let replay = Descriptor {
            request_id,
            ..genuine
        };
        let reply = exchange(&mut gw.sock, replay);
        assert_eq!(
            (reply.status, reply.next_fn, reply.request_id),
            (Status::Refused as u8, GATEWAY_FN, request_id),
            "replay under request {request_id} refused"
        );
    }
    let mut untouched = [0u8; 3];
    gw.arena.read(live, 0, &mut untouched).unwrap();
    assert_eq!(&untouched, b"abc", "no guest ran on the replayed slot");
    let counted = gw.stats.snapshot();
    assert_eq!(counted.invocations, 0);
    assert_eq!(counted.errors[ErrorKind::RequestMismatch as usize], 3);
    assert_eq!(
        counted.errors[ErrorKind::Refused as usize],
        0,
        "counted as replays, not as other refusals"
    );

    let reply = exchange(&mut gw.sock, genuine);
    assert_eq!((reply.status, reply.len), (Status::Ok as u8, 3));
    let mut out = [0u8; 3];
    gw.arena.read(live, 0, &mut out).unwrap();
    assert_eq!(&out, b"ABC");
    gw.arena.release(live).unwrap();
    gw.stop();
}

/// Forged descriptors written on a worker's socket towards the gateway (as a compromised
/// worker would) are refused by the router, counted in /metrics, and serving continues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_refuses_forged_descriptors_from_a_worker_socket() {
    let spindle = Spindle::start("forged-router", CONFIG).await;
    assert_eq!(spindle.post("/up", "before").await.text(), "BEFORE");
    let pid = spindle.worker_pids("uppercase")[0];
    // SAFETY: plain syscalls on a pid of our own test; results are checked. Raw libc: nix
    // has neither pidfd_open nor pidfd_getfd.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, SOCKET_FD, 0) } as i32;
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        testkit::cannot_run(
            "router_refuses_forged_descriptors_from_a_worker_socket",
            format!("pidfd_getfd needs ptrace rights over the worker (root): {err}"),
        );
        return;
    }
    // SAFETY: pidfd_getfd returned a new fd that we own.
    let mut stolen = TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let forged = [
        Descriptor {
            request_id: 999_999,
            len: 3,
            ..Descriptor::default()
        },
        Descriptor {
            request_id: 1,
            slot: 2,
            generation: 9,
            len: 3,
            ..Descriptor::default()
        },
    ];
    for d in forged {
        stolen.write_all(&d.to_bytes()).unwrap();
    }
    let series = r#"spindle_descriptors_refused_total{chain="up",reason="unknown_request"}"#;
    let mut refused = None;
    for _ in 0..100 {
        refused = spindle.metric(series).await;
        if refused == Some(2.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(refused, Some(2.0), "both forgeries counted");
    assert_eq!(spindle.post("/up", "after").await.text(), "AFTER");
    assert!(spindle.log().contains("refused descriptor from worker"));
}
