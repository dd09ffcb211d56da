//! The ingress: Knative's gateway (Kourier/Envoy) and, for chains, the Eventing Sequence's
//! channel dispatcher.
//!
//! It routes by exact path to a chain (404 otherwise) and runs the chain as a Sequence: the
//! full payload is POSTed to a queue-proxy of step 1 (round-robin over that function's pods),
//! the reply body is taken back and POSTed to step 2, and so on; the last reply goes to the
//! client with the chain's `content_type`. A dynamic chain starts at `entry` and follows the
//! `x-spindle-next` reply header until it is absent. Each delivery carries CloudEvents
//! binary-mode headers, as Eventing's dispatcher sends them.
//!
//! Limits and failures answer as Spindle's gateway does: a body over the chain's `slot_size` is
//! 413 (before reading it when `Content-Length` says so), an upload slower than the chain's
//! `timeout_ms` 408, a chain slower than it 504, passing `max_hops` 508, and any step's
//! non-200 reply is returned to the client as it is.
//!
//! `/healthz` answers 200 while the process is up; `/readyz` answers 200 once every pod's
//! queue-proxy has reported ready (each is probed until it has answered once).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chain_runtime::config::Config;
use chain_runtime::plan::Plan;
use http_body_util::{BodyExt, Full, LengthLimitError};
use http_edge::{Reply, payload_too_large, text};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::BaselineError;
use crate::function::NEXT_HEADER;
use crate::net;

/// How long a readiness probe of one queue-proxy may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a scrape waits for a function server's copy counts: it answers between calls.
const COPIES_TIMEOUT: Duration = Duration::from_secs(5);
/// Room above the slot size for an error reply, which is cut at the slot size plus a newline.
const REPLY_SLACK: usize = 1024;
/// The CloudEvents type of every delivery.
const CE_TYPE: &str = "dev.spindle.request";

#[derive(Debug, Clone)]
pub struct IngressArgs {
    pub config: PathBuf,
    pub listen: SocketAddr,
    pub pods: Vec<PodsArg>,
}

/// One `--pods FUNCTION@CHAIN=ADDR[,ADDR...]`: the queue-proxies of one function of one chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodsArg {
    pub function: String,
    pub chain: String,
    pub addrs: Vec<SocketAddr>,
}

impl PodsArg {
    pub fn parse(text: &str) -> Result<PodsArg, String> {
        let bad =
            |why: &str| format!("--pods {text}: {why} (expected FUNCTION@CHAIN=ADDR[,ADDR...])");
        let (name, addrs) = text.split_once('=').ok_or_else(|| bad("no `=`"))?;
        let (function, chain) = name.split_once('@').ok_or_else(|| bad("no `@`"))?;
        if function.is_empty() || chain.is_empty() {
            return Err(bad("empty function or chain name"));
        }
        let addrs = addrs
            .split(',')
            .map(|a| a.trim().parse::<SocketAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&format!("bad address: {e}")))?;
        Ok(PodsArg {
            function: function.to_string(),
            chain: chain.to_string(),
            addrs,
        })
    }
}

impl std::fmt::Display for PodsArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}=", self.function, self.chain)?;
        for (i, a) in self.addrs.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{a}")?;
        }
        Ok(())
    }
}

/// One pod of a function: the address of its queue-proxy.
struct PodRoute {
    addr: SocketAddr,
    uri: Uri,
    ready_uri: Uri,
    ready: AtomicBool,
}

/// One function of a chain (a Sequence step or a dynamic-chain target).
struct Step {
    function: String,
    pods: Vec<PodRoute>,
    next_pod: AtomicUsize,
}

impl Step {
    fn pick(&self) -> &PodRoute {
        let n = self.next_pod.fetch_add(1, Ordering::Relaxed);
        &self.pods[n % self.pods.len()]
    }
}

