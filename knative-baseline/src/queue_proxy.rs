//! The queue-proxy: Knative's per-pod sidecar. A reverse proxy in front of one function server
//! that
//! - counts requests in flight (what Knative's autoscaler scrapes),
//! - enforces `containerConcurrency`: with N > 0 at most N requests are forwarded at once and
//!   the rest wait in FIFO order (Knative's "breaker"); 0 forwards everything,
//! - enforces the revision timeout (504), counting from arrival, queueing included; the
//!   orchestrator sets it to the chain's `timeout_ms` (see the crate docs),
//! - answers its own readiness probe by probing the container once.
//!
//! Bodies stream through in both directions; a request holds its concurrency permit and stays
//! "in flight" until its response body has been handed on, as in Knative where the slot is
//! held until the proxy handler returns.
//!
//! `GET /_queue/stats` returns `in_flight N\nserved N\nqueued_max N\n` (plain text, for tests
//! and quick looks); `GET /_queue/ready` is the readiness probe.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Empty, Full};
use http_edge::{Reply, text};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::BaselineError;
use crate::net;

/// How long the readiness probe waits for the container.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct QueueProxyArgs {
    pub listen: SocketAddr,
    /// The function server (user container) this proxy fronts.
    pub upstream: SocketAddr,
    /// Knative's `containerConcurrency`: 0 = unlimited.
    pub container_concurrency: u32,
    /// Knative's revision `timeoutSeconds`, counted from the request's arrival here; None = no
    /// limit. The orchestrator passes the chain's `timeout_ms`.
    pub timeout: Option<Duration>,
    /// The function's name, for error messages.
    pub name: Option<String>,
}

/// Counters behind `/_queue/stats`.
#[derive(Default)]
struct Stats {
    in_flight: AtomicU64,
    served: AtomicU64,
    waiting: AtomicU64,
    queued_max: AtomicU64,
}

/// One request's presence in the proxy: counted in flight from arrival until dropped, then
/// counted as served.
struct InFlight(Arc<Stats>);

impl InFlight {
    fn enter(stats: &Arc<Stats>) -> InFlight {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(stats))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // served first, so a reader that sees in_flight drop also sees the request served.
        self.0.served.fetch_add(1, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Release);
    }
}

/// A request waiting for a concurrency permit; dropped when it gets one or gives up.
struct Waiting<'a>(&'a Stats);

