//! From a `TrainRequest` to everything a run needs, with each default resolved and each
//! field checked before anything starts: a request that cannot work is refused with
//! INVALID_ARGUMENT naming the field, instead of becoming a run that fails later.
//!
//! Defaults (a zero field in the request means "default"):
//! - epochs 6, warm-up 10 steps, batch 8, grad_accum 1, seed 42, eval_fraction 0.05,
//!   weight_decay 0.01, grad_clip 1.0, dropout 0.1, keep_last 3, sample_tokens 60,
//!   max_chars / min_chars from the data pipeline, seq_len = min(256, n_positions).
//! - learning rate 5e-4 from scratch; 5e-5 when fine-tuning a base model (the usual range for
//!   fine-tuning GPT-2 is 2e-5…5e-5: a pretrained model forgets quickly at higher rates).
//! - tokenizer: the named one, else the base model's, else a byte-level BPE trained on the
//!   training documents with 8,192 tokens (ModelSpec.vocab_size overrides). A small corpus
//!   does not fill GPT-2's 50,257 tokens, and a smaller embedding trains faster.
//! - negative grad_clip, weight_decay or dropout disable them.
//!
//! Resuming (`resume_from`): the model, tokenizer, optimizer state and progress come from the
//! checkpoint, and every field the request leaves unset takes the original run's value. Setting
//! `base_model`, `tokenizer` or `model` with `resume_from` is refused (the checkpoint fixes them).

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use synopsis_model::checkpoint::{CONFIG_FILE, WEIGHTS_FILE};
use synopsis_model::{checkpoint, Gpt2, Gpt2Config, Tokenizer, WeightDtype};
use synopsis_proto::v1::{train_request, HyperParams, TrainRequest};
use tch::Device;

use super::optimizer::{AdamW, OPTIMIZER_FILE};
use super::Progress;
use crate::checkpoints::Catalog;
use crate::data::{self, ConditioningTemplate, DataOptions, DatasetStore};
use crate::error::{Result, TrainerError};

pub const DEFAULT_EPOCHS: u32 = 6;
pub const DEFAULT_BATCH_SIZE: u32 = 8;
pub const DEFAULT_LR_SCRATCH: f64 = 5e-4;
pub const DEFAULT_LR_FINETUNE: f64 = 5e-5;
pub const DEFAULT_WARMUP_STEPS: u32 = 10;
pub const DEFAULT_GRAD_ACCUM: u32 = 1;
pub const DEFAULT_SEED: u64 = 42;
pub const DEFAULT_MAX_SEQ_LEN: u32 = 256;
pub const DEFAULT_WEIGHT_DECAY: f64 = 0.01;
pub const DEFAULT_GRAD_CLIP: f64 = 1.0;
pub const DEFAULT_DROPOUT: f64 = 0.1;
pub const DEFAULT_KEEP_LAST: u32 = 3;
pub const DEFAULT_SAMPLE_TOKENS: u32 = 60;
pub const DEFAULT_BPE_VOCAB: u32 = 8192;
pub const DEFAULT_PRESET: &str = "tiny";
/// The original project's sample openings.
pub const DEFAULT_PROMPTS: [&str; 3] = [
    "In the year 2199,",
    "A young man, who has lost his mother",
    "The story follows a girl named",
];

/// Hyper-parameters with every default filled in (the `hyper` of the resolved config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hyper {
    pub epochs: u32,
    /// 0 = no limit.
    pub max_steps: u64,
    pub batch_size: u32,
    pub learning_rate: f64,
    pub warmup_steps: u32,
    pub max_chars: u32,
    pub min_chars: u32,
    pub grad_accum: u32,
    pub seed: u64,
    pub eval_fraction: f64,
    pub seq_len: u32,
    pub weight_decay: f64,
    /// 0 = no clipping.
    pub grad_clip: f64,
    pub dropout: f64,
    pub keep_last: u32,
    pub sample_tokens: u32,
}

/// Where the CSV comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSource {
    DatasetId(String),
    DataPath(String),
}

