//! The catalog of complete checkpoints under `checkpoints/<run_id>/<name>/`: what ListCheckpoints
//! answers, what WatchCheckpoints announces, and the retention policy of a run.
//!
//! At startup a directory counts when it is complete (manifest present, every file it lists
//! there with its size): hashing every checkpoint of a large root would take minutes. Hashes
//! are checked where bytes are used: FetchCheckpoint hashes what it sends, a resume verifies
//! its checkpoint, and the generator verifies before loading. A temp directory left by a
//! killed writer is removed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};

use synopsis_model::checkpoint::{self, Manifest, MANIFEST};
use synopsis_proto::v1::CheckpointInfo;
use tokio::sync::broadcast;

use crate::error::{Result, TrainerError};
use crate::ids;
use crate::layout::Layout;

/// Reason recorded in the manifest of a checkpoint written at the end of an epoch.
pub const REASON_EPOCH: &str = "epoch";
/// Written because of StopRun.
pub const REASON_STOP: &str = "stop";
/// Written because the trainer was asked to shut down.
pub const REASON_SHUTDOWN: &str = "shutdown";
/// Written when `max_steps` ended a run between epochs.
pub const REASON_FINAL: &str = "final";
/// Written inside an epoch by `--checkpoint-every-steps` / `--checkpoint-every-secs`.
pub const REASON_STEP: &str = "step";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the catalog knows of one checkpoint.
#[derive(Debug, Clone)]
pub struct Entry {
    pub info: CheckpointInfo,
    pub dir: PathBuf,
    pub manifest: Manifest,
}

#[derive(Debug)]
pub struct Catalog {
    layout: Layout,
    entries: Mutex<BTreeMap<String, Entry>>,
    tx: broadcast::Sender<CheckpointInfo>,
}

/// The proto view of a manifest: sha256 of `manifest.json` itself identifies the bytes.
pub fn info_of(dir: &std::path::Path, manifest: &Manifest) -> Result<CheckpointInfo> {
    let manifest_path = dir.join(MANIFEST);
    let sha256 = checkpoint::sha256_file(&manifest_path)?;
    let manifest_size = std::fs::metadata(&manifest_path)
        .map_err(|e| TrainerError::io(&manifest_path, e))?
        .len();
    let meta = &manifest.metadata;
    let condition_columns = meta
        .pointer("/conditioning/columns")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Ok(CheckpointInfo {
        checkpoint_id: manifest.checkpoint_id.clone(),
        run_id: manifest.run_id.clone(),
        epoch: manifest.epoch,
        step: manifest.step,
        val_loss: manifest.val_loss.unwrap_or(f64::NAN),
        sha256,
        size_bytes: manifest.total_bytes() + manifest_size,
        created: manifest.created,
        reason: manifest.reason.clone(),
        condition_columns,
        parameters: meta
            .get("parameters")
            .and_then(|v| v.as_u64())
            .unwrap_or_default(),
    })
}

impl Catalog {
    /// Scans every complete checkpoint under `checkpoints/` (blocking).
    pub fn load(layout: &Layout) -> Result<Self> {
        let root = layout.checkpoints_dir();
        let mut entries = BTreeMap::new();
        let runs = std::fs::read_dir(&root).map_err(|e| TrainerError::io(&root, e))?;
        for run_dir in runs.flatten().map(|e| e.path()) {
            let Some(run_id) = run_dir.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if ids::validate_run_id("run_id", run_id).is_err() || !run_dir.is_dir() {
                continue;
            }
            checkpoint::remove_stale_temp_dirs(&run_dir);
            let Ok(children) = std::fs::read_dir(&run_dir) else {
                continue;
            };
            for dir in children.flatten().map(|e| e.path()) {
                let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                if ids::validate_component("name", name).is_err() || !dir.is_dir() {
                    continue;
                }
                let expected_id = format!("{run_id}/{name}");
                if !checkpoint::is_complete_checkpoint(&dir) {
                    tracing::warn!(dir = %dir.display(), "not a complete checkpoint; ignored");
                    continue;
                }
                match Manifest::read(&dir) {
                    Ok(manifest) if manifest.checkpoint_id == expected_id => {
                        let info = info_of(&dir, &manifest)?;
                        entries.insert(
                            expected_id,
                            Entry {
                                info,
                                dir,
                                manifest,
                            },
                        );
                    }
                    Ok(manifest) => tracing::warn!(
                        dir = %dir.display(),
                        id = %manifest.checkpoint_id,
                        "checkpoint id does not match its directory; ignored"
                    ),
                    Err(e) => tracing::warn!(
                        dir = %dir.display(),
                        error = %e,
                        "unreadable manifest; ignored"
                    ),
                }
            }
        }
        tracing::info!(checkpoints = entries.len(), "checkpoints loaded");
        let (tx, _) = broadcast::channel(256);
        Ok(Catalog {
            layout: layout.clone(),
            entries: Mutex::new(entries),
            tx,
        })
    }

