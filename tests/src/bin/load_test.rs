//! `load_test`: a bounded load test of one generator over loopback, not part of `make test`.
//! Trains two tiny checkpoints with a real trainer (the repo's `data/synopses.csv`), serves
//! them from a real generator, then keeps `--streams` streams busy for `--seconds` while a
//! hot swap alternates the two checkpoints every `--swap-every` seconds. Prints requests
//! completed, errors by status, time to first token and inter-token latency (p50/p99), swaps,
//! and the generator's resident memory over time.
//!
//! Usage: `load_test [--streams 64] [--seconds 60] [--swap-every 10] [--tokens 64]`
//! (`make load-test`). Binaries are taken from the same target directory as this one.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use synopsis_proto::v1 as pb;
use synopsis_proto::v1::generator_client::GeneratorClient;
use synopsis_proto::v1::trainer_client::TrainerClient;
use synopsis_tests::{free_port, workspace_bin, workspace_root, ServiceProcess};
use tonic::transport::{Channel, Endpoint};

struct Options {
    streams: usize,
    seconds: u64,
    swap_every: u64,
    tokens: u32,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        streams: 64,
        seconds: 60,
        swap_every: 10,
        tokens: 64,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value = pair.get(1).context("every flag takes a value")?;
        match pair[0].as_str() {
            "--streams" => o.streams = value.parse()?,
            "--seconds" => o.seconds = value.parse()?,
            "--swap-every" => o.swap_every = value.parse()?,
            "--tokens" => o.tokens = value.parse()?,
            other => bail!("unknown flag {other}; see the top of tests/src/bin/load_test.rs"),
        }
    }
    // Bounded by design: this is a loopback smoke of capacity, not a soak test.
    if o.streams == 0 || o.streams > 1024 || o.seconds == 0 || o.seconds > 600 {
        bail!("--streams must be 1..=1024 and --seconds 1..=600");
    }
    Ok(o)
}

/// What every stream records.
#[derive(Default)]
struct Tally {
    completed: u64,
    tokens: u64,
    errors: BTreeMap<String, u64>,
    ttft_ms: Vec<f64>,
    itl_ms: Vec<f64>,
}

