//! The userspace dataplane: per-chain arena, the table of requests in flight, and the router
//! that moves descriptors between worker sockets.
//!
//! Every worker instance has one loopback TCP connection to the gateway. A descriptor a worker
//! sends comes back here; the router checks it against the request it claims to belong to
//! (request id, chain, slot, generation, and the instance that holds it), then either forwards
//! it to an instance of the next function or completes the request. This is the path the
//! sk_msg/sockmap dataplane replaces, with the same sockets and the same 32-byte messages.
//!
//! With the kernel dataplane ([`KernelRoute`]), function-to-function hops never reach the
//! router: it sees the first send and the final return. Where a request is held is then read
//! from the eBPF program's holder record for its slot (written on every redirect, the
//! gateway's own first sends included); a returning descriptor must come from that holder.
//!
//! Waiting: a request whose next function has no instance that can take it (none is up yet,
//! the function scaled to zero, or every queue is full) waits in that function's FIFO wait
//! queue, bounded by the function's `wait_queue` and the chain's deadline, as Knative's
//! activator buffers requests for a revision with no ready pod. It is sent on the moment an
//! instance comes up or makes room ([`ChainRuntime::dispatch_waiting`]); the kernel
//! dataplane's give-backs for a function with no ready instance (`Undeliverable`) wait too.
//! A waiting request is held by no instance, so no instance's death fails it.
//!
//! Slot ownership: the `Pending` entry owns the request's slot through a [`SlotGuard`], and the
//! guard releases it on drop. Whoever removes the entry from the table owns the slot from then
//! on; if the HTTP handler is gone (timeout, client disconnect), the guard is dropped with the
//! undelivered completion. A slot is therefore released exactly once, and never while a worker
//! may still write to it: entries are removed only when the descriptor came back or the process
//! holding it has exited.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use chain_runtime::plan::ChainPlan;
use chain_runtime::stats::{StatsError, StatsPage};
use crossbeam_utils::CachePadded;
use hyper::StatusCode;
use proto::worker::is_control;
use proto::{Descriptor, GATEWAY_FN, Status};
use shm::{Arena, ArenaError, SlotClass, SlotRef};
use sockmap_bpf::{HolderRecord, KernelDataplane};
use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::queue::{INSTANCE_QUEUE_CAPACITY, InstanceQueue, PushError};

/// Descriptors written per syscall at most when several are queued for one instance.
pub const WRITE_BATCH: usize = 64;

/// A slot allocated for one request, released when dropped.
pub struct SlotGuard {
    arena: Arc<Arena>,
    slot: SlotRef,
    request_id: u64,
}

impl SlotGuard {
    /// Allocates a slot of `arena` for a new request: the request's id is chosen here so
    /// that the arena records it with the slot, and workers refuse descriptors naming the
    /// slot under any other id.
    pub fn alloc(arena: &Arc<Arena>) -> Result<Self, ArenaError> {
        Self::alloc_in(arena, SlotClass::Small)
    }

    /// [`SlotGuard::alloc`] from the arena's slots of `class`.
    pub fn alloc_in(arena: &Arc<Arena>, class: SlotClass) -> Result<Self, ArenaError> {
        let request_id = REQUEST_IDS.fetch_add(1, Ordering::Relaxed);
        let slot = arena.alloc_in(class, request_id)?;
        Ok(SlotGuard {
            arena: Arc::clone(arena),
            slot,
            request_id,
        })
    }

    pub fn slot(&self) -> SlotRef {
        self.slot
    }

    /// The request the slot was allocated for.
    pub fn request_id(&self) -> u64 {
        self.request_id
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Err(e) = self.arena.release(self.slot) {
            // Only reachable through a bug in ownership tracking: say so loudly.
            tracing::error!("releasing slot {}: {e}", self.slot.index);
        }
    }
}

/// How a request in flight ended.
pub enum Completion {
    /// The chain's last function (or a failing one) sent the descriptor back.
    Returned { desc: Descriptor, slot: SlotGuard },
    /// The gateway failed the request (the instance holding it died, no instance was up, the
    /// descriptor named a function outside the chain). The slot was already released.
    Failed { code: StatusCode, message: String },
}

/// One instance incarnation: which stage, which instance, which start of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Holder {
    pub stage: usize,
    pub instance: usize,
    pub incarnation: u64,
}

/// Where a request in flight is.
#[derive(Clone, Copy, Debug)]
enum At {
    /// Sent to (or, with the kernel dataplane, last routed through) this instance.
    Instance(Holder),
    /// In the wait queue of this stage, with the descriptor to send once an instance can
    /// take it.
    Waiting {
        stage: usize,
        desc: Descriptor,
        since: Instant,
    },
}

struct Pending {
    slot: SlotGuard,
    at: At,
    /// The `hop` of the descriptor last sent out: the reply must carry `hop + 1`.
    hop: u8,
    /// The chain's deadline for this request: a waiting request is failed at it.
    deadline: Instant,
    responder: oneshot::Sender<Completion>,
}

/// The requests in flight, and the wait queue of each stage (request ids, oldest first).
/// Every change of where a request is goes through here, so the per-stage load counts the
/// autoscaler reads stay exact.
struct Table {
    requests: HashMap<u64, Pending>,
    waiting: Vec<VecDeque<u64>>,
    /// No waiting request's deadline is earlier than this (None: nothing waits).
    earliest: Option<Instant>,
}

impl Table {
    fn count(load: &[StageLoad], at: &At, delta: isize) {
        let bump = |counter: &AtomicUsize| {
            if delta > 0 {
                counter.fetch_add(1, Ordering::Relaxed);
            } else {
                counter.fetch_sub(1, Ordering::Relaxed);
            }
        };
        match at {
            At::Instance(h) => {
                bump(&load[h.stage].instance_held[h.instance]);
            }
            At::Waiting { stage, .. } => bump(&load[*stage].waiting),
        }
    }

    fn insert(&mut self, load: &[StageLoad], id: u64, p: Pending) {
        Self::count(load, &p.at, 1);
        if let At::Waiting { stage, .. } = p.at {
            self.waiting[stage].push_back(id);
            self.note_deadline(p.deadline);
        }
        if let Some(old) = self.requests.insert(id, p) {
            // Request ids are never reused; keep the counts right regardless.
            Self::count(load, &old.at, -1);
        }
    }

    fn remove(&mut self, load: &[StageLoad], id: u64) -> Option<Pending> {
        let p = self.requests.remove(&id)?;
        Self::count(load, &p.at, -1);
        if let At::Waiting { stage, .. } = p.at {
            self.waiting[stage].retain(|&w| w != id);
        }
        Some(p)
    }

    /// Moves request `id` to `at` (the caller keeps the wait queues in step).
    fn move_to(&mut self, load: &[StageLoad], id: u64, at: At) -> Option<&mut Pending> {
        let p = self.requests.get_mut(&id)?;
        Self::count(load, &p.at, -1);
        Self::count(load, &at, 1);
        p.at = at;
        if matches!(at, At::Waiting { .. }) {
            let deadline = p.deadline;
            self.note_deadline(deadline);
        }
        self.requests.get_mut(&id)
    }

