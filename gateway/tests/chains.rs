//! End-to-end: the real `spindle` binary, real HTTP, real Wasm functions in worker processes.

mod common;

use std::sync::Arc;

use common::Spindle;

const HELLO: &str = r#"
functions:
  - name: uppercase
    module: {wasm:uppercase}
  - name: reverse
    module: {wasm:reverse}
  - name: frame
    module: {wasm:frame}
    instances: 2
chains:
  - name: hello
    route: /hello
    steps: [uppercase, reverse, frame]
    content_type: application/json
    arena: { slot_size: 4KiB, slots: 64 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_function_chain_applies_each_function_in_order() {
    let mut spindle = Spindle::start("hello", HELLO).await;
    let r = spindle.post("/hello", "hello spindle").await;
    assert_eq!(r.status, 200, "{}", r.text());
    // uppercase, then reverse, then frame as JSON: each function's effect is visible.
    assert_eq!(r.text(), r#"{"result":"ELDNIPS OLLEH","bytes":13}"#);
    assert_eq!(r.content_type, "application/json");

    let r = spindle.post("/hello", "").await;
    assert_eq!(
        (r.status, r.text()),
        (200, r#"{"result":"","bytes":0}"#.to_string())
    );

    let r = spindle.post("/hello", "say \"hi\"\n").await;
    assert_eq!(r.text(), r#"{"result":"\n\"IH\" YAS","bytes":9}"#);

    assert_eq!(spindle.get("/healthz").await.status, 200);
    assert_eq!(spindle.get("/readyz").await.status, 200);
    let status = spindle.stop();
    assert!(
        status.success(),
        "spindle exit on SIGTERM: {status}\n{}",
        spindle.log()
    );
    assert!(
        spindle.worker_pids("uppercase").is_empty(),
        "workers left behind after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_concurrent_requests_all_answered_and_no_slot_leaks() {
    let spindle = Arc::new(Spindle::start("load", HELLO).await);
    let total = 2000;
    let concurrency = 32;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (spindle, next) = (Arc::clone(&spindle), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return ok;
                }
                let body = format!("request {i} abc");
                let expected: String = body.to_uppercase().chars().rev().collect();
                let r = spindle.post("/hello", body.clone()).await;
                assert_eq!(r.status, 200, "request {i}: {}", r.text());
                assert_eq!(
                    r.text(),
                    format!(r#"{{"result":"{expected}","bytes":{}}}"#, body.len())
                );
                ok += 1;
            }
        }));
    }
    let mut answered = 0;
    for t in tasks {
        answered += t.await.expect("client task");
    }
    assert_eq!(answered, total);
    let free = spindle
        .metric(r#"spindle_arena_slots{chain="hello",state="free"}"#)
        .await;
    assert_eq!(free, Some(64.0), "every slot back in the free list");
    let ok = spindle
        .metric(r#"spindle_requests_total{chain="hello",code="200"}"#)
        .await;
    assert_eq!(ok, Some(total as f64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_chain_routes_by_request() {
    let yaml = r#"
functions:
  - { name: frontend, module: "{wasm:frontend}" }
  - { name: cart, module: "{wasm:cart}" }
  - { name: catalog, module: "{wasm:catalog}" }
  - { name: currency, module: "{wasm:currency}" }
chains:
  - name: shop
    route: /shop
    entry: frontend
    functions: [frontend, cart, catalog, currency]
    max_hops: 4
    content_type: text/plain
"#;
    let spindle = Spindle::start("boutique", yaml).await;
    let home = spindle.post("/shop", "home").await;
    assert_eq!(
        (home.status, home.text()),
        (200, "welcome to the boutique".to_string())
    );
    let product = spindle.post("/shop", "product OLJCESPC7Z").await;
    assert_eq!(product.status, 200, "{}", product.text());
    assert_eq!(product.text(), "product OLJCESPC7Z: Sunglasses, 19.99 USD");
    let cart = spindle.post("/shop", "cart add socks").await;
    assert_eq!(
        (cart.status, cart.text()),
        (200, "cart: added socks".to_string())
    );
    let converted = spindle.post("/shop", "convert 12.00 EUR").await;
    assert_eq!(converted.status, 200, "{}", converted.text());
    assert!(
        converted.text().starts_with("12.00 USD = "),
        "currency answered: {}",
        converted.text()
    );
    // frontend -> cart -> currency: a second dynamic hop chosen by a non-frontend function.
    let total = spindle.post("/shop", "cart total 30.00 EUR").await;
    assert_eq!(total.status, 200, "{}", total.text());
    assert!(
        total.text().starts_with("30.00 USD = "),
        "cart handed on to currency: {}",
        total.text()
    );
    let unknown = spindle.post("/shop", "refund 3").await;
    assert_eq!(unknown.status, 500);
    assert!(
        unknown.text().contains("function frontend") && unknown.text().contains("refund"),
        "{}",
        unknown.text()
    );
}
