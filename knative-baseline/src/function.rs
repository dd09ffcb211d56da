//! The function server: Knative's *user container*. An HTTP server that runs one Wasm
//! function of one chain with Spindle's own host, so both systems execute identical code.
//!
//! `POST /` (any path but `/healthz`) with the payload → 200 with the function's output, or
//! Spindle's error reply (`500 function NAME: message`, 504 when out of fuel). For a dynamic
//! chain the next function the guest chose is returned in the `x-spindle-next` header — the
//! Sequence dispatcher (the ingress) follows it, as Spindle's router follows `next_fn`.
//!
//! Like a single-threaded function runtime in a container, the whole server is one thread: a
//! current-thread tokio runtime that owns the host (which is not `Sync`) and calls `invoke`
//! inline in the request handler. A request is read, run and answered on the thread that
//! accepted it, with no hand-off to another thread; while a call runs nothing else does, so
//! calls are serialised and concurrent requests wait in their connections. A guest that runs
//! away without a fuel limit therefore wedges the pod (see the crate docs).
//!
//! CloudEvents binary-mode headers (`ce-*`) of the request are echoed on the reply, as an SDK
//! replying with the same event would.

use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use bytes::Bytes;
use chain_runtime::config::Config;
use chain_runtime::host::{Outcome, SlotIo};
use chain_runtime::instance::{Instance, InstanceBuilder, InstanceError};
use http_body_util::Full;
use http_edge::{Reply, failure_code, payload_too_large, text};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use proto::Status;

use crate::BaselineError;
use crate::net;

/// The response header naming the next function of a dynamic chain.
pub const NEXT_HEADER: &str = "x-spindle-next";

#[derive(Debug, Clone)]
pub struct FunctionArgs {
    pub config: PathBuf,
    pub chain: String,
    pub function: String,
    pub listen: SocketAddr,
}

/// The chain's slot is the buffer a Spindle worker reads from and writes to; here the input
/// and output are vectors with the same capacity, so the same size limits apply.
struct VecIo<'a> {
    input: &'a [u8],
    output: Vec<u8>,
    capacity: usize,
    copies: &'a Copies,
}

/// What this function server copied ([`crate::copies::FUNCTION_COPIES`] order).
#[derive(Default)]
struct Copies {
    request_body: AtomicU64,
    input: AtomicU64,
    output: AtomicU64,
}

impl SlotIo for VecIo<'_> {
    fn input_len(&self) -> usize {
        self.input.len()
    }

    fn read_input(&self, dst: &mut [u8]) {
        let n = dst.len().min(self.input.len());
        dst[..n].copy_from_slice(&self.input[..n]);
        self.copies.input.fetch_add(n as u64, Relaxed);
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn write_output(&mut self, src: &[u8]) {
        self.output.clear();
        self.output.extend_from_slice(src);
        self.copies.output.fetch_add(src.len() as u64, Relaxed);
    }
}

struct Server {
    function: String,
    chain: String,
    slot_size: usize,
    dynamic: bool,
    /// Dynamic chains: function id (what the host reports) → name (what travels in HTTP).
    names: HashMap<u32, HeaderValue>,
    /// Only ever borrowed for one synchronous call, never across an `.await`.
    instance: RefCell<Instance>,
    copies: Copies,
}

pub fn run(args: FunctionArgs) -> Result<(), BaselineError> {
    let config = Config::load(&args.config)?;
    // Built before listening, so a server that announces its address is ready to run the
    // function; built the same way as Spindle's workers build theirs.
    let instance = InstanceBuilder::new(&config, &args.chain, &args.function)
        .and_then(InstanceBuilder::cold_from_file)
        .map_err(|e| match e {
            InstanceError::UnknownChain(chain) => BaselineError::UnknownChain(chain),
            InstanceError::UnknownStage { chain, function } => {
                BaselineError::UnknownStage { chain, function }
            }
            InstanceError::Host(source) => BaselineError::Host {
                function: args.function.clone(),
                source,
            },
            other => BaselineError::Instance(other),
        })?;
    let chain = instance.chain();
    // The chain's largest slot class: what Spindle carries, the baseline carries.
    let slot_size = chain.spec.max_payload() as usize;
    let names = chain
        .stages
        .iter()
        .filter_map(|s| Some((s.fn_id, HeaderValue::from_str(&s.function.name).ok()?)))
        .collect();
    let server = Rc::new(Server {
        function: args.function.clone(),
        chain: args.chain.clone(),
        slot_size,
        dynamic: chain.is_dynamic(),
        names,
        instance: RefCell::new(instance),
        copies: Copies::default(),
    });

    // One thread: the runtime runs on this one, which owns the host.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| BaselineError::io("starting the async runtime", e))?;
    tokio::task::LocalSet::new().block_on(&runtime, async move {
        let listener = net::bind(args.listen).await?;
        let addr = net::announce(&listener)?;
        tracing::info!(
            "knative-style baseline: function server {}/{} (user container) listening on {addr}",
            args.chain,
            args.function
        );
        let handler = move |req| Rc::clone(&server).handle(req);
        net::until_signal(net::serve_local(listener, handler)).await
    })
}

