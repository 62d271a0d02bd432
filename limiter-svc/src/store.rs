//! Where counters live: Redis (standalone or cluster) or the embedded in-process store. Both
//! take the same [`Counter`]s and answer the same [`Evaluation`]; the conformance suite runs
//! against each.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice::batch::Batcher;
use sluice::error::{Error, Result};
use sluice::pool::RedisPool;
use sluice::script::{PackedNumbers, Script};

use crate::algorithm::{self, Algorithm, Params, State};
use crate::keys;

/// One counter a request touches.
#[derive(Debug, Clone, PartialEq)]
pub struct Counter {
    /// Its key (see [`keys::counter`]).
    pub key: String,
    /// How it counts.
    pub algorithm: Algorithm,
    /// Its numbers and this request's cost.
    pub params: Params,
    /// Report only: a shadow counter never denies and is charged only when it would pass.
    pub shadow: bool,
}

/// Whether an evaluation consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Consume every counter if all pass, none otherwise.
    Consume,
    /// Read only.
    Peek,
}

/// One counter's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The request fits this counter.
    pub allowed: bool,
    /// Capacity.
    pub limit: u64,
    /// Units left after this request (before it, when nothing was consumed).
    pub remaining: u64,
    /// Until the counter is back to full capacity.
    pub reset_after: Duration,
    /// Until this request would pass (zero when allowed).
    pub retry_after: Duration,
}

/// The answer for a whole request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    /// Every non-shadow counter passed (and, in [`Mode::Consume`], all were consumed).
    pub allowed: bool,
    /// Per counter, in request order.
    pub verdicts: Vec<Verdict>,
}

/// The store behind the limiter.
#[derive(Debug)]
pub enum Store {
    /// Redis or Redis Cluster.
    Redis(RedisStore),
    /// In-process: one instance only.
    Embedded(EmbeddedStore),
}

impl Store {
    /// Evaluates `counters` all or nothing.
    pub async fn evaluate(&self, counters: &[Counter], mode: Mode) -> Result<Evaluation> {
        match self {
            Self::Redis(store) => store.evaluate(counters, mode).await,
            Self::Embedded(store) => store.evaluate_now(counters, mode),
        }
    }

    /// Deletes the counters named by `keys`; returns how many existed.
    pub async fn reset(&self, keys: &[String]) -> Result<u32> {
        match self {
            Self::Redis(store) => store.reset(keys).await,
            Self::Embedded(store) => Ok(store.reset(keys)),
        }
    }
}

