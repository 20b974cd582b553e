//! The types the rest of the generator uses to talk to the engine thread: configuration,
//! metrics, resident models, requests, the events a request streams back and why a request
//! can be refused.

use std::time::Instant;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};
use synopsis_model::checkpoint::LoadedModel;
use synopsis_model::sampling::SamplingParams;
use synopsis_proto::v1::{CheckpointInfo, FinishReason};

/// Prometheus handles the engine updates; created once by the server and registered there.
#[derive(Clone)]
pub struct EngineMetrics {
    /// Requests accepted but not yet decoding (waiting for tokenization or a batch slot).
    pub queue_depth: IntGauge,
    /// Sequences decoding right now, all resident models together.
    pub batch_size: IntGauge,
    pub tokens_generated: IntCounter,
    /// Sequences dropped because their client went away.
    pub cancelled: IntCounter,
    /// Seconds from submission to a sequence's first token.
    pub time_to_first_token: Histogram,
    /// Seconds of one batched decoding step (one token for every active sequence of a model).
    pub decode_step_seconds: Histogram,
}

impl EngineMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let queue_depth = IntGauge::new(
            "synopsis_generator_queue_depth",
            "Requests accepted but not yet decoding",
        )?;
        let batch_size = IntGauge::new(
            "synopsis_generator_batch_size",
            "Sequences decoding in the current step",
        )?;
        let tokens_generated = IntCounter::new(
            "synopsis_generator_tokens_generated_total",
            "Tokens generated, all sequences together",
        )?;
        let cancelled = IntCounter::new(
            "synopsis_generator_cancelled_total",
            "Sequences dropped because their client went away",
        )?;
        let time_to_first_token = Histogram::with_opts(
            HistogramOpts::new(
                "synopsis_generator_time_to_first_token_seconds",
                "Seconds from submission to the first generated token",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )?;
        let decode_step_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "synopsis_generator_decode_step_seconds",
                "Seconds of one batched decoding step",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
        )?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(tokens_generated.clone()))?;
        registry.register(Box::new(cancelled.clone()))?;
        registry.register(Box::new(time_to_first_token.clone()))?;
        registry.register(Box::new(decode_step_seconds.clone()))?;
        Ok(Self {
            queue_depth,
            batch_size,
            tokens_generated,
            cancelled,
            time_to_first_token,
            decode_step_seconds,
        })
    }
}

/// How one engine thread runs.
#[derive(Clone)]
pub struct EngineConfig {
    pub device: tch::Device,
    /// Most sequences decoding at once (all resident models together).
    pub max_batch: usize,
    /// Most requests accepted but not yet decoding; beyond it `submit` answers `QueueFull`.
    pub max_queue: usize,
    /// Most models kept resident; the oldest idle non-live one is evicted beyond it.
    pub max_resident: usize,
    /// Choose next tokens with tensor operations where the logits are, bringing only ids and
    /// logprobs to the host (`synopsis_model::batch_sampling`), instead of copying every row's
    /// logits to the host and sampling there. Same tokens for the same seeds either way.
    pub sampling_on_device: bool,
    pub metrics: EngineMetrics,
}

impl EngineConfig {
    pub const DEFAULT_MAX_BATCH: usize = 32;
    pub const DEFAULT_MAX_QUEUE: usize = 256;
    pub const DEFAULT_MAX_RESIDENT: usize = 3;

    pub fn new(device: tch::Device, metrics: EngineMetrics) -> Self {
        Self {
            device,
            max_batch: Self::DEFAULT_MAX_BATCH,
            max_queue: Self::DEFAULT_MAX_QUEUE,
            max_resident: Self::DEFAULT_MAX_RESIDENT,
            sampling_on_device: device.is_cuda(),
            metrics,
        }
    }
}

/// A loaded checkpoint handed to the engine, which owns it from then on.
pub struct ResidentModel {
    pub checkpoint_id: String,
    pub loaded: LoadedModel,
    /// Where it came from (a path, "trainer", "watch-dir"), reported by ModelInfo.
    pub source: String,
    pub info: CheckpointInfo,
}

/// What the server reports about a resident model, readable without asking the engine thread.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSummary {
    pub info: CheckpointInfo,
    pub live: bool,
    pub source: String,
    pub dtype: String,
    pub n_positions: u32,
    pub vocab_size: u32,
    pub condition_columns: Vec<String>,
}

/// One Generate call, after the server has validated it and rendered the prompt.
pub struct EngineRequest {
    pub request_id: String,
    /// Run on this resident checkpoint instead of the live one.
    pub checkpoint_id: Option<String>,
    /// The exact model input (already inside the conditioning template).
    pub prompt: String,
    /// Independent sequences (0 is taken as 1); sequence `i` samples with seed `seed + i`.
    pub n: u32,
    /// Tokens per sequence; 0 finishes every sequence at once with reason LENGTH.
    pub max_new_tokens: u32,
    pub sampling: SamplingParams,
    pub seed: u64,
    pub stop: Vec<String>,
    pub deadline: Option<Instant>,
    /// One channel for all `n` sequences, bounded by the server. The engine never blocks on it:
    /// events that do not fit wait in the engine, in order, and are retried every step.
    pub events: tokio::sync::mpsc::Sender<SeqEvent>,
}

/// The engine accepted a request: it runs on this checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admitted {
    pub checkpoint_id: String,
    pub prompt_tokens: u32,
}

/// What a request streams back, per sequence `index`.
#[derive(Clone, Debug, PartialEq)]
pub enum SeqEvent {
    /// One generated token. `text` is valid UTF-8, possibly empty while a split character or a
    /// possible stop-string prefix is held back. The end-of-text token is sent too (its text is
    /// whatever was still held back), right before `Finished` with reason EOS.
    Token {
        index: u32,
        id: u32,
        text: String,
        logprob: f32,
    },
    /// The sequence ended. `text` is the concatenation of its tokens' texts.
    /// `tokens_per_second` is `generated_tokens` over the seconds since submission.
    Finished {
        index: u32,
        reason: FinishReason,
        text: String,
        generated_tokens: u32,
        time_to_first_token_ms: f64,
        tokens_per_second: f64,
    },
    /// The request's deadline passed: every unfinished sequence of it stopped. Sent once.
    DeadlineExceeded,
}

/// Why a request was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the generation queue is full")]
    QueueFull,
    #[error("no model is loaded yet")]
    NoModel,
    #[error("checkpoint {0} is not resident")]
    UnknownCheckpoint(String),
    /// `tokens` prompt tokens, but only `max` fit beside max_new_tokens in the model's
    /// positions (`max` is 0 when max_new_tokens alone is too many).
    #[error("the prompt has {tokens} tokens; with this max_new_tokens at most {max} fit")]
    PromptTooLong { tokens: usize, max: usize },
    #[error("the generator is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}
