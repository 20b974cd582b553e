//! What the gRPC handlers, the checkpoint sources and the drain logic share: the engine handle,
//! the conditioning templates of resident checkpoints, refused checkpoints, health and the
//! count of open streams.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use synopsis_model::WeightDtype;
use synopsis_proto::v1 as pb;
use tokio::sync::{watch, Notify};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::conditioning::Conditioning;
use crate::engine::{EngineHandle, ModelSummary};
use crate::metrics::Metrics;
use crate::sources::trainer::TrainerLink;
use crate::validation::Limits;

/// Refused checkpoints remembered for ModelInfo (oldest dropped first).
const REFUSED_KEPT: usize = 100;

/// Name the Generator service is reported under in grpc.health.v1.
pub const HEALTH_SERVICE: &str = "synopsis.v1.Generator";

pub struct State {
    pub engine: EngineHandle,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub device: tch::Device,
    pub dtype: WeightDtype,
    /// Where checkpoints downloaded from the trainer go.
    pub cache_dir: PathBuf,
    /// Canonical directories LoadCheckpoint may load a path from.
    pub load_roots: Vec<PathBuf>,
    /// The followed trainer, for LoadCheckpoint of an id that is not resident.
    pub trainer: Option<Arc<TrainerLink>>,
    /// What a model's attention cache is sized against (`--max-batch` and the memory for it).
    pub cache_budget: crate::swap::CacheBudget,
    health: HealthReporter,
    health_lock: tokio::sync::Mutex<()>,
    draining: AtomicBool,
    refused: Mutex<VecDeque<pb::RefusedCheckpoint>>,
    templates: Mutex<HashMap<String, Option<Conditioning>>>,
    streams: AtomicUsize,
    streams_idle: Notify,
    /// Set when the drain grace has passed: open streams end with UNAVAILABLE.
    stop_streams: watch::Sender<bool>,
    /// One swap at a time, so two sources never race to make different checkpoints live.
    pub swap_lock: tokio::sync::Mutex<()>,
}

pub struct StateParts {
    pub engine: EngineHandle,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub device: tch::Device,
    pub dtype: WeightDtype,
    pub cache_dir: PathBuf,
    pub load_roots: Vec<PathBuf>,
    pub trainer: Option<Arc<TrainerLink>>,
    pub cache_budget: crate::swap::CacheBudget,
    pub health: HealthReporter,
}

impl State {
    pub fn new(p: StateParts) -> Self {
        State {
            engine: p.engine,
            metrics: p.metrics,
            limits: p.limits,
            device: p.device,
            dtype: p.dtype,
            cache_dir: p.cache_dir,
            load_roots: p.load_roots,
            trainer: p.trainer,
            cache_budget: p.cache_budget,
            health: p.health,
            health_lock: tokio::sync::Mutex::new(()),
            draining: AtomicBool::new(false),
            refused: Mutex::new(VecDeque::new()),
            templates: Mutex::new(HashMap::new()),
            streams: AtomicUsize::new(0),
            streams_idle: Notify::new(),
            stop_streams: watch::channel(false).0,
            swap_lock: tokio::sync::Mutex::new(()),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Health follows the engine: SERVING while a model is live and the server is not draining.
    pub async fn refresh_health(&self) {
        let _one_at_a_time = self.health_lock.lock().await;
        let status = if !self.is_draining() && self.engine.live().is_some() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.health.set_service_status("", status).await;
        self.health.set_service_status(HEALTH_SERVICE, status).await;
    }

    pub async fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.refresh_health().await;
    }

    pub fn serving_state(&self) -> pb::ServingState {
        if self.is_draining() {
            pb::ServingState::Draining
        } else if self.engine.live().is_some() {
            pb::ServingState::Serving
        } else {
            pb::ServingState::Waiting
        }
    }

    pub fn refuse(&self, checkpoint_id: &str, reason: &str) {
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let mut refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        if refused.len() == REFUSED_KEPT {
            refused.pop_front();
        }
        refused.push_back(pb::RefusedCheckpoint {
            checkpoint_id: checkpoint_id.to_string(),
            reason: reason.to_string(),
            time,
        });
    }

    pub fn refused(&self) -> Vec<pb::RefusedCheckpoint> {
        let refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        refused.iter().cloned().collect()
    }

    pub fn set_template(&self, checkpoint_id: &str, template: Option<Conditioning>) {
        let mut t = self
            .templates
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        t.insert(checkpoint_id.to_string(), template);
    }

    pub fn forget_template(&self, checkpoint_id: &str) {
        let mut t = self
            .templates
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        t.remove(checkpoint_id);
    }

    pub fn template(&self, checkpoint_id: &str) -> Option<Conditioning> {
        let t = self
            .templates
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        t.get(checkpoint_id).cloned().flatten()
    }

    pub fn resident(&self, checkpoint_id: &str) -> Option<ModelSummary> {
        self.engine
            .resident()
            .into_iter()
            .find(|m| m.info.checkpoint_id == checkpoint_id)
    }

    /// Counts an open stream until the guard is dropped; the drain waits for all of them.
    pub fn open_stream(self: &Arc<Self>) -> StreamGuard {
        self.streams.fetch_add(1, Ordering::SeqCst);
        self.metrics.streams_in_flight.inc();
        StreamGuard {
            state: Arc::clone(self),
        }
    }

    pub fn open_streams(&self) -> usize {
        self.streams.load(Ordering::SeqCst)
    }

    pub async fn streams_finished(&self) {
        loop {
            let idle = self.streams_idle.notified();
            if self.open_streams() == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Ends the streams still open after the drain grace.
    pub fn stop_streams(&self) {
        self.stop_streams.send_replace(true);
    }

    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop_streams.subscribe()
    }
}

pub struct StreamGuard {
    state: Arc<State>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.state.metrics.streams_in_flight.dec();
        if self.state.streams.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.state.streams_idle.notify_waiters();
        }
    }
}
