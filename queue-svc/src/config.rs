//! queue-svc's options: `queue-svc --help` lists them all.

use sluice::config::{AFTER_HELP, CommonArgs};

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
}

impl Config {
    /// Parses `args` (no config file from the environment) over this binary's defaults.
    pub fn from_args<I: Into<std::ffi::OsString>>(
        args: impl IntoIterator<Item = I>,
    ) -> Result<Self, clap::Error> {
        sluice::config::parse_from(args, None, DEFAULTS)
    }
}
