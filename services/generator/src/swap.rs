//! The hot-swap pipeline every checkpoint goes through, whatever its source: load and verify
//! on a blocking thread, smoke-test and install in the engine, then make it live. A checkpoint
//! that fails any step is recorded as refused and the live model keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use synopsis_model::checkpoint::{self, LoadedModel, Manifest, MANIFEST};
use synopsis_model::{ModelError, WeightDtype};
use synopsis_proto::v1 as pb;
use tracing::{info, warn};

use crate::conditioning::Conditioning;
use crate::engine::ResidentModel;
use crate::state::State;

#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("{0}")]
    Load(#[from] ModelError),
    #[error("bad conditioning template: {0}")]
    Template(String),
    #[error("smoke test failed: {0}")]
    Install(String),
    #[error("{0}")]
    Download(String),
    /// The trainer could not be reached; nothing was refused.
    #[error("{0}")]
    Unreachable(String),
    /// The trainer does not know the checkpoint.
    #[error("{0}")]
    NotFound(String),
    #[error("loader thread failed: {0}")]
    Task(String),
}

impl SwapError {
    /// The `reason` label of the refused-loads counter.
    pub fn reason_label(&self) -> &'static str {
        match self {
            SwapError::Load(_) => "load",
            SwapError::Template(_) => "template",
            SwapError::Install(_) => "smoke_test",
            SwapError::Download(_) => "download",
            SwapError::Unreachable(_) | SwapError::NotFound(_) | SwapError::Task(_) => "other",
        }
    }

    /// True when the checkpoint may still be in the middle of being copied (a file missing or
    /// short), so a watcher should look again instead of refusing it for good.
    pub fn is_incomplete(&self) -> bool {
        matches!(
            self,
            SwapError::Load(ModelError::MissingFile { .. } | ModelError::SizeMismatch { .. })
        )
    }
}

/// What a model's attention cache must fit in: `max_batch` sequences of its full context.
#[derive(Debug, Clone, Copy)]
pub struct CacheBudget {
    pub max_batch: usize,
    /// `--max-cache-memory`; `None`: the host's available memory on the CPU, no check on a GPU.
    pub max_memory: Option<u64>,
}

impl CacheBudget {
    /// Bytes of keys and values for `max_batch` sequences of `n_positions` tokens.
    pub fn cache_bytes(&self, config: &synopsis_model::Gpt2Config, dtype: WeightDtype) -> u128 {
        let element: u128 = match dtype {
            WeightDtype::F32 => 4,
            WeightDtype::Bf16 | WeightDtype::F16 => 2,
        };
        let per_token = 2 * config.n_layer.max(0) as u128 * config.n_embd.max(0) as u128;
        self.max_batch as u128 * config.n_positions.max(0) as u128 * per_token * element
    }

    /// Refuses a model whose full cache would not fit, naming both sizes.
    pub fn check(
        &self,
        config: &synopsis_model::Gpt2Config,
        device: tch::Device,
        dtype: WeightDtype,
    ) -> Result<(), SwapError> {
        let limit = self.max_memory.or_else(|| match device {
            tch::Device::Cpu => synopsis_common::available_host_memory(),
            _ => None,
        });
        let Some(limit) = limit else { return Ok(()) };
        let need = self.cache_bytes(config, dtype);
        if need > u128::from(limit) {
            let need = u64::try_from(need).unwrap_or(u64::MAX);
            return Err(SwapError::Load(ModelError::Invalid(format!(
                "its attention cache for --max-batch {} sequences of {} tokens needs about {}, \
                 more than the {} available; lower --max-batch or give the generator more memory",
                self.max_batch,
                config.n_positions,
                synopsis_common::human_bytes(need),
                synopsis_common::human_bytes(limit)
            ))));
        }
        Ok(())
    }
}

/// Loads the checkpoint (or plain Hugging Face directory) at `dir` and makes it live.
/// `record_incomplete = false` leaves a half-copied checkpoint out of the refused list.
pub async fn install_dir(
    state: &Arc<State>,
    dir: &Path,
    source: &str,
    record_incomplete: bool,
) -> Result<pb::CheckpointInfo, SwapError> {
    let _one_swap = state.swap_lock.lock().await;
    let result = install_locked(state, dir, source).await;
    match &result {
        Ok(info) => {
            state.metrics.swaps.inc();
            state.metrics.set_live(&info.checkpoint_id);
            info!(checkpoint_id = %info.checkpoint_id, source, "checkpoint is live");
        }
        Err(e) if e.is_incomplete() && !record_incomplete => {
            info!(dir = %dir.display(), error = %e, "checkpoint incomplete, will look again");
        }
        Err(e) => {
            state.metrics.swap_failures.inc();
            state.metrics.refused_load(e.reason_label());
            let id = peek_manifest(dir)
                .map(|m| m.checkpoint_id)
                .unwrap_or_else(|| dir.display().to_string());
            state.refuse(&id, &e.to_string());
            warn!(checkpoint_id = %id, source, error = %e, "checkpoint refused; the live model keeps serving");
        }
    }
    prune_cache(state);
    state.refresh_health().await;
    result
}

/// Drops from the download cache what is no longer resident (an evicted or refused checkpoint).
/// Runs under the swap lock, so the resident set cannot change under it.
fn prune_cache(state: &State) {
    if let Some(link) = &state.trainer {
        let resident = state.engine.resident();
        link.cache
            .prune(resident.iter().map(|m| m.info.checkpoint_id.as_str()));
    }
}