impl Server {
    async fn handle(self: Rc<Self>, req: Request<Incoming>) -> Result<Reply, Infallible> {
        if req.uri().path() == "/healthz" {
            return Ok(text(StatusCode::OK, "ok"));
        }
        if req.uri().path() == crate::copies::COPIES_PATH {
            let c = &self.copies;
            let counts = [&c.request_body, &c.input, &c.output].map(|a| a.load(Relaxed));
            let lines: Vec<String> = crate::copies::FUNCTION_COPIES
                .iter()
                .zip(counts)
                .map(|(name, n)| format!("{name} {n}"))
                .collect();
            return Ok(text(StatusCode::OK, lines.join("\n")));
        }
        Ok(self.invoke(req).await)
    }

    fn too_large(&self) -> Reply {
        payload_too_large(&self.chain, self.slot_size as u64)
    }

    async fn invoke(self: Rc<Self>, req: Request<Incoming>) -> Reply {
        if http_edge::check_content_length(req.headers(), self.slot_size as u64).is_err() {
            return self.too_large();
        }
        let cloud_event: Vec<(HeaderName, HeaderValue)> = req
            .headers()
            .iter()
            .filter(|(name, _)| name.as_str().starts_with("ce-"))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        let input = match crate::copies::collect(
            req.into_body(),
            self.slot_size,
            &self.copies.request_body,
        )
        .await
        {
            Ok(body) => body,
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return self.too_large(),
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("reading request body: {e}"),
                );
            }
        };
        // Inline, on the thread that read the request: nothing else runs until it returns.
        let mut io = VecIo {
            input: &input,
            output: Vec::new(),
            capacity: self.slot_size,
            copies: &self.copies,
        };
        let outcome = self.instance.borrow_mut().host_mut().invoke(&mut io);
        let output = io.output;
        if matches!(outcome, Outcome::Failed { .. }) {
            // As Spindle's worker does: rebuild a trapped instance once the reply is on its
            // way, so the rebuild is not charged to the next request. The task runs after this
            // connection's task has written the reply (in the same poll that finishes this
            // handler); if another request gets in first, `invoke` rebuilds it itself.
            let server = Rc::clone(&self);
            tokio::task::spawn_local(async move {
                if let Err(e) = server.instance.borrow_mut().host_mut().prepare() {
                    tracing::error!(function = %server.function, "rebuilding the instance: {e}");
                }
            });
        }
        let mut resp = match outcome {
            Outcome::Done { output_len, next } => {
                debug_assert_eq!(output_len, output.len());
                let mut resp = Response::new(Full::new(Bytes::from(output)));
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                // Static chains ignore a guest's `spindle.next`, as Spindle's worker does.
                if self.dynamic
                    && let Some(name) = next.and_then(|id| self.names.get(&id))
                {
                    resp.headers_mut()
                        .insert(HeaderName::from_static(NEXT_HEADER), name.clone());
                }
                resp
            }
            Outcome::Failed { status, message } => self.failure(status, &message),
        };
        resp.headers_mut().extend(cloud_event);
        resp
    }

    /// The reply Spindle's gateway gives for the same failure: the worker writes
    /// "function NAME: message" (cut at the slot size) and the status picks the code.
    fn failure(&self, status: Status, message: &str) -> Reply {
        let full = format!("function {}: {message}", self.function);
        let cut = &full.as_bytes()[..full.len().min(self.slot_size)];
        text(
            failure_code(status),
            String::from_utf8_lossy(cut).into_owned(),
        )
    }
}
