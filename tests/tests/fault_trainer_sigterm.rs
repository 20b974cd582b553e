//! SIGTERM while a run trains: the trainer writes a checkpoint, marks the run STOPPED, exits
//! 0, and a restarted trainer resumes the run from that checkpoint.

mod e2e;

use e2e::{tiny_request, train, Trainer, CORPUS, LONG};
use synopsis_proto::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_checkpoints_stops_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (root, data) = (dir.path().join("root"), dir.path().join("data"));
    std::fs::create_dir_all(&data).unwrap();
    e2e::write_corpus(&data);
    let trainer = Trainer::start(&root, &data, &[]).await;
    let mut client = trainer.client().await;

    let mut request = tiny_request(CORPUS);
    // One sequence per step: an epoch is dozens of steps, so the signal lands mid-epoch.
    let hyper = request.hyper.as_mut().unwrap();
    hyper.epochs = 200;
    hyper.batch_size = 1;
    hyper.seq_len = 32;
    let mut stream = client.train(request).await.unwrap().into_inner();
    let mut run_id = String::new();
    let mut steps = 0;
    while steps < 3 {
        let event = tokio::time::timeout(LONG, stream.message())
            .await
            .expect("events keep coming")
            .unwrap()
            .expect("run still going");
        run_id = event.run_id.clone();
        if let Some(pb::train_event::Event::Step(_)) = event.event {
            steps += 1;
        }
    }

    trainer.process.sigterm();
    // The stream reports how the run ended before the server goes away.
    let mut finished = None;
    while let Ok(Ok(Some(event))) = tokio::time::timeout(LONG, stream.message()).await {
        if let Some(pb::train_event::Event::Finished(f)) = event.event {
            finished = Some(f);
        }
    }
    let status = tokio::task::spawn_blocking(move || {
        let status = trainer.process.wait_exit(LONG);
        (status, trainer)
    })
    .await
    .unwrap();
    let (status, trainer) = status;
    let status = status.expect("trainer exits after SIGTERM");
    assert!(
        status.success(),
        "exit status {status}\n{}",
        trainer.process.log_tail()
    );
    let finished = finished.expect("the stream carried the finished event");
    assert_eq!(finished.state, pb::RunState::Stopped as i32, "{finished:?}");
    assert!(!finished.last_checkpoint_id.is_empty(), "{finished:?}");
    drop(trainer);

    // A new process on the same root knows the run and its checkpoint.
    let trainer = Trainer::start(&root, &data, &[]).await;
    let mut client = trainer.client().await;
    let runs = client
        .list_runs(pb::ListRunsRequest {})
        .await
        .unwrap()
        .into_inner()
        .runs;
    let run = runs
        .iter()
        .find(|r| r.run_id == run_id)
        .expect("run listed after restart");
    assert_eq!(run.state, pb::RunState::Stopped as i32, "{run:?}");
    let checkpoints = client
        .list_checkpoints(pb::ListCheckpointsRequest {
            run_id: run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .checkpoints;
    let last = checkpoints
        .iter()
        .find(|c| c.checkpoint_id == finished.last_checkpoint_id)
        .unwrap_or_else(|| {
            panic!(
                "{} not listed: {checkpoints:?}",
                finished.last_checkpoint_id
            )
        });
    // No progress is lost: the last checkpoint is at the step the run stopped at. It is the
    // shutdown checkpoint, or the epoch's own when the signal came at an epoch boundary.
    assert!(last.step >= 3, "{last:?}");
    assert_eq!(last.step, run.step, "{last:?} vs {run:?}");
    assert!(
        last.reason == "shutdown" || last.reason == "epoch",
        "{last:?}"
    );

    // Resuming starts exactly where the shutdown checkpoint left off.
    let resume = pb::TrainRequest {
        resume_from: last.checkpoint_id.clone(),
        hyper: Some(pb::HyperParams {
            max_steps: last.step + 2,
            ..Default::default()
        }),
        ..Default::default()
    };
    let (_, events) = train(&mut client, resume).await;
    let started = e2e::started(&events).expect("started event");
    assert_eq!(started.start_step, last.step);
    let first_step = events.iter().find_map(|e| match &e.event {
        Some(pb::train_event::Event::Step(s)) => Some(s.step),
        _ => None,
    });
    assert_eq!(first_step, Some(last.step + 1));
    let done = e2e::finished(&events).expect("finished");
    assert_eq!(done.state, pb::RunState::Completed as i32, "{done:?}");
}
