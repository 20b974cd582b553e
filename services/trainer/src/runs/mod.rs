//! Runs: their records and event logs on disk, and the live side of a running one (the
//! broadcast its followers subscribe to, the flag that asks it to stop).
//!
//! An event is written to the log before it is broadcast. A follower subscribes first and
//! reads the log second, so every event is in one or the other (or both, and duplicates are
//! dropped by `seq`): that is how `WatchRun` replays then follows without a gap.

mod events;
mod record;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use synopsis_proto::v1::{train_event, RunFinished, TrainEvent};
use tokio::sync::broadcast;

pub use events::{kind_of, read_events, EVENTS_FILE};
pub use record::{RunRecord, State, RUN_FILE};

use crate::error::{Result, TrainerError};
use crate::ids::{self, unix_seconds, unix_seconds_f64};
use crate::layout::Layout;

/// Events a slow follower may fall behind before it re-reads the log to catch up.
const BROADCAST_CAPACITY: usize = 1024;

/// Message of a run found RUNNING by a trainer that starts: its process died mid-run.
pub const RESTARTED_MESSAGE: &str = "trainer restarted";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind, still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why a run is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// StopRun: checkpoint, then STOPPED.
    Requested,
    /// The trainer is shutting down: checkpoint, then STOPPED, then the process exits.
    Shutdown,
}

/// Set by handlers, polled by the training thread between optimizer steps.
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<AtomicU8>);

impl StopSignal {
    pub fn request(&self, reason: StopReason) {
        let value = match reason {
            StopReason::Requested => 1,
            StopReason::Shutdown => 2,
        };
        // A shutdown outranks a plain stop (it decides the checkpoint's reason).
        self.0.fetch_max(value, Ordering::SeqCst);
    }

    pub fn get(&self) -> Option<StopReason> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            1 => Some(StopReason::Requested),
            _ => Some(StopReason::Shutdown),
        }
    }
}

/// One run: its directory, record and event log, and the live broadcast.
#[derive(Debug)]
pub struct Run {
    pub id: String,
    dir: PathBuf,
    record: Mutex<RunRecord>,
    log: Mutex<Log>,
    tx: broadcast::Sender<TrainEvent>,
    stop: StopSignal,
}

#[derive(Debug)]
struct Log {
    writer: Option<events::EventWriter>,
    next_seq: u64,
}

impl Run {
    fn open(dir: PathBuf, record: RunRecord, next_seq: u64) -> Self {
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        Run {
            id: record.run_id.clone(),
            dir,
            record: Mutex::new(record),
            log: Mutex::new(Log {
                writer: None,
                next_seq,
            }),
            tx,
            stop: StopSignal::default(),
        }
    }

    pub fn record(&self) -> RunRecord {
        lock(&self.record).clone()
    }

    pub fn state(&self) -> State {
        lock(&self.record).state
    }

    pub fn stop_signal(&self) -> &StopSignal {
        &self.stop
    }

    /// Changes the record and rewrites `run.json`.
    pub fn update(&self, change: impl FnOnce(&mut RunRecord)) -> Result<()> {
        let mut record = lock(&self.record);
        change(&mut record);
        record.write(&self.dir)
    }

