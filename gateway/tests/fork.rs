//! Remote fork between two "nodes": network namespaces joined by a veth pair, each running
//! its own `spindle` process. `spindle fork serve` prepares an image of a warm instance in
//! one; `spindle fork resume` starts a child from its descriptor in the other, fetching pages
//! over the veth on first touch. Needs root for the namespaces and userfaultfd (CI is root).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use proto::ImageDescriptor;
use serde_json::Value;

/// The parent node (serves images) and the child node (resumes them).
struct Nodes {
    parent: String,
    child: String,
    parent_ip: String,
    /// Deletes both namespaces when dropped.
    _pair: common::NodePair,
}

impl Nodes {
    fn create(test: &str) -> Option<Nodes> {
        let pair = common::NodePair::create(test, "spf", 250)?;
        Some(Nodes {
            parent: pair.a.clone(),
            child: pair.b.clone(),
            parent_ip: pair.a_ip.clone(),
            _pair: pair,
        })
    }

    fn command(&self, ns: &str) -> Command {
        common::NodePair::spindle_in(ns)
    }
}

/// `spindle run` in the child node with `function` resumed from `descriptor`, serving HTTP
/// on the child's loopback.
struct ChildGateway {
    process: Child,
    port: u16,
    ns: String,
}

impl ChildGateway {
    fn start(nodes: &Nodes, config: &Path, function: &str, descriptor: &str, port: u16) -> Self {
        let process = nodes
            .command(&nodes.child)
            .arg("run")
            .arg(config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--dataplane", "userspace"])
            .args(["--resume", &format!("{function}={descriptor}")])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let gw = ChildGateway {
            process,
            port,
            ns: nodes.child.clone(),
        };
        let started = std::time::Instant::now();
        while gw.curl(&["/readyz"]).0 != 200 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the child node's gateway never got ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        gw
    }

    /// (status, body) of an HTTP request made inside the child node.
    fn curl(&self, args: &[&str]) -> (u16, String) {
        let (path, data) = (args[0], args.get(1));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "curl", "-s", "-m", "30"])
            .args(["-o", "-", "-w", "\n%{http_code}"]);
        if let Some(d) = data {
            cmd.args(["-d", d]);
        }
        cmd.arg(format!("http://127.0.0.1:{}{path}", self.port));
        let out = finish_within(cmd, RESUME_LIMIT);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }
}

impl Drop for ChildGateway {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.process.id() as i32), Signal::SIGTERM);
        let _ = self.process.wait();
    }
}

