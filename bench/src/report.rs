//! What a run measured, and how it is printed: a text block for people, a JSON line for scripts.

use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::driver::{Outcome, Verdict};
use crate::redis_info::Usage;

/// Latencies above this are recorded as this (a call is bounded by `--timeout` anyway).
const HIGHEST_MICROS: u64 = 3_600_000_000;

/// How load was generated.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    Closed {
        concurrency: u32,
    },
    Open {
        rate: f64,
        max_in_flight: u32,
    },
    /// The Lease stream workloads (`lease-drain`, `push-latency`): `workers` streams, each
    /// granted `credits` at first and one more per Ack; `rate` is push-latency's producer
    /// schedule (tasks per second).
    Stream {
        workers: u32,
        credits: u32,
        rate: Option<f64>,
    },
}

/// What Redis did while the Lease stream workers were subscribed and no task was sent
/// (`push-latency --idle-sample`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdleRedis {
    /// Length of the sample, as measured between the two reads.
    pub seconds: f64,
    pub usage: Usage,
}

impl IdleRedis {
    /// Redis commands per second while idle.
    pub fn commands_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.usage.commands as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Redis CPU while idle, in percent of one core.
    pub fn cpu_percent(&self) -> f64 {
        if self.seconds > 0.0 {
            self.usage.cpu_seconds * 100.0 / self.seconds
        } else {
            0.0
        }
    }
}

/// How a workload that moves tasks wants them reported. Workloads without tasks (the
/// limiter's) have none, and their report has no task lines.
#[derive(Debug, Clone, Copy)]
pub struct TaskCounting {
    /// What happened to the counted tasks: "enqueued", "completed".
    pub verb: &'static str,
    /// What one latency sample is, plural: "EnqueueBatch calls".
    pub timed: &'static str,
    /// What a "denied" verdict means for this workload, if it can happen ("empty Dequeue").
    pub denied: Option<&'static str>,
}

/// Counts and latencies of the measured calls (those sent after the warm-up).
#[derive(Debug, Clone)]
pub struct Recorder {
    /// Microseconds, 3 significant figures, of calls that answered OK and that the workload
    /// times ([`Outcome::timed`]). Failed calls are left out: a refused connection fails in
    /// microseconds and would flatter every percentile.
    latency: Histogram<u64>,
    /// Microseconds of the calls that failed, apart: a fail-closed limiter's UNAVAILABLE is
    /// an answer whose speed matters (`bench/failover.sh`); a refused connection is not.
    error_latency: Histogram<u64>,
    /// Calls completed, OK or not.
    requests: u64,
    errors: u64,
    allowed: u64,
    denied: u64,
    unknown: u64,
    /// Tasks carried by the calls that answered OK ([`Outcome::tasks`]).
    tasks: u64,
    /// The first error's status code and message; later ones usually repeat it.
    first_error: Option<String>,
    last_finished: Option<Instant>,
}

impl Recorder {
    pub fn new() -> anyhow::Result<Self> {
        let histogram = || {
            Histogram::new_with_bounds(1, HIGHEST_MICROS, 3)
                .map_err(|e| anyhow::anyhow!("creating a latency histogram: {e:?}"))
        };
        Ok(Self {
            latency: histogram()?,
            error_latency: histogram()?,
            requests: 0,
            errors: 0,
            allowed: 0,
            denied: 0,
            unknown: 0,
            tasks: 0,
            first_error: None,
            last_finished: None,
        })
    }

    /// Records one call that started (or was due) at `started` and finished at `finished`.
    pub fn record(
        &mut self,
        started: Instant,
        finished: Instant,
        result: &Result<Outcome, tonic::Status>,
    ) {
        self.requests += 1;
        self.last_finished = Some(self.last_finished.map_or(finished, |t| t.max(finished)));
        let micros = finished.saturating_duration_since(started).as_micros();
        let micros = u64::try_from(micros).unwrap_or(HIGHEST_MICROS);
        match result {
            Ok(outcome) => {
                match outcome.verdict {
                    Verdict::Allowed => self.allowed += 1,
                    Verdict::Denied => self.denied += 1,
                    Verdict::Unknown => self.unknown += 1,
                }
                self.tasks += outcome.tasks;
                if outcome.timed {
                    self.latency.saturating_record(micros);
                }
            }
            Err(status) => {
                self.errors += 1;
                self.error_latency.saturating_record(micros);
                if self.first_error.is_none() {
                    self.first_error = Some(format!("{:?}: {}", status.code(), status.message()));
                }
            }
        }
    }
}

