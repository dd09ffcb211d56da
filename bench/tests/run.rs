//! `run()` end to end against servers started by the test: a URL target (in-process hyper
//! server), the ceiling target started as a process (this crate's `hyper-hello` binary, which
//! accepts `bench-ceiling --listen ADDR` like `spindle`, and `run CONFIG --listen ADDR
//! --dataplane D` as a stand-in Spindle target), a server that dies mid-run, one that answers
//! wrong bodies, one with a size limit and a bytes-copied counter, interleaved rounds, and
//! targets that cannot be measured at all.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use spindle_bench::{BenchError, BenchOptions, Expect, HopsOptions, Report, Target, run, run_hops};

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
        idle_baseline: Duration::from_millis(200),
        ..BenchOptions::default()
    }
}

/// Serves `answer(n, request body)` for the n-th POST (0-based, over all connections) and
/// `metrics(total body bytes received so far)` for GET /metrics.
fn scripted_server(
    answer: impl Fn(u64, &[u8]) -> (StatusCode, Vec<u8>) + Send + Sync + 'static,
    metrics: Option<fn(u64) -> String>,
) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    let posts = Arc::new(AtomicU64::new(0));
    let bytes_in = Arc::new(AtomicU64::new(0));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (answer, posts, bytes_in) = (answer.clone(), posts.clone(), bytes_in.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (answer, posts, bytes_in) =
                            (answer.clone(), posts.clone(), bytes_in.clone());
                        async move {
                            let get = req.method() == hyper::Method::GET;
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let (status, out) = if get && path == "/metrics" {
                                match metrics {
                                    Some(page) => (
                                        StatusCode::OK,
                                        page(bytes_in.load(Ordering::SeqCst)).into_bytes(),
                                    ),
                                    None => (StatusCode::NOT_FOUND, b"no metrics".to_vec()),
                                }
                            } else {
                                bytes_in.fetch_add(body.len() as u64, Ordering::SeqCst);
                                answer(posts.fetch_add(1, Ordering::SeqCst), &body)
                            };
                            let mut r = Response::new(Full::new(Bytes::from(out)));
                            *r.status_mut() = status;
                            Ok::<_, Infallible>(r)
                        }
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

#[test]
fn wrong_bodies_under_load_are_errors_of_their_own_kind() {
    // Every 7th answer is 200 with the wrong bytes; the check (request 0) is right.
    let addr = scripted_server(
        |n, _| {
            // Every 7th: prime to the sampling interval (16) below, so sampled requests hit
            // wrong answers whatever the offset between the two counters.
            let body: &[u8] = if n % 7 == 6 { b"wrong!" } else { b"right" };
            (StatusCode::OK, body.to_vec())
        },
        None,
    );
    let url = format!("http://{addr}/x");
    let opts = BenchOptions {
        verify_every: 1,
        connections: 2,
        ..tiny(vec![Target::Url(url.clone())])
    };
    let report = run(&opts, Path::new(NO_EXE)).unwrap();
    let t = &report.targets[0];
    let v = t.verification.as_ref().unwrap();
    let kinds = t.error_kinds.unwrap();
    assert_eq!(v.source, "check (round 1)");
    assert_eq!(v.expected_bytes, 5);
    assert!(kinds.wrong_body > 0, "{kinds:?}");
    assert_eq!(kinds.wrong_body, v.wrong_body);
    assert_eq!(t.errors, Some(kinds.wrong_body), "{kinds:?}");
    // Every response compared: the right ones are the successes, 1 in 7 is wrong.
    assert_eq!(v.verified, t.requests.unwrap() + kinds.wrong_body);
    let share = kinds.wrong_body as f64 / v.verified as f64;
    assert!((0.12..=0.17).contains(&share), "{share}: {v:?}");
    let first = v.first_mismatch.as_ref().unwrap();
    assert_eq!(
        (first.body.as_str(), first.bytes, first.round),
        ("wrong!", 6, Some(0))
    );
    let md = report.to_markdown();
    assert!(
        md.contains("first wrong body (round 1, 6 bytes): `wrong!`"),
        "{md}"
    );

    // Sampled (every 16th per connection, plus each connection's first): still caught, on
    // fewer comparisons. Request numbers are global, so some sampled ones are wrong.
    let opts = BenchOptions {
        verify_every: 16,
        connections: 1,
        ..tiny(vec![Target::Url(url.clone())])
    };
    let report = run(&opts, Path::new(NO_EXE)).unwrap();
    let t = &report.targets[0];
    let v = t.verification.as_ref().unwrap();
    let sent = t.requests.unwrap() + v.wrong_body;
    assert!(
        v.verified > 0 && v.verified <= sent / 16 + 1,
        "{v:?} of {sent}"
    );
    assert!(v.wrong_body > 0, "{v:?}");

    // Off: the same server looks perfect, which is why it is on by default.
    let opts = BenchOptions {
        verify_every: 0,
        duration: Duration::from_millis(300),
        ..tiny(vec![Target::Url(url)])
    };
    let report = run(&opts, Path::new(NO_EXE)).unwrap();
    assert_eq!(report.targets[0].errors, Some(0));
    assert_eq!(report.targets[0].verification, None);
}

#[test]
fn an_expected_body_given_up_front_must_match_the_check() {
    let addr = ceiling_server(Duration::from_secs(60));
    let opts = BenchOptions {
        expect: Some(Expect::Body(b"hello moon".to_vec())),
        duration: Duration::from_millis(300),
        ..tiny(vec![Target::Url(format!("http://{addr}/"))])
    };
    let err = run(&opts, Path::new(NO_EXE)).unwrap_err();
    let BenchError::NothingMeasured { report } = &err else {
        panic!("{err}");
    };
    let reason = report.targets[0].skipped.as_deref().unwrap();
    assert!(
        reason.contains("differs from the expected one (--expect-body"),
        "{reason}"
    );
    let opts = BenchOptions {
        expect: Some(Expect::Body(b"hello world".to_vec())),
        ..opts
    };
    let report = run(&opts, Path::new(NO_EXE)).unwrap();
    let v = report.targets[0].verification.as_ref().unwrap();
    assert_eq!((v.source.as_str(), v.wrong_body), ("--expect-body", 0));
    assert!(v.verified > 0);
}

#[test]
fn a_payload_sweep_reports_each_size_its_copies_and_a_413_as_the_rows_error() {
    // Takes bodies up to 1,000 bytes, answers their length, counts the bytes it received in
    // a labelled counter family (as the gateway's will).
    let addr = scripted_server(
        |_, body| {
            if body.len() > 1000 {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    b"body larger than 1000 bytes".to_vec(),
                )
            } else {
                (StatusCode::OK, format!("len={}", body.len()).into_bytes())
            }
        },
        Some(|bytes| {
            format!(
                "# TYPE spindle_payload_bytes_copied_total counter
                 spindle_payload_bytes_copied_total{{chain=\"x\",stage=\"ingress\"}} {bytes}
                 spindle_payload_bytes_copied_total{{chain=\"x\",stage=\"egress\"}} {bytes}
"
            )
        }),
    );
    let opts = BenchOptions {
        payload_sizes: Some(vec![13, 4096]),
        connections: 1,
        duration: Duration::from_millis(500),
        ..tiny(vec![Target::Url(format!("http://{addr}/x"))])
    };
    let report = run(&opts, Path::new(NO_EXE)).unwrap();
    assert_eq!(report.targets.len(), 2);
    let (small, big) = (&report.targets[0], &report.targets[1]);
    assert_eq!(
        (small.payload_bytes, big.payload_bytes),
        (Some(13), Some(4096))
    );
    assert_eq!(small.errors, Some(0));
    assert_eq!(small.check.as_ref().unwrap().body, "len=13");
    // Two label sets of 13 bytes per request; the scrapes bracket the window to within a
    // request or two of thousands.
    let copied = small.bytes_copied_per_req.unwrap();
    assert!((25.0..=27.0).contains(&copied), "{copied}");
    let reason = big.skipped.as_deref().unwrap();
    assert!(
        reason.starts_with("413 Payload Too Large: the target's limit is below this 4 KiB body"),
        "{reason}"
    );
    assert!(report.ratios_by_size.as_ref().is_some_and(|r| r.len() == 2));
    let md = report.to_markdown();
    assert!(md.contains("| 4 KiB | http://"), "{md}");
    assert!(md.contains("| 413 Payload Too Large"), "{md}");
}

#[test]
fn interleaved_rounds_give_medians_spreads_and_paired_ratios() {
    let exe = Path::new(env!("CARGO_BIN_EXE_hyper-hello"));
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench.yaml");
    let opts = BenchOptions {
        config,
        rounds: 2,
        connections: 2,
        idle_baseline: Duration::from_millis(300),
        ..tiny(vec![Target::Ceiling, Target::Userspace])
    };
    let report = run(&opts, exe).unwrap();
    assert_eq!(report.options.rounds, 2);
    let baselines = report.idle_baselines.as_ref().unwrap();
    assert_eq!(baselines.len(), 2);
    assert!(
        baselines
            .iter()
            .all(|b| b.busy_cpu_per_s >= 0.0 && b.duration_s >= 0.3)
    );
    for t in &report.targets {
        assert_eq!(t.skipped, None, "{}", t.name);
        let rounds = t.rounds.as_ref().unwrap();
        assert_eq!(rounds.len(), 2);
        assert_eq!(t.rounds_measured, Some(2));
        for (i, r) in rounds.iter().enumerate() {
            assert_eq!(r.round, Some(i));
            assert_eq!(r.errors, Some(0), "{:?}", r.error_kinds);
            assert!(r.rps.unwrap() > 0.0);
            let sys = r.system_cpu.as_ref().unwrap();
            // The readings may be late on a loaded machine, never far off the window.
            assert!((0.5..2.0).contains(&sys.window_s), "{sys:?}");
            assert_eq!(r.cpu_interval_s, Some(sys.window_s));
            assert!(sys.busy_s > 0.0 && sys.loadgen_s > 0.0, "{sys:?}");
            assert!(r.system_cpu_s_per_req.unwrap().is_finite());
            assert!(r.softirq_share.is_some());
        }
        // The summary is the median of the two rounds (their mean), counts their sum.
        let (a, b) = (rounds[0].rps.unwrap(), rounds[1].rps.unwrap());
        assert!(
            (t.rps.unwrap() - (a + b) / 2.0).abs() <= 0.1,
            "{a} {b} {:?}",
            t.rps
        );
        assert_eq!(
            t.requests,
            Some(rounds[0].requests.unwrap() + rounds[1].requests.unwrap())
        );
        let rps = t.spread.as_ref().unwrap().rps.as_ref().unwrap();
        assert_eq!((rps.n, rps.min, rps.max), (2, a.min(b), a.max(b)));
        // Verified against each target's first check ("hello world"), every round.
        let v = t.verification.as_ref().unwrap();
        assert_eq!(
            (v.source.as_str(), v.expected_bytes),
            ("check (round 1)", 11)
        );
        assert!(v.verified >= 4, "{v:?}");
        assert_eq!(v.wrong_body, 0);
        // The ceiling answers "hello world" to /metrics too: no counter, said so.
        assert_eq!(t.bytes_copied_per_req, None);
        assert!(
            t.bytes_copied_note
                .as_deref()
                .unwrap()
                .starts_with("not exposed")
        );
    }
    let paired = &report.ratios.per_round.as_ref().unwrap()["spindle_userspace_over_ceiling_rps"];
    assert_eq!(paired.rounds.len(), 2);
    for (i, ratio) in paired.rounds.iter().enumerate() {
        let r = |t: usize| report.targets[t].rounds.as_ref().unwrap()[i].rps.unwrap();
        assert!((ratio.unwrap() - r(1) / r(0)).abs() < 1e-3, "{paired:?}");
    }
    assert!(report.ratios.spindle_userspace_over_ceiling_rps.is_some());
    assert!(report.ratios.spindle_userspace_over_ceiling_cpu.is_some());
    let md = report.to_markdown();
    assert!(md.contains("2 interleaved rounds"), "{md}");
    assert!(md.contains("over 2 rounds]"), "{md}");
    // The JSON has every round (floats aside, which JSON may round in the last digit).
    let back: Report = serde_json::from_str(&report.to_json()).unwrap();
    for (b, t) in back.targets.iter().zip(&report.targets) {
        assert_eq!(b.rounds.as_ref().unwrap().len(), 2);
        assert_eq!((b.rps, b.requests, b.round), (t.rps, t.requests, None));
        assert_eq!(b.rounds.as_ref().unwrap()[1].round, Some(1));
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

#[test]
fn hops_mode_measures_every_chain_and_the_floor_in_one_run() {
    // hyper-hello stands in for Spindle (it answers every route alike, so the slope is only
    // noise here; what is tested is the plumbing: generated config, per-path checks and
    // verification, the fit, the floor, the report).
    let exe = Path::new(env!("CARGO_BIN_EXE_hyper-hello"));
    let dir = scratch("hops");
    let opts = HopsOptions {
        targets: vec![Target::Userspace],
        duration: Duration::from_millis(300),
        warmup: Duration::from_millis(100),
        // Any file: the stand-in never loads it.
        module: Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"),
        floor_round_trips: 2000,
        json: Some(dir.join("hops.json")),
        ..HopsOptions::default()
    };
    let report = run_hops(&opts, exe).unwrap();
    assert!(
        report
            .config
            .contains("route: /h6, steps: [h1, h2, h3, h4, h5, h6]")
    );
    let t = &report.targets[0];
    assert_eq!(t.skipped, None);
    let paths: Vec<&str> = t.points.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["/h1", "/h3", "/h6"]);
    for p in &t.points {
        assert!(p.p50_us.unwrap() > 0.0, "{p:?}");
        assert_eq!(p.errors, 0, "{p:?}");
        assert!(p.verified > 0, "{p:?}");
        assert_eq!(p.transitions, p.functions + 1);
    }
    assert!(t.per_hop_p50_us.unwrap().is_finite());
    assert_eq!(t.per_hop_p50_rounds.len(), 1);
    assert_eq!(report.floor.variants.len(), 4);
    for v in &report.floor.variants {
        assert!(v.one_way_p50_us.unwrap() > 0.0, "{v:?}");
        assert_eq!(v.rounds.len(), 1);
    }
    let md = report.to_markdown();
    assert!(md.contains("| Unix socketpair, spinning |"), "{md}");
    assert!(md.contains("| Spindle userspace |"), "{md}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("hops.json")).unwrap()).unwrap();
    assert_eq!(json["targets"][0]["points"][2]["functions"], 6);
    let _ = std::fs::remove_dir_all(&dir);
}
