//! LoadCheckpoint's checks of what a client names, done before anything is fetched or read:
//! a checkpoint id must look like one (a typo or a path never reaches the trainer, nor the
//! refused list), and a path is held to the load roots before the file system is asked.

use std::path::PathBuf;

use crate::validation::FieldError;

/// `path` made absolute (against the working directory) without touching the file system;
/// `None` if it climbs with `..` (never inside a root) or holds a NUL.
pub fn lexical_absolute(path: &str) -> Option<PathBuf> {
    use std::path::Component;
    if path.contains('\0') {
        return None;
    }
    let path = PathBuf::from(path);
    let base = if path.is_absolute() {
        PathBuf::new()
    } else {
        std::env::current_dir().ok()?
    };
    let mut out = base;
    for component in path.components() {
        match component {
            Component::ParentDir => return None,
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    Some(out)
}

/// Longest checkpoint id accepted: two parts of at most 128 characters and their separator.
const MAX_CHECKPOINT_ID_CHARS: usize = 257;

/// Checks a checkpoint id locally, so a path or a typo never reaches the trainer (and never
/// fills the refused list): `<run_id>/<name>` or `<dir>@<12 hex>`, each part of
/// `[A-Za-z0-9._-]` not starting with '.'.
pub fn check_checkpoint_id(id: &str) -> Result<(), FieldError> {
    let part_ok = |p: &str| {
        // The trainer's own rule for each part (ids.rs): a part it would refuse is a typo.
        !p.is_empty()
            && p.len() <= 128
            && !p.starts_with('.')
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    let ok = id.len() <= MAX_CHECKPOINT_ID_CHARS
        && match (id.split_once('/'), id.split_once('@')) {
            (Some((run, name)), None) => part_ok(run) && part_ok(name),
            (None, Some((dir, digest))) => part_ok(dir) && part_ok(digest),
            _ => false,
        };
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            "checkpoint_id",
            format!(
                "{} is not a checkpoint id (expected <run_id>/<name> as ListCheckpoints or \
                 ModelInfo show it; to load a directory use `path`)",
                synopsis_common::quote(id)
            ),
        ))
    }
}
