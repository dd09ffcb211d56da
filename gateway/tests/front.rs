//! The HTTP front's limits over real TCP against the real binary: a connection past
//! `http.max_connections` is answered 503 and closed while the admitted ones keep working,
//! idle keep-alive connections are closed after `http.idle_timeout_ms` (and counted), and a
//! request slower than the idle timeout is never cut.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Spindle;

const LIMITED: &str = r#"
http: { max_connections: 4, idle_timeout_ms: 400 }
functions:
  - { name: upper, module: "{wasm:uppercase}" }
  - { name: sleeper, module: "{sleeper}", timeout_ms: 5000 }
chains:
  - { name: up, route: /up, steps: [upper], content_type: text/plain }
  - { name: slow, route: /slow, steps: [sleeper], content_type: text/plain }
"#;

async fn start(tag: &str) -> Spindle {
    let dir = common::temp_dir(&format!("{tag}-wat"));
    let module = dir.join("sleeper.wat");
    // Longer than the idle timeout.
    std::fs::write(&module, common::sleeper_wat(900)).unwrap();
    let yaml = LIMITED.replace("{sleeper}", &module.display().to_string());
    Spindle::start(tag, &yaml).await
}

/// One keep-alive POST on `stream`; the whole response as text.
fn post(stream: &mut TcpStream, path: &str, body: &str) -> String {
    // A refused connection may already be closed for writing: its answer is still there.
    let _ = write!(
        stream,
        "POST {path} HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    read_response(stream)
}

fn read_response(stream: &mut TcpStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                break;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// True once the server has closed `stream` (read returns 0).
fn closed_by_server(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 16];
    matches!(stream.read(&mut buf), Ok(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_the_limit_gets_503_and_idle_ones_are_closed() {
    let spindle = start("front-limits").await;
    let addr = spindle.addr.clone();
    let checks = tokio::task::spawn_blocking(move || {
        // The harness's own client may hold a pooled connection: fill the rest.
        let mut admitted = Vec::new();
        let mut refused = None;
        for i in 0..6 {
            let mut s = TcpStream::connect(&addr).unwrap();
            let answer = post(&mut s, "/up", &format!("c{i}"));
            if answer.starts_with("HTTP/1.1 200") {
                assert!(answer.ends_with(&format!("C{i}")), "{answer}");
                admitted.push(s);
            } else {
                refused = Some(answer);
                break;
            }
        }
        let refused = refused.expect("a connection past max_connections: 4 was refused");
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        assert!(refused.contains("retry-after: 1"), "{refused}");
        assert!(refused.contains("connection limit"), "{refused}");
        assert!(admitted.len() <= 4, "at most the limit: {}", admitted.len());
        // The admitted ones still serve...
        let answer = post(&mut admitted[0], "/up", "again");
        assert!(answer.ends_with("AGAIN"), "{answer}");
        // ... until they sit idle past the timeout.
        let began = Instant::now();
        for s in &mut admitted {
            assert!(
                closed_by_server(s, Duration::from_secs(3)),
                "an idle connection is closed"
            );
        }
        let took = began.elapsed();
        assert!(
            took >= Duration::from_millis(300),
            "not before the timeout: {took:?}"
        );
        (admitted.len(), took)
    })
    .await
    .unwrap();
    eprintln!(
        "admitted {}, idle ones closed after {:?}",
        checks.0, checks.1
    );
    // Room again: a new connection is served.
    assert_eq!(spindle.post("/up", "later").await.text(), "LATER");
    let refused = spindle
        .metric(r#"spindle_http_connections_refused_total{reason="at_capacity"}"#)
        .await
        .unwrap();
    assert!(refused >= 1.0, "{refused}");
    let idle = spindle
        .metric(r#"spindle_http_connections_closed_total{reason="idle"}"#)
        .await
        .unwrap();
    assert!(idle >= checks.0 as f64, "{idle}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_slower_than_the_idle_timeout_is_not_cut() {
    let spindle = start("front-slow").await;
    let addr = spindle.addr.clone();
    tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        let began = Instant::now();
        let answer = post(&mut s, "/slow", "slow");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("slow"), "{answer}");
        assert!(began.elapsed() >= Duration::from_millis(900));
    })
    .await
    .unwrap();
}

/// CPU time (utime + stime, clock ticks) of each of the gateway's threads named `dataplane-*`.
fn dataplane_threads(pid: i32) -> Vec<(String, u64)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        let comm = comm.trim().to_string();
        if !comm.starts_with("dataplane-") {
            continue;
        }
        let stat = std::fs::read_to_string(task.join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is 3rd, utime 14th, stime 15th.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = fields
            .get(11)
            .and_then(|u| u.parse::<u64>().ok())
            .unwrap_or(0)
            + fields
                .get(12)
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0);
        threads.push((comm, ticks));
    }
    threads.sort();
    threads
}

/// `http.shards: 2`: two dataplane threads, each with its own SO_REUSEPORT listener on the one
/// address; the kernel spreads new connections over both, every request is answered right,
/// and both threads do the work. With the default, one dataplane thread serves everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_fronts_split_connections_over_their_threads_and_answer_each_right() {
    const SHARDED: &str = r#"
http: { shards: 2 }
functions:
  - { name: upper, module: "{wasm:uppercase}" }
chains:
  - { name: up, route: /up, steps: [upper], content_type: text/plain }
"#;
    let spindle = Spindle::start("front-shards", SHARDED).await;
    let addr = spindle.addr.clone();
    let pid = spindle.pid();
    let before = dataplane_threads(pid);
    assert_eq!(
        before.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["dataplane-0", "dataplane-1"]
    );
    let answered = tokio::task::spawn_blocking(move || {
        let mut answered = 0;
        // Many short connections: SO_REUSEPORT hashes each to one listener.
        for i in 0..64 {
            let mut stream = TcpStream::connect(&addr).unwrap();
            for j in 0..20 {
                let body = format!("shard {i} {j}");
                let reply = post(&mut stream, "/up", &body);
                assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
                assert!(reply.ends_with(&body.to_uppercase()), "{reply}");
                answered += 1;
            }
        }
        answered
    })
    .await
    .unwrap();
    assert_eq!(answered, 64 * 20);
    let after = dataplane_threads(pid);
    for ((name, was), (_, now)) in before.iter().zip(&after) {
        assert!(
            now > was,
            "{name} did none of the work: {before:?} -> {after:?}"
        );
    }

    let single = Spindle::start(
        "front-one-shard",
        &SHARDED.replace("http: { shards: 2 }\n", ""),
    )
    .await;
    let names: Vec<String> = dataplane_threads(single.pid())
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["dataplane-0"]);
}
