//! The engine's lifecycle on small random GPT-2 models on the CPU: clients that leave,
//! deadlines, full queues, refused models, hot swaps, rollback, eviction and shutdown.

mod engine_common;

use std::time::{Duration, Instant};

use engine_common::*;
use synopsis_generator::engine::{SeqEvent, SubmitError};
use synopsis_model::Gpt2;
use synopsis_proto::v1::FinishReason;
use tch::Device;

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
    let prompt = "Two rival schools";
    let model_a = random_model();
    let (_, ref_a30) = reference(&model_a, prompt, 30, greedy(), 0);
    // Random tiny models often just repeat the prompt's last token, two of them alike: draw the
    // second until its text differs, so the test can tell which model served a stream.
    let (model_b, ref_b30) = (0..20)
        .map(|_| {
            let model = random_model();
            let (_, text) = reference(&model, prompt, 30, greedy(), 0);
            (model, text)
        })
        .find(|(_, text)| *text != ref_a30)
        .expect("twenty random models all decode like the first");
    let (engine, _) = engine();
    engine
        .install(resident("a", copy_of(&model_a)), true)
        .await
        .expect("install a");
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

#[tokio::test]
async fn a_slow_client_does_not_stall_decoding_and_still_gets_every_event_in_order() {
    let model = random_model();
    let (engine, metrics) = engine();
    engine
        .install(resident("a", copy_of(&model)), true)
        .await
        .expect("install");
    let (mut req, _) = request("The", 40, greedy(), 0);
    let (events, rx) = tokio::sync::mpsc::channel(1);
    req.events = events;
    engine.submit(req).await.expect("admitted");

    // Nothing is read until the sequence has finished decoding: the engine kept its events.
    let deadline = Instant::now() + PATIENCE;
    while metrics.tokens_generated.get() < 40 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(metrics.tokens_generated.get(), 40);
    let got = collect(rx).await;
    let (ids, text) = reference(&model, "The", 40, greedy(), 0);
    assert_eq!(got.ids(0), ids);
    assert_eq!(got.streamed_text(0), text);
    assert_eq!(got.reason(0), FinishReason::Length);
}
