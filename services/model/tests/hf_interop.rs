//! Weights move both ways between this crate and Hugging Face `transformers`.

mod support;

use support::*;
use synopsis_model::{Gpt2, Gpt2Config, WeightDtype};
use tch::{Device, Kind, Tensor};

#[test]
fn hf_random_gpt2_matches_reference_logits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    hf_interop(&[
        "make-reference",
        out,
        fixture("gpt2_tokenizer").to_str().unwrap(),
    ]);

    let config = Gpt2Config::from_file(&dir.path().join("config.json")).unwrap();
    let model = Gpt2::load(
        &config,
        &dir.path().join("model.safetensors"),
        Device::Cpu,
        WeightDtype::F32,
    )
    .unwrap();
    let reference = dir.path().join("reference.safetensors");
    for i in 0..2 {
        let ids = read_tensor(&reference, &format!("ids_{i}")).to_kind(Kind::Int64);
        let expected = read_tensor(&reference, &format!("logits_{i}"));
        let logits = tch::no_grad(|| model.forward(&ids.unsqueeze(0), false)).squeeze_dim(0);
        let diff = max_abs_diff(&logits, &expected);
        assert!(diff <= 1e-4, "prompt {i}: max abs diff {diff} > 1e-4");
    }
}

#[test]
fn shared_fake_gpt2_fixture_loads_and_runs() {
    let dir = fixture("fake_gpt2");
    let config = Gpt2Config::from_file(&dir.join("config.json")).unwrap();
    let model = Gpt2::load(
        &config,
        &dir.join("model.safetensors"),
        Device::Cpu,
        WeightDtype::F32,
    )
    .unwrap();
    let ids = Tensor::from_slice(&[15496i64, 995]).unsqueeze(0);
    let logits = tch::no_grad(|| model.forward(&ids, false));
    assert_eq!(logits.size(), vec![1, 2, 50257]);
    assert!(bool::try_from(logits.isfinite().all()).unwrap());
}

#[test]
fn unprefixed_tensor_names_load() {
    // tiny_gpt2 was saved as a bare GPT2Model: `wte.weight`, `h.0.*`, no `transformer.` prefix.
    let dir = fixture("tiny_gpt2");
    let config = Gpt2Config::from_file(&dir.join("config.json")).unwrap();
    let model = Gpt2::load(
        &config,
        &dir.join("model.safetensors"),
        Device::Cpu,
        WeightDtype::F32,
    )
    .unwrap();
    let logits =
        tch::no_grad(|| model.forward(&Tensor::from_slice(&[1i64, 2, 3]).unsqueeze(0), false));
    assert_eq!(logits.size(), vec![1, 3, 21]);
}

#[test]
fn rust_saved_model_loads_in_transformers_with_same_logits_and_greedy_text() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Gpt2Config::preset("tiny").unwrap();
    config.n_layer = 2;
    config.n_embd = 64;
    config.n_head = 4;
    tch::manual_seed(7);
    let model = Gpt2::new(&config, Device::Cpu);
    model
        .save_safetensors(&dir.path().join("model.safetensors"))
        .unwrap();
    config.save(&dir.path().join("config.json")).unwrap();
    std::fs::copy(
        fixture("gpt2_tokenizer/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();

    let report = dir.path().join("hf.json");
    hf_interop(&[
        "check-ours",
        dir.path().to_str().unwrap(),
        report.to_str().unwrap(),
    ]);
    let records: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    for record in records.as_array().unwrap() {
        let ids: Vec<i64> = serde_json::from_value(record["ids"].clone()).unwrap();
        let hf_last: Vec<f32> = serde_json::from_value(record["last_logits"].clone()).unwrap();
        let hf_greedy: Vec<i64> = serde_json::from_value(record["greedy"].clone()).unwrap();

        let logits = tch::no_grad(|| model.forward(&Tensor::from_slice(&ids).unsqueeze(0), false));
        let last = logits.select(1, -1).squeeze_dim(0);
        let diff = max_abs_diff(&last, &Tensor::from_slice(&hf_last));
        assert!(diff <= 1e-4, "last-position logits differ by {diff}");

        let mut cache = model.new_cache(1, 64);
        let mut next = Tensor::from_slice(&ids).unsqueeze(0);
        let mut ours = Vec::new();
        for _ in 0..hf_greedy.len() {
            let mask = Tensor::ones(next.size(), (Kind::Bool, Device::Cpu));
            let logits = tch::no_grad(|| model.forward_cached_last(&next, &mask, &mut cache));
            let token = logits.argmax(-1, false).int64_value(&[0]);
            ours.push(token);
            next = Tensor::from_slice(&[token]).unsqueeze(0);
        }
        assert_eq!(
            ours, hf_greedy,
            "greedy continuation of {}",
            record["prompt"]
        );
    }
}

/// Writes GPT-2's `vocab.json` and `merges.txt` (what `GPT2Tokenizer.save_pretrained`
/// writes) from the fixture's `tokenizer.json`, which holds the same data.
fn write_slow_tokenizer(dir: &std::path::Path) {
    let text = std::fs::read_to_string(fixture("gpt2_tokenizer/tokenizer.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let model = &json["model"];
    std::fs::write(
        dir.join("vocab.json"),
        serde_json::to_string(&model["vocab"]).unwrap(),
    )
    .unwrap();
    let mut merges = String::from("#version: 0.2\n");
    for merge in model["merges"].as_array().unwrap() {
        merges.push_str(merge.as_str().unwrap());
        merges.push('\n');
    }
    std::fs::write(dir.join("merges.txt"), merges).unwrap();
}

/// A Hugging Face GPT-2 directory with `vocab.json` + `merges.txt` and no `tokenizer.json`
/// (the original project's fine-tuned output) loads, with GPT-2's exact ids.
#[test]
fn a_directory_with_vocab_and_merges_loads_with_gpt2_ids() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("fake_gpt2").join(file), dir.path().join(file)).unwrap();
    }
    write_slow_tokenizer(dir.path());
    let loaded =
        synopsis_model::checkpoint::load_model_dir(dir.path(), Device::Cpu, WeightDtype::F32)
            .expect("a vocab.json + merges.txt directory loads");
    assert!(
        loaded.files.contains_key("merges.txt"),
        "{:?}",
        loaded.files.keys()
    );
    let slow = loaded.tokenizer;
    let fast =
        synopsis_model::Tokenizer::from_file(fixture("gpt2_tokenizer/tokenizer.json")).unwrap();
    assert_eq!(slow.encode("Hello world").unwrap(), vec![15496, 995]);
    assert_eq!(slow.eos_id(), 50256);
    for text in [
        "In the year 2199, humanity's last fleet drifts  past Jupiter.\n",
        "Ça a été très déjà-vu 🦀 東京<|endoftext|>",
    ] {
        assert_eq!(
            slow.encode(text).unwrap(),
            fast.encode(text).unwrap(),
            "{text}"
        );
    }
    assert_eq!(slow.vocab_size(), fast.vocab_size());
}
