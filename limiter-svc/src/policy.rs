//! Policies: the limits file, parsed and validated, and how a check finds its limit.
//!
//! ```toml
//! failure_mode = "local"           # default for policies that set none, and inline limits
//!
//! [policies.user]                  # the seed defaults, overridable: user 1000/h,
//! limit = 1000                     # project 5000/h, ip 100/min
//! window = "1h"
//!
//! [policies.analysis]
//! algorithm = "token_bucket"       # sliding_window_log (default), sliding_window_counter,
//! limit = 20                       # fixed_window, token_bucket, gcra
//! window = "1h"
//! burst = 5
//! shadow = true                    # evaluate and report, never deny
//! failure_mode = "fail_closed"     # fail_open | fail_closed | local
//!
//! [scopes]                         # default policy per scope
//! api_key = "analysis"
//!
//! [endpoints]                      # endpoint tiers: scope "endpoint", subject → policy
//! "/v1/analysis" = "analysis"
//!
//! [[rls]]                          # Envoy RLS: a domain and its descriptor rules
//! domain = "edge"
//! rules = [
//!   { match = ["remote_address"], policy = "ip" },          # any value, a counter per value
//!   { match = ["path=/api/*", "user"], limit = 10, window = "1s" },
//! ]
//! ```
//!
//! The file is reloaded when it changes and then stays the same for one more look (a file
//! caught mid-write is never applied); a file that fails to parse or validate is logged and
//! ignored, and the policies in force stay.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;
use sluice::config::parse_duration;
use sluice::error::{Error, Result};

use crate::algorithm::Algorithm;
use crate::keys::is_name_byte;

/// What a policy does when the store is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Allow every request.
    FailOpen,
    /// Deny every request (UNAVAILABLE).
    FailClosed,
    /// Count in this process with the same algorithm: approximate across instances.
    Local,
}

/// Largest limit of the sliding window log, whose memory grows with it (a member per unit).
pub const MAX_LOG_LIMIT: u64 = 100_000;
/// Largest limit or burst of the other algorithms.
pub const MAX_LIMIT: u64 = 1_000_000_000;
/// Longest window: 366 days.
pub const MAX_WINDOW: Duration = Duration::from_secs(366 * 24 * 3600);
/// Shortest window.
pub const MIN_WINDOW: Duration = Duration::from_millis(1);

/// A validated limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    /// How it counts.
    pub algorithm: Algorithm,
    /// Units per window.
    pub limit: u64,
    /// The window (the refill period of the bucket algorithms).
    pub window: Duration,
    /// Bucket capacity of token bucket and GCRA (0 = `limit`).
    pub burst: u64,
}

impl Limit {
    /// Validates the numbers; errors name `field` (e.g. `checks[0].inline`).
    pub fn new(
        algorithm: Algorithm,
        limit: u64,
        window: Duration,
        burst: u64,
        field: impl std::fmt::Display,
    ) -> Result<Self> {
        if limit == 0 {
            return Err(Error::invalid(
                format!("{field}.limit"),
                "must be at least 1",
            ));
        }
        let max = if algorithm == Algorithm::SlidingWindowLog {
            MAX_LOG_LIMIT
        } else {
            MAX_LIMIT
        };
        if limit > max {
            return Err(Error::invalid(
                format!("{field}.limit"),
                format!("{limit} is above {max}, the most {algorithm:?} takes"),
            ));
        }
        if window < MIN_WINDOW || window > MAX_WINDOW {
            return Err(Error::invalid(
                format!("{field}.window"),
                format!("{window:?} is outside 1ms..=366 days"),
            ));
        }
        if burst > 0 && !algorithm.has_burst() {
            return Err(Error::invalid(
                format!("{field}.burst"),
                format!("{algorithm:?} takes no burst; leave it 0 or use token_bucket / gcra"),
            ));
        }
        if burst > MAX_LIMIT {
            return Err(Error::invalid(
                format!("{field}.burst"),
                format!("{burst} is above {MAX_LIMIT}"),
            ));
        }
        Ok(Self {
            algorithm,
            limit,
            window,
            burst,
        })
    }

    /// Units one request may take at most: the window's limit, or the bucket's capacity.
    pub fn capacity(&self) -> u64 {
        if self.algorithm.has_burst() && self.burst > 0 {
            self.burst
        } else {
            self.limit
        }
    }

