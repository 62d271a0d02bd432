//! The load driver shared by every workload: connections, closed and open loop, warm-up, progress.
//!
//! Timeline of a run: connect every connection, then `start`; requests sent before
//! `start + warmup` are made but not recorded; those sent from `start + warmup + duration` on,
//! in the `--cooldown`, are made but not recorded either; nothing new is sent after the
//! cool-down, and the calls still in flight then are awaited (each is bounded by
//! `--timeout`); those sent in the measured period are recorded.
//!
//! A run may end earlier: when `--requests` have all been sent and answered, or when every
//! closed-loop worker was told to stop by its workload ([`Outcome::stop`], e.g. `drain
//! --stop-when-empty`); in the open loop one such answer ends the schedule. The measured
//! period then ends when the last call is answered.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use sluice::config::parse_duration;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use crate::conn::Conn;
use crate::redis_info;
use crate::report::{Mode, Recorder, Report, TaskCounting};

/// Options every subcommand shares.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// gRPC endpoint of the service under test.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:50051")]
    pub target: String,

    /// Separate HTTP/2 connections; requests take them in turn.
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

    /// Keep sending load this long after the measured period, without recording it: to
    /// watch a system recover while the report covers only the period of interest (e.g.
    /// `bench/failover.sh`, whose report is the time Redis was away). Redis figures
    /// (`--redis-url`) then end with the measured period too.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub cooldown: Duration,

    #[command(flatten)]
    pub mode: ModeArgs,

    /// Open loop only: calls allowed in flight at once. A request scheduled while this many
    /// are outstanding is not sent and is reported as dropped.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,

    /// API key or JWT sent as `authorization: Bearer` on every call, for services with auth
    /// on (give it the roles and projects the workload touches).
    #[arg(
        long,
        env = "SLUICE_API_KEY",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub api_key: Option<sluice::auth::Token>,

    /// PEM CA that signs the service's certificate: reach an https:// --target over TLS
    /// (only this CA is trusted). The TLS options are flags only: the clients' SLUICE_TLS_*
    /// variables, meant for `sluice` and `sluice-worker`, do not apply here.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,

    /// PEM certificate presented to a service that requires client certificates (mutual TLS);
    /// with --tls-key and --tls-ca.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Also print the report as one JSON line on stdout (the text block then goes to stderr).
    #[arg(long)]
    pub json: bool,

    /// Send at most N requests in all, warm-up included; the run then ends as soon as they
    /// are answered, even before --duration (e.g. `enqueue-batch --batch 1000 --requests 100`
    /// enqueues exactly 100,000 tasks).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,
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

/// What a successful call reports to the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    /// Tasks the request carried (enqueued, or leased and completed); counted only by
    /// workloads with [`Workload::TASKS`].
    pub tasks: u64,
    /// Whether the call's latency goes into the histogram (an empty Dequeue, say, does not).
    pub timed: bool,
    /// The sender should stop: its closed-loop worker sends nothing more, and in the open
    /// loop the schedule ends.
    pub stop: bool,
}

impl Outcome {
    /// A timed call that carried `tasks` tasks.
    pub fn tasks(verdict: Verdict, tasks: u64) -> Self {
        Self {
            verdict,
            tasks,
            timed: true,
            stop: false,
        }
    }
}

/// A timed call that carried no task: what the limiter's workloads answer.
impl From<Verdict> for Outcome {
    fn from(verdict: Verdict) -> Self {
        Self::tasks(verdict, 0)
    }
}

/// One kind of request the driver can send.
pub trait Workload: Send + Sync + 'static {
    /// Subcommand name, shown in the report.
    const NAME: &'static str;

    /// Set by workloads that move tasks: the report then counts [`Outcome::tasks`] and shows
    /// tasks/s.
    const TASKS: Option<TaskCounting> = None;

    /// Makes request number `seq` (0, 1, 2, … over the whole run, warm-up included) on
    /// `conn`. A failed call is an `Err`, never a panic. The open loop calls this.
    fn call(
        &self,
        conn: Conn,
        seq: u64,
    ) -> impl Future<Output = Result<Outcome, tonic::Status>> + Send;

    /// The closed loop's form of [`Workload::call`]: request `seq` sent by worker `worker`
    /// (0-based) of `workers`. Workloads whose requests depend on who sends them (`cycle`:
    /// producers and consumers) override it; by default it is `call`.
    fn call_as(
        &self,
        conn: Conn,
        seq: u64,
        _worker: u32,
        _workers: u32,
    ) -> impl Future<Output = Result<Outcome, tonic::Status>> + Send {
        self.call(conn, seq)
    }
}