/// The result of one run.
#[derive(Debug)]
pub struct Report {
    pub workload: &'static str,
    pub target: String,
    pub connections: u32,
    pub mode: Mode,
    pub warmup: Duration,
    pub duration: Duration,
    /// When the warm-up ended; the measured period runs from here to the last measured answer.
    pub measure_start: Instant,
    /// Open loop: measured requests not sent because `--max-in-flight` calls were outstanding.
    pub dropped: u64,
    pub recorder: Recorder,
    /// Set when the workload counts tasks: the report then shows them and tasks/s.
    pub tasks: Option<TaskCounting>,
    /// When the run ended before `--duration` ran out (every worker stopped, or `--requests`
    /// were all answered); the measured period then ends here.
    pub ended_early: Option<Instant>,
    /// What Redis spent over the measured period, when `--redis-url` was given; `Err` says
    /// why it could not be read.
    pub redis: Option<Result<Usage, String>>,
    /// `push-latency` with `--redis-url`: Redis while the workers were subscribed and idle;
    /// `Err` says why it could not be measured.
    pub idle_redis: Option<Result<IdleRedis, String>>,
}

/// Latency percentiles of the calls that answered OK (or of those that failed), in
/// milliseconds.
struct Percentiles {
    p50: f64,
    p90: f64,
    p95: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

impl Percentiles {
    /// `None` for an empty histogram.
    fn of(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Some(Self {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p95: ms(h.value_at_quantile(0.95)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        })
    }

    fn json(&self) -> String {
        format!(
            r#"{{"p50":{:.3},"p90":{:.3},"p95":{:.3},"p99":{:.3},"p999":{:.3},"max":{:.3}}}"#,
            self.p50, self.p90, self.p95, self.p99, self.p999, self.max
        )
    }
}

impl fmt::Display for Percentiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {:.3}  p90 {:.3}  p95 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            self.p50, self.p90, self.p95, self.p99, self.p999, self.max
        )
    }
}

