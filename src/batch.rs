//! Natural batching: the items of concurrent callers gathered into one store call.
//!
//! A [`Batcher`] lets a bounded number of calls run at once. While they are busy, new items
//! wait; the next call takes every item that waited (up to a maximum). There is no timer: a
//! lone item on an idle batcher goes at once, so batching adds no latency when load is light
//! and grows with the load. Each item gets its own answer; a call that fails fails the items
//! it carried, no others.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::{Error, Result};

type Pending<I, O> = (I, oneshot::Sender<Result<O>>);

/// Gathers items of type `I` into calls answering one `O` per item.
#[derive(Debug)]
pub struct Batcher<I, O> {
    tx: mpsc::Sender<Pending<I, O>>,
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
        let run = Arc::new(run);
        tokio::spawn(async move {
            loop {
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                    return;
                };
                let Some(first) = rx.recv().await else {
                    return;
                };
                let mut batch = vec![first];
                while batch.len() < max_batch {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let run = Arc::clone(&run);
                tokio::spawn(async move {
                    let (items, replies): (Vec<I>, Vec<_>) = batch.into_iter().unzip();
                    let n = items.len();
                    let answers = match run(items).await {
                        Ok(answers) if answers.len() == n => answers,
                        Ok(answers) => {
                            let err = Error::Internal(format!(
                                "a batch of {n} got {} answers",
                                answers.len()
                            ));
                            (0..n).map(|_| Err(err.clone())).collect()
                        }
                        Err(err) => (0..n).map(|_| Err(err.clone())).collect(),
                    };
                    drop(permit);
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        // A caller that gave up no longer listens.
                        let _ = reply.send(answer);
                    }
                });
            }
        });
        Self { tx }
    }

    /// Submits one item and waits for its answer.
    pub async fn submit(&self, item: I) -> Result<O> {
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
