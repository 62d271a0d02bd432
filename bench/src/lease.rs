//! The Lease stream workloads (`sluice.queue.v1.Queue/Lease`). They do not fit the driver's
//! request loop: each worker holds one long-lived stream on its own connection, and the
//! server pushes tasks to it.
//!
//! - `lease-drain`: `--workers` streams drain a pre-filled queue. Each grants `--credits`,
//!   answers every TaskLease at once with CompleteTask on the stream and grants one more
//!   credit per Ack. A sample is the time from receiving a lease to receiving its Ack. The
//!   run ends when every worker has received no task for `--idle` (the queue is drained) or
//!   when `--duration` passes.
//! - `push-latency`: `--workers` idle streams with one credit each (one more per Ack); with
//!   `--redis-url`, Redis's command rate is first read over `--idle-sample` while nothing is
//!   sent. A producer then enqueues `--tasks` at `--rate` on a fixed schedule, each task's
//!   payload its send time (µs since the Unix epoch, decimal text); a sample is the time from
//!   that send to the lease reaching a worker (enqueue → handler start).
//!
//! A worker that stops sends Drain, completes what still arrives, waits for Drained and its
//! last Acks (at most `--timeout`), then half-closes the stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use futures::channel::mpsc::{UnboundedSender, unbounded};
use sluice::config::parse_duration;
use sluice::proto::sluice::queue::v1 as pb;
use sluice::proto::sluice::queue::v1::lease_request::Kind as Up;
use sluice::proto::sluice::queue::v1::lease_response::Kind as Down;
use sluice::proto::sluice::queue::v1::queue_client::QueueClient;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tonic::transport::{Channel, Endpoint};

use crate::driver::{Outcome, Verdict};
use crate::queue::QueueArgs;
use crate::redis_info;
use crate::report::{IdleRedis, Mode, Recorder, Report, TaskCounting};

/// Most credits one grant (and a worker's available credit) may carry.
const MAX_CREDITS: u32 = 10_000;
/// Most workers (streams, each on its own connection).
const MAX_WORKERS: u32 = 1024;
/// push-latency: Enqueue calls allowed in flight at once; a task due while this many are
/// outstanding is not sent and is reported as dropped.
const MAX_ENQUEUES_IN_FLIGHT: usize = 1024;
/// How often push-latency checks whether every task sent has been handled.
const SETTLE_POLL: Duration = Duration::from_millis(2);

/// Options both Lease stream workloads share.
#[derive(Debug, Clone, clap::Args)]
pub struct StreamArgs {
    /// gRPC endpoint of queue-svc.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:50051")]
    pub target: String,

    /// Longest run. lease-drain: from the first credit grant; the workers then stop even if
    /// the queue is not empty. push-latency: from the first task sent; the producer sends
    /// nothing after it.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Bounds connecting, the Subscribed answer, each Enqueue call, and how long a stopping
    /// worker waits for Drained and its last Acks (push-latency: also how long it waits, after
    /// --duration, for tasks sent but not yet handled).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Also print the report as one JSON line on stdout (the text block then goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// Options of `lease-drain`.
#[derive(Debug, Clone, clap::Args)]
pub struct LeaseDrainArgs {
    /// Workers: each is one Lease stream on its own connection.
    #[arg(long, value_name = "W", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_WORKERS)))]
    pub workers: u32,

    /// Credits each worker grants when it starts (1 to 10,000); it grants one more per Ack.
    #[arg(long, value_name = "C", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_CREDITS)))]
    pub credits: u32,

    /// A worker that has received no task for this long, and awaits no Ack, stops: the queue
    /// is drained. The run ends when every worker has stopped.
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = parse_duration)]
    pub idle: Duration,
}

/// Options of `push-latency`.
#[derive(Debug, Clone, clap::Args)]
pub struct PushLatencyArgs {
    /// Workers: each is one Lease stream on its own connection, holding one credit.
    #[arg(long, value_name = "W", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_WORKERS)))]
    pub workers: u32,

