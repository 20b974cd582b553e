//! Shared by the trainer's socket tests: a tiny corpus, an in-process server on an ephemeral
//! port, and helpers to drive it as a client would.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use synopsis_proto::v1::trainer_client::TrainerClient;
use synopsis_proto::v1::{
    train_event, DatasetChunk, HyperParams, ModelSpec, TrainEvent, TrainRequest,
};
use synopsis_trainer::Config;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// ~40 short, distinct synopses that pass the cleaning rules (capitalised, no placeholders).
pub fn corpus_csv() -> String {
    let heroes = [
        "A young pilot",
        "An old detective",
        "A quiet student",
        "A stubborn knight",
        "A clever thief",
        "A lonely robot",
        "A retired soldier",
        "A curious girl",
    ];
    let places = [
        "a floating city",
        "the frozen north",
        "a haunted school",
        "the desert capital",
        "a distant colony",
    ];
    let goals = [
        "searches for her missing brother",
        "must stop a war between two kingdoms",
        "tries to win the national tournament",
        "uncovers a conspiracy in the government",
        "protects a mysterious child from hunters",
    ];
    let mut out = String::from("MAL_ID,Name,Genres,Synopsis\n");
    let mut id = 0;
    for (h, hero) in heroes.iter().enumerate() {
        for g in 0..5 {
            let place = places[(h + g) % places.len()];
            let goal = goals[(h * 2 + g) % goals.len()];
            id += 1;
            let genre = if id % 2 == 0 {
                "Action, Drama"
            } else {
                "Comedy"
            };
            out.push_str(&format!(
                "{id},\"Story {id}\",\"{genre}\",\"{hero} from {place} {goal}. Along the way, \
                 friends are made and old secrets come to light.\"\n"
            ));
        }
    }
    out
}

/// A really small model: 2 layers, 64 wide, 64 positions, a ~500-token BPE.
pub fn tiny_request(dataset_id: &str, epochs: u32) -> TrainRequest {
    TrainRequest {
        data: Some(synopsis_proto::v1::train_request::Data::DatasetId(
            dataset_id.to_string(),
        )),
        model: Some(ModelSpec {
            preset: "tiny".into(),
            n_layer: 2,
            n_embd: 64,
            n_head: 2,
            n_positions: 64,
            vocab_size: 500,
        }),
        hyper: Some(HyperParams {
            epochs,
            batch_size: 4,
            learning_rate: 3e-3,
            warmup_steps: 2,
            min_chars: 20,
            seed: 7,
            eval_fraction: 0.1,
            seq_len: 64,
            sample_tokens: 8,
            keep_last: 5,
            ..Default::default()
        }),
        run_name: "tiny test".into(),
        ..Default::default()
    }
}

/// A run long enough to be interrupted: many short steps per epoch (batch 1 × 16 tokens,
/// ~65 steps an epoch), so a stop requested after the first step lands inside epoch 1.
pub fn long_request(dataset_id: &str) -> TrainRequest {
    let mut req = tiny_request(dataset_id, 500);
    let hyper = req.hyper.as_mut().unwrap();
    hyper.batch_size = 1;
    hyper.seq_len = 16;
    req
}

pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub handle: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Serves a trainer on `root` (CPU) on an ephemeral port.
    pub async fn start(root: &Path) -> Server {
        Server::start_with(root, |_| {}).await
    }

    /// [`start`](Self::start) with flags changed by `configure`.
    pub async fn start_with(root: &Path, configure: impl FnOnce(&mut Config)) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = Config::for_root(root);
        config.device = "cpu".into();
        configure(&mut config);
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(synopsis_trainer::serve(config, listener, async move {
            let _ = rx.await;
        }));
        Server {
            addr,
            stop: Some(tx),
            handle,
        }
    }

    pub async fn client(&self) -> TrainerClient<Channel> {
        let url = format!("http://{}", self.addr);
        for _ in 0..100 {
            if let Ok(c) = TrainerClient::connect(url.clone()).await {
                return c;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("trainer at {url} never accepted a connection");
    }

    /// Triggers the graceful shutdown (what SIGTERM does) and waits for `serve` to return.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.handle.await.unwrap()
    }
}

/// Uploads `csv` in small chunks; returns the dataset id.
pub async fn upload(client: &mut TrainerClient<Channel>, csv: &str) -> String {
    let chunks: Vec<DatasetChunk> = csv
        .as_bytes()
        .chunks(700)
        .enumerate()
        .map(|(i, data)| DatasetChunk {
            filename: if i == 0 {
                "tiny.csv".into()
            } else {
                String::new()
            },
            data: data.to_vec(),
        })
        .collect();
    let info = client
        .upload_dataset(tokio_stream::iter(chunks))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.bytes, csv.len() as u64);
    info.dataset_id
}

/// Every event of a stream until it ends.
pub async fn collect(mut stream: tonic::Streaming<TrainEvent>) -> Vec<TrainEvent> {
    let mut events = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        events.push(event);
    }
    events
}

pub fn kind(e: &TrainEvent) -> &'static str {
    match &e.event {
        Some(train_event::Event::Started(_)) => "started",
        Some(train_event::Event::Step(_)) => "step",
        Some(train_event::Event::Epoch(_)) => "epoch",
        Some(train_event::Event::Checkpoint(_)) => "checkpoint",
        Some(train_event::Event::Sample(_)) => "sample",
        Some(train_event::Event::Finished(_)) => "finished",
        None => "none",
    }
}

pub fn epochs(events: &[TrainEvent]) -> Vec<synopsis_proto::v1::EpochEvent> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(train_event::Event::Epoch(x)) => Some(*x),
            _ => None,
        })
        .collect()
}

pub fn finished(events: &[TrainEvent]) -> synopsis_proto::v1::RunFinished {
    match events.last().and_then(|e| e.event.clone()) {
        Some(train_event::Event::Finished(f)) => f,
        other => panic!("last event is not finished: {other:?}"),
    }
}

/// `tests/fixtures/<rel>` in the repository (see its README for each file's origin).
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
}

/// A port free right now (for the metrics endpoint, which binds its own socket).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over plain HTTP/1.0; the whole response.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for _ in 0..100 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            return out;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {addr}");
}

pub fn checkpoint_dir(root: &Path, checkpoint_id: &str) -> PathBuf {
    root.join("checkpoints").join(checkpoint_id)
}
