//! Starts the real Knative-style baseline (this crate's binary, one process per component) on
//! example configs and talks HTTP to it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use knative_baseline::{Baseline, BaselineError, Options};
use nix::unistd::{SysconfVar, sysconf};

use testkit::{build_examples, repo_root};

/// Writes `yaml`, with `{wasm:NAME}` replaced by the absolute module path, to a temp dir.
fn config(tag: &str, yaml: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kn-baseline-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut text = yaml.to_string();
    while let Some(start) = text.find("{wasm:") {
        let end = start + text[start..].find('}').unwrap();
        let module = testkit::wasm(&text[start + 6..end]);
        text.replace_range(start..=end, &module.display().to_string());
    }
    let path = dir.join("config.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn start_with(config: &Path, options: &Options) -> Result<Baseline, BaselineError> {
    build_examples();
    Baseline::start_with(
        Path::new(env!("CARGO_BIN_EXE_knative-baseline")),
        &[],
        config,
        "127.0.0.1:0".parse().unwrap(),
        options,
    )
}

fn start(config: &Path) -> Baseline {
    start_with(config, &Options::default()).unwrap_or_else(|e| panic!("start failed: {e}"))
}

#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`); `chunked` sends the body
/// without a Content-Length.
fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8], chunked: bool) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if chunked {
        req.push_str("Transfer-Encoding: chunked\r\n\r\n");
        req.push_str(&format!("{:x}\r\n", body.len()));
    } else {
        req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    }
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    if chunked {
        bytes.extend_from_slice(b"\r\n0\r\n\r\n");
    }
    // The server may answer (413) and close before reading everything; the reply is what
    // matters, so a failed write is not the test's failure.
    let _ = s.write_all(&bytes);
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if raw.is_empty() => panic!("reading reply from {addr}{path}: {e}"),
            Err(_) => break,
        }
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap();
    let mut content_type = String::new();
    let mut length = None;
    for line in lines {
        let (k, v) = line.split_once(':').unwrap();
        match k.trim().to_ascii_lowercase().as_str() {
            "content-type" => content_type = v.trim().to_string(),
            "content-length" => length = Some(v.trim().parse::<usize>().unwrap()),
            _ => {}
        }
    }
    let mut body = raw[split + 4..].to_vec();
    if let Some(n) = length {
        assert_eq!(body.len(), n, "body length vs Content-Length");
        body.truncate(n);
    }
    Reply {
        status: status.parse().unwrap(),
        content_type,
        body,
    }
}

fn post(addr: SocketAddr, path: &str, body: &str) -> Reply {
    request(addr, "POST", path, body.as_bytes(), false)
}

/// Sends `n` identical requests at once and checks each comes back 200 with `body` echoed.
fn all_served_concurrently(
    addr: std::net::SocketAddr,
    path: &'static str,
    body: &'static str,
    n: usize,
) {
    let clients: Vec<_> = (0..n)
        .map(|_| std::thread::spawn(move || post(addr, path, body)))
        .collect();
    for c in clients {
        let r = c.join().unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, body));
    }
}

fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, b"", false)
}

#[derive(Debug, PartialEq, Eq)]
struct Stats {
    in_flight: u64,
    served: u64,
    queued_max: u64,
}

fn stats(queue_proxy: SocketAddr) -> Stats {
    let reply = get(queue_proxy, "/_queue/stats");
    assert_eq!(reply.status, 200);
    let text = reply.text();
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text:?}"))
    };
    Stats {
        in_flight: field("in_flight "),
        served: field("served "),
        queued_max: field("queued_max "),
    }
}

/// Stats of every pod of `function`, in instance order.
fn pod_stats(baseline: &Baseline, function: &str) -> Vec<Stats> {
    baseline
        .pods()
        .iter()
        .filter(|p| p.function == function)
        .map(|p| stats(p.queue_proxy_addr))
        .collect()
}

fn alive(pid: u32) -> bool {
    // A reaped child leaves no /proc entry; a recycled pid would not be our child.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
            let ppid: u32 = after_comm
                .split_whitespace()
                .nth(1)
                .unwrap()
                .parse()
                .unwrap();
            let state = after_comm.chars().next().unwrap();
            ppid == std::process::id() && state != 'Z'
        }
    }
}

