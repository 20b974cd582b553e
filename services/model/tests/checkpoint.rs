//! Checkpoints exist complete or not at all, and any damage is caught before loading, naming
//! the damaged file.

use std::fs;
use std::path::{Path, PathBuf};

use synopsis_model::checkpoint::{
    is_complete_checkpoint, list_checkpoints, load_model_dir, remove_stale_temp_dirs, sha256_file,
    verify_checkpoint, verify_for_serving, write_checkpoint, MANIFEST,
};
use synopsis_model::{Manifest, ModelError, WeightDtype};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
/// sha256("abc"), the FIPS 180-2 test vector.
const SHA_ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

fn manifest(id: &str, step: u64) -> Manifest {
    let mut m = Manifest::new(id, "run-1", 2, step, "epoch");
    m.val_loss = Some(3.25);
    m.metadata = serde_json::json!({ "template": "{title}: {synopsis}" });
    m
}

fn write_sample(dir: &Path) -> Manifest {
    write_checkpoint(dir, manifest("ckpt-1", 100), |tmp| {
        fs::write(tmp.join("weights.bin"), b"abc").unwrap();
        fs::create_dir(tmp.join("extra")).unwrap();
        fs::write(tmp.join("extra/notes.txt"), vec![7u8; 5000]).unwrap();
        Ok(())
    })
    .unwrap()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn written_checkpoint_verifies_and_lists_every_file() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("run-1/ckpt-1");
    let written = write_sample(&dir);

    assert_eq!(written.files.len(), 2);
    assert_eq!(written.files["weights.bin"].sha256, SHA_ABC);
    assert_eq!(written.files["weights.bin"].size, 3);
    assert_eq!(written.files["extra/notes.txt"].size, 5000);
    assert_eq!(written.format, 1);

    let verified = verify_checkpoint(&dir).unwrap();
    assert_eq!(verified, written);
    assert_eq!(verified.metadata["template"], "{title}: {synopsis}");
    assert!(is_complete_checkpoint(&dir));
    // Only the final directory is left: no temp sibling.
    assert_eq!(entries(&root.path().join("run-1")), vec!["ckpt-1"]);
    assert_eq!(entries(&dir), vec!["extra", MANIFEST, "weights.bin"]);

    let listed = list_checkpoints(root.path());
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0, dir);

    // A second write to the same place is refused rather than merged.
    let again = write_checkpoint(&dir, manifest("ckpt-1", 100), |_| Ok(()));
    assert!(again.is_err());
}

fn assert_names(path: &Path, file: &str) {
    assert!(
        path.ends_with(file),
        "{} does not name {file}",
        path.display()
    );
}

#[test]
fn flipped_byte_is_a_hash_mismatch_naming_the_file() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("c");
    write_sample(&dir);
    fs::write(dir.join("weights.bin"), b"abd").unwrap();
    match verify_checkpoint(&dir).unwrap_err() {
        ModelError::HashMismatch {
            path,
            expected,
            actual,
        } => {
            assert_names(&path, "weights.bin");
            assert_eq!(expected, SHA_ABC);
            assert_eq!(actual, sha256_file(&dir.join("weights.bin")).unwrap());
        }
        other => panic!("expected HashMismatch, got {other}"),
    }
    // Size is unchanged, so the cheap check still passes: only hashes catch this.
    assert!(is_complete_checkpoint(&dir));
}

#[test]
fn truncated_file_is_a_size_mismatch() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("c");
    write_sample(&dir);
    fs::write(dir.join("extra/notes.txt"), vec![7u8; 4000]).unwrap();
    match verify_checkpoint(&dir).unwrap_err() {
        ModelError::SizeMismatch {
            path,
            expected,
            actual,
        } => {
            assert_names(&path, "extra/notes.txt");
            assert_eq!((expected, actual), (5000, 4000));
        }
        other => panic!("expected SizeMismatch, got {other}"),
    }
    assert!(!is_complete_checkpoint(&dir));
}

#[test]
fn missing_manifest_or_file_is_reported() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("c");
    write_sample(&dir);
    fs::remove_file(dir.join("weights.bin")).unwrap();
    match verify_checkpoint(&dir).unwrap_err() {
        ModelError::MissingFile { path } => assert_names(&path, "weights.bin"),
        other => panic!("expected MissingFile, got {other}"),
    }
    fs::remove_file(dir.join(MANIFEST)).unwrap();
    match verify_checkpoint(&dir).unwrap_err() {
        ModelError::MissingManifest { dir: reported } => assert_eq!(reported, dir),
        other => panic!("expected MissingManifest, got {other}"),
    }
    assert!(!is_complete_checkpoint(&dir));
}

#[test]
fn manifest_cannot_point_outside_the_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("c");
    let mut m = write_sample(&dir);
    let entry = m.files["weights.bin"].clone();
    m.files.insert("../outside".into(), entry);
    fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
    assert!(matches!(
        verify_checkpoint(&dir),
        Err(ModelError::Format { .. })
    ));
}

