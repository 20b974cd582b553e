//! `bench-generate`: decoding speed of the generator against Hugging Face `generate()` (KV
//! cache, sampling) on the same weights and the same torch, in one run:
//! - one stream through the engine (the product path: `spawn_engine` + `submit`) on a GPT-2
//!   small config and on the 4 × 256 model, beside the bandwidth bounds (memory for GPT-2 small,
//!   the last-level cache for the 4 × 256 model, whose weights fit there);
//! - through the gRPC server: 16 concurrent streams against one and against the compute bound,
//!   and time to first token;
//! - resident memory of a generator process serving GPT-2 small, against the weights' bytes.
//!
//! The weights are random (a fresh `Gpt2::new`), which costs decoding nothing: speed depends on
//! the shapes only.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use synopsis_generator::engine::{
    spawn_engine, EngineConfig, EngineHandle, EngineMetrics, EngineRequest, ResidentModel, SeqEvent,
};
use synopsis_model::{load_model_dir, Gpt2, Gpt2Config, SamplingParams, Tokenizer, WeightDtype};
use synopsis_proto::v1::CheckpointInfo;
use tch::Device;

use crate::machine;
use crate::reference::{self, GenerateReference};
use crate::report::{self, mib, num, Table};
use crate::server;

/// Benchmark the generator against Hugging Face `generate()`.
#[derive(Debug, Clone, Parser)]
#[command(name = "bench-generate")]
pub struct Args {
    /// GPT-2 tokenizer directory (`tokenizer.json`); the repository's fixture by default.
    #[arg(long, default_value = crate::DEFAULT_TOKENIZER_DIR)]
    pub tokenizer: PathBuf,
    #[arg(long, default_value_t = 32)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub new_tokens: u32,
    /// Timed runs per one-stream figure (the best is kept, as the reference does).
    #[arg(long, default_value_t = 2)]
    pub runs: usize,
    /// Rounds of ours then the references, alternating; each side keeps its best round.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Concurrent streams through the server.
    #[arg(long, default_value_t = 16)]
    pub streams: usize,
    /// The `synopsis-generator` binary measured for resident memory (default: beside this one).
    #[arg(long)]
    pub generator_bin: Option<PathBuf>,
    #[arg(long, default_value_t = crate::DEFAULT_THREADS)]
    pub threads: i32,
    /// Where ours and the references decode: cpu (the targets are set for it), cuda or cuda:N
    /// (the GPU check: tokens/s beside HF on the same GPU; no memory or bandwidth rows).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// A model written as a plain Hugging Face directory.
struct ModelDir {
    id: &'static str,
    dir: PathBuf,
    weight_bytes: f64,
    /// Weights each decoded token multiplies: every block's four products and the head. A
    /// token costs twice this in FLOPs, and a step reads each of them once (4 bytes in f32).
    multiplied_weights: f64,
}

pub async fn run(args: &Args) -> anyhow::Result<()> {
    tch::set_num_threads(args.threads);
    // This thread builds and loads the models; only the engine thread should own an OpenMP
    // team, as in the generator (see `synopsis_model::torch_threads`).
    synopsis_model::torch_threads::run_serially_on_this_thread();
    let device = synopsis_model::parse_device(&args.device).context("--device")?;
    let on_cpu = device == Device::Cpu;
    let tmp = tempfile::tempdir().context("temporary model directory")?;
    let tokenizer_dir = &args.tokenizer;
    let tokenizer = Tokenizer::from_dir(tokenizer_dir)
        .with_context(|| format!("tokenizer {}", tokenizer_dir.display()))?;
    let (prompt, prompt_ids) = prompt_of(&tokenizer, args.prompt_tokens)?;
    println!(
        "bench-generate: {}-token prompt, {} new tokens, sampling (temperature 1, no top-k/top-p), \
         {} torch threads, device {}",
        prompt_ids.len(),
        args.new_tokens,
        args.threads,
        synopsis_model::device_name(device)
    );
    tch::manual_seed(0);
    let small = write_model_dir(tmp.path(), "small", &tokenizer)?;
    let tiny = write_model_dir(tmp.path(), "tiny", &tokenizer)?;
    // On a thread of its own: this one runs libtorch serially, and the copy needs every core.
    // The thread's OpenMP team ends with it.
    let tiny_bytes = 4.0 * tiny.multiplied_weights;
    let (copy_bw, read_bw, gemm) = std::thread::scope(|s| {
        s.spawn(|| {
            (
                machine::copy_bandwidth(256 << 20, 5),
                machine::read_bandwidth(tiny_bytes as usize, 20),
                machine::gemm_flops(1024, 5),
            )
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the machine measurements panicked"))
    })?;

    // The engine, as the server drives it.
    let rss_before = machine::rss_bytes(None)? as f64;
    let engine = spawn_engine(EngineConfig::new(
        device,
        EngineMetrics::new(&prometheus::Registry::new())?,
    ))?;
    install(&engine, &small, device).await?;
    let rss_loaded = machine::rss_bytes(None)? as f64;
    install(&engine, &tiny, device).await?;
    // Ours and the references alternate, round after round, and each keeps its best: the
    // machine is shared, and a burst of load must not land on one side only.
    let mut best_small = Best::default();
    let mut best_tiny = Best::default();
    for round in 1..=args.rounds.max(1) {
        for (model, best) in [(&small, &mut best_small), (&tiny, &mut best_tiny)] {
            let ours = engine_tokens_per_second(&engine, model.id, &prompt, args).await?;
            let reference = hf(model, &prompt_ids, args)?;
            eprintln!(
                "round {round}, {}: engine {} tokens/s, HF {}, lean loop {}",
                model.id,
                num(ours),
                num(reference.tokens_per_second),
                num(reference.lean_tokens_per_second)
            );
            best.keep(ours, reference);
        }
    }
    engine.shutdown();
    let (ours_small, hf_small) = best_small.into_figures()?;
    let (ours_tiny, hf_tiny) = best_tiny.into_figures()?;

    let srv = server::measure(
        &small.dir,
        &args.device,
        &prompt,
        args.new_tokens,
        args.streams,
    )
    .await?;
    eprintln!(
        "server: one stream {} tokens/s, {} streams {} tokens/s",
        num(srv.one_stream),
        args.streams,
        num(srv.concurrent)
    );
    let bin = args.generator_bin.clone().or_else(|| {
        let exe = std::env::current_exe().ok()?;
        Some(exe.parent()?.join("synopsis-generator"))
    });
    let process = match bin.filter(|b| on_cpu && b.is_file()) {
        Some(bin) => match server::process_memory(&bin, &small.dir, &prompt, args.new_tokens).await
        {
            Ok(m) => Some((bin, m)),
            Err(e) => {
                eprintln!("generator process memory not measured: {e:#}");
                None
            }
        },
        None if !on_cpu => {
            eprintln!("generator process memory not measured: the weights live on the GPU");
            None
        }
        None => {
            eprintln!(
                "generator process memory not measured: no synopsis-generator binary beside this \
                 one (build it, or pass --generator-bin)"
            );
            None
        }
    };

    // Tables.
    let bound = copy_bw / small.weight_bytes;
    let mut t = Table::new(
        &format!(
            "Decoding: {} new tokens after a {}-token prompt, one stream unless said (tokens/s)",
            args.new_tokens,
            prompt_ids.len()
        ),
        &["figure", "ours", "reference", "ours ÷ reference", "target"],
    );
    t.row([
        "GPT-2 small config (124M), engine vs HF generate()".to_string(),
        num(ours_small),
        num(hf_small.tokens_per_second),
        report::ratio(ours_small, hf_small.tokens_per_second),
        report::verdict_at_least(ours_small, hf_small.tokens_per_second, 1.5),
    ]);
    if on_cpu {
        t.row([
            format!(
                "GPT-2 small vs bandwidth bound ({} weights / {} GB/s copy)",
                mib(small.weight_bytes),
                num(copy_bw / 1e9)
            ),
            num(ours_small),
            num(bound),
            format!(
                "{:.0}% (HF {:.0}%)",
                100.0 * ours_small / bound,
                100.0 * hf_small.tokens_per_second / bound
            ),
            "-".into(),
        ]);
    }
    t.row(lean_loop_row("GPT-2 small", ours_small, &hf_small));
    t.row([
        "4 × 256 model (16.3M), engine vs HF generate()".to_string(),
        num(ours_tiny),
        num(hf_tiny.tokens_per_second),
        report::ratio(ours_tiny, hf_tiny.tokens_per_second),
        report::verdict_at_least(ours_tiny, hf_tiny.tokens_per_second, 4.0),
    ]);
    if on_cpu {
        // The tiny model's weights fit in the last-level cache, so its ceiling is the rate of
        // reading them from there, not from memory.
        let tiny_bound = read_bw / tiny_bytes;
        t.row([
            format!(
                "4 × 256 model vs cache-read bound ({} read per token / {} GB/s summing as much)",
                mib(tiny_bytes),
                num(read_bw / 1e9)
            ),
            num(ours_tiny),
            num(tiny_bound),
            format!(
                "{:.0}% (HF {:.0}%; 4× HF needs {:.0}%)",
                100.0 * ours_tiny / tiny_bound,
                100.0 * hf_tiny.tokens_per_second / tiny_bound,
                400.0 * hf_tiny.tokens_per_second / tiny_bound
            ),
            "-".into(),
        ]);
    }
    t.row(lean_loop_row("4 × 256 model", ours_tiny, &hf_tiny));
    t.row([
        format!(
            "GPT-2 small, {} concurrent streams through the server (aggregate) vs one",
            args.streams
        ),
        num(srv.concurrent),
        num(srv.one_stream),
        report::ratio(srv.concurrent, srv.one_stream),
        report::verdict_at_least(srv.concurrent, srv.one_stream, 6.0),
    ]);
    if on_cpu {
        // Many rows per step turn decoding from reading weights into multiplying them: the
        // matmul rate is one ceiling of the aggregate (the other is reading every weight once
        // per step, as one stream does; prompts' prefill is not counted).
        let flops_per_token = 2.0 * small.multiplied_weights;
        let compute_bound = gemm / flops_per_token;
        t.row([
            format!(
                "GPT-2 small, {} streams vs compute bound ({} GFLOP per token / {} GFLOP/s \
                 libtorch matmul; FLOPs only)",
                args.streams,
                num(flops_per_token / 1e9),
                num(gemm / 1e9)
            ),
            num(srv.concurrent),
            num(compute_bound),
            format!("{:.0}%", 100.0 * srv.concurrent / compute_bound),
            "-".into(),
        ]);
    }
    t.row([
        "GPT-2 small, one stream: through the server vs the engine directly".to_string(),
        num(srv.one_stream),
        num(ours_small),
        report::ratio(srv.one_stream, ours_small),
        "-".into(),
    ]);
    t.print();

    let mut l = Table::new(
        &format!(
            "Latency, GPT-2 small, {}-token prompt (ms, median of 3; lower is better)",
            prompt_ids.len()
        ),
        &["figure", "ours", "reference", "ours ÷ reference", "target"],
    );
    l.row([
        "time to first token through the server (client side) vs HF generate(max_new_tokens=1)"
            .to_string(),
        num(srv.first_token_ms),
        num(hf_small.first_token_seconds * 1e3),
        report::ratio(srv.first_token_ms, hf_small.first_token_seconds * 1e3),
        "-".into(),
    ]);
    l.row([
        "time to first token as the engine reports it (submission → first token)".to_string(),
        num(srv.engine_first_token_ms),
        num(hf_small.first_token_seconds * 1e3),
        report::ratio(
            srv.engine_first_token_ms,
            hf_small.first_token_seconds * 1e3,
        ),
        "-".into(),
    ]);
    l.print();

    let w = small.weight_bytes;
    let mut m = Table::new(
        &format!(
            "Resident memory with GPT-2 small loaded (weights: {} f32)",
            mib(w)
        ),
        &["figure", "ours", "weights", "ours ÷ weights", "target"],
    );
    match &process {
        Some((bin, p)) => {
            m.row([
                format!("generator process VmRSS, model loaded ({})", bin.display()),
                mib(p.loaded),
                mib(w),
                report::ratio(p.loaded, w),
                report::verdict_at_most(p.loaded, w, 1.5),
            ]);
            m.row([
                "  same, after one generation".to_string(),
                mib(p.after_generate),
                mib(w),
                report::ratio(p.after_generate, w),
                report::verdict_at_most(p.after_generate, w, 1.5),
            ]);
            m.row([
                format!(
                    "  same, minus a generator process with no model ({})",
                    mib(p.baseline)
                ),
                mib(p.after_generate - p.baseline),
                mib(w),
                report::ratio(p.after_generate - p.baseline, w),
                report::verdict_at_most(p.after_generate - p.baseline, w, 1.5),
            ]);
            m.row([
                "  same, after one generation, glibc mmap threshold pinned (diagnostic)"
                    .to_string(),
                mib(p.pinned_threshold),
                mib(w),
                report::ratio(p.pinned_threshold, w),
                report::verdict_at_most(p.pinned_threshold, w, 1.5),
            ]);
            m.row([
                "  peak (VmHWM) of that process".to_string(),
                mib(p.peak),
                mib(w),
                report::ratio(p.peak, w),
                "-".into(),
            ]);
        }
        None => m.row([
            "generator process: not measured (see above)",
            "",
            "",
            "",
            "",
        ]),
    }
    m.row([
        "this bench process: RSS after load and install − before".to_string(),
        mib(rss_loaded - rss_before),
        mib(w),
        report::ratio(rss_loaded - rss_before, w),
        report::verdict_at_most(rss_loaded - rss_before, w, 1.5),
    ]);
    m.row([
        format!(
            "reference: HF process RSS after generating − before loading ({} after from_pretrained)",
            mib(hf_small.loaded_rss_bytes - hf_small.base_rss_bytes)
        ),
        mib(hf_small.final_rss_bytes - hf_small.base_rss_bytes),
        mib(w),
        report::ratio(hf_small.final_rss_bytes - hf_small.base_rss_bytes, w),
        "-".into(),
    ]);
    m.row([
        "reference: HF process peak RSS (torch + transformers included)".to_string(),
        mib(hf_small.max_rss_bytes),
        mib(w),
        report::ratio(hf_small.max_rss_bytes, w),
        "-".into(),
    ]);
    m.print();
    Ok(())
}

/// A prompt whose tokenization is exactly `n` tokens (so both sides prefill the same ids).
fn prompt_of(tok: &Tokenizer, n: usize) -> anyhow::Result<(String, Vec<u32>)> {
    const TEXT: &str = "In the year 2071, humanity has colonized several of the planets and moons \
        of the solar system leaving the now uninhabitable surface of planet Earth behind. The Inter \
        Solar System Police attempts to keep peace in the galaxy, aided in part by outlaw bounty \
        hunters, referred to as Cowboys. The ragtag team aboard the spaceship Bebop are two such \
        individuals, and the pair makes a living chasing bounties and collecting rewards.";
    let ids = tok.encode(TEXT)?;
    for len in n..=ids.len() {
        let text = tok.decode(&ids[..len])?;
        let again = tok.encode(&text)?;
        if again.len() == n {
            return Ok((text, again));
        }
    }
    bail!("cannot build a {n}-token prompt")
}

/// Writes a randomly initialised preset as model.safetensors + config.json + tokenizer.json.
fn write_model_dir(root: &Path, preset: &'static str, tok: &Tokenizer) -> anyhow::Result<ModelDir> {
    let dir = root.join(preset);
    std::fs::create_dir_all(&dir)?;
    let mut config = Gpt2Config::preset(preset)?;
    config.vocab_size = tok.vocab_size() as i64;
    let model = Gpt2::new(&config, Device::Cpu);
    model.save_safetensors(&dir.join("model.safetensors"))?;
    config.save(&dir.join("config.json"))?;
    tok.save(dir.join("tokenizer.json"))?;
    let products = config.n_layer * (4 * config.n_embd + 2 * config.inner_dim()) * config.n_embd;
    let multiplied_weights = (products + config.vocab_size * config.n_embd) as f64;
    let weight_bytes = model
        .var_store()
        .variables()
        .values()
        .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as f64)
        .sum();
    Ok(ModelDir {
        id: preset,
        dir,
        weight_bytes,
        multiplied_weights,
    })
}

async fn install(engine: &EngineHandle, model: &ModelDir, device: Device) -> anyhow::Result<()> {
    let loaded = load_model_dir(&model.dir, device, WeightDtype::F32)
        .with_context(|| format!("loading {}", model.dir.display()))?;
    let resident = ResidentModel {
        checkpoint_id: model.id.to_string(),
        loaded,
        source: model.dir.display().to_string(),
        info: CheckpointInfo {
            checkpoint_id: model.id.to_string(),
            ..Default::default()
        },
    };
    engine
        .install(resident, true)
        .await
        .map_err(|e| anyhow::anyhow!("installing {}: {e}", model.id))
}

/// Best tokens/s of `args.runs` one-stream generations on resident model `id`, after a short
/// warm-up generation.
async fn engine_tokens_per_second(
    engine: &EngineHandle,
    id: &str,
    prompt: &str,
    args: &Args,
) -> anyhow::Result<f64> {
    engine_once(engine, id, prompt, 4, 0).await?;
    let mut rates = Vec::new();
    for run in 0..args.runs.max(1) {
        let (tokens, seconds) =
            engine_once(engine, id, prompt, args.new_tokens, run as u64 + 1).await?;
        rates.push(f64::from(tokens) / seconds);
    }
    Ok(report::best(&rates))
}

/// One request through the engine: (generated tokens, seconds from submission to the end).
async fn engine_once(
    engine: &EngineHandle,
    id: &str,
    prompt: &str,
    max_new_tokens: u32,
    seed: u64,
) -> anyhow::Result<(u32, f64)> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let request = EngineRequest {
        request_id: format!("bench-{id}-{seed}"),
        checkpoint_id: Some(id.to_string()),
        prompt: prompt.to_string(),
        n: 1,
        max_new_tokens,
        sampling: SamplingParams::default(),
        seed,
        stop: Vec::new(),
        deadline: None,
        events: tx,
    };
    let start = Instant::now();
    engine.submit(request).await?;
    while let Some(event) = rx.recv().await {
        match event {
            SeqEvent::Finished {
                generated_tokens, ..
            } => return Ok((generated_tokens, start.elapsed().as_secs_f64())),
            SeqEvent::DeadlineExceeded => bail!("deadline exceeded"),
            SeqEvent::Token { .. } => {}
        }
    }
    bail!("the engine closed the stream before finishing")
}

/// Each side's best round: ours in tokens/s, the reference as `keep` merges it.
#[derive(Default)]
struct Best {
    ours: f64,
    reference: Option<GenerateReference>,
}

impl Best {
    /// Keeps the faster of each side. For the reference that is tokens/s (HF and the lean
    /// loop apart) and time to first token; memory stays the first round's.
    fn keep(&mut self, ours: f64, new: GenerateReference) {
        self.ours = self.ours.max(ours);
        self.reference = Some(match self.reference.take() {
            None => new,
            Some(mut best) => {
                best.tokens_per_second = best.tokens_per_second.max(new.tokens_per_second);
                best.lean_tokens_per_second =
                    best.lean_tokens_per_second.max(new.lean_tokens_per_second);
                best.first_token_seconds = best.first_token_seconds.min(new.first_token_seconds);
                best
            }
        });
    }

