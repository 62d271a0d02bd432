//! One behavioural suite for the limiter, run over every store: the embedded store, a real
//! standalone redis-server and a real 3-master Redis Cluster, always through real gRPC.

use std::time::Duration;

use sluice::proto::sluice::limiter::v1 as pb;
use sluice_testkit::limiter::{Limiter, StoreKind, duration, inline_check, policy_check, request};
use sluice_testkit::{RedisCluster, RedisServer};
use tonic::Code;

const LIMITS: &str = r#"
[policies.five]
limit = 5
window = "1h"

[policies.one]
limit = 1
window = "1h"

[policies.ten]
limit = 10
window = "1h"

[policies.watch]
limit = 2
window = "1h"
shadow = true

[policies.tier]
limit = 3
window = "1h"

[scopes]
team = "five"

[endpoints]
"/v1/analysis" = "tier"
"#;

const ALGORITHMS: [pb::Algorithm; 5] = [
    pb::Algorithm::SlidingWindowLog,
    pb::Algorithm::SlidingWindowCounter,
    pb::Algorithm::FixedWindow,
    pb::Algorithm::TokenBucket,
    pb::Algorithm::Gcra,
];

/// A unique subject per test run, so suites sharing a server never share counters.
fn subject(name: &str) -> String {
    format!("{name}-{}", uuid_like())
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn every_algorithm_admits_exactly_its_limit(store: StoreKind) -> anyhow::Result<()> {
    let mut limiter = Limiter::start(&store, LIMITS, &[]).await?;
    for algorithm in ALGORITHMS {
        let subject = subject("exact");
        let check = || inline_check("user", &subject, algorithm, 5, Duration::from_secs(3600), 0);
        for n in 0..5u64 {
            let r = limiter
                .client
                .check_limit(request(vec![check()], 1))
                .await?
                .into_inner();
            assert!(r.allowed, "{algorithm:?} request {n}");
            assert_eq!(r.limit, 5, "{algorithm:?}");
            assert_eq!(r.remaining, 4 - n, "{algorithm:?} request {n}");
        }
        let denied = limiter
            .client
            .check_limit(request(vec![check()], 1))
            .await?
            .into_inner();
        assert!(!denied.allowed, "{algorithm:?}: the sixth is denied");
        assert_eq!(denied.remaining, 0, "{algorithm:?}");
        let retry = duration(denied.retry_after.as_ref());
        // The sliding counter's previous window decays across the next one: up to 2 windows.
        assert!(
            retry > Duration::ZERO && retry <= Duration::from_secs(7200),
            "{algorithm:?} retry {retry:?}"
        );
        assert_eq!(denied.results[0].algorithm, i32::from(algorithm));
        assert_eq!(denied.source, i32::from(pb::Source::Store));
    }
    limiter.service.stop().await
}

async fn cost_is_all_or_nothing_within_a_check(store: StoreKind) -> anyhow::Result<()> {
    let mut limiter = Limiter::start(&store, LIMITS, &[]).await?;
    for algorithm in ALGORITHMS {
        let subject = subject("cost");
        let check = || {
            inline_check(
                "api_key",
                &subject,
                algorithm,
                5,
                Duration::from_secs(3600),
                0,
            )
        };
        let first = limiter
            .client
            .check_limit(request(vec![check()], 3))
            .await?
            .into_inner();
        assert!(
            first.allowed && first.remaining == 2,
            "{algorithm:?}: {first:?}"
        );
        let second = limiter
            .client
            .check_limit(request(vec![check()], 3))
            .await?
            .into_inner();
        assert!(!second.allowed, "{algorithm:?}: 3 more do not fit");
        assert_eq!(
            second.remaining, 2,
            "{algorithm:?}: a denial consumes nothing"
        );
        let third = limiter
            .client
            .check_limit(request(vec![check()], 2))
            .await?
            .into_inner();
        assert!(
            third.allowed && third.remaining == 0,
            "{algorithm:?}: {third:?}"
        );
    }
    limiter.service.stop().await
}

/// Concurrent requests (which share script calls on standalone Redis) are judged one after
/// another: the allowed ones' `remaining` values chain down from the limit by their costs, a
/// denied one did not fit at its turn and took nothing, and two checks with different limits
/// in one request are each charged. (On a cluster the two counters sit in different slots,
/// which may see the requests in different orders and refund a denied request's units, so
/// only the first counter's chain is in request order there; both end exact.)
async fn concurrent_requests_are_judged_one_after_another(store: StoreKind) -> anyhow::Result<()> {
    const COSTS: [u64; 16] = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1];
    let mut limiter = Limiter::start(&store, LIMITS, &[]).await?;
    for algorithm in ALGORITHMS {
        let (small, large) = (subject("chain-small"), subject("chain-large"));
        let hour = Duration::from_secs(3600);
        let checks = move || {
            vec![
                inline_check("user", &small, algorithm, 10, hour, 0),
                inline_check("project", &large, algorithm, 1000, hour, 0),
            ]
        };
        let calls = COSTS.iter().map(|&cost| {
            let mut client = limiter.client.clone();
            let request = request(checks(), cost);
            async move {
                client
                    .check_limit(request)
                    .await
                    .map(|r| (cost, r.into_inner()))
            }
        });
        let answers = futures::future::try_join_all(calls).await?;
        let mut allowed: Vec<(u64, u64)> = Vec::new();
        for (cost, answer) in &answers {
            let (a, b) = (&answer.results[0], &answer.results[1]);
            assert!(
                b.allowed,
                "{algorithm:?}: the large limit never denies: {b:?}"
            );
            if answer.allowed {
                allowed.push((a.remaining, *cost));
            } else {
                assert!(
                    a.remaining < *cost,
                    "{algorithm:?}: cost {cost} fitted in {a:?}"
                );
            }
        }
        allowed.sort_by_key(|&(remaining, _)| std::cmp::Reverse(remaining));
        let mut small_left = 10;
        for &(a, cost) in &allowed {
            small_left -= cost;
            assert_eq!(
                a, small_left,
                "{algorithm:?}: remaining after each allowed request, in order: {allowed:?}"
            );
        }
        let large_left = 1000 - (10 - small_left);
        assert!(
            small_left < 3,
            "{algorithm:?}: the denials left {small_left} unused"
        );
        let status = limiter
            .client
            .get_limit_status(pb::GetLimitStatusRequest {
                checks: checks(),
                cost: 1,
            })
            .await?
            .into_inner();
        assert_eq!(
            (status.results[0].remaining, status.results[1].remaining),
            (small_left, large_left),
            "{algorithm:?}: denied requests consumed nothing"
        );
    }
    limiter.service.stop().await
}

