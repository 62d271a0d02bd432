//! A tower layer for Rust services that check a Sluice limit on every request they serve.
//!
//! ```ignore
//! let limiter = LimiterClient::new(channel);
//! // Who is calling: here, one check per API key, on the policy "api".
//! let layer = RateLimitLayer::new(limiter, Protocol::Http, |headers, _uri| {
//!     let key = headers.get("x-api-key").and_then(|v| v.to_str().ok())?;
//!     Some(vec![Check { scope: "api_key".into(), subject: key.into(),
//!                       limit: Some(check::Limit::Policy("api".into())) }])
//! });
//! let app = axum::Router::new().route("/", get(handler)).layer(layer);
//! ```
//!
//! A denied request never reaches the service: gRPC callers get RESOURCE_EXHAUSTED with a
//! `google.rpc.RetryInfo` detail, HTTP callers 429 with `Retry-After` and the RateLimit
//! header fields. A request whose check subject the limiter refuses as malformed (say, an
//! empty or over-long key taken from a header the caller controls) is refused with
//! INVALID_ARGUMENT / 400, so no caller escapes its limit by sending a bad key. When the
//! limiter cannot be reached or does not answer within the timeout (200 ms unless set), or
//! rejects anything else of the layer's checks (its own configuration: a policy it does not
//! know, a malformed scope or inline limit), the request goes through (fail open) or is
//! refused with UNAVAILABLE / 503, as configured.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tonic::transport::Channel;
use tonic_types::{ErrorDetails, StatusExt};

use crate::proto::sluice::limiter::v1::limiter_client::LimiterClient;
use crate::proto::sluice::limiter::v1::{Check, CheckLimitRequest, CheckLimitResponse};

/// How denials are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC status RESOURCE_EXHAUSTED with RetryInfo.
    Grpc,
    /// HTTP 429 with Retry-After and RateLimit headers.
    Http,
}

type Extract = dyn Fn(&http::HeaderMap, &http::Uri) -> Option<Vec<Check>> + Send + Sync;

/// Checks a limit before each request; see the module docs.
#[derive(Clone)]
pub struct RateLimitLayer {
    client: LimiterClient<Channel>,
    protocol: Protocol,
    extract: Arc<Extract>,
    fail_open: bool,
    timeout: Duration,
    /// `authorization` of each check, for a limiter with auth on.
    credentials: Option<tonic::metadata::AsciiMetadataValue>,
}

/// How long a check may take before the layer treats the limiter as unreachable.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(200);

impl std::fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("protocol", &self.protocol)
            .field("fail_open", &self.fail_open)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RateLimitLayer {
    /// `extract` names the checks of a request from its headers and URI; `None` or an empty
    /// list lets the request through unchecked. Fails open by default.
    pub fn new(
        client: LimiterClient<Channel>,
        protocol: Protocol,
        extract: impl Fn(&http::HeaderMap, &http::Uri) -> Option<Vec<Check>> + Send + Sync + 'static,
    ) -> Self {
        Self {
            client,
            protocol,
            extract: Arc::new(extract),
            fail_open: true,
            timeout: DEFAULT_TIMEOUT,
            credentials: None,
        }
    }

    /// Sends `token` (an API key or JWT) as `authorization: Bearer` with every check, for a
    /// limiter with auth on; an error if it is not visible ASCII.
    pub fn credentials(mut self, token: &str) -> Result<Self, crate::Error> {
        let mut value: tonic::metadata::AsciiMetadataValue = format!("Bearer {token}")
            .parse()
            .map_err(|_| crate::Error::invalid("credentials", "must be visible ASCII"))?;
        value.set_sensitive(true);
        self.credentials = Some(value);
        Ok(self)
    }

    /// How long a check may take (sent as its gRPC deadline too) before the limiter counts
    /// as unreachable.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// When the limiter is unreachable, too slow, or refuses the layer's own checks (an unknown
    /// policy): `true` lets requests through, `false` refuses them.
    pub fn fail_open(mut self, fail_open: bool) -> Self {
        self.fail_open = fail_open;
        self
    }
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`RateLimitLayer`] builds.
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    layer: RateLimitLayer,
}

