//! The tower layer a Rust service puts in front of its handlers: a real limiter-svc decides,
//! denied gRPC calls get RESOURCE_EXHAUSTED with RetryInfo, denied HTTP requests 429 with
//! Retry-After and RateLimit headers; allowed ones reach the handler.

use sluice::limit_layer::{Protocol, RateLimitLayer};
use sluice::proto::sluice::limiter::v1::{Check, check};
use sluice_testkit::limiter::{Limiter, StoreKind};
use sluice_testkit::probe;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_types::StatusExt;

const LIMITS: &str = "[policies.two]\nlimit = 2\nwindow = \"1h\"\n";

fn by_user(headers: &http::HeaderMap, _uri: &http::Uri) -> Option<Vec<Check>> {
    let user = headers.get("x-user")?.to_str().ok()?;
    Some(vec![Check {
        scope: "user".into(),
        subject: user.into(),
        limit: Some(check::Limit::Policy("two".into())),
    }])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_denials_carry_retry_info() -> anyhow::Result<()> {
    let limiter = Limiter::start(&StoreKind::Embedded, LIMITS, &[]).await?;
    let layer = RateLimitLayer::new(limiter.client.clone(), Protocol::Grpc, by_user);
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(layer)
            .add_service(health)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                stop.clone().cancelled_owned(),
            ),
    );
    let mut client = HealthClient::new(probe::channel(&format!("http://{addr}")).await?);
    let call = |user: &str| {
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        request
            .metadata_mut()
            .insert("x-user", user.parse().expect("ascii"));
        request
    };
    client.check(call("ann")).await?;
    client.check(call("ann")).await?;
    let denied = client
        .check(call("ann"))
        .await
        .expect_err("the third call is over the limit");
    assert_eq!(denied.code(), tonic::Code::ResourceExhausted, "{denied:?}");
    let retry = denied
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo");
    assert!(retry > std::time::Duration::ZERO, "{retry:?}");
    client
        .check(call("bob"))
        .await
        .map_err(|e| anyhow::anyhow!("another user is not limited: {e}"))?;
    let unchecked = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    client
        .check(unchecked)
        .await
        .map_err(|e| anyhow::anyhow!("no x-user: no check: {e}"))?;
    stop.cancel();
    server.await??;
    limiter.service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_denials_are_429_with_retry_after_and_ratelimit_headers() -> anyhow::Result<()> {
    let limiter = Limiter::start(&StoreKind::Embedded, LIMITS, &[]).await?;
    let layer = RateLimitLayer::new(limiter.client.clone(), Protocol::Http, by_user);
    let answers = get_through(layer, &["ann".into(), "ann".into(), "ann".into()]).await?;
    for ok in &answers[..2] {
        assert!(
            ok.starts_with("http/1.1 200") && ok.ends_with("hello"),
            "{ok}"
        );
    }
    let denied = &answers[2];
    assert!(denied.starts_with("http/1.1 429"), "{denied}");
    assert!(denied.contains("\r\nretry-after: "), "{denied}");
    assert!(
        denied.contains("\r\nratelimit-policy: \"sluice\";q=2"),
        "{denied}"
    );
    assert!(
        denied.contains("\r\nratelimit: \"sluice\";r=0;t="),
        "{denied}"
    );
    assert!(!denied.contains("hello"), "the handler did not run");
    limiter.service.stop().await
}

/// Answers `GET /` with `x-user: <user>` from an axum app behind `layer`, as lower-case text.
async fn get_through(layer: RateLimitLayer, users: &[String]) -> anyhow::Result<Vec<String>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = axum::Router::new()
        .route("/", axum::routing::get(|| async { "hello" }))
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .into_future(),
    );
    let mut answers = Vec::new();
    for user in users {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET / HTTP/1.1\r\nHost: x\r\nx-user: {user}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut text = String::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            stream.read_to_string(&mut text),
        )
        .await??;
        answers.push(text.to_ascii_lowercase());
    }
    stop.cancel();
    server.await??;
    Ok(answers)
}

