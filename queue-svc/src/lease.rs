//! The `Lease` stream: subscribe, credits, push dispatch, heartbeats, acks, drain (the
//! protocol is documented on `LeaseRequest` in the contract).
//!
//! Push: the scripts that make tasks ready publish how many on the Redis channel
//! `sluice:q:wake`; every instance subscribes and wakes that many of its streams waiting for
//! work (one each), whichever instance enqueued (on Redis Cluster, PUBLISH reaches every
//! node, so an instance subscribes on any one). Without the subscription (embedded store, or
//! while it reconnects) an enqueue wakes this instance's streams directly and tasks from other
//! instances are found by a safety poll (`SAFETY_POLL`). Nothing polls while a stream has no
//! credit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt as _;
use prost::Message as _;
use sluice::auth::{Identity, Presented, Role};
use sluice::error::Error;
use sluice::proto::sluice::queue::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;

use crate::model::{category_name, timestamp, validate_name, validate_task_id, validate_worker_id};
use crate::service::QueueService;
use crate::store::FailOutcome;

/// Most credit a stream may hold.
pub const MAX_CREDIT: u64 = 10_000;
/// Most leases one heartbeat extends (the contract's bound on `Heartbeat.tasks`).
pub const MAX_HEARTBEAT_TASKS: usize = 1000;
/// How long a stream with credit waits for a wake-up before looking anyway, without Redis
/// pub/sub wake-ups (the embedded store, or while the subscription is down).
pub const SAFETY_POLL: Duration = Duration::from_secs(1);
/// The same, while Redis pub/sub announces every task that becomes ready.
pub const SAFETY_POLL_PUSHED: Duration = Duration::from_secs(10);
/// How long after its lease deadline (as the stream last saw it) a delivered task stops
/// counting as in flight.
const IN_FLIGHT_GRACE_MS: u64 = 60_000;
/// Keepalive period.
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// Lease length of a stream that asks for none (heartbeats extend by this much).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);

/// The workers connected to this instance, for ListWorkers.
#[derive(Debug, Default)]
pub struct Workers {
    next: AtomicU64,
    streams: Mutex<HashMap<u64, (String, pb::WorkerInfo)>>,
}

