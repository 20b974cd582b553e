//! What the server tests share: tiny random checkpoints on disk, a generator started on an
//! ephemeral port, and clients for it.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use synopsis_generator::{serve, Config};
use synopsis_model::checkpoint::{write_checkpoint, Manifest};
use synopsis_model::{Gpt2, Gpt2Config};
use synopsis_proto::v1 as pb;
use synopsis_proto::v1::generator_client::GeneratorClient;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Context length of the test models: small, so "prompt too long" is easy to reach.
pub const N_POSITIONS: i64 = 128;

pub fn tokenizer_json() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gpt2_tokenizer/tokenizer.json")
}

fn tiny_config() -> Gpt2Config {
    let mut c = Gpt2Config::preset("tiny").expect("tiny preset");
    c.n_layer = 2;
    c.n_embd = 64;
    c.n_head = 2;
    c.n_positions = N_POSITIONS;
    c
}

/// Writes a random GPT-2 checkpoint (GPT-2 tokenizer) to `dir` the way the trainer does.
pub fn write_tiny_checkpoint(
    dir: &Path,
    checkpoint_id: &str,
    step: u64,
    metadata: serde_json::Value,
) {
    write_tiny_checkpoint_with(dir, checkpoint_id, step, metadata, &[]);
}

/// [`write_tiny_checkpoint`] with extra files (e.g. an `optimizer.safetensors`).
pub fn write_tiny_checkpoint_with(
    dir: &Path,
    checkpoint_id: &str,
    step: u64,
    metadata: serde_json::Value,
    extra: &[(&str, &[u8])],
) {
    let config = tiny_config();
    let model = Gpt2::new(&config, tch::Device::Cpu);
    let mut manifest = Manifest::new(checkpoint_id, "run-test", 1, step, "epoch");
    manifest.created = step as i64;
    manifest.metadata = metadata;
    write_checkpoint(dir, manifest, |tmp| {
        config.save(&tmp.join("config.json"))?;
        for (name, bytes) in extra {
            std::fs::write(tmp.join(name), bytes)
                .map_err(|e| synopsis_model::ModelError::io(tmp.join(name), e))?;
        }
        std::fs::copy(tokenizer_json(), tmp.join("tokenizer.json"))
            .map_err(|e| synopsis_model::ModelError::io(tmp.join("tokenizer.json"), e))?;
        model.save_safetensors(&tmp.join("model.safetensors"))
    })
    .expect("write checkpoint");
}

/// Flips one byte in the middle of `file`.
pub fn flip_byte(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0xff;
    std::fs::write(file, bytes).unwrap();
}

pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// Starts a generator on 127.0.0.1:0 on the CPU with `args` added to the command line.
    pub async fn start(args: &[&str]) -> TestServer {
        let mut all = vec!["--device", "cpu", "--watch-interval-ms", "100"];
        all.extend_from_slice(args);
        let config = Config::from_args(all).expect("flags");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(config, listener, async move {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::from_shared(format!("http://{}", self.addr)).unwrap()
    }

    pub async fn client(&self) -> GeneratorClient<Channel> {
        GeneratorClient::new(self.endpoint().connect().await.expect("connect"))
    }

    /// A client whose HTTP/2 windows hold only a few hundred bytes: the server cannot push a
    /// stream past its first messages until the client reads them.
    pub async fn slow_client(&self) -> GeneratorClient<Channel> {
        let channel = self
            .endpoint()
            .initial_stream_window_size(256)
            .initial_connection_window_size(256)
            .connect()
            .await
            .expect("connect");
        GeneratorClient::new(channel)
    }

    pub async fn health(&self, service: &str) -> ServingStatus {
        let channel = self.endpoint().connect().await.expect("connect");
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner();
        ServingStatus::try_from(reply.status).expect("known status")
    }

    /// Sends the shutdown signal (SIGTERM in the binary).
    pub fn signal_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits for `serve` to return.
    pub async fn join(&mut self) -> anyhow::Result<()> {
        let task = self.task.take().expect("joined once");
        within(task)
            .await
            .expect("serve did not return")
            .expect("serve task panicked")
    }

    pub async fn model_info(&self) -> pb::ModelInfoResponse {
        self.client()
            .await
            .model_info(pb::ModelInfoRequest {})
            .await
            .expect("ModelInfo")
            .into_inner()
    }

    /// Waits until ModelInfo satisfies `pred`.
    pub async fn wait_for_info(
        &self,
        what: &str,
        pred: impl Fn(&pb::ModelInfoResponse) -> bool,
    ) -> pb::ModelInfoResponse {
        within(async {
            loop {
                let info = self.model_info().await;
                if pred(&info) {
                    return info;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap_or_else(|| panic!("gave up waiting for {what}"))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.signal_shutdown();
    }
}

/// Bounds a wait so a broken server fails the test instead of hanging it (generous: CI machines
/// are slow; this is never a timing assertion).
pub async fn within<T>(f: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout(Duration::from_secs(120), f).await.ok()
}

/// The events of one Generate call, or the status that ended it.
#[derive(Debug, Default)]
pub struct Collected {
    pub started: Option<pb::GenerateStarted>,
    pub tokens: Vec<pb::GeneratedToken>,
    pub finished: Vec<pb::GenerateFinished>,
    /// Event kinds in arrival order: 's', 't', 'f'.
    pub order: String,
    pub error: Option<tonic::Status>,
}

pub async fn collect(mut stream: tonic::Streaming<pb::GenerateResponse>) -> Collected {
    use pb::generate_response::Event;
    let mut c = Collected::default();
    loop {
        match stream.message().await {
            Ok(Some(msg)) => match msg.event {
                Some(Event::Started(s)) => {
                    c.order.push('s');
                    c.started = Some(s);
                }
                Some(Event::Token(t)) => {
                    c.order.push('t');
                    c.tokens.push(t);
                }
                Some(Event::Finished(f)) => {
                    c.order.push('f');
                    c.finished.push(f);
                }
                None => panic!("response without an event"),
            },
            Ok(None) => return c,
            Err(status) => {
                c.error = Some(status);
                return c;
            }
        }
    }
}

/// Runs one Generate call to the end.
pub async fn generate(
    client: &mut GeneratorClient<Channel>,
    req: pb::GenerateRequest,
) -> Result<Collected, tonic::Status> {
    let stream = client.generate(req).await?.into_inner();
    Ok(within(collect(stream)).await.expect("stream ended"))
}

pub fn request(prompt: &str, max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: prompt.into(),
        max_new_tokens,
        sampling: Some(pb::SamplingParams {
            temperature: 1.0,
            seed: Some(1),
            ..Default::default()
        }),
        ..Default::default()
    }
}
