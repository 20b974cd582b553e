//! Reading and writing Hugging Face GPT-2 `model.safetensors`: tensor names with or without the
//! `transformer.` prefix, Conv1D `[in, out]` layout, no `lm_head.weight` (tied), `format=pt`
//! metadata so `transformers` accepts what we write.

use crate::error::{ModelError, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// Copies every variable of `vs` from the file; any missing tensor or shape that disagrees with
/// the config is an error naming the file and tensor.
/// The one place the model crate maps a file and wraps borrowed bytes in tensors: both are
/// what keeps loading at one copy of the weights.
#[allow(unsafe_code)]
pub(crate) fn load_into(vs: &nn::VarStore, path: &Path) -> Result<()> {
    let handle = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    // Mapped, not read: the weights go from the page cache straight into the model's tensors,
    // so loading never holds a second copy of the file on the heap.
    // SAFETY: checkpoints are written to a temporary directory and renamed into place, never
    // modified where they are read; the map lives only for the copies below.
    let bytes = unsafe { memmap2::Mmap::map(&handle) }.map_err(|e| ModelError::io(path, e))?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| ModelError::format(path, format!("not a valid safetensors file: {e}")))?;
    let mut by_name: HashMap<String, safetensors::tensor::TensorView<'_>> = HashMap::new();
    for (name, view) in file.tensors() {
        let canonical = if name.starts_with("transformer.") || name == "lm_head.weight" {
            name
        } else {
            format!("transformer.{name}")
        };
        by_name.insert(canonical, view);
    }
    let mut vars = vs.variables();
    let mut seen = HashSet::new();
    tch::no_grad(|| -> Result<()> {
        for (name, var) in vars.iter_mut() {
            let view = by_name.get(name).ok_or_else(|| ModelError::MissingTensor {
                path: path.to_path_buf(),
                name: name.clone(),
            })?;
            let found: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if found != var.size() {
                return Err(ModelError::ShapeMismatch {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    expected: var.size(),
                    found,
                });
            }
            let kind = match view.dtype() {
                Dtype::F32 => Kind::Float,
                Dtype::F16 => Kind::Half,
                Dtype::BF16 => Kind::BFloat16,
                Dtype::F64 => Kind::Double,
                other => {
                    return Err(ModelError::format(
                        path,
                        format!("tensor {name} has unsupported dtype {other:?}"),
                    ))
                }
            };
            let data = view.data();
            let numel: i64 = found.iter().product();
            if data.len() as i64 != numel * kind.elt_size_in_bytes() as i64 {
                return Err(ModelError::format(
                    path,
                    format!(
                        "tensor {name} holds {} bytes, its shape {found:?} needs {}",
                        data.len(),
                        numel * kind.elt_size_in_bytes() as i64
                    ),
                ));
            }
            let source = if (data.as_ptr() as usize).is_multiple_of(kind.elt_size_in_bytes()) {
                // SAFETY: `data` is a live, aligned slice of exactly `numel` elements of `kind`
                // (checked above) that outlives `source`, which is only read by `copy_`.
                unsafe { Tensor::f_from_blob(data.as_ptr(), &found, &[], kind, Device::Cpu)? }
            } else {
                // An unaligned tensor (possible after odd-sized f16 ones) goes through a copy.
                Tensor::f_from_data_size(data, &found, kind)?
            };
            // copy_ converts dtype and device on the way, with no intermediate tensor.
            var.copy_(&source);
            seen.insert(name.clone());
        }
        Ok(())
    })?;
    Ok(())
}

/// Writes every variable in f32 under its HF name, sorted, with `{"format": "pt"}` metadata.
pub(crate) fn save(vs: &nn::VarStore, path: &Path) -> Result<()> {
    let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    for (name, var) in vs.variables() {
        let t = var
            .detach()
            .to_device(tch::Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous();
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let numel = t.numel();
        let mut data = vec![0f32; numel];
        t.f_copy_data(&mut data, numel)?;
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push((name, bytes, shape));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let views = tensors
        .iter()
        .map(|(name, bytes, shape)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::format(path, e))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize_to_file(views, Some(metadata), path)
        .map_err(|e| ModelError::format(path, format!("cannot write safetensors: {e}")))
}
