//! Writes a FetchCheckpoint stream into the local cache as a checkpoint directory, trusting
//! nothing the trainer sends: file names must be plain names, chunks must be contiguous, each
//! file must match the sha256 on its last chunk and then the manifest. The files land in a
//! temporary directory that is renamed into place only when all of that holds.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};
use synopsis_model::checkpoint::{Manifest, MANIFEST};
use synopsis_proto::v1::CheckpointChunk;
use tokio_stream::{Stream, StreamExt};

/// Files of a checkpoint the generator does not need; the trainer is asked to skip them.
pub const OPTIONAL_FILES: &[&str] = &["optimizer.safetensors"];

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("trainer: {0}")]
    Trainer(#[from] tonic::Status),
    #[error("{0}")]
    Bad(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn bad(m: impl Into<String>) -> DownloadError {
    DownloadError::Bad(m.into())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DownloadError + '_ {
    move |source| DownloadError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The directory name a checkpoint id is cached under: ids such as "run/step-12" contain
/// separators, and a hostile id must not escape the cache.
pub fn sanitise_id(id: &str) -> String {
    let s: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() {
        "checkpoint".into()
    } else {
        s
    }
}

struct OpenFile {
    file: std::fs::File,
    hasher: Sha256,
    written: u64,
    size: u64,
    sha256: Option<String>,
}

/// Receives `chunks` into `<cache_dir>/<sanitised id>` and returns that directory. A directory
/// already there is replaced. Only the manifest's files listed in [`OPTIONAL_FILES`] may be
/// missing.
pub async fn receive<S>(
    mut chunks: S,
    cache_dir: &Path,
    checkpoint_id: &str,
) -> Result<PathBuf, DownloadError>
where
    S: Stream<Item = Result<CheckpointChunk, tonic::Status>> + Unpin,
{
    std::fs::create_dir_all(cache_dir).map_err(io(cache_dir))?;
    let final_dir = cache_dir.join(sanitise_id(checkpoint_id));
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-download-")
        .tempdir_in(cache_dir)
        .map_err(io(cache_dir))?;

    let mut files: BTreeMap<String, OpenFile> = BTreeMap::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        let name = plain_name(&chunk.file)?;
        let path = tmp.path().join(&name);
        if !files.contains_key(&name) {
            let file = std::fs::File::create(&path).map_err(io(&path))?;
            let entry = OpenFile {
                file,
                hasher: Sha256::new(),
                written: 0,
                size: chunk.file_size,
                sha256: None,
            };
            files.insert(name.clone(), entry);
        }
        let Some(f) = files.get_mut(&name) else {
            return Err(bad(format!("{name}: lost track of the file")));
        };
        if f.sha256.is_some() {
            return Err(bad(format!("{name}: data after the file's last chunk")));
        }
        if chunk.offset != f.written {
            return Err(bad(format!(
                "{name}: chunk at offset {} but {} bytes were received",
                chunk.offset, f.written
            )));
        }
        let new_len = f.written + chunk.data.len() as u64;
        if new_len > f.size {
            return Err(bad(format!(
                "{name}: more than the announced {} bytes",
                f.size
            )));
        }
        f.file.write_all(&chunk.data).map_err(io(&path))?;
        f.hasher.update(&chunk.data);
        f.written = new_len;
        if !chunk.sha256.is_empty() {
            if f.written != f.size {
                return Err(bad(format!(
                    "{name}: ended at {} of {} bytes",
                    f.written, f.size
                )));
            }
            let actual = hex::encode(std::mem::take(&mut f.hasher).finalize());
            if !actual.eq_ignore_ascii_case(&chunk.sha256) {
                return Err(bad(format!(
                    "{name}: received bytes hash to {actual}, the trainer says {}",
                    chunk.sha256
                )));
            }
            f.file.sync_all().map_err(io(&path))?;
            f.sha256 = Some(actual);
        }
    }

    for (name, f) in &files {
        if f.sha256.is_none() {
            return Err(bad(format!("{name}: the stream ended before the file did")));
        }
    }
    check_against_manifest(tmp.path(), &files)?;

    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    let tmp_path = tmp.keep();
    if let Err(source) = std::fs::rename(&tmp_path, &final_dir) {
        let _ = std::fs::remove_dir_all(&tmp_path);
        return Err(DownloadError::Io {
            path: final_dir,
            source,
        });
    }
    Ok(final_dir)
}

fn plain_name(file: &str) -> Result<String, DownloadError> {
    let mut parts = Path::new(file).components();
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(n)), None) if !file.starts_with(".tmp") => {
            Ok(n.to_string_lossy().into_owned())
        }
        _ => Err(bad(format!("refusing file name {file:?} from the trainer"))),
    }
}

