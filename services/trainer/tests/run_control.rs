//! Controlling runs over a real socket: StopRun mid-run, one run per device, following a run
//! from a second client, runs and events surviving a restart, a graceful shutdown that
//! checkpoints the running run, and a run orphaned by a crash.

mod common;

use common::*;
use synopsis_model::checkpoint::verify_checkpoint;
use synopsis_proto::v1::{
    train_event, HyperParams, ListCheckpointsRequest, ListRunsRequest, RunState, StopRunRequest,
    TrainEvent, TrainRequest, WatchRunRequest,
};
use tonic::Code;

/// Reads events until the first `step`, returning them with the rest of the stream.
async fn until_first_step(stream: &mut tonic::Streaming<TrainEvent>) -> Vec<TrainEvent> {
    let mut seen = Vec::new();
    while let Some(e) = stream.message().await.unwrap() {
        let is_step = kind(&e) == "step";
        seen.push(e);
        if is_step {
            return seen;
        }
    }
    panic!("the run ended before its first step: {seen:?}");
}

async fn rest(stream: tonic::Streaming<TrainEvent>, mut seen: Vec<TrainEvent>) -> Vec<TrainEvent> {
    seen.extend(collect(stream).await);
    seen
}

/// Events as bytes: equal bytes mean equal events, NaN validation losses included.
fn encoded(events: &[TrainEvent]) -> Vec<Vec<u8>> {
    events.iter().map(prost::Message::encode_to_vec).collect()
}

