//! Limits: upload size, message size, prompt length, n, max_new_tokens, stop strings, and
//! how many streams a server takes at once. Each violation is a clear status naming what was
//! exceeded, never a crash or an out-of-memory, and the servers stay healthy.

mod e2e;

use e2e::{expect_code, generate, Generator, Trainer};
use synopsis_proto::v1 as pb;
use tonic::Code;

const MAX_UPLOAD: usize = 64 * 1024;

fn chunks(total: usize, chunk: usize) -> Vec<pb::DatasetChunk> {
    let line = b"42,Name,Drama,\"A synopsis line that repeats to make the upload big.\"\n";
    let mut data = b"id,Name,Genres,Synopsis\n".to_vec();
    while data.len() < total {
        data.extend_from_slice(line);
    }
    data.truncate(total);
    data.chunks(chunk)
        .enumerate()
        .map(|(i, c)| pb::DatasetChunk {
            filename: if i == 0 {
                "big.csv".into()
            } else {
                String::new()
            },
            data: c.to_vec(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trainer_limits_answer_with_clear_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let (root, data) = (dir.path().join("root"), dir.path().join("data"));
    std::fs::create_dir_all(&data).unwrap();
    e2e::write_corpus(&data);
    let limit = ["--max-upload-bytes".to_string(), MAX_UPLOAD.to_string()];
    let trainer = Trainer::start(&root, &data, &limit).await;
    let mut client = trainer.client().await;

    // Over the upload limit, in many small chunks: refused, and nothing is kept.
    let over = client
        .upload_dataset(tokio_stream::iter(chunks(4 * MAX_UPLOAD, 4096)))
        .await;
    let message = expect_code(over, Code::ResourceExhausted, "upload over the limit");
    assert!(message.contains(&MAX_UPLOAD.to_string()), "{message}");
    let stored: Vec<_> = walk(&root)
        .into_iter()
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > MAX_UPLOAD as u64))
        .collect();
    assert!(stored.is_empty(), "over-size upload kept: {stored:?}");
    // One message larger than the server's message limit (16 MiB).
    let huge = client
        .upload_dataset(tokio_stream::iter(chunks(17 << 20, 17 << 20)))
        .await;
    let code = huge.err().map(|s| s.code());
    assert!(
        matches!(code, Some(Code::ResourceExhausted | Code::OutOfRange)),
        "17 MiB message: {code:?}"
    );
    // Within the limit: accepted.
    let fine = client
        .upload_dataset(tokio_stream::iter(chunks(MAX_UPLOAD / 2, 4096)))
        .await
        .expect("upload under the limit")
        .into_inner();
    assert_eq!(fine.bytes, (MAX_UPLOAD / 2) as u64);

    // One run at a time: a second Train while one runs is RESOURCE_EXHAUSTED.
    let mut long = e2e::tiny_request(e2e::CORPUS);
    long.hyper.as_mut().unwrap().epochs = 200;
    let mut running = client.train(long).await.unwrap().into_inner();
    let first = running.message().await.unwrap().expect("started");
    let second = client.train(e2e::tiny_request(e2e::CORPUS)).await;
    let message = expect_code(second.map(|_| ()), Code::ResourceExhausted, "second run");
    assert!(message.contains(&first.run_id), "{message}");
    client
        .stop_run(pb::StopRunRequest {
            run_id: first.run_id.clone(),
        })
        .await
        .unwrap();
    while let Some(event) = running.message().await.unwrap() {
        if let Some(pb::train_event::Event::Finished(f)) = event.event {
            assert_eq!(f.state, pb::RunState::Stopped as i32, "{f:?}");
            break;
        }
    }
    e2e::assert_serving(trainer.url()).await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                files.extend(walk(&path));
            } else {
                files.push(path);
            }
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generator_limits_answer_with_clear_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let (_, model) = e2e::trained_model(dir.path()).await;
    let generator = Generator::start(&[
        "--model".into(),
        model.display().to_string(),
        "--max-prompt-chars".into(),
        "2000".into(),
        "--max-new-tokens-cap".into(),
        "64".into(),
        "--max-n".into(),
        "4".into(),
        "--max-stop".into(),
        "2".into(),
        "--max-stop-len".into(),
        "8".into(),
        "--max-batch".into(),
        "1".into(),
        "--queue".into(),
        "2".into(),
    ])
    .await;
    let mut client = generator.client().await;
    let base = e2e::generate_request(4);

    let cases: Vec<(&str, pb::GenerateRequest, Code, &str)> = vec![
        (
            "prompt over the character limit",
            pb::GenerateRequest {
                prompt: "a".repeat(2001),
                ..base.clone()
            },
            Code::InvalidArgument,
            "prompt",
        ),
        (
            "prompt over the model's context",
            pb::GenerateRequest {
                prompt: "the young witch searches the capital ".repeat(40),
                ..base.clone()
            },
            Code::InvalidArgument,
            "prompt",
        ),
        (
            "message over 4 MiB",
            pb::GenerateRequest {
                prompt: "a".repeat(5 << 20),
                ..base.clone()
            },
            Code::OutOfRange,
            "",
        ),
        (
            "max_new_tokens over the cap",
            pb::GenerateRequest {
                max_new_tokens: 65,
                ..base.clone()
            },
            Code::InvalidArgument,
            "max_new_tokens",
        ),
        (
            "n over the limit",
            pb::GenerateRequest {
                n: 5,
                ..base.clone()
            },
            Code::InvalidArgument,
            "n ",
        ),
        (
            "too many stop strings",
            pb::GenerateRequest {
                stop: vec!["x".into(), "y".into(), "z".into()],
                ..base.clone()
            },
            Code::InvalidArgument,
            "stop",
        ),
        (
            "stop string too long",
            pb::GenerateRequest {
                stop: vec!["123456789".into()],
                ..base.clone()
            },
            Code::InvalidArgument,
            "stop[0]",
        ),
    ];
    for (what, request, code, field) in cases {
        let result = generate(&mut client, request).await;
        let message = expect_code(result, code, what);
        assert!(message.contains(field), "{what}: {message}");
        assert!(message.len() < 1000, "{what}: the whole input echoed back");
    }
    // At the limits: accepted.
    let at_limits = pb::GenerateRequest {
        max_new_tokens: 64,
        n: 4,
        stop: vec!["12345678".into(), "zz".into()],
        ..base.clone()
    };
    let (_, done) = generate(&mut client, at_limits).await.unwrap();
    assert_eq!(done.len(), 4);

    // One decoding slot and a queue of two: of a burst of 12 streams, those beyond what
    // fits are refused with RESOURCE_EXHAUSTED, the others complete.
    let burst: Vec<_> = (0..12)
        .map(|i| {
            let mut client = client.clone();
            let mut request = e2e::generate_request(48);
            request.sampling.as_mut().unwrap().seed = Some(i);
            tokio::spawn(async move { generate(&mut client, request).await })
        })
        .collect();
    let (mut ok, mut exhausted) = (0, 0);
    for task in burst {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) if s.code() == Code::ResourceExhausted => exhausted += 1,
            Err(s) => panic!("unexpected status in the burst: {s:?}"),
        }
    }
    assert!(ok >= 1 && exhausted >= 1, "ok {ok}, exhausted {exhausted}");
    assert_eq!(
        e2e::metric_of(
            generator.metrics,
            "synopsis_generator_requests_total{outcome=\"resource_exhausted\"}"
        ),
        exhausted as f64
    );
    e2e::assert_serving(generator.url()).await;
    let (_, done) = generate(&mut client, base).await.unwrap();
    assert_eq!(done.len(), 1);
}
