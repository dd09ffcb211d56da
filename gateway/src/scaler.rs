//! Instances on demand: one pool per (chain, function) starts, replaces and retires the
//! function's instances, and for an autoscaled function (`instances: {min, max, ...}`) decides
//! how many it wants from the requests in flight, the way Knative's KPA does.
//!
//! The decision ([`Decider`]), once per [`TICK`] and at once when a request starts waiting
//! for a function with no instance:
//! - *concurrency* is the requests the function holds (sent to an instance, queued in its
//!   socket or running) plus those waiting for one; sampled every tick.
//! - stable mode: want `ceil(average concurrency over stable_window / target)`.
//! - panic mode, for bursts: when the average over the shorter panic_window asks for at least
//!   [`PANIC_THRESHOLD`] times the instances ready (or any instance while none is), want
//!   `ceil(panic average / target)` and never fewer than before; panic mode ends once a whole
//!   stable window passes without that condition.
//! - the count is clamped to `[min, max]`; it rises at once and falls only after the lower
//!   count has been wanted for `scale_down_delay` (the highest count wanted within that delay
//!   is kept). With `min: 0` the last instance goes when a stable window and the delay passed
//!   without a request; the function's zygote (its compiled module and warm image) stays, so
//!   the next request is served by a fork, waiting in the function's wait queue meanwhile.
//!
//! Defaults, and why they are much shorter than Knative's (60 s stable, 6 s panic, 30 s
//! scale-to-zero grace): a Knative pod takes seconds to start, so it must not be stopped on a
//! lull it would pay for again; a Spindle instance forks in about a millisecond, so holding
//! idle ones longer buys nothing. 6 s / 600 ms / 2 s keep 120 samples in the stable window,
//! 12 in the panic window, and stop a burst's instances a few seconds after it ends.
//!
//! Scaling down retires an instance: nothing new is sent to it, it finishes what it holds,
//! then it is stopped. A crashed instance is replaced in its slot by its supervisor (by fork
//! when the function has a zygote); a fixed count (`instances: N`) is only that.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chain_runtime::config::Autoscale;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::dataplane::{ChainRuntime, StageLoad};
use crate::metrics::Metrics;
use crate::peers::PoolPeers;
use crate::supervisor::{FunctionInputs, ResumeFds, SpawnError, WorkerCommand, supervise};
use crate::zygote::Zygote;

mod remote;

/// How often an autoscaled function's concurrency is sampled and its count decided.
pub const TICK: Duration = Duration::from_millis(50);
/// Panic mode starts when the panic window asks for this many times the ready instances
/// (Knative's default panic threshold, 200%).
pub const PANIC_THRESHOLD: f64 = 2.0;

/// The autoscaler's arithmetic for one function, separate from the processes so it can be
/// tested against a clock of its own.
pub struct Decider {
    knobs: Autoscale,
    min: u32,
    max: u32,
    samples: VecDeque<(Instant, f64)>,
    /// Counts wanted within the last `scale_down_delay`, newest last.
    wanted: VecDeque<(Instant, u32)>,
    panic_until: Option<Instant>,
    last: u32,
}

/// What one decision saw and chose.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub desired: u32,
    pub panicking: bool,
    pub stable_average: f64,
    pub panic_average: f64,
}

impl Decider {
    pub fn new(knobs: Autoscale, min: u32, max: u32) -> Self {
        Decider {
            knobs,
            min,
            max,
            samples: VecDeque::new(),
            wanted: VecDeque::new(),
            panic_until: None,
            last: min,
        }
    }