    /// Tasks the producer enqueues (one Enqueue each).
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub tasks: u64,

    /// Tasks per second, on a fixed schedule whatever the answers.
    #[arg(long, value_name = "R", default_value = "1000", value_parser = parse_rate)]
    pub rate: f64,

    /// With --redis-url: how long to read Redis's command rate with the workers subscribed and
    /// no task sent, before the producer starts. 0: skip it.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub idle_sample: Duration,
}

/// `--rate`: a positive, finite number of tasks per second.
fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of tasks per second"))?;
    if rate.is_finite() && rate > 0.0 {
        Ok(rate)
    } else {
        Err(format!("`{text}`: the rate must be greater than 0"))
    }
}

/// Microseconds since the Unix epoch, now; 0 if the clock is before 1970.
fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
        })
}

/// The send time a push-latency payload carries, if it is one.
fn payload_micros(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload).ok()?.trim().parse().ok()
}

fn check(run: &StreamArgs) -> anyhow::Result<()> {
    anyhow::ensure!(!run.duration.is_zero(), "--duration must be greater than 0");
    anyhow::ensure!(!run.timeout.is_zero(), "--timeout must be greater than 0");
    Ok(())
}

/// The endpoint of `--target`. Lease streams get no per-call timeout (they live for the whole
/// run; every wait on them is bounded here); unary calls get `--timeout`.
fn endpoint(run: &StreamArgs, unary: bool) -> anyhow::Result<Endpoint> {
    let endpoint = Endpoint::from_shared(run.target.clone())
        .with_context(|| format!("--target `{}` is not a valid URL", run.target))?
        .connect_timeout(run.timeout)
        .tcp_nodelay(true);
    Ok(if unary {
        endpoint.timeout(run.timeout)
    } else {
        endpoint
    })
}

/// One worker's Lease stream, subscribed.
struct Stream {
    up: UnboundedSender<pb::LeaseRequest>,
    down: tonic::Streaming<pb::LeaseResponse>,
}

impl Stream {
    /// Sends Subscribe on a new stream over `channel` and waits (at most `timeout`) for
    /// Subscribed.
    async fn open(
        channel: Channel,
        queue: &QueueArgs,
        worker_id: String,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let (up, rx) = unbounded();
        // Queued before the call, so the server has it as soon as the stream opens.
        up.unbounded_send(pb::LeaseRequest {
            kind: Some(Up::Subscribe(pb::Subscribe {
                project: queue.project.clone(),
                queues: vec![queue.queue.clone()],
                worker_id,
                labels: HashMap::new(),
                // Each task's own processing_timeout: leases are completed at once anyway.
                lease_duration: None,
            })),
        })
        .map_err(|_| anyhow::anyhow!("queueing Subscribe"))?;
        let mut client = QueueClient::new(channel);
        let mut down = tokio::time::timeout(timeout, client.lease(rx))
            .await
            .map_err(|_| anyhow::anyhow!("Lease: no answer within --timeout"))?
            .map_err(|status| anyhow::anyhow!("Lease refused: {status}"))?
            .into_inner();
        let first = tokio::time::timeout(timeout, down.message())
            .await
            .map_err(|_| anyhow::anyhow!("no Subscribed within --timeout"))?;
        match first {
            Ok(Some(pb::LeaseResponse {
                kind: Some(Down::Subscribed(_)),
            })) => Ok(Self { up, down }),
            Ok(Some(other)) => anyhow::bail!("expected Subscribed, got {other:?}"),
            Ok(None) => anyhow::bail!("the stream ended before Subscribed"),
            Err(status) => anyhow::bail!("Subscribe refused: {status}"),
        }
    }
}

/// Queues one message on a stream; false when its request side is gone.
fn send(up: &UnboundedSender<pb::LeaseRequest>, kind: Up) -> bool {
    up.unbounded_send(pb::LeaseRequest { kind: Some(kind) })
        .is_ok()
}

/// Why a worker's stream can no longer be written.
const CLOSED: &str = "the stream's request side closed";

