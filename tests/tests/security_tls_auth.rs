//! TLS and bearer tokens over real processes: a trainer and a generator both on TLS with a
//! token; the generator follows the trainer over TLS with its upstream token; callers
//! without the token get UNAUTHENTICATED on every RPC while health stays open; the CLI works
//! with --tls-ca and --token-file; mutual TLS refuses a client without a certificate.

mod e2e;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use e2e::pki::{Pki, TOKEN};
use e2e::{eventually, expect_code, tiny_request, Generator, Trainer, CORPUS, LONG, START};
use synopsis_common::BearerInterceptor;
use synopsis_proto::v1 as pb;
use synopsis_proto::v1::generator_client::GeneratorClient;
use synopsis_proto::v1::trainer_client::TrainerClient;
use synopsis_tests::{free_port, health_status, workspace_bin, ServiceProcess};
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

fn tls_endpoint(addr: SocketAddr, pki: &Pki, client_cert: bool) -> Endpoint {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca).unwrap()))
        .domain_name("localhost");
    if client_cert {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&pki.client_cert).unwrap(),
            std::fs::read(&pki.client_key).unwrap(),
        ));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls)
        .unwrap()
}

fn bearer(token: Option<&str>) -> BearerInterceptor {
    BearerInterceptor::new(token.map(|t| format!("Bearer {t}").parse().unwrap()))
}

type Trainers = TrainerClient<InterceptedService<Channel, BearerInterceptor>>;
type Generators = GeneratorClient<InterceptedService<Channel, BearerInterceptor>>;

async fn trainer_client(endpoint: &Endpoint, token: Option<&str>) -> Trainers {
    let channel = endpoint
        .connect()
        .await
        .expect("TLS connect to the trainer");
    TrainerClient::with_interceptor(channel, bearer(token))
}

async fn generator_client(endpoint: &Endpoint, token: Option<&str>) -> Generators {
    let channel = endpoint
        .connect()
        .await
        .expect("TLS connect to the generator");
    GeneratorClient::with_interceptor(channel, bearer(token))
}

/// Calls every Trainer RPC; each result reduced to its status code (OK when it succeeded).
async fn trainer_codes(client: &mut Trainers) -> Vec<(&'static str, Code)> {
    fn code<T>(r: Result<T, tonic::Status>) -> Code {
        r.err().map_or(Code::Ok, |s| s.code())
    }
    let upload = tokio_stream::iter(vec![pb::DatasetChunk {
        filename: "x.csv".into(),
        data: b"Synopsis\nhello\n".to_vec(),
    }]);
    vec![
        ("UploadDataset", code(client.upload_dataset(upload).await)),
        ("Train", code(client.train(tiny_request(CORPUS)).await)),
        (
            "WatchRun",
            code(client.watch_run(pb::WatchRunRequest::default()).await),
        ),
        (
            "StopRun",
            code(client.stop_run(pb::StopRunRequest::default()).await),
        ),
        (
            "ListRuns",
            code(client.list_runs(pb::ListRunsRequest {}).await),
        ),
        (
            "ListCheckpoints",
            code(
                client
                    .list_checkpoints(pb::ListCheckpointsRequest::default())
                    .await,
            ),
        ),
        (
            "WatchCheckpoints",
            code(
                client
                    .watch_checkpoints(pb::WatchCheckpointsRequest::default())
                    .await,
            ),
        ),
        (
            "FetchCheckpoint",
            code(
                client
                    .fetch_checkpoint(pb::FetchCheckpointRequest::default())
                    .await,
            ),
        ),
    ]
}

async fn generator_codes(client: &mut Generators) -> Vec<(&'static str, Code)> {
    fn code<T>(r: Result<T, tonic::Status>) -> Code {
        r.err().map_or(Code::Ok, |s| s.code())
    }
    vec![
        (
            "Generate",
            code(client.generate(e2e::generate_request(4)).await),
        ),
        (
            "ModelInfo",
            code(client.model_info(pb::ModelInfoRequest {}).await),
        ),
        (
            "LoadCheckpoint",
            code(
                client
                    .load_checkpoint(pb::LoadCheckpointRequest::default())
                    .await,
            ),
        ),
    ]
}

/// Runs the CLI to completion; (exit code, output).
async fn cli(args: Vec<String>) -> (i32, String) {
    tokio::task::spawn_blocking(move || {
        let process = ServiceProcess::spawn(workspace_bin("synopsis"), &args).expect("spawn CLI");
        let status = process.wait_exit(LONG).expect("CLI exits");
        (status.code().unwrap_or(-1), process.log())
    })
    .await
    .unwrap()
}

