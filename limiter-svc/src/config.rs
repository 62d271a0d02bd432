//! limiter-svc's options: `limiter-svc --help` lists them all.

use sluice::config::{AFTER_HELP, CommonArgs};

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
}

impl Config {
    /// Parses `args` (no config file from the environment) over this binary's defaults.
    pub fn from_args<I: Into<std::ffi::OsString>>(
        args: impl IntoIterator<Item = I>,
    ) -> Result<Self, clap::Error> {
        sluice::config::parse_from(args, None, DEFAULTS)
    }
}