async fn a_denied_check_consumes_nothing_from_the_others(store: StoreKind) -> anyhow::Result<()> {
    let mut limiter = Limiter::start(&store, LIMITS, &[]).await?;
    // Different scopes and subjects: on the cluster these land in different slots.
    let (user, ip) = (subject("aon-user"), subject("aon-ip"));
    let checks = || {
        vec![
            policy_check("user", &user, "ten"),
            policy_check("ip", &ip, "one"),
        ]
    };
    let first = limiter
        .client
        .check_limit(request(checks(), 1))
        .await?
        .into_inner();
    assert!(first.allowed);
    for _ in 0..3 {
        let denied = limiter
            .client
            .check_limit(request(checks(), 1))
            .await?
            .into_inner();
        assert!(!denied.allowed);
        assert!(denied.results[0].allowed, "the user check alone would pass");
        assert!(!denied.results[1].allowed, "the ip check denies");
        assert_eq!(denied.limit, 1, "the denying check speaks for the request");
    }
    let status = limiter
        .client
        .get_limit_status(pb::GetLimitStatusRequest {
            checks: vec![policy_check("user", &user, "ten")],
            cost: 1,
        })
        .await?
        .into_inner();
    assert_eq!(
        status.results[0].remaining, 9,
        "only the allowed request was consumed"
    );
    limiter.service.stop().await
}

