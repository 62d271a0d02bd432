//! The task model: validated task specs, the stored record, priorities, states, and the one
//! definition of the retry backoff.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sluice::error::{Error, Result};
use sluice::proto::sluice::queue::v1 as pb;

/// Largest payload (and result), in bytes.
pub const MAX_PAYLOAD: usize = 1024 * 1024;
/// Most tasks in one EnqueueBatch.
pub const MAX_BATCH: usize = 1000;
/// Most attempts a task may be given.
pub const MAX_ATTEMPTS: u32 = 100;
/// Header bounds.
pub const MAX_HEADERS: usize = 32;
const MAX_HEADER_KEY: usize = 128;
const MAX_HEADER_VALUE: usize = 1024;
const MAX_IDEMPOTENCY_KEY: usize = 256;
const MAX_CONTENT_TYPE: usize = 255;
/// Longest error message kept (longer ones are cut, never refused).
pub const MAX_ERROR_MESSAGE: usize = 4096;

/// Validates a worker id (empty allowed where it is optional); errors name `field`.
pub fn validate_worker_id(value: &str, field: &str, required: bool) -> Result<()> {
    if (required && value.is_empty())
        || value.len() > 128
        || !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        let what = if required { "1" } else { "0" };
        return Err(Error::invalid(
            field,
            format!("{what} to 128 bytes of A-Z a-z 0-9 _ . -"),
        ));
    }
    Ok(())
}

/// Validates a project or queue name; errors name `field`.
pub fn validate_name(value: &str, field: &str) -> Result<()> {
    if value.is_empty() || value.len() > 64 {
        return Err(Error::invalid(
            field,
            format!("must be 1 to 64 bytes, got {}", value.len()),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(Error::invalid(
            field,
            format!("`{value}` may use only A-Z a-z 0-9 _ . -"),
        ));
    }
    Ok(())
}

/// Validates a task id (a UUID string); errors name `field`.
pub fn validate_task_id(value: &str, field: &str) -> Result<()> {
    uuid::Uuid::parse_str(value)
        .map(|_| ())
        .map_err(|_| Error::invalid(field, format!("`{value}` is not a task id (a UUID)")))
}

/// Priority as stored: 0 = critical … 4 = background (lower leaves first).
pub fn priority_from_proto(value: i32, field: impl FnOnce() -> String) -> Result<u8> {
    match pb::Priority::try_from(value) {
        Ok(pb::Priority::Critical) => Ok(0),
        Ok(pb::Priority::High) => Ok(1),
        Ok(pb::Priority::Unspecified | pb::Priority::Normal) => Ok(2),
        Ok(pb::Priority::Low) => Ok(3),
        Ok(pb::Priority::Background) => Ok(4),
        Err(_) => Err(Error::invalid(field(), format!("unknown priority {value}"))),
    }
}

/// Priority to the wire.
pub fn priority_to_proto(stored: u8) -> pb::Priority {
    match stored {
        0 => pb::Priority::Critical,
        1 => pb::Priority::High,
        3 => pb::Priority::Low,
        4 => pb::Priority::Background,
        _ => pb::Priority::Normal,
    }
}

/// A stored state to the wire.
pub fn state_to_proto(state: &str) -> pb::TaskState {
    match state {
        "scheduled" => pb::TaskState::Scheduled,
        "ready" => pb::TaskState::Ready,
        "leased" => pb::TaskState::Leased,
        "succeeded" => pb::TaskState::Succeeded,
        "dead" => pb::TaskState::Dead,
        "cancelled" => pb::TaskState::Cancelled,
        _ => pb::TaskState::Unspecified,
    }
}

/// A failure category as stored.
pub fn category_name(value: i32) -> &'static str {
    match pb::FailureCategory::try_from(value) {
        Ok(pb::FailureCategory::Transient) => "transient",
        Ok(pb::FailureCategory::Permanent) => "permanent",
        Ok(pb::FailureCategory::Timeout) => "timeout",
        Ok(pb::FailureCategory::Resource) => "resource",
        _ => "unknown",
    }
}

/// A stored failure category to the wire.
pub fn category_to_proto(name: &str) -> pb::FailureCategory {
    match name {
        "transient" => pb::FailureCategory::Transient,
        "permanent" => pb::FailureCategory::Permanent,
        "timeout" => pb::FailureCategory::Timeout,
        "resource" => pb::FailureCategory::Resource,
        _ => pb::FailureCategory::Unknown,
    }
}

/// How retries are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// 0 exponential, 1 linear, 2 fixed.
    #[serde(rename = "k")]
    pub kind: u8,
    /// Delay before the first retry (ms).
    #[serde(rename = "i")]
    pub initial_ms: u64,
    /// Upper bound of any delay (ms).
    #[serde(rename = "x")]
    pub max_ms: u64,
    /// Growth factor of the exponential kind.
    #[serde(rename = "m")]
    pub multiplier: f64,
    /// Share of each delay that is random, 0 (none) to 1 (full jitter).
    #[serde(rename = "j")]
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            kind: 0,
            initial_ms: 1000,
            max_ms: 3_600_000,
            multiplier: 2.0,
            jitter: 1.0,
        }
    }
}

