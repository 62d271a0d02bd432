//! Clients for the standard services every Sluice server exposes: health and reflection.

use anyhow::Context;
use tonic_health::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// The health status the server at `url` reports for `service` ("" = the whole server).
pub async fn health(url: &str, service: &str) -> anyhow::Result<i32> {
    let mut client = HealthClient::new(channel(url).await?);
    let response = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(response.into_inner().status)
}

/// A plain channel to `url`, connected within 5 s.
pub async fn channel(url: &str) -> anyhow::Result<tonic::transport::Channel> {
    Ok(tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await?)
}

/// `SERVING` as the health protocol encodes it.
pub const SERVING: i32 = ServingStatus::Serving as i32;

/// Service names listed by `grpc.reflection.v1`.
pub async fn reflection_v1(url: &str) -> anyhow::Result<Vec<String>> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut client = ServerReflectionClient::new(channel(url).await?);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::once(request))
        .await?
        .into_inner();
    let reply = stream.message().await?.context("no reflection reply")?;
    match reply.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => anyhow::bail!("unexpected reflection reply {other:?}"),
    }
}

/// Service names listed by `grpc.reflection.v1alpha` (what older grpcurl and Python's
/// grpcio-reflection speak).
pub async fn reflection_v1alpha(url: &str) -> anyhow::Result<Vec<String>> {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut client = ServerReflectionClient::new(channel(url).await?);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::once(request))
        .await?
        .into_inner();
    let reply = stream.message().await?.context("no reflection reply")?;
    match reply.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => anyhow::bail!("unexpected reflection reply {other:?}"),
    }
}
