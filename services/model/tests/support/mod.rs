//! Paths and helpers shared by the model crate's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use synopsis_model::Gpt2Config;
use tch::Tensor;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `tests/fixtures/<rel>` in the repository (see its README for each file's origin).
pub fn fixture(rel: &str) -> PathBuf {
    workspace().join("tests/fixtures").join(rel)
}

/// The Python of the libtorch venv (it has transformers and safetensors).
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("SYNOPSIS_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    PathBuf::from(home).join(".cache/synopsis/torch-2.11.0/bin/python")
}

/// Runs `scripts/hf_interop.py` with `args`, panicking with its stderr on failure.
pub fn hf_interop(args: &[&str]) {
    let output = Command::new(python())
        .arg(workspace().join("scripts/hf_interop.py"))
        .args(args)
        .output()
        .expect("run python (set SYNOPSIS_PYTHON or run `make test`)");
    assert!(
        output.status.success(),
        "hf_interop.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Reads one tensor of a safetensors file as f32 (or i64 ids as f32).
pub fn read_tensor(path: &Path, name: &str) -> tch::Tensor {
    let tensors = tch::Tensor::read_safetensors(path).expect("read safetensors");
    tensors
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("{name} missing from {}", path.display()))
}

pub fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// A two-layer, 64-wide GPT-2 over a 300-token vocabulary: big enough for multi-head attention
/// and a cache that grows, small enough that every step runs in microseconds.
pub fn two_layer_config() -> Gpt2Config {
    let mut config = Gpt2Config::preset("tiny").unwrap();
    config.n_layer = 2;
    config.n_embd = 64;
    config.n_head = 4;
    config.n_positions = 128;
    config.vocab_size = 300;
    config
}

/// The largest absolute difference between two tensors.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}