fn micros(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

/// Counters in Redis, evaluated by `check.lua`.
#[derive(Debug)]
pub struct RedisStore {
    pool: RedisPool,
    check: Arc<Script>,
    refund: Script,
    instance: String,
    sequence: AtomicU64,
    /// Standalone Redis: concurrent requests share check calls. (On a cluster each call's keys
    /// must share a slot, so requests go one by one.)
    batcher: Option<Batcher<Checks, SlotReply>>,
}

/// Most requests in one check call, and check calls in flight at once, of the batcher.
const BATCH_REQUESTS: usize = 64;
const BATCH_CALLS: usize = 4;

/// One request's part of a check call.
#[derive(Debug)]
struct Checks {
    counters: Vec<Counter>,
    mode: Mode,
    /// The request's number at this instance: its nonce is `<instance>.<seq>`.
    seq: u64,
}

#[derive(Debug)]
struct SlotReply {
    all: bool,
    now: i64,
    verdicts: Vec<Verdict>,
}

impl RedisStore {
    /// A store on `pool`; on standalone Redis with `batch` it starts the batcher (needs a
    /// tokio runtime), so concurrent requests share check calls. On a pool guarded by the
    /// circuit breaker ([`RedisPool::guarded`]) a call about to go out while it is open fails
    /// at once, so requests queued behind calls waiting out Redis's timeouts do not each wait
    /// them out in turn.
    pub fn new(pool: RedisPool, batch: bool) -> Self {
        let check = Arc::new(Script::new("limiter.check", algorithm::CHECK_LUA));
        let instance = uuid::Uuid::now_v7().simple().to_string();
        let batcher = (batch && !pool.is_cluster()).then(|| {
            let (pool, check) = (pool.clone(), Arc::clone(&check));
            let instance: Arc<str> = instance.clone().into();
            Batcher::spawn(BATCH_REQUESTS, BATCH_CALLS, move |requests: Vec<Checks>| {
                let (pool, check) = (pool.clone(), Arc::clone(&check));
                let instance = Arc::clone(&instance);
                async move { run_checks(&pool, &check, &instance, &requests).await }
            })
        });
        Self {
            pool,
            check,
            refund: Script::new("limiter.refund", algorithm::REFUND_LUA),
            instance,
            sequence: AtomicU64::new(0),
            batcher,
        }
    }

    async fn evaluate(&self, counters: &[Counter], mode: Mode) -> Result<Evaluation> {
        // Request-unique: the nonce `<instance>.<seq>` names the sliding-log members it adds.
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
        if let Some(batcher) = &self.batcher {
            let reply = batcher
                .submit(Checks {
                    counters: counters.to_vec(),
                    mode,
                    seq,
                })
                .await?;
            return Ok(Evaluation {
                allowed: reply.all,
                verdicts: reply.verdicts,
            });
        }
        if same_slot(counters) {
            let reply = self.run_check(counters, mode, seq).await?;
            return Ok(Evaluation {
                allowed: reply.all,
                verdicts: reply.verdicts,
            });
        }
        // Redis Cluster, checks in several slots: one atomic call per slot, then a refund of
        // the slots that consumed if another slot denied (README: "All or nothing on Redis
        // Cluster").
        let mut groups: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        for (i, counter) in counters.iter().enumerate() {
            groups.entry(keys::slot(&counter.key)).or_default().push(i);
        }
        let groups: Vec<Vec<usize>> = groups.into_values().collect();
        let calls = groups.iter().map(|indices| {
            let group: Vec<Counter> = indices.iter().map(|&i| counters[i].clone()).collect();
            async move { self.run_check(&group, mode, seq).await.map(|r| (group, r)) }
        });
        let replies = futures::future::join_all(calls).await;
        let mut verdicts: Vec<Option<Verdict>> = vec![None; counters.len()];
        let mut all = true;
        let mut consumed = Vec::new();
        let mut first_error = None;
        for (indices, reply) in groups.iter().zip(replies) {
            match reply {
                Ok((group, reply)) => {
                    all &= reply.all;
                    if reply.all && mode == Mode::Consume {
                        consumed.push((indices, group, reply.now));
                    }
                    for (&i, verdict) in indices.iter().zip(reply.verdicts) {
                        verdicts[i] = Some(verdict);
                    }
                }
                Err(err) => {
                    all = false;
                    first_error.get_or_insert(err);
                }
            }
        }
        if !all {
            for (indices, group, now) in consumed {
                self.run_refund(&group, seq, now).await?;
                for (&i, counter) in indices.iter().zip(&group) {
                    if let Some(verdict) = verdicts[i].as_mut() {
                        // Refunded: report what is left without this request.
                        verdict.remaining += counter.params.cost as u64;
                    }
                }
            }
        }
        if let Some(err) = first_error {
            return Err(err);
        }
        let verdicts = verdicts
            .into_iter()
            .map(|v| v.ok_or_else(|| Error::Internal("a slot's reply is missing".into())))
            .collect::<Result<Vec<_>>>()?;
        Ok(Evaluation {
            allowed: all,
            verdicts,
        })
    }

    async fn run_check(&self, counters: &[Counter], mode: Mode, seq: u64) -> Result<SlotReply> {
        let request = Checks {
            counters: counters.to_vec(),
            mode,
            seq,
        };
        run_checks(
            &self.pool,
            &self.check,
            &self.instance,
            std::slice::from_ref(&request),
        )
        .await?
        .pop()
        .unwrap_or_else(|| Err(Error::Internal("limiter.check: no reply".into())))
    }

    async fn run_refund(&self, counters: &[Counter], seq: u64, now: i64) -> Result<()> {
        let mut call = self.refund.call();
        for counter in counters {
            call = call.key(&counter.key);
        }
        call = call.arg(format!("{}.{seq}", self.instance)).arg(now);
        for c in counters {
            call = call
                .arg(c.algorithm as u8)
                .arg(c.params.limit as u64)
                .arg(c.params.window as u64)
                .arg(c.params.burst as u64)
                .arg(c.params.cost as u64);
        }
        let _: i64 = call.invoke(&self.pool).await?;
        Ok(())
    }

    async fn reset(&self, keys: &[String]) -> Result<u32> {
        // One DEL per key: on a cluster the keys may sit in different slots.
        let mut deleted = 0;
        for key in keys {
            let n: u32 = self.pool.query(redis::cmd("DEL").arg(key)).await?;
            deleted += n;
        }
        Ok(deleted)
    }
}

/// A limit as `check.lua` takes it: algorithm, limit, window (µs), burst, shadow.
type LimitArgs = (u8, u64, u64, u64, bool);

/// One `check.lua` call for `requests` of the instance `instance`, each evaluated all or
/// nothing in order.
async fn run_checks(
    pool: &RedisPool,
    check: &Script,
    instance: &str,
    requests: &[Checks],
) -> Result<Vec<Result<SlotReply>>> {
    let mut call = check.call();
    // Each distinct limit travels once; checks name it by its position (from 1).
    let mut limits: Vec<LimitArgs> = Vec::new();
    let mut positions: HashMap<LimitArgs, usize> = HashMap::new();
    let mut per_check = Vec::new();
    for request in requests {
        for c in &request.counters {
            call = call.key(&c.key);
            let limit = (
                c.algorithm as u8,
                c.params.limit as u64,
                c.params.window as u64,
                c.params.burst as u64,
                c.shadow,
            );
            let position = *positions.entry(limit).or_insert_with(|| {
                limits.push(limit);
                limits.len()
            });
            per_check.push((position, c.params.cost as u64));
        }
    }
    // Every number of the call in one MessagePack array (check.lua, ARGV[2]).
    let count = 2
        + 5 * limits.len()
        + requests
            .iter()
            .map(|r| 3 + 2 * r.counters.len())
            .sum::<usize>();
    let packing = |e: String| Error::Internal(format!("limiter.check: {e}"));
    let mut numbers = PackedNumbers::new(count).map_err(packing)?;
    numbers.push(limits.len() as u64);
    for (algorithm, limit, window, burst, shadow) in limits {
        numbers.push(u64::from(algorithm));
        numbers.push(limit);
        numbers.push(window);
        numbers.push(burst);
        numbers.push(u64::from(shadow));
    }
    numbers.push(requests.len() as u64);
    let mut checks = per_check.into_iter();
    for request in requests {
        numbers.push(u64::from(request.mode == Mode::Consume));
        numbers.push(request.seq);
        numbers.push(request.counters.len() as u64);
        for (position, cost) in checks.by_ref().take(request.counters.len()) {
            numbers.push(position as u64);
            numbers.push(cost);
        }
    }
    call = call.arg(instance).arg(numbers.finish().map_err(packing)?);
    let packed: Vec<u8> = call.invoke(pool).await?;
    let reply = sluice::script::unpack_numbers(&packed)
        .map_err(|e| Error::Internal(format!("limiter.check replied {e}")))?;
    let checks: usize = requests.iter().map(|r| r.counters.len()).sum();
    if reply.len() != 1 + requests.len() + 5 * checks {
        return Err(Error::Internal(format!(
            "limiter.check replied {} numbers for {} requests of {checks} checks",
            reply.len(),
            requests.len()
        )));
    }
    let now = reply[0];
    let mut at = 1;
    Ok(requests
        .iter()
        .map(|request| {
            let all = reply[at] == 1;
            let end = at + 1 + 5 * request.counters.len();
            let verdicts = reply[at + 1..end]
                .chunks_exact(5)
                .map(|v| Verdict {
                    allowed: v[0] == 1,
                    limit: u64::try_from(v[1]).unwrap_or(0),
                    remaining: u64::try_from(v[2]).unwrap_or(0),
                    reset_after: micros(v[3]),
                    retry_after: micros(v[4]),
                })
                .collect();
            at = end;
            Ok(SlotReply { all, now, verdicts })
        })
        .collect())
}

fn same_slot(counters: &[Counter]) -> bool {
    let mut slots = counters.iter().map(|c| keys::slot(&c.key));
    match slots.next() {
        Some(first) => slots.all(|s| s == first),
        None => true,
    }
}

struct Entry {
    state: State,
    /// µs on the store's clock after which the entry is gone.
    expires: f64,
}

/// The embedded store's counters, with what bounds them.
#[derive(Default)]
struct Entries {
    map: HashMap<String, Entry>,
    /// Requests held in sliding-log states, summed (each is 16 bytes).
    logged: usize,
    /// When expired entries last went in a full sweep (µs on the store's clock).
    swept: f64,
}

impl Entries {
    /// Drops expired entries.
    fn sweep(&mut self, now: f64) {
        let mut freed = 0;
        self.map.retain(|_, e| {
            let live = e.expires > now;
            if !live {
                freed += logged_in(&e.state);
            }
            live
        });
        self.logged = self.logged.saturating_sub(freed);
        self.swept = now;
    }
}

/// Requests a state holds one by one (the sliding log's; other states are a few numbers).
fn logged_in(state: &State) -> usize {
    match state {
        State::Log(log) => log.len(),
        _ => 0,
    }
}

/// How often a full store sweeps for expired entries at most: in between it refuses new
/// counters without walking them all on every call.
const FULL_SWEEP_EVERY_US: f64 = 100_000.0;

/// Requests the sliding logs of the embedded store may hold, per counter it may hold.
pub const LOGGED_PER_KEY: usize = 16;

/// Counters in this process, with the same semantics as Redis.
pub struct EmbeddedStore {
    entries: Mutex<Entries>,
    epoch_us: f64,
    started: tokio::time::Instant,
    max_keys: usize,
    evaluations: AtomicU64,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// A store holding at most `max_keys` live counters, whose sliding logs hold at most
    /// [`LOGGED_PER_KEY`] × `max_keys` requests in all.
    pub fn new(max_keys: usize) -> Self {
        let epoch_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_micros() as f64);
        Self {
            entries: Mutex::new(Entries::default()),
            epoch_us,
            started: tokio::time::Instant::now(),
            max_keys,
            evaluations: AtomicU64::new(0),
        }
    }

    /// Wall-clock µs, advanced by a monotonic clock so it never steps back.
    fn now(&self) -> f64 {
        (self.epoch_us + self.started.elapsed().as_micros() as f64).floor()
    }

    /// Evaluates `counters` all or nothing, synchronously.
    pub fn evaluate_now(&self, counters: &[Counter], mode: Mode) -> Result<Evaluation> {
        let now = self.now();
        let mut entries = self
            .entries
            .lock()
            .map_err(|_| Error::Internal("embedded store lock poisoned".into()))?;
        let max_logged = self.max_keys.saturating_mul(LOGGED_PER_KEY);
        // Expired entries go in bulk now and then, and before refusing a new counter or a
        // logged request, unless a sweep ran just now: a full store must not walk every
        // entry on every call.
        let n = self.evaluations.fetch_add(1, Ordering::Relaxed);
        let full = entries.map.len() >= self.max_keys || entries.logged >= max_logged;
        if n.is_multiple_of(4096) || (full && now - entries.swept >= FULL_SWEEP_EVERY_US) {
            entries.sweep(now);
        }
        let peeked: Vec<_> = counters
            .iter()
            .map(|c| {
                let state = entries
                    .map
                    .get(&c.key)
                    .filter(|e| e.expires > now)
                    .map(|e| &e.state);
                algorithm::peek(c.algorithm, state, now, &c.params)
            })
            .collect();
        let all = peeked
            .iter()
            .zip(counters)
            .all(|(p, c)| p.allowed || c.shadow);
        if mode == Mode::Consume && all {
            let new_keys = counters
                .iter()
                .filter(|c| !entries.map.contains_key(&c.key))
                .count();
            if entries.map.len() + new_keys > self.max_keys {
                return Err(Error::ResourceExhausted(format!(
                    "the embedded store holds its maximum of {} counters; use Redis for more",
                    self.max_keys
                )));
            }
            let new_logged = counters
                .iter()
                .filter(|c| c.algorithm == Algorithm::SlidingWindowLog)
                .count();
            if new_logged > 0 && entries.logged + new_logged > max_logged {
                return Err(Error::ResourceExhausted(format!(
                    "the embedded store's sliding logs hold their maximum of {max_logged} \
                     requests; use Redis, or an algorithm that keeps no log"
                )));
            }
        }
        let mut verdicts = Vec::with_capacity(counters.len());
        for (c, p) in counters.iter().zip(peeked) {
            let mut remaining = p.remaining;
            let mut reset = p.reset;
            if mode == Mode::Consume && all && p.allowed {
                let previous = entries.map.remove(&c.key).and_then(|e| {
                    entries.logged = entries.logged.saturating_sub(logged_in(&e.state));
                    (e.expires > now).then_some(e.state)
                });
                let (state, new_reset, ttl) =
                    algorithm::commit(c.algorithm, previous, now, &c.params);
                entries.logged += logged_in(&state);
                entries.map.insert(
                    c.key.clone(),
                    Entry {
                        state,
                        expires: now + ttl,
                    },
                );
                remaining = (remaining - c.params.cost).max(0.0);
                reset = new_reset;
            }
            verdicts.push(Verdict {
                allowed: p.allowed,
                limit: p.limit as u64,
                remaining: remaining as u64,
                reset_after: Duration::from_micros(reset.max(0.0).ceil() as u64),
                retry_after: Duration::from_micros(p.retry.max(0.0).ceil() as u64),
            });
        }
        Ok(Evaluation {
            allowed: all,
            verdicts,
        })
    }

    fn reset(&self, keys: &[String]) -> u32 {
        let now = self.now();
        let Ok(mut entries) = self.entries.lock() else {
            return 0;
        };
        let mut n = 0;
        for key in keys {
            if let Some(e) = entries.map.remove(key) {
                entries.logged = entries.logged.saturating_sub(logged_in(&e.state));
                n += u32::from(e.expires > now);
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(key: &str, algorithm: Algorithm, window_us: f64) -> Counter {
        Counter {
            key: key.to_owned(),
            algorithm,
            params: Params {
                limit: 1000.0,
                window: window_us,
                burst: 0.0,
                cost: 1.0,
            },
            shadow: false,
        }
    }

    fn consume(store: &EmbeddedStore, c: &Counter) -> Result<bool> {
        store
            .evaluate_now(std::slice::from_ref(c), Mode::Consume)
            .map(|e| e.allowed)
    }

    /// The sliding logs hold at most `LOGGED_PER_KEY` requests per counter the store may
    /// hold: past it a logged request is refused (RESOURCE_EXHAUSTED), other algorithms go
    /// on, and a reset gives the room back.
    #[test]
    fn sliding_logs_are_bounded_in_requests_held() -> Result<()> {
        let store = EmbeddedStore::new(2);
        let log = counter("log", Algorithm::SlidingWindowLog, 3.6e9);
        for _ in 0..2 * LOGGED_PER_KEY {
            assert!(consume(&store, &log)?);
        }
        let refused = consume(&store, &log).err();
        assert!(
            matches!(&refused, Some(Error::ResourceExhausted(m)) if m.contains("sliding logs")),
            "{refused:?}"
        );
        assert!(consume(&store, &counter("gcra", Algorithm::Gcra, 3.6e9))?);
        store.reset(&["log".to_owned()]);
        assert!(consume(&store, &log)?);
        Ok(())
    }

    /// A full store takes new counters again once its expired entries have gone in a later
    /// sweep (while full, it sweeps at most every 100 ms, not on every call).
    #[test]
    fn a_full_store_frees_expired_counters() -> Result<()> {
        let store = EmbeddedStore::new(1);
        assert!(consume(
            &store,
            &counter("short", Algorithm::FixedWindow, 1_000.0)
        )?);
        // Until the fixed window (1 ms) has passed and a sweep has run, there is no room.
        let other = counter("other", Algorithm::FixedWindow, 3.6e9);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match consume(&store, &other) {
                Ok(allowed) => {
                    assert!(allowed);
                    break;
                }
                Err(Error::ResourceExhausted(_)) if tokio::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
}