    /// Records `concurrency` seen at `now` with `ready` instances serving, and decides.
    pub fn observe(&mut self, now: Instant, concurrency: f64, ready: u32) -> Decision {
        self.samples.push_back((now, concurrency));
        while let Some(&(at, _)) = self.samples.front() {
            if now.duration_since(at) > self.knobs.stable_window {
                self.samples.pop_front();
            } else {
                break;
            }
        }
        let stable_average = average(&self.samples, now, self.knobs.stable_window);
        let panic_average = average(&self.samples, now, self.knobs.panic_window);
        // Planned per instance: the target less the headroom.
        let target =
            f64::from(self.knobs.target) * f64::from(self.knobs.utilization_percent) / 100.0;
        let want = |avg: f64| (avg / target).ceil().min(f64::from(u32::MAX)) as u32;
        let (stable_want, panic_want) = (want(stable_average), want(panic_average));
        let bursting = if ready == 0 {
            panic_want > 0
        } else {
            f64::from(panic_want) >= PANIC_THRESHOLD * f64::from(ready)
        };
        if bursting {
            self.panic_until = Some(now + self.knobs.stable_window);
        }
        let panicking = self.panic_until.is_some_and(|until| now < until);
        if !panicking {
            self.panic_until = None;
        }
        let raw = if panicking {
            panic_want.max(self.last)
        } else {
            stable_want
        };
        let raw = raw.clamp(self.min, self.max);
        self.wanted.push_back((now, raw));
        while let Some(&(at, _)) = self.wanted.front() {
            if now.duration_since(at) > self.knobs.scale_down_delay {
                self.wanted.pop_front();
            } else {
                break;
            }
        }
        let desired = self.wanted.iter().map(|&(_, n)| n).max().unwrap_or(raw);
        self.last = desired;
        Decision {
            desired,
            panicking,
            stable_average,
            panic_average,
        }
    }
}

/// Mean of the samples within `window` of `now`; 0 with none.
fn average(samples: &VecDeque<(Instant, f64)>, now: Instant, window: Duration) -> f64 {
    let (sum, n) = samples
        .iter()
        .rev()
        .take_while(|(at, _)| now.duration_since(*at) <= window)
        .fold((0.0, 0u32), |(s, n), (_, c)| (s + c, n + 1));
    if n == 0 { 0.0 } else { sum / f64::from(n) }
}

/// One instance slot's supervisor task and the switch that retires it.
struct Slot {
    task: JoinHandle<()>,
    retire: watch::Sender<bool>,
    /// The generation (module + zygote) the instance was started from.
    generation: u64,
    /// How the first start went, for starts the autoscaler made (the caller of
    /// [`Pool::start_instance`] holds it otherwise).
    first: Option<oneshot::Receiver<Result<Duration, SpawnError>>>,
    /// Set for an instance run for a peer node's grant (module `remote`).
    grant: Option<remote::GrantTag>,
}

/// First wait after an autoscaled start failed; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What a function's instances are started from: its module and config as the gateway read
/// them, and its zygote (for `start: fork`). A reload makes a new generation; the old one's
/// zygote is stopped once its last instance has gone, which frees its image.
pub struct Generation {
    pub number: u64,
    pub cmd: WorkerCommand,
    pub inputs: Arc<FunctionInputs>,
    pub zygote: Option<Arc<Zygote>>,
    /// Stops this generation's zygote (also set at shutdown).
    stop: Arc<watch::Sender<bool>>,
    /// The zygote's supervisor, which stops and reaps it.
    zygote_task: Option<JoinHandle<()>>,
}

impl Generation {
    /// A generation for `stage` of `chain`, its zygote started when `fork` is set.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        number: u64,
        cmd: WorkerCommand,
        chain: &Arc<ChainRuntime>,
        metrics: &Arc<Metrics>,
        inputs: Arc<FunctionInputs>,
        stage: usize,
        fork: Option<Duration>,
        shutdown: &watch::Receiver<bool>,
    ) -> Generation {
        let stop = Arc::new(watch::Sender::new(false));
        let zygote = fork.map(Zygote::new);
        // The zygote's receiver exists before the forwarder below starts: `closed()` is
        // true while a sender has no receivers.
        let zygote_task = zygote.as_ref().map(|zygote| {
            tokio::spawn(crate::zygote::supervise(
                Arc::clone(zygote),
                cmd.clone(),
                Arc::clone(chain),
                Arc::clone(metrics),
                Arc::clone(&inputs),
                stage,
                stop.subscribe(),
            ))
        });
        {
            // Shutdown stops every generation's zygote.
            let stop = Arc::clone(&stop);
            let mut shutdown = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = crate::supervisor::stopping(&mut shutdown) => { stop.send_replace(true); }
                    _ = stop.closed() => {}
                }
            });
        }
        Generation {
            number,
            cmd,
            inputs,
            zygote,
            stop,
            zygote_task,
        }
    }
}

