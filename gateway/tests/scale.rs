//! Instances on demand, over real HTTP against the real binary: an autoscaled function forks
//! instances as load rises and retires them when it falls, scales to zero and serves the
//! first request after by a fork, and requests that arrive while a function has no ready
//! instance wait for one instead of failing — also when its only instance is SIGKILLed
//! under load, which then fails only what that instance held.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Spindle;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Starts spindle on `yaml`, where `{sleeper}` is a module sleeping `sleep_ms` per call.
async fn start(tag: &str, yaml: &str, sleep_ms: u64) -> Spindle {
    let dir = common::temp_dir(&format!("{tag}-wat"));
    let module = dir.join("sleeper.wat");
    std::fs::write(&module, common::sleeper_wat(sleep_ms)).unwrap();
    let yaml = yaml.replace("{sleeper}", &module.display().to_string());
    Spindle::start(tag, &yaml).await
}

fn series(name: &str, chain: &str, function: &str) -> String {
    format!(r#"{name}{{chain="{chain}",function="{function}"}}"#)
}

fn starts(chain: &str, function: &str, mode: &str) -> String {
    format!(
        r#"spindle_instance_starts_total{{chain="{chain}",function="{function}",mode="{mode}"}}"#
    )
}

async fn eventually(what: &str, limit: Duration, mut probe: impl AsyncFnMut() -> bool) {
    let began = Instant::now();
    while began.elapsed() < limit {
        if probe().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("not within {limit:?}: {what}");
}

/// `clients` closed-loop clients POSTing to `path` until `until`; every reply's status, and
/// the highest instance count seen meanwhile by `watch`.
async fn load(
    spindle: &Arc<Spindle>,
    path: &'static str,
    clients: usize,
    until: Instant,
) -> HashMap<u16, usize> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let spindle = Arc::clone(spindle);
        tasks.push(tokio::spawn(async move {
            let mut codes: HashMap<u16, usize> = HashMap::new();
            let mut i = 0u64;
            while Instant::now() < until {
                let body = format!("c{c} r{i}");
                let reply = spindle
                    .try_request("POST", path, body.clone().into_bytes())
                    .await
                    .unwrap_or_else(|e| panic!("POST {path}: {e}"));
                if reply.status == 200 {
                    assert_eq!(reply.text(), body, "an answer for this very request");
                }
                *codes.entry(reply.status).or_default() += 1;
                i += 1;
            }
            codes
        }));
    }
    let mut all: HashMap<u16, usize> = HashMap::new();
    for t in tasks {
        for (code, n) in t.await.unwrap() {
            *all.entry(code).or_default() += n;
        }
    }
    all
}

const AUTOSCALED: &str = r#"
functions:
  - name: sleeper
    module: "{sleeper}"
    instances:
      min: 1
      max: 6
      stable_window_ms: 1000
      panic_window_ms: 200
      scale_down_delay_ms: 300
