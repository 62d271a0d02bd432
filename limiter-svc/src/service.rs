//! The gRPC edge: `sluice.limiter.v1.Limiter` and Envoy's `RateLimitService`. Validates and
//! resolves requests into [`Resolved`] checks, asks the [`Engine`], shapes the answers.

use std::sync::Arc;
use std::time::Duration;

use sluice::error::{Error, Result};
use sluice::proto::envoy::config::core::v3::HeaderValue;
use sluice::proto::envoy::service::ratelimit::v3 as rls;
use sluice::proto::sluice::limiter::v1 as pb;
use sluice::server::KeptHandles;
use tonic::{Request, Response, Status};

use crate::algorithm::{Algorithm, Params};
use crate::engine::{CheckOutcome, Engine, Outcome, Resolved, Source};
use crate::keys;
use crate::policy::{
    CUSTOM_SCOPE, FailureMode, Limit, Policies, Policy, PolicyStore, validate_name,
};
use crate::store::{Counter, Mode};

/// Most checks in one request.
pub const MAX_CHECKS: usize = 16;
/// Largest cost of one request.
pub const MAX_COST: u64 = 1_000_000;
/// Longest subject, in bytes.
pub const MAX_SUBJECT: usize = 256;
/// Most descriptors in one RLS request, and entries per descriptor.
pub const MAX_DESCRIPTORS: usize = 64;
const MAX_ENTRIES: usize = 16;

/// Both gRPC services, on one engine and one set of policies.
#[derive(Debug, Clone)]
pub struct LimiterService {
    engine: Arc<Engine>,
    policies: Arc<PolicyStore>,
}

impl LimiterService {
    /// A service on `engine` with `policies`.
    pub fn new(engine: Arc<Engine>, policies: Arc<PolicyStore>) -> Self {
        Self { engine, policies }
    }
}

fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn std_duration(d: &prost_types::Duration, field: impl std::fmt::Display) -> Result<Duration> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(Error::invalid(field.to_string(), "must not be negative"));
    }
    Ok(Duration::new(
        d.seconds.unsigned_abs(),
        d.nanos.unsigned_abs(),
    ))
}

fn normalize_cost(cost: u64, field: impl std::fmt::Display) -> Result<u64> {
    match cost {
        0 => Ok(1),
        c if c > MAX_COST => Err(Error::invalid(
            field.to_string(),
            format!("{c} is above the maximum of {MAX_COST}"),
        )),
        c => Ok(c),
    }
}

fn counter_for(
    scope: &str,
    subject: &str,
    policy: &Arc<Policy>,
    cost: u64,
    field: impl std::fmt::Display,
    cost_field: impl std::fmt::Display,
) -> Result<Resolved> {
    let limit = policy.limit;
    if cost > limit.capacity() {
        return Err(Error::invalid(
            cost_field.to_string(),
            format!(
                "{cost} is above {field}'s capacity of {}: such a request could never pass",
                limit.capacity()
            ),
        ));
    }
    let name = if policy.name.is_empty() {
        limit.inline_name()
    } else {
        policy.name.clone()
    };
    Ok(Resolved {
        counter: Counter {
            key: keys::counter(scope, subject, &name, limit.algorithm),
            algorithm: limit.algorithm,
            params: Params {
                limit: limit.limit as f64,
                window: limit.window.as_micros() as f64,
                burst: limit.burst as f64,
                cost: cost as f64,
            },
            shadow: policy.shadow,
        },
        policy: policy.clone(),
        scope: scope.to_owned(),
    })
}

/// An element of a repeated request field (`checks[2]`), as text only when shown.
struct At(&'static str, usize);

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]", self.0, self.1)
    }
}

/// A field under another (`parent` + `suffix`, e.g. `checks[0]` + `.inline`), as text only
/// when shown.
struct Field<'a>(&'a dyn std::fmt::Display, &'static str);

impl std::fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.0, self.1)
    }
}

