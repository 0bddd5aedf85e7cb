//! Batches formed by load, for writers that pay per statement or per commit rather than per row
//! (the engine's group commit, the API's order intake).
//!
//! [`run`] hands what arrives on a queue to `handle` in batches: while `concurrent` batches are
//! under way new items queue, and the next batch takes everything queued (up to `max`). At low
//! load a batch is one item and leaves at once — no timer, no added latency; under load the
//! batches grow by themselves.
//!
//! [`Batcher`] is the handle writers use: [`Batcher::submit`] queues one item with the sender
//! of its answer, and the writer's batch function answers each item of its batch.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

/// An item in a batch, and where its answer goes.
pub type Pending<T, R> = (T, oneshot::Sender<R>);

/// Queues items for a batch function and awaits each one's answer; cheap to clone.
pub struct Batcher<T, R> {
    queue: mpsc::UnboundedSender<Pending<T, R>>,
}

impl<T, R> Clone for Batcher<T, R> {
    fn clone(&self) -> Self {
        Batcher { queue: self.queue.clone() }
    }
}

impl<T, R> std::fmt::Debug for Batcher<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").field("closed", &self.queue.is_closed()).finish()
    }
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts [`run`] on the current runtime with `handle` as the batch function; `handle` must
    /// answer every item of its batch (an item whose sender is dropped gets `None`).
    pub fn start<F, Fut>(concurrent: usize, max: usize, handle: F) -> Self
    where
        F: Fn(Vec<Pending<T, R>>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, concurrent, max, handle));
        Batcher { queue }
    }

    /// Queues `item` for the next batch and waits for its answer; `None` when the batching
    /// task is gone (its runtime is shutting down) or dropped the item unanswered.
    pub async fn submit(&self, item: T) -> Option<R> {
        let (reply, answer) = oneshot::channel();
        self.queue.send((item, reply)).ok()?;
        answer.await.ok()
    }
}

/// Runs until every sender of `queue` is dropped; each batch runs as its own task.
pub async fn run<T, F, Fut>(mut queue: mpsc::UnboundedReceiver<T>, concurrent: usize, max: usize, handle: F)
where
    T: Send + 'static,
    F: Fn(Vec<T>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(concurrent.max(1)));
    while let Some(first) = queue.recv().await {
        let slot = slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        let mut batch = vec![first];
        while batch.len() < max
            && let Ok(next) = queue.try_recv()
        {
            batch.push(next);
        }
        let work = handle(batch);
        tokio::spawn(async move {
            work.await;
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn what_queues_while_the_slots_are_busy_goes_in_one_batch_of_at_most_max() {
        let (tx, rx) = mpsc::unbounded_channel();
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
        let recorded = sizes.clone();
        tokio::spawn(run(rx, 1, 3, move |batch: Vec<u32>| {
            recorded.lock().expect("lock").push(batch);
            let mut gate = gate_rx.clone();
            async move {
                let _ = gate.wait_for(|open| *open).await;
            }
        }));
        for i in 0..6 {
            tx.send(i).expect("queued");
        }
        drop(tx);
        // The first batch holds the only slot until the gate opens: the rest waits together.
        tokio::task::yield_now().await;
        gate_tx.send(true).expect("gate");
        for _ in 0..100 {
            if sizes.lock().expect("lock").iter().map(Vec::len).sum::<usize>() == 6 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(*sizes.lock().expect("lock"), vec![vec![0, 1, 2], vec![3, 4, 5]]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn each_submitted_item_gets_its_own_answer() {
        let doubler = Batcher::start(2, 4, |batch: Vec<Pending<u32, u32>>| async move {
            for (item, reply) in batch {
                let _ = reply.send(item * 2);
            }
        });
        let answers = futures::future::join_all((0..10).map(|i| doubler.submit(i))).await;
        assert_eq!(answers, (0..10).map(|i| Some(i * 2)).collect::<Vec<_>>());
        let silent = Batcher::start(1, 1, |_batch: Vec<Pending<u32, u32>>| async {});
        assert_eq!(silent.submit(1).await, None, "an item dropped unanswered gets None");
    }
}