    fn note_deadline(&mut self, deadline: Instant) {
        self.earliest = Some(self.earliest.map_or(deadline, |e| e.min(deadline)));
    }
}

/// Bounds of the wait-time histogram, in seconds.
pub const WAIT_BUCKETS: [f64; 8] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.25, 1.0];

/// How busy one stage is and what its wait queue did: read by the autoscaler on every tick
/// and by the metrics page. The load gauges are changed only under the table lock.
pub struct StageLoad {
    /// Requests held by each instance slot (queued in the gateway for it, in its socket or
    /// running). With the kernel dataplane, hops between functions are not seen: a request
    /// counts for the instance the gateway last sent it to.
    pub instance_held: Vec<AtomicUsize>,
    /// Requests in this stage's wait queue.
    pub waiting: AtomicUsize,
    /// Requests that waited and were then sent to an instance.
    pub waited: AtomicU64,
    /// Their waits, summed, in nanoseconds, and by [`WAIT_BUCKETS`] (non-cumulative, the
    /// last entry above every bound).
    pub wait_ns: AtomicU64,
    pub wait_buckets: [AtomicU64; WAIT_BUCKETS.len() + 1],
    /// Requests failed at the chain's deadline while waiting.
    pub wait_expired: AtomicU64,
    /// Requests turned away because the wait queue was full (`wait_queue`).
    pub wait_refused: AtomicU64,
}

impl StageLoad {
    /// Requests held by the stage's instances: the sum over its slots.
    pub fn held(&self) -> usize {
        self.instance_held
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum()
    }

    fn new(instances: usize) -> Self {
        StageLoad {
            instance_held: (0..instances).map(|_| AtomicUsize::new(0)).collect(),
            waiting: AtomicUsize::new(0),
            waited: AtomicU64::new(0),
            wait_ns: AtomicU64::new(0),
            wait_buckets: Default::default(),
            wait_expired: AtomicU64::new(0),
            wait_refused: AtomicU64::new(0),
        }
    }

    fn record_wait(&self, waited: std::time::Duration) {
        self.waited.fetch_add(1, Ordering::Relaxed);
        self.wait_ns
            .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
        let secs = waited.as_secs_f64();
        let bucket = WAIT_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(WAIT_BUCKETS.len());
        self.wait_buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }
}

/// A live instance's outbound queue (`None` while the instance is down), its current process,
/// and its statistics page, which outlives restarts.
pub struct InstanceLink {
    queue: Mutex<Option<(u64, Arc<InstanceQueue>)>>,
    /// Set while the instance drains before it stops (scale-down, reload): nothing new is
    /// sent to it.
    retiring: std::sync::atomic::AtomicBool,
    /// Wakes the instance's supervisor to kill it: incarnation `overdue_incarnation` holds a
    /// request past its chain's deadline and grace ([`ChainRuntime::reap_overdue`]).
    pub overdue: Notify,
    pub overdue_incarnation: AtomicU64,
    /// Process id of the running incarnation, 0 while down.
    pub pid: AtomicU32,
    pub stats: StatsPage,
    pub stats_fd: OwnedFd,
}

impl InstanceLink {
    /// Whether the instance is up and takes new requests (not retiring).
    pub fn is_serving(&self) -> bool {
        !self.retiring.load(Ordering::Relaxed) && self.queue.lock().expect("link lock").is_some()
    }
}

pub struct StageRuntime {
    pub fn_id: u32,
    pub name: String,
    pub instances: Vec<InstanceLink>,
    /// Bumped by every pick, from any runtime thread: kept off the lines of colder fields.
    round_robin: CachePadded<AtomicUsize>,
    /// Instances that died other than by the watchdog.
    pub crashes: AtomicU64,
    /// Instances the watchdog ended for overrunning `timeout_ms`.
    pub watchdog_timeouts: AtomicU64,
    /// Instances killed for holding a request past its chain's deadline and grace.
    pub overdue_kills: AtomicU64,
    /// Process id of the function's zygote while it runs, 0 otherwise (and for functions
    /// started by exec).
    pub zygote_pid: AtomicU32,
    /// Zygotes of this function up now, each holding a warm image (two during a reload).
    pub zygotes_up: AtomicU32,
    /// The function's per-call `timeout_ms` as its instances run it now (a reload may
    /// change it), for the gateway's messages.
    pub timeout_ms: AtomicU64,
    /// Requests that may wait for an instance of this stage (`wait_queue`).
    pub wait_queue: usize,
    /// Requests one instance may hold before the rest wait (`instances.concurrency` of an
    /// autoscaled function; unbounded, but for the instance queue, otherwise).
    pub instance_limit: usize,
    /// Wakes the stage's autoscaler at once when a request starts waiting, so scaling from
    /// zero does not wait for its next tick.
    pub activate: Notify,
}

pub struct ChainRuntime {
    pub plan: ChainPlan,
    pub arena: Arc<Arena>,
    pub stages: Vec<StageRuntime>,
    /// What the router did, for the metrics page to read.
    pub counters: RouterCounters,
    /// Set when the kernel dataplane routes this chain's hops.
    pub kernel: Option<KernelRoute>,
    /// Per stage, in stage order: load and wait-queue counts.
    pub load: Vec<StageLoad>,
    pending: Mutex<Table>,
    /// Wakes [`ChainRuntime::dispatch_waiting`]: an instance came up or made room, or a
    /// request started waiting.
    dispatch: Notify,
}

/// The kernel dataplane and where this chain's slots start in its holder table.
pub struct KernelRoute {
    pub dataplane: Arc<KernelDataplane>,
    pub slot_base: u32,
}

/// Why the router refused a descriptor from a worker; also the metric label.
#[derive(Debug, Clone, Copy)]
pub enum Refusal {
    UnknownRequest,
    WrongHolder,
    SlotMismatch,
    Malformed,
    WrongRoute,
    WorkerRefused,
    KernelRefused,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::UnknownRequest,
        Refusal::WrongHolder,
        Refusal::SlotMismatch,
        Refusal::Malformed,
        Refusal::WrongRoute,
        Refusal::WorkerRefused,
        Refusal::KernelRefused,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::UnknownRequest => "unknown_request",
            Refusal::WrongHolder => "wrong_holder",
            Refusal::SlotMismatch => "slot_mismatch",
            Refusal::Malformed => "malformed",
            Refusal::WrongRoute => "wrong_route",
            Refusal::KernelRefused => "refused_by_kernel",
            Refusal::WorkerRefused => "refused_by_worker",
        }
    }
}

/// Counts of what the router did with descriptors, per chain. Written on the router's path,
/// read when the metrics page is scraped.
#[derive(Default)]
pub struct RouterCounters {
    /// Descriptors forwarded from one function to the next (userspace routing): bumped on
    /// every hop by whichever thread read it, so it gets a cache line of its own.
    pub forwarded: CachePadded<AtomicU64>,
    /// Descriptors refused, indexed like [`Refusal::ALL`].
    refused: [AtomicU64; Refusal::ALL.len()],
}

