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
//! Slot ownership: the `Pending` entry owns the request's slot through a [`SlotGuard`], and the
//! guard releases it on drop. Whoever removes the entry from the table owns the slot from then
//! on; if the HTTP handler is gone (timeout, client disconnect), the guard is dropped with the
//! undelivered completion. A slot is therefore released exactly once, and never while a worker
//! may still write to it: entries are removed only when the descriptor came back or the process
//! holding it has exited.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use chain_runtime::plan::ChainPlan;
use chain_runtime::stats::{StatsError, StatsPage};
use crossbeam_utils::CachePadded;
use hyper::StatusCode;
use proto::worker::is_control;
use proto::{Descriptor, GATEWAY_FN, Status};
use shm::{Arena, SlotRef};
use sockmap_bpf::{HolderRecord, KernelDataplane};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;

use crate::queue::{INSTANCE_QUEUE_CAPACITY, InstanceQueue, PushError};

/// Descriptors written per syscall at most when several are queued for one instance.
pub const WRITE_BATCH: usize = 64;

/// Releases its slot when dropped.
pub struct SlotGuard {
    arena: Arc<Arena>,
    slot: SlotRef,
}

impl SlotGuard {
    pub fn new(arena: Arc<Arena>, slot: SlotRef) -> Self {
        SlotGuard { arena, slot }
    }

    pub fn slot(&self) -> SlotRef {
        self.slot
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

struct Pending {
    slot: SlotGuard,
    holder: Holder,
    /// The `hop` of the descriptor last sent out: the reply must carry `hop + 1`.
    hop: u8,
    responder: oneshot::Sender<Completion>,
}

/// A live instance's outbound queue (`None` while the instance is down), its current process,
/// and its statistics page, which outlives restarts.
pub struct InstanceLink {
    queue: Mutex<Option<(u64, Arc<InstanceQueue>)>>,
    /// Process id of the running incarnation, 0 while down.
    pub pid: AtomicU32,
    pub stats: StatsPage,
    pub stats_fd: OwnedFd,
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
    /// Process id of the function's zygote while it runs, 0 otherwise (and for functions
    /// started by exec).
    pub zygote_pid: AtomicU32,
}

pub struct ChainRuntime {
    pub plan: ChainPlan,
    pub arena: Arc<Arena>,
    pub stages: Vec<StageRuntime>,
    /// What the router did, for the metrics page to read.
    pub counters: RouterCounters,
    /// Set when the kernel dataplane routes this chain's hops.
    pub kernel: Option<KernelRoute>,
    pending: Mutex<HashMap<u64, Pending>>,
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
            for i in 0..s.function.instances.max {
                let (stats, stats_fd) =
                    StatsPage::create(&format!("spindle-stats-{}-{i}", s.function.name))?;
                instances.push(InstanceLink {
                    queue: Mutex::new(None),
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
                zygote_pid: AtomicU32::new(0),
            });
        }
        Ok(ChainRuntime {
            plan,
            arena,
            stages,
            counters: RouterCounters::default(),
            kernel,
            pending: Mutex::new(HashMap::new()),
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
        match record {
            Some(rec) if rec.request_id == request_id => {
                self.stage_index(rec.fn_id()) == Some(holder.stage)
                    && rec.instance() as usize == holder.instance
            }
            _ => p.holder == holder,
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
                    "the kernel dataplane refused a descriptor from function {sender} (wrong chain or status)"
                ),
            )),
            _ => None,
        }
    }

    fn stage_index(&self, fn_id: u32) -> Option<usize> {
        self.stages.iter().position(|s| s.fn_id == fn_id)
    }

    pub fn in_flight(&self) -> usize {
        self.pending.lock().expect("pending lock").len()
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
    }

