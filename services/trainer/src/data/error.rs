//! The data pipeline's errors: each names what the caller got wrong, so the server can
//! answer INVALID_ARGUMENT (or NOT_FOUND) with a message a user can act on.

use std::path::PathBuf;

use synopsis_common::quote;

use super::DatasetStats;

/// Columns of a client's CSV header as an error lists them: each quoted short, at most 20.
fn column_list(columns: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut list: Vec<String> = columns.iter().take(SHOWN).map(|c| quote(c)).collect();
    if columns.len() > SHOWN {
        list.push(format!("… {} columns in all", columns.len()));
    }
    list.join(", ")
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Reading or writing a file failed (an internal error, not the caller's).
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The CSV could not be read (an I/O failure below the parser).
    #[error("cannot read CSV: {0}")]
    Csv(String),
    /// The file has no header row at all.
    #[error("the CSV is empty: expected a header row and at least one data row")]
    EmptyFile,
    /// No text column was named and none of the usual names is in the header.
    #[error(
        "no text column: name one with text_column, or use a header named one of \
         synopsis, sypnopsis, description, overview, plot, text (columns found: {})",
        column_list(columns)
    )]
    NoTextColumn { columns: Vec<String> },
    /// A named text column or condition column is not in the header.
    #[error(
        "column {} is not in the CSV header (columns found: {})",
        quote(column),
        column_list(columns)
    )]
    MissingColumn {
        column: String,
        columns: Vec<String>,
    },
    /// Every row was skipped; `stats` says why.
    #[error("no usable rows: {}", stats.summary())]
    NoUsableRows { stats: DatasetStats },
    /// A dataset id is not 64 lowercase hexadecimal characters.
    #[error("invalid dataset id {}: expected the 64 hex characters returned by UploadDataset", quote(.0))]
    InvalidDatasetId(String),
    /// A well-formed dataset id that this trainer does not hold.
    #[error("unknown dataset id {}", quote(.0))]
    UnknownDataset(String),
    /// A data path that is malformed or resolves outside `--data-root`.
    #[error("data path {} refused: {reason}", quote(path))]
    PathRefused { path: String, reason: String },
    /// A data path inside `--data-root` that does not exist or is not a file.
    #[error("data path {} does not exist or is not a file", quote(.0))]
    PathNotFound(String),
    /// An upload went over the store's size limit.
    #[error("upload exceeds the limit of {limit} bytes")]
    UploadTooLarge { limit: u64 },
    /// An upload is not a usable CSV (not UTF-8, no header, no data row).
    #[error("the upload is not a usable CSV: {0}")]
    NotCsv(String),
    /// Storing an upload would take the stored datasets over `--max-datasets-bytes`.
    #[error(
        "the stored datasets would exceed their quota of {quota} bytes ({used} bytes in use); \
         unused datasets are removed after --dataset-retention-hours, or ask the operator"
    )]
    QuotaExceeded { quota: u64, used: u64 },
    /// An upload carried no bytes.
    #[error("the upload is empty")]
    EmptyUpload,
    /// A prompt value names a field that the checkpoint's template does not have.
    #[error(
        "unknown conditioning field {} (known: {})",
        quote(key),
        column_list(known)
    )]
    UnknownConditionKey { key: String, known: Vec<String> },
    /// An option out of range (e.g. min_chars above max_chars).
    #[error("invalid data option: {0}")]
    InvalidOption(String),
}
