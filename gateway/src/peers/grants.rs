//! The peer side: the control server that origin nodes ask to run instances of a function,
//! and the board the function's pool reads them from.
//!
//! A *grant* is "origin O wants N instances of function F of chain C, resumed from this
//! image". The origin renews it every [`super::RENEW`]; one not renewed within
//! [`GRANT_LEASE`] (the origin died or is cut off) lapses and its instances are retired, as
//! are those of a grant set to 0. This node must run the same chain with the same function
//! (same module): that is what the image is of, and requests forwarded to it are served by
//! its own chain. While this node is itself over budget a grant may keep what it has but not
//! grow.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU32, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chain_runtime::instance::sealed_memfd;
use prometheus::core::Collector;
use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use proto::ImageDescriptor;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::wire::{ClusterKey, Session};
use crate::budget::Budget;
use crate::dataplane::ChainRuntime;
use crate::supervisor::ResumeFds;

/// A grant not renewed for this long lapses.
pub const GRANT_LEASE: Duration = Duration::from_secs(3);
/// How long a connection may take to authenticate, and to send its next request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Control connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Grant {
    /// The origin process the grant is for: a restarted origin's images are new, and the
    /// instances of its old ones lost their page server.
    incarnation: u64,
    handle: u64,
    /// Images of this incarnation whose instances may keep running (the current one and
    /// those it replaced as their lease neared its end).
    handles: Vec<u64>,
    fds: Arc<ResumeFds>,
    instances: u32,
    renewed: Instant,
    /// As the pool last reported: instances serving, and instances still running (retiring
    /// ones included).
    ready: u32,
    live: u32,
}

struct StageGrants {
    chain: String,
    function: String,
    autoscaled: bool,
    max: u32,
    /// SHA-256 of the module this node runs now (a reload changes it).
    module_hash: Mutex<[u8; 32]>,
    by_origin: Mutex<HashMap<String, Grant>>,
    /// This node's own instances of the function, as the pool last reported.
    own: AtomicU32,
}

/// What a pool should run for one origin.
pub struct Wanted {
    pub origin: String,
    /// The image new instances start from.
    pub handle: u64,
    /// Images whose running instances count towards `instances`; others are retired.
    pub handles: Vec<u64>,
    pub fds: Arc<ResumeFds>,
    pub instances: u32,
}

/// Every grant this node holds, per (chain, stage).
pub struct GrantBoard {
    stages: Vec<Vec<StageGrants>>,
    budget: Option<Arc<Budget>>,
    granted: IntGaugeVec,
    requests: IntCounterVec,
    connections: AtomicUsize,
}

/// Results of control requests, all listed from the start.
const RESULTS: [&str; 4] = ["ok", "refused", "bad_auth", "malformed"];

impl GrantBoard {
    /// `module_hashes[chain][stage]`: SHA-256 of each stage's module, to refuse an image of
    /// another module at once rather than when its worker fails to resume.
    pub fn new(
        chains: &[Arc<ChainRuntime>],
        module_hashes: Vec<Vec<[u8; 32]>>,
        budget: Option<Arc<Budget>>,
    ) -> Self {
        let stages = chains
            .iter()
            .zip(module_hashes)
            .map(|(c, hashes)| {
                c.plan
                    .stages
                    .iter()
                    .zip(hashes)
                    .map(|(s, module_hash)| StageGrants {
                        chain: c.plan.spec.name.clone(),
                        function: s.function.name.clone(),
                        autoscaled: s.function.instances.autoscale.is_some(),
                        max: s.function.instances.max,
                        module_hash: Mutex::new(module_hash),
                        by_origin: Mutex::new(HashMap::new()),
                        own: AtomicU32::new(0),
                    })
                    .collect()
            })
            .collect();
        let requests = IntCounterVec::new(
            Opts::new(
                "spindle_peer_control_requests_total",
                "Peer-control requests this node served, by result (bad_auth: the handshake failed)",
            ),
            &["result"],
        )
        .expect("valid");
        for r in RESULTS {
            requests.with_label_values(&[r]);
        }
        GrantBoard {
            stages,
            budget,
            granted: IntGaugeVec::new(
                Opts::new(
                    "spindle_peer_grants",
                    "Instances this node runs for an origin node, resumed from its image",
                ),
                &["chain", "function", "origin"],
            )
            .expect("valid"),
            requests,
            connections: AtomicUsize::new(0),
        }
    }