#[test]
fn hello_chain_answers_like_spindle() {
    let baseline = start(&repo_root().join("configs/hello.yaml"));
    let addr = baseline.addr();
    assert_eq!(baseline.pods().len(), 3);
    assert_eq!(
        baseline.pids().len(),
        7,
        "3 function servers, 3 queue-proxies, 1 ingress"
    );

    let r = post(addr, "/hello", "hello spindle");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.content_type, "application/json");
    assert_eq!(r.text(), r#"{"result":"ELDNIPS OLLEH","bytes":13}"#);

    assert_eq!(get(addr, "/healthz").status, 200);
    let ready = get(addr, "/readyz");
    assert_eq!(ready.status, 200);
    assert!(
        ready.text().contains("knative-style baseline"),
        "{}",
        ready.text()
    );

    let r = post(addr, "/nope", "x");
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), "no chain is routed at /nope\n");
    // Routing is by exact path.
    assert_eq!(post(addr, "/hello/", "x").status, 404);
}

#[test]
fn dynamic_chain_follows_the_functions_choice() {
    let baseline = start(&repo_root().join("configs/boutique.yaml"));
    let r = post(baseline.addr(), "/shop", "cart total 30.00 EUR");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.content_type, "text/plain");
    assert!(r.text().starts_with("30.00 USD = "), "{}", r.text());
    // frontend -> cart -> currency, never catalog.
    for (function, served) in [
        ("frontend", 1),
        ("cart", 1),
        ("currency", 1),
        ("catalog", 0),
    ] {
        let s = pod_stats(&baseline, function);
        assert_eq!(s[0].served, served, "{function}: {s:?}");
    }
}

#[test]
fn dynamic_chain_stops_at_max_hops() {
    let path = config(
        "hops",
        "functions:
  - { name: frontend, module: '{wasm:frontend}' }
  - { name: cart, module: '{wasm:cart}' }
  - { name: currency, module: '{wasm:currency}' }
chains:
  - name: shop
    route: /shop
    entry: frontend
    functions: [frontend, cart, currency]
    max_hops: 2
",
    );
    let baseline = start(&path);
    let r = post(baseline.addr(), "/shop", "cart total 30.00 EUR");
    assert_eq!(r.status, 508, "{}", r.text());
    assert_eq!(
        r.text(),
        "function cart: request passed through 2 functions, the chain's max_hops\n"
    );
    assert_eq!(pod_stats(&baseline, "currency")[0].served, 0);
}

#[test]
fn failing_function_is_named_and_stops_the_sequence() {
    let path = config(
        "faulty",
        "functions:
  - { name: faulty, module: '{wasm:faulty}', fuel: 20000000 }
  - { name: reverse, module: '{wasm:reverse}' }
chains:
  - { name: f, route: /f, steps: [faulty, reverse], content_type: text/plain }
",
    );
    let baseline = start(&path);
    let addr = baseline.addr();

    let r = post(addr, "/f", "trap");
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(
        r.text().starts_with("function faulty: trapped"),
        "{}",
        r.text()
    );
    assert!(r.content_type.starts_with("text/plain"));

    let r = post(addr, "/f", "error");
    assert_eq!(r.status, 500);
    assert_eq!(r.text(), "function faulty: requested error\n");

    let r = post(addr, "/f", "loop");
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(
        r.text().starts_with("function faulty: ran out of fuel"),
        "{}",
        r.text()
    );

    // The trapped instance was rebuilt; the chain works again.
    let r = post(addr, "/f", "abc");
    assert_eq!((r.status, r.text().as_str()), (200, "cba"));
    assert_eq!(pod_stats(&baseline, "faulty")[0].served, 4);
    assert_eq!(
        pod_stats(&baseline, "reverse")[0].served,
        1,
        "failed steps stop the sequence"
    );
}

#[test]
fn limits_match_spindle() {
    let path = config(
        "limits",
        "functions:
  - { name: uppercase, module: '{wasm:uppercase}' }
  - { name: faulty, module: '{wasm:faulty}' }
chains:
  - { name: up, route: /up, steps: [uppercase], content_type: text/plain, arena: { slot_size: 4KiB, slots: 8 } }
  - { name: slow, route: /slow, steps: [faulty], timeout_ms: 300 }
",
    );
    let baseline = start(&path);
    let addr = baseline.addr();

    let fits = "a".repeat(4096);
    let r = post(addr, "/up", &fits);
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "A".repeat(4096));

    let expected = "request body exceeds chain up's slot size of 4096 bytes\n";
    let too_big = "a".repeat(4097);
    let r = post(addr, "/up", &too_big);
    assert_eq!((r.status, r.text().as_str()), (413, expected));
    // Without a Content-Length the limit is found while reading.
    let r = request(addr, "POST", "/up", too_big.as_bytes(), true);
    assert_eq!((r.status, r.text().as_str()), (413, expected));
    assert_eq!(
        pod_stats(&baseline, "uppercase")[0].served,
        1,
        "413s never reach a pod"
    );

    let began = Instant::now();
    let r = post(addr, "/slow", "sleep 1500");
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.text(), "chain slow did not finish within 300 ms\n");
    assert!(
        began.elapsed() < Duration::from_millis(1200),
        "{:?}",
        began.elapsed()
    );
}

