//! Where training CSVs come from: uploads stored by content hash under `<root>/datasets/`
//! (written atomically, so a stored id always names a complete file), and paths under
//! `--data-root`, which must never let a request read outside that directory.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{inspect_csv, DataError};

/// Largest upload accepted unless the store is built with another limit (1 GiB).
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 1 << 30;

/// What an upload became (the fields of the proto's `DatasetInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetInfo {
    /// sha256 of the bytes, 64 lowercase hex characters.
    pub dataset_id: String,
    pub bytes: u64,
    /// Data records after the header (before any cleaning).
    pub rows: u64,
    pub columns: Vec<String>,
    /// The column used when a request names none; `None` if no header name fits.
    pub detected_text_column: Option<String>,
}

/// Uploaded datasets under `<root>/datasets/<sha256>.csv`.
#[derive(Debug, Clone)]
pub struct DatasetStore {
    dir: PathBuf,
    max_bytes: u64,
}

impl DatasetStore {
    /// A store under `root` (the trainer's `--root`); creates `<root>/datasets` if needed.
    pub fn new(root: &Path) -> Result<Self, DataError> {
        let dir = root.join("datasets");
        fs::create_dir_all(&dir).map_err(|source| io(&dir, source))?;
        Ok(Self {
            dir,
            max_bytes: DEFAULT_MAX_UPLOAD_BYTES,
        })
    }

    /// The same store with another upload size limit.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Starts an upload into a temporary file of the store. `filename` is only logged.
    pub fn begin_upload(&self, filename: &str) -> Result<UploadWriter, DataError> {
        let file = tempfile::Builder::new()
            .prefix(".upload-")
            .suffix(".tmp")
            .tempfile_in(&self.dir)
            .map_err(|source| io(&self.dir, source))?;
        tracing::debug!(filename, "upload started");
        Ok(UploadWriter {
            file,
            hasher: Sha256::new(),
            bytes: 0,
            max_bytes: self.max_bytes,
            dir: self.dir.clone(),
            filename: filename.to_string(),
        })
    }

    /// The stored file of `dataset_id`, which must be 64 hex characters and exist.
    pub fn path_of(&self, dataset_id: &str) -> Result<PathBuf, DataError> {
        let valid = dataset_id.len() == 64
            && dataset_id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !valid {
            return Err(DataError::InvalidDatasetId(dataset_id.to_string()));
        }
        let path = self.dir.join(format!("{dataset_id}.csv"));
        if path.is_file() {
            Ok(path)
        } else {
            Err(DataError::UnknownDataset(dataset_id.to_string()))
        }
    }
}

/// An upload in progress. Dropped without [`finish`](Self::finish), its temporary file is
/// deleted and nothing is stored.
#[derive(Debug)]
pub struct UploadWriter {
    file: tempfile::NamedTempFile,
    hasher: Sha256,
    bytes: u64,
    max_bytes: u64,
    dir: PathBuf,
    filename: String,
}

impl UploadWriter {
    /// Appends a chunk; over the store's limit it fails and the upload is abandoned.
    pub fn write_chunk(&mut self, data: &[u8]) -> Result<(), DataError> {
        let bytes = self.bytes.saturating_add(data.len() as u64);
        if bytes > self.max_bytes {
            return Err(DataError::UploadTooLarge {
                limit: self.max_bytes,
            });
        }
        self.file
            .write_all(data)
            .map_err(|source| io(self.file.path(), source))?;
        self.hasher.update(data);
        self.bytes = bytes;
        Ok(())
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Syncs the file, renames it to `<sha256>.csv` (an identical earlier upload is kept
    /// as is) and reads its header and row count. Blocking: it reads the whole file, so
    /// async callers run it on a blocking thread.
    pub fn finish(self) -> Result<DatasetInfo, DataError> {
        if self.bytes == 0 {
            return Err(DataError::EmptyUpload);
        }
        let dataset_id = hex::encode(self.hasher.finalize());
        let path = self.dir.join(format!("{dataset_id}.csv"));
        let mut file = self.file;
        file.flush().map_err(|source| io(file.path(), source))?;
        file.as_file()
            .sync_all()
            .map_err(|source| io(file.path(), source))?;
        if path.is_file() {
            // Same content, same id: the stored file is already complete.
            drop(file);
        } else {
            file.persist(&path).map_err(|e| io(&path, e.error))?;
            sync_dir(&self.dir)?;
        }
        let summary = inspect_csv(&path)?;
        tracing::info!(
            filename = %self.filename,
            dataset_id = %dataset_id,
            bytes = self.bytes,
            rows = summary.rows,
            "dataset stored"
        );
        Ok(DatasetInfo {
            dataset_id,
            bytes: self.bytes,
            rows: summary.rows,
            columns: summary.columns,
            detected_text_column: summary.detected_text_column,
        })
    }
}

/// Resolves `rel` under `data_root`, refusing anything that could read outside it: empty
/// paths, NUL bytes, absolute paths, `..` components, and symlinks that lead out. The result
/// is canonical and names an existing file.
pub fn resolve_data_path(data_root: &Path, rel: &str) -> Result<PathBuf, DataError> {
    let refuse = |reason: &str| DataError::PathRefused {
        path: rel.to_string(),
        reason: reason.to_string(),
    };
    if rel.trim().is_empty() {
        return Err(refuse("empty path"));
    }
    if rel.contains('\0') {
        return Err(refuse("contains a NUL byte"));
    }
    for component in Path::new(rel).components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(refuse("\"..\" is not allowed")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse(
                    "absolute paths are not allowed; give a path relative to --data-root",
                ))
            }
        }
    }
    let root = data_root
        .canonicalize()
        .map_err(|source| io(data_root, source))?;
    let resolved = match root.join(rel).canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DataError::PathNotFound(rel.to_string()))
        }
        Err(source) => return Err(io(&root.join(rel), source)),
    };
    if !resolved.starts_with(&root) {
        return Err(refuse("resolves outside --data-root"));
    }
    if !resolved.is_file() {
        return Err(DataError::PathNotFound(rel.to_string()));
    }
    Ok(resolved)
}

fn sync_dir(dir: &Path) -> Result<(), DataError> {
    // A rename is durable only once its directory is synced.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| io(dir, source))
}

fn io(path: &Path, source: std::io::Error) -> DataError {
    DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}
