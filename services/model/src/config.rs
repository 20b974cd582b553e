//! GPT-2 hyper-parameters in the field names of Hugging Face's `GPT2Config`, so a `config.json`
//! written by `transformers` loads here and ours loads there, plus the named presets.

use crate::error::{ModelError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The subset of `GPT2Config` this implementation honours; unknown fields are kept verbatim so
/// a round trip through our checkpoints does not lose anything `transformers` wrote.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Gpt2Config {
    pub vocab_size: i64,
    pub n_positions: i64,
    pub n_embd: i64,
    pub n_layer: i64,
    pub n_head: i64,
    #[serde(default)]
    pub n_inner: Option<i64>,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default = "default_dropout")]
    pub resid_pdrop: f64,
    #[serde(default = "default_dropout")]
    pub embd_pdrop: f64,
    #[serde(default = "default_dropout")]
    pub attn_pdrop: f64,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_eos")]
    pub bos_token_id: i64,
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_activation() -> String {
    "gelu_new".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> i64 {
    50256
}

/// Names accepted by [`Gpt2Config::preset`].
pub const PRESETS: &[&str] = &["tiny", "small", "medium"];

impl Gpt2Config {
    fn sized(n_layer: i64, n_embd: i64, n_head: i64, n_positions: i64) -> Self {
        Gpt2Config {
            vocab_size: 50257,
            n_positions,
            n_embd,
            n_layer,
            n_head,
            n_inner: None,
            activation_function: default_activation(),
            resid_pdrop: default_dropout(),
            embd_pdrop: default_dropout(),
            attn_pdrop: default_dropout(),
            layer_norm_epsilon: default_eps(),
            bos_token_id: default_eos(),
            eos_token_id: default_eos(),
            extra: serde_json::Map::new(),
        }
    }

    /// `tiny` (4 layers × 256, the size the benchmarks and the CPU demo use), `small` (GPT-2
    /// 124M) and `medium` (GPT-2 355M).
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "tiny" => Ok(Self::sized(4, 256, 4, 256)),
            "small" => Ok(Self::sized(12, 768, 12, 1024)),
            "medium" => Ok(Self::sized(24, 1024, 16, 1024)),
            other => Err(ModelError::Invalid(format!(
                "unknown preset {other:?}; known presets: {}",
                PRESETS.join(", ")
            ))),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let config: Self = serde_json::from_str(&text).map_err(|e| ModelError::format(path, e))?;
        config.validate().map_err(|m| ModelError::format(path, m))?;
        Ok(config)
    }

    /// Writes `config.json` as `transformers` expects it (model_type and architectures set).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut value = serde_json::to_value(self).map_err(|e| ModelError::format(path, e))?;
        if let Some(obj) = value.as_object_mut() {
            obj.entry("model_type").or_insert("gpt2".into());
            obj.entry("architectures")
                .or_insert(serde_json::json!(["GPT2LMHeadModel"]));
        }
        let text = serde_json::to_string_pretty(&value).map_err(|e| ModelError::format(path, e))?;
        std::fs::write(path, text).map_err(|e| ModelError::io(path, e))
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ];
        for (name, value) in positive {
            if value <= 0 {
                return Err(format!("{name} must be positive, got {value}"));
            }
        }
        if self.n_embd % self.n_head != 0 {
            return Err(format!(
                "n_embd ({}) must be a multiple of n_head ({})",
                self.n_embd, self.n_head
            ));
        }
        if !matches!(
            self.activation_function.as_str(),
            "gelu_new" | "gelu" | "gelu_pytorch_tanh" | "relu"
        ) {
            return Err(format!(
                "activation_function {:?} is not supported",
                self.activation_function
            ));
        }
        Ok(())
    }

    pub fn inner_dim(&self) -> i64 {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    pub fn head_dim(&self) -> i64 {
        self.n_embd / self.n_head
    }

    /// Parameters with the LM head tied to the token embedding (counted once).
    pub fn num_parameters(&self) -> i64 {
        let d = self.n_embd;
        let inner = self.inner_dim();
        let per_layer =
            2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * inner + inner) + (inner * d + d);
        self.vocab_size * d + self.n_positions * d + self.n_layer * per_layer + 2 * d
    }
}
