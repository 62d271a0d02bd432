//! limiter-svc: answers "may this request go ahead?" over gRPC.
//!
//! Modules:
//! - [`config`]: the binary's options (server, store, telemetry).
//!
//! Flow of a call: tonic server (span + metrics, `sluice::server`) → handler → store.
//! The binary serves gRPC health and reflection; the `sluice.limiter.v1.Limiter` and Envoy
//! RLS services join the router as they land.

#![forbid(unsafe_code)]

pub mod config;

use tokio_util::sync::CancellationToken;

pub use config::Config;
use sluice::server::Listeners;

/// The name this service reports in logs and spans.
pub const SERVICE_NAME: &str = "limiter-svc";

/// Runs limiter-svc on `listeners` until `shutdown` is cancelled, then drains within the
/// configured grace.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let common = config.common;
    let _store = sluice::pool::from_args(&common.redis)?;
    let (router, _health) = sluice::server::router(&[sluice::proto::FILE_DESCRIPTOR_SET], &[])?;
    sluice::server::run(
        SERVICE_NAME,
        router,
        listeners,
        shutdown,
        common.server.shutdown_grace,
    )
    .await
}