/// Asks a running pool to move every instance to a new generation.
pub struct Roll {
    pub generation: Generation,
    /// How many instances were moved, or why the roll was undone.
    pub done: oneshot::Sender<Result<usize, String>>,
}

/// A reload in progress: the pool's generation is already the new one (every start uses
/// it), and the old generation's instances are replaced one at a time.
struct Rolling {
    old: Generation,
    done: oneshot::Sender<Result<usize, String>>,
    step: Option<RollStep>,
    moved: usize,
}

/// Replacing the old instance in `old_slot`.
struct RollStep {
    old_slot: usize,
    /// Whether the new instance got a free slot (else the old one retired first, and the new
    /// one starts in its slot once that is free).
    surge: bool,
    /// The new instance's first start, once it was started.
    first: Option<oneshot::Receiver<Result<Duration, SpawnError>>>,
    since: Instant,
}

/// The instances of one function of one chain.
pub struct Pool {
    chain: Arc<ChainRuntime>,
    metrics: Arc<Metrics>,
    generation: Generation,
    stage: usize,
    shutdown: watch::Receiver<bool>,
    slots: Vec<Option<Slot>>,
    rolls: tokio::sync::mpsc::Receiver<Roll>,
    /// The reload in progress, if any.
    rolling: Option<Rolling>,
    /// Starts that failed in a row, and when the autoscaler may try again: a broken module
    /// must not be re-forked every tick.
    failed_starts: u32,
    retry_at: Option<Instant>,
    /// Scale-out onto peers and instances run for peers (docs/autoscaling.md "Peers").
    peers: PoolPeers,
}

impl Pool {
    /// A pool of `stage` of `chain` starting from `generation`, and where to send it rolls.
    pub fn new(
        chain: Arc<ChainRuntime>,
        metrics: Arc<Metrics>,
        generation: Generation,
        stage: usize,
        shutdown: watch::Receiver<bool>,
    ) -> (Self, tokio::sync::mpsc::Sender<Roll>) {
        let slots = (0..chain.stages[stage].instances.len())
            .map(|_| None)
            .collect();
        // Present from the start, so a function at zero shows 0 rather than nothing.
        let labels = [
            chain.plan.spec.name.as_str(),
            chain.stages[stage].name.as_str(),
        ];
        metrics.instances_up.with_label_values(&labels);
        if let Some(function) = chain.plan.stages.get(stage).map(|s| &s.function)
            && function.instances.autoscale.is_some()
        {
            metrics
                .instances_desired
                .with_label_values(&labels)
                .set(i64::from(function.instances.min));
            metrics.autoscaler_panic.with_label_values(&labels);
        }
        let (roll_tx, rolls) = tokio::sync::mpsc::channel(1);
        let pool = Pool {
            chain,
            metrics,
            generation,
            stage,
            shutdown,
            slots,
            rolls,
            rolling: None,
            failed_starts: 0,
            retry_at: None,
            peers: PoolPeers::default(),
        };
        (pool, roll_tx)
    }

    /// Lets the autoscaler scale out onto peers over the node's budget, and run instances
    /// peers ask for.
    pub fn set_peers(&mut self, peers: PoolPeers) {
        self.peers = peers;
    }

    /// The instances the function starts with (its `min`, or its fixed count).
    pub fn initial(&self) -> u32 {
        self.chain.plan.stages[self.stage].function.instances.min
    }

    /// The most instances serving at once outside a roll.
    fn max(&self) -> usize {
        self.chain.plan.stages[self.stage].function.instances.max as usize
    }