    pub fn live_instances(&self, stage: usize) -> usize {
        self.stages[stage]
            .instances
            .iter()
            .filter(|l| l.queue.lock().expect("link lock").is_some())
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
            let link = st.instances[instance].queue.lock().expect("link lock");
            // A closed queue's writer is gone even if its supervisor has not noticed yet.
            let Some((incarnation, queue)) = link.as_ref().filter(|(_, q)| !q.is_closed()) else {
                continue;
            };
            any_live = true;
            if queue.is_full() {
                continue;
            }
            let holder = Holder {
                stage,
                instance,
                incarnation: *incarnation,
            };
            return Ok((holder, Arc::clone(queue)));
        }
        Err(if any_live {
            PushError::Full
        } else {
            PushError::Closed
        })
    }

    /// The answer for a request no instance of `stage` could take.
    fn unsendable(&self, stage: usize, why: PushError) -> (StatusCode, String) {
        let name = &self.stages[stage].name;
        let message = match why {
            PushError::Closed => {
                format!("function {name} has no live instance (restarting); retry shortly")
            }
            PushError::Full => format!(
                "function {name} is overloaded: every instance has {INSTANCE_QUEUE_CAPACITY} \
                 requests queued; retry shortly"
            ),
        };
        (StatusCode::SERVICE_UNAVAILABLE, message)
    }

    /// Starts a request whose body is already in `slot`: sends its descriptor to the chain's
    /// first function. Returns the receiver that will hold the completion.
    pub fn start(
        &self,
        slot: SlotGuard,
        len: u32,
    ) -> Result<oneshot::Receiver<Completion>, (StatusCode, String)> {
        let request_id = REQUEST_IDS.fetch_add(1, Ordering::Relaxed);
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
        let mut pending = self.pending.lock().expect("pending lock");
        let (holder, queue) = self.pick(0).map_err(|why| self.unsendable(0, why))?;
        let entry = Pending {
            slot,
            holder,
            hop: 0,
            responder: tx,
        };
        // Recorded before the push, so the answer always finds its holder.
        pending.insert(request_id, entry);
        if let Err(why) = queue.push(desc) {
            let unsent = pending.remove(&request_id);
            drop(pending);
            drop(unsent);
            return Err(self.unsendable(0, why));
        }
        Ok(rx)
    }

    /// Handles one descriptor a worker sent. `from` is the instance that sent it.
    pub fn on_descriptor(&self, from: Holder, desc: Descriptor) {
        let record = self.kernel_record(desc.slot);
        let mut pending = self.pending.lock().expect("pending lock");
        let Some(p) = pending.get(&desc.request_id) else {
            drop(pending);
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
        } else if desc.len > self.arena.slot_size()
            || desc.reserved != 0
            || desc.status().is_err()
            || !self.hop_ok(p, &desc)
        {
            Some(Refusal::Malformed)
        } else {
            None
        };
        if let Some(reason) = refusal {
            drop(pending);
            return self.refuse(from, &desc, reason);
        }
        let status = desc.status().expect("checked above");
        if let Some((code, message)) = self.kernel_failure(from, &desc) {
            if status == Status::Refused {
                self.counters.refuse(Refusal::KernelRefused);
            }
            let p = pending.remove(&desc.request_id).expect("present above");
            drop(pending);
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
            let p = pending.remove(&desc.request_id).expect("present above");
            drop(pending);
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
            let p = pending.remove(&desc.request_id).expect("present above");
            drop(pending);
            drop(p.slot);
            let _ = p.responder.send(Completion::Failed {
                code: StatusCode::INTERNAL_SERVER_ERROR,
                message,
            });
            return;
        }
        let stage = self.stage_index(desc.next_fn).expect("checked above");
        let (holder, queue) = match self.pick(stage) {
            Ok(picked) => picked,
            Err(why) => return self.fail_unsent(pending, &desc, stage, why),
        };
        let p = pending.get_mut(&desc.request_id).expect("present above");
        p.holder = holder;
        p.hop = desc.hop;
        let slot = p.slot.slot().index;
        if let Some(k) = &self.kernel {
            // The kernel's record for this request names the previous hop; the gateway routed
            // this one, so it records it before sending (held_by prefers the record).
            let fn_id = self.stages[holder.stage].fn_id;
            let record = HolderRecord::new(desc.request_id, fn_id, holder.instance as u32);
            if let Err(e) = k.dataplane.set_holder(k.slot_base + slot, record) {
                tracing::error!("recording a router forward in the kernel's holder table: {e}");
            }
        }
        if let Err(why) = queue.push(desc) {
            return self.fail_unsent(pending, &desc, stage, why);
        }
        drop(pending);
        self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
    }

    /// Ends a request whose next hop could not be queued: no worker holds its descriptor, so
    /// its slot is released here.
    fn fail_unsent(
        &self,
        mut pending: std::sync::MutexGuard<'_, HashMap<u64, Pending>>,
        desc: &Descriptor,
        stage: usize,
        why: PushError,
    ) {
        let p = pending.remove(&desc.request_id).expect("present above");
        drop(pending);
        drop(p.slot);
        let (code, message) = self.unsendable(stage, why);
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
        // The kernel's holder records are syscalls: read them without holding the table lock.
        let candidates: Vec<(u64, u32)> = {
            let pending = self.pending.lock().expect("pending lock");
            pending
                .iter()
                .map(|(id, p)| (*id, p.slot.slot().index))
                .collect()
        };
        let records: HashMap<u64, HolderRecord> = candidates
            .iter()
            .filter_map(|&(id, slot)| Some((id, self.kernel_record(slot)?)))
            .collect();
        let lost: Vec<Pending> = {
            let mut pending = self.pending.lock().expect("pending lock");
            let ids: Vec<u64> = pending
                .iter()
                .filter(|(id, p)| self.held_by(**id, p, records.get(*id).copied(), holder))
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| pending.remove(id)).collect()
        };
        let n = lost.len();
        for p in lost {
            drop(p.slot);
            let _ = p.responder.send(Completion::Failed {
                code,
                message: message.to_string(),
            });
        }
        n
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
/// queue is closed.
pub async fn write_worker(mut write: OwnedWriteHalf, queue: Arc<InstanceQueue>) {
    let mut batch = Vec::with_capacity(WRITE_BATCH * Descriptor::SIZE);
    loop {
        batch.clear();
        if !queue.pop_batch(&mut batch, WRITE_BATCH).await {
            return;
        }
        if write.write_all(&batch).await.is_err() {
            // The worker is gone; its supervisor fails what it held. Later sends fail at once
            // instead of filling a queue nobody drains.
            queue.close();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use chain_runtime::config::Config;
    use chain_runtime::plan::Plan;

    use super::*;

    /// A one-chain, one-function runtime with `instances` instances, none of them up.
    fn runtime(tag: &str, instances: u32) -> ChainRuntime {
        let dir = std::env::temp_dir().join(format!("dataplane-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("f.wasm"), b"").unwrap();
        let yaml = format!(
            "functions:\n  - {{ name: f, module: f.wasm, instances: {instances} }}\n\
             chains:\n  - {{ name: c, route: /c, steps: [f], arena: {{ slots: 16 }} }}\n"
        );
        let config = Config::parse(&yaml, &dir.join("spindle.yaml")).unwrap();
        let plan = Plan::new(&config).chains.remove(0);
        let arena = Arena::create(&format!("dataplane-test-{tag}"), 64 * 1024, 16).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        ChainRuntime::new(plan, Arc::new(arena), None).unwrap()
    }

    fn send(chain: &ChainRuntime) -> Result<oneshot::Receiver<Completion>, (StatusCode, String)> {
        let slot = SlotGuard::new(Arc::clone(&chain.arena), chain.arena.alloc().unwrap());
        chain.start(slot, 0)
    }

    #[test]
    fn a_full_instance_is_skipped_and_all_full_is_503_with_the_slot_released() {
        let chain = runtime("full", 2);
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
    fn no_live_instance_is_503_and_a_downed_queue_is_closed() {
        let chain = runtime("down", 1);
        let (code, message) = send(&chain).err().expect("refused");
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(message.contains("has no live instance"), "{message}");

        let queue = Arc::new(InstanceQueue::new(4));
        chain.instance_up(0, 0, 1, Arc::clone(&queue));
        assert_eq!(chain.live_instances(0), 1);
        chain.instance_down(0, 0);
        assert_eq!(chain.live_instances(0), 0);
        assert_eq!(queue.push(Descriptor::default()), Err(PushError::Closed));
    }
}