async fn status_reads_and_reset_clears(store: StoreKind) -> anyhow::Result<()> {
    let mut limiter = Limiter::start(&store, LIMITS, &[]).await?;
    let who = subject("status");
    let checks = || vec![policy_check("project", &who, "five")];
    for _ in 0..2 {
        limiter.client.check_limit(request(checks(), 2)).await?;
    }
    for _ in 0..3 {
        let status = limiter
            .client
            .get_limit_status(pb::GetLimitStatusRequest {
                checks: checks(),
                cost: 1,
            })
            .await?
            .into_inner();
        assert_eq!(status.results[0].remaining, 1, "reading does not consume");
        assert!(status.results[0].allowed);
    }
    let reset = limiter
        .client
        .reset_limit(pb::ResetLimitRequest { checks: checks() })
        .await?
        .into_inner();
    assert_eq!(reset.reset, 1);
    let after = limiter
        .client
        .check_limit(request(checks(), 5))
        .await?
        .into_inner();
    assert!(after.allowed, "a reset counter has its full limit again");
    limiter.service.stop().await
}

async fn shadow_policies_report_and_never_deny(store: StoreKind) -> anyhow::Result<()> {
    let mut limiter = Limiter::start(&store, LIMITS, &[]).await?;
    let who = subject("shadow");
    let mut shadow_denials = 0;
    for _ in 0..4 {
        let r = limiter
            .client
            .check_limit(request(
                vec![
                    policy_check("user", &who, "watch"),
                    policy_check("ip", &who, "ten"),
                ],
                1,
            ))
            .await?
            .into_inner();
        assert!(r.allowed, "shadow never denies");
        assert!(r.results[0].shadow);
        shadow_denials += usize::from(r.shadow_denied);
    }
    assert_eq!(
        shadow_denials, 2,
        "the third and fourth would have been denied"
    );
    // An enforced denial, and an inline limit (counted as policy "inline").
    for expected in [true, false] {
        let r = limiter
            .client
            .check_limit(request(vec![policy_check("api_key", &who, "one")], 1))
            .await?
            .into_inner();
        assert_eq!(r.allowed, expected);
    }
    let hour = Duration::from_secs(3600);
    let inline = inline_check("endpoint", &who, pb::Algorithm::Gcra, 5, hour, 0);
    limiter.client.check_limit(request(vec![inline], 1)).await?;
    // A custom scope the limits file names keeps its name; scopes callers make up share one
    // label, so they cannot grow the metrics without bound.
    for scope in ["team", "made-up-a", "made-up-b"] {
        let inline = inline_check(scope, &who, pb::Algorithm::Gcra, 5, hour, 0);
        limiter.client.check_limit(request(vec![inline], 1)).await?;
    }
    let text = sluice::server::metrics_handle().render();
    assert!(!text.contains("made-up"), "{text}");
    // Each test runs in its own process (nextest), so these counts are this test's.
    for (labels, expected) in [
        (["watch", "user", "allowed", "store"], 2),
        (["watch", "user", "shadow_denied", "store"], 2),
        (["ten", "ip", "allowed", "store"], 4),
        (["one", "api_key", "allowed", "store"], 1),
        (["one", "api_key", "denied", "store"], 1),
        (["inline", "endpoint", "allowed", "store"], 1),
        (["inline", "team", "allowed", "store"], 1),
        (["inline", "custom", "allowed", "store"], 2),
    ] {
        assert_eq!(checks_counted(labels), expected, "{labels:?}");
    }
    limiter.service.stop().await
}

