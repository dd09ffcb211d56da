//! The node service's admin API on a real `spindle run`: its Unix socket, the errors it
//! answers for what cannot be prepared, and that each is counted. (Preparing an image that
//! another node resumes is tests/fork.rs's.)

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::Spindle;

/// (status, body) of an admin request, made with curl over the Unix socket.
fn admin(socket: &Path, method: &str, path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "30", "--unix-socket"])
        .arg(socket)
        .args(["-X", method, "-o", "-", "-w", "\n%{http_code}"])
        .arg(format!("http://spindle{path}"))
        .output()
        .expect("running curl (scripts/setup.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

const CONFIG: &str = "functions:\n\
  - { name: forkrand, module: \"{wasm:forkrand}\" }\n\
  - { name: rot13, module: \"{wasm:rot13_cmd}\", mode: command }\n\
chains:\n\
  - { name: rand, route: /rand, steps: [forkrand] }\n\
  - { name: rot, route: /rot, steps: [rot13] }\n";

#[tokio::test]
async fn the_admin_api_says_what_it_cannot_prepare_and_counts_it() {
    let dir = common::temp_dir("admin-errors-socket");
    let socket = dir.join("admin.sock");
    let s = Spindle::start_with(
        "admin-errors",
        CONFIG,
        &[
            "--serve-images",
            "127.0.0.1:0",
            "--admin",
            socket.to_str().unwrap(),
        ],
    )
    .await;
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "owner only");

    let ready = s.get("/readyz").await.text();
    assert!(
        ready.contains("images: serving pages on 127.0.0.1:"),
        "{ready}"
    );

    for (method, path, code, says) in [
        (
            "POST",
            "/images?chain=nope&function=forkrand",
            404,
            "no chain nope",
        ),
        (
            "POST",
            "/images?chain=rand&function=nope",
            404,
            "no function nope in chain rand",
        ),
        (
            "POST",
            "/images?chain=rand&function=forkrand&instance=2",
            404,
            "no instance 2",
        ),
        ("POST", "/images?chain=rand", 400, "needs function"),
        (
            "POST",
            "/images?chain=rand&function=forkrand&lease=soon",
            400,
            "lease=soon",
        ),
        (
            "POST",
            "/images?chain=rot&function=rot13",
            409,
            "a command module has no instance",
        ),
        (
            "DELETE",
            "/images/0x1234",
            404,
            "no image 0x0000000000001234",
        ),
        ("DELETE", "/images/zz", 400, "not an image handle"),
        ("PUT", "/images", 405, "GET (list) or POST (prepare)"),
        ("GET", "/other", 404, "no admin resource"),
    ] {
        let (got, body) = admin(&socket, method, path);
        assert_eq!(got, code, "{method} {path}: {body}");
        assert!(body.contains(says), "{method} {path}: {body}");
    }
    // Nothing was published, and the refused prepare did not hurt the instance.
    assert_eq!(admin(&socket, "GET", "/images"), (200, "\n".to_owned()));
    let r = s.post("/rot", "abc").await;
    assert_eq!((r.status, r.text()), (200, "nop".to_owned()));

    let m = |series: &'static str| {
        let s = &s;
        async move { s.metric(series).await.unwrap_or(-1.0) }
    };
    assert_eq!(
        m(r#"spindle_fork_prepares_total{result="uncapturable"}"#).await,
        1.0
    );
    assert_eq!(m(r#"spindle_fork_prepares_total{result="ok"}"#).await, 0.0);
    assert_eq!(m(r#"spindle_admin_requests_total{code="404"}"#).await, 5.0);
    assert_eq!(m(r#"spindle_admin_requests_total{code="400"}"#).await, 3.0);
    assert_eq!(m(r#"spindle_admin_requests_total{code="409"}"#).await, 1.0);
    assert_eq!(m("spindle_fork_images_published_total").await, 0.0);

    // A prepare that works answers the descriptor first, then what it captured.
    let (code, body) = admin(
        &socket,
        "POST",
        "/images?chain=rand&function=forkrand&lease=1m",
    );
    assert_eq!(code, 200, "{body}");
    let mut lines = body.lines();
    let descriptor: proto::ImageDescriptor = lines.next().unwrap().parse().unwrap();
    assert!(descriptor.parent.ip().is_loopback(), "{descriptor:?}");
    assert!(
        body.contains("instance: rand/forkrand instance 0"),
        "{body}"
    );
    assert!(body.contains("lease_s: 60"), "{body}");
    let listed = admin(&socket, "GET", "/images").1;
    let handle = format!("{:#018x}", descriptor.handle);
    assert!(
        listed.starts_with(&format!("{handle} rand/forkrand 0 live")),
        "{listed}"
    );
    assert_eq!(
        admin(&socket, "DELETE", &format!("/images/{handle}")).0,
        200
    );
    let (code, body) = admin(&socket, "DELETE", &format!("/images/{handle}"));
    assert_eq!(code, 409, "{body}");
    assert!(
        admin(&socket, "GET", "/images")
            .1
            .contains(&format!("{handle} rand/forkrand 0 revoked"))
    );
    assert_eq!(m("spindle_fork_revocations_total").await, 1.0);
    assert_eq!(m("spindle_fork_images_live").await, 0.0);
    let mut s = s;
    assert!(s.stop().success());
    assert!(
        !socket.exists(),
        "the gateway removes its admin socket when it stops"
    );
}

#[tokio::test]
async fn without_serve_images_a_prepare_is_refused_with_the_flag_to_add() {
    let dir = common::temp_dir("admin-no-pages-socket");
    let socket = dir.join("admin.sock");
    let s = Spindle::start_with(
        "admin-no-pages",
        CONFIG,
        &["--admin", socket.to_str().unwrap()],
    )
    .await;
    let (code, body) = admin(&socket, "POST", "/images?chain=rand&function=forkrand");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("--serve-images"), "{body}");
    let ready = s.get("/readyz").await;
    assert_eq!(ready.status, 200);
    assert!(!ready.text().contains("images:"), "{}", ready.text());
}