/// Connects `workers` connections and subscribes one stream on each, all at once.
async fn open_streams(
    run: &StreamArgs,
    queue: &QueueArgs,
    workers: u32,
    role: &str,
) -> anyhow::Result<Vec<Stream>> {
    let endpoint = endpoint(run, false)?;
    let pid = std::process::id();
    let opens = (0..workers).map(|i| {
        let endpoint = endpoint.clone();
        let worker_id = format!("sluice-bench-{role}-{pid}-{i}");
        async move {
            // One `connect` per worker: each stream on its own HTTP/2 connection.
            let channel = endpoint
                .connect()
                .await
                .with_context(|| format!("connecting to {}", run.target))?;
            Stream::open(channel, queue, worker_id, run.timeout)
                .await
                .with_context(|| format!("subscribing worker {i}"))
        }
    });
    futures::future::try_join_all(opens).await
}

/// How a worker times its tasks.
#[derive(Debug, Clone, Copy)]
enum Clock {
    /// lease-drain: from receiving the lease to receiving its Ack.
    LeaseToAck,
    /// push-latency: from the send time in the payload to receiving the lease. Tasks whose
    /// payload is not a send time at or after `since` (µs since the epoch) were not sent by
    /// this run: they are completed and counted as errors.
    PayloadToLease { since: u64 },
}

/// What a worker does.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Credits granted at first.
    credits: u32,
    clock: Clock,
    /// Stop once no task came for this long and no Ack is awaited (lease-drain).
    idle: Option<Duration>,
    /// Bounds the wait for Drained and the last Acks once stopping, and the closing.
    timeout: Duration,
}

/// What the workers (and push-latency's producer) share.
struct Tally {
    /// Every task's sample and every error.
    recorder: Mutex<Recorder>,
    /// Leases received.
    received: AtomicU64,
    /// Tasks of this run acknowledged (completed or rejected).
    settled: AtomicU64,
    /// Tasks completed (Ack COMPLETED), for the progress line.
    completed: AtomicU64,
    errors: AtomicU64,
    /// push-latency: Enqueue calls answered OK.
    enqueued: AtomicU64,
    /// push-latency: leases of tasks this run did not send.
    foreign: AtomicU64,
}

impl Tally {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            recorder: Mutex::new(Recorder::new()?),
            received: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            enqueued: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
        })
    }

    fn recorder(&self) -> MutexGuard<'_, Recorder> {
        // A poisoned lock only means a task panicked mid-`record`; the counts are still usable.
        self.recorder.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records one task that took from `started` to `finished`.
    fn task(&self, started: Instant, finished: Instant) {
        self.completed.fetch_add(1, Ordering::Relaxed);
        let outcome = Outcome::tasks(Verdict::Allowed, 1);
        self.recorder().record(started, finished, &Ok(outcome));
    }

    fn error(&self, status: tonic::Status) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        self.recorder().record(now, now, &Err(status));
    }
}

/// A lease answered with CompleteTask, awaiting its Ack.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// Start of the sample.
    started: Instant,
    /// End of the sample, when known before the Ack (push-latency: the lease's arrival).
    finished: Option<Instant>,
    /// A task this run did not send (push-latency).
    foreign: bool,
}

/// How a worker ended.
#[derive(Debug, Clone, Copy)]
struct WorkerEnd {
    /// The worker stopped because it went `--idle` without a task.
    idle: bool,
    /// When its last Ack came.
    last_ack: Option<Instant>,
}

