//! limiter-svc binary: parse options, start telemetry, bind, run until SIGTERM.

use limiter_svc::{Config, SERVICE_NAME, config::DEFAULTS};

/// mimalloc: measured ≈ 12 % less service CPU per request than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let config: Config = sluice::config::parse(DEFAULTS).unwrap_or_else(|e| e.exit());
    let runtime = sluice::config::runtime(config.common.server.event_loop_threads())?;
    runtime.block_on(sluice::server::main(
        SERVICE_NAME,
        &config.common.clone(),
        |listeners, shutdown| limiter_svc::run(listeners, config, shutdown),
    ))
}