fn checkpoint_of(e: &TrainEvent) -> Option<&synopsis_proto::v1::CheckpointInfo> {
    match &e.event {
        Some(train_event::Event::Checkpoint(c)) => Some(c),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_busy_follow_and_restart() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path()).await;
    let mut client = server.client().await;
    let dataset_id = upload(&mut client, &corpus_csv()).await;

    let mut stream = client
        .train(long_request(&dataset_id))
        .await
        .unwrap()
        .into_inner();
    let head = until_first_step(&mut stream).await;
    let run_id = head[0].run_id.clone();

    // One run per device: a second Train is refused, naming the running run.
    let err = client
        .train(tiny_request(&dataset_id, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains(&run_id), "{}", err.message());

    // A second client follows the same run from the start.
    let mut watcher = server.client().await;
    let watch = watcher
        .watch_run(WatchRunRequest {
            run_id: run_id.clone(),
            from_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let watched = tokio::spawn(collect(watch));

    let state = client
        .stop_run(StopRunRequest {
            run_id: run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .state();
    assert_eq!(state, RunState::Running);
    let events = rest(stream, head).await;
    let done = finished(&events);
    assert_eq!(done.state(), RunState::Stopped);
    let stop_ckpt = checkpoint_of(&events[events.len() - 2])
        .expect("a checkpoint right before finished")
        .clone();
    assert_eq!(stop_ckpt.reason, "stop");
    assert_eq!(stop_ckpt.epoch, 0, "stopped inside the first epoch");
    assert_eq!(done.last_checkpoint_id, stop_ckpt.checkpoint_id);
    let Some(train_event::Event::Started(started)) = &events[0].event else {
        unreachable!()
    };
    assert!(
        stop_ckpt.step < started.total_steps,
        "stopped before the end"
    );
    verify_checkpoint(&checkpoint_dir(root.path(), &stop_ckpt.checkpoint_id)).unwrap();

    // The follower saw exactly the same events.
    assert_eq!(encoded(&watched.await.unwrap()), encoded(&events));

    // Stopping a finished run answers its final state.
    let state = client
        .stop_run(StopRunRequest {
            run_id: run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .state();
    assert_eq!(state, RunState::Stopped);
    let err = client
        .stop_run(StopRunRequest {
            run_id: "run-19990101-000000-abcd".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Resuming from the stop checkpoint continues at its step.
    let resumed = collect(
        client
            .train(TrainRequest {
                resume_from: stop_ckpt.checkpoint_id.clone(),
                hyper: Some(HyperParams {
                    max_steps: stop_ckpt.step + 2,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    let Some(train_event::Event::Started(rs)) = &resumed[0].event else {
        unreachable!()
    };
    assert_eq!(rs.start_step, stop_ckpt.step);
    assert_eq!(rs.total_steps, stop_ckpt.step + 2);
    assert_eq!(finished(&resumed).state(), RunState::Completed);
    let last_ckpt = resumed.iter().rev().find_map(checkpoint_of).unwrap();
    assert_eq!(last_ckpt.step, stop_ckpt.step + 2);

    // After a restart on the same root: runs, events and checkpoints are all still there.
    server.shutdown().await.unwrap();
    let server = Server::start(root.path()).await;
    let mut client = server.client().await;
    let runs = client
        .list_runs(ListRunsRequest {})
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert_eq!(runs.len(), 2);
    let first = runs.iter().find(|r| r.run_id == run_id).unwrap();
    assert_eq!(first.state(), RunState::Stopped);
    assert_eq!(first.last_checkpoint_id, stop_ckpt.checkpoint_id);
    assert_eq!(first.run_name, "tiny test");
    assert!(runs
        .iter()
        .any(|r| r.run_id != run_id && r.state() == RunState::Completed));
    let replayed = collect(
        client
            .watch_run(WatchRunRequest {
                run_id: run_id.clone(),
                from_seq: 0,
            })
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(encoded(&replayed), encoded(&events));
    let tail = collect(
        client
            .watch_run(WatchRunRequest {
                run_id: run_id.clone(),
                from_seq: 3,
            })
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(encoded(&tail), encoded(&events[3..]));
    let listed = client
        .list_checkpoints(ListCheckpointsRequest {
            run_id: run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .checkpoints;
    assert!(listed
        .iter()
        .any(|c| c.checkpoint_id == stop_ckpt.checkpoint_id));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_checkpoints_the_running_run_before_returning() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path()).await;
    let mut client = server.client().await;
    let dataset_id = upload(&mut client, &corpus_csv()).await;
    let mut stream = client
        .train(long_request(&dataset_id))
        .await
        .unwrap()
        .into_inner();
    let head = until_first_step(&mut stream).await;
    let run_id = head[0].run_id.clone();

    // What SIGTERM does: serve() returns only once the run has checkpointed and stopped.
    server.shutdown().await.unwrap();
    let events = rest(stream, head).await;
    assert_eq!(finished(&events).state(), RunState::Stopped);
    let ckpt = checkpoint_of(&events[events.len() - 2]).unwrap().clone();
    assert_eq!(ckpt.reason, "shutdown");
    verify_checkpoint(&checkpoint_dir(root.path(), &ckpt.checkpoint_id)).unwrap();

    let server = Server::start(root.path()).await;
    let mut client = server.client().await;
    let runs = client
        .list_runs(ListRunsRequest {})
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].run_id, run_id);
    assert_eq!(runs[0].state(), RunState::Stopped);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_left_running_by_a_dead_process_is_marked_failed() {
    let root = tempfile::tempdir().unwrap();
    let run_dir = root.path().join("runs").join("run-20260101-000000-beef");
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::write(
        run_dir.join("run.json"),
        r#"{"run_id":"run-20260101-000000-beef","run_name":"crashed","state":"running",
            "created":1767225600,"step":12,"total_steps":100,
            "last_checkpoint_id":"run-20260101-000000-beef/epoch-0001-step-000010"}"#,
    )
    .unwrap();
    // A log whose last line was torn by the crash.
    std::fs::write(run_dir.join("events.jsonl"), b"{\"seq\":0,\"ti").unwrap();

    let server = Server::start(root.path()).await;
    let mut client = server.client().await;
    let runs = client
        .list_runs(ListRunsRequest {})
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].state(), RunState::Failed);
    assert!(
        runs[0].message.contains("trainer restarted"),
        "{}",
        runs[0].message
    );
    assert!(runs[0].message.contains("epoch-0001-step-000010"));
    let replay = collect(
        client
            .watch_run(WatchRunRequest {
                run_id: runs[0].run_id.clone(),
                from_seq: 0,
            })
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(replay.len(), 1);
    assert_eq!(finished(&replay).state(), RunState::Failed);

    let err = client
        .watch_run(WatchRunRequest {
            run_id: "../../etc".into(),
            from_seq: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.shutdown().await.unwrap();
}
