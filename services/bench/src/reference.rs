//! Runs the Python references (`scripts/bench/*.py`) on the same torch as ours and reads the
//! one JSON line each prints.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// The interpreter of the torch venv: `$SYNOPSIS_PYTHON`, else the venv the build uses.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("SYNOPSIS_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    PathBuf::from(home).join(".cache/synopsis/torch-2.11.0/bin/python")
}

/// A script of `scripts/bench/` in this repository: the checkout the binary was built in, or
/// the current directory's when the binary runs elsewhere (the GPU check carries binaries to
/// another machine's copy of the repository).
pub fn script(name: &str) -> PathBuf {
    let built_in = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/bench"));
    let dir = if built_in.is_dir() {
        built_in
    } else {
        PathBuf::from("scripts/bench")
    };
    dir.join(name)
}

/// Runs `script` with `args` and parses the last JSON line of its output as `T`.
pub fn run<T: DeserializeOwned>(script_name: &str, args: &[String]) -> anyhow::Result<T> {
    let python = python();
    let path = script(script_name);
    let output = Command::new(&python)
        .arg(&path)
        .args(args)
        // The references must never reach the network or print progress bars.
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .env("TOKENIZERS_PARALLELISM", "false")
        .output()
        .with_context(|| format!("cannot run {} {}", python.display(), path.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: String = stderr
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        bail!(
            "{script_name} {} failed ({}):\n{tail}",
            args.join(" "),
            output.status
        );
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("{script_name} printed no JSON line:\n{stdout}"))?;
    serde_json::from_str(line).with_context(|| format!("{script_name} printed {line}"))
}

/// What `train_reference.py` prints.
#[derive(Debug, Clone, Deserialize)]
pub struct TrainReference {
    pub mode: String,
    pub real_tokens_per_second: f64,
    pub seconds_per_step: f64,
    pub loss: f64,
}

/// What `generate_reference.py` prints.
#[derive(Debug, Clone, Deserialize)]
pub struct GenerateReference {
    pub tokens_per_second: f64,
    /// A hand-written eager decoding loop over the same weights: the per-token floor of
    /// eager libtorch on this machine, without any framework around it.
    pub lean_tokens_per_second: f64,
    /// Seconds of `generate(max_new_tokens=1)`: prefill of the prompt and one sampled token.
    pub first_token_seconds: f64,
    pub max_rss_bytes: f64,
    /// Resident memory right after the model loaded, before generating.
    pub loaded_rss_bytes: f64,
    /// Resident memory before the model loaded (torch and transformers imported).
    pub base_rss_bytes: f64,
    /// Resident memory after every generation (the mapped weights have been read by then).
    pub final_rss_bytes: f64,
}