/// A key the limiter refuses as malformed (here longer than a subject may be) gets 400 and
/// the handler never runs, even with the layer failing open: a caller cannot escape its limit
/// by sending a bad key. A check the layer's own configuration gets wrong follows the failure
/// mode instead. A limiter that accepts connections but never answers counts as unreachable
/// once the timeout passes: failing closed, 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_keys_are_refused_and_a_silent_limiter_times_out() -> anyhow::Result<()> {
    let limiter = Limiter::start(&StoreKind::Embedded, LIMITS, &[]).await?;
    let layer = RateLimitLayer::new(limiter.client.clone(), Protocol::Http, by_user);
    let answers = get_through(layer, &["x".repeat(300), "ann".into()]).await?;
    assert!(answers[0].starts_with("http/1.1 400"), "{}", answers[0]);
    assert!(!answers[0].contains("hello"), "the handler did not run");
    assert!(answers[1].starts_with("http/1.1 200"), "{}", answers[1]);
    // A check the layer itself gets wrong (a scope the limiter refuses) is its configuration's
    // fault, not the caller's: the failure mode applies.
    let misconfigured = |_: &http::HeaderMap, _: &http::Uri| {
        Some(vec![Check {
            scope: "no such scope!".into(),
            subject: "ann".into(),
            limit: Some(check::Limit::Policy("two".into())),
        }])
    };
    let layer = RateLimitLayer::new(limiter.client.clone(), Protocol::Http, misconfigured);
    let answers = get_through(layer.clone(), &["ann".into()]).await?;
    assert!(answers[0].starts_with("http/1.1 200"), "{}", answers[0]);
    let answers = get_through(layer.fail_open(false), &["ann".into()]).await?;
    assert!(answers[0].starts_with("http/1.1 503"), "{}", answers[0]);
    limiter.service.stop().await?;

    // Accepts connections, reads nothing, answers nothing.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", silent.local_addr()?);
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let client = sluice::proto::sluice::limiter::v1::limiter_client::LimiterClient::new(
        tonic::transport::Channel::from_shared(url)?.connect_lazy(),
    );
    let layer = RateLimitLayer::new(client, Protocol::Http, by_user)
        .fail_open(false)
        .timeout(std::time::Duration::from_millis(100));
    let answers = get_through(layer, &["ann".into()]).await?;
    assert!(answers[0].starts_with("http/1.1 503"), "{}", answers[0]);
    held.abort();
    Ok(())
}

/// Against a limiter with auth on, the layer sends its key with every check and the limit is
/// enforced; a layer without valid credentials is refused by the limiter, which counts as the
/// layer's own configuration at fault: its failure mode decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_presents_its_key_to_a_limiter_with_auth_on() -> anyhow::Result<()> {
    let creds =
        sluice_testkit::auth::Credentials::new(&[("api", "sk_api", &["producer"], &["*"])])?;
    let limiter = Limiter::start(
        &StoreKind::Embedded,
        LIMITS,
        &["--auth-keys", &creds.keys_arg()],
    )
    .await?;
    let keyed = RateLimitLayer::new(limiter.client.clone(), Protocol::Http, by_user)
        .credentials("sk_api")?
        .fail_open(false);
    let answers = get_through(keyed, &["bo".into(), "bo".into(), "bo".into()]).await?;
    assert!(answers[0].starts_with("http/1.1 200"), "{}", answers[0]);
    assert!(answers[1].starts_with("http/1.1 200"), "{}", answers[1]);
    assert!(answers[2].starts_with("http/1.1 429"), "{}", answers[2]);
    let keyless = RateLimitLayer::new(limiter.client.clone(), Protocol::Http, by_user);
    let answers = get_through(keyless.clone().fail_open(false), &["cy".into()]).await?;
    assert!(answers[0].starts_with("http/1.1 503"), "{}", answers[0]);
    // It is the credentials that were refused: the limiter answers UNAUTHENTICATED.
    let refused = limiter
        .client
        .clone()
        .check_limit(sluice::proto::sluice::limiter::v1::CheckLimitRequest {
            checks: vec![Check {
                scope: "user".into(),
                subject: "cy".into(),
                limit: Some(check::Limit::Policy("two".into())),
            }],
            cost: 1,
            request_id: String::new(),
        })
        .await
        .expect_err("no credentials");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let answers = get_through(keyless, &["cy".into()]).await?;
    assert!(answers[0].starts_with("http/1.1 200"), "{}", answers[0]);
    limiter.service.stop().await
}
