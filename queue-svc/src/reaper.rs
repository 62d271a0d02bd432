//! The reaper: expired leases back to their queue (as a timeout attempt), due scheduled tasks
//! to ready, finished tasks past retention removed, empty queues left idle forgotten. Every instance runs it; each step is one
//! atomic, bounded script per queue, so instances running it at once do no harm.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::queues::Queues;
use crate::store::{QueueStore, Registered, Retention, Stats};

/// Tasks handled per queue per step.
const BATCH: u64 = 500;
/// Every how many passes the depth gauges are refreshed, and retention applied (finished
/// tasks, dead letters and idempotency keys removed). Lease expiry and due tasks are looked
/// at on every pass; an idle queue then costs Redis about 7 commands a pass on average, not 22.
const DEPTH_EVERY: u64 = 5;
const RETENTION_EVERY: u64 = 10;

/// When the reaper runs, and when it forgets queues.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Between passes.
    pub interval: Duration,
    /// An empty queue nothing enqueued into for this long is forgotten; `None`: never.
    pub retire_after: Option<Duration>,
}

/// How often an instance registers a queue it enqueues into again: a sixth of the retirement
/// age, at most a minute, so a queue in use never looks idle to any instance's reaper whose
/// retirement age is 6 minutes or more, whatever this instance's own setting.
pub fn register_every(retire_after: Option<Duration>) -> Duration {
    let most = Duration::from_secs(60);
    retire_after.map_or(most, |after| (after / 6).min(most))
}

/// Runs the reaper every `schedule.interval` until `shutdown`. `wake` is told how many tasks a step
/// made ready (promoted or redriven), for the Lease streams of this instance when no Redis
/// pub/sub announces them (the embedded store).
pub async fn run(
    store: Arc<QueueStore>,
    queues: Arc<Queues>,
    schedule: Schedule,
    shutdown: CancellationToken,
    wake: impl Fn(usize) + Send + 'static,
) {
    let mut tick = tokio::time::interval(schedule.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for pass in 0_u64.. {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let retention_pass = pass % RETENTION_EVERY == 0;
        let (now, registered) = match store.registered(retention_pass).await {
            Ok(registered) => registered,
            Err(err) => {
                tracing::debug!(error = %err, "reaper: store unavailable");
                continue;
            }
        };
        for Registered {
            project,
            queue,
            at_ms,
            legacy,
        } in registered
        {
            let settings = queues.get(&project, &queue);
            if pass % DEPTH_EVERY == 0
                && let Ok(stats) = store.stats(&project, &queue).await
            {
                record_depth(&project, &queue, &stats);
            }
            let retention = retention_pass.then_some(Retention {
                finished: settings.retention,
                dead: settings.dead_retention,
            });
            match store.reap(&project, &queue, BATCH, retention).await {
                Ok((expired, promoted, _)) => {
                    if promoted > 0 {
                        wake(usize::try_from(promoted).unwrap_or(usize::MAX));
                    }
                    if expired > 0 {
                        metrics::counter!("sluice_queue_lease_expiries_total", "queue" => crate::labels::queue(&queue)).increment(expired);
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
                        metrics::counter!("sluice_queue_redriven_total", "queue" => crate::labels::queue(&queue), "how" => "auto").increment(redriven);
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
            if retention_pass
                && !legacy
                && let Some(after) = schedule.retire_after
            {
                let age = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
                if at_ms < now.saturating_sub(age) {
                    match store.retire(&project, &queue, age).await {
                        Ok(true) => {
                            record_depth(&project, &queue, &Stats::default());
                            tracing::info!(project, queue, idle = ?after, "empty queue forgotten");
                        }
                        Ok(false) => {}
                        Err(err) => {
                            tracing::debug!(project, queue, error = %err, "retiring a queue failed")
                        }
                    }
                }
            }
        }
    }
}

/// Depth gauges per queue, state and priority (for the queues that have them, see
/// [`crate::labels`]).
fn record_depth(project: &str, queue: &str, stats: &Stats) {
    const PRIORITIES: [&str; 5] = ["critical", "high", "normal", "low", "background"];
    if !crate::labels::has_depth_gauges(project, queue, *stats != Stats::default()) {
        return;
    }
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
