//! What a careless operator or a hand-written client meets outside the request fields: a
//! `--model` that cannot be served or whose cache cannot fit stops the generator at start,
//! saying why, and bytes that are no protobuf message are INVALID_ARGUMENT, not INTERNAL.

mod e2e;

use tonic::Status;

/// The answer checks of the hostile-client test, for a status: delivered, short, printable.
fn check(what: &str, status: Status) {
    assert!(
        std::error::Error::source(&status).is_none(),
        "{what}: a transport error, not a delivered status: {status:?}"
    );
    assert!(status.message().len() <= 500, "{what}: {status:?}");
    assert!(
        !status.message().chars().any(char::is_control),
        "{what}: {status:?}"
    );
}

/// A `--model` that cannot be served is a configuration error: the generator exits non-zero
/// at start saying why, instead of running on with no model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_cannot_be_served_stops_the_generator_at_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    let port = synopsis_tests::free_port();
    let process = synopsis_tests::ServiceProcess::spawn(
        synopsis_tests::workspace_bin("synopsis-generator"),
        [
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
            "--device".into(),
            "cpu".into(),
            "--model".into(),
            dir.path().display().to_string(),
        ],
    )
    .unwrap();
    let status = process
        .wait_exit(e2e::START)
        .expect("the generator must exit when --model cannot be served");
    assert!(!status.success(), "{status:?}");
    assert!(
        process.log().contains("cannot serve --model"),
        "{}",
        process.log_tail()
    );
}

/// A generator whose attention cache at `--max-batch` cannot fit in memory refuses to start
/// (saying why) instead of growing into the OOM killer under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generator_whose_cache_cannot_fit_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    for (from, to) in [
        ("fake_gpt2/config.json", "config.json"),
        ("fake_gpt2/model.safetensors", "model.safetensors"),
        ("gpt2_tokenizer/tokenizer.json", "tokenizer.json"),
    ] {
        std::fs::copy(synopsis_tests::fixture(from), dir.path().join(to)).unwrap();
    }
    let start = |max_batch: &str, memory: &str| {
        synopsis_tests::ServiceProcess::spawn(
            synopsis_tests::workspace_bin("synopsis-generator"),
            [
                "--listen".to_string(),
                format!("127.0.0.1:{}", synopsis_tests::free_port()),
                "--device".into(),
                "cpu".into(),
                "--model".into(),
                dir.path().display().to_string(),
                "--max-batch".into(),
                max_batch.into(),
                "--max-cache-memory".into(),
                memory.into(),
            ],
        )
        .unwrap()
    };
    // 1,024 positions × 1 layer × 2 × 2 channels × 4 bytes = 16 KiB a sequence: 64
    // sequences need 1 MiB, more than the 512 KiB allowed.
    let process = start("64", "524288");
    let status = process
        .wait_exit(e2e::START)
        .expect("the generator must exit when its cache cannot fit");
    assert!(!status.success(), "{status:?}");
    let log = process.log();
    assert!(
        log.contains("attention cache") && log.contains("--max-batch"),
        "{}",
        process.log_tail()
    );
    // The same model with room for its cache starts.
    let fits = start("16", "524288");
    assert!(
        fits.wait_for_log("generator listening", e2e::START),
        "{}",
        fits.log_tail()
    );
}

/// Sends request bytes as they are, with no protobuf encoding: what a hand-written client or
/// a corrupted proxy might put on the wire.
#[derive(Debug, Clone, Default)]
struct RawCodec;

#[derive(Debug)]
struct RawBytes;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }

    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, buf: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let remaining = bytes::Buf::remaining(buf);
        Ok(Some(bytes::Buf::copy_to_bytes(buf, remaining).to_vec()))
    }
}

/// Bytes that are no protobuf message (a truncated varint) sent to every method: each
/// answers INVALID_ARGUMENT (the request is at fault), not INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_do_not_decode_are_invalid_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    e2e::write_corpus(&data);
    let trainer = e2e::Trainer::start(&dir.path().join("root"), &data, &[]).await;
    let channel = e2e::channel(&trainer.url()).await;
    for method in [
        "UploadDataset",
        "Train",
        "WatchRun",
        "StopRun",
        "ListRuns",
        "ListCheckpoints",
        "WatchCheckpoints",
        "FetchCheckpoint",
    ] {
        let path = format!("/synopsis.v1.Trainer/{method}");
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let answer = grpc
            .server_streaming(
                tonic::Request::new(vec![0x0a, 0xff, 0xff]),
                path.parse().unwrap(),
                RawCodec,
            )
            .await;
        let status = match answer {
            Ok(response) => response
                .into_inner()
                .message()
                .await
                .expect_err("bytes that do not decode must be refused"),
            Err(status) => status,
        };
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{method}: {status:?}"
        );
        check(method, status);
    }
    e2e::assert_serving(trainer.url()).await;
}
