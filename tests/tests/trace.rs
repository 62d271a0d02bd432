//! One trace across a gRPC hop: the client's span and the server's span of the same call share
//! a trace id, as collected by a real OTLP/gRPC receiver.
//!
//! Alone in its test binary because it installs the process-wide subscriber.

use std::time::Duration;

use sluice::telemetry::GrpcClientTraceLayer;
use sluice_testkit::{OtlpReceiver, Service, probe};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tracing::Instrument;

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_and_server_spans_share_one_trace() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let telemetry = receiver.install_telemetry("trace-test")?;
    let config = limiter_svc::Config::from_args(["limiter-svc", "--no-auth"])?;
    let service =
        Service::start(|listeners, shutdown| limiter_svc::run(listeners, config, shutdown)).await?;

    let channel = tower::ServiceBuilder::new()
        .layer(GrpcClientTraceLayer)
        .service(probe::channel(&service.url()).await?);
    let mut client = HealthClient::new(channel);
    client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .instrument(tracing::info_span!("caller"))
        .await?;

    service.stop().await?;
    telemetry.shutdown().await; // flushes the batch exporter

    let spans = receiver
        .wait_for(
            Duration::from_secs(10),
            "client and server spans",
            |spans| {
                spans.iter().any(|s| s.kind == SERVER) && spans.iter().any(|s| s.kind == CLIENT)
            },
        )
        .await?;
    let named = |kind| {
        spans
            .iter()
            .find(|s| s.kind == kind && s.name == "grpc.health.v1.Health/Check")
            .cloned()
    };
    let client_span = named(CLIENT).expect("a client span for the call");
    let server_span = named(SERVER).expect("a server span for the call");
    assert_eq!(
        client_span.trace_id, server_span.trace_id,
        "one trace: {spans:#?}"
    );
    assert_eq!(
        server_span.parent_span_id, client_span.span_id,
        "the server span is the client span's child"
    );
    assert_eq!(server_span.service, "trace-test");
    let caller = spans
        .iter()
        .find(|s| s.name == "caller")
        .expect("the caller's span");
    assert_eq!(caller.trace_id, client_span.trace_id);
    assert_eq!(client_span.parent_span_id, caller.span_id);
    Ok(())
}
