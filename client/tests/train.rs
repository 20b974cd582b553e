//! `synopsis train`, `watch`, `plot`, `runs`, `checkpoints` and `stop` against a fake Trainer
//! over a real socket: the CSV is uploaded in 1 MiB chunks, the request carries the flags, the
//! run is shown (one JSON line per event, or readable lines without a terminal), plotting stops
//! on a run that is still going, and refusals and failed runs give their exit codes.

mod common;

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use common::{json_lines, run, run_events, serve_trainer, stderr, stdout};
use synopsis_proto::v1::trainer_server::Trainer;
use synopsis_proto::v1::{
    train_request, CheckpointChunk, CheckpointInfo, DatasetChunk, DatasetInfo,
    FetchCheckpointRequest, ListCheckpointsRequest, ListCheckpointsResponse, ListRunsRequest,
    ListRunsResponse, RunState, RunSummary, StopRunRequest, StopRunResponse, TrainEvent,
    TrainRequest, WatchCheckpointsRequest, WatchRunRequest,
};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

type EventStream = Pin<Box<dyn Stream<Item = Result<TrainEvent, Status>> + Send>>;

#[derive(Default, Clone)]
struct FakeTrainer {
    /// (filename of each chunk, bytes of each chunk) of the last upload.
    chunks: Arc<Mutex<Vec<(String, usize)>>>,
    requests: Arc<Mutex<Vec<TrainRequest>>>,
}

/// Events of a run as the fake knows them: "live" is still going, "broken" failed.
fn events_of(run_id: &str) -> Option<Vec<TrainEvent>> {
    match run_id {
        "run-7" => Some(run_events("run-7", Some(RunState::Completed))),
        "broken" => Some(run_events("broken", Some(RunState::Failed))),
        "live" | "cut" => Some(run_events(run_id, None)),
        _ => None,
    }
}

/// Streams `events`; a run without a finished event keeps its stream open, as a live one does.
fn stream_of(events: Vec<TrainEvent>) -> EventStream {
    let done = events.iter().any(|e| {
        matches!(
            e.event,
            Some(synopsis_proto::v1::train_event::Event::Finished(_))
        )
    });
    let replay = tokio_stream::iter(events.into_iter().map(Ok));
    if done {
        Box::pin(replay)
    } else {
        Box::pin(replay.chain(tokio_stream::pending()))
    }
}

#[tonic::async_trait]
impl Trainer for FakeTrainer {
    async fn upload_dataset(
        &self,
        request: Request<Streaming<DatasetChunk>>,
    ) -> Result<Response<DatasetInfo>, Status> {
        let mut stream = request.into_inner();
        let mut chunks = Vec::new();
        let mut bytes = 0u64;
        while let Some(chunk) = stream.message().await? {
            bytes += chunk.data.len() as u64;
            chunks.push((chunk.filename, chunk.data.len()));
        }
        *self.chunks.lock().unwrap() = chunks;
        Ok(Response::new(DatasetInfo {
            dataset_id: "ds-42".into(),
            bytes,
            rows: 3,
            columns: vec!["Name".into(), "Genres".into(), "Synopsis".into()],
            detected_text_column: "Synopsis".into(),
        }))
    }

    type TrainStream = EventStream;

    async fn train(&self, request: Request<TrainRequest>) -> Result<Response<EventStream>, Status> {
        let req = request.into_inner();
        self.requests.lock().unwrap().push(req.clone());
        let run = if req.run_name == "fail" {
            "broken"
        } else {
            "run-7"
        };
        Ok(Response::new(stream_of(events_of(run).unwrap_or_default())))
    }

    type WatchRunStream = EventStream;

    async fn watch_run(
        &self,
        request: Request<WatchRunRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let req = request.into_inner();
        let events = events_of(&req.run_id)
            .ok_or_else(|| Status::not_found(format!("run_id: no run {}", req.run_id)))?;
        let from = req.from_seq;
        if req.run_id == "cut" {
            // The trainer went away: the stream ends without a finished event.
            let mut events = run_events("cut", None);
            events.truncate(3);
            return Ok(Response::new(Box::pin(tokio_stream::iter(
                events.into_iter().map(Ok),
            ))));
        }
        Ok(Response::new(stream_of(
            events.into_iter().filter(|e| e.seq >= from).collect(),
        )))
    }

    async fn stop_run(
        &self,
        request: Request<StopRunRequest>,
    ) -> Result<Response<StopRunResponse>, Status> {
        match request.into_inner().run_id.as_str() {
            "live" => Ok(Response::new(StopRunResponse {
                state: RunState::Stopped as i32,
            })),
            other => Err(Status::invalid_argument(format!(
                "run_id: {other} is not running"
            ))),
        }
    }

