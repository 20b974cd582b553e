//! The checks of a Train request that need no file and no device, run before the device is
//! reserved, so an invalid request is INVALID_ARGUMENT even while another run holds it.

use synopsis_proto::v1::TrainRequest;

use super::hyper::{resolve_hyper, resolve_seq_len};
use super::plan::{reject_with_resume, scratch_shape, Env, DEFAULT_BPE_VOCAB, MAX_BPE_VOCAB};
use crate::error::{Result, TrainerError};

/// Longest `run_name`, in characters: it is shown in one cell of `synopsis runs`.
pub const MAX_RUN_NAME_CHARS: usize = 100;

fn check_run_name(name: &str) -> Result<()> {
    let chars = name.chars().count();
    if chars > MAX_RUN_NAME_CHARS {
        return Err(TrainerError::invalid(
            "run_name",
            format!("is {chars} characters, the limit is {MAX_RUN_NAME_CHARS}"),
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(TrainerError::invalid(
            "run_name",
            format!(
                "holds the control character {}; use printable characters",
                c.escape_default()
            ),
        ));
    }
    Ok(())
}

/// The checks of a request that need no file and no device, done before the device is
/// reserved: an invalid request is INVALID_ARGUMENT whether or not a run is going on (a busy
/// answer, RESOURCE_EXHAUSTED, is one clients retry). Includes the memory estimate of a
/// model trained from scratch, so an oversized one is refused before its data is read.
pub fn precheck(req: &TrainRequest, env: &Env) -> Result<()> {
    check_run_name(&req.run_name)?;
    if req.resume_from.is_empty() {
        if req.data.is_none() {
            return Err(TrainerError::invalid(
                "data",
                "set dataset_id (from UploadDataset) or data_path",
            ));
        }
    } else {
        reject_with_resume(req)?;
    }
    let hyper = resolve_hyper(req.hyper.as_ref(), None, !req.base_model.is_empty())?;
    let scratch = req.resume_from.is_empty() && req.base_model.is_empty();
    if scratch && req.tokenizer.is_empty() {
        let spec = req.model.clone().unwrap_or_default();
        let vocab = if spec.vocab_size > 0 {
            spec.vocab_size
        } else {
            DEFAULT_BPE_VOCAB
        };
        if vocab > MAX_BPE_VOCAB {
            return Err(TrainerError::invalid(
                "model.vocab_size",
                format!("{vocab} is above the limit of {MAX_BPE_VOCAB}"),
            ));
        }
        let config = scratch_shape(&spec, i64::from(vocab), 0)?;
        let seq_len = resolve_seq_len(hyper.seq_len, config.n_positions)?;
        super::memory::check(
            &config,
            hyper.batch_size,
            seq_len,
            super::memory::limit(env.device, env.max_run_memory),
        )?;
    }
    Ok(())
}
