//! Where everything lives under `--root`. Paths are built here only, from ids already
//! validated by [`crate::ids`], so no request can name a file outside the root.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Layout { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `runs/`: one directory per run with `run.json` and `events.jsonl`.
    pub fn runs_dir(&self) -> PathBuf {
        self.root.join("runs")
    }

    pub fn run_dir(&self, run_id: &str) -> PathBuf {
        self.runs_dir().join(run_id)
    }

    /// `checkpoints/`: `<run_id>/<name>/` per checkpoint, id `<run_id>/<name>`.
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    pub fn checkpoint_dir(&self, run_id: &str, name: &str) -> PathBuf {
        self.checkpoints_dir().join(run_id).join(name)
    }

    /// Creates the directories the trainer writes into.
    pub fn create(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(self.runs_dir())?;
        std::fs::create_dir_all(self.checkpoints_dir())
    }
}
