//! Broken weight files are clear errors that name the file, never panics.

mod support;

use std::path::Path;
use support::*;
use synopsis_model::{Gpt2, Gpt2Config, ModelError, WeightDtype};
use tch::Device;

fn fixture_config() -> Gpt2Config {
    Gpt2Config::from_file(&fixture("fake_gpt2/config.json")).unwrap()
}

fn load(config: &Gpt2Config, weights: &Path) -> Result<Gpt2, ModelError> {
    Gpt2::load(config, weights, Device::Cpu, WeightDtype::F32)
}

#[test]
fn truncated_safetensors_is_a_format_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(fixture("fake_gpt2/model.safetensors")).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = load(&fixture_config(), &weights).unwrap_err();
    assert!(matches!(err, ModelError::Format { .. }), "{err:?}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn config_that_disagrees_with_tensors_names_tensor_and_file() {
    let mut config = fixture_config();
    config.n_embd = 4;
    config.n_head = 1;
    let weights = fixture("fake_gpt2/model.safetensors");
    let err = load(&config, &weights).unwrap_err();
    match &err {
        ModelError::ShapeMismatch { name, .. } => {
            assert!(name.starts_with("transformer."), "{name}")
        }
        other => panic!("expected a shape mismatch, got {other:?}"),
    }
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn config_with_more_layers_than_the_file_reports_the_missing_tensor() {
    let mut config = fixture_config();
    config.n_layer = 2;
    let err = load(&config, &fixture("fake_gpt2/model.safetensors")).unwrap_err();
    match err {
        ModelError::MissingTensor { name, .. } => {
            assert!(name.starts_with("transformer.h.1."), "{name}")
        }
        other => panic!("expected a missing tensor, got {other:?}"),
    }
}

#[test]
fn missing_weights_file_is_an_io_error_naming_it() {
    let err = load(
        &fixture_config(),
        Path::new("/nonexistent/model.safetensors"),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/model.safetensors"),
        "{err}"
    );
}

#[test]
fn malformed_config_json_is_a_format_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, "{\"n_layer\": 2").unwrap();
    let err = Gpt2Config::from_file(&path).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
    std::fs::write(
        &path,
        r#"{"vocab_size": 10, "n_positions": 8, "n_embd": 6, "n_layer": 1, "n_head": 4}"#,
    )
    .unwrap();
    let err = Gpt2Config::from_file(&path).unwrap_err();
    assert!(err.to_string().contains("multiple of n_head"), "{err}");
}

#[test]
fn bf16_weights_give_logits_close_to_f32() {
    let dir = fixture("fake_gpt2");
    let config = Gpt2Config::from_file(&dir.join("config.json")).unwrap();
    let ids = tch::Tensor::from_slice(&[15496i64, 995, 13]).unsqueeze(0);
    let f32_model = load(&config, &dir.join("model.safetensors")).unwrap();
    let bf16_model = Gpt2::load(
        &config,
        &dir.join("model.safetensors"),
        Device::Cpu,
        WeightDtype::Bf16,
    )
    .unwrap();
    tch::no_grad(|| {
        let a = f32_model.forward(&ids, false);
        let b = bf16_model.forward(&ids, false).to_kind(tch::Kind::Float);
        let scale = a.abs().max().double_value(&[]).max(1e-6);
        let rel = max_abs_diff(&a, &b) / scale;
        assert!(rel < 0.05, "bf16 relative error {rel}");
    });
}