    /// Starts an instance in the lowest free slot; the receiver reports its first start.
    /// None when every slot is taken.
    pub fn start_instance(&mut self) -> Option<oneshot::Receiver<Result<Duration, SpawnError>>> {
        self.spawn_in_free_slot().map(|(_, first)| first)
    }

    fn spawn_in_free_slot(
        &mut self,
    ) -> Option<(usize, oneshot::Receiver<Result<Duration, SpawnError>>)> {
        self.spawn_slot(None)
    }

    /// As [`Pool::spawn_in_free_slot`]; with a grant, the instance resumes from the grant's
    /// image (by exec, never from the zygote).
    fn spawn_slot(
        &mut self,
        grant: Option<(remote::GrantTag, Arc<ResumeFds>)>,
    ) -> Option<(usize, oneshot::Receiver<Result<Duration, SpawnError>>)> {
        self.reclaim();
        let instance = self.slots.iter().position(Option::is_none)?;
        let (first_tx, first_rx) = oneshot::channel();
        let (retire, retired) = watch::channel(false);
        let g = &self.generation;
        let (cmd, zygote, grant) = match grant {
            None => (g.cmd.clone(), g.zygote.clone(), None),
            Some((tag, fds)) => {
                let mut cmd = g.cmd.clone();
                cmd.images
                    .insert(self.chain.stages[self.stage].name.clone(), fds);
                (cmd, None, Some(tag))
            }
        };
        let task = tokio::spawn(supervise(
            cmd,
            Arc::clone(&self.chain),
            Arc::clone(&self.metrics),
            Arc::clone(&g.inputs),
            zygote,
            self.stage,
            instance,
            first_tx,
            self.shutdown.clone(),
            retired,
        ));
        self.slots[instance] = Some(Slot {
            task,
            retire,
            generation: g.number,
            first: None,
            grant,
        });
        Some((instance, first_rx))
    }

    /// Starts an instance whose first start the pool itself watches.
    fn scale_up_one(&mut self) -> bool {
        match self.spawn_in_free_slot() {
            Some((instance, first)) => {
                if let Some(slot) = &mut self.slots[instance] {
                    slot.first = Some(first);
                }
                true
            }
            None => false,
        }
    }

    /// Frees the slots of supervisors that ended (retired, or a first start that failed),
    /// and backs off after failed starts.
    fn reclaim(&mut self) {
        for slot in &mut self.slots {
            if let Some(s) = slot.as_mut()
                && let Some(first) = &mut s.first
            {
                match first.try_recv() {
                    Ok(Ok(_)) => {
                        s.first = None;
                        self.failed_starts = 0;
                        self.retry_at = None;
                    }
                    Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => {
                        // The supervisor logged why.
                        s.first = None;
                        self.failed_starts += 1;
                        let backoff = FIRST_BACKOFF
                            .saturating_mul(1 << (self.failed_starts - 1).min(16))
                            .min(MAX_BACKOFF);
                        self.retry_at = Some(Instant::now() + backoff);
                    }
                    Err(oneshot::error::TryRecvError::Empty) => {}
                }
            }
            if slot
                .as_ref()
                .is_some_and(|s| s.task.is_finished() && s.first.is_none())
            {
                *slot = None;
            }
        }
    }

    /// This node's own slots whose instance is starting or serving and not asked to retire
    /// (instances run for peers are counted apart).
    fn active(&self) -> Vec<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.as_ref().is_some_and(|s| {
                    !s.task.is_finished() && !*s.retire.borrow() && s.grant.is_none()
                })
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Retires the active instance holding the fewest requests (the highest slot on ties),
    /// so scaling down waits on as little work as possible.
    fn retire_one(&mut self) -> bool {
        let load = &self.chain.load[self.stage];
        let victim = self.active().into_iter().max_by_key(|&i| {
            let held = load.instance_held[i].load(Ordering::Relaxed);
            (std::cmp::Reverse(held), i)
        });
        match victim.and_then(|i| self.slots[i].as_ref()) {
            Some(slot) => {
                let _ = slot.retire.send(true);
                true
            }
            None => false,
        }
    }

