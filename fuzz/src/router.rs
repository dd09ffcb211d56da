//! The gateway's router (`gateway::dataplane::ChainRuntime::on_descriptor`, the userspace
//! dataplane) under workers that lie: requests start, genuine replies move them on, and the
//! input sends descriptors from the wrong instance, with fields changed, or made of raw
//! bytes, and takes instances down. Checked after every step:
//! - a descriptor from an instance that does not hold its request neither moves nor ends it;
//! - a genuine reply from the holder is never refused as unknown, from the wrong holder,
//!   for a slot mismatch or as malformed;
//! - whatever the router sends an instance names the slot and generation its request was
//!   started with;
//! - no slot is lost or released twice: free slots plus requests in flight is the arena's
//!   slot count (each completion's slot is dropped as soon as it arrives).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use arbitrary::{Arbitrary, Unstructured};
use chain_runtime::config::Config;
use chain_runtime::plan::Plan;
use gateway::dataplane::{ChainRuntime, Completion, Holder, Refusal, SlotGuard};
use gateway::queue::InstanceQueue;
use proto::{Descriptor, GATEWAY_FN, Status};
use shm::{Arena, SlotRef};
use tokio::sync::oneshot;

const SLOTS: u32 = 8;
const SLOT_SIZE: u32 = 4096;
const INSTANCES: usize = 2;
const QUEUE: usize = 3;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("spindle-fuzz-router-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the fuzz router directory");
        for m in ["f.wasm", "g.wasm"] {
            std::fs::write(dir.join(m), b"").expect("writing a module file");
        }
        dir
    })
}

fn chain(dynamic: bool) -> ChainRuntime {
    let routing = if dynamic {
        "entry: f, functions: [f, g], max_hops: 4"
    } else {
        "steps: [f, g]"
    };
    let yaml = format!(
        "functions:\n\
         - {{ name: f, module: f.wasm, instances: {INSTANCES}, wait_queue: 2 }}\n\
         - {{ name: g, module: g.wasm, instances: {INSTANCES}, wait_queue: 2 }}\n\
         chains:\n\
         - {{ name: c, route: /c, {routing}, arena: {{ slot_size: {SLOT_SIZE}, slots: {SLOTS} }} }}\n"
    );
    let config = Config::parse(&yaml, &dir().join("spindle.yaml")).expect("the fuzz config");
    let plan = Plan::new(&config).chains.remove(0);
    let arena = Arena::create("spindle-fuzz-router", SLOT_SIZE, SLOTS).expect("an arena");
    ChainRuntime::new(plan, Arc::new(arena), None).expect("a chain runtime")
}

#[derive(Arbitrary, Debug)]
enum Op {
    Start {
        len: u16,
    },
    /// The holder of a request (chosen modulo those held) answers it, as `edit` says.
    Reply {
        request: u8,
        edit: Edit,
        next: u8,
    },
    /// 32 raw bytes from an instance.
    Raw {
        stage: u8,
        instance: u8,
        bytes: [u8; Descriptor::SIZE],
    },
    /// An instance exits: what it held fails, then it restarts (a new incarnation).
    Restart {
        stage: u8,
        instance: u8,
    },
    /// A client stops waiting.
    Abandon(u8),
}

#[derive(Arbitrary, Debug)]
enum Edit {
    Genuine,
    /// Sent by another instance, or an older incarnation of the holder.
    WrongSender {
        stage: u8,
        instance: u8,
        stale: bool,
    },
    Slot(u32),
    Generation(u32),
    Chain(u16),
    Len(u32),
    Reserved(u32),
    Status(u8),
    Hop(u8),
    RequestId(u64),
}

struct Model {
    chain: ChainRuntime,
    queues: Vec<Vec<Arc<InstanceQueue>>>,
    incarnations: Vec<Vec<u64>>,
    /// Request id → (who holds it, the descriptor it was sent).
    held: HashMap<u64, (Holder, Descriptor)>,
    /// Request id → the slot it was started with.
    slots: HashMap<u64, SlotRef>,
    waiting: Vec<oneshot::Receiver<Completion>>,
}