/// Validates `checks` and finds each one's policy.
fn resolve(policies: &Policies, checks: &[pb::Check], cost: u64) -> Result<Vec<Resolved>> {
    if checks.is_empty() || checks.len() > MAX_CHECKS {
        return Err(Error::invalid(
            "checks",
            format!("send 1 to {MAX_CHECKS} checks, not {}", checks.len()),
        ));
    }
    let mut resolved: Vec<Resolved> = Vec::with_capacity(checks.len());
    for (i, check) in checks.iter().enumerate() {
        // Field names become text only in an error.
        let field = At("checks", i);
        validate_name(&check.scope, Field(&field, ".scope"))?;
        if check.subject.is_empty() || check.subject.len() > MAX_SUBJECT {
            return Err(Error::invalid(
                format!("{field}.subject"),
                format!(
                    "must be 1 to {MAX_SUBJECT} bytes, got {}",
                    check.subject.len()
                ),
            ));
        }
        let policy = match &check.limit {
            Some(pb::check::Limit::Policy(name)) => policies.named(name).cloned().ok_or_else(|| {
                Error::NotFound(format!("{field}.policy: no policy named `{name}` in the limits file"))
            })?,
            Some(pb::check::Limit::Inline(inline)) => {
                let inline_field = Field(&field, ".inline");
                let algorithm = Algorithm::from_proto(inline.algorithm).ok_or_else(|| {
                    Error::invalid(
                        format!("{inline_field}.algorithm"),
                        format!("unknown algorithm {}", inline.algorithm),
                    )
                })?;
                let window = inline
                    .window
                    .as_ref()
                    .ok_or_else(|| Error::invalid(format!("{inline_field}.window"), "is required"))
                    .and_then(|w| std_duration(w, Field(&inline_field, ".window")))?;
                Arc::new(Policy {
                    name: String::new(),
                    limit: Limit::new(algorithm, inline.limit, window, inline.burst, &inline_field)?,
                    shadow: false,
                    failure_mode: policies.default_failure_mode,
                })
            }
            None => policies.default_for(&check.scope, &check.subject).cloned().ok_or_else(|| {
                Error::NotFound(format!(
                    "{field}: names no policy or inline limit, and scope `{}` has no default policy",
                    check.scope
                ))
            })?,
        };
        let mut r = counter_for(&check.scope, &check.subject, &policy, cost, &field, "cost")?;
        if !policies.knows_scope(&check.scope) {
            r.scope.clear();
            r.scope.push_str(CUSTOM_SCOPE);
        }
        if let Some(j) = resolved.iter().position(|p| p.counter.key == r.counter.key) {
            return Err(Error::invalid(
                field.to_string(),
                format!("repeats checks[{j}]; send each counter once"),
            ));
        }
        resolved.push(r);
    }
    Ok(resolved)
}

fn source(source: Source) -> pb::Source {
    match source {
        Source::Store => pb::Source::Store,
        Source::HotKey => pb::Source::HotKeyCache,
        Source::FailureMode => pb::Source::FailureMode,
        Source::Skipped => pb::Source::Unspecified,
    }
}

fn check_result(check: &Resolved, outcome: &CheckOutcome) -> pb::CheckResult {
    let v = &outcome.verdict;
    pb::CheckResult {
        allowed: v.allowed,
        policy: check.policy.name.clone(),
        algorithm: check.policy.limit.algorithm.to_proto().into(),
        limit: v.limit,
        remaining: v.remaining,
        reset_after: Some(proto_duration(v.reset_after)),
        retry_after: Some(proto_duration(v.retry_after)),
        shadow: check.counter.shadow,
        source: source(outcome.source).into(),
    }
}

/// The check that speaks for the whole request: on a denial the denying check with the longest
/// retry; on an allow the enforced check with the fewest units left (ties: longest reset).
/// Shadow checks speak only when every check is shadow.
fn representative(checks: &[Resolved], outcome: &Outcome) -> Option<usize> {
    let all_shadow = checks.iter().all(|c| c.counter.shadow);
    let candidates = (0..checks.len()).filter(|&i| all_shadow || !checks[i].counter.shadow);
    if outcome.allowed {
        candidates.min_by(|&a, &b| {
            let (va, vb) = (&outcome.checks[a].verdict, &outcome.checks[b].verdict);
            va.remaining
                .cmp(&vb.remaining)
                .then(vb.reset_after.cmp(&va.reset_after))
        })
    } else {
        candidates
            .filter(|&i| !outcome.checks[i].verdict.allowed)
            .max_by(|&a, &b| {
                let (va, vb) = (&outcome.checks[a].verdict, &outcome.checks[b].verdict);
                va.retry_after
                    .cmp(&vb.retry_after)
                    .then(va.reset_after.cmp(&vb.reset_after))
            })
    }
}

fn record_metrics(checks: &[Resolved], outcome: &Outcome) {
    for (check, result) in checks.iter().zip(&outcome.checks) {
        let decision = match (result.verdict.allowed, check.counter.shadow) {
            (true, _) => "allowed",
            (false, true) => "shadow_denied",
            (false, false) => "denied",
        };
        let policy = if check.policy.name.is_empty() {
            "inline"
        } else {
            check.policy.name.as_str()
        };
        let source = match result.source {
            Source::Store => "store",
            Source::HotKey => "hot_key",
            Source::FailureMode => "failure_mode",
            Source::Skipped => "skipped",
        };
        count_check([policy, &check.scope, decision, source]);
    }
}

