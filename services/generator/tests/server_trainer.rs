//! Following a trainer: the generator waits for a trainer that is not up yet, downloads each
//! offered checkpoint (without optimizer state) into its cache, verifies it, makes it live,
//! refuses one damaged in transit, and fetches a checkpoint by id on LoadCheckpoint.

mod server_support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use server_support::*;
use sha2::{Digest, Sha256};
use synopsis_model::checkpoint::{Manifest, MANIFEST};
use synopsis_proto::v1 as pb;
use synopsis_proto::v1::trainer_server::{Trainer, TrainerServer};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;

/// A trainer that only offers and serves checkpoints from directories.
#[derive(Clone, Default)]
struct FakeTrainer {
    dirs: Arc<Mutex<HashMap<String, PathBuf>>>,
    /// Checkpoints whose model.safetensors gets one byte flipped on the wire.
    damaged: Arc<Mutex<Vec<String>>>,
    offered: Arc<Mutex<Option<broadcast::Sender<pb::CheckpointInfo>>>>,
}

impl FakeTrainer {
    fn add(&self, dir: PathBuf) -> pb::CheckpointInfo {
        let m = Manifest::read(&dir).unwrap();
        let info = pb::CheckpointInfo {
            checkpoint_id: m.checkpoint_id.clone(),
            step: m.step,
            sha256: synopsis_model::checkpoint::sha256_file(&dir.join(MANIFEST)).unwrap(),
            ..Default::default()
        };
        self.dirs.lock().unwrap().insert(m.checkpoint_id, dir);
        info
    }