impl RouterCounters {
    fn refuse(&self, reason: Refusal) {
        self.refused[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// How many descriptors were refused for `reason`.
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refused[reason as usize].load(Ordering::Relaxed)
    }
}

/// Instance slots of a function (statistics pages, kernel map entries): its `max`, plus one
/// so a reload can start a new instance before an old one retires (none beyond the kernel's
/// per-function limit).
pub fn instance_slots(function: &chain_runtime::config::FunctionSpec) -> u32 {
    (function.instances.max + 1).min(sockmap_bpf::MAX_INSTANCES)
}

/// How long past its chain's deadline a request may still be held before its holder is
/// killed: room for a worker that is finishing (the client was answered at the deadline).
pub const OVERDUE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);
/// How often held requests are checked against their deadlines.
const REAP_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Bumped by every request on every runtime thread: a cache line of its own.
static REQUEST_IDS: CachePadded<AtomicU64> = CachePadded::new(AtomicU64::new(1));

impl ChainRuntime {
    pub fn new(
        plan: ChainPlan,
        arena: Arc<Arena>,
        kernel: Option<KernelRoute>,
    ) -> Result<Self, StatsError> {
        let mut stages = Vec::with_capacity(plan.stages.len());
        for s in &plan.stages {
            let mut instances = Vec::new();
            for i in 0..instance_slots(&s.function) {
                let (stats, stats_fd) =
                    StatsPage::create(&format!("spindle-stats-{}-{i}", s.function.name))?;
                instances.push(InstanceLink {
                    queue: Mutex::new(None),
                    retiring: std::sync::atomic::AtomicBool::new(false),
                    overdue: Notify::new(),
                    overdue_incarnation: AtomicU64::new(0),
                    pid: AtomicU32::new(0),
                    stats,
                    stats_fd,
                });
            }
            stages.push(StageRuntime {
                fn_id: s.fn_id,
                name: s.function.name.clone(),
                instances,
                round_robin: CachePadded::new(AtomicUsize::new(0)),
                crashes: AtomicU64::new(0),
                watchdog_timeouts: AtomicU64::new(0),
                overdue_kills: AtomicU64::new(0),
                zygote_pid: AtomicU32::new(0),
                zygotes_up: AtomicU32::new(0),
                timeout_ms: AtomicU64::new(s.function.timeout.as_millis() as u64),
                wait_queue: s.function.wait_queue as usize,
                instance_limit: s
                    .function
                    .instances
                    .autoscale
                    .map_or(usize::MAX, |a| a.concurrency as usize),
                activate: Notify::new(),
            });
        }
        let load = plan
            .stages
            .iter()
            .map(|s| StageLoad::new(instance_slots(&s.function) as usize))
            .collect();
        let waiting = plan.stages.iter().map(|_| VecDeque::new()).collect();
        Ok(ChainRuntime {
            plan,
            arena,
            stages,
            counters: RouterCounters::default(),
            kernel,
            load,
            pending: Mutex::new(Table {
                requests: HashMap::new(),
                waiting,
                earliest: None,
            }),
            dispatch: Notify::new(),
        })
    }

    /// The kernel's record of where the request in slot `slot` was last sent, read outside
    /// the pending lock (it is a syscall). None in userspace mode or for a bad slot index.
    fn kernel_record(&self, slot: u32) -> Option<HolderRecord> {
        let k = self.kernel.as_ref()?;
        if slot >= self.arena.slot_count() {
            return None;
        }
        k.dataplane.holder(k.slot_base + slot).ok()
    }

    /// Whether the request in `p` is held by `holder`: the kernel's record of the last
    /// redirect when it names this request, else the instance the router last sent it to.
    fn held_by(
        &self,
        request_id: u64,
        p: &Pending,
        record: Option<HolderRecord>,
        holder: Holder,
    ) -> bool {
        let At::Instance(at) = p.at else {
            // Waiting: no instance holds it (the kernel's record names where it came from).
            return false;
        };
        match record {
            Some(rec) if rec.request_id == request_id => {
                self.stage_index(rec.fn_id()) == Some(holder.stage)
                    && rec.instance() as usize == holder.instance
            }
            _ => at == holder,
        }
    }

    /// The hop count a returning descriptor must carry. A refusal is taken at any hop: the
    /// refusing side did not run the function, and the request ends either way.
    fn hop_ok(&self, p: &Pending, desc: &Descriptor) -> bool {
        if desc.status == Status::Refused as u8 {
            return true;
        }
        match self.kernel {
            None => desc.hop == p.hop.wrapping_add(1),
            // Kernel hops are not seen here: the count only has to have advanced, within bounds.
            Some(_) => desc.hop > p.hop && desc.hop <= self.plan.max_hops(),
        }
    }

