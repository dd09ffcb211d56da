//! The origin side: one [`RemoteShare`] per autoscaled (chain, function) holds how many of
//! its instances this node wants on peers, and a task that makes it so — prepares an image
//! of a running local instance, asks peers in list order for the instances (each grants what
//! it can), renews the grants, releases them when the want falls, and revokes the image once
//! no peer runs an instance of it any more.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::time::{Duration, Instant};

use prometheus::IntGaugeVec;
use proto::ImageDescriptor;
use serde_json::json;
use tokio::sync::Notify;

use super::PeerLink;
use crate::dataplane::ChainRuntime;
use crate::node::{InstanceKey, NodeService};

/// How often grants are renewed (and peers' counts refreshed).
pub const RENEW: Duration = Duration::from_millis(250);
/// Lease of the images prepared for peers; a share older than half of it prepares a fresh
/// one for its next grant, so a peer can always start more instances.
const IMAGE_LEASE: Duration = Duration::from_secs(600);
/// Wait after a failed prepare before the next.
const PREPARE_BACKOFF: Duration = Duration::from_secs(1);

/// `spindle_remote_instances{chain,function,peer,state}` and
/// `spindle_remote_instances_wanted{chain,function}`.
#[derive(Clone)]
pub(super) struct Gauges {
    pub(super) remote: IntGaugeVec,
    pub(super) wanted: IntGaugeVec,
}

/// A peer's instances of this share, as it last answered.
#[derive(Default)]
struct PeerCount {
    granted: AtomicU32,
    ready: AtomicU32,
    live: AtomicU32,
}

/// This node's remote instances of one function of one chain.
pub struct RemoteShare {
    pub(super) chain: Arc<ChainRuntime>,
    pub(super) stage: usize,
    want: AtomicU32,
    /// Set at shutdown: the want is 0 from then on, whatever the pool says.
    closing: AtomicBool,
    changed: Notify,
    peers: Vec<PeerCount>,
}

struct Image {
    descriptor: ImageDescriptor,
    prepared: Instant,
}

impl RemoteShare {
    pub(super) fn new(chain: Arc<ChainRuntime>, stage: usize, peers: usize) -> Self {
        RemoteShare {
            chain,
            stage,
            want: AtomicU32::new(0),
            closing: AtomicBool::new(false),
            changed: Notify::new(),
            peers: (0..peers).map(|_| PeerCount::default()).collect(),
        }
    }

    /// Sets how many instances this node wants on peers (the autoscaler's count beyond
    /// what it runs locally). Cheap; the share's task acts on it.
    pub fn want(&self, n: u32) {
        if self.want.swap(n, Relaxed) != n {
            self.changed.notify_one();
        }
    }

    /// Releases every grant (shutdown): peers retire the instances while this node's page
    /// server still serves them.
    pub fn close(&self) {
        self.closing.store(true, Relaxed);
        self.changed.notify_one();
    }

    /// Whether no peer runs an instance of this share any more, as they last answered.
    pub fn released(&self) -> bool {
        self.peers
            .iter()
            .all(|p| p.granted.load(Relaxed) + p.live.load(Relaxed) == 0)
    }

    /// Instances serving on peer `i`, as it last answered (0 once it stopped answering).
    pub fn ready(&self, i: usize) -> u32 {
        self.peers[i].ready.load(Relaxed)
    }

    /// Instances serving on all peers.
    pub fn ready_total(&self) -> u32 {
        self.peers.iter().map(|p| p.ready.load(Relaxed)).sum()
    }

    fn names(&self) -> (&str, &str) {
        (
            self.chain.plan.spec.name.as_str(),
            self.chain.stages[self.stage].name.as_str(),
        )
    }

    /// A running local instance to prepare the image from.
    fn serving_instance(&self) -> Option<usize> {
        self.chain.stages[self.stage]
            .instances
            .iter()
            .position(|i| i.is_serving())
    }

