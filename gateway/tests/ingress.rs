//! The `ingress:` programs through the real binary: the guard on a veth in the gateway's
//! own namespace (what it passes, drops and throttles, counted in /metrics, and nothing left
//! attached after SIGKILL), a guard refused without privileges, the node's fast path in a
//! routed three-namespace topology, and steered front shards. Root in CI; every namespace is
//! the test's own, and all traffic goes to addresses the test made.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{NodePair, Spindle, temp_dir, wasm};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const HELLO: &str = r#"
functions:
  - { name: uppercase, module: "{wasm:uppercase}" }
  - { name: reverse, module: "{wasm:reverse}" }
  - { name: frame, module: "{wasm:frame}" }
chains:
  - { name: hello, route: /hello, steps: [uppercase, reverse, frame], content_type: application/json }
"#;

fn hello_config(dir: &Path, head: &str) -> PathBuf {
    common::build_examples();
    let mut text = format!("{head}{HELLO}");
    for name in ["uppercase", "reverse", "frame"] {
        text = text.replace(&format!("{{wasm:{name}}}"), &wasm(name));
    }
    let path = dir.join("spindle.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
            // SAFETY: `file` is an open namespace file for the whole call; setns moves only
            // this scoped thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    })
}

/// One HTTP/1.1 exchange on `stream` (kept open): (status, body).
fn exchange(stream: &mut TcpStream, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "connection closed mid-response: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let headers = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        let length: usize = headers
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        if got.len() >= end + 4 + length {
            let status = headers[9..12].parse().unwrap();
            return (status, got[end + 4..end + 4 + length].to_vec());
        }
    }
}

/// One request on a fresh connection.
fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    Some(exchange(&mut s, method, path, body))
}

fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{page}"))
}

/// `spindle run` in a namespace; SIGKILLed on drop if still running.
struct Gateway {
    child: Child,
    log: PathBuf,
}

