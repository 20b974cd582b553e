//! Generation with the KV cache gives what recomputing the whole sequence gives, reproduces
//! with a seed, stops at end-of-text and respects the length and context limits.

use std::path::Path;

use synopsis_model::generate::{generate, generate_tokens};
use synopsis_model::{Gpt2, Gpt2Config, SamplingParams, Tokenizer, WeightDtype};
use tch::{Device, Kind, Tensor};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

/// The random-weight GPT-2 fixture (full vocabulary, 2-wide) and the GPT-2 tokenizer.
fn fixture() -> (Gpt2, Tokenizer) {
    let dir = Path::new(FIXTURES).join("fake_gpt2");
    let config = Gpt2Config::from_file(&dir.join("config.json")).unwrap();
    let model = Gpt2::load(
        &config,
        &dir.join("model.safetensors"),
        Device::Cpu,
        WeightDtype::F32,
    )
    .unwrap();
    let tok =
        Tokenizer::from_file(Path::new(FIXTURES).join("gpt2_tokenizer/tokenizer.json")).unwrap();
    (model, tok)
}

/// Greedy decoding the slow way: the full sequence through `forward` at every step.
fn greedy_without_cache(model: &Gpt2, tok: &Tokenizer, prompt: &str, n: usize) -> Vec<u32> {
    let mut ids: Vec<i64> = tok
        .encode(prompt)
        .unwrap()
        .iter()
        .map(|&i| i64::from(i))
        .collect();
    let mut out = Vec::new();
    tch::no_grad(|| {
        for _ in 0..n {
            let input = Tensor::from_slice(&ids).view([1, -1]);
            let logits = model
                .forward(&input, false)
                .select(1, -1)
                .view([-1])
                .to_kind(Kind::Float);
            let next = logits.argmax(0, false).int64_value(&[]) as u32;
            if next == tok.eos_id() {
                break;
            }
            out.push(next);
            ids.push(i64::from(next));
        }
    });
    out
}

#[test]
fn greedy_with_cache_matches_full_recomputation() {
    let (model, tok) = fixture();
    let prompt = "Once upon a time in Tokyo";
    let g = generate_tokens(&model, &tok, prompt, 12, &SamplingParams::greedy(), 0).unwrap();
    // Several decode steps, so the cache is really used.
    assert!(g.ids.len() >= 4, "{:?}", g.ids);
    assert_eq!(g.ids, greedy_without_cache(&model, &tok, prompt, 12));
    assert_eq!(g.prompt_tokens, tok.encode(prompt).unwrap().len());
    assert_eq!(g.text, tok.decode(&g.ids).unwrap());
    assert_eq!(g.logprobs.len(), g.ids.len());
    assert!(g.logprobs.iter().all(|lp| lp.is_finite() && *lp <= 0.0));
    assert_eq!(g.ids.len() == 12, !g.stopped_at_eos);
}

#[test]
fn seeded_sampling_reproduces_and_seeds_differ() {
    let (model, tok) = fixture();
    let params = SamplingParams {
        temperature: 1.0,
        top_k: 50,
        ..SamplingParams::default()
    };
    let a = generate_tokens(&model, &tok, "A hero", 20, &params, 7).unwrap();
    let b = generate_tokens(&model, &tok, "A hero", 20, &params, 7).unwrap();
    let c = generate_tokens(&model, &tok, "A hero", 20, &params, 8).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.ids, c.ids);
    assert_eq!(
        generate(&model, &tok, "A hero", 20, &params, 7).unwrap(),
        a.text
    );
    assert!(a.ids.len() <= 20);
}

#[test]
fn stops_at_end_of_text() {
    let (model, tok) = fixture();
    // Make end-of-text certain: constant final hidden state, only the eos embedding aligned.
    tch::no_grad(|| {
        let mut vars = model.var_store().variables();
        let mut var = |name: &str| vars.remove(name).unwrap();
        let _ = var("transformer.ln_f.weight").fill_(0.0);
        let _ = var("transformer.ln_f.bias").fill_(1.0);
        let mut wte = var("transformer.wte.weight");
        let _ = wte.fill_(0.0);
        let _ = wte.get(i64::from(tok.eos_id())).fill_(10.0);
    });
    let sampled = SamplingParams::default();
    for params in [SamplingParams::greedy(), sampled] {
        let g = generate_tokens(&model, &tok, "Anything", 50, &params, 1).unwrap();
        assert!(g.stopped_at_eos);
        assert!(g.ids.is_empty());
        assert_eq!(g.text, "");
    }
}

#[test]
fn length_and_context_limits_hold() {
    let (model, tok) = fixture();
    let g = generate_tokens(&model, &tok, "", 0, &SamplingParams::greedy(), 0).unwrap();
    assert!(g.ids.is_empty() && !g.stopped_at_eos);
    // An empty prompt starts from end-of-text.
    assert_eq!(g.prompt_tokens, 1);

    let mut config = Gpt2Config::preset("tiny").unwrap();
    config.n_positions = 16;
    let small = Gpt2::new(&config, Device::Cpu);
    let long_prompt = "word ".repeat(40);
    let g = generate_tokens(&small, &tok, &long_prompt, 10, &SamplingParams::greedy(), 0).unwrap();
    assert_eq!(g.prompt_tokens, 15);
    assert!(g.ids.len() <= 1);

    let bad = SamplingParams {
        temperature: -1.0,
        ..SamplingParams::default()
    };
    assert!(generate(&model, &tok, "x", 5, &bad, 0).is_err());
}
