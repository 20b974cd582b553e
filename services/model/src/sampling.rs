//! Picks the next token from one row of logits on the CPU: repetition penalty, temperature,
//! top-k and top-p, with a ChaCha RNG owned by the request. Owning the RNG (never libtorch's
//! global one) makes the draws of a seed independent of whatever else shares the batch.
//!
//! What a seed reproduces, exactly: the same checkpoint, device and dtype with the same rows in
//! each step give the same text bit for bit. Other rows in the batch change nothing in the
//! draws, but can change the logits in their last bits (the CPU decodes up to 4 rows with one
//! kernel and 5 to 16 with another, whose fused multiply-adds round differently; libtorch
//! and cuBLAS choose kernels by shape), so a token whose draw falls within that rounding of a
//! boundary between two tokens can differ, and the text after it.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::error::{ModelError, Result};
use crate::softmax_weights::{lane_max, SoftmaxWeights};

/// How many of the most likely tokens are ordered first when looking for the top-p nucleus.
const NUCLEUS_HEAD: usize = 256;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 = no limit.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p; 1 = no limit.
    pub top_p: f32,
    /// Hugging Face's rule for tokens already seen: a positive logit is divided by it, a
    /// negative one multiplied; 1 = off.
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Rejects values a request must not send; the message names the field.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(ModelError::Invalid(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::Invalid(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(ModelError::Invalid(format!(
                "repetition_penalty must be a finite number > 0, got {}",
                self.repetition_penalty
            )));
        }
        Ok(())
    }

    fn is_greedy(&self) -> bool {
        // Anything that is not a usable positive temperature falls back to the safe choice.
        !(self.temperature.is_finite() && self.temperature > 0.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Natural log of the token's probability under the distribution it was drawn from (after
    /// penalty, temperature, top-k and top-p); for greedy, the log-softmax of the penalised logits.
    pub logprob: f32,
}

/// One request's sampler: its parameters, its RNG and reusable scratch buffers.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha20Rng,
    logits: Vec<f32>,
    candidates: Vec<u32>,
    weights: Vec<f64>,
    seen: Vec<u32>,
    /// The whole-vocabulary weights when neither top-k nor top-p cuts the distribution.
    full: SoftmaxWeights,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Sampler {
            params,
            rng: ChaCha20Rng::seed_from_u64(seed),
            logits: Vec::new(),
            candidates: Vec::new(),
            weights: Vec::new(),
            seen: Vec::new(),
            full: SoftmaxWeights::default(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token from `logits` (one per vocabulary id); `previous` are the ids of
    /// the sequence so far (prompt and generated), used by the repetition penalty. NaN logits
    /// count as impossible. Empty logits give token 0 with logprob -inf rather than a panic.
    pub fn sample(&mut self, logits: &[f32], previous: &[u32]) -> Sampled {
        let uniform = self.draw_uniform();
        self.sample_with(logits, previous, uniform)
    }

    /// The uniform in [0, 1) that the next token is drawn with, from this request's stream:
    /// one per sampled token, none for greedy decoding. [`crate::batch_sampling`] draws it here
    /// and samples on the device, so both paths consume the stream alike.
    pub fn draw_uniform(&mut self) -> Option<f64> {
        (!self.params.is_greedy()).then(|| self.rng.random::<f64>())
    }

    /// [`Self::sample`] with the uniform already drawn (`None` for greedy).
    fn sample_with(&mut self, logits: &[f32], previous: &[u32], uniform: Option<f64>) -> Sampled {
        if logits.is_empty() {
            return Sampled {
                token: 0,
                logprob: f32::NEG_INFINITY,
            };
        }
        self.logits.clear();
        self.logits.extend(logits.iter().map(|&x| match x {
            x if x.is_nan() => f32::NEG_INFINITY,
            f32::INFINITY => f32::MAX,
            x => x,
        }));
        self.apply_repetition_penalty(previous);

        let Some(uniform) = uniform else {
            let token = argmax(&self.logits);
            let logprob = log_softmax_at(&self.logits, token);
            return Sampled { token, logprob };
        };
        let n = self.logits.len();
        let top_k = self.params.top_k;
        if (top_k == 0 || top_k >= n) && self.params.top_p >= 1.0 {
            return self.sample_unrestricted(uniform);
        }
        self.sample_filtered(uniform)
    }

    /// Temperature alone: every token is a candidate, so no index list is built and the
    /// weights come from the vectorised [`SoftmaxWeights`].
    fn sample_unrestricted(&mut self, uniform: f64) -> Sampled {
        let max = lane_max(&self.logits);
        if max == f32::NEG_INFINITY {
            // Every token is impossible: stay deterministic instead of dividing by zero.
            return Sampled {
                token: 0,
                logprob: f32::NEG_INFINITY,
            };
        }
        self.full
            .fill(&self.logits, max, 1.0 / self.params.temperature);
        let chosen = self.full.draw(uniform);
        Sampled {
            token: chosen as u32,
            logprob: (f64::from(self.full.weights[chosen]) / self.full.total).ln() as f32,
        }
    }

    fn apply_repetition_penalty(&mut self, previous: &[u32]) {
        let penalty = self.params.repetition_penalty;
        if penalty == 1.0 || !penalty.is_finite() || penalty <= 0.0 || previous.is_empty() {
            return;
        }
        // Each distinct token is penalised once, however often it occurred (as in HF).
        self.seen.clear();
        self.seen.extend_from_slice(previous);
        self.seen.sort_unstable();
        self.seen.dedup();
        for &id in &self.seen {
            if let Some(logit) = self.logits.get_mut(id as usize) {
                *logit = if *logit > 0.0 {
                    *logit / penalty
                } else {
                    *logit * penalty
                };
            }
        }
    }

    fn sample_filtered(&mut self, uniform: f64) -> Sampled {
        let logits = &self.logits;
        let n = logits.len();
        // Most likely first; equal logits by id so the order never depends on the algorithm.
        let by_likelihood = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };

        self.candidates.clear();
        self.candidates.extend(0..n as u32);
        let top_k = self.params.top_k;
        if top_k > 0 && top_k < n {
            // Partition instead of sorting 50k logits: only the k best need ordering.
            self.candidates
                .select_nth_unstable_by(top_k - 1, by_likelihood);
            self.candidates.truncate(top_k);
        }
        let max = self
            .candidates
            .iter()
            .map(|&i| logits[i as usize])
            .fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            // Every token is impossible: stay deterministic instead of dividing by zero.
            return Sampled {
                token: self.candidates.iter().copied().min().unwrap_or(0),
                logprob: f32::NEG_INFINITY,
            };
        }
        let inv_temperature = 1.0 / f64::from(self.params.temperature);
        let weight =
            |i: u32| ((f64::from(logits[i as usize]) - f64::from(max)) * inv_temperature).exp();
        let top_p = f64::from(self.params.top_p);
        let nucleus = top_p < 1.0;
        if !nucleus {
            // Top-k alone: the k candidates are the distribution, drawn most likely first as
            // on the device (`batch_sampling`).
            self.candidates.sort_unstable_by(by_likelihood);
            self.weights.clear();
            self.weights
                .extend(self.candidates.iter().map(|&i| weight(i)));
            let total: f64 = self.weights.iter().sum();
            return self.draw(uniform, total);
        }
        // Mass of every candidate, so the nucleus can be cut before sorting everything.
        let total: f64 = self.candidates.iter().map(|&i| weight(i)).sum();
        let threshold = top_p * total;
        // The nucleus of a trained model is usually a few dozen tokens: order the best
        // NUCLEUS_HEAD first and sort the long tail only when they fall short of p.
        let head = NUCLEUS_HEAD.min(self.candidates.len());
        if head < self.candidates.len() {
            self.candidates
                .select_nth_unstable_by(head - 1, by_likelihood);
        }
        let (best, rest) = self.candidates.split_at_mut(head);
        best.sort_unstable_by(by_likelihood);
        let head_mass: f64 = best.iter().map(|&i| weight(i)).sum();
        if head_mass >= threshold {
            self.candidates.truncate(head);
        } else {
            rest.sort_unstable_by(by_likelihood);
        }
        self.weights.clear();
        self.weights
            .extend(self.candidates.iter().map(|&i| weight(i)));

        // Smallest prefix whose mass reaches p; the first token always stays.
        let mut mass = 0.0;
        let mut keep = 0;
        for &w in &self.weights {
            mass += w;
            keep += 1;
            if mass >= threshold {
                break;
            }
        }
        self.candidates.truncate(keep);
        self.weights.truncate(keep);
        self.draw(uniform, mass)
    }

    /// Draws a candidate with probability `weights[i] / total`.
    fn draw(&self, uniform: f64, total: f64) -> Sampled {
        let target = uniform * total;
        // Rounding can leave `target` at the very end: fall back to the last possible token.
        let mut chosen = self.weights.iter().rposition(|&w| w > 0.0).unwrap_or(0);
        let mut mass = 0.0;
        for (i, &w) in self.weights.iter().enumerate() {
            mass += w;
            if target < mass {
                chosen = i;
                break;
            }
        }
        Sampled {
            token: self.candidates[chosen],
            logprob: (self.weights[chosen] / total).ln() as f32,
        }
    }
}

/// Index of the largest logit; the lowest id wins a tie.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn log_softmax_at(logits: &[f32], index: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return f32::NEG_INFINITY;
    }
    let max = f64::from(max);
    let sum: f64 = logits.iter().map(|&x| (f64::from(x) - max).exp()).sum();
    (f64::from(logits[index as usize]) - max - sum.ln()) as f32
}