#[test]
fn queue_proxies_count_every_request_and_pods_share_the_load() {
    let path = config(
        "accounting",
        "functions:
  - { name: uppercase, module: '{wasm:uppercase}', instances: 2 }
  - { name: reverse, module: '{wasm:reverse}' }
chains:
  - { name: ur, route: /ur, steps: [uppercase, reverse], content_type: text/plain }
",
    );
    let baseline = start(&path);
    let addr = baseline.addr();
    assert_eq!(baseline.pods().len(), 3);

    for i in 0..10 {
        let r = post(addr, "/ur", &format!("req {i}"));
        assert_eq!((r.status, r.text()), (200, format!("{i} QER")));
    }
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..5 {
                    let r = post(addr, "/ur", &format!("t{t} {i}"));
                    assert_eq!((r.status, r.text()), (200, format!("{i} {t}T")));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }

    let up = pod_stats(&baseline, "uppercase");
    let idle = |served| Stats {
        in_flight: 0,
        served,
        queued_max: 0,
    };
    assert_eq!(up, vec![idle(15), idle(15)], "round-robin over two pods");
    assert_eq!(pod_stats(&baseline, "reverse"), vec![idle(30)]);
}

#[test]
fn container_concurrency_one_serialises_requests() {
    let path = config(
        "concurrency",
        "functions:
  - { name: faulty, module: '{wasm:faulty}' }
chains:
  - { name: s, route: /s, steps: [faulty] }
",
    );
    let options = Options {
        container_concurrency: 1,
        ..Options::default()
    };
    let baseline = start_with(&path, &options).unwrap();
    let addr = baseline.addr();
    let began = Instant::now();
    all_served_concurrently(addr, "/s", "sleep 300", 2);
    let took = began.elapsed();
    assert!(took >= Duration::from_millis(600), "took {took:?}");
    // The second request waited in the queue-proxy, not in the container.
    assert_eq!(
        pod_stats(&baseline, "faulty"),
        vec![Stats {
            in_flight: 0,
            served: 2,
            queued_max: 1
        }]
    );
}

/// The queue-proxy's revision timeout is the chain's whole-request budget, not the function's
/// per-call `timeout_ms`: requests that wait for a busy single-threaded container longer than
/// one call may take are still served, as Spindle serves them.
#[test]
fn queueing_for_the_container_does_not_count_against_the_call_timeout() {
    let path = config(
        "queueing",
        "functions:
  - { name: faulty, module: '{wasm:faulty}', timeout_ms: 200 }
chains:
  - { name: q, route: /q, steps: [faulty], timeout_ms: 5000 }
",
    );
    let baseline = start(&path);
    let addr = baseline.addr();
    let began = Instant::now();
    all_served_concurrently(addr, "/q", "sleep 150", 4);
    // One call at a time in the container: the last waited ~450 ms, past the 200 ms a call
    // may take, and none of it was counted as the call's.
    let took = began.elapsed();
    assert!(took >= Duration::from_millis(600), "took {took:?}");
    assert_eq!(
        pod_stats(&baseline, "faulty"),
        vec![Stats {
            in_flight: 0,
            served: 4,
            queued_max: 0
        }]
    );
}

/// A guest that never returns (no fuel is burnt while it sleeps) holds the function server's
/// only thread: the chain times out, and so does every later request to that pod, which is
/// not restarted. Dropping the baseline still stops it.
#[test]
fn runaway_guest_wedges_its_pod() {
    let path = config(
        "wedged",
        "functions:
  - { name: faulty, module: '{wasm:faulty}' }
chains:
  - { name: w, route: /w, steps: [faulty], timeout_ms: 300 }
",
    );
    let baseline = start(&path);
    let addr = baseline.addr();
    let expected = "chain w did not finish within 300 ms\n";
    let r = post(addr, "/w", "sleep 600000");
    assert_eq!((r.status, r.text().as_str()), (504, expected));
    let r = post(addr, "/w", "abc");
    assert_eq!((r.status, r.text().as_str()), (504, expected));
    let pids = baseline.pids();
    drop(baseline);
    let still: Vec<u32> = pids.into_iter().filter(|&p| alive(p)).collect();
    assert!(still.is_empty(), "still running after drop: {still:?}");
}

