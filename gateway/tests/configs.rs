//! The configs shipped in configs/ start and answer as their comments say.

mod common;

use common::Spindle;

fn sha256_hex(data: &[u8]) -> String {
    // Independent check through the system's sha256sum.
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum (coreutils)");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_config_serves_every_chain() {
    let spindle = Spindle::start_file("pipeline", "configs/pipeline.yaml").await;

    let words = spindle.post("/text/words", "one two  three\nfour").await;
    assert_eq!((words.status, words.text()), (200, "4".to_string()));

    let hash = spindle.post("/hash", "abc").await;
    assert_eq!((hash.status, hash.text()), (200, sha256_hex(b"ABC")));

    // 2x1 PPM: red, white -> luma 76, 255.
    let mut ppm = b"P6\n# two pixels\n2 1\n255\n".to_vec();
    ppm.extend_from_slice(&[255, 0, 0, 255, 255, 255]);
    let image = spindle.post("/image", ppm).await;
    assert_eq!(image.status, 200, "{}", image.text());
    assert_eq!(image.content_type, "image/x-portable-graymap");
    assert!(
        image.body.starts_with(b"P5"),
        "PGM header: {:?}",
        image.text()
    );
    assert!(
        image.body.ends_with(&[76, 255]),
        "grayscale pixels: {:?}",
        image.body
    );
    let bad_image = spindle.post("/image", "P6 not really").await;
    assert_eq!(bad_image.status, 500);
    assert!(
        bad_image.text().contains("function grayscale"),
        "{}",
        bad_image.text()
    );

    // A plain WASI command (stdin -> stdout), fresh instance per request.
    for _ in 0..3 {
        let rot = spindle.post("/rot13", "Hello, World").await;
        assert_eq!((rot.status, rot.text()), (200, "Uryyb, Jbeyq".to_string()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_and_boutique_configs_answer_as_documented() {
    let hello = Spindle::start_file("cfg-hello", "configs/hello.yaml").await;
    assert_eq!(
        hello.post("/hello", "hello spindle").await.text(),
        r#"{"result":"ELDNIPS OLLEH","bytes":13}"#
    );
    drop(hello);
    let shop = Spindle::start_file("cfg-boutique", "configs/boutique.yaml").await;
    let r = shop.post("/shop", "cart total 30.00 JPY").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().starts_with("30.00 USD = "), "{}", r.text());
}

#[test]
fn shipped_configs_validate() {
    common::build_examples();
    let mut configs: Vec<_> = std::fs::read_dir(common::repo_root().join("configs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    configs.sort();
    assert!(configs.len() >= 7, "{configs:?}");
    for config in configs {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_spindle"))
            .arg("validate")
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            config.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// configs/ingress.yaml (the README's demo with the guard on lo) answers like the plain
/// demo, and its guard counts the connections it let through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingress_config_answers_behind_its_guard() {
    if !testkit::require_root("the_ingress_config_answers_behind_its_guard", "eBPF on lo") {
        return;
    }
    let spindle = Spindle::start_file("cfg-ingress", "configs/ingress.yaml").await;
    assert_eq!(
        spindle.post("/hello", "hello spindle").await.text(),
        r#"{"result":"ELDNIPS OLLEH","bytes":13}"#
    );
    let service = spindle
        .metric(
            r#"spindle_ingress_guard_packets_total{hook="tc",interface="lo",reason="service",verdict="pass"}"#,
        )
        .await
        .unwrap_or_else(|| panic!("no guard counters:\n{}", spindle.log()));
    assert!(
        service >= 3.0,
        "the guard saw the client's packets: {service}"
    );
}

/// deploy/kubernetes's ConfigMap runs what scripts/cluster.sh runs locally
/// (configs/cluster.yaml): the same functions, chains, node and peers, the modules being
/// where the image puts them.
#[test]
fn the_kubernetes_config_map_is_the_local_cluster_config() {
    common::build_examples();
    let root = common::repo_root();
    let manifest = std::fs::read_to_string(root.join("deploy/kubernetes/configmap.yaml")).unwrap();
    let start = manifest
        .find("  config.yaml: |\n")
        .expect("the ConfigMap's config.yaml")
        + 17;
    let embedded: String = manifest[start..]
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l.trim_start()))
        .map(|l| format!("{l}\n"))
        .collect();
    // The image's module directory is the repository's examples/wasm.
    let embedded = embedded.replace(
        "/usr/local/share/spindle/examples/wasm/",
        &format!("{}/examples/wasm/", root.display()),
    );
    let dir = common::temp_dir("configmap");
    let path = dir.join("config.yaml");
    std::fs::write(&path, &embedded).unwrap();
    let deployed = chain_runtime::config::Config::load(&path)
        .unwrap_or_else(|e| panic!("the ConfigMap's config does not validate:\n{e}\n{embedded}"));
    let local = chain_runtime::config::Config::load(&root.join("configs/cluster.yaml")).unwrap();
    let canonical = |c: &chain_runtime::config::Config| {
        let mut functions = c.functions.clone();
        for f in &mut functions {
            f.module = f.module.canonicalize().unwrap();
        }
        functions
    };
    assert_eq!(canonical(&deployed), canonical(&local));
    assert_eq!(deployed.chains, local.chains);
    assert_eq!(deployed.node, local.node);
    assert_eq!(deployed.dns_peers, local.dns_peers);
    assert_eq!(deployed.listen, local.listen);
}
