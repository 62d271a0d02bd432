//! The queue in Redis: one typed wrapper per script in `lua/`, each owning its argument order
//! and checking its reply's shape.

use std::collections::HashMap;
use std::time::Duration;

use sluice::error::{Error, Result};
use sluice::pool::RedisPool;
use sluice::script::{Call, PackedNumbers, Script};

use crate::keys;
use crate::model::Record;
use crate::queues::AutoRedrive;

macro_rules! script {
    ($name:literal, $file:literal) => {
        Script::new(
            concat!("queue.", $name),
            concat!(include_str!("lua/common.lua"), include_str!($file)),
        )
    };
}

/// A stored task with its payload.
pub type Leased = (Record, Vec<u8>);
/// One completion of a batch: task id, lease token, result.
pub type Completion<'a> = (&'a str, &'a str, &'a [u8]);
/// How long finished tasks and dead letters are kept, for a reaper pass that applies it.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Succeeded and cancelled tasks (and idempotency keys, which expire on their own clock).
    pub finished: Duration,
    /// Dead letters.
    pub dead: Duration,
}
/// One lease of a batch: task id, lease token.
pub type Lease<'a> = (&'a str, &'a str);
/// An extended lease: its deadline (ms) and whether the task's cancellation was requested.
pub type Extended = (f64, bool);
/// A stored task with its payload and result.
pub type Full = (Record, Vec<u8>, Vec<u8>);

/// A task to store.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// Its initial record.
    pub record: Record,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Not before this time (ms since the epoch), or 0.
    pub not_before_ms: u64,
    /// After this delay (ms), or 0.
    pub delay_ms: u64,
}

/// Payloads up to this size live in the task's record (field `pl`): one hash entry per task
/// instead of two (less memory, one insert less per enqueue and one read less per lease).
/// Larger ones stay beside it in the queue's payloads hash, so that a record stays cheap to
/// decode and rewrite on every state change.
const INLINE_PAYLOAD: usize = 1024;

impl NewTask {
    /// Whether the payload is kept beside the record, in the queue's payloads hash, rather
    /// than inside it (see [`INLINE_PAYLOAD`]).
    fn payload_beside(&self) -> bool {
        self.payload.len() > INLINE_PAYLOAD
    }
}

/// A new task's record as `enqueue.lua` takes it: MessagePack, with the fields the service
/// sets and the names `Record` gives them, and a payload of up to [`INLINE_PAYLOAD`] bytes.
/// The script appends the fields only it knows (enqueued at, attempts, state, scheduled for)
/// without decoding it; the id is the hash field and is not stored.
#[derive(serde::Serialize)]
struct NewRecord<'a> {
    p: u8,
    #[serde(skip_serializing_if = "str::is_empty")]
    ct: &'a str,
    max: u32,
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    hd: &'a HashMap<String, String>,
    to: u64,
    #[serde(skip_serializing_if = "<[u64]>::is_empty")]
    dly: &'a [u64],
    #[serde(skip_serializing_if = "Option::is_none")]
    rp: Option<&'a crate::model::RetryPolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idem: Option<&'a str>,
}

impl<'a> NewRecord<'a> {
    fn of(r: &'a Record) -> Self {
        Self {
            p: r.p,
            ct: &r.ct,
            max: r.max,
            hd: &r.hd,
            to: r.to,
            dly: &r.dly,
            rp: r.rp.as_ref(),
            idem: r.idem.as_deref(),
        }
    }

    /// A MessagePack map of at most 9 entries (a fixmap, as the script requires), the last
    /// one `pl` when `payload` is given: a string, as Lua's `cmsgpack.pack` writes one, so
    /// that records read the same whoever wrote them.
    fn encode(&self, payload: Option<&[u8]>) -> Result<PackedRecord> {
        // Room for a record without headers, so that the buffer does not grow while written.
        let mut packed = Vec::with_capacity(128 + payload.map_or(0, <[u8]>::len));
        rmp_serde::encode::write_named(&mut packed, self)
            .map_err(|e| Error::Internal(format!("task record: {e}")))?;
        let entries = match packed.first() {
            Some(&header @ 0x80..=0x8f) => header & 0x0f,
            _ => return Err(Error::Internal("task record: not a small map".into())),
        };
        let entries = match payload {
            None => entries,
            Some(_) if entries == 15 => {
                return Err(Error::Internal(
                    "task record: no room to inline the payload".into(),
                ));
            }
            Some(payload) => {
                let len = u32::try_from(payload.len()).map_err(|_| {
                    Error::Internal("task record: payload too long to inline".into())
                })?;
                // Writing into a Vec cannot fail.
                let _ = rmp::encode::write_str(&mut packed, "pl");
                let _ = rmp::encode::write_str_len(&mut packed, len);
                packed.extend_from_slice(payload);
                entries + 1
            }
        };
        Ok(PackedRecord { packed, entries })
    }
}

/// A new record as MessagePack. `packed` begins with the fixmap header the encoder wrote for
/// the entries before the payload; `entries` counts them all.
struct PackedRecord {
    packed: Vec<u8>,
    entries: u8,
}

impl PackedRecord {
    /// The map's entries, without its header.
    fn entries_bytes(&self) -> &[u8] {
        self.packed.get(1..).unwrap_or_default()
    }

    /// The whole map, header included.
    #[cfg(test)]
    fn map(&self) -> Vec<u8> {
        let mut map = Vec::with_capacity(self.packed.len());
        map.push(0x80 | self.entries);
        map.extend_from_slice(self.entries_bytes());
        map
    }
}

/// What Enqueue did for one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    /// The task's id (the first task's, for a duplicate).
    pub id: String,
    /// The idempotency key matched an existing task.
    pub duplicate: bool,
    /// Its state.
    pub state: String,
}

/// What Fail did.
#[derive(Debug, Clone, PartialEq)]
pub enum FailOutcome {
    /// Retried at (ms).
    Retry { at: f64, attempt: u32 },
    /// Dead-lettered.
    Dead { attempt: u32 },
    /// Ended cancelled (cancel was requested while leased).
    Cancelled { attempt: u32 },
}

