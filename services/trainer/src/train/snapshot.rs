//! Writing a run's checkpoint: the model in Hugging Face GPT-2 format (so `transformers`
//! loads it), the tokenizer with the files `AutoTokenizer` reads, and the optimizer state with
//! the progress a resume needs; then cataloguing, announcing and pruning.

use synopsis_model::checkpoint::{self, Manifest, CONFIG_FILE, WEIGHTS_FILE};
use synopsis_proto::v1::{train_event, CheckpointInfo};

use super::optimizer::{AdamW, OPTIMIZER_FILE};
use super::train_loop::RunContext;
use super::{Progress, ResolvedConfig};
use crate::checkpoints::{info_of, Entry};
use crate::data::ConditioningTemplate;
use crate::error::{Result, TrainerError};
use crate::ids::checkpoint_name;

/// What a checkpoint is made of, borrowed from the loop.
pub struct Parts<'a> {
    pub model: &'a synopsis_model::Gpt2,
    pub tokenizer: &'a synopsis_model::Tokenizer,
    pub optimizer: &'a AdamW,
    pub progress: &'a Progress,
    pub config: &'a ResolvedConfig,
    pub template: Option<&'a ConditioningTemplate>,
    pub stats: &'a synopsis_proto::v1::DatasetStats,
}

/// Writes, registers and announces a checkpoint at the current progress, then applies the
/// run's retention. A checkpoint of the same step that already exists is reused.
pub fn save(
    ctx: &RunContext,
    parts: &Parts<'_>,
    reason: &str,
    val_loss: Option<f64>,
) -> Result<CheckpointInfo> {
    let run_id = ctx.run.id.as_str();
    let name = checkpoint_name(parts.progress.epoch, parts.progress.step);
    let checkpoint_id = format!("{run_id}/{name}");
    if let Ok(existing) = ctx.catalog.get("checkpoint_id", &checkpoint_id) {
        return Ok(existing.info);
    }
    let dir = ctx.catalog.dir_for(run_id, &name);
    let mut manifest = Manifest::new(
        checkpoint_id.clone(),
        run_id,
        parts.progress.epoch,
        parts.progress.step,
        reason,
    );
    manifest.val_loss = val_loss;
    let parameters = parts.model.config().num_parameters();
    manifest.metadata = serde_json::json!({
        "conditioning": parts.template,
        "parameters": parameters,
        "run_name": parts.config.run_name,
        "hyper": parts.config.hyper,
        "config": parts.config,
        "dataset": {
            "text_column": parts.stats.text_column,
            "train_documents": parts.stats.train_documents,
            "eval_documents": parts.stats.eval_documents,
            "train_tokens": parts.stats.train_tokens,
        },
        "trainer": concat!("synopsis-trainer ", env!("CARGO_PKG_VERSION")),
    });
    let progress_json = serde_json::to_string(parts.progress)
        .map_err(|e| TrainerError::Internal(format!("cannot encode progress: {e}")))?;
    let manifest = checkpoint::write_checkpoint(&dir, manifest, |tmp| {
        parts.model.save_safetensors(&tmp.join(WEIGHTS_FILE))?;
        parts.model.config().save(&tmp.join(CONFIG_FILE))?;
        parts.tokenizer.save_pretrained(tmp)?;
        parts
            .optimizer
            .save(&tmp.join(OPTIMIZER_FILE), &progress_json)
    })?;
    let info = info_of(&dir, &manifest)?;
    ctx.metrics.checkpoints.inc();
    ctx.metrics.checkpoint_bytes.inc_by(info.size_bytes);
    tracing::info!(
        checkpoint_id = %info.checkpoint_id,
        reason,
        bytes = info.size_bytes,
        "checkpoint written"
    );
    ctx.catalog.add(Entry {
        info: info.clone(),
        dir,
        manifest,
    });
    ctx.run.emit(train_event::Event::Checkpoint(info.clone()));
    ctx.catalog
        .drop_superseded_steps(run_id, &info.checkpoint_id);
    ctx.catalog
        .retain(run_id, parts.config.hyper.keep_last as usize);
    Ok(info)
}
