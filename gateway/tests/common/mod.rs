//! Test harness: builds the example modules, starts the real `spindle` binary on a config,
//! and talks HTTP to it with hyper's client.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub use testkit::{build_examples, repo_root};

pub mod dashboard;

pub fn wasm(name: &str) -> String {
    testkit::wasm(name).display().to_string()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Spindle {
    pub child: Child,
    pub addr: String,
    pub dir: PathBuf,
    pub client: Client<HttpConnector, Full<Bytes>>,
}

pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spindle-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Spindle {
    /// Writes `yaml` (with `{wasm:NAME}` replaced by module paths) to a temp dir, starts
    /// `spindle run` on it and waits for /readyz.
    pub async fn start(tag: &str, yaml: &str) -> Spindle {
        Self::start_with(tag, yaml, &[]).await
    }

    pub async fn start_with(tag: &str, yaml: &str, extra_args: &[&str]) -> Spindle {
        let dir = temp_dir(tag);
        let mut text = yaml.to_string();
        while let Some(start) = text.find("{wasm:") {
            let end = start + text[start..].find('}').unwrap();
            let name = text[start + 6..end].to_string();
            text.replace_range(start..=end, &wasm(&name));
        }
        let config = dir.join("spindle.yaml");
        std::fs::write(&config, text).unwrap();
        Self::launch(dir, &config, extra_args).await
    }

    /// Starts spindle on a config file of the repository (e.g. `configs/pipeline.yaml`).
    pub async fn start_file(tag: &str, config: &str) -> Spindle {
        Self::launch(temp_dir(tag), &repo_root().join(config), &[]).await
    }

    async fn launch(dir: PathBuf, config: &Path, extra_args: &[&str]) -> Spindle {
        build_examples();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join("spindle.log")).unwrap();
        // The suite runs once per dataplane: scripts/test.sh sets this for the sockmap pass.
        let mut dataplane = vec!["--dataplane".to_string()];
        dataplane
            .push(std::env::var("SPINDLE_TEST_DATAPLANE").unwrap_or_else(|_| "userspace".into()));
        if extra_args.contains(&"--dataplane") {
            dataplane.clear();
        }
        let child = Command::new(env!("CARGO_BIN_EXE_spindle"))
            .arg("run")
            .arg(config)
            .args(["--listen", &addr])
            .args(&dataplane)
            .args(extra_args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(64)
            .build_http();
        let mut spindle = Spindle {
            child,
            addr,
            dir,
            client,
        };
        spindle.wait_ready(Duration::from_secs(180)).await;
        spindle
    }

    /// The gateway's pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("spindle.log")).unwrap_or_default()
    }

    pub async fn wait_ready(&mut self, limit: Duration) {
        let began = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("spindle exited during start-up ({status}):\n{}", self.log());
            }
            if let Ok(r) = self.try_request("GET", "/readyz", Vec::new()).await
                && r.status == 200
            {
                return;
            }
            assert!(
                began.elapsed() < limit,
                "spindle not ready after {limit:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Reply, String> {
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap_or("").to_string())
            .unwrap_or_default();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes()
            .to_vec();
        Ok(Reply {
            status,
            content_type,
            body,
        })
    }

    pub async fn post(&self, path: &str, body: impl Into<Vec<u8>>) -> Reply {
        self.try_request("POST", path, body.into())
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}\n{}", self.log()))
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.try_request("GET", path, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// The value of one sample of /metrics, e.g. `spindle_arena_slots{chain="hello",state="free"}`.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let page = self.get("/metrics").await.text();
        page.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
    }

    /// PIDs of the worker processes running `function` (exec'd or forked by its zygote).
    pub fn worker_pids(&self, function: &str) -> Vec<i32> {
        self.children_of(function, false)
    }

    /// PIDs of `function`'s zygote (one, or none while it restarts or when it starts by exec).
    pub fn zygote_pids(&self, function: &str) -> Vec<i32> {
        self.children_of(function, true)
    }

    fn children_of(&self, function: &str, zygotes: bool) -> Vec<i32> {
        let gateway = self.child.id() as i32;
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // A forked worker shares its zygote's command line, not its name.
            let is_zygote = stat.contains("(spindle-zygote)");
            if is_zygote != zygotes {
                continue;
            }
            let after_comm = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
            let ppid: i32 = after_comm
                .split(' ')
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            if ppid != gateway {
                continue;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            if args
                .windows(2)
                .any(|w| w[0] == b"--function" && w[1] == function.as_bytes())
            {
                pids.push(pid);
            }
        }
        pids
    }

    /// SIGTERM and wait: the gateway must stop its workers and exit cleanly.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let began = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if began.elapsed() > Duration::from_secs(15) {
                let _ = self.child.kill();
                panic!(
                    "spindle did not exit within 15 s of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Spindle {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A reactor that sleeps `ms` in WASI `poll_oneoff` and echoes the body: I/O-bound, so load
/// builds concurrency (and more instances really serve more) without needing many cores.
pub fn sleeper_wat(ms: u64) -> String {
    format!(
        r#"(module
  (import "spindle" "output" (func $out (param i32 i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "spindle_alloc") (param i32) (result i32) (i32.const 4096))
  (func (export "spindle_handle") (param $p i32) (param $n i32) (result i32)
    ;; One relative clock subscription on CLOCK_MONOTONIC at 64, its event at 128.
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

/// Two network namespaces joined by a veth pair on a /30 of 10.`net`.0.0/16; deleted on
/// drop, even when the test fails. Each test binary that uses it picks its own `net`, since
/// test binaries may run at once.
pub struct NodePair {
    pub a: String,
    pub b: String,
    pub a_ip: String,
    pub b_ip: String,
    /// The veth ends: `a_dev` in namespace `a`, `b_dev` in `b`.
    pub a_dev: String,
    pub b_dev: String,
}

static NEXT_SUBNET: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

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

impl NodePair {
    /// None (and the test says why, or fails under CI) without root. `tag` (3 letters) names
    /// the namespaces and interfaces.
    pub fn create(test: &str, tag: &str, net: u8) -> Option<NodePair> {
        if !testkit::require_root(test, "network namespaces and userfaultfd") {
            return None;
        }
        let n = NEXT_SUBNET.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id());
        let (va, vb) = (format!("{tag}a{id}"), format!("{tag}b{id}"));
        // Interface names are at most 15 bytes.
        let (va, vb) = (&va[..va.len().min(15)], &vb[..vb.len().min(15)]);
        let pair = NodePair {
            a: format!("{tag}-a-{id}"),
            b: format!("{tag}-b-{id}"),
            a_ip: format!("10.{net}.{n}.1"),
            b_ip: format!("10.{net}.{n}.2"),
            a_dev: va.to_string(),
            b_dev: vb.to_string(),
        };
        ip(&["netns", "add", &pair.a]);
        // From here on, Drop deletes what exists.
        ip(&["netns", "add", &pair.b]);
        ip(&["link", "add", va, "type", "veth", "peer", "name", vb]);
        ip(&["link", "set", va, "netns", &pair.a]);
        ip(&["link", "set", vb, "netns", &pair.b]);
        for (ns, dev, addr) in [(&pair.a, va, &pair.a_ip), (&pair.b, vb, &pair.b_ip)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        Some(pair)
    }

    /// The spindle binary, run inside namespace `ns`.
    pub fn spindle_in(ns: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_spindle")]);
        c
    }
}

impl Drop for NodePair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
