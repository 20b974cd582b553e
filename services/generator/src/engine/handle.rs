//! The async side of the engine: a cloneable handle that sends commands with reply channels to
//! the one thread that owns the tensors (tch tensors are `Send` but not `Sync`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tokio::sync::{oneshot, watch};

use super::api::{
    Admitted, EngineConfig, EngineMetrics, EngineRequest, ModelSummary, ResidentModel, SubmitError,
};
use super::models::Snapshot;
use super::worker::Worker;

pub(crate) enum Command {
    Submit {
        request: EngineRequest,
        submitted: Instant,
        reply: oneshot::Sender<Result<Admitted, SubmitError>>,
    },
    Install {
        model: Box<ResidentModel>,
        make_live: bool,
        reply: oneshot::Sender<Result<(), String>>,
    },
    SetLive {
        checkpoint_id: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Shutdown,
}

/// State the handle and the engine thread both see.
pub(crate) struct Shared {
    /// Requests accepted by `submit` and not decoding yet; bounded by `max_queue`.
    pub depth: AtomicUsize,
    pub max_queue: usize,
    pub shutting_down: AtomicBool,
    pub snapshot: Snapshot,
    pub metrics: EngineMetrics,
    stopped: watch::Receiver<bool>,
}

impl Shared {
    /// One queued request left the queue (refused, admitted to a batch, or aborted).
    pub fn dequeued(&self) {
        let depth = self
            .depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                Some(d.saturating_sub(1))
            })
            .map_or(0, |d| d.saturating_sub(1));
        self.metrics.queue_depth.set(depth as i64);
    }
}

/// Cloneable, `Send + Sync` access to one engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

/// Starts the engine thread for `cfg.device`.
pub fn spawn_engine(cfg: EngineConfig) -> anyhow::Result<EngineHandle> {
    let (tx, rx) = mpsc::channel();
    let (stopped_tx, stopped_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        depth: AtomicUsize::new(0),
        max_queue: cfg.max_queue.max(1),
        shutting_down: AtomicBool::new(false),
        snapshot: Arc::new(RwLock::new(Vec::new())),
        metrics: cfg.metrics.clone(),
        stopped: stopped_rx,
    });
    let worker = Worker::new(cfg.clone(), rx, Arc::clone(&shared));
    let name = format!("engine-{}", synopsis_model::device_name(cfg.device));
    std::thread::Builder::new().name(name).spawn(move || {
        // Signals `stopped` however the thread ends, a panic included.
        struct Stopped(watch::Sender<bool>);
        impl Drop for Stopped {
            fn drop(&mut self) {
                self.0.send_replace(true);
            }
        }
        let _stopped = Stopped(stopped_tx);
        worker.run();
    })?;
    Ok(EngineHandle { tx, shared })
}

impl EngineHandle {
    /// Installs a loaded model as resident after smoke-testing it; on failure the model is
    /// dropped and the reason returned. `make_live` swaps the live pointer (requests in flight
    /// keep their model). The first model installed becomes live whatever `make_live` says.
    pub async fn install(&self, model: ResidentModel, make_live: bool) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        let command = Command::Install {
            model: Box::new(model),
            make_live,
            reply,
        };
        self.tx.send(command).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Makes a resident checkpoint live: rollback or pinning.
    pub async fn set_live(&self, checkpoint_id: &str) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        let command = Command::SetLive {
            checkpoint_id: checkpoint_id.to_owned(),
            reply,
        };
        self.tx.send(command).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    pub fn live(&self) -> Option<ModelSummary> {
        self.resident().into_iter().find(|m| m.live)
    }

    /// Resident models, oldest first.
    pub fn resident(&self) -> Vec<ModelSummary> {
        match self.shared.snapshot.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Queues a request. The engine tokenizes the prompt with the model's own tokenizer and
    /// answers once it knows the request can run; events then arrive on `request.events`.
    pub async fn submit(&self, request: EngineRequest) -> Result<Admitted, SubmitError> {
        let submitted = Instant::now();
        if self.shared.shutting_down.load(Ordering::Acquire) {
            return Err(SubmitError::ShuttingDown);
        }
        let max = self.shared.max_queue;
        let depth = self
            .shared
            .depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                (d < max).then_some(d + 1)
            })
            .map_err(|_| SubmitError::QueueFull)?;
        self.shared.metrics.queue_depth.set(depth as i64 + 1);
        let (reply, rx) = oneshot::channel();
        let command = Command::Submit {
            request,
            submitted,
            reply,
        };
        if self.tx.send(command).is_err() {
            self.shared.dequeued();
            return Err(SubmitError::ShuttingDown);
        }
        rx.await
            .map_err(|_| SubmitError::Internal("the engine stopped".to_owned()))?
    }

    pub fn queue_depth(&self) -> usize {
        self.shared.depth.load(Ordering::Acquire)
    }

    /// Accepts nothing new; requests already accepted finish, then the thread exits.
    pub fn shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::Release);
        let _ = self.tx.send(Command::Shutdown);
    }

    /// Resolves once the engine thread has exited (after `shutdown` and the last request).
    pub async fn stopped(&self) {
        let mut rx = self.shared.stopped.clone();
        let _ = rx.wait_for(|stopped| *stopped).await;
    }
}

fn stopped() -> String {
    "the engine stopped".to_owned()
}
