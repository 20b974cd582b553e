//! The trainer's data pipeline: a CSV (uploaded or under `--data-root`) becomes cleaned,
//! optionally conditioned documents with a deterministic train/validation split.
//!
//! Nothing a file contains is fatal except a file with no usable text column or no usable
//! row: every skipped or changed row is counted in [`DatasetStats`], so a run reports what
//! it trained on.

mod cleaning;
mod conditioning;
mod csv_reader;
mod error;
mod split;
mod store;

use std::io::Read;
use std::path::Path;

pub use cleaning::{
    is_allowed, CleaningConfig, DatasetStats, DEFAULT_MAX_CHARS, DEFAULT_MIN_CHARS, META_NOTE,
};
pub use conditioning::{ConditioningTemplate, SYNOPSIS_LABEL};
pub use csv_reader::{inspect_csv, CsvSummary, TEXT_COLUMN_CANDIDATES};
pub use error::DataError;
pub use split::{split_indices, DEFAULT_EVAL_FRACTION};
pub use store::{
    resolve_data_path, DatasetInfo, DatasetStore, UploadWriter, DEFAULT_MAX_UPLOAD_BYTES,
};

/// What to read from a CSV and how to clean and split it.
#[derive(Debug, Clone, PartialEq)]
pub struct DataOptions {
    /// Column holding the text; `None` (or empty) detects one of [`TEXT_COLUMN_CANDIDATES`].
    pub text_column: Option<String>,
    /// Columns rendered as a conditioning header before the text (see [`ConditioningTemplate`]).
    pub condition_columns: Vec<String>,
    pub cleaning: CleaningConfig,
    /// Fraction of documents held out for validation, in `[0, 1)`.
    pub eval_fraction: f64,
    /// Seed of the train/validation split.
    pub seed: u64,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            text_column: None,
            condition_columns: Vec::new(),
            cleaning: CleaningConfig::default(),
            eval_fraction: DEFAULT_EVAL_FRACTION,
            seed: 0,
        }
    }
}

/// Cleaned documents ready for tokenization (the end-of-text token is not appended here).
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Rendered documents, in file order: the cleaned text, or the conditioned template.
    pub documents: Vec<String>,
    /// Indices into `documents` used for training, ascending.
    pub train: Vec<usize>,
    /// Indices into `documents` held out for validation, ascending.
    pub eval: Vec<usize>,
    pub stats: DatasetStats,
    /// The header name of the column the text was read from.
    pub text_column: String,
    /// Present when `condition_columns` was not empty; stored in checkpoints for prompting.
    pub template: Option<ConditioningTemplate>,
}

/// Reads, cleans, conditions and splits the CSV at `path`.
pub fn load_documents(path: &Path, opts: &DataOptions) -> Result<Dataset, DataError> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    load_documents_from_reader(std::io::BufReader::new(file), opts)
}

/// [`load_documents`] over any reader (bytes already in memory, tests).
pub fn load_documents_from_reader<R: Read>(
    reader: R,
    opts: &DataOptions,
) -> Result<Dataset, DataError> {
    if !(0.0..1.0).contains(&opts.eval_fraction) {
        return Err(DataError::InvalidOption(format!(
            "eval_fraction must be in [0, 1), got {}",
            opts.eval_fraction
        )));
    }
    opts.cleaning.validate()?;
    let cleaner = cleaning::Cleaner::new(&opts.cleaning);
    let mut table =
        csv_reader::Table::open(reader, opts.text_column.as_deref(), &opts.condition_columns)?;
    let template = table.template().cloned();
    let mut stats = DatasetStats::default();
    let mut documents = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut condition_values = Vec::new();
    while let Some(row) = table.next_row(&mut stats, &mut condition_values)? {
        let Some(text) = cleaner.clean(row, &mut stats, &mut seen) else {
            continue;
        };
        let document = match &template {
            Some(t) => t.render_document(&condition_values, &text),
            None => text,
        };
        documents.push(document);
    }
    stats.rows_kept = documents.len() as u64;
    if documents.is_empty() {
        return Err(DataError::NoUsableRows { stats });
    }
    let (train, eval) = split_indices(documents.len(), opts.eval_fraction, opts.seed);
    tracing::info!(
        rows_read = stats.rows_read,
        rows_kept = stats.rows_kept,
        train = train.len(),
        eval = eval.len(),
        text_column = %table.text_column(),
        "dataset loaded"
    );
    Ok(Dataset {
        documents,
        train,
        eval,
        stats,
        text_column: table.text_column().to_string(),
        template,
    })
}
