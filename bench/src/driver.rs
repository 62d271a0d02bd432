//! The load driver shared by every workload: connections, closed and open loop, warm-up, progress.
//!
//! Timeline of a run: connect every channel, then `start`; requests sent before
//! `start + warmup` are made but not recorded; nothing new is sent from
//! `start + warmup + duration` on, and the calls still in flight then are awaited (each is
//! bounded by `--timeout`) and recorded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use sluice::config::parse_duration;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tonic::transport::{Channel, Endpoint};

use crate::report::{Mode, Recorder, Report};

/// Options every subcommand shares.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// gRPC endpoint of the service under test.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:50051")]
    pub target: String,

    /// Separate HTTP/2 connections (tonic channels); requests take them in turn.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub connections: u32,

    /// How long to measure, after the warm-up (e.g. 500ms, 10s, 1m).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// How long to send load before measuring: caches, connections and the store warm up.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Deadline of one call; a call that takes longer counts as an error (DEADLINE_EXCEEDED).
    /// Also bounds connecting and how long the end of a run waits for calls in flight.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,

    #[command(flatten)]
    pub mode: ModeArgs,

    /// Open loop only: calls allowed in flight at once. A request scheduled while this many
    /// are outstanding is not sent and is reported as dropped.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,

    /// Also print the report as one JSON line on stdout (the text block then goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// How load is generated: exactly one of the two.
#[derive(Debug, Clone, clap::Args)]
#[group(required = true, multiple = false)]
pub struct ModeArgs {
    /// Closed loop: N tasks, each sending its next request as soon as the previous one is
    /// answered. Measures capacity; latency hides queueing (coordinated omission).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: Option<u32>,

    /// Open loop: R requests per second on a fixed schedule, whatever the answers. Latency is
    /// measured from each request's scheduled time, so queueing delay counts.
    #[arg(long, value_name = "R", value_parser = parse_rate)]
    pub rate: Option<f64>,
}

/// What a call decided, when it succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied,
    /// The answer carried no verdict (e.g. Envoy's `overall_code = UNKNOWN`).
    Unknown,
}

/// One kind of request the driver can send.
pub trait Workload: Send + Sync + 'static {
    /// Subcommand name, shown in the report.
    const NAME: &'static str;

    /// Makes request number `seq` (0, 1, 2, … over the whole run, warm-up included) on
    /// `channel`. A failed call is an `Err`, never a panic.
    fn call(
        &self,
        channel: Channel,
        seq: u64,
    ) -> impl Future<Output = Result<Verdict, tonic::Status>> + Send;
}

/// Connects, runs the load described by `args` and returns what was measured.
pub async fn run<W: Workload>(args: &RunArgs, workload: W) -> anyhow::Result<Report> {
    anyhow::ensure!(
        !args.duration.is_zero(),
        "--duration must be greater than 0"
    );
    anyhow::ensure!(!args.timeout.is_zero(), "--timeout must be greater than 0");
    let mode = match (args.mode.concurrency, args.mode.rate) {
        (Some(concurrency), _) => Mode::Closed { concurrency },
        (None, Some(rate)) => Mode::Open {
            rate,
            max_in_flight: args.max_in_flight,
        },
        // clap's group makes one of them required; kept as an error, not a panic.
        (None, None) => anyhow::bail!("give --concurrency or --rate"),
    };

    let channels = connect(args).await?;
    let start = Instant::now();
    let measure_start = start + args.warmup;
    let shared = Arc::new(Shared {
        workload,
        channels,
        recorder: Mutex::new(Recorder::new()?),
        progress: Progress::default(),
        start,
        measure_start,
        end: measure_start + args.duration,
    });

    let ticker = tokio::spawn(print_progress(Arc::clone(&shared)));
    let outcome = match mode {
        Mode::Closed { concurrency } => closed_loop(&shared, concurrency).await.map(|()| 0),
        Mode::Open {
            rate,
            max_in_flight,
        } => open_loop(&shared, rate, max_in_flight).await,
    };
    ticker.abort();
    // The ticker never returns on its own; its JoinError says it was cancelled as asked.
    let _cancelled = ticker.await;
    let dropped = outcome?;

    let recorder = shared.recorder().clone();
    Ok(Report {
        workload: W::NAME,
        target: args.target.clone(),
        connections: args.connections,
        mode,
        warmup: args.warmup,
        duration: args.duration,
        measure_start,
        dropped,
        recorder,
    })
}