#[test]
fn failed_writer_leaves_nothing_behind() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ckpt");
    let err = write_checkpoint(&dir, manifest("ckpt", 1), |tmp| {
        fs::write(tmp.join("model.safetensors"), b"half written").unwrap();
        Err(ModelError::Invalid("disk full".into()))
    })
    .unwrap_err();
    assert_eq!(err.to_string(), "disk full");
    assert!(!dir.exists());
    assert!(
        entries(root.path()).is_empty(),
        "{:?}",
        entries(root.path())
    );
}

#[test]
fn stale_temp_dirs_are_removed_and_checkpoints_kept() {
    let root = tempfile::tempdir().unwrap();
    let stale: Vec<PathBuf> = [".tmp-a-12-34", "run-1/.tmp-ckpt-2-56-78"]
        .iter()
        .map(|p| root.path().join(p))
        .collect();
    for dir in &stale {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("model.safetensors"), b"partial").unwrap();
    }
    write_sample(&root.path().join("run-1/ckpt-1"));
    fs::write(root.path().join(".tmp-not-a-dir"), b"x").unwrap();

    let mut removed = remove_stale_temp_dirs(root.path());
    removed.sort();
    assert_eq!(removed, stale);
    assert!(stale.iter().all(|d| !d.exists()));
    assert_eq!(entries(&root.path().join("run-1")), vec!["ckpt-1"]);
    assert!(root.path().join(".tmp-not-a-dir").exists());
    assert!(verify_checkpoint(&root.path().join("run-1/ckpt-1")).is_ok());
}

/// A plain Hugging Face GPT-2 directory (fixture weights + GPT-2 tokenizer), copied into `dir`.
fn copy_hf_files(dir: &Path) {
    let fixture = Path::new(FIXTURES).join("fake_gpt2");
    fs::create_dir_all(dir).unwrap();
    for name in ["config.json", "model.safetensors"] {
        fs::copy(fixture.join(name), dir.join(name)).unwrap();
    }
    fs::copy(
        Path::new(FIXTURES).join("gpt2_tokenizer/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
}

#[test]
fn loads_plain_hf_dirs_and_verified_checkpoints() {
    let root = tempfile::tempdir().unwrap();
    let plain = root.path().join("plain");
    copy_hf_files(&plain);
    let loaded = load_model_dir(&plain, tch::Device::Cpu, WeightDtype::F32).unwrap();
    assert!(loaded.manifest.is_none());
    assert_eq!(loaded.files.len(), 3);
    assert_eq!(
        loaded.files["model.safetensors"].sha256,
        sha256_file(&plain.join("model.safetensors")).unwrap()
    );
    assert_eq!(loaded.tokenizer.eos_id(), 50256);
    assert_eq!(loaded.model.config().n_embd, 2);

    let ckpt = root.path().join("run/ckpt");
    write_checkpoint(&ckpt, manifest("ckpt", 7), |tmp| {
        copy_hf_files(tmp);
        Ok(())
    })
    .unwrap();
    let loaded = load_model_dir(&ckpt, tch::Device::Cpu, WeightDtype::F32).unwrap();
    assert_eq!(loaded.manifest.as_ref().map(|m| m.step), Some(7));
    assert_eq!(loaded.metadata["template"], "{title}: {synopsis}");

    // Damage is caught before any weight is read.
    let weights = ckpt.join("model.safetensors");
    let mut bytes = fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    fs::write(&weights, bytes).unwrap();
    let err = load_model_dir(&ckpt, tch::Device::Cpu, WeightDtype::F32).err();
    assert!(
        matches!(err, Some(ModelError::HashMismatch { .. })),
        "{err:?}"
    );
}

#[test]
fn serving_needs_the_model_files_but_not_the_optimizer_state() {
    let root = tempfile::tempdir().unwrap();
    let ckpt = root.path().join("run/ckpt");
    write_checkpoint(&ckpt, manifest("ckpt", 9), |tmp| {
        copy_hf_files(tmp);
        fs::write(tmp.join("optimizer.safetensors"), b"moments").unwrap();
        Ok(())
    })
    .unwrap();
    let optimizer = ckpt.join("optimizer.safetensors");

    // A damaged optimizer file is still refused when present...
    fs::write(&optimizer, b"momentz").unwrap();
    let err = verify_for_serving(&ckpt).err();
    assert!(
        matches!(err, Some(ModelError::HashMismatch { .. })),
        "{err:?}"
    );
    // ...but an absent one (a checkpoint fetched for serving) only stops a resume.
    fs::remove_file(&optimizer).unwrap();
    assert!(verify_for_serving(&ckpt).is_ok());
    assert!(matches!(
        verify_checkpoint(&ckpt),
        Err(ModelError::MissingFile { .. })
    ));
    let loaded = load_model_dir(&ckpt, tch::Device::Cpu, WeightDtype::F32).unwrap();
    assert_eq!(loaded.manifest.as_ref().map(|m| m.step), Some(9));

    // A serving file is never optional.
    fs::remove_file(ckpt.join("tokenizer.json")).unwrap();
    let err = load_model_dir(&ckpt, tch::Device::Cpu, WeightDtype::F32).err();
    assert!(
        matches!(err, Some(ModelError::MissingFile { .. })),
        "{err:?}"
    );
}
