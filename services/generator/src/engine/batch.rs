//! The running batch of one resident model: its KV cache, one row per sequence, newcomers
//! prefilled together and merged in, one batched forward per step, and rows leaving the
//! moment they finish or their request is aborted.

use std::collections::HashMap;
use std::time::Instant;

use synopsis_model::batch_sampling::{sample_rows, RowRequest};
use synopsis_model::gpt2::Gpt2;
use synopsis_model::sampling::{Sampled, Sampler, SamplingParams};
use synopsis_model::tokenizer::Tokenizer;
use synopsis_model::KvCache;
use tch::{Device, Kind, Tensor};

use super::api::EngineMetrics;
use super::sequence::{RequestState, Sequence};
use super::stop::StopMatcher;

/// A request accepted and tokenized, waiting for room in its model's batch.
pub(crate) struct Pending {
    pub request: u64,
    pub checkpoint_id: String,
    pub prompt: Vec<u32>,
    pub n: u32,
    pub max_new_tokens: u32,
    pub sampling: SamplingParams,
    pub seed: u64,
    pub stop: Vec<String>,
}

/// What a step needs from the engine besides the model.
pub(crate) struct StepCtx<'a> {
    pub requests: &'a mut HashMap<u64, RequestState>,
    pub metrics: &'a EngineMetrics,
    /// Reused host buffer for the last-position logits of every row (host sampling).
    pub logits: &'a mut Vec<f32>,
    /// Sample where the logits are ([`EngineConfig::sampling_on_device`]).
    ///
    /// [`EngineConfig::sampling_on_device`]: super::api::EngineConfig::sampling_on_device
    pub sampling_on_device: bool,
}

#[derive(Default)]
pub(crate) struct Batch {
    cache: Option<KvCache>,
    /// Row `i` of the cache is `seqs[i]`.
    seqs: Vec<Sequence>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Prefills the newcomers in one left-padded forward (so every row's last slot is its last
    /// prompt token), samples each sequence's first token and merges the survivors in.
    pub fn admit(
        &mut self,
        ctx: &mut StepCtx<'_>,
        model: &Gpt2,
        tok: &Tokenizer,
        newcomers: Vec<Pending>,
    ) {
        if newcomers.is_empty() {
            return;
        }
        let device = model.device();
        let width = newcomers.iter().map(|p| p.prompt.len()).max().unwrap_or(1);
        let rows = newcomers.len();
        let mut ids = vec![0i64; rows * width];
        let mut mask = vec![false; rows * width];
        for (r, p) in newcomers.iter().enumerate() {
            let pad = width - p.prompt.len();
            for (j, &t) in p.prompt.iter().enumerate() {
                ids[r * width + pad + j] = i64::from(t);
                mask[r * width + pad + j] = true;
            }
        }
        let shape = [rows as i64, width as i64];
        let ids = Tensor::from_slice(&ids).view(shape).to_device(device);
        let mask = Tensor::from_slice(&mask).view(shape).to_device(device);
        let max_new = newcomers
            .iter()
            .map(|p| p.max_new_tokens)
            .max()
            .unwrap_or(0);
        let mut cache = model.new_cache(rows as i64, (width + max_new as usize) as i64);
        let logits = model.forward_cached_last(&ids, &mask, &mut cache);

        // Every sequence of a request (`n`) reads its prompt's row.
        let mut created = Vec::new();
        for (row, p) in newcomers.into_iter().enumerate() {
            let stop = StopMatcher::new(&p.stop);
            for index in 0..p.n {
                let sampler =
                    Sampler::new(p.sampling.clone(), p.seed.wrapping_add(u64::from(index)));
                let seq = Sequence::new(
                    p.request,
                    index,
                    sampler,
                    stop.clone(),
                    &p.prompt,
                    p.max_new_tokens,
                );
                created.push((seq, row));
            }
        }
        let mut picks: Vec<(&mut Sequence, usize)> =
            created.iter_mut().map(|(seq, row)| (seq, *row)).collect();
        let sampled = sample_picks(ctx, &logits, &mut picks, tok.vocab_size());
        let now = Instant::now();
        let mut expand = Vec::new();
        let mut seqs = Vec::new();
        for ((mut seq, row), sampled) in created.into_iter().zip(sampled) {
            if accept(ctx, tok, &mut seq, sampled, now) {
                expand.push(row as i64);
                seqs.push(seq);
            }
        }
        if seqs.is_empty() {
            return;
        }
        let identity =
            expand.len() == rows && expand.iter().enumerate().all(|(i, &r)| r == i as i64);
        let cache = if identity {
            cache
        } else {
            cache.select_rows(&expand)
        };
        self.cache = Some(match self.cache.take() {
            Some(running) if !self.seqs.is_empty() => KvCache::merge(&running, &cache),
            _ => cache,
        });
        self.seqs.extend(seqs);
    }

    /// One decoding step: one token for every row, then finished and aborted rows leave.
    pub fn step(&mut self, ctx: &mut StepCtx<'_>, model: &Gpt2, tok: &Tokenizer) {
        let aborted = |ctx: &StepCtx<'_>, s: &Sequence| {
            ctx.requests
                .get(&s.request)
                .is_none_or(|r| r.abort.is_some())
        };
        if self.seqs.iter().all(|s| aborted(ctx, s)) {
            self.clear();
            return;
        }
        let Some(cache) = self.cache.as_mut() else {
            self.seqs.clear();
            return;
        };
        let started = Instant::now();
        let device = model.device();
        let input: Vec<i64> = self.seqs.iter().map(|s| i64::from(s.next_input)).collect();
        let ids = Tensor::from_slice(&input).to_device(device);
        let logits = model.decode_step(&ids, cache);
        ctx.metrics
            .decode_step_seconds
            .observe(started.elapsed().as_secs_f64());

        let live: Vec<bool> = self.seqs.iter().map(|s| !aborted(ctx, s)).collect();
        let mut picks: Vec<(&mut Sequence, usize)> = self
            .seqs
            .iter_mut()
            .enumerate()
            .filter(|(row, _)| live[*row])
            .map(|(row, seq)| (seq, row))
            .collect();
        let sampled = sample_picks(ctx, &logits, &mut picks, tok.vocab_size());
        let now = Instant::now();
        let mut keep = Vec::with_capacity(picks.len());
        for ((seq, row), sampled) in picks.into_iter().zip(sampled) {
            if accept(ctx, tok, seq, sampled, now) {
                keep.push(row as i64);
            }
        }
        self.retain_rows(&keep);
    }

