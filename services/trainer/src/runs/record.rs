//! `runs/<run_id>/run.json`: what a run was asked to do and where it stands. Rewritten
//! atomically (temp file, fsync, rename) so a crash leaves the old or the new record, never
//! half of one; that is what lets a restarted trainer list every run.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use synopsis_proto::v1::{RunState, RunSummary};

use crate::error::{Result, TrainerError};

/// Name of the record file inside a run directory.
pub const RUN_FILE: &str = "run.json";

/// A run's state as stored on disk (lowercase words, stable across proto renumbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Queued,
    Running,
    Completed,
    Stopped,
    Failed,
}

impl State {
    pub fn is_terminal(self) -> bool {
        matches!(self, State::Completed | State::Stopped | State::Failed)
    }

    pub fn to_proto(self) -> RunState {
        match self {
            State::Queued => RunState::Queued,
            State::Running => RunState::Running,
            State::Completed => RunState::Completed,
            State::Stopped => RunState::Stopped,
            State::Failed => RunState::Failed,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Completed => "completed",
            State::Stopped => "stopped",
            State::Failed => "failed",
        }
    }

    pub const ALL: [State; 5] = [
        State::Queued,
        State::Running,
        State::Completed,
        State::Stopped,
        State::Failed,
    ];
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: String,
    #[serde(default)]
    pub run_name: String,
    pub state: State,
    /// Unix seconds.
    pub created: i64,
    #[serde(default)]
    pub finished: Option<i64>,
    /// The request with every default filled in (the `started` event's JSON).
    #[serde(default)]
    pub config: serde_json::Value,
    #[serde(default)]
    pub device: String,
    #[serde(default)]
    pub step: u64,
    #[serde(default)]
    pub total_steps: u64,
    #[serde(default)]
    pub last_val_loss: Option<f64>,
    #[serde(default)]
    pub last_checkpoint_id: Option<String>,
    #[serde(default)]
    pub resumed_from: Option<String>,
    #[serde(default)]
    pub message: String,
}

impl RunRecord {
    pub fn summary(&self) -> RunSummary {
        RunSummary {
            run_id: self.run_id.clone(),
            run_name: self.run_name.clone(),
            state: self.state.to_proto() as i32,
            created: self.created,
            step: self.step,
            total_steps: self.total_steps,
            last_val_loss: self.last_val_loss.unwrap_or(f64::NAN),
            last_checkpoint_id: self.last_checkpoint_id.clone().unwrap_or_default(),
            message: self.message.clone(),
        }
    }

    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(RUN_FILE);
        let bytes = fs::read(&path).map_err(|e| TrainerError::io(&path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            TrainerError::io(
                &path,
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        })
    }

    /// Replaces `dir/run.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(RUN_FILE);
        let tmp = dir.join(format!(".{RUN_FILE}.tmp"));
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| TrainerError::Internal(format!("cannot encode run record: {e}")))?;
        let write = || -> std::io::Result<()> {
            let mut file = File::create(&tmp)?;
            file.write_all(&json)?;
            file.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(dir)?.sync_all()
        };
        write().map_err(|e| TrainerError::io(&path, e))
    }
}
