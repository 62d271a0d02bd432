//! limiter-svc as a system: exactness under concurrency across two instances on one Redis,
//! failure modes with Redis killed and restarted, hot reload of the limits file, bad input.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sluice::proto::envoy::extensions::common::ratelimit::v3::{
    RateLimitDescriptor, rate_limit_descriptor,
};
use sluice::proto::envoy::service::ratelimit::v3 as rls;
use sluice::proto::sluice::limiter::v1 as pb;
use sluice_testkit::limiter::{Limiter, StoreKind, inline_check, policy_check, request};
use sluice_testkit::{RedisServer, eventually, probe};
use tonic::Code;

const LIMITS: &str = r#"
[policies.open]
algorithm = "gcra"
limit = 1000000
window = "1h"
failure_mode = "fail_open"

[policies.closed]
algorithm = "gcra"
limit = 1000000
window = "1h"
failure_mode = "fail_closed"

[policies.local]
limit = 50
window = "1h"
failure_mode = "local"

[[rls]]
domain = "edge"
rules = [
  { match = ["closed"], policy = "closed" },
  { match = ["open"], policy = "open" },
]
"#;

/// A ShouldRateLimit request of one descriptor per key, each with a value of its own.
fn rls_request(keys: &[&str], run: &str) -> rls::RateLimitRequest {
    rls::RateLimitRequest {
        domain: "edge".into(),
        descriptors: keys
            .iter()
            .map(|key| RateLimitDescriptor {
                entries: vec![rate_limit_descriptor::Entry {
                    key: (*key).to_owned(),
                    value: run.to_owned(),
                }],
                ..Default::default()
            })
            .collect(),
        hits_addend: 1,
    }
}

fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}", std::process::id())
}

