//! Soak and chaos over real HTTP against the real binary: `configs/hello.yaml`'s chain and
//! the boutique chain under a paced load, first alone (the soak: every request answered 200,
//! and no process of the gateway's tree — gateway, zygotes, workers — grows its resident
//! memory more than 5% after warm-up), then while a random worker is SIGKILLed every 2 s
//! and one is SIGSTOPped for longer than its chain's deadline (the chaos). Only what a killed
//! worker held fails (502), only the stopped worker's requests time out (504), requests
//! arriving while an instance is replaced wait for it (no 503), every restart is counted,
//! and after each phase the arenas are full again and the gateway holds the fds it held
//! before.
//!
//! CI runs each phase for 30 s at 30% of the throughput measured at the start.
//! `bench/soak.sh` runs the long version: `SPINDLE_SOAK_SECONDS` (each phase, default 30) and
//! `SPINDLE_SOAK_RATE_PERCENT` (default 30) set the length and the load.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Spindle;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Requests and their expected answers: the hello chain and the boutique chain.
fn request(i: u64) -> (&'static str, String, String) {
    if i.is_multiple_of(2) {
        let body = format!("soak {i}");
        let reversed: String = body.to_uppercase().chars().rev().collect();
        let expect = format!(r#"{{"result":"{reversed}","bytes":{}}}"#, body.len());
        ("/hello", body, expect)
    } else {
        ("/shop", "product OLJCESPC7Z".to_string(), String::new())
    }
}

const CONFIG: &str = r#"
functions:
  - { name: uppercase, module: "{wasm:uppercase}" }
  - { name: reverse, module: "{wasm:reverse}", instances: 2 }
  - { name: frame, module: "{wasm:frame}" }
  - { name: frontend, module: "{wasm:frontend}" }
  - { name: cart, module: "{wasm:cart}" }
  - { name: catalog, module: "{wasm:catalog}" }
  - { name: currency, module: "{wasm:currency}" }
chains:
  - name: hello
    route: /hello
    steps: [uppercase, reverse, frame]
    timeout_ms: 1000
    content_type: application/json
    arena: { slot_size: 4KiB, slots: 256 }
  - name: shop
    route: /shop
    entry: frontend
    functions: [frontend, cart, catalog, currency]
    max_hops: 4
    timeout_ms: 1000
    content_type: text/plain
    arena: { slot_size: 4KiB, slots: 256 }
"#;

const WORKERS: [&str; 7] = [
    "uppercase",
    "reverse",
    "frame",
    "frontend",
    "cart",
    "catalog",
    "currency",
];

/// The gateway's open fds, less its client connections (those follow the test client's
/// connection pool, not the gateway's health).
fn gateway_fds(pid: i32, http_port: u16) -> usize {
    let mut clients = std::collections::HashSet::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local_port = cols
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            // Accepted client connections: local port is the HTTP port, state not LISTEN (0A).
            if local_port == Some(http_port)
                && cols.get(3) != Some(&"0A")
                && let Some(inode) = cols.get(9)
            {
                clients.insert(format!("socket:[{inode}]"));
            }
        }
    }
    gateway_fd_links(pid, &clients).len()
}

fn gateway_fd_links(pid: i32, clients: &std::collections::HashSet<String>) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|link| link.display().to_string())
        .filter(|link| !clients.contains(link))
        .collect()
}