/// What a dead-letter operation does with what it selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadOp {
    /// Delete them.
    Purge,
    /// Make them ready again, as many as fit `max_size` (0 = unbounded).
    Redrive { max_size: u64 },
}

/// What one redrive or purge call did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadPass {
    /// Dead letters moved or deleted.
    pub count: u64,
    /// More may match: call again with `cursor`.
    pub more: bool,
    /// Where to go on from (`<score> <id>` of the last dead letter looked at), or empty.
    pub cursor: String,
}

/// Dead letters one redrive or purge call looks at, at most.
pub const DEAD_SCAN: usize = 10_000;

/// RESOURCE_EXHAUSTED for a redrive into a full queue.
pub fn no_room(queue: &str, max_size: u64) -> Error {
    Error::ResourceExhausted(format!(
        "queue `{queue}` is at its max_size ({max_size}): no room for redriven tasks; \
         retry once it has drained, or raise max_size"
    ))
}

/// The outcome of a redrive, purge or auto-redrive script call.
fn dead_outcome(r: &[redis::Value], queue: &str, op: &str) -> Result<DeadPass> {
    let n = number(r.first(), op)? as i64;
    if n == -1 {
        return Err(no_room(queue, number(r.get(1), op)? as u64));
    }
    Ok(DeadPass {
        count: u64::try_from(n).unwrap_or(0),
        more: number(r.get(1), op)? == 1.0,
        cursor: match (r.get(2), r.get(3)) {
            (Some(_), Some(_)) => {
                let (score, id) = (text(r.get(2), op)?, text(r.get(3), op)?);
                if score.is_empty() {
                    String::new()
                } else {
                    format!("{score} {id}")
                }
            }
            _ => String::new(),
        },
    })
}

/// Queue depth and rates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Ready tasks per stored priority (0 critical … 4 background).
    pub ready: [u64; 5],
    /// Scheduled (delayed or waiting for a retry).
    pub scheduled: u64,
    /// Leased.
    pub leased: u64,
    /// Dead letters.
    pub dead: u64,
    /// Finished tasks still retained (succeeded or cancelled).
    pub done: u64,
    /// Of those, the cancelled ones.
    pub cancelled: u64,
    /// Paused.
    pub paused: bool,
    /// Enqueued, completed, failed during the previous minute.
    pub last_minute: [u64; 3],
}

/// Which dead letters an operation applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadSelector {
    /// One task.
    Id(String),
    /// Every dead letter.
    All,
    /// By the category of the last failure ("" = any) and dead before (ms, 0 = any).
    Filter {
        category: String,
        dead_before_ms: u64,
    },
}

/// The queue store on Redis.
#[derive(Debug)]
pub struct RedisQueue {
    pool: RedisPool,
    enqueue: Script,
    dequeue: Script,
    complete: Script,
    fail: Script,
    extend: Script,
    reap: Script,
    get: Script,
    cancel: Script,
    stats: Script,
    pause: Script,
    dead: Script,
    head: Script,
    release: Script,
    retire: Script,
    registry: Script,
}

/// A queue in the registry the reaper walks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// Its project.
    pub project: String,
    /// Its name.
    pub queue: String,
    /// When an instance last registered it (ms since the epoch; the embedded store: when it
    /// last took an enqueue, 0 for a queue only read).
    pub at_ms: u64,
    /// Listed by an earlier version's registry, as seen on a migrating pass: not to retire.
    pub legacy: bool,
}

/// Registry scripts (one key, the registry; Redis's clock). `register`: adds or refreshes
/// member ARGV[1] as registered now. `unregister`: removes it if it was last registered
/// more than ARGV[2] ms ago; whether it did. Both return Redis's time too (ms).
const REGISTRY_SCRIPT: &str = r"local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] == 'register' then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
  return { 1, now }
end
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) < now - tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return { 1, now }
end
return { 0, now }
";

fn status_error(reply: &[redis::Value], what: &str) -> Error {
    let state = reply
        .get(1)
        .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
        .unwrap_or_default();
    match reply
        .first()
        .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
        .as_deref()
    {
        Some("nf") => Error::NotFound(format!("no such task in this project and queue ({what})")),
        Some("stale") => Error::FailedPrecondition(format!(
            "the lease token is not the task's live lease (the task is {state}; its lease expired, \
             was taken over, or it finished): {what} changed nothing"
        )),
        other => Error::Internal(format!("{what}: unexpected reply {other:?}")),
    }
}

/// The reply of a script that judges each task of a batch on its own: `width` entries per
/// task, the first `ok` (the rest read by `accepted`) or why the task was refused (see
/// [`status_error`]; `rpc` names the call in that message).
fn judged<T>(
    reply: &[redis::Value],
    tasks: usize,
    width: usize,
    script: &str,
    rpc: &str,
    accepted: impl Fn(&[redis::Value]) -> Result<T>,
) -> Result<Vec<Result<T>>> {
    if reply.len() != tasks * width {
        return Err(Error::Internal(format!(
            "{script}: {} reply entries for {tasks} tasks",
            reply.len()
        )));
    }
    Ok(reply
        .chunks(width)
        .map(|entry| match text(entry.first(), script)?.as_str() {
            "ok" => accepted(entry),
            _ => Err(status_error(entry, rpc)),
        })
        .collect())
}

fn text(value: Option<&redis::Value>, what: &str) -> Result<String> {
    value
        .cloned()
        .map(redis::from_redis_value::<String>)
        .transpose()
        .map_err(|e| Error::Internal(format!("{what}: {e}")))?
        .ok_or_else(|| Error::Internal(format!("{what}: short reply")))
}

fn bytes(value: Option<&redis::Value>, what: &str) -> Result<Vec<u8>> {
    value
        .cloned()
        .map(redis::from_redis_value::<Vec<u8>>)
        .transpose()
        .map_err(|e| Error::Internal(format!("{what}: {e}")))?
        .ok_or_else(|| Error::Internal(format!("{what}: short reply")))
}

fn number(value: Option<&redis::Value>, what: &str) -> Result<f64> {
    value
        .cloned()
        .map(redis::from_redis_value::<f64>)
        .transpose()
        .map_err(|e| Error::Internal(format!("{what}: {e}")))?
        .ok_or_else(|| Error::Internal(format!("{what}: short reply")))
}

