//! The eBPF sk_msg dataplane: the kernel routes function-to-function hops. Needs root (CI runs
//! as root, and there a test that cannot run fails); elsewhere every test here says SKIPPED
//! and returns.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use common::Spindle;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use proto::Descriptor;
use proto::worker::SOCKET_FD;

fn root_or_skip(test: &str) -> bool {
    testkit::require_root(test, "the eBPF dataplane needs CAP_BPF + CAP_NET_ADMIN")
}

async fn start(tag: &str, yaml: &str) -> Spindle {
    Spindle::start_with(tag, yaml, &["--dataplane", "sockmap"]).await
}

async fn ebpf(s: &Spindle, chain: &str, function: &str, event: &str) -> f64 {
    let series = format!(
        r#"spindle_ebpf_descriptors_total{{chain="{chain}",event="{event}",function="{function}"}}"#
    );
    s.metric(&series)
        .await
        .unwrap_or_else(|| panic!("{series} missing from /metrics"))
}

async fn per_instance(s: &Spindle, chain: &str, function: &str, instance: usize) -> f64 {
    let series = format!(
        r#"spindle_ebpf_instance_descriptors_total{{chain="{chain}",function="{function}",instance="{instance}"}}"#
    );
    s.metric(&series)
        .await
        .unwrap_or_else(|| panic!("{series} missing from /metrics"))
}

