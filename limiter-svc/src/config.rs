//! limiter-svc's options: `limiter-svc --help` lists them all.

use std::path::PathBuf;
use std::time::Duration;

use sluice::config::{AFTER_HELP, CommonArgs, parse_duration};

/// Defaults of the options whose defaults differ between binaries.
pub const DEFAULTS: &[(&str, &str)] = &[
    ("listen", "127.0.0.1:50051"),
    ("metrics-listen", "127.0.0.1:9464"),
];

/// limiter-svc: Sluice's rate limiter (gRPC, plus Envoy's rate limit service).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "limiter-svc", version, after_help = AFTER_HELP)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Limits file (TOML): named policies, per-scope defaults, endpoint tiers, shadow mode,
    /// failure modes, Envoy RLS domains. Reloaded when it changes. Absent: the seed defaults
    /// (user 1000/hour, project 5000/hour, ip 100/minute).
    #[arg(long, env = "SLUICE_LIMITS", value_name = "FILE")]
    pub limits: Option<PathBuf>,

    /// How often the limits file is checked for changes.
    #[arg(long, env = "SLUICE_LIMITS_RELOAD_INTERVAL", value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub limits_reload_interval: Duration,

    /// Remember counters Redis denied until T and deny them locally until T (never admits
    /// more than the limit). `false` to turn off.
    #[arg(long, env = "SLUICE_HOT_KEYS", value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub hot_keys: bool,

    /// Most counters the hot-key cache remembers.
    #[arg(
        long,
        env = "SLUICE_HOT_KEYS_CAPACITY",
        value_name = "N",
        default_value_t = 100_000
    )]
    pub hot_keys_capacity: usize,

    /// Let concurrent requests share one check script call on standalone Redis (each still
    /// all or nothing). `false` behind a proxy that shards by key (twemproxy, Envoy's Redis
    /// proxy): such a proxy sends a script to the node of its first key, and a shared call
    /// holds many requests' keys. Redis Cluster URLs never share calls.
    #[arg(long, env = "SLUICE_BATCH_CHECKS", value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub batch_checks: bool,

    /// Most live counters in the embedded store (and in the local failure-mode store).
    #[arg(
        long,
        env = "SLUICE_EMBEDDED_MAX_KEYS",
        value_name = "N",
        default_value_t = 1_000_000
    )]
    pub embedded_max_keys: usize,
}

impl Config {
    /// Parses `args` (no config file from the environment) over this binary's defaults.
    pub fn from_args<I: Into<std::ffi::OsString>>(
        args: impl IntoIterator<Item = I>,
    ) -> Result<Self, clap::Error> {
        sluice::config::parse_from(args, None, DEFAULTS)
    }
}