chains:
  - name: s
    route: /s
    steps: [sleeper]
    content_type: text/plain
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_forks_instances_up_to_the_demand_and_idleness_retires_them_back_to_min() {
    let spindle = Arc::new(start("scale-out", AUTOSCALED, 10).await);
    let up = series("spindle_instances_up", "s", "sleeper");
    assert_eq!(spindle.metric(&up).await, Some(1.0), "min: 1 at start");

    // Eight clients with a 10 ms guest: concurrency 8, target 1 per instance, max 6.
    let until = Instant::now() + Duration::from_millis(2500);
    let watcher = {
        let spindle = Arc::clone(&spindle);
        let up = up.clone();
        tokio::spawn(async move {
            let mut most = 0.0f64;
            while Instant::now() < until {
                most = most.max(spindle.metric(&up).await.unwrap_or(0.0));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            most
        })
    };
    let codes = load(&spindle, "/s", 8, until).await;
    let most = watcher.await.unwrap();
    assert_eq!(
        codes.keys().copied().collect::<Vec<_>>(),
        vec![200],
        "{codes:?}"
    );
    assert!(most >= 4.0, "instances up under load: at most {most}");
    assert!(most <= 6.0, "never above max: {most}");
    let forks = spindle
        .metric(&starts("s", "sleeper", "fork"))
        .await
        .unwrap();
    assert!(forks >= 4.0, "new instances are forks: {forks}");
    assert_eq!(spindle.metric(&starts("s", "sleeper", "exec")).await, None);
    let ups = spindle
        .metric(r#"spindle_scale_events_total{chain="s",direction="up",function="sleeper"}"#)
        .await
        .unwrap();
    assert!(ups >= 3.0, "scale-ups counted: {ups}");

    // Idle: a stable window (1 s) plus the scale-down delay, and the extra ones are retired.
    eventually("back to min: 1", Duration::from_secs(8), async || {
        spindle.metric(&up).await == Some(1.0) && spindle.worker_pids("sleeper").len() == 1
    })
    .await;
    assert!(
        spindle
            .metric(r#"spindle_scale_events_total{chain="s",direction="down",function="sleeper"}"#)
            .await
            .unwrap()
            >= 3.0
    );
    assert_eq!(
        spindle
            .metric(&series("spindle_instances_desired", "s", "sleeper"))
            .await,
        Some(1.0)
    );
    assert!(spindle.log().contains("instance retired"));
    // Retiring lost nothing, and the one left still serves.
    assert_eq!(spindle.post("/s", "after").await.text(), "after");
    let crashed: f64 = spindle
        .metric(r#"spindle_function_errors_total{chain="s",function="sleeper",kind="crash"}"#)
        .await
        .unwrap_or(0.0);
    assert_eq!(crashed, 0.0);
}

/// Two functions that both scale to zero: with the kernel dataplane the second one's
/// request comes back from the kernel as undeliverable and waits in the gateway too.
const FROM_ZERO: &str = r#"
functions:
  - name: upper
    module: {wasm:uppercase}
    instances: { min: 0, max: 2, stable_window_ms: 300, panic_window_ms: 100, scale_down_delay_ms: 100 }
  - name: sleeper
    module: "{sleeper}"
    instances: { min: 0, max: 2, stable_window_ms: 300, panic_window_ms: 100, scale_down_delay_ms: 100 }
chains:
  - name: z
    route: /z
    steps: [upper, sleeper]
    content_type: text/plain
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_scaled_to_zero_serves_its_next_request_from_a_fork() {
    let spindle = start("scale-zero", FROM_ZERO, 1).await;
    for f in ["upper", "sleeper"] {
        assert_eq!(
            spindle
                .metric(&series("spindle_instances_up", "z", f))
                .await,
            Some(0.0)
        );
        // Until it names itself, a starting zygote looks like a worker.
        eventually("the zygote is warm", Duration::from_secs(10), async || {
            spindle.zygote_pids(f).len() == 1
        })
        .await;
        assert!(
            spindle.worker_pids(f).is_empty(),
            "min: 0 starts no {f} instance"
        );
        let images = format!(r#"spindle_local_images_alive{{chain="z",function="{f}"}}"#);
        eventually(
            "the zygote's warm image is up",
            Duration::from_secs(10),
            async || spindle.metric(&images).await == Some(1.0),
        )
        .await;
    }
    for round in 1..=3 {
        let began = Instant::now();
        let reply = spindle.post("/z", format!("round {round}")).await;
        let took = began.elapsed();
        assert_eq!(
            (reply.status, reply.text()),
            (200, format!("ROUND {round}")),
            "{}",
            spindle.log()
        );
        eprintln!("round {round}: first request from zero took {took:?}");
        for f in ["upper", "sleeper"] {
            assert_eq!(
                spindle.metric(&starts("z", f, "fork")).await,
                Some(f64::from(round)),
                "{f}: one fork per round"
            );
        }
        eventually("both back to zero", Duration::from_secs(5), async || {
            spindle.worker_pids("upper").is_empty() && spindle.worker_pids("sleeper").is_empty()
        })
        .await;
    }
    let waited = spindle
        .metric(r#"spindle_request_wait_seconds_count{chain="z",function="sleeper"}"#)
        .await
        .unwrap();
    assert_eq!(
        waited, 3.0,
        "each round's request waited for a sleeper fork"
    );
    assert_eq!(
        spindle
            .metric(r#"spindle_requests_wait_expired_total{chain="z",function="upper"}"#)
            .await,
        Some(0.0)
    );
    assert_eq!(spindle.get("/readyz").await.status, 200, "ready at zero");
}

const ONE_INSTANCE: &str = r#"
functions:
  - name: sleeper
    module: "{sleeper}"
    instances: 1
chains:
  - name: one
    route: /one
    steps: [sleeper]
    content_type: text/plain
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_wait_while_a_killed_instance_is_replaced_and_only_what_it_held_fails() {
    let spindle = Arc::new(start("scale-crash", ONE_INSTANCE, 2).await);
    let until = Instant::now() + Duration::from_millis(2500);
    let killer = {
        let spindle = Arc::clone(&spindle);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(800)).await;
            let pids = spindle.worker_pids("sleeper");
            assert_eq!(pids.len(), 1);
            kill(Pid::from_raw(pids[0]), Signal::SIGKILL).unwrap();
        })
    };
    let clients = 8;
    let codes = load(&spindle, "/one", clients, until).await;
    killer.await.unwrap();
    let failed: usize = codes
        .iter()
        .filter(|(c, _)| **c != 200)
        .map(|(_, n)| n)
        .sum();
    assert!(codes[&200] > 100, "{codes:?}");
    // Each client has one request outstanding: the dead instance held at most `clients`.
    assert!(
        failed <= clients,
        "only what the killed instance held fails: {codes:?}"
    );
    assert!(
        codes.keys().all(|c| *c == 200 || *c == 502),
        "no 503: requests arriving during the restart waited for the fork: {codes:?}"
    );
    assert_eq!(
        spindle.metric(&starts("one", "sleeper", "fork")).await,
        Some(2.0),
        "replaced by a fork"
    );
    let waited = spindle
        .metric(r#"spindle_request_wait_seconds_count{chain="one",function="sleeper"}"#)
        .await
        .unwrap();
    assert!(
        waited >= 1.0,
        "some requests waited for the replacement: {waited}"
    );
}
