//! The training loop of one run, on the thread that owns its tensors: packed batches, AdamW
//! with warm-up and linear decay, clipping, accumulation, autocast on CUDA; validation, samples
//! and a checkpoint every epoch, and inside epochs every N steps or seconds when configured;
//! a checkpoint and a clean stop when asked.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use synopsis_model::SamplingParams;
use synopsis_proto::v1::{train_event, EpochEvent, RunStarted, SampleEvent, StepEvent};
use tch::Tensor;

use super::batches::{windows_per_epoch, Batch, Packed};
use super::schedule::{LinearSchedule, LossScaler};
use super::snapshot::{self, Parts};
use super::{step_seed, Plan, Progress};
use crate::checkpoints::{
    Catalog, REASON_EPOCH, REASON_FINAL, REASON_SHUTDOWN, REASON_STEP, REASON_STOP,
};
use crate::error::{Result, TrainerError};
use crate::metrics::Metrics;
use crate::runs::{Run, StopReason};

/// Step events are rate-limited to about four a second (the last step of an epoch always
/// goes out): a fast GPU would otherwise flood followers and the log.
const STEP_EVENT_INTERVAL: Duration = Duration::from_millis(250);

/// What the loop reports to, and is stopped through.
#[derive(Clone)]
pub struct RunContext {
    pub run: Arc<Run>,
    pub catalog: Arc<Catalog>,
    pub metrics: Metrics,
    pub every: CheckpointEvery,
}

/// Checkpoints inside an epoch, so a preemption whose grace period runs out (or a SIGKILL)
/// loses at most this much training. Zero turns each off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckpointEvery {
    pub steps: u64,
    pub secs: u64,
}

impl CheckpointEvery {
    /// Whether a step checkpoint is due at `step`, `since_last` after the previous checkpoint.
    pub fn due(&self, step: u64, since_last: Duration) -> bool {
        (self.steps > 0 && step.is_multiple_of(self.steps))
            || (self.secs > 0 && since_last >= Duration::from_secs(self.secs))
    }
}

/// How a run ended (errors are returned separately and become FAILED).
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub stopped: Option<StopReason>,
    pub last_checkpoint_id: Option<String>,
}

