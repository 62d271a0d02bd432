//! The queue workloads, on `sluice.queue.v1.Queue`:
//!
//! - `enqueue`: one Enqueue per request;
//! - `enqueue-batch`: one EnqueueBatch of `--batch` tasks per request;
//! - `drain`: one Dequeue (no wait by default) then a Complete of every lease it returned,
//!   the completes in parallel; an empty Dequeue is "denied" and, with `--stop-when-empty`,
//!   stops the worker that got it;
//! - `cycle`: half the closed-loop workers enqueue, the other half drain.
//!
//! Priorities are spread over the five levels by task number, so every level's structures
//! are exercised.

use std::time::Duration;

use futures::future::Either;
use sluice::config::parse_duration;
use sluice::proto::sluice::queue::v1::queue_client::QueueClient;
use sluice::proto::sluice::queue::v1::{
    CompleteRequest, DequeueRequest, EnqueueBatchRequest, EnqueueRequest, Priority, TaskLease,
    TaskSpec,
};

use crate::conn::Conn;
use crate::driver::{Outcome, RunArgs, Verdict, Workload};
use crate::redis_info;
use crate::report::TaskCounting;

/// The five levels, most urgent first; task n gets `LEVELS[n % 5]`.
const LEVELS: [Priority; 5] = [
    Priority::Critical,
    Priority::High,
    Priority::Normal,
    Priority::Low,
    Priority::Background,
];

/// Largest payload the contract accepts.
const MAX_PAYLOAD: u64 = 1024 * 1024;
/// Largest sum of payloads in one EnqueueBatch.
const MAX_BATCH_PAYLOAD: u64 = 8 * 1024 * 1024;
/// Most tasks in one EnqueueBatch.
const MAX_BATCH: u32 = 1000;
/// Most tasks one Dequeue leases.
const MAX_DEQUEUE: u32 = 256;
/// Longest Dequeue long-poll.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// `worker_id` of the Dequeue calls.
const WORKER_ID: &str = "sluice-bench";

/// Options every queue workload shares.
#[derive(Debug, Clone, clap::Args)]
pub struct QueueArgs {
    /// Project of the tasks.
    #[arg(long, default_value = "bench")]
    pub project: String,

    /// Queue of the tasks. Use a fresh name per measurement when leftovers would count
    /// (e.g. `drain` after an earlier run).
    #[arg(long, default_value = "bench")]
    pub queue: String,

    /// Redis used by queue-svc (one node; redis:// or rediss://). When given, the report adds
    /// Redis CPU time and commands per task over the measured period (INFO cpu and
    /// INFO commandstats, read when the warm-up ends and when the run ends).
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
}

impl QueueArgs {
    /// Connects the Redis probe, if `--redis-url` was given.
    pub async fn probe(&self) -> anyhow::Result<Option<redis_info::Probe>> {
        match &self.redis_url {
            Some(url) => Ok(Some(redis_info::Probe::connect(url).await?)),
            None => Ok(None),
        }
    }
}

/// Options of `enqueue`.
#[derive(Debug, Clone, clap::Args)]
pub struct EnqueueArgs {
    /// Bytes of payload per task (at most 1 MiB).
    #[arg(long, value_name = "BYTES", default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=MAX_PAYLOAD))]
    pub payload_bytes: u64,
}

/// Options of `enqueue-batch`.
#[derive(Debug, Clone, clap::Args)]
pub struct EnqueueBatchArgs {
    /// Tasks per EnqueueBatch call (1 to 1000).
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_BATCH)))]
    pub batch: u32,

    /// Bytes of payload per task; a batch carries at most 8 MiB of payloads.
    #[arg(long, value_name = "BYTES", default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=MAX_PAYLOAD))]
    pub payload_bytes: u64,
}

/// Options of `drain`.
#[derive(Debug, Clone, clap::Args)]
pub struct DrainArgs {
    /// Most tasks leased by one Dequeue (its max_tasks, 1 to 256).
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_DEQUEUE)))]
    pub batch: u32,

    /// Dequeue's long-poll wait (0 to 30s, shorter than --timeout). 0: answer at once.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub wait: Duration,

    /// A worker whose Dequeue comes back empty stops; the run ends when every worker has
    /// stopped (or --duration ran out). Measures how long draining a pre-filled queue takes.
    #[arg(long)]
    pub stop_when_empty: bool,
}

/// Options of `cycle`.
#[derive(Debug, Clone, clap::Args)]
pub struct CycleArgs {
    /// Bytes of payload per enqueued task (at most 1 MiB).
    #[arg(long, value_name = "BYTES", default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=MAX_PAYLOAD))]
    pub payload_bytes: u64,

