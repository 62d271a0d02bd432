//! Gathered calls: items of concurrent requests (collected by [`sluice::batch::Batcher`]),
//! possibly for several queues, stored with one call per queue.

use std::future::Future;

use sluice::error::{Error, Result};

/// An item for queue `.1` of project `.0`.
pub type Addressed<T> = (String, String, T);

/// Runs `call` once per queue among `items`, concurrently, each time with that queue's items
/// in their order; answers one result per item, in the order of `items`.
pub async fn per_queue<T, O, F, Fut>(items: Vec<Addressed<T>>, call: F) -> Vec<Result<O>>
where
    F: Fn(String, String, Vec<T>) -> Fut,
    Fut: Future<Output = Vec<Result<O>>>,
{
    let n = items.len();
    // Per queue: project, queue, the items' places in `items`, the items.
    let mut groups: Vec<Addressed<(Vec<usize>, Vec<T>)>> = Vec::new();
    for (i, (project, queue, item)) in items.into_iter().enumerate() {
        match groups
            .iter_mut()
            .find(|(p, q, _)| *p == project && *q == queue)
        {
            Some((_, _, (places, items))) => {
                places.push(i);
                items.push(item);
            }
            None => groups.push((project, queue, (vec![i], vec![item]))),
        }
    }
    let calls = groups.into_iter().map(|(project, queue, (places, items))| {
        let answers = call(project, queue, items);
        async move { (places, answers.await) }
    });
    let mut out: Vec<Option<Result<O>>> = (0..n).map(|_| None).collect();
    for (places, answers) in futures::future::join_all(calls).await {
        for (i, answer) in places.into_iter().zip(answers) {
            out[i] = Some(answer);
        }
    }
    out.into_iter()
        .map(|a| a.unwrap_or_else(|| Err(Error::Internal("a gathered call gave no answer".into()))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_call_per_queue_and_answers_in_item_order() {
        let items = vec![
            ("p".to_owned(), "a".to_owned(), 1),
            ("p".to_owned(), "b".to_owned(), 2),
            ("p".to_owned(), "a".to_owned(), 3),
            ("o".to_owned(), "a".to_owned(), 4),
        ];
        let calls = std::sync::Mutex::new(Vec::new());
        let answers = per_queue(items, |project, queue, items: Vec<i32>| {
            calls
                .lock()
                .map(|mut c| c.push(format!("{project}/{queue}:{items:?}")))
                .ok();
            async move {
                if queue == "b" {
                    vec![Err(Error::invalid("queue", "b refused"))]
                } else {
                    items.into_iter().map(|i| Ok(i * 10)).collect()
                }
            }
        })
        .await;
        let mut calls = calls.into_inner().unwrap_or_default();
        calls.sort();
        assert_eq!(calls, ["o/a:[4]", "p/a:[1, 3]", "p/b:[2]"]);
        let answers: Vec<Option<i32>> = answers.into_iter().map(|a| a.ok()).collect();
        assert_eq!(answers, [Some(10), None, Some(30), Some(40)]);
    }
}
