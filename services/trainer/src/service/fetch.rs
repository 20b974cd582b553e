//! FetchCheckpoint: a checkpoint's files in 1 MiB chunks. Every chunk carries its file, offset
//! and the file's size; a file's last chunk carries the sha256 of the bytes actually sent
//! (checked against the manifest, so a file damaged on disk is reported, never passed on);
//! the first chunk of the stream carries the CheckpointInfo. `manifest.json` goes last, so a
//! client writing files as they come has a complete checkpoint exactly when it has a manifest.

use std::fs::File;
use std::io::Read;

use sha2::{Digest, Sha256};
use synopsis_model::checkpoint::MANIFEST;
use synopsis_proto::v1::{CheckpointChunk, CheckpointInfo};
use tokio::sync::mpsc;
use tonic::Status;

use crate::checkpoints::Entry;
use crate::error::TrainerError;
use crate::train::optimizer::OPTIMIZER_FILE;

pub const CHUNK_BYTES: usize = 1 << 20;

/// Streams `entry`'s files into `tx` (blocking: run on a blocking thread). Stops quietly when
/// the client is gone.
pub fn send_checkpoint(
    entry: Entry,
    skip_optimizer: bool,
    tx: mpsc::Sender<Result<CheckpointChunk, Status>>,
) {
    let mut info: Option<CheckpointInfo> = Some(entry.info.clone());
    let mut files: Vec<(String, Option<String>)> = entry
        .manifest
        .files
        .iter()
        .filter(|(name, _)| !(skip_optimizer && name.as_str() == OPTIMIZER_FILE))
        .map(|(name, e)| (name.clone(), Some(e.sha256.clone())))
        .collect();
    // The manifest's own hash is CheckpointInfo.sha256.
    files.push((MANIFEST.to_string(), Some(entry.info.sha256.clone())));
    for (name, expected) in files {
        match send_file(&entry, &name, expected.as_deref(), &mut info, &tx) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                let _ = tx.blocking_send(Err(Status::from(e)));
                return;
            }
        }
    }
}

/// Sends one file; `Ok(false)` when the client has gone.
fn send_file(
    entry: &Entry,
    name: &str,
    expected: Option<&str>,
    info: &mut Option<CheckpointInfo>,
    tx: &mpsc::Sender<Result<CheckpointChunk, Status>>,
) -> Result<bool, TrainerError> {
    let path = entry.dir.join(name);
    let mut file = File::open(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => TrainerError::NotFound(format!(
            "checkpoint {} was removed while being fetched",
            entry.info.checkpoint_id
        )),
        _ => TrainerError::io(&path, e),
    })?;
    let size = file
        .metadata()
        .map_err(|e| TrainerError::io(&path, e))?
        .len();
    let mut hasher = Sha256::new();
    let mut offset = 0u64;
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = file
                .read(&mut buf[filled..])
                .map_err(|e| TrainerError::io(&path, e))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        hasher.update(&buf[..filled]);
        let last = offset + filled as u64 >= size || filled < buf.len();
        let sha256 = if last {
            let actual = hex::encode(hasher.clone().finalize());
            if expected.is_some_and(|e| e != actual) {
                return Err(TrainerError::Corrupt(format!(
                    "{name} of checkpoint {} does not match its manifest",
                    entry.info.checkpoint_id
                )));
            }
            actual
        } else {
            String::new()
        };
        let chunk = CheckpointChunk {
            file: name.to_string(),
            offset,
            data: buf[..filled].to_vec(),
            sha256,
            file_size: size,
            info: info.take(),
        };
        if tx.blocking_send(Ok(chunk)).is_err() {
            return Ok(false);
        }
        offset += filled as u64;
        if last {
            return Ok(true);
        }
    }
}
