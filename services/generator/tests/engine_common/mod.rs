//! Helpers shared by the engine tests: small random GPT-2 models with the real GPT-2
//! tokenizer, an engine per test, requests, and the reference generation loop.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use prometheus::Registry;
use synopsis_generator::engine::{
    spawn_engine, EngineConfig, EngineHandle, EngineMetrics, EngineRequest, ResidentModel, SeqEvent,
};
use synopsis_model::checkpoint::LoadedModel;
use synopsis_model::sampling::{Sampler, SamplingParams};
use synopsis_model::tokenizer::Tokenizer;
use synopsis_model::{Gpt2, Gpt2Config};
use synopsis_proto::v1::{CheckpointInfo, FinishReason};
use tch::{Device, Kind, Tensor};
use tokio::sync::mpsc;

pub const PATIENCE: Duration = Duration::from_secs(120);

pub fn tokenizer() -> Tokenizer {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/gpt2_tokenizer/tokenizer.json");
    Tokenizer::from_file(&path).expect("the GPT-2 tokenizer fixture")
}

pub fn tiny_config(n_positions: i64) -> Gpt2Config {
    let mut cfg = Gpt2Config::preset("tiny").expect("preset");
    cfg.n_layer = 2;
    cfg.n_embd = 64;
    cfg.n_head = 4;
    cfg.n_positions = n_positions;
    cfg
}

pub fn random_model() -> Gpt2 {
    Gpt2::new(&tiny_config(128), Device::Cpu)
}

pub fn copy_of(model: &Gpt2) -> Gpt2 {
    let mut copy = Gpt2::new(model.config(), Device::Cpu);
    copy.var_store_mut()
        .copy(model.var_store())
        .expect("same variables");
    copy
}

pub fn resident(id: &str, model: Gpt2) -> ResidentModel {
    ResidentModel {
        checkpoint_id: id.to_owned(),
        loaded: LoadedModel {
            model,
            tokenizer: tokenizer(),
            manifest: None,
            files: BTreeMap::new(),
            metadata: serde_json::Value::Null,
        },
        source: "test".to_owned(),
        info: CheckpointInfo {
            checkpoint_id: id.to_owned(),
            ..Default::default()
        },
    }
}

pub fn engine_with(
    max_batch: usize,
    max_queue: usize,
    max_resident: usize,
) -> (EngineHandle, EngineMetrics) {
    let metrics = EngineMetrics::new(&Registry::new()).expect("metrics");
    let mut cfg = EngineConfig::new(Device::Cpu, metrics.clone());
    cfg.max_batch = max_batch;
    cfg.max_queue = max_queue;
    cfg.max_resident = max_resident;
    (spawn_engine(cfg).expect("engine thread"), metrics)
}

pub fn engine() -> (EngineHandle, EngineMetrics) {
    engine_with(32, 256, 3)
}

/// An engine that samples with tensor operations where the logits are, as on a GPU.
pub fn engine_sampling_on_device() -> EngineHandle {
    let metrics = EngineMetrics::new(&Registry::new()).expect("metrics");
    let mut cfg = EngineConfig::new(Device::Cpu, metrics);
    cfg.sampling_on_device = true;
    spawn_engine(cfg).expect("engine thread")
}

pub fn greedy() -> SamplingParams {
    SamplingParams::greedy()
}

pub fn sampled() -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_k: 200,
        top_p: 0.95,
        repetition_penalty: 1.1,
    }
}

pub fn request(
    prompt: &str,
    max_new_tokens: u32,
    sampling: SamplingParams,
    seed: u64,
) -> (EngineRequest, mpsc::Receiver<SeqEvent>) {
    let (events, rx) = mpsc::channel(16);
    let req = EngineRequest {
        request_id: format!("req-{prompt}-{seed}"),
        checkpoint_id: None,
        prompt: prompt.to_owned(),
        n: 1,
        max_new_tokens,
        sampling,
        seed,
        stop: Vec::new(),
        deadline: None,
        events,
    };
    (req, rx)
}

/// Everything one request streamed, per sequence index.
#[derive(Debug, Default)]
pub struct Streamed {
    pub tokens: BTreeMap<u32, Vec<(u32, String)>>,
    pub finished: BTreeMap<u32, (FinishReason, String, u32)>,
    pub deadline_exceeded: bool,
}

impl Streamed {
    pub fn ids(&self, index: u32) -> Vec<u32> {
        self.tokens[&index].iter().map(|(id, _)| *id).collect()
    }
    pub fn streamed_text(&self, index: u32) -> String {
        self.tokens[&index]
            .iter()
            .map(|(_, t)| t.as_str())
            .collect()
    }
    pub fn text(&self, index: u32) -> &str {
        &self.finished[&index].1
    }
    pub fn reason(&self, index: u32) -> FinishReason {
        self.finished[&index].0
    }
}

pub async fn collect(mut rx: mpsc::Receiver<SeqEvent>) -> Streamed {
    let mut out = Streamed::default();
    let read = async {
        while let Some(event) = rx.recv().await {
            match event {
                SeqEvent::Token {
                    index, id, text, ..
                } => out.tokens.entry(index).or_default().push((id, text)),
                SeqEvent::Finished {
                    index,
                    reason,
                    text,
                    generated_tokens,
                    ..
                } => {
                    out.finished.insert(index, (reason, text, generated_tokens));
                }
                SeqEvent::DeadlineExceeded => out.deadline_exceeded = true,
            }
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("the stream ends");
    out
}

/// The reference: a full forward over the whole sequence for every token, no cache, no batch.
/// Returns the generated ids (the end-of-text id included when it ends there) and their text.
pub fn reference(
    model: &Gpt2,
    prompt: &str,
    max_new: usize,
    params: SamplingParams,
    seed: u64,
) -> (Vec<u32>, String) {
    let tok = tokenizer();
    let mut ids = tok.encode(prompt).expect("encode");
    let prompt_len = ids.len();
    let mut sampler = Sampler::new(params, seed);
    tch::no_grad(|| {
        for _ in 0..max_new {
            let input: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
            let logits = model
                .forward(&Tensor::from_slice(&input).view([1, -1]), false)
                .select(1, -1)
                .squeeze_dim(0)
                .to_kind(Kind::Float);
            let logits = Vec::<f32>::try_from(&logits).expect("logits");
            let next = sampler.sample(&logits, &ids).token;
            ids.push(next);
            if next == tok.eos_id() {
                break;
            }
        }
    });
    let generated = ids[prompt_len..].to_vec();
    let text_ids: Vec<u32> = generated
        .iter()
        .copied()
        .filter(|&i| i != tok.eos_id())
        .collect();
    (generated, tok.decode(&text_ids).expect("decode"))
}

pub async fn run(
    engine: &EngineHandle,
    req: EngineRequest,
    rx: mpsc::Receiver<SeqEvent>,
) -> Streamed {
    engine.submit(req).await.expect("admitted");
    collect(rx).await
}