    /// Receives every event emitted from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<TrainEvent> {
        self.tx.subscribe()
    }

    /// The seq the next event will get: the number of events emitted so far.
    pub fn next_seq(&self) -> u64 {
        lock(&self.log).next_seq
    }

    /// The persisted events with `seq >= from_seq`.
    pub fn replay(&self, from_seq: u64) -> Result<Vec<TrainEvent>> {
        read_events(&self.dir, from_seq)
    }

    /// Stamps `event` with the run id, the next seq and the time, appends it to the log,
    /// folds it into the record, then broadcasts it. Logging failures are reported and the
    /// run goes on: losing history is better than losing the training.
    pub fn emit(&self, event: train_event::Event) -> TrainEvent {
        let mut log = lock(&self.log);
        let event = TrainEvent {
            run_id: self.id.clone(),
            seq: log.next_seq,
            time: unix_seconds_f64(),
            event: Some(event),
        };
        log.next_seq += 1;
        if log.writer.is_none() {
            match events::EventWriter::open(&self.dir) {
                Ok(w) => log.writer = Some(w),
                Err(e) => tracing::error!(run_id = %self.id, error = %e, "cannot open event log"),
            }
        }
        if let Some(writer) = log.writer.as_mut() {
            if let Err(e) = writer.append(&event) {
                tracing::error!(run_id = %self.id, error = %e, "cannot append event");
            }
        }
        let finished = matches!(event.event, Some(train_event::Event::Finished(_)));
        if finished {
            if let Some(writer) = log.writer.take() {
                if let Err(e) = writer.sync() {
                    tracing::warn!(run_id = %self.id, error = %e, "cannot sync event log");
                }
            }
        }
        if let Err(e) = self.fold(&event) {
            tracing::error!(run_id = %self.id, error = %e, "cannot update run record");
        }
        // Still under the log lock, so broadcasts keep seq order.
        let _ = self.tx.send(event.clone());
        event
    }

    /// Updates the record from an event; writes `run.json` when something durable changed.
    fn fold(&self, event: &TrainEvent) -> Result<()> {
        let mut record = lock(&self.record);
        let persist = match &event.event {
            Some(train_event::Event::Started(s)) => {
                record.state = State::Running;
                record.device = s.device.clone();
                record.total_steps = s.total_steps;
                record.step = s.start_step;
                record.config = serde_json::from_str(&s.resolved_config_json)
                    .unwrap_or(serde_json::Value::Null);
                true
            }
            Some(train_event::Event::Step(s)) => {
                record.step = s.step;
                record.total_steps = s.total_steps;
                false
            }
            Some(train_event::Event::Epoch(e)) => {
                record.step = e.step;
                record.last_val_loss = e.val_loss.is_finite().then_some(e.val_loss);
                true
            }
            Some(train_event::Event::Checkpoint(c)) => {
                record.last_checkpoint_id = Some(c.checkpoint_id.clone());
                // Step events are rate-limited, so the last one may be older than the steps a
                // checkpoint holds (a stop lands between two): the run is at least that far.
                record.step = record.step.max(c.step);
                true
            }
            Some(train_event::Event::Sample(_)) | None => false,
            Some(train_event::Event::Finished(f)) => {
                record.state = match f.state() {
                    synopsis_proto::v1::RunState::Completed => State::Completed,
                    synopsis_proto::v1::RunState::Stopped => State::Stopped,
                    _ => State::Failed,
                };
                record.message = f.message.clone();
                record.finished = Some(unix_seconds());
                true
            }
        };
        if persist {
            record.write(&self.dir)?;
        }
        Ok(())
    }
}

/// The runs by id, shared with whatever reads them live (the metrics).
pub type RunTable = Arc<Mutex<BTreeMap<String, Arc<Run>>>>;

/// The current state of every run in `table`.
pub fn states(table: &RunTable) -> Vec<State> {
    lock(table).values().map(|r| r.state()).collect()
}

/// Every run of this trainer, past and present.
#[derive(Debug)]
pub struct Runs {
    layout: Layout,
    runs: RunTable,
}

