//! The HTTP front: route by path to a chain, copy the body once into an arena slot, start the
//! chain, and turn its completion into a response.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use http_edge::{Reply, failure_code, text};
use hyper::body::{Body, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use proto::Status;

use crate::dataplane::{ChainRuntime, Completion, SlotGuard};
use crate::metrics::{ChainMetrics, Metrics};
use crate::node::NodeService;
use crate::payload;
use crate::peers::Cluster;

pub struct Gateway {
    pub chains: Vec<Arc<ChainRuntime>>,
    routes: HashMap<String, usize>,
    content_types: Vec<HeaderValue>,
    /// Per-chain metric handles, indexed like `chains`.
    chain_metrics: Vec<ChainMetrics>,
    pub metrics: Arc<Metrics>,
    pub dataplane: DataplaneStatus,
    /// The node service (images of running instances), when this gateway runs one.
    pub node: Option<Arc<NodeService>>,
    /// Peers this gateway scales out to and forwards to, and its budget.
    pub cluster: Arc<Cluster>,
    /// The eBPF programs at the ingress (`ingress:`), whose counters /metrics shows.
    pub ingress: Option<Arc<crate::ingress::Ingress>>,
}

/// Which dataplane runs, and why not the kernel one when `auto` fell back.
#[derive(Clone, Debug)]
pub struct DataplaneStatus {
    pub mode: &'static str,
    pub fallback_reason: Option<String>,
    /// How instances resumed from remote images fetch their pages, and why not over RDMA;
    /// `None` when no function resumes from an image.
    pub fork_pages: Option<(&'static str, String)>,
}

impl DataplaneStatus {
    pub fn sockmap() -> Self {
        DataplaneStatus {
            mode: "sockmap",
            fallback_reason: None,
            fork_pages: None,
        }
    }

    pub fn userspace(fallback_reason: Option<String>) -> Self {
        DataplaneStatus {
            mode: "userspace",
            fallback_reason,
            fork_pages: None,
        }
    }
}

/// Decrements a gauge when dropped.
struct GaugeGuard<'a>(&'a prometheus::IntGauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Gateway {
    pub fn new(
        chains: Vec<Arc<ChainRuntime>>,
        metrics: Arc<Metrics>,
        dataplane: DataplaneStatus,
    ) -> Self {
        metrics.set_dataplane(dataplane.mode, dataplane.fallback_reason.as_deref());
        if let Some((transport, why)) = &dataplane.fork_pages {
            metrics.set_fork_transport(transport, why);
        }
        let routes = chains
            .iter()
            .enumerate()
            .map(|(i, c)| (c.plan.spec.route.clone(), i))
            .collect();
        // Validated as printable ASCII by the config; the fallback only guards the invariant.
        let content_types = chains
            .iter()
            .map(|c| {
                HeaderValue::from_str(&c.plan.spec.content_type)
                    .unwrap_or(HeaderValue::from_static("application/octet-stream"))
            })
            .collect();
        let chain_metrics = chains
            .iter()
            .map(|c| metrics.chain(&c.plan.spec.name))
            .collect();
        Gateway {
            chains,
            routes,
            content_types,
            chain_metrics,
            metrics,
            dataplane,
            node: None,
            cluster: Arc::new(Cluster::default()),
            ingress: None,
        }
    }

    /// Shows the ingress programs' counters in /metrics.
    pub fn with_ingress(mut self, ingress: Option<Arc<crate::ingress::Ingress>>) -> Self {
        self.ingress = ingress;
        self
    }

    /// Forwards requests to peers running instances of this node's chains (and reports the
    /// budget and peers in /metrics).
    pub fn with_cluster(mut self, cluster: Arc<Cluster>) -> Self {
        self.cluster = cluster;
        self
    }

    /// Reports the node service's state in /readyz and its metrics in /metrics.
    pub fn with_node(mut self, node: Arc<NodeService>) -> Self {
        self.node = Some(node);
        self
    }

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Reply, Infallible> {
        let path = req.uri().path();
        let reply = match path {
            "/healthz" => text(StatusCode::OK, "ok"),
            "/readyz" => self.readyz(),
            "/metrics" => self.metrics_page(),
            _ => match self.routes.get(path) {
                Some(&i) => {
                    let chain = Arc::clone(&self.chains[i]);
                    let metrics = &self.chain_metrics[i];
                    let started = Instant::now();
                    metrics.in_flight.inc();
                    // Decremented on every exit, including a client that disconnects mid-way.
                    let _in_flight = GaugeGuard(&metrics.in_flight);
                    let peer = self
                        .cluster
                        .peers
                        .as_ref()
                        .and_then(|p| Some((p, p.pick(i, &req)?)));
                    let reply = match peer {
                        // The arena is per node: a peer's instances get the whole request.
                        Some((peers, target)) => peers.forward(target, &chain, req).await,
                        None => serve_chain(&chain, metrics, &self.content_types[i], req).await,
                    };
                    metrics.request(reply.status().as_u16());
                    metrics.duration.observe(started.elapsed().as_secs_f64());
                    reply
                }
                None => text(
                    StatusCode::NOT_FOUND,
                    format!("no chain is routed at {path}"),
                ),
            },
        };
        Ok(reply)
    }

    fn readyz(&self) -> Reply {
        let down: Vec<String> = self
            .chains
            .iter()
            .flat_map(|c| {
                // A function that may scale to zero is ready with no instance: its first
                // request waits for a fork.
                (0..c.stages.len())
                    .filter(|&s| {
                        c.live_instances(s) == 0 && c.plan.stages[s].function.instances.min > 0
                    })
                    .map(|s| format!("{}/{}", c.plan.spec.name, c.stages[s].name))
                    .collect::<Vec<_>>()
            })
            .collect();
        let images = self.node.as_ref().and_then(|n| n.readiness());
        if let Some(Err(why)) = images {
            return text(StatusCode::SERVICE_UNAVAILABLE, why);
        }
        if down.is_empty() {
            let mut body = format!("ready\ndataplane: {}", self.dataplane.mode);
            if let Some(reason) = &self.dataplane.fallback_reason {
                body.push_str(&format!(" (eBPF unavailable: {reason})"));
            }
            if let Some((transport, why)) = &self.dataplane.fork_pages {
                body.push_str(&format!("\nfork pages: {transport} ({why})"));
            }
            if let Some(Ok(line)) = images {
                body.push('\n');
                body.push_str(&line);
            }
            text(StatusCode::OK, body)
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no live instance: {}", down.join(", ")),
            )
        }
    }

    fn metrics_page(&self) -> Reply {
        for c in &self.chains {
            self.metrics.set_arena(&c.plan.spec.name, &c.arena);
        }
        let mut extra = self.node.as_ref().map(|n| n.families()).unwrap_or_default();
        extra.extend(self.cluster.families());
        if let Some(ingress) = &self.ingress {
            extra.extend(ingress.families());
        }
        let mut resp = Response::new(Full::new(Bytes::from(
            self.metrics.encode(&self.chains, extra),
        )));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        resp
    }
}

async fn serve_chain(
    chain: &ChainRuntime,
    metrics: &ChainMetrics,
    content_type: &HeaderValue,
    req: Request<Incoming>,
) -> Reply {
    // Over the largest slot class: 413 before reading. The baseline has only the header
    // check; either way the read below holds the body to that size.
    if let Some(reply) = payload::too_large_up_front(chain, &req) {
        payload::discard_body(req.into_body());
        return reply;
    }
    let class = payload::class_for(chain, req.body().size_hint().lower());
    let slot = match payload::alloc(chain, metrics, class) {
        Ok(slot) => slot,
        Err(reply) => {
            payload::discard_body(req.into_body());
            return reply;
        }
    };

    // The chain's deadline covers the upload too: a slow sender must not pin a slot forever.
    let timeout = chain.plan.spec.timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let body = payload::copy_body(chain, metrics, slot, req.into_body());
    let (slot, len) = match tokio::time::timeout_at(deadline, body).await {
        Ok(Ok(copied)) => copied,
        Ok(Err(reply)) => return reply,
        Err(_) => {
            let name = &chain.plan.spec.name;
            let message = format!(
                "request body not received within chain {name}'s {} ms",
                timeout.as_millis()
            );
            return text(StatusCode::REQUEST_TIMEOUT, message);
        }
    };

    let completion = match chain.start(slot, len, deadline) {
        Ok(rx) => rx,
        Err((code, message)) => return text(code, message),
    };
    match tokio::time::timeout_at(deadline, completion).await {
        Ok(Ok(Completion::Returned { desc, slot })) => {
            respond(chain, metrics, content_type, desc, slot)
        }
        Ok(Ok(Completion::Failed { code, message })) => text(code, message),
        Ok(Err(_)) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "request was dropped by the dataplane",
        ),
        // The request stays in the table until its descriptor returns or its holder exits;
        // only then is the slot released.
        Err(_) => text(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "chain {} did not finish within {} ms",
                chain.plan.spec.name,
                timeout.as_millis()
            ),
        ),
    }
}

fn respond(
    chain: &ChainRuntime,
    metrics: &ChainMetrics,
    content_type: &HeaderValue,
    desc: proto::Descriptor,
    slot: SlotGuard,
) -> Reply {
    let payload = match payload::read_answer(chain, metrics, &slot, desc.len) {
        Ok(payload) => payload,
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("arena: {e}")),
    };
    drop(slot);
    let status = desc.status().unwrap_or(Status::Refused);
    if status == Status::Ok {
        let mut resp = Response::new(Full::new(Bytes::from(payload)));
        resp.headers_mut()
            .insert(CONTENT_TYPE, content_type.clone());
        return resp;
    }
    // A refusing worker leaves the slot untouched, so the payload is not a message.
    let message = match status {
        Status::Refused => {
            "a function refused the request's descriptor (see the gateway log)".into()
        }
        _ if payload.is_empty() => format!("chain failed with status {status:?}"),
        _ => String::from_utf8_lossy(&payload).into_owned(),
    };
    text(failure_code(status), message)
}
