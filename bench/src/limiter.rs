//! The `check-limit` workload: `sluice.limiter.v1.Limiter/CheckLimit` with an inline limit, or
//! with the named policies of the service's limits file (`--policy`).

use std::time::Duration;

use sluice::config::parse_duration;
use sluice::proto::sluice::limiter::v1::limiter_client::LimiterClient;
use sluice::proto::sluice::limiter::v1::{Algorithm, Check, CheckLimitRequest, InlineLimit, check};

use crate::conn::Conn;
use crate::driver::{Outcome, Verdict, Workload};

/// The scopes of a request's checks, in order: the well-known ones, then custom ones so that
/// up to 16 checks (the contract's maximum) each get their own counter.
static SCOPES: [&str; 16] = [
    "user", "ip", "project", "endpoint", "api_key", "bench5", "bench6", "bench7", "bench8",
    "bench9", "bench10", "bench11", "bench12", "bench13", "bench14", "bench15",
];

/// Options of `check-limit`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckLimitArgs {
    /// Distinct subjects: request i is about subject `bench-<i % N>`.
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub subjects: u64,

    /// Check against this named policy of the service's limits file instead of an inline
    /// limit. Repeat it to spread requests over several policies in turn (request i uses the
    /// (i mod n)-th), e.g. one per failure mode to watch Redis go away and come back.
    #[arg(long = "policy", value_name = "NAME", conflicts_with_all = ["algorithm", "limit", "window"])]
    pub policies: Vec<String>,

    /// Algorithm of the inline limit.
    #[arg(long, value_enum, default_value_t = AlgorithmArg::Gcra)]
    pub algorithm: AlgorithmArg,

    /// Units per window of the inline limit. The default is so high that almost nothing is
    /// denied; lower it to measure denials (and the hot-key cache).
    #[arg(long, value_name = "UNITS", default_value_t = 1_000_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: u64,

    /// Window of the inline limit (refill period for token_bucket and gcra).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub window: Duration,

    /// Checks per request, all on the same subject, with scopes user, ip, project, endpoint,
    /// api_key, then custom ones.
    #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub checks: u8,

    /// Units each request spends against every check.
    #[arg(long, value_name = "UNITS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub cost: u64,
}

/// `--algorithm`: the contract's algorithms under their snake_case names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AlgorithmArg {
    #[value(name = "sliding_window_log")]
    SlidingWindowLog,
    #[value(name = "sliding_window_counter")]
    SlidingWindowCounter,
    #[value(name = "fixed_window")]
    FixedWindow,
    #[value(name = "token_bucket")]
    TokenBucket,
    #[value(name = "gcra")]
    Gcra,
}

impl From<AlgorithmArg> for Algorithm {
    fn from(algorithm: AlgorithmArg) -> Self {
        match algorithm {
            AlgorithmArg::SlidingWindowLog => Algorithm::SlidingWindowLog,
            AlgorithmArg::SlidingWindowCounter => Algorithm::SlidingWindowCounter,
            AlgorithmArg::FixedWindow => Algorithm::FixedWindow,
            AlgorithmArg::TokenBucket => Algorithm::TokenBucket,
            AlgorithmArg::Gcra => Algorithm::Gcra,
        }
    }
}

/// Builds and sends CheckLimit requests.
#[derive(Debug)]
pub struct CheckLimit {
    subjects: u64,
    scopes: &'static [&'static str],
    /// What each request checks against, taken in turn: the one inline limit, or the
    /// `--policy` names.
    limits: Vec<check::Limit>,
    cost: u64,
}

