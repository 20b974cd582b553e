//! The `synopsis.v1.Trainer` gRPC service: thin handlers over the [`Manager`]. Blocking work
//! (files, hashing, CSV parsing) runs on blocking threads; streams are channels fed by tasks
//! that stop when the client leaves.

mod fetch;
mod follow;

use std::pin::Pin;
use std::sync::Arc;

use synopsis_proto::v1::trainer_server::Trainer;
use synopsis_proto::v1::{
    CheckpointChunk, CheckpointInfo, DatasetChunk, DatasetInfo, FetchCheckpointRequest,
    ListCheckpointsRequest, ListCheckpointsResponse, ListRunsRequest, ListRunsResponse,
    StopRunRequest, StopRunResponse, TrainEvent, TrainRequest, WatchCheckpointsRequest,
    WatchRunRequest,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::error::TrainerError;
use crate::ids;
use crate::manager::Manager;

pub use follow::STREAM_BUFFER;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[derive(Debug, Clone)]
pub struct TrainerService {
    manager: Arc<Manager>,
    /// Becomes `true` when the server drains: endless streams end.
    drain: watch::Receiver<bool>,
}

impl TrainerService {
    pub fn new(manager: Arc<Manager>, drain: watch::Receiver<bool>) -> Self {
        TrainerService { manager, drain }
    }

    fn follow(&self, run: Arc<crate::runs::Run>, from_seq: u64) -> BoxStream<TrainEvent> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(follow::follow_run(run, from_seq, tx, self.drain.clone()));
        Box::pin(ReceiverStream::new(rx))
    }
}

fn blocking_panic(e: tokio::task::JoinError) -> Status {
    // A panic's text may be libtorch's (C++ backtrace): the log has it, the client an id.
    Status::internal(synopsis_common::internal_message(&format!(
        "worker failed: {e}"
    )))
}

#[tonic::async_trait]
impl Trainer for TrainerService {
    /// Chunks go to a blocking writer thread through a small channel, so a slow disk slows
    /// the client (backpressure) instead of buffering the upload in memory. Over
    /// `--max-upload-bytes` the upload fails with RESOURCE_EXHAUSTED and nothing is stored.
    async fn upload_dataset(
        &self,
        request: Request<Streaming<DatasetChunk>>,
    ) -> Result<Response<DatasetInfo>, Status> {
        let mut stream = request.into_inner();
        let first = match stream.next().await {
            Some(chunk) => chunk?,
            None => return Err(TrainerError::invalid("data", "the upload is empty").into()),
        };
        let filename = first.filename.clone();
        let store = self.manager.datasets.clone();
        let manager = self.manager.clone();
        // Unused old uploads go first, making room under the quota.
        tokio::task::spawn_blocking(move || manager.remove_unused_datasets())
            .await
            .map_err(blocking_panic)?;
        let (tx, mut rx) = mpsc::channel::<Option<Vec<u8>>>(4);
        let writer = tokio::task::spawn_blocking(move || {
            let mut upload = store.begin_upload(&filename)?;
            // `None` marks the end; a channel closed without it is an aborted upload, and
            // dropping `upload` deletes its temporary file.
            while let Some(message) = rx.blocking_recv() {
                match message {
                    Some(data) => upload.write_chunk(&data)?,
                    None => return upload.finish().map(Some),
                }
            }
            Ok(None)
        });
        let mut pending = Some(first.data);
        loop {
            let message = match pending.take() {
                Some(d) => Some(d),
                None => match stream.next().await {
                    Some(chunk) => Some(chunk?.data),
                    None => None,
                },
            };
            let end = message.is_none();
            if tx.send(message).await.is_err() || end {
                // Done, or the writer stopped early (e.g. over the size limit): its result
                // says which.
                break;
            }
        }
        drop(tx);
        let info = writer
            .await
            .map_err(blocking_panic)?
            .map_err(|source| TrainerError::Data {
                field: "data",
                source,
            })?
            .ok_or_else(|| Status::cancelled("the upload was interrupted"))?;
        Ok(Response::new(DatasetInfo {
            dataset_id: info.dataset_id,
            bytes: info.bytes,
            rows: info.rows,
            columns: info.columns,
            detected_text_column: info.detected_text_column.unwrap_or_default(),
        }))
    }

    type TrainStream = BoxStream<TrainEvent>;

    async fn train(
        &self,
        request: Request<TrainRequest>,
    ) -> Result<Response<Self::TrainStream>, Status> {
        let run = self.manager.start(request.into_inner()).await?;
        Ok(Response::new(self.follow(run, 0)))
    }

    type WatchRunStream = BoxStream<TrainEvent>;

    async fn watch_run(
        &self,
        request: Request<WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let req = request.into_inner();
        ids::validate_run_id("run_id", &req.run_id)?;
        let run = self
            .manager
            .runs
            .get(&req.run_id)
            .ok_or_else(|| TrainerError::NotFound(format!("no run {}", req.run_id)))?;
        // A finished run emits nothing more: a from_seq past its last event could never be met.
        let end = run.next_seq();
        if run.state().is_terminal() && req.from_seq >= end {
            return Err(Status::out_of_range(format!(
                "from_seq {} is past the end of run {}: it finished with events 0..={}",
                req.from_seq,
                req.run_id,
                end.saturating_sub(1)
            )));
        }
        Ok(Response::new(self.follow(run, req.from_seq)))
    }

    async fn stop_run(
        &self,
        request: Request<StopRunRequest>,
    ) -> Result<Response<StopRunResponse>, Status> {
        let state = self.manager.stop(&request.into_inner().run_id)?;
        Ok(Response::new(StopRunResponse {
            state: state.to_proto() as i32,
        }))
    }

    async fn list_runs(
        &self,
        _request: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        let runs = self
            .manager
            .runs
            .list()
            .iter()
            .map(|r| r.summary())
            .collect();
        Ok(Response::new(ListRunsResponse { runs }))
    }

    async fn list_checkpoints(
        &self,
        request: Request<ListCheckpointsRequest>,
    ) -> Result<Response<ListCheckpointsResponse>, Status> {
        let run_id = request.into_inner().run_id;
        if !run_id.is_empty() {
            ids::validate_run_id("run_id", &run_id)?;
        }
        let checkpoints = self
            .manager
            .catalog
            .list((!run_id.is_empty()).then_some(run_id.as_str()));
        Ok(Response::new(ListCheckpointsResponse { checkpoints }))
    }

    type WatchCheckpointsStream = BoxStream<CheckpointInfo>;

    async fn watch_checkpoints(
        &self,
        request: Request<WatchCheckpointsRequest>,
    ) -> Result<Response<Self::WatchCheckpointsStream>, Status> {
        let run_id = request.into_inner().run_id;
        if !run_id.is_empty() {
            ids::validate_run_id("run_id", &run_id)?;
        }
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(follow::watch_checkpoints(
            self.manager.catalog.clone(),
            (!run_id.is_empty()).then_some(run_id),
            tx,
            self.drain.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type FetchCheckpointStream = BoxStream<CheckpointChunk>;

    async fn fetch_checkpoint(
        &self,
        request: Request<FetchCheckpointRequest>,
    ) -> Result<Response<Self::FetchCheckpointStream>, Status> {
        let req = request.into_inner();
        let entry = self
            .manager
            .catalog
            .get("checkpoint_id", &req.checkpoint_id)?;
        // A few chunks in flight: memory stays at a few MiB whatever the checkpoint's size.
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || fetch::send_checkpoint(entry, req.skip_optimizer, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
