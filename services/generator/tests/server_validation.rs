//! Every invalid field of a Generate call is refused with INVALID_ARGUMENT naming the field, and
//! the server keeps serving afterwards.

mod server_support;

use server_support::*;
use synopsis_proto::v1 as pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

fn with_sampling(f: impl FnOnce(&mut pb::SamplingParams)) -> pb::GenerateRequest {
    let mut req = request("A young pilot", 8);
    f(req.sampling.as_mut().unwrap());
    req
}

fn with(f: impl FnOnce(&mut pb::GenerateRequest)) -> pb::GenerateRequest {
    let mut req = request("A young pilot", 8);
    f(&mut req);
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalid_field_is_named_and_the_server_stays_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ck-a");
    write_tiny_checkpoint(
        &ckpt,
        "run-test/ck-a",
        1,
        serde_json::json!({"conditioning": {"columns": ["Genres", "Name"], "labels": ["Genres", "Title"]}}),
    );
    let server = TestServer::start(&["--model", ckpt.to_str().unwrap()]).await;
    server
        .wait_for_info("the model to be live", |i| !i.live_checkpoint_id.is_empty())
        .await;
    let mut client = server.client().await;

    let cases: Vec<(pb::GenerateRequest, &str)> = vec![
        (
            with_sampling(|s| s.temperature = f32::NAN),
            "sampling.temperature",
        ),
        (
            with_sampling(|s| s.temperature = -1.0),
            "sampling.temperature",
        ),
        (
            with_sampling(|s| s.temperature = f32::INFINITY),
            "sampling.temperature",
        ),
        (with_sampling(|s| s.top_p = 1.01), "sampling.top_p"),
        (with_sampling(|s| s.top_p = -0.5), "sampling.top_p"),
        (with_sampling(|s| s.top_p = f32::NAN), "sampling.top_p"),
        (
            with_sampling(|s| s.repetition_penalty = -0.1),
            "sampling.repetition_penalty",
        ),
        (
            with_sampling(|s| s.repetition_penalty = f32::INFINITY),
            "sampling.repetition_penalty",
        ),
        (with(|r| r.max_new_tokens = 513), "max_new_tokens"),
        (with(|r| r.n = 9), "n"),
        (
            with_sampling(|s| s.repetition_penalty = 0.5),
            "sampling.repetition_penalty",
        ),
        (
            with(|r| {
                r.sampling = None;
                r.n = 2
            }),
            "n",
        ),
        (with(|r| r.stop = vec!["x".into(); 9]), "stop"),
        (with(|r| r.stop = vec![String::new()]), "stop[0]"),
        (
            with(|r| r.stop = vec!["ok".into(), "s".repeat(65)]),
            "stop[1]",
        ),
        (with(|r| r.prompt = "x".repeat(8001)), "prompt"),
        // Fits in characters, not in the model's 128 positions with 100 new tokens.
        (
            with(|r| {
                r.prompt = "word ".repeat(100);
                r.max_new_tokens = 100
            }),
            "prompt",
        ),
        (
            with(|r| {
                r.conditions.insert("Studio".into(), "Sunrise".into());
            }),
            "conditions.Studio",
        ),
        (
            with(|r| {
                r.conditions.insert("Genres".into(), "Action ".repeat(2000));
            }),
            "conditions.Genres",
        ),
    ];
    for (req, field) in cases {
        let status = client.generate(req.clone()).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(field),
            "{field}: message {:?} does not name the field",
            status.message()
        );
    }

    let status = client
        .generate(with(|r| r.checkpoint_id = "no-such-checkpoint".into()))
        .await
        .expect_err("unknown checkpoint");
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("no-such-checkpoint"));

    let status = client
        .load_checkpoint(pb::LoadCheckpointRequest { source: None })
        .await
        .expect_err("no source");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("source"));

    // Still healthy, and a valid request with known conditions runs on the template.
    assert_eq!(server.health("").await, ServingStatus::Serving);
    let ok = generate(
        &mut client,
        with(|r| {
            r.conditions.insert("Genres".into(), "Mecha".into());
            r.conditions.insert("title".into(), "Steel\n Sky".into());
        }),
    )
    .await
    .expect("valid request");
    assert!(ok.error.is_none(), "{:?}", ok.error);
    let started = ok.started.expect("started");
    assert_eq!(
        started.model_input,
        "Genres: Mecha\nTitle: Steel Sky\nSynopsis: A young pilot"
    );
    assert_eq!(started.checkpoint_id, "run-test/ck-a");
    assert_eq!(ok.finished.len(), 1);
    let info = server.model_info().await;
    assert_eq!(info.condition_columns, vec!["Genres", "Name"]);
}