/// Takes a copy of a worker's socket (its end of the gateway connection), as a compromised
/// worker would use it.
fn steal_worker_socket(pid: i32) -> Option<TcpStream> {
    // SAFETY: plain syscalls on a pid of our own test; results are checked. Raw libc: nix
    // has neither pidfd_open nor pidfd_getfd.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, SOCKET_FD, 0) } as i32;
    // SAFETY: pidfd_open returned a new fd we own (or -1, not closed).
    if pidfd >= 0 {
        drop(unsafe { OwnedFd::from_raw_fd(pidfd) });
    }
    // SAFETY: pidfd_getfd returned a new fd we own.
    (fd >= 0).then(|| TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

const HELLO: &str = r#"
functions:
  - { name: uppercase, module: "{wasm:uppercase}" }
  - { name: reverse, module: "{wasm:reverse}" }
  - { name: frame, module: "{wasm:frame}" }
chains:
  - name: hello
    route: /hello
    steps: [uppercase, reverse, frame]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_routes_every_function_hop_and_the_router_none() {
    if !root_or_skip("kernel_routes_every_function_hop_and_the_router_none") {
        return;
    }
    let s = start("sockmap-proof", HELLO).await;
    assert!(s.get("/readyz").await.text().contains("dataplane: sockmap"));
    assert_eq!(
        s.metric(r#"spindle_dataplane_info{fallback_reason="",mode="sockmap"}"#)
            .await,
        Some(1.0)
    );
    let n = 200;
    for i in 0..n {
        let r = s.post("/hello", format!("req {i}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // gateway -> uppercase, uppercase -> reverse and reverse -> frame went through the kernel,
    // once per request; frame -> gateway is TCP (to the gateway's end of frame's connection).
    assert_eq!(ebpf(&s, "hello", "uppercase", "redirected").await, n as f64);
    assert_eq!(ebpf(&s, "hello", "reverse", "redirected").await, n as f64);
    assert_eq!(ebpf(&s, "hello", "frame", "redirected").await, n as f64);
    // Each response, plus the worker's ready announcement at start.
    assert_eq!(
        ebpf(&s, "hello", "frame", "to_gateway").await,
        (n + 1) as f64
    );
    assert_eq!(ebpf(&s, "hello", "uppercase", "dropped").await, 0.0);
    assert_eq!(
        s.metric(r#"spindle_router_forwarded_total{chain="hello"}"#)
            .await,
        Some(0.0)
    );
    let bytes = s
        .metric(r#"spindle_ebpf_redirected_bytes_total{chain="hello",function="frame"}"#)
        .await;
    assert_eq!(
        bytes,
        Some((n * 32) as f64),
        "one 32-byte descriptor per redirect"
    );
}

/// Each gateway owns its own programs and maps: two on one machine both route in the kernel,
/// count only their own traffic, and stopping one leaves the other working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_do_not_share_or_break_each_others_maps() {
    if !root_or_skip("two_gateways_do_not_share_or_break_each_others_maps") {
        return;
    }
    let a = start("sockmap-a", HELLO).await;
    let mut b = start("sockmap-b", HELLO).await;
    for _ in 0..10 {
        assert_eq!(a.post("/hello", "a").await.status, 200);
    }
    for _ in 0..3 {
        assert_eq!(b.post("/hello", "b").await.status, 200);
    }
    assert_eq!(ebpf(&a, "hello", "frame", "redirected").await, 10.0);
    assert_eq!(ebpf(&b, "hello", "frame", "redirected").await, 3.0);
    assert!(b.stop().success());
    assert_eq!(
        a.post("/hello", "still").await.text(),
        r#"{"result":"LLITS","bytes":5}"#
    );
    assert_eq!(ebpf(&a, "hello", "frame", "redirected").await, 11.0);
}

const SPREAD: &str = r#"
functions:
  - { name: reverse, module: "{wasm:reverse}" }
  - { name: faulty, module: "{wasm:faulty}", instances: 3, timeout_ms: 5000 }
  - { name: uppercase, module: "{wasm:uppercase}" }
chains:
  - name: spread
    route: /spread
    steps: [reverse, faulty, uppercase]
    arena: { slot_size: 1KiB, slots: 64 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_share_load_and_a_killed_one_loses_only_its_requests() {
    if !root_or_skip("instances_share_load_and_a_killed_one_loses_only_its_requests") {
        return;
    }
    let s = Arc::new(start("sockmap-spread", SPREAD).await);
    let n = 90;
    for i in 0..n {
        let r = s.post("/spread", format!("{i} ym")).await;
        assert_eq!(
            (r.status, r.text()),
            (
                200,
                format!("MY {}", i.to_string().chars().rev().collect::<String>())
            )
        );
    }
    let counts: Vec<f64> = futures_counts(&s).await;
    assert_eq!(counts.iter().sum::<f64>(), n as f64, "{counts:?}");
    assert!(
        counts.iter().all(|c| *c >= 25.0),
        "load spread by request id over 3 instances: {counts:?}"
    );

    // Six requests asleep in faulty (reverse turns "0001 peels" into "sleeps 1000").
    let sleepers: Vec<_> = (0..6)
        .map(|_| {
            let s = Arc::clone(&s);
            tokio::spawn(async move { s.post("/spread", "0001 peels").await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let victim = victim_pid(&s, 1).await;
    let _ = kill(Pid::from_raw(victim), Signal::SIGKILL);
    let mut lost = 0;
    for t in sleepers {
        let r = t.await.unwrap();
        match r.status {
            200 => assert_eq!(r.text(), "SLEEP 1000"),
            502 => {
                assert!(
                    r.text().contains("faulty") && r.text().contains("signal 9"),
                    "{}",
                    r.text()
                );
                lost += 1;
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    assert!(
        (1..6).contains(&lost),
        "only the killed instance's requests are lost: {lost} of 6"
    );

    // While it restarts, the kernel skips the missing instance: everything is served.
    for i in 0..30 {
        let r = s.post("/spread", format!("{i} ym")).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // And once back, the restarted instance takes its share again.
    for _ in 0..100 {
        if s.worker_pids("faulty").len() == 3 && s.get("/readyz").await.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = per_instance(&s, "spread", "faulty", 1).await;
    for i in 0..30 {
        assert_eq!(s.post("/spread", format!("{i} ym")).await.status, 200);
    }
    assert!(
        per_instance(&s, "spread", "faulty", 1).await > before,
        "restarted instance serves again"
    );
    assert_eq!(
        s.metric(r#"spindle_arena_slots{chain="spread",state="free"}"#)
            .await,
        Some(64.0)
    );
}

async fn futures_counts(s: &Spindle) -> Vec<f64> {
    let mut v = Vec::new();
    for i in 0..3 {
        v.push(per_instance(s, "spread", "faulty", i).await);
    }
    v
}

/// The pid of faulty's instance `instance`, as the gateway exports it (a forked worker's
/// command line is its zygote's, so it does not name the instance).
async fn victim_pid(s: &Spindle, instance: u32) -> i32 {
    let series = format!(
        r#"spindle_instance_pid{{chain="spread",function="faulty",instance="{instance}"}}"#
    );
    let pid = s.metric(&series).await.expect("instance pid exported") as i32;
    assert!(
        s.worker_pids("faulty").contains(&pid),
        "pid {pid} is a faulty worker"
    );
    pid
}

const TWO_CHAINS: &str = r#"
functions:
  - { name: uppercase, module: "{wasm:uppercase}" }
  - { name: reverse, module: "{wasm:reverse}" }
chains:
  - name: one
    route: /one
    steps: [uppercase, reverse]
  - name: two
    route: /two
    steps: [reverse]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_cross_chain_messages_are_returned_not_delivered() {
    if !root_or_skip("malformed_and_cross_chain_messages_are_returned_not_delivered") {
        return;
    }
    let s = start("sockmap-bad", TWO_CHAINS).await;
    assert_eq!(s.post("/one", "ab").await.text(), "BA");
    let pids = s.worker_pids("uppercase");
    let Some(mut sock) = steal_worker_socket(pids[0]) else {
        testkit::cannot_run(
            "malformed_and_cross_chain_messages_are_returned_not_delivered",
            format!("pidfd_getfd refused: {}", std::io::Error::last_os_error()),
        );
        return;
    };
    // Function ids: chain one = uppercase 1, reverse 2; chain two = reverse 3.
    let forged = Descriptor {
        next_fn: 2,
        chain: 0,
        request_id: 777_000,
        slot: 0,
        generation: 1,
        len: 2,
        ..Default::default()
    };
    let redirected_before = ebpf(&s, "one", "reverse", "redirected").await;
    // Names chain two's reverse from chain one: not part of the chain.
    sock.write_all(
        &Descriptor {
            next_fn: 3,
            ..forged
        }
        .to_bytes(),
    )
    .unwrap();
    // Claims to be chain two: the sender belongs to chain one.
    sock.write_all(
        &Descriptor {
            chain: 1,
            request_id: 777_001,
            ..forged
        }
        .to_bytes(),
    )
    .unwrap();
    // A too-short write, completed later with a non-OK status: judged whole, refused.
    let bad = Descriptor {
        status: 9,
        request_id: 777_002,
        ..forged
    }
    .to_bytes();
    sock.write_all(&bad[..7]).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    sock.write_all(&bad[7..]).unwrap();
    let mut returned = 0.0;
    for _ in 0..100 {
        returned = ebpf(&s, "one", "uppercase", "returned_failed").await;
        if returned >= 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        returned, 3.0,
        "all three given back to the gateway by the kernel"
    );
    assert_eq!(
        ebpf(&s, "one", "reverse", "redirected").await,
        redirected_before,
        "none delivered"
    );
    assert_eq!(
        ebpf(&s, "two", "reverse", "redirected").await,
        0.0,
        "nothing crossed into chain two"
    );
    let refused = s
        .metric(r#"spindle_descriptors_refused_total{chain="one",reason="unknown_request"}"#)
        .await;
    assert_eq!(refused, Some(3.0), "and the gateway counted them");
    assert_eq!(s.post("/one", "cd").await.text(), "DC");
    assert_eq!(s.post("/two", "xy").await.text(), "yx");
}

/// Raw GET, for a gateway the harness did not start.
fn get(addr: &str, path: &str) -> Option<String> {
    use std::io::Read;
    let mut c = TcpStream::connect(addr).ok()?;
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    c.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Without privileges (run as nobody), `auto` falls back to userspace and says why, and
/// `sockmap` refuses to start with a clear error.
#[test]
fn without_privileges_auto_falls_back_and_sockmap_refuses() {
    if !root_or_skip("without_privileges_auto_falls_back_and_sockmap_refuses") {
        return;
    }
    common::build_examples();
    let dir = common::temp_dir("sockmap-nobody");
    let config = dir.join("spindle.yaml");
    std::fs::write(
        &config,
        HELLO
            .replace("{wasm:uppercase}", &common::wasm("uppercase"))
            .replace("{wasm:reverse}", &common::wasm("reverse"))
            .replace("{wasm:frame}", &common::wasm("frame")),
    )
    .unwrap();
    let nobody = |dataplane: &str, addr: &str| {
        std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .arg(env!("CARGO_BIN_EXE_spindle"))
            .arg("run")
            .arg(&config)
            .args(["--listen", addr, "--dataplane", dataplane])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("setpriv (util-linux)")
    };
    let free = || {
        format!(
            "127.0.0.1:{}",
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        )
    };
    let refused = nobody("sockmap", &free()).wait_with_output().unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("dataplane sockmap: cannot use the eBPF dataplane"),
        "{err}"
    );

    let addr = free();
    let mut child = nobody("auto", &addr);
    let mut ready = None;
    for _ in 0..600 {
        if let Some(r) = get(&addr, "/readyz").filter(|r| r.starts_with("HTTP/1.1 200")) {
            ready = Some(r);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let hello = get(&addr, "/hello");
    let _ = child.kill();
    let _ = child.wait();
    let ready = ready.expect("auto mode came up as nobody");
    assert!(
        ready.contains("dataplane: userspace (eBPF unavailable:"),
        "{ready}"
    );
    assert!(
        hello.is_some_and(|h| h.starts_with("HTTP/1.1 200")),
        "serves in userspace"
    );
}