/// 64 concurrent clients spread over 2 instances sharing one Redis send 1,000 requests for one
/// subject with a limit of 100 per 10 s; each request also carries a per-client check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_64_clients_admit_exactly_the_limit() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let store = StoreKind::Redis(redis.url());
    let a = Limiter::start(&store, "", &[]).await?;
    let b = Limiter::start(&store, "", &[]).await?;
    let run = run_id();
    for algorithm in [
        pb::Algorithm::SlidingWindowLog,
        pb::Algorithm::SlidingWindowCounter,
        pb::Algorithm::FixedWindow,
        pb::Algorithm::TokenBucket,
        pb::Algorithm::Gcra,
    ] {
        let shared = format!("shared-{run}-{}", algorithm.as_str_name());
        let allowed = Arc::new(AtomicU64::new(0));
        let started = tokio::time::Instant::now();
        let mut clients = Vec::new();
        for c in 0..64 {
            let mut client = if c % 2 == 0 {
                a.client.clone()
            } else {
                b.client.clone()
            };
            let shared = shared.clone();
            let own = format!("own-{run}-{}-{c}", algorithm.as_str_name());
            let allowed = allowed.clone();
            clients.push(tokio::spawn(async move {
                let mut mine = 0u64;
                for _ in 0..16 {
                    let checks = vec![
                        inline_check(
                            "project",
                            &shared,
                            algorithm,
                            100,
                            Duration::from_secs(10),
                            0,
                        ),
                        inline_check(
                            "user",
                            &own,
                            pb::Algorithm::SlidingWindowLog,
                            1000,
                            Duration::from_secs(3600),
                            0,
                        ),
                    ];
                    let r = client.check_limit(request(checks, 1)).await?.into_inner();
                    if r.allowed {
                        mine += 1;
                    }
                }
                allowed.fetch_add(mine, Ordering::Relaxed);
                anyhow::Ok((own, mine))
            }));
        }
        let mut per_client = Vec::new();
        for client in clients {
            per_client.push(client.await??);
        }
        let elapsed = started.elapsed().as_secs_f64();
        let allowed = allowed.load(Ordering::Relaxed);
        // Documented bounds (README, "Algorithms"); 10 units/s refill for the buckets.
        let refill = (10.0 * elapsed).ceil() as u64 + 1;
        let (low, high) = match algorithm {
            pb::Algorithm::SlidingWindowLog => (100, 100),
            pb::Algorithm::SlidingWindowCounter => (100, 100 + refill),
            pb::Algorithm::FixedWindow => (100, 200),
            _ => (100, 100 + refill),
        };
        assert!(
            (low..=high).contains(&allowed),
            "{algorithm:?}: {allowed} allowed in {elapsed:.2}s, expected {low}..={high}"
        );
        // All or nothing: each client's own counter holds exactly its admitted requests.
        for (own, mine) in per_client {
            let status = a
                .client
                .clone()
                .get_limit_status(pb::GetLimitStatusRequest {
                    checks: vec![inline_check(
                        "user",
                        &own,
                        pb::Algorithm::SlidingWindowLog,
                        1000,
                        Duration::from_secs(3600),
                        0,
                    )],
                    cost: 1,
                })
                .await?
                .into_inner();
            assert_eq!(
                status.results[0].remaining,
                1000 - mine,
                "{algorithm:?} {own}: denied requests consumed nothing"
            );
        }
    }
    a.service.stop().await?;
    b.service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_load_answers_by_failure_mode_then_recovers() -> anyhow::Result<()> {
    let mut redis = RedisServer::start().await?;
    let mut limiter = Limiter::start(
        &StoreKind::Redis(redis.url()),
        LIMITS,
        &[
            "--redis-connect-timeout",
            "200ms",
            "--redis-command-timeout",
            "200ms",
        ],
    )
    .await?;
    let run = run_id();
    let check = |policy: &str| {
        request(
            vec![policy_check("user", &format!("{policy}-{run}"), policy)],
            1,
        )
    };
    let mut client = limiter.client.clone();
    for policy in ["open", "closed", "local"] {
        let r = client.check_limit(check(policy)).await?.into_inner();
        assert!(
            r.allowed && r.source == i32::from(pb::Source::Store),
            "{policy}: {r:?}"
        );
    }

    redis.kill()?;
    // The first call meets the dead connection itself (the breaker needs three failures) and
    // its answer names the cause once.
    let status = client
        .check_limit(check("closed"))
        .await
        .expect_err("a fail-closed policy without Redis");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().starts_with("store unavailable: ")
            && status.message().matches("store unavailable").count() == 1
            && status.message().ends_with("is fail-closed"),
        "{status:?}"
    );
    // Load goes on: the first calls wait for Redis (bounded by the timeouts) and trip the
    // breaker, which health then reports.
    let url = limiter.service.url();
    eventually(Duration::from_secs(10), "the breaker to open", || {
        let (url, mut client, req) = (url.clone(), client.clone(), check("open"));
        async move {
            let _ = client.check_limit(req).await;
            (probe::health(&url, limiter_svc::STORE_HEALTH).await.ok()? != probe::SERVING)
                .then_some(())
        }
    })
    .await?;

    // While open, every answer comes at once, per policy.
    let mut latencies = Vec::new();
    let mut local_allowed = 0;
    for i in 0..300 {
        let policy = ["open", "closed", "local"][i % 3];
        let sent = tokio::time::Instant::now();
        let result = client.check_limit(check(policy)).await;
        latencies.push(sent.elapsed());
        match (policy, result) {
            ("open", Ok(r)) => {
                let r = r.into_inner();
                assert!(
                    r.allowed && r.source == i32::from(pb::Source::FailureMode),
                    "{r:?}"
                );
            }
            ("closed", Err(status)) => {
                assert_eq!(status.code(), Code::Unavailable);
                assert!(status.message().contains("fail-closed"), "{status:?}");
            }
            ("local", Ok(r)) => {
                let r = r.into_inner();
                assert_eq!(r.source, i32::from(pb::Source::FailureMode));
                local_allowed += u64::from(r.allowed);
            }
            (policy, other) => panic!("{policy}: unexpected {other:?}"),
        }
    }
    assert_eq!(
        local_allowed, 50,
        "the local limiter enforces the policy's limit in-process"
    );
    // Through Envoy's API a fail-closed policy denies in the answer (Envoy lets a request
    // through when the call fails); a fail-open one allows.
    let mut envoy = rls::rate_limit_service_client::RateLimitServiceClient::new(
        limiter.service.channel().await?,
    );
    let code = |r: &rls::RateLimitResponse| {
        (
            r.overall_code,
            r.statuses.iter().map(|s| s.code).collect::<Vec<_>>(),
        )
    };
    let (ok, over) = (
        i32::from(rls::rate_limit_response::Code::Ok),
        i32::from(rls::rate_limit_response::Code::OverLimit),
    );
    let both = envoy
        .should_rate_limit(rls_request(&["closed", "open"], &run))
        .await?
        .into_inner();
    assert_eq!(code(&both), (over, vec![over, ok]), "{both:?}");
    assert!(
        both.response_headers_to_add
            .iter()
            .any(|h| h.key == "Retry-After"),
        "{both:?}"
    );
    let open = envoy
        .should_rate_limit(rls_request(&["open"], &run))
        .await?
        .into_inner();
    assert_eq!(code(&open), (ok, vec![ok]), "{open:?}");
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    println!(
        "failure-mode answers while the breaker is open: p50 {:?}, p99 {:?}, max {:?}",
        latencies[latencies.len() / 2],
        p99,
        latencies[latencies.len() - 1]
    );
    // No call waited for Redis (200 ms timeouts): a behavioural bound, not a benchmark.
    assert!(
        latencies[latencies.len() - 1] < Duration::from_millis(100),
        "max {:?}",
        latencies[latencies.len() - 1]
    );

    redis.restart().await?;
    eventually(
        Duration::from_secs(10),
        "Redis-backed answers to resume",
        || {
            let mut client = client.clone();
            let req = check("closed");
            async move {
                let r = client.check_limit(req).await.ok()?.into_inner();
                (r.source == i32::from(pb::Source::Store)).then_some(())
            }
        },
    )
    .await?;
    assert_eq!(
        probe::health(&limiter.service.url(), limiter_svc::STORE_HEALTH).await?,
        probe::SERVING
    );
    limiter.service.stop().await
}

