//! Peers: scaling out onto other nodes when this one is over its budget, and forwarding
//! requests to the instances started there (docs/autoscaling.md "Peers").
//!
//! - **When.** An autoscaled function whose autoscaler wants more instances than it has, on
//!   a node over its CPU or memory budget ([`crate::budget`]), keeps what it runs (at least
//!   one while requests wait for it) and wants the rest on peers ([`RemoteShare::want`]).
//! - **How.** The share's task prepares an image of a running local instance through the
//!   node service (the admin API's prepare), and sends its descriptor over the
//!   authenticated, encrypted peer-control channel ([`wire`]) to peers in list order; each
//!   grants what it can ([`grants`]) and starts that many instances of the function for that
//!   chain resumed from the image (exec'd workers at `IMAGE_FD`/`CACHE_FD`, one node page
//!   cache per image). Every node must run the same chains: the peer serves forwarded
//!   requests through its own copy of the chain.
//! - **Forwarding.** The arena is per node, so a request for a chain with instances on a peer
//!   is forwarded whole to the peer's gateway ([`forward`]) when a peer's ready instances
//!   are less loaded than this node's (see [`Peers::pick`]), marked with
//!   [`FORWARDED_HEADER`] so it is never forwarded again.
//! - **Down again.** When the autoscaler wants fewer (load fell) or the node is back under
//!   budget (local instances start first, then the remote count falls as they come up), the
//!   share asks peers for fewer; a peer retires the instances it no longer runs; once none
//!   runs, the origin revokes the image. A grant not renewed lapses on the peer.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::time::{Duration, Instant};

use chain_runtime::config::{Config, PeerSpec, parse_percent};
use http_edge::Reply;
use hyper::Request;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use prometheus::core::Collector;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts};
use serde_json::Value;
use tokio::net::TcpStream;

use crate::budget::{Budget, BudgetError};
use crate::dataplane::ChainRuntime;
use crate::node::NodeService;

mod dns;
mod forward;
mod grants;
mod origin;
pub mod wire;

pub use forward::Outcome;
pub use grants::{GRANT_LEASE, GrantBoard, Wanted};
pub use origin::{RENEW, RemoteShare};
use wire::{ClusterKey, KeyError, Session, WireError};

/// Set on a request forwarded to a peer (value: the origin node's name). A request carrying
/// it is always served locally, so a request is forwarded at most once.
pub const FORWARDED_HEADER: &str = "spindle-forwarded-from";
/// Set on the answer to a forwarded request: the peer that served it.
pub const SERVED_BY_HEADER: &str = "spindle-forwarded-to";
/// How long a peer-control connection may take to connect and authenticate, and a request
/// to be answered.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);

/// `spindle run`'s peer options; each one, given, replaces the config's value.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct PeerArgs {
    /// A peer node's gateway: NAME=HTTP_ADDR,CONTROL_ADDR (repeatable; replaces `peers:`).
    #[arg(long = "peer", value_name = "NAME=HTTP,CONTROL")]
    pub peers: Vec<String>,
    /// Serve the peer-control channel here, so peers can run instances on this node
    /// [default: `node.peer_listen`].
    #[arg(long, value_name = "ADDR")]
    pub peer_listen: Option<SocketAddr>,
    /// The shared cluster key file (>= 32 bytes, mode 0600) [default: `node.cluster_key`].
    #[arg(long, value_name = "PATH")]
    pub cluster_key: Option<PathBuf>,
    /// This node's name for its peers [default: `node.name`, else the listen address].
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// Over this CPU utilization the node scales out to peers, e.g. 80% [default:
    /// `node.cpu_budget`, else 80%].
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
    pub cpu_budget: Option<f64>,
    /// Over this memory utilization the node scales out to peers [default:
    /// `node.memory_budget`, else 85%].
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
    pub memory_budget: Option<f64>,
}

/// Why the peer set-up failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerSetupError {
    #[error("--peer {0}: expected NAME=HTTP_ADDR,CONTROL_ADDR (IP:port each)")]
    BadPeer(String),
    #[error("node name {0:?}: use only lowercase letters, digits, `_` and `-`")]
    BadName(String),
    #[error("peers are configured but no cluster key: give node.cluster_key or --cluster-key")]
    NoKey,
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(
        "peers are configured, but forking onto them needs this node to serve image pages: start with --admin PATH --serve-images ADDR"
    )]
    NoPageServer,
    #[error("peer-control listener on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("node budget: {0}")]
    Budget(#[from] BudgetError),
    #[error("reading module {0}: {1}")]
    Module(PathBuf, std::io::Error),
    #[error(transparent)]
    Random(proto::pages::RandomnessError),
    #[error("peer name {0} is both a listed peer and a slot of peers found by DNS")]
    NameClash(String),
}