    /// Most tasks leased by one consumer's Dequeue (1 to 256).
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_DEQUEUE)))]
    pub batch: u32,

    /// Consumers' Dequeue long-poll wait (0 to 30s, shorter than --timeout). 0: answer at
    /// once (an idle consumer then polls back to back).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub wait: Duration,
}

/// The priority of task number `n`.
fn priority(n: u64) -> i32 {
    LEVELS[(n % LEVELS.len() as u64) as usize] as i32
}

/// A payload of `bytes` bytes.
fn payload(bytes: u64) -> anyhow::Result<Vec<u8>> {
    let bytes = usize::try_from(bytes).map_err(|_| anyhow::anyhow!("--payload-bytes too large"))?;
    Ok(vec![b'x'; bytes])
}

/// A Dequeue long-poll `wait`, checked against the contract and the call's `--timeout`.
fn dequeue_wait(wait: Duration, run: &RunArgs) -> anyhow::Result<Option<prost_types::Duration>> {
    anyhow::ensure!(wait <= MAX_WAIT, "--wait must be at most 30s");
    anyhow::ensure!(
        wait.is_zero() || wait < run.timeout,
        "--wait ({wait:?}) must be shorter than --timeout ({:?})",
        run.timeout
    );
    if wait.is_zero() {
        return Ok(None);
    }
    prost_types::Duration::try_from(wait)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("--wait: {e}"))
}

/// The enqueue `Outcome`: timed, carrying `tasks` tasks.
fn enqueued(tasks: u64) -> Outcome {
    Outcome::tasks(Verdict::Allowed, tasks)
}

/// Sends one Enqueue per request.
#[derive(Debug)]
pub struct Enqueue {
    project: String,
    queue: String,
    payload: Vec<u8>,
}

impl Enqueue {
    pub fn new(queue: &QueueArgs, args: &EnqueueArgs) -> anyhow::Result<Self> {
        Ok(Self {
            project: queue.project.clone(),
            queue: queue.queue.clone(),
            payload: payload(args.payload_bytes)?,
        })
    }

    fn request(&self, seq: u64) -> EnqueueRequest {
        EnqueueRequest {
            task: Some(TaskSpec {
                project: self.project.clone(),
                queue: self.queue.clone(),
                payload: self.payload.clone(),
                priority: priority(seq),
                ..Default::default()
            }),
        }
    }
}

impl Workload for Enqueue {
    const NAME: &'static str = "enqueue";
    const TASKS: Option<TaskCounting> = Some(TaskCounting {
        verb: "enqueued",
        timed: "Enqueue calls",
        denied: None,
    });

    fn call(
        &self,
        conn: Conn,
        seq: u64,
    ) -> impl Future<Output = Result<Outcome, tonic::Status>> + Send {
        // Built before the future so that it borrows nothing from `self`.
        let request = self.request(seq);
        async move {
            QueueClient::new(conn).enqueue(request).await?;
            Ok(enqueued(1))
        }
    }
}

/// Sends one EnqueueBatch of `batch` tasks per request.
#[derive(Debug)]
pub struct EnqueueBatch {
    project: String,
    queue: String,
    payload: Vec<u8>,
    batch: u32,
}

impl EnqueueBatch {
    pub fn new(queue: &QueueArgs, args: &EnqueueBatchArgs) -> anyhow::Result<Self> {
        let total = args.payload_bytes.saturating_mul(u64::from(args.batch));
        anyhow::ensure!(
            total <= MAX_BATCH_PAYLOAD,
            "--batch {} × --payload-bytes {} is {total} bytes; a batch carries at most 8 MiB",
            args.batch,
            args.payload_bytes
        );
        Ok(Self {
            project: queue.project.clone(),
            queue: queue.queue.clone(),
            payload: payload(args.payload_bytes)?,
            batch: args.batch,
        })
    }

    fn request(&self, seq: u64) -> EnqueueBatchRequest {
        let first = seq.wrapping_mul(u64::from(self.batch));
        EnqueueBatchRequest {
            project: self.project.clone(),
            queue: self.queue.clone(),
            // Entries leave project and queue empty: the batch's apply.
            tasks: (0..u64::from(self.batch))
                .map(|i| TaskSpec {
                    payload: self.payload.clone(),
                    priority: priority(first.wrapping_add(i)),
                    ..Default::default()
                })
                .collect(),
        }
    }
}

impl Workload for EnqueueBatch {
    const NAME: &'static str = "enqueue-batch";
    const TASKS: Option<TaskCounting> = Some(TaskCounting {
        verb: "enqueued",
        timed: "EnqueueBatch calls",
        denied: None,
    });

