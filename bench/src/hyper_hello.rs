//! The ceiling for benchmarks: a bare hyper HTTP/1.1 server on the same runtime settings as the
//! gateway, answering every request with a fixed body. Whatever Spindle adds on top of this is
//! the cost of the chain.
//!
//! Usage: hyper-hello [ADDR]   (default 127.0.0.1:8090)

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

async fn hello(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the body like the gateway does, so both servers do the same socket work.
    let _ = req.into_body().collect().await;
    Ok(Response::new(Full::new(Bytes::from_static(b"hello world"))))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8090".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("hyper-hello serving on http://{addr}");
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(hello))
                .await;
        });
    }
}
