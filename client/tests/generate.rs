//! `synopsis generate`, `model` and `load` against a fake Generator over a real socket: tokens
//! are streamed in order, JSON lines are complete, the token and conditions reach the server,
//! and refusals become exit code 3 with the server's message.

mod common;

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use common::{json_lines, run, run_with_env, serve_generator, stderr, stdout};
use synopsis_proto::v1::generator_server::Generator;
use synopsis_proto::v1::{
    generate_response, load_checkpoint_request, CheckpointInfo, FinishReason, GenerateFinished,
    GenerateRequest, GenerateResponse, GenerateStarted, GeneratedToken, LoadCheckpointRequest,
    LoadCheckpointResponse, ModelInfoRequest, ModelInfoResponse, ServingState,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// A request as the fake saw it, with its authorization header.
type SeenRequest = (GenerateRequest, Option<String>);

#[derive(Default, Clone)]
struct Seen(Arc<Mutex<Vec<SeenRequest>>>);

#[derive(Default, Clone)]
struct FakeGenerator {
    seen: Seen,
    loaded: Arc<Mutex<Vec<LoadCheckpointRequest>>>,
}

/// Tokens of sample `i`: " a<i>", " b<i>", " c<i>".
fn tokens(i: u32) -> Vec<String> {
    ["a", "b", "c"].iter().map(|t| format!(" {t}{i}")).collect()
}

#[tonic::async_trait]
impl Generator for FakeGenerator {
    type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let req = request.into_inner();
        self.seen.0.lock().unwrap().push((req.clone(), auth));
        if req.prompt == "bad" {
            return Err(Status::invalid_argument("prompt: too long"));
        }
        let n = req.n.max(1);
        let event = |e| Ok(GenerateResponse { event: Some(e) });
        let mut out = vec![event(generate_response::Event::Started(GenerateStarted {
            request_id: "req-1".into(),
            checkpoint_id: "run-7/step-000008".into(),
            prompt_tokens: 4,
            seed: req.sampling.as_ref().and_then(|s| s.seed).unwrap_or(99),
            model_input: req.prompt.clone(),
        }))];
        // Interleave the samples, as a batching engine does.
        for k in 0..3 {
            for i in 0..n {
                out.push(event(generate_response::Event::Token(GeneratedToken {
                    index: i,
                    id: 100 * i + k,
                    text: tokens(i)[k as usize].clone(),
                    logprob: -1.0,
                })));
            }
        }
        for i in (0..n).rev() {
            out.push(event(generate_response::Event::Finished(
                GenerateFinished {
                    index: i,
                    reason: FinishReason::Eos as i32,
                    text: tokens(i).concat(),
                    generated_tokens: 3,
                    time_to_first_token_ms: 12.0,
                    tokens_per_second: 40.0,
                },
            )));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(out))))
    }

    async fn model_info(
        &self,
        _: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        Ok(Response::new(ModelInfoResponse {
            live_checkpoint_id: "run-7/step-000008".into(),
            device: "cpu".into(),
            dtype: "f32".into(),
            state: ServingState::Serving as i32,
            n_positions: 256,
            vocab_size: 50257,
            ..Default::default()
        }))
    }

    async fn load_checkpoint(
        &self,
        request: Request<LoadCheckpointRequest>,
    ) -> Result<Response<LoadCheckpointResponse>, Status> {
        let req = request.into_inner();
        self.loaded.lock().unwrap().push(req.clone());
        let id = match req.source {
            Some(load_checkpoint_request::Source::CheckpointId(id)) => id,
            Some(load_checkpoint_request::Source::Path(p)) => format!("dir:{p}"),
            None => return Err(Status::invalid_argument("source: missing")),
        };
        Ok(Response::new(LoadCheckpointResponse {
            info: Some(CheckpointInfo {
                checkpoint_id: id,
                step: 8,
                val_loss: 4.0,
                ..Default::default()
            }),
        }))
    }
}

