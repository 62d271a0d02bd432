//! The Sluice worker SDK: lease tasks from queue-svc over its public gRPC contract and run
//! handlers on them.
//!
//! The worker talks to queue-svc only through the generated client in [`sluice::proto`], as a
//! worker in any other language would. The handler trait, the `Lease` stream driver and the
//! exec mode arrive with the worker issue; today the crate provides [`connect`].

#![forbid(unsafe_code)]

use std::time::Duration;

use sluice::proto::sluice::queue::v1::queue_client::QueueClient;
use sluice::telemetry::{GrpcClientTrace, GrpcClientTraceLayer};
use tonic::transport::{Channel, Endpoint};

/// A queue client whose calls carry the caller's trace context.
pub type Client = QueueClient<GrpcClientTrace<Channel>>;

/// Connects to queue-svc at `url` (e.g. `http://127.0.0.1:50052`) within `timeout`.
pub async fn connect(url: &str, timeout: Duration) -> Result<Client, tonic::transport::Error> {
    let channel = Endpoint::from_shared(url.to_owned())?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .connect()
        .await?;
    Ok(QueueClient::new(
        tower::ServiceBuilder::new()
            .layer(GrpcClientTraceLayer)
            .service(channel),
    ))
}

/// The gRPC health status (`SERVING`, `NOT_SERVING`, …) queue-svc reports for itself.
pub async fn health(url: &str, timeout: Duration) -> anyhow::Result<String> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = Endpoint::from_shared(url.to_owned())?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach queue-svc at {url}: {e}"))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(response
        .into_inner()
        .status()
        .as_str_name()
        .trim_start_matches("SERVING_STATUS_")
        .to_owned())
}