impl Model {
    fn holder(&self, stage: usize, instance: usize) -> Holder {
        Holder {
            stage,
            instance,
            incarnation: self.incarnations[stage][instance],
        }
    }

    /// Takes what the router queued for each instance: those instances hold those requests.
    fn drain(&mut self) {
        for stage in 0..self.queues.len() {
            for instance in 0..INSTANCES {
                let queue = Arc::clone(&self.queues[stage][instance]);
                let mut out = Vec::new();
                // Items are queued, so this completes without waiting.
                while !queue.is_empty() {
                    let mut pop = std::pin::pin!(queue.pop_batch(&mut out, 64));
                    let Poll::Ready(true) =
                        pop.as_mut().poll(&mut Context::from_waker(Waker::noop()))
                    else {
                        panic!("a queue with items did not pop them");
                    };
                }
                for bytes in out.chunks_exact(Descriptor::SIZE) {
                    let d = Descriptor::from_bytes(bytes.try_into().unwrap());
                    let slot = SlotRef {
                        index: d.slot,
                        generation: d.generation,
                    };
                    let started = *self.slots.entry(d.request_id).or_insert(slot);
                    assert_eq!(
                        slot, started,
                        "request {} sent with another slot",
                        d.request_id
                    );
                    assert_eq!(d.next_fn, self.chain.stages[stage].fn_id);
                    assert_eq!(d.status, Status::Ok as u8);
                    let holder = self.holder(stage, instance);
                    assert!(
                        self.held.insert(d.request_id, (holder, d)).is_none(),
                        "request {} sent while already held",
                        d.request_id
                    );
                }
            }
        }
    }

    fn poll_completions(&mut self) {
        self.waiting.retain_mut(|rx| match rx.try_recv() {
            Ok(Completion::Returned { desc, slot }) => {
                assert_eq!(
                    slot.slot(),
                    SlotRef {
                        index: desc.slot,
                        generation: desc.generation
                    }
                );
                drop(slot);
                false
            }
            Ok(Completion::Failed { .. }) => false,
            Err(oneshot::error::TryRecvError::Empty) => true,
            Err(oneshot::error::TryRecvError::Closed) => false,
        });
    }

    fn check(&mut self) {
        self.drain();
        self.poll_completions();
        let free = self.chain.arena.free_slots() as usize;
        let in_flight = self.chain.in_flight();
        assert_eq!(
            free + in_flight,
            SLOTS as usize,
            "a slot was lost or released twice"
        );
        assert!(self.held.len() <= in_flight);
    }

    /// Refusals a genuine reply must never get (a route error may: the guest chose badly).
    fn refusals(&self) -> u64 {
        [
            Refusal::UnknownRequest,
            Refusal::WrongHolder,
            Refusal::SlotMismatch,
            Refusal::Malformed,
        ]
        .into_iter()
        .map(|r| self.chain.counters.refused(r))
        .sum()
    }

    fn send(&mut self, from: Holder, d: Descriptor) {
        let before = self.held.get(&d.request_id).copied();
        let in_flight = self.chain.in_flight();
        let impostor = before.is_some_and(|(h, _)| h != from);
        if !impostor && before.is_some() {
            // The holder answered: wherever it goes next is learned from the queues.
            self.held.remove(&d.request_id);
        }
        self.chain.on_descriptor(from, d);
        if impostor {
            assert_eq!(
                self.chain.in_flight(),
                in_flight,
                "an impostor ended request {}",
                d.request_id
            );
            self.drain();
            assert_eq!(
                self.held.get(&d.request_id).map(|(h, _)| *h),
                before.map(|(h, _)| h),
                "an impostor moved request {}",
                d.request_id
            );
        }
    }
}

pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let dynamic = u.arbitrary().unwrap_or(false);
    let chain = chain(dynamic);
    let stages = chain.stages.len();
    let mut m = Model {
        queues: (0..stages)
            .map(|_| {
                (0..INSTANCES)
                    .map(|_| Arc::new(InstanceQueue::new(QUEUE)))
                    .collect()
            })
            .collect(),
        incarnations: vec![vec![1; INSTANCES]; stages],
        chain,
        held: HashMap::new(),
        slots: HashMap::new(),
        waiting: Vec::new(),
    };
    for s in 0..stages {
        for i in 0..INSTANCES {
            m.chain.instance_up(s, i, 1, Arc::clone(&m.queues[s][i]));
        }
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3600);
    // Arbitrary gives default values once the input runs out: stop there.
    while !u.is_empty() {
        let Ok(op) = Op::arbitrary(&mut u) else { break };
        match op {
            Op::Start { len } => {
                let Ok(guard) = SlotGuard::alloc(&m.chain.arena) else {
                    continue;
                };
                if let Ok(rx) = m
                    .chain
                    .start(guard, u32::from(len) % (SLOT_SIZE + 1), deadline)
                {
                    m.waiting.push(rx);
                }
            }
            Op::Reply {
                request,
                edit,
                next,
            } => {
                let mut ids: Vec<u64> = m.held.keys().copied().collect();
                if ids.is_empty() {
                    continue;
                }
                ids.sort_unstable();
                let id = ids[request as usize % ids.len()];
                let (holder, sent) = m.held[&id];
                let mut d = sent;
                d.hop = sent.hop.wrapping_add(1);
                d.len = d.len.min(SLOT_SIZE);
                d.next_fn = if dynamic {
                    let choices: Vec<u32> = std::iter::once(GATEWAY_FN)
                        .chain(m.chain.stages.iter().map(|s| s.fn_id))
                        .collect();
                    choices[next as usize % choices.len()]
                } else {
                    m.chain.plan.static_next(sent.next_fn).unwrap_or(GATEWAY_FN)
                };
                let mut from = holder;
                match edit {
                    Edit::Genuine => {
                        let refused = m.refusals();
                        m.send(from, d);
                        assert_eq!(m.refusals(), refused, "a genuine reply was refused: {d:?}");
                        m.check();
                        continue;
                    }
                    Edit::WrongSender {
                        stage,
                        instance,
                        stale,
                    } => {
                        from = m.holder(stage as usize % stages, instance as usize % INSTANCES);
                        if stale {
                            from.incarnation = from.incarnation.wrapping_sub(1);
                        }
                    }
                    Edit::Slot(v) => d.slot = v,
                    Edit::Generation(v) => d.generation = v,
                    Edit::Chain(v) => d.chain = v,
                    Edit::Len(v) => d.len = v,
                    Edit::Reserved(v) => d.reserved = v,
                    Edit::Status(v) => d.status = v,
                    Edit::Hop(v) => d.hop = v,
                    Edit::RequestId(v) => d.request_id = v,
                }
                m.send(from, d);
            }
            Op::Raw {
                stage,
                instance,
                bytes,
            } => {
                let from = m.holder(stage as usize % stages, instance as usize % INSTANCES);
                m.send(from, Descriptor::from_bytes(&bytes));
            }
            Op::Restart { stage, instance } => {
                let (s, i) = (stage as usize % stages, instance as usize % INSTANCES);
                let holder = m.holder(s, i);
                m.chain.instance_down(s, i);
                m.drain();
                m.chain.fail_held_by(
                    holder,
                    hyper::StatusCode::BAD_GATEWAY,
                    "the instance exited",
                );
                m.held.retain(|_, (h, _)| *h != holder);
                m.incarnations[s][i] += 1;
                m.queues[s][i] = Arc::new(InstanceQueue::new(QUEUE));
                m.chain
                    .instance_up(s, i, m.incarnations[s][i], Arc::clone(&m.queues[s][i]));
            }
            Op::Abandon(i) => {
                if !m.waiting.is_empty() {
                    let i = i as usize % m.waiting.len();
                    m.waiting.swap_remove(i);
                }
            }
        }
        m.check();
    }
}