    fn call(
        &self,
        conn: Conn,
        seq: u64,
    ) -> impl Future<Output = Result<Outcome, tonic::Status>> + Send {
        let request = self.request(seq);
        async move {
            let response = QueueClient::new(conn).enqueue_batch(request).await?;
            Ok(enqueued(response.get_ref().results.len() as u64))
        }
    }
}

/// One Dequeue then a Complete of every lease it returned, per request.
#[derive(Debug)]
pub struct Drain {
    project: String,
    queue: String,
    max_tasks: u32,
    wait: Option<prost_types::Duration>,
    stop_when_empty: bool,
}

impl Drain {
    pub fn new(queue: &QueueArgs, args: &DrainArgs, run: &RunArgs) -> anyhow::Result<Self> {
        Ok(Self {
            project: queue.project.clone(),
            queue: queue.queue.clone(),
            max_tasks: args.batch,
            wait: dequeue_wait(args.wait, run)?,
            stop_when_empty: args.stop_when_empty,
        })
    }

    /// One Dequeue + Complete round; answers how many tasks it completed.
    fn round(&self, conn: Conn) -> impl Future<Output = Result<u64, tonic::Status>> + Send {
        let request = DequeueRequest {
            project: self.project.clone(),
            queues: vec![self.queue.clone()],
            max_tasks: self.max_tasks,
            wait: self.wait,
            worker_id: WORKER_ID.to_owned(),
            ..Default::default()
        };
        drain_round(conn, request, self.project.clone(), self.queue.clone())
    }
}

/// Dequeues with `request`, then completes every lease at once. A failed Complete fails the
/// round (its first error is returned; the other completes still ran).
async fn drain_round(
    conn: Conn,
    request: DequeueRequest,
    project: String,
    queue: String,
) -> Result<u64, tonic::Status> {
    let client = QueueClient::new(conn);
    let leases = client.clone().dequeue(request).await?.into_inner().leases;
    let completes = leases.into_iter().map(|lease| {
        let TaskLease {
            task, lease_token, ..
        } = lease;
        let mut client = client.clone();
        let request = task.map(|task| CompleteRequest {
            project: project.clone(),
            queue: queue.clone(),
            task_id: task.id,
            lease_token,
            result: Vec::new(),
        });
        async move {
            let request = request.ok_or_else(|| {
                tonic::Status::internal("Dequeue answered a lease without its task")
            })?;
            client.complete(request).await.map(|_| ())
        }
    });
    let mut completed = 0;
    let mut first_error = None;
    for result in futures::future::join_all(completes).await {
        match result {
            Ok(()) => completed += 1,
            Err(status) => {
                if first_error.is_none() {
                    first_error = Some(status);
                }
            }
        }
    }
    match first_error {
        Some(status) => Err(status),
        None => Ok(completed),
    }
}

/// The drain `Outcome` of a round that completed `completed` tasks. An empty round is
/// "denied" (nothing to do) and not timed; it stops its worker when `stop_when_empty`.
fn drained(completed: u64, timed: bool, stop_when_empty: bool) -> Outcome {
    if completed == 0 {
        Outcome {
            verdict: Verdict::Denied,
            tasks: 0,
            timed: false,
            stop: stop_when_empty,
        }
    } else {
        Outcome {
            timed,
            ..Outcome::tasks(Verdict::Allowed, completed)
        }
    }
}

impl Workload for Drain {
    const NAME: &'static str = "drain";
    const TASKS: Option<TaskCounting> = Some(TaskCounting {
        verb: "completed",
        timed: "Dequeue + Complete rounds that leased tasks",
        denied: Some("empty Dequeue"),
    });

    fn call(
        &self,
        conn: Conn,
        _seq: u64,
    ) -> impl Future<Output = Result<Outcome, tonic::Status>> + Send {
        let round = self.round(conn);
        let stop_when_empty = self.stop_when_empty;
        async move { Ok(drained(round.await?, true, stop_when_empty)) }
    }
}

/// Producers and consumers at once: in the closed loop, the first half of the workers
/// (rounded up) enqueue one task per request and the others drain; in the open loop, even
/// requests enqueue and odd ones drain. Only enqueues are timed; the tasks counted are the
/// completed ones.
#[derive(Debug)]
pub struct Cycle {
    enqueue: Enqueue,
    drain: Drain,
}