    /// The grants the pool of (chain, stage) should run now; lapsed ones are dropped here.
    pub fn wanted(&self, chain: usize, stage: usize) -> Vec<Wanted> {
        let st = &self.stages[chain][stage];
        let mut grants = lock(&st.by_origin);
        grants.retain(|origin, g| {
            let alive = g.renewed.elapsed() <= GRANT_LEASE;
            if !alive {
                tracing::warn!(chain = %st.chain, function = %st.function, %origin,
                    "grant lapsed (not renewed within {GRANT_LEASE:?}); retiring its instances");
                let _ = self
                    .granted
                    .remove_label_values(&[&st.chain, &st.function, origin]);
            }
            alive
        });
        grants
            .iter()
            .map(|(origin, g)| Wanted {
                origin: origin.clone(),
                handle: g.handle,
                handles: g.handles.clone(),
                fds: Arc::clone(&g.fds),
                instances: g.instances,
            })
            .collect()
    }

    /// The pool's count of one grant's instances: serving, and running at all.
    pub fn report(&self, chain: usize, stage: usize, origin: &str, ready: u32, live: u32) {
        let st = &self.stages[chain][stage];
        let mut grants = lock(&st.by_origin);
        if let Some(g) = grants.get_mut(origin) {
            g.ready = ready;
            g.live = live;
            if g.instances == 0 && live == 0 {
                grants.remove(origin);
                let _ = self
                    .granted
                    .remove_label_values(&[&st.chain, &st.function, origin]);
            }
        }
    }

    /// The module (chain, stage) runs now, after a reload: grants are checked against it.
    pub fn set_module_hash(&self, chain: usize, stage: usize, hash: [u8; 32]) {
        *lock(&self.stages[chain][stage].module_hash) = hash;
    }

    /// The pool's own (not granted) instances, which grants must leave room for.
    pub fn report_own(&self, chain: usize, stage: usize, own: u32) {
        self.stages[chain][stage].own.store(own, Relaxed);
    }