/// `sluice_limiter_checks_total{policy, scope, decision, source}` as this process's
/// `/metrics` renders it.
fn checks_counted(labels: [&str; 4]) -> u64 {
    let names = ["policy", "scope", "decision", "source"];
    let text = sluice::server::metrics_handle().render();
    text.lines()
        .filter_map(|line| line.strip_prefix("sluice_limiter_checks_total{"))
        .filter_map(|rest| rest.split_once("} "))
        .filter(|(set, _)| {
            let mut set: Vec<&str> = set.split(',').collect();
            set.sort_unstable();
            let mut want: Vec<String> = names
                .iter()
                .zip(labels)
                .map(|(name, value)| format!("{name}=\"{value}\""))
                .collect();
            want.sort_unstable();
            set == want
        })
        .filter_map(|(_, value)| value.trim().parse::<u64>().ok())
        .sum()
}

async fn defaults_and_endpoint_tiers_apply_without_a_policy(
    store: StoreKind,
) -> anyhow::Result<()> {
    let mut limiter = Limiter::start(&store, LIMITS, &[]).await?;
    let who = subject("defaults");
    let bare = |scope: &str, subject: &str| pb::Check {
        scope: scope.into(),
        subject: subject.into(),
        limit: None,
    };
    let user = limiter
        .client
        .check_limit(request(vec![bare("user", &who)], 1))
        .await?
        .into_inner();
    assert_eq!(
        (user.limit, user.results[0].policy.as_str()),
        (1000, "user")
    );
    let ip = limiter
        .client
        .check_limit(request(vec![bare("ip", &who)], 1))
        .await?
        .into_inner();
    assert_eq!(ip.limit, 100);
    let tier = limiter
        .client
        .check_limit(request(vec![bare("endpoint", "/v1/analysis")], 1))
        .await?
        .into_inner();
    assert_eq!((tier.limit, tier.results[0].policy.as_str()), (3, "tier"));
    let err = limiter
        .client
        .check_limit(request(vec![bare("tenant", &who)], 1))
        .await
        .expect_err("no default for a custom scope");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    limiter.service.stop().await
}

async fn retry_after_is_honest(store: StoreKind) -> anyhow::Result<()> {
    let mut limiter = Limiter::start(&store, LIMITS, &[]).await?;
    for algorithm in ALGORITHMS {
        let who = subject("retry");
        let check = || inline_check("user", &who, algorithm, 2, Duration::from_millis(400), 0);
        let mut denied = None;
        for _ in 0..4 {
            let r = limiter
                .client
                .check_limit(request(vec![check()], 1))
                .await?
                .into_inner();
            if !r.allowed {
                denied = Some(r);
                break;
            }
        }
        let denied = denied.expect("a limit of 2 denies within 4 requests");
        let retry = duration(denied.retry_after.as_ref());
        assert!(
            retry <= Duration::from_millis(800),
            "{algorithm:?}: {retry:?}"
        );
        // Waiting exactly what the limiter said is enough (the server rounds up).
        tokio::time::sleep(retry).await;
        let after = limiter
            .client
            .check_limit(request(vec![check()], 1))
            .await?
            .into_inner();
        assert!(
            after.allowed,
            "{algorithm:?} after waiting {retry:?}: {after:?}"
        );
    }
    limiter.service.stop().await
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    super::$name(StoreKind::Embedded).await
                }
            )*
        }
        mod standalone {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    let redis = RedisServer::start().await?;
                    super::$name(StoreKind::Redis(redis.url())).await
                }
            )*
        }
        mod cluster {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    let cluster = RedisCluster::start().await?;
                    super::$name(StoreKind::Redis(cluster.url())).await
                }
            )*
        }
    };
}

suite!(
    every_algorithm_admits_exactly_its_limit,
    concurrent_requests_are_judged_one_after_another,
    cost_is_all_or_nothing_within_a_check,
    a_denied_check_consumes_nothing_from_the_others,
    status_reads_and_reset_clears,
    shadow_policies_report_and_never_deny,
    defaults_and_endpoint_tiers_apply_without_a_policy,
    retry_after_is_honest,
);
