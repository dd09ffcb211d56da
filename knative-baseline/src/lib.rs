//! # Knative-style baseline
//!
//! A stand-in for Knative Serving + Eventing's data path that runs on one node without
//! Kubernetes and serves the **same** Wasm functions with the **same** runtime as Spindle
//! (built through `chain_runtime::instance::InstanceBuilder`, as Spindle's workers build
//! theirs), so that a side-by-side benchmark measures the dataplane and not the function code.
//! Its replies come from `http-edge`, as the gateway's do. It must not share anything else
//! with Spindle's data path (no arena, no descriptors): it is what Spindle is compared with.
//!
//! ## Components and their Knative counterparts
//!
//! | here (one OS process each)        | Knative                                   | role |
//! |-----------------------------------|-------------------------------------------|------|
//! | `ingress` ([`ingress`])           | Kourier / Envoy gateway **and** the Eventing Sequence's channel dispatcher | public HTTP listener, routes by exact path; runs a chain as a Sequence: one HTTP delivery of the full payload per step, the step's reply is delivered to the next step |
//! | `queue-proxy` ([`queue_proxy`])   | the `queue-proxy` sidecar of every pod    | reverse proxy in front of one function server; counts requests in flight, enforces `containerConcurrency` (> 0 queues the excess, 0 = unlimited) and the revision timeout (the chain's `timeout_ms`, see [Timeouts](#timeouts)) |
//! | `function` ([`function`])         | the user container                        | single-threaded HTTP server running one Wasm function, one request at a time |
//! | [`Baseline`] ([`orchestrator`])   | the Kubernetes control plane (scheduling, readiness probes) | starts every process, waits until each answers, stops them all |
//!
//! A *pod* is one function server plus its queue-proxy; a function with `instances: N` in the
//! Spindle config gets N pods per chain that uses it (Spindle likewise starts one worker per
//! instance per chain), and the ingress round-robins over them.
//!
//! ```text
//!  client ─HTTP─▶ ingress ─HTTP─▶ queue-proxy ─HTTP─▶ function (uppercase)
//!                    ▲  │◀─reply─────┘◀──────────────────┘
//!                    │  └─HTTP─▶ queue-proxy ─HTTP─▶ function (reverse)
//!                    │  ◀─reply ...
//!                    │  └─HTTP─▶ queue-proxy ─HTTP─▶ function (frame)
//!  client ◀─HTTP─────┘  ◀─reply ...
//! ```
//!
//! Every step re-sends the payload over loopback HTTP twice each way (ingress → queue-proxy →
//! function and back), as Knative does; Spindle copies it once into shared memory.
//!
//! ## Fairness
//!
//! Every HTTP client keeps a keep-alive connection pool (as Envoy and queue-proxy do), every
//! socket has `TCP_NODELAY`, payloads stream through the queue-proxy without buffering, and
//! nothing sleeps on the data path. Each function server is a single thread that runs the call
//! inline where it read the request, as a single-threaded container would, with no hand-off
//! between threads. The model is *generous* to Knative: real Knative adds an activator when
//! scaled to zero or bursting, sends each Sequence step through the channel dispatcher *and
//! then* the ingress (one more proxy per step), and runs the user container behind a
//! container network namespace. Chain semantics follow Spindle: exact-path routing,
//! 413 above the chain's largest slot class (`arena.large.slot_size`, else `slot_size`), the chain's `timeout_ms` as deadline (504), a failing
//! function's `500 function NAME: message`, 508 when a dynamic chain passes `max_hops`.
//!
//! ## Timeouts
//!
//! Spindle has two time limits: the chain's `timeout_ms`, the deadline of the whole request
//! (its gateway answers 504 when it passes), and the function's `timeout_ms`, a per-call
//! watchdog that times only the call itself, never the time a request waits for its turn.
//! Knative has no per-call limit; the closest it has to the user's request budget is the
//! revision's `timeoutSeconds`, which queue-proxy counts from the request's arrival, queueing
//! included. So every pod's queue-proxy gets the **chain's** `timeout_ms` as its revision
//! timeout, and the ingress keeps the chain's deadline from the request's arrival there (it
//! starts first, so it normally fires first, with Spindle's `chain NAME did not finish within
//! N ms`). The function's `timeout_ms` is not enforced: a request queued behind slow calls is
//! not failed for waiting, where Spindle would serve it too. A function's `fuel` still stops a
//! runaway loop inside a call, with Spindle's 504 `function NAME: ran out of fuel`.
//!
//! A guest that runs away *without* fuel (an endless loop under `fuel: none`, or a host call
//! that never returns, such as a long sleep) is another matter. Spindle's watchdog kills that worker once the call
//! passes the function's `timeout_ms`, and the gateway starts a new one. Here the call runs on
//! the function server's only thread, so the guest **wedges that pod for good**: it is not
//! restarted (nor would Knative restart it: the revision timeout answers the client but leaves
//! the container running; only a liveness probe, which the baseline does not model, would),
//! and every later request routed to that pod times out too (504 at the chain's deadline), as
//! does its health check. With several instances the ingress keeps sending the wedged pod its
//! round-robin share. Stopping the baseline waits out the grace period and then kills it.
//!
//! ## Entry points
//!
//! [`main_entry`] runs one role in the current process (`spindle knative-baseline ROLE ...`,
//! or this crate's `knative-baseline` binary); [`Baseline::start`] starts the whole set of
//! processes from Rust.

