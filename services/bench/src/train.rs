//! `bench-train`: real (non-padding) tokens per second of the trainer's training step against
//! the original project's pipeline (HF model, every synopsis padded to 256) and a lean packed
//! PyTorch loop, on the same model shape, the same data and the same torch, in one run.
//!
//! Ours goes through the trainer's own code: `train::prepare` (CSV cleaning, GPT-2 tokenizer,
//! model and AdamW exactly as a Train request resolves them), then each step is the loop's
//! step rebuilt from the pieces the trainer exports (its step function is private): a packed
//! batch, the dropout seed, `Gpt2::loss`, backward, clipping and AdamW at the schedule's rate.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use synopsis_proto::v1::{train_request, HyperParams, ModelSpec, TrainRequest};
use synopsis_trainer::checkpoints::Catalog;
use synopsis_trainer::data::DatasetStore;
use synopsis_trainer::layout::Layout;
use synopsis_trainer::train::batches::Packed;
use synopsis_trainer::train::schedule::LinearSchedule;
use synopsis_trainer::train::{prepare, step_seed, Env};
use tch::Device;

use crate::machine;
use crate::reference::{self, TrainReference};
use crate::report::{self, num, Table};

/// Benchmark the trainer's training step against the Python references.
#[derive(Debug, Clone, Parser)]
#[command(name = "bench-train")]
pub struct Args {
    /// Directory holding the training corpus (not in the repository: the cleaned MyAnimeList
    /// file, `anime/anime_synopses_clean.csv`, or any CSV with a `Synopsis` column named by
    /// `--data`). Required.
    #[arg(long, env = "SYNOPSIS_DATA_ROOT")]
    pub data_root: Option<PathBuf>,
    /// CSV under the data root.
    #[arg(long, default_value = "anime/anime_synopses_clean.csv")]
    pub data: String,
    /// GPT-2 tokenizer directory (`tokenizer.json`); the repository's fixture by default.
    #[arg(long, default_value = crate::DEFAULT_TOKENIZER_DIR)]
    pub tokenizer: PathBuf,
    /// Timed steps per pipeline.
    #[arg(long, default_value_t = 4)]
    pub steps: u32,
    /// Untimed steps first (allocator and kernel warm-up).
    #[arg(long, default_value_t = 1)]
    pub warmup: u32,
    #[arg(long, default_value_t = 8)]
    pub batch: u32,
    #[arg(long, default_value_t = 256)]
    pub seq: u32,
    #[arg(long, default_value_t = crate::DEFAULT_THREADS)]
    pub threads: i32,
    /// Timed steps of the overhead-bound row (12 layers × 64 wide, vocabulary 1,024).
    #[arg(long, default_value_t = 30)]
    pub overhead_steps: u32,
    /// Only the overhead-bound row: random token ids, no corpus needed.
    #[arg(long)]
    pub overhead_only: bool,
}

/// Model shape of the benchmark (the trainer's `tiny` preset, the original project's model).
const LAYERS: u32 = 4;
const WIDTH: u32 = 256;
const HEADS: u32 = 4;

/// Throughput of our step and what it trained.
struct Ours {
    tokens_per_second: f64,
    seconds_per_step: f64,
    loss: f64,
    parameters: i64,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    tch::set_num_threads(args.threads);
    if args.overhead_only {
        return crate::train_overhead::run(5, args.overhead_steps, args.threads);
    }
    let corpus = corpus_path(args)?;
    println!(
        "bench-train: {LAYERS} layers × {WIDTH} wide × {HEADS} heads, GPT-2 vocabulary, batch {} × {}, \
         {} timed steps after {} warm-up, {} torch threads",
        args.batch, args.seq, args.steps, args.warmup, args.threads
    );
    let gemm = machine::gemm_flops(1024, 5);
    let root = tempfile::tempdir().context("temporary trainer root")?;
    let mut trainer = OurTrainer::prepare(args, root.path())?;
    // Ours is measured before and after the references and averaged: the machine is shared,
    // and a load that comes and goes then weighs on both sides alike.
    let before = trainer.measure(args.warmup, args.steps)?;
    eprintln!("ours (before): {} tokens/s", num(before.tokens_per_second));
    let original = python(args, &corpus, "original")?;
    eprintln!(
        "original: {} tokens/s",
        num(original.real_tokens_per_second)
    );
    let packed = python(args, &corpus, "packed")?;
    eprintln!("packed: {} tokens/s", num(packed.real_tokens_per_second));
    let after = trainer.measure(args.warmup, args.steps)?;
    eprintln!("ours (after): {} tokens/s", num(after.tokens_per_second));
    let ours = Ours {
        tokens_per_second: (before.tokens_per_second + after.tokens_per_second) / 2.0,
        seconds_per_step: (before.seconds_per_step + after.seconds_per_step) / 2.0,
        loss: after.loss,
        parameters: after.parameters,
    };

