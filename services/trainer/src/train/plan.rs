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

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use synopsis_model::checkpoint::{CONFIG_FILE, WEIGHTS_FILE};
use synopsis_model::{checkpoint, Gpt2, Gpt2Config, Tokenizer, WeightDtype};
use synopsis_proto::v1::{train_request, TrainRequest};
use tch::Device;

use super::hyper::{resolve_hyper, resolve_seq_len, Hyper};
use super::optimizer::{AdamW, OPTIMIZER_FILE};
use super::sources::{named_tokenizer, resolve_data, resolve_model_dir};
use super::Progress;
use crate::checkpoints::Catalog;
use crate::data::{self, ConditioningTemplate, DataOptions, DatasetStore};
use crate::error::{Result, TrainerError};

pub const DEFAULT_BPE_VOCAB: u32 = 8192;
/// Largest vocabulary a tokenizer trained on the corpus may ask for (GPT-2 has 50,257).
pub const MAX_BPE_VOCAB: u32 = 262_144;
pub const DEFAULT_PRESET: &str = "tiny";
/// The original project's sample openings.
pub const DEFAULT_PROMPTS: [&str; 3] = [
    "In the year 2199,",
    "A young man, who has lost his mother",
    "The story follows a girl named",
];

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
    /// `--max-run-memory`: what a run's estimate is checked against instead of the host's
    /// available memory.
    pub max_run_memory: Option<u64>,
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
        None => {
            match &base_model {
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
                        // Checked before training: the BPE trainer sizes its tables by the request,
                        // so an absurd vocabulary would abort the process instead of failing.
                        if vocab > MAX_BPE_VOCAB {
                            return Err(bad("model.vocab_size")(synopsis_model::ModelError::Invalid(
                            format!("model.vocab_size is {vocab}, above the limit of {MAX_BPE_VOCAB}"),
                        )));
                        }
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
            }
        }
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

    // Model and optimizer on the device, once their estimate fits.
    super::memory::check(
        &model_config,
        hyper.batch_size,
        hyper.seq_len,
        super::memory::limit(env.device, env.max_run_memory),
    )?;
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
    // The bytes are about to be trained on: check every hash, not just the sizes.
    checkpoint::verify_checkpoint(&entry.dir).map_err(bad("resume_from"))?;
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

pub(super) fn reject_with_resume(req: &TrainRequest) -> Result<()> {
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

pub(crate) fn bad(field: &'static str) -> impl Fn(synopsis_model::ModelError) -> TrainerError {
    move |source| TrainerError::BadModel { field, source }
}

/// The shape of a model trained from scratch: the preset, each set field overriding it, and
/// the tokenizer's vocabulary and end-of-text id.
fn scratch_config(spec: &synopsis_proto::v1::ModelSpec, tok: &Tokenizer) -> Result<Gpt2Config> {
    scratch_shape(spec, tok.vocab_size() as i64, i64::from(tok.eos_id()))
}

/// The shape of [`scratch_config`] for a vocabulary of `vocab_size` ending in `eos`.
pub(super) fn scratch_shape(
    spec: &synopsis_proto::v1::ModelSpec,
    vocab_size: i64,
    eos: i64,
) -> Result<Gpt2Config> {
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
    config.vocab_size = vocab_size;
    config.eos_token_id = eos;
    config.bos_token_id = eos;
    config
        .validate()
        .map_err(|m| TrainerError::invalid("model", m))?;
    Ok(config)
}
