//! Large payloads: the real binary on configs/large.yaml (the hello chain with a class of
//! 16 MiB slots), bodies far over the small slot size answered byte for byte, the limit
//! enforced above the largest class, a chunked body moved to a large slot, an exhausted
//! large class answered 503, every slot back afterwards, and every payload copy counted.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::Spindle;

const MIB: usize = 1 << 20;
const SMALL_SLOTS: f64 = 1024.0;
const LARGE_SLOTS: f64 = 8.0;

/// A deterministic body of valid UTF-8 mixing what each function treats specially:
/// lowercase ASCII (uppercase), multi-byte code points (reverse keeps them whole), quotes,
/// backslashes and control characters (frame escapes them).
fn body(len: usize) -> String {
    const PIECES: [&str; 12] = [
        "hello ", "spindle", "\"q\"", "\\", "\n", "\t", "ñ", "€", "\u{1}", "𝄞", "Zz", "0123",
    ];
    let mut s = String::with_capacity(len + 8);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while s.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(PIECES[(x % PIECES.len() as u64) as usize]);
    }
    while s.len() > len {
        s.pop();
    }
    s
}

/// What uppercase → reverse → frame answer for `input` (examples/src/*.c, for valid UTF-8).
fn hello_answer(input: &str) -> Vec<u8> {
    let upper = input.to_ascii_uppercase();
    let reversed: String = upper.chars().rev().collect();
    let mut out = String::from("{\"result\":\"");
    for c in reversed.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push_str(&format!("\",\"bytes\":{}}}", reversed.len()));
    out.into_bytes()
}

