//! Malformed requests for every RPC of both services — empty, huge, out of range, unknown
//! ids — each answered with its documented status (INVALID_ARGUMENT naming the field,
//! NOT_FOUND for unknown ids, FAILED_PRECONDITION for a directory that is not a model), and
//! both servers still healthy afterwards. A property test then throws random generation
//! requests at the generator and checks each answer against the documented rules.

mod e2e;

use e2e::{generate, tiny_request, Generator};
use proptest::prelude::*;
use synopsis_proto::v1 as pb;
use tonic::Code;

/// A syntactically valid checkpoint id no trainer wrote.
const UNKNOWN_CKPT: &str = "run-20000101-000000-0000/epoch-0001-step-000001";
const UNKNOWN_RUN: &str = "run-20000101-000000-0000";

fn train_with(edit: impl FnOnce(&mut pb::TrainRequest)) -> pb::TrainRequest {
    let mut request = tiny_request(e2e::CORPUS);
    edit(&mut request);
    request
}

fn hyper(edit: impl FnOnce(&mut pb::HyperParams)) -> pb::TrainRequest {
    train_with(|r| edit(r.hyper.as_mut().unwrap()))
}

fn model(edit: impl FnOnce(&mut pb::ModelSpec)) -> pb::TrainRequest {
    train_with(|r| edit(r.model.as_mut().unwrap()))
}

