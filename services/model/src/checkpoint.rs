//! Checkpoints on disk: written atomically (temp directory, fsync, manifest last, rename), verified
//! file by file before anything is served, and loaded into a model + tokenizer. A plain Hugging
//! Face GPT-2 directory (no manifest) loads too, so a downloaded base model is a valid start.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::path::{Component, Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use tch::Device;

use crate::config::Gpt2Config;
use crate::device::WeightDtype;
use crate::error::{ModelError, Result};
use crate::gpt2::Gpt2;
pub use crate::manifest::{
    hash_file, sha256_file, unix_now, FileEntry, Manifest, MANIFEST, MANIFEST_FORMAT,
};
use crate::manifest::{open_error, sync_dir, write_synced};
use crate::tokenizer::Tokenizer;

/// Prefix of the directory a checkpoint is written into before it is renamed into place.
pub const TEMP_PREFIX: &str = ".tmp-";
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TOKENIZER_FILE: &str = crate::tokenizer::TOKENIZER_FILE;

/// Temp directories of writers running in this process: never "stale", even mid-write.
static ACTIVE_WRITES: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

fn set_active(dir: &Path, active: bool) {
    let mut guard = ACTIVE_WRITES.lock().unwrap_or_else(PoisonError::into_inner);
    let set = guard.get_or_insert_with(HashSet::new);
    if active {
        set.insert(dir.to_path_buf());
    } else {
        set.remove(dir);
    }
}

fn is_active(dir: &Path) -> bool {
    let guard = ACTIVE_WRITES.lock().unwrap_or_else(PoisonError::into_inner);
    guard.as_ref().is_some_and(|set| set.contains(dir))
}

/// Writes a checkpoint so that it either exists complete or not at all.
///
/// `write_files` fills a sibling temp directory (`.tmp-<name>-<pid>-<nanos>`); every file in it
/// is then fsynced and hashed into `manifest.files` (whatever the caller put there is replaced),
/// `manifest.json` is written last, and the directory is fsynced and renamed to `final_dir`.
/// On any error the temp directory is removed. `final_dir` must not exist yet.
pub fn write_checkpoint(
    final_dir: &Path,
    mut manifest: Manifest,
    write_files: impl FnOnce(&Path) -> Result<()>,
) -> Result<Manifest> {
    let name = final_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            ModelError::Invalid(format!(
                "{}: not a checkpoint directory name",
                final_dir.display()
            ))
        })?;
    let parent = match final_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| ModelError::io(&parent, e))?;
    if final_dir.exists() {
        return Err(ModelError::Invalid(format!(
            "{}: already exists",
            final_dir.display()
        )));
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let temp = parent.join(format!(
        "{TEMP_PREFIX}{name}-{}-{nanos}",
        std::process::id()
    ));
    fs::create_dir(&temp).map_err(|e| ModelError::io(&temp, e))?;
    set_active(&temp, true);

    let result = (|| {
        write_files(&temp)?;
        manifest.format = MANIFEST_FORMAT;
        manifest.files = hash_tree(&temp, true)?;
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| ModelError::format(temp.join(MANIFEST), e))?;
        write_synced(&temp.join(MANIFEST), &json)?;
        sync_dir(&temp)?;
        fs::rename(&temp, final_dir).map_err(|e| ModelError::io(final_dir, e))?;
        sync_dir(&parent)?;
        Ok(manifest)
    })();

    set_active(&temp, false);
    if result.is_err() && temp.exists() {
        if let Err(e) = fs::remove_dir_all(&temp) {
            tracing::warn!(dir = %temp.display(), error = %e, "could not remove temp checkpoint dir");
        }
    }
    result
}