    /// Runs the pool until shutdown: for an autoscaled function, the decision loop (for a
    /// fixed count there is nothing to decide: supervisors replace crashed instances
    /// themselves), and rolls to new generations. Returns after every instance's supervisor
    /// has stopped its worker.
    pub async fn run(mut self) {
        let function = &self.chain.plan.stages[self.stage].function;
        let decider = function
            .instances
            .autoscale
            .map(|knobs| Decider::new(knobs, function.instances.min, function.instances.max));
        self.serve(decider).await;
        for slot in self.slots.iter_mut().filter_map(Option::take) {
            let _ = slot.task.await;
        }
        self.generation.stop.send_replace(true);
        if let Some(task) = self.generation.zygote_task.take() {
            let _ = task.await;
        }
    }

    async fn serve(&mut self, mut decider: Option<Decider>) {
        let chain = Arc::clone(&self.chain);
        let stage = self.stage;
        let st = &chain.stages[stage];
        let labels = [chain.plan.spec.name.as_str(), st.name.as_str()];
        let desired_gauge = self.metrics.instances_desired.with_label_values(&labels);
        let panic_gauge = self.metrics.autoscaler_panic.with_label_values(&labels);
        let ups = self
            .metrics
            .scale_events
            .with_label_values(&[labels[0], labels[1], "up"]);
        let downs = self
            .metrics
            .scale_events
            .with_label_values(&[labels[0], labels[1], "down"]);
        let fixed = self.initial() as usize;
        let mut busy = BusyShare::new(&chain);
        let mut shutdown = self.shutdown.clone();
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut sample = true;
            tokio::select! {
                _ = ticker.tick() => {}
                // A request started waiting: only news while nothing is up or starting
                // (scaling from zero); otherwise the next tick's sample sees it.
                _ = st.activate.notified(), if decider.is_some() => {
                    if !self.active().is_empty() {
                        continue;
                    }
                }
                // A roll in progress is checked often, so each replacement follows the
                // previous one's ready message closely.
                _ = tokio::time::sleep(ROLL_POLL), if self.rolling.is_some() => sample = false,
                Some(roll) = self.rolls.recv(), if self.rolling.is_none() => {
                    self.begin_roll(roll);
                    sample = false;
                }
                _ = crate::supervisor::stopping(&mut shutdown) => return,
            }
            self.reclaim();
            self.advance_roll();
            let backing_off = self.retry_at.is_some_and(|at| Instant::now() < at);
            let Some(decider) = &mut decider else {
                // A fixed count: replace what a roll that was undone took down.
                while self.rolling.is_none()
                    && !backing_off
                    && self.active().len() < fixed
                    && self.scale_up_one()
                {}
                continue;
            };
            if !sample {
                continue;
            }
            let concurrency = busy.concurrency(&chain, stage);
            let ready = chain.serving_instances(stage) as u32;
            let decision = decider.observe(Instant::now(), concurrency, ready);
            desired_gauge.set(i64::from(decision.desired));
            panic_gauge.set(i64::from(decision.panicking));
            let active = self.active().len() as u32;
            // What peers run and what runs for peers (nothing without a cluster).
            let desired = self.peers_tick(decision.desired, active, backing_off);
            if desired > active && !backing_off {
                for _ in active..desired {
                    // Later ticks look at how it went; a failed start is logged by its
                    // supervisor and its slot is reclaimed.
                    if self.active().len() >= self.max() || !self.scale_up_one() {
                        break;
                    }
                    ups.inc();
                }
                tracing::debug!(chain = %labels[0], function = %labels[1],
                    from = active, to = desired, panicking = decision.panicking,
                    concurrency, "scaling up");
            } else if desired < active && self.rolling.is_none() {
                // (Not during a roll: its extra instance is the roll's, and goes with it.)
                for _ in desired..active {
                    if !self.retire_one() {
                        break;
                    }
                    downs.inc();
                }
                tracing::debug!(chain = %labels[0], function = %labels[1],
                    from = active, to = desired, concurrency, "scaling down");
            }
        }
    }

    /// Starts a roll to `roll.generation`: from now on every start uses it.
    fn begin_roll(&mut self, roll: Roll) {
        let old = std::mem::replace(&mut self.generation, roll.generation);
        self.rolling = Some(Rolling {
            old,
            done: roll.done,
            step: None,
            moved: 0,
        });
    }

    /// Moves a roll on as far as it can go now. Each old instance is replaced in turn: the
    /// new instance starts (in a free slot when there is one, else in the old one's slot,
    /// which retires first) and is ready before the old one retires, so requests are served
    /// or wait throughout and none fails. If a new instance does not start, the roll is
    /// undone: the pool goes back to the old generation, the new instances retire, and the
    /// pool (the autoscaler, or a fixed count's top-up) starts old ones again.
    fn advance_roll(&mut self) {
        loop {
            let Some(rolling) = self.rolling.as_mut() else {
                return;
            };
            let old_number = rolling.old.number;
            let Some(step) = rolling.step.as_mut() else {
                let next = self.active().into_iter().find(|&i| {
                    self.slots[i]
                        .as_ref()
                        .is_some_and(|s| s.generation == old_number)
                });
                let Some(old_slot) = next else {
                    // Nothing runs from the old generation any more: its zygote, and with it
                    // its image and compiled module, goes (instances still draining were
                    // forked already and need neither).
                    let rolling = self.rolling.take().expect("checked");
                    rolling.old.stop.send_replace(true);
                    let _ = rolling.done.send(Ok(rolling.moved));
                    return;
                };
                let surge = self.slots.iter().any(Option::is_none);
                let first = if surge {
                    self.spawn_in_free_slot().map(|(_, first)| first)
                } else {
                    // No free slot: the old instance retires first; requests wait the
                    // fork's millisecond for its successor.
                    if let Some(s) = &self.slots[old_slot] {
                        let _ = s.retire.send(true);
                    }
                    None
                };
                let rolling = self.rolling.as_mut().expect("checked");
                rolling.step = Some(RollStep {
                    old_slot,
                    surge,
                    first,
                    since: Instant::now(),
                });
                continue;
            };
            if step.first.is_none() {
                // Waiting for the retired old instance's slot to free up.
                if self.slots[step.old_slot].is_some() {
                    return;
                }
                let old_slot = step.old_slot;
                let first = self.spawn_in_free_slot().map(|(_, first)| first);
                let step = self
                    .rolling
                    .as_mut()
                    .and_then(|r| r.step.as_mut())
                    .expect("checked");
                match first {
                    Some(first) => step.first = Some(first),
                    None => {
                        let why = format!("no free instance slot after slot {old_slot} retired");
                        return self.undo_roll(why);
                    }
                }
                continue;
            }
            let first = step.first.as_mut().expect("checked");
            let outcome = match first.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => {
                    if step.since.elapsed() < crate::supervisor::READY_TIMEOUT {
                        return;
                    }
                    Err("not ready in time".to_string())
                }
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(oneshot::error::TryRecvError::Closed) => {
                    Err("its supervisor ended before it was ready".to_string())
                }
            };
            match outcome {
                Ok(()) => {
                    if step.surge
                        && let Some(s) = &self.slots[step.old_slot]
                    {
                        let _ = s.retire.send(true);
                    }
                    let rolling = self.rolling.as_mut().expect("checked");
                    rolling.step = None;
                    rolling.moved += 1;
                }
                Err(why) => return self.undo_roll(why),
            }
        }
    }

    fn undo_roll(&mut self, why: String) {
        let Some(rolling) = self.rolling.take() else {
            return;
        };
        let failed = std::mem::replace(&mut self.generation, rolling.old);
        failed.stop.send_replace(true);
        for slot in self.slots.iter().flatten() {
            if slot.generation == failed.number {
                let _ = slot.retire.send(true);
            }
        }
        let _ = rolling.done.send(Err(format!(
            "a new instance did not start ({why}); the function keeps its old module"
        )));
    }
}