struct ChainRoute {
    name: String,
    content_type: HeaderValue,
    slot_size: usize,
    timeout: Duration,
    dynamic: bool,
    max_hops: u32,
    /// Static chains: the steps in order. Dynamic chains: the entry first.
    steps: Vec<Step>,
    ce_source: HeaderValue,
    /// Payload bytes this process copied collecting the client's body and the steps' replies.
    copied_request: AtomicU64,
    copied_replies: AtomicU64,
}

pub(crate) struct Ingress {
    chains: Vec<ChainRoute>,
    routes: HashMap<String, usize>,
    client: Client<HttpConnector, Full<Bytes>>,
    next_id: AtomicU64,
}

pub fn run(args: IngressArgs) -> Result<(), BaselineError> {
    let config = Config::load(&args.config)?;
    let ingress = Arc::new(Ingress::new(&config, &args.pods)?);
    net::runtime("kn-ingress", net::cpu_count())?.block_on(async move {
        let listener = net::bind(args.listen).await?;
        let addr = net::announce(&listener)?;
        tracing::info!("knative-style baseline: ingress listening on http://{addr}");
        for c in &ingress.chains {
            let route = ingress
                .routes
                .iter()
                .find(|(_, i)| ingress.chains[**i].name == c.name)
                .map_or("?", |(r, _)| r.as_str());
            let pods: Vec<String> = c
                .steps
                .iter()
                .map(|s| format!("{}×{}", s.function, s.pods.len()))
                .collect();
            tracing::info!(
                "  {route} -> {} {} [{}]",
                if c.dynamic {
                    "dynamic chain"
                } else {
                    "sequence"
                },
                c.name,
                pods.join(", ")
            );
        }
        let handler = move |req| Arc::clone(&ingress).handle(req);
        net::until_signal(net::serve(listener, handler, true)).await
    })
}