    /// Turns a descriptor the kernel gave back (it could not deliver it) into a failure.
    fn kernel_failure(&self, from: Holder, desc: &Descriptor) -> Option<(StatusCode, String)> {
        self.kernel.as_ref()?;
        let sender = &self.stages[from.stage].name;
        let target = self.stage_index(desc.next_fn).map_or_else(
            || format!("function id {}", desc.next_fn),
            |s| format!("function {}", self.stages[s].name),
        );
        match desc.status().ok()? {
            Status::Undeliverable => Some((
                StatusCode::BAD_GATEWAY,
                format!("{target} has no live instance to take the request from function {sender}"),
            )),
            Status::BadRoute if desc.len == 0 => Some((
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "function {sender} sent the request to {target}, which is not part of chain {}",
                    self.plan.spec.name
                ),
            )),
            Status::Refused if desc.len == 0 => Some((
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "the kernel dataplane refused a descriptor from function {sender} (wrong chain or status, or a request it does not hold)"
                ),
            )),
            _ => None,
        }
    }

    fn stage_index(&self, fn_id: u32) -> Option<usize> {
        self.stages.iter().position(|s| s.fn_id == fn_id)
    }

    pub fn in_flight(&self) -> usize {
        self.pending.lock().expect("pending lock").requests.len()
    }

    /// The kernel's holder record of every request in flight (none in userspace mode). They
    /// are syscalls: read without holding the table lock.
    fn kernel_records(&self) -> HashMap<u64, HolderRecord> {
        if self.kernel.is_none() {
            return HashMap::new();
        }
        let candidates: Vec<(u64, u32)> = {
            let table = self.pending.lock().expect("pending lock");
            table
                .requests
                .iter()
                .map(|(id, p)| (*id, p.slot.slot().index))
                .collect()
        };
        candidates
            .iter()
            .filter_map(|&(id, slot)| Some((id, self.kernel_record(slot)?)))
            .collect()
    }

    /// Requests held by the instance incarnation `holder` (for a retiring instance to wait
    /// until it holds none).
    pub fn held_by_count(&self, holder: Holder) -> usize {
        if self.kernel.is_none() {
            // The router sees every hop: the count kept per slot is exact (an earlier
            // incarnation's requests were failed before this one started).
            return self.load[holder.stage].instance_held[holder.instance].load(Ordering::Relaxed);
        }
        let records = self.kernel_records();
        let table = self.pending.lock().expect("pending lock");
        table
            .requests
            .iter()
            .filter(|(id, p)| self.held_by(**id, p, records.get(*id).copied(), holder))
            .count()
    }

    /// Marks an instance incarnation up: descriptors for its stage may now go to `queue`.
    pub fn instance_up(
        &self,
        stage: usize,
        instance: usize,
        incarnation: u64,
        queue: Arc<InstanceQueue>,
    ) {
        *self.stages[stage].instances[instance]
            .queue
            .lock()
            .expect("link lock") = Some((incarnation, queue));
        // Requests waiting for this stage can go now.
        self.dispatch.notify_one();
    }

    /// Marks an instance down and stops its writer; what it still had queued is failed by
    /// [`ChainRuntime::fail_held_by`] with the rest of what it held.
    pub fn instance_down(&self, stage: usize, instance: usize) {
        let link = self.stages[stage].instances[instance]
            .queue
            .lock()
            .expect("link lock")
            .take();
        if let Some((_, queue)) = link {
            queue.close();
        }
        self.stages[stage].instances[instance]
            .retiring
            .store(false, Ordering::Relaxed);
    }

    /// Sends nothing new to `instance` (it is draining to stop). With the kernel dataplane,
    /// its socket is also taken out of the program's choice of instances.
    pub fn retire(&self, stage: usize, instance: usize) {
        self.stages[stage].instances[instance]
            .retiring
            .store(true, Ordering::Relaxed);
    }

    pub fn live_instances(&self, stage: usize) -> usize {
        self.stages[stage]
            .instances
            .iter()
            .filter(|l| l.queue.lock().expect("link lock").is_some())
            .count()
    }

    /// Live instances of `stage` that take new requests (not retiring).
    pub fn serving_instances(&self, stage: usize) -> usize {
        self.stages[stage]
            .instances
            .iter()
            .filter(|l| {
                !l.retiring.load(Ordering::Relaxed) && l.queue.lock().expect("link lock").is_some()
            })
            .count()
    }

    /// Picks a live instance of `stage` with room in its queue, round-robin. Called with the
    /// pending lock held, and every push happens under that lock too, so the room seen here
    /// is still there when the caller pushes. If the instance dies before the push, the push
    /// fails (`Closed`); if after, its supervisor fails the request by holder, because
    /// `fail_held_by` runs only after the instance was marked down.
    fn pick(&self, stage: usize) -> Result<(Holder, Arc<InstanceQueue>), PushError> {
        let st = &self.stages[stage];
        let n = st.instances.len();
        let start = st.round_robin.fetch_add(1, Ordering::Relaxed);
        let mut any_live = false;
        for k in 0..n {
            let instance = (start + k) % n;
            if st.instances[instance].retiring.load(Ordering::Relaxed) {
                continue;
            }
            let link = st.instances[instance].queue.lock().expect("link lock");
            // A closed queue's writer is gone even if its supervisor has not noticed yet.
            let Some((incarnation, queue)) = link.as_ref().filter(|(_, q)| !q.is_closed()) else {
                continue;
            };
            any_live = true;
            if queue.is_full()
                || self.load[stage].instance_held[instance].load(Ordering::Relaxed)
                    >= st.instance_limit
            {
                continue;
            }
            let holder = Holder {
                stage,
                instance,
                incarnation: *incarnation,
            };
            if k > 0 {
                // Slots were skipped (empty, retiring, full): the next pick starts after this
                // one, so live instances still take turns however many slots are empty.
                st.round_robin.store(instance + 1, Ordering::Relaxed);
            }
            return Ok((holder, Arc::clone(queue)));
        }
        Err(if any_live {
            PushError::Full
        } else {
            PushError::Closed
        })
    }

    /// The answer for a request that can neither be sent nor wait: the wait queue is full.
    fn overloaded(&self, stage: usize) -> (StatusCode, String) {
        let st = &self.stages[stage];
        self.load[stage]
            .wait_refused
            .fetch_add(1, Ordering::Relaxed);
        // Turned-away requests are demand too: the autoscaler counts them.
        st.activate.notify_one();
        let message = if self.live_instances(stage) == 0 {
            format!(
                "function {} has no ready instance and {} requests already wait for one \
                 (wait_queue); retry shortly",
                st.name, st.wait_queue
            )
        } else {
            let each = if st.instance_limit < INSTANCE_QUEUE_CAPACITY {
                format!("{} (instances.concurrency)", st.instance_limit)
            } else {
                INSTANCE_QUEUE_CAPACITY.to_string()
            };
            format!(
                "function {} is overloaded: every instance holds {each} requests and {} more \
                 wait (wait_queue); retry shortly",
                st.name, st.wait_queue
            )
        };
        (StatusCode::SERVICE_UNAVAILABLE, message)
    }

    /// Sends `desc` to an instance of `stage`, or puts it in the stage's wait queue. The
    /// request's entry is `id` in `table` (inserted by the caller, or about to be when
    /// `entry` is given). Err when it could do neither: the caller fails the request.
    fn send_or_wait(
        &self,
        table: &mut Table,
        stage: usize,
        desc: Descriptor,
        mut new_entry: Option<Pending>,
    ) -> Result<(), Option<Pending>> {
        let id = desc.request_id;
        let was_new = new_entry.is_some();
        // Behind requests already waiting: first come, first served.
        if table.waiting[stage].is_empty()
            && let Ok((holder, queue)) = self.pick(stage)
        {
            let at = At::Instance(holder);
            let p = match new_entry.take() {
                Some(mut p) => {
                    p.at = at;
                    table.insert(&self.load, id, p);
                    table.requests.get_mut(&id).expect("just inserted")
                }
                None => table
                    .move_to(&self.load, id, at)
                    .expect("the caller's entry"),
            };
            p.hop = desc.hop;
            self.record_kernel_holder(holder, &desc);
            // Room was seen under this lock, and pushes happen only under it: this push
            // fails only if the instance's writer closed the queue meanwhile.
            if queue.push(desc).is_ok() {
                return Ok(());
            }
        }
        if table.waiting[stage].len() >= self.stages[stage].wait_queue {
            return Err(if was_new {
                new_entry.or_else(|| table.remove(&self.load, id))
            } else {
                None
            });
        }
        let at = At::Waiting {
            stage,
            desc,
            since: Instant::now(),
        };
        match new_entry {
            Some(mut p) => {
                p.at = at;
                table.insert(&self.load, id, p);
            }
            None => {
                table
                    .move_to(&self.load, id, at)
                    .expect("the caller's entry");
                table.waiting[stage].push_back(id);
            }
        }
        self.stages[stage].activate.notify_one();
        self.dispatch.notify_one();
        Ok(())
    }

    /// With the kernel dataplane, records that the gateway sent this hop to `holder`
    /// (held_by prefers the kernel's record, which still names the previous hop).
    fn record_kernel_holder(&self, holder: Holder, desc: &Descriptor) {
        if let Some(k) = &self.kernel {
            let fn_id = self.stages[holder.stage].fn_id;
            let record = HolderRecord::new(desc.request_id, fn_id, holder.instance as u32);
            if let Err(e) = k.dataplane.set_holder(k.slot_base + desc.slot, record) {
                tracing::error!("recording a gateway send in the kernel's holder table: {e}");
            }
        }
    }

    /// Starts a request whose body is already in `slot`: sends its descriptor to the chain's
    /// first function, or queues it until an instance can take it. Returns the receiver that
    /// will hold the completion.
    pub fn start(
        &self,
        slot: SlotGuard,
        len: u32,
        deadline: Instant,
    ) -> Result<oneshot::Receiver<Completion>, (StatusCode, String)> {
        let request_id = slot.request_id();
        let desc = Descriptor {
            next_fn: self.plan.first_fn(),
            chain: self.plan.id,
            hop: 0,
            status: Status::Ok as u8,
            request_id,
            slot: slot.slot().index,
            generation: slot.slot().generation,
            len,
            reserved: 0,
        };
        let (tx, rx) = oneshot::channel();
        let entry = Pending {
            slot,
            // Replaced by send_or_wait before the entry is visible.
            at: At::Waiting {
                stage: 0,
                desc,
                since: Instant::now(),
            },
            hop: 0,
            deadline,
            responder: tx,
        };
        let mut table = self.pending.lock().expect("pending lock");
        match self.send_or_wait(&mut table, 0, desc, Some(entry)) {
            Ok(()) => Ok(rx),
            Err(unsent) => {
                drop(table);
                // Its slot is released here, after the lock.
                drop(unsent);
                Err(self.overloaded(0))
            }
        }
    }

    /// Handles one descriptor a worker sent. `from` is the instance that sent it.
    pub fn on_descriptor(&self, from: Holder, desc: Descriptor) {
        self.route(from, desc);
        // What `from` held just left it (or moved on): a request waiting for an instance
        // with room may go now.
        self.room_made();
    }

    fn route(&self, from: Holder, mut desc: Descriptor) {
        let record = self.kernel_record(desc.slot);
        let mut table = self.pending.lock().expect("pending lock");
        let Some(p) = table.requests.get(&desc.request_id) else {
            drop(table);
            return self.refuse(from, &desc, Refusal::UnknownRequest);
        };
        // Only the instance holding a request may return it (the kernel's give-backs come from
        // the sender, which its record names).
        let refusal = if !self.held_by(desc.request_id, p, record, from) {
            Some(Refusal::WrongHolder)
        } else if p.slot.slot().index != desc.slot
            || p.slot.slot().generation != desc.generation
            || desc.chain != self.plan.id
        {
            Some(Refusal::SlotMismatch)
        } else if desc.len > self.arena.capacity(desc.slot)
            || desc.reserved != 0
            || desc.status().is_err()
            || !self.hop_ok(p, &desc)
        {
            Some(Refusal::Malformed)
        } else {
            None
        };
        if let Some(reason) = refusal {
            drop(table);
            return self.refuse(from, &desc, reason);
        }
        let status = desc.status().expect("checked above");
        if status == Status::Undeliverable
            && self.kernel.is_some()
            && let Some(stage) = self.stage_index(desc.next_fn)
            && !p.responder.is_closed()
        {
            // The kernel found no ready instance of the next function: the request waits
            // for one here, as a request arriving over HTTP would.
            desc.status = Status::Ok as u8;
            if self.send_or_wait(&mut table, stage, desc, None).is_err() {
                self.fail_overloaded(table, desc.request_id, stage);
            }
            return;
        }
        if let Some((code, message)) = self.kernel_failure(from, &desc) {
            if status == Status::Refused {
                self.counters.refuse(Refusal::KernelRefused);
            }
            let p = table
                .remove(&self.load, desc.request_id)
                .expect("present above");
            drop(table);
            drop(p.slot);
            let _ = p.responder.send(Completion::Failed { code, message });
            return;
        }
        if status == Status::Refused {
            // The worker refused what we sent it: a gateway-side inconsistency.
            self.counters.refuse(Refusal::WorkerRefused);
        }
        let finished = status != Status::Ok || desc.next_fn == GATEWAY_FN;
        if finished || p.responder.is_closed() {
            // Done, or nobody waits any more (timed out, client gone): no worker holds the
            // descriptor now, so the request ends here and its slot is released.
            let p = table
                .remove(&self.load, desc.request_id)
                .expect("present above");
            drop(table);
            if finished {
                let _ = p
                    .responder
                    .send(Completion::Returned { desc, slot: p.slot });
            }
            return;
        }
        let from_fn = self.stages[from.stage].fn_id;
        let route_error = match self.stage_index(desc.next_fn) {
            None => Some(format!(
                "function {} sent the request to function id {}, which is not part of chain {}",
                self.stages[from.stage].name, desc.next_fn, self.plan.spec.name
            )),
            Some(_)
                if !self.plan.is_dynamic()
                    && self.plan.static_next(from_fn) != Some(desc.next_fn) =>
            {
                Some(format!(
                    "function {} sent the request out of step order (to function id {})",
                    self.stages[from.stage].name, desc.next_fn
                ))
            }
            Some(_) if desc.hop >= self.plan.max_hops() => Some(format!(
                "request passed through {} functions, the chain's max_hops",
                desc.hop
            )),
            Some(_) => None,
        };
        if let Some(message) = route_error {
            self.counters.refuse(Refusal::WrongRoute);
            let p = table
                .remove(&self.load, desc.request_id)
                .expect("present above");
            drop(table);
            drop(p.slot);
            let _ = p.responder.send(Completion::Failed {
                code: StatusCode::INTERNAL_SERVER_ERROR,
                message,
            });
            return;
        }
        let stage = self.stage_index(desc.next_fn).expect("checked above");
        if self.send_or_wait(&mut table, stage, desc, None).is_err() {
            return self.fail_overloaded(table, desc.request_id, stage);
        }
        drop(table);
        self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
    }

    /// Ends request `id`, which could neither be sent to `stage` nor wait for it: no worker
    /// holds its descriptor, so its slot is released here (after the lock).
    fn fail_overloaded(&self, mut table: std::sync::MutexGuard<'_, Table>, id: u64, stage: usize) {
        let p = table.remove(&self.load, id).expect("the caller's entry");
        drop(table);
        drop(p.slot);
        let (code, message) = self.overloaded(stage);
        let _ = p.responder.send(Completion::Failed { code, message });
    }

    fn refuse(&self, from: Holder, desc: &Descriptor, reason: Refusal) {
        self.counters.refuse(reason);
        tracing::warn!(
            chain = %self.plan.spec.name,
            function = %self.stages[from.stage].name,
            instance = from.instance,
            request = desc.request_id,
            reason = reason.label(),
            "refused descriptor from worker"
        );
    }

    /// Fails every request held by an instance incarnation that exited. Called only after the
    /// process is gone and its socket drained, so no worker can touch these slots any more.
    pub fn fail_held_by(&self, holder: Holder, code: StatusCode, message: &str) -> usize {
        let records = self.kernel_records();
        let lost: Vec<Pending> = {
            let mut table = self.pending.lock().expect("pending lock");
            let ids: Vec<u64> = table
                .requests
                .iter()
                .filter(|(id, p)| self.held_by(**id, p, records.get(*id).copied(), holder))
                .map(|(id, _)| *id)
                .collect();
            ids.iter()
                .filter_map(|id| table.remove(&self.load, *id))
                .collect()
        };
        let n = lost.len();
        for p in lost {
            drop(p.slot);
            let _ = p.responder.send(Completion::Failed {
                code,
                message: message.to_string(),
            });
        }
        self.room_made();
        n
    }

    /// The instances holding a request whose chain deadline passed more than `grace` ago.
    /// The client was answered 504 at the deadline; the slot stays the request's until the
    /// holder returns it or is gone.
    fn overdue_holders(&self, now: Instant, grace: std::time::Duration) -> Vec<Holder> {
        let overdue: Vec<(u64, u32, Holder)> = {
            let table = self.pending.lock().expect("pending lock");
            table
                .requests
                .iter()
                .filter(|(_, p)| p.deadline + grace <= now)
                .filter_map(|(id, p)| match p.at {
                    At::Instance(h) => Some((*id, p.slot.slot().index, h)),
                    At::Waiting { .. } => None,
                })
                .collect()
        };
        let mut holders: Vec<Holder> = overdue
            .into_iter()
            .filter_map(|(id, slot, gateway_sent)| {
                // With the kernel dataplane the request may have moved on since the gateway
                // sent it: its holder record says where it is.
                match self.kernel_record(slot) {
                    Some(rec) if rec.request_id == id => {
                        let stage = self.stage_index(rec.fn_id())?;
                        let instance = rec.instance() as usize;
                        let link = self.stages[stage].instances.get(instance)?;
                        let incarnation = link.queue.lock().expect("link lock").as_ref()?.0;
                        Some(Holder {
                            stage,
                            instance,
                            incarnation,
                        })
                    }
                    _ => Some(gateway_sent),
                }
            })
            .collect();
        holders.sort_by_key(|h| (h.stage, h.instance, h.incarnation));
        holders.dedup();
        holders
    }

    /// Runs for the gateway's life: every [`REAP_EVERY`], asks the supervisor of every
    /// instance that holds a request past its chain's deadline + [`OVERDUE_GRACE`] to kill
    /// it (a worker that stopped, or hung in a host call). Its replacement forks at once;
    /// what it held is failed and its slots released once it is gone.
    pub async fn reap_overdue(self: Arc<Self>) {
        let mut tick = tokio::time::interval(REAP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for h in self.overdue_holders(Instant::now(), OVERDUE_GRACE) {
                let link = &self.stages[h.stage].instances[h.instance];
                link.overdue_incarnation
                    .store(h.incarnation, Ordering::Relaxed);
                link.overdue.notify_one();
            }
        }
    }

    /// Wakes the wait-queue dispatcher if anything waits (an instance made room).
    pub fn room_made(&self) {
        if self
            .load
            .iter()
            .any(|l| l.waiting.load(Ordering::Relaxed) > 0)
        {
            self.dispatch.notify_one();
        }
    }

    /// Sends waiting requests to instances that can take them, in arrival order per stage,
    /// and fails those whose chain deadline passed (or whose client is gone) while waiting.
    /// Runs for the gateway's life; woken when an instance comes up or makes room, when a
    /// request starts waiting, and at the earliest deadline.
    pub async fn dispatch_waiting(self: Arc<Self>) {
        loop {
            let next_deadline = self.dispatch_once();
            match next_deadline {
                Some(at) => {
                    tokio::select! {
                        _ = self.dispatch.notified() => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => self.dispatch.notified().await,
            }
        }
    }

    /// One pass over the wait queues; returns the earliest deadline still waiting.
    fn dispatch_once(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut abandoned = Vec::new();
        let next_deadline = {
            let mut table = self.pending.lock().expect("pending lock");
            // Deadlines are not in queue order (a slow upload joins late with an early
            // deadline; a later function's queue is in arrival order at it): once the
            // earliest has passed, every queue is swept, not only its front.
            if table.earliest.is_some_and(|e| e <= now) {
                for stage in 0..self.stages.len() {
                    let gone: Vec<u64> = table.waiting[stage]
                        .iter()
                        .copied()
                        .filter(|id| table.requests[id].deadline <= now)
                        .collect();
                    for id in gone {
                        let p = table.remove(&self.load, id).expect("present");
                        self.load[stage]
                            .wait_expired
                            .fetch_add(1, Ordering::Relaxed);
                        expired.push((stage, p));
                    }
                }
            }
            for stage in 0..self.stages.len() {
                while let Some(&id) = table.waiting[stage].front() {
                    let p = table
                        .requests
                        .get(&id)
                        .expect("waiting entries are in the table");
                    let At::Waiting { desc, since, .. } = p.at else {
                        unreachable!("a waiting id's entry is waiting");
                    };
                    if p.responder.is_closed() {
                        // Nobody waits for the answer any more (the client left).
                        abandoned.extend(table.remove(&self.load, id));
                        continue;
                    }
                    let Ok((holder, queue)) = self.pick(stage) else {
                        break;
                    };
                    table.waiting[stage].pop_front();
                    if queue.push(desc).is_err() {
                        // Its writer closed between pick and push (pick skips it from now
                        // on): the request stays first in line.
                        table.waiting[stage].push_front(id);
                        continue;
                    }
                    let p = table
                        .move_to(&self.load, id, At::Instance(holder))
                        .expect("present");
                    p.hop = desc.hop;
                    self.record_kernel_holder(holder, &desc);
                    self.load[stage].record_wait(now.saturating_duration_since(since));
                }
            }
            let earliest = table
                .waiting
                .iter()
                .flatten()
                .map(|id| table.requests[id].deadline)
                .min();
            table.earliest = earliest;
            earliest
        };
        // Their slots are released outside the lock.
        drop(abandoned);
        for (stage, p) in expired {
            drop(p.slot);
            let waited = self.plan.spec.timeout.as_millis();
            let _ = p.responder.send(Completion::Failed {
                code: StatusCode::GATEWAY_TIMEOUT,
                message: format!(
                    "no instance of function {} was ready within chain {}'s {waited} ms",
                    self.stages[stage].name, self.plan.spec.name
                ),
            });
        }
        next_deadline
    }
}

/// Reads descriptors from one worker connection until it closes. The first message must be the
/// worker's ready announcement, reported through `ready`.
pub async fn read_worker(
    chain: Arc<ChainRuntime>,
    from: Holder,
    read: OwnedReadHalf,
    ready: oneshot::Sender<()>,
) {
    let mut reader = BufReader::with_capacity(WRITE_BATCH * Descriptor::SIZE, read);
    let mut buf = [0u8; Descriptor::SIZE];
    let mut ready = Some(ready);
    while reader.read_exact(&mut buf).await.is_ok() {
        let desc = Descriptor::from_bytes(&buf);
        if is_control(&desc) {
            if ready.is_some() && desc.slot == chain.stages[from.stage].fn_id {
                let _ = ready.take().expect("checked is_some").send(());
            } else {
                chain.refuse(from, &desc, Refusal::Malformed);
            }
            continue;
        }
        chain.on_descriptor(from, desc);
    }
}

/// Writes queued descriptors to one worker connection, batching what is queued, until the
/// queue is closed. Each batch written makes room: requests waiting for a full function may
/// go then.
pub async fn write_worker(
    chain: Arc<ChainRuntime>,
    write: OwnedWriteHalf,
    queue: Arc<InstanceQueue>,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH * Descriptor::SIZE);
    loop {
        batch.clear();
        if !queue.pop_batch(&mut batch, WRITE_BATCH).await {
            return;
        }
        chain.room_made();
        match write_descriptors(write.as_ref(), &batch, &queue).await {
            Ok(()) => {}
            // The instance went down while its socket took nothing: its supervisor fails what
            // it held. Returning drops this half, so the socket closes.
            Err(_) if queue.is_closed() => return,
            Err(e) => {
                // Later sends fail at once instead of filling a queue nobody drains, and the
                // instance's supervisor restarts it: a worker that is alive but unreachable
                // (its socket reset) would otherwise keep what it holds, and its slots,
                // forever.
                tracing::debug!("writing to a worker failed: {e}");
                queue.writer_failed();
                return;
            }
        }
    }
}