/// The gateway's fds by kind (socket, pidfd, memfd, ...), for a failure message.
fn fd_kinds(pid: i32) -> std::collections::BTreeMap<String, usize> {
    let mut kinds = std::collections::BTreeMap::new();
    for link in gateway_fd_links(pid, &Default::default()) {
        let kind = link.split(['[', ':']).next().unwrap_or("").to_string();
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
}

/// What each socket the gateway holds is, by its `socket:[inode]` link: a TCP connection's
/// addresses and state, or a Unix socket's type and state — to name a leaked fd.
fn socket_descriptions(pid: i32) -> HashMap<String, String> {
    let mut found = HashMap::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for cols in text
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
        {
            if let (Some(local), Some(remote), Some(state), Some(inode)) =
                (cols.get(1), cols.get(2), cols.get(3), cols.get(9))
            {
                found.insert(
                    format!("socket:[{inode}]"),
                    format!("{table} {local} -> {remote} state {state}"),
                );
            }
        }
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    for cols in text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
    {
        if let (Some(kind), Some(state), Some(inode)) = (cols.get(4), cols.get(5), cols.get(6)) {
            found.insert(
                format!("socket:[{inode}]"),
                format!(
                    "unix type {kind} state {state} {}",
                    cols.get(7).unwrap_or(&"")
                ),
            );
        }
    }
    found
}

/// The gateway's fds that were not open at `before`, described where they are sockets.
fn new_fds(pid: i32, before: &std::collections::HashSet<String>) -> Vec<String> {
    let sockets = socket_descriptions(pid);
    gateway_fd_links(pid, &Default::default())
        .into_iter()
        .filter(|link| !before.contains(link))
        .map(|link| match sockets.get(&link) {
            Some(what) => format!("{link} ({what})"),
            None => link,
        })
        .collect()
}

/// Closed-loop requests from `connections` clients for `for_`: answers per second.
async fn measure(spindle: &Arc<Spindle>, connections: usize, for_: Duration) -> f64 {
    let until = Instant::now() + for_;
    let mut tasks = Vec::new();
    for c in 0..connections as u64 {
        let s = Arc::clone(spindle);
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                let (path, body, _) = request(c + n);
                let r = s
                    .try_request("POST", path, body.into_bytes())
                    .await
                    .unwrap();
                assert_eq!(r.status, 200, "{}", r.text());
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / for_.as_secs_f64()
}

/// Every process of the gateway's tree that serves: the gateway, its zygotes, its workers.
fn serving_pids(spindle: &Spindle) -> Vec<(String, i32)> {
    let mut pids = vec![("gateway".to_string(), spindle.pid())];
    for f in WORKERS {
        for pid in spindle.zygote_pids(f) {
            pids.push((format!("{f}'s zygote"), pid));
        }
        for pid in spindle.worker_pids(f) {
            pids.push((format!("{f} worker"), pid));
        }
    }
    pids
}

fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Paced requests from `connections` clients at `rate` in all until `stop`; each client's
/// answers by status.
fn paced_load(
    spindle: &Arc<Spindle>,
    rate: f64,
    connections: u64,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<HashMap<u16, u64>>> {
    let interval = Duration::from_secs_f64(connections as f64 / rate);
    let mut clients = Vec::new();
    for c in 0..connections {
        let s = Arc::clone(spindle);
        let stop = Arc::clone(stop);
        clients.push(tokio::spawn(async move {
            let mut codes: HashMap<u16, u64> = HashMap::new();
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let (path, body, expect) = request(i);
                let r = s
                    .try_request("POST", path, body.into_bytes())
                    .await
                    .unwrap();
                if r.status == 200 && !expect.is_empty() {
                    assert_eq!(r.text(), expect, "an answer for this very request");
                }
                *codes.entry(r.status).or_default() += 1;
                i += connections;
            }
            codes
        }));
    }
    clients
}

async fn answers(clients: Vec<tokio::task::JoinHandle<HashMap<u16, u64>>>) -> HashMap<u16, u64> {
    let mut codes: HashMap<u16, u64> = HashMap::new();
    for c in clients {
        for (code, n) in c.await.unwrap() {
            *codes.entry(code).or_default() += n;
        }
    }
    codes
}

/// The gateway's fds when the load began, to compare with after each phase.
struct FdsBefore {
    http_port: u16,
    count: usize,
    kinds: std::collections::BTreeMap<String, usize>,
    links: std::collections::HashSet<String>,
}

impl FdsBefore {
    fn now(gateway: i32, http_port: u16) -> FdsBefore {
        FdsBefore {
            http_port,
            count: gateway_fds(gateway, http_port),
            kinds: fd_kinds(gateway),
            links: gateway_fd_links(gateway, &Default::default())
                .into_iter()
                .collect(),
        }
    }
}

/// Waits (10 s at most) for both arenas to be full, all 8 workers up and the gateway's fds
/// back to what they were `before`.
async fn settles(spindle: &Spindle, before: &FdsBefore) {
    let gateway = spindle.pid();
    let settle = Instant::now();
    loop {
        let mut free = Vec::new();
        for chain in ["hello", "shop"] {
            free.push(
                spindle
                    .metric(&format!(
                        r#"spindle_arena_slots{{chain="{chain}",state="free"}}"#
                    ))
                    .await,
            );
        }
        let up: usize = WORKERS.iter().map(|f| spindle.worker_pids(f).len()).sum();
        let fds = gateway_fds(gateway, before.http_port);
        if free == [Some(256.0), Some(256.0)] && up == 8 && fds == before.count {
            return;
        }
        assert!(
            settle.elapsed() < Duration::from_secs(10),
            "not back to normal: free slots {free:?}, {up} of 8 workers, gateway fds {fds} \
             (was {}); by kind (client connections included) {:?}, before {:?}; new since: {:?}",
            before.count,
            fd_kinds(gateway),
            before.kinds,
            new_fds(gateway, &before.links)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How much a process's resident memory may grow over the soak after warm-up: 5%, and at
/// least 256 KiB (a few pages of allocator slack on a process of a few MiB).
fn rss_allowed(warm_kib: u64) -> u64 {
    warm_kib + (warm_kib / 20).max(256)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_nothing_grows_and_only_a_killed_workers_requests_fail() {
    let seconds = env_u64("SPINDLE_SOAK_SECONDS", 30);
    let percent = env_u64("SPINDLE_SOAK_RATE_PERCENT", 30);
    let spindle = Arc::new(Spindle::start("chaos", CONFIG).await);
    let gateway = spindle.pid();
    let http_port: u16 = spindle.addr.rsplit(':').next().unwrap().parse().unwrap();
    let max = measure(&spindle, 8, Duration::from_secs(2)).await;
    let rate = (max * percent as f64 / 100.0).max(20.0);
    // Everything the first requests opened (pooled connections) is open now.
    let fds_before = FdsBefore::now(gateway, http_port);
    eprintln!(
        "max {max:.0} req/s; soak, then chaos, each at {rate:.0} req/s for {seconds} s; gateway fds {}",
        fds_before.count
    );
    let connections = 16u64;

    // Soak: the load alone. Nothing fails, and no process grows after warm-up.
    let stop = Arc::new(AtomicBool::new(false));
    let clients = paced_load(&spindle, rate, connections, &stop);
    let warm_up = Duration::from_secs((seconds / 6).clamp(1, 60));
    tokio::time::sleep(warm_up).await;
    let warm: Vec<(String, i32, u64)> = serving_pids(&spindle)
        .into_iter()
        .filter_map(|(who, pid)| Some((who, pid, rss_kib(pid)?)))
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds) - warm_up).await;
    let mut grown = Vec::new();
    let mut report = Vec::new();
    for (who, pid, warm_kib) in &warm {
        let now = rss_kib(*pid).unwrap_or_else(|| panic!("{who} ({pid}) exited during the soak"));
        report.push(format!("{who} {warm_kib}->{now}"));
        if now > rss_allowed(*warm_kib) {
            grown.push(format!(
                "{who} ({pid}): {warm_kib} KiB after warm-up, {now} KiB at the end"
            ));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let codes = answers(clients).await;
    eprintln!(
        "soak answers {codes:?}; RSS KiB after warm-up->end: {}",
        report.join(", ")
    );
    assert!(
        codes.keys().all(|c| *c == 200),
        "the soak alone fails nothing: {codes:?}"
    );
    assert!(
        grown.is_empty(),
        "grew more than 5% after warm-up: {grown:?}"
    );
    settles(&spindle, &fds_before).await;

    // Chaos: the same load while workers are killed.
    let stop = Arc::new(AtomicBool::new(false));
    let clients = paced_load(&spindle, rate, connections, &stop);
    // Chaos: a random worker SIGKILLed every 2 s; once, one SIGSTOPped past the deadline.
    let began = Instant::now();
    let mut kills = 0u64;
    let mut stopped_once = false;
    let mut stopped_function = None;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ std::process::id() as u64;
    while began.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let function = WORKERS[(seed % WORKERS.len() as u64) as usize];
        let pids = spindle.worker_pids(function);
        let Some(&victim) = pids.first() else {
            continue; // being replaced right now
        };
        if !stopped_once && began.elapsed() > Duration::from_secs(seconds / 2) {
            // Stopped for longer than the chain's 1 s deadline: its requests time out, and
            // the gateway kills it a second after the deadline.
            stopped_once = true;
            stopped_function = Some(function);
            kill(Pid::from_raw(victim), Signal::SIGSTOP).unwrap();
            tokio::time::sleep(Duration::from_millis(2500)).await;
            // Still there if nothing it held went overdue (it may have had nothing).
            let _ = kill(Pid::from_raw(victim), Signal::SIGCONT);
            continue;
        }
        kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
        kills += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let codes = answers(clients).await;
    eprintln!("chaos answers {codes:?} after {kills} kills and one stop");
    let ok = codes.get(&200).copied().unwrap_or(0);
    let failed_502 = codes.get(&502).copied().unwrap_or(0);
    let failed_504 = codes.get(&504).copied().unwrap_or(0);
    assert!(
        codes.keys().all(|c| [200, 502, 504].contains(c)),
        "only the killed workers' requests (502) and the stopped one's (504) fail, and none \
         gets 503 while its instance is replaced: {codes:?}"
    );
    // Each client has at most one request outstanding, so a kill can fail at most that many.
    assert!(failed_502 <= kills * connections, "{codes:?}");
    assert!(failed_504 <= 2 * connections, "{codes:?}");
    assert!(ok > 10 * (failed_502 + failed_504), "{codes:?}");

    // Afterwards: every instance back, both arenas full, the gateway's fds as before.
    settles(&spindle, &fds_before).await;
    let (mut restarts, mut overdue) = (0.0, 0.0);
    let mut overdue_by_function = Vec::new();
    for f in WORKERS {
        let chain = if ["uppercase", "reverse", "frame"].contains(&f) {
            "hello"
        } else {
            "shop"
        };
        restarts += spindle
            .metric(&format!(
                r#"spindle_instance_restarts_total{{chain="{chain}",function="{f}"}}"#
            ))
            .await
            .unwrap_or(0.0);
        let here = spindle
            .metric(&format!(
                r#"spindle_function_errors_total{{chain="{chain}",function="{f}",kind="overdue"}}"#
            ))
            .await
            .unwrap_or(0.0);
        if here > 0.0 {
            overdue_by_function.push((f, here));
        }
        overdue += here;
    }
    // The stopped worker is killed only if it held a request past the deadline.
    assert!(
        overdue <= 1.0,
        "{overdue} overdue kills ({overdue_by_function:?}); the stopped one was {stopped_function:?}\n{}",
        spindle
            .log()
            .lines()
            .filter(|l| l.contains("past its chain's deadline"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        failed_504 == 0 || overdue == 1.0,
        "timed-out requests were reaped"
    );
    assert_eq!(
        restarts,
        kills as f64 + overdue,
        "every kill (and a reaped stop) counted"
    );
}
