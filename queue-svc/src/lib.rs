//! queue-svc: holds tasks — enqueue, lease, complete, fail, retry with backoff, dead-letter —
//! over gRPC (`sluice.queue.v1.Queue`).
//!
//! Modules, in the order a request meets them:
//! - [`service`]: the gRPC edge: validation, queue settings, answers;
//! - [`queues`]: the queues file (per-queue limits, timeouts, retries, retention);
//! - [`model`]: the task record, priorities, states and the retry backoff formula;
//! - [`store`]: one typed wrapper per Lua script in `lua/`, and the store enum;
//! - [`embedded`]: the same semantics in this process (no Redis needed);
//! - [`lease`]: the Lease stream (credits, push dispatch, heartbeats, acks, drain);
//! - [`keys`]: every Redis key name; [`reaper`]: lease expiry, promotion, retention;
//! - [`config`]: the binary's options.

#![forbid(unsafe_code)]

pub mod config;
pub mod embedded;
pub mod gather;
pub mod keys;
pub mod labels;
pub mod lease;
pub mod model;
pub mod queues;
pub mod reaper;
pub mod roster;
pub mod service;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use sluice::auth::{Access, Role};
use sluice::breaker::Breaker;
use sluice::proto::sluice::queue::v1::queue_server::QueueServer;
use sluice::server::Listeners;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

/// The name this service reports in logs and spans.
pub const SERVICE_NAME: &str = "queue-svc";

/// Health service name that reports whether the store answers: NOT_SERVING while Redis does
/// not (the server itself stays SERVING; calls that need Redis answer UNAVAILABLE).
pub const STORE_HEALTH: &str = "sluice.queue.v1.Queue/store";

/// How often the store's health is looked at.
const STORE_HEALTH_EVERY: Duration = Duration::from_secs(1);

/// Keeps [`STORE_HEALTH`] up to date with a PING every [`STORE_HEALTH_EVERY`].
async fn report_store_health(
    store: Arc<store::QueueStore>,
    health: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    let mut serving = true;
    let mut tick = tokio::time::interval(STORE_HEALTH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let answered = store.ping().await;
        if answered.is_ok() != serving {
            serving = answered.is_ok();
            let status = if serving {
                tracing::info!("the store answers again");
                tonic_health::ServingStatus::Serving
            } else {
                if let Err(err) = &answered {
                    tracing::warn!(error = %err, "the store does not answer");
                }
                tonic_health::ServingStatus::NotServing
            };
            health.set_service_status(STORE_HEALTH, status).await;
        }
    }
}

/// The wall clock in ms since the epoch (registry and roster stamps shared between instances).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Largest request message: a batch of 1,000 tasks with their payloads (see the contract).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// The roles each queue method accepts, as the contract lists them (admin holds every role).
/// Handlers then check the projects a request names.
fn access(method: &str) -> Option<Access> {
    const PRODUCER: &[Role] = &[Role::Producer];
    const WORKER: &[Role] = &[Role::Worker];
    const EITHER: &[Role] = &[Role::Producer, Role::Worker];
    const ADMIN: &[Role] = &[Role::Admin];
    Some(Access::Roles(match method {
        "Enqueue" | "EnqueueBatch" | "CancelTask" => PRODUCER,
        "Dequeue" | "Complete" | "Fail" | "ExtendLease" | "Lease" => WORKER,
        "GetTask" | "GetQueueStats" => EITHER,
        "ListWorkers" | "PauseQueue" | "ResumeQueue" | "ListDeadLetters" | "RedriveDeadLetters"
        | "PurgeDeadLetters" => ADMIN,
        _ => return None,
    }))
}

/// Runs queue-svc on `listeners` until `shutdown` is cancelled, then drains within the
/// configured grace.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let common = &config.common;
    // Every file read and checked before anything starts.
    let auth = common.auth.auth()?;
    let connections = common.server.connections()?;
    let queues = Arc::new(queues::Queues::load(config.queues.as_deref())?);
    let tasks = TaskTracker::new();
    let store = Arc::new(match sluice::pool::from_args(&common.redis)? {
        // Standalone Redis: while it is known to be away, calls answer UNAVAILABLE at once
        // instead of each waiting out the timeouts (and queueing behind others that do). Not
        // on Redis Cluster: one breaker for every shard would fail the calls to the healthy
        // shards while one fails over.
        Some(pool) if !pool.is_cluster() => {
            let breaker = Breaker::start(
                &common.redis,
                "sluice_queue_breaker_open",
                &pool,
                &tasks,
                &shutdown,
            );
            store::QueueStore::Redis(Box::new(store::RedisQueue::new(pool.guarded(breaker))))
        }
        Some(pool) => store::QueueStore::Redis(Box::new(store::RedisQueue::new(pool))),
        None => store::QueueStore::Embedded(embedded::EmbeddedQueue::new()),
    });
    let retire_after = (!config.retire_idle_after.is_zero()).then_some(config.retire_idle_after);
    let service = service::QueueService::new(
        store.clone(),
        queues.clone(),
        reaper::register_every(retire_after),
        shutdown.clone(),
    );
    let waker = service.clone();
    tasks.spawn(reaper::run(
        store.clone(),
        queues,
        reaper::Schedule {
            interval: config.reaper_interval,
            retire_after,
        },
        shutdown.clone(),
        move |ready| waker.wake_local(ready),
    ));
    tasks.spawn(
        auth.clone()
            .watch(sluice::auth::RELOAD_EVERY, shutdown.clone()),
    );
    let (router, health) = sluice::server::router(
        &[sluice::proto::FILE_DESCRIPTOR_SET],
        &["sluice.queue.v1.Queue"],
        auth,
    )?;
    health
        .set_service_status(STORE_HEALTH, tonic_health::ServingStatus::Serving)
        .await;
    if matches!(*store, store::QueueStore::Redis(_)) {
        tasks.spawn(report_store_health(store, health, shutdown.clone()));
    }
    if let Some(redis) = common.redis.redis_config()? {
        tasks.spawn(service.clone().listen_for_wakeups(redis));
        tasks.spawn(roster::publish(service.clone(), shutdown.clone()));
    }
    let router = router.add_service(
        QueueServer::new(service).max_decoding_message_size(MAX_MESSAGE),
        access,
    );
    let result = sluice::server::run(
        SERVICE_NAME,
        router,
        listeners,
        shutdown.clone(),
        connections,
    )
    .await;
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    result
}