/// Hashes every regular file under `dir` (manifest excluded), fsyncing each when `sync`.
fn hash_tree(dir: &Path, sync: bool) -> Result<BTreeMap<String, FileEntry>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((current, prefix)) = stack.pop() {
        for entry in fs::read_dir(&current).map_err(|e| ModelError::io(&current, e))? {
            let entry = entry.map_err(|e| ModelError::io(&current, e))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(|e| ModelError::io(&path, e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                return Err(ModelError::Invalid(format!(
                    "{}: file name is not UTF-8",
                    path.display()
                )));
            };
            let key = format!("{prefix}{name}");
            if kind.is_dir() {
                stack.push((path.clone(), format!("{key}/")));
                if sync {
                    sync_dir(&path)?;
                }
            } else if kind.is_file() {
                if key == MANIFEST {
                    continue;
                }
                let mut file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
                let entry = crate::manifest::hash_reader(&mut file)
                    .map_err(|e| ModelError::io(&path, e))?;
                if sync {
                    file.sync_all().map_err(|e| ModelError::io(&path, e))?;
                }
                files.insert(key, entry);
            } else {
                return Err(ModelError::Invalid(format!(
                    "{}: checkpoint files must be regular files",
                    path.display()
                )));
            }
        }
    }
    Ok(files)
}

/// Joins a manifest's file name to `dir`, refusing names that escape it (a manifest may come
/// from the network).
fn entry_path(dir: &Path, name: &str) -> Result<PathBuf> {
    let relative = Path::new(name);
    if name.is_empty()
        || !relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(ModelError::format(
            dir.join(MANIFEST),
            format!("file name {name:?} is not a plain relative path"),
        ));
    }
    Ok(dir.join(relative))
}

/// The files a checkpoint needs to be served. Anything else its manifest lists (the optimizer
/// state) only resumes training, so a generator may fetch a checkpoint without it.
pub const SERVING_FILES: [&str; 3] = [CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE];

/// Checks every file of the manifest (existence, size, sha256) and returns the manifest.
pub fn verify_checkpoint(dir: &Path) -> Result<Manifest> {
    verify_files(dir, |_| true)
}

/// Like [`verify_checkpoint`], except that files outside [`SERVING_FILES`] may be absent; those
/// present are checked all the same.
pub fn verify_for_serving(dir: &Path) -> Result<Manifest> {
    verify_files(dir, |name| SERVING_FILES.contains(&name))
}

fn verify_files(dir: &Path, required: impl Fn(&str) -> bool) -> Result<Manifest> {
    let manifest = Manifest::read(dir)?;
    for (name, expected) in &manifest.files {
        let path = entry_path(dir, name)?;
        if !required(name) && !path.exists() {
            continue;
        }
        check_size(&path, expected.size)?;
        let actual = hash_file(&path)?;
        // Size again: the file may have changed between the two looks.
        if actual.size != expected.size {
            return Err(ModelError::SizeMismatch {
                path,
                expected: expected.size,
                actual: actual.size,
            });
        }
        if actual.sha256 != expected.sha256 {
            return Err(ModelError::HashMismatch {
                path,
                expected: expected.sha256.clone(),
                actual: actual.sha256,
            });
        }
    }
    Ok(manifest)
}

fn check_size(path: &Path, expected: u64) -> Result<()> {
    let meta = fs::metadata(path).map_err(|e| open_error(path, e))?;
    if meta.len() != expected {
        return Err(ModelError::SizeMismatch {
            path: path.into(),
            expected,
            actual: meta.len(),
        });
    }
    Ok(())
}

/// A cheap completeness check (manifest readable, every file present with its size); use
/// [`verify_checkpoint`] to check hashes before serving.
pub fn is_complete_checkpoint(dir: &Path) -> bool {
    let Ok(manifest) = Manifest::read(dir) else {
        return false;
    };
    manifest.files.iter().all(|(name, entry)| {
        entry_path(dir, name).is_ok_and(|path| check_size(&path, entry.size).is_ok())
    })
}

