//! The gRPC half of `bench-generate`: the generator served in-process on 127.0.0.1:0 and driven
//! with the generated client (one stream, many concurrent streams, time to first token), and a
//! separate `synopsis-generator` process whose resident memory is read from /proc.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use synopsis_proto::v1::generate_response::Event;
use synopsis_proto::v1::generator_client::GeneratorClient;
use synopsis_proto::v1::{GenerateRequest, ModelInfoRequest, SamplingParams, ServingState};
use tonic::transport::Channel;

use crate::machine;
use crate::report;

/// How long a server may take to load GPT-2 small and answer.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// What the in-process server achieved.
#[derive(Debug, Clone)]
pub struct ServerFigures {
    /// Tokens/s of one stream alone (best of two).
    pub one_stream: f64,
    /// Tokens/s of all concurrent streams together, first request sent to last token (best of
    /// two).
    pub concurrent: f64,
    /// Client-side milliseconds from sending a request to its first token (median of 3).
    pub first_token_ms: f64,
    /// The same as the server reports it in `finished.time_to_first_token_ms` (median of 3).
    pub engine_first_token_ms: f64,
}

/// One finished stream, seen from the client.
struct Stream {
    tokens: u32,
    first_token: f64,
    engine_first_token_ms: f64,
    seconds: f64,
}

/// Serves `model_dir` in this process and measures it through gRPC.
pub async fn measure(
    model_dir: &Path,
    device: &str,
    prompt: &str,
    new_tokens: u32,
    streams: usize,
) -> anyhow::Result<ServerFigures> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = synopsis_generator::Config::from_args([
        "--listen".to_string(),
        addr.to_string(),
        "--device".into(),
        device.to_string(),
        "--model".into(),
        model_dir.display().to_string(),
        "--max-batch".into(),
        streams.max(32).to_string(),
    ])?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(synopsis_generator::serve(config, listener, async move {
        let _ = stop_rx.await;
    }));
    let client = wait_ready(addr, true).await?;

    generate(client.clone(), prompt, 4, 0).await?;
    let mut first = Vec::new();
    let mut engine_first = Vec::new();
    for seed in 0..3 {
        let s = generate(client.clone(), prompt, 1, 10 + seed).await?;
        first.push(s.first_token * 1e3);
        engine_first.push(s.engine_first_token_ms);
    }
    // One stream and all streams alternate, twice, best of each: the machine is shared, and a
    // burst of load during one of them would otherwise skew their ratio.
    let mut one = Vec::new();
    let mut concurrent = Vec::new();
    for round in 0..2u64 {
        let s = generate(client.clone(), prompt, new_tokens, 20 + round).await?;
        one.push(f64::from(s.tokens) / s.seconds);
        concurrent
            .push(concurrent_tokens_per_second(&client, prompt, new_tokens, streams, round).await?);
    }

    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(30), server).await {
        Ok(joined) => joined.context("server task")??,
        Err(_) => eprintln!("the in-process server did not stop within 30 s"),
    }
    Ok(ServerFigures {
        one_stream: report::best(&one),
        concurrent: report::best(&concurrent),
        first_token_ms: report::median(&first),
        engine_first_token_ms: report::median(&engine_first),
    })
}

/// Aggregate tokens/s of `streams` generations sent at once, first request to last token.
async fn concurrent_tokens_per_second(
    client: &GeneratorClient<Channel>,
    prompt: &str,
    new_tokens: u32,
    streams: usize,
    round: u64,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|i| {
            let client = client.clone();
            let prompt = prompt.to_string();
            let seed = 100 + round * streams as u64 + i as u64;
            tokio::spawn(async move { generate(client, &prompt, new_tokens, seed).await })
        })
        .collect();
    let mut tokens = 0u64;
    for task in tasks {
        tokens += u64::from(task.await.context("stream task")??.tokens);
    }
    Ok(tokens as f64 / start.elapsed().as_secs_f64())
}