/// Calls that queued for Redis while it died (behind calls waiting out its timeouts) are
/// answered by failure mode once the breaker opens: each waits out the timeouts at most once,
/// not once per batch ahead of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_queued_when_redis_dies_waits_out_the_timeouts_once() -> anyhow::Result<()> {
    const TIMEOUT: Duration = Duration::from_secs(1);
    const CALLS: usize = 3000;
    let mut redis = RedisServer::start().await?;
    let timeout = format!("{}ms", TIMEOUT.as_millis());
    let mut limiter = Limiter::start(
        &StoreKind::Redis(redis.url()),
        LIMITS,
        &[
            "--redis-connect-timeout",
            &timeout,
            "--redis-command-timeout",
            &timeout,
        ],
    )
    .await?;
    let run = run_id();
    let check = |i: usize| {
        request(
            vec![policy_check("user", &format!("open-{run}-{i}"), "open")],
            1,
        )
    };
    let first = limiter.client.check_limit(check(0)).await?.into_inner();
    assert_eq!(first.source, i32::from(pb::Source::Store), "{first:?}");
    // Three connections: the calls exceed one connection's stream limit.
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(pb::limiter_client::LimiterClient::new(
            limiter.service.channel().await?,
        ));
    }

    redis.kill()?;
    let (answers, slowest) = sluice_testkit::all_timed((0..CALLS).map(|i| {
        let mut client = clients[i % clients.len()].clone();
        let req = check(i);
        async move { client.check_limit(req).await }
    }))
    .await;
    for (_, answer) in &answers {
        let r = answer
            .as_ref()
            .map_err(|s| anyhow::anyhow!("{s:?}"))?
            .get_ref();
        assert!(r.allowed, "fail_open allows: {r:?}");
    }
    let by_failure_mode = answers
        .iter()
        .filter(|(_, a)| {
            a.as_ref()
                .is_ok_and(|r| r.get_ref().source == i32::from(pb::Source::FailureMode))
        })
        .count();
    println!("{CALLS} calls as Redis died: slowest {slowest:?}, {by_failure_mode} by failure mode");
    assert_eq!(by_failure_mode, CALLS, "none reached the dead Redis");
    // A call waits for a call slot held by calls waiting out the timeouts, then for its own
    // connection at most: a behavioural bound (with the queue drained 256 requests per
    // round of timeouts, it would be about 3,000 / 256 rounds of 1 s), not a benchmark.
    assert!(
        slowest < 6 * TIMEOUT,
        "the slowest call took {slowest:?}, more than the timeouts' worth"
    );
    limiter.service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_file_reloads_without_failing_a_request() -> anyhow::Result<()> {
    let limiter = Limiter::start(
        &StoreKind::Embedded,
        "[policies.p]\nlimit = 1\nwindow = \"1h\"\n",
        &["--limits-reload-interval", "50ms"],
    )
    .await?;
    let errors = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let (mut client, errors, stop) = (limiter.client.clone(), errors.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut n, mut first_error) = (0u64, None);
            while !stop.is_cancelled() && n < 100_000 {
                n += 1;
                let req = request(vec![policy_check("user", &format!("load-{n}"), "p")], 1);
                if let Err(status) = client.check_limit(req).await {
                    errors.fetch_add(1, Ordering::Relaxed);
                    first_error.get_or_insert(status);
                }
            }
            (n, first_error)
        })
    };
    // As deploy tools replace a file: whole, by rename. (A writer that truncates the file and
    // then stalls for longer than the reload interval can expose a partial file; README says
    // so.)
    let replace = |text: &str| -> std::io::Result<()> {
        let path = limiter.limits_path();
        let next = path.with_extension("next");
        std::fs::write(&next, text)?;
        std::fs::rename(&next, path)
    };
    let limit_of = |mut client: pb::limiter_client::LimiterClient<tonic::transport::Channel>| async move {
        let req = request(vec![policy_check("user", "probe", "p")], 1);
        client
            .check_limit(req)
            .await
            .ok()
            .map(|r| r.into_inner().limit)
    };
    replace("[policies.p]\nlimit = 3\nwindow = \"1h\"\n")?;
    eventually(Duration::from_secs(5), "the new limit", || {
        let client = limiter.client.clone();
        async move { (limit_of(client).await? == 3).then_some(()) }
    })
    .await?;
    replace("[policies.p]\nlimit = 0\nwindow = \"1h\"\n")?;
    tokio::time::sleep(Duration::from_millis(300)).await; // several reload intervals
    assert_eq!(
        limit_of(limiter.client.clone()).await,
        Some(3),
        "a bad file leaves the policies in force"
    );
    stop.cancel();
    let (sent, first_error) = load.await?;
    assert!(sent > 0);
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "no request failed during reloads; the first failure: {first_error:?}"
    );
    limiter.service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_status_naming_the_field() -> anyhow::Result<()> {
    let mut limiter = Limiter::start(
        &StoreKind::Embedded,
        "[policies.p]\nlimit = 5\nwindow = \"1m\"\n",
        &[],
    )
    .await?;
    let ok = || policy_check("user", "u1", "p");
    let long = "x".repeat(300);
    let inline = |alg: i32, limit: u64, secs: i64, burst: u64| pb::Check {
        scope: "user".into(),
        subject: "u1".into(),
        limit: Some(pb::check::Limit::Inline(pb::InlineLimit {
            algorithm: alg,
            limit,
            window: Some(prost_types::Duration {
                seconds: secs,
                nanos: 0,
            }),
            burst,
        })),
    };
    let cases: Vec<(pb::CheckLimitRequest, Code, &str)> = vec![
        (request(vec![], 1), Code::InvalidArgument, "checks"),
        (request(vec![ok(); 17], 1), Code::InvalidArgument, "checks"),
        (
            request(vec![policy_check("", "u1", "p")], 1),
            Code::InvalidArgument,
            "checks[0].scope",
        ),
        (
            request(vec![policy_check("us er", "u1", "p")], 1),
            Code::InvalidArgument,
            "checks[0].scope",
        ),
        (
            request(vec![policy_check("user", "", "p")], 1),
            Code::InvalidArgument,
            "checks[0].subject",
        ),
        (
            request(vec![policy_check("user", &long, "p")], 1),
            Code::InvalidArgument,
            "checks[0].subject",
        ),
        (
            request(vec![ok()], 1_000_001),
            Code::InvalidArgument,
            "cost",
        ),
        (request(vec![ok()], 6), Code::InvalidArgument, "cost"),
        (
            request(vec![policy_check("user", "u1", "nope")], 1),
            Code::NotFound,
            "checks[0].policy",
        ),
        (
            request(vec![inline(1, 0, 60, 0)], 1),
            Code::InvalidArgument,
            "checks[0].inline.limit",
        ),
        (
            request(vec![inline(1, 5, 0, 0)], 1),
            Code::InvalidArgument,
            "checks[0].inline.window",
        ),
        (
            request(vec![inline(99, 5, 60, 0)], 1),
            Code::InvalidArgument,
            "checks[0].inline.algorithm",
        ),
        (
            request(vec![inline(1, 5, 60, 3)], 1),
            Code::InvalidArgument,
            "checks[0].inline.burst",
        ),
        (
            request(vec![inline(1, 1_000_000, 60, 0)], 1),
            Code::InvalidArgument,
            "checks[0].inline.limit",
        ),
        (
            request(vec![ok(), ok()], 1),
            Code::InvalidArgument,
            "checks[1]",
        ),
    ];
    for (req, code, field) in cases {
        let err = limiter
            .client
            .check_limit(req.clone())
            .await
            .expect_err(field);
        assert_eq!(err.code(), code, "{field}: {err:?}");
        assert!(
            err.message().contains(field),
            "{field} named in: {}",
            err.message()
        );
    }
    // Nothing was consumed by any of them.
    let r = limiter
        .client
        .check_limit(request(vec![ok()], 5))
        .await?
        .into_inner();
    assert!(r.allowed, "the whole limit is still there");
    limiter.service.stop().await
}

