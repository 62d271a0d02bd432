//! limiter-svc: answers "may this request go ahead?" over gRPC, for Sluice's own API
//! (`sluice.limiter.v1.Limiter`) and Envoy's (`envoy.service.ratelimit.v3.RateLimitService`).
//!
//! Modules, in the order a request meets them:
//! - [`service`]: the gRPC edge: validation, policy resolution, response shaping (both APIs);
//! - [`policy`]: the limits file (policies, scope defaults, endpoint tiers, RLS rules);
//! - [`engine`]: one all-or-nothing decision: hot keys, circuit breaker, failure modes;
//! - [`store`]: Redis (`check.lua`) or the embedded store;
//! - [`algorithm`]: the five algorithms, each as Lua and as Rust;
//! - [`keys`]: every Redis key name; [`hotkeys`]: the engine's helper (the circuit breaker is
//!   [`sluice::breaker`], shared with queue-svc);
//! - [`config`]: the binary's options.

#![forbid(unsafe_code)]

pub mod algorithm;
pub mod config;
pub mod engine;
pub mod hotkeys;
pub mod keys;
pub mod policy;
pub mod service;
pub mod store;

use std::sync::Arc;

use sluice::proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use sluice::proto::sluice::limiter::v1::limiter_server::LimiterServer;
use sluice::server::Listeners;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic_health::ServingStatus;

pub use config::Config;

use crate::engine::Engine;
use crate::policy::PolicyStore;
use crate::service::LimiterService;
use crate::store::{EmbeddedStore, RedisStore, Store};
use sluice::auth::{Access, Role};
use sluice::breaker::Breaker;

/// The name this service reports in logs and spans.
pub const SERVICE_NAME: &str = "limiter-svc";

/// Health service name of the store: NOT_SERVING while the circuit breaker is open (the
/// limiter still answers, by failure mode).
pub const STORE_HEALTH: &str = "sluice.limiter.v1.Limiter/store";

/// Runs limiter-svc on `listeners` until `shutdown` is cancelled, then drains within the
/// configured grace.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let common = &config.common;
    // Every file read and checked before anything starts.
    let auth = common.auth.auth()?;
    let connections = common.server.connections()?;
    let policies = Arc::new(PolicyStore::load(config.limits.as_deref())?);
    let tasks = TaskTracker::new();
    tasks.spawn(
        policies
            .clone()
            .watch(config.limits_reload_interval, shutdown.clone()),
    );

    tasks.spawn(
        auth.clone()
            .watch(sluice::auth::RELOAD_EVERY, shutdown.clone()),
    );
    let (router, health) = sluice::server::router(
        &[sluice::proto::FILE_DESCRIPTOR_SET],
        &[
            "sluice.limiter.v1.Limiter",
            "envoy.service.ratelimit.v3.RateLimitService",
        ],
        auth,
    )?;
    health
        .set_service_status(STORE_HEALTH, ServingStatus::Serving)
        .await;

    let (store, breaker) = match sluice::pool::from_args(&common.redis)? {
        Some(pool) => {
            let breaker = Breaker::start(
                &common.redis,
                "sluice_limiter_breaker_open",
                &pool,
                &tasks,
                &shutdown,
            );
            tasks.spawn(report_store_health(
                breaker.clone(),
                health.clone(),
                shutdown.clone(),
            ));
            (
                // Calls report to the breaker and fail at once while it is open.
                Store::Redis(RedisStore::new(
                    pool.guarded(breaker.clone()),
                    config.batch_checks,
                )),
                Some(breaker),
            )
        }
        None => (
            Store::Embedded(EmbeddedStore::new(config.embedded_max_keys)),
            None,
        ),
    };
    let engine = Arc::new(Engine::new(
        store,
        breaker,
        config.hot_keys.then_some(config.hot_keys_capacity),
        config.embedded_max_keys,
    ));
    let service = LimiterService::new(engine, policies);
    let router = router
        .add_service(LimiterServer::new(service.clone()), access)
        .add_service(RateLimitServiceServer::new(service), access);
    let result = sluice::server::run(
        SERVICE_NAME,
        router,
        listeners,
        shutdown.clone(),
        connections,
    )
    .await;
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    result
}

/// What each limiter method asks of its caller. Checks and reads take any valid credentials
/// (gateways check limits for every tenant, so limits are not bound to projects); resetting a
/// limit is an operator's call.
fn access(method: &str) -> Option<Access> {
    match method {
        "CheckLimit" | "GetLimitStatus" | "ShouldRateLimit" => Some(Access::Authenticated),
        "ResetLimit" => Some(Access::Roles(&[Role::Admin])),
        _ => None,
    }
}

async fn report_store_health(
    breaker: Arc<Breaker>,
    health: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    let mut state = breaker.watch();
    loop {
        let open = *state.borrow_and_update();
        let status = if open {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        };
        health.set_service_status(STORE_HEALTH, status).await;
        tokio::select! {
            changed = state.changed() => if changed.is_err() { return },
            () = shutdown.cancelled() => return,
        }
    }
}
