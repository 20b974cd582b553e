//! Follows a checkpoint root on a shared volume: every interval the newest complete checkpoint
//! (by manifest `created`, then step) that is newer than the one this watcher installed is
//! loaded and made live. Each directory is tried once; a refused one is never retried, and a
//! half-copied one (file missing or short) is looked at again a few times before being refused.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use synopsis_model::checkpoint::list_checkpoints;
use tracing::{debug, info};

use crate::state::State;
use crate::swap;

/// Polls of a half-copied checkpoint before it is refused.
const INCOMPLETE_TRIES: u32 = 10;

/// A checkpoint directory seen in the root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub dir: PathBuf,
    pub checkpoint_id: String,
    pub created: i64,
    pub step: u64,
}

impl Candidate {
    fn order(&self) -> (i64, u64, &Path) {
        (self.created, self.step, &self.dir)
    }
}

/// Checkpoint directories (with a readable manifest) in `root` and one level below, oldest
/// first; `root` itself when it is a checkpoint.
pub fn scan(root: &Path) -> Vec<Candidate> {
    let mut found: Vec<Candidate> = list_checkpoints(root)
        .into_iter()
        .map(|(dir, m)| Candidate {
            dir,
            checkpoint_id: m.checkpoint_id,
            created: m.created,
            step: m.step,
        })
        .collect();
    if let Ok(m) = synopsis_model::Manifest::read(root) {
        found.push(Candidate {
            dir: root.to_path_buf(),
            checkpoint_id: m.checkpoint_id,
            created: m.created,
            step: m.step,
        });
    }
    found.sort_by(|a, b| a.order().cmp(&b.order()));
    found
}

/// What the watcher remembers between polls.
#[derive(Default)]
pub struct Watcher {
    tried: HashSet<PathBuf>,
    incomplete: HashMap<PathBuf, u32>,
    installed: Option<Candidate>,
}

impl Watcher {
    /// The checkpoint to try now: the newest one not tried yet that is newer than the one
    /// installed from this root.
    pub fn next(&self, candidates: &[Candidate]) -> Option<Candidate> {
        candidates
            .iter()
            .rev()
            .filter(|c| !self.tried.contains(&c.dir))
            .find(|c| {
                self.installed
                    .as_ref()
                    .is_none_or(|i| c.order() > i.order())
            })
            .cloned()
    }

    /// One poll: install the next checkpoint, if there is one.
    pub async fn poll(&mut self, state: &Arc<State>, root: &Path) {
        let root_owned = root.to_path_buf();
        let candidates = tokio::task::spawn_blocking(move || scan(&root_owned))
            .await
            .unwrap_or_default();
        let Some(c) = self.next(&candidates) else {
            return;
        };
        let tries = self.incomplete.get(&c.dir).copied().unwrap_or(0) + 1;
        let last_try = tries >= INCOMPLETE_TRIES;
        let source = format!("watch-dir:{}", c.dir.display());
        match swap::install_dir(state, &c.dir, &source, last_try).await {
            Ok(_) => {
                self.tried.insert(c.dir.clone());
                self.incomplete.remove(&c.dir);
                self.installed = Some(c);
            }
            Err(e) if e.is_incomplete() && !last_try => {
                debug!(dir = %c.dir.display(), tries, "checkpoint still incomplete");
                self.incomplete.insert(c.dir.clone(), tries);
            }
            Err(_) => {
                self.tried.insert(c.dir.clone());
                self.incomplete.remove(&c.dir);
            }
        }
    }
}

/// Polls `root` every `interval` until the task is dropped.
pub async fn watch(state: Arc<State>, root: PathBuf, interval: Duration) {
    info!(root = %root.display(), "following checkpoints in a directory");
    let mut watcher = Watcher::default();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        watcher.poll(&state, &root).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(name: &str, created: i64, step: u64) -> Candidate {
        Candidate {
            dir: PathBuf::from(name),
            checkpoint_id: name.into(),
            created,
            step,
        }
    }

    #[test]
    fn picks_the_newest_untried_checkpoint_newer_than_the_installed_one() {
        let cands = vec![cand("a", 1, 10), cand("b", 2, 20), cand("c", 2, 30)];
        let mut w = Watcher::default();
        assert_eq!(w.next(&cands).unwrap().checkpoint_id, "c");
        w.tried.insert(PathBuf::from("c"));
        assert_eq!(w.next(&cands).unwrap().checkpoint_id, "b");
        w.tried.insert(PathBuf::from("b"));
        w.installed = Some(cand("b", 2, 20));
        // "a" is older than what is live: never served behind the user's back.
        assert_eq!(w.next(&cands), None);
    }
}