/// A config with the forkrand example, whose answer shows state from earlier requests
/// (`served`), whether it was forked (`forks`) and a random number reseeded on fork.
fn config(tag: &str) -> PathBuf {
    testkit::build_examples();
    let dir = common::temp_dir(tag);
    let path = dir.join("fork.yaml");
    let yaml = format!(
        "functions:\n  - {{ name: forkrand, module: \"{}\" }}\n  - {{ name: upper, module: \"{}\" }}\n\
         \x20 - {{ name: table1m, module: \"{}\" }}\n\
         chains:\n  - {{ name: rand, route: /rand, steps: [forkrand] }}\n  - {{ name: up, route: /up, steps: [upper] }}\n\
         \x20 - {{ name: table, route: /table, steps: [table1m] }}\n",
        common::wasm("forkrand"),
        common::wasm("uppercase"),
        common::wasm("table1m"),
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

/// `spindle fork serve` in the parent node, after three warm-up requests; its descriptor.
struct Parent {
    process: Child,
    stdout: BufReader<std::process::ChildStdout>,
    descriptor: String,
}

impl Parent {
    fn start(nodes: &Nodes, config: &Path) -> Parent {
        Parent::start_of(nodes, config, ("rand", "forkrand"))
    }

    fn start_of(nodes: &Nodes, config: &Path, (chain, function): (&str, &str)) -> Parent {
        let mut process = nodes
            .command(&nodes.parent)
            .args(["fork", "serve"])
            .arg(config)
            .args(["--chain", chain, "--function", function])
            .args(["--listen", &format!("{}:0", nodes.parent_ip)])
            .args(["--warm", "a", "--warm", "b", "--warm", "c"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(process.stdout.take().unwrap());
        let mut descriptor = String::new();
        stdout.read_line(&mut descriptor).unwrap();
        assert!(
            descriptor.starts_with("spindle-image:"),
            "fork serve printed {descriptor:?}"
        );
        Parent {
            process,
            stdout,
            descriptor: descriptor.trim_end().to_owned(),
        }
    }

    /// Stops the page server and returns the counters it printed.
    fn stop(mut self) -> Value {
        kill(Pid::from_raw(self.process.id() as i32), Signal::SIGTERM).unwrap();
        let mut line = String::new();
        // The server answers SIGTERM within its accept tick; a stuck one is killed by Drop
        // when the read below fails the test.
        self.stdout.read_line(&mut line).unwrap();
        assert!(self.process.wait().unwrap().success());
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }
}

impl Drop for Parent {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Runs a command to completion, killing it (and failing the test) if it outlives `limit`:
/// a child that hangs must show up as a failure, not as a stuck test run.
fn finish_within(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            panic!("{cmd:?} did not finish within {limit:?}");
        }
    }
}

const RESUME_LIMIT: Duration = Duration::from_secs(60);

fn resume_as(
    nodes: &Nodes,
    config: &Path,
    descriptor: &str,
    chain_function: (&str, &str),
    extra: &[&str],
) -> Output {
    let mut cmd = nodes.command(&nodes.child);
    cmd.args(["fork", "resume", descriptor, "--config"])
        .arg(config)
        .args(["--chain", chain_function.0, "--function", chain_function.1])
        .args(["--body", "x"])
        .args(extra);
    finish_within(cmd, RESUME_LIMIT)
}

fn resume(nodes: &Nodes, config: &Path, descriptor: &str, extra: &[&str]) -> Output {
    resume_as(nodes, config, descriptor, ("rand", "forkrand"), extra)
}

fn report(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "fork resume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn answer(report: &Value) -> Value {
    serde_json::from_str(report["output"].as_str().unwrap()).unwrap()
}

#[test]
fn remote_children_continue_the_parent_and_fetch_only_what_they_touch() {
    let Some(nodes) = Nodes::create("remote_children_continue_the_parent") else {
        return;
    };
    let config = config("fork-remote");
    let parent = Parent::start(&nodes, &config);

    let first = report(&resume(&nodes, &config, &parent.descriptor, &[]));
    let second = report(&resume(&nodes, &config, &parent.descriptor, &[]));
    for r in [&first, &second] {
        let a = answer(r);
        assert_eq!(
            a["served"], 4,
            "the parent served three requests first: {a}"
        );
        assert_eq!(a["forks"], 1, "spindle_on_fork ran once: {a}");
        // Readahead off: every copied page is one the guest touched, fetched once.
        assert_eq!(r["faults"], r["pages_copied"], "{r}");
        let copied = r["pages_copied"].as_u64().unwrap();
        assert_eq!(r["bytes_fetched"].as_u64().unwrap(), copied * 4096, "{r}");
        // Resident: what was copied plus the zero pages installed for touches of them.
        let installed = copied + r["zero_pages"].as_u64().unwrap();
        assert_eq!(r["resident_pages"].as_u64().unwrap(), installed, "{r}");
        // What /proc/self/smaps charges for the linear memory: the data pages copied in
        // (zero pages map the kernel's shared zero page). Allowance: none.
        assert_eq!(r["smaps_rss_pages"].as_u64().unwrap(), copied, "{r}");
        assert!(copied >= 1 && copied <= r["image_nonzero_pages"].as_u64().unwrap());
        assert!(
            installed < r["memory_pages"].as_u64().unwrap(),
            "not all of memory: {r}"
        );
    }
    assert_ne!(
        answer(&first)["random"],
        answer(&second)["random"],
        "each child reseeded its PRNG after the fork"
    );

    let eager = report(&resume(&nodes, &config, &parent.descriptor, &["--eager"]));
    assert_eq!(answer(&eager)["served"], 4);
    assert_eq!(
        eager["faults"], 0,
        "everything was in place before the call: {eager}"
    );
    assert_eq!(eager["pages_copied"], eager["image_nonzero_pages"]);

    let stats = parent.stop();
    assert_eq!(stats["handshakes_ok"], 3, "{stats}");
    let lazy_pages =
        first["pages_copied"].as_u64().unwrap() + second["pages_copied"].as_u64().unwrap();
    let served = stats["pages_served"].as_u64().unwrap();
    assert!(
        served >= lazy_pages + eager["pages_copied"].as_u64().unwrap(),
        "{stats}"
    );
    assert_eq!(stats["refusals"]["bad_proof"], 0);
}

#[test]
fn one_process_resumes_many_children_and_sums_them_consistently() {
    let Some(nodes) = Nodes::create("one_process_resumes_many_children") else {
        return;
    };
    let config = config("fork-many");
    let parent = Parent::start(&nodes, &config);

    let lazy = report(&resume(
        &nodes,
        &config,
        &parent.descriptor,
        &["--children", "3"],
    ));
    assert_eq!(lazy["children"], 3, "{lazy}");
    assert_eq!(lazy["mode"], "lazy");
    let answers: Vec<Value> = lazy["outputs_first"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| serde_json::from_str(o.as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(answers.len(), 3, "{lazy}");
    for a in &answers {
        assert_eq!(
            a["served"], 4,
            "each child continues the parent's three requests: {a}"
        );
        assert_eq!(a["forks"], 1, "{a}");
    }
    assert!(
        answers[0]["random"] != answers[1]["random"]
            || answers[1]["random"] != answers[2]["random"],
        "each child reseeded its PRNG: {answers:?}"
    );
    let bytes = lazy["bytes_fetched"].as_u64().unwrap();
    assert!(bytes > 0, "{lazy}");
    let per_fork = &lazy["per_fork"];
    assert_eq!(
        per_fork["bytes_fetched"].as_f64().unwrap(),
        bytes as f64 / 3.0
    );
    // Readahead off: each fault copies or zero-fills the one page touched.
    let faults = per_fork["faults"].as_f64().unwrap();
    let touched =
        per_fork["pages_copied"].as_f64().unwrap() + per_fork["zero_pages"].as_f64().unwrap();
    assert!(faults >= 1.0 && faults == touched, "{lazy}");
    assert_eq!(
        lazy["child_memory"]["pages_installed_per_child"]
            .as_f64()
            .unwrap(),
        touched
    );
    assert!(lazy["child_memory"]["held"].is_null(), "no --hold: {lazy}");
    assert!(lazy["forks_per_s"].as_f64().unwrap() > 0.0);
    assert!(per_fork["cpu_us"].as_f64().unwrap() > 0.0);
    let p50 = lazy["first_response_us"]["p50"].as_f64().unwrap();
    assert!(p50 > 0.0 && p50 <= lazy["first_response_us"]["p99"].as_f64().unwrap());
    // The cold instance beside them starts from scratch: its first request is its first.
    let cold: Value = serde_json::from_str(lazy["cold"]["output"].as_str().unwrap()).unwrap();
    assert_eq!(
        (cold["served"].as_u64(), cold["forks"].as_u64()),
        (Some(1), Some(0))
    );
    assert!(lazy["cold"]["resident_pages"].as_u64().unwrap() > 0);

    let held = report(&resume(
        &nodes,
        &config,
        &parent.descriptor,
        &["--children", "2", "--hold", "--eager"],
    ));
    assert_eq!(held["children"], 2, "{held}");
    assert_eq!(held["per_fork"]["faults"], 0.0, "eager: {held}");
    assert!(
        held["child_memory"]["held"]["private_dirty_kib_per_child"].is_number(),
        "{held}"
    );

    let stats = parent.stop();
    // One authenticated connection per child, none for the node itself.
    assert_eq!(stats["handshakes_ok"], 5, "{stats}");
}

#[test]
fn children_with_a_node_cache_fetch_each_page_once_and_prefetch_in_fault_order() {
    let Some(nodes) = Nodes::create("children_with_a_node_cache") else {
        return;
    };
    let config = config("fork-cache");
    let parent = Parent::start(&nodes, &config);
    let cache = common::temp_dir("fork-cache-file").join("page-cache");
    let _ = std::fs::remove_file(&cache);
    let cache_arg = cache.to_str().unwrap();

    let first = report(&resume(
        &nodes,
        &config,
        &parent.descriptor,
        &["--cache", cache_arg],
    ));
    let copied = first["pages_copied"].as_u64().unwrap();
    assert!(copied >= 1, "{first}");
    assert_eq!(first["cache_hits"], 0, "{first}");
    assert_eq!(first["cache_misses"], copied, "{first}");
    assert_eq!(first["cache_filled"], copied, "{first}");

    let second = report(&resume(
        &nodes,
        &config,
        &parent.descriptor,
        &["--cache", cache_arg, "--prefetch", "order"],
    ));
    assert_eq!(answer(&second)["served"], 4, "{second}");
    assert_eq!(
        second["cache_misses"], 0,
        "every page came from the node: {second}"
    );
    // How many pages the prefetch installs before the guest touches them is a race (the
    // rdma-fork tests check prefetch itself); here: it ran, and added no network traffic.
    assert_eq!(second["prefetch"], "order");
    assert_eq!(second["prefetch_wire_bytes_received"], 0, "{second}");

    // RDMA asked for: this machine has none and the descriptor names no region, so TCP,
    // with the reason in the report.
    let rdma = report(&resume(
        &nodes,
        &config,
        &parent.descriptor,
        &["--transport", "rdma"],
    ));
    assert_eq!(rdma["transport"], "tcp", "{rdma}");
    let why = rdma["transport_fallback"].as_str().unwrap();
    assert!(why.contains("no RDMA region"), "{why}");
    assert_eq!(answer(&rdma)["served"], 4);

    let stats = parent.stop();
    assert_eq!(
        stats["pages_served"].as_u64().unwrap(),
        copied + rdma["pages_copied"].as_u64().unwrap(),
        "the cached child fetched no page from the parent: {stats}"
    );
    let _ = std::fs::remove_file(&cache);
}

#[test]
fn wrong_key_unknown_handle_and_foreign_modules_are_refused() {
    let Some(nodes) = Nodes::create("wrong_key_unknown_handle_and_foreign_modules") else {
        return;
    };
    let config = config("fork-refused");
    let parent = Parent::start(&nodes, &config);
    let good: ImageDescriptor = parent.descriptor.parse().unwrap();

    let mut wrong_key = good.clone();
    wrong_key.key[0] ^= 1;
    let out = resume(&nodes, &config, &wrong_key.to_string(), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("BadProof") || err.contains("proof"), "{err}");

    let mut unknown = good.clone();
    unknown.handle ^= 0x5a5a;
    let out = resume(&nodes, &config, &unknown.to_string(), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("UnknownHandle") || err.contains("unknown"),
        "{err}"
    );

    let out = resume(&nodes, &config, "spindle-image:00ff", &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("image descriptor"));

    // The same descriptor resumed as another function: its module is not the image's.
    let out = resume_as(&nodes, &config, &parent.descriptor, ("up", "upper"), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another module"), "{err}");

    // After all that, a good child still gets its pages.
    assert_eq!(
        answer(&report(&resume(&nodes, &config, &parent.descriptor, &[])))["served"],
        4
    );
    let stats = parent.stop();
    assert_eq!(stats["refusals"]["bad_proof"], 1, "{stats}");
    assert_eq!(stats["refusals"]["unknown_handle"], 1, "{stats}");
    assert_eq!(stats["handshakes_ok"], 1, "{stats}");
}

#[test]
fn a_dead_parent_fails_the_child_cleanly() {
    let Some(nodes) = Nodes::create("a_dead_parent_fails_the_child_cleanly") else {
        return;
    };
    let config = config("fork-dead");
    let mut parent = Parent::start(&nodes, &config);
    parent.process.kill().unwrap();
    parent.process.wait().unwrap();
    // finish_within fails the test if the child hangs instead of failing.
    let out = resume(&nodes, &config, &parent.descriptor, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("connecting to the parent"), "{err}");
}

/// The pids of the workers started `--from-image` whose parent is `gateway` (or its child,
/// when `ip netns exec` execs it in place that is the same process).
fn resumed_workers(gateway: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat[stat.rfind(')').map_or(0, |i| i + 2)..]
                .split(' ')
                .nth(1)
                .and_then(|p| p.parse::<i32>().ok());
            ppid == Some(gateway) && cmdline.split(|b| *b == 0).any(|a| a == b"--from-image")
        })
        .collect()
}

#[test]
fn a_gateway_serves_a_chain_with_an_instance_resumed_from_another_node() {
    let Some(nodes) = Nodes::create("a_gateway_serves_a_chain_with_a_resumed_instance") else {
        return;
    };
    let config = config("fork-gateway");
    let parent = Parent::start(&nodes, &config);
    let gw = ChildGateway::start(&nodes, &config, "forkrand", &parent.descriptor, 18301);
    for served in [4, 5] {
        let (code, body) = gw.curl(&["/rand", "x"]);
        assert_eq!(code, 200, "{body}");
        let a: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(a["served"], served, "continues the parent's count: {a}");
        assert_eq!(a["forks"], 1, "{a}");
    }
    // The other function of the config was built cold, next to the resumed one.
    assert_eq!(gw.curl(&["/up", "ab"]), (200, "AB".to_owned()));
    // The resumed worker runs confined (docs/security.md): forkrand is function 0, so uid
    // 200000, with seccomp, though in the node's namespaces (it fetches pages over TCP).
    let resumed = resumed_workers(gw.process.id() as i32);
    assert_eq!(resumed.len(), 1, "one resumed worker");
    let status = std::fs::read_to_string(format!("/proc/{}/status", resumed[0])).unwrap();
    for line in [
        "Uid:\t200000\t200000\t200000\t200000",
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
        "CapEff:\t0000000000000000",
    ] {
        assert!(status.contains(line), "no {line:?} in\n{status}");
    }
    // No machine here has an RDMA device: pages came over TCP, and the node says why.
    let (_, ready) = gw.curl(&["/readyz"]);
    assert!(ready.contains("fork pages: tcp ("), "{ready}");
    let (_, metrics) = gw.curl(&["/metrics"]);
    assert!(
        metrics.lines().any(
            |l| l.starts_with(r#"spindle_fork_transport_info{fallback_reason=""#)
                && l.contains(r#"transport="tcp"} 1"#)
        ),
        "{metrics}"
    );
}

#[test]
fn a_parent_gone_before_its_pages_were_fetched_fails_the_request_not_the_node() {
    let Some(nodes) = Nodes::create("a_parent_gone_before_its_pages_were_fetched") else {
        return;
    };
    let config = config("fork-gone");
    let mut parent = Parent::start_of(&nodes, &config, ("table", "table1m"));
    let gw = ChildGateway::start(&nodes, &config, "table1m", &parent.descriptor, 18302);
    // Resumed, but the 1 MiB table is still on the parent: every request reads all of it.
    parent.process.kill().unwrap();
    parent.process.wait().unwrap();
    let (code, body) = gw.curl(&["/table", "x"]);
    assert_eq!(code, 502, "the instance could not fetch its memory: {body}");
    assert_eq!(gw.curl(&["/healthz"]).0, 200, "the node itself is fine");
    assert_eq!(gw.curl(&["/up", "ab"]), (200, "AB".to_owned()));
}

/// `spindle run` in the parent node with the node service: pages served on the parent's veth
/// address, the admin API on a Unix socket; HTTP on the parent's loopback.
struct ParentGateway {
    process: Child,
    port: u16,
    ns: String,
    admin: PathBuf,
}

impl ParentGateway {
    fn start(nodes: &Nodes, config: &Path, port: u16) -> Self {
        let admin = config.with_file_name("admin.sock");
        // The suite runs once per dataplane: control traffic must not depend on which.
        let dataplane =
            std::env::var("SPINDLE_TEST_DATAPLANE").unwrap_or_else(|_| "userspace".into());
        let process = nodes
            .command(&nodes.parent)
            .arg("run")
            .arg(config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--dataplane", &dataplane])
            .args(["--serve-images", &format!("{}:0", nodes.parent_ip)])
            .arg("--admin")
            .arg(&admin)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let gw = ParentGateway {
            process,
            port,
            ns: nodes.parent.clone(),
            admin,
        };
        let started = std::time::Instant::now();
        while curl_in(&gw.ns, gw.port, &["/readyz"]).0 != 200 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the parent node's gateway never got ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        gw
    }

    fn curl(&self, args: &[&str]) -> (u16, String) {
        curl_in(&self.ns, self.port, args)
    }

    /// (status, body) of a request to the admin API (a Unix socket: no namespace needed).
    fn admin(&self, method: &str, path: &str) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-m", "30", "--unix-socket"])
            .arg(&self.admin)
            .args(["-X", method, "-o", "-", "-w", "\n%{http_code}"])
            .arg(format!("http://spindle{path}"));
        let out = finish_within(cmd, RESUME_LIMIT);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    fn metric(&self, series: &str) -> f64 {
        let (_, page) = self.curl(&["/metrics"]);
        page.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {series} in:\n{page}"))
    }
}

impl Drop for ParentGateway {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.process.id() as i32), Signal::SIGTERM);
        let _ = self.process.wait();
    }
}

/// (status, body) of an HTTP request made inside namespace `ns`.
fn curl_in(ns: &str, port: u16, args: &[&str]) -> (u16, String) {
    let (path, data) = (args[0], args.get(1));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "curl", "-s", "-m", "30"])
        .args(["-o", "-", "-w", "\n%{http_code}"]);
    if let Some(d) = data {
        cmd.args(["-d", d]);
    }
    cmd.arg(format!("http://127.0.0.1:{port}{path}"));
    let out = finish_within(cmd, RESUME_LIMIT);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// One request of the load on the parent: when it was sent and answered, and what it said.
struct Served {
    sent: std::time::Instant,
    answered: std::time::Instant,
    code: u16,
    served: u64,
}

#[test]
fn a_running_gateway_prepares_under_load_and_another_node_continues_its_instance() {
    let Some(nodes) = Nodes::create("a_running_gateway_prepares_under_load") else {
        return;
    };
    let config = config("fork-node-service");
    let parent = ParentGateway::start(&nodes, &config, 18303);
    // The parent instance itself may be a local fork (of its zygote): the child is one more.
    let mut parent_forks = 0;
    for served in 1..=3 {
        let (code, body) = parent.curl(&["/rand", "w"]);
        assert_eq!(code, 200, "{body}");
        let a: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(a["served"], served, "{a}");
        parent_forks = a["forks"].as_u64().unwrap();
    }

    // Load on the parent while it prepares: two clients, one request after another.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(AtomicU32::new(0));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (ns, port) = (parent.ns.clone(), parent.port);
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || {
                let mut log = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let sent = std::time::Instant::now();
                    let (code, body) = curl_in(&ns, port, &["/rand", "x"]);
                    let served = serde_json::from_str::<Value>(&body)
                        .ok()
                        .and_then(|a| a["served"].as_u64())
                        .unwrap_or(0);
                    log.push(Served {
                        sent,
                        answered: std::time::Instant::now(),
                        code,
                        served,
                    });
                    done.fetch_add(1, Ordering::Relaxed);
                }
                log
            })
        })
        .collect();
    let wait_for = |n: u32| {
        let began = std::time::Instant::now();
        while done.load(Ordering::Relaxed) < n {
            assert!(
                began.elapsed() < Duration::from_secs(60),
                "the load stalled"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for(6);
    let asked = std::time::Instant::now();
    let (code, answer) = parent.admin("POST", "/images?chain=rand&function=forkrand&lease=5m");
    let answered = std::time::Instant::now();
    let after = done.load(Ordering::Relaxed);
    wait_for(after + 6);
    stop.store(true, Ordering::Relaxed);
    let log: Vec<Served> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert_eq!(code, 200, "{answer}");

    // The parent kept serving: no request failed, none was lost or counted twice, and its
    // count carried on through the prepare.
    assert!(
        log.iter().all(|r| r.code == 200),
        "a request failed during the prepare"
    );
    let mut counts: Vec<u64> = log.iter().map(|r| r.served).collect();
    counts.sort_unstable();
    let expected: Vec<u64> = (4..4 + log.len() as u64).collect();
    assert_eq!(counts, expected, "one instance counted every request once");

    // The image holds the count between what was answered before the prepare was asked
    // and what was sent after it was answered.
    let at_least = log
        .iter()
        .filter(|r| r.answered < asked)
        .map(|r| r.served)
        .max()
        .unwrap();
    let below = log
        .iter()
        .filter(|r| r.sent > answered)
        .map(|r| r.served)
        .min()
        .unwrap();
    let descriptor = answer.lines().next().unwrap();
    assert!(descriptor.starts_with("spindle-image:"), "{answer}");
    let parsed: ImageDescriptor = descriptor.parse().unwrap();
    assert_eq!(parsed.parent.ip().to_string(), nodes.parent_ip, "{answer}");
    assert!(answer.contains("pages_with_data: "), "{answer}");

    // Another node resumes the image and continues from the captured count.
    let child = ChildGateway::start(&nodes, &config, "forkrand", descriptor, 18304);
    let (code, body) = child.curl(&["/rand", "x"]);
    assert_eq!(code, 200, "{body}");
    let a: Value = serde_json::from_str(&body).unwrap();
    let captured = a["served"].as_u64().unwrap() - 1;
    assert!(
        (at_least..below).contains(&captured),
        "the image holds the count at the prepare: {captured} not in {at_least}..{below}"
    );
    assert_eq!(a["forks"].as_u64(), Some(parent_forks + 1), "{a}");
    let (_, body) = child.curl(&["/rand", "x"]);
    let b: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(b["served"].as_u64(), Some(captured + 2), "{b}");

    // The parent lists the image with the child attached and the pages it fetched.
    let handle = format!("{:#018x}", parsed.handle);
    let (_, listed) = parent.admin("GET", "/images");
    let line = listed
        .lines()
        .find(|l| l.starts_with(&handle))
        .unwrap_or_else(|| panic!("{handle} not in {listed}"));
    assert!(line.contains("rand/forkrand 0 live"), "{line}");
    assert!(line.contains("children=1"), "{line}");
    assert!(!line.contains("pages_served=0 "), "{line}");
    drop(child);

    // Revoked: a new child is refused, and the parent counts the refusal.
    let (code, body) = parent.admin("DELETE", &format!("/images/{handle}"));
    assert_eq!(code, 200, "{body}");
    let mut cmd = nodes.command(&nodes.child);
    cmd.arg("run")
        .arg(&config)
        .args(["--listen", "127.0.0.1:18305", "--dataplane", "userspace"])
        .args(["--resume", &format!("forkrand={descriptor}")]);
    let out = finish_within(cmd, RESUME_LIMIT);
    assert!(!out.status.success(), "a revoked image still resumed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("revoked"), "{err}");
    assert_eq!(
        parent.metric(r#"spindle_fork_refusals_total{reason="revoked"}"#),
        1.0
    );
    assert_eq!(parent.metric("spindle_fork_revocations_total"), 1.0);
    assert_eq!(
        parent.metric(r#"spindle_fork_prepares_total{result="ok"}"#),
        1.0
    );
    assert_eq!(parent.metric("spindle_fork_handshakes_total"), 1.0);
    assert_eq!(parent.metric("spindle_fork_images_live"), 0.0);
    // And the parent itself still serves, its count intact.
    let (_, body) = parent.curl(&["/rand", "x"]);
    let p: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(p["served"].as_u64(), Some(4 + log.len() as u64), "{p}");
}

/// The value of the /metrics sample whose line starts with `series` (name and labels).
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
}

#[test]
fn the_instances_of_a_resumed_function_share_the_node_page_cache() {
    let Some(nodes) = Nodes::create("the_instances_of_a_resumed_function_share") else {
        return;
    };
    testkit::build_examples();
    let dir = common::temp_dir("fork-node-cache");
    let config = dir.join("fork.yaml");
    std::fs::write(
        &config,
        format!(
            "functions:\n  - {{ name: table1m, module: \"{}\", instances: 2 }}\n\
             chains:\n  - {{ name: table, route: /table, steps: [table1m] }}\n",
            common::wasm("table1m")
        ),
    )
    .unwrap();
    let parent = Parent::start_of(&nodes, &config, ("table", "table1m"));
    let gw = ChildGateway::start(&nodes, &config, "table1m", &parent.descriptor, 18306);
    // Round-robin: consecutive requests alternate between the two instances, and each
    // request reads the whole 1 MiB table.
    let mut answers = Vec::new();
    for _ in 0..4 {
        let (code, body) = gw.curl(&["/table", "x"]);
        assert_eq!(code, 200, "{body}");
        answers.push(serde_json::from_str::<Value>(&body).unwrap());
    }
    let sum = &answers[0]["sum"];
    assert!(answers.iter().all(|a| &a["sum"] == sum), "{answers:?}");
    let mut served: Vec<u64> = answers
        .iter()
        .map(|a| a["served"].as_u64().unwrap())
        .collect();
    served.sort_unstable();
    assert_eq!(
        served,
        [4, 4, 5, 5],
        "both instances continue the parent's count"
    );

    let (_, metrics) = gw.curl(&["/metrics"]);
    let row = |name: &str, instance: u32, extra: &str| {
        sample(
            &metrics,
            &format!(r#"{name}{{chain="table",function="table1m",instance="{instance}"{extra}}}"#),
        )
    };
    let mut hits = 0.0;
    let mut fetched = 0.0;
    for i in 0..2 {
        assert_eq!(row("spindle_fork_child_resumes_total", i, ""), 1.0);
        assert!(row("spindle_fork_child_faults_total", i, "") > 0.0);
        assert!(
            row("spindle_fork_child_pages_total", i, r#",kind="copied""#) >= 256.0,
            "instance {i} installed the whole table"
        );
        hits += row(
            "spindle_fork_child_cache_pages_total",
            i,
            r#",result="hit""#,
        );
        fetched += row("spindle_fork_child_bytes_fetched_total", i, "");
        // A resumed worker keeps its userfaultfd registration while it runs.
        assert_eq!(
            row(
                "spindle_fork_resources_open",
                i,
                r#",resource="uffd_registration",process="worker""#
            ),
            1.0
        );
    }
    assert!(
        hits >= 256.0,
        "the second instance read the table from the cache: {hits}"
    );
    drop(gw);
    let stats = parent.stop();
    let image_pages = 260.0; // table1m's pages that hold data (the table and a few more)
    let served_pages = stats["pages_served"].as_f64().unwrap();
    assert!(
        served_pages <= image_pages + 8.0,
        "the parent served one child's worth of pages, not two: {stats}"
    );
    assert!(
        fetched < 1.5 * 1024.0 * 1024.0,
        "the node fetched about 1 MiB once, not twice: {fetched} bytes"
    );
}
