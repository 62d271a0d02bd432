//! queue-svc's options: `queue-svc --help` lists them all.

use std::path::PathBuf;
use std::time::Duration;

use sluice::config::{AFTER_HELP, CommonArgs, parse_duration};

/// Defaults of the options whose defaults differ between binaries.
pub const DEFAULTS: &[(&str, &str)] = &[
    ("listen", "127.0.0.1:50052"),
    ("metrics-listen", "127.0.0.1:9465"),
];

/// queue-svc: Sluice's task queue (gRPC).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "queue-svc", version, after_help = AFTER_HELP)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Queues file (TOML): per-queue max size, processing timeout, max attempts, retry policy,
    /// retention. Absent: the defaults for every queue (max size 1,000,000, processing timeout
    /// 10 minutes, 3 attempts, exponential backoff from 1 s with full jitter, 24 h retention).
    #[arg(long, env = "SLUICE_QUEUES", value_name = "FILE")]
    pub queues: Option<PathBuf>,

    /// How often the reaper returns expired leases, promotes due tasks and applies retention.
    #[arg(long, env = "SLUICE_REAPER_INTERVAL", value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub reaper_interval: Duration,

    /// An empty queue (no task in any state, no idempotency record, not paused) that nothing
    /// has enqueued into for this long is forgotten: the reaper stops visiting it and its
    /// leftover keys go. Its next enqueue brings it back. 0: never.
    #[arg(long, env = "SLUICE_RETIRE_IDLE_AFTER", value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub retire_idle_after: Duration,
}

impl Config {
    /// Parses `args` (no config file from the environment) over this binary's defaults.
    pub fn from_args<I: Into<std::ffi::OsString>>(
        args: impl IntoIterator<Item = I>,
    ) -> Result<Self, clap::Error> {
        sluice::config::parse_from(args, None, DEFAULTS)
    }
}