    async fn list_runs(
        &self,
        _: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        Ok(Response::new(ListRunsResponse {
            runs: vec![
                RunSummary {
                    run_id: "run-7".into(),
                    run_name: "anime".into(),
                    state: RunState::Completed as i32,
                    step: 8,
                    total_steps: 8,
                    last_val_loss: 4.0,
                    last_checkpoint_id: "run-7/step-000008".into(),
                    ..Default::default()
                },
                RunSummary {
                    // What a hostile or careless server could send: escape sequences, a
                    // newline, a very long name.
                    run_id: "run-8".into(),
                    run_name: format!("\u{1b}[2J\u{1b}[31mred\nsecond line{}", "x".repeat(1000)),
                    state: RunState::Failed as i32,
                    message: "\u{1b}]0;title\u{7}failed\r\nagain".into(),
                    ..Default::default()
                },
            ],
        }))
    }

    async fn list_checkpoints(
        &self,
        request: Request<ListCheckpointsRequest>,
    ) -> Result<Response<ListCheckpointsResponse>, Status> {
        let run = request.into_inner().run_id;
        let all = [4u64, 8].map(|step| CheckpointInfo {
            checkpoint_id: format!("run-7/step-{step:06}"),
            run_id: "run-7".into(),
            step,
            ..Default::default()
        });
        Ok(Response::new(ListCheckpointsResponse {
            checkpoints: all
                .into_iter()
                .filter(|c| run.is_empty() || c.run_id == run)
                .collect(),
        }))
    }

    type WatchCheckpointsStream =
        Pin<Box<dyn Stream<Item = Result<CheckpointInfo, Status>> + Send>>;

    async fn watch_checkpoints(
        &self,
        _: Request<WatchCheckpointsRequest>,
    ) -> Result<Response<Self::WatchCheckpointsStream>, Status> {
        Err(Status::unimplemented("not used by the CLI"))
    }

    type FetchCheckpointStream =
        Pin<Box<dyn Stream<Item = Result<CheckpointChunk, Status>> + Send>>;

    async fn fetch_checkpoint(
        &self,
        _: Request<FetchCheckpointRequest>,
    ) -> Result<Response<Self::FetchCheckpointStream>, Status> {
        Err(Status::unimplemented("not used by the CLI"))
    }
}

async fn trainer() -> (FakeTrainer, String) {
    let fake = FakeTrainer::default();
    let addr = serve_trainer(fake.clone()).await;
    (fake, format!("http://{addr}"))
}