/// A peer's gateway: its control channel (one authenticated connection, reopened when it
/// fails) and its HTTP address. A peer found by DNS is a slot whose addresses the resolver
/// sets, changes and clears ([`dns`]); a slot without addresses is unreachable.
pub struct PeerLink {
    pub name: String,
    addrs: std::sync::RwLock<Option<PeerAddrs>>,
    key: ClusterKey,
    /// The open session and the control address it was opened to.
    session: tokio::sync::Mutex<Option<(SocketAddr, Session<TcpStream>)>>,
    calls: IntCounterVec,
    /// Set when a forward found its gateway unreachable: nothing more is forwarded to it
    /// until its control channel answers again (without waiting for the next round).
    down: AtomicBool,
}

/// Where a peer's gateway listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddrs {
    pub http: SocketAddr,
    pub control: SocketAddr,
}

/// Why a control call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("no address: its DNS name resolved to no free address for it")]
    NoAddress,
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("no answer within {CONTROL_TIMEOUT:?}")]
    Timeout,
    #[error("the answer is not JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl PeerLink {
    fn new(name: String, addrs: Option<PeerAddrs>, key: ClusterKey, calls: IntCounterVec) -> Self {
        PeerLink {
            name,
            addrs: std::sync::RwLock::new(addrs),
            key,
            session: tokio::sync::Mutex::new(None),
            calls,
            down: AtomicBool::new(false),
        }
    }

    /// Where the peer listens now; `None` for an empty DNS slot.
    pub fn addrs(&self) -> Option<PeerAddrs> {
        *self.addrs.read().expect("peer address lock")
    }

    /// Points the slot at another peer (or none): the next call connects there.
    fn set_addrs(&self, addrs: Option<PeerAddrs>) {
        *self.addrs.write().expect("peer address lock") = addrs;
        self.down.store(addrs.is_none(), Relaxed);
    }

    /// One request and its answer; a failure closes the connection (the next call opens a
    /// new one, with a new handshake).
    pub async fn call(&self, request: &Value) -> Result<Value, CallError> {
        let mut session = self.session.lock().await;
        let result = tokio::time::timeout(CONTROL_TIMEOUT, async {
            let addr = self.addrs().ok_or(CallError::NoAddress)?.control;
            if session.as_ref().is_none_or(|(to, _)| *to != addr) {
                *session = None;
                let stream = TcpStream::connect(addr)
                    .await
                    .map_err(|e| CallError::Connect(addr, e))?;
                let _ = stream.set_nodelay(true);
                *session = Some((addr, Session::client(stream, &self.key).await?));
            }
            let (_, s) = session.as_mut().expect("connected above");
            s.send(request.to_string().as_bytes()).await?;
            let answer = s.recv().await?;
            Ok::<_, CallError>(serde_json::from_slice(&answer)?)
        })
        .await
        .unwrap_or(Err(CallError::Timeout));
        let label = match &result {
            Ok(_) => "ok",
            Err(CallError::Connect(..)) => "unreachable",
            Err(CallError::NoAddress) => "no_address",
            Err(CallError::Wire(WireError::BadProof)) => "bad_auth",
            Err(CallError::Timeout) => "timeout",
            Err(_) => "failed",
        };
        self.calls
            .with_label_values(&[self.name.as_str(), label])
            .inc();
        match &result {
            Ok(_) => self.down.store(false, Relaxed),
            Err(_) => *session = None,
        }
        result
    }
}

/// The origin side: peers, this node's remote shares, the forwarder and their metrics.
pub struct Peers {
    origin: HeaderValue,
    links: Vec<Arc<PeerLink>>,
    /// `[chain][stage]`: the share of each autoscaled function.
    shares: Vec<Vec<Option<Arc<RemoteShare>>>>,
    /// `[chain][peer]`: requests forwarded and not answered yet.
    forwarding: Vec<Vec<AtomicU32>>,
    forwarder: forward::Forwarder,
    forwarded: IntCounterVec,
    forward_seconds: HistogramVec,
    gauges: origin::Gauges,
    /// The DNS resolvers' metrics (shared by all of them), when peers come from DNS.
    dns_info: Option<dns::DnsMetrics>,
}