/// Trains `plan` to the end, or until the run's stop signal is raised.
pub fn run(plan: Plan, ctx: &RunContext) -> Result<Outcome> {
    let Plan {
        config,
        model,
        tokenizer,
        mut optimizer,
        mut progress,
        train_docs,
        eval_docs,
        stats,
        template,
        device,
    } = plan;
    let hyper = config.hyper.clone();
    let seq_len = hyper.seq_len as usize;
    let batch_size = hyper.batch_size as usize;
    let accum = hyper.grad_accum as u64;
    let micro_per_epoch = windows_per_epoch(&train_docs, seq_len).div_ceil(batch_size) as u64;
    let steps_per_epoch = micro_per_epoch.div_ceil(accum);
    let mut total_steps = steps_per_epoch * u64::from(hyper.epochs);
    if hyper.max_steps > 0 {
        total_steps = total_steps.min(hyper.max_steps);
    }
    let schedule = LinearSchedule {
        peak: hyper.learning_rate,
        warmup_steps: u64::from(hyper.warmup_steps),
        total_steps,
    };
    let mut scaler = progress
        .scaler
        .unwrap_or_else(|| LossScaler::new(device.is_cuda()));
    let clip = (hyper.grad_clip > 0.0).then_some(hyper.grad_clip);
    let eval_batches = Packed::new(
        &eval_docs,
        &(0..eval_docs.len()).collect::<Vec<_>>(),
        seq_len,
    )
    .all_batches(batch_size, device)?;

    let resolved_json = serde_json::to_string_pretty(&config)
        .map_err(|e| TrainerError::Internal(format!("cannot encode config: {e}")))?;
    ctx.run.emit(train_event::Event::Started(RunStarted {
        resolved_config_json: resolved_json,
        device: config.device.clone(),
        parameters: model.config().num_parameters() as u64,
        dataset: Some(stats.clone()),
        total_steps,
        start_step: progress.step,
    }));
    tracing::info!(
        total_steps,
        start_step = progress.step,
        train_tokens = stats.train_tokens,
        "training started"
    );

    let mut last_checkpoint: Option<String> = None;
    let mut meter = Meter::new();
    let save = |progress: &Progress,
                reason: &str,
                val_loss: Option<f64>,
                optimizer: &super::optimizer::AdamW,
                last: &mut Option<String>|
     -> Result<()> {
        let parts = Parts {
            model: &model,
            tokenizer: &tokenizer,
            optimizer,
            progress,
            config: &config,
            template: template.as_ref(),
            stats: &stats,
        };
        let info = snapshot::save(ctx, &parts, reason, val_loss)?;
        *last = Some(info.checkpoint_id);
        Ok(())
    };

    // When the epoch in progress began here; a run that `max_steps` ends inside an epoch
    // reports that epoch's time from it too.
    let mut started = Instant::now();
    let mut last_saved = Instant::now();
    'epochs: while progress.epoch < hyper.epochs {
        let epoch = progress.epoch;
        started = Instant::now();
        let packed = Packed::epoch(&train_docs, seq_len, hyper.seed, epoch);
        // Validation and sampling of the previous epoch are not training throughput.
        meter.restart();
        while progress.micro_in_epoch < micro_per_epoch {
            if let Some(reason) = ctx.run.stop_signal().get() {
                progress.scaler = Some(scaler);
                let why = match reason {
                    StopReason::Requested => REASON_STOP,
                    StopReason::Shutdown => REASON_SHUTDOWN,
                };
                save(&progress, why, None, &optimizer, &mut last_checkpoint)?;
                return Ok(Outcome {
                    stopped: Some(reason),
                    last_checkpoint_id: last_checkpoint,
                });
            }
            if progress.step >= total_steps {
                break 'epochs;
            }
            let first = progress.micro_in_epoch;
            let end = (first + accum).min(micro_per_epoch);
            let batches = (first..end)
                .map(|m| packed.batch(m as usize * batch_size, batch_size, device))
                .collect::<std::result::Result<Vec<Batch>, _>>()?;
            let lr = schedule.lr(progress.step);
            let (loss, grad_norm, tokens) = train_step(
                &model,
                &mut optimizer,
                &mut scaler,
                &batches,
                lr,
                clip,
                hyper.seed,
                progress.step,
            )?;
            progress.step += 1;
            progress.micro_in_epoch = end;
            progress.epoch_loss_sum += loss * tokens as f64;
            progress.epoch_tokens += tokens as u64;
            ctx.metrics.steps.inc();
            ctx.metrics.tokens.inc_by(tokens as u64);
            ctx.metrics.loss.set(loss);
            meter.tokens += tokens;
            let epoch_done = end == micro_per_epoch;
            // Not at the last step of an epoch or of the run: a checkpoint follows there anyway.
            if !epoch_done
                && progress.step < total_steps
                && ctx.every.due(progress.step, last_saved.elapsed())
            {
                progress.scaler = Some(scaler);
                save(
                    &progress,
                    REASON_STEP,
                    None,
                    &optimizer,
                    &mut last_checkpoint,
                )?;
                last_saved = Instant::now();
            }
            if meter.due() || epoch_done || progress.step == total_steps {
                let tps = meter.take();
                ctx.metrics.tokens_per_second.set(tps);
                ctx.run.emit(train_event::Event::Step(StepEvent {
                    epoch: epoch + 1,
                    step: progress.step,
                    total_steps,
                    loss,
                    lr,
                    tokens_per_second: tps,
                    grad_norm,
                }));
            }
        }
        // The epoch is complete.
        let val_loss = evaluate(&model, &eval_batches)?;
        end_of_epoch(ctx, &progress, epoch, val_loss, started.elapsed())?;
        sample(ctx, &model, &tokenizer, &config, template.as_ref(), epoch)?;
        progress.epoch += 1;
        progress.micro_in_epoch = 0;
        progress.epoch_loss_sum = 0.0;
        progress.epoch_tokens = 0;
        progress.scaler = Some(scaler);
        save(
            &progress,
            REASON_EPOCH,
            val_loss,
            &optimizer,
            &mut last_checkpoint,
        )?;
        last_saved = Instant::now();
    }

    // `max_steps` ended the run inside an epoch: report and keep that state too.
    if progress.micro_in_epoch > 0 {
        let val_loss = evaluate(&model, &eval_batches)?;
        end_of_epoch(ctx, &progress, progress.epoch, val_loss, started.elapsed())?;
        sample(
            ctx,
            &model,
            &tokenizer,
            &config,
            template.as_ref(),
            progress.epoch,
        )?;
        progress.scaler = Some(scaler);
        save(
            &progress,
            REASON_FINAL,
            val_loss,
            &optimizer,
            &mut last_checkpoint,
        )?;
    }
    Ok(Outcome {
        stopped: None,
        last_checkpoint_id: last_checkpoint,
    })
}