fn cli_args(trainer: u16, generator: u16, pki: &Pki, token: bool, rest: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--trainer".to_string(),
        format!("https://localhost:{trainer}"),
        "--generator".into(),
        format!("https://localhost:{generator}"),
        "--tls-ca".into(),
        pki.ca.display().to_string(),
    ];
    if token {
        args.extend([
            "--token-file".to_string(),
            pki.token_file.display().to_string(),
        ]);
    }
    args.extend(rest.iter().map(|s| s.to_string()));
    args
}

async fn assert_healthy(endpoint: &Endpoint, process: &ServiceProcess) {
    process
        .wait_healthy_at(endpoint.clone(), START)
        .await
        .expect("healthy over TLS without a token");
    assert_eq!(
        health_status(endpoint.clone()).await.unwrap(),
        ServingStatus::Serving
    );
}

fn data_dirs(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (root, data) = (dir.join("root"), dir.join("data"));
    std::fs::create_dir_all(&data).unwrap();
    e2e::write_corpus(&data);
    (root, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_tokens_guard_both_servers_and_the_link_between_them() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let (root, data) = data_dirs(dir.path());

    let trainer_port = free_port();
    let trainer = Trainer::start_on(&root, &data, trainer_port, &pki.server_args()).await;
    let trainer_tls = tls_endpoint(trainer.addr, &pki, false);
    assert_healthy(&trainer_tls, &trainer.process).await;

    // Train over TLS with the token.
    let mut authed = trainer_client(&trainer_tls, Some(TOKEN)).await;
    let mut stream = authed
        .train(tiny_request(CORPUS))
        .await
        .unwrap()
        .into_inner();
    let mut checkpoint = String::new();
    while let Some(event) = tokio::time::timeout(LONG, stream.next()).await.unwrap() {
        match event.unwrap().event {
            Some(pb::train_event::Event::Checkpoint(c)) => checkpoint = c.checkpoint_id,
            Some(pb::train_event::Event::Finished(f)) => {
                assert_eq!(f.state, pb::RunState::Completed as i32, "{f:?}");
                break;
            }
            _ => {}
        }
    }
    assert!(!checkpoint.is_empty());

    // The generator follows the trainer over TLS, presenting its upstream token.
    let mut args = pki.server_args();
    args.extend([
        "--trainer".to_string(),
        format!("https://localhost:{trainer_port}"),
        "--upstream-tls-ca".into(),
        pki.ca.display().to_string(),
        "--upstream-token-file".into(),
        pki.token_file.display().to_string(),
    ]);
    let generator = Generator::start(&args).await;
    let generator_tls = tls_endpoint(generator.addr, &pki, false);
    assert_healthy(&generator_tls, &generator.process).await;
    let mut gen_authed = generator_client(&generator_tls, Some(TOKEN)).await;
    let live = gen_authed
        .model_info(pb::ModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(live.live_checkpoint_id, checkpoint);
    let mut tokens = 0;
    let mut stream = gen_authed
        .generate(e2e::generate_request(6))
        .await
        .unwrap()
        .into_inner();
    while let Some(response) = stream.next().await {
        if let Some(pb::generate_response::Event::Token(_)) = response.unwrap().event {
            tokens += 1;
        }
    }
    assert!(tokens > 0);

    // No token, or a wrong one: UNAUTHENTICATED on every RPC of both services.
    for token in [None, Some("not-the-token")] {
        let mut anonymous = trainer_client(&trainer_tls, token).await;
        for (rpc, code) in trainer_codes(&mut anonymous).await {
            assert_eq!(code, Code::Unauthenticated, "Trainer/{rpc} with {token:?}");
        }
        let mut anonymous = generator_client(&generator_tls, token).await;
        for (rpc, code) in generator_codes(&mut anonymous).await {
            assert_eq!(
                code,
                Code::Unauthenticated,
                "Generator/{rpc} with {token:?}"
            );
        }
    }
    // The same calls with the token get past auth (whatever the request's own fate).
    for (rpc, code) in trainer_codes(&mut authed).await {
        assert_ne!(code, Code::Unauthenticated, "Trainer/{rpc}");
    }
    for (rpc, code) in generator_codes(&mut gen_authed).await {
        assert_ne!(code, Code::Unauthenticated, "Generator/{rpc}");
    }
    // Plaintext to a TLS port gets nowhere.
    let plain = Endpoint::from_shared(format!("http://{}", trainer.addr))
        .unwrap()
        .timeout(Duration::from_secs(5));
    assert!(health_status(plain).await.is_err());

    // The CLI, with the CA and the token file.
    let g = generator.addr.port();
    let (code, out) = cli(cli_args(trainer_port, g, &pki, true, &["checkpoints"])).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&checkpoint), "{out}");
    let (code, out) = cli(cli_args(trainer_port, g, &pki, true, &["runs"])).await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = cli(cli_args(trainer_port, g, &pki, true, &["model"])).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&checkpoint), "{out}");
    let generate = [
        "generate",
        "A young witch",
        "--max-new-tokens",
        "6",
        "--seed",
        "3",
    ];
    let (code, out) = cli(cli_args(trainer_port, g, &pki, true, &generate)).await;
    assert_eq!(code, 0, "{out}");
    // Without the token the CLI is refused (exit 3) and says why.
    let (code, out) = cli(cli_args(trainer_port, g, &pki, false, &["model"])).await;
    assert_eq!(code, 3, "{out}");
    assert!(out.to_lowercase().contains("unauthenticated"), "{out}");

    // Mutual TLS: a trainer that requires client certificates refuses a caller without one,
    // and serves one with a certificate signed by its client CA.
    let mut mtls_args = pki.server_args();
    mtls_args.extend(["--tls-client-ca".to_string(), pki.ca.display().to_string()]);
    let mtls = Trainer::start(&root, &data, &mtls_args).await;
    let with_cert = tls_endpoint(mtls.addr, &pki, true);
    assert_healthy(&with_cert, &mtls.process).await;
    let mut client = trainer_client(&with_cert, Some(TOKEN)).await;
    let listed = client
        .list_checkpoints(pb::ListCheckpointsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed
        .checkpoints
        .iter()
        .any(|c| c.checkpoint_id == checkpoint));
    let without_cert = tls_endpoint(mtls.addr, &pki, false);
    let refused = async {
        let channel = without_cert.connect().await.map_err(|e| e.to_string())?;
        TrainerClient::with_interceptor(channel, bearer(Some(TOKEN)))
            .list_runs(pb::ListRunsRequest {})
            .await
            .map_err(|e| e.to_string())
    };
    assert!(
        refused.await.is_err(),
        "mTLS accepted a client without a certificate"
    );
    // The CLI presents its certificate with --tls-cert/--tls-key, and is refused without.
    let mtls_port = mtls.addr.port();
    let with_identity = [
        "--tls-cert",
        pki.client_cert.to_str().unwrap(),
        "--tls-key",
        pki.client_key.to_str().unwrap(),
        "checkpoints",
    ];
    let (code, out) = cli(cli_args(mtls_port, g, &pki, true, &with_identity)).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&checkpoint), "{out}");
    let (code, out) = cli(cli_args(mtls_port, g, &pki, true, &["checkpoints"])).await;
    assert_ne!(
        code, 0,
        "the CLI reached an mTLS trainer without a certificate: {out}"
    );

    // A generator whose upstream token is wrong never gets a checkpoint: it stays WAITING.
    let mut wrong = pki.server_args();
    let bad_token = dir.path().join("bad-token");
    std::fs::write(&bad_token, "wrong-token").unwrap();
    wrong.extend([
        "--trainer".to_string(),
        format!("https://localhost:{trainer_port}"),
        "--upstream-tls-ca".into(),
        pki.ca.display().to_string(),
        "--upstream-token-file".into(),
        bad_token.display().to_string(),
    ]);
    let locked_out = Generator::start(&wrong).await;
    let endpoint = tls_endpoint(locked_out.addr, &pki, false);
    let mut client = eventually(START, "the generator answering", || async {
        endpoint
            .connect()
            .await
            .ok()
            .map(|c| GeneratorClient::with_interceptor(c, bearer(Some(TOKEN))))
    })
    .await;
    assert!(
        locked_out
            .process
            .wait_for_log("invalid bearer token", LONG),
        "{}",
        locked_out.process.log_tail()
    );
    let info = client
        .model_info(pb::ModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.live_checkpoint_id, "");
    let refused = client.generate(e2e::generate_request(4)).await;
    expect_code(refused, Code::Unavailable, "generate with no model");
}
