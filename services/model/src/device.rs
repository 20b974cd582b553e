//! Choosing where tensors live and in which precision: CUDA when present unless told otherwise,
//! and the weight dtypes the generator can serve in.

use crate::cuda_backend::{load_cuda_backend, nvidia_gpu_present};
use crate::error::{ModelError, Result};
use tch::{Device, Kind};

/// Parses `auto` (CUDA:0 when available, else CPU), `cpu`, `cuda` or `cuda:N`.
///
/// `auto` loads libtorch's CUDA backend only on a host with an NVIDIA device node, and `cpu`
/// never does, so CPU nodes do not pay its memory (see [`crate::cuda_backend`]).
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "auto" | "" => {
            if nvidia_gpu_present() {
                if let Err(e) = load_cuda_backend() {
                    tracing::warn!(error = %e, "NVIDIA GPU present but libtorch's CUDA backend did not load; using the CPU");
                }
            }
            Ok(Device::cuda_if_available())
        }
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => require_cuda(0),
        other => match other.strip_prefix("cuda:") {
            Some(index) => {
                let index: usize = index.parse().map_err(|_| {
                    ModelError::Invalid(format!("bad device {spec:?}: expected cuda:N"))
                })?;
                require_cuda(index)
            }
            None => Err(ModelError::Invalid(format!(
                "bad device {spec:?}: expected auto, cpu, cuda or cuda:N"
            ))),
        },
    }
}

fn require_cuda(index: usize) -> Result<Device> {
    load_cuda_backend().map_err(|e| {
        ModelError::Invalid(format!(
            "device cuda:{index} requested but libtorch's CUDA backend did not load: {e}"
        ))
    })?;
    let count = tch::Cuda::device_count() as usize;
    if index < count {
        Ok(Device::Cuda(index))
    } else {
        Err(ModelError::Invalid(format!(
            "device cuda:{index} requested but {count} CUDA device(s) are available"
        )))
    }
}

pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_ascii_lowercase(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    Bf16,
    F16,
}

impl WeightDtype {
    /// `parse`, with `auto` meaning bf16 on CUDA and f32 elsewhere (the CPU decoding kernels
    /// read f32, and this CPU has no fast bf16 arithmetic).
    pub fn resolve(s: &str, device: Device) -> Result<Self> {
        if s.trim().eq_ignore_ascii_case("auto") {
            return Ok(if device.is_cuda() {
                WeightDtype::Bf16
            } else {
                WeightDtype::F32
            });
        }
        Self::parse(s)
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(WeightDtype::F32),
            "bf16" | "bfloat16" => Ok(WeightDtype::Bf16),
            "f16" | "float16" | "fp16" | "half" => Ok(WeightDtype::F16),
            other => Err(ModelError::Invalid(format!(
                "bad dtype {other:?}: expected f32, bf16 or f16"
            ))),
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            WeightDtype::F32 => Kind::Float,
            WeightDtype::Bf16 => Kind::BFloat16,
            WeightDtype::F16 => Kind::Half,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::Bf16 => "bf16",
            WeightDtype::F16 => "f16",
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_dtype_is_bf16_on_cuda_and_f32_on_a_cpu() {
        assert_eq!(
            WeightDtype::resolve("auto", Device::Cuda(0)).unwrap(),
            WeightDtype::Bf16
        );
        assert_eq!(
            WeightDtype::resolve("AUTO", Device::Cpu).unwrap(),
            WeightDtype::F32
        );
        assert_eq!(
            WeightDtype::resolve("f16", Device::Cuda(0)).unwrap(),
            WeightDtype::F16
        );
        assert_eq!(
            WeightDtype::resolve("bf16", Device::Cpu).unwrap(),
            WeightDtype::Bf16
        );
        assert!(WeightDtype::resolve("f64", Device::Cpu).is_err());
    }
}