/// How many times in a row a write may fail as a redirect target's failure before it counts
/// as this connection's.
const REDIRECT_RETRIES: u32 = 200;
/// How long a write that would block waits for this socket to become writable before it
/// tries again (see [`write_descriptors`]).
const BLOCKED_RETRY: std::time::Duration = std::time::Duration::from_millis(1);

/// Writes `bytes` whole into a worker connection. On the kernel dataplane the sk_msg program
/// may redirect them into another instance's socket, and that socket's errors come back
/// here: EAGAIN while it is full — with no wakeup to follow on this socket, whose own buffer
/// never filled — and EPIPE or ENOMEM when it is going away. A write that would block
/// therefore waits for this socket to be writable or [`BLOCKED_RETRY`], whichever is first,
/// and tries again (timers run only while blocked); EPIPE and ENOMEM are retried with a fresh
/// verdict, as workers do, up to [`REDIRECT_RETRIES`] times in a row, so a connection that
/// really failed still fails. Gives up when `queue` is closed: the instance went down.
async fn write_descriptors(
    stream: &tokio::net::TcpStream,
    mut bytes: &[u8],
    queue: &InstanceQueue,
) -> std::io::Result<()> {
    let mut redirect_failures = 0;
    while !bytes.is_empty() {
        match stream.try_write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                bytes = &bytes[n..];
                redirect_failures = 0;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if queue.is_closed() {
                    return Err(e);
                }
                let _ = tokio::time::timeout(BLOCKED_RETRY, stream.writable()).await;
            }
            Err(e)
                if redirect_failures < REDIRECT_RETRIES
                    && matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ENOMEM)) =>
            {
                redirect_failures += 1;
                if queue.is_closed() {
                    return Err(e);
                }
                tokio::time::sleep(std::time::Duration::from_micros(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use chain_runtime::config::Config;
    use chain_runtime::plan::Plan;

    use super::*;

    /// A one-chain, one-function runtime with `instances` instances, none of them up.
    fn runtime(tag: &str, instances: u32) -> ChainRuntime {
        runtime_with(tag, instances, 256)
    }

    fn runtime_with(tag: &str, instances: u32, wait_queue: u32) -> ChainRuntime {
        runtime_yaml(tag, &instances.to_string(), wait_queue)
    }

    fn runtime_yaml(tag: &str, instances: &str, wait_queue: u32) -> ChainRuntime {
        let dir = std::env::temp_dir().join(format!("dataplane-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("f.wasm"), b"").unwrap();
        let yaml = format!(
            "functions:\n  - {{ name: f, module: f.wasm, instances: {instances}, \
             wait_queue: {wait_queue} }}\n\
             chains:\n  - {{ name: c, route: /c, steps: [f], arena: {{ slots: 16 }} }}\n"
        );
        let config = Config::parse(&yaml, &dir.join("spindle.yaml")).unwrap();
        let plan = Plan::new(&config).chains.remove(0);
        let arena = Arena::create(&format!("dataplane-test-{tag}"), 64 * 1024, 16).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        ChainRuntime::new(plan, Arc::new(arena), None).unwrap()
    }

    fn send(chain: &ChainRuntime) -> Result<oneshot::Receiver<Completion>, (StatusCode, String)> {
        send_by(chain, Instant::now() + std::time::Duration::from_secs(5))
    }

    fn send_by(
        chain: &ChainRuntime,
        deadline: Instant,
    ) -> Result<oneshot::Receiver<Completion>, (StatusCode, String)> {
        let slot = SlotGuard::alloc(&chain.arena).unwrap();
        chain.start(slot, 0, deadline)
    }

    #[test]
    fn a_full_instance_is_skipped_and_all_full_with_no_wait_queue_is_503_with_the_slot_released() {
        let chain = runtime_with("full", 2, 0);
        let queues = [
            Arc::new(InstanceQueue::new(1)),
            Arc::new(InstanceQueue::new(1)),
        ];
        for (i, q) in queues.iter().enumerate() {
            chain.instance_up(0, i, 1, Arc::clone(q));
        }
        let free = chain.arena.free_slots();
        let _first = send(&chain).expect("queued");
        let _second = send(&chain).expect("queued");
        assert!(
            queues.iter().all(|q| q.is_full()),
            "one each: the full one was skipped"
        );

        let (code, message) = send(&chain).err().expect("refused");
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(message.contains("function f is overloaded"), "{message}");
        assert_eq!(chain.in_flight(), 2, "the refused request left no entry");
        assert_eq!(chain.arena.free_slots(), free - 2, "and no slot");
    }

    #[test]
    fn an_instance_whose_writer_failed_is_skipped_before_its_supervisor_notices() {
        let chain = runtime("closed", 2);
        let queues = [
            Arc::new(InstanceQueue::new(4)),
            Arc::new(InstanceQueue::new(4)),
        ];
        for (i, q) in queues.iter().enumerate() {
            chain.instance_up(0, i, 1, Arc::clone(q));
        }
        queues[0].close(); // what write_worker does when its socket write fails
        for _ in 0..3 {
            let _sent = send(&chain).expect("queued on the other instance");
        }
        let mut out = Vec::new();
        assert!(pop_queued(&queues[1], &mut out));
        assert_eq!(
            out.len(),
            3 * Descriptor::SIZE,
            "all three went to instance 1"
        );
    }

    /// Pops what is queued (it has items, so the batch returns at once).
    fn pop_queued(q: &InstanceQueue, out: &mut Vec<u8>) -> bool {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(q.pop_batch(out, 64))
    }

    #[test]
    fn with_no_live_instance_requests_wait_in_order_and_go_when_one_comes_up() {
        let chain = runtime_with("wait", 1, 2);
        let free = chain.arena.free_slots();
        let first = send(&chain).expect("waits");
        let second = send(&chain).expect("waits");
        assert_eq!(chain.load[0].waiting.load(Ordering::Relaxed), 2);
        assert_eq!(chain.in_flight(), 2);

        let (code, message) = send(&chain).err().expect("the wait queue is full");
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            message.contains("no ready instance and 2 requests already wait"),
            "{message}"
        );
        assert_eq!(
            chain.arena.free_slots(),
            free - 2,
            "the refused one's slot is back"
        );
        assert_eq!(chain.load[0].wait_refused.load(Ordering::Relaxed), 1);

        let queue = Arc::new(InstanceQueue::new(4));
        chain.instance_up(0, 0, 1, Arc::clone(&queue));
        assert_eq!(chain.dispatch_once(), None, "nothing waits any more");
        let mut out = Vec::new();
        assert!(pop_queued(&queue, &mut out));
        let ids: Vec<u64> = out
            .chunks(Descriptor::SIZE)
            .map(|c| Descriptor::from_bytes(c.try_into().unwrap()).request_id)
            .collect();
        assert_eq!(ids.len(), 2);
        assert!(ids[0] < ids[1], "first come, first served: {ids:?}");
        assert_eq!(chain.load[0].waiting.load(Ordering::Relaxed), 0);
        assert_eq!(chain.load[0].held(), 2);
        assert_eq!(chain.load[0].waited.load(Ordering::Relaxed), 2);
        // Held by the instance now: its death fails them.
        let holder = Holder {
            stage: 0,
            instance: 0,
            incarnation: 1,
        };
        assert_eq!(chain.held_by_count(holder), 2);
        chain.instance_down(0, 0);
        assert_eq!(
            chain.fail_held_by(holder, StatusCode::BAD_GATEWAY, "died"),
            2
        );
        assert_eq!(chain.arena.free_slots(), free);
        assert_eq!(chain.load[0].held(), 0);
        drop((first, second));
    }

    #[test]
    fn an_instance_at_its_concurrency_takes_no_more_and_a_return_lets_the_next_go() {
        let chain = runtime_yaml("limit", "{ max: 2, concurrency: 1 }", 8);
        let queue = Arc::new(InstanceQueue::new(8));
        chain.instance_up(0, 0, 1, Arc::clone(&queue));
        let _first = send(&chain).expect("sent");
        let _second = send(&chain).expect("waits");
        assert_eq!(queue.len(), 1, "one held by the instance");
        assert_eq!(chain.load[0].waiting.load(Ordering::Relaxed), 1);
        assert_eq!(chain.dispatch_once().map(|_| ()), Some(()), "still waiting");

        // The instance answers the first: the second may go to it now.
        let mut out = Vec::new();
        assert!(pop_queued(&queue, &mut out));
        let mut reply = Descriptor::from_bytes(out[..Descriptor::SIZE].try_into().unwrap());
        reply.hop = 1;
        reply.next_fn = GATEWAY_FN;
        let holder = Holder {
            stage: 0,
            instance: 0,
            incarnation: 1,
        };
        chain.on_descriptor(holder, reply);
        assert_eq!(chain.dispatch_once(), None, "nothing waits");
        assert_eq!(queue.len(), 1, "the second is with the instance");
        assert_eq!(chain.load[0].instance_held[0].load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_waiting_request_is_failed_at_its_deadline_and_its_slot_released() {
        let chain = runtime("expire", 1);
        let free = chain.arena.free_slots();
        let soon = Instant::now() + std::time::Duration::from_millis(20);
        let mut rx = send_by(&chain, soon).expect("waits");
        let _later = send(&chain).expect("waits");
        assert_eq!(chain.dispatch_once(), Some(soon), "the earliest deadline");
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(chain.dispatch_once().is_some(), "the later one still waits");
        match rx.try_recv() {
            Ok(Completion::Failed { code, message }) => {
                assert_eq!(code, StatusCode::GATEWAY_TIMEOUT);
                assert!(
                    message.contains("no instance of function f was ready"),
                    "{message}"
                );
            }
            _ => panic!("the expired request was answered"),
        }
        assert_eq!(chain.arena.free_slots(), free - 1);
        assert_eq!(chain.load[0].wait_expired.load(Ordering::Relaxed), 1);
        assert_eq!(chain.load[0].waiting.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_waiting_request_behind_a_later_deadline_still_expires_at_its_own() {
        let chain = runtime("expire-order", 1);
        let late = Instant::now() + std::time::Duration::from_secs(5);
        let _first = send_by(&chain, late).expect("waits");
        let mut soon = send_by(
            &chain,
            Instant::now() + std::time::Duration::from_millis(20),
        )
        .expect("waits behind it");
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert_eq!(
            chain.dispatch_once(),
            Some(late),
            "only the later deadline is left"
        );
        assert!(
            matches!(soon.try_recv(), Ok(Completion::Failed { code, .. }) if code == StatusCode::GATEWAY_TIMEOUT),
            "the second one was failed at its deadline"
        );
        assert_eq!(chain.load[0].waiting.load(Ordering::Relaxed), 1);
        assert_eq!(
            chain.dispatch_once(),
            Some(late),
            "and no past deadline is returned"
        );
    }

    #[test]
    fn live_instances_take_turns_whatever_slots_are_empty() {
        // instances: 2 has a third, spare slot (for reloads), empty here.
        let chain = runtime("turns", 2);
        assert_eq!(chain.stages[0].instances.len(), 3);
        let queues = [
            Arc::new(InstanceQueue::new(8)),
            Arc::new(InstanceQueue::new(8)),
        ];
        for (i, q) in queues.iter().enumerate() {
            chain.instance_up(0, i, 1, Arc::clone(q));
        }
        for _ in 0..6 {
            let _sent = send(&chain).expect("queued");
        }
        assert_eq!((queues[0].len(), queues[1].len()), (3, 3));
    }

    #[test]
    fn a_retiring_instance_gets_nothing_new_and_a_downed_queue_is_closed() {
        let chain = runtime("retire", 2);
        let queues = [
            Arc::new(InstanceQueue::new(4)),
            Arc::new(InstanceQueue::new(4)),
        ];
        for (i, q) in queues.iter().enumerate() {
            chain.instance_up(0, i, 1, Arc::clone(q));
        }
        chain.retire(0, 0);
        assert_eq!(chain.serving_instances(0), 1);
        for _ in 0..3 {
            let _sent = send(&chain).expect("queued");
        }
        assert!(queues[0].is_empty(), "nothing for the retiring instance");
        assert_eq!(queues[1].len(), 3);

        assert_eq!(chain.live_instances(0), 2);
        chain.instance_down(0, 1);
        assert_eq!(chain.live_instances(0), 1);
        assert_eq!(
            queues[1].push(Descriptor::default()),
            Err(PushError::Closed)
        );
    }
}
