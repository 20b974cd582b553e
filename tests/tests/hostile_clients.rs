//! What a hostile or careless client sends, over real sockets: every string field of every
//! request at 64 KiB and with control characters, every numeric field at its type's extremes,
//! in each RPC of both services. Each answer must be a status the server delivered (never a
//! transport error: a status too long for HTTP/2 metadata never reaches the client), at most
//! a few hundred bytes with no control character, and both servers stay healthy.

mod e2e;

use std::future::Future;

use e2e::{Generator, LONG};
use synopsis_proto::v1 as pb;
use synopsis_proto::v1::generator_client::GeneratorClient;
use synopsis_proto::v1::trainer_client::TrainerClient;
use tonic::transport::Channel;
use tonic::Status;

/// Longest status message accepted, in bytes.
const MAX_MESSAGE_BYTES: usize = 500;

/// The hostile values of a string field.
fn hostile_strings() -> Vec<(&'static str, String)> {
    vec![
        ("64 KiB", "A".repeat(64 * 1024)),
        (
            "control characters",
            "\u{1b}[2J\u{1b}[31mred\r\n\0bell\u{7}".into(),
        ),
        (
            "64 KiB of control characters",
            "\u{1b}[31m\n\"".repeat(64 * 1024 / 8),
        ),
    ]
}

/// Checks one answer; `what` names the RPC, field and value.
fn check(what: &str, answer: Result<(), Status>) {
    let Err(status) = answer else { return };
    assert!(
        std::error::Error::source(&status).is_none(),
        "{what}: a transport error, not a delivered status: {status:?}"
    );
    let message = status.message();
    assert!(
        message.len() <= MAX_MESSAGE_BYTES,
        "{what}: a {}-byte message: {}…",
        message.len(),
        message.chars().take(200).collect::<String>()
    );
    assert!(
        !message.chars().any(char::is_control),
        "{what}: control characters in {message:?}"
    );
    assert!(
        !message.contains("frame #") && !message.contains("c10::"),
        "{what}: libtorch's text reached the client: {message}"
    );
}

/// `call` under a generous hang guard (a hang is a failure, not a slow answer).
async fn guarded<F: Future<Output = Result<(), Status>>>(
    what: &str,
    call: F,
) -> Result<(), Status> {
    tokio::time::timeout(LONG, call)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer"))
}

/// Reads a stream to its end; the first error is the answer.
async fn drain<T>(stream: tonic::Streaming<T>) -> Result<(), Status> {
    let mut stream = stream;
    while stream.message().await?.is_some() {}
    Ok(())
}

/// A Train call: a run it starts is stopped at once and followed to its end.
async fn train(t: &mut TrainerClient<Channel>, request: pb::TrainRequest) -> Result<(), Status> {
    let mut stream = t.train(request).await?.into_inner();
    if let Some(first) = stream.message().await? {
        t.stop_run(pb::StopRunRequest {
            run_id: first.run_id,
        })
        .await?;
    }
    drain(stream).await
}

type TrainEdit = Box<dyn Fn(&mut pb::TrainRequest, &str)>;

fn train_string_fields() -> Vec<(&'static str, TrainEdit)> {
    use pb::train_request::Data;
    vec![
        (
            "dataset_id",
            Box::new(|r, v| r.data = Some(Data::DatasetId(v.into()))),
        ),
        (
            "data_path",
            Box::new(|r, v| r.data = Some(Data::DataPath(v.into()))),
        ),
        ("text_column", Box::new(|r, v| r.text_column = v.into())),
        (
            "condition_columns",
            Box::new(|r, v| r.condition_columns = vec![v.into()]),
        ),
        ("base_model", Box::new(|r, v| r.base_model = v.into())),
        ("tokenizer", Box::new(|r, v| r.tokenizer = v.into())),
        ("resume_from", Box::new(|r, v| r.resume_from = v.into())),
        ("run_name", Box::new(|r, v| r.run_name = v.into())),
        (
            "sample_prompts",
            Box::new(|r, v| r.sample_prompts = vec![v.into()]),
        ),
        (
            "model.preset",
            Box::new(|r, v| r.model.as_mut().unwrap().preset = v.into()),
        ),
    ]
}