/// Removes `.tmp-*` directories left by a writer that was killed, in `root` and in its direct
/// subdirectories (so both a checkpoint root and a run directory work). Directories of writers
/// still running in this process are kept; one writer process per root is assumed.
/// Returns the directories removed.
pub fn remove_stale_temp_dirs(root: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let mut scan = vec![root.to_path_buf()];
    if let Ok(entries) = fs::read_dir(root) {
        scan.extend(
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir() && !file_name_starts_with(p, TEMP_PREFIX)),
        );
    }
    for dir in scan {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for path in entries.flatten().map(|e| e.path()) {
            if !path.is_dir() || !file_name_starts_with(&path, TEMP_PREFIX) || is_active(&path) {
                continue;
            }
            match fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(dir = %path.display(), "removed unfinished checkpoint");
                    removed.push(path);
                }
                Err(e) => {
                    tracing::warn!(dir = %path.display(), error = %e, "could not remove unfinished checkpoint")
                }
            }
        }
    }
    removed
}

fn file_name_starts_with(path: &Path, prefix: &str) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(prefix))
}

/// Checkpoints (directories with a readable manifest) in `root` and its direct subdirectories,
/// oldest first (by creation time, then step). Hashes are not checked.
pub fn list_checkpoints(root: &Path) -> Vec<(PathBuf, Manifest)> {
    let mut found = Vec::new();
    let children = |dir: &Path| -> Vec<PathBuf> {
        fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_dir() && !file_name_starts_with(p, TEMP_PREFIX))
                    .collect()
            })
            .unwrap_or_default()
    };
    for dir in children(root) {
        match Manifest::read(&dir) {
            Ok(manifest) => found.push((dir, manifest)),
            Err(_) => found.extend(
                children(&dir)
                    .into_iter()
                    .filter_map(|d| Manifest::read(&d).ok().map(|m| (d, m))),
            ),
        }
    }
    found.sort_by(|a, b| (a.1.created, a.1.step, &a.0).cmp(&(b.1.created, b.1.step, &b.0)));
    found
}

/// A model ready to serve, with what identifies it.
#[derive(Debug)]
pub struct LoadedModel {
    pub model: Gpt2,
    pub tokenizer: Tokenizer,
    /// `None` for a plain Hugging Face directory.
    pub manifest: Option<Manifest>,
    /// Hashes of the files (from the verified manifest, or computed on load).
    pub files: BTreeMap<String, FileEntry>,
    /// The manifest's metadata, `Null` without a manifest.
    pub metadata: serde_json::Value,
}

/// Loads a checkpoint (its files verified against its manifest first; see
/// [`verify_for_serving`]) or a plain Hugging Face GPT-2 directory (`config.json`,
/// `tokenizer.json` or `vocab.json` + `merges.txt`, `model.safetensors`; hashes computed).
pub fn load_model_dir(dir: &Path, device: Device, dtype: WeightDtype) -> Result<LoadedModel> {
    let manifest = match verify_for_serving(dir) {
        Ok(manifest) => Some(manifest),
        Err(ModelError::MissingManifest { .. }) => None,
        Err(e) => return Err(e),
    };
    let files = match &manifest {
        Some(m) => m.files.clone(),
        None => [CONFIG_FILE, WEIGHTS_FILE]
            .into_iter()
            .chain(crate::tokenizer::tokenizer_files(dir).iter().copied())
            .map(|name| Ok((name.to_owned(), hash_file(&dir.join(name))?)))
            .collect::<Result<_>>()?,
    };
    let config = Gpt2Config::from_file(&dir.join(CONFIG_FILE))?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    if tokenizer.vocab_size() as i64 > config.vocab_size {
        return Err(ModelError::Invalid(format!(
            "{}: tokenizer has {} tokens but the model only {} embeddings",
            dir.display(),
            tokenizer.vocab_size(),
            config.vocab_size
        )));
    }
    let model = Gpt2::load(&config, &dir.join(WEIGHTS_FILE), device, dtype)?;
    let metadata = manifest
        .as_ref()
        .map(|m| m.metadata.clone())
        .unwrap_or(serde_json::Value::Null);
    Ok(LoadedModel {
        model,
        tokenizer,
        manifest,
        files,
        metadata,
    })
}