/// Resident memory of a `synopsis-generator` process.
#[derive(Debug, Clone)]
pub struct ProcessMemory {
    /// A generator with no model (libtorch, tokio, gRPC: the fixed cost).
    pub baseline: f64,
    /// Serving `--model`, before any request.
    pub loaded: f64,
    /// After one generation of `new_tokens`.
    pub after_generate: f64,
    /// VmHWM of the serving process.
    pub peak: f64,
    /// `after_generate` again, with glibc's mmap threshold pinned at its 128 KiB default
    /// (`MALLOC_MMAP_THRESHOLD_`): freed loading buffers then go back to the system at once,
    /// so the gap to `after_generate` is memory the allocator kept, not memory in use.
    pub pinned_threshold: f64,
}

/// Starts `bin` without and then with `--model model_dir` and reads VmRSS from /proc.
pub async fn process_memory(
    bin: &Path,
    model_dir: &Path,
    prompt: &str,
    new_tokens: u32,
) -> anyhow::Result<ProcessMemory> {
    let (baseline, _, _) = child_rss(bin, None, prompt, new_tokens, &[]).await?;
    let (loaded, after, peak) = child_rss(bin, Some(model_dir), prompt, new_tokens, &[]).await?;
    let pinned = [("MALLOC_MMAP_THRESHOLD_", "131072")];
    let (_, pinned_threshold, _) =
        child_rss(bin, Some(model_dir), prompt, new_tokens, &pinned).await?;
    Ok(ProcessMemory {
        baseline,
        loaded,
        after_generate: after,
        peak,
        pinned_threshold,
    })
}

/// (RSS when ready, RSS after one generation, peak RSS) of one generator process.
async fn child_rss(
    bin: &Path,
    model_dir: Option<&Path>,
    prompt: &str,
    new_tokens: u32,
    env: &[(&str, &str)],
) -> anyhow::Result<(f64, f64, f64)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(["--listen", &addr.to_string(), "--device", "cpu"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .envs(env.iter().copied())
        .kill_on_drop(true);
    if let Some(dir) = model_dir {
        cmd.arg("--model").arg(dir);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let pid = child.id().context("the generator exited at once")?;
    let result = async {
        let client = wait_ready(addr, model_dir.is_some()).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let ready = machine::rss_bytes(Some(pid))? as f64;
        let after = if model_dir.is_some() {
            generate(client, prompt, new_tokens, 7).await?;
            machine::rss_bytes(Some(pid))? as f64
        } else {
            ready
        };
        let peak = machine::peak_rss_bytes(Some(pid))? as f64;
        Ok((ready, after, peak))
    }
    .await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    result
}

/// Connects to `addr` and waits until the generator answers ModelInfo (and serves a live
/// model when `serving`).
async fn wait_ready(addr: SocketAddr, serving: bool) -> anyhow::Result<GeneratorClient<Channel>> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(mut client) = GeneratorClient::connect(format!("http://{addr}")).await {
            if let Ok(info) = client.model_info(ModelInfoRequest {}).await {
                if !serving || info.get_ref().state() == ServingState::Serving {
                    return Ok(client);
                }
            }
        }
        if Instant::now() > deadline {
            bail!("the generator on {addr} was not ready within {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One Generate stream, read to its end.
async fn generate(
    mut client: GeneratorClient<Channel>,
    prompt: &str,
    max_new_tokens: u32,
    seed: u64,
) -> anyhow::Result<Stream> {
    let request = GenerateRequest {
        prompt: prompt.to_string(),
        max_new_tokens,
        sampling: Some(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: Some(seed),
        }),
        n: 1,
        ..Default::default()
    };
    let start = Instant::now();
    let mut stream = client.generate(request).await?.into_inner();
    let mut first_token = None;
    let mut tokens = 0;
    while let Some(message) = stream.message().await? {
        match message.event {
            Some(Event::Token(_)) => {
                tokens += 1;
                first_token.get_or_insert(start.elapsed().as_secs_f64());
            }
            Some(Event::Finished(f)) => {
                return Ok(Stream {
                    tokens,
                    first_token: first_token.unwrap_or(f64::NAN),
                    engine_first_token_ms: f.time_to_first_token_ms,
                    seconds: start.elapsed().as_secs_f64(),
                })
            }
            Some(Event::Started(_)) | None => {}
        }
    }
    bail!("the stream ended without `finished`")
}
