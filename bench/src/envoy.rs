//! The `should-rate-limit` workload: Envoy's `RateLimitService/ShouldRateLimit`, one
//! `remote_address` descriptor per request.

use sluice::proto::envoy::extensions::common::ratelimit::v3::{
    RateLimitDescriptor, rate_limit_descriptor,
};
use sluice::proto::envoy::service::ratelimit::v3::RateLimitRequest;
use sluice::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use sluice::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;

use crate::conn::Conn;
use crate::driver::{Outcome, Verdict, Workload};

/// Options of `should-rate-limit`.
#[derive(Debug, Clone, clap::Args)]
pub struct ShouldRateLimitArgs {
    /// Rate limit domain of every request.
    #[arg(long, default_value = "edge")]
    pub domain: String,

    /// Distinct client addresses: request i sends `remote_address` 10.a.b.c, the low 24 bits
    /// of `i % N` (so at most 2^24).
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=16_777_216))]
    pub subjects: u64,
}

/// Builds and sends ShouldRateLimit requests.
#[derive(Debug)]
pub struct ShouldRateLimit {
    domain: String,
    subjects: u64,
}

impl ShouldRateLimit {
    pub fn new(args: &ShouldRateLimitArgs) -> Self {
        Self {
            domain: args.domain.clone(),
            subjects: args.subjects,
        }
    }

    fn request(&self, seq: u64) -> RateLimitRequest {
        let n = seq % self.subjects;
        let address = format!("10.{}.{}.{}", (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff);
        RateLimitRequest {
            domain: self.domain.clone(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![rate_limit_descriptor::Entry {
                    key: "remote_address".to_owned(),
                    value: address,
                }],
                ..Default::default()
            }],
            hits_addend: 1,
        }
    }
}

impl Workload for ShouldRateLimit {
    const NAME: &'static str = "should-rate-limit";

    fn call(
        &self,
        conn: Conn,
        seq: u64,
    ) -> impl Future<Output = Result<Outcome, tonic::Status>> + Send {
        // Built before the future so that it borrows nothing from `self`.
        let request = self.request(seq);
        async move {
            let response = RateLimitServiceClient::new(conn)
                .should_rate_limit(request)
                .await?;
            Ok(Outcome::from(
                match Code::try_from(response.get_ref().overall_code) {
                    Ok(Code::Ok) => Verdict::Allowed,
                    Ok(Code::OverLimit) => Verdict::Denied,
                    Ok(Code::Unknown) | Err(_) => Verdict::Unknown,
                },
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_cycle_through_subjects() {
        let workload = ShouldRateLimit::new(&ShouldRateLimitArgs {
            domain: "edge".to_owned(),
            subjects: 70_000,
        });
        let request = workload.request(70_000 + 65_793);
        assert_eq!(request.domain, "edge");
        assert_eq!(request.hits_addend, 1);
        let entries = &request.descriptors[0].entries;
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].key, "remote_address");
        assert_eq!(entries[0].value, "10.1.1.1");
    }
}