async fn metric(spindle: &Spindle, series: &str) -> f64 {
    spindle
        .metric(series)
        .await
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

async fn copied(spindle: &Spindle, process: &str, copy: &str) -> f64 {
    metric(
        spindle,
        &format!(
            r#"spindle_payload_bytes_copied_total{{chain="hello",copy="{copy}",process="{process}"}}"#
        ),
    )
    .await
}

/// Waits until every slot of both classes is free again (a slot is released when its
/// answer has been copied out, just after the client may have seen it).
async fn assert_all_slots_back(spindle: &Spindle) {
    let series = |class: &str| {
        format!(r#"spindle_arena_class_slots{{chain="hello",class="{class}",state="free"}}"#)
    };
    for _ in 0..100 {
        if spindle.metric(&series("small")).await == Some(SMALL_SLOTS)
            && spindle.metric(&series("large")).await == Some(LARGE_SLOTS)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(spindle, &series("small")).await, SMALL_SLOTS);
    assert_eq!(metric(spindle, &series("large")).await, LARGE_SLOTS);
    assert_eq!(
        metric(
            spindle,
            r#"spindle_arena_slots{chain="hello",state="free"}"#
        )
        .await,
        SMALL_SLOTS + LARGE_SLOTS
    );
}

/// Sends `head` then `chunks` as a chunked body on a raw connection and returns the status
/// and body of the answer (Content-Length framed, as the gateway answers).
fn raw_chunked(addr: &str, path: &str, chunks: &[&[u8]]) -> (u16, Vec<u8>) {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).unwrap();
    for chunk in chunks {
        // The gateway may answer 413 and close before it has read everything.
        if conn
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .and_then(|_| conn.write_all(chunk))
            .and_then(|_| conn.write_all(b"\r\n"))
            .is_err()
        {
            break;
        }
    }
    let _ = conn.write_all(b"0\r\n\r\n");
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&answer)));
    let head = String::from_utf8_lossy(&answer[..end]).to_string();
    let status = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no content-length in {head}"));
    let body = answer[end + 4..].to_vec();
    assert_eq!(body.len(), len, "{head}");
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_mib_body_through_configs_large_yaml_is_answered_byte_for_byte() {
    let spindle = Spindle::start_file("large-10mib", "configs/large.yaml").await;
    assert_all_slots_back(&spindle).await;

    let input = body(10 * MIB);
    let want = hello_answer(&input);
    assert!(want.len() > 10 * MIB);
    let r = spindle.post("/hello", input.clone()).await;
    assert_eq!(r.status, 200, "{}", &r.text()[..r.text().len().min(300)]);
    assert_eq!(r.content_type, "application/json");
    assert_eq!(r.body.len(), want.len());
    assert!(r.body == want, "the answer differs from the model");

    // A small request on the same chain still goes through the small slots.
    let r = spindle.post("/hello", "hello spindle").await;
    assert_eq!(r.text(), r#"{"result":"ELDNIPS OLLEH","bytes":13}"#);
    assert_all_slots_back(&spindle).await;

    // Exact copy accounting for the two requests: the gateway copied each body in and each
    // answer out once, each function its input in and its output out once.
    let (n, small) = (input.len() as f64, 13.0);
    let framed = (want.len() + r#"{"result":"ELDNIPS OLLEH","bytes":13}"#.len()) as f64;
    assert_eq!(copied(&spindle, "gateway", "request_body").await, n + small);
    assert_eq!(copied(&spindle, "gateway", "class_move").await, 0.0);
    assert_eq!(copied(&spindle, "gateway", "response_body").await, framed);
    for f in ["uppercase", "reverse", "frame"] {
        assert_eq!(
            copied(&spindle, f, "function_input").await,
            n + small,
            "{f}"
        );
    }
    for f in ["uppercase", "reverse"] {
        assert_eq!(
            copied(&spindle, f, "function_output").await,
            n + small,
            "{f}"
        );
    }
    assert_eq!(copied(&spindle, "frame", "function_output").await, framed);
}

/// A body the size of a small slot whose answer is larger than one (frame adds its JSON and
/// escapes): with `large.above`, such bodies start in a large slot, so the answer fits;
/// bodies at or under `above` stay in the small slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_whose_answer_outgrows_a_small_slot_start_in_a_large_one() {
    let spindle = Spindle::start_file("large-headroom", "configs/large.yaml").await;
    for len in [64 * 1024, 40 * 1024, 8 * 1024] {
        let input = body(len);
        let want = hello_answer(&input);
        let r = spindle.post("/hello", input.clone()).await;
        assert_eq!(
            r.status,
            200,
            "{len}: {}",
            &r.text()[..r.text().len().min(300)]
        );
        assert!(r.body == want, "{len}: the answer differs from the model");
    }
    // Three large-class requests one after another: never short of a large slot.
    assert_eq!(
        metric(
            &spindle,
            r#"spindle_arena_class_alloc_failures_total{chain="hello",class="large"}"#
        )
        .await,
        0.0
    );
    assert_all_slots_back(&spindle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_largest_class_get_413_and_chunked_ones_move_to_a_large_slot() {
    let spindle = Spindle::start_file("large-limits", "configs/large.yaml").await;

    // Content-Length one byte over 16 MiB: refused before the body is read.
    let r = spindle.post("/hello", vec![b'a'; 16 * MIB + 1]).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains("16777216"), "{}", r.text());
    assert_eq!(copied(&spindle, "gateway", "request_body").await, 0.0);

    // Chunked, no length: starts in a 64 KiB slot, moves to a large one past it.
    let input = body(MIB + 12345);
    let addr = spindle.addr.clone();
    let sent = input.clone();
    let (status, answer) = tokio::task::spawn_blocking(move || {
        let chunks: Vec<&[u8]> = sent.as_bytes().chunks(40_000).collect();
        raw_chunked(&addr, "/hello", &chunks)
    })
    .await
    .unwrap();
    assert_eq!(
        status,
        200,
        "{}",
        String::from_utf8_lossy(&answer[..answer.len().min(300)])
    );
    assert!(
        answer == hello_answer(&input),
        "the answer differs from the model"
    );
    // What had arrived when the small slot overflowed was moved over, once: at most the
    // small slot's 64 KiB (hyper may hand a chunk over in several frames, so exactly how
    // much depends on the reads).
    let moved = copied(&spindle, "gateway", "class_move").await;
    assert!(moved > 0.0 && moved <= 65536.0, "moved {moved}");
    assert_eq!(
        copied(&spindle, "gateway", "request_body").await,
        input.len() as f64
    );

    // Chunked past 16 MiB: cut off with 413 while copying.
    let chunk = vec![b'z'; MIB];
    let addr = spindle.addr.clone();
    let (status, _) = tokio::task::spawn_blocking(move || {
        let chunks: Vec<&[u8]> = (0..17).map(|_| chunk.as_slice()).collect();
        raw_chunked(&addr, "/hello", &chunks)
    })
    .await
    .unwrap();
    assert_eq!(status, 413);
    assert_all_slots_back(&spindle).await;
    assert_eq!(
        metric(
            &spindle,
            r#"spindle_arena_alloc_failures_total{chain="hello"}"#
        )
        .await,
        0.0
    );
}

const SLEEPY_LARGE: &str = r#"
functions:
  - name: faulty
    module: {wasm:faulty}
    instances: 4
    timeout_ms: 5000
chains:
  - name: hello
    route: /hello
    steps: [faulty]
    timeout_ms: 8000
    arena: { slot_size: 1KiB, slots: 8, large: { slot_size: 64KiB, slots: 2 } }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_large_class_is_503_with_retry_after_and_counted() {
    let spindle = Arc::new(Spindle::start("large-503", SLEEPY_LARGE).await);
    let sleeper = || {
        let mut b = b"sleep 800 ".to_vec();
        b.resize(4096, b'x');
        b
    };
    let mut held = Vec::new();
    for _ in 0..2 {
        let s = Arc::clone(&spindle);
        let b = sleeper();
        held.push(tokio::spawn(async move { s.post("/hello", b).await }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let req = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://{}/hello", spindle.addr))
        .body(http_body_util::Full::new(bytes::Bytes::from(sleeper())))
        .unwrap();
    let resp = spindle.client.request(req).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    // Small requests still get small slots meanwhile.
    assert_eq!(spindle.post("/hello", "small").await.status, 200);
    for h in held {
        let r = h.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, sleeper(), "a 4 KiB body echoed from a large slot");
    }
    let class_failures = |class: &str| {
        format!(r#"spindle_arena_class_alloc_failures_total{{chain="hello",class="{class}"}}"#)
    };
    assert_eq!(metric(&spindle, &class_failures("large")).await, 1.0);
    assert_eq!(metric(&spindle, &class_failures("small")).await, 0.0);
    assert_eq!(
        metric(
            &spindle,
            r#"spindle_arena_alloc_failures_total{chain="hello"}"#
        )
        .await,
        1.0
    );
    for (class, total) in [("small", 8.0), ("large", 2.0)] {
        let free =
            format!(r#"spindle_arena_class_slots{{chain="hello",class="{class}",state="free"}}"#);
        let mut now = 0.0;
        for _ in 0..100 {
            now = metric(&spindle, &free).await;
            if now == total {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(now, total, "{class} slots back");
    }
}

const IN_PLACE_CONFIG: &str = r#"
functions:
  - { name: uppercase_inplace, module: "{wasm:uppercase_inplace}", memory: 48MiB, timeout_ms: 5000, fuel: 5_000_000_000 }
  - { name: reverse_inplace, module: "{wasm:reverse_inplace}", memory: 48MiB, timeout_ms: 5000, fuel: 5_000_000_000 }
  - { name: uppercase, module: "{wasm:uppercase}", memory: 48MiB, timeout_ms: 5000, fuel: 5_000_000_000 }
  - { name: reverse, module: "{wasm:reverse}", memory: 48MiB, timeout_ms: 5000, fuel: 5_000_000_000 }
  - { name: frame, module: "{wasm:frame}", memory: 160MiB, timeout_ms: 5000, fuel: 20_000_000_000 }
chains:
  - name: inplace
    route: /inplace
    steps: [uppercase_inplace, reverse_inplace, frame]
    timeout_ms: 20000
    arena: { slot_size: 64KiB, slots: 64, large: { slot_size: 16MiB, slots: 2 } }
  - name: hello
    route: /hello
    steps: [uppercase, reverse, frame]
    timeout_ms: 20000
    arena: { slot_size: 64KiB, slots: 64, large: { slot_size: 16MiB, slots: 2 } }
"#;

async fn chain_copied(
    spindle: &Spindle,
    chain: &str,
    family: &str,
    process: &str,
    copy: &str,
) -> f64 {
    metric(
        spindle,
        &format!(r#"{family}{{chain="{chain}",copy="{copy}",process="{process}"}}"#),
    )
    .await
}

/// The same 10 MiB request through functions that handle it in place (the slot mapped into
/// their memory) and through the plain ones: the same answer, and the in-place functions
/// copy nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_functions_answer_the_same_and_copy_nothing() {
    let spindle = Spindle::start("large-inplace", IN_PLACE_CONFIG).await;
    let input = body(10 * MIB);
    let want = hello_answer(&input);
    for route in ["/inplace", "/hello"] {
        let r = spindle.post(route, input.clone()).await;
        assert_eq!(
            r.status,
            200,
            "{route}: {}",
            &r.text()[..r.text().len().min(300)]
        );
        assert!(r.body == want, "{route}: the answer differs from the model");
    }
    let n = input.len() as f64;
    const COPIED: &str = "spindle_payload_bytes_copied_total";
    const IN_PLACE: &str = "spindle_payload_bytes_in_place_total";
    for f in ["uppercase_inplace", "reverse_inplace"] {
        for copy in ["function_input", "function_output"] {
            assert_eq!(
                chain_copied(&spindle, "inplace", COPIED, f, copy).await,
                0.0,
                "{f} {copy}"
            );
            assert_eq!(
                chain_copied(&spindle, "inplace", IN_PLACE, f, copy).await,
                n,
                "{f} {copy}"
            );
        }
    }
    for f in ["uppercase", "reverse"] {
        for copy in ["function_input", "function_output"] {
            assert_eq!(
                chain_copied(&spindle, "hello", COPIED, f, copy).await,
                n,
                "{f} {copy}"
            );
            assert_eq!(
                chain_copied(&spindle, "hello", IN_PLACE, f, copy).await,
                0.0,
                "{f} {copy}"
            );
        }
    }
    // frame has no in-place entry point: it copies on both chains.
    for chain in ["inplace", "hello"] {
        assert_eq!(
            chain_copied(&spindle, chain, COPIED, "frame", "function_input").await,
            n
        );
        assert_eq!(
            chain_copied(&spindle, chain, COPIED, "frame", "function_output").await,
            want.len() as f64
        );
    }

    // A small body on the in-place chain takes the copy path (mapping does not pay there).
    let r = spindle.post("/inplace", "hello spindle").await;
    assert_eq!(r.text(), r#"{"result":"ELDNIPS OLLEH","bytes":13}"#);
    assert_eq!(
        chain_copied(
            &spindle,
            "inplace",
            COPIED,
            "uppercase_inplace",
            "function_input"
        )
        .await,
        13.0
    );
    // Another large one after it: the window is reused, the answer still right.
    let second = body(3 * MIB + 7);
    let r = spindle.post("/inplace", second.clone()).await;
    assert!(r.status == 200 && r.body == hello_answer(&second));
    assert_eq!(
        chain_copied(
            &spindle,
            "inplace",
            IN_PLACE,
            "uppercase_inplace",
            "function_input"
        )
        .await,
        n + second.len() as f64
    );
}
