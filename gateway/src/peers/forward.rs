//! Forwarding a whole request to a peer's gateway.
//!
//! The arena is per node: a request can reach instances on a peer only as an HTTP request to
//! that peer's gateway, which serves it through its own copy of the chain. The body is read
//! here (bounded by the chain's slot size, as a local request's is), sent with the request's
//! method, path, query and end-to-end headers plus [`super::FORWARDED_HEADER`] (so the peer
//! never forwards it again) over a keep-alive connection pool, all within the chain's
//! deadline counted from when the request arrived here.

use std::time::Instant;

use super::PeerAddrs;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use http_edge::{Reply, payload_too_large, text};
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::PeerLink;
use crate::dataplane::ChainRuntime;

/// Idle pooled connections to a peer are closed after this long.
const POOL_IDLE: std::time::Duration = std::time::Duration::from_secs(30);
/// Headers of one hop only (RFC 9110 §7.6.1), never forwarded, besides those the
/// `Connection` header names; `host` and `content-length` are set anew, and `expect` is
/// answered here (the body is read before the request leaves).
const HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HOST,
    header::CONTENT_LENGTH,
];

/// The end-to-end headers of `from`, for the next hop.
fn end_to_end(from: &header::HeaderMap, to: &mut header::HeaderMap, drop_also: &[HeaderName]) {
    let named: Vec<HeaderName> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for (k, v) in from {
        if !HOP_BY_HOP.contains(k) && !named.contains(k) && !drop_also.contains(k) {
            to.append(k, v.clone());
        }
    }
}

/// How a forward ended, the `outcome` label of `spindle_requests_forwarded_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The peer answered below 500.
    Ok,
    /// The peer answered 5xx (passed on as it came).
    PeerError,
    /// No connection to the peer's gateway could be made: 502.
    Unreachable,
    /// No answer within the chain's deadline: 504.
    Timeout,
    /// The connection failed after it was made (reset, malformed answer): 502.
    Failed,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::PeerError,
        Outcome::Unreachable,
        Outcome::Timeout,
        Outcome::Failed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::PeerError => "peer_error",
            Outcome::Unreachable => "unreachable",
            Outcome::Timeout => "timeout",
            Outcome::Failed => "failed",
        }
    }
}

pub(super) struct Forwarder {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Forwarder {
    pub(super) fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(connector);
        Forwarder { client }
    }

    /// Sends `req` for `chain` to `peer` and answers with what it answered. `None` for a
    /// request that never left (its body was too large: answered here, like a local one).
    pub(super) async fn forward(
        &self,
        peer: &PeerLink,
        origin: &HeaderValue,
        chain: &ChainRuntime,
        req: Request<Incoming>,
        arrived: Instant,
    ) -> (Reply, Option<Outcome>) {
        let name = &chain.plan.spec.name;
        // The largest slot class: a peer runs the same config, so it takes what we take.
        let slot_size = u64::from(chain.arena.max_slot_size());
        if http_edge::check_content_length(req.headers(), slot_size).is_err()
            || req.body().size_hint().lower() > slot_size
        {
            return (payload_too_large(name, slot_size), None);
        }
        let timeout = chain.plan.spec.timeout;
        let deadline = tokio::time::Instant::from_std(arrived + timeout);
        let (parts, body) = req.into_parts();
        let body = match tokio::time::timeout_at(
            deadline,
            Limited::new(body, slot_size as usize).collect(),
        )
        .await
        {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e))
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                return (payload_too_large(name, slot_size), None);
            }
            Ok(Err(e)) => {
                return (
                    text(
                        StatusCode::BAD_REQUEST,
                        format!("reading request body: {e}"),
                    ),
                    None,
                );
            }
            Err(_) => {
                let message = format!(
                    "request body not received within chain {name}'s {} ms",
                    timeout.as_millis()
                );
                return (text(StatusCode::REQUEST_TIMEOUT, message), None);
            }
        };
        let peer_name = &peer.name;
        let Some(PeerAddrs {
            http: peer_http, ..
        }) = peer.addrs()
        else {
            let message = format!(
                "chain {name}: this request went to peer {peer_name}, whose DNS name no longer resolves to it"
            );
            return (
                text(StatusCode::BAD_GATEWAY, message),
                Some(Outcome::Unreachable),
            );
        };
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri: Uri = match format!("http://{peer_http}{path}").parse() {
            Ok(u) => u,
            Err(e) => {
                return (
                    text(StatusCode::BAD_REQUEST, format!("request path: {e}")),
                    None,
                );
            }
        };
        let mut out = Request::builder().method(parts.method).uri(uri);
        let headers = out.headers_mut().expect("a fresh builder has headers");
        end_to_end(&parts.headers, headers, &[header::EXPECT]);
        headers.insert(super::FORWARDED_HEADER, origin.clone());
        let out = out
            .body(Full::new(body))
            .expect("method, uri and headers are valid");

        let answer = tokio::time::timeout_at(deadline, async {
            let resp = self.client.request(out).await?;
            let (parts, body) = resp.into_parts();
            // A peer's answer is at most its slot size (same config) or a short message.
            let limit = (slot_size as usize).max(64 * 1024);
            let body = Limited::new(body, limit)
                .collect()
                .await
                .map_err(AnswerError::Body)?
                .to_bytes();
            Ok::<_, AnswerError>((parts, body))
        })
        .await;
        match answer {
            Ok(Ok((parts, body))) => {
                let mut resp = Response::new(Full::new(body));
                *resp.status_mut() = parts.status;
                end_to_end(&parts.headers, resp.headers_mut(), &[]);
                if let Ok(v) = HeaderValue::from_str(peer_name) {
                    resp.headers_mut().insert(super::SERVED_BY_HEADER, v);
                }
                let outcome = if parts.status.is_server_error() {
                    Outcome::PeerError
                } else {
                    Outcome::Ok
                };
                (resp, Some(outcome))
            }
            Ok(Err(AnswerError::Client(e))) if e.is_connect() => (
                text(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "chain {name}: this request went to peer {peer_name} ({}), which is unreachable: {}",
                        peer_http,
                        source_chain(&e)
                    ),
                ),
                Some(Outcome::Unreachable),
            ),
            Ok(Err(e)) => (
                text(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "chain {name}: peer {peer_name} ({}) failed the request: {e}",
                        peer_http
                    ),
                ),
                Some(Outcome::Failed),
            ),
            Err(_) => (
                text(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "chain {name}: peer {peer_name} ({}) did not answer within the chain's {} ms",
                        peer_http,
                        timeout.as_millis()
                    ),
                ),
                Some(Outcome::Timeout),
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum AnswerError {
    #[error("{}", source_chain(.0))]
    Client(#[from] hyper_util::client::legacy::Error),
    #[error("reading its answer: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
}

/// An error with its causes, `a: b: c` (hyper's own message alone says little).
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_stay_behind() {
        let mut from = header::HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("host", "origin"),
            ("content-length", "5"),
            ("transfer-encoding", "chunked"),
            ("expect", "100-continue"),
            ("content-type", "text/plain"),
            ("x-request-id", "abc"),
        ] {
            from.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let mut to = header::HeaderMap::new();
        end_to_end(&from, &mut to, &[header::EXPECT]);
        let mut kept: Vec<&str> = to.keys().map(|k| k.as_str()).collect();
        kept.sort();
        assert_eq!(kept, ["content-type", "x-request-id"]);
    }
}
