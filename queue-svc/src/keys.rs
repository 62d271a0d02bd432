//! Every Redis key queue-svc touches is named here, and nowhere else.
//!
//! Hash-tag rule: all keys of one queue are `sluice:q:{<project>/<queue>}:<part>`; the tag is
//! the project and the queue, so one queue's keys share a Redis Cluster slot and every script
//! (which always receives all fifteen, see `lua/common.lua`) runs there. Project and queue
//! names are validated to `[A-Za-z0-9_.-]` (no `/`, `{`, `}`), so no name can reach another
//! project's keys or break the tag. The registry of known queues and the per-project worker
//! rosters are the keys outside any queue's tag; no queue script touches them.

/// The parts of a queue, in the order the scripts expect them as KEYS.
const PARTS: [&str; 15] = [
    "tasks", "payloads", "sched", "leased", "dead", "done", "idem", "idemx", "meta", "results",
    "ready0", "ready1", "ready2", "ready3", "ready4",
];

/// The fifteen keys of one queue.
pub fn queue(project: &str, queue: &str) -> Vec<String> {
    let prefix = format!("sluice:q:{{{project}/{queue}}}:");
    PARTS
        .iter()
        .map(|part| {
            let mut key = String::with_capacity(prefix.len() + part.len());
            key.push_str(&prefix);
            key.push_str(part);
            key
        })
        .collect()
}

/// The sorted set of every `<project>/<queue>` the reaper walks, each scored with the time (ms,
/// Redis's clock) an instance last registered it. Instances register a queue they enqueue into at least every
/// few minutes; the reaper drops a queue whose score is an hour old and whose keys are empty
/// (see `reaper`), so names used once do not stay forever.
pub const REGISTRY: &str = "sluice:q:queues";

/// The plain set of earlier versions, whose members the reaper moves into [`REGISTRY`].
pub const LEGACY_REGISTRY: &str = "sluice:q:registry";

/// The hash of `project`'s Lease-stream workers across instances (see `roster`).
pub fn workers(project: &str) -> String {
    format!("sluice:q:workers:{{{project}}}")
}

/// A registry member.
pub fn registry_member(project: &str, queue: &str) -> String {
    format!("{project}/{queue}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_tag_per_queue() {
        let keys = queue("acme", "emails");
        assert_eq!(keys.len(), 15);
        assert!(
            keys.iter()
                .all(|k| k.starts_with("sluice:q:{acme/emails}:"))
        );
    }
}