fn record(json: &str) -> Result<Record> {
    serde_json::from_str(json).map_err(|e| Error::Internal(format!("stored task record: {e}")))
}

/// A record as stored (MessagePack, without its id), for task `id`.
fn packed_record(id: String, packed: &[u8]) -> Result<Record> {
    let mut record: Record = rmp_serde::from_slice(packed)
        .map_err(|e| Error::Internal(format!("stored task record {id}: {e}")))?;
    record.id = id;
    Ok(record)
}

impl RedisQueue {
    /// A queue store on `pool`.
    pub fn new(pool: RedisPool) -> Self {
        Self {
            pool,
            enqueue: script!("enqueue", "lua/enqueue.lua"),
            dequeue: script!("dequeue", "lua/dequeue.lua"),
            complete: script!("complete", "lua/complete.lua"),
            fail: script!("fail", "lua/fail.lua"),
            extend: script!("extend", "lua/extend.lua"),
            reap: script!("reap", "lua/reap.lua"),
            get: script!("get", "lua/get.lua"),
            cancel: script!("cancel", "lua/cancel.lua"),
            stats: script!("stats", "lua/stats.lua"),
            pause: script!("pause", "lua/pause.lua"),
            dead: script!("dead", "lua/dead.lua"),
            head: script!("head", "lua/head.lua"),
            release: script!("release", "lua/release.lua"),
            retire: script!("retire", "lua/retire.lua"),
            registry: Script::new("queue.registry", REGISTRY_SCRIPT),
        }
    }

