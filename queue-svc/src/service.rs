//! The gRPC edge of `sluice.queue.v1.Queue`: validation, queue settings, shaping of answers.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use sluice::batch::Batcher;
use sluice::error::{Error, Result};
use sluice::proto::sluice::queue::v1 as pb;
use sluice::server::KeptHandles;
use tonic::{Request, Response, Status};

use crate::gather::{Addressed, per_queue};
use crate::model::{
    self, MAX_ATTEMPTS, MAX_BATCH, MAX_ERROR_MESSAGE, MAX_PAYLOAD, Record, RetryPolicy,
    category_name, duration, proto_duration, timestamp, validate_name, validate_task_id,
};
use crate::queues::Queues;
use crate::store::{Completion, DeadOp, DeadSelector, Enqueued, FailOutcome, NewTask, QueueStore};

/// Most tasks one Dequeue leases.
pub const MAX_DEQUEUE: u32 = 256;
/// Largest answer a call builds: most gRPC clients refuse more than 4 MiB.
const MAX_RESPONSE: usize = 4 * 1024 * 1024 - 64 * 1024;

/// How many of the tasks with these payload sizes fit in one answer (at least one).
fn fits(payloads: impl Iterator<Item = usize>) -> usize {
    let mut size = 0;
    let mut n = 0;
    for payload in payloads {
        // Each task's record travels with its payload: count a generous 1 KiB for it.
        size += payload + 1024;
        if size > MAX_RESPONSE && n > 0 {
            break;
        }
        n += 1;
    }
    n
}

/// Furthest ahead a task may be scheduled, by `delay` or `not_before`.
const MAX_SCHEDULE: Duration = Duration::from_secs(30 * 24 * 3600);

/// A waiting Dequeue looks again at least this often, wake-up or not.
const LONG_POLL_SAFETY: Duration = Duration::from_secs(1);
/// ... and at most this often.
const LONG_POLL_GAP: Duration = Duration::from_millis(10);

/// Longest Dequeue long-poll.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// How long before the caller's deadline a long poll stops: room for its last lease call and
/// the answer. A call cut off at its deadline would leave the tasks that call leased waiting
/// out their lease, and the caller would get DEADLINE_EXCEEDED instead of an empty answer.
fn answer_margin(timeout: Duration) -> Duration {
    (timeout / 10).clamp(Duration::from_millis(20), Duration::from_millis(250))
}

/// The Queue service on one store.
#[derive(Debug, Clone)]
pub struct QueueService {
    store: Arc<QueueStore>,
    queues: Arc<Queues>,
    /// When this instance last registered each queue it enqueued into; see
    /// [`QueueService::register`].
    registered: Arc<Mutex<Registrations>>,
    /// How often a queue in use is registered again (see [`crate::reaper::register_every`]).
    register_every: Duration,
    /// Where the next multi-project Dequeue starts its turn.
    cursor: Arc<std::sync::atomic::AtomicUsize>,
    /// Lease streams: connected workers, wake-ups, shutdown.
    streams: Arc<crate::lease::StreamState>,
    /// On Redis: concurrent single-task Enqueues share script calls (see [`enqueue_gathered`]).
    enqueuer: Option<Arc<Batcher<Addressed<Box<NewTask>>, Enqueued>>>,
    /// On Redis: concurrent unary Completes share script calls (see [`complete_gathered`]).
    completer: Option<Arc<Batcher<Addressed<Completing>, ()>>>,
}

/// When an instance last registered each queue it enqueued into, by project.
#[derive(Debug, Default)]
struct Registrations {
    at: HashMap<String, HashMap<String, Instant>>,
    queues: usize,
}

impl Registrations {
    /// Queues remembered; past it, all are forgotten and each is registered again on its next
    /// enqueue.
    const MAX: usize = 100_000;

    fn insert(&mut self, project: &str, queue: &str, at: Instant) {
        if self.queues >= Self::MAX {
            self.at.clear();
            self.queues = 0;
        }
        let queues = self.at.entry(project.to_owned()).or_default();
        if queues.insert(queue.to_owned(), at).is_none() {
            self.queues += 1;
        }
    }
}

/// How long the instance keeps listening for Redis wake-ups after its last stream stopped
/// waiting for work, and how often it checks.
const WAKE_LINGER: Duration = Duration::from_secs(10);
const WAKE_CHECK: Duration = Duration::from_secs(1);

/// Most single-task Enqueues (and unary Completes) in one gathering, and gatherings stored
/// at once. Payloads and results larger than `GATHER_ITEM_BYTES` go alone, so a gathered
/// script call carries at most 4 MiB of them.
const GATHER: usize = 128;
const GATHER_CALLS: usize = 4;
const GATHER_ITEM_BYTES: usize = 32 * 1024;

/// Stores single-task Enqueues that arrived together: one enqueue script call per queue
/// among them, each task answered on its own. The script is all or none, so when a
/// gathering does not fit its queue's max size each of its tasks is tried alone: a task is
/// refused only when it does not fit by itself.
async fn enqueue_gathered(
    store: &QueueStore,
    queues: &Queues,
    items: Vec<Addressed<Box<NewTask>>>,
) -> Vec<Result<Enqueued>> {
    per_queue(items, |project, queue, tasks| async move {
        // Boxed while gathered, so that moving an item moves a pointer.
        let tasks: Vec<NewTask> = tasks.into_iter().map(|task| *task).collect();
        match store_tasks(store, queues, &project, &queue, &tasks).await {
            Ok(enqueued) => enqueued.into_iter().map(Ok).collect(),
            Err(Error::ResourceExhausted(_)) if tasks.len() > 1 => {
                let mut answers = Vec::with_capacity(tasks.len());
                for task in &tasks {
                    answers.push(
                        store_tasks(store, queues, &project, &queue, std::slice::from_ref(task))
                            .await
                            .and_then(|mut one| {
                                one.pop().ok_or_else(|| {
                                    Error::Internal("enqueue answered nothing".into())
                                })
                            }),
                    );
                }
                answers
            }
            Err(err) => vec![Err(err); tasks.len()],
        }
    })
    .await
}

/// Stores `tasks` in `queue` of `project`, all or none, under the queue's settings.
async fn store_tasks(
    store: &QueueStore,
    queues: &Queues,
    project: &str,
    queue: &str,
    tasks: &[NewTask],
) -> Result<Vec<Enqueued>> {
    let settings = queues.get(project, queue);
    let retention = u64::try_from(settings.retention.as_millis()).unwrap_or(u64::MAX);
    store
        .enqueue(project, queue, tasks, settings.max_size, retention)
        .await
}