    /// Drops every row whose request was aborted, without a forward pass.
    pub fn drop_aborted(&mut self, requests: &HashMap<u64, RequestState>) {
        let keep: Vec<i64> = self
            .seqs
            .iter()
            .enumerate()
            .filter(|(_, s)| requests.get(&s.request).is_some_and(|r| r.abort.is_none()))
            .map(|(i, _)| i as i64)
            .collect();
        if keep.len() != self.seqs.len() {
            self.retain_rows(&keep);
        }
    }

    /// Requests with a sequence in this batch.
    pub fn request_keys(&self) -> Vec<u64> {
        let mut keys: Vec<u64> = self.seqs.iter().map(|s| s.request).collect();
        keys.dedup();
        keys
    }

    pub fn clear(&mut self) {
        self.seqs.clear();
        self.cache = None;
    }

    fn retain_rows(&mut self, keep: &[i64]) {
        if keep.len() == self.seqs.len() {
            return;
        }
        if keep.is_empty() {
            self.clear();
            return;
        }
        let mut kept = keep.iter().peekable();
        let mut row = 0i64;
        self.seqs.retain(|_| {
            let stays = kept.peek() == Some(&&row);
            if stays {
                kept.next();
            }
            row += 1;
            stays
        });
        self.cache = self.cache.as_ref().map(|c| c.select_rows(keep));
    }
}

/// Streams a sampled token for `seq`; returns whether the sequence continues.
fn accept(
    ctx: &mut StepCtx<'_>,
    tok: &Tokenizer,
    seq: &mut Sequence,
    sampled: Sampled,
    now: Instant,
) -> bool {
    let Some(request) = ctx.requests.get_mut(&seq.request) else {
        return false;
    };
    let accepted = seq.accept(tok, sampled, request.submitted, now);
    ctx.metrics.tokens_generated.inc();
    if let Some(seconds) = accepted.first_token_seconds {
        ctx.metrics.time_to_first_token.observe(seconds);
    }
    request.send(accepted.token);
    match accepted.finished {
        Some(finished) => {
            request.send(finished);
            request.unfinished = request.unfinished.saturating_sub(1);
            false
        }
        None => true,
    }
}

/// The next token of each picked sequence (with the logits row it reads), chosen on the device
/// or on the host as the engine is configured. Only the tokenizer's `usable` ids are candidates.
fn sample_picks(
    ctx: &mut StepCtx<'_>,
    logits: &Tensor,
    picks: &mut [(&mut Sequence, usize)],
    usable: usize,
) -> Vec<Sampled> {
    if ctx.sampling_on_device {
        let requests: Vec<RowRequest<'_>> = picks
            .iter_mut()
            .map(|(seq, row)| seq.row_request(*row))
            .collect();
        match sample_rows(logits, &requests, usable) {
            Ok(sampled) => return sampled,
            // The host path still works from the same logits; the uniforms already drawn
            // are lost, so only this step's draws differ from an undisturbed run.
            Err(error) => {
                tracing::error!(%error, "sampling on the device failed; sampling on the host")
            }
        }
    }
    let vocab = copy_logits(logits, ctx.logits);
    picks
        .iter_mut()
        .map(|(seq, row)| seq.sample(row_logits(ctx.logits, *row, vocab, usable)))
        .collect()
}

/// The logits of one row over the ids the tokenizer knows: a model whose embedding table is
/// padded past the vocabulary must never produce an id without text (the same rule as
/// `synopsis_model::generate`, so both sample from the same distribution).
fn row_logits(logits: &[f32], row: usize, vocab: usize, usable: usize) -> &[f32] {
    let start = row * vocab;
    &logits[start..start + vocab.min(usable)]
}

/// Copies `[rows, vocab]` logits into the host buffer as f32; returns `vocab`.
fn copy_logits(logits: &Tensor, buf: &mut Vec<f32>) -> usize {
    let logits = logits
        .to_kind(Kind::Float)
        .to_device(Device::Cpu)
        .contiguous();
    let (rows, vocab) = logits.size2().unwrap_or((0, 0));
    let numel = (rows * vocab) as usize;
    if buf.len() < numel {
        buf.resize(numel, 0.0);
    }
    logits.copy_data(&mut buf[..numel], numel);
    vocab as usize
}