/// The request with every default resolved: echoed in `started`, stored in `run.json` and in
/// every checkpoint's manifest (which is what `resume_from` reads back).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResolvedConfig {
    pub run_name: String,
    pub data: DataSource,
    pub text_column: String,
    pub condition_columns: Vec<String>,
    pub base_model: Option<String>,
    /// Where the tokenizer came from, in words.
    pub tokenizer: String,
    pub model: Gpt2Config,
    pub hyper: Hyper,
    pub resume_from: Option<String>,
    pub sample_prompts: Vec<String>,
    pub device: String,
    /// "fp16 autocast + loss scaling" on CUDA, "off" (f32) on CPU.
    pub mixed_precision: String,
    /// Parameters that get weight decay (2-D weights except embeddings).
    pub decayed_parameters: usize,
}

/// Everything a run needs, ready on the device.
pub struct Plan {
    pub config: ResolvedConfig,
    pub model: Gpt2,
    pub tokenizer: Tokenizer,
    pub optimizer: AdamW,
    /// Where a resumed run starts (default for a new run).
    pub progress: Progress,
    /// Token ids of each document, `<|endoftext|>` appended.
    pub train_docs: Vec<Vec<u32>>,
    pub eval_docs: Vec<Vec<u32>>,
    pub stats: synopsis_proto::v1::DatasetStats,
    pub template: Option<ConditioningTemplate>,
    pub device: Device,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("config", &self.config)
            .finish()
    }
}

/// What of the trainer a plan is resolved against.
#[derive(Debug, Clone)]
pub struct Env {
    pub datasets: DatasetStore,
    pub data_root: Option<PathBuf>,
    pub models_root: Option<PathBuf>,
    pub device: Device,
}