fn code<T>(result: Result<T, tonic::Status>) -> (Code, String) {
    match result {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

fn check(what: &str, (got, message): (Code, String), want: Code, field: &str) {
    assert_eq!(got, want, "{what}: {message}");
    assert!(
        message.contains(field),
        "{what}: message does not name {field:?}: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_answers_malformed_requests_with_its_documented_status() {
    let dir = tempfile::tempdir().unwrap();
    let (trainer, checkpoint) = e2e::trained(dir.path()).await;
    let mut t = trainer.client().await;
    let run_id = checkpoint.run_id.clone();

    // UploadDataset.
    let upload = |chunks: Vec<pb::DatasetChunk>| tokio_stream::iter(chunks);
    let one = |filename: &str, data: &[u8]| {
        vec![pb::DatasetChunk {
            filename: filename.into(),
            data: data.to_vec(),
        }]
    };
    check(
        "upload: no chunk",
        code(t.upload_dataset(upload(vec![])).await),
        Code::InvalidArgument,
        "",
    );
    check(
        "upload: empty file",
        code(t.upload_dataset(upload(one("x.csv", b""))).await),
        Code::InvalidArgument,
        "",
    );

    // Train.
    let trains: Vec<(&str, pb::TrainRequest, Code, &str)> = vec![
        (
            "empty",
            pb::TrainRequest::default(),
            Code::InvalidArgument,
            "data",
        ),
        (
            "bad dataset id",
            train_with(|r| r.data = Some(pb::train_request::Data::DatasetId("nope".into()))),
            Code::InvalidArgument,
            "data",
        ),
        (
            "unknown dataset",
            train_with(|r| r.data = Some(pb::train_request::Data::DatasetId("0".repeat(64)))),
            Code::NotFound,
            "",
        ),
        (
            "missing data path",
            train_with(|r| r.data = Some(pb::train_request::Data::DataPath("missing.csv".into()))),
            Code::NotFound,
            "",
        ),
        (
            "unknown text column",
            train_with(|r| r.text_column = "Nope".into()),
            Code::InvalidArgument,
            "Nope",
        ),
        (
            "unknown condition column",
            train_with(|r| r.condition_columns = vec!["Nope".into()]),
            Code::InvalidArgument,
            "Nope",
        ),
        (
            "unknown preset",
            model(|m| m.preset = "gigantic".into()),
            Code::InvalidArgument,
            "preset",
        ),
        (
            "huge n_layer",
            model(|m| m.n_layer = 100_000),
            Code::InvalidArgument,
            "n_layer",
        ),
        (
            "huge n_embd",
            model(|m| m.n_embd = 1 << 30),
            Code::InvalidArgument,
            "n_embd",
        ),
        (
            "huge vocabulary",
            model(|m| m.vocab_size = u32::MAX),
            Code::InvalidArgument,
            "vocab_size",
        ),
        (
            "n_head not dividing n_embd",
            model(|m| m.n_head = 3),
            Code::InvalidArgument,
            "n_head",
        ),
        (
            "huge context",
            model(|m| m.n_positions = 1 << 30),
            Code::InvalidArgument,
            "n_positions",
        ),
        (
            "negative learning rate",
            hyper(|h| h.learning_rate = -1.0),
            Code::InvalidArgument,
            "learning_rate",
        ),
        (
            "NaN learning rate",
            hyper(|h| h.learning_rate = f64::NAN),
            Code::InvalidArgument,
            "learning_rate",
        ),
        (
            "eval fraction above 1",
            hyper(|h| h.eval_fraction = 2.0),
            Code::InvalidArgument,
            "eval_fraction",
        ),
        (
            "min_chars above max_chars",
            hyper(|h| {
                h.min_chars = 500;
                h.max_chars = 100;
            }),
            Code::InvalidArgument,
            "chars",
        ),
        (
            "seq_len beyond the context",
            hyper(|h| h.seq_len = 4096),
            Code::InvalidArgument,
            "seq_len",
        ),
        (
            "huge batch",
            hyper(|h| h.batch_size = u32::MAX),
            Code::InvalidArgument,
            "batch_size",
        ),
        (
            "malformed resume_from",
            pb::TrainRequest {
                resume_from: "nope".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "resume_from",
        ),
        (
            "unknown resume_from",
            pb::TrainRequest {
                resume_from: UNKNOWN_CKPT.into(),
                ..Default::default()
            },
            Code::NotFound,
            "",
        ),
        (
            "resume_from with a model",
            pb::TrainRequest {
                resume_from: checkpoint.checkpoint_id.clone(),
                model: Some(pb::ModelSpec {
                    n_layer: 3,
                    ..Default::default()
                }),
                ..Default::default()
            },
            Code::InvalidArgument,
            "model",
        ),
        (
            "base model without --models-root",
            train_with(|r| {
                r.model = None;
                r.base_model = "gpt2".into();
            }),
            Code::FailedPrecondition,
            "models-root",
        ),
    ];
    for (what, request, want, field) in trains {
        check(
            &format!("train: {what}"),
            code(t.train(request).await),
            want,
            field,
        );
    }

    // The run and checkpoint RPCs.
    let watch = |id: &str| pb::WatchRunRequest {
        run_id: id.into(),
        from_seq: 0,
    };
    check(
        "watch: empty",
        code(t.watch_run(watch("")).await),
        Code::InvalidArgument,
        "run_id",
    );
    check(
        "watch: unknown",
        code(t.watch_run(watch(UNKNOWN_RUN)).await),
        Code::NotFound,
        UNKNOWN_RUN,
    );
    check(
        "watch: past the end of a finished run",
        code(
            t.watch_run(pb::WatchRunRequest {
                run_id: run_id.clone(),
                from_seq: u64::MAX,
            })
            .await,
        ),
        Code::OutOfRange,
        "from_seq",
    );
    let stop = |id: &str| pb::StopRunRequest { run_id: id.into() };
    check(
        "stop: empty",
        code(t.stop_run(stop("")).await),
        Code::InvalidArgument,
        "run_id",
    );
    check(
        "stop: unknown",
        code(t.stop_run(stop(UNKNOWN_RUN)).await),
        Code::NotFound,
        UNKNOWN_RUN,
    );
    let stopped = t
        .stop_run(stop(&run_id))
        .await
        .expect("stopping a finished run")
        .into_inner();
    assert_eq!(stopped.state, pb::RunState::Completed as i32);
    check(
        "list runs",
        code(t.list_runs(pb::ListRunsRequest {}).await),
        Code::Ok,
        "",
    );
    let list = |id: &str| pb::ListCheckpointsRequest { run_id: id.into() };
    check(
        "list checkpoints: bad id",
        code(t.list_checkpoints(list("a/b")).await),
        Code::InvalidArgument,
        "run_id",
    );
    let none = t
        .list_checkpoints(list(UNKNOWN_RUN))
        .await
        .unwrap()
        .into_inner();
    assert!(none.checkpoints.is_empty());
    let watch_ckpt = |id: &str| pb::WatchCheckpointsRequest { run_id: id.into() };
    check(
        "watch checkpoints: bad id",
        code(t.watch_checkpoints(watch_ckpt("a b")).await),
        Code::InvalidArgument,
        "run_id",
    );
    let fetch = |id: &str| pb::FetchCheckpointRequest {
        checkpoint_id: id.into(),
        skip_optimizer: false,
    };
    check(
        "fetch: empty",
        code(t.fetch_checkpoint(fetch("")).await),
        Code::InvalidArgument,
        "checkpoint_id",
    );
    check(
        "fetch: malformed",
        code(t.fetch_checkpoint(fetch("nope")).await),
        Code::InvalidArgument,
        "checkpoint_id",
    );
    check(
        "fetch: unknown",
        code(t.fetch_checkpoint(fetch(UNKNOWN_CKPT)).await),
        Code::NotFound,
        UNKNOWN_CKPT,
    );

    // Generator.
    let model_dir = e2e::checkpoint_dir(&trainer.root, &checkpoint.checkpoint_id);
    let generator = Generator::start(&[
        "--model".into(),
        model_dir.display().to_string(),
        "--load-root".into(),
        dir.path().display().to_string(),
    ])
    .await;
    let mut g = generator.client().await;
    let base = e2e::generate_request(4);
    let sampling = |edit: fn(&mut pb::SamplingParams)| {
        let mut request = base.clone();
        edit(request.sampling.as_mut().unwrap());
        request
    };
    let with = |edit: fn(&mut pb::GenerateRequest)| {
        let mut request = base.clone();
        edit(&mut request);
        request
    };
    let generates: Vec<(&str, pb::GenerateRequest, Code, &str)> = vec![
        (
            "huge prompt",
            with(|r| r.prompt = "word ".repeat(3000)),
            Code::InvalidArgument,
            "prompt",
        ),
        (
            "max_new_tokens over the cap",
            with(|r| r.max_new_tokens = u32::MAX),
            Code::InvalidArgument,
            "max_new_tokens",
        ),
        (
            "n over the limit",
            with(|r| r.n = u32::MAX),
            Code::InvalidArgument,
            "n ",
        ),
        (
            "NaN temperature",
            sampling(|s| s.temperature = f32::NAN),
            Code::InvalidArgument,
            "sampling.temperature",
        ),
        (
            "negative temperature",
            sampling(|s| s.temperature = -1.0),
            Code::InvalidArgument,
            "sampling.temperature",
        ),
        (
            "infinite temperature",
            sampling(|s| s.temperature = f32::INFINITY),
            Code::InvalidArgument,
            "sampling.temperature",
        ),
        (
            "top_p above 1",
            sampling(|s| s.top_p = 1.5),
            Code::InvalidArgument,
            "sampling.top_p",
        ),
        (
            "negative top_p",
            sampling(|s| s.top_p = -0.1),
            Code::InvalidArgument,
            "sampling.top_p",
        ),
        (
            "negative repetition penalty",
            sampling(|s| s.repetition_penalty = -2.0),
            Code::InvalidArgument,
            "sampling.repetition_penalty",
        ),
        (
            "empty stop string",
            with(|r| r.stop = vec![String::new()]),
            Code::InvalidArgument,
            "stop[0]",
        ),
        (
            "too many stop strings",
            with(|r| r.stop = (0..100).map(|i| i.to_string()).collect()),
            Code::InvalidArgument,
            "stop",
        ),
        (
            "unknown checkpoint",
            with(|r| r.checkpoint_id = UNKNOWN_CKPT.into()),
            Code::NotFound,
            UNKNOWN_CKPT,
        ),
        (
            "checkpoint id with ..",
            with(|r| r.checkpoint_id = "../../etc".into()),
            Code::NotFound,
            "",
        ),
        (
            "condition with an empty name",
            with(|r| {
                r.conditions.insert(" ".into(), "x".into());
            }),
            Code::InvalidArgument,
            "conditions",
        ),
        (
            "condition with a line break",
            with(|r| {
                r.conditions.insert("Genres".into(), "a\nb".into());
            }),
            Code::InvalidArgument,
            "conditions.Genres",
        ),
        (
            "condition the checkpoint lacks",
            with(|r| {
                r.conditions.insert("Nope".into(), "x".into());
            }),
            Code::InvalidArgument,
            "Nope",
        ),
    ];
    for (what, request, want, field) in generates {
        check(
            &format!("generate: {what}"),
            code(generate(&mut g, request).await),
            want,
            field,
        );
    }
    check(
        "model info",
        code(g.model_info(pb::ModelInfoRequest {}).await),
        Code::Ok,
        "",
    );
    use pb::load_checkpoint_request::Source;
    let load = |source: Option<Source>| pb::LoadCheckpointRequest { source };
    let loads: Vec<(&str, pb::LoadCheckpointRequest, Code, &str)> = vec![
        ("no source", load(None), Code::InvalidArgument, "source"),
        (
            "empty id",
            load(Some(Source::CheckpointId(String::new()))),
            Code::InvalidArgument,
            "checkpoint_id",
        ),
        (
            "unknown id",
            load(Some(Source::CheckpointId(UNKNOWN_CKPT.into()))),
            Code::NotFound,
            UNKNOWN_CKPT,
        ),
        (
            "empty path",
            load(Some(Source::Path(String::new()))),
            Code::InvalidArgument,
            "path",
        ),
        // Outside the load roots, missing or not: the same PERMISSION_DENIED (a NOT_FOUND
        // would tell a caller which paths exist on the host).
        (
            "missing path outside the load roots",
            load(Some(Source::Path("/no/such/dir".into()))),
            Code::PermissionDenied,
            "/no/such/dir",
        ),
        (
            "missing path inside the load roots",
            load(Some(Source::Path(
                dir.path().join("no-such-dir").display().to_string(),
            ))),
            Code::NotFound,
            "no-such-dir",
        ),
        (
            "path with NUL",
            load(Some(Source::Path("/tmp\0/x".into()))),
            Code::PermissionDenied,
            "",
        ),
        (
            "path-like checkpoint id",
            load(Some(Source::CheckpointId("../../etc/passwd".into()))),
            Code::InvalidArgument,
            "checkpoint_id",
        ),
        (
            "path outside the load roots",
            load(Some(Source::Path("/tmp".into()))),
            Code::PermissionDenied,
            "--load-root",
        ),
        (
            "not a model",
            load(Some(Source::Path(dir.path().display().to_string()))),
            Code::FailedPrecondition,
            "",
        ),
    ];
    for (what, request, want, field) in loads {
        check(
            &format!("load: {what}"),
            code(g.load_checkpoint(request).await),
            want,
            field,
        );
    }

    // Both still healthy, and still doing their work.
    e2e::assert_serving(trainer.url()).await;
    e2e::assert_serving(generator.url()).await;
    let info = g
        .model_info(pb::ModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.live_checkpoint_id, checkpoint.checkpoint_id);
    let (_, done) = generate(&mut g, base).await.unwrap();
    assert_eq!(done.len(), 1);
    let runs = t
        .list_runs(pb::ListRunsRequest {})
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert_eq!(runs.len(), 1, "a malformed request started a run: {runs:?}");
}

/// The documented validation rules, as the property test's oracle: which field, if any, a
/// request breaks (server defaults: cap 512, n 8, 8 stop strings of at most 64 characters,
/// prompts of at most 8000 characters).
fn broken_field(r: &pb::GenerateRequest) -> Option<&'static str> {
    let s = r.sampling.unwrap_or_default();
    if r.prompt.chars().count() > 8000 {
        Some("prompt")
    } else if r.max_new_tokens > 512 {
        Some("max_new_tokens")
    } else if r.n > 8 || (r.sampling.is_none() && r.n > 1) {
        Some("n")
    } else if !s.temperature.is_finite() || s.temperature < 0.0 {
        Some("sampling.temperature")
    } else if !s.top_p.is_finite() || !(0.0..=1.0).contains(&s.top_p) {
        Some("sampling.top_p")
    } else if !s.repetition_penalty.is_finite()
        || (s.repetition_penalty != 0.0 && s.repetition_penalty < 1.0)
    {
        Some("sampling.repetition_penalty")
    } else if r.stop.len() > 8 {
        Some("stop")
    } else if r
        .stop
        .iter()
        .any(|x| x.is_empty() || x.chars().count() > 64)
    {
        Some("stop[")
    } else {
        None
    }
}

fn float() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(0.0f32),
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(-1.0f32),
        0.0f32..2.0,
    ]
}

fn request() -> impl Strategy<Value = pb::GenerateRequest> {
    (
        prop_oneof![
            Just(String::new()),
            "[a-z ]{1,20}",
            Just("é漢🙂".repeat(3000))
        ],
        prop_oneof![0u32..6, 510u32..515, Just(u32::MAX)],
        prop_oneof![0u32..3, 8u32..10],
        (
            float(),
            0u32..1000,
            float(),
            float(),
            proptest::option::of(any::<u64>()),
        ),
        proptest::collection::vec(prop_oneof!["", "[a-z]{1,3}", "x{64,66}"], 0..10),
    )
        .prop_map(|(prompt, max_new_tokens, n, (t, k, p, rp, seed), stop)| {
            pb::GenerateRequest {
                prompt,
                // Keep accepted requests short: the property is about validation.
                max_new_tokens: if max_new_tokens > 512 {
                    max_new_tokens
                } else {
                    max_new_tokens.min(3)
                },
                sampling: Some(pb::SamplingParams {
                    temperature: t,
                    top_k: k,
                    top_p: p,
                    repetition_penalty: rp,
                    seed,
                }),
                stop,
                n,
                ..Default::default()
            }
        })
}

#[test]
fn random_generate_requests_get_the_documented_answer() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (generator, client) = runtime.block_on(async {
        let (trainer, checkpoint) = e2e::trained(dir.path()).await;
        let model = e2e::checkpoint_dir(&trainer.root, &checkpoint.checkpoint_id);
        let generator = Generator::start(&["--model".into(), model.display().to_string()]).await;
        let client = generator.client().await;
        (generator, client)
    });
    let config = ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(request in request())| {
        let expected = broken_field(&request);
        let mut client = client.clone();
        let result = runtime.block_on(generate(&mut client, request.clone()));
        match (expected, result) {
            (None, Ok((_, done))) => {
                prop_assert_eq!(done.len() as u32, request.n.max(1));
            }
            // A valid request may still exceed the model's context once tokenized.
            (None, Err(s)) => {
                prop_assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
                prop_assert!(s.message().starts_with("prompt"), "{}", s.message());
            }
            (Some(field), Err(s)) => {
                prop_assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
                prop_assert!(s.message().starts_with(field), "want {}: {}", field, s.message());
            }
            (Some(field), Ok(_)) => prop_assert!(false, "accepted a request breaking {}", field),
        }
    });
    runtime.block_on(e2e::assert_serving(generator.url()));
}
