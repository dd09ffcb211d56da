//! The HTTP front's connection admission and cuts: at most `http.max_connections` client
//! connections at once (one more gets a 503 with `Retry-After` and is closed, so a flood of
//! connections cannot take the gateway's file descriptors from its workers), keep-alive
//! connections idle for `http.idle_timeout_ms` closed, and every connection the front refused
//! or cut counted by why (`spindle_http_connections_*`).
//!
//! Idle means no request in flight and no byte read or written for the whole timeout: a slow
//! request, or a large response still being written, is never cut. A client whose request
//! races the close sees the connection end, as with any server's keep-alive timeout.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use chain_runtime::config::HttpSpec;
use prometheus::{IntCounterVec, IntGauge};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// What a connection refused at the limit is told, in full (it is written without waiting).
const AT_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: text/plain\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 64\r\n\
\r\n\
the gateway is at its connection limit (max_connections); retry\n";

/// Admission and idle cuts for the gateway's client connections.
pub struct Front {
    limits: HttpSpec,
    open: IntGauge,
    refused: IntCounterVec,
    closed: IntCounterVec,
    /// Connections admitted and not yet ended (the gauge is for scrapes; this one is exact).
    admitted: AtomicUsize,
    /// Refused connections whose request is being read and dropped, so that closing them
    /// does not reset the connection (and lose the 503) under the client: a few at a time.
    lingering: Arc<tokio::sync::Semaphore>,
    epoch: Instant,
}

/// Refused connections drained at once at most; beyond that they are closed at once.
const LINGERING: usize = 64;
/// How long a refused connection's request may take to arrive and be dropped.
const LINGER: Duration = Duration::from_secs(1);

/// An admitted connection: counted open until dropped.
pub struct Admitted {
    front: Arc<Front>,
    pub activity: Arc<Activity>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.front.admitted.fetch_sub(1, Ordering::Relaxed);
        self.front.open.dec();
    }
}

/// How busy one connection is: requests in flight and when a byte last moved.
pub struct Activity {
    in_flight: AtomicUsize,
    /// Milliseconds since the front's epoch.
    last: AtomicU64,
    epoch: Instant,
}

impl Activity {
    fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// A request started on this connection.
    pub fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
    }

    /// Its response is built (hyper writes it next: writes count as activity too).
    pub fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.touch();
    }

    fn idle_for(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last.load(Ordering::Relaxed)))
    }
}

impl Front {
    pub fn new(
        limits: HttpSpec,
        open: IntGauge,
        refused: IntCounterVec,
        closed: IntCounterVec,
    ) -> Arc<Front> {
        Arc::new(Front {
            limits,
            open,
            refused,
            closed,
            admitted: AtomicUsize::new(0),
            lingering: Arc::new(tokio::sync::Semaphore::new(LINGERING)),
            epoch: Instant::now(),
        })
    }

    /// Admits `stream`, or refuses it at the connection limit (answered 503 without
    /// waiting, then closed; counted).
    pub fn admit(self: &Arc<Self>, stream: &TcpStream) -> Option<Admitted> {
        let before = self.admitted.fetch_add(1, Ordering::Relaxed);
        if before >= self.limits.max_connections as usize {
            self.admitted.fetch_sub(1, Ordering::Relaxed);
            // A fresh socket's send buffer is empty: the whole answer fits, or the client is
            // gone and nothing is lost by not waiting.
            let _ = stream.try_write(AT_CAPACITY);
            self.refused.with_label_values(&["at_capacity"]).inc();
            return None;
        }
        self.open.inc();
        let activity = Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            last: AtomicU64::new(0),
            epoch: self.epoch,
        });
        activity.touch();
        Some(Admitted {
            front: Arc::clone(self),
            activity,
        })
    }

    /// Closes a refused connection. Closing a socket with unread bytes resets it, which can
    /// discard the 503 before the client reads it: so the request is read and dropped first
    /// (a bounded number of connections at a time, each for at most [`LINGER`]).
    pub fn close_refused(&self, stream: TcpStream) {
        let Ok(permit) = Arc::clone(&self.lingering).try_acquire_owned() else {
            return; // many at once: close now
        };
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _permit = permit;
            let mut stream = stream;
            let _ = stream.shutdown().await;
            let mut sink = [0u8; 4096];
            let _ = tokio::time::timeout(LINGER, async {
                while let Ok(n) = stream.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        });
    }

    /// Resolves once the connection has been idle for the timeout.
    pub async fn idle(&self, activity: &Activity) {
        loop {
            let idle = activity.idle_for();
            if activity.in_flight.load(Ordering::Relaxed) == 0 && idle >= self.limits.idle_timeout {
                return;
            }
            let left = self.limits.idle_timeout.saturating_sub(idle);
            tokio::time::sleep(left.max(Duration::from_millis(10))).await;
        }
    }

    /// Counts a connection the front cut, by why.
    pub fn cut(&self, reason: &str) {
        self.closed.with_label_values(&[reason]).inc();
    }

    /// Why hyper ended a connection with an error, as a `reason` label.
    pub fn reason(e: &hyper::Error) -> &'static str {
        if e.is_timeout() {
            "header_timeout"
        } else if e.is_parse_too_large() {
            "headers_too_large"
        } else if e.is_parse() || e.is_parse_status() {
            "malformed"
        } else if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
            "client_gone"
        } else {
            "error"
        }
    }
}

/// A client connection that stamps its [`Activity`] whenever bytes move.
pub struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl Tracked {
    pub fn new(inner: TcpStream, activity: Arc<Activity>) -> Self {
        Tracked { inner, activity }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_a_whole_http_response() {
        let text = std::str::from_utf8(AT_CAPACITY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), length, "content-length matches the body");
        assert!(head.starts_with("HTTP/1.1 503 "));
    }
}
