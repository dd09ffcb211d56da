//! The outbound queue of one worker instance: descriptors the gateway has addressed to it and
//! its writer task has not yet put in its socket.
//!
//! Bounded, so an instance that stops reading applies backpressure (the router sends to
//! another instance, or answers 503) instead of growing the gateway's memory. Producers are
//! the HTTP handlers and socket readers on any runtime thread; the one consumer is the
//! instance's writer task, which takes whole batches per wakeup so a burst leaves in one
//! write. The slots of a [`crossbeam_queue::ArrayQueue`] are allocated once, so a push
//! neither allocates nor takes a lock.

use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_queue::ArrayQueue;
use proto::Descriptor;
use tokio::sync::Notify;

/// Descriptors one instance may have queued in the gateway. The writer drains up to
/// [`crate::dataplane::WRITE_BATCH`] per write, so this is several writes' worth: a healthy
/// instance never has this many waiting, while one that stalled turns new work away within a
/// few milliseconds of load rather than after its requests' deadlines.
pub const INSTANCE_QUEUE_CAPACITY: usize = 256;

/// Why a descriptor was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The instance has [`INSTANCE_QUEUE_CAPACITY`] descriptors waiting already.
    Full,
    /// The instance went down; its writer has stopped.
    Closed,
}

pub struct InstanceQueue {
    items: ArrayQueue<Descriptor>,
    /// Wakes the writer. `notify_one` stores a permit when the writer is not waiting yet, so
    /// a push between its last empty pop and its next wait is not missed.
    ready: Notify,
    closed: AtomicBool,
    writer_failed: AtomicBool,
    failed: Notify,
}

impl InstanceQueue {
    pub fn new(capacity: usize) -> Self {
        InstanceQueue {
            items: ArrayQueue::new(capacity),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
            writer_failed: AtomicBool::new(false),
            failed: Notify::new(),
        }
    }

    pub fn push(&self, desc: Descriptor) -> Result<(), PushError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PushError::Closed);
        }
        self.items.push(desc).map_err(|_| PushError::Full)?;
        self.ready.notify_one();
        Ok(())
    }

    /// True when a push would find no room now.
    pub fn is_full(&self) -> bool {
        self.items.is_full()
    }

    /// Descriptors waiting for the writer.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// True once the queue was closed (its instance went down or its writer failed).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Stops the writer once it has taken what is queued; later pushes fail with `Closed`.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    /// The writer could not write to the instance's socket while the instance may still
    /// run: closes the queue and wakes [`InstanceQueue::failed`].
    pub fn writer_failed(&self) {
        self.writer_failed.store(true, Ordering::Release);
        self.close();
        self.failed.notify_waiters();
    }

    /// Resolves once [`InstanceQueue::writer_failed`] was called.
    pub async fn failed(&self) {
        loop {
            // Created before the check: a notify_waiters in between still wakes it.
            let woken = self.failed.notified();
            if self.writer_failed.load(Ordering::Acquire) {
                return;
            }
            woken.await;
        }
    }

    /// Waits until at least one descriptor is queued, then appends up to `max` of them to
    /// `out` as wire bytes. Returns false, appending nothing, once the queue is closed and
    /// drained. For the one consumer only.
    pub async fn pop_batch(&self, out: &mut Vec<u8>, max: usize) -> bool {
        loop {
            let mut taken = 0;
            while taken < max {
                let Some(d) = self.items.pop() else { break };
                out.extend_from_slice(&d.to_bytes());
                taken += 1;
            }
            if taken > 0 {
                return true;
            }
            if self.closed.load(Ordering::Acquire) {
                return false;
            }
            self.ready.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn desc(request_id: u64) -> Descriptor {
        Descriptor {
            request_id,
            ..Descriptor::default()
        }
    }

    #[tokio::test]
    async fn a_failed_writer_wakes_whoever_waits_for_it_and_closes_the_queue() {
        let q = Arc::new(InstanceQueue::new(4));
        let waiter = {
            let q = Arc::clone(&q);
            tokio::spawn(async move { q.failed().await })
        };
        tokio::task::yield_now().await;
        q.close();
        assert!(!waiter.is_finished(), "a plain close is not a failure");
        q.writer_failed();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert!(q.is_closed());
        // And one that starts waiting afterwards returns at once.
        tokio::time::timeout(Duration::from_secs(5), q.failed())
            .await
            .expect("already failed");
    }

    #[test]
    fn full_queue_refuses_instead_of_growing() {
        let q = InstanceQueue::new(2);
        assert_eq!(q.push(desc(1)), Ok(()));
        assert_eq!(q.push(desc(2)), Ok(()));
        assert!(q.is_full());
        assert_eq!(q.push(desc(3)), Err(PushError::Full));
    }

    #[tokio::test]
    async fn batches_come_out_in_order_and_bounded() {
        let q = InstanceQueue::new(8);
        for id in 1..=5 {
            q.push(desc(id)).unwrap();
        }
        let mut out = Vec::new();
        assert!(q.pop_batch(&mut out, 3).await);
        assert_eq!(out.len(), 3 * Descriptor::SIZE);
        let ids: Vec<u64> = out
            .chunks(Descriptor::SIZE)
            .map(|c| Descriptor::from_bytes(c.try_into().unwrap()).request_id)
            .collect();
        assert_eq!(ids, [1, 2, 3]);
        out.clear();
        assert!(q.pop_batch(&mut out, 64).await);
        assert_eq!(out.len(), 2 * Descriptor::SIZE);
    }

    #[tokio::test]
    async fn a_push_wakes_a_waiting_writer() {
        let q = Arc::new(InstanceQueue::new(4));
        let writer = {
            let q = Arc::clone(&q);
            tokio::spawn(async move {
                let mut out = Vec::new();
                q.pop_batch(&mut out, 64).await.then_some(out.len())
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        q.push(desc(7)).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("writer woke")
            .unwrap();
        assert_eq!(got, Some(Descriptor::SIZE));
    }

    #[tokio::test]
    async fn close_drains_then_stops_the_writer_and_refuses_pushes() {
        let q = InstanceQueue::new(4);
        q.push(desc(1)).unwrap();
        q.close();
        assert_eq!(q.push(desc(2)), Err(PushError::Closed));
        let mut out = Vec::new();
        assert!(
            q.pop_batch(&mut out, 64).await,
            "what was queued is still written"
        );
        out.clear();
        assert!(!q.pop_batch(&mut out, 64).await);
        assert!(out.is_empty());
    }
}