impl Peers {
    /// The remote share of (chain, stage), for its pool; None for a fixed-count function.
    pub fn share(&self, chain: usize, stage: usize) -> Option<Arc<RemoteShare>> {
        self.shares.get(chain)?.get(stage)?.clone()
    }

    /// Where a request for chain `chain` goes: None for here, else the peer.
    ///
    /// Least loaded per instance: the chain's stage with the largest fraction of its ready
    /// instances on peers decides (a chain scaled out for one function sends that function's
    /// share). With `L` instances of it ready here and `n` of the chain's requests in flight
    /// here, and `R_p` ready on peer `p` with `f_p` requests forwarded to it and not yet
    /// answered, the request goes where `(requests + 1) / instances` is lowest, here on a
    /// tie (a forward costs a hop). So every ready instance, local or remote, carries about
    /// the same concurrency — what the autoscaler sized them for — and a slower node gets
    /// less. Requests already forwarded to this node never leave it.
    pub fn pick(&self, chain: usize, req: &Request<Incoming>) -> Option<Target> {
        if req.headers().contains_key(FORWARDED_HEADER) {
            return None;
        }
        let shares = self.shares.get(chain)?;
        let (mut best, mut best_fraction) = (None, 0.0);
        let up: Vec<bool> = self.links.iter().map(|l| !l.down.load(Relaxed)).collect();
        let ready = |share: &RemoteShare, i: usize| if up[i] { share.ready(i) } else { 0 };
        for share in shares.iter().flatten() {
            let remote: u32 = (0..self.links.len()).map(|i| ready(share, i)).sum();
            if remote == 0 {
                continue;
            }
            let local = share.chain.serving_instances(share.stage) as u32;
            let fraction = f64::from(remote) / f64::from(local + remote);
            if fraction > best_fraction {
                (best, best_fraction) = (Some((share, local)), fraction);
            }
        }
        let (share, local) = best?;
        let here: usize = share
            .chain
            .load
            .iter()
            .map(|l| l.held() + l.waiting.load(Relaxed))
            .sum();
        let peers: Vec<(usize, u32)> = (0..self.links.len())
            .map(|i| {
                let forwarding = self.forwarding[chain][i].load(Relaxed) as usize;
                (forwarding, ready(share, i))
            })
            .collect();
        least_loaded(here, local, &peers).map(|peer| Target { chain, peer })
    }

    /// Forwards `req` to the target [`Peers::pick`] chose, and counts it.
    pub async fn forward(
        &self,
        target: Target,
        chain: &ChainRuntime,
        req: Request<Incoming>,
    ) -> Reply {
        let peer = &self.links[target.peer];
        let in_flight = &self.forwarding[target.chain][target.peer];
        in_flight.fetch_add(1, Relaxed);
        // Decremented however the forward ends, a client that goes away included.
        let _guard = Decrement(in_flight);
        let started = Instant::now();
        let (reply, outcome) = self
            .forwarder
            .forward(peer, &self.origin, chain, req, started)
            .await;
        if let Some(outcome) = outcome {
            let (c, p) = (chain.plan.spec.name.as_str(), peer.name.as_str());
            self.forwarded
                .with_label_values(&[c, p, outcome.label()])
                .inc();
            self.forward_seconds
                .with_label_values(&[c, p])
                .observe(started.elapsed().as_secs_f64());
            if outcome == Outcome::Unreachable && !peer.down.swap(true, Relaxed) {
                tracing::warn!(chain = %c, peer = %p, "peer unreachable; forwarding nothing more to it until its control channel answers");
            }
            if outcome != Outcome::Ok {
                tracing::debug!(chain = %c, peer = %p, outcome = outcome.label(), status = %reply.status(), "forward failed");
            }
        }
        reply
    }
}

/// Which peer, if any, is less loaded per instance than here: `here` requests on `local`
/// instances against each peer's `(forwarded and unanswered, ready instances)`. Here on a
/// tie; a node without ready instances takes nothing.
fn least_loaded(here: usize, local: u32, peers: &[(usize, u32)]) -> Option<usize> {
    let per_instance = |requests: usize, instances: u32| {
        if instances == 0 {
            f64::INFINITY
        } else {
            (requests + 1) as f64 / f64::from(instances)
        }
    };
    let mut choice = (None, per_instance(here, local));
    for (i, &(requests, instances)) in peers.iter().enumerate() {
        let load = per_instance(requests, instances);
        if load < choice.1 {
            choice = (Some(i), load);
        }
    }
    choice.0
}

