//! `spindle bench` end to end: a tiny comparison run, its report files, and bad input.

mod common;

use std::process::Command;

fn spindle() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_spindle"));
    c.current_dir(common::repo_root());
    c
}

#[test]
fn tiny_comparison_run_writes_a_complete_report() {
    common::build_examples();
    let dir = common::temp_dir("bench-run");
    let (json, md, svg) = (dir.join("r.json"), dir.join("r.md"), dir.join("r.svg"));
    let out = spindle()
        .args([
            "bench",
            "--targets",
            "ceiling,userspace,knative",
            "--duration",
            "500ms",
            "--connections",
            "2",
        ])
        .arg("--json")
        .arg(&json)
        .arg("--markdown")
        .arg(&md)
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("| Knative-style baseline | knative |"),
        "{stdout}"
    );

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for key in ["cores", "cpu_model", "kernel", "memory_gib", "date"] {
        assert!(!report["machine"][key].is_null(), "machine.{key}: {report}");
    }
    let targets = report["targets"].as_array().expect("targets");
    let modes: Vec<&str> = targets
        .iter()
        .map(|t| t["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["ceiling", "userspace", "knative"]);
    for t in targets {
        // Every target ran: none of the fields that keep reports comparable is empty.
        for field in [
            "name",
            "rps",
            "p50_us",
            "p90_us",
            "p99_us",
            "p999_us",
            "errors",
            "cpu_s_per_req",
        ] {
            assert!(!t[field].is_null(), "{field} of {}", t["name"]);
        }
        assert!(t["skipped"].is_null());
        assert_eq!(t["errors"], 0, "{}", t["name"]);
        assert!(t["rps"].as_f64().unwrap() > 0.0 && t["cpu_s_per_req"].as_f64().unwrap() > 0.0);
    }
    let ratios = &report["ratios"];
    assert!(
        ratios["spindle_userspace_over_knative_rps"]
            .as_f64()
            .is_some_and(|r| r > 0.0),
        "{ratios}"
    );
    assert!(
        ratios["spindle_userspace_over_ceiling_rps"]
            .as_f64()
            .is_some_and(|r| r > 0.0),
        "{ratios}"
    );
    assert!(
        ratios["spindle_sockmap_over_knative_rps"].is_null(),
        "sockmap did not run"
    );
    assert!(
        std::fs::read_to_string(&md)
            .unwrap()
            .contains("Spindle userspace")
    );
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
}

#[test]
fn bad_bench_input_is_refused_clearly() {
    let out = spindle()
        .args(["bench", "--targets", "ceiling,foo"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown target `foo`"), "{err}");

    let out = spindle()
        .args(["bench", "--duration", "soon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("soon"));

    let out = spindle()
        .args([
            "bench",
            "--config",
            "/nonexistent.yaml",
            "--targets",
            "userspace",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.yaml"));
}