impl CheckLimit {
    pub fn new(args: &CheckLimitArgs) -> anyhow::Result<Self> {
        // The service would refuse these with INVALID_ARGUMENT on every call; say so once.
        anyhow::ensure!(
            args.window >= Duration::from_millis(1),
            "--window must be at least 1ms"
        );
        anyhow::ensure!(
            args.cost <= args.limit,
            "--cost ({}) above --limit ({}) could never pass",
            args.cost,
            args.limit
        );
        let window = prost_types::Duration::try_from(args.window)
            .map_err(|e| anyhow::anyhow!("--window: {e}"))?;
        anyhow::ensure!(
            args.policies.len() <= 16,
            "--policy is given {} times; at most 16 are taken in turn",
            args.policies.len()
        );
        let limits = if args.policies.is_empty() {
            vec![check::Limit::Inline(InlineLimit {
                algorithm: Algorithm::from(args.algorithm) as i32,
                limit: args.limit,
                window: Some(window),
                burst: 0,
            })]
        } else {
            args.policies
                .iter()
                .map(|name| check::Limit::Policy(name.clone()))
                .collect()
        };
        Ok(Self {
            subjects: args.subjects,
            scopes: &SCOPES[..usize::from(args.checks)],
            limits,
            cost: args.cost,
        })
    }

    fn request(&self, seq: u64) -> CheckLimitRequest {
        let subject = format!("bench-{}", seq % self.subjects);
        // Never empty: `new` puts in the inline limit or at least one policy.
        let limit = &self.limits[(seq % self.limits.len() as u64) as usize];
        CheckLimitRequest {
            checks: self
                .scopes
                .iter()
                .map(|scope| Check {
                    scope: (*scope).to_owned(),
                    subject: subject.clone(),
                    limit: Some(limit.clone()),
                })
                .collect(),
            cost: self.cost,
            request_id: String::new(),
        }
    }
}

impl Workload for CheckLimit {
    const NAME: &'static str = "check-limit";

    fn call(
        &self,
        conn: Conn,
        seq: u64,
    ) -> impl Future<Output = Result<Outcome, tonic::Status>> + Send {
        // Built before the future so that it borrows nothing from `self`.
        let request = self.request(seq);
        async move {
            let response = LimiterClient::new(conn).check_limit(request).await?;
            Ok(Outcome::from(if response.get_ref().allowed {
                Verdict::Allowed
            } else {
                Verdict::Denied
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(checks: u8) -> CheckLimitArgs {
        CheckLimitArgs {
            subjects: 3,
            algorithm: AlgorithmArg::TokenBucket,
            limit: 100,
            window: Duration::from_millis(1500),
            checks,
            cost: 2,
            policies: Vec::new(),
        }
    }

    #[test]
    fn requests_cycle_subjects_and_carry_one_check_per_scope() -> anyhow::Result<()> {
        let workload = CheckLimit::new(&args(3))?;
        let request = workload.request(4);
        assert_eq!(request.cost, 2);
        let scopes: Vec<_> = request.checks.iter().map(|c| c.scope.as_str()).collect();
        assert_eq!(scopes, ["user", "ip", "project"]);
        assert!(request.checks.iter().all(|c| c.subject == "bench-1"));
        let Some(check::Limit::Inline(inline)) = &request.checks[0].limit else {
            anyhow::bail!("expected an inline limit");
        };
        assert_eq!(inline.algorithm, Algorithm::TokenBucket as i32);
        assert_eq!(inline.limit, 100);
        assert_eq!(
            inline.window,
            Some(prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000
            })
        );
        Ok(())
    }

    #[test]
    fn policies_are_taken_in_turn() -> anyhow::Result<()> {
        let workload = CheckLimit::new(&CheckLimitArgs {
            policies: vec!["a".to_owned(), "b".to_owned()],
            ..args(2)
        })?;
        for (seq, expected) in [(0, "a"), (1, "b"), (2, "a"), (5, "b")] {
            let request = workload.request(seq);
            for check in &request.checks {
                assert_eq!(
                    check.limit,
                    Some(check::Limit::Policy(expected.to_owned())),
                    "request {seq}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn sixteen_checks_have_distinct_scopes() -> anyhow::Result<()> {
        let request = CheckLimit::new(&args(16))?.request(0);
        let mut scopes: Vec<_> = request.checks.iter().map(|c| c.scope.clone()).collect();
        scopes.sort();
        scopes.dedup();
        assert_eq!(scopes.len(), 16);
        Ok(())
    }
}
