//! The one table from Nudge's errors to gRPC statuses.

use tonic::Status;

use crate::engine::EngineError;
use crate::event::FieldError;
use crate::model::ScoreError;

/// Everything an RPC can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("model {model:?} failed: {error}")]
    Model { model: String, error: ScoreError },
    #[error("{0}")]
    NotFound(String),
    #[error("no model is loaded; see ListModels and the server log")]
    NoModels,
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let message = e.to_string();
        match e {
            ApiError::Invalid(_) => Status::invalid_argument(message),
            ApiError::Engine(EngineError::Overloaded) => Status::resource_exhausted(message),
            ApiError::Engine(EngineError::ShuttingDown) => Status::unavailable(message),
            ApiError::Engine(EngineError::Store(_)) => Status::unavailable(message),
            ApiError::Engine(EngineError::Conflict(_)) => Status::failed_precondition(message),
            ApiError::Model { .. } => Status::internal(message),
            ApiError::NotFound(_) => Status::not_found(message),
            ApiError::NoModels => Status::unavailable(message),
        }
    }
}
