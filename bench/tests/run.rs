//! `run()` end to end against servers started by the test: a URL target (in-process hyper
//! server), the ceiling target started as a process (this crate's `hyper-hello` binary, which
//! accepts `bench-ceiling --listen ADDR` like `spindle`), a server that dies mid-run, and
//! targets that cannot be measured at all.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use spindle_bench::{BenchError, BenchOptions, Report, Target, run};

/// Serves the ceiling on a thread of its own for `lifetime`, then drops every connection and
/// the listener (the runtime goes away).
fn ceiling_server(lifetime: Duration) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let _ = tokio::time::timeout(lifetime, spindle_bench::serve_ceiling_on(listener)).await;
        });
        rt.shutdown_background();
    });
    addr
}

/// Answers every request with 404.
fn not_found_server() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let service = service_fn(|_req| async {
                        let mut r = Response::new(Full::new(Bytes::from_static(b"no route /nope")));
                        *r.status_mut() = StatusCode::NOT_FOUND;
                        Ok::<_, Infallible>(r)
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    addr
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spindle-bench-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tiny(targets: Vec<Target>) -> BenchOptions {
    BenchOptions {
        targets,
        duration: Duration::from_secs(1),
        warmup: Duration::from_millis(200),
        connections: 4,
        ..BenchOptions::default()
    }
}

const NO_EXE: &str = "/nonexistent/spindle";

#[test]
fn measures_a_url_target_and_writes_every_output() {
    let addr = ceiling_server(Duration::from_secs(60));
    let url = format!("http://{addr}/hello");
    let dir = scratch("url");
    let opts = BenchOptions {
        json: Some(dir.join("report.json")),
        markdown: Some(dir.join("report.md")),
        plot: Some(dir.join("report.svg")),
        ..tiny(vec![Target::Url(url.clone())])
    };
    let report = run(&opts, Path::new(NO_EXE)).unwrap();
    let t = &report.targets[0];
    assert_eq!(t.name, url);
    assert_eq!(t.mode, "url");
    assert_eq!(t.skipped, None);
    assert_eq!(t.errors, Some(0), "{:?}", t.error_kinds);
    assert!(t.rps.unwrap() > 0.0);
    assert!(t.requests.unwrap() > 0);
    let (p50, p99, p999) = (t.p50_us.unwrap(), t.p99_us.unwrap(), t.p999_us.unwrap());
    assert!(0 < p50 && p50 <= p99 && p99 <= p999 && p999 <= t.max_us.unwrap());
    assert_eq!(t.check.as_ref().unwrap().body, "hello world");
    // No process of ours: no CPU accounting, explicitly.
    assert_eq!(t.cpu_s_per_req, None);
    assert_eq!(t.processes, None);
    assert!(t.loadgen_cpu_s_per_req.unwrap() > 0.0);
    assert_eq!(report.ratios.spindle_userspace_over_knative_rps, None);

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    for key in ["machine", "options", "targets", "ratios"] {
        assert!(json.get(key).is_some(), "{key}");
    }
    assert!(json["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(json["targets"][0]["cpu_s_per_req"].is_null());
    assert_eq!(json["targets"][0]["errors"], 0);
    let back: Report = serde_json::from_value(json).unwrap();
    assert_eq!(back.targets[0].requests, t.requests);
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.contains(&format!("| {url} | url |")), "{md}");
    let svg = std::fs::read_to_string(dir.join("report.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains(&url));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn open_loop_reaches_the_intended_rate() {
    let addr = ceiling_server(Duration::from_secs(60));
    let opts = BenchOptions {
        rate: Some(400),
        ..tiny(vec![Target::Url(format!("http://{addr}/"))])
    };
    let report = run(&opts, Path::new(NO_EXE)).unwrap();
    let t = &report.targets[0];
    assert_eq!(report.options.load_loop, "open");
    assert_eq!(t.intended_rps, Some(400.0));
    let rps = t.rps.unwrap();
    assert!((360.0..=401.0).contains(&rps), "achieved {rps} req/s");
    assert_eq!(t.errors, Some(0));
}

#[test]
fn a_target_dying_mid_run_counts_errors_and_still_reports() {
    // Dies ~0.5 s into the 1.2 s measured window (after the check and 0.2 s warm-up).
    let addr = ceiling_server(Duration::from_millis(700));
    let dir = scratch("dies");
    let opts = BenchOptions {
        duration: Duration::from_millis(1200),
        json: Some(dir.join("report.json")),
        ..tiny(vec![Target::Url(format!("http://{addr}/"))])
    };
    let report = run(&opts, Path::new(NO_EXE)).unwrap();
    let t = &report.targets[0];
    assert!(t.requests.unwrap() > 0, "served before dying");
    assert!(t.errors.unwrap() > 0, "{:?}", t.error_kinds);
    let kinds = t.error_kinds.unwrap();
    assert!(
        kinds.connect > 0,
        "reconnects to a dead port are refused: {kinds:?}"
    );
    assert!(dir.join("report.json").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn starts_measures_and_reaps_the_ceiling_process() {
    let exe = Path::new(env!("CARGO_BIN_EXE_hyper-hello"));
    let opts = BenchOptions {
        config: PathBuf::from("/nonexistent/not-needed.yaml"),
        ..tiny(vec![Target::Ceiling])
    };
    let report = run(&opts, exe).unwrap();
    let t = &report.targets[0];
    assert_eq!(t.name, "hyper hello-world (ceiling)");
    assert_eq!(t.skipped, None);
    assert_eq!(t.errors, Some(0));
    assert!(t.rps.unwrap() > 0.0);
    assert!(t.url.as_deref().unwrap().starts_with("http://127.0.0.1:"));
    // The server's CPU was attributed to it, per request and per process.
    let cpu = t.cpu_s_per_req.unwrap();
    assert!(cpu > 0.0 && cpu < 0.01, "{cpu} s/request");
    let processes = t.processes.as_ref().unwrap();
    let server = processes
        .iter()
        .find(|p| p.command == "hyper-hello")
        .unwrap_or_else(|| panic!("{processes:?}"));
    assert!(server.cpu_s.unwrap() > 0.0);
    // Stopped and reaped before run() returned.
    assert!(
        !Path::new(&format!("/proc/{}", server.pid)).exists(),
        "pid {} still exists",
        server.pid
    );
}

#[test]
fn nothing_measurable_is_an_error_that_still_writes_the_report() {
    let refused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let wrong_path = not_found_server();
    let dir = scratch("skipped");
    let opts = BenchOptions {
        json: Some(dir.join("report.json")),
        ..tiny(vec![
            Target::Ceiling,
            Target::Url(format!("http://{refused}/")),
            Target::Url(format!("http://{wrong_path}/nope")),
        ])
    };
    let err = run(&opts, Path::new(NO_EXE)).unwrap_err();
    let BenchError::NothingMeasured { report } = &err else {
        panic!("{err}");
    };
    let reasons: Vec<&str> = report
        .targets
        .iter()
        .map(|t| t.skipped.as_deref().unwrap())
        .collect();
    assert!(
        reasons[0].contains("cannot start /nonexistent/spindle"),
        "{}",
        reasons[0]
    );
    assert!(reasons[1].contains("failed"), "{}", reasons[1]);
    assert!(
        reasons[2].contains("answered 404 Not Found"),
        "{}",
        reasons[2]
    );
    assert!(reasons[2].contains("no route /nope"), "{}", reasons[2]);
    assert!(err.to_string().starts_with("nothing was measured"), "{err}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert!(
        json["targets"][2]["skipped"]
            .as_str()
            .unwrap()
            .contains("404")
    );
    assert!(json["targets"][2]["rps"].is_null());
    let _ = std::fs::remove_dir_all(&dir);
}
