//! The HTTP/1.1 client side: one raw hyper connection per socket, so connection counts are
//! exact and nothing is pooled behind our back.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::BenchError;

/// Connecting on loopback takes microseconds; a second means the target is not listening
/// properly (SYN backlog full, or a dead external host).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Where requests go: the socket address, and what to put in `Host` and the request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub addr: SocketAddr,
    pub authority: String,
    pub path: String,
}

impl Endpoint {
    pub fn loopback(addr: SocketAddr, path: &str) -> Endpoint {
        Endpoint {
            addr,
            authority: addr.to_string(),
            path: path.to_string(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}{}", self.authority, self.path)
    }
}

/// A URL target, checked but not resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedUrl {
    pub authority: String,
    pub host_port: String,
    pub path: String,
}

pub(crate) fn parse_url(url: &str) -> Result<ParsedUrl, BenchError> {
    let bad = |reason: &str| BenchError::BadUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let uri: Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(bad(
                "https is not supported: the load generator speaks plain HTTP/1.1 \
                 (use the service's http:// address)",
            ));
        }
        Some(other) => return Err(bad(&format!("scheme `{other}` is not http"))),
        None => return Err(bad("expected http://host[:port][/path]")),
    }
    let authority = uri
        .authority()
        .filter(|a| !a.host().is_empty())
        .ok_or_else(|| bad("no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("credentials in the URL are not supported"));
    }
    let port = authority.port_u16().unwrap_or(80);
    let host = authority.host();
    let path = uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .filter(|pq| !pq.is_empty())
        .unwrap_or("/")
        .to_string();
    Ok(ParsedUrl {
        authority: authority.as_str().to_string(),
        host_port: format!("{host}:{port}"),
        path,
    })
}

/// Resolves a URL target to the address the load goes to (the first one DNS returns).
pub(crate) async fn resolve(url: &str) -> Result<Endpoint, String> {
    let parsed = parse_url(url).map_err(|e| e.to_string())?;
    // `[::1]:80` keeps its brackets in host(), which lookup_host accepts.
    let mut addrs = tokio::net::lookup_host(parsed.host_port.as_str())
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", parsed.host_port))?;
    let addr = addrs
        .next()
        .ok_or_else(|| format!("{} resolves to no address", parsed.host_port))?;
    Ok(Endpoint {
        addr,
        authority: parsed.authority,
        path: parsed.path,
    })
}

/// One HTTP/1.1 connection. Dropping it closes the socket: the connection task is aborted
/// rather than left to notice on its own.
pub(crate) struct Conn {
    pub sender: SendRequest<Full<Bytes>>,
    /// Requests sent on this connection so far (body verification samples by it).
    pub responses: u64,
    task: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) async fn connect(addr: SocketAddr) -> std::io::Result<Conn> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    // Small requests on a keep-alive connection: Nagle would add delayed-ACK latency.
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Conn {
        sender,
        responses: 0,
        task,
    })
}

pub(crate) fn request(
    method: Method,
    endpoint: &Endpoint,
    path: &str,
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, endpoint.authority.as_str());
    if !body.is_empty() {
        builder = builder.header(hyper::header::CONTENT_TYPE, "application/octet-stream");
    }
    // Only a malformed path can fail here, and paths come from parse_url or the config.
    builder
        .body(Full::new(body))
        .unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
}

/// One request on a fresh connection, for readiness probes and the pre-load check.
pub(crate) async fn one_shot(
    method: Method,
    endpoint: &Endpoint,
    path: &str,
    body: Bytes,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), String> {
    let exchange = async {
        let mut conn = connect(endpoint.addr).await.map_err(|e| e.to_string())?;
        conn.sender.ready().await.map_err(|e| e.to_string())?;
        let response = conn
            .sender
            .send_request(request(method, endpoint, path, body))
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = parse_url("http://127.0.0.1:8080/hello?x=1").unwrap();
        assert_eq!(u.authority, "127.0.0.1:8080");
        assert_eq!(u.host_port, "127.0.0.1:8080");
        assert_eq!(u.path, "/hello?x=1");
        let u = parse_url("http://hello.default.example.com").unwrap();
        assert_eq!(u.host_port, "hello.default.example.com:80");
        assert_eq!(u.path, "/");
        let u = parse_url("http://[::1]:9000/x").unwrap();
        assert_eq!(u.host_port, "[::1]:9000");
        assert!(parse_url("http://user:pw@host/").is_err());
    }
}
