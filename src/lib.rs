//! Sluice's shared runtime: what limiter-svc, queue-svc and the worker have in common.
//!
//! The root crate knows no service. It owns:
//!
//! - [`proto`]: the generated bindings of the public contracts in `proto/`
//!   (`sluice.limiter.v1`, `sluice.queue.v1`, and Envoy's `envoy.service.ratelimit.v3`);
//! - [`config`]: flags + environment + optional TOML file, parsed once into typed structs;
//! - [`telemetry`]: logs with trace ids, OTLP export, W3C trace context across gRPC hops;
//! - [`pool`] and [`script`]: one Redis connection pool for standalone Redis and Redis Cluster,
//!   and the Lua script runner (EVALSHA, reload on NOSCRIPT) both services use;
//! - [`breaker`]: the circuit breaker in front of Redis, and [`batch`]: concurrent callers'
//!   items gathered into shared Redis calls;
//! - [`auth`] and [`tls`]: credentials and TLS, server and client side;
//! - [`server`]: gRPC scaffolding (health, reflection, bounded graceful shutdown) and the
//!   Prometheus `/metrics` endpoint;
//! - [`error`]: the one error type, mapped to `tonic::Status` at the edge.
//!
//! A request to a service flows: tonic server (span + metrics layer from [`server`]) → the
//! service's handler → its domain code → a typed wrapper around a [`script::Script`] → Lua.

#![forbid(unsafe_code)]

pub mod auth;
pub mod batch;
pub mod breaker;
pub mod config;
pub mod error;
pub mod limit_layer;
pub mod pool;
pub mod script;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

pub use error::{Error, Result};

/// Generated bindings of every `.proto` file under `proto/`.
#[allow(clippy::all, missing_docs, rustdoc::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/sluice_protos.rs"));

    /// Encoded `FileDescriptorSet` of every contract, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/sluice_descriptor.bin"));
}