#[tokio::test]
async fn train_uploads_in_chunks_and_prints_one_json_line_per_event() {
    let (fake, url) = trainer().await;
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("synopses.csv");
    // 2.5 MiB: three chunks of at most 1 MiB.
    let row = "Name,Genres,Synopsis\n";
    let body = "x".repeat(5 * 512 * 1024 - row.len());
    std::fs::write(&csv, format!("{row}{body}")).unwrap();
    let out = run(&[
        "--trainer",
        &url,
        "--json",
        "train",
        "--data",
        csv.to_str().unwrap(),
        "--condition",
        "Genres,Name",
        "--epochs",
        "2",
        "--lr",
        "0.0003",
        "--preset",
        "tiny",
        "--max-steps",
        "8",
        "--seq-len",
        "64",
        "--run-name",
        "anime",
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let chunks = fake.chunks.lock().unwrap().clone();
    let sizes: Vec<usize> = chunks.iter().map(|c| c.1).collect();
    assert_eq!(sizes, [1 << 20, 1 << 20, 512 * 1024]);
    assert_eq!(chunks[0].0, "synopses.csv");
    assert!(chunks[1..].iter().all(|c| c.0.is_empty()));

    let req = fake.requests.lock().unwrap()[0].clone();
    assert_eq!(
        req.data,
        Some(train_request::Data::DatasetId("ds-42".into()))
    );
    assert_eq!(req.condition_columns, ["Genres", "Name"]);
    assert_eq!(req.run_name, "anime");
    assert_eq!(req.model.unwrap().preset, "tiny");
    let hyper = req.hyper.unwrap();
    assert_eq!((hyper.epochs, hyper.max_steps, hyper.seq_len), (2, 8, 64));
    assert!((hyper.learning_rate - 3e-4).abs() < 1e-12);

    let lines = json_lines(&out);
    assert_eq!(lines[0]["event"], "uploaded");
    assert_eq!(lines[0]["dataset_id"], "ds-42");
    let events = &lines[1..];
    let expected = run_events("run-7", Some(RunState::Completed));
    assert_eq!(events.len(), expected.len(), "one line per event");
    for (line, event) in events.iter().zip(&expected) {
        assert_eq!(line["seq"], event.seq);
        assert_eq!(line["run_id"], "run-7");
    }
    assert_eq!(events[0]["event"], "started");
    assert_eq!(events[0]["dataset"]["rows_kept"], 8);
    assert_eq!(events[1]["event"], "step");
    assert_eq!(events.last().unwrap()["event"], "finished");
    assert_eq!(events.last().unwrap()["state"], "completed");
}

#[tokio::test]
async fn train_without_a_terminal_prints_readable_lines() {
    let (fake, url) = trainer().await;
    let out = run(&["--trainer", &url, "train", "--data-path", "anime/clean.csv"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let req = fake.requests.lock().unwrap()[0].clone();
    assert_eq!(
        req.data,
        Some(train_request::Data::DataPath("anime/clean.csv".into()))
    );
    let text = stdout(&out);
    for expected in [
        "run run-7 started on cpu: 1.2M parameters, 8 steps",
        "dataset: 10 rows read, 8 kept (text column `Synopsis`)",
        "dropped: too short 2",
        "epoch 1 loss 4.4000",
        "epoch 1/2: train loss 4.5000, validation loss 4.5000 (perplexity 90.02)",
        "sample: In a world where robots dream of rain.",
        "checkpoint run-7/step-000004 written (epoch 1, step 4, validation loss 4.5000, 2.0 MB, epoch)",
        "run run-7 completed: done (last checkpoint run-7/step-000008)",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
}

#[tokio::test]
async fn detach_prints_the_run_id_and_returns() {
    let (_, url) = trainer().await;
    let out = run(&[
        "--trainer",
        &url,
        "train",
        "--data-path",
        "a.csv",
        "--detach",
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "run-7\n");
    assert!(stderr(&out).contains(&format!("synopsis --trainer {url} watch run-7 --from 0")));
}

#[tokio::test]
async fn a_failed_run_exits_1_and_says_why() {
    let (_, url) = trainer().await;
    let out = run(&[
        "--trainer",
        &url,
        "train",
        "--data-path",
        "a.csv",
        "--run-name",
        "fail",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("run broken failed: out of memory"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn watch_replays_from_a_position() {
    let (_, url) = trainer().await;
    let out = run(&["--trainer", &url, "--json", "watch", "run-7", "--from", "5"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let seqs: Vec<u64> = json_lines(&out)
        .iter()
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    let total = run_events("run-7", Some(RunState::Completed)).len() as u64;
    assert_eq!(seqs, (5..total).collect::<Vec<_>>());

    let out = run(&["--trainer", &url, "watch", "nope"]).await;
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("the trainer refused the request: NOT_FOUND: run_id: no run nope")
    );
}

#[tokio::test]
async fn plot_draws_a_finished_run_and_a_running_one() {
    let (_, url) = trainer().await;
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("loss.svg");
    let out = run(&[
        "--trainer",
        &url,
        "plot",
        "run-7",
        "-o",
        svg.to_str().unwrap(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("8 steps, 2 validation points, 2 checkpoints"));
    assert!(std::fs::read_to_string(&svg)
        .unwrap()
        .contains("validation loss"));

    // A running run never finishes its stream: plotting stops once the replay goes quiet.
    let png = dir.path().join("live.png");
    let out = run(&[
        "--trainer",
        &url,
        "plot",
        "live",
        "-o",
        png.to_str().unwrap(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(std::fs::metadata(&png).unwrap().len() > 10_000);

    let out = run(&["--trainer", &url, "plot", "run-7", "-o", "loss.gif"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("name it .png or .svg"));
}

#[tokio::test]
async fn runs_checkpoints_and_stop() {
    let (_, url) = trainer().await;
    let out = run(&["--trainer", &url, "runs"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("RUN"), "{text}");
    assert!(text.contains("run-7") && text.contains("completed") && text.contains("8/8"));
    // Server text is printed escaped: no escape sequence reaches the terminal, no newline or
    // long name breaks the table (header, two rows, one message line).
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "{text:?}"
    );
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(text.contains("\\u{1b}[31mred\\nsecond line"), "{text}");
    assert!(text.lines().all(|l| l.chars().count() < 300), "{text}");

    let out = run(&["--trainer", &url, "--json", "checkpoints", "run-7"]).await;
    let ids: Vec<String> = json_lines(&out)
        .iter()
        .map(|l| l["checkpoint_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["run-7/step-000004", "run-7/step-000008"]);

    let out = run(&["--trainer", &url, "stop", "live"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "run live: stopped\n");

    let out = run(&["--trainer", &url, "stop", "run-7"]).await;
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains(
            "the trainer refused the request: INVALID_ARGUMENT: run_id: run-7 is not running"
        ),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn a_stream_that_ends_early_exits_4_and_says_how_to_reattach() {
    let (_, url) = trainer().await;
    let out = run(&["--trainer", &url, "watch", "cut"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("the event stream ended before the run finished"),
        "{err}"
    );
    assert!(
        err.contains(&format!("synopsis --trainer {url} watch cut --from 3")),
        "{err}"
    );
}
