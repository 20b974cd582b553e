//! The trainer's state and its one device: which run holds it, how a run is started on its own
//! thread (so it goes on when every client has gone), stopped, and waited for at shutdown.
//!
//! One run at a time per device: a second Train while one runs (or is being prepared) is
//! refused with RESOURCE_EXHAUSTED "run X is running; stop it or wait". Queueing was the
//! alternative; refusing keeps the client in charge of what runs next and never leaves a
//! forgotten run waiting for hours behind another.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use synopsis_proto::v1::{train_event, RunFinished, RunState, TrainRequest};
use tch::Device;
use tokio::sync::watch;

use crate::checkpoints::Catalog;
use crate::data::DatasetStore;
use crate::error::{Result, TrainerError};
use crate::ids;
use crate::layout::Layout;
use crate::metrics::Metrics;
use crate::runs::{Run, RunRecord, Runs, State, StopReason};
use crate::train::{self, Env, RunContext};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Who holds the device.
#[derive(Debug, Clone)]
enum Slot {
    Idle,
    /// A request is being resolved (data read, tokenizer trained, model loaded).
    Preparing,
    Running(Arc<Run>),
}

#[derive(Debug)]
pub struct Manager {
    pub layout: Layout,
    pub runs: Runs,
    pub catalog: Arc<Catalog>,
    pub datasets: DatasetStore,
    pub metrics: Metrics,
    env: Env,
    slot: Mutex<Slot>,
    /// `true` while no run holds the device; shutdown waits on it.
    idle: watch::Sender<bool>,
    draining: AtomicBool,
    /// Age after which an uploaded dataset no run uses is removed; `None` keeps them all.
    dataset_retention: Option<std::time::Duration>,
    /// Checkpoints inside epochs (`--checkpoint-every-steps` / `--checkpoint-every-secs`).
    every: crate::train::CheckpointEvery,
}

/// The limits of the dataset store (`--max-upload-bytes`, `--max-datasets-bytes`,
/// `--dataset-retention-hours`).
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    pub max_upload_bytes: u64,
    pub quota: Option<u64>,
    pub retention: Option<std::time::Duration>,
}

/// Frees the slot when preparation fails or panics before a run thread takes it over.
struct SlotGuard<'a> {
    manager: &'a Manager,
    armed: bool,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.manager.release();
        }
    }
}

/// Deletes the temporary files of uploads a killed process left behind (an upload in
/// progress is never visible as a dataset: it only becomes `<sha256>.csv` when complete).
fn remove_stale_uploads(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for path in entries.flatten().map(|e| e.path()) {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with(".upload-") && name.ends_with(".tmp") {
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!(file = %path.display(), "removed an unfinished upload"),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot remove an unfinished upload")
                }
            }
        }
    }
}

impl Manager {
    /// Sets how often runs checkpoint inside an epoch (every run started afterwards).
    pub fn with_checkpoint_every(mut self, every: crate::train::CheckpointEvery) -> Self {
        self.every = every;
        self
    }

    /// Opens the trainer's root: removes stale temp files, loads runs (marking the ones a dead
    /// process left RUNNING as FAILED) and verifies checkpoints. Blocking.
    pub fn open(
        root: PathBuf,
        data_root: Option<PathBuf>,
        models_root: Option<PathBuf>,
        uploads: UploadLimits,
        max_run_memory: Option<u64>,
        device: Device,
    ) -> Result<Self> {
        let layout = Layout::new(root);
        layout
            .create()
            .map_err(|e| TrainerError::io(layout.root(), e))?;
        let datasets = DatasetStore::new(layout.root())
            .map_err(|source| TrainerError::Data {
                field: "root",
                source,
            })?
            .with_max_bytes(uploads.max_upload_bytes)
            .with_quota(uploads.quota);
        remove_stale_uploads(&layout.root().join("datasets"));
        let runs = Runs::load(&layout)?;
        let catalog = Arc::new(Catalog::load(&layout)?);
        let metrics = Metrics::new(runs.table())
            .map_err(|e| TrainerError::Internal(format!("metrics: {e}")))?;
        let (idle, _) = watch::channel(true);
        let manager = Manager {
            env: Env {
                datasets: datasets.clone(),
                data_root,
                models_root,
                device,
                max_run_memory,
            },
            layout,
            runs,
            catalog,
            datasets,
            metrics,
            slot: Mutex::new(Slot::Idle),
            idle,
            draining: AtomicBool::new(false),
            dataset_retention: uploads.retention,
            every: crate::train::CheckpointEvery::default(),
        };
        manager.remove_unused_datasets();
        Ok(manager)
    }