impl Report {
    /// The measured period: at least `--duration`, longer by the tail of the calls that were
    /// still in flight when sending stopped.
    /// A run that ended early is measured up to its end.
    fn measured(&self) -> Duration {
        if let Some(ended) = self.ended_early {
            return ended.saturating_duration_since(self.measure_start);
        }
        let until_last = self.recorder.last_finished.map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(self.measure_start)
        });
        until_last.max(self.duration)
    }

    /// `count` per second of the measured period; 0 when nothing was measured (a run that
    /// ended during its warm-up).
    fn per_second(&self, count: u64) -> f64 {
        let seconds = self.measured().as_secs_f64();
        if seconds > 0.0 {
            count as f64 / seconds
        } else {
            0.0
        }
    }

    /// Completed calls (OK or not) per second of the measured period.
    fn throughput(&self) -> f64 {
        self.per_second(self.recorder.requests)
    }

    /// Tasks carried by the calls that answered OK, per second of the measured period.
    fn tasks_per_second(&self) -> f64 {
        self.per_second(self.recorder.tasks)
    }

    /// Redis CPU microseconds and commands per counted task; `None` when no task was counted.
    fn redis_per_task(&self, usage: &Usage) -> Option<(f64, f64)> {
        let tasks = self.recorder.tasks;
        (tasks > 0).then(|| {
            (
                usage.cpu_seconds * 1e6 / tasks as f64,
                usage.commands as f64 / tasks as f64,
            )
        })
    }

    /// The JSON fields of task workloads, each preceded by a comma.
    fn tasks_json(&self, counting: &TaskCounting) -> String {
        let r = &self.recorder;
        let redis = match &self.redis {
            None => "null".to_owned(),
            Some(Err(error)) => format!(r#"{{"error":{}}}"#, json_string(error)),
            Some(Ok(usage)) => {
                let (cpu, commands) = match self.redis_per_task(usage) {
                    Some((cpu, commands)) => (format!("{cpu:.3}"), format!("{commands:.3}")),
                    None => ("null".to_owned(), "null".to_owned()),
                };
                format!(
                    concat!(
                        r#"{{"cpu_s":{:.6},"commands":{},"script_calls":{},"#,
                        r#""cpu_us_per_task":{},"commands_per_task":{}}}"#,
                    ),
                    usage.cpu_seconds, usage.commands, usage.script_calls, cpu, commands,
                )
            }
        };
        format!(
            concat!(
                r#","tasks":{},"tasks_counted":{},"tasks_per_s":{:.1},"#,
                r#""timed_calls":{},"ended_early":{},"redis":{}"#,
            ),
            r.tasks,
            json_string(counting.verb),
            self.tasks_per_second(),
            r.latency.len(),
            self.ended_early.is_some(),
            redis,
        )
    }

    /// `None` when no measured call answered OK.
    fn percentiles(&self) -> Option<Percentiles> {
        Percentiles::of(&self.recorder.latency)
    }

    /// The report as one line of JSON, without a trailing newline.
    pub fn json(&self) -> String {
        let r = &self.recorder;
        let (mode, concurrency, rate, max_in_flight) = match self.mode {
            Mode::Closed { concurrency } => (
                "closed",
                concurrency.to_string(),
                "null".to_owned(),
                "null".to_owned(),
            ),
            Mode::Open {
                rate,
                max_in_flight,
            } => (
                "open",
                "null".to_owned(),
                rate.to_string(),
                max_in_flight.to_string(),
            ),
            Mode::Stream { workers, rate, .. } => (
                "stream",
                workers.to_string(),
                rate.map_or_else(|| "null".to_owned(), |rate| rate.to_string()),
                "null".to_owned(),
            ),
        };
        let first_error = r
            .first_error
            .as_deref()
            .map_or_else(|| "null".to_owned(), json_string);
        let latency = self
            .percentiles()
            .map_or_else(|| "null".to_owned(), |p| p.json());
        let error_latency =
            Percentiles::of(&r.error_latency).map_or_else(|| "null".to_owned(), |p| p.json());
        // Workloads without tasks keep exactly the fields they always had.
        let tasks = self
            .tasks
            .as_ref()
            .map_or_else(String::new, |counting| self.tasks_json(counting));
        // Likewise, only the Lease stream workloads add these.
        let stream = self.stream_json();
        format!(
            concat!(
                r#"{{"workload":{},"target":{},"connections":{},"mode":"{}","#,
                r#""concurrency":{},"rate":{},"max_in_flight":{},"#,
                r#""warmup_s":{:.3},"duration_s":{:.3},"measured_s":{:.3},"#,
                r#""requests":{},"errors":{},"first_error":{},"dropped":{},"#,
                r#""allowed":{},"denied":{},"unknown":{},"#,
                r#""throughput_rps":{:.1},"latency_ms":{},"error_latency_ms":{}{}{}}}"#,
            ),
            json_string(self.workload),
            json_string(&self.target),
            self.connections,
            mode,
            concurrency,
            rate,
            max_in_flight,
            self.warmup.as_secs_f64(),
            self.duration.as_secs_f64(),
            self.measured().as_secs_f64(),
            r.requests,
            r.errors,
            first_error,
            self.dropped,
            r.allowed,
            r.denied,
            r.unknown,
            self.throughput(),
            latency,
            error_latency,
            tasks,
            stream,
        )
    }

    /// The JSON fields of the Lease stream workloads, each preceded by a comma; empty for
    /// the others.
    fn stream_json(&self) -> String {
        let Mode::Stream {
            workers, credits, ..
        } = self.mode
        else {
            return String::new();
        };
        let idle = match &self.idle_redis {
            None => "null".to_owned(),
            Some(Err(error)) => format!(r#"{{"error":{}}}"#, json_string(error)),
            Some(Ok(idle)) => format!(
                concat!(
                    r#"{{"seconds":{:.3},"commands":{},"commands_per_s":{:.2},"#,
                    r#""cpu_s":{:.6},"cpu_percent":{:.3}}}"#,
                ),
                idle.seconds,
                idle.usage.commands,
                idle.commands_per_second(),
                idle.usage.cpu_seconds,
                idle.cpu_percent(),
            ),
        };
        format!(r#","workers":{workers},"credits":{credits},"idle_redis":{idle}"#)
    }
}

/// The text block for people, several lines, each ending with a newline.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.recorder;
        writeln!(f, "sluice-bench {}", self.workload)?;
        writeln!(
            f,
            "  target       {} ({} connections)",
            self.target, self.connections
        )?;
        match self.mode {
            Mode::Closed { concurrency } => {
                writeln!(f, "  mode         closed loop, concurrency {concurrency}")?;
            }
            Mode::Open {
                rate,
                max_in_flight,
            } => writeln!(
                f,
                "  mode         open loop, {rate} req/s scheduled, max {max_in_flight} in flight"
            )?,
            Mode::Stream {
                workers,
                credits,
                rate,
            } => {
                write!(
                    f,
                    "  mode         Lease streams: {workers} workers, {credits} credits each (+1 per Ack)"
                )?;
                match rate {
                    Some(rate) => writeln!(f, ", producer at {rate} tasks/s")?,
                    None => writeln!(f)?,
                }
            }
        }
        writeln!(
            f,
            "  measured     {:.3}s after {:.3}s of warm-up",
            self.measured().as_secs_f64(),
            self.warmup.as_secs_f64()
        )?;
        if self.ended_early.is_some() {
            let why = match self.mode {
                Mode::Stream { rate: None, .. } => {
                    "every worker went --idle without a task: the queue is drained"
                }
                Mode::Stream { rate: Some(_), .. } => "every --tasks was sent and handled",
                _ => "the workload stopped (--stop-when-empty) or --requests were answered",
            };
            writeln!(f, "  ended        before --duration: {why}")?;
        }
        writeln!(f, "  requests     {}", r.requests)?;
        writeln!(f, "  errors       {}", r.errors)?;
        if let Some(first) = &r.first_error {
            writeln!(f, "  first error  {first}")?;
        }
        if let Mode::Open { .. } | Mode::Stream { rate: Some(_), .. } = self.mode {
            writeln!(f, "  dropped      {}", self.dropped)?;
        }
        // The Lease stream workloads send no request of their own: their "requests" are
        // tasks (and errors), with no verdict, and tasks/s below says their throughput.
        if !matches!(self.mode, Mode::Stream { .. }) {
            write!(
                f,
                "  verdicts     allowed {}, denied {}",
                r.allowed, r.denied
            )?;
            if r.unknown > 0 {
                write!(f, ", no verdict {}", r.unknown)?;
            }
            if let Some(denied) = self.tasks.as_ref().and_then(|t| t.denied) {
                write!(f, " (denied = {denied})")?;
            }
            writeln!(f)?;
            writeln!(f, "  throughput   {:.1} req/s", self.throughput())?;
        }
        if let Some(counting) = &self.tasks {
            writeln!(
                f,
                "  tasks        {} {}, {:.1} tasks/s",
                r.tasks,
                counting.verb,
                self.tasks_per_second()
            )?;
            writeln!(f, "  latency of   {} {}", r.latency.len(), counting.timed)?;
        }
        match self.percentiles() {
            Some(p) => writeln!(f, "  latency ms   {p}")?,
            None if self.tasks.is_some() => writeln!(f, "  latency ms   n/a (no timed call)")?,
            None => writeln!(f, "  latency ms   n/a (no call answered OK)")?,
        }
        if let Some(p) = Percentiles::of(&r.error_latency) {
            writeln!(f, "  errors ms    {p}")?;
        }
        match &self.idle_redis {
            None => {}
            Some(Err(error)) => writeln!(f, "  idle Redis   n/a: {error}")?,
            Some(Ok(idle)) => writeln!(
                f,
                "  idle Redis commands/s: {:.2} ({} in {:.1} s, CPU {:.2}% of a core)",
                idle.commands_per_second(),
                idle.usage.commands,
                idle.seconds,
                idle.cpu_percent()
            )?,
        }
        match &self.redis {
            None => Ok(()),
            Some(Err(error)) => writeln!(f, "  Redis        n/a: {error}"),
            Some(Ok(usage)) => match self.redis_per_task(usage) {
                Some((cpu, commands)) => {
                    writeln!(
                        f,
                        "  Redis CPU per task: {cpu:.2} µs ({:.3} s in all)",
                        usage.cpu_seconds
                    )?;
                    writeln!(
                        f,
                        "  Redis commands per task: {commands:.2} ({} in all, {} script calls)",
                        usage.commands, usage.script_calls
                    )
                }
                None => writeln!(
                    f,
                    "  Redis        {:.3} s CPU, {} commands ({} script calls), no task counted",
                    usage.cpu_seconds, usage.commands, usage.script_calls
                ),
            },
        }
    }
}