impl Cycle {
    pub fn new(queue: &QueueArgs, args: &CycleArgs, run: &RunArgs) -> anyhow::Result<Self> {
        if let Some(concurrency) = run.mode.concurrency {
            anyhow::ensure!(
                concurrency >= 2,
                "cycle needs --concurrency 2 or more: half enqueue, half drain"
            );
        }
        Ok(Self {
            enqueue: Enqueue::new(
                queue,
                &EnqueueArgs {
                    payload_bytes: args.payload_bytes,
                },
            )?,
            drain: Drain::new(
                queue,
                &DrainArgs {
                    batch: args.batch,
                    wait: args.wait,
                    stop_when_empty: false,
                },
                run,
            )?,
        })
    }

    fn produce(
        &self,
        conn: Conn,
        seq: u64,
    ) -> impl Future<Output = Result<Outcome, tonic::Status>> + Send {
        let request = self.enqueue.request(seq);
        async move {
            QueueClient::new(conn).enqueue(request).await?;
            // Timed, but its task is counted when it is completed.
            Ok(enqueued(0))
        }
    }

    fn consume(&self, conn: Conn) -> impl Future<Output = Result<Outcome, tonic::Status>> + Send {
        let round = self.drain.round(conn);
        async move { Ok(drained(round.await?, false, false)) }
    }
}

impl Workload for Cycle {
    const NAME: &'static str = "cycle";
    const TASKS: Option<TaskCounting> = Some(TaskCounting {
        verb: "completed",
        timed: "Enqueue calls (drain rounds are not timed)",
        denied: Some("empty Dequeue"),
    });

    fn call(
        &self,
        conn: Conn,
        seq: u64,
    ) -> impl Future<Output = Result<Outcome, tonic::Status>> + Send {
        if seq.is_multiple_of(2) {
            Either::Left(self.produce(conn, seq))
        } else {
            Either::Right(self.consume(conn))
        }
    }

    fn call_as(
        &self,
        conn: Conn,
        seq: u64,
        worker: u32,
        workers: u32,
    ) -> impl Future<Output = Result<Outcome, tonic::Status>> + Send {
        let consumers = workers / 2;
        if worker < workers - consumers {
            Either::Left(self.produce(conn, seq))
        } else {
            Either::Right(self.consume(conn))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue_args() -> QueueArgs {
        QueueArgs {
            project: "p".to_owned(),
            queue: "q".to_owned(),
            redis_url: None,
        }
    }

    #[test]
    fn enqueues_spread_priorities_over_the_five_levels() -> anyhow::Result<()> {
        let workload = Enqueue::new(&queue_args(), &EnqueueArgs { payload_bytes: 7 })?;
        let priorities: Vec<i32> = (0..6)
            .filter_map(|seq| workload.request(seq).task.map(|t| t.priority))
            .collect();
        assert_eq!(priorities, [1, 2, 3, 4, 5, 1]);
        let task = workload
            .request(0)
            .task
            .ok_or_else(|| anyhow::anyhow!("no task"))?;
        assert_eq!((task.project.as_str(), task.queue.as_str()), ("p", "q"));
        assert_eq!(task.payload.len(), 7);
        Ok(())
    }

    #[test]
    fn batches_carry_batch_tasks_numbered_on_from_the_previous_batch() -> anyhow::Result<()> {
        let args = EnqueueBatchArgs {
            batch: 3,
            payload_bytes: 10,
        };
        let request = EnqueueBatch::new(&queue_args(), &args)?.request(1);
        assert_eq!(
            (request.project.as_str(), request.queue.as_str()),
            ("p", "q")
        );
        let priorities: Vec<i32> = request.tasks.iter().map(|t| t.priority).collect();
        // Tasks 3, 4, 5 of the run.
        assert_eq!(priorities, [4, 5, 1]);
        assert!(
            request
                .tasks
                .iter()
                .all(|t| t.project.is_empty() && t.payload.len() == 10)
        );
        Ok(())
    }

    #[test]
    fn a_batch_over_8_mib_of_payload_is_refused() {
        let args = EnqueueBatchArgs {
            batch: 1000,
            payload_bytes: 10_000,
        };
        assert!(EnqueueBatch::new(&queue_args(), &args).is_err());
    }

    #[test]
    fn an_empty_round_is_denied_untimed_and_stops_only_when_asked() {
        assert_eq!(drained(0, true, true).verdict, Verdict::Denied);
        assert!(drained(0, true, true).stop);
        assert!(!drained(0, true, true).timed);
        assert!(!drained(0, true, false).stop);
        let full = drained(16, true, true);
        assert_eq!(
            (full.verdict, full.tasks, full.timed, full.stop),
            (Verdict::Allowed, 16, true, false)
        );
        assert!(!drained(16, false, false).timed);
    }
}
