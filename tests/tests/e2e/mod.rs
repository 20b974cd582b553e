//! What the reliability tests share: a tiny corpus, trainer and generator processes started on
//! free ports with small models, gRPC clients, a metrics scraper and a throwaway PKI.
//! Every model here is tiny (2 layers, 64 wide, 128 positions, 512 BPE tokens) so a test
//! trains and serves in seconds on two CPU cores.
#![allow(dead_code)]

pub mod pki;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use synopsis_proto::v1 as pb;
use synopsis_proto::v1::generator_client::GeneratorClient;
use synopsis_proto::v1::trainer_client::TrainerClient;
use synopsis_tests::{free_port, workspace_bin, ServiceProcess};
use tonic::transport::{Channel, Endpoint};

/// How long a server may take to start (libtorch loads; a debug build is slow).
pub const START: Duration = Duration::from_secs(90);
/// Generous bound for anything a tiny model does on two busy cores.
pub const LONG: Duration = Duration::from_secs(120);

/// File name of the corpus inside a data root.
pub const CORPUS: &str = "synopses.csv";

/// Writes 40 short, distinct synopses (columns `id,Name,Genres,Synopsis`) to `dir/synopses.csv`.
pub fn write_corpus(dir: &Path) -> PathBuf {
    let heroes = [
        "A retired courier",
        "A young witch",
        "Two rival chefs",
        "A lonely robot",
        "A disgraced knight",
        "An orphaned pilot",
        "A quiet librarian",
        "Three runaway siblings",
    ];
    let quests = [
        "searches the flooded capital for a missing map",
        "must win a tournament to save the family inn",
        "guards a comet that fell behind the school",
        "crosses the desert on a train powered by songs",
        "uncovers a conspiracy inside the lunar observatory",
    ];
    let mut csv = String::from("id,Name,Genres,Synopsis\n");
    let mut id = 0;
    for hero in heroes {
        for quest in quests {
            id += 1;
            csv.push_str(&format!(
                "{id},Story {id},\"Adventure, Drama\",\"{hero} {quest}, and learns that every \
                 journey in season {id} ends where a friendship begins.\"\n"
            ));
        }
    }
    let path = dir.join(CORPUS);
    std::fs::write(&path, csv).expect("write corpus");
    path
}

/// A from-scratch run on `data_path` (relative to the trainer's --data-root) with the tiny
/// shape, one short epoch unless changed.
pub fn tiny_request(data_path: &str) -> pb::TrainRequest {
    pb::TrainRequest {
        data: Some(pb::train_request::Data::DataPath(data_path.to_string())),
        text_column: "Synopsis".into(),
        model: Some(pb::ModelSpec {
            preset: "tiny".into(),
            n_layer: 2,
            n_embd: 64,
            n_head: 2,
            n_positions: 128,
            vocab_size: 512,
        }),
        hyper: Some(pb::HyperParams {
            epochs: 1,
            batch_size: 4,
            seq_len: 64,
            min_chars: 20,
            warmup_steps: 2,
            eval_fraction: 0.1,
            sample_tokens: 4,
            keep_last: 10,
            ..Default::default()
        }),
        sample_prompts: vec!["A young".into()],
        run_name: "reliability".into(),
        ..Default::default()
    }
}

/// A trainer process with its addresses and directories.
pub struct Trainer {
    pub process: ServiceProcess,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub root: PathBuf,
    pub data_root: PathBuf,
}

impl Trainer {
    /// The arguments every trainer here gets, on `port`.
    pub fn args(root: &Path, data_root: &Path, port: u16, metrics: u16) -> Vec<String> {
        vec![
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--root".into(),
            root.display().to_string(),
            "--data-root".into(),
            data_root.display().to_string(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics}"),
            "--device".into(),
            "cpu".into(),
        ]
    }

    /// Starts a plaintext trainer on a free port and waits until it is SERVING.
    pub async fn start(root: &Path, data_root: &Path, extra: &[String]) -> Trainer {
        Self::start_on(root, data_root, free_port(), extra).await
    }

