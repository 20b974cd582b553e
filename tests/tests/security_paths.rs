//! Path confinement over gRPC: data paths, base model and tokenizer names, run ids and
//! checkpoint ids can never reach outside their roots — not with `..`, absolute paths,
//! symlinks pointing out, or NUL bytes. Each attempt is refused before anything is read, and
//! no run is ever started from one.

mod e2e;

use std::os::unix::fs::symlink;

use e2e::{expect_code, tiny_request, Trainer};
use synopsis_proto::v1 as pb;
use tonic::Code;

/// Text only the files outside the roots contain: it must never come back in a reply.
const SECRET: &str = "TOP-SECRET-OUTSIDE-THE-ROOT";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_ids_never_escape_their_roots() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let (root, data, models, outside) = (
        base.join("root"),
        base.join("data"),
        base.join("models"),
        base.join("outside"),
    );
    for d in [&data, &models, &outside] {
        std::fs::create_dir_all(d).unwrap();
    }
    e2e::write_corpus(&data);
    // A perfectly usable corpus and model directory, outside the roots.
    let mut secret_csv = std::fs::read_to_string(data.join(e2e::CORPUS)).unwrap();
    secret_csv.push_str(&format!(
        "99,{SECRET},Drama,\"{SECRET} and a long enough synopsis to be kept by the cleaner.\"\n"
    ));
    std::fs::write(outside.join("secret.csv"), &secret_csv).unwrap();
    std::fs::write(
        outside.join("config.json"),
        format!("{{\"note\": \"{SECRET}\"}}"),
    )
    .unwrap();
    std::fs::write(
        outside.join("tokenizer.json"),
        format!("{{\"note\": \"{SECRET}\"}}"),
    )
    .unwrap();
    // Symlinks inside the roots that point out of them.
    symlink(outside.join("secret.csv"), data.join("link.csv")).unwrap();
    symlink(&outside, data.join("linkdir")).unwrap();
    symlink(&outside, models.join("escape")).unwrap();

    let models_arg = ["--models-root".to_string(), models.display().to_string()];
    let trainer = Trainer::start(&root, &data, &models_arg).await;
    let mut client = trainer.client().await;
    let abs_csv = outside.join("secret.csv").display().to_string();
    let abs_dir = outside.display().to_string();

    let check = |what: String, result: Result<(), tonic::Status>| {
        let message = expect_code(result, Code::InvalidArgument, &what);
        assert!(!message.contains(SECRET), "{what}: {message}");
    };

    // Data paths.
    for path in [
        "../outside/secret.csv".to_string(),
        abs_csv.clone(),
        "link.csv".into(),
        "linkdir/secret.csv".into(),
        "./../outside/secret.csv".into(),
        "synopses.csv\0".into(),
        "syn\0opses.csv".into(),
    ] {
        let mut request = tiny_request("x");
        request.data = Some(pb::train_request::Data::DataPath(path.clone()));
        check(
            format!("data_path {path:?}"),
            client.train(request).await.map(|_| ()),
        );
    }
    // Dataset ids are content hashes, never paths.
    for id in ["../../outside/secret", "/etc/passwd", "a\0b"] {
        let mut request = tiny_request("x");
        request.data = Some(pb::train_request::Data::DatasetId(id.into()));
        check(
            format!("dataset_id {id:?}"),
            client.train(request).await.map(|_| ()),
        );
    }
    // Base model and tokenizer names under --models-root.
    for name in [
        "../outside".to_string(),
        abs_dir.clone(),
        "escape".into(),
        "escape/.".into(),
        "a\0b".into(),
        "..".into(),
    ] {
        let mut request = tiny_request(e2e::CORPUS);
        request.model = None;
        request.base_model = name.clone();
        check(
            format!("base_model {name:?}"),
            client.train(request).await.map(|_| ()),
        );
        let mut request = tiny_request(e2e::CORPUS);
        request.tokenizer = name.clone();
        check(
            format!("tokenizer {name:?}"),
            client.train(request).await.map(|_| ()),
        );
    }
    // Checkpoint ids to resume from.
    for id in [
        "../../outside",
        "/etc/passwd",
        "run-1/../../../outside",
        "..",
        "run-1/..",
        "a\0b/c",
    ] {
        let request = pb::TrainRequest {
            resume_from: id.into(),
            ..Default::default()
        };
        check(
            format!("resume_from {id:?}"),
            client.train(request).await.map(|_| ()),
        );
    }

    // Run ids and checkpoint ids of the other RPCs.
    let run_ids = ["..", "../outside", "/etc", "a/b", "a\0b", ".hidden"];
    for id in run_ids {
        let what = format!("run id {id:?}");
        let r = client
            .watch_run(pb::WatchRunRequest {
                run_id: id.into(),
                from_seq: 0,
            })
            .await;
        expect_code(r.map(|_| ()), Code::InvalidArgument, &what);
        let r = client
            .stop_run(pb::StopRunRequest { run_id: id.into() })
            .await;
        expect_code(r, Code::InvalidArgument, &what);
        let r = client
            .list_checkpoints(pb::ListCheckpointsRequest { run_id: id.into() })
            .await;
        expect_code(r, Code::InvalidArgument, &what);
        let r = client
            .watch_checkpoints(pb::WatchCheckpointsRequest { run_id: id.into() })
            .await;
        expect_code(r.map(|_| ()), Code::InvalidArgument, &what);
    }
    for id in [
        "../../outside/x",
        "/etc/passwd",
        "run-1/../../x",
        "a\0b/c",
        "x",
    ] {
        let r = client
            .fetch_checkpoint(pb::FetchCheckpointRequest {
                checkpoint_id: id.into(),
                skip_optimizer: false,
            })
            .await;
        expect_code(
            r.map(|_| ()),
            Code::InvalidArgument,
            &format!("fetch {id:?}"),
        );
    }

    // An upload's file name is only a label: it never decides where bytes land.
    let chunks = tokio_stream::iter(vec![pb::DatasetChunk {
        filename: "../../../escaped.csv".into(),
        data: std::fs::read(data.join(e2e::CORPUS)).unwrap(),
    }]);
    let _ = client.upload_dataset(chunks).await;
    for escaped in [
        base.join("escaped.csv"),
        root.join("../escaped.csv"),
        data.join("escaped.csv"),
    ] {
        assert!(!escaped.exists(), "{} was written", escaped.display());
    }

    // Nothing was started, and the server is fine.
    let runs = client
        .list_runs(pb::ListRunsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(runs.runs.is_empty(), "{runs:?}");
    let (_, events) = e2e::train(&mut client, tiny_request(e2e::CORPUS)).await;
    let done = e2e::finished(&events).expect("finished");
    assert_eq!(done.state, pb::RunState::Completed as i32, "{done:?}");
}