/// Resolves and loads everything (blocking: reads the CSV, may train a tokenizer, loads
/// weights). `catalog` resolves `resume_from`.
pub fn prepare(req: &TrainRequest, env: &Env, catalog: &Catalog) -> Result<Plan> {
    let resume = if req.resume_from.is_empty() {
        None
    } else {
        reject_with_resume(req)?;
        Some(load_resume(req, catalog)?)
    };
    let original = resume.as_ref().map(|r| &r.config);
    let base_model = if req.base_model.is_empty() {
        None
    } else {
        Some(req.base_model.clone())
    };
    let hyper = resolve_hyper(
        req.hyper.as_ref(),
        original.map(|c| &c.hyper),
        base_model.is_some(),
    )?;

    // Data.
    let data_source = match (&req.data, original) {
        (Some(train_request::Data::DatasetId(id)), _) => DataSource::DatasetId(id.clone()),
        (Some(train_request::Data::DataPath(p)), _) => DataSource::DataPath(p.clone()),
        (None, Some(c)) => c.data.clone(),
        (None, None) => {
            return Err(TrainerError::invalid(
                "data",
                "set dataset_id (from UploadDataset) or data_path",
            ))
        }
    };
    let csv_path = resolve_data(&data_source, env)?;
    let text_column = match (req.text_column.trim(), original) {
        ("", Some(c)) => Some(c.text_column.clone()),
        ("", None) => None,
        (name, _) => Some(name.to_string()),
    };
    let condition_columns = match (req.condition_columns.is_empty(), original) {
        (true, Some(c)) => c.condition_columns.clone(),
        _ => req.condition_columns.clone(),
    };
    let data_options = DataOptions {
        text_column,
        condition_columns: condition_columns.clone(),
        cleaning: data::CleaningConfig {
            min_chars: hyper.min_chars as usize,
            max_chars: hyper.max_chars as usize,
            ..Default::default()
        },
        eval_fraction: hyper.eval_fraction,
        seed: hyper.seed,
    };
    let dataset =
        data::load_documents(&csv_path, &data_options).map_err(|source| TrainerError::Data {
            field: "data",
            source,
        })?;
    let train_texts: Vec<&str> = dataset
        .train
        .iter()
        .map(|&i| dataset.documents[i].as_str())
        .collect();

    // Tokenizer and model.
    let (tokenizer, tokenizer_desc, mut model_config, weights) = match &resume {
        Some(r) => {
            let tok = Tokenizer::from_dir(&r.dir).map_err(bad("resume_from"))?;
            let config =
                Gpt2Config::from_file(&r.dir.join(CONFIG_FILE)).map_err(bad("resume_from"))?;
            let desc = format!("checkpoint {}", r.checkpoint_id);
            (tok, desc, config, Some(r.dir.join(WEIGHTS_FILE)))
        }
        None => match &base_model {
            Some(name) => {
                if req.model.as_ref().is_some_and(model_spec_is_set) {
                    return Err(TrainerError::invalid(
                        "model",
                        "a base model fixes the model's shape; leave model unset to fine-tune",
                    ));
                }
                let dir = resolve_model_dir(env, "base_model", name)?;
                if dir.join(checkpoint::MANIFEST).is_file() {
                    checkpoint::verify_checkpoint(&dir).map_err(bad("base_model"))?;
                }
                let config =
                    Gpt2Config::from_file(&dir.join(CONFIG_FILE)).map_err(bad("base_model"))?;
                let (tok, desc) = if req.tokenizer.is_empty() {
                    let tok = Tokenizer::from_dir(&dir).map_err(bad("base_model"))?;
                    (tok, format!("base model {name}"))
                } else {
                    named_tokenizer(env, &req.tokenizer)?
                };
                (tok, desc, config, Some(dir.join(WEIGHTS_FILE)))
            }
            None => {
                let spec = req.model.clone().unwrap_or_default();
                let (tok, desc) = if req.tokenizer.is_empty() {
                    let vocab = if spec.vocab_size > 0 {
                        spec.vocab_size
                    } else {
                        DEFAULT_BPE_VOCAB
                    };
                    let tok = Tokenizer::train_bpe(train_texts.iter().copied(), vocab as usize)
                        .map_err(bad("model.vocab_size"))?;
                    let desc = format!(
                        "byte-level BPE trained on the training documents ({} tokens)",
                        tok.vocab_size()
                    );
                    (tok, desc)
                } else {
                    named_tokenizer(env, &req.tokenizer)?
                };
                let config = scratch_config(&spec, &tok)?;
                (tok, desc, config, None)
            }
        },
    };
    if tokenizer.vocab_size() as i64 > model_config.vocab_size {
        return Err(TrainerError::invalid(
            "tokenizer",
            format!(
                "the tokenizer has {} tokens but the model only {} embeddings",
                tokenizer.vocab_size(),
                model_config.vocab_size
            ),
        ));
    }
    if hyper.dropout >= 0.0 {
        model_config.resid_pdrop = hyper.dropout;
        model_config.embd_pdrop = hyper.dropout;
        model_config.attn_pdrop = hyper.dropout;
    }
    let mut hyper = hyper;
    hyper.seq_len = resolve_seq_len(hyper.seq_len, model_config.n_positions)?;

    // Tokens.
    let encode = |indices: &[usize]| -> Result<Vec<Vec<u32>>> {
        indices
            .iter()
            .map(|&i| {
                let mut ids = tokenizer
                    .encode(&dataset.documents[i])
                    .map_err(TrainerError::Model)?;
                ids.push(tokenizer.eos_id());
                Ok(ids)
            })
            .collect()
    };
    let train_docs = encode(&dataset.train)?;
    let eval_docs = encode(&dataset.eval)?;
    let train_tokens = super::batches::token_count(&train_docs);
    if train_tokens < hyper.seq_len as usize + 1 {
        return Err(TrainerError::invalid(
            "data",
            format!(
                "the training documents hold {train_tokens} tokens, fewer than one sequence of \
                 {} + 1; add data or lower hyper.seq_len",
                hyper.seq_len
            ),
        ));
    }

    // Model and optimizer on the device.
    tch::manual_seed(hyper.seed as i64);
    let model = match &weights {
        Some(path) => Gpt2::load(&model_config, path, env.device, WeightDtype::F32).map_err(
            bad(if resume.is_some() {
                "resume_from"
            } else {
                "base_model"
            }),
        )?,
        None => Gpt2::new(&model_config, env.device),
    };
    let weight_decay = hyper.weight_decay.max(0.0);
    let mut optimizer = AdamW::new(model.var_store(), weight_decay)?;
    let progress = match &resume {
        Some(r) => {
            let json = optimizer
                .load(&r.dir.join(OPTIMIZER_FILE))
                .map_err(bad("resume_from"))?;
            let progress: Progress = serde_json::from_str(&json).map_err(|e| {
                TrainerError::invalid("resume_from", format!("unreadable training progress: {e}"))
            })?;
            if progress.train_tokens != 0 && progress.train_tokens != train_tokens as u64 {
                tracing::warn!(
                    before = progress.train_tokens,
                    now = train_tokens,
                    "resuming on data that differs from the original run's"
                );
            }
            progress
        }
        None => Progress::default(),
    };
    let progress = Progress {
        train_tokens: train_tokens as u64,
        ..progress
    };

    let eval_tokens = super::batches::token_count(&eval_docs);
    let stats = synopsis_proto::v1::DatasetStats {
        rows_read: dataset.stats.rows_read,
        rows_kept: dataset.stats.rows_kept,
        dropped: dataset.stats.dropped.clone().into_iter().collect(),
        train_documents: train_docs.len() as u64,
        eval_documents: eval_docs.len() as u64,
        train_tokens: train_tokens as u64,
        eval_tokens: eval_tokens as u64,
        text_column: dataset.text_column.clone(),
        modified: dataset.stats.modified.clone().into_iter().collect(),
    };
    let sample_prompts = if !req.sample_prompts.is_empty() {
        req.sample_prompts.clone()
    } else if let Some(c) = original {
        c.sample_prompts.clone()
    } else {
        DEFAULT_PROMPTS.iter().map(|p| p.to_string()).collect()
    };
    let config = ResolvedConfig {
        run_name: req.run_name.clone(),
        data: data_source,
        text_column: dataset.text_column.clone(),
        condition_columns: dataset
            .template
            .as_ref()
            .map(|t| t.columns.clone())
            .unwrap_or_default(),
        base_model: original.map_or(base_model, |c| c.base_model.clone()),
        tokenizer: tokenizer_desc,
        model: model_config,
        hyper,
        resume_from: resume.as_ref().map(|r| r.checkpoint_id.clone()),
        sample_prompts,
        device: synopsis_model::device_name(env.device),
        mixed_precision: if env.device.is_cuda() {
            "fp16 autocast + dynamic loss scaling".into()
        } else {
            "off (f32)".into()
        },
        decayed_parameters: optimizer.decayed().len(),
    };
    Ok(Plan {
        config,
        model,
        tokenizer,
        optimizer,
        progress,
        train_docs,
        eval_docs,
        stats,
        template: dataset.template,
        device: env.device,
    })
}

