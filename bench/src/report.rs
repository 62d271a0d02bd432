//! What a run measured, and how it is printed: a text block for people, a JSON line for scripts.

use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::driver::Verdict;

/// Latencies above this are recorded as this (a call is bounded by `--timeout` anyway).
const HIGHEST_MICROS: u64 = 3_600_000_000;

/// How load was generated.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    Closed { concurrency: u32 },
    Open { rate: f64, max_in_flight: u32 },
}

/// Counts and latencies of the measured calls (those sent after the warm-up).
#[derive(Debug, Clone)]
pub struct Recorder {
    /// Microseconds, 3 significant figures, of calls that answered OK. Failed calls are left
    /// out: a refused connection fails in microseconds and would flatter every percentile.
    latency: Histogram<u64>,
    /// Calls completed, OK or not.
    requests: u64,
    errors: u64,
    allowed: u64,
    denied: u64,
    unknown: u64,
    /// The first error's status code and message; later ones usually repeat it.
    first_error: Option<String>,
    last_finished: Option<Instant>,
}

impl Recorder {
    pub fn new() -> anyhow::Result<Self> {
        let latency = Histogram::new_with_bounds(1, HIGHEST_MICROS, 3)
            .map_err(|e| anyhow::anyhow!("creating the latency histogram: {e:?}"))?;
        Ok(Self {
            latency,
            requests: 0,
            errors: 0,
            allowed: 0,
            denied: 0,
            unknown: 0,
            first_error: None,
            last_finished: None,
        })
    }

    /// Records one call that started (or was due) at `started` and finished at `finished`.
    pub fn record(
        &mut self,
        started: Instant,
        finished: Instant,
        result: &Result<Verdict, tonic::Status>,
    ) {
        self.requests += 1;
        self.last_finished = Some(self.last_finished.map_or(finished, |t| t.max(finished)));
        match result {
            Ok(verdict) => {
                match verdict {
                    Verdict::Allowed => self.allowed += 1,
                    Verdict::Denied => self.denied += 1,
                    Verdict::Unknown => self.unknown += 1,
                }
                let micros = finished.saturating_duration_since(started).as_micros();
                self.latency
                    .saturating_record(u64::try_from(micros).unwrap_or(HIGHEST_MICROS));
            }
            Err(status) => {
                self.errors += 1;
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
}

/// Latency percentiles of the calls that answered OK, in milliseconds.
struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

impl Report {
    /// The measured period: at least `--duration`, longer by the tail of the calls that were
    /// still in flight when sending stopped.
    fn measured(&self) -> Duration {
        let until_last = self.recorder.last_finished.map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(self.measure_start)
        });
        until_last.max(self.duration)
    }

    /// Completed calls (OK or not) per second of the measured period.
    fn throughput(&self) -> f64 {
        self.recorder.requests as f64 / self.measured().as_secs_f64()
    }

    /// `None` when no measured call answered OK.
    fn percentiles(&self) -> Option<Percentiles> {
        let h = &self.recorder.latency;
        if h.is_empty() {
            return None;
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Some(Percentiles {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        })
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
        };
        let first_error = r
            .first_error
            .as_deref()
            .map_or_else(|| "null".to_owned(), json_string);
        let latency = match self.percentiles() {
            Some(p) => format!(
                r#"{{"p50":{:.3},"p90":{:.3},"p99":{:.3},"p999":{:.3},"max":{:.3}}}"#,
                p.p50, p.p90, p.p99, p.p999, p.max
            ),
            None => "null".to_owned(),
        };
        format!(
            concat!(
                r#"{{"workload":{},"target":{},"connections":{},"mode":"{}","#,
                r#""concurrency":{},"rate":{},"max_in_flight":{},"#,
                r#""warmup_s":{:.3},"duration_s":{:.3},"measured_s":{:.3},"#,
                r#""requests":{},"errors":{},"first_error":{},"dropped":{},"#,
                r#""allowed":{},"denied":{},"unknown":{},"#,
                r#""throughput_rps":{:.1},"latency_ms":{}}}"#,
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
        )
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
        }
        writeln!(
            f,
            "  measured     {:.3}s after {:.3}s of warm-up",
            self.measured().as_secs_f64(),
            self.warmup.as_secs_f64()
        )?;
        writeln!(f, "  requests     {}", r.requests)?;
        writeln!(f, "  errors       {}", r.errors)?;
        if let Some(first) = &r.first_error {
            writeln!(f, "  first error  {first}")?;
        }
        if let Mode::Open { .. } = self.mode {
            writeln!(f, "  dropped      {}", self.dropped)?;
        }
        write!(
            f,
            "  verdicts     allowed {}, denied {}",
            r.allowed, r.denied
        )?;
        if r.unknown > 0 {
            write!(f, ", no verdict {}", r.unknown)?;
        }
        writeln!(f)?;
        writeln!(f, "  throughput   {:.1} req/s", self.throughput())?;
        match self.percentiles() {
            Some(p) => writeln!(
                f,
                "  latency ms   p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                p.p50, p.p90, p.p99, p.p999, p.max
            ),
            None => writeln!(f, "  latency ms   n/a (no call answered OK)"),
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
            let result = Ok(if micros % 10 == 0 {
                Verdict::Denied
            } else {
                Verdict::Allowed
            });
            recorder.record(t0, t0 + Duration::from_micros(micros), &result);
        }
        recorder.record(t0, t0, &Err(tonic::Status::unavailable("store down")));
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
        };
        let p = report
            .percentiles()
            .ok_or_else(|| anyhow::anyhow!("no percentiles"))?;
        assert!((p.p50 - 0.5).abs() < 0.002, "p50 {}", p.p50);
        assert!((p.max - 1.0).abs() < 0.002, "max {}", p.max);
        let json = report.json();
        assert!(json.contains(r#""requests":1001,"errors":1,"#), "{json}");
        assert!(json.contains(r#""allowed":900,"denied":100,"#), "{json}");
        assert!(
            json.contains(r#""first_error":"Unavailable: store down""#),
            "{json}"
        );
        assert!(json.contains(r#""throughput_rps":1001.0,"#), "{json}");
        Ok(())
    }
}