#[test]
fn drop_leaves_no_processes() {
    let baseline = start(&repo_root().join("configs/hello.yaml"));
    let pids = baseline.pids();
    assert_eq!(pids.len(), 7);
    for &pid in &pids {
        assert!(alive(pid), "pid {pid} should be running");
    }
    drop(baseline);
    let still: Vec<u32> = pids.into_iter().filter(|&p| alive(p)).collect();
    assert!(still.is_empty(), "still running after drop: {still:?}");
}

/// `run` as a process of its own: prints its address, serves, and its children die with it
/// even when it is SIGKILLed (PR_SET_PDEATHSIG), so nothing is left behind.
#[test]
fn run_role_serves_and_its_children_die_with_it() {
    build_examples();
    let mut run = Command::new(env!("CARGO_BIN_EXE_knative-baseline"))
        .args(["knative-baseline", "run", "--config"])
        .arg(repo_root().join("configs/hello.yaml"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(run.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("knative-style baseline serving on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    let r = post(addr, "/hello", "hello spindle");
    assert_eq!(r.text(), r#"{"result":"ELDNIPS OLLEH","bytes":13}"#);

    let children = children_of(run.id());
    assert_eq!(children.len(), 7, "{children:?}");
    run.kill().unwrap();
    run.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while children.iter().any(|&p| exists(p)) {
        assert!(Instant::now() < deadline, "children outlived `run`");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pids whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|stat| {
                let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
                after_comm.split_whitespace().nth(1) == Some(&pid.to_string())
            })
        })
        .collect()
}

/// Orphans are reaped by init (or a subreaper) once dead; until then they are zombies.
fn exists(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
        !after_comm.starts_with('Z')
    })
}

#[test]
fn start_failure_names_the_component() {
    let path = config(
        "badmodule",
        "functions:
  - { name: uppercase, module: '{wasm:uppercase}' }
  - { name: broken, module: ./broken.wasm }
chains:
  - { name: c, route: /c, steps: [uppercase, broken] }
",
    );
    std::fs::write(path.with_file_name("broken.wasm"), b"not wasm at all").unwrap();
    let began = Instant::now();
    let err = start_with(&path, &Options::default())
        .expect_err("a module that does not compile cannot start");
    let message = err.to_string();
    assert!(
        message.contains("function server c/broken#0 failed to start"),
        "{message}"
    );
    assert!(message.contains("cannot compile"), "{message}");
    assert!(began.elapsed() < Duration::from_secs(20));
}

#[test]
fn baseline_can_be_held_across_threads_and_awaits() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Baseline>();
    send_sync::<BaselineError>();
}

/// CPU time (user + system, all threads) a process has used so far, from /proc/PID/stat.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    // After the command: state is field 3, utime field 14, stime field 15.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = sysconf(SysconfVar::CLK_TCK).unwrap().unwrap() as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// Context switches (voluntary and not) of every thread of a process so far.
fn context_switches(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Sends `body` to `path` over one keep-alive connection until `until`, checking each reply;
/// returns how many were sent.
fn keep_alive_loop(addr: SocketAddr, path: &str, body: &str, expect: &str, until: Instant) -> u64 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let mut served = 0;
    while Instant::now() < until {
        s.write_all(req.as_bytes()).unwrap();
        buf.clear();
        let (head_end, length) = loop {
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "connection closed");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                assert!(head.starts_with("http/1.1 200"), "{head}");
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                break (end + 4, length);
            }
        };
        while buf.len() < head_end + length {
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "connection closed");
            buf.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(&buf[head_end..], expect.as_bytes());
        served += 1;
    }
    served
}

