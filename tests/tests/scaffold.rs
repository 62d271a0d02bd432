//! Every service, started in-process: health, both reflection versions, /metrics, and a clean
//! stop.

use sluice_testkit::auth::Credentials;
use sluice_testkit::{Service, probe};

/// `service` runs with auth on: health and reflection answer without credentials, and so do
/// paths naming nothing served (`own_absent` is a made-up method of its own service).
async fn check_scaffold(service: Service, own_absent: &'static str) -> anyhow::Result<()> {
    let url = service.url();
    assert_eq!(probe::health(&url, "").await?, probe::SERVING);
    for services in [
        probe::reflection_v1(&url).await?,
        probe::reflection_v1alpha(&url).await?,
    ] {
        for expected in [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(
                services.iter().any(|s| s == expected),
                "{expected} in {services:?}"
            );
        }
    }
    // Paths no service here answers: a service this binary does not serve, a method its
    // services do not have.
    let channel = probe::channel(&url).await?;
    for path in [
        "/sluice.test.Absent/Call",
        "/grpc.health.v1.Health/ProbeNoSuchMethod",
        own_absent,
    ] {
        let status = call_empty(&channel, path).await;
        assert_eq!(
            status.code(),
            tonic::Code::Unimplemented,
            "{path}: {status:?}"
        );
    }
    let metrics = http_get(service.metrics, "/metrics").await?;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains("sluice_grpc_requests_total"),
        "the calls above were counted: {metrics}"
    );
    let unknown = format!(
        "sluice_grpc_requests_total{{method=\"{}\",code=\"12\"}} 3",
        sluice::server::UNKNOWN_METHOD
    );
    assert!(
        metrics.contains(&unknown),
        "the three calls counted under one label: {metrics}"
    );
    assert!(
        !metrics.contains("Absent") && !metrics.contains("NoSuchMethod"),
        "a path the caller made up is no label: {metrics}"
    );
    service.stop().await
}

/// One unary call with an empty message to `path`; its status (OK if it was answered).
async fn call_empty(channel: &tonic::transport::Channel, path: &'static str) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    if let Err(err) = grpc.ready().await {
        return tonic::Status::unavailable(err.to_string());
    }
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = http::uri::PathAndQuery::from_static(path);
    match grpc.unary(tonic::Request::new(()), path, codec).await {
        Ok(_) => tonic::Status::ok("answered"),
        Err(status) => status,
    }
}

/// A minimal HTTP/1.1 GET, enough to read /metrics.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_serves_health_reflection_and_metrics() -> anyhow::Result<()> {
    let creds = Credentials::new(&[])?;
    let keys = creds.keys_arg();
    let config = limiter_svc::Config::from_args(["limiter-svc", "--auth-keys", &keys])?;
    let service = Service::start(|l, s| limiter_svc::run(l, config, s)).await?;
    check_scaffold(service, "/sluice.limiter.v1.Limiter/NoSuchMethod").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_serves_health_reflection_and_metrics() -> anyhow::Result<()> {
    let creds = Credentials::new(&[])?;
    let keys = creds.keys_arg();
    let config = queue_svc::Config::from_args(["queue-svc", "--auth-keys", &keys])?;
    let service = Service::start(|l, s| queue_svc::run(l, config, s)).await?;
    check_scaffold(service, "/sluice.queue.v1.Queue/NoSuchMethod").await
}