type TrainNumber = Box<dyn Fn(&mut pb::TrainRequest)>;

fn train_numeric_fields() -> Vec<(String, TrainNumber)> {
    let mut out: Vec<(String, TrainNumber)> = Vec::new();
    type U32Field = fn(&mut pb::TrainRequest) -> &mut u32;
    let u32s: [(&str, U32Field); 14] = [
        ("model.n_layer", |r| &mut r.model.as_mut().unwrap().n_layer),
        ("model.n_embd", |r| &mut r.model.as_mut().unwrap().n_embd),
        ("model.n_head", |r| &mut r.model.as_mut().unwrap().n_head),
        ("model.n_positions", |r| {
            &mut r.model.as_mut().unwrap().n_positions
        }),
        ("model.vocab_size", |r| {
            &mut r.model.as_mut().unwrap().vocab_size
        }),
        ("hyper.epochs", |r| &mut r.hyper.as_mut().unwrap().epochs),
        ("hyper.batch_size", |r| {
            &mut r.hyper.as_mut().unwrap().batch_size
        }),
        ("hyper.warmup_steps", |r| {
            &mut r.hyper.as_mut().unwrap().warmup_steps
        }),
        ("hyper.max_chars", |r| {
            &mut r.hyper.as_mut().unwrap().max_chars
        }),
        ("hyper.min_chars", |r| {
            &mut r.hyper.as_mut().unwrap().min_chars
        }),
        ("hyper.grad_accum", |r| {
            &mut r.hyper.as_mut().unwrap().grad_accum
        }),
        ("hyper.seq_len", |r| &mut r.hyper.as_mut().unwrap().seq_len),
        ("hyper.keep_last", |r| {
            &mut r.hyper.as_mut().unwrap().keep_last
        }),
        ("hyper.sample_tokens", |r| {
            &mut r.hyper.as_mut().unwrap().sample_tokens
        }),
    ];
    for (name, field) in u32s {
        out.push((
            format!("{name} = u32::MAX"),
            Box::new(move |r| *field(r) = u32::MAX),
        ));
    }
    type F64Field = fn(&mut pb::TrainRequest) -> &mut f64;
    let f64s: [(&str, F64Field); 5] = [
        ("hyper.learning_rate", |r| {
            &mut r.hyper.as_mut().unwrap().learning_rate
        }),
        ("hyper.eval_fraction", |r| {
            &mut r.hyper.as_mut().unwrap().eval_fraction
        }),
        ("hyper.weight_decay", |r| {
            &mut r.hyper.as_mut().unwrap().weight_decay
        }),
        ("hyper.grad_clip", |r| {
            &mut r.hyper.as_mut().unwrap().grad_clip
        }),
        ("hyper.dropout", |r| &mut r.hyper.as_mut().unwrap().dropout),
    ];
    for (name, field) in f64s {
        for value in [
            f64::MAX,
            f64::MIN,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            out.push((
                format!("{name} = {value}"),
                Box::new(move |r| *field(r) = value),
            ));
        }
    }
    out.push((
        "hyper.max_steps = u64::MAX".into(),
        Box::new(|r| r.hyper.as_mut().unwrap().max_steps = u64::MAX),
    ));
    out.push((
        "hyper.seed = u64::MAX".into(),
        Box::new(|r| r.hyper.as_mut().unwrap().seed = u64::MAX),
    ));
    out
}