impl RetryPolicy {
    /// The delay before the retry that follows failed attempt `attempt` (1-based), given a
    /// uniform random `u` in [0, 1):
    ///
    /// `base(n)` = initial (fixed), initial × n (linear), initial × multiplier^(n−1)
    /// (exponential); `delay(n) = min(base(n), max) × (1 − jitter × u)`.
    ///
    /// This is the only definition: delays are drawn when a task is stored, one per possible
    /// retry, and the scripts look them up.
    pub fn delay_ms(&self, attempt: u32, u: f64) -> u64 {
        let n = f64::from(attempt.max(1));
        let initial = self.initial_ms as f64;
        let base = match self.kind {
            1 => initial * n,
            2 => initial,
            _ => initial * self.multiplier.powf(n - 1.0),
        };
        let capped = base.min(self.max_ms as f64);
        (capped * (1.0 - self.jitter.clamp(0.0, 1.0) * u.clamp(0.0, 1.0))).round() as u64
    }

    /// From the wire, over `default`; errors name `field`.
    pub fn from_proto(p: &pb::RetryPolicy, default: &Self, field: &str) -> Result<Self> {
        let kind = match pb::BackoffKind::try_from(p.kind) {
            Ok(pb::BackoffKind::Unspecified | pb::BackoffKind::Exponential) => 0,
            Ok(pb::BackoffKind::Linear) => 1,
            Ok(pb::BackoffKind::Fixed) => 2,
            Err(_) => {
                return Err(Error::invalid(
                    format!("{field}.kind"),
                    format!("unknown backoff kind {}", p.kind),
                ));
            }
        };
        let ms = |d: &Option<prost_types::Duration>, name: &str, default: u64| -> Result<u64> {
            match d {
                None => Ok(default),
                Some(d) => {
                    let d = duration(d, &format!("{field}.{name}"))?;
                    u64::try_from(d.as_millis())
                        .map_err(|_| Error::invalid(format!("{field}.{name}"), "too long"))
                }
            }
        };
        let policy = Self {
            kind,
            initial_ms: ms(&p.initial_delay, "initial_delay", default.initial_ms)?,
            max_ms: ms(&p.max_delay, "max_delay", default.max_ms)?,
            multiplier: p.multiplier.unwrap_or(default.multiplier),
            jitter: p.jitter.unwrap_or(default.jitter),
        };
        if !(1.0..=100.0).contains(&policy.multiplier) {
            return Err(Error::invalid(
                format!("{field}.multiplier"),
                "must be between 1 and 100",
            ));
        }
        if !(0.0..=1.0).contains(&policy.jitter) {
            return Err(Error::invalid(
                format!("{field}.jitter"),
                "must be between 0 and 1",
            ));
        }
        if policy.max_ms > 7 * 24 * 3_600_000 {
            return Err(Error::invalid(
                format!("{field}.max_delay"),
                "must be at most 7 days",
            ));
        }
        Ok(policy)
    }