/// A completion's task id, lease token and result.
type Completing = (String, String, Vec<u8>);

/// Completes tasks that arrived together (gathered unary Completes, or a Lease stream's):
/// one complete script call per queue, each task judged on its own, with their metrics.
async fn complete_gathered(
    store: &QueueStore,
    items: Vec<Addressed<Completing>>,
) -> Vec<Result<()>> {
    per_queue(items, |project, queue, items| async move {
        let batch: Vec<Completion<'_>> = items
            .iter()
            .map(|(id, token, result)| (id.as_str(), token.as_str(), result.as_slice()))
            .collect();
        match store.complete_many(&project, &queue, &batch).await {
            Ok(outcomes) => outcomes
                .into_iter()
                .map(|outcome| outcome.map(|ran| completed(&queue, ran)))
                .collect(),
            Err(err) => vec![Err(err); items.len()],
        }
    })
    .await
}

/// A dead-letter page token (ListDeadLetters, redrive, purge): empty, or `<score> <task id>`
/// as a previous call issued.
fn dead_cursor(token: &str) -> Result<&str> {
    let valid = token.is_empty()
        || token.split_once(' ').is_some_and(|(score, id)| {
            !score.is_empty()
                && score.len() <= 20
                && score.bytes().all(|b| b.is_ascii_digit())
                && validate_task_id(id, "page_token").is_ok()
        });
    if valid {
        Ok(token)
    } else {
        Err(Error::invalid(
            "page_token",
            "not a token this service issued; leave it empty to start at the oldest",
        ))
    }
}

/// A task result must fit the payload bound.
fn check_result(result: &[u8]) -> Result<()> {
    if result.len() > MAX_PAYLOAD {
        return Err(Error::invalid(
            "result",
            format!("at most {MAX_PAYLOAD} bytes"),
        ));
    }
    Ok(())
}

/// The per-queue metrics updated on every Enqueue, lease and completion, with handles kept
/// per thread (as the server keeps its call metrics) instead of looked up on every update.
struct QueueMetrics {
    enqueued: metrics::Counter,
    completed: metrics::Counter,
    run: metrics::Histogram,
    wait: metrics::Histogram,
}

impl QueueMetrics {
    /// Queues whose handles a thread keeps; others are looked up each time.
    const MAX_KEPT: usize = 1024;

    fn with(queue: &str, f: impl FnOnce(&Self)) {
        thread_local! {
            static KEPT: std::cell::RefCell<KeptHandles<QueueMetrics>> =
                std::cell::RefCell::default();
        }
        let lookup = || {
            let label = crate::labels::queue(queue);
            Self {
                enqueued: metrics::counter!("sluice_queue_enqueued_total", "queue" => label.clone()),
                completed: metrics::counter!("sluice_queue_completed_total", "queue" => label.clone()),
                run: metrics::histogram!("sluice_queue_task_run_seconds", "queue" => label.clone()),
                wait: metrics::histogram!("sluice_queue_task_wait_seconds", "queue" => label),
            }
        };
        KEPT.with_borrow_mut(|kept| kept.with(queue, Self::MAX_KEPT, lookup, f));
    }
}

/// Metrics of a completion that ran `ran` ms (`None`: a repeat, not counted again).
fn completed(queue: &str, ran: Option<u64>) {
    if let Some(ms) = ran {
        QueueMetrics::with(queue, |m| {
            m.run.record(ms as f64 / 1000.0);
            m.completed.increment(1);
        });
    }
}

/// A random number in [0, 1), from 53 of a UUIDv4's random bits (its version and variant
/// bits lie above them). A v4 takes only the generator; a v7 also reads and divides the clock.
fn uniform() -> f64 {
    let bits = uuid::Uuid::new_v4().as_u128() & ((1u128 << 53) - 1);
    bits as f64 / (1u64 << 53) as f64
}

/// An unguessable lease token.
fn token() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

fn enqueue_response(e: Enqueued) -> pb::EnqueueResponse {
    pb::EnqueueResponse {
        task_id: e.id,
        duplicate: e.duplicate,
        state: model::state_to_proto(&e.state).into(),
    }
}

/// The wire form of a stored task.
pub fn task_to_proto(
    project: &str,
    queue: &str,
    r: Record,
    payload: Vec<u8>,
    result: Vec<u8>,
    queue_retry: &RetryPolicy,
) -> pb::Task {
    pb::Task {
        id: r.id,
        project: project.to_owned(),
        queue: queue.to_owned(),
        payload_size: u32::try_from(payload.len()).unwrap_or(u32::MAX),
        payload,
        content_type: r.ct,
        priority: model::priority_to_proto(r.p).into(),
        state: model::state_to_proto(&r.st).into(),
        attempts: r.att,
        max_attempts: r.max,
        headers: r.hd,
        enqueued_at: r.enq.map(timestamp),
        scheduled_for: r.sch.map(timestamp),
        leased_at: r.lsd.map(timestamp),
        succeeded_at: r.ok.map(timestamp),
        failed_at: r.fl.map(timestamp),
        dead_at: r.dd.map(timestamp),
        cancelled_at: r.cx.map(timestamp),
        lease_deadline: r.dl.map(timestamp),
        result,
        errors: r
            .err
            .into_iter()
            .map(|e| pb::TaskError {
                attempt: e.attempt,
                category: model::category_to_proto(&e.category).into(),
                message: e.message,
                retryable: e.retryable,
                at: Some(timestamp(e.at)),
            })
            .collect(),
        cancel_requested: r.cr,
        processing_timeout: Some(proto_duration(Duration::from_millis(r.to))),
        retry: Some(r.rp.unwrap_or(*queue_retry).to_proto()),
        idempotency_key: r.idem.unwrap_or_default(),
        worker_id: r.wk.unwrap_or_default(),
    }
}