/// Runs one worker until it goes idle (if `plan.idle`), `stop` turns true (or its sender is
/// dropped), or its stream breaks. Every task it completes, and every problem, goes to
/// `tally`.
async fn work(
    stream: Stream,
    plan: Plan,
    tally: Arc<Tally>,
    mut stop: watch::Receiver<bool>,
) -> WorkerEnd {
    let Stream { up, mut down } = stream;
    let mut held: HashMap<String, Held> = HashMap::new();
    let mut last_activity = Instant::now();
    let mut last_ack = None;
    let mut went_idle = false;
    // Set once stopping: the latest time to wait for Drained and the last Acks.
    let mut stopping: Option<Instant> = None;
    let mut drained = false;
    // Why the stream cannot be used any more, when it broke.
    let mut broken: Option<String> = None;
    if !send(&up, Up::Credits(pb::Credits { add: plan.credits })) {
        broken = Some(CLOSED.to_owned());
    }
    while broken.is_none() {
        let now = Instant::now();
        if let Some(deadline) = stopping {
            if drained && held.is_empty() {
                break;
            }
            if now >= deadline {
                tally.error(tonic::Status::deadline_exceeded(format!(
                    "a stopping worker got no {} within --timeout",
                    if drained { "Ack" } else { "Drained" }
                )));
                break;
            }
        } else {
            let went = plan
                .idle
                .is_some_and(|idle| held.is_empty() && now >= last_activity + idle);
            if went || *stop.borrow() {
                went_idle = went;
                stopping = Some(now + plan.timeout);
                if !send(&up, Up::Drain(pb::Drain {})) {
                    broken = Some(CLOSED.to_owned());
                }
                continue;
            }
        }
        let wake = match (stopping, plan.idle) {
            (Some(deadline), _) => Some(deadline),
            (None, Some(idle)) => Some(last_activity + idle),
            (None, None) => None,
        };
        tokio::select! {
            message = down.message() => match message {
                Ok(Some(pb::LeaseResponse { kind: Some(kind) })) => {
                    let now = Instant::now();
                    match kind {
                        Down::Task(lease) => {
                            last_activity = now;
                            if let Err(why) = take(&up, &mut held, lease, plan.clock, now, &tally) {
                                broken = Some(why);
                            }
                        }
                        Down::Ack(ack) => {
                            let Some(task) = held.remove(&ack.task_id) else {
                                continue;
                            };
                            last_activity = now;
                            last_ack = Some(now);
                            settle(&tally, task, &ack, now);
                            if stopping.is_none() && !send(&up, Up::Credits(pb::Credits { add: 1 })) {
                                broken = Some(CLOSED.to_owned());
                            }
                        }
                        Down::Drained(d) => {
                            drained = true;
                            if stopping.is_none() {
                                if d.server_shutdown {
                                    tally.error(tonic::Status::unavailable("queue-svc is shutting down (Drained, server_shutdown)"));
                                }
                                stopping = Some(now + plan.timeout);
                            }
                        }
                        // Leases are completed at once: nothing to revoke, heartbeat or keep alive.
                        Down::Revoked(_) | Down::Keepalive(_) | Down::HeartbeatAck(_) | Down::Subscribed(_) => {}
                    }
                }
                Ok(Some(pb::LeaseResponse { kind: None })) => {}
                Ok(None) => broken = Some("queue-svc ended the stream".to_owned()),
                Err(status) => broken = Some(format!("the stream broke: {status}")),
            },
            changed = stop.changed(), if stopping.is_none() => {
                if changed.is_err() {
                    // The run is over without saying so: stop as if told to.
                    went_idle = false;
                    stopping = Some(Instant::now() + plan.timeout);
                    if !send(&up, Up::Drain(pb::Drain {})) {
                        broken = Some(CLOSED.to_owned());
                    }
                }
            }
            () = tokio::time::sleep_until(wake.unwrap_or(now)), if wake.is_some() => {}
        }
    }
    if let Some(why) = broken {
        tally.error(tonic::Status::unavailable(why));
    }
    for _ in held.drain() {
        tally.error(tonic::Status::deadline_exceeded(
            "a task completed on the stream got no Ack",
        ));
    }
    // Half-close, then let the server finish the stream (bounded).
    drop(up);
    let _ended = tokio::time::timeout(plan.timeout, async {
        while let Ok(Some(_)) = down.message().await {}
    })
    .await;
    WorkerEnd {
        idle: went_idle,
        last_ack,
    }
}

