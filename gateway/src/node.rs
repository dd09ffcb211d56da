//! The node service inside `spindle run`: prepare an image of a *running* instance, serve
//! its pages to children on other nodes, revoke it.
//!
//! - **Reaching a worker.** Every worker gets its own Unix control socket pair
//!   (`proto::worker::CONTROL_FD`, separate from the descriptor socket, which the kernel
//!   dataplane may redirect). The supervisor puts the gateway's end on the [`ControlBoard`]
//!   once the worker is ready and takes it off when the worker goes down. A prepare sends
//!   `Prepare` on it and gets back the image's metadata with the sealed image memfd
//!   (`chain_runtime::control`); the worker captures between two invocations and keeps
//!   serving, and the image, a sealed copy, stays as captured.
//! - **Serving pages.** `--serve-images ADDR` runs `rdma_fork`'s page server on ADDR over an
//!   image registry in this process; each prepared image is published there under a fresh
//!   handle and key, with a lease.
//! - **The admin API** (`--admin PATH`): HTTP/1.1 on a Unix socket created with mode 0600, so
//!   only its owner (root, typically) can prepare: the answer holds the image's key.
//!   `POST /images?chain=C&function=F[&instance=N][&lease=10m]` prepares and publishes and
//!   answers the descriptor as its first line; `GET /images` lists the images with their
//!   status; `DELETE /images/HANDLE` revokes one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chain_runtime::control::{ChannelError, PrepareAnswer, request_prepare};
use http_edge::{Reply, text};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use prometheus::core::Collector;
use prometheus::proto::{MetricFamily, MetricType};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts};
use proto::ImageMeta;
use rdma_fork::registry::{ImageRegistry, PublishedImage, Refusal};
use rdma_fork::server::{PageServer, RunningServer};

use crate::dataplane::ChainRuntime;
use crate::metrics::{counter, family, gauge};

/// Lease of an image when the request names none.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(600);
/// How long a prepare may take beyond the function's own timeout (the invocation in
/// progress must end first): the capture copies the instance's memory.
const CAPTURE_ALLOWANCE: Duration = Duration::from_secs(10);
/// Bytes of one image page.
const PAGE: u64 = proto::image::PAGE_SIZE as u64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Which running instance: chain, function and instance number, by name as in the config.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct InstanceKey {
    pub chain: String,
    pub function: String,
    pub instance: usize,
}

impl std::fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} instance {}",
            self.chain, self.function, self.instance
        )
    }
}

/// The gateway's end of a worker's control socket; `None` once a failed exchange left the
/// stream out of step.
struct ControlChannel {
    socket: Mutex<Option<UnixStream>>,
}

/// The control sockets of the ready workers, by instance.
#[derive(Default)]
pub struct ControlBoard {
    channels: Mutex<HashMap<InstanceKey, Arc<ControlChannel>>>,
}

/// A worker's place on the [`ControlBoard`]; dropping it (the worker went down) removes it.
pub struct ControlLease {
    board: Arc<ControlBoard>,
    key: InstanceKey,
    channel: Arc<ControlChannel>,
}

impl Drop for ControlLease {
    fn drop(&mut self) {
        let mut channels = lock(&self.board.channels);
        // A newer incarnation may already have replaced this one.
        if channels
            .get(&self.key)
            .is_some_and(|c| Arc::ptr_eq(c, &self.channel))
        {
            channels.remove(&self.key);
        }
    }
}

impl ControlBoard {
    /// Makes `socket` the way to reach the instance `key` until the lease drops.
    pub fn attach(self: &Arc<Self>, key: InstanceKey, socket: UnixStream) -> ControlLease {
        let channel = Arc::new(ControlChannel {
            socket: Mutex::new(Some(socket)),
        });
        lock(&self.channels).insert(key.clone(), Arc::clone(&channel));
        ControlLease {
            board: Arc::clone(self),
            key,
            channel,
        }
    }

    fn get(&self, key: &InstanceKey) -> Option<Arc<ControlChannel>> {
        lock(&self.channels).get(key).cloned()
    }
}

/// How a prepare ended, as counted in `spindle_fork_prepares_total{result}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PrepareResult {
    Ok,
    /// The worker could not capture its instance (e.g. state that cannot be captured).
    Uncapturable,
    /// The worker's answer broke the control protocol or carried bad metadata.
    Malformed,
    /// The worker went away or did not answer in time.
    Lost,
    /// The image did not pass the registry's checks.
    PublishFailed,
}

