//! Damaged checkpoints offered to a serving generator: a flipped byte, a truncated file, a
//! config that does not match the tensors, NaN weights. Each is refused with its reason in
//! ModelInfo and in the metrics, and the live model keeps serving.

mod e2e;

use std::path::Path;

use e2e::{expect_code, generate, generate_request, metric_of, Generator};
use sha2::{Digest, Sha256};
use synopsis_proto::v1 as pb;

/// Rewrites the manifest: a new checkpoint id, and fresh hashes for `rehash` (files changed
/// on purpose whose manifest entry must still match, so only the intended defect remains).
fn rewrite_manifest(dir: &Path, id: &str, rehash: &[&str]) {
    let path = dir.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    manifest["checkpoint_id"] = id.into();
    for file in rehash {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        manifest["files"][*file]["sha256"] = hex::encode(Sha256::digest(&bytes)).into();
        manifest["files"][*file]["size"] = (bytes.len() as u64).into();
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
}

/// Sets every f32 of the first tensor in a safetensors file to NaN.
fn poison_with_nan(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let (name, tensor) = header
        .as_object()
        .unwrap()
        .iter()
        .find(|(name, t)| *name != "__metadata__" && t["dtype"] == "F32")
        .expect("an f32 tensor");
    let start = 8 + header_len + tensor["data_offsets"][0].as_u64().unwrap() as usize;
    let end = 8 + header_len + tensor["data_offsets"][1].as_u64().unwrap() as usize;
    for value in bytes[start..end].chunks_exact_mut(4) {
        value.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    assert!(end > start, "{name} is empty");
    std::fs::write(file, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_checkpoints_are_refused_and_the_live_one_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (good, good_dir) = e2e::trained_model(dir.path()).await;
    let generator = Generator::start(&[
        "--model".into(),
        good_dir.display().to_string(),
        "--load-root".into(),
        dir.path().display().to_string(),
    ])
    .await;
    let mut client = generator.client().await;

    type Damage = fn(&Path);
    let cases: [(&str, Damage, &str); 4] = [
        (
            "flipped-byte",
            |d| {
                let file = d.join("model.safetensors");
                let mut bytes = std::fs::read(&file).unwrap();
                let middle = bytes.len() / 2;
                bytes[middle] ^= 0x40;
                std::fs::write(&file, bytes).unwrap();
                rewrite_manifest(d, "bad/flipped-byte", &[]);
            },
            "sha256",
        ),
        (
            "truncated",
            |d| {
                let file = d.join("model.safetensors");
                let len = std::fs::metadata(&file).unwrap().len();
                let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
                f.set_len(len / 2).unwrap();
                rewrite_manifest(d, "bad/truncated", &[]);
            },
            "size",
        ),
        (
            "config-mismatch",
            |d| {
                let file = d.join("config.json");
                let mut config: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
                config["n_embd"] = 128.into();
                std::fs::write(&file, serde_json::to_vec(&config).unwrap()).unwrap();
                rewrite_manifest(d, "bad/config-mismatch", &["config.json"]);
            },
            "shape",
        ),
        (
            "nan-weights",
            |d| {
                poison_with_nan(&d.join("model.safetensors"));
                rewrite_manifest(d, "bad/nan-weights", &["model.safetensors"]);
            },
            "finite",
        ),
    ];

    for (i, (name, damage, why)) in cases.iter().enumerate() {
        let bad = dir.path().join("bad").join(name);
        e2e::copy_dir(&good_dir, &bad);
        damage(&bad);
        let loaded = client
            .load_checkpoint(pb::LoadCheckpointRequest {
                source: Some(pb::load_checkpoint_request::Source::Path(
                    bad.display().to_string(),
                )),
            })
            .await;
        let message = expect_code(loaded, tonic::Code::FailedPrecondition, name);
        assert!(message.contains(why), "{name}: {message}");

        let info = client
            .model_info(pb::ModelInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.live_checkpoint_id, good.checkpoint_id, "{name}");
        assert_eq!(info.state, pb::ServingState::Serving as i32);
        let refused = info
            .refused
            .iter()
            .find(|r| r.checkpoint_id.contains(name) || r.reason.contains(name))
            .unwrap_or_else(|| panic!("{name} not in refused: {:?}", info.refused));
        assert!(refused.reason.contains(why), "{name}: {refused:?}");
        assert!(
            info.resident.iter().all(|r| !r
                .info
                .as_ref()
                .unwrap()
                .checkpoint_id
                .starts_with("bad/")),
            "{name} became resident: {:?}",
            info.resident
        );
        assert_eq!(
            metric_of(generator.metrics, "synopsis_generator_swap_failures_total"),
            (i + 1) as f64
        );

        let (served_by, done) = generate(&mut client, generate_request(8)).await.unwrap();
        assert_eq!(served_by, good.checkpoint_id, "{name}");
        assert_eq!(done.len(), 1);
    }
}
