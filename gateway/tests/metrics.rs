//! /metrics: values after known traffic, promtool's lint under load, and a real Prometheus
//! server scraping the gateway.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Spindle;

const HELLO: &str = r#"
functions:
  - { name: uppercase, module: "{wasm:uppercase}" }
  - { name: reverse, module: "{wasm:reverse}", instances: 2 }
  - { name: frame, module: "{wasm:frame}" }
  - { name: faulty, module: "{wasm:faulty}", fuel: 10000000 }
chains:
  - name: hello
    route: /hello
    steps: [uppercase, reverse, frame]
  - name: faulty
    route: /faulty
    steps: [faulty]
"#;

/// promtool or prometheus from scripts/setup.sh (target/prometheus) or PATH. Missing is a
/// failure in CI and a loud skip elsewhere.
fn prometheus_tool(name: &str, test: &str) -> Option<PathBuf> {
    let local = common::repo_root()
        .join("target/prometheus/usr/bin")
        .join(name);
    if local.exists() {
        return Some(local);
    }
    if Command::new(name).arg("--version").output().is_ok() {
        return Some(PathBuf::from(name));
    }
    testkit::cannot_run(
        test,
        format!("{name} not found (scripts/setup.sh installs it)"),
    );
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_known_traffic() {
    let s = Spindle::start("metrics-known", HELLO).await;
    for i in 0..100 {
        assert_eq!(s.post("/hello", format!("m{i}")).await.status, 200);
    }
    assert_eq!(s.post("/faulty", "trap").await.status, 500);
    assert_eq!(s.post("/faulty", "loop").await.status, 504);
    assert_eq!(s.post("/faulty", "fine").await.status, 200);

    let m = |series: String| {
        let s = &s;
        async move { s.metric(&series).await }
    };
    assert_eq!(
        m(r#"spindle_requests_total{chain="hello",code="200"}"#.into()).await,
        Some(100.0)
    );
    assert_eq!(
        m(r#"spindle_requests_total{chain="faulty",code="500"}"#.into()).await,
        Some(1.0)
    );
    assert_eq!(
        m(r#"spindle_requests_total{chain="faulty",code="504"}"#.into()).await,
        Some(1.0)
    );
    assert_eq!(
        m(r#"spindle_request_duration_seconds_count{chain="hello"}"#.into()).await,
        Some(100.0)
    );
    assert_eq!(
        m(r#"spindle_requests_in_flight{chain="hello"}"#.into()).await,
        Some(0.0)
    );
    for f in ["uppercase", "reverse", "frame"] {
        let inv = format!(r#"spindle_function_invocations_total{{chain="hello",function="{f}"}}"#);
        assert_eq!(m(inv).await, Some(100.0), "{f} invoked once per request");
        let hist =
            format!(r#"spindle_function_execution_seconds_count{{chain="hello",function="{f}"}}"#);
        assert_eq!(
            m(hist).await,
            Some(100.0),
            "{f} execution time observed per call"
        );
        let inf = format!(
            r#"spindle_function_execution_seconds_bucket{{chain="hello",function="{f}",le="+Inf"}}"#
        );
        assert_eq!(m(inf).await, Some(100.0));
    }
    let errors = |kind: &str| {
        format!(
            r#"spindle_function_errors_total{{chain="faulty",function="faulty",kind="{kind}"}}"#
        )
    };
    assert_eq!(m(errors("trap")).await, Some(1.0));
    assert_eq!(m(errors("timeout")).await, Some(1.0));
    assert_eq!(m(errors("crash")).await, Some(0.0));
    assert_eq!(
        m(r#"spindle_function_invocations_total{chain="faulty",function="faulty"}"#.into()).await,
        Some(3.0)
    );
    assert_eq!(
        m(r#"spindle_instances_up{chain="hello",function="reverse"}"#.into()).await,
        Some(2.0)
    );
    assert_eq!(
        m(r#"spindle_arena_slots{chain="hello",state="in_use"}"#.into()).await,
        Some(0.0)
    );
    let page = s.get("/metrics").await.text();
    let cpu_rows = |process: &str| {
        page.lines()
            .filter(|l| {
                l.starts_with("spindle_process_cpu_seconds_total{")
                    && l.contains(&format!(r#"process="{process}""#))
            })
            .count()
    };
    assert_eq!(
        (cpu_rows("gateway"), cpu_rows("worker"), cpu_rows("zygote")),
        (1, 5, 4),
        "the gateway, each of the 5 workers and the 4 functions' zygotes:\n{page}"
    );
    let gateway_rss = page
        .lines()
        .find(|l| l.starts_with(r#"spindle_process_resident_memory_bytes{process="gateway"}"#))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert!(
        gateway_rss.is_some_and(|b| b > 1e6),
        "gateway RSS reported: {gateway_rss:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_a_scrape_taken_under_load() {
    let Some(promtool) = prometheus_tool("promtool", "promtool_accepts_a_scrape_taken_under_load")
    else {
        return;
    };
    let s = Arc::new(Spindle::start("metrics-promtool", HELLO).await);
    let load: Vec<_> = (0..8)
        .map(|_| {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                for i in 0..150 {
                    s.post("/hello", format!("load {i}")).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let scrape = s.get("/metrics").await.body;
    for t in load {
        t.await.unwrap();
    }
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &scrape).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_gateway() {
    let Some(prometheus) = prometheus_tool("prometheus", "a_real_prometheus_scrapes_the_gateway")
    else {
        return;
    };
    let s = Spindle::start("metrics-prometheus", HELLO).await;
    let dir = common::temp_dir("prometheus-server");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: spindle\n    static_configs:\n      - targets: ['{}']\n",
            s.addr
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let web = format!("127.0.0.1:{port}");
    let mut server = Command::new(&prometheus)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(std::mem::replace(
        &mut server,
        Command::new("true").spawn().unwrap(),
    ));

    let api = |query: &str| {
        let url = format!("http://{web}{query}");
        let out = Command::new("curl")
            .args(["-sf", "--max-time", "2", &url])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let targets = api("/api/v1/targets");
        if targets.contains(r#""health":"up""#) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "target never up: {targets}\n{}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in 0..25 {
        assert_eq!(s.post("/hello", format!("p{i}")).await.status, 200);
    }
    let query =
        "/api/v1/query?query=spindle_requests_total%7Bchain%3D%22hello%22%2Ccode%3D%22200%22%7D";
    loop {
        let result = api(query);
        if result.contains(r#","25"]"#) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "counter never reached 25 in Prometheus: {result}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A hostile worker cannot make /metrics crash the gateway: its statistics page (fd 7) is
/// sealed against resizing, so a worker's ftruncate fails and the gateway keeps reading it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cannot_shrink_its_statistics_page_under_the_gateway() {
    let spindle = Spindle::start("metrics-sealed", HELLO).await;
    assert_eq!(spindle.post("/hello", "abc").await.status, 200);
    if !testkit::require_root(
        "a_worker_cannot_shrink_its_statistics_page_under_the_gateway",
        "opening another process's mapping through /proc/PID/map_files",
    ) {
        return;
    }
    let worker = spindle.worker_pids("uppercase")[0];
    // The worker keeps the page mapped (its fd 7 is closed once mapped): open the very file
    // behind that mapping, as the worker itself could through /proc/self/map_files.
    let maps = std::fs::read_to_string(format!("/proc/{worker}/maps")).unwrap();
    let range = maps
        .lines()
        .find(|l| l.contains("memfd:spindle-stats-uppercase-0"))
        .and_then(|l| l.split(' ').next())
        .unwrap_or_else(|| panic!("the statistics page is mapped:\n{maps}"));
    let page = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{worker}/map_files/{range}"))
        .unwrap();
    let err = page.set_len(0).expect_err("the page's size is sealed");
    assert_eq!(err.raw_os_error(), Some(nix::libc::EPERM), "{err}");
    let scrape = spindle.get("/metrics").await;
    assert_eq!(scrape.status, 200);
    assert!(
        scrape.text().contains(
            r#"spindle_function_invocations_total{chain="hello",function="uppercase"} 1"#
        ),
        "the page still reads"
    );
}