fn check_against_manifest(
    dir: &Path,
    files: &BTreeMap<String, OpenFile>,
) -> Result<(), DownloadError> {
    let path = dir.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(|_| bad(format!("the trainer sent no {MANIFEST}")))?;
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("{MANIFEST}: {e}")))?;
    for (name, entry) in &manifest.files {
        match files.get(name) {
            Some(f) => {
                let sha = f.sha256.as_deref().unwrap_or_default();
                if f.written != entry.size || !sha.eq_ignore_ascii_case(&entry.sha256) {
                    return Err(bad(format!(
                        "{name}: received {} bytes hashing to {sha}, the manifest says {} bytes \
                         hashing to {}",
                        f.written, entry.size, entry.sha256
                    )));
                }
            }
            None if OPTIONAL_FILES.contains(&name.as_str()) => {}
            None => return Err(bad(format!("{name}: listed in the manifest but not sent"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_cannot_escape_the_cache() {
        assert_eq!(sanitise_id("run-1/step-000120"), "run-1_step-000120");
        assert_eq!(sanitise_id("../../etc"), "_.._etc");
        assert_eq!(sanitise_id(".."), "checkpoint");
        assert_eq!(sanitise_id(""), "checkpoint");
    }

    #[test]
    fn only_plain_file_names_are_accepted() {
        assert!(plain_name("model.safetensors").is_ok());
        assert!(plain_name("../x").is_err());
        assert!(plain_name("/etc/passwd").is_err());
        assert!(plain_name("a/b").is_err());
        assert!(plain_name("").is_err());
        assert!(plain_name(".").is_err());
    }

    fn chunk(file: &str, offset: u64, data: &[u8], size: u64, last: bool) -> CheckpointChunk {
        CheckpointChunk {
            file: file.into(),
            offset,
            data: data.to_vec(),
            sha256: if last {
                hex::encode(Sha256::digest(b"hello world"))
            } else {
                String::new()
            },
            file_size: size,
            info: None,
        }
    }

    #[tokio::test]
    async fn a_wrong_hash_or_a_gap_is_refused_and_leaves_nothing() {
        let cache = tempfile::tempdir().unwrap();
        let gap = vec![
            Ok(chunk("a.txt", 0, b"hello", 11, false)),
            Ok(chunk("a.txt", 6, b"world", 11, true)),
        ];
        let e = receive(tokio_stream::iter(gap), cache.path(), "x")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("offset 6"), "{e}");

        let wrong = vec![
            Ok(chunk("a.txt", 0, b"hello", 11, false)),
            Ok(chunk("a.txt", 5, b" wurld", 11, true)),
        ];
        let e = receive(tokio_stream::iter(wrong), cache.path(), "x")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("hash"), "{e}");

        let no_manifest = vec![
            Ok(chunk("a.txt", 0, b"hello", 11, false)),
            Ok(chunk("a.txt", 5, b" world", 11, true)),
        ];
        let e = receive(tokio_stream::iter(no_manifest), cache.path(), "x")
            .await
            .unwrap_err();
        assert!(e.to_string().contains(MANIFEST), "{e}");
        assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
    }
}
