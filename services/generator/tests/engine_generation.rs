//! The engine on small random GPT-2 models on the CPU: what it generates equals a plain
//! full-forward loop, whoever shares the batch; clients that leave, stop strings, deadlines,
//! refused models and hot swaps behave as the API promises.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use prometheus::Registry;
use synopsis_generator::engine::{
    spawn_engine, EngineConfig, EngineHandle, EngineMetrics, EngineRequest, ResidentModel,
    SeqEvent, SubmitError,
};
use synopsis_model::checkpoint::LoadedModel;
use synopsis_model::generate::generate_tokens;
use synopsis_model::incremental::IncrementalDecoder;
use synopsis_model::sampling::{Sampler, SamplingParams};
use synopsis_model::tokenizer::Tokenizer;
use synopsis_model::{Gpt2, Gpt2Config};
use synopsis_proto::v1::{CheckpointInfo, FinishReason};
use tch::{Device, Kind, Tensor};
use tokio::sync::mpsc;

/// Generous bound so a broken engine fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(120);

fn tokenizer() -> Tokenizer {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/gpt2_tokenizer/tokenizer.json");
    Tokenizer::from_file(&path).expect("the GPT-2 tokenizer of the shared data")
}

fn tiny_config(n_positions: i64) -> Gpt2Config {
    let mut cfg = Gpt2Config::preset("tiny").expect("preset");
    cfg.n_layer = 2;
    cfg.n_embd = 64;
    cfg.n_head = 4;
    cfg.n_positions = n_positions;
    cfg
}

fn random_model() -> Gpt2 {
    Gpt2::new(&tiny_config(128), Device::Cpu)
}

fn copy_of(model: &Gpt2) -> Gpt2 {
    let mut copy = Gpt2::new(model.config(), Device::Cpu);
    copy.var_store_mut()
        .copy(model.var_store())
        .expect("same variables");
    copy
}

fn resident(id: &str, model: Gpt2) -> ResidentModel {
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

fn engine_with(
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

fn engine() -> (EngineHandle, EngineMetrics) {
    engine_with(32, 256, 3)
}

fn greedy() -> SamplingParams {
    SamplingParams::greedy()
}

fn sampled() -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_k: 200,
        top_p: 0.95,
        repetition_penalty: 1.1,
    }
}