/// `text` as a JSON string literal, quotes included.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_string_escapes_quotes_backslashes_and_controls() {
        assert_eq!(json_string("a\"b\\c\nd\u{1}"), r#""a\"b\\c\nd\u0001""#);
    }

    #[test]
    fn percentiles_and_counts_come_from_recorded_calls() -> anyhow::Result<()> {
        let mut recorder = Recorder::new()?;
        let t0 = Instant::now();
        for micros in 1..=1000 {
            let result = Ok(Outcome::from(if micros % 10 == 0 {
                Verdict::Denied
            } else {
                Verdict::Allowed
            }));
            recorder.record(t0, t0 + Duration::from_micros(micros), &result);
        }
        let failed = Err(tonic::Status::unavailable("store down"));
        recorder.record(t0, t0 + Duration::from_millis(3), &failed);
        let report = Report {
            workload: "check-limit",
            target: "http://127.0.0.1:1".into(),
            connections: 1,
            mode: Mode::Closed { concurrency: 1 },
            warmup: Duration::ZERO,
            duration: Duration::from_secs(1),
            measure_start: t0,
            dropped: 0,
            recorder,
            tasks: None,
            ended_early: None,
            redis: None,
            idle_redis: None,
        };
        let p = report
            .percentiles()
            .ok_or_else(|| anyhow::anyhow!("no percentiles"))?;
        assert!((p.p50 - 0.5).abs() < 0.002, "p50 {}", p.p50);
        assert!((p.p95 - 0.95).abs() < 0.002, "p95 {}", p.p95);
        assert!((p.max - 1.0).abs() < 0.002, "max {}", p.max);
        let json = report.json();
        assert!(json.contains(r#""requests":1001,"errors":1,"#), "{json}");
        assert!(json.contains(r#""allowed":900,"denied":100,"#), "{json}");
        assert!(
            json.contains(r#""first_error":"Unavailable: store down""#),
            "{json}"
        );
        assert!(json.contains(r#""throughput_rps":1001.0,"#), "{json}");
        // The failed call's latency is kept apart from the answers'.
        assert!(
            json.contains(r#""max":1.000},"error_latency_ms":{"p50":3.00"#),
            "{json}"
        );
        assert!(!json.contains(r#""tasks""#), "{json}");
        let text = report.to_string();
        assert!(!text.contains("tasks"), "{text}");
        assert!(text.contains("  errors ms    p50 3.00"), "{text}");
        Ok(())
    }

    #[test]
    fn task_workloads_report_tasks_per_second_and_redis_per_task() -> anyhow::Result<()> {
        let mut recorder = Recorder::new()?;
        let t0 = Instant::now();
        for _ in 0..10 {
            let outcome = Outcome::tasks(Verdict::Allowed, 100);
            recorder.record(t0, t0 + Duration::from_millis(2), &Ok(outcome));
        }
        // An empty Dequeue: denied, no task, not timed.
        let empty = Outcome {
            timed: false,
            ..Outcome::tasks(Verdict::Denied, 0)
        };
        recorder.record(t0, t0 + Duration::from_micros(10), &Ok(empty));
        let report = Report {
            workload: "drain",
            target: "http://127.0.0.1:1".into(),
            connections: 1,
            mode: Mode::Closed { concurrency: 1 },
            warmup: Duration::ZERO,
            duration: Duration::from_secs(10),
            measure_start: t0,
            dropped: 0,
            recorder,
            tasks: Some(TaskCounting {
                verb: "completed",
                timed: "rounds",
                denied: Some("empty Dequeue"),
            }),
            // Ended after 2 s although --duration was 10 s.
            ended_early: Some(t0 + Duration::from_secs(2)),
            redis: Some(Ok(Usage {
                cpu_seconds: 0.5,
                commands: 3000,
                script_calls: 1000,
            })),
            idle_redis: None,
        };
        let json = report.json();
        assert!(json.contains(r#""measured_s":2.000,"#), "{json}");
        assert!(json.contains(r#""throughput_rps":5.5,"#), "{json}");
        assert!(
            json.contains(r#""tasks":1000,"tasks_counted":"completed","tasks_per_s":500.0,"#),
            "{json}"
        );
        assert!(
            json.contains(r#""timed_calls":10,"ended_early":true,"#),
            "{json}"
        );
        assert!(
            json.contains(r#""cpu_us_per_task":500.000,"commands_per_task":3.000}"#),
            "{json}"
        );
        assert!(json.ends_with("}}"), "{json}");
        let text = report.to_string();
        assert!(text.contains("1000 completed, 500.0 tasks/s"), "{text}");
        assert!(text.contains("Redis CPU per task: 500.00 µs"), "{text}");
        assert!(text.contains("Redis commands per task: 3.00"), "{text}");
        assert!(text.contains("(denied = empty Dequeue)"), "{text}");
        Ok(())
    }

    #[test]
    fn stream_workloads_report_workers_credits_and_idle_redis() -> anyhow::Result<()> {
        let mut recorder = Recorder::new()?;
        let t0 = Instant::now();
        for _ in 0..100 {
            let outcome = Outcome::tasks(Verdict::Allowed, 1);
            recorder.record(t0, t0 + Duration::from_millis(3), &Ok(outcome));
        }
        let report = Report {
            workload: "push-latency",
            target: "http://127.0.0.1:1".into(),
            connections: 5,
            mode: Mode::Stream {
                workers: 4,
                credits: 1,
                rate: Some(1000.0),
            },
            warmup: Duration::ZERO,
            duration: Duration::from_secs(60),
            measure_start: t0,
            dropped: 0,
            recorder,
            tasks: Some(TaskCounting {
                verb: "completed",
                timed: "tasks",
                denied: None,
            }),
            ended_early: Some(t0 + Duration::from_millis(100)),
            redis: None,
            idle_redis: Some(Ok(IdleRedis {
                seconds: 10.0,
                usage: Usage {
                    cpu_seconds: 0.05,
                    commands: 2000,
                    script_calls: 0,
                },
            })),
        };
        let json = report.json();
        assert!(
            json.contains(r#""mode":"stream","concurrency":4,"rate":1000,"#),
            "{json}"
        );
        assert!(json.contains(r#""tasks_per_s":1000.0,"#), "{json}");
        assert!(
            json.ends_with(concat!(
                r#","workers":4,"credits":1,"idle_redis":{"seconds":10.000,"commands":2000,"#,
                r#""commands_per_s":200.00,"cpu_s":0.050000,"cpu_percent":0.500}}"#
            )),
            "{json}"
        );
        let text = report.to_string();
        assert!(text.contains("4 workers, 1 credits each"), "{text}");
        assert!(text.contains("idle Redis commands/s: 200.00"), "{text}");
        assert!(
            text.contains("every --tasks was sent and handled"),
            "{text}"
        );
        assert!(!text.contains("verdicts"), "{text}");
        // The other workloads' JSON has no stream fields.
        let closed = Report {
            mode: Mode::Closed { concurrency: 1 },
            idle_redis: None,
            ..report
        };
        assert!(!closed.json().contains("workers"), "{}", closed.json());
        Ok(())
    }
}
