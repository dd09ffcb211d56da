//! Payload bytes each baseline process copies through a user-space buffer, counted as Spindle
//! counts its own (`spindle_payload_bytes_copied_total`), so a benchmark compares like with
//! like.
//!
//! What is a copy here, and what is not:
//! - Reading a body: hyper reads the socket into its buffer (the kernel's copy, not counted
//!   on either system) and hands it over as frames that share that buffer. Collecting one
//!   frame keeps it as is; collecting several copies them into one buffer: counted, exactly
//!   the bytes copied ([`collect`]).
//! - Writing a body from a `Bytes` (hyper writes it with a vectored write) and streaming a
//!   body through the queue-proxy (frames passed on as they come) copy nothing in user space.
//! - The function server copies the input into the guest's linear memory and the output out
//!   of it into a vector (`copy="function_input"`, `"function_output"`), as a Spindle worker
//!   copies slot ↔ guest.
//!
//! The ingress exposes the sum over its own process and every pod's function server at
//! `GET /metrics`; a function server answers its own counts at [`COPIES_PATH`].

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Limited};
use hyper::body::Body;

/// Where a function server answers its counts (through its queue-proxy, like any request).
pub const COPIES_PATH: &str = "/_spindle/copied";

/// The copy kinds a function server counts, in the order of its [`COPIES_PATH`] answer.
pub const FUNCTION_COPIES: [&str; 3] = ["request_body", "function_input", "function_output"];

/// Collects `body` (at most `limit` bytes) into one buffer, adding to `copied` the bytes that
/// had to be copied to make it contiguous: none for a body that arrived as one frame.
pub async fn collect<B>(
    body: B,
    limit: usize,
    copied: &AtomicU64,
) -> Result<Bytes, Box<dyn std::error::Error + Send + Sync>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut body = std::pin::pin!(Limited::new(body, limit));
    let mut frames: Vec<Bytes> = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data()
            && !data.is_empty()
        {
            frames.push(data);
        }
    }
    Ok(match frames.len() {
        0 => Bytes::new(),
        1 => frames.pop().expect("one frame"),
        _ => {
            let total = frames.iter().map(Bytes::len).sum();
            let mut joined = BytesMut::with_capacity(total);
            for f in &frames {
                joined.extend_from_slice(f);
            }
            copied.fetch_add(total as u64, Relaxed);
            joined.freeze()
        }
    })
}

/// One Prometheus sample line of the family.
pub fn sample(chain: &str, copy: &str, process: &str, value: u64) -> String {
    format!(
        "spindle_payload_bytes_copied_total{{chain=\"{chain}\",copy=\"{copy}\",process=\"{process}\"}} {value}\n"
    )
}

/// The family's header lines.
pub fn header() -> &'static str {
    "# HELP spindle_payload_bytes_copied_total Payload bytes copied in user space, by the \
     process that copied them (ingress, or the function's server) and the copy\n\
     # TYPE spindle_payload_bytes_copied_total counter\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use hyper::body::Frame;

    #[tokio::test]
    async fn one_frame_is_not_copied_several_are() {
        let copied = AtomicU64::new(0);
        let one = collect(Full::new(Bytes::from_static(b"hello")), 100, &copied)
            .await
            .unwrap();
        assert_eq!((&one[..], copied.load(Relaxed)), (&b"hello"[..], 0));

        let frames = ["ab", "", "cde"].map(|s| Frame::data(Bytes::from_static(s.as_bytes())));
        let joined = collect(Frames(frames.into()), 100, &copied).await.unwrap();
        assert_eq!((&joined[..], copied.load(Relaxed)), (&b"abcde"[..], 5));

        let err = collect(Full::new(Bytes::from_static(b"too long")), 3, &copied)
            .await
            .unwrap_err();
        assert!(err.is::<http_body_util::LengthLimitError>());
    }

    /// A body of the given frames, one per poll.
    struct Frames(std::collections::VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Ready(self.0.pop_front().map(Ok))
        }
    }
}