/// Adds one to `sluice_limiter_checks_total{policy, scope, decision, source}` (`labels` in
/// that order), with handles kept per thread as the server keeps its call metrics.
fn count_check(labels: [&str; 4]) {
    /// Label sets kept per thread; past it (a limits file with very many policies and
    /// scopes) the rest are looked up each time.
    const MAX_KEPT: usize = 1024;
    thread_local! {
        /// A reused buffer for the lookup key, and the handles by key.
        static KEPT: std::cell::RefCell<(String, KeptHandles<metrics::Counter>)> =
            std::cell::RefCell::default();
    }
    let [policy, scope, decision, source] = labels;
    let lookup = || {
        metrics::counter!(
            "sluice_limiter_checks_total",
            "policy" => policy.to_owned(),
            "scope" => scope.to_owned(),
            "decision" => decision.to_owned(),
            "source" => source.to_owned(),
        )
    };
    KEPT.with_borrow_mut(|(key, kept)| {
        key.clear();
        for label in labels {
            key.push_str(label);
            key.push('\0');
        }
        kept.with(key, MAX_KEPT, lookup, |counter| counter.increment(1));
    });
}

#[tonic::async_trait]
impl pb::limiter_server::Limiter for LimiterService {
    async fn check_limit(
        &self,
        request: Request<pb::CheckLimitRequest>,
    ) -> Result<Response<pb::CheckLimitResponse>, Status> {
        let request = request.into_inner();
        if request.request_id.len() > 128 {
            return Err(Error::invalid("request_id", "must be at most 128 bytes").into());
        }
        let cost = normalize_cost(request.cost, "cost")?;
        let checks = resolve(&self.policies.current(), &request.checks, cost)?;
        let outcome = self.engine.evaluate(&checks, Mode::Consume).await?;
        record_metrics(&checks, &outcome);
        let results: Vec<pb::CheckResult> = checks
            .iter()
            .zip(&outcome.checks)
            .map(|(c, o)| check_result(c, o))
            .collect();
        let shadow_denied = checks
            .iter()
            .zip(&outcome.checks)
            .any(|(c, o)| c.counter.shadow && !o.verdict.allowed);
        let retry_after = if outcome.allowed {
            Duration::ZERO
        } else {
            checks
                .iter()
                .zip(&outcome.checks)
                .filter(|(c, o)| !c.counter.shadow && !o.verdict.allowed)
                .map(|(_, o)| o.verdict.retry_after)
                .max()
                .unwrap_or_default()
        };
        let lead = representative(&checks, &outcome).map(|i| &outcome.checks[i].verdict);
        Ok(Response::new(pb::CheckLimitResponse {
            allowed: outcome.allowed,
            limit: lead.map_or(0, |v| v.limit),
            remaining: lead.map_or(0, |v| v.remaining),
            reset_after: Some(proto_duration(
                lead.map_or(Duration::ZERO, |v| v.reset_after),
            )),
            retry_after: Some(proto_duration(retry_after)),
            shadow_denied,
            source: source(outcome.source).into(),
            results,
        }))
    }

    async fn get_limit_status(
        &self,
        request: Request<pb::GetLimitStatusRequest>,
    ) -> Result<Response<pb::GetLimitStatusResponse>, Status> {
        let request = request.into_inner();
        let cost = normalize_cost(request.cost, "cost")?;
        let checks = resolve(&self.policies.current(), &request.checks, cost)?;
        let outcome = self.engine.evaluate(&checks, Mode::Peek).await?;
        Ok(Response::new(pb::GetLimitStatusResponse {
            results: checks
                .iter()
                .zip(&outcome.checks)
                .map(|(c, o)| check_result(c, o))
                .collect(),
        }))
    }

    async fn reset_limit(
        &self,
        request: Request<pb::ResetLimitRequest>,
    ) -> Result<Response<pb::ResetLimitResponse>, Status> {
        let request = request.into_inner();
        let checks = resolve(&self.policies.current(), &request.checks, 1)?;
        let keys: Vec<String> = checks.into_iter().map(|c| c.counter.key).collect();
        let reset = self.engine.reset(&keys).await?;
        tracing::info!(counters = keys.len(), existed = reset, "limits reset");
        Ok(Response::new(pb::ResetLimitResponse { reset }))
    }
}