impl Workers {
    fn add(&self, project: &str, info: pb::WorkerInfo) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut streams) = self.streams.lock() {
            streams.insert(id, (project.to_owned(), info));
        }
        id
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut pb::WorkerInfo)) {
        if let Ok(mut streams) = self.streams.lock()
            && let Some((_, info)) = streams.get_mut(&id)
        {
            f(info);
        }
    }

    fn remove(&self, id: u64) {
        if let Ok(mut streams) = self.streams.lock() {
            streams.remove(&id);
        }
    }

    /// Every stream: its registration, project and info.
    pub fn snapshot(&self) -> Vec<(u64, String, pb::WorkerInfo)> {
        self.streams
            .lock()
            .map(|streams| {
                streams
                    .iter()
                    .map(|(id, (project, info))| (*id, project.clone(), info.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The workers of `project` (subscribed to `queue`, when not empty).
    pub fn list(&self, project: &str, queue: &str) -> Vec<pb::WorkerInfo> {
        self.streams
            .lock()
            .map(|streams| {
                streams
                    .values()
                    .filter(|(p, info)| {
                        p == project && (queue.is_empty() || info.queues.iter().any(|q| q == queue))
                    })
                    .map(|(_, info)| info.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn now_ts() -> prost_types::Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_millis() as f64);
    timestamp(ms)
}

fn response(kind: pb::lease_response::Kind) -> Result<pb::LeaseResponse, Status> {
    Ok(pb::LeaseResponse { kind: Some(kind) })
}

fn rejected(task_id: String, err: Error) -> pb::lease_response::Kind {
    let status = Status::from(err);
    pb::lease_response::Kind::Ack(pb::Ack {
        task_id,
        kind: pb::ack::Kind::Rejected.into(),
        message: status.message().to_owned(),
        code: status.code() as i32,
        retry_at: None,
    })
}

fn acked(task_id: String, kind: pb::ack::Kind) -> pb::lease_response::Kind {
    pb::lease_response::Kind::Ack(pb::Ack {
        task_id,
        kind: kind.into(),
        message: String::new(),
        code: 0,
        retry_at: None,
    })
}

/// A timestamp in ms since the epoch (0 before it).
fn epoch_ms(t: &prost_types::Timestamp) -> u64 {
    u64::try_from(t.seconds)
        .unwrap_or(0)
        .saturating_mul(1000)
        .saturating_add(u64::try_from(t.nanos / 1_000_000).unwrap_or(0))
}

/// One subscribed stream.
struct Stream {
    service: QueueService,
    project: String,
    targets: Vec<(String, String)>,
    worker: String,
    lease_ms: u64,
    heartbeat_ms: u64,
    credits: u64,
    draining: bool,
    /// Tasks delivered and not yet completed, failed or released, with their lease deadline
    /// (ms since the epoch): expired ones go on a keep-alive tick a minute after it, lost ones
    /// with the heartbeat that finds them lost.
    in_flight: HashMap<String, u64>,
    tx: mpsc::Sender<Result<pb::LeaseResponse, Status>>,
    registration: u64,
    /// Checked again with each batch of messages and each keep-alive tick: credentials revoked
    /// or expired while the stream is open end it.
    credentials: Presented,
}

/// Serves one Lease stream until it ends.
pub async fn serve(
    service: QueueService,
    (caller, credentials): (Arc<Identity>, Presented),
    mut inbound: tonic::Streaming<pb::LeaseRequest>,
    tx: mpsc::Sender<Result<pb::LeaseResponse, Status>>,
) {
    let subscribe = match inbound.message().await {
        Ok(Some(pb::LeaseRequest {
            kind: Some(pb::lease_request::Kind::Subscribe(s)),
        })) => s,
        Ok(_) => {
            let _ = tx
                .send(Err(Error::invalid(
                    "subscribe",
                    "the first message must be Subscribe",
                )
                .into()))
                .await;
            return;
        }
        Err(status) => {
            tracing::debug!(%status, "lease stream ended before subscribing");
            return;
        }
    };
    let mut stream = match Stream::open(service, &caller, credentials, subscribe, tx).await {
        Ok(stream) => stream,
        Err((tx, status)) => {
            let _ = tx.send(Err(status)).await;
            return;
        }
    };
    stream.run(&mut inbound).await;
    stream.service.workers().remove(stream.registration);
}

impl Stream {
    async fn open(
        service: QueueService,
        caller: &Identity,
        credentials: Presented,
        s: pb::Subscribe,
        tx: mpsc::Sender<Result<pb::LeaseResponse, Status>>,
    ) -> Result<Self, (mpsc::Sender<Result<pb::LeaseResponse, Status>>, Status)> {
        let checked = (|| {
            validate_name(&s.project, "subscribe.project")?;
            if s.queues.is_empty() || s.queues.len() > 16 {
                return Err(Error::invalid("subscribe.queues", "name 1 to 16 queues"));
            }
            for (i, q) in s.queues.iter().enumerate() {
                validate_name(q, &format!("subscribe.queues[{i}]"))?;
            }
            validate_worker_id(&s.worker_id, "subscribe.worker_id", true)?;
            if s.labels.len() > 16
                || s.labels
                    .iter()
                    .any(|(k, v)| k.is_empty() || k.len() > 63 || v.len() > 256)
            {
                return Err(Error::invalid(
                    "subscribe.labels",
                    "at most 16 entries; keys 1 to 63 bytes, values at most 256",
                ));
            }
            crate::service::lease_ms(s.lease_duration.as_ref(), "subscribe.lease_duration")
        })();
        let lease_ms = match checked {
            Ok(ms) => ms,
            Err(err) => return Err((tx, err.into())),
        };
        // Every task the stream leases or finishes is in the subscribed project.
        if let Err(status) = caller.grant("subscribe.project", &s.project) {
            return Err((tx, status));
        }
        let heartbeat_ms = if lease_ms > 0 {
            lease_ms
        } else {
            u64::try_from(DEFAULT_LEASE.as_millis()).unwrap_or(60_000)
        };
        let registration = service.workers().add(
            &s.project,
            pb::WorkerInfo {
                worker_id: s.worker_id.clone(),
                queues: s.queues.clone(),
                labels: s.labels.clone(),
                in_flight: 0,
                credits: 0,
                connected_at: Some(now_ts()),
                last_heartbeat: None,
                instance: service.instance().to_owned(),
                draining: false,
            },
        );
        let subscribed = pb::Subscribed {
            instance: service.instance().to_owned(),
            lease_duration: Some(crate::model::proto_duration(Duration::from_millis(
                heartbeat_ms,
            ))),
            keepalive_interval: Some(crate::model::proto_duration(KEEPALIVE)),
        };
        if tx
            .send(response(pb::lease_response::Kind::Subscribed(subscribed)))
            .await
            .is_err()
        {
            service.workers().remove(registration);
            return Err((tx, Status::cancelled("the worker went away")));
        }
        Ok(Self {
            targets: s
                .queues
                .iter()
                .map(|q| (s.project.clone(), q.clone()))
                .collect(),
            project: s.project,
            worker: s.worker_id,
            lease_ms,
            heartbeat_ms,
            credits: 0,
            draining: false,
            in_flight: HashMap::new(),
            tx,
            registration,
            service,
            credentials,
        })
    }

    async fn send(&self, kind: pb::lease_response::Kind) -> bool {
        self.tx.send(response(kind)).await.is_ok()
    }

    fn publish(&self) {
        let (credits, in_flight, draining) = (self.credits, self.in_flight.len(), self.draining);
        self.service.workers().update(self.registration, |info| {
            info.credits = u32::try_from(credits).unwrap_or(u32::MAX);
            info.in_flight = u32::try_from(in_flight).unwrap_or(u32::MAX);
            info.draining = draining;
        });
    }

    /// Leases what the credit allows and writes it out. Returns whether it leased all it asked
    /// for (so there may be more ready), or `None` when the worker is gone.
    async fn dispatch(&mut self) -> Option<bool> {
        let want = usize::try_from(self.credits.min(64)).unwrap_or(64);
        let leases = match self
            .service
            .lease_from(&self.targets, want, self.lease_ms, &self.worker)
            .await
        {
            Ok(leases) => leases,
            Err(err) => {
                tracing::debug!(error = %err, "lease stream: store unavailable");
                return Some(false);
            }
        };
        let filled = leases.len() >= want;
        let mut leases = leases.into_iter();
        while let Some(lease) = leases.next() {
            let (id, queue, token) = match &lease.task {
                Some(task) => (
                    task.id.clone(),
                    task.queue.clone(),
                    lease.lease_token.clone(),
                ),
                None => continue,
            };
            let deadline = lease.deadline.as_ref().map_or(0, epoch_ms);
            if !self.send(pb::lease_response::Kind::Task(lease)).await {
                // Leased but never written: give them back, not counted as attempts.
                self.service
                    .release_quietly(&self.project, &queue, &id, &token)
                    .await;
                for rest in leases {
                    if let Some(task) = &rest.task {
                        self.service
                            .release_quietly(
                                &self.project,
                                &task.queue,
                                &task.id,
                                &rest.lease_token,
                            )
                            .await;
                    }
                }
                return None;
            }
            self.credits -= 1;
            self.in_flight.insert(id, deadline);
        }
        self.publish();
        Some(filled)
    }

    async fn run(&mut self, inbound: &mut tonic::Streaming<pb::LeaseRequest>) {
        let wake = self.service.wakeups();
        let shutdown = self.service.shutdown_token();
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.tick().await;
        loop {
            // Registered before looking, so an enqueue between the look and the wait still wakes.
            // Only a stream that can take work waits for a wake-up: a wake-up sent to a stream
            // without credit would be lost for the streams that have some.
            let hungry = self.credits > 0 && !self.draining;
            let notified = wake.wakeups.notified();
            tokio::pin!(notified);
            if hungry {
                notified.as_mut().enable();
            }
            if hungry {
                // Fewer than asked: nothing more is ready, wait for a wake-up.
                match self.dispatch().await {
                    None => return,
                    Some(true) => continue,
                    Some(false) => {}
                }
            }
            let _waiting = hungry.then(|| Waiting::new(&wake));
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(request)) => {
                        let (batch, ended) = gather(request, inbound);
                        if let Err(status) = self.recheck() {
                            let _ = self.tx.send(Err(status)).await;
                            return;
                        }
                        if let Err(status) = self.handle_batch(batch).await {
                            let _ = self.tx.send(Err(status)).await;
                            return;
                        }
                        if ended {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(status) => {
                        tracing::debug!(%status, "lease stream broke; delivered leases stay valid until their deadline");
                        return;
                    }
                },
                () = &mut notified, if hungry => {}
                () = tokio::time::sleep(if wake.pushed.load(Ordering::Relaxed) { SAFETY_POLL_PUSHED } else { SAFETY_POLL }), if hungry => {}
                _ = keepalive.tick() => {
                    if let Err(status) = self.recheck() {
                        let _ = self.tx.send(Err(status)).await;
                        return;
                    }
                    // Deadlines are Redis's; a minute's grace absorbs this host's clock
                    // being ahead (and leases extended outside this stream).
                    let now = crate::now_ms();
                    let before = self.in_flight.len();
                    self.in_flight
                        .retain(|_, deadline| deadline.saturating_add(IN_FLIGHT_GRACE_MS) >= now);
                    if self.in_flight.len() != before {
                        self.publish();
                    }
                    if !self.send(pb::lease_response::Kind::Keepalive(pb::Keepalive { server_time: Some(now_ts()) })).await {
                        return;
                    }
                }
                () = shutdown.cancelled(), if !self.draining => {
                    self.draining = true;
                    self.publish();
                    if !self.send(pb::lease_response::Kind::Drained(pb::Drained { server_shutdown: true })).await {
                        return;
                    }
                }
            }
        }
    }

    /// The stream's credentials checked again: still valid, still the worker role, still the
    /// subscribed project.
    fn recheck(&self) -> Result<(), Status> {
        self.credentials
            .recheck("Lease", &[Role::Worker], "subscribe.project", &self.project)
    }

    /// Handles messages that arrived together, in order, except that completions are
    /// gathered (up to the next message that answers or depends on them) into one store call
    /// per queue. Credits only add up, so they never split a gathering; the stream leases
    /// once, after the whole batch.
    async fn handle_batch(&mut self, batch: Vec<pb::LeaseRequest>) -> Result<(), Status> {
        use pb::lease_request::Kind;
        let mut completes = Vec::new();
        for request in batch {
            let result = match request.kind {
                Some(Kind::Complete(c)) => {
                    completes.push(c);
                    continue;
                }
                Some(Kind::Credits(_)) => self.handle(request).await,
                kind => {
                    self.complete(std::mem::take(&mut completes)).await;
                    self.handle(pb::LeaseRequest { kind }).await
                }
            };
            if result.is_err() {
                self.complete(completes).await;
                return result;
            }
        }
        self.complete(completes).await;
        Ok(())
    }

    /// Completes tasks in one store call per queue and acknowledges each, in order.
    async fn complete(&mut self, completes: Vec<pb::CompleteTask>) {
        if completes.is_empty() {
            return;
        }
        let outcomes = self.service.complete_stream(&self.project, completes).await;
        for (id, outcome) in outcomes {
            self.in_flight.remove(&id);
            let kind = match outcome {
                Ok(()) => acked(id, pb::ack::Kind::Completed),
                Err(err) => rejected(id, err),
            };
            if !self.send(kind).await {
                break;
            }
        }
        self.publish();
    }

    async fn handle(&mut self, request: pb::LeaseRequest) -> Result<(), Status> {
        use pb::lease_request::Kind;
        let service = self.service.clone();
        match request.kind {
            None | Some(Kind::Subscribe(_)) => {
                return Err(Error::invalid(
                    "kind",
                    "Subscribe comes once, first; every later message names its kind",
                )
                .into());
            }
            Some(Kind::Credits(c)) => {
                let credits = self.credits + u64::from(c.add);
                if credits > MAX_CREDIT {
                    return Err(Error::invalid(
                        "credits.add",
                        format!("available credit would be {credits}, above {MAX_CREDIT}"),
                    )
                    .into());
                }
                self.credits = credits;
                self.publish();
            }
            Some(Kind::Heartbeat(h)) => {
                if h.tasks.len() > MAX_HEARTBEAT_TASKS {
                    return Err(Error::invalid(
                        "heartbeat.tasks",
                        format!(
                            "at most {MAX_HEARTBEAT_TASKS} per heartbeat, got {}: send several",
                            h.tasks.len()
                        ),
                    )
                    .into());
                }
                let mut ack = pb::HeartbeatAck::default();
                // Malformed entries are lost; the rest are extended with one call per queue.
                let mut refs = Vec::with_capacity(h.tasks.len());
                for t in h.tasks {
                    if validate_name(&t.queue, "heartbeat.tasks.queue").is_ok()
                        && validate_task_id(&t.task_id, "heartbeat.tasks.task_id").is_ok()
                    {
                        refs.push(t);
                    } else {
                        ack.lost.push(t.task_id);
                    }
                }
                let by = self.heartbeat_ms;
                let store = service.store();
                let items = refs
                    .iter()
                    .map(|t| {
                        let lease = (t.task_id.clone(), t.lease_token.clone());
                        (self.project.clone(), t.queue.clone(), lease)
                    })
                    .collect();
                let answers =
                    crate::gather::per_queue(items, |project, queue, leases| async move {
                        let leases: Vec<(&str, &str)> = leases
                            .iter()
                            .map(|(id, token)| (id.as_str(), token.as_str()))
                            .collect();
                        match store.extend_many(&project, &queue, &leases, by).await {
                            Ok(answers) => answers,
                            Err(err) => leases.iter().map(|_| Err(err.clone())).collect(),
                        }
                    })
                    .await;
                for (t, answer) in refs.into_iter().zip(answers) {
                    match answer {
                        Ok((deadline, cancel_requested)) => {
                            if let Some(kept) = self.in_flight.get_mut(&t.task_id) {
                                *kept = deadline.max(0.0) as u64;
                            }
                            if cancel_requested {
                                let revoked = pb::Revoked {
                                    task_id: t.task_id.clone(),
                                    reason: "cancelled".into(),
                                    queue: t.queue,
                                };
                                if !self.send(pb::lease_response::Kind::Revoked(revoked)).await {
                                    return Ok(());
                                }
                            }
                            ack.extended.push(pb::ExtendedLease {
                                task_id: t.task_id,
                                deadline: Some(timestamp(deadline)),
                            });
                        }
                        Err(_) => {
                            self.in_flight.remove(&t.task_id);
                            ack.lost.push(t.task_id);
                        }
                    }
                }
                self.service.workers().update(self.registration, |info| {
                    info.last_heartbeat = Some(now_ts())
                });
                if !ack.lost.is_empty() {
                    self.publish();
                }
                self.send(pb::lease_response::Kind::HeartbeatAck(ack)).await;
            }
            Some(Kind::Complete(c)) => {
                self.complete(vec![c]).await;
            }
            Some(Kind::Fail(f)) => {
                let result = async {
                    validate_name(&f.queue, "fail.queue")?;
                    validate_task_id(&f.task_id, "fail.task_id")?;
                    let category = category_name(f.category);
                    let retryable = f.retryable.unwrap_or(category != "permanent");
                    service
                        .fail_task(
                            &self.project,
                            &f.queue,
                            &f.task_id,
                            &f.lease_token,
                            category,
                            &f.message,
                            retryable,
                        )
                        .await
                }
                .await;
                self.in_flight.remove(&f.task_id);
                let kind = match result {
                    Ok(FailOutcome::Retry { at, .. }) => pb::lease_response::Kind::Ack(pb::Ack {
                        task_id: f.task_id,
                        kind: pb::ack::Kind::FailedRetryScheduled.into(),
                        message: String::new(),
                        code: 0,
                        retry_at: Some(timestamp(at)),
                    }),
                    Ok(FailOutcome::Dead { .. }) => acked(f.task_id, pb::ack::Kind::DeadLettered),
                    Ok(FailOutcome::Cancelled { .. }) => acked(f.task_id, pb::ack::Kind::Cancelled),
                    Err(err) => rejected(f.task_id, err),
                };
                self.send(kind).await;
                self.publish();
            }
            Some(Kind::Release(r)) => {
                let result = async {
                    validate_name(&r.queue, "release.queue")?;
                    validate_task_id(&r.task_id, "release.task_id")?;
                    service
                        .store()
                        .release(&self.project, &r.queue, &r.task_id, &r.lease_token)
                        .await
                }
                .await;
                self.in_flight.remove(&r.task_id);
                let kind = match result {
                    Ok(()) => {
                        service.wake();
                        acked(r.task_id, pb::ack::Kind::Released)
                    }
                    Err(err) => rejected(r.task_id, err),
                };
                self.send(kind).await;
                self.publish();
            }
            Some(Kind::Drain(_)) => {
                if !self.draining {
                    self.draining = true;
                    self.publish();
                    self.send(pb::lease_response::Kind::Drained(pb::Drained {
                        server_shutdown: false,
                    }))
                    .await;
                }
            }
        }
        Ok(())
    }
}

/// Most messages, and bytes, a stream takes in one go (see [`gather`]).
const MAX_GATHER: usize = 256;
const MAX_GATHER_BYTES: usize = 4 * 1024 * 1024;

/// `first` and whatever else has already arrived on the stream (at most [`MAX_GATHER`]
/// messages, and past [`MAX_GATHER_BYTES`] no more), and whether the stream ended after them.
fn gather(
    first: pb::LeaseRequest,
    inbound: &mut tonic::Streaming<pb::LeaseRequest>,
) -> (Vec<pb::LeaseRequest>, bool) {
    let mut bytes = first.encoded_len();
    let mut batch = vec![first];
    while batch.len() < MAX_GATHER && bytes < MAX_GATHER_BYTES {
        // `message` keeps its state in the stream, so a poll that finds nothing loses nothing.
        match inbound.message().now_or_never() {
            Some(Ok(Some(request))) => {
                bytes += request.encoded_len();
                batch.push(request);
            }
            Some(Ok(None)) => return (batch, true),
            Some(Err(status)) => {
                tracing::debug!(%status, "lease stream broke; delivered leases stay valid until their deadline");
                return (batch, true);
            }
            None => break,
        }
    }
    (batch, false)
}

/// The id of a queue-svc instance, reported to workers and in ListWorkers.
pub fn instance_id() -> String {
    format!("{}-{}", std::process::id(), uuid::Uuid::now_v7().simple())
}

/// Shared lease-stream state of a service.
#[derive(Debug)]
pub struct StreamState {
    /// Connected workers.
    pub workers: Workers,
    /// Woken on every enqueue and release on this instance.
    pub wakeups: tokio::sync::Notify,
    /// This instance's id.
    pub instance: String,
    /// Cancelled when the instance shuts down.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Redis pub/sub wake-ups are flowing.
    pub pushed: std::sync::atomic::AtomicBool,
    /// Streams now waiting for work (with credit, nothing to deliver). The instance listens
    /// for Redis wake-ups only while some have waited lately.
    pub waiting: AtomicU64,
    /// Signalled when a stream starts waiting, for the wake-up listener.
    pub wanted: tokio::sync::Notify,
    /// Moved on whenever tasks may have become ready (the same events that wake streams), for
    /// Dequeue's long polls: each looks again when it moves.
    pub ready: tokio::sync::watch::Sender<u64>,
}

/// Counts a stream (or a long poll) as waiting for work for as long as it lives, which keeps
/// the instance listening for Redis wake-ups.
pub(crate) struct Waiting<'a>(&'a StreamState);

impl<'a> Waiting<'a> {
    pub(crate) fn new(state: &'a StreamState) -> Self {
        // Counted before the signal, so the listener that takes the signal sees the count.
        state.waiting.fetch_add(1, Ordering::SeqCst);
        state.wanted.notify_one();
        Self(state)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl StreamState {
    /// State for an instance stopping with `shutdown`.
    pub fn new(shutdown: tokio_util::sync::CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            workers: Workers::default(),
            wakeups: tokio::sync::Notify::new(),
            instance: instance_id(),
            shutdown,
            pushed: std::sync::atomic::AtomicBool::new(false),
            waiting: AtomicU64::new(0),
            wanted: tokio::sync::Notify::new(),
            ready: tokio::sync::watch::Sender::new(0),
        })
    }
}
