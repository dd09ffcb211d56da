//! A pool's part in scale-out onto peers (`crate::peers`), kept apart from the autoscaler.
//!
//! - **Origin** (the pool has a remote share): over the node's budget, the pool keeps the
//!   instances it has — at least one while requests wait for it here, since those are
//!   already in this node's arena — and wants the rest of the autoscaler's count on peers.
//!   Under budget it starts them all here, and the remote count only falls as local instances
//!   come up (never rises), so capacity never drops while it moves home.
//! - **Peer** (the node has a grant board): the pool runs each origin's granted instances in
//!   its own free slots, resumed from the origin's image, counts them towards what its own
//!   autoscaler wants (the forwarded load they serve is in its concurrency) and reports how
//!   many serve. They are never retired by the autoscaler, only when the grant shrinks
//!   (older images first) or lapses.

use std::sync::atomic::Ordering::Relaxed;

use super::Pool;

/// Which grant an instance runs for: origin node and image handle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct GrantTag {
    origin: String,
    handle: u64,
}

impl Pool {
    /// Returns how many instances this node should run of its own, given the autoscaler's
    /// `desired` and the `active` own ones; tells the remote share and runs grants.
    pub(super) fn peers_tick(&mut self, desired: u32, active: u32, backing_off: bool) -> u32 {
        let granted = self.run_grants(backing_off);
        let mut local = desired;
        if granted > 0 {
            // The granted instances serve part of the load the autoscaler counted.
            let min = self.chain.plan.stages[self.stage].function.instances.min;
            local = desired.saturating_sub(granted).max(min);
        }
        let Some(share) = self.peers.share.clone() else {
            return local;
        };
        let links = &self.chain.stages[self.stage].instances;
        let serving = self
            .slots
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                s.as_ref().is_some_and(|s| s.grant.is_none()) && links[*i].is_serving()
            })
            .count() as u32;
        let (local, remote) = split(Split {
            desired: local,
            active,
            serving,
            waiting: self.chain.load[self.stage].waiting.load(Relaxed) > 0,
            remote_ready: share.ready_total(),
            over: self.peers.budget.as_ref().is_some_and(|b| b.over()),
        });
        share.want(remote);
        local
    }

    /// Starts and retires instances for the grants peers hold on this node; returns how
    /// many run for them (starting or serving, not retiring). An origin's instances of an
    /// older image of its (it prepares a fresh one as the lease nears its end) keep
    /// running; new ones start from the grant's current image, and the older go first when
    /// the grant shrinks.
    fn run_grants(&mut self, backing_off: bool) -> u32 {
        let Some(board) = self.peers.grants.clone() else {
            return 0;
        };
        let (chain, stage) = (self.peers.chain, self.peers.stage);
        if self.peers.hashed_generation != self.generation.number {
            // Reloaded: grants must be of the module this node runs now.
            match module_hash(&self.generation.inputs.module) {
                Ok(hash) => board.set_module_hash(chain, stage, hash),
                Err(e) => tracing::warn!("hashing the reloaded module for peer grants: {e}"),
            }
            self.peers.hashed_generation = self.generation.number;
        }
        let wanted = board.wanted(chain, stage);
        // Retire what no grant wants any more (released, lapsed, or of an image of an
        // origin that restarted since).
        for slot in self.slots.iter().flatten() {
            if let Some(tag) = &slot.grant
                && !wanted
                    .iter()
                    .any(|w| w.origin == tag.origin && w.handles.contains(&tag.handle))
            {
                let _ = slot.retire.send(true);
            }
        }
        let mut total = 0;
        for w in &wanted {
            let of_origin = |pool: &Pool, live_only: bool| -> Vec<usize> {
                pool.slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| {
                        s.as_ref().is_some_and(|s| {
                            s.grant.as_ref().is_some_and(|t| {
                                t.origin == w.origin && w.handles.contains(&t.handle)
                            }) && !s.task.is_finished()
                                && (live_only || !*s.retire.borrow())
                        })
                    })
                    .map(|(i, _)| i)
                    .collect()
            };
            let running = of_origin(self, false);
            let have = running.len() as u32;
            if have < w.instances && !backing_off {
                let tag = GrantTag {
                    origin: w.origin.clone(),
                    handle: w.handle,
                };
                for _ in have..w.instances {
                    let grant = Some((tag.clone(), std::sync::Arc::clone(&w.fds)));
                    let Some((instance, first)) = self.spawn_slot(grant) else {
                        break;
                    };
                    if let Some(s) = &mut self.slots[instance] {
                        s.first = Some(first);
                    }
                    tracing::info!(chain = %self.chain.plan.spec.name,
                        function = %self.chain.stages[self.stage].name, instance,
                        origin = %w.origin, "starting an instance for a peer, resumed from its image");
                }
            } else if have > w.instances {
                // Older images first, then the highest slots.
                let mut victims = running.clone();
                victims.sort_by_key(|&i| {
                    let current = self.slots[i]
                        .as_ref()
                        .and_then(|s| s.grant.as_ref())
                        .is_some_and(|t| t.handle == w.handle);
                    (current, std::cmp::Reverse(i))
                });
                for &i in victims.iter().take((have - w.instances) as usize) {
                    if let Some(s) = &self.slots[i] {
                        let _ = s.retire.send(true);
                    }
                }
            }
            let running = of_origin(self, false);
            let links = &self.chain.stages[self.stage].instances;
            let ready = running.iter().filter(|&&i| links[i].is_serving()).count() as u32;
            let live = of_origin(self, true).len() as u32;
            board.report(chain, stage, &w.origin, ready, live);
            total += running.len() as u32;
        }
        let own = self.active().len() as u32;
        board.report_own(chain, stage, own);
        total
    }
}

