//! synopsis-trainer: the `synopsis.v1.Trainer` gRPC service. It turns a CSV of synopses into
//! GPT-2 checkpoints in Hugging Face format, one run at a time per device, streams each run's
//! events, and keeps runs, events and checkpoints on disk under `--root` so a restarted
//! trainer lists and replays them.
//!
//! Disk layout under `--root`:
//! ```text
//! datasets/<sha256>.csv                     uploads, content-addressed
//! runs/<run_id>/run.json                    request, state, timestamps (rewritten atomically)
//! runs/<run_id>/events.jsonl                every TrainEvent, one JSON line each
//! checkpoints/<run_id>/<name>/              id "<run_id>/<name>", e.g. epoch-0002-step-000120
//!   model.safetensors config.json tokenizer.json tokenizer_config.json
//!   special_tokens_map.json optimizer.safetensors manifest.json (last)
//! ```

pub mod checkpoints;
pub mod config;
pub mod data;
pub mod error;
pub mod ids;
pub mod layout;
pub mod manager;
pub mod metrics;
pub mod runs;
pub mod service;
pub mod train;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use synopsis_proto::v1::trainer_server::TrainerServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

pub use config::Config;
pub use error::TrainerError;
pub use manager::Manager;

/// Largest gRPC message accepted: an upload chunk (clients send ≤ 1 MiB) with room to spare.
const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Serves the Trainer (plus health and reflection) on `listener` until `shutdown` resolves.
/// Then health turns NOT_SERVING, the running run writes a checkpoint and stops, live streams
/// end, and only then does this return: a SIGTERM never loses the run's progress.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let device = synopsis_model::parse_device(&config.device)
        .with_context(|| format!("--device {}", config.device))?;
    let tls = config.security.server_tls()?;
    let token = config.security.auth_token()?;
    let local = listener.local_addr().context("listener has no address")?;
    config.security.warn_if_exposed(local);

    let manager = {
        let c = config.clone();
        tokio::task::spawn_blocking(move || {
            Manager::open(
                c.root,
                c.data_root,
                c.models_root,
                manager::UploadLimits {
                    max_upload_bytes: c.max_upload_bytes,
                    quota: c.max_datasets_bytes,
                    retention: (c.dataset_retention_hours > 0)
                        .then(|| std::time::Duration::from_secs(c.dataset_retention_hours * 3600)),
                },
                c.max_run_memory,
                device,
            )
        })
        .await
        .context("opening the trainer root panicked")?
        .with_context(|| format!("cannot open --root {}", config.root.display()))?
        .with_checkpoint_every(train::CheckpointEvery {
            steps: config.checkpoint_every_steps,
            secs: config.checkpoint_every_secs,
        })
    };
    let manager = Arc::new(manager);
    if let Some(addr) = config.metrics_listen {
        synopsis_common::spawn_metrics(addr, manager.metrics.registry.clone())?;
    }

    let (health, health_service) = synopsis_common::health_service().await;
    let reflection = synopsis_common::reflection_service("synopsis.v1.Trainer")?;
    let reflection_alpha = synopsis_common::reflection_service_v1alpha("synopsis.v1.Trainer")?;
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let trainer = TrainerServer::new(service::TrainerService::new(manager.clone(), drain_rx))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);

    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .context("invalid TLS configuration")?;
    }
    let router = builder
        .layer(synopsis_common::auth_layer(token))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(trainer);

    health
        .set_serving::<TrainerServer<service::TrainerService>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    tracing::info!(
        addr = %local,
        device = %synopsis_model::device_name(device),
        root = %config.root.display(),
        "trainer serving"
    );

    let drain = {
        let manager = manager.clone();
        async move {
            shutdown.await;
            tracing::info!("draining: no new runs; the running run checkpoints and stops");
            health
                .set_not_serving::<TrainerServer<service::TrainerService>>()
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            manager.shutdown().await;
            let _ = drain_tx.send(true);
        }
    };
    router
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), drain)
        .await
        .context("gRPC server failed")?;
    tracing::info!("trainer stopped");
    Ok(())
}
