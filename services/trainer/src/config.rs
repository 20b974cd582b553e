//! Command-line flags of `synopsis-trainer` (each also read from a `SYNOPSIS_…` variable):
//! the contract that scripts and Kubernetes manifests rely on.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// Trains GPT-2 models on CSVs of synopses and serves runs and checkpoints over gRPC.
#[derive(Debug, Clone, Parser)]
#[command(name = "synopsis-trainer", version, about)]
pub struct Config {
    /// Address of the gRPC server.
    #[arg(long, env = "SYNOPSIS_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Directory holding uploaded datasets, runs and checkpoints.
    #[arg(long, env = "SYNOPSIS_ROOT")]
    pub root: PathBuf,

    /// Directory under which TrainRequest.data_path is resolved (no path outside it is read).
    /// Unset: only uploaded datasets can be trained on.
    #[arg(long, env = "SYNOPSIS_DATA_ROOT")]
    pub data_root: Option<PathBuf>,

    /// Directory holding base models and tokenizers named by TrainRequest.base_model / .tokenizer.
    #[arg(long, env = "SYNOPSIS_MODELS_ROOT")]
    pub models_root: Option<PathBuf>,

    /// Address of the Prometheus metrics endpoint (`/metrics`); unset = no endpoint.
    #[arg(long, env = "SYNOPSIS_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Device to train on: auto (CUDA when present), cpu, cuda or cuda:N.
    #[arg(long, env = "SYNOPSIS_DEVICE", default_value = "auto")]
    pub device: String,

    /// Largest dataset upload accepted, in bytes (larger uploads get RESOURCE_EXHAUSTED).
    #[arg(long, env = "SYNOPSIS_MAX_UPLOAD_BYTES", default_value_t = 1 << 30)]
    pub max_upload_bytes: u64,

    /// Bytes all uploaded datasets may take together; an upload that would go over is
    /// refused with RESOURCE_EXHAUSTED. Unset: no quota.
    #[arg(long, env = "SYNOPSIS_MAX_DATASETS_BYTES")]
    pub max_datasets_bytes: Option<u64>,

    /// Uploaded datasets that no run refers to are removed this many hours after their last
    /// upload (checked at start and before each upload); 0 keeps them forever.
    #[arg(long, env = "SYNOPSIS_DATASET_RETENTION_HOURS", default_value_t = 168)]
    pub dataset_retention_hours: u64,

    /// Memory a run may use, in bytes: a Train request whose estimate (weights, gradients,
    /// optimizer state, activations) exceeds it is refused before anything is allocated.
    /// Unset: on the CPU, the memory the host and the trainer's cgroup still have available;
    /// on a GPU, no check.
    #[arg(long, env = "SYNOPSIS_MAX_RUN_MEMORY")]
    pub max_run_memory: Option<u64>,

    /// Also write a checkpoint every N optimizer steps inside an epoch (0: only at epoch ends),
    /// so a preempted or killed trainer loses at most N steps. Only the newest such
    /// checkpoint of a run is kept; the next epoch checkpoint replaces it.
    #[arg(long, env = "SYNOPSIS_CHECKPOINT_EVERY_STEPS", default_value_t = 0)]
    pub checkpoint_every_steps: u64,

    /// Also write a checkpoint when this many seconds have passed since the last one (0: off);
    /// same retention as --checkpoint-every-steps.
    #[arg(long, env = "SYNOPSIS_CHECKPOINT_EVERY_SECS", default_value_t = 0)]
    pub checkpoint_every_secs: u64,

    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "SYNOPSIS_LOG_JSON")]
    pub log_json: bool,

    #[command(flatten)]
    pub security: synopsis_common::SecurityArgs,
}

impl Config {
    /// A configuration for tests and embedding: everything default under `root`.
    pub fn for_root(root: impl Into<PathBuf>) -> Self {
        let root: PathBuf = root.into();
        Config::parse_from([
            std::ffi::OsString::from("synopsis-trainer"),
            "--root".into(),
            root.into_os_string(),
        ])
    }
}