/// Envoy's rate limit unit of a window, when it is exactly one.
fn unit_of(window: Duration) -> rls::rate_limit_response::rate_limit::Unit {
    use rls::rate_limit_response::rate_limit::Unit;
    if window.subsec_nanos() != 0 {
        return Unit::Unknown;
    }
    match window.as_secs() {
        1 => Unit::Second,
        60 => Unit::Minute,
        3600 => Unit::Hour,
        86400 => Unit::Day,
        604_800 => Unit::Week,
        _ => Unit::Unknown,
    }
}

fn window_of(unit: i32, field: impl std::fmt::Display) -> Result<Duration> {
    use rls::rate_limit_response::rate_limit::Unit;
    let secs = match Unit::try_from(unit) {
        Ok(Unit::Second) => 1,
        Ok(Unit::Minute) => 60,
        Ok(Unit::Hour) => 3600,
        Ok(Unit::Day) => 86400,
        Ok(Unit::Week) => 604_800,
        Ok(Unit::Month) => 30 * 86400,
        Ok(Unit::Year) => 365 * 86400,
        _ => {
            return Err(Error::invalid(
                field.to_string(),
                format!("unit {unit} is not a known time unit"),
            ));
        }
    };
    Ok(Duration::from_secs(secs))
}

fn header(key: &str, value: String) -> HeaderValue {
    HeaderValue {
        key: key.to_owned(),
        value,
        raw_value: Vec::new(),
    }
}

