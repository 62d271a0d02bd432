//! The five rate-limit algorithms, each twice with the same semantics: a `.lua` file run by
//! Redis and a `.rs` file run by the embedded store. The conformance suite holds them equal.
//!
//! Every algorithm answers a *peek* (would `cost` units pass now? how many remain? when does
//! the counter reset? when would this request pass?) and a *commit* (consume them). A request
//! with several checks peeks all, then commits all or none (see `check.lua`).
//!
//! Time is in microseconds. Arithmetic is in `f64` on both sides, as Lua's numbers are doubles,
//! so both sides round the same way.

pub mod fixed_window;
pub mod gcra;
pub mod sliding_counter;
pub mod sliding_log;
pub mod token_bucket;

use std::collections::VecDeque;

use sluice::proto::sluice::limiter::v1 as pb;

/// A rate-limit algorithm. The discriminants are the codes the Lua scripts dispatch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Exact; memory grows with the limit.
    SlidingWindowLog = 1,
    /// Approximate; O(1) memory.
    SlidingWindowCounter = 2,
    /// Exact per window; up to twice the limit across a window boundary.
    FixedWindow = 3,
    /// Burst up to `burst`, refilled at `limit` per `window`.
    TokenBucket = 4,
    /// Same admissions as the token bucket, one number per key.
    Gcra = 5,
}

impl Algorithm {
    /// Every algorithm, for tests and docs.
    pub const ALL: [Algorithm; 5] = [
        Self::SlidingWindowLog,
        Self::SlidingWindowCounter,
        Self::FixedWindow,
        Self::TokenBucket,
        Self::Gcra,
    ];

    /// From the wire; `UNSPECIFIED` means the default, the sliding window log.
    pub fn from_proto(value: i32) -> Option<Self> {
        match pb::Algorithm::try_from(value).ok()? {
            pb::Algorithm::Unspecified | pb::Algorithm::SlidingWindowLog => {
                Some(Self::SlidingWindowLog)
            }
            pb::Algorithm::SlidingWindowCounter => Some(Self::SlidingWindowCounter),
            pb::Algorithm::FixedWindow => Some(Self::FixedWindow),
            pb::Algorithm::TokenBucket => Some(Self::TokenBucket),
            pb::Algorithm::Gcra => Some(Self::Gcra),
        }
    }

    /// To the wire.
    pub fn to_proto(self) -> pb::Algorithm {
        match self {
            Self::SlidingWindowLog => pb::Algorithm::SlidingWindowLog,
            Self::SlidingWindowCounter => pb::Algorithm::SlidingWindowCounter,
            Self::FixedWindow => pb::Algorithm::FixedWindow,
            Self::TokenBucket => pb::Algorithm::TokenBucket,
            Self::Gcra => pb::Algorithm::Gcra,
        }
    }

    /// Short name used in keys and metrics.
    pub fn short(self) -> &'static str {
        match self {
            Self::SlidingWindowLog => "log",
            Self::SlidingWindowCounter => "swc",
            Self::FixedWindow => "fw",
            Self::TokenBucket => "tb",
            Self::Gcra => "gcra",
        }
    }

    /// True for the algorithms that take a `burst`.
    pub fn has_burst(self) -> bool {
        matches!(self, Self::TokenBucket | Self::Gcra)
    }
}

/// The numbers one check runs with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Units per window (refill per window for the bucket algorithms).
    pub limit: f64,
    /// Window in µs.
    pub window: f64,
    /// Bucket capacity (0 = `limit`); unused by the window algorithms.
    pub burst: f64,
    /// Units this request takes.
    pub cost: f64,
}

/// What a peek found, plus what a commit needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Peeked {
    /// The units fit.
    pub allowed: bool,
    /// Capacity reported to the client.
    pub limit: f64,
    /// Units left before this request.
    pub remaining: f64,
    /// µs until the counter is back to full capacity.
    pub reset: f64,
    /// µs until this request would pass (0 when allowed).
    pub retry: f64,
}

