//! The queues file: per-queue settings over defaults. Queues not in the file get the defaults.
//!
//! ```toml
//! [defaults]
//! max_size = 1000000            # ready + scheduled + leased; 0 = unbounded
//! processing_timeout = "10m"    # the lease length when a task or Dequeue names none
//! max_attempts = 3
//! retention = "24h"             # finished tasks (and idempotency keys) are kept this long
//! dead_retention = "336h"       # dead letters are kept this long
//! retry = { kind = "exponential", initial = "1s", max = "1h", multiplier = 2.0, jitter = 1.0 }
//!
//! [queues.emails]               # any project's queue "emails"
//! max_attempts = 5
//!
//! [queues."acme/reports"]       # only project acme's queue "reports"
//! max_size = 1000
//! processing_timeout = "1h"
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use sluice::config::parse_duration;

use crate::model::{MAX_ATTEMPTS, RetryPolicy};

/// Settings of one queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSettings {
    /// Most ready + scheduled + leased tasks; 0 = unbounded.
    pub max_size: u64,
    /// Default lease length.
    pub processing_timeout: Duration,
    /// Default attempts.
    pub max_attempts: u32,
    /// Default retry policy.
    pub retry: RetryPolicy,
    /// How long finished tasks and idempotency keys are kept.
    pub retention: Duration,
    /// How long dead letters are kept.
    pub dead_retention: Duration,
    /// Dead letters the reaper brings back by itself (off unless configured).
    pub auto_redrive: Option<AutoRedrive>,
}

/// Auto-redrive of dead letters after a cool-down.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoRedrive {
    /// How long a task stays dead before it is brought back.
    pub after: Duration,
    /// Failure categories (of its last failure) brought back.
    pub categories: Vec<String>,
    /// Most times one task is brought back; then it stays dead.
    pub max: u32,
}