    /// Removes the uploaded datasets no run refers to once they are older than
    /// `--dataset-retention-hours` (by their last upload). Blocking (a directory listing).
    pub fn remove_unused_datasets(&self) {
        let Some(max_age) = self.dataset_retention else {
            return;
        };
        // A run's record holds its resolved config, which names its dataset id.
        let configs: Vec<String> = self
            .runs
            .list()
            .iter()
            .map(|r| r.config.to_string())
            .collect();
        let removed = self
            .datasets
            .remove_unused(max_age, |id| configs.iter().any(|c| c.contains(id)));
        for id in removed {
            tracing::info!(dataset_id = %id, "removed an unused dataset past its retention");
        }
    }

    pub fn device(&self) -> Device {
        self.env.device
    }

    fn reserve(&self) -> Result<SlotGuard<'_>> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(TrainerError::ShuttingDown);
        }
        let mut slot = lock(&self.slot);
        match &*slot {
            Slot::Preparing => Err(TrainerError::Starting),
            // A terminal run has emitted its end (its record turns terminal before the event
            // goes out) and its thread is only finishing up: a client that saw `Finished` may
            // start the next run at once instead of racing the old thread's release.
            Slot::Running(run) if !run.state().is_terminal() => Err(TrainerError::Busy {
                run_id: run.id.clone(),
            }),
            Slot::Idle | Slot::Running(_) => {
                *slot = Slot::Preparing;
                self.idle.send_replace(false);
                Ok(SlotGuard {
                    manager: self,
                    armed: true,
                })
            }
        }
    }

    fn release(&self) {
        *lock(&self.slot) = Slot::Idle;
        self.idle.send_replace(true);
    }

    /// Frees the slot after run `run_id`, unless the next run already took it over.
    fn release_after(&self, run_id: &str) {
        let mut slot = lock(&self.slot);
        if matches!(&*slot, Slot::Running(run) if run.id == run_id) {
            *slot = Slot::Idle;
            self.idle.send_replace(true);
        }
    }

    /// Resolves `req`, creates the run and starts its thread. Returns once the run exists;
    /// its events follow on the run's broadcast and log.
    pub async fn start(self: &Arc<Self>, req: TrainRequest) -> Result<Arc<Run>> {
        // Validation first: an invalid request is INVALID_ARGUMENT even while a run goes on.
        train::precheck::precheck(&req, &self.env)?;
        let guard = self.reserve()?;
        let this = self.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            train::prepare(&req, &this.env, &this.catalog).map(|plan| (plan, req))
        })
        .await
        .map_err(|e| TrainerError::Internal(format!("preparing the run panicked: {e}")))?;
        let (plan, req) = prepared?;
        if self.draining.load(Ordering::SeqCst) {
            return Err(TrainerError::ShuttingDown);
        }
        let run_id = ids::new_run_id();
        let record = RunRecord {
            run_id: run_id.clone(),
            run_name: if req.run_name.is_empty() {
                run_id.clone()
            } else {
                req.run_name.clone()
            },
            state: State::Queued,
            created: ids::unix_seconds(),
            finished: None,
            config: serde_json::to_value(&plan.config).unwrap_or_default(),
            device: plan.config.device.clone(),
            step: plan.progress.step,
            total_steps: 0,
            last_val_loss: None,
            last_checkpoint_id: None,
            resumed_from: plan.config.resume_from.clone(),
            message: String::new(),
        };
        let run = self.runs.create(record)?;
        {
            let mut slot = lock(&self.slot);
            *slot = Slot::Running(run.clone());
            // Checked under the slot lock, which `shutdown` takes after raising `draining`:
            // either it sees this run or this sees the drain.
            if self.draining.load(Ordering::SeqCst) {
                run.stop_signal().request(StopReason::Shutdown);
            }
        }
        let ctx = RunContext {
            run: run.clone(),
            catalog: self.catalog.clone(),
            metrics: self.metrics.clone(),
            every: self.every,
        };
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("train-{run_id}"))
            .spawn(move || this.run_thread(plan, ctx));
        if let Err(e) = spawned {
            run.emit(train_event::Event::Finished(RunFinished {
                state: RunState::Failed as i32,
                message: format!("cannot start the training thread: {e}"),
                last_checkpoint_id: String::new(),
            }));
            return Err(TrainerError::Internal(format!(
                "cannot start a thread: {e}"
            )));
        }
        // The thread owns the slot from here and releases it when the run ends.
        let mut guard = guard;
        guard.armed = false;
        tracing::info!(run_id = %run.id, "run started");
        Ok(run)
    }

    fn run_thread(self: Arc<Self>, plan: train::Plan, ctx: RunContext) {
        let span = tracing::info_span!("run", run_id = %ctx.run.id);
        let _entered = span.enter();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| train::run(plan, &ctx)));
        let last = ctx.run.record().last_checkpoint_id.unwrap_or_default();
        let (state, message) = match result {
            Ok(Ok(outcome)) => match outcome.stopped {
                None => (RunState::Completed, "completed".to_string()),
                Some(StopReason::Requested) => (RunState::Stopped, "stopped on request".into()),
                Some(StopReason::Shutdown) => (
                    RunState::Stopped,
                    "stopped because the trainer shut down; resume from the last checkpoint".into(),
                ),
            },
            Ok(Err(e)) => {
                tracing::error!(error = %e, "run failed");
                // The run's events go to clients: libtorch's text (C++ backtraces, paths)
                // stays in the log.
                // A full disk or a bad file is the operator's to fix and stays readable.
                let message = match &e {
                    TrainerError::Torch(_)
                    | TrainerError::Model(synopsis_model::ModelError::Torch(_))
                    | TrainerError::Internal(_) => synopsis_common::internal_message(&e),
                    _ => synopsis_common::bounded_message(&e.to_string()),
                };
                (RunState::Failed, message)
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(panic = %what, "run panicked");
                (
                    RunState::Failed,
                    synopsis_common::internal_message(&format!("the run panicked: {what}")),
                )
            }
        };
        self.metrics.tokens_per_second.set(0.0);
        ctx.run.emit(train_event::Event::Finished(RunFinished {
            state: state as i32,
            message,
            last_checkpoint_id: last,
        }));
        tracing::info!(state = ?state, "run finished");
        self.release_after(&ctx.run.id);
    }

    /// Asks a run to checkpoint and stop; answers its state (a finished run's final state).
    pub fn stop(&self, run_id: &str) -> Result<State> {
        ids::validate_run_id("run_id", run_id)?;
        let run = self
            .runs
            .get(run_id)
            .ok_or_else(|| TrainerError::NotFound(format!("no run {run_id}")))?;
        let state = run.state();
        if !state.is_terminal() {
            run.stop_signal().request(StopReason::Requested);
            tracing::info!(run_id, "stop requested");
        }
        Ok(state)
    }

    /// Starts nothing new, asks the running run to checkpoint and stop, and waits until it has.
    pub async fn shutdown(&self) {
        self.draining.store(true, Ordering::SeqCst);
        if let Slot::Running(run) = &*lock(&self.slot) {
            tracing::info!(run_id = %run.id, "asking the run to checkpoint before exit");
            run.stop_signal().request(StopReason::Shutdown);
        }
        let mut idle = self.idle.subscribe();
        // The sender lives in `self`, so this only ends when the device is idle.
        let _ = idle.wait_for(|idle| *idle).await;
    }
}