/// Stored state of one counter in the embedded store.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// (admission time µs, units) per admitted request, oldest first.
    Log(VecDeque<(f64, f64)>),
    /// Window index and the current and previous windows' counts.
    Counter { w: f64, cur: f64, prev: f64 },
    /// Window index and its count.
    Fixed { w: f64, n: f64 },
    /// Tokens left at `ts`.
    Bucket { tokens: f64, ts: f64 },
    /// Theoretical arrival time.
    Gcra { tat: f64 },
}

/// Peek with the embedded store's state.
pub fn peek(algorithm: Algorithm, state: Option<&State>, now: f64, p: &Params) -> Peeked {
    match algorithm {
        Algorithm::SlidingWindowLog => sliding_log::peek(state, now, p),
        Algorithm::SlidingWindowCounter => sliding_counter::peek(state, now, p),
        Algorithm::FixedWindow => fixed_window::peek(state, now, p),
        Algorithm::TokenBucket => token_bucket::peek(state, now, p),
        Algorithm::Gcra => gcra::peek(state, now, p),
    }
}

/// Commit a peeked request: returns the new state, the reset after it (µs) and how long the
/// state must be kept (µs).
pub fn commit(
    algorithm: Algorithm,
    state: Option<State>,
    now: f64,
    p: &Params,
) -> (State, f64, f64) {
    match algorithm {
        Algorithm::SlidingWindowLog => sliding_log::commit(state, now, p),
        Algorithm::SlidingWindowCounter => sliding_counter::commit(state, now, p),
        Algorithm::FixedWindow => fixed_window::commit(state, now, p),
        Algorithm::TokenBucket => token_bucket::commit(state, now, p),
        Algorithm::Gcra => gcra::commit(state, now, p),
    }
}

/// The scripts Redis runs: every algorithm's functions, then the driver.
pub const CHECK_LUA: &str = concat!(
    include_str!("prelude.lua"),
    include_str!("sliding_log.lua"),
    include_str!("sliding_counter.lua"),
    include_str!("fixed_window.lua"),
    include_str!("token_bucket.lua"),
    include_str!("gcra.lua"),
    include_str!("check.lua"),
);

/// Compensation for a cluster request whose slots disagreed.
pub const REFUND_LUA: &str = concat!(
    include_str!("prelude.lua"),
    include_str!("sliding_log.lua"),
    include_str!("sliding_counter.lua"),
    include_str!("fixed_window.lua"),
    include_str!("token_bucket.lua"),
    include_str!("gcra.lua"),
    include_str!("refund.lua"),
);

#[cfg(test)]
mod tests {
    use sluice_testkit::redis_server::RedisServer;

    /// The numbers the scripts hand Redis are written by the prelude's `int` and `decimal`:
    /// what Redis stores must read back as the number the script held, or a GCRA key would
    /// drift with every request.
    #[tokio::test]
    async fn prelude_writes_numbers_redis_reads_back_unchanged() -> anyhow::Result<()> {
        let redis = RedisServer::start().await?;
        let mut conn = redis.client().await?;
        let probe = concat!(
            include_str!("prelude.lua"),
            r#"
local out = {}
local now = 1764150000123456
for i = 0, 999 do
  -- Arrival times as GCRA makes them: now plus a run of fractional emission intervals.
  local tat = now + i * 3.6 + (i % 7) * 0.25
  out[#out + 1] = tonumber(decimal(tat)) == tat and 1 or 0
end
out[#out + 1] = decimal(0.5)
out[#out + 1] = decimal(2.9999999)
out[#out + 1] = int(now)
out[#out + 1] = int(-42)
return out
"#
        );
        let reply: Vec<redis::Value> = redis::cmd("EVAL")
            .arg(probe)
            .arg(0)
            .query_async(&mut conn)
            .await?;
        let (exact, shown) = reply.split_at(1000);
        let inexact = exact
            .iter()
            .filter(|v| !matches!(v, redis::Value::Int(1)))
            .count();
        assert_eq!(inexact, 0, "arrival times that did not read back exactly");
        let shown: Vec<String> = shown
            .iter()
            .map(|v| match v {
                redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            shown,
            ["0.500000", "3.000000", "1764150000123456", "-42"],
            "to the millionth, rounded; whole numbers without a fraction"
        );
        Ok(())
    }
}
