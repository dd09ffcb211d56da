//! Remote scale-out to a peer node, over real HTTP against the real binary: two gateways in
//! two network namespaces joined by a veth pair (as in tests/fork.rs), one config for both.
//! The origin is forced over its CPU budget (`--cpu-budget 0%`), so under load its
//! autoscaler keeps its one instance and asks the peer for the rest; the peer starts them
//! resumed from the origin's image, the origin forwards their share of requests whole to the
//! peer's gateway, and when the load stops the remote instances are retired and the image
//! revoked. Needs root for the namespaces and userfaultfd (CI is root).

mod common;

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Two namespaces and the veth between them; deleted on drop, even when the test fails.
struct Nodes {
    origin: String,
    peer: String,
    origin_ip: String,
    peer_ip: String,
}

static NEXT_SUBNET: AtomicU32 = AtomicU32::new(1);

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip (iproute2; scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Nodes {
    fn create(test: &str) -> Option<Nodes> {
        if !testkit::require_root(test, "network namespaces and userfaultfd") {
            return None;
        }
        // Not fork.rs's 10.250/16: the two test binaries may run at once.
        let n = NEXT_SUBNET.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}-{n}", std::process::id());
        let nodes = Nodes {
            origin: format!("spp-o-{tag}"),
            peer: format!("spp-p-{tag}"),
            origin_ip: format!("10.249.{n}.1"),
            peer_ip: format!("10.249.{n}.2"),
        };
        ip(&["netns", "add", &nodes.origin]);
        // From here on, Drop deletes what exists.
        ip(&["netns", "add", &nodes.peer]);
        let (vo, vp) = (format!("spo{tag}"), format!("spq{tag}"));
        // Interface names are at most 15 bytes.
        let (vo, vp) = (&vo[..vo.len().min(15)], &vp[..vp.len().min(15)]);
        ip(&["link", "add", vo, "type", "veth", "peer", "name", vp]);
        ip(&["link", "set", vo, "netns", &nodes.origin]);
        ip(&["link", "set", vp, "netns", &nodes.peer]);
        for (ns, dev, addr) in [
            (&nodes.origin, vo, &nodes.origin_ip),
            (&nodes.peer, vp, &nodes.peer_ip),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        Some(nodes)
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for ns in [&self.origin, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A reactor that sleeps `ms` in WASI `poll_oneoff` and echoes the body: I/O-bound, so load
/// builds concurrency (and the autoscaler's count) without needing many cores.
fn sleeper_wat(ms: u64) -> String {
    format!(
        r#"(module
  (import "spindle" "output" (func $out (param i32 i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "spindle_alloc") (param i32) (result i32) (i32.const 4096))
  (func (export "spindle_handle") (param $p i32) (param $n i32) (result i32)
    (i64.store (i32.const 64) (i64.const 0))
    (i64.store (i32.const 72) (i64.const 0))
    (i64.store (i32.const 80) (i64.const 1))
    (i64.store (i32.const 88) (i64.const {ns}))
    (i64.store (i32.const 96) (i64.const 0))
    (i64.store (i32.const 104) (i64.const 0))
    (drop (call $poll (i32.const 64) (i32.const 128) (i32.const 1) (i32.const 192)))
    (call $out (local.get $p) (local.get $n))
    (i32.const 0)))"#,
        ns = ms * 1_000_000
    )
}

/// The one config both nodes run (a deployment ships the same file to every node); what
/// differs per node comes as flags.
fn config(dir: &Path) -> PathBuf {
    let module = dir.join("sleeper.wat");
    std::fs::write(&module, sleeper_wat(20)).unwrap();
    let key = dir.join("cluster.key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef-test-cluster-key\n").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let yaml = format!(
        "functions:\n\
         \x20 - name: sleeper\n\
         \x20   module: {}\n\
         \x20   instances: {{ min: 1, max: 8, target: 1, stable_window_ms: 1000, panic_window_ms: 200, scale_down_delay_ms: 500 }}\n\
         chains:\n\
         \x20 - {{ name: echo, route: /echo, steps: [sleeper], timeout_ms: 5000 }}\n\
         node:\n\
         \x20 memory_budget: 100%\n\
         \x20 cluster_key: cluster.key\n",
        module.display()
    );
    let path = dir.join("spindle.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// A `spindle run` inside a namespace; SIGTERM and reaped on drop.
struct Gateway {
    process: Child,
    log: PathBuf,
}

impl Gateway {
    fn start(ns: &str, config: &Path, name: &str, args: &[String]) -> Gateway {
        let log = config.with_file_name(format!("{name}.log"));
        let process = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_spindle"), "run"])
            .arg(config)
            .args(["--dataplane", "userspace", "--node-name", name])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Gateway { process, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // `ip netns exec` execs the command: this pid is spindle's.
        let _ = kill(Pid::from_raw(self.process.id() as i32), Signal::SIGTERM);
        let _ = self.process.wait();
    }
}

/// Moves the calling thread into network namespace `ns`: every socket it opens from now on
/// is that node's.
fn enter_netns(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    // SAFETY: `f` is an open namespace file for the whole call; setns changes only the
    // calling thread's network namespace (this test thread, which runs its own runtime).
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

type Http = Client<HttpConnector, Full<Bytes>>;

/// (status, body, header `spindle-forwarded-to`) of one request; status 0 when it failed.
async fn request(
    client: &Http,
    method: &str,
    url: &str,
    body: &str,
) -> (u16, String, Option<String>) {
    let req = hyper::Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(10), client.request(req)).await
    else {
        return (0, String::new(), None);
    };
    let status = resp.status().as_u16();
    let to = resp
        .headers()
        .get("spindle-forwarded-to")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    (status, String::from_utf8_lossy(&body).into_owned(), to)
}

/// The sum of every sample of `prefix` (a metric name with the start of its labels).
async fn metric(client: &Http, base: &str, prefix: &str) -> f64 {
    let (_, page, _) = request(client, "GET", &format!("{base}/metrics"), "").await;
    page.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

async fn eventually(what: &str, limit: Duration, mut probe: impl AsyncFnMut() -> bool) -> bool {
    let began = Instant::now();
    while began.elapsed() < limit {
        if probe().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("not within {limit:?}: {what}");
    false
}

#[test]
fn remote_scale_out_to_a_peer_namespace() {
    let Some(nodes) = Nodes::create("remote_scale_out_to_a_peer_namespace") else {
        return;
    };
    let dir = common::temp_dir("peers-scale-out");
    let config = config(&dir);
    let admin = dir.join("admin.sock");
    let peer = Gateway::start(
        &nodes.peer,
        &config,
        "node-b",
        &[
            format!("--listen={}:8080", nodes.peer_ip),
            format!("--peer-listen={}:7070", nodes.peer_ip),
            // The test machine's own load must not make the peer refuse.
            "--cpu-budget=100%".into(),
        ],
    );
    let origin = Gateway::start(
        &nodes.origin,
        &config,
        "node-a",
        &[
            "--listen=127.0.0.1:8080".into(),
            format!("--serve-images={}:0", nodes.origin_ip),
            format!("--admin={}", admin.display()),
            format!(
                "--peer=node-b={}:8080,{}:7070",
                nodes.peer_ip, nodes.peer_ip
            ),
            // Forced over budget: every scale-up beyond its instance goes to the peer.
            "--cpu-budget=0%".into(),
        ],
    );
    let origin_ns = nodes.origin.clone();
    let peer_base = format!("http://{}:8080", nodes.peer_ip);
    // The whole conversation happens from inside the origin node: its gateway on its
    // loopback, the peer's over the veth.
    let outcome = std::thread::spawn(move || {
        enter_netns(&origin_ns);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(scenario(&peer_base))
    })
    .join();
    let (origin_log, peer_log) = (origin.log(), peer.log());
    drop((origin, peer));
    if let Err(panic) = outcome {
        eprintln!("--- origin log ---\n{origin_log}\n--- peer log ---\n{peer_log}");
        std::panic::resume_unwind(panic);
    }
    drop(nodes);
}

async fn scenario(peer: &str) {
    let origin = "http://127.0.0.1:8080";
    let client: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http();
    for (base, name) in [(origin, "origin"), (peer, "peer")] {
        assert!(
            eventually(
                &format!("the {name} gateway is ready"),
                Duration::from_secs(20),
                async || {
                    request(&client, "GET", &format!("{base}/readyz"), "")
                        .await
                        .0
                        == 200
                }
            )
            .await,
            "the {name} gateway never got ready"
        );
    }

    // Load: 16 closed-loop clients for 5 s, each checking every answer is its own body.
    let until = Instant::now() + Duration::from_secs(5);
    let mut tasks = Vec::new();
    for c in 0..16 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen: HashMap<(u16, bool), usize> = HashMap::new();
            let mut i = 0;
            while Instant::now() < until {
                let body = format!("client {c} request {i}");
                let (status, answer, to) =
                    request(&client, "POST", &format!("{origin}/echo"), &body).await;
                if status == 200 {
                    assert_eq!(answer, body, "a wrong answer (forwarded: {to:?})");
                }
                if let Some(to) = &to {
                    assert_eq!(to, "node-b");
                }
                *seen.entry((status, to.is_some())).or_default() += 1;
                i += 1;
            }
            seen
        }));
    }
    let mut seen: HashMap<(u16, bool), usize> = HashMap::new();
    let mut peak_remote = 0.0f64;
    let mut peak_resumed = 0.0f64;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak_remote = peak_remote.max(
            metric(&client, origin, "spindle_remote_instances{chain=\"echo\",function=\"sleeper\",peer=\"node-b\",state=\"ready\"}").await,
        );
        peak_resumed = peak_resumed.max(
            metric(
                &client,
                peer,
                "spindle_fork_child_resumes_total{chain=\"echo\",function=\"sleeper\"",
            )
            .await,
        );
    }
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *seen.entry(k).or_default() += v;
        }
    }
    let forwarded_ok: usize = seen.get(&(200, true)).copied().unwrap_or(0);
    let local_ok: usize = seen.get(&(200, false)).copied().unwrap_or(0);
    let total: usize = seen.values().sum();
    eprintln!("answers {seen:?}; peak remote ready {peak_remote}; peak resumed {peak_resumed}");
    assert_eq!(
        forwarded_ok + local_ok,
        total,
        "every request answered 200: {seen:?}"
    );
    assert!(
        peak_remote >= 2.0,
        "the peer ran at least two instances for the origin"
    );
    assert!(
        peak_resumed >= 2.0,
        "the peer's instances resumed from the origin's image"
    );
    assert!(
        forwarded_ok >= total / 4 && local_ok > 0,
        "both nodes served a share: {seen:?}"
    );
    // The counter counts exactly the forwards the clients saw.
    let counted = metric(
        &client,
        origin,
        "spindle_requests_forwarded_total{chain=\"echo\",outcome=\"ok\",peer=\"node-b\"}",
    )
    .await;
    assert_eq!(counted as usize, forwarded_ok);
    let failed = metric(
        &client,
        origin,
        "spindle_requests_forwarded_total{chain=\"echo\",outcome=\"",
    )
    .await
        - counted;
    assert_eq!(failed, 0.0, "no forward failed");
    assert!(
        metric(
            &client,
            origin,
            "spindle_node_over_budget{resource=\"cpu\"}"
        )
        .await
            == 1.0
    );
    // Starts on the peer were by exec from the image (its own instance forked from its zygote).
    assert!(
        metric(
            &client,
            peer,
            "spindle_instance_starts_total{chain=\"echo\",function=\"sleeper\",mode=\"exec\"}"
        )
        .await
            >= 2.0
    );

    // Load stopped: the remote instances are retired and the image revoked.
    assert!(
        eventually("the peer retires the remote instances", Duration::from_secs(10), async || {
            metric(&client, peer, "spindle_instances_up{chain=\"echo\",function=\"sleeper\"}").await == 1.0
                && metric(&client, peer, "spindle_peer_grants{").await == 0.0
                && metric(&client, origin, "spindle_remote_instances{chain=\"echo\",function=\"sleeper\",peer=\"node-b\",state=\"granted\"}").await == 0.0
        })
        .await,
        "the remote instances were not retired"
    );
    assert!(
        eventually(
            "the origin revokes its image",
            Duration::from_secs(5),
            async || {
                metric(&client, origin, "spindle_fork_revocations_total").await >= 1.0
                    && metric(&client, origin, "spindle_fork_images_live").await == 0.0
            }
        )
        .await,
        "the image was not revoked"
    );
    // Served after scale-down: locally, by the origin's own instance.
    let (status, answer, to) = request(&client, "POST", &format!("{origin}/echo"), "after").await;
    assert_eq!((status, answer.as_str(), to), (200, "after", None));
}
