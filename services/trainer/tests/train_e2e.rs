//! What a user does with the trainer, over a real socket: upload a CSV, train a tiny model,
//! follow every event, fetch a checkpoint, resume a run. The resume comparison needs this
//! process to itself (libtorch's RNG is global), so this binary holds one training test.

mod common;

use std::collections::BTreeMap;

use common::*;
use sha2::{Digest, Sha256};
use synopsis_model::checkpoint::verify_checkpoint;
use synopsis_proto::v1::{
    train_event, FetchCheckpointRequest, ListCheckpointsRequest, RunState, TrainRequest,
};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn train_fetch_and_resume_a_tiny_model() {
    let root = tempfile::tempdir().unwrap();
    let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let server = Server::start_with(root.path(), |c| c.metrics_listen = Some(metrics_addr)).await;
    let mut client = server.client().await;
    let dataset_id = upload(&mut client, &corpus_csv()).await;

    // An uninterrupted run of two epochs.
    let stream = client
        .train(tiny_request(&dataset_id, 2))
        .await
        .unwrap()
        .into_inner();
    let events = collect(stream).await;
    let run_id = events[0].run_id.clone();
    assert!(events.iter().all(|e| e.run_id == run_id));
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (0..events.len() as u64).collect::<Vec<_>>());
    let kinds: Vec<&str> = events.iter().map(kind).collect();
    assert_eq!(kinds[0], "started");
    assert_eq!(*kinds.last().unwrap(), "finished");
    // Per epoch: steps, then the epoch summary, then 3 samples, then its checkpoint.
    let mut expected_tail = Vec::new();
    for _ in 0..2 {
        expected_tail.extend(["epoch", "sample", "sample", "sample", "checkpoint"]);
    }
    let non_steps: Vec<&str> = kinds[1..kinds.len() - 1]
        .iter()
        .copied()
        .filter(|k| *k != "step")
        .collect();
    assert_eq!(non_steps, expected_tail, "{kinds:?}");
    let first_epoch_end = kinds.iter().position(|k| *k == "epoch").unwrap();
    assert_eq!(
        kinds[first_epoch_end - 1],
        "step",
        "an epoch's last step is always sent"
    );

    let Some(train_event::Event::Started(started)) = &events[0].event else {
        unreachable!()
    };
    assert_eq!(started.device, "cpu");
    assert!(started.parameters > 0);
    let stats = started.dataset.clone().unwrap();
    assert_eq!(stats.rows_read, 40);
    assert_eq!(stats.rows_kept, 40);
    assert_eq!(stats.train_documents + stats.eval_documents, 40);
    assert!(stats.eval_documents >= 1);
    let resolved: serde_json::Value = serde_json::from_str(&started.resolved_config_json).unwrap();
    assert_eq!(resolved["hyper"]["epochs"], 2);
    assert_eq!(resolved["model"]["n_layer"], 2);
    assert!(resolved["model"]["vocab_size"].as_i64().unwrap() <= 500);

    let epoch_events = epochs(&events);
    assert_eq!(epoch_events.len(), 2);
    assert!(
        epoch_events[1].val_loss < epoch_events[0].val_loss,
        "validation loss did not decrease: {epoch_events:?}"
    );
    for e in &epoch_events {
        assert!((e.val_perplexity - e.val_loss.exp()).abs() < 1e-6 * e.val_perplexity);
        assert!(e.train_loss.is_finite());
    }
    let steps: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(train_event::Event::Step(s)) => Some(*s),
            _ => None,
        })
        .collect();
    assert!(steps.iter().all(|s| s.total_steps == started.total_steps));
    assert_eq!(steps.last().unwrap().step, started.total_steps);
    assert!(steps
        .iter()
        .all(|s| s.tokens_per_second > 0.0 && s.lr > 0.0));
    let done = finished(&events);
    assert_eq!(done.state(), RunState::Completed);

    // Checkpoints on disk verify, and the catalog agrees.
    let listed = client
        .list_checkpoints(ListCheckpointsRequest {
            run_id: run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .checkpoints;
    assert_eq!(listed.len(), 2);
    assert_eq!(done.last_checkpoint_id, listed[1].checkpoint_id);
    for info in &listed {
        let manifest =
            verify_checkpoint(&checkpoint_dir(root.path(), &info.checkpoint_id)).unwrap();
        assert_eq!(manifest.checkpoint_id, info.checkpoint_id);
        for file in [
            "model.safetensors",
            "config.json",
            "tokenizer.json",
            "optimizer.safetensors",
        ] {
            assert!(manifest.files.contains_key(file), "{file} missing");
        }
        assert_eq!(info.reason, "epoch");
    }
    assert_eq!(listed[0].epoch, 1);
    assert_eq!(listed[1].epoch, 2);
    assert!(listed[0]
        .checkpoint_id
        .starts_with(&format!("{run_id}/epoch-0001-step-")));

    // FetchCheckpoint: every file's hash matches the bytes received and the manifest.
    let first = &listed[0];
    let mut chunks = client
        .fetch_checkpoint(FetchCheckpointRequest {
            checkpoint_id: first.checkpoint_id.clone(),
            skip_optimizer: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut hashes: BTreeMap<String, String> = BTreeMap::new();
    let mut order = Vec::new();
    let mut saw_info = false;
    while let Some(chunk) = chunks.message().await.unwrap() {
        if let Some(info) = &chunk.info {
            assert!(!saw_info, "info is on the first chunk only");
            assert_eq!(info, first);
            saw_info = true;
        }
        assert!(chunk.data.len() <= 1 << 20);
        let buf = files.entry(chunk.file.clone()).or_default();
        assert_eq!(chunk.offset, buf.len() as u64);
        buf.extend_from_slice(&chunk.data);
        if !chunk.sha256.is_empty() {
            assert_eq!(buf.len() as u64, chunk.file_size);
            hashes.insert(chunk.file.clone(), chunk.sha256.clone());
            order.push(chunk.file.clone());
        }
    }
    assert!(saw_info);
    assert_eq!(order.last().map(String::as_str), Some("manifest.json"));
    let manifest = verify_checkpoint(&checkpoint_dir(root.path(), &first.checkpoint_id)).unwrap();
    assert_eq!(files.len(), manifest.files.len() + 1);
    for (name, bytes) in &files {
        let actual = hex::encode(Sha256::digest(bytes));
        assert_eq!(&actual, &hashes[name], "{name}");
        if let Some(entry) = manifest.files.get(name) {
            assert_eq!(actual, entry.sha256, "{name}");
        }
    }
    assert_eq!(hashes["manifest.json"], first.sha256);

    // skip_optimizer leaves the optimizer state out.
    let mut chunks = client
        .fetch_checkpoint(FetchCheckpointRequest {
            checkpoint_id: first.checkpoint_id.clone(),
            skip_optimizer: true,
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(chunk) = chunks.message().await.unwrap() {
        assert_ne!(chunk.file, "optimizer.safetensors");
    }

    // Resume from the epoch-1 checkpoint: the second epoch ends where the uninterrupted one did.
    let resumed = collect(
        client
            .train(TrainRequest {
                resume_from: first.checkpoint_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(finished(&resumed).state(), RunState::Completed);
    let Some(train_event::Event::Started(rs)) = &resumed[0].event else {
        unreachable!()
    };
    assert_eq!(rs.start_step, first.step);
    assert_eq!(rs.total_steps, started.total_steps);
    let resumed_epochs = epochs(&resumed);
    assert_eq!(resumed_epochs.len(), 1);
    let (a, b) = (&epoch_events[1], &resumed_epochs[0]);
    assert_eq!(b.epoch, 2);
    let rel = |x: f64, y: f64| ((x - y) / y).abs();
    assert!(
        rel(b.val_loss, a.val_loss) < 1e-4,
        "val {} vs {}",
        b.val_loss,
        a.val_loss
    );
    assert!(
        rel(b.train_loss, a.train_loss) < 1e-4,
        "train {} vs {}",
        b.train_loss,
        a.train_loss
    );

    // Prometheus metrics count what this process did.
    let metrics = http_get(metrics_addr, "/metrics").await;
    let steps = started.total_steps + (rs.total_steps - rs.start_step);
    assert!(
        metrics.contains(&format!("synopsis_trainer_steps_total {steps}")),
        "{metrics}"
    );
    assert!(
        metrics.contains("synopsis_trainer_runs{state=\"completed\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("synopsis_trainer_checkpoints_total 3"),
        "{metrics}"
    );

    // Gradient accumulation: 2 micro-batches of 2 windows make the same steps as batches of 4
    // (dropout off, so both runs compute the same thing, grouped differently).
    let mut val_losses = Vec::new();
    for (batch_size, grad_accum) in [(4, 1), (2, 2)] {
        let mut req = tiny_request(&dataset_id, 1);
        let hyper = req.hyper.as_mut().unwrap();
        hyper.dropout = -1.0;
        hyper.batch_size = batch_size;
        hyper.grad_accum = grad_accum;
        let events = collect(client.train(req).await.unwrap().into_inner()).await;
        let Some(train_event::Event::Started(s)) = &events[0].event else {
            unreachable!()
        };
        assert_eq!(s.total_steps, started.total_steps / 2);
        val_losses.push(epochs(&events)[0].val_loss);
    }
    assert!(
        rel(val_losses[0], val_losses[1]) < 1e-4,
        "accumulated {} vs plain {}",
        val_losses[1],
        val_losses[0]
    );

    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_cannot_work_are_invalid_arguments() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path()).await;
    let mut client = server.client().await;

    // Health reports SERVING for the Trainer service.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "synopsis.v1.Trainer".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    // A CSV without any usable text column.
    let bad = upload(&mut client, "id,score\n1,2\n3,4\n").await;
    let err = client.train(tiny_request(&bad, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("text column"), "{}", err.message());

    // Every row dropped by cleaning.
    let short = upload(&mut client, "Synopsis\nToo short.\nAlso short.\n").await;
    let err = client.train(tiny_request(&short, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Malformed ids never reach the file system.
    let mut req = tiny_request("../../etc/passwd", 1);
    let err = client.train(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    req.data = None;
    req.resume_from = "../x/y".into();
    let err = client.train(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .fetch_checkpoint(FetchCheckpointRequest {
            checkpoint_id: "run-1/../../etc".into(),
            skip_optimizer: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // A data_path without --data-root, and out-of-range hyper-parameters.
    let good = upload(&mut client, &corpus_csv()).await;
    let mut req = tiny_request(&good, 1);
    req.data = Some(synopsis_proto::v1::train_request::Data::DataPath(
        "x.csv".into(),
    ));
    let err = client.train(req).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let mut req = tiny_request(&good, 1);
    req.hyper.as_mut().unwrap().learning_rate = -1.0;
    let err = client.train(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("learning_rate"));
    let mut req = tiny_request(&good, 1);
    req.model.as_mut().unwrap().n_head = 3;
    let err = client.train(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Unknown ids are NOT_FOUND.
    let unknown = "0".repeat(64);
    let err = client.train(tiny_request(&unknown, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.shutdown().await.unwrap();

    // With --data-root: nothing outside it is read; an upload over the limit is refused.
    let data_root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("outside.csv"), corpus_csv()).unwrap();
    let server = Server::start_with(root.path(), |c| {
        c.data_root = Some(data_root.path().to_path_buf());
        c.max_upload_bytes = 100;
    })
    .await;
    let mut client = server.client().await;
    for (path, code) in [
        ("../outside.csv", Code::InvalidArgument),
        ("/etc/passwd", Code::InvalidArgument),
        ("missing.csv", Code::NotFound),
    ] {
        let mut req = tiny_request("", 1);
        req.data = Some(synopsis_proto::v1::train_request::Data::DataPath(
            path.into(),
        ));
        let err = client.train(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{path}: {err:?}");
    }
    let chunks = vec![synopsis_proto::v1::DatasetChunk {
        filename: "big.csv".into(),
        data: corpus_csv().into_bytes(),
    }];
    let err = client
        .upload_dataset(tokio_stream::iter(chunks))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(
        std::fs::read_dir(root.path().join("datasets"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".csv")
            })
            .count(),
        3,
        "nothing stored for the refused upload"
    );
    server.shutdown().await.unwrap();
}

/// A model of hundreds of billions of parameters passes every per-field bound; its memory
/// estimate is what refuses it, before its data is read or a tensor allocated (allocating it
/// would take this host down or abort the process). With `--max-run-memory` the same check
/// holds a small model to a small budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_larger_than_memory_are_refused_before_allocating() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path()).await;
    let mut client = server.client().await;
    let dataset_id = upload(&mut client, &corpus_csv()).await;
    let mut req = tiny_request(&dataset_id, 1);
    let model = req.model.as_mut().unwrap();
    model.n_layer = 256;
    model.n_embd = 16_384;
    model.n_head = 256;
    model.n_positions = 1024;
    let err = client.train(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("needs about") && err.message().contains("available"),
        "{err:?}"
    );
    assert!(err.message().len() < 400, "{err:?}");
    server.shutdown().await.unwrap();

    let server = Server::start_with(root.path(), |c| c.max_run_memory = Some(1 << 20)).await;
    let mut client = server.client().await;
    let err = client
        .train(tiny_request(&dataset_id, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("1.0 MiB"), "{err:?}");
    server.shutdown().await.unwrap();
}
