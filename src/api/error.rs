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
}

impl From<Subscribe> for ApiError {
    fn from(e: Subscribe) -> ApiError {
        match e {
            Subscribe::Cursor(e) => ApiError::OutOfRange(e),
            Subscribe::Store(e) => ApiError::Store(e),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let message = e.to_string();
        match e {
            ApiError::Invalid(_) => Status::invalid_argument(message),
            ApiError::OutOfRange(_) => Status::out_of_range(message),
            ApiError::Engine(EngineError::Overloaded) => Status::resource_exhausted(message),
            ApiError::Engine(EngineError::ShuttingDown) => Status::unavailable(message),
            ApiError::Engine(EngineError::Store(_)) => Status::unavailable(message),
            ApiError::Engine(EngineError::Conflict(_)) => Status::failed_precondition(message),
            ApiError::Store(_) => Status::unavailable(message),
            ApiError::Model { .. } => Status::internal(message),
            ApiError::NotFound(_) => Status::not_found(message),
            ApiError::NoModels => Status::unavailable(message),
            ApiError::RulesRefused(_) => Status::failed_precondition(message),
            ApiError::Reload(_) => Status::unavailable(message),
            ApiError::StreamEnded(_) => Status::unavailable(message),
            ApiError::Task(_) => Status::internal(message),
        }
    }
}
