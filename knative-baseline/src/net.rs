//! What every role shares: the tokio runtime, the HTTP/1.1 accept loop, the keep-alive client
//! pool, the readiness 503 and the `listening on ADDR` announcement the orchestrator waits for.
//! Replies that must match Spindle's byte for byte come from [`http_edge`].

use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use http_edge::Reply;
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::BaselineError;

/// How long a client of the public ingress may take to send its request headers (as Spindle).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Envoy's and Go's net/http transports both keep idle upstream connections about this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The worker count Envoy (`--concurrency`) and Go (`GOMAXPROCS`) pick by default: one per CPU.
pub(crate) fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

pub(crate) fn runtime(
    name: &str,
    workers: usize,
) -> Result<tokio::runtime::Runtime, BaselineError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .thread_name(name)
        .enable_all()
        .build()
        .map_err(|e| BaselineError::io("starting the async runtime", e))
}

pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, BaselineError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BaselineError::Listen { addr, source })
}

/// Tells whoever started us where we listen; the orchestrator reads this first stdout line,
/// which is how port 0 works without a bind-close-rebind race.
pub(crate) fn announce(listener: &TcpListener) -> Result<SocketAddr, BaselineError> {
    let addr = listener
        .local_addr()
        .map_err(|e| BaselineError::io("reading the listening address", e))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on {addr}")
        .and_then(|()| out.flush())
        .map_err(|e| BaselineError::io("announcing the listening address", e))?;
    Ok(addr)
}

/// Parses an announcement line back (the orchestrator's side of [`announce`]).
pub(crate) fn parse_announcement(line: &str) -> Option<SocketAddr> {
    line.trim().strip_prefix("listening on ")?.parse().ok()
}

/// A keep-alive connection pool with `TCP_NODELAY`, the way Envoy and queue-proxy talk to
/// their upstreams. HTTP/1.1 has one request per connection at a time, so the pool grows to
/// the concurrency it sees and keeps those connections.
pub(crate) fn client<B>() -> Client<HttpConnector, B>
where
    B: Body + Send + 'static,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(connector)
}

/// Serves HTTP/1.1 with keep-alive on `listener` until the future is dropped. `public` adds the
/// header-read timeout a server facing clients needs.
/// The next connection, with TCP_NODELAY set. An accept error (out of fds or similar) leaves
/// existing connections working; retry shortly instead of spinning on the same error.
async fn accept(listener: &TcpListener) -> tokio::net::TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                return stream;
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

pub(crate) async fn serve<H, Fut, B>(listener: TcpListener, handler: H, public: bool)
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut http = http1::Builder::new();
    if public {
        http.timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
    }
    loop {
        let stream = accept(&listener).await;
        let connection = http.serve_connection(TokioIo::new(stream), service_fn(handler.clone()));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
}

/// [`serve`] for a single-threaded server whose handler is not `Send` (the function server:
/// its handler owns the Wasm host). Must run inside a [`tokio::task::LocalSet`]; every
/// connection is a local task, so a request never leaves the thread that accepted it.
pub(crate) async fn serve_local<H, Fut, B>(listener: TcpListener, handler: H)
where
    H: Fn(Request<Incoming>) -> Fut + Clone + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + 'static,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let http = http1::Builder::new();
    loop {
        let stream = accept(&listener).await;
        let connection = http.serve_connection(TokioIo::new(stream), service_fn(handler.clone()));
        tokio::task::spawn_local(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
}

/// Runs `work` until it ends or SIGTERM/SIGINT arrives (the orchestrator stops roles with
/// SIGTERM; they hold no state worth draining).
pub(crate) async fn until_signal(work: impl Future<Output = ()>) -> Result<(), BaselineError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| BaselineError::io("installing the SIGTERM handler", e))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| BaselineError::io("installing the SIGINT handler", e))?;
    tokio::select! {
        () = work => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// The 503 of a readiness check that fails (the ingress's `/readyz`, a queue-proxy's
/// `/_queue/ready`): [`http_edge::text`]'s body and `Content-Type` but, as the baseline's
/// readiness answers have always been, no `Retry-After` (Spindle's `/readyz` 503 has one).
pub(crate) fn not_ready(message: impl Into<String>) -> Reply {
    http_edge::plain_text(StatusCode::SERVICE_UNAVAILABLE, message)
}

/// Headers that describe one connection, not the message, and so must not be forwarded by a
/// proxy (RFC 9110 §7.6.1), plus any the `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut hyper::HeaderMap) {
    let named: Vec<String> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn announcement_round_trips() {
        assert_eq!(
            parse_announcement("listening on 127.0.0.1:4242\n"),
            Some("127.0.0.1:4242".parse().unwrap())
        );
        assert_eq!(parse_announcement("hello"), None);
    }

    #[test]
    fn strips_hop_by_hop_headers() {
        let mut h = hyper::HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        h.insert("ce-id", HeaderValue::from_static("7"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(h.contains_key("content-type") && h.contains_key("ce-id"));
    }
}
