//! The queue in this process, with the semantics of the Lua scripts (the shared test suite
//! runs against both). One instance only; nothing survives a restart.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use sluice::error::{Error, Result};

use crate::model::{ErrorRecord, Record};
use crate::queues::AutoRedrive;
use crate::store::{
    Completion, DEAD_SCAN, DeadOp, DeadPass, DeadSelector, Enqueued, Extended, FailOutcome, Full,
    Lease, Leased, NewTask, Registered, Retention, Stats, no_room,
};

const MAX_ERRORS: usize = 10;

#[derive(Debug, Default)]
struct Queue {
    tasks: HashMap<String, Record>,
    payloads: HashMap<String, Vec<u8>>,
    results: HashMap<String, Vec<u8>>,
    /// (priority, sequence) -> id: most urgent first, FIFO within a level.
    ready: BTreeMap<(u8, u64), String>,
    sched: BTreeSet<(u64, String)>,
    leased: BTreeSet<(u64, String)>,
    dead: BTreeSet<(u64, String)>,
    done: BTreeSet<(u64, String)>,
    /// How many of `done` are cancelled.
    cancelled: u64,
    idem: HashMap<String, (String, u64)>,
    seq: u64,
    paused: bool,
    /// (what, minute) -> count.
    counters: HashMap<(&'static str, u64), u64>,
    /// Auto-redrive has looked at dead letters that died up to this ms.
    auto_cursor: u64,
    /// When it last took an enqueue (ms; 0: never, a queue only read).
    touched: u64,
}

fn ms(t: f64) -> u64 {
    t.max(0.0) as u64
}

impl Queue {
    fn count(&mut self, what: &'static str, now: u64) {
        let minute = now / 60_000;
        *self.counters.entry((what, minute)).or_default() += 1;
        self.counters.retain(|(_, m), _| *m + 2 > minute);
    }

    fn complete(&mut self, id: &str, token: &str, result: &[u8], now: u64) -> Result<Option<u64>> {
        if let Some(task) = self.tasks.get(id)
            && task.st == "succeeded"
            && task.ltok.as_deref() == Some(token)
        {
            return Ok(None);
        }
        let mut task = self.leased_task(id, token, now)?;
        self.finish(&mut task, "succeeded", now);
        task.ok = Some(now as f64);
        task.dl = None;
        if !result.is_empty() {
            self.results.insert(id.to_owned(), result.to_vec());
        }
        self.count("completed", now);
        let ran = now.saturating_sub(task.lsd.map_or(now, ms));
        self.tasks.insert(id.to_owned(), task);
        Ok(Some(ran))
    }

    /// Auto-redrive of one dead letter: `Some(true)` when it qualified and was brought back,
    /// `Some(false)` when it does not qualify, `None` when it qualifies but `room` is 0.
    fn auto_redrive_one(
        &mut self,
        entry: &(u64, String),
        policy: &AutoRedrive,
        room: &mut usize,
    ) -> Option<bool> {
        let qualifies = self.tasks.get(&entry.1).is_some_and(|t| {
            t.st == "dead"
                && t.rd < policy.max
                && t.err
                    .last()
                    .is_some_and(|e| policy.categories.contains(&e.category))
        });
        if !qualifies {
            return Some(false);
        }
        if *room == 0 {
            return None;
        }
        let Some(mut task) = self.tasks.remove(&entry.1) else {
            return Some(false);
        };
        *room -= 1;
        self.dead.remove(entry);
        task.att = 0;
        task.dd = None;
        task.rd += 1;
        self.make_ready(&mut task);
        self.tasks.insert(entry.1.clone(), task);
        Some(true)
    }

    /// Tasks counted against max_size: ready, scheduled and leased.
    fn size(&self) -> usize {
        self.ready.len() + self.sched.len() + self.leased.len()
    }

    fn make_ready(&mut self, task: &mut Record) {
        self.seq += 1;
        task.st = "ready".into();
        self.ready.insert((task.p, self.seq), task.id.clone());
    }

