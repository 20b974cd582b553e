//! The path a user takes, with nothing faked: the real `synopsis` binary trains the tiny preset
//! for one epoch on the embedded corpus through a real trainer, a real generator that follows
//! that trainer hot-loads the checkpoint, and `synopsis generate --json --seed 1` streams tokens
//! and a finished line from it — the same text on a second run with the same seed.

mod e2e;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use e2e::{eventually, Trainer, LONG, START};
use serde_json::Value;
use synopsis_tests::{free_port, workspace_bin, workspace_root, ServiceProcess};

/// Training the tiny preset (4 layers × 256, BPE trained on the corpus) for one epoch on the
/// embedded corpus: well under this on two cores even in a debug build.
const TRAIN: Duration = Duration::from_secs(600);

/// Runs the CLI against `trainer` and `generator` with no SYNOPSIS_* settings inherited.
async fn synopsis(trainer: &str, generator: &str, args: &[&str], limit: Duration) -> Output {
    let mut cmd = tokio::process::Command::new(workspace_bin("synopsis"));
    for (key, _) in std::env::vars() {
        if key.starts_with("SYNOPSIS_") {
            cmd.env_remove(key);
        }
    }
    cmd.args(["--trainer", trainer, "--generator", generator])
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("synopsis {args:?} did not finish within {limit:?}"))
        .expect("the synopsis binary runs")
}

fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect()
}

fn of_kind<'a>(lines: &'a [Value], kind: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["event"] == kind).collect()
}

fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({:?}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn start_generator(trainer: &Trainer) -> (ServiceProcess, String) {
    let port = free_port();
    let args = [
        "--listen".to_string(),
        format!("127.0.0.1:{port}"),
        "--metrics-listen".into(),
        format!("127.0.0.1:{}", free_port()),
        "--device".into(),
        "cpu".into(),
        "--trainer".into(),
        trainer.url(),
    ];
    let process =
        ServiceProcess::spawn(workspace_bin("synopsis-generator"), &args).expect("spawn generator");
    (process, format!("http://127.0.0.1:{port}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_trains_on_the_embedded_corpus_and_streams_generated_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (root, data_root) = (dir.path().join("root"), dir.path().join("data"));
    std::fs::create_dir_all(&data_root).unwrap();
    let trainer = Trainer::start(&root, &data_root, &[]).await;
    // The generator follows the trainer before any checkpoint exists: what it serves later is
    // a hot load, not a start-up load.
    let (generator, generator_url) = start_generator(&trainer);
    let trainer_url = trainer.url();

    let corpus = workspace_root().join("data").join("synopses.csv");
    let corpus = corpus.to_str().expect("UTF-8 path");
    let train = synopsis(
        &trainer_url,
        &generator_url,
        &[
            "--json",
            "train",
            "--data",
            corpus,
            "--preset",
            "tiny",
            "--epochs",
            "1",
            "--sample-prompt",
            "In the year 2199,",
        ],
        TRAIN,
    )
    .await;
    assert_success("synopsis train", &train);
    let events = json_lines(&train);
    let started = of_kind(&events, "started");
    assert_eq!(started.len(), 1, "one started event: {events:?}");
    let dataset = &started[0]["dataset"];
    assert!(
        dataset["rows_kept"].as_u64().unwrap_or(0) >= 300,
        "the embedded corpus keeps its synopses: {dataset}"
    );
    assert!(!of_kind(&events, "step").is_empty(), "step events streamed");
    let epochs = of_kind(&events, "epoch");
    assert_eq!(epochs.len(), 1, "one epoch: {events:?}");
    assert!(epochs[0]["val_loss"].as_f64().is_some_and(f64::is_finite));
    assert!(!of_kind(&events, "sample").is_empty(), "epoch-end samples");
    let finished = of_kind(&events, "finished");
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0]["state"], "completed", "{}", finished[0]);
    let checkpoint = finished[0]["last_checkpoint_id"]
        .as_str()
        .expect("last checkpoint id")
        .to_string();
    assert!(!checkpoint.is_empty());

    // `synopsis model` shows the hot-loaded checkpoint once the generator has it.
    let live = eventually(
        LONG + START,
        "the generator to serve the new checkpoint",
        || {
            let (t, g) = (trainer_url.clone(), generator_url.clone());
            async move {
                let out = synopsis(&t, &g, &["--json", "model"], LONG).await;
                let info: Value = serde_json::from_slice(&out.stdout).ok()?;
                let live = info["live_checkpoint_id"].as_str()?.to_string();
                (!live.is_empty()).then_some(live)
            }
        },
    )
    .await;
    assert_eq!(
        live, checkpoint,
        "the generator serves the run's checkpoint"
    );

    let generate = |out_file: &Path| {
        let out_file = out_file.to_str().expect("UTF-8 path").to_string();
        let (t, g) = (trainer_url.clone(), generator_url.clone());
        async move {
            let args = [
                "--json",
                "generate",
                "In the year 2199,",
                "--seed",
                "1",
                "--max-new-tokens",
                "24",
                "--out",
                &out_file,
            ];
            synopsis(&t, &g, &args, LONG).await
        }
    };
    let first = generate(&dir.path().join("first.txt")).await;
    assert_success("synopsis generate", &first);
    let lines = json_lines(&first);
    let started = of_kind(&lines, "started");
    assert_eq!(started.len(), 1, "{lines:?}");
    assert_eq!(started[0]["checkpoint_id"], checkpoint.as_str());
    assert_eq!(started[0]["seed"], 1);
    let tokens = of_kind(&lines, "token");
    assert!(!tokens.is_empty(), "tokens are streamed: {lines:?}");
    let finished = of_kind(&lines, "finished");
    assert_eq!(finished.len(), 1, "{lines:?}");
    let streamed: String = tokens
        .iter()
        .map(|t| t["text"].as_str().expect("token text"))
        .collect();
    assert_eq!(finished[0]["text"].as_str(), Some(streamed.as_str()));
    assert_eq!(finished[0]["generated_tokens"], tokens.len());
    assert!(matches!(
        finished[0]["reason"].as_str(),
        Some("length" | "eos" | "stop")
    ));
    let written = std::fs::read_to_string(dir.path().join("first.txt")).unwrap();
    assert!(
        written.contains("In the year 2199,") && written.contains(streamed.trim()),
        "--out holds the prompt and its synopsis:\n{written}"
    );

    // Same checkpoint, prompt, parameters and seed: the same text.
    let second = generate(&dir.path().join("second.txt")).await;
    assert_success("synopsis generate (again)", &second);
    let again = json_lines(&second);
    assert_eq!(of_kind(&again, "finished")[0]["text"], finished[0]["text"]);
    drop(generator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_stop_returns_once_the_run_has_checkpointed_and_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let (root, data_root) = (dir.path().join("root"), dir.path().join("data"));
    std::fs::create_dir_all(&data_root).unwrap();
    let trainer = Trainer::start(&root, &data_root, &[]).await;
    let url = trainer.url();
    let corpus = workspace_root().join("data").join("synopses.csv");
    let corpus = corpus.to_str().expect("UTF-8 path");
    let detached = synopsis(
        &url,
        "http://127.0.0.1:1",
        &[
            "train", "--data", corpus, "--preset", "tiny", "--epochs", "50", "--detach",
        ],
        LONG,
    )
    .await;
    assert_success("synopsis train --detach", &detached);
    // The upload line comes first; the run id is the last line.
    let printed = String::from_utf8_lossy(&detached.stdout).to_string();
    let run_id = printed
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    assert!(run_id.starts_with("run-"), "{run_id}");

    // Let it take a step, then stop it: the command returns only once the run has stopped.
    let runs_json = |url: String| async move {
        json_lines(&synopsis(&url, "http://127.0.0.1:1", &["--json", "runs"], LONG).await)
    };
    let this_run = |runs: Vec<Value>, id: &str| runs.into_iter().find(|r| r["run_id"] == id);
    eventually(LONG, "the run to take a step", || {
        let (url, id) = (url.clone(), run_id.clone());
        async move {
            let run = this_run(runs_json(url).await, &id)?;
            (run["step"].as_u64()? > 0).then_some(())
        }
    })
    .await;
    let stopped = synopsis(&url, "http://127.0.0.1:1", &["stop", &run_id], LONG).await;
    assert_success("synopsis stop", &stopped);
    let printed = String::from_utf8_lossy(&stopped.stdout).to_string();
    assert!(
        printed.starts_with(&format!("run {run_id}: stopped (last checkpoint {run_id}/")),
        "{printed}"
    );
    let run = this_run(runs_json(url.clone()).await, &run_id).expect("the run is listed");
    assert_eq!(run["state"], "stopped", "{run}");
    assert!(printed.contains(run["last_checkpoint_id"].as_str().unwrap()));
}