    /// One scale request: `{origin, chain, function, instances, image?}` →
    /// `{granted, ready, live}` or `{error}`.
    fn scale(&self, request: &Value) -> Result<Value, String> {
        let field = |k: &str| {
            request
                .get(k)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("missing string field {k:?}"))
        };
        let (origin, chain, function) = (field("origin")?, field("chain")?, field("function")?);
        let instances = request
            .get("instances")
            .and_then(Value::as_u64)
            .ok_or("missing integer field \"instances\"")?;
        let incarnation = request
            .get("incarnation")
            .and_then(Value::as_u64)
            .ok_or("missing integer field \"incarnation\"")?;
        let st = self
            .stages
            .iter()
            .flatten()
            .find(|s| s.chain == chain && s.function == function)
            .ok_or_else(|| {
                format!(
                    "this node has no function {function} in chain {chain}: every node must run the same chains (ship one config to all)"
                )
            })?;
        if !st.autoscaled {
            return Err(format!(
                "{chain}/{function} has a fixed instance count on this node; only autoscaled functions take remote instances"
            ));
        }
        let mut grants = lock(&st.by_origin);
        let labels = [chain, function, origin];
        if instances == 0 {
            // Kept, at 0, until its instances have stopped: the origin revokes the image
            // only then, so none of them loses its pages while it finishes what it holds.
            let Some(g) = grants.get_mut(origin) else {
                return Ok(json!({"granted": 0, "ready": 0, "live": 0}));
            };
            if g.instances > 0 {
                tracing::info!(%chain, %function, %origin, "grant released; retiring its instances");
            }
            g.instances = 0;
            g.renewed = Instant::now();
            self.granted.with_label_values(&labels).set(0);
            return Ok(json!({"granted": 0, "ready": 0, "live": g.live}));
        }
        let text = field("image")?;
        let descriptor: ImageDescriptor =
            text.parse().map_err(|e| format!("image descriptor: {e}"))?;
        if descriptor.module_hash != *lock(&st.module_hash) {
            return Err(format!(
                "the image is of another module than this node's {function}: the nodes' configs differ"
            ));
        }
        let others: u32 = grants
            .iter()
            .filter(|(o, _)| o.as_str() != origin)
            .map(|(_, g)| g.instances)
            .sum();
        let room = st.max.saturating_sub(others + st.own.load(Relaxed));
        let over = self.budget.as_ref().is_some_and(|b| b.over());
        let had = grants.get(origin).map_or(0, |g| g.instances);
        let mut granted = (instances.min(u64::from(room))) as u32;
        if over {
            // Over budget here too: keep what runs, start nothing more for peers.
            granted = granted.min(had);
        }
        match grants.get_mut(origin) {
            Some(g) if g.incarnation == incarnation && g.handle == descriptor.handle => {
                g.instances = granted;
                g.renewed = Instant::now();
            }
            Some(g) if g.incarnation == incarnation => {
                // A fresh image of the same instance (the old one's lease nears its end): new
                // instances start from it; those running keep theirs.
                g.fds = Arc::new(resume_fds(&descriptor)?);
                g.handle = descriptor.handle;
                g.handles.push(descriptor.handle);
                g.instances = granted;
                g.renewed = Instant::now();
            }
            Some(g) => {
                // The origin restarted: its old images are gone with it, and so is every
                // page the instances of them have not fetched yet.
                tracing::info!(%chain, %function, %origin, granted,
                    "the origin restarted; replacing the instances of its old images");
                *g = Grant {
                    incarnation,
                    handle: descriptor.handle,
                    handles: vec![descriptor.handle],
                    fds: Arc::new(resume_fds(&descriptor)?),
                    instances: granted,
                    renewed: Instant::now(),
                    ready: 0,
                    live: g.live,
                };
            }
            None => {
                let fds = resume_fds(&descriptor)?;
                tracing::info!(%chain, %function, %origin, granted,
                    handle = %format_args!("{:#018x}", descriptor.handle),
                    "granting instances resumed from the origin's image");
                grants.insert(
                    origin.to_owned(),
                    Grant {
                        incarnation,
                        handle: descriptor.handle,
                        handles: vec![descriptor.handle],
                        fds: Arc::new(fds),
                        instances: granted,
                        renewed: Instant::now(),
                        ready: 0,
                        live: 0,
                    },
                );
            }
        }
        self.granted
            .with_label_values(&labels)
            .set(i64::from(granted));
        let g = &grants[origin];
        Ok(json!({"granted": granted, "ready": g.ready, "live": g.live}))
    }

    /// Serves the peer-control channel on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, key: ClusterKey) {
        let key = Arc::new(key);
        loop {
            let (stream, from) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("peer-control accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if self.connections.load(Relaxed) >= MAX_CONNECTIONS {
                tracing::warn!(%from, "peer-control connection refused: {MAX_CONNECTIONS} already open");
                continue;
            }
            let _ = stream.set_nodelay(true);
            let (board, key) = (Arc::clone(&self), Arc::clone(&key));
            board.connections.fetch_add(1, Relaxed);
            tokio::spawn(async move {
                board.connection(stream, from, &key).await;
                board.connections.fetch_sub(1, Relaxed);
            });
        }
    }

    async fn connection(
        &self,
        stream: tokio::net::TcpStream,
        from: std::net::SocketAddr,
        key: &ClusterKey,
    ) {
        let session = tokio::time::timeout(HANDSHAKE_TIMEOUT, Session::server(stream, key)).await;
        let mut session = match session {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.requests.with_label_values(&["bad_auth"]).inc();
                tracing::warn!(%from, "peer-control connection refused: {e}");
                return;
            }
            Err(_) => {
                self.requests.with_label_values(&["bad_auth"]).inc();
                tracing::warn!(%from, "peer-control connection refused: no handshake within {HANDSHAKE_TIMEOUT:?}");
                return;
            }
        };
        loop {
            let message = match tokio::time::timeout(IDLE_TIMEOUT, session.recv()).await {
                Ok(Ok(m)) => m,
                Ok(Err(super::wire::WireError::Io(_))) | Err(_) => return,
                Ok(Err(e)) => {
                    self.requests.with_label_values(&["malformed"]).inc();
                    tracing::warn!(%from, "peer-control connection ended: {e}");
                    return;
                }
            };
            let answer = match serde_json::from_slice::<Value>(&message) {
                Ok(request) => match self.scale(&request) {
                    Ok(v) => {
                        self.requests.with_label_values(&["ok"]).inc();
                        v
                    }
                    Err(e) => {
                        self.requests.with_label_values(&["refused"]).inc();
                        tracing::warn!(%from, "peer-control request refused: {e}");
                        json!({"error": e})
                    }
                },
                Err(e) => {
                    self.requests.with_label_values(&["malformed"]).inc();
                    json!({"error": format!("not JSON: {e}")})
                }
            };
            if session.send(answer.to_string().as_bytes()).await.is_err() {
                return;
            }
        }
    }

    pub fn families(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut out = self.granted.collect();
        out.extend(self.requests.collect());
        out
    }
}