    fn schedule(&mut self, task: &mut Record, at: u64) {
        task.st = "scheduled".into();
        task.sch = Some(at as f64);
        self.sched.insert((at, task.id.clone()));
    }

    fn unlease(&mut self, task: &Record) {
        if let Some(dl) = task.dl {
            self.leased.remove(&(ms(dl), task.id.clone()));
        }
    }

    fn finish(&mut self, task: &mut Record, state: &str, now: u64) {
        self.unlease(task);
        task.st = state.into();
        task.ltok = task.tok.take();
        self.done.insert((now, task.id.clone()));
        if state == "cancelled" {
            self.cancelled += 1;
        }
    }

    fn dead_letter(&mut self, task: &mut Record, now: u64) {
        self.unlease(task);
        task.st = "dead".into();
        task.dd = Some(now as f64);
        task.ltok = task.tok.take();
        self.dead.insert((now, task.id.clone()));
        self.count("dead", now);
    }

    fn promote(&mut self, now: u64, limit: usize) -> u64 {
        let due: Vec<(u64, String)> = self
            .sched
            .iter()
            .take_while(|(at, _)| *at <= now)
            .take(limit)
            .cloned()
            .collect();
        for entry in &due {
            self.sched.remove(entry);
            if let Some(mut task) = self.tasks.remove(&entry.1) {
                if task.st == "scheduled" {
                    self.make_ready(&mut task);
                }
                self.tasks.insert(task.id.clone(), task);
            }
        }
        due.len() as u64
    }

    fn fail_attempt(
        &mut self,
        task: &mut Record,
        category: &str,
        message: &str,
        retryable: bool,
        now: u64,
    ) -> FailOutcome {
        task.err.push(ErrorRecord {
            attempt: task.att,
            category: category.into(),
            message: message.into(),
            retryable,
            at: now as f64,
        });
        if task.err.len() > MAX_ERRORS {
            task.err.remove(0);
        }
        task.fl = Some(now as f64);
        self.count("failed", now);
        let attempt = task.att;
        if task.cr {
            self.finish(task, "cancelled", now);
            task.dl = None;
            task.cx = Some(now as f64);
            return FailOutcome::Cancelled { attempt };
        }
        if !retryable || category == "permanent" || task.att >= task.max {
            self.dead_letter(task, now);
            task.dl = None;
            return FailOutcome::Dead { attempt };
        }
        self.unlease(task);
        task.dl = None;
        task.ltok = task.tok.take();
        let index = usize::try_from(task.att)
            .unwrap_or(usize::MAX)
            .saturating_sub(1);
        let delay = task
            .dly
            .get(index)
            .or(task.dly.last())
            .copied()
            .unwrap_or(0);
        self.schedule(task, now + delay);
        FailOutcome::Retry {
            at: (now + delay) as f64,
            attempt,
        }
    }

