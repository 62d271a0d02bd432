//! ListWorkers across instances. Each instance knows the Lease streams connected to it; on
//! Redis it also writes them, every [`PUBLISH_EVERY`], into one hash per project
//! (`keys::workers`), each entry under `<instance>/<stream>` with its own expiry
//! ([`ENTRY_TTL`], on the writer's clock) ahead of the encoded `WorkerInfo`. ListWorkers answers
//! this instance's streams live and the other instances' as last written (only its own when
//! Redis is unreachable); an instance that dies without cleaning up leaves entries that
//! expire, and the first ListWorkers to see them deletes them (the hash itself expires when no
//! instance writes it).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::now_ms;

use prost::Message as _;
use sluice::proto::sluice::queue::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::service::QueueService;

/// How often an instance writes its streams.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(2);
/// How long an entry stays valid without being written again.
pub const ENTRY_TTL: Duration = Duration::from_secs(15);
/// Most workers ListWorkers answers with.
pub const MAX_LISTED: usize = 1000;

/// An entry's value: its expiry (ms since the epoch, big-endian) and the encoded info.
fn entry(expires_ms: u64, info: &pb::WorkerInfo) -> Vec<u8> {
    let mut value = expires_ms.to_be_bytes().to_vec();
    info.encode(&mut value).unwrap_or_default();
    value
}

/// The info of an entry still valid at `now`, or `None` (expired or unreadable).
fn read_entry(value: &[u8], now: u64) -> Option<pb::WorkerInfo> {
    let (expiry, info) = value.split_first_chunk::<8>()?;
    if u64::from_be_bytes(*expiry) < now {
        return None;
    }
    pb::WorkerInfo::decode(info).ok()
}

/// Writes this instance's streams until `shutdown`, then removes them.
pub async fn publish(service: QueueService, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Per project, the fields this instance wrote last time.
    let mut written: HashMap<String, HashSet<String>> = HashMap::new();
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            () = shutdown.cancelled() => true,
        };
        let mut now: HashMap<String, Vec<(String, Vec<u8>)>> = HashMap::new();
        if !stopping {
            let expires =
                now_ms().saturating_add(u64::try_from(ENTRY_TTL.as_millis()).unwrap_or(0));
            for (stream, project, info) in service.workers().snapshot() {
                let field = format!("{}/{stream}", service.instance());
                now.entry(project)
                    .or_default()
                    .push((field, entry(expires, &info)));
            }
        }
        let projects: HashSet<String> = written.keys().chain(now.keys()).cloned().collect();
        let mut next: HashMap<String, HashSet<String>> = HashMap::new();
        for project in projects {
            let entries = now.remove(&project).unwrap_or_default();
            let fields: HashSet<String> = entries.iter().map(|(f, _)| f.clone()).collect();
            let gone: Vec<String> = written
                .get(&project)
                .map(|before| before.difference(&fields).cloned().collect())
                .unwrap_or_default();
            match service.store().put_workers(&project, &entries, &gone).await {
                Ok(()) => {
                    if !fields.is_empty() {
                        next.insert(project, fields);
                    }
                }
                Err(err) => {
                    tracing::debug!(project, error = %err, "could not write the worker roster");
                    // Try the removals again next time.
                    let mut keep = fields;
                    keep.extend(gone);
                    next.insert(project, keep);
                }
            }
        }
        written = next;
        if stopping {
            return;
        }
    }
}

/// The workers of `project` (on `queue`, when not empty) across instances, ordered by
/// worker id, at most [`MAX_LISTED`]; and whether the list was cut.
pub async fn list(
    service: &QueueService,
    project: &str,
    queue: &str,
) -> (Vec<pb::WorkerInfo>, bool) {
    let mut workers = service.workers().list(project, queue);
    let own = format!("{}/", service.instance());
    let now = now_ms();
    let mut expired = Vec::new();
    // Without Redis, this instance's own streams are still known: answer those.
    let roster = match service.store().workers(project).await {
        Ok(roster) => roster,
        Err(err) => {
            tracing::warn!(project, error = %err, "ListWorkers: the roster is unreachable; listing this instance's workers only");
            Vec::new()
        }
    };
    for (field, value) in roster {
        if field.starts_with(&own) {
            continue; // this instance's streams are listed live above
        }
        match read_entry(&value, now) {
            Some(info) => {
                if queue.is_empty() || info.queues.iter().any(|q| q == queue) {
                    workers.push(info);
                }
            }
            None => expired.push(field),
        }
    }
    if !expired.is_empty()
        && let Err(err) = service.store().put_workers(project, &[], &expired).await
    {
        tracing::debug!(project, error = %err, "could not remove expired roster entries");
    }
    workers.sort_by(|a, b| {
        (a.worker_id.as_str(), a.instance.as_str())
            .cmp(&(b.worker_id.as_str(), b.instance.as_str()))
    });
    let truncated = workers.len() > MAX_LISTED;
    workers.truncate(MAX_LISTED);
    (workers, truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_carry_their_expiry() {
        let info = pb::WorkerInfo {
            worker_id: "w1".into(),
            queues: vec!["q".into()],
            ..Default::default()
        };
        let value = entry(1_000, &info);
        assert_eq!(read_entry(&value, 999), Some(info.clone()));
        assert_eq!(read_entry(&value, 1_000), Some(info));
        assert_eq!(read_entry(&value, 1_001), None, "expired");
        assert_eq!(read_entry(&value[..5], 0), None, "truncated");
    }
}
