//! The overhead-bound training row of `bench-train`: 12 layers × 64 wide, a 1,024-token
//! vocabulary, 4 × 32 tokens a step. Its arithmetic is negligible, so a step's time is what a
//! GPU step of GPT-2 small is bound by too: kernel dispatch, the optimizer's per-tensor loops
//! and synchronisations. Ours is the trainer's step (its model, flat-buffer AdamW, clipping,
//! schedule) against PyTorch eager with `AdamW(fused=True)` and `clip_grad_norm_`
//! (`scripts/bench/train_overhead_reference.py`), same shape, same run.

use std::time::Instant;

use serde::Deserialize;
use synopsis_model::{Gpt2, Gpt2Config};
use synopsis_trainer::train::optimizer::AdamW;
use synopsis_trainer::train::schedule::LinearSchedule;
use tch::{Device, Kind, Tensor};

use crate::reference;
use crate::report::{self, num, Table};

const LAYERS: i64 = 12;
const WIDTH: i64 = 64;
const HEADS: i64 = 4;
const VOCAB: i64 = 1024;
const BATCH: i64 = 4;
const SEQ: i64 = 32;
/// Ours must take at least this many steps per second for each of PyTorch's.
const TARGET: f64 = 2.0;

/// What `train_overhead_reference.py` prints.
#[derive(Debug, Clone, Deserialize)]
struct Reference {
    steps_per_second: f64,
    loss: f64,
    aten_ops_per_step: u64,
}

/// Our steps per second over `steps` timed steps after `warmup`, and the last loss.
fn ours(warmup: u32, steps: u32) -> anyhow::Result<(f64, f64)> {
    let mut config = Gpt2Config::preset("tiny")?;
    config.n_layer = LAYERS;
    config.n_embd = WIDTH;
    config.n_head = HEADS;
    config.vocab_size = VOCAB;
    config.n_positions = SEQ;
    tch::manual_seed(0);
    let model = Gpt2::new(&config, Device::Cpu);
    let mut optimizer = AdamW::new(model.var_store(), 0.1)?;
    let schedule = LinearSchedule {
        peak: 5e-4,
        warmup_steps: 10,
        total_steps: u64::from(warmup + steps),
    };
    let ids = Tensor::f_randint(VOCAB, [BATCH, SEQ + 1], (Kind::Int64, Device::Cpu))?;
    let inputs = ids.f_narrow(1, 0, SEQ)?.f_contiguous()?;
    let targets = ids.f_narrow(1, 1, SEQ)?.f_contiguous()?;
    let mut elapsed = 0.0;
    let mut loss = f64::NAN;
    for step in 0..warmup + steps {
        let start = Instant::now();
        optimizer.zero_grad();
        let l = model.loss(&inputs, &targets, true);
        l.f_backward()?;
        optimizer.unscale_and_clip(1.0, Some(1.0))?;
        optimizer.step(schedule.lr(u64::from(step)))?;
        if step + 1 == warmup + steps {
            loss = f64::try_from(&l)?;
        }
        if step >= warmup {
            elapsed += start.elapsed().as_secs_f64();
        }
    }
    Ok((f64::from(steps) / elapsed, loss))
}

/// Measures ours before and after the reference (the machine is shared) and prints the row.
pub fn run(warmup: u32, steps: u32, threads: i32) -> anyhow::Result<()> {
    let (before, _) = ours(warmup, steps)?;
    let reference: Reference = reference::run(
        "train_overhead_reference.py",
        &[
            "--layers".into(),
            LAYERS.to_string(),
            "--width".into(),
            WIDTH.to_string(),
            "--heads".into(),
            HEADS.to_string(),
            "--vocab".into(),
            VOCAB.to_string(),
            "--batch".into(),
            BATCH.to_string(),
            "--seq".into(),
            SEQ.to_string(),
            "--steps".into(),
            steps.to_string(),
            "--warmup-steps".into(),
            warmup.to_string(),
            "--threads".into(),
            threads.to_string(),
        ],
    )?;
    let (after, loss) = ours(warmup, steps)?;
    let mean = (before + after) / 2.0;
    let mut table = Table::new(
        &format!(
            "Overhead-bound training step: {LAYERS} layers × {WIDTH} wide, vocabulary {VOCAB}, \
             {BATCH} × {SEQ} tokens a step, {steps} timed steps after {warmup}"
        ),
        &[
            "pipeline",
            "steps/s",
            "loss",
            "ATen ops a step",
            "ours ÷ this",
            "target",
        ],
    );
    table.row([
        "ours: trainer step (flat AdamW, clip, schedule), mean of before and after".to_string(),
        num(mean),
        num(loss),
        String::new(),
        "1.00×".into(),
        String::new(),
    ]);
    table.row([
        "PyTorch eager: HF model, AdamW(fused=True), clip_grad_norm_".to_string(),
        num(reference.steps_per_second),
        num(reference.loss),
        reference.aten_ops_per_step.to_string(),
        report::ratio(mean, reference.steps_per_second),
        report::verdict_at_least(mean, reference.steps_per_second, TARGET),
    ]);
    table.print();
    Ok(())
}