/// Dials every connection up front, so a wrong `--target` fails before any load is sent.
async fn connect(args: &RunArgs) -> anyhow::Result<Vec<Channel>> {
    let endpoint = Endpoint::from_shared(args.target.clone())
        .with_context(|| format!("--target `{}` is not a valid URL", args.target))?
        .connect_timeout(args.timeout)
        .timeout(args.timeout)
        .tcp_nodelay(true);
    let mut channels = Vec::new();
    for _ in 0..args.connections {
        // One `connect` per channel: each is its own HTTP/2 connection, not a clone of one.
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to {}", args.target))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// State every request task reads.
struct Shared<W> {
    workload: W,
    channels: Vec<Channel>,
    /// Measured calls only. A mutex, not per-task histograms: a lock held for one
    /// `record` costs far less than the call it follows, and one histogram per task would
    /// cost ~100 KiB each at high concurrency.
    recorder: Mutex<Recorder>,
    progress: Progress,
    /// Connections are up; the warm-up begins.
    start: Instant,
    /// The warm-up is over: calls sent (or scheduled) from here on are recorded.
    measure_start: Instant,
    /// No call is sent (or scheduled) from here on.
    end: Instant,
}

impl<W: Workload> Shared<W> {
    /// Sends request `seq`, whose latency counts from `started` (its send time in the closed
    /// loop, its scheduled time in the open loop), and records the outcome.
    async fn request(&self, seq: u64, started: Instant) {
        // Round robin over the connections.
        let channel = self.channels[(seq % self.channels.len() as u64) as usize].clone();
        let result = self.workload.call(channel, seq).await;
        let finished = Instant::now();
        self.progress.done.fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            self.progress.errors.fetch_add(1, Ordering::Relaxed);
        }
        if started >= self.measure_start {
            self.recorder().record(started, finished, &result);
        }
    }

    fn recorder(&self) -> MutexGuard<'_, Recorder> {
        // A poisoned lock only means a task panicked mid-`record`; the counts are still usable.
        self.recorder.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `concurrency` tasks, each sending back to back until the end of the run.
async fn closed_loop<W: Workload>(shared: &Arc<Shared<W>>, concurrency: u32) -> anyhow::Result<()> {
    let next_seq = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let shared = Arc::clone(shared);
        let next_seq = Arc::clone(&next_seq);
        workers.spawn(async move {
            loop {
                let started = Instant::now();
                if started >= shared.end {
                    break;
                }
                let seq = next_seq.fetch_add(1, Ordering::Relaxed);
                shared.request(seq, started).await;
            }
        });
    }
    while let Some(joined) = workers.join_next().await {
        joined.context("a closed-loop worker failed")?;
    }
    Ok(())
}

/// Requests on a fixed schedule, each on its own task. Returns how many measured requests
/// were dropped because `max_in_flight` calls were outstanding.
async fn open_loop<W: Workload>(
    shared: &Arc<Shared<W>>,
    rate: f64,
    max_in_flight: u32,
) -> anyhow::Result<u64> {
    let handle = tokio::runtime::Handle::current();
    let scheduler_shared = Arc::clone(shared);
    // The schedule runs on a blocking-pool thread with `std::thread::sleep`: tokio's timer
    // ticks in whole milliseconds, which would send each request up to 1 ms late and, since
    // latency counts from the scheduled time, add that to every figure. A thread sleep
    // overshoots by tens of microseconds.
    let (mut in_flight, dropped) = tokio::task::spawn_blocking(move || {
        schedule(&scheduler_shared, &handle, rate, max_in_flight as usize)
    })
    .await
    .context("the open-loop scheduler failed")??;
    while let Some(joined) = in_flight.join_next().await {
        joined.context("a request task failed")?;
    }
    Ok(dropped)
}

/// The open loop's scheduler (blocking thread). Request `seq` is due at `start + seq / rate`;
/// when the thread falls behind, late requests go out at once and their lateness counts as
/// latency. Returns the calls still in flight and the measured drops.
fn schedule<W: Workload>(
    shared: &Arc<Shared<W>>,
    handle: &tokio::runtime::Handle,
    rate: f64,
    max_in_flight: usize,
) -> anyhow::Result<(JoinSet<()>, u64)> {
    let mut in_flight = JoinSet::new();
    let mut dropped = 0;
    for seq in 0_u64.. {
        // Computed from `seq`, not by adding an interval each time, so rounding never drifts.
        let Ok(offset) = Duration::try_from_secs_f64(seq as f64 / rate) else {
            break;
        };
        let scheduled = shared.start + offset;
        if scheduled >= shared.end {
            break;
        }
        let now = Instant::now();
        if scheduled > now {
            std::thread::sleep(scheduled - now);
        }
        // Reap finished tasks so that `len` counts only the calls still outstanding.
        while let Some(joined) = in_flight.try_join_next() {
            joined.context("a request task failed")?;
        }
        if in_flight.len() >= max_in_flight {
            shared.progress.dropped.fetch_add(1, Ordering::Relaxed);
            if scheduled >= shared.measure_start {
                dropped += 1;
            }
            continue;
        }
        let task_shared = Arc::clone(shared);
        in_flight.spawn_on(
            async move { task_shared.request(seq, scheduled).await },
            handle,
        );
    }
    Ok((in_flight, dropped))
}

/// Counts over the whole run, warm-up included, for the progress line.
#[derive(Debug, Default)]
struct Progress {
    done: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
}

/// Prints, every second, what completed during that second. Runs until aborted.
async fn print_progress<W: Workload>(shared: Arc<Shared<W>>) {
    let start = shared.start;
    let second = Duration::from_secs(1);
    let mut ticker = tokio::time::interval_at(start + second, second);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut before = (0, 0, 0);
    loop {
        let now = ticker.tick().await;
        let progress = &shared.progress;
        let totals = (
            progress.done.load(Ordering::Relaxed),
            progress.errors.load(Ordering::Relaxed),
            progress.dropped.load(Ordering::Relaxed),
        );
        let phase = if now <= shared.measure_start {
            " (warm-up)"
        } else {
            ""
        };
        eprintln!(
            "[{:>6.1}s] {:>8} req/s  {} errors  {} dropped{phase}",
            now.saturating_duration_since(start).as_secs_f64(),
            totals.0 - before.0,
            totals.1 - before.1,
            totals.2 - before.2,
        );
        before = totals;
    }
}

/// `--rate`: a positive, finite number of requests per second.
fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of requests per second"))?;
    if rate.is_finite() && rate > 0.0 {
        Ok(rate)
    } else {
        Err(format!("`{text}`: the rate must be greater than 0"))
    }
}
