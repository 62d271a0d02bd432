//! The one error type of Sluice's services, and its single mapping to `tonic::Status`.
//!
//! Domain code returns [`Error`]; the gRPC edge converts it with `Status::from`. Every code
//! choice below says what a client is expected to do when it sees it.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Result alias used across Sluice.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, classified once so the gRPC edge and the circuit breakers agree.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The caller sent something that will never work as sent; `field` names what to change.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// The named thing (policy, task, queue) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is well formed but the state does not allow it (a stale lease token).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A bound was reached (a full queue): retry later, nothing was stored.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The store could not be reached or timed out: transient, safe to retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A bug or an unexpected reply; not the caller's fault and not transient.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// An [`Error::InvalidArgument`] naming the request field at fault.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// True for errors that say nothing about the request, only about the store's reachability;
    /// circuit breakers count these and nothing else.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

impl From<redis::RedisError> for Error {
    fn from(err: redis::RedisError) -> Self {
        // Connection-level failures are transient; anything the server answered (a Lua error,
        // a wrong type) is a fault of ours, not of the network, and must not trip breakers.
        if err.is_io_error()
            || err.is_timeout()
            || err.is_connection_dropped()
            || err.is_connection_refusal()
            || err.is_unrecoverable_error()
            || matches!(
                err.kind(),
                redis::ErrorKind::ClusterConnectionNotFound
                    | redis::ErrorKind::Server(
                        redis::ServerErrorKind::ClusterDown
                            | redis::ServerErrorKind::TryAgain
                            | redis::ServerErrorKind::MasterDown
                            | redis::ServerErrorKind::BusyLoading
                    )
            )
        {
            Self::Unavailable(err.to_string())
        } else {
            Self::Internal(format!("redis: {err}"))
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            // Fix the request; retrying it unchanged fails the same way. The BadRequest detail
            // lets typed clients point at the field without parsing the message.
            Error::InvalidArgument { field, reason } => Status::with_error_details(
                Code::InvalidArgument,
                format!("{field}: {reason}"),
                ErrorDetails::with_bad_request_violation(field, reason),
            ),
            Error::NotFound(msg) => Status::not_found(msg),
            // Do not retry: re-read the state (the task, the lease) first.
            Error::FailedPrecondition(msg) => Status::failed_precondition(msg),
            // Back off and retry later; nothing was stored.
            Error::ResourceExhausted(msg) => Status::resource_exhausted(msg),
            // Transient: retry with backoff, possibly against another instance.
            Error::Unavailable(msg) => Status::unavailable(format!("store unavailable: {msg}")),
            Error::Internal(msg) => {
                tracing::error!(error = %msg, "internal error answered to a client");
                Status::internal(msg)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_the_field() {
        let status = Status::from(Error::invalid("checks[0].subject", "must not be empty"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "checks[0].subject: must not be empty");
        let details = status.get_error_details();
        let bad = details.bad_request().expect("a BadRequest detail");
        assert_eq!(bad.field_violations[0].field, "checks[0].subject");
    }

    #[test]
    fn connection_failures_are_transient_server_replies_are_not() {
        let io: redis::RedisError =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused").into();
        assert!(Error::from(io).is_transient());
        let script: redis::RedisError =
            (redis::ErrorKind::UnexpectedReturnType, "bad reply").into();
        assert!(!Error::from(script).is_transient());
    }
}