struct Resume {
    checkpoint_id: String,
    dir: PathBuf,
    config: ResolvedConfig,
}

fn load_resume(req: &TrainRequest, catalog: &Catalog) -> Result<Resume> {
    let entry = catalog.get("resume_from", &req.resume_from)?;
    let config = entry
        .manifest
        .metadata
        .get("config")
        .cloned()
        .and_then(|v| serde_json::from_value::<ResolvedConfig>(v).ok())
        .ok_or_else(|| {
            TrainerError::invalid(
                "resume_from",
                "the checkpoint carries no training config (not written by this trainer)",
            )
        })?;
    if !entry.dir.join(OPTIMIZER_FILE).is_file() {
        return Err(TrainerError::invalid(
            "resume_from",
            "the checkpoint has no optimizer state to resume from",
        ));
    }
    Ok(Resume {
        checkpoint_id: entry.info.checkpoint_id,
        dir: entry.dir,
        config,
    })
}

fn reject_with_resume(req: &TrainRequest) -> Result<()> {
    let field = if !req.base_model.is_empty() {
        "base_model"
    } else if !req.tokenizer.is_empty() {
        "tokenizer"
    } else if req.model.as_ref().is_some_and(model_spec_is_set) {
        "model"
    } else {
        return Ok(());
    };
    Err(TrainerError::invalid(
        field,
        "cannot be set with resume_from: the checkpoint fixes the model and tokenizer",
    ))
}

fn model_spec_is_set(spec: &synopsis_proto::v1::ModelSpec) -> bool {
    !spec.preset.is_empty()
        || spec.n_layer > 0
        || spec.n_embd > 0
        || spec.n_head > 0
        || spec.n_positions > 0
        || spec.vocab_size > 0
}

fn bad(field: &'static str) -> impl Fn(synopsis_model::ModelError) -> TrainerError {
    move |source| TrainerError::BadModel { field, source }
}

