//! Controlling runs over a real socket: StopRun mid-run, one run per device, following a run
//! from a second client, runs and events surviving a restart, a graceful shutdown that
//! checkpoints the running run, and a run orphaned by a crash.

mod common;

use common::*;
use synopsis_model::checkpoint::verify_checkpoint;
use synopsis_proto::v1::{
    train_event, CheckpointInfo, HyperParams, ListCheckpointsRequest, ListRunsRequest, RunState,
    StopRunRequest, TrainEvent, TrainRequest, WatchCheckpointsRequest, WatchRunRequest,
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

/// Equal as bytes (a NaN validation loss is not equal to itself).
fn assert_same(a: &CheckpointInfo, b: &CheckpointInfo) {
    use prost::Message;
    assert_eq!(a.encode_to_vec(), b.encode_to_vec(), "{a:?} != {b:?}");
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
    // Follows every checkpoint of any run (none exists yet).
    let mut feed = client
        .watch_checkpoints(WatchCheckpointsRequest::default())
        .await
        .unwrap()
        .into_inner();

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
    // An invalid request is INVALID_ARGUMENT whether or not the device is busy: a busy
    // answer is one clients retry, and this one can never succeed.
    let mut invalid = tiny_request(&dataset_id, 1);
    invalid.hyper.as_mut().unwrap().learning_rate = 7.0;
    let err = client.train(invalid).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let mut invalid = tiny_request(&dataset_id, 1);
    invalid.run_name = "evil\u{1b}[2J\nname".into();
    let err = client.train(invalid).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("run_name"), "{err:?}");

    // A follower asking to start past the running run's end gets the run's end too: the
    // stream closes (OUT_OF_RANGE, as for a finished run) instead of waiting forever.
    let mut ahead = server.client().await;
    let ahead = ahead
        .watch_run(WatchRunRequest {
            run_id: run_id.clone(),
            from_seq: 1_000_000,
        })
        .await
        .unwrap()
        .into_inner();
    let ahead = tokio::spawn(async move {
        let mut ahead = ahead;
        let mut events = 0;
        loop {
            match ahead.message().await {
                Ok(Some(_)) => events += 1,
                Ok(None) => return (events, None),
                Err(status) => return (events, Some(status)),
            }
        }
    });

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
    // A hang guard only (the run has ended: the stream must end now).
    let (sent, status) = tokio::time::timeout(std::time::Duration::from_secs(120), ahead)
        .await
        .expect("WatchRun past the end of a run that finished must close")
        .unwrap();
    assert_eq!(sent, 0);
    let status = status.expect("an OUT_OF_RANGE status");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
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

    // The checkpoint feed announced each new checkpoint, in order.
    let announced: Vec<_> = resumed.iter().filter_map(checkpoint_of).cloned().collect();
    assert_same(&feed.message().await.unwrap().unwrap(), &stop_ckpt);
    for expected in &announced {
        assert_same(&feed.message().await.unwrap().unwrap(), expected);
    }

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
    // Past the end of a finished run nothing can ever come: the call says so at once.
    let past = client
        .watch_run(WatchRunRequest {
            run_id: run_id.clone(),
            from_seq: events.len() as u64,
        })
        .await
        .expect_err("watching past the end of a finished run must fail");
    assert_eq!(past.code(), tonic::Code::OutOfRange, "{past:?}");
    assert!(past.message().contains("from_seq"), "{past:?}");
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

    // The feed of one run starts with that run's newest checkpoint; draining ends it.
    let mut feed = client
        .watch_checkpoints(WatchCheckpointsRequest {
            run_id: run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_same(&feed.message().await.unwrap().unwrap(), &stop_ckpt);
    server.shutdown().await.unwrap();
    assert!(feed.message().await.map(|m| m.is_none()).unwrap_or(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conditioned_run_from_the_data_root() {
    let root = tempfile::tempdir().unwrap();
    let data_root = tempfile::tempdir().unwrap();
    std::fs::create_dir(data_root.path().join("corpora")).unwrap();
    std::fs::write(data_root.path().join("corpora/tiny.csv"), corpus_csv()).unwrap();
    let server = Server::start_with(root.path(), |c| {
        c.data_root = Some(data_root.path().to_path_buf());
    })
    .await;
    let mut client = server.client().await;
    let mut req = tiny_request("", 1);
    req.data = Some(synopsis_proto::v1::train_request::Data::DataPath(
        "corpora/tiny.csv".into(),
    ));
    req.condition_columns = vec!["Genres".into()];
    req.sample_prompts = vec!["A young pilot".into()];
    let events = collect(client.train(req).await.unwrap().into_inner()).await;
    assert_eq!(finished(&events).state(), RunState::Completed);
    let sample = events
        .iter()
        .find_map(|e| match &e.event {
            Some(train_event::Event::Sample(s)) => Some(s.clone()),
            _ => None,
        })
        .unwrap();
    // The prompt is wrapped in the conditioning template, as the generator will wrap it.
    assert_eq!(sample.prompt, "Synopsis: A young pilot");
    let ckpt = events.iter().find_map(checkpoint_of).unwrap();
    assert_eq!(ckpt.condition_columns, vec!["Genres".to_string()]);
    let manifest = verify_checkpoint(&checkpoint_dir(root.path(), &ckpt.checkpoint_id)).unwrap();
    assert_eq!(
        manifest.metadata["conditioning"]["columns"],
        serde_json::json!(["Genres"])
    );
    assert_eq!(
        manifest.metadata["conditioning"]["labels"],
        serde_json::json!(["Genres"])
    );
    assert_eq!(manifest.metadata["parameters"], ckpt.parameters);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fine_tunes_a_hugging_face_base_model() {
    let root = tempfile::tempdir().unwrap();
    let models = tempfile::tempdir().unwrap();
    // A plain HF GPT-2 directory (random tiny weights, GPT-2's vocabulary) and GPT-2's tokenizer.
    let base = models.path().join("fake_gpt2");
    std::fs::create_dir(&base).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("fake_gpt2").join(f), base.join(f)).unwrap();
    }
    let tok = models.path().join("gpt2_tokenizer");
    std::fs::create_dir(&tok).unwrap();
    std::fs::copy(
        fixture("gpt2_tokenizer/tokenizer.json"),
        tok.join("tokenizer.json"),
    )
    .unwrap();

    let server = Server::start_with(root.path(), |c| {
        c.models_root = Some(models.path().to_path_buf());
    })
    .await;
    let mut client = server.client().await;
    let dataset_id = upload(&mut client, &corpus_csv()).await;
    let mut req = tiny_request(&dataset_id, 1);
    req.model = None;
    req.base_model = "fake_gpt2".into();
    req.tokenizer = "gpt2_tokenizer".into();
    let hyper = req.hyper.as_mut().unwrap();
    hyper.learning_rate = 0.0; // the fine-tuning default
    hyper.seq_len = 0; // min(256, n_positions)
    hyper.max_steps = 1;
    hyper.batch_size = 1; // several steps an epoch: max_steps ends the run inside it
    let events = collect(client.train(req.clone()).await.unwrap().into_inner()).await;
    assert_eq!(
        finished(&events).state(),
        RunState::Completed,
        "{:?}",
        finished(&events)
    );
    let Some(train_event::Event::Started(started)) = &events[0].event else {
        unreachable!()
    };
    let resolved: serde_json::Value = serde_json::from_str(&started.resolved_config_json).unwrap();
    assert_eq!(resolved["hyper"]["learning_rate"], 5e-5);
    assert_eq!(resolved["hyper"]["seq_len"], 256);
    assert_eq!(resolved["model"]["vocab_size"], 50257);
    assert_eq!(resolved["base_model"], "fake_gpt2");
    let ckpt = events.iter().rev().find_map(checkpoint_of).unwrap();
    let manifest = verify_checkpoint(&checkpoint_dir(root.path(), &ckpt.checkpoint_id)).unwrap();
    assert_eq!(manifest.step, 1);
    assert_eq!(ckpt.reason, "final");
    // The epoch that `max_steps` cut short reports the time it ran, not zero.
    let epoch = events
        .iter()
        .find_map(|e| match &e.event {
            Some(train_event::Event::Epoch(epoch)) => Some(*epoch),
            _ => None,
        })
        .expect("an epoch event for the partial epoch");
    assert!(epoch.seconds > 0.0, "{epoch:?}");

    // A base model's shape is fixed, and names must stay under --models-root.
    let mut bad = req.clone();
    bad.model = Some(synopsis_proto::v1::ModelSpec {
        n_layer: 4,
        ..Default::default()
    });
    assert_eq!(
        client.train(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut bad = req.clone();
    bad.base_model = "../fake_gpt2".into();
    assert_eq!(
        client.train(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut bad = req;
    bad.base_model = "missing".into();
    assert_eq!(
        client.train(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
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
    // A log whose last line was torn by the crash, and an upload cut short.
    std::fs::write(run_dir.join("events.jsonl"), b"{\"seq\":0,\"ti").unwrap();
    let datasets = root.path().join("datasets");
    std::fs::create_dir_all(&datasets).unwrap();
    std::fs::write(datasets.join(".upload-x1y2.tmp"), b"MAL_ID,Syn").unwrap();

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
    assert!(!datasets.join(".upload-x1y2.tmp").exists());
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