/// Categories auto-redrive may bring back: never `permanent`, which says retrying is useless.
const REDRIVABLE: [&str; 4] = ["transient", "timeout", "resource", "unknown"];

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            max_size: 1_000_000,
            processing_timeout: Duration::from_secs(600),
            max_attempts: 3,
            retry: RetryPolicy::default(),
            retention: Duration::from_secs(24 * 3600),
            dead_retention: Duration::from_secs(14 * 24 * 3600),
            auto_redrive: None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsSpec {
    max_size: Option<u64>,
    processing_timeout: Option<String>,
    max_attempts: Option<u32>,
    retention: Option<String>,
    dead_retention: Option<String>,
    retry: Option<RetrySpec>,
    auto_redrive: Option<AutoRedriveSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AutoRedriveSpec {
    after: Option<String>,
    categories: Option<Vec<String>>,
    max: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetrySpec {
    kind: Option<String>,
    initial: Option<String>,
    max: Option<String>,
    multiplier: Option<f64>,
    jitter: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    #[serde(default)]
    defaults: SettingsSpec,
    #[serde(default)]
    queues: HashMap<String, SettingsSpec>,
}

/// Every queue's settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Queues {
    defaults: QueueSettings,
    by_name: HashMap<String, QueueSettings>,
}

fn apply(base: &QueueSettings, spec: &SettingsSpec, at: &str) -> anyhow::Result<QueueSettings> {
    let dur = |v: &Option<String>, name: &str, default: Duration| -> anyhow::Result<Duration> {
        match v {
            Some(text) => parse_duration(text).map_err(|e| anyhow::anyhow!("{at}.{name}: {e}")),
            None => Ok(default),
        }
    };
    let mut out = base.clone();
    out.max_size = spec.max_size.unwrap_or(base.max_size);
    out.processing_timeout = dur(
        &spec.processing_timeout,
        "processing_timeout",
        base.processing_timeout,
    )?;
    out.max_attempts = spec.max_attempts.unwrap_or(base.max_attempts);
    anyhow::ensure!(
        (1..=MAX_ATTEMPTS).contains(&out.max_attempts),
        "{at}.max_attempts: must be 1 to {MAX_ATTEMPTS}"
    );
    anyhow::ensure!(
        out.processing_timeout >= Duration::from_secs(1),
        "{at}.processing_timeout: at least 1s"
    );
    out.retention = dur(&spec.retention, "retention", base.retention)?;
    out.dead_retention = dur(&spec.dead_retention, "dead_retention", base.dead_retention)?;
    if let Some(a) = &spec.auto_redrive {
        let policy = AutoRedrive {
            after: dur(&a.after, "auto_redrive.after", Duration::from_secs(300))?,
            categories: a
                .categories
                .clone()
                .unwrap_or_else(|| vec!["transient".into(), "timeout".into(), "resource".into()]),
            max: a.max.unwrap_or(3),
        };
        anyhow::ensure!(
            policy.after >= Duration::from_secs(1),
            "{at}.auto_redrive.after: at least 1s"
        );
        anyhow::ensure!(
            (1..=100).contains(&policy.max),
            "{at}.auto_redrive.max: 1 to 100"
        );
        anyhow::ensure!(
            !policy.categories.is_empty(),
            "{at}.auto_redrive.categories: name at least one of {REDRIVABLE:?}"
        );
        for c in &policy.categories {
            anyhow::ensure!(
                REDRIVABLE.contains(&c.as_str()),
                "{at}.auto_redrive.categories: `{c}`; use some of {REDRIVABLE:?} (permanent failures are never redriven by themselves)"
            );
        }
        out.auto_redrive = Some(policy);
    }
    if let Some(r) = &spec.retry {
        let ms = |v: &Option<String>, name: &str, default: u64| -> anyhow::Result<u64> {
            Ok(match v {
                Some(_) => {
                    u64::try_from(dur(v, &format!("retry.{name}"), Duration::ZERO)?.as_millis())?
                }
                None => default,
            })
        };
        out.retry = RetryPolicy {
            kind: match r.kind.as_deref() {
                None | Some("exponential") => 0,
                Some("linear") => 1,
                Some("fixed") => 2,
                Some(other) => {
                    anyhow::bail!("{at}.retry.kind: `{other}`; use exponential, linear or fixed")
                }
            },
            initial_ms: ms(&r.initial, "initial", base.retry.initial_ms)?,
            max_ms: ms(&r.max, "max", base.retry.max_ms)?,
            multiplier: r.multiplier.unwrap_or(base.retry.multiplier),
            jitter: r.jitter.unwrap_or(base.retry.jitter),
        };
        anyhow::ensure!(
            (0.0..=1.0).contains(&out.retry.jitter),
            "{at}.retry.jitter: 0 to 1"
        );
        anyhow::ensure!(
            (1.0..=100.0).contains(&out.retry.multiplier),
            "{at}.retry.multiplier: 1 to 100"
        );
    }
    Ok(out)
}

impl Queues {
    /// Parses a queues file.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let spec: FileSpec = toml::from_str(text)?;
        let defaults = apply(&QueueSettings::default(), &spec.defaults, "defaults")?;
        let mut by_name = HashMap::new();
        for (name, q) in &spec.queues {
            by_name.insert(
                name.clone(),
                apply(&defaults, q, &format!("queues.{name}"))?,
            );
        }
        Ok(Self { defaults, by_name })
    }

    /// Loads `path`, or the defaults when `None`.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        match path {
            None => Ok(Self::default()),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("--queues {}: {e}", path.display()))?;
                Self::parse(&text).map_err(|e| anyhow::anyhow!("--queues {}: {e}", path.display()))
            }
        }
    }

    /// The settings of `project`'s `queue`.
    pub fn get(&self, project: &str, queue: &str) -> &QueueSettings {
        if self.by_name.is_empty() {
            return &self.defaults;
        }
        self.by_name
            .get(&format!("{project}/{queue}"))
            .or_else(|| self.by_name.get(queue))
            .unwrap_or(&self.defaults)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specific_beats_named_beats_defaults() {
        let q = Queues::parse(
            "[defaults]\nmax_attempts = 4\n[queues.emails]\nmax_size = 10\n[queues.\"acme/emails\"]\nmax_size = 5\n",
        )
        .expect("valid");
        assert_eq!(q.get("acme", "emails").max_size, 5);
        assert_eq!(q.get("other", "emails").max_size, 10);
        assert_eq!(
            q.get("other", "emails").max_attempts,
            4,
            "inherits the defaults"
        );
        assert_eq!(q.get("other", "x").max_size, 1_000_000);
        assert!(Queues::parse("[defaults]\nmax_attempts = 0\n").is_err());
        assert!(Queues::parse("[defaults]\nbogus = 1\n").is_err());
        let auto =
            Queues::parse("[queues.mail]\nauto_redrive = { after = \"10m\" }\n").expect("valid");
        assert_eq!(
            auto.get("p", "mail").auto_redrive,
            Some(AutoRedrive {
                after: Duration::from_secs(600),
                categories: vec!["transient".into(), "timeout".into(), "resource".into()],
                max: 3,
            })
        );
        assert_eq!(auto.get("p", "other").auto_redrive, None, "off by default");
        for bad in [
            "auto_redrive = { categories = [\"permanent\"] }",
            "auto_redrive = { categories = [] }",
            "auto_redrive = { max = 0 }",
            "auto_redrive = { after = \"0s\" }",
        ] {
            let err = Queues::parse(&format!("[queues.mail]\n{bad}\n")).expect_err(bad);
            assert!(err.to_string().contains("auto_redrive"), "{bad}: {err}");
        }
    }
}