    /// Like [`Self::start`] on a given port (to restart a trainer where a follower expects it).
    pub async fn start_on(root: &Path, data_root: &Path, port: u16, extra: &[String]) -> Trainer {
        let metrics = free_port();
        let mut args = Self::args(root, data_root, port, metrics);
        args.extend(extra.iter().cloned());
        let process =
            ServiceProcess::spawn(workspace_bin("synopsis-trainer"), &args).expect("spawn trainer");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        if extra.iter().all(|a| a != "--tls-cert") {
            process
                .wait_healthy(addr, START)
                .await
                .expect("trainer healthy");
        }
        Trainer {
            process,
            addr,
            metrics: ([127, 0, 0, 1], metrics).into(),
            root: root.to_path_buf(),
            data_root: data_root.to_path_buf(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> TrainerClient<Channel> {
        trainer_client(&self.url()).await
    }
}

pub async fn channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_string())
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"))
}

pub async fn trainer_client(url: &str) -> TrainerClient<Channel> {
    TrainerClient::new(channel(url).await).max_decoding_message_size(64 << 20)
}

pub async fn generator_client(url: &str) -> GeneratorClient<Channel> {
    GeneratorClient::new(channel(url).await)
}

/// Starts a run and reads its stream to the end; returns the run id and every event.
/// Panics if the stream fails or does not end within [`LONG`].
pub async fn train(
    client: &mut TrainerClient<Channel>,
    request: pb::TrainRequest,
) -> (String, Vec<pb::TrainEvent>) {
    let mut stream = client
        .train(request)
        .await
        .expect("Train accepted")
        .into_inner();
    let mut events = Vec::new();
    let read = async {
        while let Some(event) = stream.message().await.expect("train stream") {
            let done = matches!(event.event, Some(pb::train_event::Event::Finished(_)));
            events.push(event);
            if done {
                break;
            }
        }
    };
    tokio::time::timeout(LONG, read)
        .await
        .expect("run finishes in time");
    let run_id = events.first().map(|e| e.run_id.clone()).unwrap_or_default();
    (run_id, events)
}

/// The `finished` event of a run's events.
pub fn finished(events: &[pb::TrainEvent]) -> Option<pb::RunFinished> {
    events.iter().find_map(|e| match &e.event {
        Some(pb::train_event::Event::Finished(f)) => Some(f.clone()),
        _ => None,
    })
}

/// Checkpoints announced in a run's events, in order.
pub fn checkpoints(events: &[pb::TrainEvent]) -> Vec<pb::CheckpointInfo> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::train_event::Event::Checkpoint(c)) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

/// Trains one tiny run to completion on a fresh trainer under `dir` and returns the trainer
/// (still running) and the run's newest checkpoint.
pub async fn trained(dir: &Path) -> (Trainer, pb::CheckpointInfo) {
    let root = dir.join("root");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    write_corpus(&data);
    let trainer = Trainer::start(&root, &data, &[]).await;
    let mut client = trainer.client().await;
    let (_, events) = train(&mut client, tiny_request(CORPUS)).await;
    let done = finished(&events).expect("finished event");
    assert_eq!(
        done.state,
        pb::RunState::Completed as i32,
        "run failed: {}",
        done.message
    );
    let last = checkpoints(&events).pop().expect("a checkpoint");
    (trainer, last)
}

/// A tiny checkpoint trained under `dir`, and its directory; the trainer is stopped.
pub async fn trained_model(dir: &Path) -> (pb::CheckpointInfo, PathBuf) {
    let (trainer, checkpoint) = trained(dir).await;
    let model = checkpoint_dir(&trainer.root, &checkpoint.checkpoint_id);
    (checkpoint, model)
}

/// The `started` event of a run.
pub fn started(events: &[pb::TrainEvent]) -> Option<pb::RunStarted> {
    events.iter().find_map(|e| match &e.event {
        Some(pb::train_event::Event::Started(s)) => Some(s.clone()),
        _ => None,
    })
}