impl<'a> Waiting<'a> {
    fn enter(stats: &'a Stats) -> Waiting<'a> {
        let now = stats.waiting.fetch_add(1, Ordering::Relaxed) + 1;
        stats.queued_max.fetch_max(now, Ordering::Relaxed);
        Waiting(stats)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a proxied request holds until its response body is done.
struct Held {
    _in_flight: InFlight,
    _permit: Option<OwnedSemaphorePermit>,
}

/// Either a reply the proxy makes itself or the container's streamed response, which carries
/// the request's in-flight count and permit until its last frame is passed on.
enum ProxyBody {
    Local(Full<Bytes>),
    Upstream { body: Incoming, held: Option<Held> },
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Local(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            ProxyBody::Upstream { body, held } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                let finished = match &polled {
                    Poll::Ready(None | Some(Err(_))) => true,
                    Poll::Ready(Some(Ok(_))) => body.is_end_stream(),
                    Poll::Pending => false,
                };
                if finished {
                    *held = None;
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Local(full) => full.is_end_stream(),
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Local(full) => full.size_hint(),
            ProxyBody::Upstream { body, .. } => body.size_hint(),
        }
    }
}

fn local(reply: Reply) -> Response<ProxyBody> {
    reply.map(ProxyBody::Local)
}

pub(crate) struct QueueProxy {
    upstream: SocketAddr,
    authority: hyper::http::uri::Authority,
    client: Client<HttpConnector, Incoming>,
    probe: Client<HttpConnector, Empty<Bytes>>,
    breaker: Option<Arc<Semaphore>>,
    timeout: Option<Duration>,
    name: Option<String>,
    stats: Arc<Stats>,
    ready: AtomicBool,
}

pub fn run(args: QueueProxyArgs) -> Result<(), BaselineError> {
    net::runtime("kn-queue-proxy", net::cpu_count())?.block_on(async move {
        let listener = net::bind(args.listen).await?;
        let addr = net::announce(&listener)?;
        tracing::info!(
            "knative-style baseline: queue-proxy{} listening on {addr} -> {} (containerConcurrency {})",
            args.name.as_deref().map(|n| format!(" of {n}")).unwrap_or_default(),
            args.upstream,
            args.container_concurrency
        );
        let proxy = Arc::new(QueueProxy::new(&args));
        net::until_signal(proxy.serve(listener)).await
    })
}

impl QueueProxy {
    pub(crate) fn new(args: &QueueProxyArgs) -> QueueProxy {
        QueueProxy {
            upstream: args.upstream,
            authority: args
                .upstream
                .to_string()
                .parse()
                .expect("a socket address is a valid authority"),
            client: net::client(),
            probe: net::client(),
            breaker: (args.container_concurrency > 0)
                .then(|| Arc::new(Semaphore::new(args.container_concurrency as usize))),
            timeout: args.timeout,
            name: args.name.clone(),
            stats: Arc::new(Stats::default()),
            ready: AtomicBool::new(false),
        }
    }

    pub(crate) async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        let handler = move |req| Arc::clone(&self).handle(req);
        net::serve(listener, handler, false).await
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        Ok(match req.uri().path() {
            "/_queue/stats" => local(text(StatusCode::OK, self.stats_text().trim_end())),
            "/_queue/ready" => local(self.readiness().await),
            _ => self.proxy(req).await,
        })
    }

    fn stats_text(&self) -> String {
        let s = &self.stats;
        format!(
            "in_flight {}\nserved {}\nqueued_max {}\n",
            s.in_flight.load(Ordering::Acquire),
            s.served.load(Ordering::Relaxed),
            s.queued_max.load(Ordering::Relaxed)
        )
    }

    /// Ready once the container has answered its health check; like Knative's probe, the
    /// result is not re-checked after the first success.
    async fn readiness(&self) -> Reply {
        if self.ready.load(Ordering::Acquire) {
            return text(StatusCode::OK, "ready");
        }
        let uri = Uri::builder()
            .scheme("http")
            .authority(self.authority.clone())
            .path_and_query("/healthz")
            .build()
            .expect("static parts form a valid URI");
        match tokio::time::timeout(PROBE_TIMEOUT, self.probe.get(uri)).await {
            Ok(Ok(resp)) if resp.status() == StatusCode::OK => {
                self.ready.store(true, Ordering::Release);
                text(StatusCode::OK, "ready")
            }
            Ok(Ok(resp)) => net::not_ready(format!(
                "container {} answered {}",
                self.upstream,
                resp.status()
            )),
            Ok(Err(e)) => net::not_ready(format!("container {} unreachable: {e}", self.upstream)),
            Err(_) => net::not_ready(format!(
                "container {} did not answer within {PROBE_TIMEOUT:?}",
                self.upstream
            )),
        }
    }

    async fn proxy(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let in_flight = InFlight::enter(&self.stats);
        let forward = async {
            let permit = match &self.breaker {
                None => None,
                Some(breaker) => Some(match Arc::clone(breaker).try_acquire_owned() {
                    Ok(permit) => permit,
                    Err(_) => {
                        let _waiting = Waiting::enter(&self.stats);
                        Arc::clone(breaker)
                            .acquire_owned()
                            .await
                            .expect("the semaphore is never closed")
                    }
                }),
            };
            let result = match self.upstream_request(req) {
                Ok(up) => self.client.request(up).await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            (result, permit)
        };
        let outcome = match self.timeout {
            Some(limit) => tokio::time::timeout(limit, forward).await.ok(),
            None => Some(forward.await),
        };
        match outcome {
            Some((Ok(resp), permit)) => {
                let (mut parts, body) = resp.into_parts();
                net::strip_hop_by_hop(&mut parts.headers);
                let held = Held {
                    _in_flight: in_flight,
                    _permit: permit,
                };
                Response::from_parts(
                    parts,
                    ProxyBody::Upstream {
                        body,
                        held: Some(held),
                    },
                )
            }
            Some((Err(e), _)) => local(text(
                StatusCode::BAD_GATEWAY,
                format!("queue-proxy: container {} failed: {e}", self.upstream),
            )),
            None => {
                let limit = self.timeout.unwrap_or_default().as_millis();
                let message = match &self.name {
                    Some(name) => format!(
                        "function {name}: no response within the revision timeout of {limit} ms"
                    ),
                    None => format!("queue-proxy: no response within {limit} ms"),
                };
                local(text(StatusCode::GATEWAY_TIMEOUT, message))
            }
        }
    }

    /// The same request aimed at the container: absolute URI for the pool, connection-level
    /// headers dropped, everything else (Host, ce-*, the body stream) kept.
    fn upstream_request(&self, req: Request<Incoming>) -> Result<Request<Incoming>, String> {
        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| format!("bad request URI: {e}"))?;
        parts.version = hyper::Version::HTTP_11;
        net::strip_hop_by_hop(&mut parts.headers);
        Ok(Request::from_parts(parts, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper::header::HeaderValue;
    use std::time::Instant;
    use tokio::net::TcpListener;

    /// A container that serves many requests at once, each taking `delay`, so any
    /// serialisation observed comes from the proxy.
    async fn slow_concurrent_upstream(delay: Duration) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = move |req: Request<Incoming>| async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            tokio::time::sleep(delay).await;
            let mut resp = Response::new(Full::new(body));
            resp.headers_mut()
                .insert("x-upstream", HeaderValue::from_static("yes"));
            Ok::<_, Infallible>(resp)
        };
        tokio::spawn(net::serve(listener, handler, false));
        addr
    }

    async fn start_proxy(upstream: SocketAddr, cc: u32, timeout: Option<Duration>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = Arc::new(QueueProxy::new(&QueueProxyArgs {
            listen: addr,
            upstream,
            container_concurrency: cc,
            timeout,
            name: Some("slow".into()),
        }));
        tokio::spawn(proxy.serve(listener));
        addr
    }

    async fn post(
        client: &Client<HttpConnector, Full<Bytes>>,
        addr: SocketAddr,
        path: &str,
        body: &'static str,
    ) -> (StatusCode, hyper::HeaderMap, String) {
        let req = Request::post(format!("http://{addr}{path}"))
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    /// Two concurrent 300 ms requests; returns the wall time and the proxy's stats.
    async fn two_concurrent(cc: u32) -> (Duration, String) {
        let upstream = slow_concurrent_upstream(Duration::from_millis(300)).await;
        let proxy = start_proxy(upstream, cc, None).await;
        let client = net::client::<Full<Bytes>>();
        let began = Instant::now();
        let (a, b) = tokio::join!(
            post(&client, proxy, "/", "one"),
            post(&client, proxy, "/", "two")
        );
        let took = began.elapsed();
        assert_eq!((a.0, a.2.as_str()), (StatusCode::OK, "one"));
        assert_eq!((b.0, b.2.as_str()), (StatusCode::OK, "two"));
        assert_eq!(a.1.get("x-upstream").unwrap(), "yes");
        let stats = post(&client, proxy, "/_queue/stats", "").await.2;
        (took, stats)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn container_concurrency_one_serialises() {
        let (took, stats) = two_concurrent(1).await;
        assert!(took >= Duration::from_millis(600), "took {took:?}");
        assert_eq!(stats, "in_flight 0\nserved 2\nqueued_max 1\n");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn container_concurrency_zero_does_not_limit() {
        let (took, stats) = two_concurrent(0).await;
        assert!(took < Duration::from_millis(550), "took {took:?}");
        assert_eq!(stats, "in_flight 0\nserved 2\nqueued_max 0\n");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn revision_timeout_answers_504_and_counts_the_request() {
        let upstream = slow_concurrent_upstream(Duration::from_millis(500)).await;
        let proxy = start_proxy(upstream, 0, Some(Duration::from_millis(100))).await;
        let client = net::client::<Full<Bytes>>();
        let began = Instant::now();
        let (status, _, body) = post(&client, proxy, "/", "x").await;
        assert!(began.elapsed() < Duration::from_millis(450));
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            body,
            "function slow: no response within the revision timeout of 100 ms\n"
        );
        let stats = post(&client, proxy, "/_queue/stats", "").await.2;
        assert_eq!(stats, "in_flight 0\nserved 1\nqueued_max 0\n");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unreachable_container_is_502_and_not_ready() {
        // Bind then drop: nothing listens on the port any more.
        let dead = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let proxy = start_proxy(dead, 0, None).await;
        let client = net::client::<Full<Bytes>>();
        let (status, _, body) = post(&client, proxy, "/", "x").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        let (status, _, _) = post(&client, proxy, "/_queue/ready", "").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
}