    /// Keeps the peers' grants in line with the want until the task is dropped.
    pub(super) async fn run(
        self: Arc<Self>,
        links: Vec<Arc<PeerLink>>,
        node: Arc<NodeService>,
        origin: String,
        incarnation: u64,
        gauges: Gauges,
    ) {
        let (chain, function) = self.names();
        let mut image: Option<Image> = None;
        // Older images, revoked once nothing runs on peers.
        let mut old: Vec<u64> = Vec::new();
        let mut retry_prepare_at: Option<Instant> = None;
        // Per peer: since when its control requests fail or are refused (logged once).
        let mut failing: Vec<Option<Instant>> = vec![None; links.len()];
        // After this long without an answer, a peer's instances have stopped for sure: its
        // grant lapsed and a retiring instance finishes within the chain's deadline.
        let gone_after = super::GRANT_LEASE + self.chain.plan.spec.timeout;
        loop {
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(RENEW) => {}
            }
            let want = if self.closing.load(Relaxed) {
                0
            } else {
                self.want.load(Relaxed)
            };
            let remote_live = self
                .peers
                .iter()
                .any(|p| p.granted.load(Relaxed) + p.live.load(Relaxed) > 0);
            if want == 0 && !remote_live {
                for handle in image
                    .take()
                    .map(|i| i.descriptor.handle)
                    .into_iter()
                    .chain(old.drain(..))
                {
                    match node.revoke_image(handle) {
                        Ok(()) => tracing::info!(%chain, %function,
                            handle = %format_args!("{handle:#018x}"),
                            "no peer runs the image any more; revoked"),
                        Err(e) => {
                            tracing::debug!(%chain, %function, "revoking {handle:#018x}: {e}")
                        }
                    }
                }
                continue;
            }
            let stale = image
                .as_ref()
                .is_some_and(|i| i.prepared.elapsed() > IMAGE_LEASE / 2);
            let may_prepare = retry_prepare_at.is_none_or(|at| Instant::now() >= at);
            if want > 0 && (image.is_none() || stale) && may_prepare {
                match self.prepare(&node).await {
                    Ok(descriptor) => {
                        if let Some(previous) = image.take() {
                            old.push(previous.descriptor.handle);
                        }
                        image = Some(Image {
                            descriptor,
                            prepared: Instant::now(),
                        });
                        retry_prepare_at = None;
                    }
                    Err(e) => {
                        tracing::warn!(%chain, %function, "cannot prepare an image for peers: {e}");
                        retry_prepare_at = Some(Instant::now() + PREPARE_BACKOFF);
                    }
                }
            }
            let mut remaining = if image.is_some() { want } else { 0 };
            for (i, link) in links.iter().enumerate() {
                let count = &self.peers[i];
                let ask = remaining;
                if ask == 0 && count.granted.load(Relaxed) + count.live.load(Relaxed) == 0 {
                    continue;
                }
                if link.addrs().is_none() {
                    // An empty slot of peers found by DNS: nothing to ask. What a peer that
                    // left it still ran counts down as an unreachable peer's does.
                    let since = *failing[i].get_or_insert_with(Instant::now);
                    count.granted.store(0, Relaxed);
                    count.ready.store(0, Relaxed);
                    if since.elapsed() > gone_after {
                        count.live.store(0, Relaxed);
                    }
                    continue;
                }
                let mut request = json!({
                    "origin": origin,
                    "incarnation": incarnation,
                    "chain": chain,
                    "function": function,
                    "instances": ask,
                });
                if let (Some(img), true) = (&image, ask > 0) {
                    request["image"] = json!(img.descriptor.to_string());
                }
                match link.call(&request).await {
                    Ok(answer) => {
                        let n = |k: &str| {
                            answer
                                .get(k)
                                .and_then(serde_json::Value::as_u64)
                                .unwrap_or(0) as u32
                        };
                        if let Some(e) = answer.get("error").and_then(|e| e.as_str()) {
                            if failing[i].replace(Instant::now()).is_none() {
                                tracing::warn!(%chain, %function, peer = %link.name,
                                    "peer refused the scale request: {e}");
                            }
                            // A refusal means it runs nothing for this share.
                            for a in [&count.granted, &count.ready, &count.live] {
                                a.store(0, Relaxed);
                            }
                            continue;
                        }
                        if failing[i].take().is_some() {
                            tracing::info!(%chain, %function, peer = %link.name,
                                "peer answers scale requests again");
                        }
                        let granted = n("granted").min(ask);
                        if granted != count.granted.load(Relaxed) {
                            tracing::info!(%chain, %function, peer = %link.name, asked = ask,
                                granted, "remote instances");
                        }
                        count.granted.store(granted, Relaxed);
                        count.ready.store(n("ready").min(granted), Relaxed);
                        count.live.store(n("live"), Relaxed);
                        remaining -= granted;
                    }
                    Err(e) => {
                        let since = *failing[i].get_or_insert_with(Instant::now);
                        if since.elapsed() < RENEW {
                            tracing::warn!(%chain, %function, peer = %link.name,
                                "peer-control request failed: {e}");
                        } else {
                            tracing::debug!(%chain, %function, peer = %link.name,
                                "peer-control request failed: {e}");
                        }
                        // Its instances cannot be reached either: forward nothing to it, and
                        // ask the next peer. What it still runs counts until it must have
                        // stopped, so the image is not revoked under a retiring instance.
                        count.granted.store(0, Relaxed);
                        count.ready.store(0, Relaxed);
                        if since.elapsed() > gone_after {
                            count.live.store(0, Relaxed);
                        }
                    }
                }
            }
            for (i, link) in links.iter().enumerate() {
                let c = &self.peers[i];
                for (state, v) in [("granted", &c.granted), ("ready", &c.ready)] {
                    gauges
                        .remote
                        .with_label_values(&[chain, function, link.name.as_str(), state])
                        .set(i64::from(v.load(Relaxed)));
                }
            }
            gauges
                .wanted
                .with_label_values(&[chain, function])
                .set(i64::from(want));
        }
    }

    async fn prepare(&self, node: &Arc<NodeService>) -> Result<ImageDescriptor, String> {
        let (chain, function) = self.names();
        let instance = self
            .serving_instance()
            .ok_or("no local instance is serving to prepare from")?;
        let key = InstanceKey {
            chain: chain.to_owned(),
            function: function.to_owned(),
            instance,
        };
        node.prepare_image(key, IMAGE_LEASE).await
    }
}