pub mod copies;
pub mod function;
pub mod ingress;
pub mod orchestrator;
pub mod queue_proxy;

mod args;
mod net;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use args::{Role, USAGE};
pub use ingress::PodsArg;
pub use orchestrator::{Baseline, Options, Pod};

/// The subcommand under which the `spindle` binary exposes [`main_entry`]; the stand-alone
/// `knative-baseline` binary accepts it too, so both can be started with the same arguments.
pub const SUBCOMMAND: &str = "knative-baseline";

/// Where `run` listens unless told otherwise: next to Spindle's default 8080, so both can
/// serve the same config side by side (the config's `listen:` belongs to Spindle).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8090";

#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    #[error("{0}\n\n{USAGE}")]
    Usage(String),
    #[error("invalid configuration:\n{0}")]
    Config(#[from] chain_runtime::config::ConfigErrors),
    #[error("no chain named `{0}` in the configuration")]
    UnknownChain(String),
    #[error("chain `{chain}` has no function `{function}`")]
    UnknownStage { chain: String, function: String },
    #[error("function {function}: {source}")]
    Host {
        function: String,
        source: chain_runtime::host::HostError,
    },
    #[error(transparent)]
    Instance(chain_runtime::instance::InstanceError),
    #[error("ingress: {0}")]
    Ingress(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("cannot start {component} ({exe}): {source}")]
    Spawn {
        component: String,
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("{component} failed to start: {reason}")]
    Start { component: String, reason: String },
    #[error("{component} exited ({status}){tail}")]
    Exited {
        component: String,
        status: std::process::ExitStatus,
        /// The process's last lines of stderr, prefixed with a newline, or empty.
        tail: String,
    },
}

impl BaselineError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        BaselineError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Runs one role of the baseline in this process until SIGINT/SIGTERM. `args[0]` is the role
/// (`function`, `queue-proxy`, `ingress`, `run`; a leading `knative-baseline` is skipped);
/// see [`USAGE`]. Logging goes through `tracing`: the caller installs the subscriber.
pub fn main_entry(args: Vec<String>) -> Result<(), BaselineError> {
    match args::parse(&args)? {
        Role::Help => {
            println!("{USAGE}");
            Ok(())
        }
        Role::Function(a) => function::run(a),
        Role::QueueProxy(a) => queue_proxy::run(a),
        Role::Ingress(a) => ingress::run(a),
        Role::Run(a) => orchestrator::run(a),
    }
}