#[tokio::test]
async fn json_stream_has_tokens_in_order_and_a_finished_line() {
    let fake = FakeGenerator::default();
    let addr = serve_generator(fake.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let url = format!("http://{addr}");
    let out = run(&[
        "--generator",
        &url,
        "--token-file",
        token_file.to_str().unwrap(),
        "--json",
        "generate",
        "In the year 2199,",
        "--genres",
        "Sci-Fi, Mecha",
        "--title",
        "Orbit",
        "--condition",
        "Type=TV",
        "--seed",
        "5",
        "--stop",
        "\n\n",
        "--temperature",
        "0.8",
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines = json_lines(&out);
    assert_eq!(lines[0]["event"], "started");
    assert_eq!(lines[0]["seed"], 5);
    let texts: Vec<&str> = lines
        .iter()
        .filter(|l| l["event"] == "token")
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, [" a0", " b0", " c0"]);
    let last = lines.last().unwrap();
    assert_eq!(last["event"], "finished");
    assert_eq!(last["reason"], "eos");
    assert_eq!(last["text"], " a0 b0 c0");

    let seen = fake.seen.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let (req, auth) = &seen[0];
    assert_eq!(auth.as_deref(), Some("Bearer s3cret"));
    assert_eq!(req.prompt, "In the year 2199,");
    assert_eq!(req.conditions["Genres"], "Sci-Fi, Mecha");
    assert_eq!(req.conditions["Name"], "Orbit");
    assert_eq!(req.conditions["Type"], "TV");
    assert_eq!(req.stop, ["\n\n"]);
    let sampling = req.sampling.unwrap();
    assert_eq!(sampling.seed, Some(5));
    assert!((sampling.temperature - 0.8).abs() < 1e-6);
}

#[tokio::test]
async fn text_streams_sample_after_sample_and_goes_to_the_examples_file() {
    let fake = FakeGenerator::default();
    let addr = serve_generator(fake.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("Generated Examples.txt");
    let url = format!("http://{addr}");
    let out = run(&[
        "--generator",
        &url,
        "generate",
        "Hello",
        "there",
        "-n",
        "2",
        "--out",
        file.to_str().unwrap(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "── sample 1/2 ──\nHello there a0 b0 c0\n── sample 2/2 ──\nHello there a1 b1 c1\n"
    );
    assert!(stderr(&out).contains("3 tokens, eos"), "{}", stderr(&out));
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("Prompt: Hello there\n"), "{text}");
    assert!(
        text.contains("1. Hello there a0 b0 c0\n\n2. Hello there a1 b1 c1\n"),
        "{text}"
    );
    assert!(
        fake.seen.0.lock().unwrap()[0].1.is_none(),
        "no token configured, none sent"
    );
}

#[tokio::test]
async fn no_prompt_uses_the_original_openings() {
    let fake = FakeGenerator::default();
    let addr = serve_generator(fake.clone()).await;
    let url = format!("http://{addr}");
    let out = run(&["--generator", &url, "generate", "--max-new-tokens", "20"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let prompts: Vec<String> = fake
        .seen
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|(r, _)| r.prompt.clone())
        .collect();
    assert_eq!(
        prompts,
        [
            "In the year 2199,",
            "A young man, who has lost his mother",
            "The story follows a girl named",
            "In a world where"
        ]
    );
    assert!(stdout(&out).contains("In a world where a0 b0 c0\n"));
}

#[tokio::test]
async fn a_refusal_exits_3_with_the_servers_message() {
    let addr = serve_generator(FakeGenerator::default()).await;
    let url = format!("http://{addr}");
    let out = run(&["--generator", &url, "generate", "bad"]).await;
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out)
            .contains("the generator refused the request: INVALID_ARGUMENT: prompt: too long"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn model_and_load() {
    let fake = FakeGenerator::default();
    let addr = serve_generator(fake.clone()).await;
    let url = format!("http://{addr}");
    let out = run(&["--generator", &url, "--json", "model"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let info = &json_lines(&out)[0];
    assert_eq!(info["live_checkpoint_id"], "run-7/step-000008");
    assert_eq!(info["state"], "serving");

    let out = run(&["--generator", &url, "model"]).await;
    assert!(
        stdout(&out).contains("live:       run-7/step-000008"),
        "{}",
        stdout(&out)
    );

    let out = run(&["--generator", &url, "load", "--path", "/models/gpt2"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("live: dir:/models/gpt2"),
        "{}",
        stdout(&out)
    );
    let loaded = fake.loaded.lock().unwrap().clone();
    assert_eq!(
        loaded[0].source,
        Some(load_checkpoint_request::Source::Path("/models/gpt2".into()))
    );
}

#[tokio::test]
async fn servers_and_token_come_from_the_environment() {
    let fake = FakeGenerator::default();
    let addr = serve_generator(fake.clone()).await;
    let url = format!("http://{addr}");
    let out = run_with_env(
        &["generate", "Hi"],
        &[
            ("SYNOPSIS_GENERATOR", url.as_str()),
            ("SYNOPSIS_TOKEN", "from-env"),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "Hi a0 b0 c0\n");
    let auth = fake.seen.0.lock().unwrap()[0].1.clone();
    assert_eq!(auth.as_deref(), Some("Bearer from-env"));
}

#[tokio::test]
async fn a_missing_ca_file_is_reported() {
    let out = run(&["--tls-ca", "/nonexistent/ca.pem", "model"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot read the CA certificate /nonexistent/ca.pem"),
        "{}",
        stderr(&out)
    );
}