async fn connect(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

/// Trains a tiny two-epoch run and returns the directories of its two checkpoints.
async fn train(root: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let port = free_port();
    let data_root = workspace_root().join("data");
    let args = [
        "--listen".to_string(),
        format!("127.0.0.1:{port}"),
        "--root".into(),
        root.display().to_string(),
        "--data-root".into(),
        data_root.display().to_string(),
        "--device".into(),
        "cpu".into(),
    ];
    let trainer = ServiceProcess::spawn(workspace_bin("synopsis-trainer"), args)?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    trainer.wait_healthy(addr, Duration::from_secs(120)).await?;
    let mut client = TrainerClient::new(connect(addr).await?);
    let request = pb::TrainRequest {
        data: Some(pb::train_request::Data::DataPath("synopses.csv".into())),
        model: Some(pb::ModelSpec {
            preset: "tiny".into(),
            n_layer: 2,
            n_embd: 64,
            n_head: 2,
            n_positions: 128,
            vocab_size: 512,
        }),
        hyper: Some(pb::HyperParams {
            epochs: 2,
            batch_size: 8,
            seq_len: 64,
            sample_tokens: 4,
            keep_last: 5,
            ..Default::default()
        }),
        run_name: "load-test".into(),
        ..Default::default()
    };
    let mut stream = client.train(request).await?.into_inner();
    let mut ids = Vec::new();
    while let Some(event) = stream.message().await? {
        match event.event {
            Some(pb::train_event::Event::Checkpoint(c)) => ids.push(c.checkpoint_id),
            Some(pb::train_event::Event::Finished(f)) => {
                if f.state != pb::RunState::Completed as i32 {
                    bail!("training failed: {}", f.message);
                }
                break;
            }
            _ => {}
        }
    }
    if ids.len() < 2 {
        bail!("expected two checkpoints, got {ids:?}");
    }
    let dir = |id: &String| root.join("checkpoints").join(id);
    Ok((dir(&ids[ids.len() - 2]), dir(&ids[ids.len() - 1])))
}

async fn stream_worker(
    mut client: GeneratorClient<Channel>,
    worker: u64,
    tokens: u32,
    deadline: Instant,
    tally: Arc<Mutex<Tally>>,
) {
    let mut seq = 0u64;
    while Instant::now() < deadline {
        seq += 1;
        let request = pb::GenerateRequest {
            prompt: "In the year 2199,".into(),
            max_new_tokens: tokens,
            sampling: Some(pb::SamplingParams {
                temperature: 1.0,
                top_k: 50,
                seed: Some(worker * 1_000_000 + seq),
                ..Default::default()
            }),
            ..Default::default()
        };
        let start = Instant::now();
        let mut ttft = None;
        let mut gaps = Vec::new();
        let mut last = start;
        let mut count = 0u64;
        let result: Result<(), tonic::Status> = async {
            let mut stream = client.generate(request).await?.into_inner();
            while let Some(response) = stream.message().await? {
                if let Some(pb::generate_response::Event::Token(_)) = response.event {
                    let now = Instant::now();
                    match ttft {
                        None => ttft = Some(now - start),
                        Some(_) => gaps.push((now - last).as_secs_f64() * 1e3),
                    }
                    last = now;
                    count += 1;
                }
            }
            Ok(())
        }
        .await;
        let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(()) => {
                t.completed += 1;
                t.tokens += count;
                if let Some(ttft) = ttft {
                    t.ttft_ms.push(ttft.as_secs_f64() * 1e3);
                }
                t.itl_ms.extend(gaps);
            }
            Err(status) => *t.errors.entry(format!("{:?}", status.code())).or_default() += 1,
        }
    }
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank.min(values.len() - 1)]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let o = options()?;
    let dir = tempfile::Builder::new()
        .prefix("synopsis-load-")
        .tempdir()?;
    eprintln!("training two tiny checkpoints on data/synopses.csv ...");
    let (a, b) = train(&dir.path().join("root")).await?;

    let port = free_port();
    let args = [
        "--listen".to_string(),
        format!("127.0.0.1:{port}"),
        "--model".into(),
        a.display().to_string(),
        "--load-root".into(),
        dir.path().display().to_string(),
        "--device".into(),
        "cpu".into(),
        "--max-batch".into(),
        o.streams.max(1).to_string(),
        "--queue".into(),
        (o.streams * 2).to_string(),
    ];
    let generator = ServiceProcess::spawn(workspace_bin("synopsis-generator"), args)?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    generator
        .wait_healthy(addr, Duration::from_secs(120))
        .await?;
    let client = GeneratorClient::new(connect(addr).await?);
    let generator = Arc::new(generator);

    println!(
        "load: {} streams for {} s, {} tokens each, hot swap every {} s, generator pid {}",
        o.streams,
        o.seconds,
        o.tokens,
        o.swap_every,
        generator.pid()
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs(o.seconds);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let workers: Vec<_> = (0..o.streams as u64)
        .map(|w| {
            tokio::spawn(stream_worker(
                client.clone(),
                w,
                o.tokens,
                deadline,
                tally.clone(),
            ))
        })
        .collect();

    // Hot swaps, alternating the two checkpoints, and memory samples.
    let mut swaps = (0u32, Vec::<String>::new(), Vec::<f64>::new());
    let mut rss = Vec::new();
    let mut next_swap = started + Duration::from_secs(o.swap_every);
    let mut next_sample = started;
    let mut use_b = true;
    while Instant::now() < deadline {
        let now = Instant::now();
        if now >= next_sample {
            rss.push((now - started, generator.rss_bytes().unwrap_or(0)));
            next_sample += Duration::from_secs(5);
        }
        if o.swap_every > 0 && now >= next_swap {
            let path = if use_b { &b } else { &a };
            use_b = !use_b;
            let t0 = Instant::now();
            let request = pb::LoadCheckpointRequest {
                source: Some(pb::load_checkpoint_request::Source::Path(
                    path.display().to_string(),
                )),
            };
            match client.clone().load_checkpoint(request).await {
                Ok(_) => {
                    swaps.0 += 1;
                    swaps.2.push(t0.elapsed().as_secs_f64() * 1e3);
                }
                Err(s) => swaps.1.push(format!("{:?}: {}", s.code(), s.message())),
            }
            next_swap += Duration::from_secs(o.swap_every);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for w in workers {
        let _ = w.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    rss.push((started.elapsed(), generator.rss_bytes().unwrap_or(0)));

    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
    let errors: u64 = t.errors.values().sum();
    println!("elapsed            {elapsed:.1} s");
    println!("requests completed {}", t.completed);
    println!("errors             {errors} {:?}", t.errors);
    println!(
        "tokens             {} ({:.0} tokens/s)",
        t.tokens,
        t.tokens as f64 / elapsed
    );
    let (p50, p99) = (
        percentile(&mut t.ttft_ms, 50.0),
        percentile(&mut t.ttft_ms, 99.0),
    );
    println!("time to first token p50 {p50:.1} ms, p99 {p99:.1} ms");
    let (p50, p99) = (
        percentile(&mut t.itl_ms, 50.0),
        percentile(&mut t.itl_ms, 99.0),
    );
    println!("inter-token latency p50 {p50:.1} ms, p99 {p99:.1} ms");
    println!(
        "hot swaps          {} ok, {} failed {:?}, swap call p50 {:.0} ms",
        swaps.0,
        swaps.1.len(),
        swaps.1,
        percentile(&mut swaps.2, 50.0)
    );
    println!("resident memory of the generator:");
    for (at, bytes) in &rss {
        println!(
            "  t={:>5.1} s  {:>7.1} MiB",
            at.as_secs_f64(),
            *bytes as f64 / (1 << 20) as f64
        );
    }
    if errors > 0 || !swaps.1.is_empty() {
        bail!("the load test saw errors");
    }
    Ok(())
}