fn seconds_up(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn std_duration(d: Option<&prost_types::Duration>) -> Duration {
    d.map_or(Duration::ZERO, |d| {
        Duration::new(
            u64::try_from(d.seconds).unwrap_or(0),
            u32::try_from(d.nanos).unwrap_or(0),
        )
    })
}

fn denied<B: Default>(protocol: Protocol, answer: &CheckLimitResponse) -> http::Response<B> {
    let retry = std_duration(answer.retry_after.as_ref());
    let reset = std_duration(answer.reset_after.as_ref());
    match protocol {
        Protocol::Grpc => {
            // RetryInfo tells gRPC clients (and their retry policies) how long to back off.
            let status = tonic::Status::with_error_details(
                tonic::Code::ResourceExhausted,
                format!("rate limited: retry after {retry:?}"),
                ErrorDetails::with_retry_info(Some(retry)),
            );
            status.into_http()
        }
        Protocol::Http => {
            let mut response = http::Response::new(B::default());
            *response.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
            let headers = response.headers_mut();
            let mut set = |name: &'static str, value: String| {
                if let Ok(value) = http::HeaderValue::from_str(&value) {
                    headers.insert(name, value);
                }
            };
            set("retry-after", seconds_up(retry).max(1).to_string());
            set("ratelimit-policy", format!("\"sluice\";q={}", answer.limit));
            set(
                "ratelimit",
                format!("\"sluice\";r={};t={}", answer.remaining, seconds_up(reset)),
            );
            response
        }
    }
}

/// Whether the limiter refused the request for a check's subject alone (the part taken from
/// the caller), as its `google.rpc.BadRequest` detail names the fields.
fn refuses_a_subject(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::InvalidArgument
        && status.get_details_bad_request().is_some_and(|bad| {
            !bad.field_violations.is_empty()
                && bad
                    .field_violations
                    .iter()
                    .all(|v| v.field.ends_with(".subject"))
        })
}

fn malformed<B: Default>(protocol: Protocol, status: &tonic::Status) -> http::Response<B> {
    match protocol {
        Protocol::Grpc => tonic::Status::invalid_argument(format!(
            "rate limit check refused: {}",
            status.message()
        ))
        .into_http(),
        Protocol::Http => {
            let mut response = http::Response::new(B::default());
            *response.status_mut() = http::StatusCode::BAD_REQUEST;
            response
        }
    }
}

fn unavailable<B: Default>(protocol: Protocol, status: &tonic::Status) -> http::Response<B> {
    match protocol {
        Protocol::Grpc => {
            tonic::Status::unavailable(format!("rate limit check failed: {}", status.message()))
                .into_http()
        }
        Protocol::Http => {
            let mut response = http::Response::new(B::default());
            *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            response
        }
    }
}

impl<S, ReqB, ResB> tower::Service<http::Request<ReqB>> for RateLimit<S>
where
    S: tower::Service<http::Request<ReqB>, Response = http::Response<ResB>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqB: Send + 'static,
    ResB: Default + Send + 'static,
{
    type Response = http::Response<ResB>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqB>) -> Self::Future {
        // The clone that was polled ready serves this request; a fresh clone takes its place.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let checks = (self.layer.extract)(request.headers(), request.uri()).unwrap_or_default();
        let mut client = self.layer.client.clone();
        let (protocol, fail_open, timeout) = (
            self.layer.protocol,
            self.layer.fail_open,
            self.layer.timeout,
        );
        let credentials = self.layer.credentials.clone();
        Box::pin(async move {
            if checks.is_empty() {
                return inner.call(request).await;
            }
            let mut check = tonic::Request::new(CheckLimitRequest {
                checks,
                cost: 1,
                request_id: String::new(),
            });
            check.set_timeout(timeout);
            if let Some(credentials) = credentials {
                check.metadata_mut().insert("authorization", credentials);
            }
            let answer = tokio::time::timeout(timeout, client.check_limit(check))
                .await
                .unwrap_or_else(|_| {
                    Err(tonic::Status::deadline_exceeded(format!(
                        "no answer within {timeout:?}"
                    )))
                });
            match answer {
                Ok(answer) if !answer.get_ref().allowed => Ok(denied(protocol, answer.get_ref())),
                Ok(_) => inner.call(request).await,
                // The caller's own input (a key from its headers, which becomes a subject) is
                // at fault, not the limiter or the layer's configuration.
                Err(status) if refuses_a_subject(&status) => {
                    tracing::debug!(error = %status, "rate limit check refused the request's checks");
                    Ok(malformed(protocol, &status))
                }
                Err(status) if fail_open => {
                    tracing::warn!(error = %status, "rate limit check failed; letting the request through");
                    inner.call(request).await
                }
                Err(status) => Ok(unavailable(protocol, &status)),
            }
        })
    }
}
