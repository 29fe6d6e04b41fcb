//! The one place where errors become gRPC statuses.
//!
//! | error                                   | status              |
//! |-----------------------------------------|---------------------|
//! | `EngineError::InvalidArgument`          | INVALID_ARGUMENT (+ BadRequest field violation) |
//! | `EngineError::NotFound`                 | NOT_FOUND           |
//! | `EngineError::FailedPrecondition`       | FAILED_PRECONDITION (+ PreconditionFailure naming the limit) |
//! | `StoreError::Io`, shard unavailable     | UNAVAILABLE (retry) |
//! | `StoreError::DiskFull`, new writes while the disk is full | RESOURCE_EXHAUSTED (nothing done; retry once space is freed) |
//! | cross-shard contention (`TxnError::Contention`) | ABORTED (retry) |
//! | `StoreError::Corrupt` / `Layout`        | INTERNAL / FAILED_PRECONDITION |
//! | oversized message (tonic's OUT_OF_RANGE) | RESOURCE_EXHAUSTED |
//! | a shard's write queue full (`Overloaded`) | RESOURCE_EXHAUSTED (nothing done; retry after a backoff) |

use crate::error::RequestError;
use crate::storage::StoreError;
use idgraph_core::engine::EngineError;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Status {
        match e {
            RequestError::Engine(EngineError::InvalidArgument { field, reason }) => Status::with_error_details(
                Code::InvalidArgument,
                format!("{field}: {reason}"),
                ErrorDetails::with_bad_request_violation(field, reason),
            ),
            RequestError::Engine(e @ EngineError::NotFound { .. }) => Status::not_found(e.to_string()),
            RequestError::Engine(EngineError::FailedPrecondition { reason, limit }) => match limit {
                Some(limit) => Status::with_error_details(
                    Code::FailedPrecondition,
                    reason.clone(),
                    ErrorDetails::with_precondition_failure_violation("LIMIT", limit, reason),
                ),
                None => Status::failed_precondition(reason),
            },
            RequestError::Engine(EngineError::Store(e @ StoreError::Io(_))) => Status::unavailable(e.to_string()),
            RequestError::Engine(EngineError::Store(e @ StoreError::DiskFull)) => Status::resource_exhausted(e.to_string()),
            RequestError::Engine(EngineError::Store(e @ StoreError::Layout(_))) => Status::failed_precondition(e.to_string()),
            RequestError::Engine(EngineError::Store(e @ StoreError::Corrupt { .. })) => Status::internal(e.to_string()),
            e @ RequestError::Unavailable { .. } => Status::unavailable(e.to_string()),
            RequestError::Aborted(reason) => Status::aborted(reason),
            e @ RequestError::Overloaded { .. } => Status::resource_exhausted(e.to_string()),
            e @ RequestError::DiskFull { .. } => Status::resource_exhausted(e.to_string()),
            e @ RequestError::Internal(_) => Status::internal(e.to_string()),
        }
    }
}

/// tonic refuses a message over the size limit with OUT_OF_RANGE; gRPC
/// clients expect RESOURCE_EXHAUSTED for that.
pub fn oversized_to_resource_exhausted(status: Status) -> Status {
    if status.code() == Code::OutOfRange && status.message().contains("message length too large") {
        Status::resource_exhausted(status.message().to_string())
    } else {
        status
    }
}

/// The same for a trailers-only HTTP response (how a unary call fails
/// before reaching its handler).
pub fn fix_oversized_response<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let oversized = resp.headers().get("grpc-status").is_some_and(|v| v == "11")
        && resp
            .headers()
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| m.contains("message%20length%20too%20large") || m.contains("message length too large"));
    if oversized {
        resp.headers_mut().insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    resp
}
