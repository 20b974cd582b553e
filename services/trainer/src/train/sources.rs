//! Where a request's data, base model and tokenizer come from: dataset ids resolved by the
//! store, and paths confined under `--data-root` / `--models-root` (relative, no `..`, and
//! still inside once symlinks are resolved).

use std::path::{Component, Path, PathBuf};

use synopsis_common::quote;
use synopsis_model::Tokenizer;

use super::plan::{bad, DataSource, Env};
use crate::data;
use crate::error::{Result, TrainerError};

pub fn resolve_data(source: &DataSource, env: &Env) -> Result<PathBuf> {
    match source {
        DataSource::DatasetId(id) => {
            env.datasets
                .path_of(id)
                .map_err(|source| TrainerError::Data {
                    field: "dataset_id",
                    source,
                })
        }
        DataSource::DataPath(path) => {
            let root = env.data_root.as_deref().ok_or_else(|| {
                TrainerError::NotConfigured(
                    "data_path: this trainer has no --data-root; upload the CSV with UploadDataset"
                        .into(),
                )
            })?;
            data::resolve_data_path(root, path).map_err(|source| TrainerError::Data {
                field: "data_path",
                source,
            })
        }
    }
}

pub fn named_tokenizer(env: &Env, name: &str) -> Result<(Tokenizer, String)> {
    let dir = resolve_model_dir(env, "tokenizer", name)?;
    let tok = Tokenizer::from_dir(&dir).map_err(bad("tokenizer"))?;
    Ok((tok, format!("models root {name}")))
}

/// A directory named by a request under `--models-root`: relative, no `..`, and still inside
/// the root once symlinks are resolved.
pub fn resolve_model_dir(env: &Env, field: &'static str, name: &str) -> Result<PathBuf> {
    let root = env.models_root.as_deref().ok_or_else(|| {
        TrainerError::NotConfigured(format!("{field}: this trainer has no --models-root"))
    })?;
    resolve_under(root, field, name)
}

pub(crate) fn resolve_under(root: &Path, field: &'static str, name: &str) -> Result<PathBuf> {
    let plain = !name.is_empty()
        && !name.contains('\0')
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(TrainerError::invalid(
            field,
            format!("{} must be a relative path without '..'", quote(name)),
        ));
    }
    let root = root.canonicalize().map_err(|e| TrainerError::io(root, e))?;
    let dir = root
        .join(name)
        .canonicalize()
        .map_err(|_| TrainerError::invalid(field, format!("{} does not exist", quote(name))))?;
    if !dir.starts_with(&root) || !dir.is_dir() {
        return Err(TrainerError::invalid(
            field,
            format!("{} is not a directory under the models root", quote(name)),
        ));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_dirs_stay_under_the_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("gpt2")).unwrap();
        assert!(resolve_under(root.path(), "base_model", "gpt2").is_ok());
        for bad in ["../gpt2", "/etc", "", "gpt2/../..", "missing"] {
            assert!(
                resolve_under(root.path(), "base_model", bad).is_err(),
                "{bad}"
            );
        }
    }
}