async fn trainer_rpcs(t: &mut TrainerClient<Channel>, run_id: &str) {
    for (label, value) in hostile_strings() {
        for (field, edit) in train_string_fields() {
            let what = format!("Train {field} {label}");
            let mut request = e2e::tiny_request(e2e::CORPUS);
            edit(&mut request, &value);
            check(&what, guarded(&what, train(t, request)).await);
        }
        let what = format!("UploadDataset filename {label}");
        let chunks = vec![pb::DatasetChunk {
            filename: value.clone(),
            data: b"Synopsis\nA story about a story.\n".to_vec(),
        }];
        check(
            &what,
            guarded(&what, async {
                t.upload_dataset(tokio_stream::iter(chunks)).await.map(drop)
            })
            .await,
        );
        let what = format!("UploadDataset data {label}");
        let chunks = vec![pb::DatasetChunk {
            filename: "x.csv".into(),
            data: value.clone().into_bytes(),
        }];
        check(
            &what,
            guarded(&what, async {
                t.upload_dataset(tokio_stream::iter(chunks)).await.map(drop)
            })
            .await,
        );
        let what = format!("WatchRun run_id {label}");
        let request = pb::WatchRunRequest {
            run_id: value.clone(),
            from_seq: 0,
        };
        check(
            &what,
            guarded(&what, async {
                drain(t.watch_run(request).await?.into_inner()).await
            })
            .await,
        );
        let what = format!("StopRun run_id {label}");
        let request = pb::StopRunRequest {
            run_id: value.clone(),
        };
        check(
            &what,
            guarded(&what, async { t.stop_run(request).await.map(drop) }).await,
        );
        let what = format!("ListCheckpoints run_id {label}");
        let request = pb::ListCheckpointsRequest {
            run_id: value.clone(),
        };
        check(
            &what,
            guarded(&what, async { t.list_checkpoints(request).await.map(drop) }).await,
        );
        let what = format!("WatchCheckpoints run_id {label}");
        let request = pb::WatchCheckpointsRequest {
            run_id: value.clone(),
        };
        check(
            &what,
            guarded(&what, async {
                drain(t.watch_checkpoints(request).await?.into_inner()).await
            })
            .await,
        );
        let what = format!("FetchCheckpoint checkpoint_id {label}");
        let request = pb::FetchCheckpointRequest {
            checkpoint_id: value.clone(),
            skip_optimizer: true,
        };
        check(
            &what,
            guarded(&what, async {
                drain(t.fetch_checkpoint(request).await?.into_inner()).await
            })
            .await,
        );
    }
    for (name, edit) in train_numeric_fields() {
        let what = format!("Train {name}");
        let mut request = e2e::tiny_request(e2e::CORPUS);
        edit(&mut request);
        check(&what, guarded(&what, train(t, request)).await);
    }
    let what = "WatchRun from_seq = u64::MAX";
    let request = pb::WatchRunRequest {
        run_id: run_id.into(),
        from_seq: u64::MAX,
    };
    check(
        what,
        guarded(what, async {
            drain(t.watch_run(request).await?.into_inner()).await
        })
        .await,
    );
}

type GenerateEdit = Box<dyn Fn(&mut pb::GenerateRequest, &str)>;

fn generate_string_fields() -> Vec<(&'static str, GenerateEdit)> {
    vec![
        ("prompt", Box::new(|r, v| r.prompt = v.into())),
        ("stop", Box::new(|r, v| r.stop = vec![v.into()])),
        ("checkpoint_id", Box::new(|r, v| r.checkpoint_id = v.into())),
        (
            "conditions key",
            Box::new(|r, v| {
                r.conditions.insert(v.into(), "Drama".into());
            }),
        ),
        (
            "conditions value",
            Box::new(|r, v| {
                r.conditions.insert("Genres".into(), v.into());
            }),
        ),
    ]
}

type GenerateNumber = Box<dyn Fn(&mut pb::GenerateRequest)>;

fn generate_numeric_fields() -> Vec<(String, GenerateNumber)> {
    let mut out: Vec<(String, GenerateNumber)> = vec![
        (
            "max_new_tokens = u32::MAX".into(),
            Box::new(|r| r.max_new_tokens = u32::MAX),
        ),
        ("n = u32::MAX".into(), Box::new(|r| r.n = u32::MAX)),
        (
            "top_k = u32::MAX".into(),
            Box::new(|r| r.sampling.as_mut().unwrap().top_k = u32::MAX),
        ),
        (
            "seed = u64::MAX".into(),
            Box::new(|r| r.sampling.as_mut().unwrap().seed = Some(u64::MAX)),
        ),
    ];
    type F32Field = fn(&mut pb::SamplingParams) -> &mut f32;
    let f32s: [(&str, F32Field); 3] = [
        ("temperature", |s| &mut s.temperature),
        ("top_p", |s| &mut s.top_p),
        ("repetition_penalty", |s| &mut s.repetition_penalty),
    ];
    for (name, field) in f32s {
        for value in [
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ] {
            out.push((
                format!("sampling.{name} = {value}"),
                Box::new(move |r| *field(r.sampling.as_mut().unwrap()) = value),
            ));
        }
    }
    out
}