impl Ingress {
    pub(crate) fn new(config: &Config, pods: &[PodsArg]) -> Result<Ingress, BaselineError> {
        let plan = Plan::new(config);
        for p in pods {
            let known = plan
                .chain_by_name(&p.chain)
                .is_some_and(|c| c.stage_by_name(&p.function).is_some());
            if !known {
                return Err(BaselineError::Ingress(format!(
                    "--pods {p}: chain {} has no function {}",
                    p.chain, p.function
                )));
            }
        }
        let mut chains = Vec::new();
        let mut routes = HashMap::new();
        for chain in &plan.chains {
            let spec = &chain.spec;
            let mut steps = Vec::new();
            for stage in &chain.stages {
                let function = &stage.function.name;
                let addrs: Vec<SocketAddr> = pods
                    .iter()
                    .filter(|p| p.chain == spec.name && p.function == *function)
                    .flat_map(|p| p.addrs.iter().copied())
                    .collect();
                if addrs.is_empty() {
                    return Err(BaselineError::Ingress(format!(
                        "no --pods {function}@{}=ADDR given for function {function} of chain {}",
                        spec.name, spec.name
                    )));
                }
                let pods = addrs
                    .into_iter()
                    .map(|addr| PodRoute {
                        addr,
                        uri: format!("http://{addr}/").parse().expect("valid URI"),
                        ready_uri: format!("http://{addr}/_queue/ready")
                            .parse()
                            .expect("valid URI"),
                        ready: AtomicBool::new(false),
                    })
                    .collect();
                steps.push(Step {
                    function: function.clone(),
                    pods,
                    next_pod: AtomicUsize::new(0),
                });
            }
            routes.insert(spec.route.clone(), chains.len());
            chains.push(ChainRoute {
                name: spec.name.clone(),
                // Validated as printable ASCII by the config; the fallback guards the invariant.
                content_type: HeaderValue::from_str(&spec.content_type)
                    .unwrap_or(HeaderValue::from_static("application/octet-stream")),
                // The chain's largest slot class: the limit Spindle enforces.
                slot_size: spec.max_payload() as usize,
                timeout: spec.timeout,
                dynamic: chain.is_dynamic(),
                max_hops: u32::from(chain.max_hops()),
                steps,
                ce_source: HeaderValue::from_str(&format!(
                    "/apis/v1/namespaces/default/sequences/{}",
                    spec.name
                ))
                .expect("chain names are [a-z0-9_-]+"),
                copied_request: AtomicU64::new(0),
                copied_replies: AtomicU64::new(0),
            });
        }
        Ok(Ingress {
            chains,
            routes,
            client: net::client(),
            next_id: AtomicU64::new(1),
        })
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Reply, Infallible> {
        let path = req.uri().path();
        Ok(match path {
            "/healthz" => text(StatusCode::OK, "ok"),
            "/readyz" => self.readyz().await,
            "/metrics" => self.metrics().await,
            _ => match self.routes.get(path) {
                Some(&i) => self.serve_chain(&self.chains[i], req).await,
                None => text(
                    StatusCode::NOT_FOUND,
                    format!("no chain is routed at {path}"),
                ),
            },
        })
    }

    /// `spindle_payload_bytes_copied_total`, summed over this process and every pod's
    /// function server (asked through its queue-proxy, as a request). A pod that does not
    /// answer is left out of the sum, and the page says so in a comment.
    async fn metrics(&self) -> Reply {
        let mut page = String::from(crate::copies::header());
        let mut missing = Vec::new();
        for chain in &self.chains {
            let c = &chain.name;
            page.push_str(&crate::copies::sample(
                c,
                "request_body",
                "ingress",
                chain.copied_request.load(Ordering::Relaxed),
            ));
            page.push_str(&crate::copies::sample(
                c,
                "reply_body",
                "ingress",
                chain.copied_replies.load(Ordering::Relaxed),
            ));
            for step in &chain.steps {
                let mut sums = [0u64; crate::copies::FUNCTION_COPIES.len()];
                for pod in &step.pods {
                    match self.pod_copies(pod).await {
                        Some(counts) => {
                            for (s, n) in sums.iter_mut().zip(counts) {
                                *s += n;
                            }
                        }
                        None => missing.push(format!("{c}/{} at {}", step.function, pod.addr)),
                    }
                }
                for (copy, n) in crate::copies::FUNCTION_COPIES.iter().zip(sums) {
                    page.push_str(&crate::copies::sample(c, copy, &step.function, n));
                }
            }
        }
        if !missing.is_empty() {
            page.push_str(&format!("# pods not counted: {}\n", missing.join(", ")));
        }
        let mut resp = Response::new(Full::new(Bytes::from(page)));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        resp
    }

    /// A function server's counts ([`crate::copies::FUNCTION_COPIES`] order).
    async fn pod_copies(&self, pod: &PodRoute) -> Option<[u64; 3]> {
        let uri: Uri = format!("http://{}{}", pod.addr, crate::copies::COPIES_PATH)
            .parse()
            .ok()?;
        let req = Request::get(uri).body(Full::default()).ok()?;
        let resp = tokio::time::timeout(COPIES_TIMEOUT, self.client.request(req))
            .await
            .ok()?
            .ok()?;
        if resp.status() != StatusCode::OK {
            return None;
        }
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        let text = std::str::from_utf8(&body).ok()?;
        let mut counts = [0u64; 3];
        for (slot, name) in counts.iter_mut().zip(crate::copies::FUNCTION_COPIES) {
            *slot = text
                .lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())?;
        }
        Some(counts)
    }