/// The shape of a model trained from scratch: the preset, each set field overriding it, and
/// the tokenizer's vocabulary and end-of-text id.
fn scratch_config(spec: &synopsis_proto::v1::ModelSpec, tok: &Tokenizer) -> Result<Gpt2Config> {
    let preset = if spec.preset.is_empty() {
        DEFAULT_PRESET
    } else {
        spec.preset.as_str()
    };
    let mut config = Gpt2Config::preset(preset).map_err(bad("model.preset"))?;
    let limits: [(&'static str, u32, &mut i64, u32); 4] = [
        ("model.n_layer", spec.n_layer, &mut config.n_layer, 256),
        ("model.n_embd", spec.n_embd, &mut config.n_embd, 16_384),
        ("model.n_head", spec.n_head, &mut config.n_head, 256),
        (
            "model.n_positions",
            spec.n_positions,
            &mut config.n_positions,
            65_536,
        ),
    ];
    for (field, value, slot, max) in limits {
        if value > max {
            return Err(TrainerError::invalid(
                field,
                format!("{value} is above {max}"),
            ));
        }
        if value > 0 {
            *slot = i64::from(value);
        }
    }
    config.vocab_size = tok.vocab_size() as i64;
    config.eos_token_id = i64::from(tok.eos_id());
    config.bos_token_id = i64::from(tok.eos_id());
    config
        .validate()
        .map_err(|m| TrainerError::invalid("model", m))?;
    Ok(config)
}

fn resolve_seq_len(requested: u32, n_positions: i64) -> Result<u32> {
    let max = u32::try_from(n_positions).unwrap_or(u32::MAX);
    if requested == 0 {
        return Ok(DEFAULT_MAX_SEQ_LEN.min(max));
    }
    if requested < 2 || requested > max {
        return Err(TrainerError::invalid(
            "hyper.seq_len",
            format!("{requested} must be in 2..={max} (the model's n_positions)"),
        ));
    }
    Ok(requested)
}

/// Zero fields take `base` (the original run's, when resuming) or the defaults.
pub fn resolve_hyper(
    req: Option<&HyperParams>,
    base: Option<&Hyper>,
    fine_tune: bool,
) -> Result<Hyper> {
    let r = req.cloned().unwrap_or_default();
    let d = base.cloned().unwrap_or(Hyper {
        epochs: DEFAULT_EPOCHS,
        max_steps: 0,
        batch_size: DEFAULT_BATCH_SIZE,
        learning_rate: if fine_tune {
            DEFAULT_LR_FINETUNE
        } else {
            DEFAULT_LR_SCRATCH
        },
        warmup_steps: DEFAULT_WARMUP_STEPS,
        max_chars: data::DEFAULT_MAX_CHARS as u32,
        min_chars: data::DEFAULT_MIN_CHARS as u32,
        grad_accum: DEFAULT_GRAD_ACCUM,
        seed: DEFAULT_SEED,
        eval_fraction: data::DEFAULT_EVAL_FRACTION,
        seq_len: 0,
        weight_decay: DEFAULT_WEIGHT_DECAY,
        grad_clip: DEFAULT_GRAD_CLIP,
        dropout: DEFAULT_DROPOUT,
        keep_last: DEFAULT_KEEP_LAST,
        sample_tokens: DEFAULT_SAMPLE_TOKENS,
    });
    let pick = |v: u32, default: u32| if v == 0 { default } else { v };
    let pick_f = |v: f64, default: f64| if v == 0.0 { default } else { v };
    let hyper = Hyper {
        epochs: pick(r.epochs, d.epochs),
        max_steps: if r.max_steps == 0 {
            d.max_steps
        } else {
            r.max_steps
        },
        batch_size: pick(r.batch_size, d.batch_size),
        learning_rate: pick_f(r.learning_rate, d.learning_rate),
        warmup_steps: pick(r.warmup_steps, d.warmup_steps),
        max_chars: pick(r.max_chars, d.max_chars),
        min_chars: pick(r.min_chars, d.min_chars),
        grad_accum: pick(r.grad_accum, d.grad_accum),
        seed: if r.seed == 0 { d.seed } else { r.seed },
        eval_fraction: pick_f(r.eval_fraction, d.eval_fraction),
        seq_len: pick(r.seq_len, d.seq_len),
        weight_decay: negative_disables(r.weight_decay, d.weight_decay),
        grad_clip: negative_disables(r.grad_clip, d.grad_clip),
        dropout: negative_disables(r.dropout, d.dropout),
        keep_last: pick(r.keep_last, d.keep_last),
        sample_tokens: pick(r.sample_tokens, d.sample_tokens),
    };
    check_hyper(&hyper)?;
    Ok(hyper)
}

/// 0 keeps `default`; a negative value turns the feature off (0).
fn negative_disables(value: f64, default: f64) -> f64 {
    if value == 0.0 {
        default
    } else if value < 0.0 {
        0.0
    } else {
        value
    }
}

fn check_hyper(h: &Hyper) -> Result<()> {
    let checks: [(&'static str, bool, &str); 9] = [
        ("hyper.epochs", h.epochs <= 100_000, "at most 100000"),
        ("hyper.batch_size", h.batch_size <= 65_536, "at most 65536"),
        (
            "hyper.learning_rate",
            h.learning_rate.is_finite() && h.learning_rate > 0.0 && h.learning_rate <= 1.0,
            "must be in (0, 1]",
        ),
        ("hyper.grad_accum", h.grad_accum <= 4_096, "at most 4096"),
        (
            "hyper.eval_fraction",
            h.eval_fraction.is_finite() && (0.0..0.9).contains(&h.eval_fraction),
            "must be in [0, 0.9)",
        ),
        (
            "hyper.weight_decay",
            h.weight_decay.is_finite() && h.weight_decay <= 1.0,
            "must be at most 1",
        ),
        ("hyper.grad_clip", h.grad_clip.is_finite(), "must be finite"),
        (
            "hyper.dropout",
            h.dropout.is_finite() && h.dropout < 1.0,
            "must be below 1",
        ),
        (
            "hyper.sample_tokens",
            h.sample_tokens <= 4_096,
            "at most 4096",
        ),
    ];
    for (field, ok, message) in checks {
        if !ok {
            return Err(TrainerError::invalid(field, message));
        }
    }
    Ok(())
}

fn resolve_data(source: &DataSource, env: &Env) -> Result<PathBuf> {
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

fn named_tokenizer(env: &Env, name: &str) -> Result<(Tokenizer, String)> {
    let dir = resolve_model_dir(env, "tokenizer", name)?;
    let tok = Tokenizer::from_dir(&dir).map_err(bad("tokenizer"))?;
    Ok((tok, format!("models root {name}")))
}

/// A directory named by a request under `--models-root`: relative, no `..`, and still inside
/// the root once symlinks are resolved.
fn resolve_model_dir(env: &Env, field: &'static str, name: &str) -> Result<PathBuf> {
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
            format!("{name:?} must be a relative path without '..'"),
        ));
    }
    let root = root.canonicalize().map_err(|e| TrainerError::io(root, e))?;
    let dir = root
        .join(name)
        .canonicalize()
        .map_err(|_| TrainerError::invalid(field, format!("{name:?} does not exist")))?;
    if !dir.starts_with(&root) || !dir.is_dir() {
        return Err(TrainerError::invalid(
            field,
            format!("{name:?} is not a directory under the models root"),
        ));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_fields_take_defaults_and_set_ones_win() {
        let h = resolve_hyper(None, None, false).unwrap();
        assert_eq!(h.epochs, 6);
        assert_eq!(h.warmup_steps, 10);
        assert_eq!(h.learning_rate, DEFAULT_LR_SCRATCH);
        assert_eq!(h.batch_size, 8);
        assert_eq!(h.keep_last, 3);
        let ft = resolve_hyper(None, None, true).unwrap();
        assert_eq!(ft.learning_rate, DEFAULT_LR_FINETUNE);
        let req = HyperParams {
            epochs: 2,
            grad_clip: -1.0,
            dropout: -1.0,
            ..Default::default()
        };
        let h2 = resolve_hyper(Some(&req), Some(&h), false).unwrap();
        assert_eq!(h2.epochs, 2);
        assert_eq!(h2.grad_clip, 0.0);
        assert_eq!(h2.dropout, 0.0);
        assert_eq!(h2.seed, h.seed);
    }

    #[test]
    fn out_of_range_hyper_parameters_name_their_field() {
        let req = HyperParams {
            learning_rate: f64::NAN,
            ..Default::default()
        };
        let err = resolve_hyper(Some(&req), None, false).unwrap_err();
        assert!(err.to_string().contains("hyper.learning_rate"), "{err}");
        let req = HyperParams {
            eval_fraction: 0.95,
            ..Default::default()
        };
        assert!(resolve_hyper(Some(&req), None, false).is_err());
    }

    #[test]
    fn seq_len_defaults_to_the_context_capped_at_256() {
        assert_eq!(resolve_seq_len(0, 1024).unwrap(), 256);
        assert_eq!(resolve_seq_len(0, 64).unwrap(), 64);
        assert!(resolve_seq_len(65, 64).is_err());
        assert_eq!(resolve_seq_len(32, 64).unwrap(), 32);
    }

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