impl PrepareResult {
    const ALL: [PrepareResult; 5] = [
        PrepareResult::Ok,
        PrepareResult::Uncapturable,
        PrepareResult::Malformed,
        PrepareResult::Lost,
        PrepareResult::PublishFailed,
    ];

    fn label(self) -> &'static str {
        match self {
            PrepareResult::Ok => "ok",
            PrepareResult::Uncapturable => "uncapturable",
            PrepareResult::Malformed => "malformed",
            PrepareResult::Lost => "lost",
            PrepareResult::PublishFailed => "publish_failed",
        }
    }
}

/// An image this node published, as the admin API lists it.
struct ImageRecord {
    handle: u64,
    of: InstanceKey,
    pages_with_data: u64,
    memory_bytes: u64,
    /// Set once the image ended: revoked here, or its lease lapsed (counted once).
    ended: Option<&'static str>,
}

/// Statuses the admin API answers with, counted in `spindle_admin_requests_total{code}`.
const ADMIN_CODES: [u16; 9] = [200, 400, 404, 405, 409, 500, 502, 503, 504];

/// The node service: control board, image registry, page server, admin API and their metrics.
pub struct NodeService {
    chains: Vec<Arc<ChainRuntime>>,
    board: Arc<ControlBoard>,
    registry: Arc<ImageRegistry>,
    server: Option<RunningServer>,
    records: Mutex<Vec<ImageRecord>>,
    prepares: IntCounterVec,
    prepare_seconds: Histogram,
    admin_requests: IntCounterVec,
    revocations: AtomicU64,
    leases_expired: AtomicU64,
    /// Where POST /reload is sent (set once the gateway's reloader runs).
    reloads: std::sync::OnceLock<tokio::sync::mpsc::Sender<crate::reload::ReloadRequest>>,
}

/// Why the node service could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(
        "--serve-images {0}: children connect to the address in the descriptor, so it must be a specific address of this node, not {1}"
    )]
    UnspecifiedAddress(SocketAddr, std::net::IpAddr),
    #[error("page server on {addr}: {source}")]
    PageServer {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin socket {path}: {source}")]
    Admin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin socket {0} is in use by another process")]
    AdminInUse(PathBuf),
}

/// An admin answer that is not 200: its status and message.
#[derive(Debug)]
struct AdminError(StatusCode, String);

impl AdminError {
    fn new(code: StatusCode, message: impl Into<String>) -> Self {
        AdminError(code, message.into())
    }
}

type AdminResult = Result<String, AdminError>;