    let mut table = Table::new(
        "Training throughput (real = non-padding target tokens)",
        &[
            "pipeline",
            "real tokens/s",
            "s/step",
            "loss",
            "ours ÷ this",
            "target",
        ],
    );
    for (name, m) in [
        ("  ours, measured before the references", &before),
        ("  ours, measured after them", &after),
    ] {
        table.row([
            name.to_string(),
            num(m.tokens_per_second),
            num(m.seconds_per_step),
            num(m.loss),
            String::new(),
            String::new(),
        ]);
    }
    table.row([
        "ours: trainer step (packed, AdamW, clip, schedule), mean".to_string(),
        num(ours.tokens_per_second),
        num(ours.seconds_per_step),
        num(ours.loss),
        "1.00×".into(),
        String::new(),
    ]);
    let refs = [
        (
            "original: HF GPT2LMHeadModel, padded to 256",
            &original,
            1.5,
        ),
        (
            "lean packed PyTorch loop (HF model, no padding)",
            &packed,
            1.0,
        ),
    ];
    for (name, r, target) in refs {
        table.row([
            name.to_string(),
            num(r.real_tokens_per_second),
            num(r.seconds_per_step),
            num(r.loss),
            report::ratio(ours.tokens_per_second, r.real_tokens_per_second),
            report::verdict_at_least(ours.tokens_per_second, r.real_tokens_per_second, target),
        ]);
    }
    table.print();

    // Model FLOPs per trained token (PaLM appendix B): 6·N for the matmuls of forward and
    // backward (N counts the tied embedding once: it is the LM head's matmul), plus 12·L·T·d
    // for attention scores and values over the T-long context.
    let n = ours.parameters as f64;
    let attention = 12.0 * f64::from(LAYERS) * f64::from(args.seq) * f64::from(WIDTH);
    let per_token = 6.0 * n + attention;
    let mut flops = Table::new(
        &format!(
            "Model FLOP/s = (6·N + 12·L·T·d) × real tokens/s, N = {} parameters, L = {LAYERS}, T = {}, d = {WIDTH} \
             ({} MFLOP per token); measured float32 GEMM 1024³: {} GFLOP/s",
            num(n / 1e6) + "M",
            args.seq,
            num(per_token / 1e6),
            num(gemm / 1e9)
        ),
        &["pipeline", "model GFLOP/s", "of measured GEMM"],
    );
    for (name, tps) in [
        ("ours", ours.tokens_per_second),
        ("original", original.real_tokens_per_second),
        ("packed PyTorch loop", packed.real_tokens_per_second),
    ] {
        let f = per_token * tps;
        flops.row([
            name.to_string(),
            num(f / 1e9),
            format!("{:.0}%", 100.0 * f / gemm),
        ]);
    }
    flops.print();
    crate::train_overhead::run(5, args.overhead_steps, args.threads)
}

/// The trainer's model, optimizer and data order, ready to take steps.
struct OurTrainer {
    model: synopsis_model::Gpt2,
    optimizer: synopsis_trainer::train::optimizer::AdamW,
    packed: Packed,
    schedule: LinearSchedule,
    clip: Option<f64>,
    seed: u64,
    batch: usize,
    step: u64,
}

