//! The disk fills up while the trainer writes a checkpoint: the run reports the error, the
//! previous checkpoint stays listed and intact, and once space is back the run resumes
//! from it.
//!
//! The size-limited disk is a tmpfs mounted for the test when the test may mount (root, as
//! in CI containers); elsewhere the trainer's file-size limit (RLIMIT_FSIZE, set with
//! `prlimit` on the running process, SIGXFSZ ignored) makes writes fail with EFBIG instead.

mod e2e;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::{tiny_request, Trainer, CORPUS, LONG};
use sha2::{Digest, Sha256};
use synopsis_proto::v1 as pb;
use synopsis_tests::{free_port, workspace_bin, ServiceProcess};

/// A tmpfs of a few MiB, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }

    /// Writes a filler file until the file system says it is full.
    fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut file = std::fs::File::create(&path).expect("create filler");
        for chunk in [1 << 16, 1 << 10, 1] {
            let block = vec![0u8; chunk];
            while file.write_all(&block).is_ok() {}
        }
        let _ = file.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// How the disk is made to fail.
enum Limit {
    Tmpfs(Tmpfs),
    FileSize,
}

/// Hex sha256 of every file of a FetchCheckpoint stream, checked against the sha256 the
/// stream announces on each file's last chunk.
async fn fetch_and_verify(trainer: &Trainer, id: &str) -> usize {
    let mut client = trainer.client().await;
    let mut stream = client
        .fetch_checkpoint(pb::FetchCheckpointRequest {
            checkpoint_id: id.into(),
            skip_optimizer: false,
        })
        .await
        .expect("fetch accepted")
        .into_inner();
    let mut hashers: std::collections::BTreeMap<String, Sha256> = Default::default();
    let mut verified = 0;
    while let Some(chunk) = stream.message().await.expect("fetch stream") {
        let hasher = hashers.entry(chunk.file.clone()).or_default();
        hasher.update(&chunk.data);
        if !chunk.sha256.is_empty() {
            let hash = hex::encode(hashers.remove(&chunk.file).unwrap().finalize());
            assert_eq!(hash, chunk.sha256, "{} of {id}", chunk.file);
            verified += 1;
        }
    }
    verified
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_run_and_keeps_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    e2e::write_corpus(&data);
    let disk = dir.path().join("disk");
    // SYNOPSIS_TEST_DISK_FULL=fsize forces the file-size variant where mounting would work.
    let forced = std::env::var("SYNOPSIS_TEST_DISK_FULL").is_ok_and(|v| v == "fsize");
    let mounted = if forced {
        None
    } else {
        Tmpfs::mount(&disk, "24m")
    };
    let limit = match mounted {
        Some(tmpfs) => Limit::Tmpfs(tmpfs),
        None => Limit::FileSize,
    };
    let root = disk.join("root");

    // Started through a shell that ignores SIGXFSZ, so an over-limit write fails with EFBIG
    // instead of killing the process (only used by the file-size variant).
    let port = free_port();
    let metrics = free_port();
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("trap '' XFSZ; exec \"$0\" \"$@\"")
        .arg(workspace_bin("synopsis-trainer"))
        .args(Trainer::args(&root, &data, port, metrics));
    let process = ServiceProcess::from_command(command).expect("spawn trainer");
    let addr = ([127, 0, 0, 1], port).into();
    process
        .wait_healthy(addr, e2e::START)
        .await
        .expect("healthy");
    let trainer = Trainer {
        process,
        addr,
        metrics: ([127, 0, 0, 1], metrics).into(),
        root: root.clone(),
        data_root: data.clone(),
    };
    let mut client = trainer.client().await;

    // Long epochs (one sequence per step) so the disk is full before the second checkpoint.
    let mut request = tiny_request(CORPUS);
    let hyper = request.hyper.as_mut().unwrap();
    hyper.epochs = 3;
    hyper.batch_size = 1;
    hyper.seq_len = 32;
    let mut stream = client.train(request).await.unwrap().into_inner();
    let mut first = None;
    let mut finished = None;
    let mut filler = None;
    while let Ok(Some(event)) = tokio::time::timeout(LONG, stream.message())
        .await
        .expect("run goes on")
    {
        match event.event {
            Some(pb::train_event::Event::Checkpoint(c)) if first.is_none() => {
                first = Some(c);
                match &limit {
                    Limit::Tmpfs(tmpfs) => filler = Some(tmpfs.fill()),
                    Limit::FileSize => {
                        let status = Command::new("prlimit")
                            .arg(format!("--pid={}", trainer.process.pid()))
                            .arg("--fsize=32768")
                            .status()
                            .expect("prlimit");
                        assert!(status.success());
                    }
                }
            }
            Some(pb::train_event::Event::Finished(f)) => {
                finished = Some(f);
                break;
            }
            _ => {}
        }
    }
    let first = first.expect("a checkpoint before the disk filled");
    // The failure reaches the client: the run FAILED with the OS error, on the stream or,
    // if the stream was cut, in the run's summary.
    let message = match finished {
        Some(f) => {
            assert_eq!(f.state, pb::RunState::Failed as i32, "{f:?}");
            f.message
        }
        None => {
            let runs = client.list_runs(pb::ListRunsRequest {}).await.unwrap();
            let run = runs.into_inner().runs.pop().expect("run");
            assert_eq!(run.state, pb::RunState::Failed as i32, "{run:?}");
            run.message
        }
    };
    let lower = message.to_lowercase();
    assert!(
        lower.contains("no space") || lower.contains("too large") || lower.contains("space"),
        "the reason names the full disk: {message}"
    );

    // The previous checkpoint is still listed, whole, and served.
    let listed = client
        .list_checkpoints(pb::ListCheckpointsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .checkpoints;
    assert!(listed
        .iter()
        .any(|c| c.checkpoint_id == first.checkpoint_id));
    assert!(listed.iter().all(|c| c.step <= first.step), "{listed:?}");
    assert!(fetch_and_verify(&trainer, &first.checkpoint_id).await >= 4);
    // No half-written directory holds on to the little space there is.
    let run_dir = e2e::checkpoint_dir(&root, &first.checkpoint_id);
    let leftovers: Vec<_> = std::fs::read_dir(run_dir.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Space comes back: the run resumes from the checkpoint that survived.
    let trainer = match (&limit, filler) {
        (Limit::Tmpfs(_), Some(filler)) => {
            std::fs::remove_file(filler).unwrap();
            trainer
        }
        _ => {
            drop(trainer);
            Trainer::start(&root, &data, &[]).await
        }
    };
    let mut client = trainer.client().await;
    let resume = pb::TrainRequest {
        resume_from: first.checkpoint_id.clone(),
        hyper: Some(pb::HyperParams {
            max_steps: first.step + 2,
            ..Default::default()
        }),
        ..Default::default()
    };
    let (_, events) = e2e::train(&mut client, resume).await;
    let done = e2e::finished(&events).expect("finished");
    assert_eq!(done.state, pb::RunState::Completed as i32, "{done:?}");
    drop(client);
    drop(trainer);
}