    fn into_figures(self) -> anyhow::Result<(f64, GenerateReference)> {
        Ok((self.ours, self.reference.context("no round ran")?))
    }
}

/// The row that sets ours and HF against the lean eager loop on the same weights.
fn lean_loop_row(model: &str, ours: f64, reference: &GenerateReference) -> [String; 5] {
    let lean = reference.lean_tokens_per_second;
    [
        format!("{model} vs a lean eager PyTorch loop on the same weights (HF at its ratio)"),
        num(ours),
        num(lean),
        format!(
            "{} (HF {})",
            report::ratio(ours, lean),
            report::ratio(reference.tokens_per_second, lean)
        ),
        "-".into(),
    ]
}

fn hf(model: &ModelDir, prompt_ids: &[u32], args: &Args) -> anyhow::Result<GenerateReference> {
    let ids: Vec<String> = prompt_ids.iter().map(u32::to_string).collect();
    let argv = [
        "--model".to_string(),
        model.dir.display().to_string(),
        "--prompt-ids".into(),
        ids.join(","),
        "--new-tokens".into(),
        args.new_tokens.to_string(),
        "--runs".into(),
        args.runs.to_string(),
        "--threads".into(),
        args.threads.to_string(),
        "--device".into(),
        args.device.clone(),
    ];
    reference::run("generate_reference.py", &argv)
        .with_context(|| format!("the HF reference on {}", model.id))
}
