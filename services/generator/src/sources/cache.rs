//! The download cache on disk holds what the generator may still load from it and nothing
//! more: evicting a model frees memory, not disk, and a cache that keeps every checkpoint a
//! trainer ever offered fills the pod's ephemeral storage, after which the kubelet evicts every
//! replica at once. After each swap the cache is pruned to the resident checkpoints plus those
//! being downloaded or loaded right now.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use super::download::sanitise_id;

/// Prefix of the directories a download writes into before it is complete.
pub const TMP_PREFIX: &str = ".tmp-download-";

/// The cache directory and the entries in use by a download or a load in progress.
pub struct Cache {
    dir: PathBuf,
    holds: Mutex<HashMap<String, usize>>,
}

impl Cache {
    /// Takes over `dir`. Partial downloads left by an earlier process (a container restarted on
    /// the same emptyDir) are removed: nothing is downloading yet.
    pub fn new(dir: PathBuf) -> Arc<Cache> {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                    remove(&entry.path());
                }
            }
        }
        Arc::new(Cache {
            dir,
            holds: Mutex::new(HashMap::new()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Keeps the entry of `checkpoint_id` out of pruning until the guard is dropped.
    pub fn hold(self: &Arc<Self>, checkpoint_id: &str) -> CacheHold {
        let name = sanitise_id(checkpoint_id);
        let mut holds = self.holds.lock().unwrap_or_else(PoisonError::into_inner);
        *holds.entry(name.clone()).or_default() += 1;
        CacheHold {
            cache: Arc::clone(self),
            name,
        }
    }

    /// Removes every checkpoint directory that is neither one of `resident` (checkpoint ids)
    /// nor held; returns how many went. Partial downloads are left to their download, which
    /// removes its temporary directory whether it succeeds or fails.
    pub fn prune<'a>(&self, resident: impl IntoIterator<Item = &'a str>) -> usize {
        let mut keep: HashSet<String> = resident.into_iter().map(sanitise_id).collect();
        {
            let holds = self.holds.lock().unwrap_or_else(PoisonError::into_inner);
            keep.extend(holds.keys().cloned());
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TMP_PREFIX) || keep.contains(&name) {
                continue;
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) && remove(&entry.path()) {
                tracing::info!(dir = %entry.path().display(), "removed a checkpoint no longer resident from the cache");
                removed += 1;
            }
        }
        removed
    }
}

fn remove(path: &Path) -> bool {
    match std::fs::remove_dir_all(path) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(dir = %path.display(), error = %e, "cannot remove from the cache");
            false
        }
    }
}

/// An entry of the cache in use; pruning leaves it alone while this lives.
pub struct CacheHold {
    cache: Arc<Cache>,
    name: String,
}

impl Drop for CacheHold {
    fn drop(&mut self) {
        let mut holds = self
            .cache
            .holds
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = holds.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                holds.remove(&self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn keeps_resident_and_held_checkpoints_only() {
        let tmp = tempfile::tempdir().unwrap();
        for name in ["run_step-1", "run_step-2", "run_step-3", ".tmp-download-x"] {
            std::fs::create_dir(tmp.path().join(name)).unwrap();
        }
        // A stale partial download from an earlier process goes at once.
        let cache = Cache::new(tmp.path().to_path_buf());
        assert!(!tmp.path().join(".tmp-download-x").exists());

        let held = cache.hold("run/step-3");
        std::fs::create_dir(tmp.path().join(".tmp-download-y")).unwrap();
        assert_eq!(cache.prune(["run/step-2"]), 1);
        assert_eq!(
            entries(tmp.path()),
            [".tmp-download-y", "run_step-2", "run_step-3"]
        );
        drop(held);
        assert_eq!(cache.prune(["run/step-2"]), 1);
        assert_eq!(entries(tmp.path()), [".tmp-download-y", "run_step-2"]);
    }
}
