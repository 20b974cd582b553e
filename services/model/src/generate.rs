//! Single-sequence generation with the KV cache: the simple path used for training samples,
//! smoke tests and tools. The generator service batches many sequences itself; this loop is the
//! reference its output must match for the same seed.

use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::gpt2::Gpt2;
use crate::incremental::IncrementalDecoder;
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;

/// What one generation produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The continuation only (the prompt is not repeated).
    pub text: String,
    /// Generated token ids, end-of-text excluded.
    pub ids: Vec<u32>,
    /// Log-probability of each generated id under the distribution it was drawn from.
    pub logprobs: Vec<f32>,
    /// Prompt tokens the model saw (after keeping only the last `n_positions - 1`).
    pub prompt_tokens: usize,
    /// True when generation ended on `<|endoftext|>` rather than on a length limit.
    pub stopped_at_eos: bool,
}

/// Continues `prompt` by up to `max_new_tokens` tokens and returns the new text only.
/// See [`generate_tokens`].
pub fn generate(
    model: &Gpt2,
    tok: &Tokenizer,
    prompt: &str,
    max_new_tokens: usize,
    params: &SamplingParams,
    seed: u64,
) -> Result<String> {
    generate_tokens(model, tok, prompt, max_new_tokens, params, seed).map(|g| g.text)
}

/// Continues `prompt`, stopping at end-of-text, after `max_new_tokens`, or when the sequence
/// fills the model's context. An empty prompt starts from `<|endoftext|>` (GPT-2's document
/// start); a prompt longer than the context keeps its last `n_positions - 1` tokens. The
/// repetition penalty counts prompt tokens too, as in Hugging Face.
pub fn generate_tokens(
    model: &Gpt2,
    tok: &Tokenizer,
    prompt: &str,
    max_new_tokens: usize,
    params: &SamplingParams,
    seed: u64,
) -> Result<Generation> {
    params.validate()?;
    let context = usize::try_from(model.config().n_positions)
        .unwrap_or(1)
        .max(1);
    let mut ids = tok.encode(prompt)?;
    if ids.is_empty() {
        ids.push(tok.eos_id());
    }
    if ids.len() >= context {
        ids.drain(..ids.len() + 1 - context);
    }
    let prompt_tokens = ids.len();
    let budget = max_new_tokens.min(context - prompt_tokens);
    let mut out = Generation {
        text: String::new(),
        ids: Vec::with_capacity(budget),
        logprobs: Vec::with_capacity(budget),
        prompt_tokens,
        stopped_at_eos: false,
    };
    if budget == 0 {
        return Ok(out);
    }

    let device = model.device();
    // Ids past the tokenizer's vocabulary (a model padded to a round size) mean no text.
    let usable = tok.vocab_size();
    let mut cache = model.new_cache(1, (prompt_tokens + budget) as i64);
    let mut sampler = Sampler::new(params.clone(), seed);
    let mut decoder = IncrementalDecoder::new();
    let mut input: Vec<i64> = ids.iter().map(|&id| i64::from(id)).collect();

    tch::no_grad(|| -> Result<()> {
        for _ in 0..budget {
            let row = next_logits(model, &input, device, &mut cache)?;
            let row = &row[..row.len().min(usable)];
            let sampled = sampler.sample(row, &ids);
            if sampled.token == tok.eos_id() {
                out.stopped_at_eos = true;
                break;
            }
            ids.push(sampled.token);
            out.ids.push(sampled.token);
            out.logprobs.push(sampled.logprob);
            out.text.push_str(&decoder.push(tok, sampled.token));
            input.clear();
            input.push(i64::from(sampled.token));
        }
        Ok(())
    })?;
    out.text.push_str(&decoder.finish());
    Ok(out)
}

/// Runs `input` through the model, appending it to the cache; logits of its last position.
fn next_logits(
    model: &Gpt2,
    input: &[i64],
    device: Device,
    cache: &mut crate::kv_cache::KvCache,
) -> Result<Vec<f32>> {
    let len = input.len() as i64;
    let logits = if len == 1 {
        model.decode_step(&Tensor::from_slice(input).to_device(device), cache)
    } else {
        let ids = Tensor::from_slice(input).view([1, len]).to_device(device);
        let mask = Tensor::ones([1, len], (Kind::Bool, device));
        model.forward_cached_last(&ids, &mask, cache)
    };
    let row = logits.f_view([-1])?.f_to_device(Device::Cpu)?;
    Ok(Vec::<f32>::try_from(&row)?)
}