/// A GCRA or token-bucket key whose state has run out (the TAT passed, the bucket refilled) is
/// kept for a second after its last write, so a subject far below its limit overwrites its key
/// instead of missing, deleting and creating it on every check; and a kept key answers exactly
/// as no key would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_state_is_kept_a_second_and_answers_as_new() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut limiter = Limiter::start(&StoreKind::Redis(redis.url()), LIMITS, &[]).await?;
    let mut conn = redis.client().await?;
    for algorithm in [pb::Algorithm::Gcra, pb::Algorithm::TokenBucket] {
        let who = format!("kept-{}", run_id());
        // 2 per 100 ms: after two units the state runs out within 100 ms.
        let check = || inline_check("user", &who, algorithm, 2, Duration::from_millis(100), 0);
        for _ in 0..2 {
            let r = limiter
                .client
                .check_limit(request(vec![check()], 1))
                .await?
                .into_inner();
            assert!(r.allowed, "{algorithm:?}: {r:?}");
        }
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("*{who}*"))
            .query_async(&mut conn)
            .await?;
        let [key] = keys.as_slice() else {
            anyhow::bail!("{algorithm:?}: one key expected, found {keys:?}");
        };
        let ttl: i64 = redis::cmd("PTTL").arg(key).query_async(&mut conn).await?;
        // Without the keep the TTL would be the state's own ~100 ms; the slack below it is
        // for a slow machine between the write and this read.
        assert!(
            (200..=1000).contains(&ttl),
            "{algorithm:?}: kept about a second after the write, not {ttl} ms"
        );
        // Once the state has run out the key is still there, and the subject gets the full
        // capacity back, as a new subject would.
        let status = sluice_testkit::eventually(Duration::from_secs(2), "a refill", || {
            let mut client = limiter.client.clone();
            let check = check();
            async move {
                let r = client
                    .get_limit_status(pb::GetLimitStatusRequest {
                        checks: vec![check],
                        cost: 1,
                    })
                    .await
                    .ok()?
                    .into_inner();
                r.results.into_iter().next().filter(|c| c.remaining == 2)
            }
        })
        .await?;
        assert!(status.allowed, "{algorithm:?}: {status:?}");
        let exists: i64 = redis::cmd("EXISTS").arg(key).query_async(&mut conn).await?;
        assert_eq!(exists, 1, "{algorithm:?}: the spent key is kept");
        let again = limiter
            .client
            .check_limit(request(vec![check()], 1))
            .await?
            .into_inner();
        let fresh = limiter
            .client
            .check_limit(request(
                vec![inline_check(
                    "user",
                    &format!("fresh-{}", run_id()),
                    algorithm,
                    2,
                    Duration::from_millis(100),
                    0,
                )],
                1,
            ))
            .await?
            .into_inner();
        assert!(again.allowed && fresh.allowed, "{again:?} {fresh:?}");
        assert_eq!(
            (again.limit, again.remaining),
            (fresh.limit, fresh.remaining),
            "{algorithm:?}: a kept key answers as a new one"
        );
    }
    limiter.service.stop().await
}

