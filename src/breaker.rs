//! The circuit breaker in front of Redis: after `threshold` consecutive transient failures it
//! opens, and while open the calls it guards do not touch Redis: the limiter answers each
//! check by its policy's failure mode, the queue answers every call with UNAVAILABLE at once
//! (a [`RedisPool::guarded`] pool). A prober pings Redis in the background and closes the
//! breaker when it answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::pool::RedisPool;
use tokio_util::sync::CancellationToken;

/// The shortest wait between two pings while the breaker is open.
const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(10);

/// Why a call failed without going to Redis: the breaker was open.
pub const BREAKER_OPEN: &str = "breaker open";

/// Shared breaker state.
#[derive(Debug)]
pub struct Breaker {
    open: AtomicBool,
    failures: AtomicU32,
    /// How many times it has closed: a call that started before the last close reports its
    /// failure against an older epoch, and it is ignored (see [`Breaker::failure_since`]).
    closes: AtomicU64,
    threshold: u32,
    state: tokio::sync::watch::Sender<bool>,
    /// The gauge that shows it open (1) or closed (0).
    gauge: &'static str,
}

impl Breaker {
    /// A closed breaker that opens after `threshold` consecutive transient failures and shows
    /// its state in the gauge named `gauge`.
    pub fn new(threshold: u32, gauge: &'static str) -> Self {
        metrics::gauge!(gauge).set(0.0);
        Self {
            open: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            closes: AtomicU64::new(0),
            threshold: threshold.max(1),
            state: tokio::sync::watch::Sender::new(false),
            gauge,
        }
    }

    /// True while calls must not go to Redis.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// A call reached Redis and got an answer.
    pub fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// The current epoch, to take when a call starts and hand to
    /// [`Breaker::failure_since`] when it fails.
    pub fn epoch(&self) -> u64 {
        self.closes.load(Ordering::Acquire)
    }

    /// A call that started in `epoch` failed transiently. Calls that were already waiting out
    /// the timeouts of an outage when the breaker closed again do not count: they would open
    /// it again while Redis answers.
    pub fn failure_since(&self, epoch: u64) {
        if self.epoch() == epoch {
            self.failure();
        }
    }

    /// A call failed transiently (connection, timeout).
    pub fn failure(&self) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= self.threshold && !self.open.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                failures,
                "Redis unavailable: breaker open until it answers a ping"
            );
            metrics::gauge!(self.gauge).set(1.0);
            self.state.send_replace(true);
        }
    }

    fn close(&self) {
        self.closes.fetch_add(1, Ordering::AcqRel);
        self.failures.store(0, Ordering::Relaxed);
        if self.open.swap(false, Ordering::AcqRel) {
            tracing::info!("Redis answers again: breaker closed");
            metrics::gauge!(self.gauge).set(0.0);
            self.state.send_replace(false);
        }
    }

    /// Watches the open (true) / closed (false) state.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.state.subscribe()
    }

    /// A breaker configured by `args` (`--breaker-threshold`, `--breaker-probe-interval`),
    /// its state in the gauge `gauge`, with its prober running on `tasks` until `shutdown`.
    /// `pool` must be unguarded: the prober pings through it.
    pub fn start(
        args: &crate::config::RedisArgs,
        gauge: &'static str,
        pool: &RedisPool,
        tasks: &tokio_util::task::TaskTracker,
        shutdown: &CancellationToken,
    ) -> Arc<Self> {
        let breaker = Arc::new(Self::new(args.breaker_threshold, gauge));
        tasks.spawn(Arc::clone(&breaker).probe(
            pool.clone(),
            args.breaker_probe_interval,
            shutdown.clone(),
        ));
        breaker
    }

    /// While open, PINGs Redis every `interval` (each bounded by the pool's timeouts) and
    /// closes the breaker on the first answer. Runs until `shutdown`.
    pub async fn probe(
        self: Arc<Self>,
        pool: RedisPool,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        let mut state = self.watch();
        loop {
            tokio::select! {
                open = state.wait_for(|open| *open) => if open.is_err() { return },
                () = shutdown.cancelled() => return,
            }
            tokio::select! {
                // A zero interval would ping back to back.
                () = tokio::time::sleep(interval.max(MIN_PROBE_INTERVAL)) => {}
                () = shutdown.cancelled() => return,
            }
            // Connections that sat idle through the outage are dead: once Redis answers,
            // calls must not meet them, fail and open the breaker again. The ping dials anew.
            pool.renew();
            if pool.query::<String>(&redis::cmd("PING")).await.is_ok() {
                self.close();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_of_calls_from_before_the_last_close_do_not_reopen_it() {
        let breaker = Breaker::new(3, "sluice_test_breaker_open");
        let before = breaker.epoch();
        breaker.failure_since(before);
        breaker.failure_since(before);
        assert!(!breaker.is_open(), "below the threshold");
        breaker.failure_since(before);
        assert!(breaker.is_open(), "three in a row open it");
        breaker.close();
        assert!(!breaker.is_open());
        // Calls that were waiting out the outage's timeouts fail after the close.
        for _ in 0..5 {
            breaker.failure_since(before);
        }
        assert!(!breaker.is_open(), "stale failures are ignored");
        let now = breaker.epoch();
        breaker.failure_since(now);
        breaker.success();
        breaker.failure_since(now);
        breaker.failure_since(now);
        assert!(!breaker.is_open(), "an answer resets the count");
        breaker.failure_since(now);
        assert!(breaker.is_open(), "fresh failures count");
    }
}