/// Handles one TaskLease received at `now`: completes it on the stream and remembers it
/// until its Ack. `Err` when the stream can no longer be written.
fn take(
    up: &UnboundedSender<pb::LeaseRequest>,
    held: &mut HashMap<String, Held>,
    lease: pb::TaskLease,
    clock: Clock,
    now: Instant,
    tally: &Tally,
) -> Result<(), String> {
    tally.received.fetch_add(1, Ordering::Relaxed);
    let Some(task) = lease.task else {
        // Nothing to complete, and no Ack will come: give the credit back.
        tally.error(tonic::Status::internal("a TaskLease without its task"));
        return if send(up, Up::Credits(pb::Credits { add: 1 })) {
            Ok(())
        } else {
            Err(CLOSED.to_owned())
        };
    };
    let entry = match clock {
        Clock::LeaseToAck => Held {
            started: now,
            finished: None,
            foreign: false,
        },
        Clock::PayloadToLease { since } => match payload_micros(&task.payload) {
            Some(sent) if sent >= since => {
                let waited = Duration::from_micros(unix_micros().saturating_sub(sent));
                Held {
                    started: now.checked_sub(waited).unwrap_or(now),
                    finished: Some(now),
                    foreign: false,
                }
            }
            _ => {
                tally.foreign.fetch_add(1, Ordering::Relaxed);
                Held {
                    started: now,
                    finished: Some(now),
                    foreign: true,
                }
            }
        },
    };
    let sent = send(
        up,
        Up::Complete(pb::CompleteTask {
            queue: task.queue,
            task_id: task.id.clone(),
            lease_token: lease.lease_token,
            result: Vec::new(),
        }),
    );
    if !sent {
        return Err(CLOSED.to_owned());
    }
    held.insert(task.id, entry);
    Ok(())
}

/// Records the Ack of a held task, received at `now`.
fn settle(tally: &Tally, task: Held, ack: &pb::Ack, now: Instant) {
    if !task.foreign {
        tally.settled.fetch_add(1, Ordering::Relaxed);
    }
    let kind = pb::ack::Kind::try_from(ack.kind).unwrap_or(pb::ack::Kind::Unspecified);
    match kind {
        pb::ack::Kind::Completed if task.foreign => {
            tally.error(tonic::Status::failed_precondition(
                "leased a task this run did not enqueue (left in --queue by an earlier run? use an empty queue)",
            ));
        }
        pb::ack::Kind::Completed => tally.task(task.started, task.finished.unwrap_or(now)),
        pb::ack::Kind::Rejected => tally.error(tonic::Status::new(
            tonic::Code::from_i32(ack.code),
            format!("CompleteTask rejected: {}", ack.message),
        )),
        other => tally.error(tonic::Status::internal(format!(
            "CompleteTask answered {}",
            other.as_str_name()
        ))),
    }
}

/// Prints, every second, what happened during that second. Runs until aborted.
async fn print_progress(tally: Arc<Tally>, start: Instant, producer: bool) {
    let second = Duration::from_secs(1);
    let mut ticker = tokio::time::interval_at(start + second, second);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut before = (0, 0, 0);
    loop {
        let now = ticker.tick().await;
        let totals = (
            tally.enqueued.load(Ordering::Relaxed),
            tally.completed.load(Ordering::Relaxed),
            tally.errors.load(Ordering::Relaxed),
        );
        let enqueued = if producer {
            format!("  {:>8} enqueued/s", totals.0 - before.0)
        } else {
            String::new()
        };
        eprintln!(
            "[{:>6.1}s]{enqueued}  {:>8} completed/s  {} errors",
            now.saturating_duration_since(start).as_secs_f64(),
            totals.1 - before.1,
            totals.2 - before.2,
        );
        before = totals;
    }
}

/// A Redis sample, or why it failed.
async fn sample(probe: &redis_info::Probe, when: &str) -> Result<redis_info::Sample, String> {
    probe
        .sample()
        .await
        .map_err(|e| format!("sampling Redis {when}: {e:#}"))
}