impl NodeService {
    /// The node service over `chains`; with `serve_images`, its page server listens there.
    pub fn start(
        chains: Vec<Arc<ChainRuntime>>,
        board: Arc<ControlBoard>,
        serve_images: Option<SocketAddr>,
    ) -> Result<Self, NodeError> {
        let registry = Arc::new(ImageRegistry::new());
        let server = match serve_images {
            None => None,
            Some(addr) if addr.ip().is_unspecified() => {
                return Err(NodeError::UnspecifiedAddress(addr, addr.ip()));
            }
            Some(addr) => Some(
                PageServer::bind(addr, Arc::clone(&registry))
                    .and_then(PageServer::spawn)
                    .map_err(|source| NodeError::PageServer { addr, source })?,
            ),
        };
        let prepares = IntCounterVec::new(
            Opts::new(
                "spindle_fork_prepares_total",
                "Prepares of a running instance's image asked through the admin API, by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        for r in PrepareResult::ALL {
            prepares.with_label_values(&[r.label()]);
        }
        let admin_requests = IntCounterVec::new(
            Opts::new(
                "spindle_admin_requests_total",
                "Requests to the admin socket, by status code",
            ),
            &["code"],
        )
        .expect("valid metric");
        for code in ADMIN_CODES {
            admin_requests.with_label_values(&[&code.to_string()]);
        }
        let prepare_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "spindle_fork_prepare_seconds",
                "Time of a successful prepare as the gateway sees it: asking the worker, \
                 waiting for its invocation in progress, capturing, publishing",
            )
            .buckets(prometheus::exponential_buckets(100e-6, 2.0, 16).expect("valid buckets")),
        )
        .expect("valid metric");
        Ok(NodeService {
            chains,
            board,
            registry,
            server,
            records: Mutex::new(Vec::new()),
            prepares,
            prepare_seconds,
            admin_requests,
            revocations: AtomicU64::new(0),
            leases_expired: AtomicU64::new(0),
            reloads: std::sync::OnceLock::new(),
        })
    }

    /// Where the page server listens, if this node serves images.
    pub fn page_server_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().map(RunningServer::local_addr)
    }

    /// The `/readyz` line about images; `Err` when the page server stopped.
    pub fn readiness(&self) -> Option<Result<String, String>> {
        let server = self.server.as_ref()?;
        let addr = server.local_addr();
        Some(if server.is_accepting() {
            let live = self.refresh();
            Ok(format!("images: serving pages on {addr} ({live} live)"))
        } else {
            Err(format!("the page server on {addr} stopped"))
        })
    }

    /// Notes images that ended since the last look (a lapsed lease is counted once) and
    /// returns how many children may still attach to. Tombstones of ended images vanish
    /// from the registry after a while; so do their records then.
    fn refresh(&self) -> usize {
        let mut records = lock(&self.records);
        let mut live = 0;
        records.retain_mut(|r| match self.registry.status(r.handle) {
            Ok(_) => {
                live += 1;
                true
            }
            Err(why) => {
                if r.ended.is_none() {
                    // Only this service revokes, and it marks the record when it does:
                    // anything else that ended an image is its lease.
                    r.ended = Some(if why == Refusal::Revoked {
                        "revoked"
                    } else {
                        self.leases_expired.fetch_add(1, Relaxed);
                        "expired"
                    });
                }
                why != Refusal::Unknown
            }
        });
        live
    }

    fn resolve(&self, key: &InstanceKey) -> Result<&ChainRuntime, AdminError> {
        let not_found = |m: String| AdminError::new(StatusCode::NOT_FOUND, m);
        let chain = self
            .chains
            .iter()
            .find(|c| c.plan.spec.name == key.chain)
            .ok_or_else(|| not_found(format!("no chain {} in the config", key.chain)))?;
        let stage = chain
            .stages
            .iter()
            .find(|s| s.name == key.function)
            .ok_or_else(|| {
                not_found(format!(
                    "no function {} in chain {}",
                    key.function, key.chain
                ))
            })?;
        if key.instance >= stage.instances.len() {
            return Err(not_found(format!(
                "{}/{} has {} instance slot(s), numbered from 0: no instance {}",
                key.chain,
                key.function,
                stage.instances.len(),
                key.instance
            )));
        }
        Ok(chain)
    }

    fn count(&self, result: PrepareResult) {
        self.prepares.with_label_values(&[result.label()]).inc();
    }

    /// Asks the running instance `key` for an image and publishes it for `lease`: the
    /// descriptor (a credential) for peers, the same path as the admin API's prepare.
    pub async fn prepare_image(
        self: &Arc<Self>,
        key: InstanceKey,
        lease: Duration,
    ) -> Result<proto::ImageDescriptor, String> {
        self.prepare_descriptor(key, lease)
            .await
            .map(|(descriptor, _)| descriptor)
            .map_err(|AdminError(code, message)| format!("{message} ({code})"))
    }

    /// Revokes the image `handle` published (children attached to it are refused at their
    /// next read).
    pub fn revoke_image(&self, handle: u64) -> Result<(), String> {
        self.revoke(&format!("{handle:x}"))
            .map(drop)
            .map_err(|AdminError(_, message)| message)
    }

    /// Asks the running instance `key` for an image and publishes it for `lease`.
    async fn prepare(self: &Arc<Self>, key: InstanceKey, lease: Duration) -> AdminResult {
        self.prepare_descriptor(key, lease)
            .await
            .map(|(_, text)| text)
    }

    /// The prepare itself: the descriptor, and the admin API's text about it.
    async fn prepare_descriptor(
        self: &Arc<Self>,
        key: InstanceKey,
        lease: Duration,
    ) -> Result<(proto::ImageDescriptor, String), AdminError> {
        let Some(server_addr) = self.page_server_addr() else {
            return Err(AdminError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "this node does not serve images: start `spindle run` with --serve-images ADDR",
            ));
        };
        let chain = self.resolve(&key)?;
        let timeout = chain
            .plan
            .stages
            .iter()
            .find(|s| s.function.name == key.function)
            .map_or(Duration::ZERO, |s| s.function.timeout)
            + CAPTURE_ALLOWANCE;
        let Some(channel) = self.board.get(&key) else {
            return Err(AdminError::new(
                StatusCode::CONFLICT,
                format!("{key} is not running (starting or restarting); try again"),
            ));
        };
        let started = Instant::now();
        let exchange = tokio::task::spawn_blocking(move || {
            let mut socket = lock(&channel.socket);
            let Some(stream) = socket.as_ref() else {
                return Err(None);
            };
            let answer = request_prepare(stream, timeout);
            if answer.is_err() {
                // A late or garbled answer would be read as the next one's: close it.
                *socket = None;
            }
            answer.map_err(Some)
        })
        .await
        .map_err(|e| {
            AdminError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("prepare task: {e}"),
            )
        })?;
        let prepared = match exchange {
            Ok(PrepareAnswer::Prepared(p)) => p,
            Ok(PrepareAnswer::Failed(why)) => {
                self.count(PrepareResult::Uncapturable);
                return Err(AdminError::new(
                    StatusCode::CONFLICT,
                    format!("{key} cannot be prepared: {why}"),
                ));
            }
            Err(None) => {
                self.count(PrepareResult::Lost);
                return Err(AdminError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the control channel to {key} closed after an earlier failure; it can be prepared again once restarted"
                    ),
                ));
            }
            Err(Some(e)) => return Err(self.channel_failed(&key, e)),
        };
        let meta = match ImageMeta::decode(&prepared.meta) {
            Ok(meta) => meta,
            Err(e) => {
                self.count(PrepareResult::Malformed);
                tracing::warn!(instance = %key, "prepare answered with bad image metadata: {e}");
                return Err(AdminError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("{key} answered with bad image metadata: {e}"),
                ));
            }
        };
        let pages_with_data = meta.nonzero.count();
        let image = PublishedImage {
            memfd: prepared.memfd,
            memory_bytes: meta.memory_bytes,
            nonzero: meta.nonzero.words().to_vec(),
            lease,
            meta: prepared.meta,
        };
        let handle = match self.registry.publish(image) {
            Ok(h) => h,
            Err(e) => {
                self.count(PrepareResult::PublishFailed);
                tracing::warn!(instance = %key, "publishing a prepared image failed: {e}");
                return Err(AdminError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("the image {key} answered was refused: {e}"),
                ));
            }
        };
        let took = started.elapsed();
        self.count(PrepareResult::Ok);
        self.prepare_seconds.observe(took.as_secs_f64());
        lock(&self.records).push(ImageRecord {
            handle: handle.id,
            of: key.clone(),
            pages_with_data,
            memory_bytes: meta.memory_bytes,
            ended: None,
        });
        let mut descriptor = handle.descriptor(server_addr, meta.module_hash, meta.engine.clone());
        descriptor.rdma = self
            .server
            .as_ref()
            .and_then(|s| s.rdma().advert(handle.memory_bytes));
        tracing::info!(instance = %key, handle = %format_args!("{:#018x}", handle.id),
            pages_with_data, prepare_us = took.as_micros() as u64, "image published");
        let text = format!(
            "{descriptor}\n\
             handle: {:#018x}\n\
             instance: {key}\n\
             pages_with_data: {pages_with_data} of {}\n\
             image_bytes: {}\n\
             memory_bytes: {}\n\
             waited_us: {}\n\
             capture_us: {}\n\
             prepare_us: {}\n\
             lease_s: {}\n",
            handle.id,
            meta.nonzero.pages(),
            pages_with_data * PAGE,
            meta.memory_bytes,
            prepared.waited_us,
            prepared.capture_us,
            took.as_micros(),
            lease.as_secs(),
        );
        Ok((descriptor, text))
    }

    fn channel_failed(&self, key: &InstanceKey, e: ChannelError) -> AdminError {
        tracing::warn!(instance = %key, "prepare failed on the control channel: {e}");
        if e.is_malformed() {
            self.count(PrepareResult::Malformed);
            AdminError::new(StatusCode::BAD_GATEWAY, format!("{key} answered: {e}"))
        } else {
            self.count(PrepareResult::Lost);
            let code = if matches!(e, ChannelError::TimedOut(_)) {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            AdminError::new(code, format!("{key} did not answer the prepare: {e}"))
        }
    }

    /// One line per image this node published: handle, instance, status, what was captured
    /// and what was served.
    fn list(&self) -> String {
        self.refresh();
        let records = lock(&self.records);
        let mut out = String::new();
        for r in records.iter() {
            let of = format!("{}/{} {}", r.of.chain, r.of.function, r.of.instance);
            let captured = format!(
                "pages_with_data={} image_bytes={} memory_bytes={}",
                r.pages_with_data,
                r.pages_with_data * PAGE,
                r.memory_bytes
            );
            let status = match self.registry.status(r.handle) {
                Ok(s) => format!(
                    "live lease_left_s={} children={} pages_served={} bytes_served={}",
                    s.lease_left
                        .map_or("unbounded".to_owned(), |d| d.as_secs().to_string()),
                    s.connections,
                    s.pages_served,
                    s.bytes_served
                ),
                Err(_) => r.ended.unwrap_or("ended").to_owned(),
            };
            out.push_str(&format!("{:#018x} {of} {status} {captured}\n", r.handle));
        }
        out
    }

    fn revoke(&self, handle_text: &str) -> AdminResult {
        let digits = handle_text.strip_prefix("0x").unwrap_or(handle_text);
        let handle = u64::from_str_radix(digits, 16).map_err(|_| {
            AdminError::new(
                StatusCode::BAD_REQUEST,
                format!("{handle_text:?} is not an image handle (hex, as GET /images lists them)"),
            )
        })?;
        match self.registry.revoke(handle) {
            Ok(()) => {
                self.revocations.fetch_add(1, Relaxed);
                if let Some(r) = lock(&self.records).iter_mut().find(|r| r.handle == handle) {
                    r.ended = Some("revoked");
                }
                tracing::info!(handle = %format_args!("{handle:#018x}"), "image revoked");
                Ok(format!("revoked {handle:#018x}\n"))
            }
            Err(Refusal::Unknown) => Err(AdminError::new(
                StatusCode::NOT_FOUND,
                format!("no image {handle:#018x} on this node"),
            )),
            Err(why) => Err(AdminError::new(
                StatusCode::CONFLICT,
                format!("image {handle:#018x} already ended ({why:?})"),
            )),
        }
    }

    /// Sends POST /reload to the gateway's reloader from now on.
    pub fn accept_reloads(&self, tx: tokio::sync::mpsc::Sender<crate::reload::ReloadRequest>) {
        let _ = self.reloads.set(tx);
    }

    /// Reloads the config and answers with what changed: 200, or 409 with why nothing (or
    /// not everything) changed.
    async fn reload(&self) -> Result<String, AdminError> {
        let Some(tx) = self.reloads.get() else {
            return Err(AdminError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the gateway is still starting; reload once it serves",
            ));
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send(crate::reload::ReloadRequest { reply })
            .await
            .map_err(|_| AdminError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))?;
        match answer.await {
            Ok(Ok(summary)) => Ok(summary),
            Ok(Err(why)) => Err(AdminError::new(StatusCode::CONFLICT, why)),
            Err(_) => Err(AdminError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting down",
            )),
        }
    }

    /// Answers one admin request.
    pub async fn admin(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Reply, std::convert::Infallible> {
        let path = req.uri().path().to_owned();
        let result = match (req.method(), path.as_str()) {
            (&Method::POST, "/images") => match parse_prepare(req.uri().query().unwrap_or("")) {
                Ok((key, lease)) => self.prepare(key, lease).await,
                Err(e) => Err(e),
            },
            (&Method::GET, "/images") => Ok(self.list()),
            (&Method::POST, "/reload") => self.reload().await,
            (_, "/reload") => Err(AdminError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "/reload takes POST",
            )),
            (&Method::DELETE, p) if p.starts_with("/images/") => {
                self.revoke(&p["/images/".len()..])
            }
            (_, "/images") => Err(AdminError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "/images takes GET (list) or POST (prepare)",
            )),
            (_, p) if p.starts_with("/images/") => Err(AdminError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "/images/HANDLE takes DELETE (revoke)",
            )),
            _ => Err(AdminError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no admin resource at {path}: see POST /images, GET /images, DELETE /images/HANDLE, POST /reload"
                ),
            )),
        };
        let reply = match result {
            // `text` ends the body with the newline.
            Ok(body) => text(StatusCode::OK, body.trim_end()),
            Err(AdminError(code, message)) => text(code, message),
        };
        self.admin_requests
            .with_label_values(&[reply.status().as_str()])
            .inc();
        Ok(reply)
    }

    /// The node service's metric families, read at scrape time.
    pub fn families(&self) -> Vec<MetricFamily> {
        let live = self.refresh();
        let s = self.registry.stats();
        let r = &s.refusals;
        let total = |name: &str, help: &str, v: u64| {
            family(
                name,
                help,
                MetricType::COUNTER,
                vec![counter(&[], v as f64)],
            )
        };
        let level = |name: &str, help: &str, v: u64| {
            family(name, help, MetricType::GAUGE, vec![gauge(&[], v as f64)])
        };
        let refusals = [
            ("unknown_handle", r.unknown_handle),
            ("bad_proof", r.bad_proof),
            ("expired", r.expired),
            ("revoked", r.revoked),
            ("bad_request", r.bad_request),
            ("malformed", r.malformed),
            ("busy", r.busy),
            ("internal", r.internal),
        ]
        .iter()
        .map(|(reason, n)| counter(&[("reason", reason)], *n as f64))
        .collect();
        let mut families = vec![
            total(
                "spindle_fork_images_published_total",
                "Images this node published",
                s.images_published,
            ),
            level(
                "spindle_fork_images_live",
                "Published images new children may still attach to",
                live as u64,
            ),
            level(
                "spindle_fork_image_memfds_open",
                "Images whose memory is still held: live ones, and ended ones a child connection still holds",
                s.images_alive,
            ),
            total(
                "spindle_fork_handshakes_total",
                "Children that proved they hold an image's key",
                s.handshakes_ok,
            ),
            family(
                "spindle_fork_refusals_total",
                "Page-server connections refused, by reason",
                MetricType::COUNTER,
                refusals,
            ),
            total(
                "spindle_fork_page_reads_total",
                "Page reads answered",
                s.reads,
            ),
            total(
                "spindle_fork_pages_served_total",
                "Pages sent to children (zero pages included)",
                s.pages_served,
            ),
            total(
                "spindle_fork_bytes_served_total",
                "Bytes of page frames sent to children",
                s.bytes_served,
            ),
            level(
                "spindle_fork_page_server_connections",
                "Open page-server connections",
                s.connections_open,
            ),
            level(
                "spindle_fork_children_attached",
                "Children attached to an image now",
                s.children_attached,
            ),
            total(
                "spindle_fork_page_server_timeouts_total",
                "Page-server connections closed because the child went silent",
                s.timeouts,
            ),
            total(
                "spindle_fork_leases_expired_total",
                "Images that ended because their lease lapsed",
                self.leases_expired.load(Relaxed),
            ),
            total(
                "spindle_fork_revocations_total",
                "Images revoked through the admin API",
                self.revocations.load(Relaxed),
            ),
        ];
        families.extend(self.prepares.collect());
        families.extend(self.prepare_seconds.collect());
        families.extend(self.admin_requests.collect());
        families
    }

    /// Serves the admin API on `listener` until the task is dropped.
    pub async fn serve_admin(self: Arc<Self>, listener: AdminListener) {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10));
        loop {
            let stream = match listener.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("admin accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let node = Arc::clone(&self);
            let service = hyper::service::service_fn(move |req| Arc::clone(&node).admin(req));
            let connection = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!("admin connection ended: {e}");
                }
            });
        }
    }
}

