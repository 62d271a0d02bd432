//! The reaper: expired leases back to their queue (as a timeout attempt), due scheduled tasks
//! to ready, finished tasks past retention removed. Every instance runs it; each step is one
//! atomic, bounded script per queue, so instances running it at once do no harm.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::queues::Queues;
use crate::store::{QueueStore, Retention, Stats};

/// Tasks handled per queue per step.
const BATCH: u64 = 500;
/// Every how many passes the depth gauges are refreshed, and retention applied (finished
/// tasks, dead letters and idempotency keys removed). Lease expiry and due tasks are looked
/// at on every pass; an idle queue then costs Redis about 7 commands a pass on average, not 22.
const DEPTH_EVERY: u64 = 5;
const RETENTION_EVERY: u64 = 10;

/// Runs the reaper every `interval` until `shutdown`. `wake` is told how many tasks a step
/// made ready (promoted or redriven), for the Lease streams of this instance when no Redis
/// pub/sub announces them (the embedded store).
pub async fn run(
    store: Arc<QueueStore>,
    queues: Arc<Queues>,
    interval: Duration,
    shutdown: CancellationToken,
    wake: impl Fn(usize) + Send + 'static,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for pass in 0_u64.. {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let registered = match store.registered().await {
            Ok(registered) => registered,
            Err(err) => {
                tracing::debug!(error = %err, "reaper: store unavailable");
                continue;
            }
        };
        for (project, queue) in registered {
            let settings = queues.get(&project, &queue);
            if pass % DEPTH_EVERY == 0
                && let Ok(stats) = store.stats(&project, &queue).await
            {
                record_depth(&project, &queue, &stats);
            }
            let retention = (pass % RETENTION_EVERY == 0).then_some(Retention {
                finished: settings.retention,
                dead: settings.dead_retention,
            });
            match store.reap(&project, &queue, BATCH, retention).await {
                Ok((expired, promoted, _)) => {
                    if promoted > 0 {
                        wake(usize::try_from(promoted).unwrap_or(usize::MAX));
                    }
                    if expired > 0 {
                        metrics::counter!("sluice_queue_lease_expiries_total", "queue" => queue.clone()).increment(expired);
                        tracing::info!(
                            project,
                            queue,
                            expired,
                            "leases expired; tasks returned to their queue"
                        );
                    }
                }
                Err(err) => tracing::debug!(project, queue, error = %err, "reaper step failed"),
            }
            if let Some(policy) = &settings.auto_redrive {
                match store
                    .auto_redrive(&project, &queue, policy, BATCH, settings.max_size)
                    .await
                {
                    Ok((redriven, _)) if redriven > 0 => {
                        wake(usize::try_from(redriven).unwrap_or(usize::MAX));
                        metrics::counter!("sluice_queue_redriven_total", "queue" => queue.clone(), "how" => "auto").increment(redriven);
                        tracing::info!(
                            project,
                            queue,
                            redriven,
                            "dead letters redriven after their cool-down"
                        );
                    }
                    Ok(_) => {}
                    Err(err) => {
                        tracing::debug!(project, queue, error = %err, "auto-redrive step failed")
                    }
                }
            }
        }
    }
}

/// Depth gauges per queue, state and priority.
fn record_depth(project: &str, queue: &str, stats: &Stats) {
    const PRIORITIES: [&str; 5] = ["critical", "high", "normal", "low", "background"];
    for (priority, ready) in PRIORITIES.iter().zip(stats.ready) {
        metrics::gauge!("sluice_queue_depth", "project" => project.to_owned(), "queue" => queue.to_owned(), "state" => "ready", "priority" => *priority)
            .set(ready as f64);
    }
    for (state, n) in [
        ("scheduled", stats.scheduled),
        ("leased", stats.leased),
        ("dead", stats.dead),
    ] {
        metrics::gauge!("sluice_queue_depth", "project" => project.to_owned(), "queue" => queue.to_owned(), "state" => state, "priority" => "all")
            .set(n as f64);
    }
}