/// Joins every worker; when `deadline` passes first, tells them to stop and keeps joining
/// (each then ends within about twice `--timeout`). Returns how they ended and whether the
/// deadline passed.
async fn join_workers(
    workers: &mut JoinSet<WorkerEnd>,
    stop: &watch::Sender<bool>,
    deadline: Instant,
) -> anyhow::Result<(Vec<WorkerEnd>, bool)> {
    let mut ends = Vec::new();
    let mut passed = false;
    loop {
        tokio::select! {
            joined = workers.join_next() => match joined {
                None => break,
                Some(joined) => ends.push(joined.context("a worker failed")?),
            },
            () = tokio::time::sleep_until(deadline), if !passed => {
                passed = true;
                stop.send_replace(true);
            }
        }
    }
    Ok((ends, passed))
}

/// `lease-drain`: see the module's documentation.
pub async fn lease_drain(
    run: &StreamArgs,
    queue: &QueueArgs,
    args: &LeaseDrainArgs,
) -> anyhow::Result<Report> {
    check(run)?;
    anyhow::ensure!(!args.idle.is_zero(), "--idle must be greater than 0");
    let probe = queue.probe().await?;
    let streams = open_streams(run, queue, args.workers, "drain").await?;
    // Taken with every worker subscribed, before the first credit.
    let before = match &probe {
        Some(probe) => Some(sample(probe, "at the start").await),
        None => None,
    };
    let tally = Arc::new(Tally::new()?);
    let plan = Plan {
        credits: args.credits,
        clock: Clock::LeaseToAck,
        idle: Some(args.idle),
        timeout: run.timeout,
    };
    let (stop, stop_rx) = watch::channel(false);
    let start = Instant::now();
    let ticker = tokio::spawn(print_progress(Arc::clone(&tally), start, false));
    let mut workers = JoinSet::new();
    for stream in streams {
        workers.spawn(work(stream, plan, Arc::clone(&tally), stop_rx.clone()));
    }
    let joined = join_workers(&mut workers, &stop, start + run.duration).await;
    let finished = Instant::now();
    ticker.abort();
    // The ticker never returns on its own; its JoinError says it was cancelled as asked.
    let _cancelled = ticker.await;
    let (ends, deadline_passed) = joined?;
    // The after-sample includes each worker's final --idle wait (the idle streams' cost).
    let redis = match (&probe, before) {
        (Some(probe), Some(Ok(before))) => Some(
            sample(probe, "at the end")
                .await
                .map(|after| after.since(&before)),
        ),
        (_, Some(Err(error))) => Some(Err(error)),
        _ => None,
    };
    // Drained before --duration: the measured period ends with the last Ack, not with the
    // --idle wait that showed the queue empty.
    let all_idle = ends.iter().all(|end| end.idle);
    let ended_early = (!deadline_passed).then(|| {
        ends.iter()
            .filter_map(|end| end.last_ack)
            .max()
            .unwrap_or(finished)
    });
    if !deadline_passed && !all_idle {
        eprintln!("sluice-bench: a worker stopped before the queue was drained (see errors)");
    }
    let recorder = tally.recorder().clone();
    Ok(Report {
        workload: "lease-drain",
        target: run.target.clone(),
        connections: args.workers,
        mode: Mode::Stream {
            workers: args.workers,
            credits: args.credits,
            rate: None,
        },
        warmup: Duration::ZERO,
        duration: run.duration,
        measure_start: start,
        dropped: 0,
        recorder,
        tasks: Some(TaskCounting {
            verb: "completed",
            timed: "tasks, from receiving the lease to its Ack",
            denied: None,
        }),
        ended_early,
        redis,
        idle_redis: None,
    })
}

/// Redis over `length` with nothing happening but the subscribed, idle workers.
async fn idle_redis(
    probe: &redis_info::Probe,
    length: Duration,
    tally: &Tally,
) -> Result<IdleRedis, String> {
    let leased = tally.received.load(Ordering::Relaxed);
    let before = sample(probe, "before the idle sample").await?;
    let from = Instant::now();
    tokio::time::sleep(length).await;
    let after = sample(probe, "after the idle sample").await?;
    let seconds = from.elapsed().as_secs_f64();
    let during = tally.received.load(Ordering::Relaxed) - leased;
    if during > 0 {
        return Err(format!(
            "{during} tasks were leased during the idle sample (left in --queue by an earlier run?); use an empty queue"
        ));
    }
    Ok(IdleRedis {
        seconds,
        usage: after.since(&before),
    })
}

