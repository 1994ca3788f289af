//! The one table from Nudge's errors to gRPC statuses. Every failure an RPC answers goes
//! through [`ApiError`]; no handler builds a `Status` of its own.

use tonic::Status;

use crate::delivery::stream::{CursorError, Ended, Subscribe};
use crate::engine::EngineError;
use crate::event::FieldError;
use crate::model::{LoadError, ScoreError};
use crate::store::StoreError;
use crate::trigger::rules::RulesError;

/// Everything an RPC can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request itself is wrong (already counted in `nudge_invalid_input_total`).
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// A subscription cursor outside what the outbox keeps (counted like `Invalid`).
    #[error(transparent)]
    OutOfRange(CursorError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("model {model:?} failed: {error}")]
    Model { model: String, error: ScoreError },
    #[error("{0}")]
    NotFound(String),
    #[error("no model is loaded; see ListModels and the server log")]
    NoModels,
    #[error("{0}\nthe running rules stay")]
    RulesRefused(#[from] RulesError),
    #[error("reload failed; the current models keep serving: {0}")]
    Reload(#[from] LoadError),
    #[error(transparent)]
    StreamEnded(#[from] Ended),
    #[error("a worker task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// No API key, or not one the keys file holds (counted in `nudge_auth_refused_total`).
    #[error("authorization: {0}")]
    Unauthenticated(String),
    /// A known key without the scope the call needs (counted likewise).
    #[error("authorization: {0}")]
    PermissionDenied(String),
    /// A known key over its rate limit (counted likewise).
    #[error("the key {key:?} is over its rate limit; retry in {} ms", retry_after.as_millis().max(1))]
    RateLimited {
        key: String,
        retry_after: std::time::Duration,
    },
}

impl From<Subscribe> for ApiError {
    fn from(e: Subscribe) -> ApiError {
        match e {
            Subscribe::Cursor(e) => ApiError::OutOfRange(e),
            Subscribe::Store(e) => ApiError::Store(e),
        }
    }
}

/// The longest `grpc-message` Nudge sends, in bytes. A message travels in an HTTP/2
/// header, where a long one would be a protocol error instead of the answer; every
/// message that quotes input quotes a bounded part of it, and this is the backstop.
const MAX_MESSAGE_BYTES: usize = 2048;

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let mut message = e.to_string();
        if message.len() > MAX_MESSAGE_BYTES {
            let mut cut = MAX_MESSAGE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        match e {
            ApiError::Invalid(_) => Status::invalid_argument(message),
            ApiError::OutOfRange(_) => Status::out_of_range(message),
            ApiError::Engine(EngineError::Overloaded { retry_after })
            | ApiError::RateLimited { retry_after, .. } => retry_later(message, retry_after),
            ApiError::Engine(EngineError::DeadlineUnmeetable | EngineError::DeadlineExpired) => {
                Status::deadline_exceeded(message)
            }
            ApiError::Engine(EngineError::ShuttingDown) => Status::unavailable(message),
            ApiError::Engine(EngineError::Store(_)) => Status::unavailable(message),
            ApiError::Engine(EngineError::Conflict(_)) => Status::failed_precondition(message),
            ApiError::Engine(EngineError::Panicked) => Status::internal(message),
            ApiError::Engine(EngineError::GroupFailed) => Status::unavailable(message),
            ApiError::Store(_) => Status::unavailable(message),
            ApiError::Model { .. } => Status::internal(message),
            ApiError::NotFound(_) => Status::not_found(message),
            ApiError::NoModels => Status::unavailable(message),
            ApiError::RulesRefused(_) => Status::failed_precondition(message),
            ApiError::Reload(_) => Status::unavailable(message),
            ApiError::StreamEnded(_) => Status::unavailable(message),
            ApiError::Task(_) => Status::internal(message),
            ApiError::Unauthenticated(_) => Status::unauthenticated(message),
            ApiError::PermissionDenied(_) => Status::permission_denied(message),
        }
    }
}

/// RESOURCE_EXHAUSTED with when to try again, said both ways clients read it: gRPC's
/// server pushback (`grpc-retry-pushback-ms`, which gRPC retry policies obey) and
/// `google.rpc.RetryInfo` in the status details (which Google's client libraries read).
fn retry_later(message: String, after: std::time::Duration) -> Status {
    use tonic_types::{ErrorDetails, StatusExt as _};
    let after = after.max(std::time::Duration::from_millis(1));
    let mut metadata = tonic::metadata::MetadataMap::new();
    if let Ok(value) = after.as_millis().to_string().parse() {
        metadata.insert("grpc-retry-pushback-ms", value);
    }
    Status::with_error_details_and_metadata(
        tonic::Code::ResourceExhausted,
        message,
        ErrorDetails::with_retry_info(Some(after)),
        metadata,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_message_is_cut_at_a_character_boundary() {
        // Two-byte characters, so a cut at an odd byte would split one.
        let long = ApiError::NotFound("é".repeat(MAX_MESSAGE_BYTES));
        let status = Status::from(long);
        assert!(status.message().len() <= MAX_MESSAGE_BYTES + '…'.len_utf8());
        assert!(status.message().ends_with('…'), "{}", status.message());
        let short = Status::from(ApiError::NotFound("person: unknown".into()));
        assert_eq!(short.message(), "person: unknown");
    }

    #[test]
    fn a_refusal_to_come_back_later_says_when_both_ways() {
        use tonic_types::StatusExt as _;
        let status = Status::from(ApiError::RateLimited {
            key: "svc".into(),
            retry_after: std::time::Duration::from_millis(250),
        });
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        let pushback = status.metadata().get("grpc-retry-pushback-ms").unwrap();
        assert_eq!(pushback.to_str().unwrap(), "250");
        let retry = status
            .get_details_retry_info()
            .expect("RetryInfo in the details");
        assert_eq!(
            retry.retry_delay,
            Some(std::time::Duration::from_millis(250))
        );
    }
}
