//! Metric label values for queue names, which clients choose: every distinct name would add
//! series to each per-queue metric for the life of the process. The first [`MAX_QUEUES`] names
//! an instance sees (since it started; a series, once made, stays) get series of their own;
//! later ones are counted together under [`OTHER`], and their depth gauges are left out
//! (GetQueueStats still answers for them). Depth gauges go only to queues that held something.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

/// Queue names (for counters and histograms) and project-queue pairs (for depth gauges) an
/// instance gives series of their own.
pub const MAX_QUEUES: usize = 1000;

/// The `queue` label of queues past [`MAX_QUEUES`]; no queue name can be it (`~` is not
/// allowed in names).
pub const OTHER: &str = "~other";

/// Names admitted so far, each set bounded by [`MAX_QUEUES`].
#[derive(Default)]
struct Admitted {
    queues: HashSet<String>,
    pairs: HashSet<(String, String)>,
}

fn admitted() -> &'static Mutex<Admitted> {
    static ADMITTED: OnceLock<Mutex<Admitted>> = OnceLock::new();
    ADMITTED.get_or_init(Mutex::default)
}

/// The `queue` label of counters and histograms for `queue`.
pub fn queue(queue: &str) -> String {
    let Ok(mut admitted) = admitted().lock() else {
        return OTHER.to_owned();
    };
    let admitted = &mut admitted.queues;
    if admitted.contains(queue) {
        queue.to_owned()
    } else if admitted.len() < MAX_QUEUES {
        admitted.insert(queue.to_owned());
        queue.to_owned()
    } else {
        OTHER.to_owned()
    }
}

/// Whether `project`'s `queue` has depth gauges of its own (a gauge cannot be shared). With
/// `admit`, a queue that has none yet gets them while there is room; without, only a queue
/// that has them already says yes (an empty queue need not take a place to report zeros).
pub fn has_depth_gauges(project: &str, queue: &str, admit: bool) -> bool {
    let Ok(mut admitted) = admitted().lock() else {
        return false;
    };
    let pairs = &mut admitted.pairs;
    let pair = (project.to_owned(), queue.to_owned());
    if pairs.contains(&pair) {
        true
    } else if admit && pairs.len() < MAX_QUEUES {
        pairs.insert(pair);
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past the bound new names share `OTHER` and get no gauges; names admitted before keep
    /// their own. (One test: the admitted sets are process-wide.)
    #[test]
    fn names_past_the_bound_share_one_label() {
        for i in 0..MAX_QUEUES {
            assert_eq!(queue(&format!("q{i}")), format!("q{i}"));
            assert!(!has_depth_gauges("p", &format!("q{i}"), false));
            assert!(has_depth_gauges("p", &format!("q{i}"), true));
        }
        assert_eq!(queue("late"), OTHER);
        assert!(!has_depth_gauges("p", "late", true));
        assert!(!has_depth_gauges("other-project", "q0", true));
        assert_eq!(queue("q7"), "q7");
        assert!(has_depth_gauges("p", "q7", false));
    }
}