/// push-latency's producer (blocking thread): task `seq` is due at `start + seq / rate`,
/// none from `end` on. Returns the Enqueue calls still in flight, how many tasks were
/// dropped (`MAX_ENQUEUES_IN_FLIGHT` outstanding), and whether all `tasks` were due before
/// `end`.
fn produce(
    handle: &tokio::runtime::Handle,
    client: &QueueClient<Channel>,
    queue: &QueueArgs,
    tally: &Arc<Tally>,
    (tasks, rate): (u64, f64),
    (start, end): (Instant, Instant),
) -> anyhow::Result<(JoinSet<()>, u64, bool)> {
    crate::driver::precise_sleeps();
    let mut in_flight = JoinSet::new();
    let mut dropped = 0;
    for seq in 0..tasks {
        // Computed from `seq`, not by adding an interval each time, so rounding never drifts.
        let Ok(offset) = Duration::try_from_secs_f64(seq as f64 / rate) else {
            return Ok((in_flight, dropped, false));
        };
        let scheduled = start + offset;
        if scheduled >= end {
            return Ok((in_flight, dropped, false));
        }
        let now = Instant::now();
        if scheduled > now {
            // A thread sleep: tokio's timer ticks in whole milliseconds.
            std::thread::sleep(scheduled - now);
        }
        while let Some(joined) = in_flight.try_join_next() {
            joined.context("an Enqueue task failed")?;
        }
        if in_flight.len() >= MAX_ENQUEUES_IN_FLIGHT {
            dropped += 1;
            continue;
        }
        let mut client = client.clone();
        let tally = Arc::clone(tally);
        let (project, queue) = (queue.project.clone(), queue.queue.clone());
        in_flight.spawn_on(
            async move {
                let request = pb::EnqueueRequest {
                    task: Some(pb::TaskSpec {
                        project,
                        queue,
                        // The send time, taken as late as possible.
                        payload: unix_micros().to_string().into_bytes(),
                        priority: pb::Priority::Normal as i32,
                        ..Default::default()
                    }),
                };
                match client.enqueue(request).await {
                    Ok(_) => {
                        tally.enqueued.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) => tally.error(status),
                }
            },
            handle,
        );
    }
    Ok((in_flight, dropped, true))
}