/// How often a roll in progress is checked.
const ROLL_POLL: Duration = Duration::from_millis(5);

/// Per-stage concurrency. The gateway sees exactly which stage holds each request when it
/// routes every hop (userspace). With the kernel dataplane it sees only the first send, so a
/// multi-function chain's requests are shared among its stages by how much of the chain's
/// busy time each stage had since the last sample (Little's law: time spent is what holds
/// concurrency), read from the instances' statistics pages.
struct BusyShare {
    last_busy: Vec<f64>,
    /// Requests turned away (wait queue full) as of the last sample, per stage.
    last_refused: Vec<u64>,
}

impl BusyShare {
    fn new(chain: &ChainRuntime) -> Self {
        BusyShare {
            last_busy: stage_busy(chain),
            last_refused: chain
                .load
                .iter()
                .map(|l| l.wait_refused.load(Ordering::Relaxed))
                .collect(),
        }
    }

    fn concurrency(&mut self, chain: &ChainRuntime, stage: usize) -> f64 {
        let load = &chain.load[stage];
        // Requests refused since the last sample wanted an instance as much as waiting ones.
        let refused = load.wait_refused.load(Ordering::Relaxed);
        let turned_away = refused.saturating_sub(self.last_refused[stage]) as f64;
        self.last_refused[stage] = refused;
        let waiting = load.waiting.load(Ordering::Relaxed) as f64 + turned_away;
        if chain.kernel.is_none() || chain.stages.len() == 1 {
            return load.held() as f64 + waiting;
        }
        let busy = stage_busy(chain);
        let deltas: Vec<f64> = busy
            .iter()
            .zip(&self.last_busy)
            .map(|(now, then)| (now - then).max(0.0))
            .collect();
        self.last_busy = busy;
        let total: f64 = deltas.iter().sum();
        let share = if total > 0.0 {
            deltas[stage] / total
        } else {
            1.0 / chain.stages.len() as f64
        };
        let held: usize = chain.load.iter().map(StageLoad::held).sum();
        held as f64 * share + waiting
    }
}