/// Asserts that the server at `url` answers SERVING on grpc.health.v1.
pub async fn assert_serving(url: String) {
    let endpoint = Endpoint::from_shared(url).expect("a valid URL");
    assert_eq!(
        synopsis_tests::health_status(endpoint)
            .await
            .expect("health answers"),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

/// A generator process with its addresses.
pub struct Generator {
    pub process: ServiceProcess,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
}

impl Generator {
    /// Starts a generator on a free port with `args` (plus listen, metrics, cpu) and, unless it
    /// uses TLS, waits until it is SERVING (a model is live).
    pub async fn start(args: &[String]) -> Generator {
        Self::start_env(args, &[]).await
    }

    pub async fn start_env(args: &[String], envs: &[(&str, &str)]) -> Generator {
        let port = free_port();
        let metrics = free_port();
        let mut all = vec![
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics}"),
            "--device".into(),
            "cpu".into(),
        ];
        all.extend(args.iter().cloned());
        let process = ServiceProcess::spawn_env(
            workspace_bin("synopsis-generator"),
            &all,
            envs.iter().copied(),
        )
        .expect("spawn generator");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        if args.iter().all(|a| a != "--tls-cert") {
            process
                .wait_healthy(addr, START)
                .await
                .expect("generator healthy");
        }
        Generator {
            process,
            addr,
            metrics: ([127, 0, 0, 1], metrics).into(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> GeneratorClient<Channel> {
        generator_client(&self.url()).await
    }
}

/// A short greedy request.
pub fn generate_request(max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: "A young witch".into(),
        max_new_tokens,
        sampling: Some(pb::SamplingParams {
            seed: Some(7),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Runs a request to the end: the checkpoint it ran on and the finished events.
pub async fn generate(
    client: &mut GeneratorClient<Channel>,
    request: pb::GenerateRequest,
) -> Result<(String, Vec<pb::GenerateFinished>), tonic::Status> {
    let mut stream = client.generate(request).await?.into_inner();
    let mut checkpoint = String::new();
    let mut done = Vec::new();
    while let Some(response) = stream.message().await? {
        match response.event {
            Some(pb::generate_response::Event::Started(s)) => checkpoint = s.checkpoint_id,
            Some(pb::generate_response::Event::Finished(f)) => done.push(f),
            _ => {}
        }
    }
    Ok((checkpoint, done))
}

/// Polls `check` every 100 ms until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET /metrics` on `addr` (plain HTTP/1.0, so no client library is needed).
pub fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    Ok(body)
}

/// The value of the sample `name` (exact series, e.g. `x_total{outcome="ok"}`) in a scrape.
pub fn metric(scrape: &str, name: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let value = rest.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// [`metric`] of a fresh scrape; panics if the endpoint or the series is missing.
pub fn metric_of(addr: SocketAddr, name: &str) -> f64 {
    let text = scrape(addr).unwrap_or_else(|e| panic!("scrape {addr}: {e}"));
    metric(&text, name).unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// Asserts a call failed with `code`; returns the message.
pub fn expect_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    what: &str,
) -> String {
    match result {
        Err(status) => {
            assert_eq!(
                status.code(),
                code,
                "{what}: expected {code:?}, got {:?}: {}",
                status.code(),
                status.message()
            );
            status.message().to_string()
        }
        Ok(value) => panic!("{what}: expected {code:?}, got OK: {value:?}"),
    }
}

/// Copies a checkpoint directory (files only, one level).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create copy");
    for entry in std::fs::read_dir(from).expect("read checkpoint") {
        let entry = entry.expect("entry");
        if entry.path().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy file");
        }
    }
}

/// The directory of checkpoint `id` (`<run>/<name>`) under a trainer root.
pub fn checkpoint_dir(root: &Path, id: &str) -> PathBuf {
    root.join("checkpoints").join(id)
}