    /// A name for an inline limit, part of its counter key: the same numbers share a counter.
    pub fn inline_name(&self) -> String {
        // Written digit by digit: this runs for every inline check.
        let mut digits = itoa::Buffer::new();
        let mut name = String::with_capacity(64);
        name.push_str("inline-");
        name.push_str(digits.format(self.limit));
        name.push('-');
        name.push_str(digits.format(self.window.as_micros()));
        name.push('-');
        name.push_str(digits.format(self.burst));
        name
    }
}

/// A named limit with its behaviour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Its name ("" for an inline limit).
    pub name: String,
    /// Its limit.
    pub limit: Limit,
    /// Evaluate and report, never deny.
    pub shadow: bool,
    /// What to do when the store is unreachable.
    pub failure_mode: FailureMode,
}

/// One Envoy RLS descriptor entry pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryPattern {
    /// `key`: any value; each value counts separately.
    Any(String),
    /// `key=value`.
    Exact(String, String),
    /// `key=prefix*`.
    Prefix(String, String),
}

impl EntryPattern {
    fn parse(text: &str) -> Self {
        match text.split_once('=') {
            None => Self::Any(text.to_owned()),
            Some((key, value)) => match value.strip_suffix('*') {
                Some(prefix) => Self::Prefix(key.to_owned(), prefix.to_owned()),
                None => Self::Exact(key.to_owned(), value.to_owned()),
            },
        }
    }

    /// True when (`key`, `value`) matches.
    pub fn matches(&self, key: &str, value: &str) -> bool {
        match self {
            Self::Any(k) => k == key,
            Self::Exact(k, v) => k == key && v == value,
            Self::Prefix(k, p) => k == key && value.starts_with(p.as_str()),
        }
    }
}

/// A descriptor rule of one RLS domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RlsRule {
    /// The entry patterns, in order; a descriptor matches with exactly these entries.
    pub entries: Vec<EntryPattern>,
    /// The policy its counters follow.
    pub policy: Arc<Policy>,
}

/// The scopes every limiter knows; a check may also name a custom one.
pub const BUILT_IN_SCOPES: [&str; 5] = ["user", "project", "ip", "endpoint", "api_key"];

/// The metrics' `scope` label of a custom scope the limits file gives no default.
pub const CUSTOM_SCOPE: &str = "custom";

