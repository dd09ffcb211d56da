//! Config reload over the real binary: a changed module rolls to new instances forked from a
//! new zygote while requests keep being answered (none fails), through `spindle reload` and
//! SIGHUP; a reload with errors, with a change only a restart can apply, or with a module
//! whose instances do not start changes nothing and says why.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Spindle;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

struct Setup {
    spindle: Arc<Spindle>,
    config: PathBuf,
    module: PathBuf,
    admin: PathBuf,
}

const CONFIG: &str = r#"
functions:
  - name: f
    module: "{module}"
    instances: 2
chains:
  - name: c
    route: /c
    steps: [f]
    content_type: text/plain
"#;

async fn setup(tag: &str) -> Setup {
    common::build_examples();
    let files = common::temp_dir(&format!("{tag}-files"));
    let module = files.join("f.wasm");
    std::fs::copy(common::wasm("uppercase"), &module).unwrap();
    let admin = files.join("admin.sock");
    let yaml = CONFIG.replace("{module}", &module.display().to_string());
    let spindle = Spindle::start_with(tag, &yaml, &["--admin", admin.to_str().unwrap()]).await;
    let config = spindle.dir.join("spindle.yaml");
    Setup {
        spindle: Arc::new(spindle),
        config,
        module,
        admin,
    }
}

/// `spindle reload --admin PATH`: (success, what it printed on stdout and stderr).
fn reload(admin: &Path) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args(["reload", "--admin"])
        .arg(admin)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn generation(s: &Spindle) -> impl std::future::Future<Output = Option<f64>> + '_ {
    s.metric(r#"spindle_function_generation{chain="c",function="f"}"#)
}

/// Clients that POST until `stop` and check each answer is one of `valid(body)`; returns
/// (answers, failures as "status body").
fn clients(
    spindle: &Arc<Spindle>,
    n: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(usize, Vec<String>)>> {
    (0..n)
        .map(|c| {
            let spindle = Arc::clone(spindle);
            let stop = Arc::clone(stop);
            tokio::spawn(async move {
                let (mut ok, mut bad) = (0, Vec::new());
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let body = format!("client{c}-{i}");
                    let reply = spindle
                        .try_request("POST", "/c", body.clone().into_bytes())
                        .await
                        .unwrap();
                    let upper = body.to_uppercase();
                    let reversed: String = body.chars().rev().collect();
                    if reply.status == 200 && (reply.text() == upper || reply.text() == reversed) {
                        ok += 1;
                    } else {
                        bad.push(format!("{} {}", reply.status, reply.text()));
                    }
                    i += 1;
                }
                (ok, bad)
            })
        })
        .collect()
}

async fn join(tasks: Vec<tokio::task::JoinHandle<(usize, Vec<String>)>>) -> (usize, Vec<String>) {
    let (mut ok, mut bad) = (0, Vec::new());
    for t in tasks {
        let (o, b) = t.await.unwrap();
        ok += o;
        bad.extend(b);
    }
    (ok, bad)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_module_rolls_in_under_load_and_no_request_fails() {
    let s = setup("reload-roll").await;
    let spindle = &s.spindle;
    assert_eq!(spindle.post("/c", "abc").await.text(), "ABC");
    let old_zygote = spindle.zygote_pids("f");
    let old_workers = spindle.worker_pids("f");
    assert_eq!((old_zygote.len(), old_workers.len()), (1, 2));

    let stop = Arc::new(AtomicBool::new(false));
    let load = clients(spindle, 4, &stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A new module in place (rename: the running gateway never sees half a file).
    let staged = s.module.with_extension("new");
    std::fs::copy(common::wasm("reverse"), &staged).unwrap();
    std::fs::rename(&staged, &s.module).unwrap();
    let admin = s.admin.clone();
    let (ok, said) = tokio::task::spawn_blocking(move || reload(&admin))
        .await
        .unwrap();
    assert!(ok, "reload failed: {said}\n{}", spindle.log());
    assert!(
        said.contains("c/f: 2 instance(s) on generation 2"),
        "{said}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (answered, failed) = join(load).await;
    assert!(
        failed.is_empty(),
        "requests failed during the roll: {failed:?}"
    );
    assert!(answered > 50, "the load ran: {answered}");

    assert_eq!(
        spindle.post("/c", "abc").await.text(),
        "cba",
        "the new module serves"
    );
    assert_eq!(generation(spindle).await, Some(2.0));
    let workers = spindle.worker_pids("f");
    assert_eq!(workers.len(), 2, "as many instances as before: {workers:?}");
    assert!(workers.iter().all(|w| !old_workers.contains(w)), "all new");
    // The old zygote, and its image, are gone; one new zygote remains.
    let began = Instant::now();
    loop {
        let z = spindle.zygote_pids("f");
        if z.len() == 1 && z != old_zygote {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "zygotes: {z:?} (old {old_zygote:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        spindle
            .metric(r#"spindle_reloads_total{outcome="ok"}"#)
            .await,
        Some(1.0)
    );

    // SIGHUP does the same: back to uppercase.
    std::fs::copy(common::wasm("uppercase"), &staged).unwrap();
    std::fs::rename(&staged, &s.module).unwrap();
    kill(Pid::from_raw(spindle.pid()), Signal::SIGHUP).unwrap();
    let began = Instant::now();
    while generation(spindle).await != Some(3.0) {
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{}",
            spindle.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(spindle.post("/c", "abc").await.text(), "ABC");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_cannot_apply_changes_nothing_and_says_why() {
    let s = setup("reload-refused").await;
    let spindle = &s.spindle;
    let original = std::fs::read_to_string(&s.config).unwrap();
    let workers = spindle.worker_pids("f");

    // Nothing changed.
    let (ok, said) = reload(&s.admin);
    assert!(ok && said.contains("nothing changed"), "{said}");

    // A config with an error: reported at file:line:col.
    std::fs::write(&s.config, original.replace("instances: 2", "instancs: 2")).unwrap();
    let (ok, said) = reload(&s.admin);
    assert!(!ok);
    let at = format!("{}:5:5: unknown key `instancs`", s.config.display());
    assert!(said.contains(&at), "{said}");

    // A change only a restart applies.
    std::fs::write(&s.config, original.replace("route: /c", "route: /d")).unwrap();
    let (ok, said) = reload(&s.admin);
    assert!(!ok && said.contains("restart the gateway"), "{said}");
    assert!(said.contains("chains changed"), "{said}");

    // A module whose instances cannot start: undone, the old one keeps serving.
    std::fs::write(&s.config, &original).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let load = clients(spindle, 2, &stop);
    std::fs::write(&s.module, b"\0asm\x01\0\0\0 not a module").unwrap();
    let admin = s.admin.clone();
    let (ok, said) = tokio::task::spawn_blocking(move || reload(&admin))
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let (_, failed) = join(load).await;
    assert!(!ok, "{said}");
    assert!(
        said.contains("not rolled: c/f") && said.contains("keeps its old module"),
        "{said}"
    );
    assert!(failed.is_empty(), "requests failed: {failed:?}");
    assert_eq!(spindle.post("/c", "abc").await.text(), "ABC");
    assert_eq!(generation(spindle).await, Some(1.0));
    assert_eq!(spindle.worker_pids("f").len(), 2);
    let _ = workers;
    assert_eq!(
        spindle
            .metric(r#"spindle_reloads_total{outcome="refused"}"#)
            .await,
        Some(2.0)
    );
    assert_eq!(
        spindle
            .metric(r#"spindle_reloads_total{outcome="failed"}"#)
            .await,
        Some(1.0)
    );
}
