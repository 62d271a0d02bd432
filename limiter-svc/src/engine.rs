//! The limiter's core, shared by the Sluice API and Envoy's RLS: resolved checks in, one
//! all-or-nothing decision out. It consults the hot-key cache, the circuit breaker and the
//! policies' failure modes around the store.

use std::sync::Arc;
use std::time::Duration;

use sluice::error::{Error, Result};

use crate::hotkeys::HotKeys;
use crate::policy::{FailureMode, Policy};
use crate::store::{Counter, EmbeddedStore, Evaluation, Mode, Store, Verdict};
use sluice::breaker::{BREAKER_OPEN, Breaker};

/// A check with its counter and the policy it follows.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The counter to evaluate.
    pub counter: Counter,
    /// Where the limit came from (name, shadow, failure mode).
    pub policy: Arc<Policy>,
    /// The check's scope, for metrics.
    pub scope: String,
}

/// Who answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The authoritative store.
    Store,
    /// The hot-key cache denied without asking the store.
    HotKey,
    /// The store was unavailable; the policy's failure mode answered.
    FailureMode,
    /// Not evaluated: another check already decided the request.
    Skipped,
}

/// One check's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    /// The numbers.
    pub verdict: Verdict,
    /// Who answered.
    pub source: Source,
}

/// A request's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Every non-shadow check passed (and all were consumed).
    pub allowed: bool,
    /// Per check, in request order.
    pub checks: Vec<CheckOutcome>,
    /// Who decided.
    pub source: Source,
}

/// The limiter engine.
#[derive(Debug)]
pub struct Engine {
    store: Store,
    local: EmbeddedStore,
    breaker: Option<Arc<Breaker>>,
    hot: Option<HotKeys>,
}

/// The figures of a check nobody counted: its capacity, nothing else (the proto documents
/// that only `limit` is filled in then).
fn verdict_only_limit(check: &Resolved) -> Verdict {
    Verdict {
        allowed: true,
        limit: check.policy.limit.capacity(),
        remaining: 0,
        reset_after: Duration::ZERO,
        retry_after: Duration::ZERO,
    }
}

impl Engine {
    /// An engine on `store`; `breaker` only for Redis; `hot_keys` = cache capacity (None: off).
    pub fn new(
        store: Store,
        breaker: Option<Arc<Breaker>>,
        hot_keys: Option<usize>,
        local_max_keys: usize,
    ) -> Self {
        Self {
            store,
            local: EmbeddedStore::new(local_max_keys),
            breaker,
            hot: hot_keys.map(HotKeys::new),
        }
    }

    /// Evaluates `checks` all or nothing.
    pub async fn evaluate(&self, checks: &[Resolved], mode: Mode) -> Result<Outcome> {
        if mode == Mode::Consume
            && let Some(outcome) = self.hot_denial(checks)
        {
            return Ok(outcome);
        }
        if self.breaker.as_ref().is_some_and(|b| b.is_open()) {
            return self.failure_mode(checks, mode, BREAKER_OPEN);
        }
        let counters: Vec<Counter> = checks.iter().map(|c| c.counter.clone()).collect();
        match self.store.evaluate(&counters, mode).await {
            Ok(evaluation) => {
                self.remember_denials(checks, &evaluation);
                Ok(Outcome {
                    allowed: evaluation.allowed,
                    checks: evaluation
                        .verdicts
                        .into_iter()
                        .map(|verdict| CheckOutcome {
                            verdict,
                            source: Source::Store,
                        })
                        .collect(),
                    source: Source::Store,
                })
            }
            // Queued while the breaker opened: it never reached Redis.
            Err(Error::Unavailable(why)) if why == BREAKER_OPEN => {
                self.failure_mode(checks, mode, &why)
            }
            // The pool reported the failure to the breaker.
            Err(Error::Unavailable(why)) => {
                metrics::counter!("sluice_limiter_store_errors_total").increment(1);
                tracing::debug!(error = %why, "store unavailable; answering by failure mode");
                // The reason alone: the answer's status says "store unavailable" once.
                self.failure_mode(checks, mode, &why)
            }
            Err(err) => Err(err),
        }
    }

    /// Deletes the counters; forgets them in the hot-key cache of this instance.
    pub async fn reset(&self, keys: &[String]) -> Result<u32> {
        if let Some(hot) = &self.hot {
            for key in keys {
                hot.forget(key);
            }
        }
        self.store.reset(keys).await
    }

    fn hot_denial(&self, checks: &[Resolved]) -> Option<Outcome> {
        let hot = self.hot.as_ref()?;
        let (denier, retry_after) = checks.iter().enumerate().find_map(|(i, c)| {
            (!c.counter.shadow)
                .then(|| hot.denied_for(&c.counter.key, c.counter.params.cost as u64))
                .flatten()
                .map(|d| (i, d))
        })?;
        let checks = checks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == denier {
                    let capacity = c.policy.limit.capacity();
                    CheckOutcome {
                        verdict: Verdict {
                            allowed: false,
                            limit: capacity,
                            remaining: 0,
                            reset_after: retry_after,
                            retry_after,
                        },
                        source: Source::HotKey,
                    }
                } else {
                    CheckOutcome {
                        verdict: verdict_only_limit(c),
                        source: Source::Skipped,
                    }
                }
            })
            .collect();
        Some(Outcome {
            allowed: false,
            checks,
            source: Source::HotKey,
        })
    }

    fn remember_denials(&self, checks: &[Resolved], evaluation: &Evaluation) {
        let Some(hot) = &self.hot else { return };
        if evaluation.allowed {
            return;
        }
        for (check, verdict) in checks.iter().zip(&evaluation.verdicts) {
            if !verdict.allowed && !check.counter.shadow {
                hot.remember(
                    &check.counter.key,
                    check.counter.params.cost as u64,
                    verdict.retry_after,
                );
            }
        }
    }

    fn failure_mode(&self, checks: &[Resolved], mode: Mode, why: &str) -> Result<Outcome> {
        if mode == Mode::Peek {
            return Err(Error::Unavailable(format!("cannot read limits: {why}")));
        }
        if let Some(closed) = checks
            .iter()
            .find(|c| !c.counter.shadow && c.policy.failure_mode == FailureMode::FailClosed)
        {
            return Err(Error::Unavailable(format!(
                "{why}; policy `{}` is fail-closed",
                closed.policy.name
            )));
        }
        let local: Vec<usize> = (0..checks.len())
            .filter(|&i| checks[i].policy.failure_mode == FailureMode::Local)
            .collect();
        let counters: Vec<Counter> = local.iter().map(|&i| checks[i].counter.clone()).collect();
        let evaluation = self.local.evaluate_now(&counters, mode)?;
        let mut outcomes: Vec<CheckOutcome> = checks
            .iter()
            .map(|c| CheckOutcome {
                verdict: verdict_only_limit(c),
                source: Source::FailureMode,
            })
            .collect();
        for (&i, verdict) in local.iter().zip(evaluation.verdicts) {
            outcomes[i].verdict = verdict;
        }
        Ok(Outcome {
            allowed: evaluation.allowed,
            checks: outcomes,
            source: Source::FailureMode,
        })
    }
}
