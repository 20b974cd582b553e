//! The command line grammar (clap derive): one struct per subcommand, help text from doc
//! comments, so `synopsis --help` and the shell completions stay in step with the code.

use clap::{ArgGroup, Args, Parser, Subcommand};
use std::path::PathBuf;

/// Train GPT-2 on a CSV of synopses and generate new ones, token by token.
#[derive(Debug, Parser)]
#[command(name = "synopsis", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the servers are and how to talk to them; accepted before or after the subcommand.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// URL of the trainer.
    #[arg(
        long,
        global = true,
        env = "SYNOPSIS_TRAINER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub trainer: String,
    /// URL of the generator.
    #[arg(
        long,
        global = true,
        env = "SYNOPSIS_GENERATOR",
        default_value = "http://127.0.0.1:50052"
    )]
    pub generator: String,
    /// File holding the bearer token sent with every call.
    #[arg(long, global = true, env = "SYNOPSIS_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// The bearer token itself (prefer --token-file or the environment: arguments are visible
    /// to other users of the machine).
    #[arg(
        long,
        global = true,
        env = "SYNOPSIS_TOKEN",
        hide_env_values = true,
        hide = true
    )]
    pub token: Option<String>,
    /// PEM file of the CA that signed the servers' certificates: talk https.
    #[arg(long, global = true, env = "SYNOPSIS_TLS_CA", value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for servers that require mutual TLS (needs --tls-ca).
    #[arg(
        long,
        global = true,
        env = "SYNOPSIS_TLS_CERT",
        value_name = "PATH",
        requires_all = ["tls_ca", "tls_key"]
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(
        long,
        global = true,
        env = "SYNOPSIS_TLS_KEY",
        value_name = "PATH",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Machine-readable output: one JSON object per line.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Upload a CSV and train on it, following the run live (Ctrl-C detaches).
    Train(TrainArgs),
    /// List the trainer's runs.
    Runs,
    /// Follow a run: replay its events from a position, then live (Ctrl-C detaches).
    Watch(WatchArgs),
    /// Ask a run to write a checkpoint and stop.
    Stop(StopArgs),
    /// List complete checkpoints, of all runs or of one.
    Checkpoints(CheckpointsArgs),
    /// Draw a run's training and validation loss against step into a PNG or SVG file.
    Plot(PlotArgs),
    /// Generate synopses, streamed to the terminal as they are written.
    Generate(GenerateArgs),
    /// Show what the generator serves: live checkpoint, resident ones, device, state.
    Model,
    /// Make a checkpoint live on the generator (pin one, or roll back).
    Load(LoadArgs),
    /// Print a shell completion script.
    Completions(CompletionsArgs),
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("source").required(true).args(["data", "data_path"])))]
pub struct TrainArgs {
    /// CSV file to upload and train on.
    #[arg(long, value_name = "FILE.csv")]
    pub data: Option<PathBuf>,
    /// CSV path relative to the trainer's --data-root, instead of uploading a file.
    #[arg(long, value_name = "REL")]
    pub data_path: Option<String>,
    /// Column holding the text (default: detected, e.g. synopsis, description).
    #[arg(long, value_name = "C")]
    pub text_column: Option<String>,
    /// Columns to condition on, comma separated, e.g. Genres,Name.
    #[arg(long, value_name = "COLUMNS", value_delimiter = ',')]
    pub condition: Vec<String>,
    /// Model shape when training from scratch: tiny, small, medium.
    #[arg(long, conflicts_with = "base_model")]
    pub preset: Option<String>,
    /// Directory under the trainer's --models-root holding a GPT-2 to fine-tune.
    #[arg(long, value_name = "NAME")]
    pub base_model: Option<String>,
    /// Directory under the trainer's --models-root holding a tokenizer.json.
    #[arg(long, value_name = "NAME")]
    pub tokenizer: Option<String>,
    /// Passes over the training set.
    #[arg(long)]
    pub epochs: Option<u32>,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Sequences per micro-batch.
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Tokens per training sequence.
    #[arg(long)]
    pub seq_len: Option<u32>,
    /// Drop synopses longer than this many characters.
    #[arg(long)]
    pub max_chars: Option<u32>,
    /// Drop synopses shorter than this many characters.
    #[arg(long)]
    pub min_chars: Option<u32>,
    /// Linear warm-up steps.
    #[arg(long)]
    pub warmup_steps: Option<u32>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub grad_accum: Option<u32>,
    /// Seed of data order, initialisation and the validation split.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Fraction of documents held out for validation.
    #[arg(long)]
    pub eval_fraction: Option<f64>,
    /// Checkpoint id to resume from.
    #[arg(long, value_name = "CKPT")]
    pub resume: Option<String>,
    /// Human-readable name of the run.
    #[arg(long)]
    pub run_name: Option<String>,
    /// Prompt sampled at each epoch end (repeatable; default: the original openings).
    #[arg(long = "sample-prompt", value_name = "TEXT")]
    pub sample_prompts: Vec<String>,
    /// Start the run, print its id and return at once.
    #[arg(long)]
    pub detach: bool,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Run id.
    pub run: String,
    /// Replay from this event position.
    #[arg(long, default_value_t = 0, value_name = "SEQ")]
    pub from: u64,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// Run id.
    pub run: String,
    /// Return once the stop is requested instead of when the run has written its checkpoint
    /// and stopped.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Args)]
pub struct CheckpointsArgs {
    /// Only this run's checkpoints.
    pub run: Option<String>,
}

#[derive(Debug, Args)]
pub struct PlotArgs {
    /// Run id.
    pub run: String,
    /// Output file; .png or .svg.
    #[arg(short, long, value_name = "FILE")]
    pub out: PathBuf,
    /// Picture width in pixels.
    #[arg(long, default_value_t = 1200)]
    pub width: u32,
    /// Picture height in pixels.
    #[arg(long, default_value_t = 700)]
    pub height: u32,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Opening of the synopsis (default: the original project's four openings).
    #[arg(value_name = "PROMPT")]
    pub prompt: Vec<String>,
    /// Genres to condition on, e.g. "Sci-Fi, Mecha" (the Genres condition).
    #[arg(long)]
    pub genres: Option<String>,
    /// Title to condition on (the Name condition).
    #[arg(long)]
    pub title: Option<String>,
    /// Any condition column, e.g. --condition Type=Movie (repeatable).
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub condition: Vec<(String, String)>,
    /// Samples per prompt.
    #[arg(short, long, default_value_t = 1)]
    pub n: u32,
    /// Tokens to generate per sample (0 = the server's default).
    #[arg(long, default_value_t = 0)]
    pub max_new_tokens: u32,
    /// Sampling temperature; 0 = greedy. (Negative values of the sampling numbers parse, so
    /// that the generator's validation, which names the field, is what answers them.)
    #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 50)]
    pub top_k: u32,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.95)]
    pub top_p: f32,
    /// Penalty (>= 1) on tokens already present.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Seed (sample i uses seed + i); default random, shown in the output.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop before this string (repeatable).
    #[arg(long, value_name = "STR")]
    pub stop: Vec<String>,
    /// Use this resident checkpoint instead of the live one.
    #[arg(long, value_name = "ID")]
    pub checkpoint: Option<String>,
    /// Also write the results to this file, a header per prompt and numbered samples.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("source").required(true).args(["checkpoint", "path"])))]
pub struct LoadArgs {
    /// Checkpoint id known to the generator.
    #[arg(value_name = "CKPT")]
    pub checkpoint: Option<String>,
    /// A checkpoint or Hugging Face GPT-2 directory on the generator's file system.
    #[arg(long, value_name = "DIR")]
    pub path: Option<String>,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    pub shell: clap_complete::Shell,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got `{s}`")),
    }
}