/// Once Redis has denied a subject until T, the instance denies it locally until T: the
/// answers say so (source HOT_KEY_CACHE, an honest retry-after) and Redis sees no call for
/// it; another subject still goes to Redis; a reset clears the local denial at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_over_its_limit_is_denied_locally_without_redis() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut conn = redis.client().await?;
    let limits = "[policies.two]\nalgorithm = \"token_bucket\"\nlimit = 2\nwindow = \"1h\"\n";
    let limiter = Limiter::start(&StoreKind::Redis(redis.url()), limits, &[]).await?;
    let mut client = limiter.client.clone();
    let run = run_id();
    let check = |who: &str| {
        request(
            vec![policy_check("user", &format!("{who}-{run}"), "two")],
            1,
        )
    };
    for _ in 0..2 {
        assert!(client.check_limit(check("hot")).await?.into_inner().allowed);
    }
    let first = client.check_limit(check("hot")).await?.into_inner();
    assert!(!first.allowed);
    assert_eq!(first.source, i32::from(pb::Source::Store), "{first:?}");

    let before = sluice_testkit::redis_server::script_calls(&mut conn).await?;
    for _ in 0..20 {
        let r = client.check_limit(check("hot")).await?.into_inner();
        assert!(!r.allowed, "{r:?}");
        assert_eq!(r.source, i32::from(pb::Source::HotKeyCache), "{r:?}");
        // Until a token comes back, as Redis said.
        let retry = sluice_testkit::limiter::duration(r.retry_after.as_ref());
        let said = sluice_testkit::limiter::duration(first.retry_after.as_ref());
        assert!(
            retry <= said && retry + Duration::from_secs(5) >= said,
            "{retry:?} against {said:?}"
        );
    }
    assert_eq!(
        sluice_testkit::redis_server::script_calls(&mut conn).await?,
        before,
        "no script call for a subject known to be over"
    );
    let cold = client.check_limit(check("cold")).await?.into_inner();
    assert!(
        cold.allowed && cold.source == i32::from(pb::Source::Store),
        "{cold:?}"
    );
    assert!(sluice_testkit::redis_server::script_calls(&mut conn).await? > before);

    client
        .reset_limit(pb::ResetLimitRequest {
            checks: check("hot").checks,
        })
        .await?;
    let after = client.check_limit(check("hot")).await?.into_inner();
    assert!(
        after.allowed && after.source == i32::from(pb::Source::Store),
        "{after:?}"
    );
    limiter.service.stop().await
}