/// Connects, runs the load described by `args` and returns what was measured.
pub async fn run<W: Workload>(args: &RunArgs, workload: W) -> anyhow::Result<Report> {
    run_probed(args, workload, None).await
}

/// [`run`], also reading Redis's CPU time and command counts when the measured period starts
/// and when the run ends, if `redis` is given.
pub async fn run_probed<W: Workload>(
    args: &RunArgs,
    workload: W,
    redis: Option<redis_info::Probe>,
) -> anyhow::Result<Report> {
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

    let conns = connect(args).await?;
    let start = Instant::now();
    let measure_start = start + args.warmup;
    let measure_end = measure_start + args.duration;
    let shared = Arc::new(Shared {
        workload,
        conns,
        timeout: args.timeout,
        recorder: Mutex::new(Recorder::new()?),
        progress: Progress::default(),
        start,
        measure_start,
        measure_end,
        end: measure_end + args.cooldown,
        max_requests: args.requests,
        stopped: AtomicBool::new(false),
    });

    // The first Redis sample is taken when the warm-up ends, while the load runs; with a
    // cool-down, the second when the measured period ends, otherwise once the run is over.
    let redis_before = redis
        .clone()
        .map(|probe| redis_info::sample_at(probe, measure_start));
    let redis_after = redis
        .clone()
        .filter(|_| !args.cooldown.is_zero())
        .map(|probe| redis_info::sample_at(probe, measure_end));
    let ticker = tokio::spawn(print_progress(Arc::clone(&shared)));
    let outcome = match mode {
        Mode::Closed { concurrency } => closed_loop(&shared, concurrency)
            .await
            .map(|early| (0, early)),
        Mode::Open {
            rate,
            max_in_flight,
        } => open_loop(&shared, rate, max_in_flight).await,
        // Built above from --concurrency or --rate, never this: the Lease stream workloads
        // run their own loop (crate::lease).
        Mode::Stream { .. } => Err(anyhow::anyhow!("the driver does not run Lease streams")),
    };
    let finished = Instant::now();
    ticker.abort();
    // The ticker never returns on its own; its JoinError says it was cancelled as asked.
    let _cancelled = ticker.await;
    let (dropped, early) = outcome?;
    // Stopping in the cool-down leaves the measured period whole.
    let ended_early = (early && finished < measure_end).then_some(finished);
    // A run that ended before its measured period did reads Redis now instead.
    let redis_after = match redis_after {
        Some(after) if finished < measure_end => {
            after.abort();
            None
        }
        after => after,
    };
    let redis = match (redis, redis_before) {
        (Some(probe), Some(before)) => {
            Some(redis_usage(&probe, before, redis_after, finished >= measure_start).await)
        }
        _ => None,
    };

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
        tasks: W::TASKS,
        ended_early,
        redis,
        idle_redis: None,
    })
}

/// What Redis spent between the sample `before` (taken when the warm-up ended) and `after`
/// (taken when the measured period ended), or now when there is no `after`.
/// `reached_measure` is false when the run ended during the warm-up: nothing was measured.
async fn redis_usage(
    probe: &redis_info::Probe,
    before: tokio::task::JoinHandle<anyhow::Result<redis_info::Sample>>,
    after: Option<tokio::task::JoinHandle<anyhow::Result<redis_info::Sample>>>,
    reached_measure: bool,
) -> Result<redis_info::Usage, String> {
    if !reached_measure {
        before.abort();
        return Err("the run ended during the warm-up".to_owned());
    }
    let before = before
        .await
        .map_err(|e| format!("sampling Redis at the start: {e}"))?
        .map_err(|e| format!("sampling Redis at the start: {e:#}"))?;
    let after = match after {
        Some(after) => after
            .await
            .map_err(|e| format!("sampling Redis at the end: {e}"))?,
        None => probe.sample().await,
    }
    .map_err(|e| format!("sampling Redis at the end: {e:#}"))?;
    Ok(after.since(&before))
}