    async fn readyz(&self) -> Reply {
        let mut down = Vec::new();
        for chain in &self.chains {
            for step in &chain.steps {
                for pod in &step.pods {
                    if pod.ready.load(Ordering::Acquire) {
                        continue;
                    }
                    let probe = Request::get(pod.ready_uri.clone())
                        .body(Full::default())
                        .expect("valid request");
                    match tokio::time::timeout(PROBE_TIMEOUT, self.client.request(probe)).await {
                        Ok(Ok(resp)) if resp.status() == StatusCode::OK => {
                            pod.ready.store(true, Ordering::Release);
                        }
                        _ => down.push(format!("{}/{} at {}", chain.name, step.function, pod.addr)),
                    }
                }
            }
        }
        if down.is_empty() {
            text(StatusCode::OK, "ready\ndataplane: knative-style baseline")
        } else {
            net::not_ready(format!("pods not ready: {}", down.join(", ")))
        }
    }

    async fn serve_chain(&self, chain: &ChainRoute, req: Request<Incoming>) -> Reply {
        let too_large = || payload_too_large(&chain.name, chain.slot_size as u64);
        if http_edge::check_content_length(req.headers(), chain.slot_size as u64).is_err() {
            return too_large();
        }
        // As in Spindle, the chain's deadline covers the upload too.
        let deadline = tokio::time::Instant::now() + chain.timeout;
        let upload =
            crate::copies::collect(req.into_body(), chain.slot_size, &chain.copied_request);
        let payload = match tokio::time::timeout_at(deadline, upload).await {
            Ok(Ok(body)) => body,
            Ok(Err(e)) if e.is::<LengthLimitError>() => return too_large(),
            Ok(Err(e)) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("reading request body: {e}"),
                );
            }
            Err(_) => {
                return text(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "request body not received within chain {}'s {} ms",
                        chain.name,
                        chain.timeout.as_millis()
                    ),
                );
            }
        };
        match tokio::time::timeout_at(deadline, self.sequence(chain, payload)).await {
            // A queue-proxy's revision timeout is the same budget counted from a little later,
            // so it normally fires after this deadline; if scheduling lets its 504 win the race
            // anyway, the chain still missed its deadline and answers as Spindle would.
            Ok(reply)
                if reply.status() != StatusCode::GATEWAY_TIMEOUT
                    || tokio::time::Instant::now() < deadline =>
            {
                reply
            }
            _ => text(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "chain {} did not finish within {} ms",
                    chain.name,
                    chain.timeout.as_millis()
                ),
            ),
        }
    }

    /// Delivers the payload to each step in turn, each reply becoming the next delivery.
    async fn sequence(&self, chain: &ChainRoute, mut payload: Bytes) -> Reply {
        let event_id = HeaderValue::from(self.next_id.fetch_add(1, Ordering::Relaxed));
        let mut index = 0;
        let mut hops = 0u32;
        loop {
            let step = &chain.steps[index];
            let pod = step.pick();
            let delivery = Request::post(pod.uri.clone())
                .header(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                )
                .header("ce-specversion", HeaderValue::from_static("1.0"))
                .header("ce-id", event_id.clone())
                .header("ce-source", chain.ce_source.clone())
                .header("ce-type", HeaderValue::from_static(CE_TYPE))
                .body(Full::new(payload))
                .expect("valid request");
            let resp = match self.client.request(delivery).await {
                Ok(resp) => resp,
                Err(e) => {
                    return text(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "function {}: cannot deliver to its queue-proxy at {}: {e}",
                            step.function, pod.addr
                        ),
                    );
                }
            };
            let (parts, body) = resp.into_parts();
            let body = match crate::copies::collect(
                body,
                chain.slot_size + REPLY_SLACK,
                &chain.copied_replies,
            )
            .await
            {
                Ok(body) => body,
                Err(e) => {
                    return text(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "function {}: reading the reply from {}: {e}",
                            step.function, pod.addr
                        ),
                    );
                }
            };
            hops += 1;
            if parts.status != StatusCode::OK {
                let mut reply = Response::new(Full::new(body));
                *reply.status_mut() = parts.status;
                if let Some(ct) = parts.headers.get(CONTENT_TYPE) {
                    reply.headers_mut().insert(CONTENT_TYPE, ct.clone());
                }
                return reply;
            }
            payload = body;
            let next = if chain.dynamic {
                match parts.headers.get(HeaderName::from_static(NEXT_HEADER)) {
                    None => None,
                    Some(name) => {
                        let found = chain
                            .steps
                            .iter()
                            .position(|s| s.function.as_bytes() == name.as_bytes());
                        if found.is_none() {
                            return text(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                format!(
                                    "function {}: routed to {:?}, which is not a function of chain {}",
                                    step.function, name, chain.name
                                ),
                            );
                        }
                        found
                    }
                }
            } else {
                Some(index + 1).filter(|&i| i < chain.steps.len())
            };
            let Some(next) = next else { break };
            if hops >= chain.max_hops {
                return text(
                    StatusCode::LOOP_DETECTED,
                    format!(
                        "function {}: request passed through {hops} functions, the chain's max_hops",
                        step.function
                    ),
                );
            }
            index = next;
        }
        let mut reply = Response::new(Full::new(payload));
        reply
            .headers_mut()
            .insert(CONTENT_TYPE, chain.content_type.clone());
        reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let wasm = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/wasm/uppercase.wasm"
        );
        let text = format!(
            "functions:\n  - {{ name: a, module: {wasm} }}\n  - {{ name: b, module: {wasm} }}\n\
             chains:\n  - {{ name: c, route: /c, steps: [a, b] }}\n"
        );
        Config::parse(&text, std::path::Path::new("/tmp/ingress-test.yaml")).unwrap()
    }

    fn pods(spec: &str) -> PodsArg {
        PodsArg::parse(spec).unwrap()
    }

    #[test]
    fn pods_round_trip() {
        let p = PodsArg::parse("uppercase@hello=127.0.0.1:1,127.0.0.1:2").unwrap();
        assert_eq!(p.function, "uppercase");
        assert_eq!(p.chain, "hello");
        assert_eq!(p.addrs.len(), 2);
        assert_eq!(p.to_string(), "uppercase@hello=127.0.0.1:1,127.0.0.1:2");
        assert_eq!(PodsArg::parse(&p.to_string()).unwrap(), p);
    }

    #[test]
    fn pods_rejects_malformed() {
        for bad in [
            "uppercase=127.0.0.1:1",
            "uppercase@hello",
            "@hello=127.0.0.1:1",
            "u@h=localhost:80",
            "u@h=",
        ] {
            assert!(PodsArg::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn every_function_needs_pods_and_every_pod_a_function() {
        if !std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/wasm/uppercase.wasm"
        ))
        .exists()
        {
            // The config checks that modules exist; the integration tests build them.
            let status = std::process::Command::new("make")
                .args([
                    "-s",
                    "-C",
                    concat!(env!("CARGO_MANIFEST_DIR"), "/../examples"),
                ])
                .status()
                .unwrap();
            assert!(status.success());
        }
        let config = config();
        let err = Ingress::new(&config, &[pods("a@c=127.0.0.1:1")])
            .err()
            .expect("b has no pods");
        assert!(err.to_string().contains("function b of chain c"), "{err}");
        let err = Ingress::new(
            &config,
            &[
                pods("a@c=127.0.0.1:1"),
                pods("b@c=127.0.0.1:2"),
                pods("z@c=127.0.0.1:3"),
            ],
        )
        .err()
        .expect("z is no function of c");
        assert!(err.to_string().contains("has no function z"), "{err}");
        let ok = Ingress::new(
            &config,
            &[pods("a@c=127.0.0.1:1,127.0.0.1:2"), pods("b@c=127.0.0.1:3")],
        )
        .unwrap();
        let step = &ok.chains[0].steps[0];
        let picked: Vec<u16> = (0..4).map(|_| step.pick().addr.port()).collect();
        assert_eq!(picked, [1, 2, 1, 2], "round-robin over pods");
    }
}