/// A lease duration in ms (0 when unset), validated to 1 s ..= 24 h.
pub(crate) fn lease_ms(d: Option<&prost_types::Duration>, field: &str) -> Result<u64> {
    match d {
        None => Ok(0),
        Some(d) => {
            let d = duration(d, field)?;
            if d < Duration::from_secs(1) || d > Duration::from_secs(24 * 3600) {
                return Err(Error::invalid(field, "must be 1 second to 24 hours"));
            }
            Ok(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        }
    }
}

impl QueueService {
    /// A service on `store` with `queues` settings, registering the queues it enqueues into at
    /// least every `register_every`.
    pub fn new(
        store: Arc<QueueStore>,
        queues: Arc<Queues>,
        register_every: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        let redis = matches!(*store, QueueStore::Redis(_));
        let enqueuer = redis.then(|| {
            let (store, queues) = (Arc::clone(&store), Arc::clone(&queues));
            Arc::new(Batcher::spawn(GATHER, GATHER_CALLS, move |items| {
                let (store, queues) = (Arc::clone(&store), Arc::clone(&queues));
                async move { Ok(enqueue_gathered(&store, &queues, items).await) }
            }))
        });
        let completer = redis.then(|| {
            let store = Arc::clone(&store);
            Arc::new(Batcher::spawn(GATHER, GATHER_CALLS, move |items| {
                let store = Arc::clone(&store);
                async move { Ok(complete_gathered(&store, items).await) }
            }))
        });
        Self {
            store,
            queues,
            registered: Arc::default(),
            register_every,
            cursor: Arc::default(),
            streams: crate::lease::StreamState::new(shutdown),
            enqueuer,
            completer,
        }
    }

    /// The store.
    pub(crate) fn store(&self) -> &QueueStore {
        &self.store
    }

    /// Connected Lease-stream workers.
    pub(crate) fn workers(&self) -> &crate::lease::Workers {
        &self.streams.workers
    }

    /// The lease streams' shared state (wake-ups live there).
    pub(crate) fn wakeups(&self) -> Arc<crate::lease::StreamState> {
        self.streams.clone()
    }

    /// Wakes lease streams waiting for work: one per new ready task, so a single enqueue
    /// does not send every idle stream to Redis for one task.
    pub(crate) fn wake_for(&self, tasks: usize) {
        for _ in 0..tasks.min(256) {
            self.streams.wakeups.notify_one();
        }
        if self.streams.ready.receiver_count() > 0 {
            self.streams.ready.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Wakes one lease stream waiting for work, unless Redis pub/sub announces it anyway.
    pub(crate) fn wake(&self) {
        self.wake_local(1);
    }

    /// Wakes streams for tasks this instance made ready, unless Redis pub/sub announces them.
    pub(crate) fn wake_local(&self, tasks: usize) {
        if !self
            .streams
            .pushed
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            self.wake_for(tasks);
        }
    }

    /// Receives the wake-ups every instance's scripts publish, and wakes this instance's
    /// streams; resubscribes after a lost connection (on a cluster, to whichever seed node
    /// answers). Returns at shutdown.
    ///
    /// It listens only while some stream of this instance waits for work, and for
    /// [`WAKE_LINGER`] after the last one stopped: a wake-up published to no subscriber costs
    /// Redis nothing more, while one delivered is a socket write and a read here per script
    /// call (with busy workers or none, most of them). A stream that starts waiting while the
    /// instance is not listening gets it subscribed; once subscribed, every stream looks once
    /// more, so a task made ready in between is not missed.
    pub async fn listen_for_wakeups(self, redis: sluice::pool::RedisConfig) {
        use futures::StreamExt;
        use std::sync::atomic::Ordering;
        let shutdown = self.shutdown_token();
        let waiting = || self.streams.waiting.load(Ordering::SeqCst);
        loop {
            while waiting() == 0 {
                tokio::select! {
                    () = self.streams.wanted.notified() => {}
                    () = shutdown.cancelled() => return,
                }
            }
            let subscription = tokio::select! {
                s = sluice::pool::subscribe(&redis, "sluice:q:wake") => s,
                () = shutdown.cancelled() => return,
            };
            match subscription {
                Ok(mut messages) => {
                    self.streams.pushed.store(true, Ordering::SeqCst);
                    // Anything made ready while unsubscribed is found by this look.
                    self.wake_for(256);
                    let mut check = tokio::time::interval(WAKE_CHECK);
                    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let mut idle = Duration::ZERO;
                    let lost = loop {
                        tokio::select! {
                            message = messages.next() => match message {
                                Some(message) => {
                                    let tasks: usize = message.get_payload::<String>().ok().and_then(|n| n.parse().ok()).unwrap_or(1);
                                    self.wake_for(tasks);
                                }
                                None => break true,
                            },
                            _ = check.tick() => {
                                idle = if waiting() == 0 { idle + WAKE_CHECK } else { Duration::ZERO };
                                if idle >= WAKE_LINGER {
                                    break false;
                                }
                            }
                            () = shutdown.cancelled() => return,
                        }
                    };
                    // Local enqueues wake local streams again from here on, before the
                    // subscription ends. A stream that began waiting since the last check is
                    // counted in `waiting`: the loop above subscribes again at once.
                    self.streams.pushed.store(false, Ordering::SeqCst);
                    drop(messages);
                    if !lost {
                        tracing::debug!("no stream waits for work; wake-ups unsubscribed");
                        continue;
                    }
                    tracing::warn!("lost the Redis wake-up subscription; polling until it is back");
                }
                Err(err) => tracing::debug!(error = %err, "cannot subscribe to wake-ups yet"),
            }
            tokio::select! {
                () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// This instance's id.
    pub(crate) fn instance(&self) -> &str {
        &self.streams.instance
    }

    /// Cancelled when the instance shuts down.
    pub(crate) fn shutdown_token(&self) -> tokio_util::sync::CancellationToken {
        self.streams.shutdown.clone()
    }

    /// Gives back a lease that never reached its worker; logs instead of failing.
    pub(crate) async fn release_quietly(&self, project: &str, queue: &str, id: &str, token: &str) {
        match self.store.release(project, queue, id, token).await {
            Ok(()) => self.wake(),
            Err(err) => {
                tracing::warn!(project, queue, task = id, error = %err, "could not release an unsent lease; it expires instead")
            }
        }
    }

    /// Completes a leased task (unary), with its metrics.
    pub(crate) async fn complete_task(
        &self,
        project: &str,
        queue: &str,
        id: &str,
        token: &str,
        result: &[u8],
    ) -> Result<()> {
        check_result(result)?;
        let item = (
            project.to_owned(),
            queue.to_owned(),
            (id.to_owned(), token.to_owned(), result.to_vec()),
        );
        match &self.completer {
            Some(completer) if result.len() <= GATHER_ITEM_BYTES => completer.submit(item).await,
            _ => complete_gathered(&self.store, vec![item])
                .await
                .pop()
                .unwrap_or_else(|| Err(Error::Internal("complete: no answer".into()))),
        }
    }

    /// Completes a Lease stream's completions that arrived together (possibly of several
    /// queues), each judged on its own: per completion, in order, its task id and outcome.
    pub(crate) async fn complete_stream(
        &self,
        project: &str,
        completes: Vec<pb::CompleteTask>,
    ) -> Vec<(String, Result<()>)> {
        let mut answers = Vec::with_capacity(completes.len());
        let mut valid = Vec::with_capacity(completes.len());
        for c in completes {
            let checked = validate_name(&c.queue, "complete.queue")
                .and_then(|()| validate_task_id(&c.task_id, "complete.task_id"))
                .and_then(|()| check_result(&c.result));
            match checked {
                Ok(()) => {
                    answers.push((c.task_id.clone(), None));
                    valid.push((
                        project.to_owned(),
                        c.queue,
                        (c.task_id, c.lease_token, c.result),
                    ));
                }
                Err(err) => answers.push((c.task_id, Some(Err(err)))),
            }
        }
        let mut outcomes = complete_gathered(&self.store, valid).await.into_iter();
        answers
            .into_iter()
            .map(|(id, answer)| {
                let outcome = answer.unwrap_or_else(|| {
                    outcomes
                        .next()
                        .unwrap_or_else(|| Err(Error::Internal("complete: short answer".into())))
                });
                (id, outcome)
            })
            .collect()
    }

    /// Fails a leased task's attempt (unary and stream), with its metrics.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn fail_task(
        &self,
        project: &str,
        queue: &str,
        id: &str,
        token: &str,
        category: &'static str,
        message: &str,
        retryable: bool,
    ) -> Result<FailOutcome> {
        let mut message = message.to_owned();
        if message.len() > MAX_ERROR_MESSAGE {
            let mut cut = MAX_ERROR_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let outcome = self
            .store
            .fail(project, queue, id, token, category, &message, retryable)
            .await?;
        let label = crate::labels::queue(queue);
        metrics::counter!("sluice_queue_failed_total", "queue" => label.clone(), "category" => category).increment(1);
        match outcome {
            FailOutcome::Retry { .. } => {
                metrics::counter!("sluice_queue_retries_total", "queue" => label).increment(1)
            }
            FailOutcome::Dead { .. } => {
                metrics::counter!("sluice_queue_dead_lettered_total", "queue" => label).increment(1)
            }
            FailOutcome::Cancelled { .. } => {}
        }
        Ok(outcome)
    }

    /// Registers the queue for the reaper unless this instance did within `register_every`:
    /// the reaper forgets only queues nothing registered for a good while longer.
    async fn register(&self, project: &str, queue: &str) -> Result<()> {
        let now = Instant::now();
        let fresh = self.registered.lock().is_ok_and(|known| {
            known
                .at
                .get(project)
                .and_then(|queues| queues.get(queue))
                .is_some_and(|at| now.duration_since(*at) < self.register_every)
        });
        if !fresh {
            self.store.register(project, queue).await?;
            if let Ok(mut known) = self.registered.lock() {
                known.insert(project, queue, now);
            }
        }
        Ok(())
    }

    /// Validates one spec into a task to store. `traced`: the call's metadata carried a trace
    /// context, which the publish span then joins; otherwise it joins the one in the task's
    /// headers, if any.
    fn new_task(
        &self,
        spec: &pb::TaskSpec,
        project: &str,
        queue: &str,
        field: &str,
        traced: bool,
    ) -> Result<NewTask> {
        let settings = self.queues.get(project, queue);
        model::validate_spec_strings(spec, field)?;
        let max = match spec.max_attempts {
            None => settings.max_attempts,
            Some(n) if n == 0 || n > MAX_ATTEMPTS => {
                return Err(Error::invalid(
                    format!("{field}.max_attempts"),
                    format!(
                        "{n} is not 1 to {MAX_ATTEMPTS}; leave it unset for the queue's default"
                    ),
                ));
            }
            Some(n) => n,
        };
        let retry = match &spec.retry {
            Some(r) => RetryPolicy::from_proto(r, &settings.retry, &format!("{field}.retry"))?,
            None => settings.retry,
        };
        let timeout = match &spec.processing_timeout {
            Some(d) => lease_ms(Some(d), &format!("{field}.processing_timeout"))?,
            None => u64::try_from(settings.processing_timeout.as_millis()).unwrap_or(u64::MAX),
        };
        let (not_before_ms, delay_ms) = match &spec.schedule {
            None => (0, 0),
            Some(pb::task_spec::Schedule::Delay(d)) => {
                let d = duration(d, &format!("{field}.delay"))?;
                if d > MAX_SCHEDULE {
                    return Err(Error::invalid(format!("{field}.delay"), "at most 30 days"));
                }
                (0, u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            }
            Some(pb::task_spec::Schedule::NotBefore(t)) => {
                let field = format!("{field}.not_before");
                let ms = u64::try_from(t.seconds)
                    .ok()
                    .filter(|_| (0..1_000_000_000).contains(&t.nanos))
                    .and_then(|s| s.checked_mul(1000))
                    .and_then(|ms| ms.checked_add(u64::from(t.nanos.unsigned_abs() / 1_000_000)))
                    .ok_or_else(|| {
                        Error::invalid(
                            field.as_str(),
                            "must be a valid time from 1970 on (nanos 0 to 999,999,999)",
                        )
                    })?;
                let latest = crate::now_ms()
                    .saturating_add(u64::try_from(MAX_SCHEDULE.as_millis()).unwrap_or(u64::MAX));
                if ms > latest {
                    return Err(Error::invalid(field, "at most 30 days ahead"));
                }
                (ms, 0)
            }
        };
        let id = uuid::Uuid::now_v7()
            .hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer())
            .to_owned();
        let mut headers = spec.headers.clone();
        // The publish span: the worker's process span links to it through the task's headers.
        let publish = tracing::info_span!(
            "task.publish",
            otel.kind = "producer",
            messaging.system = "sluice",
            messaging.operation.type = "send",
            messaging.destination.name = %queue,
            messaging.message.id = %id,
        );
        if !publish.is_disabled() {
            if !traced {
                sluice::telemetry::adopt_parent_from_map(&publish, &spec.headers);
            }
            sluice::telemetry::inject_into_map(&publish, &mut headers);
        }
        let record = Record {
            id,
            p: model::priority_from_proto(spec.priority, || format!("{field}.priority"))?,
            ct: spec.content_type.clone(),
            max,
            hd: headers,
            to: timeout,
            dly: (1..max)
                .map(|attempt| retry.delay_ms(attempt, uniform()))
                .collect(),
            rp: spec.retry.is_some().then_some(retry),
            idem: (!spec.idempotency_key.is_empty()).then(|| spec.idempotency_key.clone()),
            ..Record::default()
        };
        Ok(NewTask {
            record,
            payload: spec.payload.clone(),
            not_before_ms,
            delay_ms,
        })
    }

    async fn enqueue_tasks(
        &self,
        project: &str,
        queue: &str,
        mut tasks: Vec<NewTask>,
    ) -> Result<Vec<Enqueued>> {
        queue_ref(project, queue)?;
        self.register(project, queue).await?;
        // A single small task gathers with concurrent ones; anything else goes alone.
        let gathered = match &self.enqueuer {
            Some(enqueuer) if tasks.len() == 1 && tasks[0].payload.len() <= GATHER_ITEM_BYTES => {
                tasks.pop().map(|task| (enqueuer, Box::new(task)))
            }
            _ => None,
        };
        let result = match gathered {
            Some((enqueuer, task)) => enqueuer
                .submit((project.to_owned(), queue.to_owned(), task))
                .await
                .map(|enqueued| vec![enqueued]),
            None => store_tasks(&self.store, &self.queues, project, queue, &tasks).await,
        };
        if let Ok(enqueued) = &result {
            self.wake_local(
                enqueued
                    .iter()
                    .filter(|e| !e.duplicate && e.state == "ready")
                    .count(),
            );
            let fresh = enqueued.iter().filter(|e| !e.duplicate).count() as u64;
            QueueMetrics::with(queue, |m| m.enqueued.increment(fresh));
        }
        result
    }

    /// Leases up to `max` tasks from `targets` (project, queue). One target: straight from it.
    /// Several: the most urgent ready priority among them first, and within it the targets
    /// in turn, one task each, starting where the previous call left off.
    pub(crate) async fn lease_from(
        &self,
        targets: &[(String, String)],
        max: usize,
        lease: u64,
        worker: &str,
    ) -> Result<Vec<pb::TaskLease>> {
        let mut leases = Vec::new();
        let mut push = |project: &str, queue: &str, found: Vec<crate::store::Leased>| {
            for (record, payload) in found {
                if let (Some(leased), Some(ready_since)) = (record.lsd, record.sch.or(record.enq)) {
                    let waited = (leased - ready_since).max(0.0) / 1000.0;
                    QueueMetrics::with(queue, |m| m.wait.record(waited));
                }
                let attempt = record.att;
                let token = record.tok.clone().unwrap_or_default();
                let deadline = record.dl.map(timestamp);
                leases.push(pb::TaskLease {
                    task: Some(task_to_proto(
                        project,
                        queue,
                        record,
                        payload,
                        Vec::new(),
                        &self.queues.get(project, queue).retry,
                    )),
                    attempt,
                    lease_token: token,
                    deadline,
                });
            }
        };
        if let [(project, queue)] = targets {
            let tokens: Vec<String> = (0..max).map(|_| token()).collect();
            push(
                project,
                queue,
                self.store
                    .dequeue(project, queue, lease, worker, &tokens)
                    .await?,
            );
            return Ok(leases);
        }
        // Each round looks at every queue's head and takes one task from each queue whose head
        // is the most urgent, in turn from a rotating start. The queues are distinct keys (on
        // a cluster, distinct slots): their calls go out together and pipeline.
        let mut taken = 0;
        while taken < max {
            let heads = match futures::future::try_join_all(
                targets
                    .iter()
                    .map(|(project, queue)| self.store.head(project, queue)),
            )
            .await
            {
                Ok(heads) => heads,
                // Tasks already leased go to the caller; an error alone is answered as one.
                Err(err) if taken == 0 => return Err(err),
                Err(_) => break,
            };
            let Some(best) = heads.iter().flatten().min().copied() else {
                break;
            };
            let start = self
                .cursor
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let turn: Vec<&(String, String)> = (0..targets.len())
                .map(|k| (start + k) % targets.len())
                .filter(|&i| heads[i] == Some(best))
                .take(max - taken)
                .map(|i| &targets[i])
                .collect();
            let tokens: Vec<[String; 1]> = turn.iter().map(|_| [token()]).collect();
            let found = futures::future::join_all(turn.iter().zip(&tokens).map(
                |((project, queue), token)| {
                    self.store.dequeue(project, queue, lease, worker, token)
                },
            ))
            .await;
            let mut round = 0;
            let mut failed = None;
            for ((project, queue), found) in turn.into_iter().zip(found) {
                match found {
                    Ok(found) => {
                        round += found.len();
                        taken += found.len();
                        push(project, queue, found);
                    }
                    Err(err) => failed = Some(err),
                }
            }
            if let Some(err) = failed {
                if taken == 0 {
                    return Err(err);
                }
                break;
            }
            if round == 0 {
                break;
            }
        }
        Ok(leases)
    }

    fn task_ref(project: &str, queue: &str, id: &str) -> Result<()> {
        queue_ref(project, queue)?;
        validate_task_id(id, "task_id")
    }

    fn selector(&self, selector: Option<&pb::DeadLetterSelector>) -> Result<DeadSelector> {
        use pb::dead_letter_selector::Selector;
        match selector.and_then(|s| s.selector.as_ref()) {
            Some(Selector::TaskId(id)) => {
                validate_task_id(id, "selector.task_id")?;
                Ok(DeadSelector::Id(id.clone()))
            }
            Some(Selector::All(true)) => Ok(DeadSelector::All),
            Some(Selector::All(false)) => {
                Err(Error::invalid("selector.all", "must be true when set"))
            }
            Some(Selector::Filter(f)) => {
                let category = match f.category {
                    0 => String::new(),
                    c => category_name(c).to_owned(),
                };
                let dead_before_ms = f
                    .dead_before
                    .as_ref()
                    .map(|t| t.seconds.max(0).unsigned_abs().saturating_mul(1000))
                    .unwrap_or(0);
                if category.is_empty() && dead_before_ms == 0 {
                    return Err(Error::invalid(
                        "selector.filter",
                        "is empty; set a category or dead_before, or use all",
                    ));
                }
                Ok(DeadSelector::Filter {
                    category,
                    dead_before_ms,
                })
            }
            None => Err(Error::invalid("selector", "choose task_id, filter or all")),
        }
    }
}

/// Validates the `project` and `queue` fields of a request about one queue.
fn queue_ref(project: &str, queue: &str) -> Result<()> {
    validate_name(project, "project")?;
    validate_name(queue, "queue")
}

fn limit_of(limit: u32) -> Result<u64> {
    match limit {
        0 => Ok(1000),
        n if n > 10_000 => Err(Error::invalid("limit", "at most 10000")),
        n => Ok(u64::from(n)),
    }
}

type LeaseStream =
    Pin<Box<dyn futures::Stream<Item = std::result::Result<pb::LeaseResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::queue_server::Queue for QueueService {
    async fn enqueue(
        &self,
        request: Request<pb::EnqueueRequest>,
    ) -> std::result::Result<Response<pb::EnqueueResponse>, Status> {
        let traced = request.metadata().contains_key("traceparent");
        let caller = sluice::auth::caller(&request)?;
        let spec = request
            .into_inner()
            .task
            .ok_or_else(|| Error::invalid("task", "is required"))?;
        validate_name(&spec.project, "task.project")?;
        validate_name(&spec.queue, "task.queue")?;
        caller.grant("task.project", &spec.project)?;
        let task = self.new_task(&spec, &spec.project, &spec.queue, "task", traced)?;
        let mut enqueued = self
            .enqueue_tasks(&spec.project, &spec.queue, vec![task])
            .await?;
        let first = enqueued
            .pop()
            .ok_or_else(|| Error::Internal("enqueue answered nothing".into()))?;
        Ok(Response::new(enqueue_response(first)))
    }

    async fn enqueue_batch(
        &self,
        request: Request<pb::EnqueueBatchRequest>,
    ) -> std::result::Result<Response<pb::EnqueueBatchResponse>, Status> {
        let traced = request.metadata().contains_key("traceparent");
        let caller = sluice::auth::caller(&request)?;
        let request = request.into_inner();
        validate_name(&request.project, "project")?;
        validate_name(&request.queue, "queue")?;
        caller.grant("project", &request.project)?;
        if request.tasks.is_empty() || request.tasks.len() > MAX_BATCH {
            return Err(Error::invalid(
                "tasks",
                format!("send 1 to {MAX_BATCH} tasks, not {}", request.tasks.len()),
            )
            .into());
        }
        let mut tasks = Vec::with_capacity(request.tasks.len());
        for (i, spec) in request.tasks.iter().enumerate() {
            let field = format!("tasks[{i}]");
            for (name, value, batch) in [
                ("project", &spec.project, &request.project),
                ("queue", &spec.queue, &request.queue),
            ] {
                if !value.is_empty() && value != batch {
                    return Err(Error::invalid(
                        format!("{field}.{name}"),
                        format!("must be empty or `{batch}`"),
                    )
                    .into());
                }
            }
            tasks.push(self.new_task(spec, &request.project, &request.queue, &field, traced)?);
        }
        let results = self
            .enqueue_tasks(&request.project, &request.queue, tasks)
            .await?;
        Ok(Response::new(pb::EnqueueBatchResponse {
            results: results.into_iter().map(enqueue_response).collect(),
        }))
    }

    async fn dequeue(
        &self,
        request: Request<pb::DequeueRequest>,
    ) -> std::result::Result<Response<pb::DequeueResponse>, Status> {
        let call_deadline = request
            .extensions()
            .get::<sluice::server::CallDeadline>()
            .copied();
        let caller = sluice::auth::caller(&request)?;
        let request = request.into_inner();
        validate_name(&request.project, "project")?;
        caller.grant("project", &request.project)?;
        let mut projects = vec![request.project.clone()];
        for (i, p) in request.also_projects.iter().enumerate() {
            let field = format!("also_projects[{i}]");
            validate_name(p, &field)?;
            caller.grant(&field, p)?;
            if !projects.contains(p) {
                projects.push(p.clone());
            }
        }
        if projects.len() > 16 {
            return Err(Error::invalid("also_projects", "at most 16 projects in all").into());
        }
        if request.queues.is_empty() || request.queues.len() > 16 {
            return Err(Error::invalid("queues", "name 1 to 16 queues").into());
        }
        for (i, q) in request.queues.iter().enumerate() {
            validate_name(q, &format!("queues[{i}]"))?;
        }
        let max = match request.max_tasks {
            0 => 1,
            n if n > MAX_DEQUEUE => {
                return Err(Error::invalid("max_tasks", format!("at most {MAX_DEQUEUE}")).into());
            }
            n => n as usize,
        };
        let wait = match &request.wait {
            None => Duration::ZERO,
            Some(w) => duration(w, "wait")?,
        };
        if wait > MAX_WAIT {
            return Err(Error::invalid("wait", "at most 30 seconds").into());
        }
        let lease = lease_ms(request.lease_duration.as_ref(), "lease_duration")?;
        crate::model::validate_worker_id(&request.worker_id, "worker_id", false)?;
        let targets: Vec<(String, String)> = projects
            .iter()
            .flat_map(|p| request.queues.iter().map(move |q| (p.clone(), q.clone())))
            .collect();
        let mut deadline = tokio::time::Instant::now() + wait;
        if let Some(call) = call_deadline {
            let answer_by = call.at.checked_sub(answer_margin(call.timeout));
            deadline = deadline.min(answer_by.unwrap_or(call.at));
        }
        // While it waits the call counts as waiting for work, so the instance hears Redis's
        // wake-ups; it looks again when tasks may have become ready here or on any instance
        // (due tasks are announced by the reaper that promotes them), and at least every
        // second in case a wake-up was missed. Looks are at least 10 ms apart.
        let _waiting = (!wait.is_zero()).then(|| crate::lease::Waiting::new(&self.streams));
        let mut ready = self.streams.ready.subscribe();
        loop {
            let looked = tokio::time::Instant::now();
            ready.mark_unchanged();
            let mut leases = self
                .lease_from(&targets, max, lease, &request.worker_id)
                .await?;
            // Keep the answer under 4 MiB (most clients' receive limit): give back the rest.
            let keep = fits(
                leases
                    .iter()
                    .map(|l| l.task.as_ref().map_or(0, |t| t.payload.len())),
            );
            for extra in leases.split_off(keep) {
                if let Some(task) = &extra.task {
                    self.release_quietly(&task.project, &task.queue, &task.id, &extra.lease_token)
                        .await;
                }
            }
            if !leases.is_empty() || tokio::time::Instant::now() >= deadline {
                metrics::counter!("sluice_queue_leased_total").increment(leases.len() as u64);
                return Ok(Response::new(pb::DequeueResponse { leases }));
            }
            let safety = (looked + LONG_POLL_SAFETY).min(deadline);
            tokio::select! {
                changed = ready.changed() => if changed.is_err() {
                    tokio::time::sleep_until(safety).await;
                },
                () = tokio::time::sleep_until(safety) => {}
            }
            tokio::time::sleep_until((looked + LONG_POLL_GAP).min(deadline)).await;
        }
    }

    async fn complete(
        &self,
        request: Request<pb::CompleteRequest>,
    ) -> std::result::Result<Response<pb::CompleteResponse>, Status> {
        let caller = sluice::auth::caller(&request)?;
        let r = request.into_inner();
        Self::task_ref(&r.project, &r.queue, &r.task_id)?;
        caller.grant("project", &r.project)?;
        self.complete_task(&r.project, &r.queue, &r.task_id, &r.lease_token, &r.result)
            .await?;
        Ok(Response::new(pb::CompleteResponse {}))
    }

    async fn fail(
        &self,
        request: Request<pb::FailRequest>,
    ) -> std::result::Result<Response<pb::FailResponse>, Status> {
        let caller = sluice::auth::caller(&request)?;
        let r = request.into_inner();
        Self::task_ref(&r.project, &r.queue, &r.task_id)?;
        caller.grant("project", &r.project)?;
        let category = category_name(r.category);
        // A forgotten `retryable` must not dead-letter a task: only "permanent" defaults to no.
        let retryable = r.retryable.unwrap_or(category != "permanent");
        let outcome = self
            .fail_task(
                &r.project,
                &r.queue,
                &r.task_id,
                &r.lease_token,
                category,
                &r.message,
                retryable,
            )
            .await?;
        use pb::fail_response::Outcome;
        let response = match outcome {
            FailOutcome::Retry { at, attempt } => pb::FailResponse {
                outcome: Outcome::RetryScheduled.into(),
                retry_at: Some(timestamp(at)),
                attempt,
            },
            FailOutcome::Dead { attempt } => pb::FailResponse {
                outcome: Outcome::DeadLettered.into(),
                retry_at: None,
                attempt,
            },
            FailOutcome::Cancelled { attempt } => pb::FailResponse {
                outcome: Outcome::Cancelled.into(),
                retry_at: None,
                attempt,
            },
        };
        Ok(Response::new(response))
    }

    async fn extend_lease(
        &self,
        request: Request<pb::ExtendLeaseRequest>,
    ) -> std::result::Result<Response<pb::ExtendLeaseResponse>, Status> {
        let caller = sluice::auth::caller(&request)?;
        let r = request.into_inner();
        Self::task_ref(&r.project, &r.queue, &r.task_id)?;
        caller.grant("project", &r.project)?;
        let by = lease_ms(r.extend_by.as_ref(), "extend_by")?;
        if by == 0 {
            return Err(Error::invalid("extend_by", "is required").into());
        }
        let (deadline, cancel_requested) = self
            .store
            .extend_many(&r.project, &r.queue, &[(&r.task_id, &r.lease_token)], by)
            .await?
            .pop()
            .unwrap_or_else(|| Err(Error::Internal("extend: no answer".into())))?;
        Ok(Response::new(pb::ExtendLeaseResponse {
            deadline: Some(timestamp(deadline)),
            cancel_requested,
        }))
    }

    type LeaseStream = LeaseStream;

    async fn lease(
        &self,
        request: Request<tonic::Streaming<pb::LeaseRequest>>,
    ) -> std::result::Result<Response<Self::LeaseStream>, Status> {
        let caller = sluice::auth::caller(&request)?;
        let presented = request
            .extensions()
            .get::<sluice::auth::Presented>()
            .cloned()
            .ok_or_else(|| Status::permission_denied("the call carries no credentials"))?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(crate::lease::serve(
            self.clone(),
            (caller, presented),
            request.into_inner(),
            tx,
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> std::result::Result<Response<pb::GetTaskResponse>, Status> {
        let caller = sluice::auth::caller(&request)?;
        let r = request.into_inner();
        Self::task_ref(&r.project, &r.queue, &r.task_id)?;
        caller.grant("project", &r.project)?;
        let (record, payload, result) = self
            .store
            .get(&r.project, &r.queue, &r.task_id)
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no task {} in {}/{}",
                    r.task_id, r.project, r.queue
                ))
            })?;
        Ok(Response::new(pb::GetTaskResponse {
            task: Some(task_to_proto(
                &r.project,
                &r.queue,
                record,
                payload,
                result,
                &self.queues.get(&r.project, &r.queue).retry,
            )),
        }))
    }

    async fn cancel_task(
        &self,
        request: Request<pb::CancelTaskRequest>,
    ) -> std::result::Result<Response<pb::CancelTaskResponse>, Status> {
        let caller = sluice::auth::caller(&request)?;
        let r = request.into_inner();
        Self::task_ref(&r.project, &r.queue, &r.task_id)?;
        caller.grant("project", &r.project)?;
        let now = self.store.cancel(&r.project, &r.queue, &r.task_id).await?;
        Ok(Response::new(pb::CancelTaskResponse {
            state: if now {
                pb::TaskState::Cancelled
            } else {
                pb::TaskState::Leased
            }
            .into(),
            cancel_requested: !now,
        }))
    }

    async fn get_queue_stats(
        &self,
        request: Request<pb::GetQueueStatsRequest>,
    ) -> std::result::Result<Response<pb::GetQueueStatsResponse>, Status> {
        let caller = sluice::auth::caller(&request)?;
        let r = request.into_inner();
        queue_ref(&r.project, &r.queue)?;
        caller.grant("project", &r.project)?;
        let s = self.store.stats(&r.project, &r.queue).await?;
        Ok(Response::new(pb::GetQueueStatsResponse {
            stats: Some(pb::QueueStats {
                ready_by_priority: (0u8..5)
                    .map(|p| pb::PriorityDepth {
                        priority: model::priority_to_proto(p).into(),
                        ready: s.ready[usize::from(p)],
                    })
                    .collect(),
                ready: s.ready.iter().sum(),
                scheduled: s.scheduled,
                leased: s.leased,
                dead: s.dead,
                succeeded_retained: s.done.saturating_sub(s.cancelled),
                cancelled_retained: s.cancelled,
                paused: s.paused,
                enqueued_per_sec: s.last_minute[0] as f64 / 60.0,
                completed_per_sec: s.last_minute[1] as f64 / 60.0,
                failed_per_sec: s.last_minute[2] as f64 / 60.0,
                max_size: self.queues.get(&r.project, &r.queue).max_size,
                sampled_at: Some(model::timestamp(crate::now_ms() as f64)),
                project: r.project,
                queue: r.queue,
            }),
        }))
    }

    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> std::result::Result<Response<pb::ListWorkersResponse>, Status> {
        let caller = sluice::auth::caller(&request)?;
        let r = request.into_inner();
        validate_name(&r.project, "project")?;
        caller.grant("project", &r.project)?;
        if !r.queue.is_empty() {
            validate_name(&r.queue, "queue")?;
        }
        let (workers, truncated) = crate::roster::list(self, &r.project, &r.queue).await;
        Ok(Response::new(pb::ListWorkersResponse {
            workers,
            truncated,
        }))
    }

    async fn pause_queue(
        &self,
        request: Request<pb::PauseQueueRequest>,
    ) -> std::result::Result<Response<pb::PauseQueueResponse>, Status> {
        let caller = sluice::auth::caller(&request)?;
        let r = request.into_inner();
        queue_ref(&r.project, &r.queue)?;
        caller.grant("project", &r.project)?;
        let paused = self.store.set_paused(&r.project, &r.queue, true).await?;
        Ok(Response::new(pb::PauseQueueResponse { paused }))
    }

    async fn resume_queue(
        &self,
        request: Request<pb::ResumeQueueRequest>,
    ) -> std::result::Result<Response<pb::ResumeQueueResponse>, Status> {
        let caller = sluice::auth::caller(&request)?;
        let r = request.into_inner();
        queue_ref(&r.project, &r.queue)?;
        caller.grant("project", &r.project)?;
        let paused = self.store.set_paused(&r.project, &r.queue, false).await?;
        // Its ready tasks can be leased again (Redis pub/sub announces them when it flows).
        self.wake_local(256);
        Ok(Response::new(pb::ResumeQueueResponse { paused }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> std::result::Result<Response<pb::ListDeadLettersResponse>, Status> {
        let caller = sluice::auth::caller(&request)?;
        let r = request.into_inner();
        queue_ref(&r.project, &r.queue)?;
        caller.grant("project", &r.project)?;
        let page = match r.page_size {
            0 => 100,
            n if n > 500 => return Err(Error::invalid("page_size", "at most 500").into()),
            n => u64::from(n),
        };
        let cursor = dead_cursor(&r.page_token)?;
        let category = (r.category != 0).then(|| category_name(r.category));
        let (tasks, more) = self
            .store
            .list_dead(&r.project, &r.queue, cursor, page)
            .await?;
        // A page stops before the answer would pass 4 MiB; the next one starts there.
        let fitting = if r.include_payload {
            fits(tasks.iter().map(|(_, (_, p))| p.len()))
        } else {
            tasks.len()
        };
        let more = more || fitting < tasks.len();
        let next = tasks[..fitting]
            .last()
            .map(|(at, (record, _))| format!("{at} {}", record.id));
        let tasks = tasks
            .into_iter()
            .take(fitting)
            .map(|(_, task)| task)
            .filter(|(record, _)| {
                category.is_none_or(|c| record.err.last().is_some_and(|e| e.category == c))
            })
            .map(|(record, payload)| {
                let payload = if r.include_payload {
                    payload
                } else {
                    Vec::new()
                };
                task_to_proto(
                    &r.project,
                    &r.queue,
                    record,
                    payload,
                    Vec::new(),
                    &self.queues.get(&r.project, &r.queue).retry,
                )
            })
            .collect();
        Ok(Response::new(pb::ListDeadLettersResponse {
            tasks,
            next_page_token: match next {
                Some(next) if more => next,
                _ => String::new(),
            },
        }))
    }

    async fn redrive_dead_letters(
        &self,
        request: Request<pb::RedriveDeadLettersRequest>,
    ) -> std::result::Result<Response<pb::RedriveDeadLettersResponse>, Status> {
        let caller = sluice::auth::caller(&request)?;
        let r = request.into_inner();
        queue_ref(&r.project, &r.queue)?;
        caller.grant("project", &r.project)?;
        let selector = self.selector(r.selector.as_ref())?;
        let pass = self
            .store
            .redrive_or_purge(
                &r.project,
                &r.queue,
                DeadOp::Redrive {
                    max_size: self.queues.get(&r.project, &r.queue).max_size,
                },
                limit_of(r.limit)?,
                &selector,
                dead_cursor(&r.page_token)?,
            )
            .await?;
        Ok(Response::new(pb::RedriveDeadLettersResponse {
            redriven: u32::try_from(pass.count).unwrap_or(u32::MAX),
            more: pass.more,
            next_page_token: pass.cursor,
        }))
    }

    async fn purge_dead_letters(
        &self,
        request: Request<pb::PurgeDeadLettersRequest>,
    ) -> std::result::Result<Response<pb::PurgeDeadLettersResponse>, Status> {
        let caller = sluice::auth::caller(&request)?;
        let r = request.into_inner();
        queue_ref(&r.project, &r.queue)?;
        caller.grant("project", &r.project)?;
        let selector = self.selector(r.selector.as_ref())?;
        let pass = self
            .store
            .redrive_or_purge(
                &r.project,
                &r.queue,
                DeadOp::Purge,
                limit_of(r.limit)?,
                &selector,
                dead_cursor(&r.page_token)?,
            )
            .await?;
        Ok(Response::new(pb::PurgeDeadLettersResponse {
            purged: u32::try_from(pass.count).unwrap_or(u32::MAX),
            more: pass.more,
            next_page_token: pass.cursor,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::uniform;

    /// Retry jitter draws from `uniform`: it must stay in [0, 1) and cover it, or every task
    /// would retry at the same moment.
    #[test]
    fn uniform_covers_zero_to_one() {
        let draws: Vec<f64> = (0..10_000).map(|_| uniform()).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        // The mean of 10,000 uniform draws has a standard deviation of 0.003.
        assert!((0.47..0.53).contains(&mean), "mean {mean}");
        let low = draws.iter().filter(|u| **u < 0.1).count();
        let high = draws.iter().filter(|u| **u >= 0.9).count();
        assert!(low > 800 && high > 800, "{low} below 0.1, {high} from 0.9");
    }
}