/// Dials every connection up front, so a wrong `--target` fails before any load is sent.
async fn connect(args: &RunArgs) -> anyhow::Result<Vec<Conn>> {
    let credentials = args
        .api_key
        .as_ref()
        .map(sluice::auth::Token::bearer)
        .transpose()?;
    let tls = match &args.tls_ca {
        None => None,
        Some(ca) => {
            let identity = args.tls_cert.as_deref().zip(args.tls_key.as_deref());
            let config = sluice::tls::rustls_client_config(ca, identity)?;
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        }
    };
    let mut conns = Vec::new();
    for _ in 0..args.connections {
        conns.push(
            Conn::connect(&args.target, args.timeout, tls.as_ref())
                .await?
                .with_credentials(credentials.clone()),
        );
    }
    Ok(conns)
}

/// State every request task reads.
struct Shared<W> {
    workload: W,
    conns: Vec<Conn>,
    /// `--timeout`: a call still unanswered then fails with DEADLINE_EXCEEDED.
    timeout: Duration,
    /// Measured calls only. A mutex, not per-task histograms: a lock held for one
    /// `record` costs far less than the call it follows, and one histogram per task would
    /// cost ~100 KiB each at high concurrency.
    recorder: Mutex<Recorder>,
    progress: Progress,
    /// Connections are up; the warm-up begins.
    start: Instant,
    /// The warm-up is over: calls sent (or scheduled) from here on are recorded.
    measure_start: Instant,
    /// Calls sent (or scheduled) from here on, in the cool-down, are not recorded.
    measure_end: Instant,
    /// No call is sent (or scheduled) from here on.
    end: Instant,
    /// `--requests`: no request numbered this or above is sent.
    max_requests: Option<u64>,
    /// Open loop: a call answered [`Outcome::stop`]; nothing more is scheduled.
    stopped: AtomicBool,
}

impl<W: Workload> Shared<W> {
    /// Sends request `seq`, whose latency counts from `started` (its send time in the closed
    /// loop, its scheduled time in the open loop), and records the outcome. `worker` is the
    /// closed-loop worker sending it and the number of workers. Returns whether the sender
    /// should stop ([`Outcome::stop`]).
    async fn request(&self, seq: u64, started: Instant, worker: Option<(u32, u32)>) -> bool {
        // Round robin over the connections.
        let conn = self.conns[(seq % self.conns.len() as u64) as usize].clone();
        let call = async {
            match worker {
                Some((worker, workers)) => self.workload.call_as(conn, seq, worker, workers).await,
                None => self.workload.call(conn, seq).await,
            }
        };
        let result = tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or_else(|_| {
                Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within --timeout {:?}",
                    self.timeout
                )))
            });
        let finished = Instant::now();
        self.progress.record(started, finished, &result);
        if self.measured(started) {
            self.recorder().record(started, finished, &result);
        }
        result.is_ok_and(|outcome| outcome.stop)
    }

    /// Whether a call sent (or scheduled) at `started` is recorded: after the warm-up, before
    /// the cool-down.
    fn measured(&self, started: Instant) -> bool {
        started >= self.measure_start && started < self.measure_end
    }

    /// Whether `--requests` forbids sending request `seq`.
    fn over_limit(&self, seq: u64) -> bool {
        self.max_requests.is_some_and(|max| seq >= max)
    }

    fn recorder(&self) -> MutexGuard<'_, Recorder> {
        // A poisoned lock only means a task panicked mid-`record`; the counts are still usable.
        self.recorder.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `concurrency` tasks, each sending back to back until the end of the run, until
