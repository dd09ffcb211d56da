//! Bad input and failing functions: every case gets a clear HTTP status, the gateway keeps
//! serving, and no slot leaks.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::Spindle;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const FAULTY: &str = r#"
functions:
  - name: faulty
    module: {wasm:faulty}
    fuel: 200000000
    timeout_ms: 1500
    memory: 8MiB
  - name: uppercase
    module: {wasm:uppercase}
chains:
  - name: faulty
    route: /faulty
    steps: [faulty, uppercase]
    timeout_ms: 4000
    content_type: text/plain
    arena: { slot_size: 1KiB, slots: 4 }
"#;

async fn assert_all_slots_free(spindle: &Spindle, chain: &str, total: f64) {
    // A slot whose request timed out is released when its descriptor comes back or its
    // worker exits; give that a moment.
    let series = format!(r#"spindle_arena_slots{{chain="{chain}",state="free"}}"#);
    for _ in 0..100 {
        if spindle.metric(&series).await == Some(total) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "slots leaked: {series} = {:?}, expected {total}",
        spindle.metric(&series).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_functions_become_http_errors_and_instances_recover() {
    let mut spindle = Spindle::start("faulty", FAULTY).await;

    let r = spindle.post("/nope", "x").await;
    assert_eq!(r.status, 404);
    assert!(r.text().contains("/nope"), "{}", r.text());

    let r = spindle.post("/faulty", "trap").await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(
        r.text().contains("function faulty") && r.text().contains("trap"),
        "{}",
        r.text()
    );
    // The trapped instance was rebuilt: the next request is served normally.
    assert_eq!(spindle.post("/faulty", "fine").await.text(), "FINE");

    // Endless loop: the fuel budget stops it.
    let r = spindle.post("/faulty", "loop").await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(
        r.text().contains("function faulty") && r.text().contains("fuel"),
        "{}",
        r.text()
    );
    assert_eq!(
        spindle.post("/faulty", "after loop").await.text(),
        "AFTER LOOP"
    );

    // Out of memory at the 8 MiB cap: malloc fails, the guest traps, the instance is rebuilt.
    let r = spindle.post("/faulty", "oom").await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.text().contains("function faulty"), "{}", r.text());
    assert_eq!(
        spindle.post("/faulty", "after oom").await.text(),
        "AFTER OOM"
    );

    let r = spindle.post("/faulty", "error").await;
    assert_eq!(
        (r.status, r.text()),
        (500, "function faulty: requested error\n".to_string())
    );

    // Blocking past the wall-clock timeout (no fuel burnt while asleep): the watchdog ends
    // the worker, the request gets 504 and a new instance takes over.
    let r = spindle.post("/faulty", "sleep 3000").await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(r.text().contains("timeout"), "{}", r.text());
    let r = spindle.post("/faulty", "during restart").await;
    assert!(
        r.status == 200 || r.status == 503,
        "served or told to retry: {} {}",
        r.status,
        r.text()
    );
    spindle.wait_ready(Duration::from_secs(60)).await;
    assert_eq!(
        spindle.post("/faulty", "after sleep").await.text(),
        "AFTER SLEEP"
    );

    assert_all_slots_free(&spindle, "faulty", 4.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413_and_a_full_arena_503() {
    let spindle = Arc::new(Spindle::start("limits", FAULTY).await);

    let r = spindle.post("/faulty", vec![b'a'; 1025]).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(spindle.post("/faulty", vec![b'a'; 1024]).await.status, 200);

    // Chunked, no Content-Length: the gateway stops at the slot size while copying.
    let mut conn = TcpStream::connect(&spindle.addr).unwrap();
    let chunk = vec![b'b'; 700];
    let mut req =
        b"POST /faulty HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..2 {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(&chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    conn.write_all(&req).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut head = [0u8; 12];
    conn.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");

    // A client that announces a body and stalls gets 408 at the chain deadline, and its slot
    // comes back.
    let mut slow = TcpStream::connect(&spindle.addr).unwrap();
    slow.write_all(b"POST /faulty HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly ten b")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut head = [0u8; 12];
    slow.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 408");
    assert_all_slots_free(&spindle, "faulty", 4.0).await;

    // Fill all 4 slots with sleeping requests: the fifth is turned away with Retry-After.
    let mut sleepers = Vec::new();
    for _ in 0..4 {
        let s = Arc::clone(&spindle);
        sleepers.push(tokio::spawn(async move {
            s.post("/faulty", "sleep 600").await.status
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = spindle.post("/faulty", "one too many").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("capacity"), "{}", r.text());
    for s in sleepers {
        assert_eq!(s.await.unwrap(), 200);
    }
    let failures = spindle
        .metric(r#"spindle_arena_alloc_failures_total{chain="faulty"}"#)
        .await;
    assert_eq!(failures, Some(1.0));
    assert_all_slots_free(&spindle, "faulty", 4.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_fails_its_requests_with_502_and_is_restarted() {
    let spindle = Arc::new(Spindle::start("sigkill", FAULTY).await);
    let pids = spindle.worker_pids("faulty");
    assert_eq!(pids.len(), 1, "one faulty worker");

    // Background load on the chain while the worker dies.
    let load = {
        let s = Arc::clone(&spindle);
        tokio::spawn(async move {
            let mut codes = Vec::new();
            for i in 0..200 {
                codes.push(s.post("/faulty", format!("load {i}")).await.status);
            }
            codes
        })
    };
    // A request certainly held by the worker when it dies.
    let held = {
        let s = Arc::clone(&spindle);
        tokio::spawn(async move { s.post("/faulty", "sleep 1000").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Editing the config after start must not break restarts: workers get the text the
    // gateway started with.
    std::fs::write(spindle.dir.join("spindle.yaml"), "not: [valid").unwrap();
    let _ = kill(Pid::from_raw(pids[0]), Signal::SIGKILL);

    let held = held.await.unwrap();
    assert_eq!(held.status, 502, "{}", held.text());
    assert!(
        held.text().contains("function faulty") && held.text().contains("signal 9"),
        "{}",
        held.text()
    );
    let codes = load.await.unwrap();
    // In flight at the kill: 502. Arriving while the instance restarts: 503 + Retry-After.
    assert!(
        codes.iter().all(|c| [200, 502, 503].contains(c)),
        "statuses during the crash: {codes:?}"
    );

    // Restarted: a new process serves later requests.
    let mut restarted = Vec::new();
    for _ in 0..100 {
        restarted = spindle.worker_pids("faulty");
        if restarted.len() == 1
            && restarted[0] != pids[0]
            && spindle.get("/readyz").await.status == 200
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        restarted.len() == 1 && restarted[0] != pids[0],
        "worker restarted: {restarted:?}"
    );
    assert_eq!(spindle.post("/faulty", "back").await.text(), "BACK");
    let restarts = spindle
        .metric(r#"spindle_instance_restarts_total{chain="faulty",function="faulty"}"#)
        .await;
    assert_eq!(restarts, Some(1.0));
    assert_all_slots_free(&spindle, "faulty", 4.0).await;
}

#[test]
fn malformed_yaml_is_reported_with_line_and_column() {
    let dir = common::temp_dir("badyaml");
    let config = dir.join("bad.yaml");
    std::fs::write(
        &config,
        "functions:\n  - name: a\n    module: [unclosed\nchains: []\n",
    )
    .unwrap();
    for sub in ["validate", "run"] {
        let out = Command::new(env!("CARGO_BIN_EXE_spindle"))
            .arg(sub)
            .arg(&config)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{sub} accepted a malformed config");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let needle = format!("{}:", config.display());
        let at = text
            .find(&needle)
            .unwrap_or_else(|| panic!("{sub}: no file:line:col in {text}"));
        let pos: Vec<&str> = text[at + needle.len()..].splitn(3, ':').collect();
        assert!(
            pos[0].parse::<u32>().is_ok() && pos[1].parse::<u32>().is_ok(),
            "{sub}: {text}"
        );
    }

    let semantic = dir.join("semantic.yaml");
    let module = common::wasm("uppercase");
    std::fs::write(
        &semantic,
        format!("functions:\n  - name: up\n    module: {module}\nchains:\n  - name: c\n    route: /c\n    steps: [up, missing]\n"),
    )
    .unwrap();
    common::build_examples();
    let out = Command::new(env!("CARGO_BIN_EXE_spindle"))
        .arg("validate")
        .arg(&semantic)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("{}:7:17:", semantic.display())),
        "unknown function located: {stdout}"
    );
    assert!(stdout.contains("missing"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_requests_in_flight_finish_then_stops_workers() {
    let spindle = Arc::new(Spindle::start("drain", FAULTY).await);
    let in_flight = {
        let s = Arc::clone(&spindle);
        tokio::spawn(async move { s.post("/faulty", "sleep 700").await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = kill(Pid::from_raw(spindle.child.id() as i32), Signal::SIGTERM);
    let r = in_flight.await.unwrap();
    assert_eq!((r.status, r.text()), (200, "SLEEP 700".to_string()));
    let mut spindle = Arc::into_inner(spindle).expect("only owner");
    let status = spindle.stop();
    assert!(
        status.success(),
        "exit after SIGTERM: {status}\n{}",
        spindle.log()
    );
    assert!(
        spindle.worker_pids("faulty").is_empty() && spindle.worker_pids("uppercase").is_empty()
    );
}

/// A worker SIGSTOPped with requests in it (its own watchdog is stopped too): the clients
/// get 504 at the chain's deadline, and once the deadline's grace has passed the gateway
/// kills and replaces the worker, so its slots come back and the chain serves again. On the
/// kernel dataplane the request is found where the kernel put it (the second function).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_holding_requests_past_their_deadline_is_killed_and_replaced() {
    const STOPPED: &str = r#"
functions:
  - { name: uppercase, module: "{wasm:uppercase}" }
  - { name: reverse, module: "{wasm:reverse}" }
chains:
  - name: stuck
    route: /stuck
    steps: [uppercase, reverse]
    timeout_ms: 400
    content_type: text/plain
    arena: { slot_size: 1KiB, slots: 4 }
"#;
    let spindle = Arc::new(Spindle::start("failures-stopped", STOPPED).await);
    assert_eq!(spindle.post("/stuck", "abc").await.text(), "CBA");
    let stopped = spindle.worker_pids("reverse");
    assert_eq!(stopped.len(), 1);
    kill(Pid::from_raw(stopped[0]), Signal::SIGSTOP).unwrap();
    let requests: Vec<_> = (0..2)
        .map(|i| {
            let s = Arc::clone(&spindle);
            tokio::spawn(async move { s.post("/stuck", format!("r{i}")).await })
        })
        .collect();
    for r in requests {
        let r = r.await.unwrap();
        assert_eq!(r.status, 504, "{}", r.text());
        assert!(
            r.text().contains("did not finish within 400 ms"),
            "{}",
            r.text()
        );
    }
    // Deadline + 1 s grace, then a fork replaces it.
    let began = std::time::Instant::now();
    loop {
        let now = spindle.worker_pids("reverse");
        if now.len() == 1 && now != stopped {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "the stopped worker was not replaced: {now:?}\n{}",
            spindle.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        spindle
            .log()
            .contains("holds a request past its chain's deadline; killing it")
    );
    assert_all_slots_free(&spindle, "stuck", 4.0).await;
    assert_eq!(spindle.post("/stuck", "again").await.text(), "NIAGA");
    assert_eq!(
        spindle
            .metric(
                r#"spindle_function_errors_total{chain="stuck",function="reverse",kind="overdue"}"#
            )
            .await,
        Some(1.0)
    );
    assert!(
        std::fs::metadata(format!("/proc/{}", stopped[0])).is_err(),
        "the stopped worker is gone"
    );
}

/// A worker that is alive but whose socket has failed (here: shut down under it while it
/// sleeps in a long call, so the gateway's next writes are reset) is restarted at once, and
/// what it held fails with 502 — instead of staying "up" with its requests and slots held
/// until it happens to exit. Userspace dataplane: there the gateway's writes go over TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_worker_whose_socket_failed_is_restarted_and_its_requests_fail() {
    if !testkit::require_root(
        "a_live_worker_whose_socket_failed_is_restarted_and_its_requests_fail",
        "taking another process's socket with pidfd_getfd",
    ) {
        return;
    }
    let dir = common::temp_dir("failures-unreachable-wat");
    let module = dir.join("sleeper.wat");
    std::fs::write(&module, common::sleeper_wat(8000)).unwrap();
    let yaml = format!(
        r#"
functions:
  - {{ name: sleeper, module: "{}", timeout_ms: 20000 }}
chains:
  - {{ name: s, route: /s, steps: [sleeper], timeout_ms: 20000, content_type: text/plain }}
"#,
        module.display()
    );
    let spindle = Arc::new(
        Spindle::start_with("failures-unreachable", &yaml, &["--dataplane", "userspace"]).await,
    );
    let worker = spindle.worker_pids("sleeper");
    assert_eq!(worker.len(), 1);
    let first = {
        let s = Arc::clone(&spindle);
        tokio::spawn(async move { s.post("/s", "first").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The worker's end of its gateway connection (fd 4), shut down from outside: it keeps
    // sleeping in its call, and the gateway's next writes to it are reset.
    // SAFETY: plain system calls on a pid and fd numbers; every result is checked, and the
    // returned fds are owned (and closed) here.
    let socket = unsafe {
        let pidfd = nix::libc::syscall(nix::libc::SYS_pidfd_open, worker[0], 0) as i32;
        assert!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        let fd = nix::libc::syscall(nix::libc::SYS_pidfd_getfd, pidfd, 4, 0) as i32;
        assert!(fd >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
        nix::libc::close(pidfd);
        std::os::fd::OwnedFd::from_raw_fd(fd)
    };
    nix::sys::socket::shutdown(socket.as_raw_fd(), nix::sys::socket::Shutdown::Both).unwrap();
    drop(socket);
    let cut = std::time::Instant::now();
    let mut later = Vec::new();
    for i in 0..4 {
        let s = Arc::clone(&spindle);
        later.push(tokio::spawn(async move {
            s.post("/s", format!("later {i}")).await
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = first.await.unwrap();
    assert_eq!(first.status, 502, "{}", first.text());
    assert!(
        first.text().contains("could no longer be reached"),
        "{}",
        first.text()
    );
    // Long before its 8 s call would have ended.
    assert!(
        cut.elapsed() < Duration::from_secs(6),
        "{:?}",
        cut.elapsed()
    );
    // Those written to the dead socket fail at once too; any sent after the replacement
    // came up are still running there (8 s each) and are not waited for.
    let mut failed_fast = 0;
    for r in later {
        if let Ok(r) = tokio::time::timeout(Duration::from_secs(1), r).await {
            let r = r.unwrap();
            assert_eq!(r.status, 502, "{}", r.text());
            failed_fast += 1;
        }
    }
    assert!(
        failed_fast >= 1,
        "the writes that hit the reset socket failed"
    );
    // The replacement is forked from the zygote and takes its own name a moment later.
    let began = std::time::Instant::now();
    let now = loop {
        let now = spindle.worker_pids("sleeper");
        if now.len() == 1 && now != worker || began.elapsed() > Duration::from_secs(10) {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(now.len(), 1);
    assert_ne!(now, worker, "replaced");
    assert!(
        spindle
            .log()
            .contains("writing to the instance's socket failed; restarting it")
    );
}