/// One optimizer step over `batches` (the micro-batches of an accumulation group). Returns
/// the token-weighted mean loss, the gradient norm before clipping and the tokens seen.
#[allow(clippy::too_many_arguments)]
fn train_step(
    model: &synopsis_model::Gpt2,
    optimizer: &mut super::optimizer::AdamW,
    scaler: &mut LossScaler,
    batches: &[Batch],
    lr: f64,
    clip: Option<f64>,
    seed: u64,
    step: u64,
) -> Result<(f64, f64, usize)> {
    tch::manual_seed(step_seed(seed, step));
    optimizer.zero_grad();
    let tokens: usize = batches.iter().map(|b| b.tokens).sum();
    // Summed on the device: one synchronisation per step, not one per micro-batch.
    let mut loss_sum: Option<Tensor> = None;
    for b in batches {
        let weight = b.tokens as f64 / tokens as f64;
        let cuda = b.inputs.device().is_cuda();
        let loss = tch::autocast(cuda, || model.loss(&b.inputs, &b.targets, true));
        loss.f_mul_scalar(weight * scaler.scale)?.f_backward()?;
        let weighted = loss.detach().f_mul_scalar(weight)?;
        loss_sum = Some(match loss_sum {
            Some(sum) => sum.f_add(&weighted)?,
            None => weighted,
        });
    }
    let loss = match loss_sum {
        Some(sum) => f64::try_from(&sum)?,
        None => f64::NAN,
    };
    let grad_norm = optimizer.unscale_and_clip(scaler.scale, clip)?;
    if scaler.update(grad_norm) {
        optimizer.step(lr)?;
    } else {
        tracing::warn!(
            step,
            scale = scaler.scale,
            "gradient overflow; step skipped"
        );
    }
    Ok((loss, grad_norm, tokens))
}

/// Token-weighted mean cross-entropy over the validation set (`None` without one).
fn evaluate(model: &synopsis_model::Gpt2, batches: &[Batch]) -> Result<Option<f64>> {
    if batches.is_empty() {
        return Ok(None);
    }
    let _guard = tch::no_grad_guard();
    let mut sum = 0.0;
    let mut tokens = 0usize;
    for b in batches {
        let cuda = b.inputs.device().is_cuda();
        let loss = tch::autocast(cuda, || model.loss(&b.inputs, &b.targets, false));
        sum += f64::try_from(&loss)? * b.tokens as f64;
        tokens += b.tokens;
    }
    Ok(Some(sum / tokens as f64))
}

fn end_of_epoch(
    ctx: &RunContext,
    progress: &Progress,
    epoch: u32,
    val_loss: Option<f64>,
    took: Duration,
) -> Result<()> {
    let train_loss = if progress.epoch_tokens > 0 {
        progress.epoch_loss_sum / progress.epoch_tokens as f64
    } else {
        f64::NAN
    };
    let val = val_loss.unwrap_or(f64::NAN);
    if let Some(v) = val_loss {
        ctx.metrics.val_loss.set(v);
    }
    tracing::info!(epoch = epoch + 1, train_loss, val_loss = val, "epoch done");
    ctx.run.emit(train_event::Event::Epoch(EpochEvent {
        epoch: epoch + 1,
        train_loss,
        val_loss: val,
        val_perplexity: val.exp(),
        step: progress.step,
        seconds: took.as_secs_f64(),
    }));
    Ok(())
}

/// Generates from each sample prompt (wrapped in the conditioning template when the run is
/// conditioned, so the sample looks like what the generator will serve).
fn sample(
    ctx: &RunContext,
    model: &synopsis_model::Gpt2,
    tokenizer: &synopsis_model::Tokenizer,
    config: &super::ResolvedConfig,
    template: Option<&crate::data::ConditioningTemplate>,
    epoch: u32,
) -> Result<()> {
    if config.hyper.sample_tokens == 0 {
        return Ok(());
    }
    let params = SamplingParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        repetition_penalty: 1.0,
    };
    for (i, prompt) in config.sample_prompts.iter().enumerate() {
        let input = match template {
            Some(t) => t
                .render_prompt(&BTreeMap::new(), prompt)
                .map_err(|e| TrainerError::Internal(e.to_string()))?,
            None => prompt.clone(),
        };
        let seed = config.hyper.seed ^ (u64::from(epoch) << 32) ^ i as u64;
        let text = tch::no_grad(|| {
            synopsis_model::generate::generate(
                model,
                tokenizer,
                &input,
                config.hyper.sample_tokens as usize,
                &params,
                seed,
            )
        })?;
        ctx.run.emit(train_event::Event::Sample(SampleEvent {
            epoch: epoch + 1,
            prompt: input,
            text,
        }));
    }
    Ok(())
}

/// Tokens per second between step events.
struct Meter {
    since: Instant,
    tokens: usize,
    emitted_any: bool,
}

impl Meter {
    fn new() -> Self {
        Meter {
            since: Instant::now(),
            tokens: 0,
            emitted_any: false,
        }
    }

    fn due(&self) -> bool {
        !self.emitted_any || self.since.elapsed() >= STEP_EVENT_INTERVAL
    }

    fn restart(&mut self) {
        self.since = Instant::now();
        self.tokens = 0;
    }

    /// Throughput since the last event; restarts the window.
    fn take(&mut self) -> f64 {
        let secs = self.since.elapsed().as_secs_f64().max(1e-9);
        let tps = self.tokens as f64 / secs;
        self.since = Instant::now();
        self.tokens = 0;
        self.emitted_any = true;
        tps
    }
}