/// `--requests` are sent, or until its workload tells it to stop. Returns whether the run
/// ended early: no worker was still sending when the run's time (`--duration`, then
/// `--cooldown`) ran out.
async fn closed_loop<W: Workload>(
    shared: &Arc<Shared<W>>,
    concurrency: u32,
) -> anyhow::Result<bool> {
    let next_seq = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for worker in 0..concurrency {
        let shared = Arc::clone(shared);
        let next_seq = Arc::clone(&next_seq);
        // Each worker answers whether it stopped before the end of the run.
        workers.spawn(async move {
            loop {
                let started = Instant::now();
                if started >= shared.end {
                    return false;
                }
                let seq = next_seq.fetch_add(1, Ordering::Relaxed);
                if shared.over_limit(seq) {
                    return true;
                }
                if shared
                    .request(seq, started, Some((worker, concurrency)))
                    .await
                {
                    return true;
                }
            }
        });
    }
    let mut early = true;
    while let Some(joined) = workers.join_next().await {
        early &= joined.context("a closed-loop worker failed")?;
    }
    Ok(early)
}

/// Requests on a fixed schedule, each on its own task. Returns how many measured requests
/// were dropped because `max_in_flight` calls were outstanding, and whether the schedule
/// ended early (`--requests` sent, or a call answered [`Outcome::stop`]).
async fn open_loop<W: Workload>(
    shared: &Arc<Shared<W>>,
    rate: f64,
    max_in_flight: u32,
) -> anyhow::Result<(u64, bool)> {
    let handle = tokio::runtime::Handle::current();
    let scheduler_shared = Arc::clone(shared);
    // The schedule runs on a blocking-pool thread with `std::thread::sleep`: tokio's timer
    // ticks in whole milliseconds, which would send each request up to 1 ms late and, since
    // latency counts from the scheduled time, add that to every figure. A thread sleep
    // overshoots by tens of microseconds.
    let (mut in_flight, dropped, early) = tokio::task::spawn_blocking(move || {
        schedule(&scheduler_shared, &handle, rate, max_in_flight as usize)
    })
    .await
    .context("the open-loop scheduler failed")??;
    while let Some(joined) = in_flight.join_next().await {
        joined.context("a request task failed")?;
    }
    Ok((dropped, early))
}

/// The open loop's scheduler (blocking thread). Request `seq` is due at `start + seq / rate`;
/// when the thread falls behind, late requests go out at once and their lateness counts as
/// latency. Returns the calls still in flight, the measured drops and whether the schedule
/// ended early.
fn schedule<W: Workload>(
    shared: &Arc<Shared<W>>,
    handle: &tokio::runtime::Handle,
    rate: f64,
    max_in_flight: usize,
) -> anyhow::Result<(JoinSet<()>, u64, bool)> {
    precise_sleeps();
    let mut in_flight = JoinSet::new();
    let mut dropped = 0;
    let mut early = false;
    for seq in 0_u64.. {
        // Computed from `seq`, not by adding an interval each time, so rounding never drifts.
        let Ok(offset) = Duration::try_from_secs_f64(seq as f64 / rate) else {
            break;
        };
        let scheduled = shared.start + offset;
        if scheduled >= shared.end {
            break;
        }
        if shared.over_limit(seq) {
            early = true;
            break;
        }
        let now = Instant::now();
        if scheduled > now {
            std::thread::sleep(scheduled - now);
        }
        if shared.stopped.load(Ordering::Relaxed) {
            early = true;
            break;
        }
        // Reap finished tasks so that `len` counts only the calls still outstanding.
        while let Some(joined) = in_flight.try_join_next() {
            joined.context("a request task failed")?;
        }
        if in_flight.len() >= max_in_flight {
            shared.progress.dropped.fetch_add(1, Ordering::Relaxed);
            if shared.measured(scheduled) {
                dropped += 1;
            }
            continue;
        }
        let task_shared = Arc::clone(shared);
        in_flight.spawn_on(
            async move {
                if task_shared.request(seq, scheduled, None).await {
                    task_shared.stopped.store(true, Ordering::Relaxed);
                }
            },
            handle,
        );
    }
    Ok((in_flight, dropped, early))
}