fn request(
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
struct Streamed {
    tokens: BTreeMap<u32, Vec<(u32, String)>>,
    finished: BTreeMap<u32, (FinishReason, String, u32)>,
    deadline_exceeded: bool,
}

impl Streamed {
    fn ids(&self, index: u32) -> Vec<u32> {
        self.tokens[&index].iter().map(|(id, _)| *id).collect()
    }
    fn streamed_text(&self, index: u32) -> String {
        self.tokens[&index]
            .iter()
            .map(|(_, t)| t.as_str())
            .collect()
    }
    fn text(&self, index: u32) -> &str {
        &self.finished[&index].1
    }
    fn reason(&self, index: u32) -> FinishReason {
        self.finished[&index].0
    }
}

async fn collect(mut rx: mpsc::Receiver<SeqEvent>) -> Streamed {
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
fn reference(
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

async fn run(engine: &EngineHandle, req: EngineRequest, rx: mpsc::Receiver<SeqEvent>) -> Streamed {
    engine.submit(req).await.expect("admitted");
    collect(rx).await
}

#[tokio::test]
async fn greedy_output_equals_a_full_forward_loop_for_prompts_batched_together() {
    let model = random_model();
    let (engine, metrics) = engine();
    engine
        .install(resident("a", copy_of(&model)), true)
        .await
        .expect("install");

    let prompts = [
        "The",
        "Once upon a time in a village",
        "A boy",
        "Mecha pilots fight for",
    ];
    let mut pending = Vec::new();
    for p in prompts {
        let (req, rx) = request(p, 24, greedy(), 0);
        engine.submit(req).await.expect("admitted");
        pending.push(rx);
    }
    for (p, rx) in prompts.iter().zip(pending) {
        let got = collect(rx).await;
        let (ids, text) = reference(&model, p, 24, greedy(), 0);
        assert_eq!(got.ids(0), ids, "prompt {p:?}");
        assert_eq!(got.text(0), text, "prompt {p:?}");
        assert_eq!(got.streamed_text(0), text);
        assert_eq!(got.finished[&0].2 as usize, ids.len());
        assert_eq!(got.reason(0), FinishReason::Length);
    }
    assert!(metrics.tokens_generated.get() >= 4 * 24);
    assert_eq!(metrics.time_to_first_token.get_sample_count(), 4);
    assert!(metrics.decode_step_seconds.get_sample_count() > 0);
}

#[tokio::test]
async fn seeded_sampling_gives_the_same_text_alone_and_inside_a_busy_batch() {
    let model = random_model();
    let (engine, _) = engine();
    engine
        .install(resident("a", copy_of(&model)), true)
        .await
        .expect("install");

    let prompt = "In a distant future";
    let (req, rx) = request(prompt, 32, sampled(), 42);
    let alone = run(&engine, req, rx).await;
    let (ref_ids, ref_text) = reference(&model, prompt, 32, sampled(), 42);
    assert_eq!(alone.ids(0), ref_ids);
    assert_eq!(alone.text(0), ref_text);
    let single =
        generate_tokens(&model, &tokenizer(), prompt, 32, &sampled(), 42).expect("generate");
    assert_eq!(
        alone.text(0),
        single.text,
        "the model crate's own generation loop agrees"
    );

    // The same request among 8 others (different prompts, lengths and seeds), plus one with
    // n = 3 whose sequence i must equal a lone request with seed 42 + i.
    let mut others = Vec::new();
    for i in 0..8u64 {
        let other_prompt = format!("Story number {i} begins with{}", " a".repeat(i as usize));
        let (req, rx) = request(&other_prompt, 20 + 3 * i as u32, sampled(), 1000 + i);
        engine.submit(req).await.expect("admitted");
        others.push(rx);
    }
    let (req, rx) = request(prompt, 32, sampled(), 42);
    engine.submit(req).await.expect("admitted");
    let (mut wide, wide_rx) = request(prompt, 32, sampled(), 41);
    wide.n = 3;
    engine.submit(wide).await.expect("admitted");

    let together = collect(rx).await;
    assert_eq!(together.text(0), alone.text(0));
    assert_eq!(together.ids(0), alone.ids(0));
    let wide = collect(wide_rx).await;
    assert_eq!(wide.finished.len(), 3);
    assert_eq!(wide.text(1), alone.text(0), "sequence 1 uses seed 41 + 1");
    let (_, seed41) = reference(&model, prompt, 32, sampled(), 41);
    assert_eq!(wide.text(0), seed41);
    assert_ne!(
        wide.text(0),
        wide.text(1),
        "different seeds, different texts"
    );
    for rx in others {
        let s = collect(rx).await;
        assert_eq!(s.finished.len(), 1);
        assert_eq!(s.streamed_text(0), s.text(0));
    }
}

#[tokio::test]
async fn a_client_that_leaves_is_dropped_from_the_batch() {
    // Long enough that the client leaves long before the length limit.
    let (engine, metrics) = engine();
    let model = Gpt2::new(&tiny_config(1024), Device::Cpu);
    engine
        .install(resident("a", model), true)
        .await
        .expect("install");

    let (req, mut rx) = request("The", 1000, sampled(), 1);
    engine.submit(req).await.expect("admitted");
    for _ in 0..3 {
        let event = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .expect("a token");
        assert!(matches!(event, Some(SeqEvent::Token { .. })));
    }
    drop(rx);

    let deadline = Instant::now() + PATIENCE;
    while (metrics.cancelled.get() == 0 || metrics.batch_size.get() != 0)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(metrics.cancelled.get(), 1);
    assert_eq!(metrics.batch_size.get(), 0);
    assert!(
        metrics.tokens_generated.get() < 1000,
        "the sequence stopped before its length limit"
    );

    // The engine goes on serving.
    let (req, rx) = request("The", 4, greedy(), 0);
    assert_eq!(run(&engine, req, rx).await.finished[&0].2, 4);
}

/// Per-token texts of a reference generation, as the engine streams them (before stops).
fn token_texts(ids: &[u32]) -> Vec<String> {
    let tok = tokenizer();
    let mut decoder = IncrementalDecoder::new();
    ids.iter().map(|&id| decoder.push(&tok, id)).collect()
}

#[tokio::test]
async fn stop_strings_split_across_tokens_end_the_sequence_before_them() {
    let model = random_model();
    let (engine, _) = engine();
    engine
        .install(resident("a", copy_of(&model)), true)
        .await
        .expect("install");
    let prompt = "The hero";
    let (ids, full) = reference(&model, prompt, 40, greedy(), 0);
    let texts = token_texts(&ids);
    let k = (8..texts.len() - 3)
        .find(|&k| (k..k + 3).all(|j| !texts[j].is_empty()))
        .expect("three non-empty token texts in a row");
    let last_char = |s: &str| s.chars().last().map(String::from).unwrap_or_default();
    let first_char = |s: &str| s.chars().next().map(String::from).unwrap_or_default();
    let over_two = format!("{}{}", last_char(&texts[k]), first_char(&texts[k + 1]));
    let over_three = format!(
        "{}{}{}",
        last_char(&texts[k]),
        texts[k + 1],
        first_char(&texts[k + 2])
    );

    for stop in [over_two, over_three] {
        let (mut req, rx) = request(prompt, 40, greedy(), 0);
        req.stop = vec!["never appears \u{1F600}".to_owned(), stop.clone()];
        let got = run(&engine, req, rx).await;
        let cut = full
            .find(&stop)
            .expect("the stop string is in the reference text");
        assert_eq!(got.reason(0), FinishReason::Stop, "stop {stop:?}");
        assert_eq!(got.text(0), &full[..cut], "stop {stop:?}");
        assert_eq!(got.streamed_text(0), &full[..cut]);
        assert!(got.tokens[&0].iter().all(|(_, t)| !t.contains(&stop)));
    }
}

#[tokio::test]
async fn the_end_of_text_token_ends_a_sequence_with_reason_eos() {
    // A model that always predicts end-of-text: every hidden state is `v`, and eos's
    // embedding is the one most aligned with it.
    let model = random_model();
    tch::no_grad(|| {
        let mut vars = model.var_store().variables();
        let v = Tensor::randn([64], (Kind::Float, Device::Cpu));
        let mut var = |name: &str| vars.remove(name).expect("variable");
        let _ = var("transformer.ln_f.weight").zero_();
        var("transformer.ln_f.bias").copy_(&v);
        var("transformer.wte.weight").get(50256).copy_(&(&v * 10.0));
    });
    let (engine, _) = engine();
    engine
        .install(resident("eos", model), true)
        .await
        .expect("install");
    let (req, rx) = request("Hello", 10, greedy(), 0);
    let got = run(&engine, req, rx).await;
    assert_eq!(got.reason(0), FinishReason::Eos);
    assert_eq!(got.ids(0), vec![50256]);
    assert_eq!(got.text(0), "");
}

#[tokio::test]
async fn a_model_with_nan_weights_is_refused_and_the_live_one_keeps_serving() {
    let (engine, _) = engine();
    engine
        .install(resident("good", random_model()), true)
        .await
        .expect("install");
    let bad = random_model();
    tch::no_grad(|| {
        let mut vars = bad.var_store().variables();
        let weight = vars
            .get_mut("transformer.h.0.ln_1.weight")
            .expect("variable");
        let _ = weight.fill_(f64::NAN);
    });
    let err = engine
        .install(resident("bad", bad), true)
        .await
        .expect_err("refused");
    assert!(err.contains("non-finite"), "{err}");
    assert_eq!(engine.live().expect("live").info.checkpoint_id, "good");
    assert_eq!(engine.resident().len(), 1);
    let (req, rx) = request("The", 5, greedy(), 0);
    let got = run(&engine, req, rx).await;
    assert_eq!(got.finished[&0].2, 5);
}

#[tokio::test]
async fn a_swap_keeps_streams_on_their_model_and_sends_new_ones_to_the_new_one() {
    let (model_a, model_b) = (random_model(), random_model());
    let (engine, _) = engine();
    engine
        .install(resident("a", copy_of(&model_a)), true)
        .await
        .expect("install a");
    let prompt = "Two rival schools";
    let (old_req, old_rx) = request(prompt, 100, greedy(), 0);
    let admitted = engine.submit(old_req).await.expect("admitted");
    assert_eq!(admitted.checkpoint_id, "a");

    engine
        .install(resident("b", copy_of(&model_b)), true)
        .await
        .expect("install b");
    assert_eq!(engine.live().expect("live").info.checkpoint_id, "b");
    let (new_req, new_rx) = request(prompt, 30, greedy(), 0);
    assert_eq!(
        engine
            .submit(new_req)
            .await
            .expect("admitted")
            .checkpoint_id,
        "b"
    );
    let (mut pinned, pinned_rx) = request(prompt, 30, greedy(), 0);
    pinned.checkpoint_id = Some("a".to_owned());
    assert_eq!(
        engine.submit(pinned).await.expect("admitted").checkpoint_id,
        "a"
    );

    let (_, ref_a100) = reference(&model_a, prompt, 100, greedy(), 0);
    let (_, ref_a30) = reference(&model_a, prompt, 30, greedy(), 0);
    let (_, ref_b30) = reference(&model_b, prompt, 30, greedy(), 0);
    assert_ne!(ref_a30, ref_b30, "the two random models differ");
    assert_eq!(collect(old_rx).await.text(0), ref_a100);
    assert_eq!(collect(new_rx).await.text(0), ref_b30);
    assert_eq!(collect(pinned_rx).await.text(0), ref_a30);

    let ids: Vec<String> = engine
        .resident()
        .into_iter()
        .map(|m| m.info.checkpoint_id)
        .collect();
    assert_eq!(ids, ["a", "b"]);
    engine.set_live("a").await.expect("rollback");
    assert_eq!(engine.live().expect("live").info.checkpoint_id, "a");
    assert!(engine.set_live("nope").await.is_err());
}

#[tokio::test]
async fn idle_old_models_are_evicted_beyond_the_resident_limit() {
    let (engine, _) = engine_with(32, 256, 2);
    for id in ["a", "b", "c"] {
        engine
            .install(resident(id, random_model()), true)
            .await
            .expect("install");
    }
    let ids: Vec<String> = engine
        .resident()
        .into_iter()
        .map(|m| m.info.checkpoint_id)
        .collect();
    assert_eq!(ids, ["b", "c"]);
    let (mut req, _rx) = request("The", 3, greedy(), 0);
    req.checkpoint_id = Some("a".to_owned());
    assert_eq!(
        engine.submit(req).await,
        Err(SubmitError::UnknownCheckpoint("a".to_owned()))
    );
}

#[tokio::test]
async fn requests_the_engine_cannot_take_are_refused_with_the_reason() {
    let (engine, _) = engine_with(1, 2, 3);
    let (req, _rx) = request("The", 3, greedy(), 0);
    assert_eq!(engine.submit(req).await, Err(SubmitError::NoModel));
    engine
        .install(resident("a", random_model()), false)
        .await
        .expect("install");
    assert_eq!(
        engine
            .live()
            .expect("the first model is live")
            .info
            .checkpoint_id,
        "a"
    );

    let (req, _rx) = request("The", 128, greedy(), 0);
    assert_eq!(
        engine.submit(req).await,
        Err(SubmitError::PromptTooLong { tokens: 1, max: 0 })
    );

    // One decoding slot, two queue slots: a burst of submissions overflows the queue.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20u64 {
        let engine = engine.clone();
        tasks.spawn(async move {
            let (req, rx) = request("The", 40, greedy(), i);
            match engine.submit(req).await {
                Ok(_) => Some(collect(rx).await),
                Err(SubmitError::QueueFull) => None,
                Err(e) => panic!("unexpected refusal {e}"),
            }
        });
    }
    let mut full = 0;
    while let Some(result) = tasks.join_next().await {
        match result.expect("task") {
            Some(s) => assert_eq!(s.finished[&0].2, 40),
            None => full += 1,
        }
    }
    assert!(full > 0, "some submissions found the queue full");
    assert_eq!(engine.queue_depth(), 0);

    let (mut req, rx) = request("The", 50, greedy(), 0);
    req.deadline = Some(Instant::now());
    let got = run(&engine, req, rx).await;
    assert!(got.deadline_exceeded);
    assert!(got.finished.is_empty());

    let (req, rx) = request("The", 0, greedy(), 0);
    let got = run(&engine, req, rx).await;
    assert_eq!(got.reason(0), FinishReason::Length);
    assert_eq!(got.finished[&0].2, 0);

    engine.shutdown();
    let (req, _rx) = request("The", 3, greedy(), 0);
    assert_eq!(engine.submit(req).await, Err(SubmitError::ShuttingDown));
    tokio::time::timeout(PATIENCE, engine.stopped())
        .await
        .expect("the thread exits");
}