async fn install_locked(
    state: &Arc<State>,
    dir: &Path,
    source: &str,
) -> Result<pb::CheckpointInfo, SwapError> {
    // The same bytes already resident (e.g. seen through two sources): just make them live.
    if let Some(m) = peek_manifest(dir) {
        if let Some(resident) = state.resident(&m.checkpoint_id) {
            let sha = checkpoint::sha256_file(&dir.join(MANIFEST)).ok();
            if sha.as_deref() == Some(resident.info.sha256.as_str()) {
                state
                    .engine
                    .set_live(&m.checkpoint_id)
                    .await
                    .map_err(SwapError::Install)?;
                return Ok(resident.info);
            }
        }
    }

    let owned_dir = dir.to_path_buf();
    let (device, dtype) = (state.device, state.dtype);
    let budget = state.cache_budget;
    let (loaded, info, template) = tokio::task::spawn_blocking(move || {
        // Loading must not start a second OpenMP team beside the engine's: that makes every
        // decoding step pay thread wake-ups (see `torch_threads`).
        synopsis_model::torch_threads::run_serially_on_this_thread();
        // Files serving does not need (the optimizer state, never downloaded) may be absent;
        // every file present is verified against the manifest.
        let loaded = checkpoint::load_model_dir(&owned_dir, device, dtype)?;
        budget.check(loaded.model.config(), device, dtype)?;
        let template =
            Conditioning::from_metadata(&loaded.metadata).map_err(SwapError::Template)?;
        let info = checkpoint_info(&owned_dir, &loaded, template.as_ref())?;
        Ok::<_, SwapError>((loaded, info, template))
    })
    .await
    .map_err(|e| SwapError::Task(e.to_string()))??;

    let id = info.checkpoint_id.clone();
    // The template must be known before the model can receive requests.
    state.set_template(&id, template);
    let resident = ResidentModel {
        checkpoint_id: id.clone(),
        loaded,
        source: source.to_string(),
        info: info.clone(),
    };
    if let Err(reason) = state.engine.install(resident, true).await {
        if state.resident(&id).is_none() {
            state.forget_template(&id);
        }
        return Err(SwapError::Install(reason));
    }
    Ok(info)
}

/// Makes a resident checkpoint live again (pin or roll back).
pub async fn make_live(
    state: &Arc<State>,
    checkpoint_id: &str,
) -> Result<pb::CheckpointInfo, String> {
    let _one_swap = state.swap_lock.lock().await;
    let result = state.engine.set_live(checkpoint_id).await;
    state.refresh_health().await;
    result?;
    state.metrics.set_live(checkpoint_id);
    info!(checkpoint_id, "resident checkpoint made live");
    state
        .resident(checkpoint_id)
        .map(|m| m.info)
        .ok_or_else(|| format!("checkpoint {checkpoint_id} left memory while being made live"))
}

/// Refuses a checkpoint that never reached the loader (download failed).
pub fn refuse(state: &State, checkpoint_id: &str, reason: &str) {
    state.metrics.swap_failures.inc();
    state.metrics.refused_load("download");
    state.refuse(checkpoint_id, reason);
    warn!(
        checkpoint_id,
        reason, "checkpoint refused; the live model keeps serving"
    );
}

fn peek_manifest(dir: &Path) -> Option<Manifest> {
    let bytes = std::fs::read(dir.join(MANIFEST)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Describes a loaded checkpoint. A plain Hugging Face directory has no manifest: its id is
/// the directory name plus a digest of its files, so two different models never share an id.
fn checkpoint_info(
    dir: &Path,
    loaded: &LoadedModel,
    template: Option<&Conditioning>,
) -> Result<pb::CheckpointInfo, SwapError> {
    let size_bytes: u64 = loaded.files.values().map(|f| f.size).sum();
    let parameters = loaded.model.config().num_parameters().max(0) as u64;
    let condition_columns = template.map(|t| t.columns.clone()).unwrap_or_default();
    let info = match &loaded.manifest {
        Some(m) => pb::CheckpointInfo {
            checkpoint_id: m.checkpoint_id.clone(),
            run_id: m.run_id.clone(),
            epoch: m.epoch,
            step: m.step,
            val_loss: m.val_loss.unwrap_or(f64::NAN),
            sha256: checkpoint::sha256_file(&dir.join(MANIFEST))?,
            // As the trainer counts it: every file the manifest lists (the optimizer state
            // too, even when it was not downloaded) plus manifest.json itself.
            size_bytes: m.total_bytes()
                + std::fs::metadata(dir.join(MANIFEST))
                    .map(|md| md.len())
                    .unwrap_or(0),
            created: m.created,
            reason: m.reason.clone(),
            condition_columns,
            parameters,
        },
        None => {
            let mut digest = Sha256::new();
            for (name, entry) in &loaded.files {
                digest.update(format!("{name} {} {}\n", entry.sha256, entry.size));
            }
            let sha256 = hex::encode(digest.finalize());
            let name = dir_name(dir);
            pb::CheckpointInfo {
                checkpoint_id: format!("{name}@{}", &sha256[..12]),
                sha256,
                size_bytes,
                created: modified_secs(&dir.join("model.safetensors")),
                reason: "directory".into(),
                val_loss: f64::NAN,
                condition_columns,
                parameters,
                ..Default::default()
            }
        }
    };
    Ok(info)
}

fn dir_name(dir: &Path) -> String {
    let absolute: PathBuf = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    absolute
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "model".into())
}

fn modified_secs(path: &Path) -> i64 {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