/// Seconds, rounded up: waiting that long is always enough.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[tonic::async_trait]
impl rls::rate_limit_service_server::RateLimitService for LimiterService {
    async fn should_rate_limit(
        &self,
        request: Request<rls::RateLimitRequest>,
    ) -> Result<Response<rls::RateLimitResponse>, Status> {
        use rls::rate_limit_response::{Code, DescriptorStatus, RateLimit};
        let request = request.into_inner();
        if request.domain.is_empty() {
            return Err(Error::invalid("domain", "must not be empty").into());
        }
        if request.descriptors.is_empty() || request.descriptors.len() > MAX_DESCRIPTORS {
            return Err(Error::invalid(
                "descriptors",
                format!(
                    "send 1 to {MAX_DESCRIPTORS} descriptors, not {}",
                    request.descriptors.len()
                ),
            )
            .into());
        }
        let policies = self.policies.current();
        let rules = policies.rls_rules(&request.domain).unwrap_or_default();
        let request_cost = u64::from(request.hits_addend);
        // (descriptor index, resolved check) for every descriptor a rule matches.
        let mut matched: Vec<(usize, Resolved)> = Vec::new();
        let mut impossible: Vec<(usize, Arc<Policy>)> = Vec::new();
        for (i, descriptor) in request.descriptors.iter().enumerate() {
            // Field names become text only in an error.
            let field = At("descriptors", i);
            if descriptor.entries.is_empty() || descriptor.entries.len() > MAX_ENTRIES {
                return Err(Error::invalid(
                    format!("{field}.entries"),
                    format!("send 1 to {MAX_ENTRIES} entries"),
                )
                .into());
            }
            let cost = normalize_cost(
                descriptor.hits_addend.unwrap_or(request_cost),
                Field(&field, ".hits_addend"),
            )?;
            let rule = rules.iter().find(|rule| {
                rule.entries.len() == descriptor.entries.len()
                    && rule
                        .entries
                        .iter()
                        .zip(&descriptor.entries)
                        .all(|(p, e)| p.matches(&e.key, &e.value))
            });
            let Some(rule) = rule else { continue };
            let mut subject = request.domain.clone();
            for entry in &descriptor.entries {
                subject.push('|');
                subject.push_str(&entry.key);
                subject.push('=');
                subject.push_str(&entry.value);
            }
            if subject.len() > 4 * MAX_SUBJECT {
                return Err(Error::invalid(
                    format!("{field}.entries"),
                    format!(
                        "the domain, keys and values come to {} bytes; at most {} together",
                        subject.len(),
                        4 * MAX_SUBJECT
                    ),
                )
                .into());
            }
            let policy = match &descriptor.limit {
                // Envoy may carry a per-descriptor limit override; it replaces the rule's numbers.
                Some(over) => Arc::new(Policy {
                    name: String::new(),
                    limit: Limit::new(
                        rule.policy.limit.algorithm,
                        u64::from(over.requests_per_unit),
                        window_of(over.unit, Field(&field, ".limit.unit"))?,
                        0,
                        Field(&field, ".limit"),
                    )?,
                    shadow: rule.policy.shadow,
                    failure_mode: rule.policy.failure_mode,
                }),
                None => rule.policy.clone(),
            };
            if cost > policy.limit.capacity() {
                // More hits than the limit holds can never pass: over limit, not an error
                // (Envoy lets a request through when its rate limit service errs).
                impossible.push((i, policy));
                continue;
            }
            matched.push((
                i,
                counter_for(
                    "rls",
                    &subject,
                    &policy,
                    cost,
                    &field,
                    Field(&field, ".hits_addend"),
                )?,
            ));
        }
        let mut statuses: Vec<DescriptorStatus> = request
            .descriptors
            .iter()
            .map(|_| DescriptorStatus {
                code: Code::Ok.into(),
                ..Default::default()
            })
            .collect();
        let mut headers = Vec::new();
        let current_limit = |policy: &Policy| RateLimit {
            name: policy.name.clone(),
            requests_per_unit: u32::try_from(policy.limit.limit).unwrap_or(u32::MAX),
            unit: unit_of(policy.limit.window).into(),
        };
        let overall = if !impossible.is_empty() {
            // Nothing is consumed: the request as a whole cannot pass.
            for (i, check) in &matched {
                statuses[*i].current_limit = Some(current_limit(&check.policy));
            }
            for (i, policy) in &impossible {
                statuses[*i].code = Code::OverLimit.into();
                statuses[*i].current_limit = Some(current_limit(policy));
            }
            Code::OverLimit
        } else if matched.is_empty() {
            Code::Ok
        } else {
            let checks: Vec<Resolved> = matched.iter().map(|(_, r)| r.clone()).collect();
            let outcome = match self.engine.evaluate(&checks, Mode::Consume).await {
                Ok(outcome) => outcome,
                // The store is out of reach and a fail-closed policy decides. Envoy lets a
                // request through when its rate limit service answers an error (unless it
                // runs with `failure_mode_deny`), so the denial has to be in the answer.
                Err(Error::Unavailable(why)) => {
                    let mut closed = false;
                    for (i, check) in &matched {
                        statuses[*i].current_limit = Some(current_limit(&check.policy));
                        if !check.counter.shadow
                            && check.policy.failure_mode == FailureMode::FailClosed
                        {
                            statuses[*i].code = Code::OverLimit.into();
                            closed = true;
                        }
                    }
                    if !closed {
                        return Err(Error::Unavailable(why).into());
                    }
                    tracing::debug!(domain = %request.domain, %why, "fail-closed descriptors answered OVER_LIMIT");
                    return Ok(Response::new(rls::RateLimitResponse {
                        overall_code: Code::OverLimit.into(),
                        statuses,
                        // The breaker looks for Redis every quarter of a second by default.
                        response_headers_to_add: vec![header("Retry-After", "1".to_owned())],
                        ..Default::default()
                    }));
                }
                Err(err) => return Err(err.into()),
            };
            record_metrics(&checks, &outcome);
            for ((i, check), result) in matched.iter().zip(&outcome.checks) {
                let v = &result.verdict;
                let over = !v.allowed && !check.counter.shadow;
                statuses[*i] = DescriptorStatus {
                    code: if over { Code::OverLimit } else { Code::Ok }.into(),
                    current_limit: Some(RateLimit {
                        name: check.policy.name.clone(),
                        requests_per_unit: u32::try_from(check.policy.limit.limit)
                            .unwrap_or(u32::MAX),
                        unit: unit_of(check.policy.limit.window).into(),
                    }),
                    limit_remaining: u32::try_from(v.remaining).unwrap_or(u32::MAX),
                    duration_until_reset: Some(proto_duration(v.reset_after)),
                    quota: None,
                };
            }
            if let Some(lead) = representative(&checks, &outcome) {
                let (check, v) = (&checks[lead], &outcome.checks[lead].verdict);
                let name = if check.policy.name.is_empty() {
                    "sluice"
                } else {
                    check.policy.name.as_str()
                };
                headers.push(header(
                    "RateLimit-Policy",
                    format!(
                        "\"{name}\";q={};w={}",
                        v.limit,
                        ceil_secs(check.policy.limit.window)
                    ),
                ));
                headers.push(header(
                    "RateLimit",
                    format!(
                        "\"{name}\";r={};t={}",
                        v.remaining,
                        ceil_secs(v.reset_after)
                    ),
                ));
                if !outcome.allowed {
                    headers.push(header(
                        "Retry-After",
                        ceil_secs(v.retry_after).max(1).to_string(),
                    ));
                }
            }
            if outcome.allowed {
                Code::Ok
            } else {
                Code::OverLimit
            }
        };
        Ok(Response::new(rls::RateLimitResponse {
            overall_code: overall.into(),
            statuses,
            response_headers_to_add: headers,
            ..Default::default()
        }))
    }
}