    /// The task behind `id` if `token` is its live lease.
    fn leased_task(&mut self, id: &str, token: &str, now: u64) -> Result<Record> {
        let task = self
            .tasks
            .get(id)
            .ok_or_else(|| Error::NotFound("no such task in this project and queue".into()))?;
        if task.st != "leased"
            || task.tok.as_deref() != Some(token)
            || task.dl.is_some_and(|dl| ms(dl) < now)
        {
            return Err(Error::FailedPrecondition(format!(
                "the lease token is not the task's live lease (the task is {}; its lease expired, was taken over, or it finished)",
                task.st
            )));
        }
        self.tasks
            .remove(id)
            .ok_or_else(|| Error::Internal("task vanished".into()))
    }
}

/// A dead-letter cursor, `<score> <id>` of the last dead letter a previous call looked at, as
/// a position in `Queue::dead`; `None` for the start.
fn dead_position(cursor: &str) -> Option<(u64, String)> {
    cursor
        .split_once(' ')
        .and_then(|(score, id)| Some((score.parse().ok()?, id.to_owned())))
}

/// The embedded queue store.
#[derive(Debug)]
pub struct EmbeddedQueue {
    queues: Mutex<HashMap<(String, String), Queue>>,
    epoch_ms: u64,
    started: tokio::time::Instant,
}

impl Default for EmbeddedQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl EmbeddedQueue {
    /// An empty store.
    pub fn new() -> Self {
        let epoch_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
        Self {
            queues: Mutex::new(HashMap::new()),
            epoch_ms,
            started: tokio::time::Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        self.epoch_ms + u64::try_from(self.started.elapsed().as_millis()).unwrap_or(0)
    }

    fn with<T>(
        &self,
        project: &str,
        queue: &str,
        f: impl FnOnce(&mut Queue, u64) -> Result<T>,
    ) -> Result<T> {
        let now = self.now();
        let mut queues = self
            .queues
            .lock()
            .map_err(|_| Error::Internal("embedded queue lock poisoned".into()))?;
        let q = queues
            .entry((project.to_owned(), queue.to_owned()))
            .or_default();
        f(q, now)
    }

    /// Every queue the store holds (any call naming a queue makes it), with when it last took
    /// an enqueue, and the store's time.
    pub fn registered(&self) -> (u64, Vec<Registered>) {
        let registered = self
            .queues
            .lock()
            .map(|queues| {
                queues
                    .iter()
                    .map(|((project, queue), q)| Registered {
                        project: project.clone(),
                        queue: queue.clone(),
                        at_ms: q.touched,
                        legacy: false,
                    })
                    .collect()
            })
            .unwrap_or_default();
        (self.now(), registered)
    }

    /// Forgets the queue if it holds nothing (see `retire.lua`) and took no enqueue for
    /// `age_ms`. Whether it did.
    pub fn retire(&self, project: &str, queue: &str, age_ms: u64) -> bool {
        let cutoff = self.now().saturating_sub(age_ms);
        let Ok(mut queues) = self.queues.lock() else {
            return false;
        };
        let key = (project.to_owned(), queue.to_owned());
        let empty = queues.get(&key).is_some_and(|q| {
            !q.paused && q.touched < cutoff && q.tasks.is_empty() && q.idem.is_empty()
        });
        if empty {
            queues.remove(&key);
        }
        empty
    }

    /// See `RedisQueue::enqueue`.
    pub fn enqueue(
        &self,
        project: &str,
        queue: &str,
        tasks: &[NewTask],
        max_size: u64,
        idempotency_ms: u64,
    ) -> Result<Vec<Enqueued>> {
        self.with(project, queue, |q, now| {
            let mut seen: HashMap<String, String> = HashMap::new();
            let mut plan = Vec::with_capacity(tasks.len());
            let mut fresh = 0;
            for task in tasks {
                let existing = task.record.idem.as_ref().and_then(|key| {
                    seen.get(key).cloned().or_else(|| {
                        q.idem.get(key).filter(|(id, exp)| *exp > now && q.tasks.contains_key(id)).map(|(id, _)| id.clone())
                    })
                });
                if existing.is_none() {
                    fresh += 1;
                    if let Some(key) = &task.record.idem {
                        seen.insert(key.clone(), task.record.id.clone());
                    }
                }
                plan.push(existing);
            }
            let size = q.size() as u64;
            if max_size > 0 && size + fresh > max_size {
                return Err(Error::ResourceExhausted(format!(
                    "queue `{queue}` holds {size} tasks, its maximum allows no {} more; retry later or raise max_size",
                    tasks.len()
                )));
            }
            let mut out = Vec::with_capacity(tasks.len());
            for (task, existing) in tasks.iter().zip(plan) {
                if let Some(id) = existing {
                    let state = q.tasks.get(&id).map(|t| t.st.clone()).unwrap_or_else(|| "ready".into());
                    out.push(Enqueued { id, duplicate: true, state });
                    continue;
                }
                let mut record = task.record.clone();
                record.enq = Some(now as f64);
                record.att = 0;
                q.payloads.insert(record.id.clone(), task.payload.clone());
                let at = if task.delay_ms > 0 { now + task.delay_ms } else { task.not_before_ms };
                if at > now {
                    q.schedule(&mut record, at);
                } else {
                    q.make_ready(&mut record);
                }
                if let Some(key) = &record.idem {
                    q.idem.insert(key.clone(), (record.id.clone(), now + idempotency_ms));
                }
                q.count("enqueued", now);
                out.push(Enqueued { id: record.id.clone(), duplicate: false, state: record.st.clone() });
                q.tasks.insert(record.id.clone(), record);
            }
            q.touched = now;
            Ok(out)
        })
    }

    /// See `RedisQueue::dequeue`.
    pub fn dequeue(
        &self,
        project: &str,
        queue: &str,
        lease_ms: u64,
        worker: &str,
        tokens: &[String],
    ) -> Result<Vec<Leased>> {
        self.with(project, queue, |q, now| {
            if q.paused {
                return Ok(Vec::new());
            }
            q.promote(now, 1000);
            let mut out = Vec::new();
            while out.len() < tokens.len() {
                let Some((_, id)) = q.ready.pop_first() else {
                    break;
                };
                let Some(mut task) = q.tasks.remove(&id) else {
                    continue;
                };
                if task.st == "ready" {
                    task.att += 1;
                    task.st = "leased".into();
                    task.lsd = Some(now as f64);
                    task.tok = Some(tokens[out.len()].clone());
                    let lease = if lease_ms > 0 { lease_ms } else { task.to };
                    task.dl = Some((now + lease) as f64);
                    task.wk = Some(worker.to_owned());
                    q.leased.insert((now + lease, id.clone()));
                    out.push((
                        task.clone(),
                        q.payloads.get(&id).cloned().unwrap_or_default(),
                    ));
                }
                q.tasks.insert(id, task);
            }
            Ok(out)
        })
    }

    /// See `RedisQueue::complete_many`.
    pub fn complete_many(
        &self,
        project: &str,
        queue: &str,
        items: &[Completion<'_>],
    ) -> Result<Vec<Result<Option<u64>>>> {
        self.with(project, queue, |q, now| {
            Ok(items
                .iter()
                .map(|(id, token, result)| q.complete(id, token, result, now))
                .collect())
        })
    }

    /// See `RedisQueue::fail`.
    #[allow(clippy::too_many_arguments)]
    pub fn fail(
        &self,
        project: &str,
        queue: &str,
        id: &str,
        token: &str,
        category: &str,
        message: &str,
        retryable: bool,
    ) -> Result<FailOutcome> {
        self.with(project, queue, |q, now| {
            let mut task = q.leased_task(id, token, now)?;
            let outcome = q.fail_attempt(&mut task, category, message, retryable, now);
            q.tasks.insert(id.to_owned(), task);
            Ok(outcome)
        })
    }

    /// See `RedisQueue::extend_many`.
    pub fn extend_many(
        &self,
        project: &str,
        queue: &str,
        leases: &[Lease<'_>],
        by_ms: u64,
    ) -> Result<Vec<Result<Extended>>> {
        self.with(project, queue, |q, now| {
            Ok(leases
                .iter()
                .map(|(id, token)| {
                    let mut task = q.leased_task(id, token, now)?;
                    q.unlease(&task);
                    let deadline = task.dl.map_or(0, ms).max(now + by_ms);
                    task.dl = Some(deadline as f64);
                    q.leased.insert((deadline, (*id).to_owned()));
                    let cancel = task.cr;
                    q.tasks.insert((*id).to_owned(), task);
                    Ok((deadline as f64, cancel))
                })
                .collect())
        })
    }

    /// See `RedisQueue::get`.
    pub fn get(&self, project: &str, queue: &str, id: &str) -> Result<Option<Full>> {
        self.with(project, queue, |q, _| {
            Ok(q.tasks.get(id).map(|t| {
                (
                    t.clone(),
                    q.payloads.get(id).cloned().unwrap_or_default(),
                    q.results.get(id).cloned().unwrap_or_default(),
                )
            }))
        })
    }

    /// See `RedisQueue::cancel`.
    pub fn cancel(&self, project: &str, queue: &str, id: &str) -> Result<bool> {
        self.with(project, queue, |q, now| {
            let mut task = q.tasks.remove(id).ok_or_else(|| {
                Error::NotFound("no such task in this project and queue (CancelTask)".into())
            })?;
            let result = match task.st.as_str() {
                "scheduled" | "ready" => {
                    if let Some(at) = task.sch {
                        q.sched.remove(&(ms(at), id.to_owned()));
                    }
                    q.ready.retain(|_, v| v != id);
                    q.finish(&mut task, "cancelled", now);
                    task.cx = Some(now as f64);
                    Ok(true)
                }
                "leased" => {
                    task.cr = true;
                    Ok(false)
                }
                state => Err(Error::FailedPrecondition(format!(
                    "the task is {state}: only scheduled, ready or leased tasks can be cancelled"
                ))),
            };
            q.tasks.insert(id.to_owned(), task);
            result
        })
    }

    /// See `RedisQueue::release`.
    pub fn release(&self, project: &str, queue: &str, id: &str, token: &str) -> Result<()> {
        self.with(project, queue, |q, now| {
            let mut task = q.leased_task(id, token, now)?;
            q.unlease(&task);
            task.att = task.att.saturating_sub(1);
            task.tok = None;
            task.dl = None;
            if task.cr {
                q.finish(&mut task, "cancelled", now);
                task.cx = Some(now as f64);
            } else {
                q.make_ready(&mut task);
            }
            q.tasks.insert(id.to_owned(), task);
            Ok(())
        })
    }

    /// See `RedisQueue::head`.
    pub fn head(&self, project: &str, queue: &str) -> Result<Option<u8>> {
        self.with(project, queue, |q, now| {
            if q.paused {
                return Ok(None);
            }
            q.promote(now, 1000);
            Ok(q.ready.keys().next().map(|(p, _)| *p))
        })
    }

    /// See `RedisQueue::stats`.
    pub fn stats(&self, project: &str, queue: &str) -> Result<Stats> {
        self.with(project, queue, |q, now| {
            let mut ready = [0u64; 5];
            for (p, _) in q.ready.keys() {
                ready[usize::from(*p).min(4)] += 1;
            }
            let minute = now / 60_000 - 1;
            let get = |what| q.counters.get(&(what, minute)).copied().unwrap_or(0);
            Ok(Stats {
                ready,
                scheduled: q.sched.len() as u64,
                leased: q.leased.len() as u64,
                dead: q.dead.len() as u64,
                done: q.done.len() as u64,
                cancelled: q.cancelled,
                paused: q.paused,
                last_minute: [get("enqueued"), get("completed"), get("failed")],
            })
        })
    }

    /// See `RedisQueue::set_paused`.
    pub fn set_paused(&self, project: &str, queue: &str, paused: bool) -> Result<bool> {
        self.with(project, queue, |q, _| {
            q.paused = paused;
            Ok(paused)
        })
    }

    /// See `RedisQueue::reap`.
    pub fn reap(
        &self,
        project: &str,
        queue: &str,
        limit: u64,
        retention: Option<Retention>,
    ) -> Result<(u64, u64, u64)> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        self.with(project, queue, |q, now| {
            let expired: Vec<(u64, String)> = q
                .leased
                .iter()
                .take_while(|(dl, _)| *dl < now)
                .take(limit)
                .cloned()
                .collect();
            for (_, id) in &expired {
                if let Some(mut task) = q.tasks.remove(id) {
                    if task.st == "leased" {
                        q.fail_attempt(
                            &mut task,
                            "timeout",
                            "lease expired before the task was completed or failed",
                            true,
                            now,
                        );
                    }
                    q.tasks.insert(id.clone(), task);
                }
            }
            for entry in &expired {
                q.leased.remove(entry);
            }
            let promoted = q.promote(now, limit);
            let mut removed = 0;
            let Some(retention) = retention else {
                return Ok((expired.len() as u64, promoted, removed));
            };
            for (set, keep) in [
                (&mut q.done, retention.finished),
                (&mut q.dead, retention.dead),
            ] {
                let before =
                    now.saturating_sub(u64::try_from(keep.as_millis()).unwrap_or(u64::MAX));
                let old: Vec<(u64, String)> = set
                    .iter()
                    .take_while(|(at, _)| *at <= before)
                    .take(limit)
                    .cloned()
                    .collect();
                for entry in old {
                    set.remove(&entry);
                    if q.tasks.get(&entry.1).is_some_and(|t| t.st == "cancelled") {
                        q.cancelled = q.cancelled.saturating_sub(1);
                    }
                    q.tasks.remove(&entry.1);
                    q.payloads.remove(&entry.1);
                    q.results.remove(&entry.1);
                    removed += 1;
                }
            }
            q.idem.retain(|_, (_, exp)| *exp > now);
            Ok((expired.len() as u64, promoted, removed))
        })
    }

    /// See `RedisQueue::list_dead`.
    pub fn list_dead(
        &self,
        project: &str,
        queue: &str,
        cursor: &str,
        limit: u64,
    ) -> Result<(Vec<(u64, Leased)>, bool)> {
        let after = dead_position(cursor);
        self.with(project, queue, |q, _| {
            let from = match &after {
                Some(position) => std::ops::Bound::Excluded(position.clone()),
                None => std::ops::Bound::Unbounded,
            };
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            let mut page = q.dead.range((from, std::ops::Bound::Unbounded));
            let tasks = page
                .by_ref()
                .take(limit)
                .filter_map(|(at, id)| {
                    q.tasks.get(id).map(|t| {
                        let payload = q.payloads.get(id).cloned().unwrap_or_default();
                        (*at, (t.clone(), payload))
                    })
                })
                .collect();
            Ok((tasks, page.next().is_some()))
        })
    }

    /// See `RedisQueue::redrive_or_purge`.
    pub fn redrive_or_purge(
        &self,
        project: &str,
        queue: &str,
        op: DeadOp,
        limit: u64,
        selector: &DeadSelector,
        cursor: &str,
    ) -> Result<DeadPass> {
        let redrive = matches!(op, DeadOp::Redrive { .. });
        let after = dead_position(cursor);
        self.with(project, queue, |q, _| {
            let matches = |task: &Record| match selector {
                DeadSelector::All => true,
                DeadSelector::Id(id) => &task.id == id,
                DeadSelector::Filter {
                    category,
                    dead_before_ms,
                } => {
                    (category.is_empty()
                        || task.err.last().is_some_and(|e| &e.category == category))
                        && (*dead_before_ms == 0
                            || task.dd.is_some_and(|d| ms(d) < *dead_before_ms))
                }
            };
            let looked: Vec<(u64, String)> = match selector {
                DeadSelector::Id(id) => q.dead.iter().filter(|(_, i)| i == id).cloned().collect(),
                _ => q
                    .dead
                    .iter()
                    .filter(|entry| after.as_ref().is_none_or(|a| *entry > a))
                    .take_while(|(score, _)| match selector {
                        DeadSelector::Filter { dead_before_ms, .. } if *dead_before_ms > 0 => {
                            score < dead_before_ms
                        }
                        _ => true,
                    })
                    .take(DEAD_SCAN)
                    .cloned()
                    .collect(),
            };
            let mut more = !matches!(selector, DeadSelector::Id(_)) && looked.len() == DEAD_SCAN;
            let room = match op {
                DeadOp::Redrive { max_size } if max_size > 0 => usize::try_from(max_size)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(q.size()),
                _ => usize::MAX,
            };
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            let (mut n, mut blocked, mut at) = (0, false, None);
            for entry in looked {
                let qualifies = q
                    .tasks
                    .get(&entry.1)
                    .is_some_and(|t| t.st == "dead" && matches(t));
                if qualifies {
                    if n >= limit || n >= room {
                        more = true;
                        blocked = n >= room;
                        break;
                    }
                    q.dead.remove(&entry);
                    let id = entry.1.clone();
                    if redrive {
                        if let Some(mut task) = q.tasks.remove(&id) {
                            task.att = 0;
                            task.dd = None;
                            q.make_ready(&mut task);
                            q.tasks.insert(id, task);
                        }
                    } else {
                        q.tasks.remove(&id);
                        q.payloads.remove(&id);
                        q.results.remove(&id);
                    }
                    n += 1;
                }
                at = Some(entry);
            }
            if n == 0 && blocked {
                let max_size = match op {
                    DeadOp::Redrive { max_size } => max_size,
                    DeadOp::Purge => 0,
                };
                return Err(no_room(queue, max_size));
            }
            let cursor = match at {
                Some((score, id)) if more && !matches!(selector, DeadSelector::Id(_)) => {
                    format!("{score} {id}")
                }
                _ => String::new(),
            };
            Ok(DeadPass {
                count: n as u64,
                more,
                cursor,
            })
        })
    }

    /// See `RedisQueue::auto_redrive`.
    pub fn auto_redrive(
        &self,
        project: &str,
        queue: &str,
        policy: &AutoRedrive,
        limit: u64,
        max_size: u64,
    ) -> Result<(u64, bool)> {
        self.with(project, queue, |q, now| {
            let mut room = if max_size > 0 {
                usize::try_from(max_size)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(q.size())
            } else {
                usize::MAX
            };
            let cool = u64::try_from(policy.after.as_millis()).unwrap_or(u64::MAX);
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            let due: Vec<(u64, String)> = q
                .dead
                .iter()
                .filter(|(score, _)| *score > q.auto_cursor && *score <= now.saturating_sub(cool))
                .take(limit)
                .cloned()
                .collect();
            let mut done = 0;
            let mut last = q.auto_cursor;
            let mut more = false;
            for entry in &due {
                match q.auto_redrive_one(entry, policy, &mut room) {
                    Some(redriven) => done += u64::from(redriven),
                    None => {
                        // The queue is full: look at this millisecond again next time.
                        last = entry.0 - 1;
                        more = true;
                        break;
                    }
                }
                last = entry.0;
            }
            if !more && due.len() == limit {
                more = true;
                // The rest of the last millisecond, so the cursor passes it without skipping.
                let rest: Vec<(u64, String)> = q
                    .dead
                    .range((last, String::new())..)
                    .take_while(|(score, _)| *score == last)
                    .cloned()
                    .collect();
                for entry in &rest {
                    match q.auto_redrive_one(entry, policy, &mut room) {
                        Some(redriven) => done += u64::from(redriven),
                        None => {
                            last -= 1;
                            break;
                        }
                    }
                }
            }
            q.auto_cursor = last;
            Ok((done, more))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Queues that any read makes are forgotten once empty and past the cut-off; a queue
    /// holding a task, a paused one, and one that took an enqueue since the cut-off stay.
    #[test]
    fn empty_idle_queues_are_forgotten() -> Result<()> {
        let store = EmbeddedQueue::new();
        for i in 0..100 {
            store.stats("p", &format!("probe{i}"))?;
        }
        store.set_paused("p", "paused", true)?;
        store.with("p", "holding", |q, _| {
            q.tasks.insert("t".into(), Record::default());
            Ok(())
        })?;
        store.with("p", "fresh", |q, now| {
            q.touched = now;
            Ok(())
        })?;
        // Queues only read never took an enqueue; "fresh" took one just now.
        for Registered { project, queue, .. } in store.registered().1 {
            store.retire(&project, &queue, 60_000);
        }
        let mut left: Vec<String> = store.registered().1.into_iter().map(|r| r.queue).collect();
        left.sort();
        assert_eq!(left, ["fresh", "holding", "paused"]);
        Ok(())
    }

    /// A filtered redrive looks at no more than `DEAD_SCAN` dead letters per call and hands
    /// back a cursor to go on from there (the Redis version: `queue_system.rs`).
    #[test]
    fn a_filtered_redrive_pages_with_a_cursor() -> Result<()> {
        let store = EmbeddedQueue::new();
        store.with("p", "q", |q, _| {
            for i in 0..=DEAD_SCAN as u64 {
                let id = format!("00000000-0000-7000-8000-{i:012}");
                let category = if i == DEAD_SCAN as u64 {
                    "transient"
                } else {
                    "permanent"
                };
                let task = Record {
                    id: id.clone(),
                    st: "dead".into(),
                    max: 1,
                    to: 60_000,
                    dd: Some((1_000 + i) as f64),
                    err: vec![ErrorRecord {
                        attempt: 1,
                        category: category.into(),
                        message: "boom".into(),
                        retryable: false,
                        at: (1_000 + i) as f64,
                    }],
                    ..Record::default()
                };
                q.dead.insert((1_000 + i, id.clone()));
                q.tasks.insert(id, task);
            }
            Ok(())
        })?;
        let transient = DeadSelector::Filter {
            category: "transient".into(),
            dead_before_ms: 0,
        };
        let redrive = DeadOp::Redrive { max_size: 0 };
        let first = store.redrive_or_purge("p", "q", redrive, 1000, &transient, "")?;
        assert_eq!((first.count, first.more), (0, true));
        let second = store.redrive_or_purge("p", "q", redrive, 1000, &transient, &first.cursor)?;
        assert_eq!(
            (second.count, second.more, second.cursor.as_str()),
            (1, false, "")
        );
        Ok(())
    }

    /// More dead letters died in one millisecond than one pass looks at: the cursor still
    /// passes that millisecond without skipping any, and a full queue holds the rest back.
    #[test]
    fn auto_redrive_skips_nothing_in_a_crowded_millisecond() -> Result<()> {
        let store = EmbeddedQueue::new();
        let policy = AutoRedrive {
            after: std::time::Duration::from_secs(1),
            categories: vec!["transient".into()],
            max: 3,
        };
        let died = store.now() - 5_000;
        store.with("p", "q", |q, _| {
            for i in 0..5 {
                let id = format!("t{i}");
                let error = ErrorRecord {
                    attempt: 1,
                    category: if i == 1 { "permanent" } else { "transient" }.into(),
                    message: "boom".into(),
                    retryable: i != 1,
                    at: died as f64,
                };
                let task = Record {
                    id: id.clone(),
                    st: "dead".into(),
                    att: 1,
                    max: 1,
                    to: 60_000,
                    err: vec![error],
                    ..Record::default()
                };
                q.dead.insert((died, id.clone()));
                q.tasks.insert(id, task);
            }
            Ok(())
        })?;
        // Room for 2 more tasks: the first pass stops when the queue is full.
        assert_eq!(store.auto_redrive("p", "q", &policy, 2, 2)?, (2, true));
        assert_eq!(store.auto_redrive("p", "q", &policy, 2, 2)?.0, 0, "full");
        // Unbounded: the rest of that millisecond, past the limit of 2, in one pass.
        assert_eq!(store.auto_redrive("p", "q", &policy, 2, 0)?, (2, true));
        assert_eq!(store.auto_redrive("p", "q", &policy, 2, 0)?, (0, false));
        let dead: Vec<String> = store.with("p", "q", |q, _| {
            Ok(q.dead.iter().map(|(_, id)| id.clone()).collect())
        })?;
        assert_eq!(dead, ["t1"], "only the permanent failure stays dead");
        Ok(())
    }
}