/// `chain=C&function=F[&instance=N][&lease=DURATION]`, every parameter once.
fn parse_prepare(query: &str) -> Result<(InstanceKey, Duration), AdminError> {
    let bad = |m: String| AdminError::new(StatusCode::BAD_REQUEST, m);
    let (mut chain, mut function, mut instance, mut lease) = (None, None, None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| bad(format!("parameter {pair:?} has no value")))?;
        let slot = match name {
            "chain" => &mut chain,
            "function" => &mut function,
            "instance" => &mut instance,
            "lease" => &mut lease,
            other => {
                return Err(bad(format!(
                    "unknown parameter {other:?}: POST /images takes chain, function, instance, lease"
                )));
            }
        };
        if slot.replace(value).is_some() {
            return Err(bad(format!("parameter {name} given twice")));
        }
    }
    let need = |v: Option<&str>, name: &str| {
        v.filter(|v| !v.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| {
                bad(format!(
                    "POST /images needs {name}=NAME (and chain=, function=)"
                ))
            })
    };
    let key = InstanceKey {
        chain: need(chain, "chain")?,
        function: need(function, "function")?,
        instance: match instance {
            None => 0,
            Some(n) => n
                .parse()
                .map_err(|_| bad(format!("instance={n:?} is not an instance number")))?,
        },
    };
    let lease = match lease {
        None => DEFAULT_LEASE,
        Some(l) => {
            let d = spindle_bench::parse_duration(l).map_err(|e| bad(format!("lease={l}: {e}")))?;
            if d.is_zero() {
                return Err(bad("lease=0 would end the image at once".into()));
            }
            d
        }
    };
    Ok((key, lease))
}