/// Not a check: measures the CPU the function servers (user containers) spend per request of
/// the hello chain, closed loop. Run with
/// `cargo test -p knative-baseline -- --ignored --nocapture function_server_cpu` (8 client
/// connections; `KN_CONNECTIONS=N` picks another number, `KN_EXE=PATH` another build of the
/// binary, e.g. a copy of an older one for a before/after comparison).
#[test]
#[ignore = "measurement, prints numbers"]
fn function_server_cpu_per_request() {
    build_examples();
    let exe = std::env::var_os("KN_EXE").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_knative-baseline")),
        PathBuf::from,
    );
    let baseline = Baseline::start(
        &exe,
        &[],
        &repo_root().join("configs/hello.yaml"),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = baseline.addr();
    let expect = r#"{"result":"ELDNIPS OLLEH","bytes":13}"#;
    let connections: usize = std::env::var("KN_CONNECTIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(8);
    let drive = |seconds: u64| -> u64 {
        let until = Instant::now() + Duration::from_secs(seconds);
        let threads: Vec<_> = (0..connections)
            .map(|_| {
                std::thread::spawn(move || {
                    keep_alive_loop(addr, "/hello", "hello spindle", expect, until)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).sum()
    };
    drive(2); // warm-up
    let functions: Vec<u32> = baseline.pods().iter().map(|p| p.function_pid).collect();
    let all = baseline.pids();
    let fn_before: Duration = functions.iter().map(|&p| cpu_time(p)).sum();
    let switches_before: u64 = functions.iter().map(|&p| context_switches(p)).sum();
    let all_before: Duration = all.iter().map(|&p| cpu_time(p)).sum();
    let requests = drive(10);
    let fn_cpu = functions.iter().map(|&p| cpu_time(p)).sum::<Duration>() - fn_before;
    let all_cpu = all.iter().map(|&p| cpu_time(p)).sum::<Duration>() - all_before;
    let switches = functions.iter().map(|&p| context_switches(p)).sum::<u64>() - switches_before;
    let threads: Vec<usize> = functions
        .iter()
        .map(|p| {
            std::fs::read_dir(format!("/proc/{p}/task"))
                .unwrap()
                .count()
        })
        .collect();
    println!(
        "{requests} requests in 10 s ({} req/s), {connections} connections: function servers \
         {:.1} µs CPU/request, {:.2} context switches/request (3 servers, {threads:?} threads); \
         all 7 processes {:.1} µs CPU/request",
        requests / 10,
        fn_cpu.as_secs_f64() * 1e6 / requests as f64,
        switches as f64 / requests as f64,
        all_cpu.as_secs_f64() * 1e6 / requests as f64,
    );
}

/// configs/large.yaml: the baseline carries what Spindle carries (bodies up to the largest
/// slot class, 413 above it), and its /metrics counts every user-space copy of the payload.
#[test]
fn large_bodies_up_to_the_largest_class_and_their_copies_counted() {
    let baseline = start(&repo_root().join("configs/large.yaml"));
    let addr = baseline.addr();
    let input: String = (0..2 * 1024 * 1024)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let r = post(addr, "/hello", &input);
    assert_eq!(r.status, 200, "{}", &r.text()[..r.text().len().min(200)]);
    let reversed: String = input.to_ascii_uppercase().chars().rev().collect();
    let want = format!(r#"{{"result":"{reversed}","bytes":{}}}"#, input.len());
    assert!(r.text() == want, "the answer differs");

    let too_big = vec![b'a'; 16 * 1024 * 1024 + 1];
    let r = request(addr, "POST", "/hello", &too_big, false);
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains("16777216 bytes"), "{}", r.text());

    let page = get(addr, "/metrics").text();
    let sample = |copy: &str, process: &str| -> u64 {
        let series = format!(
            r#"spindle_payload_bytes_copied_total{{chain="hello",copy="{copy}",process="{process}"}} "#
        );
        page.lines()
            .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{page}"))
    };
    let n = input.len() as u64;
    for f in ["uppercase", "reverse", "frame"] {
        assert_eq!(sample("function_input", f), n, "{f}");
    }
    for f in ["uppercase", "reverse"] {
        assert_eq!(sample("function_output", f), n, "{f}");
    }
    assert_eq!(sample("function_output", "frame"), want.len() as u64);
    // hyper reads at most ~400 KiB per frame, so a 2 MiB body never arrives as one: each
    // collection (the ingress's of the client's body and of each reply, each function
    // server's of its delivery) copies all of it, once.
    assert_eq!(sample("request_body", "ingress"), n);
    assert_eq!(sample("reply_body", "ingress"), 2 * n + want.len() as u64);
    for f in ["uppercase", "reverse", "frame"] {
        assert_eq!(sample("request_body", f), n, "{f}");
    }
    assert!(!page.contains("pods not counted"), "{page}");
}
