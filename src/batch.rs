//! Natural batching: the items of concurrent callers gathered into one store call.
//!
//! A [`Batcher`] lets a bounded number of calls run at once. While they are busy, new items
//! wait; the next call takes every item that waited (up to a maximum). There is no timer: an
//! item that finds the batcher idle runs at once, in its caller's task, so batching adds no
//! latency when load is light and grows with the load. Each item gets its own
//! answer; a call that fails fails the items it carried, no others.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::{Error, Result};

type Pending<I, O> = (I, oneshot::Sender<Result<O>>);
type Answers<O> = Pin<Box<dyn Future<Output = Result<Vec<Result<O>>>> + Send>>;
type Runner<I, O> = Arc<dyn Fn(Vec<I>) -> Answers<O> + Send + Sync>;

/// Gathers items of type `I` into calls answering one `O` per item.
pub struct Batcher<I, O> {
    tx: mpsc::Sender<Pending<I, O>>,
    permits: Arc<Semaphore>,
    /// Call slots in all.
    calls: usize,
    run: Runner<I, O>,
}

impl<I, O> std::fmt::Debug for Batcher<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("waiting", &(self.tx.max_capacity() - self.tx.capacity()))
            .field("free_calls", &self.permits.available_permits())
            .finish()
    }
}

/// One answer per item, or the call's error for each.
fn spread<O>(n: usize, answers: Result<Vec<Result<O>>>) -> Vec<Result<O>> {
    match answers {
        Ok(answers) if answers.len() == n => answers,
        Ok(answers) => {
            let err = Error::Internal(format!("a batch of {n} got {} answers", answers.len()));
            (0..n).map(|_| Err(err.clone())).collect()
        }
        Err(err) => (0..n).map(|_| Err(err.clone())).collect(),
    }
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts the gathering task (on the current tokio runtime). `run` takes a batch, in
    /// submission order, and answers one result per item in the same order, or one error for
    /// all of them. At most `max_in_flight` calls run at once, each with at most `max_batch`
    /// items.
    pub fn spawn<F, Fut>(max_batch: usize, max_in_flight: usize, run: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Result<O>>>> + Send + 'static,
    {
        let max_batch = max_batch.max(1);
        let (tx, mut rx) = mpsc::channel::<Pending<I, O>>(max_batch * max_in_flight.max(1) * 4);
        let permits = Arc::new(Semaphore::new(max_in_flight.max(1)));
        let run: Runner<I, O> = Arc::new(move |items| Box::pin(run(items)));
        let (gatherer_permits, gatherer_run) = (Arc::clone(&permits), Arc::clone(&run));
        tokio::spawn(async move {
            let (permits, run) = (gatherer_permits, gatherer_run);
            loop {
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                    return;
                };
                let Some(first) = rx.recv().await else {
                    return;
                };
                let mut batch = Vec::with_capacity((1 + rx.len()).min(max_batch));
                batch.push(first);
                while batch.len() < max_batch {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let run = Arc::clone(&run);
                tokio::spawn(async move {
                    let (items, replies): (Vec<I>, Vec<_>) = batch.into_iter().unzip();
                    let answers = spread(items.len(), run(items).await);
                    drop(permit);
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        // A caller that gave up no longer listens.
                        let _ = reply.send(answer);
                    }
                });
            }
        });
        Self {
            tx,
            permits,
            calls: max_in_flight.max(1),
            run,
        }
    }

    /// Submits one item and waits for its answer.
    pub async fn submit(&self, item: I) -> Result<O> {
        // Idle (nothing waiting, no call running; the gathering task holds one slot while it
        // waits): no one to gather with, go now. Once a call runs, items gather behind it.
        if self.tx.capacity() == self.tx.max_capacity()
            && self.permits.available_permits() + 1 == self.calls
            && let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned()
        {
            let answer = spread(1, (self.run)(vec![item]).await).pop();
            drop(permit);
            return answer.unwrap_or_else(|| Err(Error::Internal("a call gave no answer".into())));
        }
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((item, reply))
            .await
            .map_err(|_| Error::Internal("the batcher has stopped".into()))?;
        answer
            .await
            .map_err(|_| Error::Internal("a batch ended without an answer".into()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn concurrent_items_share_calls_and_each_gets_its_own_answer() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let batcher = Arc::new(Batcher::spawn(16, 1, move |items: Vec<u32>| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                tokio::task::yield_now().await;
                Ok(items
                    .into_iter()
                    .map(|i| {
                        if i % 10 == 7 {
                            Err(Error::invalid("item", format!("{i} refused")))
                        } else {
                            Ok(i * 2)
                        }
                    })
                    .collect())
            }
        }));
        let answers = futures::future::join_all((0..100u32).map(|i| {
            let batcher = Arc::clone(&batcher);
            async move { (i, batcher.submit(i).await) }
        }))
        .await;
        for (i, answer) in answers {
            match answer {
                Ok(doubled) => assert_eq!(doubled, i * 2),
                Err(err) => {
                    assert_eq!(i % 10, 7, "only the refused items fail");
                    assert!(err.to_string().contains(&format!("{i} refused")));
                }
            }
        }
        let calls = calls.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            (7..100).contains(&calls),
            "100 items in {calls} calls of at most 16"
        );
    }

    #[tokio::test]
    async fn a_lone_item_on_an_idle_batcher_runs_in_its_callers_task() {
        let batcher = Arc::new(Batcher::spawn(8, 2, |items: Vec<u32>| async move {
            Ok(items
                .into_iter()
                .map(|_| Ok(tokio::task::try_id()))
                .collect())
        }));
        // The gathering task takes its call slot, then waits for items.
        for _ in 0..1000 {
            if batcher.permits.available_permits() == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(batcher.permits.available_permits(), 1, "the gatherer waits");
        let caller = tokio::spawn(async move {
            (
                tokio::task::try_id(),
                batcher.submit(7).await.ok().flatten(),
            )
        });
        let (caller_task, run_task) = caller.await.expect("the caller task");
        assert!(caller_task.is_some());
        assert_eq!(run_task, caller_task, "no hop to another task");
    }

    #[tokio::test]
    async fn a_failed_call_fails_only_its_items() {
        let batcher = Batcher::spawn(4, 2, |items: Vec<u32>| async move {
            if items.contains(&0) {
                Err(Error::Unavailable("down".into()))
            } else {
                Ok(items.into_iter().map(Ok).collect())
            }
        });
        assert!(matches!(
            batcher.submit(0).await,
            Err(Error::Unavailable(_))
        ));
        assert_eq!(batcher.submit(5).await.ok(), Some(5));
    }
}