    /// Registers a checkpoint just written and announces it to WatchCheckpoints.
    pub fn add(&self, entry: Entry) {
        let info = entry.info.clone();
        lock(&self.entries).insert(info.checkpoint_id.clone(), entry);
        let _ = self.tx.send(info);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<CheckpointInfo> {
        self.tx.subscribe()
    }

    /// Checkpoints (of `run_id` if given), oldest first.
    pub fn list(&self, run_id: Option<&str>) -> Vec<CheckpointInfo> {
        let mut list: Vec<CheckpointInfo> = lock(&self.entries)
            .values()
            .filter(|e| run_id.is_none_or(|r| e.info.run_id == r))
            .map(|e| e.info.clone())
            .collect();
        list.sort_by(|a, b| {
            (a.created, a.step, &a.checkpoint_id).cmp(&(b.created, b.step, &b.checkpoint_id))
        });
        list
    }

    pub fn newest(&self, run_id: Option<&str>) -> Option<CheckpointInfo> {
        self.list(run_id).pop()
    }

    /// The checkpoint of a request's id (validated: it becomes a path).
    pub fn get(&self, field: &'static str, checkpoint_id: &str) -> Result<Entry> {
        ids::split_checkpoint_id(field, checkpoint_id)?;
        lock(&self.entries)
            .get(checkpoint_id)
            .cloned()
            .ok_or_else(|| TrainerError::NotFound(format!("no checkpoint {checkpoint_id}")))
    }

    /// Where a new checkpoint of `run_id` named `name` goes.
    pub fn dir_for(&self, run_id: &str, name: &str) -> PathBuf {
        self.layout.checkpoint_dir(run_id, name)
    }

    /// Deletes the run's step checkpoints (REASON_STEP) other than `keep`: each is superseded
    /// by any newer checkpoint, and keeping them would push epoch checkpoints out of
    /// `keep_last` and fill the volume.
    pub fn drop_superseded_steps(&self, run_id: &str, keep: &str) -> Vec<String> {
        let doomed: Vec<Entry> = lock(&self.entries)
            .values()
            .filter(|e| {
                e.info.run_id == run_id
                    && e.info.reason == REASON_STEP
                    && e.info.checkpoint_id != keep
            })
            .cloned()
            .collect();
        let mut removed = Vec::new();
        for entry in doomed {
            lock(&self.entries).remove(&entry.info.checkpoint_id);
            match remove_checkpoint_dir(&entry.dir) {
                Ok(()) => removed.push(entry.info.checkpoint_id.clone()),
                Err(e) => tracing::warn!(
                    checkpoint_id = %entry.info.checkpoint_id,
                    error = %e,
                    "cannot remove a superseded step checkpoint"
                ),
            }
        }
        removed
    }

    /// Deletes the run's checkpoints beyond the newest `keep_last`, sparing the best by
    /// validation loss (the one a user most likely wants to serve).
    pub fn retain(&self, run_id: &str, keep_last: usize) -> Vec<String> {
        let mut own: Vec<Entry> = lock(&self.entries)
            .values()
            .filter(|e| e.info.run_id == run_id)
            .cloned()
            .collect();
        own.sort_by_key(|e| (e.info.step, e.info.created));
        let best = own
            .iter()
            .filter(|e| e.info.val_loss.is_finite())
            .min_by(|a, b| a.info.val_loss.total_cmp(&b.info.val_loss))
            .map(|e| e.info.checkpoint_id.clone());
        let cut = own.len().saturating_sub(keep_last.max(1));
        let mut removed = Vec::new();
        for entry in &own[..cut] {
            if Some(&entry.info.checkpoint_id) == best.as_ref() {
                continue;
            }
            lock(&self.entries).remove(&entry.info.checkpoint_id);
            match remove_checkpoint_dir(&entry.dir) {
                Ok(()) => {
                    tracing::info!(checkpoint_id = %entry.info.checkpoint_id, "old checkpoint removed");
                    removed.push(entry.info.checkpoint_id.clone());
                }
                Err(e) => tracing::warn!(
                    checkpoint_id = %entry.info.checkpoint_id,
                    error = %e,
                    "cannot remove old checkpoint"
                ),
            }
        }
        removed
    }
}

/// Renames the directory to a temp name first (atomic), so a crash halfway through the
/// deletion leaves something the next start sweeps away, never a half checkpoint.
fn remove_checkpoint_dir(dir: &std::path::Path) -> std::io::Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let doomed = dir.with_file_name(format!("{}deleting-{name}", checkpoint::TEMP_PREFIX));
    std::fs::rename(dir, &doomed)?;
    std::fs::remove_dir_all(&doomed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(layout: &Layout, run: &str, step: u64, val_loss: Option<f64>) {
        let name = ids::checkpoint_name(0, step);
        let mut manifest = Manifest::new(format!("{run}/{name}"), run, 0, step, REASON_EPOCH);
        manifest.val_loss = val_loss;
        checkpoint::write_checkpoint(&layout.checkpoint_dir(run, &name), manifest, |dir| {
            std::fs::write(dir.join("model.safetensors"), step.to_le_bytes())
                .map_err(|e| synopsis_model::ModelError::io(dir, e))
        })
        .unwrap();
    }

    #[test]
    fn loads_complete_checkpoints_only_and_keeps_the_last_n_plus_the_best() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::new(root.path());
        layout.create().unwrap();
        let run = "run-20261129-000000-0001";
        for (step, loss) in [(1, 3.0), (2, 1.0), (3, 2.5), (4, 2.7), (5, 2.9)] {
            write(&layout, run, step, Some(loss));
        }
        write(&layout, "run-20261129-000000-0002", 1, None);
        // Leftovers a killed writer could leave: a temp dir and a directory without manifest.
        std::fs::create_dir_all(layout.checkpoints_dir().join(run).join(".tmp-x-1-2")).unwrap();
        std::fs::create_dir_all(layout.checkpoint_dir(run, "epoch-0009-step-000009")).unwrap();

        let catalog = Catalog::load(&layout).unwrap();
        assert_eq!(catalog.list(Some(run)).len(), 5);
        assert_eq!(catalog.list(None).len(), 6);
        assert!(!layout
            .checkpoints_dir()
            .join(run)
            .join(".tmp-x-1-2")
            .exists());

        let removed = catalog.retain(run, 2);
        let steps: Vec<u64> = catalog.list(Some(run)).iter().map(|c| c.step).collect();
        assert_eq!(
            steps,
            vec![2, 4, 5],
            "the last two and the best (step 2) stay"
        );
        assert_eq!(removed.len(), 2);
        for id in &removed {
            let (r, name) = id.split_once('/').unwrap();
            assert!(!layout.checkpoint_dir(r, name).exists());
        }
        // The other run is untouched, and a reload sees the same.
        assert_eq!(Catalog::load(&layout).unwrap().list(None).len(), 4);

        let info = catalog
            .get("id", &format!("{run}/epoch-0000-step-000002"))
            .unwrap()
            .info;
        assert_eq!(info.val_loss, 1.0);
        assert_eq!(info.sha256.len(), 64);
        assert!(info.size_bytes > 8);
        assert!(catalog.get("id", "run-x/nope").is_err());
    }
}