/// Every policy in force; swapped whole on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policies {
    named: HashMap<String, Arc<Policy>>,
    scopes: HashMap<String, Arc<Policy>>,
    endpoints: HashMap<String, Arc<Policy>>,
    rls: HashMap<String, Vec<RlsRule>>,
    /// Failure mode of inline limits.
    pub default_failure_mode: FailureMode,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    failure_mode: Option<FailureMode>,
    #[serde(default)]
    policies: BTreeMap<String, PolicySpec>,
    #[serde(default)]
    scopes: BTreeMap<String, String>,
    #[serde(default)]
    endpoints: BTreeMap<String, String>,
    #[serde(default)]
    rls: Vec<DomainSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicySpec {
    algorithm: Option<Algorithm>,
    limit: u64,
    window: String,
    #[serde(default)]
    burst: u64,
    #[serde(default)]
    shadow: bool,
    failure_mode: Option<FailureMode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DomainSpec {
    domain: String,
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    #[serde(rename = "match")]
    entries: Vec<String>,
    policy: Option<String>,
    algorithm: Option<Algorithm>,
    limit: Option<u64>,
    window: Option<String>,
    #[serde(default)]
    burst: u64,
    #[serde(default)]
    shadow: bool,
    failure_mode: Option<FailureMode>,
}

/// Validates a scope or policy name; errors name `field`.
pub fn validate_name(value: &str, field: impl std::fmt::Display) -> Result<()> {
    if value.is_empty() || value.len() > 64 {
        return Err(Error::invalid(
            field.to_string(),
            format!("must be 1 to 64 bytes, got {}", value.len()),
        ));
    }
    if !value.bytes().all(is_name_byte) {
        return Err(Error::invalid(
            field.to_string(),
            format!("`{value}` may use only A-Z a-z 0-9 _ . -"),
        ));
    }
    Ok(())
}

impl Policies {
    /// The seed defaults: user 1000/hour, project 5000/hour, ip 100/minute, each the default
    /// of its scope; sliding window log; failure mode `local`.
    pub fn seed() -> Self {
        Self::from_spec(FileSpec {
            failure_mode: None,
            policies: BTreeMap::new(),
            scopes: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            rls: Vec::new(),
        })
        .unwrap_or_else(|e| unreachable!("the seed policies are valid: {e}"))
    }

    /// Parses a limits file over the seed defaults.
    pub fn parse(text: &str) -> Result<Self> {
        let spec: FileSpec =
            toml::from_str(text).map_err(|e| Error::invalid("limits file", e.to_string()))?;
        Self::from_spec(spec)
    }

    fn from_spec(mut spec: FileSpec) -> Result<Self> {
        let default_failure_mode = spec.failure_mode.unwrap_or(FailureMode::Local);
        for (name, limit, window) in [
            ("user", 1000, "1h"),
            ("project", 5000, "1h"),
            ("ip", 100, "1m"),
        ] {
            spec.policies.entry(name.to_owned()).or_insert(PolicySpec {
                algorithm: None,
                limit,
                window: window.to_owned(),
                burst: 0,
                shadow: false,
                failure_mode: None,
            });
            spec.scopes
                .entry(name.to_owned())
                .or_insert_with(|| name.to_owned());
        }
        let mut named = HashMap::new();
        for (name, p) in &spec.policies {
            let field = format!("policies.{name}");
            validate_name(name, &field)?;
            let limit = limit_of(p.algorithm, p.limit, &p.window, p.burst, &field)?;
            named.insert(
                name.clone(),
                Arc::new(Policy {
                    name: name.clone(),
                    limit,
                    shadow: p.shadow,
                    failure_mode: p.failure_mode.unwrap_or(default_failure_mode),
                }),
            );
        }
        let lookup = |policy: &str, field: &str| {
            named
                .get(policy)
                .cloned()
                .ok_or_else(|| Error::invalid(field, format!("no policy named `{policy}`")))
        };
        let mut scopes = HashMap::new();
        for (scope, policy) in &spec.scopes {
            validate_name(scope, format!("scopes.{scope}"))?;
            scopes.insert(scope.clone(), lookup(policy, &format!("scopes.{scope}"))?);
        }
        let mut endpoints = HashMap::new();
        for (endpoint, policy) in &spec.endpoints {
            endpoints.insert(
                endpoint.clone(),
                lookup(policy, &format!("endpoints.{endpoint}"))?,
            );
        }
        let mut rls = HashMap::new();
        for (d, domain) in spec.rls.iter().enumerate() {
            if domain.domain.is_empty() {
                return Err(Error::invalid(
                    format!("rls[{d}].domain"),
                    "must not be empty",
                ));
            }
            let mut rules = Vec::new();
            for (r, rule) in domain.rules.iter().enumerate() {
                let field = format!("rls[{d}].rules[{r}]");
                if rule.entries.is_empty() {
                    return Err(Error::invalid(
                        format!("{field}.match"),
                        "needs at least one entry",
                    ));
                }
                let policy = match (&rule.policy, rule.limit, &rule.window) {
                    (Some(name), None, None) => lookup(name, &format!("{field}.policy"))?,
                    (None, Some(limit), Some(window)) => Arc::new(Policy {
                        name: format!("{}.{r}", domain.domain),
                        limit: limit_of(rule.algorithm, limit, window, rule.burst, &field)?,
                        shadow: rule.shadow,
                        failure_mode: rule.failure_mode.unwrap_or(default_failure_mode),
                    }),
                    _ => {
                        return Err(Error::invalid(
                            field,
                            "set either `policy`, or `limit` and `window` (not both)",
                        ));
                    }
                };
                rules.push(RlsRule {
                    entries: rule
                        .entries
                        .iter()
                        .map(|e| EntryPattern::parse(e))
                        .collect(),
                    policy,
                });
            }
            rls.insert(domain.domain.clone(), rules);
        }
        Ok(Self {
            named,
            scopes,
            endpoints,
            rls,
            default_failure_mode,
        })
    }

    /// The policy named `name`.
    pub fn named(&self, name: &str) -> Option<&Arc<Policy>> {
        self.named.get(name)
    }

    /// Whether `scope` is built in ([`BUILT_IN_SCOPES`]) or has a default in the limits file.
    /// Metrics name such scopes; others, which callers may make up freely, count as
    /// [`CUSTOM_SCOPE`], so that the label's values stay bounded.
    pub fn knows_scope(&self, scope: &str) -> bool {
        BUILT_IN_SCOPES.contains(&scope) || self.scopes.contains_key(scope)
    }

    /// The default policy of a check that names none: an endpoint tier for scope `endpoint`,
    /// else the scope's default.
    pub fn default_for(&self, scope: &str, subject: &str) -> Option<&Arc<Policy>> {
        if scope == "endpoint"
            && let Some(policy) = self.endpoints.get(subject)
        {
            return Some(policy);
        }
        self.scopes.get(scope)
    }

    /// The rules of an RLS domain.
    pub fn rls_rules(&self, domain: &str) -> Option<&[RlsRule]> {
        self.rls.get(domain).map(Vec::as_slice)
    }
}

fn limit_of(
    algorithm: Option<Algorithm>,
    limit: u64,
    window: &str,
    burst: u64,
    field: &str,
) -> Result<Limit> {
    let window =
        parse_duration(window).map_err(|e| Error::invalid(format!("{field}.window"), e))?;
    Limit::new(
        algorithm.unwrap_or(Algorithm::SlidingWindowLog),
        limit,
        window,
        burst,
        field,
    )
}

/// The policies in force, and the file they come from.
#[derive(Debug)]
pub struct PolicyStore {
    current: RwLock<Arc<Policies>>,
    path: Option<PathBuf>,
    loaded_text: RwLock<Option<String>>,
    /// A changed text seen once; applied when the next look finds it unchanged, so a file
    /// caught mid-write (truncated, half written) is never applied.
    pending_text: RwLock<Option<String>>,
}

impl PolicyStore {
    /// Loads `path` (or the seed defaults when `None`); a bad file at start is an error.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let (policies, text) = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("--limits {}: {e}", path.display()))?;
                let policies = Policies::parse(&text)
                    .map_err(|e| anyhow::anyhow!("--limits {}: {e}", path.display()))?;
                (policies, Some(text))
            }
            None => (Policies::seed(), None),
        };
        Ok(Self {
            current: RwLock::new(Arc::new(policies)),
            path: path.map(Path::to_path_buf),
            loaded_text: RwLock::new(text),
            pending_text: RwLock::new(None),
        })
    }

    /// A store holding `policies`, with no file behind it.
    pub fn fixed(policies: Policies) -> Self {
        Self {
            current: RwLock::new(Arc::new(policies)),
            path: None,
            loaded_text: RwLock::new(None),
            pending_text: RwLock::new(None),
        }
    }

    /// The policies in force; cheap, never blocks on a reload.
    pub fn current(&self) -> Arc<Policies> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Re-reads the file; swaps the policies if it changed, has stayed the same since the
    /// previous look, and is valid. Returns whether the policies changed.
    pub fn reload(&self) -> bool {
        let Some(path) = &self.path else {
            return false;
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) => {
                tracing::error!(path = %path.display(), error = %err, "limits file unreadable; keeping the policies in force");
                return false;
            }
        };
        let unchanged = self
            .loaded_text
            .read()
            .map(|loaded| loaded.as_deref() == Some(text.as_str()))
            .unwrap_or(false);
        if unchanged {
            return false;
        }
        // A new text waits one look: a writer may be halfway through the file.
        let settled = match self.pending_text.write() {
            Ok(mut pending) => {
                let settled = pending.as_deref() == Some(text.as_str());
                *pending = if settled { None } else { Some(text.clone()) };
                settled
            }
            Err(_) => true,
        };
        if !settled {
            return false;
        }
        let result = Policies::parse(&text);
        if let Ok(mut loaded) = self.loaded_text.write() {
            *loaded = Some(text);
        }
        match result {
            Ok(policies) => {
                if let Ok(mut current) = self.current.write() {
                    *current = Arc::new(policies);
                }
                tracing::info!(path = %path.display(), "limits file reloaded");
                true
            }
            Err(err) => {
                tracing::error!(path = %path.display(), error = %err, "limits file rejected; keeping the policies in force");
                false
            }
        }
    }

    /// Reloads every `interval` until `shutdown`.
    pub async fn watch(
        self: Arc<Self>,
        interval: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        if self.path.is_none() {
            return;
        }
        sluice::shutdown::every(interval, &shutdown, || {
            self.reload();
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The name is part of the counter keys already in Redis: it must not change.
    #[test]
    fn inline_limits_name_their_counters_by_their_numbers() -> Result<()> {
        let limit = Limit::new(
            Algorithm::TokenBucket,
            100,
            Duration::from_millis(1500),
            250,
            "inline",
        )?;
        assert_eq!(limit.inline_name(), "inline-100-1500000-250");
        Ok(())
    }

    #[test]
    fn a_changed_file_applies_once_it_has_settled() -> anyhow::Result<()> {
        let path = std::env::temp_dir().join(format!(
            "sluice-limits-{}-{}.toml",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        ));
        let limit_of_p = |store: &PolicyStore| store.current().named("p").map(|p| p.limit.limit);
        std::fs::write(&path, "[policies.p]\nlimit = 1\nwindow = \"1h\"\n")?;
        let store = PolicyStore::load(Some(&path))?;
        assert_eq!(limit_of_p(&store), Some(1));
        // A writer caught halfway: an empty file, then the full one.
        std::fs::write(&path, "")?;
        assert!(!store.reload(), "seen once: waits");
        std::fs::write(&path, "[policies.p]\nlimit = 3\nwindow = \"1h\"\n")?;
        assert!(!store.reload(), "changed again: waits");
        assert_eq!(
            limit_of_p(&store),
            Some(1),
            "the empty file was never applied"
        );
        assert!(store.reload(), "unchanged since the last look: applied");
        assert_eq!(limit_of_p(&store), Some(3));
        assert!(!store.reload(), "nothing new");
        std::fs::remove_file(&path)?;
        Ok(())
    }

    #[test]
    fn seed_defaults() {
        let p = Policies::seed();
        let user = p.default_for("user", "42").expect("user default");
        assert_eq!(
            (user.limit.limit, user.limit.window),
            (1000, Duration::from_secs(3600))
        );
        assert_eq!(
            p.default_for("project", "x").map(|p| p.limit.limit),
            Some(5000)
        );
        let ip = p.default_for("ip", "1.2.3.4").expect("ip default");
        assert_eq!(
            (ip.limit.limit, ip.limit.window),
            (100, Duration::from_secs(60))
        );
        assert!(p.default_for("custom", "x").is_none());
    }

    #[test]
    fn file_with_tiers_shadow_and_rls() {
        let p = Policies::parse(
            r#"
            failure_mode = "fail_open"
            [policies.analysis]
            algorithm = "token_bucket"
            limit = 20
            window = "1h"
            burst = 5
            shadow = true
            [endpoints]
            "/v1/analysis" = "analysis"
            [[rls]]
            domain = "edge"
            rules = [ { match = ["remote_address"], policy = "ip" },
                      { match = ["path=/api/*", "user"], limit = 10, window = "1s" } ]
            "#,
        )
        .expect("valid");
        let tier = p.default_for("endpoint", "/v1/analysis").expect("tier");
        assert_eq!(tier.name, "analysis");
        assert!(tier.shadow);
        assert_eq!(tier.failure_mode, FailureMode::FailOpen);
        assert_eq!(
            p.default_for("endpoint", "/other").map(|p| p.name.as_str()),
            None
        );
        let rules = p.rls_rules("edge").expect("domain");
        assert!(rules[1].entries[0].matches("path", "/api/v1"));
        assert!(!rules[1].entries[0].matches("path", "/web"));
        assert_eq!(rules[1].policy.limit.limit, 10);
    }

    #[test]
    fn bad_files_name_what_to_change() {
        for (text, needle) in [
            (
                "[policies.a]\nlimit = 0\nwindow = \"1s\"",
                "policies.a.limit",
            ),
            (
                "[policies.a]\nlimit = 1\nwindow = \"0s\"",
                "policies.a.window",
            ),
            (
                "[policies.a]\nlimit = 1\nwindow = \"1s\"\nburst = 3",
                "policies.a.burst",
            ),
            ("[scopes]\nuser = \"nope\"", "no policy named `nope`"),
            (
                "[policies.\"a b\"]\nlimit = 1\nwindow = \"1s\"",
                "policies.a b",
            ),
            ("unknown = 1", "unknown field"),
        ] {
            let err = Policies::parse(text).expect_err(text);
            assert!(err.to_string().contains(needle), "{text}: {err}");
        }
    }
}
