//! The enqueue hop of a trace, as collected by a real OTLP/gRPC receiver: queue-svc's publish
//! span joins the trace in the call's metadata, or, when the metadata carries none, the
//! "traceparent" the producer put in the task's headers; the stored task carries the publish
//! span's context for its worker.
//!
//! Alone in its test binary because it installs the process-wide subscriber.

use std::time::Duration;

use sluice::proto::sluice::queue::v1 as pb;
use sluice::telemetry::GrpcClientTraceLayer;
use sluice_testkit::queue::{dequeue, spec};
use sluice_testkit::{OtlpReceiver, Service, probe};
use tracing::Instrument;

const PRODUCER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PRODUCER_SPAN: &str = "00f067aa0ba902b7";

fn task(payload: &str) -> pb::EnqueueRequest {
    let mut task = spec("p", "traced", payload.as_bytes(), pb::Priority::Normal);
    task.headers.insert(
        "traceparent".into(),
        format!("00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-01"),
    );
    pb::EnqueueRequest { task: Some(task) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_span_joins_the_metadata_trace_or_else_the_headers() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let telemetry = receiver.install_telemetry("trace-queue-test")?;
    let config = queue_svc::Config::from_args(["queue-svc", "--no-auth"])?;
    let service =
        Service::start(|listeners, shutdown| queue_svc::run(listeners, config, shutdown)).await?;
    let channel = probe::channel(&service.url()).await?;

    // No trace in the metadata: the task's traceparent is the parent.
    let mut plain = pb::queue_client::QueueClient::new(channel.clone());
    let from_headers = plain.enqueue(task("headers")).await?.into_inner().task_id;
    // A traced client: its trace wins over the headers'.
    let traced = tower::ServiceBuilder::new()
        .layer(GrpcClientTraceLayer)
        .service(channel);
    let mut traced = pb::queue_client::QueueClient::new(traced);
    let from_metadata = traced
        .enqueue(task("metadata"))
        .instrument(tracing::info_span!("caller"))
        .await?
        .into_inner()
        .task_id;
    let leases = plain
        .dequeue(dequeue("p", "traced", 2))
        .await?
        .into_inner()
        .leases;

    service.stop().await?;
    telemetry.shutdown().await;
    let spans = receiver
        .wait_for(
            Duration::from_secs(10),
            "two publish spans and the caller",
            |spans| {
                spans.iter().filter(|s| s.name == "task.publish").count() == 2
                    && spans.iter().any(|s| s.name == "caller")
            },
        )
        .await?;
    let publish = |payload: &str| {
        let id = if payload == "headers" {
            &from_headers
        } else {
            &from_metadata
        };
        let lease = leases
            .iter()
            .find(|l| l.task.as_ref().is_some_and(|t| &t.id == id))
            .and_then(|l| l.task.clone())
            .expect("the task was leased");
        let stored = lease
            .headers
            .get("traceparent")
            .cloned()
            .unwrap_or_default();
        let span = spans
            .iter()
            .find(|s| s.name == "task.publish" && stored.contains(&s.span_id))
            .cloned()
            .unwrap_or_else(|| panic!("a publish span for {stored}: {spans:#?}"));
        (stored, span)
    };
    let (stored, span) = publish("headers");
    assert_eq!(span.trace_id, PRODUCER_TRACE, "{span:?}");
    assert_eq!(span.parent_span_id, PRODUCER_SPAN, "{span:?}");
    assert_eq!(stored, format!("00-{PRODUCER_TRACE}-{}-01", span.span_id));

    let (_, span) = publish("metadata");
    let caller = spans
        .iter()
        .find(|s| s.name == "caller")
        .expect("the caller's span");
    assert_eq!(span.trace_id, caller.trace_id, "{spans:#?}");
    assert_ne!(span.trace_id, PRODUCER_TRACE);
    Ok(())
}