/// `push-latency`: see the module's documentation.
pub async fn push_latency(
    run: &StreamArgs,
    queue: &QueueArgs,
    args: &PushLatencyArgs,
) -> anyhow::Result<Report> {
    check(run)?;
    let probe = queue.probe().await?;
    // Tasks sent before this are not this run's.
    let since = unix_micros();
    let producer = endpoint(run, true)?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", run.target))?;
    let streams = open_streams(run, queue, args.workers, "push").await?;
    let tally = Arc::new(Tally::new()?);
    let plan = Plan {
        credits: 1,
        clock: Clock::PayloadToLease { since },
        idle: None,
        timeout: run.timeout,
    };
    let (stop, stop_rx) = watch::channel(false);
    let mut workers = JoinSet::new();
    for stream in streams {
        workers.spawn(work(stream, plan, Arc::clone(&tally), stop_rx.clone()));
    }

    let idle = match &probe {
        Some(probe) if !args.idle_sample.is_zero() => {
            eprintln!(
                "sluice-bench: {} workers subscribed; reading Redis for {:?} with no task sent",
                args.workers, args.idle_sample
            );
            Some(idle_redis(probe, args.idle_sample, &tally).await)
        }
        _ => None,
    };
    let before = match &probe {
        Some(probe) => Some(sample(probe, "at the start").await),
        None => None,
    };

    let start = Instant::now();
    let end = start + run.duration;
    let ticker = tokio::spawn(print_progress(Arc::clone(&tally), start, true));
    let handle = tokio::runtime::Handle::current();
    let client = QueueClient::new(producer);
    let producer_tally = Arc::clone(&tally);
    let producer_queue = queue.clone();
    let schedule = (args.tasks, args.rate);
    let produced = tokio::task::spawn_blocking(move || {
        produce(
            &handle,
            &client,
            &producer_queue,
            &producer_tally,
            schedule,
            (start, end),
        )
    })
    .await
    .context("the producer failed");
    // Wait for every Enqueue still in flight (each bounded by --timeout), then for every
    // task enqueued to be handled, at most --timeout past --duration.
    let outcome = match produced {
        Ok(Ok((mut in_flight, dropped, all_due))) => {
            let mut failed = None;
            while let Some(joined) = in_flight.join_next().await {
                if let Err(e) = joined {
                    failed.get_or_insert(e);
                }
            }
            match failed {
                Some(e) => Err(anyhow::Error::new(e).context("an Enqueue task failed")),
                None => Ok((dropped, all_due)),
            }
        }
        Ok(Err(e)) | Err(e) => Err(e),
    };
    let settle_by = end + run.timeout;
    let enqueued = tally.enqueued.load(Ordering::Relaxed);
    while outcome.is_ok()
        && tally.settled.load(Ordering::Relaxed) < enqueued
        && Instant::now() < settle_by
    {
        tokio::time::sleep(SETTLE_POLL).await;
    }
    let settled_at = Instant::now();
    let redis = match (&probe, before) {
        (Some(probe), Some(Ok(before))) => Some(
            sample(probe, "at the end")
                .await
                .map(|after| after.since(&before)),
        ),
        (_, Some(Err(error))) => Some(Err(error)),
        _ => None,
    };
    ticker.abort();
    let _cancelled = ticker.await;
    stop.send_replace(true);
    // Told to stop, each worker ends within about twice --timeout.
    let (ends, _) = join_workers(&mut workers, &stop, Instant::now()).await?;
    let (dropped, all_due) = outcome?;

    let settled = tally.settled.load(Ordering::Relaxed);
    for _ in settled..enqueued {
        tally.error(tonic::Status::deadline_exceeded(
            "a task enqueued was not handled by --duration + --timeout",
        ));
    }
    let foreign = tally.foreign.load(Ordering::Relaxed);
    if foreign > 0 {
        eprintln!(
            "sluice-bench: {foreign} leased tasks were not sent by this run (counted as errors); use an empty --queue"
        );
    }
    let last_ack = ends.iter().filter_map(|end| end.last_ack).max();
    // Every task was due before --duration: the measured period ends with the last Ack.
    let ended_early = all_due.then(|| last_ack.unwrap_or(settled_at).max(start));
    let recorder = tally.recorder().clone();
    Ok(Report {
        workload: "push-latency",
        target: run.target.clone(),
        connections: args.workers + 1,
        mode: Mode::Stream {
            workers: args.workers,
            credits: 1,
            rate: Some(args.rate),
        },
        warmup: Duration::ZERO,
        duration: run.duration,
        measure_start: start,
        dropped,
        recorder,
        tasks: Some(TaskCounting {
            verb: "completed",
            timed: "tasks, from the Enqueue send to the lease reaching a worker",
            denied: None,
        }),
        ended_early,
        redis,
        idle_redis: idle,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_carry_decimal_microseconds() {
        assert_eq!(
            payload_micros(b"1732560000123456"),
            Some(1_732_560_000_123_456)
        );
        assert_eq!(payload_micros(b"xxxx"), None);
        assert_eq!(payload_micros(&[0xff, 0xfe]), None);
        assert!(unix_micros() > 1_600_000_000_000_000);
    }

    #[test]
    fn rates_must_be_positive_and_finite() {
        assert_eq!(parse_rate("1000"), Ok(1000.0));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("inf").is_err());
        assert!(parse_rate("fast").is_err());
    }
}