    /// To the wire.
    pub fn to_proto(&self) -> pb::RetryPolicy {
        pb::RetryPolicy {
            kind: match self.kind {
                1 => pb::BackoffKind::Linear,
                2 => pb::BackoffKind::Fixed,
                _ => pb::BackoffKind::Exponential,
            }
            .into(),
            initial_delay: Some(proto_duration(Duration::from_millis(self.initial_ms))),
            max_delay: Some(proto_duration(Duration::from_millis(self.max_ms))),
            multiplier: Some(self.multiplier),
            jitter: Some(self.jitter),
        }
    }
}

/// One recorded failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorRecord {
    /// Attempt that failed.
    #[serde(rename = "a")]
    pub attempt: u32,
    /// Category name.
    #[serde(rename = "c")]
    pub category: String,
    /// Message.
    #[serde(rename = "m")]
    pub message: String,
    /// Whether the worker called it retryable.
    #[serde(rename = "r")]
    pub retryable: bool,
    /// When (ms).
    #[serde(rename = "t")]
    pub at: f64,
}

/// A task as stored (MessagePack, or JSON from earlier versions, with short names; the scripts
/// read and write it too, and answer with it as JSON or, from Dequeue, as stored).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Task id (the stored record leaves it out: it is the hash field).
    #[serde(default)]
    pub id: String,
    /// Priority (0 critical … 4 background).
    pub p: u8,
    /// State.
    #[serde(default)]
    pub st: String,
    /// Content type.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ct: String,
    /// Attempts started.
    #[serde(default)]
    pub att: u32,
    /// Most attempts.
    pub max: u32,
    /// Headers.
    #[serde(
        default,
        skip_serializing_if = "HashMap::is_empty",
        deserialize_with = "map_or_empty"
    )]
    pub hd: HashMap<String, String>,
    /// Enqueued at (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enq: Option<f64>,
    /// Scheduled for (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sch: Option<f64>,
    /// Last leased at (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsd: Option<f64>,
    /// Succeeded at (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<f64>,
    /// Last failed at (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fl: Option<f64>,
    /// Dead-lettered at (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dd: Option<f64>,
    /// Cancelled at (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cx: Option<f64>,
    /// Lease deadline (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dl: Option<f64>,
    /// Live lease token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tok: Option<String>,
    /// The token of the lease that ended the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ltok: Option<String>,
    /// Last errors, oldest first.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "list_or_empty"
    )]
    pub err: Vec<ErrorRecord>,
    /// Cancel requested while leased.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cr: bool,
    /// Times the reaper's auto-redrive brought it back.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rd: u32,
    /// Processing timeout (ms): the lease length.
    pub to: u64,
    /// Retry delays (ms) after attempt 1, 2, …
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "list_or_empty"
    )]
    pub dly: Vec<u64>,
    /// Retry policy the delays came from, when the task set its own (otherwise the queue's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rp: Option<RetryPolicy>,
    /// Idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idem: Option<String>,
    /// Worker of the last lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wk: Option<String>,
    /// A small payload kept inside the stored record (MessagePack records only). Read, never
    /// written from here: the scripts own it.
    #[serde(default, skip_serializing, deserialize_with = "some_bytes")]
    pub pl: Option<Vec<u8>>,
}

/// Lua's MessagePack encoder writes an empty table as an empty array: accept it as an empty
/// map.
fn map_or_empty<'de, D>(deserializer: D) -> std::result::Result<HashMap<String, String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum MapOrList {
        Map(HashMap<String, String>),
        List(Vec<serde::de::IgnoredAny>),
    }
    match MapOrList::deserialize(deserializer)? {
        MapOrList::Map(map) => Ok(map),
        MapOrList::List(list) if list.is_empty() => Ok(HashMap::new()),
        MapOrList::List(_) => Err(serde::de::Error::custom(
            "headers: a list where a map belongs",
        )),
    }
}

/// Bytes that Lua stored as a MessagePack string (Lua strings are bytes; they need not be
/// UTF-8).
fn some_bytes<'de, D>(deserializer: D) -> std::result::Result<Option<Vec<u8>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Bytes;
    impl serde::de::Visitor<'_> for Bytes {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("bytes")
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> std::result::Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Vec<u8>, E> {
            Ok(v.as_bytes().to_vec())
        }
    }
    deserializer.deserialize_bytes(Bytes).map(Some)
}

