//! Helpers for limiter tests: start limiter-svc on a store with a limits file, and build
//! requests tersely.

use std::time::Duration;

use sluice::proto::sluice::limiter::v1 as pb;
use tonic::transport::Channel;

use crate::Service;

/// Which store a limiter under test runs on.
#[derive(Debug, Clone)]
pub enum StoreKind {
    /// The embedded in-process store.
    Embedded,
    /// A Redis URL (standalone or `redis+cluster://`).
    Redis(String),
}

/// A limiter-svc started in-process with `limits` (TOML) as its limits file.
#[derive(Debug)]
pub struct Limiter {
    /// The running service.
    pub service: Service,
    /// A client on it.
    pub client: pb::limiter_client::LimiterClient<Channel>,
    _limits: tempfile::NamedTempFile,
}

impl Limiter {
    /// Starts limiter-svc on `store` with the limits file `limits` and extra flags.
    pub async fn start(store: &StoreKind, limits: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let file = tempfile::Builder::new().suffix(".toml").tempfile()?;
        std::fs::write(file.path(), limits)?;
        let mut args = vec![
            "limiter-svc".to_owned(),
            "--limits".to_owned(),
            file.path().display().to_string(),
        ];
        if let StoreKind::Redis(url) = store {
            args.push("--redis-url".to_owned());
            args.push(url.clone());
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args.extend(crate::auth_choice(extra).iter().map(|s| (*s).to_owned()));
        let config = limiter_svc::Config::from_args(args)?;
        let mut service = Service::start(|l, s| limiter_svc::run(l, config, s)).await?;
        let client = pb::limiter_client::LimiterClient::new(service.channel().await?);
        Ok(Self {
            service,
            client,
            _limits: file,
        })
    }

    /// The limits file, to rewrite it for reload tests.
    pub fn limits_path(&self) -> &std::path::Path {
        self._limits.path()
    }
}

/// A check on a named policy.
pub fn policy_check(scope: &str, subject: &str, policy: &str) -> pb::Check {
    pb::Check {
        scope: scope.to_owned(),
        subject: subject.to_owned(),
        limit: Some(pb::check::Limit::Policy(policy.to_owned())),
    }
}

/// A check with an inline limit.
pub fn inline_check(
    scope: &str,
    subject: &str,
    algorithm: pb::Algorithm,
    limit: u64,
    window: Duration,
    burst: u64,
) -> pb::Check {
    pb::Check {
        scope: scope.to_owned(),
        subject: subject.to_owned(),
        limit: Some(pb::check::Limit::Inline(pb::InlineLimit {
            algorithm: algorithm.into(),
            limit,
            window: Some(prost_types::Duration {
                seconds: i64::try_from(window.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(window.subsec_nanos()).unwrap_or(0),
            }),
            burst,
        })),
    }
}

/// A CheckLimit request.
pub fn request(checks: Vec<pb::Check>, cost: u64) -> pb::CheckLimitRequest {
    pb::CheckLimitRequest {
        checks,
        cost,
        request_id: String::new(),
    }
}

/// A protobuf duration as std.
pub fn duration(d: Option<&prost_types::Duration>) -> Duration {
    d.map_or(Duration::ZERO, |d| {
        Duration::new(
            u64::try_from(d.seconds).unwrap_or(0),
            u32::try_from(d.nanos).unwrap_or(0),
        )
    })
}
