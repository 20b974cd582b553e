//! Every way a generator call can fail, and the one exhaustive mapping to a gRPC status, so
//! each failure reaches the client with the same code wherever it was detected.

use tonic::Status;

use crate::engine::SubmitError;
use crate::validation::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A request field is invalid; the message names it.
    #[error("{0}")]
    InvalidArgument(#[from] FieldError),
    #[error("{0}")]
    NotFound(String),
    /// A path outside the directories the generator may load from.
    #[error("{0}")]
    PermissionDenied(String),
    /// No model is live yet, the server is draining, or the engine is gone.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("the request's deadline passed")]
    DeadlineExceeded,
    /// A checkpoint failed download, verification, loading or the smoke test.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Internal(String),
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        if let ServiceError::Internal(_) = &e {
            return Status::internal(synopsis_common::internal_message(&e));
        }
        let message = synopsis_common::bounded_message(&e.to_string());
        match e {
            ServiceError::InvalidArgument(_) => Status::invalid_argument(message),
            ServiceError::NotFound(_) => Status::not_found(message),
            ServiceError::PermissionDenied(_) => Status::permission_denied(message),
            ServiceError::Unavailable(_) => Status::unavailable(message),
            ServiceError::ResourceExhausted(_) => Status::resource_exhausted(message),
            ServiceError::DeadlineExceeded => Status::deadline_exceeded(message),
            ServiceError::Refused(_) => Status::failed_precondition(message),
            ServiceError::Internal(_) => Status::internal(message),
        }
    }
}

impl From<SubmitError> for ServiceError {
    fn from(e: SubmitError) -> ServiceError {
        match e {
            SubmitError::QueueFull => {
                ServiceError::ResourceExhausted("the generation queue is full, retry later".into())
            }
            SubmitError::NoModel => ServiceError::Unavailable("no model is live yet".into()),
            SubmitError::UnknownCheckpoint(id) => {
                ServiceError::NotFound(format!("checkpoint {id} is not resident"))
            }
            SubmitError::PromptTooLong { tokens, max } => {
                ServiceError::InvalidArgument(FieldError::new(
                    "prompt",
                    format!(
                        "is {tokens} tokens; with max_new_tokens at most {max} prompt tokens fit \
                         the model's context (shorten the prompt or lower max_new_tokens)"
                    ),
                ))
            }
            SubmitError::ShuttingDown => {
                ServiceError::Unavailable("the server is shutting down".into())
            }
            SubmitError::Internal(m) => ServiceError::Internal(m),
        }
    }
}