impl Runs {
    /// Loads every run under `runs/`. A run still RUNNING or QUEUED on disk belonged to a
    /// process that died: it is marked FAILED ("trainer restarted", naming its last
    /// checkpoint to resume from) and its log gets a `finished` event, so replays end.
    pub fn load(layout: &Layout) -> Result<Self> {
        let dir = layout.runs_dir();
        let mut runs = BTreeMap::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| TrainerError::io(&dir, e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            if ids::validate_run_id("run_id", &name).is_err() || !path.join(RUN_FILE).is_file() {
                continue;
            }
            let record = match RunRecord::read(&path) {
                Ok(r) if r.run_id == name => r,
                Ok(_) | Err(_) => {
                    tracing::warn!(dir = %path.display(), "skipping a run with an unreadable run.json");
                    continue;
                }
            };
            let next_seq = events::count_events(&path)?;
            let run = Run::open(path.clone(), record, next_seq);
            if !run.state().is_terminal() {
                let last = run.record().last_checkpoint_id;
                let message = match &last {
                    Some(id) => format!("{RESTARTED_MESSAGE}; resume from checkpoint {id}"),
                    None => RESTARTED_MESSAGE.to_string(),
                };
                tracing::warn!(run_id = %name, %message, "run interrupted by a restart");
                run.emit(train_event::Event::Finished(RunFinished {
                    state: synopsis_proto::v1::RunState::Failed as i32,
                    message,
                    last_checkpoint_id: last.unwrap_or_default(),
                }));
            }
            runs.insert(name, Arc::new(run));
        }
        Ok(Runs {
            layout: layout.clone(),
            runs: Arc::new(Mutex::new(runs)),
        })
    }

    /// Creates the directory and record of a new run and registers it.
    pub fn create(&self, record: RunRecord) -> Result<Arc<Run>> {
        let dir = self.layout.run_dir(&record.run_id);
        std::fs::create_dir_all(&dir).map_err(|e| TrainerError::io(&dir, e))?;
        record.write(&dir)?;
        let run = Arc::new(Run::open(dir, record, 0));
        lock(&self.runs).insert(run.id.clone(), run.clone());
        Ok(run)
    }

    pub fn table(&self) -> RunTable {
        self.runs.clone()
    }

    pub fn get(&self, run_id: &str) -> Option<Arc<Run>> {
        lock(&self.runs).get(run_id).cloned()
    }

    /// Every run, oldest first.
    pub fn list(&self) -> Vec<RunRecord> {
        let mut records: Vec<RunRecord> = lock(&self.runs).values().map(|r| r.record()).collect();
        records.sort_by(|a, b| (a.created, &a.run_id).cmp(&(b.created, &b.run_id)));
        records
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use synopsis_proto::v1::{CheckpointInfo, StepEvent};

    #[test]
    fn a_checkpoint_past_the_last_step_event_moves_the_run_to_its_step() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::new(root.path());
        std::fs::create_dir_all(layout.runs_dir()).unwrap();
        let record = RunRecord {
            run_id: "run-20261130-000000-0001".into(),
            run_name: String::new(),
            state: State::Running,
            created: 0,
            finished: None,
            config: serde_json::Value::Null,
            device: "cpu".into(),
            step: 0,
            total_steps: 100,
            last_val_loss: None,
            last_checkpoint_id: None,
            resumed_from: None,
            message: String::new(),
        };
        let runs = Runs::load(&layout).unwrap();
        let run = runs.create(record).unwrap();
        run.emit(train_event::Event::Step(StepEvent {
            step: 13,
            total_steps: 100,
            ..Default::default()
        }));
        run.emit(train_event::Event::Checkpoint(CheckpointInfo {
            checkpoint_id: "run-20261130-000000-0001/epoch-0000-step-000014".into(),
            step: 14,
            ..Default::default()
        }));
        assert_eq!(run.record().step, 14);
        // Persisted too: a restarted trainer reads the same.
        let reloaded = Runs::load(&layout).unwrap();
        let again = reloaded.get("run-20261130-000000-0001").unwrap();
        assert_eq!(again.record().step, 14);
        // An older checkpoint (a resumed run's first) does not move it back.
        run.emit(train_event::Event::Checkpoint(CheckpointInfo {
            checkpoint_id: "run-20261130-000000-0001/epoch-0000-step-000010".into(),
            step: 10,
            ..Default::default()
        }));
        assert_eq!(run.record().step, 14);
    }
}