/// Seconds each stage's instances have spent running calls, summed over its instances.
fn stage_busy(chain: &ChainRuntime) -> Vec<f64> {
    chain
        .stages
        .iter()
        .map(|st| {
            st.instances
                .iter()
                .map(|i| i.stats.snapshot().exec_sum_seconds)
                .sum()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn knobs() -> Autoscale {
        Autoscale {
            target: 1,
            stable_window: Duration::from_secs(6),
            panic_window: Duration::from_millis(600),
            scale_down_delay: Duration::from_secs(2),
            // Whole instances, so the arithmetic below reads plainly.
            utilization_percent: 100,
            concurrency: 4,
        }
    }

    /// Feeds `concurrency` every tick for `for_` and returns the last decision.
    fn run(
        d: &mut Decider,
        clock: &mut Instant,
        for_: Duration,
        concurrency: f64,
        ready: impl Fn(u32) -> u32,
    ) -> Decision {
        let mut last = d.observe(*clock, concurrency, ready(d.last));
        let end = *clock + for_;
        while *clock < end {
            *clock += TICK;
            last = d.observe(*clock, concurrency, ready(last.desired));
        }
        last
    }

    #[test]
    fn a_request_waiting_with_no_instance_asks_for_one_at_once() {
        let mut d = Decider::new(knobs(), 0, 8);
        let now = Instant::now();
        assert_eq!(
            d.observe(now, 0.0, 0).desired,
            0,
            "idle at zero stays at zero"
        );
        let first = d.observe(now + TICK, 1.0, 0);
        assert_eq!(first.desired, 1);
        assert!(first.panicking, "scaling from zero is a burst");
    }

    #[test]
    fn a_tenfold_burst_panics_up_to_the_panic_window_average_and_is_clamped_at_max() {
        let mut d = Decider::new(knobs(), 1, 16);
        let mut clock = Instant::now();
        let steady = run(&mut d, &mut clock, Duration::from_secs(10), 1.0, |n| n);
        assert_eq!((steady.desired, steady.panicking), (1, false));
        // Ten times the load: within one panic window the count follows it, not the slow
        // stable average.
        let burst = run(&mut d, &mut clock, Duration::from_millis(600), 10.0, |n| n);
        assert!(burst.panicking);
        assert_eq!(burst.desired, 10, "{burst:?}");
        assert!(
            burst.stable_average < 3.0,
            "the stable window lags: {burst:?}"
        );
        let more = run(&mut d, &mut clock, Duration::from_secs(1), 40.0, |n| n);
        assert_eq!(more.desired, 16, "clamped at max");
    }

    #[test]
    fn panic_mode_never_scales_down_and_ends_a_stable_window_after_the_burst() {
        let mut d = Decider::new(knobs(), 1, 16);
        let mut clock = Instant::now();
        run(&mut d, &mut clock, Duration::from_secs(1), 8.0, |_| 1);
        let dip = run(&mut d, &mut clock, Duration::from_secs(2), 2.0, |n| n);
        assert!(dip.panicking);
        assert_eq!(dip.desired, 8, "no scale-down while panicking");
        let later = run(&mut d, &mut clock, Duration::from_secs(10), 2.0, |n| n);
        assert!(!later.panicking);
        assert_eq!(later.desired, 2, "back to the stable average");
    }

    #[test]
    fn a_lower_count_waits_for_the_scale_down_delay_and_min_zero_goes_to_zero() {
        let knobs = Autoscale {
            panic_window: Duration::from_millis(100),
            stable_window: Duration::from_millis(1000),
            ..knobs()
        };
        let mut d = Decider::new(knobs, 0, 8);
        let mut clock = Instant::now();
        // Steady at 4 (ready instances keep up, so no panic after the first window).
        run(&mut d, &mut clock, Duration::from_secs(3), 4.0, |_| 4);
        let mut went_to_zero_at = None;
        let idle_from = clock;
        for _ in 0..200 {
            clock += TICK;
            let dd = d.observe(clock, 0.0, 4);
            if dd.desired == 0 {
                went_to_zero_at = Some(clock.duration_since(idle_from));
                break;
            }
            if clock.duration_since(idle_from) < Duration::from_secs(2) {
                assert_eq!(
                    dd.desired, 4,
                    "held for the scale-down delay after the last need"
                );
            }
        }
        let took = went_to_zero_at.expect("reaches zero");
        // The stable window must empty of load (1 s), then the delay (2 s) must pass.
        assert!(
            took >= Duration::from_secs(2) && took <= Duration::from_millis(3200),
            "{took:?}"
        );
    }

    #[test]
    fn utilization_leaves_headroom_above_the_load() {
        let knobs = Autoscale {
            utilization_percent: 70,
            ..knobs()
        };
        let mut d = Decider::new(knobs, 1, 16);
        let mut clock = Instant::now();
        // 4.6 requests in flight (2,000 req/s of 2.3 ms): 5 instances would run at 92%.
        let steady = run(&mut d, &mut clock, Duration::from_secs(8), 4.6, |n| n);
        assert_eq!(steady.desired, 7, "ceil(4.6 / 0.7)");
    }

    #[test]
    fn min_is_kept_and_target_divides_concurrency() {
        let knobs = Autoscale {
            target: 4,
            ..knobs()
        };
        let mut d = Decider::new(knobs, 2, 8);
        let mut clock = Instant::now();
        let idle = run(&mut d, &mut clock, Duration::from_secs(8), 0.0, |n| n);
        assert_eq!(idle.desired, 2);
        let busy = run(&mut d, &mut clock, Duration::from_secs(8), 20.0, |n| n);
        assert_eq!(busy.desired, 5, "20 in flight / 4 per instance");
    }
}