    fn call<'s>(script: &'s Script, project: &str, queue: &str) -> Call<'s> {
        let mut call = script.call();
        for key in keys::queue(project, queue) {
            call = call.key(key);
        }
        call
    }

    /// Whether Redis answers a PING.
    pub async fn ping(&self) -> Result<()> {
        let _: String = self.pool.query(&redis::cmd("PING")).await?;
        Ok(())
    }

    /// Registers the queue for the reaper, as of Redis's clock.
    pub async fn register(&self, project: &str, queue: &str) -> Result<()> {
        self.registry_call(project, queue, 0, "register")
            .await
            .map(|_| ())
    }

    /// Runs the registry script: (whether it registered or unregistered, Redis's time in ms).
    async fn registry_call(
        &self,
        project: &str,
        queue: &str,
        age_ms: u64,
        op: &str,
    ) -> Result<(bool, u64)> {
        let (done, now): (i64, u64) = self
            .registry
            .call()
            .key(keys::REGISTRY)
            .arg(keys::registry_member(project, queue))
            .arg(age_ms)
            .arg(op)
            .invoke(&self.pool)
            .await?;
        Ok((done == 1, now))
    }

    /// Redis's clock, in ms.
    async fn redis_now_ms(&self) -> Result<u64> {
        let (seconds, micros): (u64, u64) = self.pool.query(&redis::cmd("TIME")).await?;
        Ok(seconds.saturating_mul(1000).saturating_add(micros / 1000))
    }

    /// Every registered queue, and Redis's time (ms) to judge their ages by, read together
    /// (one round trip). With `migrate`, also reads the plain set earlier versions keep,
    /// copies its members in (as registered now; they are listed from the next call on) and
    /// marks them `legacy`: such an instance registers a queue once per process and never
    /// again, so those queues are never retired while that set lists them. The set stays for
    /// those instances' reapers; once none runs, deleting it lets them go too.
    pub async fn registered(&self, migrate: bool) -> Result<(u64, Vec<Registered>)> {
        let members = async {
            let members: Vec<(String, f64)> = self
                .pool
                .query(
                    redis::cmd("ZRANGE")
                        .arg(keys::REGISTRY)
                        .arg(0)
                        .arg(-1)
                        .arg("WITHSCORES"),
                )
                .await?;
            Ok(members)
        };
        let legacy = async {
            if !migrate {
                return Ok(Vec::new());
            }
            let legacy: Vec<String> = self
                .pool
                .query(redis::cmd("SMEMBERS").arg(keys::LEGACY_REGISTRY))
                .await?;
            Ok(legacy)
        };
        let (now, members, legacy) = futures::try_join!(self.redis_now_ms(), members, legacy)?;
        if !legacy.is_empty() {
            let mut add = redis::cmd("ZADD");
            add.arg(keys::REGISTRY).arg("NX");
            for member in &legacy {
                add.arg(now).arg(member);
            }
            let _: i64 = self.pool.query(&add).await?;
        }
        let registered = members
            .into_iter()
            .filter_map(|(member, at)| {
                let (project, queue) = member.split_once('/')?;
                Some(Registered {
                    project: project.to_owned(),
                    queue: queue.to_owned(),
                    at_ms: at.max(0.0) as u64,
                    legacy: legacy.contains(&member),
                })
            })
            .collect();
        Ok((now, registered))
    }

    /// Forgets the queue if it is empty and no instance has registered it for `age_ms` (by
    /// Redis's clock): out of the registry, its leftover keys deleted. Whether it did.
    ///
    /// An instance registers a queue before enqueuing into it whenever its own registration
    /// is older than a sixth of the retirement age, so a registry score older than that age
    /// means no instance is about to enqueue without registering first. The order of the
    /// steps keeps a queue that holds tasks from leaving the registry even if Redis fails
    /// between them: it is found empty, then unregistered (only if its score is still old),
    /// then its keys go if it is still empty; if an enqueue arrived in between after all, the
    /// queue is registered again.
    pub async fn retire(&self, project: &str, queue: &str, age_ms: u64) -> Result<bool> {
        let empty: i64 = Self::call(&self.retire, project, queue)
            .arg("0")
            .invoke(&self.pool)
            .await?;
        if empty == 0 {
            return Ok(false);
        }
        let (taken, _) = self
            .registry_call(project, queue, age_ms, "unregister")
            .await?;
        if !taken {
            return Ok(false);
        }
        let empty: i64 = Self::call(&self.retire, project, queue)
            .arg("1")
            .invoke(&self.pool)
            .await?;
        if empty == 0 {
            self.register(project, queue).await?;
            return Ok(false);
        }
        Ok(true)
    }

    /// Stores `tasks` all or none. `Err(ResourceExhausted)` when the queue is full.
    pub async fn enqueue(
        &self,
        project: &str,
        queue: &str,
        tasks: &[NewTask],
        max_size: u64,
        idempotency_ms: u64,
    ) -> Result<Vec<Enqueued>> {
        // Records first: their map's entry count travels among the numbers, the rest as a
        // string (see enqueue.lua).
        let records = tasks
            .iter()
            .map(|task| {
                let inline = (!task.payload_beside()).then_some(task.payload.as_slice());
                NewRecord::of(&task.record).encode(inline)
            })
            .collect::<Result<Vec<_>>>()?;
        let count = 3 + 5 * tasks.len();
        let packing = |e: String| Error::Internal(format!("enqueue: {e}"));
        let mut numbers = PackedNumbers::new(count).map_err(packing)?;
        numbers.push(max_size);
        numbers.push(idempotency_ms);
        numbers.push(tasks.len() as u64);
        for (task, record) in tasks.iter().zip(&records) {
            numbers.push(u64::from(task.record.p));
            numbers.push(task.not_before_ms);
            numbers.push(task.delay_ms);
            numbers.push(u64::from(record.entries));
            numbers
                .push(u64::from(task.record.idem.is_some()) + 2 * u64::from(task.payload_beside()));
        }
        let mut call =
            Self::call(&self.enqueue, project, queue).arg(numbers.finish().map_err(packing)?);
        for (task, record) in tasks.iter().zip(&records) {
            call = call.arg(task.record.id.as_str());
            if let Some(key) = &task.record.idem {
                call = call.arg(key.as_str());
            }
            if task.payload_beside() {
                call = call.arg(task.payload.as_slice());
            }
            call = call.arg(record.entries_bytes());
        }
        let reply: Vec<redis::Value> = call.invoke(&self.pool).await?;
        match text(reply.first(), "enqueue")?.as_str() {
            "full" => Err(Error::ResourceExhausted(format!(
                "queue `{queue}` holds {} tasks, its maximum allows no {} more; retry later or raise max_size",
                number(reply.get(1), "enqueue")?,
                tasks.len()
            ))),
            "ok" => {
                let codes = text(reply.get(1), "enqueue")?;
                if codes.len() != tasks.len() {
                    return Err(Error::Internal(format!(
                        "enqueue: {} answers for {} tasks",
                        codes.len(),
                        tasks.len()
                    )));
                }
                let mut dups = reply.get(2..).unwrap_or_default().chunks_exact(2);
                tasks
                    .iter()
                    .zip(codes.bytes())
                    .map(|(task, code)| {
                        let (id, duplicate, state) = match code {
                            b'r' => (task.record.id.clone(), false, "ready".to_owned()),
                            b's' => (task.record.id.clone(), false, "scheduled".to_owned()),
                            b'd' => {
                                let dup = dups.next().ok_or_else(|| {
                                    Error::Internal(
                                        "enqueue: a duplicate's answer is missing".into(),
                                    )
                                })?;
                                (
                                    text(dup.first(), "enqueue")?,
                                    true,
                                    text(dup.get(1), "enqueue")?,
                                )
                            }
                            other => {
                                return Err(Error::Internal(format!(
                                    "enqueue: unexpected answer {:?}",
                                    char::from(other)
                                )));
                            }
                        };
                        Ok(Enqueued {
                            id,
                            duplicate,
                            state,
                        })
                    })
                    .collect()
            }
            other => Err(Error::Internal(format!(
                "enqueue: unexpected reply {other}"
            ))),
        }
    }

    /// Leases up to `tokens.len()` ready tasks.
    pub async fn dequeue(
        &self,
        project: &str,
        queue: &str,
        lease_ms: u64,
        worker: &str,
        tokens: &[String],
    ) -> Result<Vec<Leased>> {
        let mut call = Self::call(&self.dequeue, project, queue)
            .arg(tokens.len())
            .arg(lease_ms)
            .arg(worker);
        for token in tokens {
            call = call.arg(token);
        }
        let reply: Vec<redis::Value> = call.invoke(&self.pool).await?;
        if !reply.len().is_multiple_of(3) {
            return Err(Error::Internal(format!(
                "dequeue replied {} values, not three per task",
                reply.len()
            )));
        }
        reply
            .chunks_exact(3)
            .map(|c| {
                let mut record =
                    packed_record(text(c.first(), "dequeue")?, &bytes(c.get(1), "dequeue")?)?;
                let payload = match c.get(2) {
                    Some(redis::Value::Nil) => record.pl.take().ok_or_else(|| {
                        Error::Internal(format!(
                            "dequeue: task {}'s payload is neither in its record nor beside it",
                            record.id
                        ))
                    })?,
                    other => bytes(other, "dequeue")?,
                };
                record.pl = None;
                Ok((record, payload))
            })
            .collect()
    }

    /// Completes a batch of leased tasks of one queue in one script call; each is judged on
    /// its own: its run time in ms (`None` for a repeat), or why it was refused.
    pub async fn complete_many(
        &self,
        project: &str,
        queue: &str,
        items: &[Completion<'_>],
    ) -> Result<Vec<Result<Option<u64>>>> {
        let mut call = Self::call(&self.complete, project, queue).arg(items.len());
        for (id, token, result) in items {
            call = call.arg(*id).arg(*token).arg(*result);
        }
        let reply: Vec<redis::Value> = call.invoke(&self.pool).await?;
        judged(&reply, items.len(), 2, "complete", "Complete", |entry| {
            Ok(u64::try_from(number(entry.get(1), "complete")? as i64).ok())
        })
    }

    /// Fails a leased task's attempt.
    #[allow(clippy::too_many_arguments)]
    pub async fn fail(
        &self,
        project: &str,
        queue: &str,
        id: &str,
        token: &str,
        category: &str,
        message: &str,
        retryable: bool,
    ) -> Result<FailOutcome> {
        let reply: Vec<redis::Value> = Self::call(&self.fail, project, queue)
            .arg(id)
            .arg(token)
            .arg(category)
            .arg(message)
            .arg(if retryable { "1" } else { "0" })
            .invoke(&self.pool)
            .await?;
        let attempt = || number(reply.get(2), "fail").map(|a| a as u32);
        match text(reply.first(), "fail")?.as_str() {
            "retry" => Ok(FailOutcome::Retry {
                at: number(reply.get(1), "fail")?,
                attempt: attempt()?,
            }),
            "dead" => Ok(FailOutcome::Dead {
                attempt: attempt()?,
            }),
            "cancelled" => Ok(FailOutcome::Cancelled {
                attempt: attempt()?,
            }),
            _ => Err(status_error(&reply, "Fail")),
        }
    }

    /// Extends live leases of one queue, each judged on its own: per lease its deadline (ms) and
    /// whether its cancellation was requested, or why it was refused.
    pub async fn extend_many(
        &self,
        project: &str,
        queue: &str,
        leases: &[Lease<'_>],
        by_ms: u64,
    ) -> Result<Vec<Result<Extended>>> {
        let mut call = Self::call(&self.extend, project, queue)
            .arg(leases.len())
            .arg(by_ms);
        for (id, token) in leases {
            call = call.arg(*id).arg(*token);
        }
        let reply: Vec<redis::Value> = call.invoke(&self.pool).await?;
        judged(&reply, leases.len(), 3, "extend", "ExtendLease", |entry| {
            Ok((
                number(entry.get(1), "extend")?,
                number(entry.get(2), "extend")? == 1.0,
            ))
        })
    }

    /// One task with its payload and result.
    pub async fn get(&self, project: &str, queue: &str, id: &str) -> Result<Option<Full>> {
        let reply: Vec<redis::Value> = Self::call(&self.get, project, queue)
            .arg(id)
            .invoke(&self.pool)
            .await?;
        if reply.is_empty() {
            return Ok(None);
        }
        Ok(Some((
            record(&text(reply.first(), "get")?)?,
            bytes(reply.get(1), "get")?,
            bytes(reply.get(2), "get")?,
        )))
    }

    /// Cancels a task: Ok(true) cancelled now, Ok(false) requested (leased).
    pub async fn cancel(&self, project: &str, queue: &str, id: &str) -> Result<bool> {
        let reply: Vec<redis::Value> = Self::call(&self.cancel, project, queue)
            .arg(id)
            .invoke(&self.pool)
            .await?;
        match text(reply.first(), "cancel")?.as_str() {
            "cancelled" => Ok(true),
            "requested" => Ok(false),
            "nf" => Err(status_error(&reply, "CancelTask")),
            "final" => Err(Error::FailedPrecondition(format!(
                "the task is {}: only scheduled, ready or leased tasks can be cancelled",
                text(reply.get(1), "cancel")?
            ))),
            other => Err(Error::Internal(format!("cancel: unexpected reply {other}"))),
        }
    }

    /// Gives a leased task back unstarted (the attempt does not count).
    pub async fn release(&self, project: &str, queue: &str, id: &str, token: &str) -> Result<()> {
        let reply: Vec<redis::Value> = Self::call(&self.release, project, queue)
            .arg(id)
            .arg(token)
            .invoke(&self.pool)
            .await?;
        match text(reply.first(), "release")?.as_str() {
            "ok" => Ok(()),
            _ => Err(status_error(&reply, "ReleaseTask")),
        }
    }

    /// The most urgent ready priority (after promoting due tasks); `None` when nothing is
    /// ready or the queue is paused.
    pub async fn head(&self, project: &str, queue: &str) -> Result<Option<u8>> {
        let p: i64 = Self::call(&self.head, project, queue)
            .invoke(&self.pool)
            .await?;
        Ok(u8::try_from(p).ok())
    }

    /// Depth and rates.
    pub async fn stats(&self, project: &str, queue: &str) -> Result<Stats> {
        let r: Vec<u64> = Self::call(&self.stats, project, queue)
            .invoke(&self.pool)
            .await?;
        if r.len() != 14 {
            return Err(Error::Internal(format!("stats: {} numbers", r.len())));
        }
        Ok(Stats {
            ready: [r[0], r[1], r[2], r[3], r[4]],
            scheduled: r[5],
            leased: r[6],
            dead: r[7],
            done: r[8],
            paused: r[9] == 1,
            last_minute: [r[10], r[11], r[12]],
            cancelled: r[13].min(r[8]),
        })
    }

    /// Pauses (true) or resumes (false).
    pub async fn set_paused(&self, project: &str, queue: &str, paused: bool) -> Result<bool> {
        let flag: i64 = Self::call(&self.pause, project, queue)
            .arg(u8::from(paused))
            .invoke(&self.pool)
            .await?;
        Ok(flag == 1)
    }

    /// Runs the reaper once over one queue: (expired, promoted, removed).
    pub async fn reap(
        &self,
        project: &str,
        queue: &str,
        limit: u64,
        retention: Option<Retention>,
    ) -> Result<(u64, u64, u64)> {
        let (retention_ms, dead_ms) = retention.map_or((-1, -1), |r| {
            let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
            (ms(r.finished), ms(r.dead))
        });
        let r: Vec<u64> = Self::call(&self.reap, project, queue)
            .arg(limit)
            .arg(retention_ms)
            .arg(dead_ms)
            .invoke(&self.pool)
            .await?;
        match r.as_slice() {
            [a, b, c] => Ok((*a, *b, *c)),
            _ => Err(Error::Internal(format!("reap: {} numbers", r.len()))),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn dead_call<'s>(
        &'s self,
        project: &str,
        queue: &str,
        op: &str,
        limit: u64,
        list_cursor: &str,
        selector: &DeadSelector,
        max_size: u64,
    ) -> Call<'s> {
        let (kind, arg, before) = match selector {
            DeadSelector::Id(id) => ("id", id.clone(), 0),
            DeadSelector::All => ("all", String::new(), 0),
            DeadSelector::Filter {
                category,
                dead_before_ms,
            } => ("filter", category.clone(), *dead_before_ms),
        };
        Self::call(&self.dead, project, queue)
            .arg(op)
            .arg(limit)
            .arg(list_cursor)
            .arg(kind)
            .arg(arg)
            .arg(before)
            .arg(max_size)
    }

    /// Up to `limit` dead letters after `cursor` (`<score> <id>` of the last one of the
    /// previous page, empty for the first), oldest dead first, each with its dead-at score
    /// and payload; and whether more follow.
    pub async fn list_dead(
        &self,
        project: &str,
        queue: &str,
        cursor: &str,
        limit: u64,
    ) -> Result<(Vec<(u64, Leased)>, bool)> {
        let reply: Vec<redis::Value> = self
            .dead_call(project, queue, "list", limit, cursor, &DeadSelector::All, 0)
            .invoke(&self.pool)
            .await?;
        let more = number(reply.first(), "dead list")? > 0.0;
        let tasks = reply[1..]
            .chunks_exact(3)
            .map(|c| {
                Ok((
                    number(c.first(), "dead list")? as u64,
                    (
                        record(&text(c.get(1), "dead list")?)?,
                        bytes(c.get(2), "dead list")?,
                    ),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((tasks, more))
    }

    /// Redrives or purges dead letters: (count, more left). A redrive moves only as many as
    /// fit the queue's max size, and answers RESOURCE_EXHAUSTED when none fit while some
    /// matched.
    pub async fn redrive_or_purge(
        &self,
        project: &str,
        queue: &str,
        op: DeadOp,
        limit: u64,
        selector: &DeadSelector,
        cursor: &str,
    ) -> Result<DeadPass> {
        let (name, max_size) = match op {
            DeadOp::Purge => ("purge", 0),
            DeadOp::Redrive { max_size } => ("redrive", max_size),
        };
        let r: Vec<redis::Value> = self
            .dead_call(project, queue, name, limit, "", selector, max_size)
            .arg(cursor)
            .invoke(&self.pool)
            .await?;
        dead_outcome(&r, queue, name)
    }

    /// The reaper's auto-redrive: dead letters whose last failure is of one of the policy's
    /// categories, dead for its cool-down and brought back fewer than its `max` times, become
    /// ready again with their attempts reset (at most `limit` looked at per call). Returns how
    /// many, and whether more may be due.
    pub async fn auto_redrive(
        &self,
        project: &str,
        queue: &str,
        policy: &AutoRedrive,
        limit: u64,
        max_size: u64,
    ) -> Result<(u64, bool)> {
        let r: Vec<redis::Value> = Self::call(&self.dead, project, queue)
            .arg("auto")
            .arg(limit)
            .arg(0)
            .arg(format!(",{},", policy.categories.join(",")))
            .arg(u64::try_from(policy.after.as_millis()).unwrap_or(u64::MAX))
            .arg(policy.max)
            .arg(max_size)
            .invoke(&self.pool)
            .await?;
        dead_outcome(&r, queue, "auto").map(|pass| (pass.count, pass.more))
    }

    /// Writes `entries` (field, value) into `project`'s worker roster and removes `gone`.
    pub async fn put_workers(
        &self,
        project: &str,
        entries: &[(String, Vec<u8>)],
        gone: &[String],
    ) -> Result<()> {
        let key = keys::workers(project);
        if !entries.is_empty() {
            let mut cmd = redis::cmd("HSET");
            cmd.arg(&key);
            for (field, value) in entries {
                cmd.arg(field).arg(value);
            }
            let _: i64 = self.pool.query(&cmd).await?;
            // The whole roster goes when no instance has written it for a while.
            let ttl = u64::try_from(crate::roster::ENTRY_TTL.as_millis()).unwrap_or(u64::MAX);
            let _: i64 = self
                .pool
                .query(redis::cmd("PEXPIRE").arg(&key).arg(ttl.saturating_mul(2)))
                .await?;
        }
        if !gone.is_empty() {
            let _: i64 = self
                .pool
                .query(redis::cmd("HDEL").arg(&key).arg(gone))
                .await?;
        }
        Ok(())
    }

    /// `project`'s worker roster: field and value of every entry.
    pub async fn workers(&self, project: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.pool
            .query(redis::cmd("HGETALL").arg(keys::workers(project)))
            .await
    }
}

/// The store behind the queue: Redis, or this process.
#[derive(Debug)]
pub enum QueueStore {
    /// Redis or Redis Cluster.
    Redis(Box<RedisQueue>),
    /// In-process: one instance only, nothing persisted.
    Embedded(crate::embedded::EmbeddedQueue),
}

macro_rules! delegate {
    ($self:ident, $method:ident ( $($arg:expr),* )) => {
        match $self {
            QueueStore::Redis(store) => store.$method($($arg),*).await,
            QueueStore::Embedded(store) => store.$method($($arg),*),
        }
    };
}

impl QueueStore {
    /// Whether the store answers (the embedded store always does).
    pub async fn ping(&self) -> Result<()> {
        match self {
            Self::Redis(store) => store.ping().await,
            Self::Embedded(_) => Ok(()),
        }
    }

    /// Registers the queue for the reaper (the embedded store knows its queues).
    pub async fn register(&self, project: &str, queue: &str) -> Result<()> {
        match self {
            Self::Redis(store) => store.register(project, queue).await,
            Self::Embedded(_) => Ok(()),
        }
    }

    /// Every known queue and the store's time; see [`RedisQueue::registered`].
    pub async fn registered(&self, migrate: bool) -> Result<(u64, Vec<Registered>)> {
        match self {
            Self::Redis(store) => store.registered(migrate).await,
            Self::Embedded(store) => Ok(store.registered()),
        }
    }

    /// See [`RedisQueue::retire`].
    pub async fn retire(&self, project: &str, queue: &str, age_ms: u64) -> Result<bool> {
        match self {
            Self::Redis(store) => store.retire(project, queue, age_ms).await,
            Self::Embedded(store) => Ok(store.retire(project, queue, age_ms)),
        }
    }

    /// See [`RedisQueue::enqueue`].
    pub async fn enqueue(
        &self,
        project: &str,
        queue: &str,
        tasks: &[NewTask],
        max_size: u64,
        idempotency_ms: u64,
    ) -> Result<Vec<Enqueued>> {
        delegate!(
            self,
            enqueue(project, queue, tasks, max_size, idempotency_ms)
        )
    }

    /// See [`RedisQueue::dequeue`].
    pub async fn dequeue(
        &self,
        project: &str,
        queue: &str,
        lease_ms: u64,
        worker: &str,
        tokens: &[String],
    ) -> Result<Vec<Leased>> {
        delegate!(self, dequeue(project, queue, lease_ms, worker, tokens))
    }

    /// See [`RedisQueue::complete_many`].
    pub async fn complete_many(
        &self,
        project: &str,
        queue: &str,
        items: &[Completion<'_>],
    ) -> Result<Vec<Result<Option<u64>>>> {
        delegate!(self, complete_many(project, queue, items))
    }

    /// See [`RedisQueue::fail`].
    #[allow(clippy::too_many_arguments)]
    pub async fn fail(
        &self,
        project: &str,
        queue: &str,
        id: &str,
        token: &str,
        category: &str,
        message: &str,
        retryable: bool,
    ) -> Result<FailOutcome> {
        delegate!(
            self,
            fail(project, queue, id, token, category, message, retryable)
        )
    }

    /// See [`RedisQueue::extend_many`].
    pub async fn extend_many(
        &self,
        project: &str,
        queue: &str,
        leases: &[Lease<'_>],
        by_ms: u64,
    ) -> Result<Vec<Result<Extended>>> {
        delegate!(self, extend_many(project, queue, leases, by_ms))
    }

    /// See [`RedisQueue::get`].
    pub async fn get(&self, project: &str, queue: &str, id: &str) -> Result<Option<Full>> {
        delegate!(self, get(project, queue, id))
    }

    /// See [`RedisQueue::cancel`].
    pub async fn cancel(&self, project: &str, queue: &str, id: &str) -> Result<bool> {
        delegate!(self, cancel(project, queue, id))
    }

    /// See [`RedisQueue::release`].
    pub async fn release(&self, project: &str, queue: &str, id: &str, token: &str) -> Result<()> {
        delegate!(self, release(project, queue, id, token))
    }

    /// See [`RedisQueue::head`].
    pub async fn head(&self, project: &str, queue: &str) -> Result<Option<u8>> {
        delegate!(self, head(project, queue))
    }

    /// See [`RedisQueue::stats`].
    pub async fn stats(&self, project: &str, queue: &str) -> Result<Stats> {
        delegate!(self, stats(project, queue))
    }

    /// See [`RedisQueue::set_paused`].
    pub async fn set_paused(&self, project: &str, queue: &str, paused: bool) -> Result<bool> {
        delegate!(self, set_paused(project, queue, paused))
    }

    /// See [`RedisQueue::reap`].
    pub async fn reap(
        &self,
        project: &str,
        queue: &str,
        limit: u64,
        retention: Option<Retention>,
    ) -> Result<(u64, u64, u64)> {
        delegate!(self, reap(project, queue, limit, retention))
    }

    /// See [`RedisQueue::list_dead`].
    pub async fn list_dead(
        &self,
        project: &str,
        queue: &str,
        cursor: &str,
        limit: u64,
    ) -> Result<(Vec<(u64, Leased)>, bool)> {
        delegate!(self, list_dead(project, queue, cursor, limit))
    }

    /// See [`RedisQueue::redrive_or_purge`].
    pub async fn redrive_or_purge(
        &self,
        project: &str,
        queue: &str,
        op: DeadOp,
        limit: u64,
        selector: &DeadSelector,
        cursor: &str,
    ) -> Result<DeadPass> {
        delegate!(
            self,
            redrive_or_purge(project, queue, op, limit, selector, cursor)
        )
    }

    /// See [`RedisQueue::auto_redrive`].
    pub async fn auto_redrive(
        &self,
        project: &str,
        queue: &str,
        policy: &AutoRedrive,
        limit: u64,
        max_size: u64,
    ) -> Result<(u64, bool)> {
        delegate!(self, auto_redrive(project, queue, policy, limit, max_size))
    }

    /// See [`RedisQueue::put_workers`]; the embedded store serves one instance and keeps no
    /// roster.
    pub async fn put_workers(
        &self,
        project: &str,
        entries: &[(String, Vec<u8>)],
        gone: &[String],
    ) -> Result<()> {
        match self {
            Self::Redis(store) => store.put_workers(project, entries, gone).await,
            Self::Embedded(_) => Ok(()),
        }
    }

    /// See [`RedisQueue::workers`]; nothing on the embedded store.
    pub async fn workers(&self, project: &str) -> Result<Vec<(String, Vec<u8>)>> {
        match self {
            Self::Redis(store) => store.workers(project).await,
            Self::Embedded(_) => Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use sluice_testkit::redis_server::RedisServer;

    use super::*;

    /// A queue store on `redis`, one connection.
    fn store_on(redis: &RedisServer) -> anyhow::Result<RedisQueue> {
        Ok(RedisQueue::new(RedisPool::new(
            &sluice::pool::RedisConfig {
                url: redis.url(),
                pool_size: 1,
                connect_timeout: Duration::from_secs(5),
                command_timeout: Duration::from_secs(5),
                tls_ca: None,
            },
        )?))
    }

    /// `retire` goes by the registry's score, by Redis's clock, where it removes the queue:
    /// an empty queue registered within the age stays, one registered before it goes, and one
    /// holding a task stays whatever its age.
    #[tokio::test]
    async fn retire_goes_by_the_registry_score_and_keeps_queues_with_tasks() -> anyhow::Result<()> {
        use redis::AsyncCommands;
        let redis = RedisServer::start().await?;
        let mut conn = redis.client().await?;
        let store = store_on(&redis)?;
        let (now, _) = store.registered(false).await?;
        // Registered ten seconds ago (by Redis's clock).
        let ten_ago = now.saturating_sub(10_000);
        let _: i64 = conn.zadd(keys::REGISTRY, "p/empty", ten_ago).await?;
        let _: i64 = conn.zadd(keys::REGISTRY, "p/holding", ten_ago).await?;
        let _: i64 = conn.hset("sluice:q:{p/holding}:tasks", "t", "x").await?;
        assert!(
            !store.retire("p", "empty", 60_000).await?,
            "younger than a minute"
        );
        assert!(!store.retire("p", "holding", 5_000).await?, "holds a task");
        assert!(
            store.retire("p", "empty", 5_000).await?,
            "older than 5 s and empty"
        );
        let left: Vec<(String, f64)> = conn.zrange_withscores(keys::REGISTRY, 0, -1).await?;
        assert_eq!(left, [("p/holding".to_owned(), ten_ago as f64)]);
        // Registering stamps Redis's time.
        store.register("p", "empty").await?;
        let (later, registered) = store.registered(false).await?;
        let empty = registered
            .iter()
            .find(|r| r.queue == "empty")
            .map(|r| r.at_ms);
        assert!(
            empty.is_some_and(|at| at >= now && at <= later),
            "{registered:?}"
        );
        Ok(())
    }

    /// retire.lua, as the reaper's last step runs it (deleting): a queue holding a task or
    /// an idempotency record, or paused, keeps every key; an empty one loses all of them,
    /// stale index entries included.
    #[tokio::test]
    async fn retire_script_deletes_only_an_empty_unpaused_queue() -> anyhow::Result<()> {
        use redis::AsyncCommands;
        let redis = RedisServer::start().await?;
        let mut conn = redis.client().await?;
        let store = store_on(&redis)?;
        let retire = |queue: &'static str| {
            RedisQueue::call(&store.retire, "p", queue)
                .arg("1")
                .invoke::<i64>(&store.pool)
        };
        let keys_of = |queue: &str| format!("sluice:q:{{p/{queue}}}:*");
        let _: i64 = conn.hset("sluice:q:{p/task}:tasks", "t", "x").await?;
        let _: i64 = conn.hset("sluice:q:{p/task}:meta", "enqueued:1", 1).await?;
        let _: i64 = conn.hset("sluice:q:{p/idem}:idem", "k", "t").await?;
        let _: i64 = conn.hset("sluice:q:{p/paused}:meta", "paused", "1").await?;
        let _: i64 = conn
            .hset("sluice:q:{p/empty}:meta", "enqueued:1", 1)
            .await?;
        let _: i64 = conn.rpush("sluice:q:{p/empty}:ready2", "stale").await?;
        for kept in ["task", "idem", "paused"] {
            assert_eq!(retire(kept).await?, 0, "{kept}");
            let keys: Vec<String> = conn.keys(keys_of(kept)).await?;
            assert!(!keys.is_empty(), "{kept} keeps its keys");
        }
        assert_eq!(retire("empty").await?, 1);
        let keys: Vec<String> = conn.keys(keys_of("empty")).await?;
        assert!(keys.is_empty(), "{keys:?}");
        Ok(())
    }

    /// The per-minute counters in a queue's meta hash keep the last counted minute and the
    /// one before it, whatever the gaps between the minutes counted: the hash cannot grow.
    /// Fields an earlier version leaked go on the first count; other fields stay.
    #[tokio::test]
    async fn minute_counters_keep_two_minutes_whatever_the_gaps() -> anyhow::Result<()> {
        let redis = RedisServer::start().await?;
        let mut conn = redis.client().await?;
        let probe = concat!(
            include_str!("lua/common.lua"),
            r#"
-- Fields an earlier version left behind, and another counter's, which stay.
redis.call('HSET', K_META, 'x:3', 1, 'x:7', 1, 'x:9', 5, 'y:2', 1, 'paused', '1')
local out = {}
for _, m in ipairs({ 10, 10, 11, 14, 15, 15, 30, 31 }) do
  now = m * 60000
  count('x', 2)
  local fields = redis.call('HKEYS', K_META)
  table.sort(fields)
  out[#out + 1] = table.concat(fields, ' ')
end
out[#out + 1] = redis.call('HGET', K_META, 'x:31') .. ' ' .. redis.call('HGET', K_META, 'x:30')
return out
"#
        );
        let mut eval = redis::cmd("EVAL");
        eval.arg(probe).arg(15);
        for key in keys::queue("p", "q") {
            eval.arg(key);
        }
        let shown: Vec<String> = eval.query_async(&mut conn).await?;
        assert_eq!(
            shown,
            [
                "paused x:10 x:9 x:last y:2",
                "paused x:10 x:9 x:last y:2",
                "paused x:10 x:11 x:last y:2",
                "paused x:14 x:last y:2",
                "paused x:14 x:15 x:last y:2",
                "paused x:14 x:15 x:last y:2",
                "paused x:30 x:last y:2",
                "paused x:30 x:31 x:last y:2",
                "2 2",
            ]
        );
        Ok(())
    }

    /// A payload the service writes into a new record reads back from it, in Rust and in
    /// Lua, and is encoded byte for byte as Lua's `cmsgpack.pack` encodes a string, so that
    /// records read the same whichever side wrote them.
    #[tokio::test]
    async fn inline_payloads_are_written_as_redis_lua_writes_them() -> anyhow::Result<()> {
        let redis = RedisServer::start().await?;
        let mut conn = redis.client().await?;
        for len in [0, 1, 31, 32, 255, 256, INLINE_PAYLOAD] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
            let record = Record {
                p: 2,
                max: 3,
                to: 600_000,
                ..Record::default()
            };
            let packed = NewRecord::of(&record).encode(Some(&payload))?.map();
            let read = packed_record("t".into(), &packed)?;
            assert_eq!(read.pl.as_deref(), Some(payload.as_slice()), "{len} bytes");
            assert_eq!((read.p, read.max, read.to), (2, 3, 600_000));
            let lua: Vec<u8> = redis::cmd("EVAL")
                .arg("return cmsgpack.pack('pl', ARGV[1])")
                .arg(0)
                .arg(&payload)
                .query_async(&mut conn)
                .await?;
            assert!(
                packed.ends_with(&lua),
                "{len} bytes: encoded as cmsgpack does"
            );
            let back: Vec<u8> = redis::cmd("EVAL")
                .arg("return cmsgpack.unpack(ARGV[1]).pl")
                .arg(0)
                .arg(&packed)
                .query_async(&mut conn)
                .await?;
            assert_eq!(back, payload, "{len} bytes: Lua reads it back");
        }
        Ok(())
    }
}
