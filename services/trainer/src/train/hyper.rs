//! Training hyper-parameters: the request's values, each zero replaced by the default (or,
//! when resuming, by the original run's value), then range-checked so a bad value is refused
//! with INVALID_ARGUMENT naming its field.

use serde::{Deserialize, Serialize};
use synopsis_proto::v1::HyperParams;

use crate::data;
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

pub fn resolve_seq_len(requested: u32, n_positions: i64) -> Result<u32> {
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
}