/// The sealed descriptor and a fresh node page cache for instances of one image.
fn resume_fds(descriptor: &ImageDescriptor) -> Result<ResumeFds, String> {
    let pinned: OwnedFd = sealed_memfd("spindle-image", descriptor.to_string().as_bytes())
        .map_err(|e| format!("pinning the image descriptor: {e}"))?;
    let cache = rdma_fork::NodeCache::create(descriptor)
        .map_err(|e| format!("creating the node page cache: {e}"))?;
    Ok(ResumeFds {
        descriptor: pinned,
        cache,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chain_runtime::config::Config;
    use chain_runtime::plan::Plan;

    /// A board over chain `c` = [auto (autoscaled, max 4), fixed (2 instances)].
    fn board(budget: Option<Arc<Budget>>) -> (GrantBoard, [u8; 32]) {
        let dir = std::env::temp_dir().join(format!("spindle-grants-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("m.wasm"), b"\0asm\x01\0\0\0").unwrap();
        let yaml = "functions:\n  - { name: auto, module: m.wasm, instances: { max: 4 } }\n  - { name: fixed, module: m.wasm, instances: 2 }\nchains:\n  - { name: c, route: /c, steps: [auto, fixed] }\n";
        let config = Config::parse(yaml, &dir.join("s.yaml")).unwrap();
        let plan = Plan::new(&config).chains[0].clone();
        let arena = Arc::new(shm::Arena::create("grants-test", 4096, 4).unwrap());
        let chain = Arc::new(ChainRuntime::new(plan, arena, None).unwrap());
        let hash = [7u8; 32];
        (
            GrantBoard::new(&[chain], vec![vec![hash, hash]], budget),
            hash,
        )
    }

    fn descriptor(handle: u64, module_hash: [u8; 32]) -> String {
        ImageDescriptor {
            handle,
            key: [1; 32],
            parent: "10.0.0.1:7000".parse().unwrap(),
            module_hash,
            engine: "test-engine".into(),
            memory_bytes: proto::image::WASM_PAGE,
            page_size: proto::image::PAGE_SIZE,
            rdma: None,
        }
        .to_string()
    }

    fn ask(
        board: &GrantBoard,
        function: &str,
        n: u32,
        image: Option<String>,
    ) -> Result<Value, String> {
        let mut r = json!({"origin": "a", "incarnation": 1, "chain": "c", "function": function, "instances": n});
        if let Some(i) = image {
            r["image"] = json!(i);
        }
        board.scale(&r)
    }

    #[test]
    fn grants_are_bounded_checked_and_kept_until_their_instances_stop() {
        let (board, hash) = board(None);
        let err = board
            .scale(&json!({"origin": "a", "incarnation": 1, "chain": "x", "function": "auto", "instances": 1}))
            .unwrap_err();
        assert!(err.contains("same chains"), "{err}");
        let err = ask(&board, "fixed", 1, Some(descriptor(1, hash))).unwrap_err();
        assert!(err.contains("fixed instance count"), "{err}");
        let err = ask(&board, "auto", 1, Some(descriptor(1, [0; 32]))).unwrap_err();
        assert!(err.contains("another module"), "{err}");
        assert!(ask(&board, "auto", 1, None).unwrap_err().contains("image"));

        // At most max less this node's own instances.
        board.report_own(0, 0, 1);
        let a = ask(&board, "auto", 9, Some(descriptor(1, hash))).unwrap();
        assert_eq!(a["granted"], 3);
        let wanted = board.wanted(0, 0);
        assert_eq!(
            (wanted.len(), wanted[0].instances, wanted[0].handle),
            (1, 3, 1)
        );
        board.report(0, 0, "a", 2, 3);
        let a = ask(&board, "auto", 2, Some(descriptor(1, hash))).unwrap();
        assert_eq!(
            (a["granted"].as_u64(), a["ready"].as_u64()),
            (Some(2), Some(2))
        );

        // Released: kept at 0 while instances still run, gone once they stopped.
        let a = ask(&board, "auto", 0, None).unwrap();
        assert_eq!(
            (a["granted"].as_u64(), a["live"].as_u64()),
            (Some(0), Some(3))
        );
        assert_eq!(board.wanted(0, 0)[0].instances, 0);
        board.report(0, 0, "a", 0, 0);
        assert!(board.wanted(0, 0).is_empty());
        let a = ask(&board, "auto", 0, None).unwrap();
        assert_eq!(a["live"], 0);
    }

    #[test]
    fn over_budget_a_grant_keeps_what_it_has_and_a_fresh_image_replaces_the_current_one() {
        let budget = Budget::new(0.0, 1.0).unwrap();
        // Since-boot utilization is above 0%: over budget from the start.
        assert!(budget.over());
        let (busy, hash) = board(Some(budget));
        let a = ask(&busy, "auto", 2, Some(descriptor(1, hash))).unwrap();
        assert_eq!(a["granted"], 0, "nothing new while over budget");

        let (board, hash) = board(None);
        ask(&board, "auto", 2, Some(descriptor(1, hash))).unwrap();
        let a = ask(&board, "auto", 3, Some(descriptor(2, hash))).unwrap();
        assert_eq!(a["granted"], 3);
        let w = &board.wanted(0, 0)[0];
        assert_eq!(w.handle, 2, "new starts use the fresh image");
        assert_eq!(w.handles, [1, 2], "instances of the older one keep running");
        // The origin restarted: only its new image's instances count.
        let restarted = json!({"origin": "a", "incarnation": 2, "chain": "c",
            "function": "auto", "instances": 1, "image": descriptor(7, hash)});
        assert_eq!(board.scale(&restarted).unwrap()["granted"], 1);
        assert_eq!(board.wanted(0, 0)[0].handles, [7]);
    }
}
