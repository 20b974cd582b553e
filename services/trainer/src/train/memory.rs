//! A run's memory estimate, checked before anything is allocated: each shape field is bounded
//! alone, but their product is what fills memory, and an allocation libtorch cannot make
//! either aborts with a C++ backtrace or, on an overcommitting host, brings in the OOM killer.

use synopsis_common::{available_host_memory, human_bytes};
use synopsis_model::Gpt2Config;
use tch::Device;

use crate::error::{Result, TrainerError};

/// Parameters of a GPT-2 of this shape (embeddings, blocks, final norm; the LM head is tied).
pub fn parameters(c: &Gpt2Config) -> u128 {
    let (v, p, e, l) = (
        c.vocab_size.max(0) as u128,
        c.n_positions.max(0) as u128,
        c.n_embd.max(0) as u128,
        c.n_layer.max(0) as u128,
    );
    let inner = c.n_inner.unwrap_or(4 * c.n_embd).max(0) as u128;
    // Per block: two norms (4e), attention qkv + proj (4e² + 4e), MLP (2·e·inner + inner + e).
    let block = 4 * e + 4 * e * e + 4 * e + 2 * e * inner + inner + e;
    v * e + p * e + l * block + 2 * e
}

/// Bytes a training run of this shape needs at its peak, in f32: weights, gradients and
/// AdamW's two moments (16 bytes a parameter), plus the activations kept for the backward
/// pass of one micro-batch (per layer and token about 34 floats per channel and the attention
/// maps of every head) and the logits with their gradient.
pub fn training_bytes(c: &Gpt2Config, batch_size: u32, seq_len: u32) -> u128 {
    let (b, t) = (u128::from(batch_size), u128::from(seq_len));
    let (e, l, h, v) = (
        c.n_embd.max(0) as u128,
        c.n_layer.max(0) as u128,
        c.n_head.max(0) as u128,
        c.vocab_size.max(0) as u128,
    );
    let state = 16 * parameters(c);
    let activations = 4 * b * t * l * (34 * e + 5 * h * t);
    let logits = 4 * 3 * b * t * v;
    state + activations + logits
}

/// Memory a run may use on `device`: `--max-run-memory` when set, else on the CPU what the
/// host and its cgroup still have available. `None`: unknown (a GPU without the flag).
pub fn limit(device: Device, configured: Option<u64>) -> Option<u64> {
    configured.or_else(|| match device {
        Device::Cpu => available_host_memory(),
        _ => None,
    })
}

/// Refuses a run whose estimate exceeds `limit`, naming both.
pub fn check(c: &Gpt2Config, batch_size: u32, seq_len: u32, limit: Option<u64>) -> Result<()> {
    let Some(limit) = limit else {
        return Ok(());
    };
    let need = training_bytes(c, batch_size, seq_len);
    if need > u128::from(limit) {
        let need = u64::try_from(need).unwrap_or(u64::MAX);
        return Err(TrainerError::invalid(
            "model",
            format!(
                "this run needs about {} ({} parameters; weights, gradients, optimizer state \
                 and activations at batch_size {batch_size} × seq_len {seq_len}), more than \
                 the {} available to the trainer; choose a smaller model, batch_size or seq_len",
                human_bytes(need),
                parameters(c),
                human_bytes(limit)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_small_has_its_known_parameter_count() {
        let mut c = Gpt2Config::preset("small").unwrap();
        c.vocab_size = 50_257;
        c.n_positions = 1024;
        c.n_embd = 768;
        c.n_layer = 12;
        c.n_head = 12;
        // 124,439,808 with the tied LM head.
        assert_eq!(parameters(&c), 124_439_808);
    }

    #[test]
    fn an_oversized_run_is_refused_naming_estimate_and_limit() {
        let mut c = Gpt2Config::preset("tiny").unwrap();
        c.n_layer = 256;
        c.n_embd = 16_384;
        c.n_head = 256;
        let err = check(&c, 8, 256, Some(24 << 30)).unwrap_err().to_string();
        assert!(err.contains("GiB") && err.contains("24.00 GiB"), "{err}");
        let tiny = Gpt2Config::preset("tiny").unwrap();
        check(&tiny, 8, 128, Some(24 << 30)).unwrap();
        check(&c, 8, 256, None).unwrap();
    }
}
