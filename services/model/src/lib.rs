//! GPT-2 in tch with Hugging Face-compatible weights, a KV cache for batched decoding, seeded
//! sampling, tokenizers and the atomic checkpoint format shared by the trainer and generator.

mod attention;
pub mod batch_sampling;
pub mod checkpoint;
pub mod config;
mod cpu_decode;
mod cpu_kernels;
mod cpu_step;
mod cpu_team;
#[cfg(target_arch = "x86_64")]
mod cpu_tiles;
pub mod cuda_backend;
pub mod device;
pub mod error;
pub mod generate;
pub mod gpt2;
mod hf_weights;
pub mod incremental;
pub mod kv_cache;
pub mod manifest;
pub mod sampling;
mod softmax_weights;
pub mod tokenizer;
pub mod torch_threads;
mod weight_arena;

pub use checkpoint::{load_model_dir, LoadedModel};
pub use config::Gpt2Config;
pub use device::{device_name, parse_device, WeightDtype};
pub use error::{ModelError, Result};
pub use generate::{generate, generate_tokens, Generation};
pub use gpt2::Gpt2;
pub use incremental::IncrementalDecoder;
pub use kv_cache::KvCache;
pub use manifest::{FileEntry, Manifest};
pub use sampling::{Sampled, Sampler, SamplingParams};
pub use tokenizer::Tokenizer;
