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
    /// Bytes all stored datasets may take together (`--max-datasets-bytes`).
    quota: Option<u64>,
}

/// The stored datasets: `(dataset_id, path, bytes, modified)`.
type Stored = Vec<(String, PathBuf, u64, std::time::SystemTime)>;

impl DatasetStore {
    /// A store under `root` (the trainer's `--root`); creates `<root>/datasets` if needed.
    pub fn new(root: &Path) -> Result<Self, DataError> {
        let dir = root.join("datasets");
        fs::create_dir_all(&dir).map_err(|source| io(&dir, source))?;
        Ok(Self {
            dir,
            max_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            quota: None,
        })
    }

    /// The same store with a quota on the bytes of all stored datasets together.
    pub fn with_quota(mut self, quota: Option<u64>) -> Self {
        self.quota = quota;
        self
    }

    /// Every stored dataset, with its size and modification time.
    pub fn stored(&self) -> Stored {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_str()?.to_string();
                let id = name.strip_suffix(".csv")?;
                if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                let meta = entry.metadata().ok()?;
                let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                Some((id.to_string(), entry.path(), meta.len(), modified))
            })
            .collect()
    }

    /// Removes the stored datasets older than `max_age` (by the time they were last
    /// uploaded) for which `in_use` is false; returns the ids removed.
    pub fn remove_unused(
        &self,
        max_age: std::time::Duration,
        in_use: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let now = std::time::SystemTime::now();
        let mut removed = Vec::new();
        for (id, path, _, modified) in self.stored() {
            let old = now.duration_since(modified).unwrap_or_default() >= max_age;
            if old && !in_use(&id) {
                match fs::remove_file(&path) {
                    Ok(()) => removed.push(id),
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "cannot remove an unused dataset")
                    }
                }
            }
        }
        removed
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
        // Within the quota, an upload may take what the stored datasets leave.
        let used: u64 = self.stored().iter().map(|(_, _, bytes, _)| bytes).sum();
        let room = self.quota.map(|q| (q, used));
        if let Some((quota, used)) = room {
            if used >= quota {
                return Err(DataError::QuotaExceeded { quota, used });
            }
        }
        Ok(UploadWriter {
            file,
            hasher: Sha256::new(),
            bytes: 0,
            max_bytes: self.max_bytes,
            quota: room,
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
    /// `(quota, bytes stored when the upload began)`.
    quota: Option<(u64, u64)>,
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
        if let Some((quota, used)) = self.quota {
            if used.saturating_add(bytes) > quota {
                return Err(DataError::QuotaExceeded { quota, used });
            }
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
        // Checked before it is kept: random bytes or a header alone are refused (and the
        // temporary file goes with `file`).
        let summary = inspect_csv(file.path())?;
        check_upload(&summary)?;
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
        // Uploaded again: counts as new for the age-based removal of unused datasets.
        let _ = File::options()
            .append(true)
            .open(&path)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
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

/// What an upload must be to be kept: a UTF-8 header naming at least one column and at least
/// one data row, most of them UTF-8 (a stray bad row is counted and skipped when training,
/// but a file of random bytes is not a CSV).
fn check_upload(summary: &super::CsvSummary) -> Result<(), DataError> {
    if !summary.header_utf8 {
        return Err(DataError::NotCsv(
            "its first line (the header) is not UTF-8 text".into(),
        ));
    }
    if summary.columns.iter().all(String::is_empty) {
        return Err(DataError::NotCsv("its header names no column".into()));
    }
    if summary.rows == 0 {
        return Err(DataError::NotCsv("it has a header but no data row".into()));
    }
    if summary.invalid_utf8_rows * 2 > summary.rows {
        return Err(DataError::NotCsv(format!(
            "{} of its {} rows are not UTF-8 text",
            summary.invalid_utf8_rows, summary.rows
        )));
    }
    Ok(())
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