/// The admin API's Unix socket, created with mode 0600; removed again on drop.
pub struct AdminListener {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

impl AdminListener {
    /// Binds `path` (replacing a stale socket no process listens on). Call it before
    /// threads that create files start: the umask that makes the socket 0600 from its
    /// first moment is process-wide.
    pub fn bind(path: &Path) -> Result<Self, NodeError> {
        use nix::sys::stat::{Mode, umask};
        let err = |source| NodeError::Admin {
            path: path.to_owned(),
            source,
        };
        if std::fs::symlink_metadata(path).is_ok() {
            if UnixStream::connect(path).is_ok() {
                return Err(NodeError::AdminInUse(path.to_owned()));
            }
            use std::os::unix::fs::FileTypeExt;
            let is_socket =
                std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
            if !is_socket {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists and is not a socket",
                )));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        // Created 0600 rather than chmod-ed afterwards: no moment where others may connect.
        let previous = umask(Mode::from_bits_truncate(0o177));
        let bound = std::os::unix::net::UnixListener::bind(path);
        umask(previous);
        let listener = bound.map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        let listener = tokio::net::UnixListener::from_std(listener).map_err(err)?;
        Ok(AdminListener {
            listener,
            path: path.to_owned(),
        })
    }
}

impl Drop for AdminListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_parameters_are_checked() {
        let (key, lease) = parse_prepare("chain=c&function=f").unwrap();
        assert_eq!(
            (key.chain.as_str(), key.function.as_str(), key.instance),
            ("c", "f", 0)
        );
        assert_eq!(lease, DEFAULT_LEASE);
        let (key, lease) = parse_prepare("function=f&chain=c&instance=2&lease=90s").unwrap();
        assert_eq!((key.instance, lease), (2, Duration::from_secs(90)));
        for (query, says) in [
            ("function=f", "needs chain"),
            ("chain=c", "needs function"),
            ("chain=c&function=f&instance=x", "not an instance number"),
            ("chain=c&function=f&lease=soon", "lease=soon"),
            ("chain=c&function=f&lease=0s", "at once"),
            ("chain=c&function=f&chain=d", "given twice"),
            ("chain=c&function=f&key=1", "unknown parameter"),
            ("chain", "has no value"),
        ] {
            let AdminError(code, message) = parse_prepare(query).err().unwrap();
            assert_eq!(code, StatusCode::BAD_REQUEST, "{query}");
            assert!(message.contains(says), "{query}: {message}");
        }
    }

    #[test]
    fn a_lease_ends_with_its_instance_unless_a_newer_one_took_the_place() {
        let board = Arc::new(ControlBoard::default());
        let key = InstanceKey {
            chain: "c".into(),
            function: "f".into(),
            instance: 0,
        };
        let first = board.attach(key.clone(), UnixStream::pair().unwrap().0);
        let second = board.attach(key.clone(), UnixStream::pair().unwrap().0);
        drop(first);
        assert!(
            board.get(&key).is_some(),
            "the newer incarnation stays reachable"
        );
        drop(second);
        assert!(board.get(&key).is_none());
    }

    #[test]
    fn the_admin_socket_is_created_owner_only_and_replaces_a_stale_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("spindle-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // A socket file nobody listens on, as a killed gateway leaves behind.
            drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
            let listener = AdminListener::bind(&path).unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{mode:o}");
            assert!(matches!(
                AdminListener::bind(&path),
                Err(NodeError::AdminInUse(_))
            ));
            drop(listener);
            assert!(!path.exists(), "removed on drop");
        });
        std::fs::write(&path, b"not a socket").unwrap();
        let err = rt.block_on(async { AdminListener::bind(&path).err().unwrap() });
        assert!(err.to_string().contains("not a socket"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