/// Asks the kernel to end this thread's sleeps on time: by default a thread's timers may fire
/// up to 50 µs late (its "timer slack"), and in the open loop that lateness counts as
/// latency. With it, the median CheckLimit latency at 10,000/s on the embedded store went from
/// ≈ 0.21 to ≈ 0.18 ms. Where it cannot be set, the schedule runs with the default slack.
pub fn precise_sleeps() {
    if let Err(e) = nix::sys::prctl::set_timerslack(1) {
        eprintln!("sluice-bench: the open loop's timer slack stays at the default: {e}");
    }
}

/// Counts over the whole run, warm-up included, for the progress line.
#[derive(Debug, Default)]
struct Progress {
    done: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
    /// Calls that answered OK with an allowing or a denying verdict.
    allowed: AtomicU64,
    denied: AtomicU64,
    /// Tasks carried by the calls that answered OK.
    tasks: AtomicU64,
    /// Latency of every call answered since the last progress line, failed ones included
    /// (a fail-closed limiter's UNAVAILABLE is an answer too), so that a line shows how a
    /// second went: Redis killed, a breaker opening, a stall. Taken and reset by each line.
    second: Mutex<Option<Histogram<u64>>>,
}

impl Progress {
    fn record(&self, started: Instant, finished: Instant, result: &Result<Outcome, tonic::Status>) {
        self.done.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(outcome) => {
                self.tasks.fetch_add(outcome.tasks, Ordering::Relaxed);
                match outcome.verdict {
                    Verdict::Allowed => self.allowed.fetch_add(1, Ordering::Relaxed),
                    Verdict::Denied => self.denied.fetch_add(1, Ordering::Relaxed),
                    Verdict::Unknown => 0,
                };
            }
            Err(_) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        let micros = finished.saturating_duration_since(started).as_micros();
        let mut second = self.second.lock().unwrap_or_else(PoisonError::into_inner);
        if second.is_none() {
            // Bounds valid by construction (1 µs to an hour, 2 figures): never an error.
            *second = Histogram::new_with_bounds(1, 3_600_000_000, 2).ok();
        }
        if let Some(histogram) = second.as_mut() {
            histogram.saturating_record(u64::try_from(micros).unwrap_or(u64::MAX));
        }
    }

    /// `p50 … p99 … max …` of the calls answered since the last call, in milliseconds, and
    /// starts a new second.
    fn take_second(&self) -> String {
        let mut second = self.second.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(histogram) = second.as_mut().filter(|h| !h.is_empty()) else {
            return String::new();
        };
        let ms = |micros: u64| micros as f64 / 1000.0;
        let line = format!(
            "  p50 {:.2} p99 {:.2} max {:.2} ms",
            ms(histogram.value_at_quantile(0.5)),
            ms(histogram.value_at_quantile(0.99)),
            ms(histogram.max()),
        );
        histogram.reset();
        line
    }
}

/// Prints, every second, what completed during that second. Runs until aborted.
async fn print_progress<W: Workload>(shared: Arc<Shared<W>>) {
    let start = shared.start;
    let second = Duration::from_secs(1);
    let mut ticker = tokio::time::interval_at(start + second, second);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut before = [0; 6];
    loop {
        let now = ticker.tick().await;
        let progress = &shared.progress;
        let totals = [
            &progress.done,
            &progress.errors,
            &progress.dropped,
            &progress.tasks,
            &progress.allowed,
            &progress.denied,
        ]
        .map(|count| count.load(Ordering::Relaxed));
        let [done, errors, dropped, tasks, allowed, denied] =
            std::array::from_fn(|i| totals[i].saturating_sub(before[i]));
        let phase = if now <= shared.measure_start {
            " (warm-up)"
        } else if now > shared.measure_end {
            " (cool-down)"
        } else {
            ""
        };
        let tasks = match W::TASKS {
            Some(_) => format!("  {tasks:>8} tasks/s"),
            None => String::new(),
        };
        // The limiter's workloads: how many the service let through. The queue's show tasks.
        let verdicts = match W::TASKS {
            None => format!("  {allowed} allowed  {denied} denied"),
            Some(_) => String::new(),
        };
        eprintln!(
            "[{:>6.1}s] {done:>8} req/s{tasks}{verdicts}  {errors} errors  {dropped} dropped{}{phase}",
            now.saturating_duration_since(start).as_secs_f64(),
            progress.take_second(),
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
