//! Batches formed by load, for writers that pay per statement or per commit rather than per row
//! (the engine's group commit, the API's order intake).
//!
//! [`run`] hands what arrives on a queue to `handle` in batches: while `concurrent` batches are
//! under way new items queue, and the next batch takes everything queued (up to `max`). At low
//! load a batch is one item and leaves at once — no timer, no added latency; under load the
//! batches grow by themselves.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};

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
}
