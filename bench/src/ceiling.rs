//! The ceiling: a bare hyper HTTP/1.1 server answering every request with a fixed body.
//! Whatever a chain adds on top of it is the cost of the chain.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use nix::errno::Errno;
use tokio::net::TcpListener;

async fn hello(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the body like the gateway does, so both servers do the same socket work.
    let _ = req.into_body().collect().await;
    Ok(Response::new(Full::new(Bytes::from_static(b"hello world"))))
}

/// Serves the ceiling on `addr` until the process ends (`spindle bench-ceiling`).
/// Every path answers 200 "hello world", `/readyz` included.
pub async fn serve_ceiling(addr: SocketAddr) -> std::io::Result<()> {
    serve_ceiling_on(TcpListener::bind(addr).await?).await
}

/// [`serve_ceiling`] on a listener the caller already bound (e.g. to port 0 in a test).
pub async fn serve_ceiling_on(listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of file descriptors or a connection reset before accept: the listener is
            // still good, and a benchmark server must not die of one bad connection.
            Err(e) if is_transient_accept_error(&e) => {
                // Without a pause an fd shortage turns this loop into a busy spin.
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(hello))
                .await;
        });
    }
}

fn is_transient_accept_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted)
        || matches!(
            e.raw_os_error().map(Errno::from_raw),
            Some(Errno::EMFILE | Errno::ENFILE)
        )
}