impl Gateway {
    fn start(ns: &str, config: &Path) -> Gateway {
        let log = config.with_file_name("spindle.log");
        let child = NodePair::spindle_in(ns)
            .arg("run")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Gateway { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for /readyz from inside `ns`, one fresh connection every 100 ms.
    fn wait_ready(&mut self, ns: &str, addr: SocketAddr) {
        let began = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "spindle exited ({status}) before it was ready:\n{}",
                    self.log()
                );
            }
            if in_ns(ns, || request(addr, "GET", "/readyz", b"")).is_some_and(|(s, _)| s == 200) {
                return;
            }
            assert!(
                began.elapsed() < Duration::from_secs(120),
                "not ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn sigkill(&mut self) {
        // `ip netns exec` execs spindle: this pid is spindle's.
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// Spindle's programs left on the TC ingress of `dev` in namespace `ns`.
fn left_on(ns: &str, dev: &str) -> Vec<xdp_bpf::Attached> {
    in_ns(ns, || {
        let index = xdp_bpf::hook::ifindex(dev).unwrap();
        xdp_bpf::hook::attached(index, xdp_bpf::Hook::TcIngress).unwrap()
    })
}

/// From its own namespace a client reaches the service, is refused everything else (each
/// refused packet counted under its reason), is throttled past its rate of new connections
/// while its open connection keeps working, and after SIGKILL the veth has no program left.
#[test]
fn the_guard_passes_the_service_drops_the_rest_and_throttles_new_connections() {
    let Some(pair) = NodePair::create(
        "the_guard_passes_the_service_drops_the_rest_and_throttles_new_connections",
        "ig",
        61,
    ) else {
        return;
    };
    let dir = temp_dir("ingress-guard");
    let addr: SocketAddr = format!("{}:8080", pair.b_ip).parse().unwrap();
    let config = hello_config(
        &dir,
        &format!(
            "listen: {addr}\nsandbox: {{ enabled: false }}\ningress:\n  guard: {{ interface: {}, syn_rate: 10, syn_burst: 10 }}\n",
            pair.b_dev
        ),
    );
    let mut gateway = Gateway::start(&pair.b, &config);
    gateway.wait_ready(&pair.a, addr);
    assert!(
        gateway.log().contains("ingress guard attached"),
        "{}",
        gateway.log()
    );
    // Out of the burst the readiness probes used.
    std::thread::sleep(Duration::from_millis(1100));

    let (a, b_ip) = (pair.a.clone(), pair.b_ip.clone());
    in_ns(&a, || {
        let mut kept = TcpStream::connect(addr).unwrap();
        let (status, body) = exchange(&mut kept, "POST", "/hello", b"hello spindle");
        assert_eq!(
            (status, body.as_slice()),
            (200, &br#"{"result":"ELDNIPS OLLEH","bytes":13}"#[..])
        );
        let scrape = |kept: &mut TcpStream| {
            let (status, page) = exchange(kept, "GET", "/metrics", b"");
            assert_eq!(status, 200);
            String::from_utf8(page).unwrap()
        };
        let dev = pair.b_dev.clone();
        let series = |reason: &str, verdict: &str| {
            format!(
                "spindle_ingress_guard_packets_total{{hook=\"tc\",interface=\"{dev}\",reason=\"{reason}\",verdict=\"{verdict}\"}}"
            )
        };

        // UDP to a port nothing serves, and new connections to one: dropped, each counted.
        let before = scrape(&mut kept);
        let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
        for i in 0..40u8 {
            udp.send_to(&[i; 64], format!("{b_ip}:9999")).unwrap();
        }
        let closed: SocketAddr = format!("{b_ip}:2222").parse().unwrap();
        for _ in 0..3 {
            // Dropped, not refused: no RST comes back, the attempt times out.
            let e = TcpStream::connect_timeout(&closed, Duration::from_millis(300)).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        }
        std::thread::sleep(Duration::from_millis(100));
        let after = scrape(&mut kept);
        let dropped =
            metric(&after, &series("port", "drop")) - metric(&before, &series("port", "drop"));
        assert_eq!(
            dropped, 43.0,
            "40 datagrams and 3 SYNs to ports nothing serves"
        );

        // New connections past the source's rate are dropped; each failed attempt is one.
        let before = scrape(&mut kept);
        let (mut admitted, mut refused) = (0, 0);
        for _ in 0..40 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(150)) {
                Ok(_) => admitted += 1,
                Err(_) => refused += 1,
            }
        }
        let after = scrape(&mut kept);
        assert!(
            admitted >= 10 && refused >= 10,
            "admitted {admitted}, refused {refused}"
        );
        let throttled = metric(&after, &series("throttled", "drop"))
            - metric(&before, &series("throttled", "drop"));
        assert_eq!(
            throttled,
            f64::from(refused),
            "every refused attempt was one throttled SYN"
        );
        let by_source = metric(
            &after,
            &format!(
                "spindle_ingress_guard_throttled_by_source_total{{interface=\"{dev}\",source=\"{}\"}}",
                pair.a_ip
            ),
        );
        assert_eq!(by_source, metric(&after, &series("throttled", "drop")));
        // The open connection was never at risk.
        let (status, _) = exchange(&mut kept, "POST", "/hello", b"still here");
        assert_eq!(status, 200);
        // The dashboard's rows for what this gateway runs: the (eBPF, as root) dataplane and
        // the guard, which has refused a source by now.
        common::dashboard::assert_rows_have_samples(
            &["Dataplane", "Ingress guard"],
            &[scrape(&mut kept)],
        );
    });

    let dev = pair.b_dev.clone();
    assert_eq!(
        left_on(&pair.b, &dev).len(),
        1,
        "the guard is attached while spindle runs"
    );
    gateway.sigkill();
    let began = Instant::now();
    while !left_on(&pair.b, &dev).is_empty() {
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "the guard outlived its gateway"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Without CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN the gateway refuses to start, saying which part of the
/// configuration needed what, instead of serving unguarded.
#[test]
fn a_guard_without_privileges_stops_the_start_with_a_clear_message() {
    if !testkit::require_root(
        "a_guard_without_privileges_stops_the_start_with_a_clear_message",
        "dropping capabilities with setpriv",
    ) {
        return;
    }
    let dir = temp_dir("ingress-nopriv");
    let config = hello_config(
        &dir,
        "listen: 127.0.0.1:0\nsandbox: { enabled: false }\ningress:\n  guard: { interface: lo }\n",
    );
    let out = Command::new("setpriv")
        .args([
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--bounding-set=-all",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_spindle"))
        .arg("run")
        .arg(&config)
        .output()
        .expect("setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started without privileges:\n{stderr}"
    );
    assert!(
        stderr.contains("ingress.guard on lo")
            && stderr.contains("needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN, or root"),
        "{stderr}"
    );
}

/// client ns -> node ns (routes, like a Kubernetes host) -> gateway ns (like a pod), the
/// gateway holding the node's fast path by `ingress.fast_path.netns`: requests are answered,
/// the program redirects their packets, and the node's forwarding counter stays still.
#[test]
fn the_fast_path_from_the_config_carries_requests_past_the_nodes_forwarding() {
    if !testkit::require_root(
        "the_fast_path_from_the_config_carries_requests_past_the_nodes_forwarding",
        "network namespaces and eBPF",
    ) {
        return;
    }
    let routed = Routed::create();
    let dir = temp_dir("ingress-fast");
    let addr: SocketAddr = format!("{}:8080", routed.gateway_ip).parse().unwrap();
    let config = hello_config(
        &dir,
        &format!(
            "listen: {addr}\nsandbox: {{ enabled: false }}\ningress:\n  fast_path: {{ interfaces: [{}, {}], netns: /run/netns/{} }}\n",
            routed.node_to_client, routed.node_to_gateway, routed.node
        ),
    );
    let mut gateway = Gateway::start(&routed.gateway, &config);
    gateway.wait_ready(&routed.client, addr);
    let before = routed.forwarded();
    let page = in_ns(&routed.client, || {
        let mut kept = TcpStream::connect(addr).unwrap();
        for i in 0..30 {
            let (status, _) = exchange(&mut kept, "POST", "/hello", format!("req {i}").as_bytes());
            assert_eq!(status, 200);
        }
        let (_, page) = exchange(&mut kept, "GET", "/metrics", b"");
        String::from_utf8(page).unwrap()
    });
    let bypassed = routed.forwarded() - before;
    let redirected = metric(
        &page,
        "spindle_ingress_fast_path_packets_total{outcome=\"redirected\"}",
    );
    assert!(redirected >= 60.0, "redirected {redirected}:\n{page}");
    common::dashboard::assert_rows_have_samples(&["Node fast path"], std::slice::from_ref(&page));
    assert!(bypassed <= 4, "the node still forwarded {bypassed} packets");
    gateway.sigkill();
    for dev in [&routed.node_to_client, &routed.node_to_gateway] {
        let began = Instant::now();
        while !left_on(&routed.node, dev).is_empty() {
            assert!(
                began.elapsed() < Duration::from_secs(5),
                "the fast path outlived its gateway"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Three namespaces, routed through the middle one; deleted on drop.
struct Routed {
    client: String,
    node: String,
    gateway: String,
    node_to_client: String,
    node_to_gateway: String,
    gateway_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Routed {
    fn create() -> Routed {
        let id = std::process::id();
        let r = Routed {
            client: format!("igc-{id}"),
            node: format!("ign-{id}"),
            gateway: format!("igg-{id}"),
            node_to_client: "igfc1".into(),
            node_to_gateway: "igfg1".into(),
            gateway_ip: "10.62.2.2".into(),
        };
        for ns in [&r.client, &r.node, &r.gateway] {
            ip(&["netns", "add", ns]);
        }
        ip(&[
            "link",
            "add",
            "igfc0",
            "netns",
            &r.client,
            "type",
            "veth",
            "peer",
            "name",
            &r.node_to_client,
            "netns",
            &r.node,
        ]);
        ip(&[
            "link",
            "add",
            "igfg0",
            "netns",
            &r.gateway,
            "type",
            "veth",
            "peer",
            "name",
            &r.node_to_gateway,
            "netns",
            &r.node,
        ]);
        for (ns, dev, addr) in [
            (&r.client, "igfc0", "10.62.1.2/24"),
            (&r.node, r.node_to_client.as_str(), "10.62.1.1/24"),
            (&r.node, r.node_to_gateway.as_str(), "10.62.2.1/24"),
            (&r.gateway, "igfg0", "10.62.2.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&[
            "-n",
            &r.client,
            "route",
            "add",
            "default",
            "via",
            "10.62.1.1",
        ]);
        ip(&[
            "-n",
            &r.gateway,
            "route",
            "add",
            "default",
            "via",
            "10.62.2.1",
        ]);
        let ok = Command::new("ip")
            .args([
                "netns",
                "exec",
                &r.node,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        r
    }

    /// The node's IP ForwDatagrams counter.
    fn forwarded(&self) -> u64 {
        in_ns(&self.node, testkit::forwarded_datagrams)
    }
}

impl Drop for Routed {
    fn drop(&mut self) {
        for ns in [&self.client, &self.node, &self.gateway] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Two front shards under every steering mode answer every connection; with the eBPF
/// modes, the program's per-shard counts add up to exactly the connections made.
#[tokio::test(flavor = "multi_thread")]
async fn steered_shards_answer_every_connection_and_count_it() {
    if !testkit::require_root(
        "steered_shards_answer_every_connection_and_count_it",
        "eBPF",
    ) {
        return;
    }
    for mode in ["reuseport", "incoming_cpu", "cpu", "source_hash"] {
        let yaml = format!("http: {{ shards: 2 }}\ningress: {{ steering: {mode} }}\n{HELLO}");
        let spindle = Spindle::start(&format!("steer-{mode}"), &yaml).await;
        assert!(
            spindle.log().contains(&format!("steering=\"{mode}\"")),
            "{}",
            spindle.log()
        );
        let addr: SocketAddr = spindle.addr.parse().unwrap();
        let steered = |page: &str| -> f64 {
            (0..2)
                .map(|shard| {
                    metric(
                        page,
                        &format!(
                            "spindle_ingress_steered_connections_total{{mode=\"{mode}\",shard=\"{shard}\"}}"
                        ),
                    )
                })
                .sum()
        };
        let program = matches!(mode, "cpu" | "source_hash");
        let before = spindle.get("/metrics").await.text();
        let answered = tokio::task::spawn_blocking(move || {
            (0..20)
                .filter(|i| {
                    request(addr, "POST", "/hello", format!("n{i}").as_bytes())
                        .is_some_and(|(s, _)| s == 200)
                })
                .count()
        })
        .await
        .unwrap();
        assert_eq!(answered, 20, "{mode}");
        let after = spindle.get("/metrics").await.text();
        if program {
            assert_eq!(steered(&after) - steered(&before), 20.0, "{mode}:\n{after}");
            common::dashboard::assert_rows_have_samples(
                &["Shard steering"],
                std::slice::from_ref(&after),
            );
            assert_eq!(
                metric(
                    &after,
                    &format!(
                        "spindle_ingress_steered_connections_total{{mode=\"{mode}\",shard=\"fallback\"}}"
                    )
                ),
                0.0
            );
        } else {
            assert!(!after.contains("spindle_ingress_steered_connections_total"));
        }
    }
}

/// `ingress.local_redirect: true`: a same-host client's requests are answered exactly as over
/// TCP, and the counters show both ends in the socket hash and messages handed across.
#[tokio::test(flavor = "multi_thread")]
async fn same_host_clients_are_answered_socket_to_socket() {
    if !testkit::require_root("same_host_clients_are_answered_socket_to_socket", "eBPF") {
        return;
    }
    let yaml = format!("ingress: {{ local_redirect: true }}\n{HELLO}");
    let spindle = Spindle::start("local-redirect", &yaml).await;
    assert!(
        spindle.log().contains("socket to socket"),
        "{}",
        spindle.log()
    );
    let addr: SocketAddr = spindle.addr.parse().unwrap();
    let answers = tokio::task::spawn_blocking(move || {
        let mut kept = TcpStream::connect(addr).unwrap();
        (0..50)
            .map(|i| {
                exchange(
                    &mut kept,
                    "POST",
                    "/hello",
                    format!("message {i}").as_bytes(),
                )
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (i, (status, body)) in answers.iter().enumerate() {
        let expected: String = format!("message {i}")
            .to_uppercase()
            .chars()
            .rev()
            .collect();
        assert_eq!(
            (*status, String::from_utf8_lossy(body).into_owned()),
            (
                200,
                format!(r#"{{"result":"{expected}","bytes":{}}}"#, expected.len())
            )
        );
    }
    let page = spindle.get("/metrics").await.text();
    let event = |e: &str| {
        metric(
            &page,
            &format!("spindle_ingress_local_redirect_total{{event=\"{e}\"}}"),
        )
    };
    assert!(event("sockets_added") >= 2.0, "{page}");
    // Both directions of every exchange but perhaps the first request.
    assert!(event("redirected") >= 99.0, "{page}");
    assert_eq!(event("add_failed"), 0.0);
    common::dashboard::assert_rows_have_samples(
        &["Same-host acceleration"],
        std::slice::from_ref(&page),
    );
    // The sock_ops program goes with its gateway, SIGKILL included.
    let cgroup = xdp_bpf::own_cgroup().unwrap();
    let ours = |names: Vec<String>| {
        names
            .iter()
            .filter(|n| n.starts_with("spindle_local"))
            .count()
    };
    let before = ours(xdp_bpf::hook::sock_ops_programs(&cgroup).unwrap());
    assert!(
        before >= 1,
        "the sock_ops program is attached while spindle runs"
    );
    let _ = kill(Pid::from_raw(spindle.pid()), Signal::SIGKILL);
    let began = Instant::now();
    while ours(xdp_bpf::hook::sock_ops_programs(&cgroup).unwrap()) >= before {
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "the sock_ops program outlived its gateway"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
