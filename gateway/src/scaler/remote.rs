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
        let over = self.peers.budget.as_ref().is_some_and(|b| b.over());
        let remote_ready = share.ready_total();
        let remote = if over {
            let waiting = self.chain.load[self.stage].waiting.load(Relaxed) > 0;
            local = local.min(active.max(u32::from(waiting)));
            desired.saturating_sub(local)
        } else {
            // Back under budget: local instances start; the peers' count only shrinks, as
            // the local ones come up.
            let links = &self.chain.stages[self.stage].instances;
            let serving = self
                .slots
                .iter()
                .enumerate()
                .filter(|(i, s)| {
                    s.as_ref().is_some_and(|s| s.grant.is_none()) && links[*i].is_serving()
                })
                .count() as u32;
            desired.saturating_sub(serving).min(remote_ready)
        };
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
            match module_hash(&self.generation.module) {
                Ok(hash) => board.set_module_hash(chain, stage, hash),
                Err(e) => tracing::warn!("hashing the reloaded module for peer grants: {e}"),
            }
            self.peers.hashed_generation = self.generation.number;
        }
        let wanted = board.wanted(chain, stage);
        // Retire what no grant wants any more (released or lapsed).
        for slot in self.slots.iter().flatten() {
            if let Some(tag) = &slot.grant
                && !wanted.iter().any(|w| w.origin == tag.origin)
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
                            s.grant.as_ref().is_some_and(|t| t.origin == w.origin)
                                && !s.task.is_finished()
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