async fn generator_rpcs(g: &mut GeneratorClient<Channel>) {
    let generate = |g: &mut GeneratorClient<Channel>, request: pb::GenerateRequest| {
        let mut g = g.clone();
        async move { drain(g.generate(request).await?.into_inner()).await }
    };
    for (label, value) in hostile_strings() {
        for (field, edit) in generate_string_fields() {
            let what = format!("Generate {field} {label}");
            let mut request = e2e::generate_request(2);
            edit(&mut request, &value);
            check(&what, guarded(&what, generate(g, request)).await);
        }
        use pb::load_checkpoint_request::Source;
        for (field, source) in [
            ("checkpoint_id", Source::CheckpointId(value.clone())),
            ("path", Source::Path(value.clone())),
        ] {
            let what = format!("LoadCheckpoint {field} {label}");
            let request = pb::LoadCheckpointRequest {
                source: Some(source),
            };
            check(
                &what,
                guarded(&what, async { g.load_checkpoint(request).await.map(drop) }).await,
            );
        }
    }
    for (name, edit) in generate_numeric_fields() {
        let what = format!("Generate {name}");
        let mut request = e2e::generate_request(2);
        edit(&mut request);
        check(&what, guarded(&what, generate(g, request)).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_short_delivered_statuses_and_servers_stay_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let (trainer, checkpoint) = e2e::trained(dir.path()).await;
    let model = e2e::checkpoint_dir(&trainer.root, &checkpoint.checkpoint_id);
    let generator = Generator::start(&[
        "--model".into(),
        model.display().to_string(),
        "--trainer".into(),
        trainer.url(),
        "--load-root".into(),
        dir.path().display().to_string(),
    ])
    .await;

    let mut t = trainer.client().await;
    trainer_rpcs(&mut t, &checkpoint.run_id).await;
    let mut g = generator.client().await;
    generator_rpcs(&mut g).await;

    // Both still serve.
    e2e::assert_serving(trainer.url()).await;
    e2e::assert_serving(generator.url()).await;
    let runs = t.list_runs(pb::ListRunsRequest {}).await.unwrap();
    assert!(!runs.into_inner().runs.is_empty());
    let (_, done) = e2e::generate(&mut g, e2e::generate_request(3))
        .await
        .expect("a plain request still generates");
    assert_eq!(done.len(), 1);

    // Client typos are not refusals: the refused list keeps only checkpoints that exist and
    // failed; the metrics show the live checkpoint and every label at 0 or more.
    let info = g
        .model_info(pb::ModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(info.refused.is_empty(), "{:?}", info.refused);
    // The generator follows the trainer: runs the hostile calls started and stopped may have
    // written checkpoints it made live since.
    let scrape = e2e::scrape(generator.metrics).unwrap();
    let live = format!(
        "synopsis_generator_live_checkpoint_info{{checkpoint_id=\"{}\"}}",
        info.live_checkpoint_id
    );
    assert_eq!(e2e::metric(&scrape, &live), Some(1.0), "{scrape}");
    for reason in ["download", "load", "template", "smoke_test"] {
        let series = format!("synopsis_generator_refused_loads_total{{reason=\"{reason}\"}}");
        assert_eq!(e2e::metric(&scrape, &series), Some(0.0), "{scrape}");
    }
    let series = "synopsis_generator_requests_total{outcome=\"deadline_exceeded\"}";
    assert!(e2e::metric(&scrape, series).is_some(), "{scrape}");

    // One checkpoint, one size: the generator counts it as the trainer does.
    let listed = t
        .list_checkpoints(pb::ListCheckpointsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .checkpoints;
    for resident in info.resident.iter().filter_map(|r| r.info.as_ref()) {
        let at_trainer = listed
            .iter()
            .find(|c| c.checkpoint_id == resident.checkpoint_id)
            .unwrap_or_else(|| panic!("{} is not listed by the trainer", resident.checkpoint_id));
        assert_eq!(
            resident.size_bytes, at_trainer.size_bytes,
            "{}",
            resident.checkpoint_id
        );
    }
}