/// Lua's JSON encoder writes an empty array as `{}`: accept both.
fn list_or_empty<'de, D, T>(deserializer: D) -> std::result::Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrMap<T> {
        List(Vec<T>),
        Map(serde::de::IgnoredAny),
    }
    Ok(match ListOrMap::deserialize(deserializer)? {
        ListOrMap::List(list) => list,
        ListOrMap::Map(_) => Vec::new(),
    })
}

/// A protobuf duration, validated.
pub fn duration(d: &prost_types::Duration, field: &str) -> Result<Duration> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(Error::invalid(field, "must not be negative"));
    }
    Ok(Duration::new(
        d.seconds.unsigned_abs(),
        d.nanos.unsigned_abs(),
    ))
}

/// A duration to the wire.
pub fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Milliseconds since the epoch to the wire.
pub fn timestamp(ms: f64) -> prost_types::Timestamp {
    let ms = ms.max(0.0) as i64;
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// Bounds on headers, content type and idempotency key; errors name `field`.
pub fn validate_spec_strings(spec: &pb::TaskSpec, field: &str) -> Result<()> {
    if spec.payload.is_empty() {
        return Err(Error::invalid(
            format!("{field}.payload"),
            "must not be empty",
        ));
    }
    if spec.payload.len() > MAX_PAYLOAD {
        return Err(Error::invalid(
            format!("{field}.payload"),
            format!(
                "{} bytes is above the maximum of {MAX_PAYLOAD}",
                spec.payload.len()
            ),
        ));
    }
    if spec.content_type.len() > MAX_CONTENT_TYPE {
        return Err(Error::invalid(
            format!("{field}.content_type"),
            format!("at most {MAX_CONTENT_TYPE} bytes"),
        ));
    }
    if spec.idempotency_key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(Error::invalid(
            format!("{field}.idempotency_key"),
            format!("at most {MAX_IDEMPOTENCY_KEY} bytes"),
        ));
    }
    if spec.headers.len() > MAX_HEADERS {
        return Err(Error::invalid(
            format!("{field}.headers"),
            format!("at most {MAX_HEADERS} entries"),
        ));
    }
    for (k, v) in &spec.headers {
        if k.is_empty() || k.len() > MAX_HEADER_KEY || v.len() > MAX_HEADER_VALUE {
            return Err(Error::invalid(
                format!("{field}.headers[{k}]"),
                format!("keys are 1 to {MAX_HEADER_KEY} bytes, values at most {MAX_HEADER_VALUE}"),
            ));
        }
    }
    Ok(())
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_follows_the_formula() {
        let exp = RetryPolicy {
            kind: 0,
            initial_ms: 100,
            max_ms: 1000,
            multiplier: 2.0,
            jitter: 0.0,
        };
        let delays: Vec<u64> = (1..=6).map(|n| exp.delay_ms(n, 0.5)).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        let linear = RetryPolicy { kind: 1, ..exp };
        assert_eq!(linear.delay_ms(3, 0.0), 300);
        let fixed = RetryPolicy { kind: 2, ..exp };
        assert_eq!(fixed.delay_ms(5, 0.0), 100);
        let full_jitter = RetryPolicy { jitter: 1.0, ..exp };
        assert_eq!(full_jitter.delay_ms(2, 0.0), 200);
        assert_eq!(full_jitter.delay_ms(2, 0.75), 50);
        let half = RetryPolicy { jitter: 0.5, ..exp };
        assert_eq!(
            half.delay_ms(3, 1.0),
            200,
            "at most half of the delay is random"
        );
    }

    #[test]
    fn records_round_trip_and_accept_lua_empty_lists() {
        let lua = r#"{"id":"x","p":2,"st":"ready","att":0,"max":3,"to":1000,"rp":{"k":0,"i":1,"x":2,"m":2,"j":1},"err":{},"dly":{}}"#;
        let minimal: Record =
            serde_json::from_str(r#"{"p":0,"max":1,"to":5}"#).expect("no id, no policy");
        assert!(minimal.id.is_empty() && minimal.rp.is_none());
        let record: Record = serde_json::from_str(lua).expect("decodes");
        assert!(record.err.is_empty() && record.dly.is_empty());
        let again: Record = serde_json::from_str(&serde_json::to_string(&record).expect("encodes"))
            .expect("decodes");
        assert_eq!(record, again);
    }
}
