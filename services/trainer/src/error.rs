//! The trainer's error type and its one mapping to gRPC status codes, so every handler
//! answers a given failure with the same code and a message naming what to fix.

use std::path::PathBuf;

use tonic::{Code, Status};

use crate::data::DataError;

#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// A request field is malformed or out of range.
    #[error("{field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    /// The dataset named by a request cannot be used (bad CSV, unknown id, path refused…).
    #[error("{field}: {source}")]
    Data {
        field: &'static str,
        #[source]
        source: DataError,
    },
    /// A model, tokenizer or checkpoint named by a request cannot be loaded.
    #[error("{field}: {source}")]
    BadModel {
        field: &'static str,
        #[source]
        source: synopsis_model::ModelError,
    },
    /// No run, checkpoint or dataset of that id.
    #[error("{0}")]
    NotFound(String),
    /// The device is busy with another run: one run at a time per device.
    #[error("run {run_id} is running; stop it or wait")]
    Busy { run_id: String },
    /// Another Train request is being prepared on this device.
    #[error("another run is starting on this device; wait for it to start, then stop it or wait")]
    Starting,
    /// The server is draining for shutdown and starts nothing new.
    #[error("the trainer is shutting down")]
    ShuttingDown,
    /// The trainer was started without a flag the request needs.
    #[error("{0}")]
    NotConfigured(String),
    /// A file of the trainer's own state could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A model operation failed while training (not the request's fault).
    #[error("model: {0}")]
    Model(#[from] synopsis_model::ModelError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A stored file no longer matches its manifest.
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, TrainerError>;

impl TrainerError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        TrainerError::InvalidArgument {
            field,
            message: message.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainerError::Io {
            path: path.into(),
            source,
        }
    }
}

/// The status code of a data-pipeline failure. A path outside `--data-root` is
/// INVALID_ARGUMENT like every other malformed field (not PERMISSION_DENIED: the caller is
/// not missing a permission, the request is wrong); an over-size upload is
/// RESOURCE_EXHAUSTED, the code gRPC reserves for a quota a request exceeded.
fn data_code(error: &DataError) -> Code {
    match error {
        DataError::Io { .. } => Code::Internal,
        DataError::Csv(_)
        | DataError::EmptyFile
        | DataError::NoTextColumn { .. }
        | DataError::MissingColumn { .. }
        | DataError::NoUsableRows { .. }
        | DataError::InvalidDatasetId(_)
        | DataError::PathRefused { .. }
        | DataError::EmptyUpload
        | DataError::NotCsv(_)
        | DataError::UnknownConditionKey { .. }
        | DataError::InvalidOption(_) => Code::InvalidArgument,
        DataError::UnknownDataset(_) | DataError::PathNotFound(_) => Code::NotFound,
        DataError::UploadTooLarge { .. } | DataError::QuotaExceeded { .. } => {
            Code::ResourceExhausted
        }
    }
}

impl From<TrainerError> for Status {
    fn from(error: TrainerError) -> Status {
        let code = match &error {
            TrainerError::InvalidArgument { .. } | TrainerError::BadModel { .. } => {
                Code::InvalidArgument
            }
            TrainerError::Data { source, .. } => data_code(source),
            TrainerError::NotFound(_) => Code::NotFound,
            TrainerError::Busy { .. } | TrainerError::Starting => Code::ResourceExhausted,
            TrainerError::ShuttingDown => Code::Unavailable,
            TrainerError::NotConfigured(_) => Code::FailedPrecondition,
            TrainerError::Corrupt(_) => Code::DataLoss,
            TrainerError::Io { .. }
            | TrainerError::Model(_)
            | TrainerError::Torch(_)
            | TrainerError::Internal(_) => Code::Internal,
        };
        if code == Code::Internal {
            // Never the failure itself: libtorch's messages carry C++ backtraces and paths.
            return Status::new(code, synopsis_common::internal_message(&error));
        }
        synopsis_common::bounded_status(code, &error.to_string())
    }
}
