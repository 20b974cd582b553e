//! SIGKILL while a checkpoint is being written, then a restart on the same root: the half
//! written checkpoint is neither listed nor served, the run's history survives, and the run
//! resumes from the last complete checkpoint.

mod e2e;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use e2e::{expect_code, tiny_request, train, Trainer, CORPUS, LONG};
use synopsis_proto::v1 as pb;

/// Prefix of the directory a checkpoint is written into before its atomic rename.
const TEMP_PREFIX: &str = ".tmp-";

/// Checkpoint directories under `root/checkpoints/*/`: (complete ones, ones being written).
fn scan(root: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut complete = Vec::new();
    let mut partial = Vec::new();
    let Ok(runs) = std::fs::read_dir(root.join("checkpoints")) else {
        return (complete, partial);
    };
    for run in runs.flatten() {
        let Ok(children) = std::fs::read_dir(run.path()) else {
            continue;
        };
        for child in children.flatten() {
            let name = child.file_name().to_string_lossy().into_owned();
            if name.starts_with(TEMP_PREFIX) {
                // Retention renames doomed checkpoints to `.tmp-deleting-…`: not a write.
                if !name.starts_with(".tmp-deleting-") {
                    partial.push(child.path());
                }
            } else if child.path().join("manifest.json").is_file() {
                complete.push(child.path());
            }
        }
    }
    (complete, partial)
}

/// Spins until a checkpoint write starts after at least one complete checkpoint exists, then
/// kills the trainer at once. Returns the temp directory seen, or `None` if the run ended first.
fn kill_during_write(trainer: &Trainer, root: &Path) -> Option<PathBuf> {
    let deadline = Instant::now() + LONG;
    while Instant::now() < deadline {
        let (complete, partial) = scan(root);
        if let (false, Some(temp)) = (complete.is_empty(), partial.first()) {
            trainer.process.sigkill();
            return Some(temp.clone());
        }
        if trainer.process.try_status().is_some() {
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    None
}

/// The checkpoint name inside a temp directory name `.tmp-<name>-<suffix>`.
fn name_in_temp(temp: &Path) -> String {
    let file = temp.file_name().unwrap().to_string_lossy().into_owned();
    // Names are `epoch-NNNN-step-NNNNNN`: fixed width.
    file[TEMP_PREFIX.len()..TEMP_PREFIX.len() + "epoch-0000-step-000000".len()].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_checkpoint_write_leaves_the_last_complete_one() {
    let dir = tempfile::tempdir().unwrap();
    let (root, data) = (dir.path().join("root"), dir.path().join("data"));
    std::fs::create_dir_all(&data).unwrap();
    e2e::write_corpus(&data);

    // The kill must land inside a write, which lasts milliseconds: when it misses (the write
    // finished between the look and the kill, seen because no temp directory is left), the
    // killed run is resumed and the next checkpoint is tried.
    let mut resume_from = String::new();
    let mut caught = None;
    for _attempt in 0..5 {
        let trainer = Trainer::start(&root, &data, &[]).await;
        let mut client = trainer.client().await;
        let mut request = tiny_request(CORPUS);
        request.hyper.as_mut().unwrap().epochs = 20;
        if !resume_from.is_empty() {
            request = pb::TrainRequest {
                resume_from: resume_from.clone(),
                ..Default::default()
            };
        }
        let mut stream = client.train(request).await.unwrap().into_inner();
        let first = stream.message().await.unwrap().expect("first event");
        let run_id = first.run_id.clone();
        let watcher_root = root.clone();
        let (temp, trainer) = tokio::task::spawn_blocking(move || {
            let temp = kill_during_write(&trainer, &watcher_root);
            trainer.process.wait_exit(LONG);
            (temp, trainer)
        })
        .await
        .unwrap();
        drop(trainer);
        let temp = temp.expect("the run wrote a checkpoint before it ended");
        if temp.exists() {
            caught = Some((run_id, temp));
            break;
        }
        let (complete, _) = scan(&root);
        let newest = complete.iter().max().expect("a complete checkpoint");
        resume_from = format!(
            "{}/{}",
            newest
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy(),
            newest.file_name().unwrap().to_string_lossy()
        );
    }
    let (run_id, temp) = caught.expect("a SIGKILL landed inside a checkpoint write");
    let partial_id = format!("{run_id}/{}", name_in_temp(&temp));

    let trainer = Trainer::start(&root, &data, &[]).await;
    let mut client = trainer.client().await;

    // The half-written directory is swept away, never listed, never served.
    assert!(!temp.exists(), "{} survived the restart", temp.display());
    let listed = client
        .list_checkpoints(pb::ListCheckpointsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .checkpoints;
    assert!(!listed.is_empty());
    assert!(
        listed.iter().all(|c| c.checkpoint_id != partial_id),
        "{partial_id} listed: {listed:?}"
    );
    let fetched = async {
        let mut stream = client
            .fetch_checkpoint(pb::FetchCheckpointRequest {
                checkpoint_id: partial_id.clone(),
                skip_optimizer: false,
            })
            .await?
            .into_inner();
        while stream.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    };
    expect_code(fetched.await, tonic::Code::NotFound, "fetch partial");

    // History: the run is known, its events replay from 0 without gaps, and they include
    // the complete checkpoint the run will resume from.
    let own: Vec<_> = listed.iter().filter(|c| c.run_id == run_id).collect();
    let last = own.iter().max_by_key(|c| c.step).expect("run's checkpoint");
    let runs = client
        .list_runs(pb::ListRunsRequest {})
        .await
        .unwrap()
        .into_inner()
        .runs;
    let run = runs
        .iter()
        .find(|r| r.run_id == run_id)
        .expect("run listed");
    assert_ne!(run.state, pb::RunState::Running as i32, "{run:?}");
    assert_ne!(run.state, pb::RunState::Completed as i32, "{run:?}");
    let mut replay = client
        .watch_run(pb::WatchRunRequest {
            run_id: run_id.clone(),
            from_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    // A run killed mid-flight may never have logged `finished`: stop reading when the
    // replay goes quiet.
    while let Ok(Ok(Some(event))) =
        tokio::time::timeout(Duration::from_secs(5), replay.message()).await
    {
        let done = matches!(event.event, Some(pb::train_event::Event::Finished(_)));
        events.push(event);
        if done {
            break;
        }
    }
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.seq, i as u64, "gap in the replayed history");
    }
    assert!(matches!(
        events.first().and_then(|e| e.event.as_ref()),
        Some(pb::train_event::Event::Started(_))
    ));
    assert!(
        e2e::checkpoints(&events)
            .iter()
            .any(|c| c.checkpoint_id == last.checkpoint_id),
        "history lacks {}",
        last.checkpoint_id
    );

    // Resume from the last complete checkpoint.
    let resume = pb::TrainRequest {
        resume_from: last.checkpoint_id.clone(),
        hyper: Some(pb::HyperParams {
            max_steps: last.step + 2,
            ..Default::default()
        }),
        ..Default::default()
    };
    let (_, events) = train(&mut client, resume).await;
    let started = e2e::started(&events).expect("started");
    assert_eq!(started.start_step, last.step);
    let done = e2e::finished(&events).expect("finished");
    assert_eq!(done.state, pb::RunState::Completed as i32, "{done:?}");
}
