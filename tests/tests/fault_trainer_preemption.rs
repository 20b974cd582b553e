//! A preemption whose grace period runs out (the kubelet's SIGKILL after SIGTERM, a spot node
//! reclaimed) in the middle of an epoch: with `--checkpoint-every-steps` the run resumes from
//! its last step checkpoint instead of the epoch's start, and ends with the same losses as a
//! run that was never interrupted. Only the newest step checkpoint is kept on disk.

mod e2e;

use std::path::Path;

use e2e::{tiny_request, train, Trainer, CORPUS, LONG};
use synopsis_proto::v1 as pb;

const EVERY: u64 = 3;

fn request() -> pb::TrainRequest {
    let mut request = tiny_request(CORPUS);
    // One sequence per step: an epoch is dozens of steps, so step checkpoints fall inside it.
    let hyper = request.hyper.as_mut().unwrap();
    hyper.epochs = 1;
    hyper.batch_size = 1;
    hyper.seq_len = 32;
    hyper.seed = 11;
    request
}

fn every_steps() -> Vec<String> {
    vec!["--checkpoint-every-steps".into(), EVERY.to_string()]
}

fn last_epoch(events: &[pb::TrainEvent]) -> pb::EpochEvent {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::train_event::Event::Epoch(ep)) => Some(*ep),
            _ => None,
        })
        .next_back()
        .expect("an epoch event")
}

async fn list(trainer: &Trainer, run_id: &str) -> Vec<pb::CheckpointInfo> {
    trainer
        .client()
        .await
        .list_checkpoints(pb::ListCheckpointsRequest {
            run_id: run_id.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .checkpoints
}

fn assert_close(a: f64, b: f64, what: &str) {
    assert!(
        (a - b).abs() <= 1e-6 * a.abs().max(1.0),
        "{what}: resumed {a} vs uninterrupted {b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_mid_epoch_resumes_from_its_last_step_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    e2e::write_corpus(&data);

    // The reference: the same run, never interrupted.
    let reference_root = dir.path().join("reference");
    let reference = Trainer::start(&reference_root, &data, &every_steps()).await;
    let (reference_run, events) = train(&mut reference.client().await, request()).await;
    let done = e2e::finished(&events).expect("finished");
    assert_eq!(done.state, pb::RunState::Completed as i32, "{done:?}");
    let expected = last_epoch(&events);
    let steps_in_epoch = expected.step;
    assert!(
        steps_in_epoch > 2 * EVERY,
        "epoch of {steps_in_epoch} steps"
    );
    // Several step checkpoints were written; each replaced the previous one, and the epoch's
    // checkpoint replaced the last.
    let announced = e2e::checkpoints(&events);
    let steps: Vec<u64> = announced
        .iter()
        .filter(|c| c.reason == "step")
        .map(|c| c.step)
        .collect();
    assert!(steps.len() >= 2, "{announced:?}");
    assert!(steps.iter().all(|s| s.is_multiple_of(EVERY)), "{steps:?}");
    let kept = list(&reference, &reference_run).await;
    assert!(kept.iter().all(|c| c.reason != "step"), "{kept:?}");
    assert_eq!(step_dirs(&reference_root), kept.len());
    drop(reference);

    // The same run, killed right after its first step checkpoint is announced.
    let root = dir.path().join("root");
    let trainer = Trainer::start(&root, &data, &every_steps()).await;
    let mut stream = trainer
        .client()
        .await
        .train(request())
        .await
        .unwrap()
        .into_inner();
    let run_id = loop {
        let event = tokio::time::timeout(LONG, stream.message())
            .await
            .expect("events keep coming")
            .unwrap()
            .expect("the run announces a step checkpoint before it ends");
        if let Some(pb::train_event::Event::Checkpoint(c)) = &event.event {
            assert_eq!(c.reason, "step", "{c:?}");
            assert_eq!(c.step, EVERY, "{c:?}");
            break event.run_id;
        }
    };
    trainer.process.sigkill();
    let trainer = tokio::task::spawn_blocking(move || {
        trainer.process.wait_exit(LONG).expect("killed");
        trainer
    })
    .await
    .unwrap();
    drop(trainer);

    // A new process finds the run's newest step checkpoint, inside the epoch.
    let trainer = Trainer::start(&root, &data, &every_steps()).await;
    let checkpoints = list(&trainer, &run_id).await;
    let newest = checkpoints
        .iter()
        .max_by_key(|c| c.step)
        .unwrap_or_else(|| panic!("no checkpoint survived: {checkpoints:?}"));
    assert_eq!(newest.reason, "step", "{checkpoints:?}");
    assert!(
        newest.step.is_multiple_of(EVERY) && newest.step < steps_in_epoch,
        "{newest:?}"
    );
    // Superseded step checkpoints are gone from the catalog and the volume.
    assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");
    assert_eq!(step_dirs(&root), 1);

    // Resumed, it runs the rest of the epoch and lands where the uninterrupted run did.
    let resume = pb::TrainRequest {
        resume_from: newest.checkpoint_id.clone(),
        ..Default::default()
    };
    let (_, events) = train(&mut trainer.client().await, resume).await;
    let started = e2e::started(&events).expect("started");
    assert_eq!(started.start_step, newest.step);
    let done = e2e::finished(&events).expect("finished");
    assert_eq!(done.state, pb::RunState::Completed as i32, "{done:?}");
    let resumed = last_epoch(&events);
    assert_eq!(resumed.step, expected.step);
    assert_close(resumed.train_loss, expected.train_loss, "train loss");
    assert_close(resumed.val_loss, expected.val_loss, "validation loss");
}

/// Complete checkpoint directories of every run under `root`.
fn step_dirs(root: &Path) -> usize {
    let mut n = 0;
    for run in std::fs::read_dir(root.join("checkpoints"))
        .unwrap()
        .flatten()
    {
        for child in std::fs::read_dir(run.path()).unwrap().flatten() {
            if child.path().join("manifest.json").is_file() {
                n += 1;
            }
        }
    }
    n
}