    fn offer(&self, info: pb::CheckpointInfo) {
        let tx = self.offered.lock().unwrap().clone().expect("watching");
        tx.send(info).unwrap();
    }
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl Trainer for FakeTrainer {
    async fn upload_dataset(
        &self,
        _: Request<tonic::Streaming<pb::DatasetChunk>>,
    ) -> Result<Response<pb::DatasetInfo>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type TrainStream = Stream<pb::TrainEvent>;
    async fn train(
        &self,
        _: Request<pb::TrainRequest>,
    ) -> Result<Response<Self::TrainStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type WatchRunStream = Stream<pb::TrainEvent>;
    async fn watch_run(
        &self,
        _: Request<pb::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn stop_run(
        &self,
        _: Request<pb::StopRunRequest>,
    ) -> Result<Response<pb::StopRunResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_runs(
        &self,
        _: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_checkpoints(
        &self,
        _: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    type WatchCheckpointsStream = Stream<pb::CheckpointInfo>;
    async fn watch_checkpoints(
        &self,
        _: Request<pb::WatchCheckpointsRequest>,
    ) -> Result<Response<Self::WatchCheckpointsStream>, Status> {
        let mut offers = {
            let mut guard = self.offered.lock().unwrap();
            guard
                .get_or_insert_with(|| broadcast::channel(16).0)
                .subscribe()
        };
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok(info) = offers.recv().await {
                if tx.send(Ok(info)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type FetchCheckpointStream = Stream<pb::CheckpointChunk>;
    async fn fetch_checkpoint(
        &self,
        request: Request<pb::FetchCheckpointRequest>,
    ) -> Result<Response<Self::FetchCheckpointStream>, Status> {
        let req = request.into_inner();
        let dir = self
            .dirs
            .lock()
            .unwrap()
            .get(&req.checkpoint_id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no checkpoint {}", req.checkpoint_id)))?;
        let damaged = self.damaged.lock().unwrap().contains(&req.checkpoint_id);
        let manifest = Manifest::read(&dir).unwrap();
        let mut names: Vec<String> = manifest.files.keys().cloned().collect();
        names.push(MANIFEST.into());
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            for name in names {
                if req.skip_optimizer && name == "optimizer.safetensors" {
                    continue;
                }
                let mut bytes = std::fs::read(dir.join(&name)).unwrap();
                let sha = hex::encode(Sha256::digest(&bytes));
                if damaged && name == "model.safetensors" {
                    let i = bytes.len() / 3;
                    bytes[i] ^= 1;
                }
                let size = bytes.len() as u64;
                let pieces: Vec<&[u8]> = bytes.chunks(64 << 10).collect();
                let mut offset = 0u64;
                for (i, piece) in pieces.iter().enumerate() {
                    let last = i + 1 == pieces.len();
                    let chunk = pb::CheckpointChunk {
                        file: name.clone(),
                        offset,
                        data: piece.to_vec(),
                        sha256: if last { sha.clone() } else { String::new() },
                        file_size: size,
                        info: None,
                    };
                    offset += piece.len() as u64;
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_a_trainer_that_comes_up_late() {
    let data = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let optimizer: &[u8] = &[7u8; 4096];
    let fake = FakeTrainer::default();
    let mut infos = Vec::new();
    for step in 1..=3u64 {
        let dir = data.path().join(format!("step-{step}"));
        write_tiny_checkpoint_with(
            &dir,
            &format!("run/step-{step}"),
            step,
            serde_json::Value::Null,
            &[("optimizer.safetensors", optimizer)],
        );
        infos.push(fake.add(dir));
    }
    fake.damaged.lock().unwrap().push("run/step-2".into());

    // The trainer's address, with nothing listening yet.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let trainer_addr = reserved.local_addr().unwrap();
    drop(reserved);
    let url = format!("http://{trainer_addr}");
    let server = TestServer::start(&[
        "--trainer",
        &url,
        "--cache-dir",
        cache.path().to_str().unwrap(),
    ])
    .await;
    assert_eq!(server.health("").await, ServingStatus::NotServing);

    // The trainer comes up and offers step-1.
    let listener = tokio::net::TcpListener::bind(trainer_addr).await.unwrap();
    let service = TrainerServer::new(fake.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    within(async {
        while fake
            .offered
            .lock()
            .unwrap()
            .as_ref()
            .is_none_or(|tx| tx.receiver_count() == 0)
        {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the generator connects to the trainer");
    fake.offer(infos[0].clone());
    let info = server
        .wait_for_info("step-1 live", |i| i.live_checkpoint_id == "run/step-1")
        .await;
    assert_eq!(info.resident[0].source, format!("trainer:{url}"));
    assert_eq!(server.health("").await, ServingStatus::Serving);
    let cached = cache.path().join("run_step-1");
    assert!(cached.join("model.safetensors").is_file());
    assert!(
        !cached.join("optimizer.safetensors").exists(),
        "optimizer state is not fetched"
    );

    // step-2 is damaged on the wire: refused, step-1 keeps serving.
    fake.offer(infos[1].clone());
    let info = server
        .wait_for_info("step-2 refused", |i| {
            i.refused.iter().any(|r| r.checkpoint_id == "run/step-2")
        })
        .await;
    let reason = &info
        .refused
        .iter()
        .find(|r| r.checkpoint_id == "run/step-2")
        .unwrap()
        .reason;
    assert!(reason.contains("model.safetensors"), "{reason}");
    assert_eq!(info.live_checkpoint_id, "run/step-1");
    let mut client = server.client().await;
    let ok = generate(&mut client, request("Still step one", 4))
        .await
        .expect("generate");
    assert_eq!(ok.started.unwrap().checkpoint_id, "run/step-1");

    // step-3 was never offered: LoadCheckpoint by id fetches it.
    let loaded = client
        .load_checkpoint(pb::LoadCheckpointRequest {
            source: Some(pb::load_checkpoint_request::Source::CheckpointId(
                "run/step-3".into(),
            )),
        })
        .await
        .expect("load by id")
        .into_inner();
    assert_eq!(loaded.info.unwrap().checkpoint_id, "run/step-3");
    let ok = generate(&mut client, request("Step three", 4))
        .await
        .expect("generate");
    assert_eq!(ok.started.unwrap().checkpoint_id, "run/step-3");

    let status = client
        .load_checkpoint(pb::LoadCheckpointRequest {
            source: Some(pb::load_checkpoint_request::Source::CheckpointId(
                "run/nope".into(),
            )),
        })
        .await
        .expect_err("unknown id");
    assert_eq!(status.code(), Code::NotFound);
}

/// Directories in the download cache (partial downloads included).
fn cached_dirs(cache: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cache)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            e.file_type()
                .unwrap()
                .is_dir()
                .then(|| e.file_name().to_string_lossy().into_owned())
        })
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_keeps_only_resident_checkpoints_on_disk() {
    const MAX_RESIDENT: usize = 2;
    const CHECKPOINTS: u64 = 8;
    let data = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let fake = FakeTrainer::default();
    let mut infos = Vec::new();
    for step in 1..=CHECKPOINTS {
        let dir = data.path().join(format!("step-{step}"));
        write_tiny_checkpoint(
            &dir,
            &format!("run/step-{step}"),
            step,
            serde_json::Value::Null,
        );
        infos.push(fake.add(dir));
    }
    // A checkpoint refused in transit must not stay on disk either.
    fake.damaged.lock().unwrap().push("run/step-4".into());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TrainerServer::new(fake.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let max_resident = MAX_RESIDENT.to_string();
    let server = TestServer::start(&[
        "--trainer",
        &url,
        "--cache-dir",
        cache.path().to_str().unwrap(),
        "--max-resident",
        &max_resident,
    ])
    .await;
    within(async {
        while fake
            .offered
            .lock()
            .unwrap()
            .as_ref()
            .is_none_or(|tx| tx.receiver_count() == 0)
        {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the generator connects to the trainer");

    for info in &infos {
        let id = info.checkpoint_id.clone();
        fake.offer(info.clone());
        let info = server
            .wait_for_info(&format!("{id} live or refused"), |i| {
                i.live_checkpoint_id == id || i.refused.iter().any(|r| r.checkpoint_id == id)
            })
            .await;
        let on_disk = cached_dirs(cache.path());
        assert!(
            on_disk.len() <= MAX_RESIDENT + 1,
            "after {id}: {on_disk:?} on disk, resident {:?}",
            info.resident
        );
    }

    // Once the last swap is over, exactly the resident checkpoints remain.
    let info = server
        .wait_for_info("cache pruned to the resident models", |_| {
            cached_dirs(cache.path()).len() <= MAX_RESIDENT
        })
        .await;
    assert_eq!(info.live_checkpoint_id, "run/step-8");
    let mut resident: Vec<String> = info
        .resident
        .iter()
        .map(|r| r.info.as_ref().unwrap().checkpoint_id.replace('/', "_"))
        .collect();
    resident.sort();
    assert_eq!(cached_dirs(cache.path()), resident);
    assert!(resident.contains(&"run_step-8".to_string()));
}
