//! The `manifest.json` of a checkpoint: who wrote it, when, and the sha256 and size of every file.
//! A directory without a valid manifest is not a checkpoint, which is what makes writing one
//! atomic (the manifest is written last). Also the file helpers the checkpoint code shares.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};

/// File name of the manifest inside a checkpoint directory.
pub const MANIFEST: &str = "manifest.json";

/// The manifest layout this code writes and understands.
pub const MANIFEST_FORMAT: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    pub sha256: String,
    pub size: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    pub checkpoint_id: String,
    pub run_id: String,
    pub epoch: u32,
    pub step: u64,
    pub val_loss: Option<f64>,
    /// Unix time in seconds.
    pub created: i64,
    /// Why it was written: "epoch", "stop", "final", ...
    pub reason: String,
    /// Path relative to the checkpoint directory ('/'-separated) → hash and size.
    #[serde(default)]
    pub files: BTreeMap<String, FileEntry>,
    /// Free-form: conditioning template, dataset statistics, training config.
    #[serde(default)]
    pub metadata: serde_json::Value,
}

impl Manifest {
    /// A manifest stamped with the current time and no files yet (writing fills them in).
    pub fn new(
        checkpoint_id: impl Into<String>,
        run_id: impl Into<String>,
        epoch: u32,
        step: u64,
        reason: impl Into<String>,
    ) -> Self {
        Manifest {
            format: MANIFEST_FORMAT,
            checkpoint_id: checkpoint_id.into(),
            run_id: run_id.into(),
            epoch,
            step,
            val_loss: None,
            created: unix_now(),
            reason: reason.into(),
            files: BTreeMap::new(),
            metadata: serde_json::Value::Null,
        }
    }

    /// Reads `dir/manifest.json`; `MissingManifest` when there is none.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ModelError::MissingManifest { dir: dir.into() })
            }
            Err(e) => return Err(ModelError::io(&path, e)),
        };
        let manifest: Manifest =
            serde_json::from_slice(&text).map_err(|e| ModelError::format(&path, e))?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(ModelError::format(
                &path,
                format!(
                    "manifest format {} is not supported (expected {MANIFEST_FORMAT})",
                    manifest.format
                ),
            ));
        }
        Ok(manifest)
    }

    /// Bytes of all listed files (the manifest itself excluded).
    pub fn total_bytes(&self) -> u64 {
        self.files.values().map(|f| f.size).sum()
    }
}

/// Current Unix time in seconds (0 if the clock is before 1970).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Hex sha256 of a file, read in chunks so multi-GB weights never sit in memory.
pub fn sha256_file(path: &Path) -> Result<String> {
    hash_file(path).map(|entry| entry.sha256)
}

/// sha256 and size of a file in one streaming pass.
pub fn hash_file(path: &Path) -> Result<FileEntry> {
    let mut file = File::open(path).map_err(|e| open_error(path, e))?;
    hash_reader(&mut file).map_err(|e| ModelError::io(path, e))
}

pub(crate) fn hash_reader(reader: &mut impl Read) -> std::io::Result<FileEntry> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(FileEntry {
        sha256: hex::encode(hasher.finalize()),
        size,
    })
}

/// A missing file is reported as such, anything else as an I/O error on that path.
pub(crate) fn open_error(path: &Path, e: std::io::Error) -> ModelError {
    if e.kind() == std::io::ErrorKind::NotFound {
        ModelError::MissingFile { path: path.into() }
    } else {
        ModelError::io(path, e)
    }
}

/// Writes a file and fsyncs it before returning.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).map_err(|e| ModelError::io(path, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| ModelError::io(path, e))
}

/// fsyncs a directory so the names created or renamed in it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ModelError::io(dir, e))
}