/// SHA-256 of a sealed module memfd's bytes, read with `pread`: the file offset is shared
/// with every process handed this memfd, so it is never moved.
fn module_hash(module: &std::os::fd::OwnedFd) -> std::io::Result<[u8; 32]> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::from(module.try_clone()?);
    let mut bytes = vec![0u8; file.metadata()?.len() as usize];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(proto::image::module_hash(&bytes))
}

/// What the origin's split between here and peers looks at.
#[derive(Debug, Clone, Copy)]
struct Split {
    /// The autoscaler's count.
    desired: u32,
    /// This node's instances starting or serving, not retiring.
    active: u32,
    /// Those of them serving.
    serving: u32,
    /// Requests wait here for an instance of the function.
    waiting: bool,
    /// Instances serving on peers.
    remote_ready: u32,
    /// The node is over its budget.
    over: bool,
}

/// (instances to run here, instances to want on peers).
///
/// Over budget: no new local instance, but at least one while requests wait here (they
/// are already in this node's arena); peers get the rest. Under budget: everything here,
/// and the peers' count only falls, as local instances come up to serve.
fn split(s: Split) -> (u32, u32) {
    if s.over {
        let local = s.desired.min(s.active.max(u32::from(s.waiting)));
        (local, s.desired - local)
    } else {
        let remote = s.desired.saturating_sub(s.serving).min(s.remote_ready);
        (s.desired, remote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(desired: u32, active: u32, serving: u32, remote_ready: u32, over: bool) -> Split {
        Split {
            desired,
            active,
            serving,
            waiting: false,
            remote_ready,
            over,
        }
    }

    #[test]
    fn over_budget_keeps_what_runs_here_and_asks_peers_for_the_rest() {
        assert_eq!(split(at(8, 1, 1, 0, true)), (1, 7));
        // Falling load shrinks the remote share first.
        assert_eq!(split(at(3, 1, 1, 7, true)), (1, 2));
        assert_eq!(split(at(1, 1, 1, 2, true)), (1, 0));
        // Never retires a local instance for the budget.
        assert_eq!(split(at(2, 4, 4, 0, true)), (2, 0));
        assert_eq!(split(at(6, 4, 4, 0, true)), (4, 2));
    }

    #[test]
    fn over_budget_at_zero_starts_one_here_for_the_requests_already_waiting() {
        let waiting = Split {
            waiting: true,
            ..at(3, 0, 0, 0, true)
        };
        assert_eq!(split(waiting), (1, 2));
        assert_eq!(
            split(at(3, 0, 0, 0, true)),
            (0, 3),
            "nothing waits here: all remote"
        );
    }

    #[test]
    fn back_under_budget_capacity_moves_home_without_a_gap() {
        // 1 here, 7 on the peer: all 8 start here, the peer keeps 7 until they serve.
        assert_eq!(split(at(8, 1, 1, 7, false)), (8, 7));
        assert_eq!(split(at(8, 8, 4, 7, false)), (8, 4));
        assert_eq!(split(at(8, 8, 8, 4, false)), (8, 0));
        // Under budget the remote share never grows.
        assert_eq!(split(at(8, 1, 1, 0, false)), (8, 0));
    }
}