/// Where [`Peers::pick`] sends a request: a peer, for a chain.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    chain: usize,
    peer: usize,
}

struct Decrement<'a>(&'a AtomicU32);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Everything peer-related one gateway runs: its budget, the origin side (when it has
/// peers) and the peer side (when it listens for them).
#[derive(Default)]
pub struct Cluster {
    pub budget: Option<Arc<Budget>>,
    pub peers: Option<Arc<Peers>>,
    pub grants: Option<Arc<GrantBoard>>,
}

/// Names travel in a header and label metrics: the config's rule for names.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'))
}

fn parse_peer(arg: &str) -> Result<PeerSpec, PeerSetupError> {
    let bad = || PeerSetupError::BadPeer(arg.to_owned());
    let (name, addrs) = arg.split_once('=').ok_or_else(bad)?;
    let (http, control) = addrs.split_once(',').ok_or_else(bad)?;
    if !plain_name(name) {
        return Err(PeerSetupError::BadName(name.to_owned()));
    }
    Ok(PeerSpec {
        name: name.to_owned(),
        http: http.trim().parse().map_err(|_| bad())?,
        control: control.trim().parse().map_err(|_| bad())?,
    })
}

impl Cluster {
    /// Sets up what `config` and `args` ask for and starts its tasks: the budget sampler,
    /// a remote share per autoscaled function (with peers), the peer-control server (with a
    /// listen address). Nothing at all without peers or a listen address.
    pub async fn start(
        config: &Config,
        args: &PeerArgs,
        listen: SocketAddr,
        chains: &[Arc<ChainRuntime>],
        node: Option<Arc<NodeService>>,
    ) -> Result<Cluster, PeerSetupError> {
        // `--peer` replaces the file's peers, those found by DNS too.
        let (peers, dns_peers): (Vec<PeerSpec>, _) = if args.peers.is_empty() {
            (config.peers.clone(), config.dns_peers.clone())
        } else {
            let peers = args
                .peers
                .iter()
                .map(|p| parse_peer(p))
                .collect::<Result<_, _>>()?;
            (peers, Vec::new())
        };
        let peer_listen = args.peer_listen.or(config.node.peer_listen);
        if peers.is_empty() && dns_peers.is_empty() && peer_listen.is_none() {
            return Ok(Cluster::default());
        }
        let key_path = args
            .cluster_key
            .clone()
            .or_else(|| config.node.cluster_key.clone())
            .ok_or(PeerSetupError::NoKey)?;
        let key = ClusterKey::load(&key_path)?;
        let budget = Budget::new(
            args.cpu_budget.unwrap_or(config.node.cpu_budget),
            args.memory_budget.unwrap_or(config.node.memory_budget),
        )?;
        tokio::spawn(Arc::clone(&budget).sample());
        let name = args
            .node_name
            .clone()
            .or_else(|| config.node.name.clone())
            .unwrap_or_else(|| listen.to_string());
        if args.node_name.is_some() && !plain_name(&name) {
            return Err(PeerSetupError::BadName(name));
        }

        let mut cluster = Cluster {
            budget: Some(Arc::clone(&budget)),
            ..Cluster::default()
        };
        if let Some(addr) = peer_listen {
            let mut hashes = Vec::new();
            for c in chains {
                let mut per_stage = Vec::new();
                for s in &c.plan.stages {
                    let bytes = std::fs::read(&s.function.module)
                        .map_err(|e| PeerSetupError::Module(s.function.module.clone(), e))?;
                    per_stage.push(proto::image::module_hash(&bytes));
                }
                hashes.push(per_stage);
            }
            let board = Arc::new(GrantBoard::new(chains, hashes, Some(Arc::clone(&budget))));
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| PeerSetupError::Listen(addr, e))?;
            tracing::info!("peer-control channel on {addr}");
            tokio::spawn(Arc::clone(&board).serve(listener, key.clone()));
            cluster.grants = Some(board);
        }
        if !peers.is_empty() || !dns_peers.is_empty() {
            let node = node
                .filter(|n| n.page_server_addr().is_some())
                .ok_or(PeerSetupError::NoPageServer)?;
            let calls = IntCounterVec::new(
                Opts::new(
                    "spindle_peer_control_calls_total",
                    "Peer-control requests this node made, by peer and result",
                ),
                &["peer", "result"],
            )
            .expect("valid");
            let mut links: Vec<Arc<PeerLink>> = peers
                .iter()
                .map(|spec| {
                    tracing::info!(peer = %spec.name, http = %spec.http, control = %spec.control, "peer");
                    let addrs = PeerAddrs {
                        http: spec.http,
                        control: spec.control,
                    };
                    Arc::new(PeerLink::new(spec.name.clone(), Some(addrs), key.clone(), calls.clone()))
                })
                .collect();
            let mut resolvers = Vec::new();
            let dns_metrics = (!dns_peers.is_empty()).then(dns::DnsMetrics::new);
            for spec in &dns_peers {
                let slots: Vec<Arc<PeerLink>> = (0..spec.max_peers)
                    .map(|i| {
                        Arc::new(PeerLink::new(
                            format!("{}-{i}", spec.name),
                            None,
                            key.clone(),
                            calls.clone(),
                        ))
                    })
                    .collect();
                for slot in &slots {
                    if links.iter().any(|l| l.name == slot.name) {
                        return Err(PeerSetupError::NameClash(slot.name.clone()));
                    }
                }
                tracing::info!(peers = %spec.name, dns = %spec.dns, slots = spec.max_peers, refresh_ms = spec.refresh.as_millis() as u64, "peers found by DNS");
                links.extend(slots.iter().cloned());
                let metrics = dns_metrics
                    .clone()
                    .expect("made when there are DNS entries");
                resolvers.push(dns::Resolver::new(spec.clone(), slots, metrics));
            }
            // The first resolution before any share asks a peer for anything.
            for r in &resolvers {
                r.refresh().await;
            }
            for r in resolvers {
                tokio::spawn(r.run());
            }
            // Tells the peers this process from an earlier one of the same name: a restarted
            // origin's old images are gone.
            let incarnation = u64::from_le_bytes(
                proto::pages::fresh_nonce::<8>().map_err(PeerSetupError::Random)?,
            );
            let gauges = origin::Gauges {
                remote: IntGaugeVec::new(
                    Opts::new(
                        "spindle_remote_instances",
                        "Instances of this node's functions on each peer: granted, and ready (serving)",
                    ),
                    &["chain", "function", "peer", "state"],
                )
                .expect("valid"),
                wanted: IntGaugeVec::new(
                    Opts::new(
                        "spindle_remote_instances_wanted",
                        "Instances of this node's functions it wants on peers (over budget)",
                    ),
                    &["chain", "function"],
                )
                .expect("valid"),
            };
            let shares = chains
                .iter()
                .map(|c| {
                    (0..c.stages.len())
                        .map(|s| {
                            c.plan.stages[s].function.instances.autoscale.map(|_| {
                                let share =
                                    Arc::new(RemoteShare::new(Arc::clone(c), s, links.len()));
                                tokio::spawn(Arc::clone(&share).run(
                                    links.clone(),
                                    Arc::clone(&node),
                                    name.clone(),
                                    incarnation,
                                    gauges.clone(),
                                ));
                                share
                            })
                        })
                        .collect()
                })
                .collect();
            let forwarded = IntCounterVec::new(
                Opts::new(
                    "spindle_requests_forwarded_total",
                    "Requests forwarded whole to a peer's gateway, by outcome",
                ),
                &["chain", "peer", "outcome"],
            )
            .expect("valid");
            for c in chains {
                for l in &links {
                    for o in Outcome::ALL {
                        forwarded.with_label_values(&[
                            c.plan.spec.name.as_str(),
                            l.name.as_str(),
                            o.label(),
                        ]);
                    }
                }
            }
            let forward_seconds = HistogramVec::new(
                HistogramOpts::new(
                    "spindle_forward_duration_seconds",
                    "Forwarded requests, from arrival here to the peer's answer read",
                )
                .buckets(prometheus::exponential_buckets(100e-6, 2.0, 16).expect("valid")),
                &["chain", "peer"],
            )
            .expect("valid");
            let origin = HeaderValue::from_str(&name).unwrap_or(HeaderValue::from_static("origin"));
            cluster.peers = Some(Arc::new(Peers {
                origin,
                forwarding: chains
                    .iter()
                    .map(|_| links.iter().map(|_| AtomicU32::new(0)).collect())
                    .collect(),
                links,
                shares,
                forwarder: forward::Forwarder::new(),
                forwarded,
                forward_seconds,
                gauges,
                dns_info: dns_metrics,
            }));
        }
        Ok(cluster)
    }

    /// At shutdown, after the requests in flight: asks peers to release every grant and
    /// waits, at most `timeout`, until none runs an instance of this node's images, so they
    /// are retired rather than cut off from their pages (a grant would lapse anyway).
    pub async fn release(&self, timeout: Duration) {
        let Some(peers) = &self.peers else {
            return;
        };
        let shares: Vec<&Arc<RemoteShare>> = peers.shares.iter().flatten().flatten().collect();
        if shares.iter().all(|s| s.released()) {
            return;
        }
        tracing::info!("releasing the instances peers run for this node");
        for s in &shares {
            s.close();
        }
        let deadline = Instant::now() + timeout;
        while !shares.iter().all(|s| s.released()) {
            if Instant::now() >= deadline {
                tracing::warn!(
                    "peers still run instances of this node's images after {timeout:?}; stopping anyway"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The peer hooks of (chain, stage)'s pool.
    pub fn pool_peers(&self, chain: usize, stage: usize) -> PoolPeers {
        PoolPeers {
            share: self.peers.as_ref().and_then(|p| p.share(chain, stage)),
            grants: self.grants.clone(),
            budget: self.budget.clone(),
            chain,
            stage,
            // Generation 1's module is hashed at start.
            hashed_generation: 1,
        }
    }

    /// Metric families of the budget, the origin and the peer side.
    pub fn families(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut out = Vec::new();
        if let Some(b) = &self.budget {
            out.extend(b.families());
        }
        if let Some(p) = &self.peers {
            out.extend(p.forwarded.collect());
            out.extend(p.forward_seconds.collect());
            out.extend(p.gauges.remote.collect());
            out.extend(p.gauges.wanted.collect());
            if let Some(l) = p.links.first() {
                out.extend(l.calls.collect());
            }
            if let Some(d) = &p.dns_info {
                out.extend(d.families(&p.links));
            }
        }
        if let Some(g) = &self.grants {
            out.extend(g.families());
        }
        out
    }
}

/// What one pool needs of the cluster: its remote share (origin), the grant board (peer)
/// and the node's budget.
#[derive(Clone, Default)]
pub struct PoolPeers {
    pub share: Option<Arc<RemoteShare>>,
    pub grants: Option<Arc<GrantBoard>>,
    pub budget: Option<Arc<Budget>>,
    pub chain: usize,
    pub stage: usize,
    /// The generation whose module the grant board last checked grants against.
    pub(crate) hashed_generation: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_loaded_instance_takes_the_request_and_here_wins_ties() {
        // 1 instance here with 1 request; 7 on the peer with 6: (1+1)/1 > (6+1)/7.
        assert_eq!(least_loaded(1, 1, &[(6, 7)]), Some(0));
        assert_eq!(least_loaded(0, 1, &[(6, 7)]), None, "a tie stays here");
        assert_eq!(
            least_loaded(0, 0, &[(100, 1)]),
            Some(0),
            "nothing ready here"
        );
        assert_eq!(least_loaded(5, 1, &[(0, 0)]), None, "nothing ready there");
        // Two peers: the lighter one.
        assert_eq!(least_loaded(9, 1, &[(8, 2), (3, 2)]), Some(1));
        // Steady state of 16 in flight over 1 + 7 instances: about 2 per instance each side.
        let (mut here, mut there) = (0usize, 0usize);
        for _ in 0..16 {
            match least_loaded(here, 1, &[(there, 7)]) {
                None => here += 1,
                Some(_) => there += 1,
            }
        }
        assert_eq!((here, there), (2, 14));
    }

    #[test]
    fn peer_flags_parse() {
        let p = parse_peer("b=10.0.0.2:8080,10.0.0.2:7070").unwrap();
        assert_eq!(p.name, "b");
        assert_eq!(p.http.to_string(), "10.0.0.2:8080");
        assert_eq!(p.control.to_string(), "10.0.0.2:7070");
        for bad in [
            "b",
            "b=10.0.0.2:8080",
            "=1.2.3.4:1,1.2.3.4:2",
            "B C=1.2.3.4:1,1.2.3.4:2",
            "b=x,y",
        ] {
            assert!(parse_peer(bad).is_err(), "{bad}");
        }
    }
}