impl OurTrainer {
    /// Resolves a Train request for the benchmark's model and data the way the trainer does.
    fn prepare(args: &Args, root: &std::path::Path) -> anyhow::Result<Self> {
        let layout = Layout::new(root);
        layout.create().context("trainer root")?;
        let catalog = Catalog::load(&layout)?;
        let (tokenizers, tokenizer) = tokenizer_root_and_name(args)?;
        let env = Env {
            datasets: DatasetStore::new(&root.join("datasets"))?,
            data_root: args.data_root.clone(),
            models_root: Some(tokenizers),
            device: Device::Cpu,
            max_run_memory: None,
        };
        // Two measurements (before and after the references), each with its warm-up.
        let total = 2 * (args.steps + args.warmup);
        let request = TrainRequest {
            data: Some(train_request::Data::DataPath(args.data.clone())),
            text_column: "Synopsis".into(),
            tokenizer,
            model: Some(ModelSpec {
                preset: "tiny".into(),
                n_layer: LAYERS,
                n_embd: WIDTH,
                n_head: HEADS,
                ..Default::default()
            }),
            hyper: Some(HyperParams {
                epochs: 1,
                max_steps: u64::from(total),
                batch_size: args.batch,
                seq_len: args.seq,
                ..Default::default()
            }),
            run_name: "bench".into(),
            ..Default::default()
        };
        let plan = prepare(&request, &env, &catalog).context("resolving the Train request")?;
        let hyper = plan.config.hyper.clone();
        let batch = hyper.batch_size as usize;
        let packed = Packed::epoch(&plan.train_docs, hyper.seq_len as usize, hyper.seed, 0);
        anyhow::ensure!(
            packed.windows() >= total as usize * batch,
            "the corpus holds only {} windows",
            packed.windows()
        );
        Ok(OurTrainer {
            model: plan.model,
            optimizer: plan.optimizer,
            packed,
            schedule: LinearSchedule {
                peak: hyper.learning_rate,
                warmup_steps: u64::from(hyper.warmup_steps),
                total_steps: u64::from(total),
            },
            clip: (hyper.grad_clip > 0.0).then_some(hyper.grad_clip),
            seed: hyper.seed,
            batch,
            step: 0,
        })
    }

    /// `warmup` untimed then `steps` timed training steps, as the trainer's loop takes them
    /// (accumulation 1, f32 on CPU: no autocast, loss scale 1).
    fn measure(&mut self, warmup: u32, steps: u32) -> anyhow::Result<Ours> {
        let (mut elapsed, mut tokens, mut loss) = (0.0, 0usize, f64::NAN);
        for i in 0..warmup + steps {
            let start = Instant::now();
            let b = self
                .packed
                .batch(self.step as usize * self.batch, self.batch, Device::Cpu)?;
            tch::manual_seed(step_seed(self.seed, self.step));
            self.optimizer.zero_grad();
            let l = self.model.loss(&b.inputs, &b.targets, true);
            l.f_backward()?;
            loss = f64::try_from(&l)?;
            self.optimizer.unscale_and_clip(1.0, self.clip)?;
            self.optimizer.step(self.schedule.lr(self.step))?;
            self.step += 1;
            if i >= warmup {
                elapsed += start.elapsed().as_secs_f64();
                tokens += b.tokens;
            }
        }
        Ok(Ours {
            tokens_per_second: tokens as f64 / elapsed,
            seconds_per_step: elapsed / f64::from(steps.max(1)),
            loss,
            parameters: self.model.config().num_parameters(),
        })
    }
}

/// The corpus file, or an error that says where to put it: the benchmark trains on a real
/// corpus, which the repository does not hold.
fn corpus_path(args: &Args) -> anyhow::Result<PathBuf> {
    let Some(root) = &args.data_root else {
        anyhow::bail!(
            "bench-train needs a training corpus, which is not in the repository: pass --data-root \
             DIR (or set SYNOPSIS_DATA_ROOT), where DIR holds {} (the cleaned MyAnimeList \
             corpus; any CSV with a Synopsis column works through --data)",
            args.data
        );
    };
    let path = root.join(&args.data);
    anyhow::ensure!(
        path.is_file(),
        "bench-train: {} not found (--data-root {}, --data {})",
        path.display(),
        root.display(),
        args.data
    );
    Ok(path)
}

/// The tokenizer as the trainer resolves one: a directory name under its models root.
fn tokenizer_root_and_name(args: &Args) -> anyhow::Result<(PathBuf, String)> {
    let name = args
        .tokenizer
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("--tokenizer {}", args.tokenizer.display()))?;
    let root = args.tokenizer.parent().unwrap_or(std::path::Path::new("."));
    Ok((root.to_path_buf(), name.to_string()))
}

fn python(args: &Args, corpus: &std::path::Path, mode: &str) -> anyhow::Result<TrainReference> {
    let argv = [
        "--mode".to_string(),
        mode.to_string(),
        "--data".into(),
        corpus.display().to_string(),
        "--tokenizer".into(),
        args.tokenizer.display().to_string(),
        "--layers".into(),
        LAYERS.to_string(),
        "--width".into(),
        WIDTH.to_string(),
        "--heads".into(),
        HEADS.to_string(),
        "--batch".into(),
        args.batch.to_string(),
        "--seq".into(),
        args.seq.to_string(),
        "--steps".into(),
        args.steps.to_string(),
        "--warmup-steps".into(),
        args.warmup.to_string(),
        "--threads".into(),
        args.threads.to_string(),
    ];
    reference::run("train_reference.py", &argv).with_context(|| format!("the {mode} reference"))
}
