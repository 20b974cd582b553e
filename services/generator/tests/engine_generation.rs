//! What the engine generates on small random GPT-2 models on the CPU: the same tokens as a
//! plain full-forward loop and as the model crate's own loop, whoever shares the batch; stop
//! strings split across tokens and the end-of-text token end sequences as promised.

mod engine_common;

use engine_common::*;
use synopsis_model::generate::generate_tokens;
use synopsis_model::incremental::IncrementalDecoder;
use synopsis_proto::v1::FinishReason;
use tch::{Device, Kind, Tensor};

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

/// The GPU's sampling path (tensor operations over the batch) run on the CPU: every request,
/// sharing one batch with the others, streams the same tokens as on the host path.
#[tokio::test]
async fn sampling_on_the_device_streams_the_host_paths_tokens() {
    let model = random_model();
    let (host, _) = engine();
    let device = engine_sampling_on_device();
    for engine in [&host, &device] {
        engine
            .install(resident("a", copy_of(&model)), true)
            .await
            .expect("install");
    }
    let temperature_only = synopsis_model::SamplingParams {
        temperature: 1.2,
        ..synopsis_model::SamplingParams::default()
    };
    let top_k_only = synopsis_model::SamplingParams {
        temperature: 0.8,
        top_k: 20,
        ..synopsis_model::SamplingParams::default()
    };
    let cases = [
        ("The", greedy(), 0),
        ("In a distant future", sampled(), 42),
        ("Once upon a time", temperature_only, 7),
        ("A boy and his robot", top_k_only, 9),
    ];
    let mut streams = Vec::new();
    for engine in [&host, &device] {
        let mut pending = Vec::new();
        for (prompt, params, seed) in &cases {
            let (mut req, rx) = request(prompt, 24, params.clone(), *seed);
            req.n = 2;
            engine.submit(req).await.expect("admitted");
            pending.push(rx);
        }
        let mut got = Vec::new();
        for rx in pending {
            got.push(collect(rx).await);
        }
        streams.push(got);
    }
    let mut sampled_tokens = 0;
    for (case, (on_host, on_device)) in cases.iter().zip(streams[0].iter().zip(&streams[1])) {
        for index in 0..2 {
            assert_eq!(on_host.ids(index).len(), 24, "{case:?}");
            assert_eq!(
                on_host.ids(index),
                on_device.ids(index),
                "{case:?}, sequence {index}"
            );
            assert_eq!(on_host.text(index), on_device.text(index));
        }
        if case.1.temperature > 0.0 {
            // Two sequences of one sampled request differ: their seeds do.
            assert_ne!(on_host.ids(0), on_host.ids(1), "{case:?}");
            sampled_tokens += 48;
        }
    }
    assert_eq!(sampled_tokens, 3 * 48);
}
