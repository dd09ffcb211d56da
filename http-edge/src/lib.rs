//! # The shared HTTP edge
//!
//! The HTTP edge that Spindle's gateway and the Knative-style baseline both present to
//! clients: how a chain status becomes an HTTP status ([`failure_code`]), the body-size
//! pre-check ([`check_content_length`], [`payload_too_large`]), plain-text replies
//! ([`text`]). The baseline's replies and error bodies must be byte-identical to Spindle's so
//! that a side-by-side benchmark compares dataplanes and nothing else; keeping one copy of
//! these here is what stops the two from drifting apart.
//!
//! What this crate must not do: route, read or buffer bodies, time anything, log, or know
//! about arenas, workers, pods or processes. It has no async code and no dependency on
//! `chain-runtime` or tokio; each caller keeps its own data path and only asks this crate how
//! the answer looks. Messages that name a chain take the name as an argument.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};
use proto::Status;

/// Every reply built here: a complete body.
pub type Reply = Response<Full<Bytes>>;

/// The HTTP status of a chain that ended with `status` as a failure.
///
/// [`Status::Ok`] is no failure: callers answer it with the payload and never ask. Should a
/// failure carry it anyway, it is an internal error (500).
pub fn failure_code(status: Status) -> StatusCode {
    match status {
        Status::Timeout => StatusCode::GATEWAY_TIMEOUT,
        Status::BadRoute => StatusCode::LOOP_DETECTED,
        Status::Undeliverable => StatusCode::BAD_GATEWAY,
        Status::Ok | Status::GuestError | Status::Trap | Status::Refused => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

/// A `Content-Length` above the limit: answer [`payload_too_large`] without reading the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooLarge {
    pub declared: u64,
    pub limit: u64,
}

/// The pre-check before a body is read: `Err` when the request declares more than `limit`
/// bytes, otherwise the declared length, `None` when there is none (chunked) or it does not
/// parse as one number. hyper has already refused a malformed `Content-Length` before a
/// handler runs; whatever gets past this check is still held to `limit` while the body is read.
pub fn check_content_length(headers: &HeaderMap, limit: u64) -> Result<Option<u64>, TooLarge> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit => Err(TooLarge { declared: n, limit }),
        other => Ok(other),
    }
}

/// The 413 for a body over a chain's slot size, whether the pre-check or the read found it.
pub fn payload_too_large(chain: &str, slot_size: u64) -> Reply {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body exceeds chain {chain}'s slot size of {slot_size} bytes"),
    )
}

/// A plain-text reply: `message` plus a newline, `Content-Type: text/plain; charset=utf-8`,
/// and on 503 `Retry-After: 1` (a full arena or a restarting instance clears within moments).
pub fn text(code: StatusCode, message: impl Into<String>) -> Reply {
    let mut resp = plain_text(code, message);
    if code == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// [`text`] without `Retry-After` on a 503: the same body and `Content-Type`, nothing else.
/// Only for replies that have never carried it (the baseline's readiness answers).
pub fn plain_text(code: StatusCode, message: impl Into<String>) -> Reply {
    let mut body = message.into();
    body.push('\n');
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::body::Body;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    /// The whole body of a reply (a `Full` is ready at once, so no executor is needed).
    fn body(reply: Reply) -> Vec<u8> {
        let mut body = reply.into_body();
        let mut cx = Context::from_waker(Waker::noop());
        let mut out = Vec::new();
        while let Poll::Ready(Some(frame)) = Pin::new(&mut body).poll_frame(&mut cx) {
            out.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        out
    }

    #[test]
    fn every_status_has_its_code() {
        // Every variant, found through the wire encoding, so a new one fails here until it
        // has an expected code.
        let all: Vec<Status> = (0..=u8::MAX)
            .filter_map(|n| Status::try_from(n).ok())
            .collect();
        assert_eq!(all.len(), 7, "{all:?}");
        for status in all {
            let expected = match status {
                Status::Ok => StatusCode::INTERNAL_SERVER_ERROR,
                Status::GuestError => StatusCode::INTERNAL_SERVER_ERROR,
                Status::Trap => StatusCode::INTERNAL_SERVER_ERROR,
                Status::Refused => StatusCode::INTERNAL_SERVER_ERROR,
                Status::Timeout => StatusCode::GATEWAY_TIMEOUT,
                Status::BadRoute => StatusCode::LOOP_DETECTED,
                Status::Undeliverable => StatusCode::BAD_GATEWAY,
            };
            assert_eq!(failure_code(status), expected, "{status:?}");
        }
    }

    fn with_length(value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_LENGTH, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn content_length_pre_check() {
        assert_eq!(check_content_length(&HeaderMap::new(), 10), Ok(None));
        assert_eq!(check_content_length(&with_length("0"), 10), Ok(Some(0)));
        assert_eq!(check_content_length(&with_length("10"), 10), Ok(Some(10)));
        assert_eq!(
            check_content_length(&with_length("11"), 10),
            Err(TooLarge {
                declared: 11,
                limit: 10
            })
        );
        for garbage in ["", "ten", "-1", "1.5", "10, 10", "99999999999999999999999"] {
            assert_eq!(
                check_content_length(&with_length(garbage), 10),
                Ok(None),
                "{garbage:?}"
            );
        }
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_LENGTH,
            HeaderValue::from_bytes(b"\xff").expect("opaque bytes are a valid value"),
        );
        assert_eq!(check_content_length(&h, 10), Ok(None));
    }

    #[test]
    fn text_is_the_message_and_a_newline_as_plain_text() {
        let reply = text(StatusCode::NOT_FOUND, "no chain is routed at /x");
        assert_eq!(reply.status(), StatusCode::NOT_FOUND);
        let names: Vec<&str> = reply.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type"]);
        assert_eq!(reply.headers()[CONTENT_TYPE], "text/plain; charset=utf-8");
        assert_eq!(body(reply), b"no chain is routed at /x\n");
        assert_eq!(body(text(StatusCode::OK, String::new())), b"\n");
    }

    #[test]
    fn retry_after_only_on_503() {
        for code in [
            StatusCode::OK,
            StatusCode::PAYLOAD_TOO_LARGE,
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::BAD_GATEWAY,
            StatusCode::GATEWAY_TIMEOUT,
            StatusCode::LOOP_DETECTED,
        ] {
            assert!(
                !text(code, "x").headers().contains_key(RETRY_AFTER),
                "{code}"
            );
        }
        let busy = text(StatusCode::SERVICE_UNAVAILABLE, "at capacity");
        assert_eq!(busy.headers()[RETRY_AFTER], "1");
        assert_eq!(busy.headers()[CONTENT_TYPE], "text/plain; charset=utf-8");
        assert_eq!(busy.headers().len(), 2);
        assert_eq!(body(busy), b"at capacity\n");

        let not_ready = plain_text(StatusCode::SERVICE_UNAVAILABLE, "pods not ready");
        assert!(!not_ready.headers().contains_key(RETRY_AFTER));
        assert_eq!(not_ready.headers().len(), 1);
        assert_eq!(body(not_ready), b"pods not ready\n");
    }

    #[test]
    fn too_large_names_the_chain_and_its_slot_size() {
        let reply = payload_too_large("hello", 4096);
        assert_eq!(reply.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            body(reply),
            b"request body exceeds chain hello's slot size of 4096 bytes\n"
        );
    }
}
