//! AdamW written on tensors, so its whole state (first and second moments per parameter and
//! the update count) can be saved into a checkpoint and restored bit for bit: that is what
//! makes a resumed run end where an uninterrupted one does.
//!
//! Weight decay is decoupled (Loshchilov & Hutter) and applies to the 2-D weight matrices of
//! attention and MLP only. Biases and LayerNorm parameters are never decayed, and neither are
//! the token and position embeddings: this is the GPT-2 / minGPT convention (the token
//! embedding is also the tied LM head, and shrinking rare tokens' rows toward zero only hurts).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use synopsis_model::ModelError;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// File of a checkpoint holding the optimizer state and the training progress.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Key of the safetensors metadata entry holding the training progress (JSON).
pub const PROGRESS_KEY: &str = "synopsis_progress";

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// One trainable variable: its place in the flat buffers.
struct Param {
    name: String,
    /// The variable itself, a view of `AdamW::values` after construction.
    value: Tensor,
    offset: i64,
    shape: Vec<i64>,
    decay: bool,
}

impl Param {
    fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    /// This parameter's part of a flat buffer, in its own shape.
    fn view_of(&self, flat: &Tensor) -> Result<Tensor, tch::TchError> {
        flat.f_narrow(0, self.offset, self.numel())?
            .f_view(self.shape.as_slice())
    }
}

/// AdamW over flat buffers: every variable's data, gradient and moments live in a few
/// contiguous f32 buffers (the variables and their gradients are views of them), so an update,
/// the gradient norm and the clip are a handful of operations whatever the number of tensors:
/// per-tensor updates cost GPT-2 small ~1,400 kernel launches a step, far more than its
/// arithmetic on a GPU. Decayed parameters come first, so the decay is one operation too.
pub struct AdamW {
    params: Vec<Param>,
    values: Tensor,
    grads: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Reused by every update for the intermediate results, so a step allocates nothing:
    /// fresh parameter-sized temporaries cost a page fault per 4 KiB and a memset each.
    scratch: Tensor,
    /// Elements at the start of the buffers that get weight decay.
    decayed_numel: i64,
    weight_decay: f64,
    /// Updates applied so far (the `t` of the bias corrections).
    updates: u64,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("params", &self.params.len())
            .field("weight_decay", &self.weight_decay)
            .field("updates", &self.updates)
            .finish()
    }
}

/// Whether a parameter gets weight decay (see the module docs).
pub fn is_decayed(name: &str, dims: usize) -> bool {
    dims == 2 && !name.contains("wte.") && !name.contains("wpe.")
}

impl AdamW {
    /// An optimizer over every trainable variable of `vs`. Moves their data into its flat
    /// buffer (the variables become views of it) and gives each a gradient that is a view of
    /// its flat gradient buffer, which backward passes then accumulate into in place. The
    /// variables must all be f32 on one device (training keeps f32 master weights).
    pub fn new(vs: &VarStore, weight_decay: f64) -> Result<Self, tch::TchError> {
        let mut vars: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        // Decayed first, then by name: the layout is a pure function of the variables.
        vars.sort_by(|a, b| {
            let decayed = |(name, t): &(String, Tensor)| !is_decayed(name, t.dim());
            decayed(a).cmp(&decayed(b)).then(a.0.cmp(&b.0))
        });
        let device = vars.first().map_or(vs.device(), |(_, t)| t.device());
        let mut offset = 0;
        let mut decayed_numel = 0;
        let mut params = Vec::with_capacity(vars.len());
        for (name, value) in vars {
            if value.kind() != Kind::Float || value.device() != device {
                return Err(tch::TchError::Kind(format!(
                    "{name}: the optimizer keeps f32 master weights on one device, found {:?} on {:?}",
                    value.kind(),
                    value.device()
                )));
            }
            let decay = is_decayed(&name, value.dim());
            let numel = value.numel() as i64;
            if decay {
                decayed_numel += numel;
            }
            params.push(Param {
                name,
                shape: value.size(),
                value,
                offset,
                decay,
            });
            offset += numel;
        }
        let zeros = || Tensor::f_zeros([offset], (Kind::Float, device));
        let values = zeros()?;
        let grads = zeros()?;
        tch::no_grad(|| -> Result<(), tch::TchError> {
            for p in &mut params {
                let data = p.view_of(&values)?;
                data.shallow_clone().f_copy_(&p.value)?;
                p.value.set_data(&data);
            }
            Ok(())
        })?;
        attach_gradients(&params, &grads)?;
        Ok(AdamW {
            params,
            values,
            grads,
            exp_avg: zeros()?,
            exp_avg_sq: zeros()?,
            scratch: Tensor::f_empty([offset], (Kind::Float, device))?,
            decayed_numel,
            weight_decay,
            updates: 0,
        })
    }

    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Names of the decayed parameters (for the resolved config and tests).
    pub fn decayed(&self) -> Vec<&str> {
        self.params
            .iter()
            .filter(|p| p.decay)
            .map(|p| p.name.as_str())
            .collect()
    }

    /// Zeroes every gradient: one operation on the flat buffer they are views of.
    pub fn zero_grad(&mut self) {
        let _guard = tch::no_grad_guard();
        let _ = self.grads.zero_();
    }

    /// Divides the gradients by the loss scale, measures their global L2 norm and, when
    /// `max_norm` is given and exceeded, scales them down to it. Returns the norm before
    /// clipping (non-finite when a gradient overflowed).
    pub fn unscale_and_clip(
        &mut self,
        loss_scale: f64,
        max_norm: Option<f64>,
    ) -> Result<f64, tch::TchError> {
        let _guard = tch::no_grad_guard();
        if self.params.is_empty() {
            return Ok(0.0);
        }
        if loss_scale != 1.0 {
            let _ = self.grads.f_mul_scalar_(1.0 / loss_scale)?;
        }
        let total = f64::try_from(self.grads.f_norm()?)?;
        if let Some(max) = max_norm {
            if total.is_finite() && total > max {
                let coef = max / (total + 1e-6);
                let _ = self.grads.f_mul_scalar_(coef)?;
            }
        }
        Ok(total)
    }

    /// One AdamW update at learning rate `lr`, over all parameters at once.
    pub fn step(&mut self, lr: f64) -> Result<(), tch::TchError> {
        let _guard = tch::no_grad_guard();
        self.updates += 1;
        let t = self.updates as i32;
        let bias1 = 1.0 - BETA1.powi(t);
        let bias2_sqrt = (1.0 - BETA2.powi(t)).sqrt();
        if self.weight_decay > 0.0 && self.decayed_numel > 0 {
            let _ = self
                .values
                .f_narrow(0, 0, self.decayed_numel)?
                .f_mul_scalar_(1.0 - lr * self.weight_decay)?;
        }
        let grad = &self.grads;
        let scratch = &mut self.scratch;
        // m ← β1·m + (1−β1)·g and v ← β2·v + (1−β2)·g², both as lerps.
        let _ = self.exp_avg.f_lerp_(grad, 1.0 - BETA1)?;
        let _ = grad.f_mul_out(scratch, grad)?;
        let _ = self.exp_avg_sq.f_lerp_(scratch, 1.0 - BETA2)?;
        // p ← p − lr/(1−β1ᵗ) · m / (√v / √(1−β2ᵗ) + ε), all in `scratch`.
        let _ = self.exp_avg_sq.f_sqrt_out(scratch)?;
        let _ = scratch.f_div_scalar_(bias2_sqrt)?;
        let _ = scratch.f_add_scalar_(EPS)?;
        let _ = self.exp_avg.f_div_out(scratch, scratch)?;
        let _ = scratch.f_mul_scalar_(-lr / bias1)?;
        let _ = self.values.f_add_(scratch)?;
        Ok(())
    }

    /// Writes the moments (`exp_avg.<name>`, `exp_avg_sq.<name>`, f32) and `progress` (JSON,
    /// in the metadata next to the update count) as safetensors.
    pub fn save(&self, path: &Path, progress: &str) -> Result<(), ModelError> {
        let mut buffers = Vec::with_capacity(self.params.len() * 2);
        for p in &self.params {
            for (prefix, flat) in [("exp_avg", &self.exp_avg), ("exp_avg_sq", &self.exp_avg_sq)] {
                let shape: Vec<usize> = p.shape.iter().map(|&d| d as usize).collect();
                let bytes = f32_bytes(&p.view_of(flat)?)?;
                buffers.push((format!("{prefix}.{}", p.name), shape, bytes));
            }
        }
        let views = buffers
            .iter()
            .map(|(name, shape, bytes)| {
                TensorView::new(Dtype::F32, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| ModelError::format(path, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let metadata = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("updates".to_string(), self.updates.to_string()),
            (PROGRESS_KEY.to_string(), progress.to_string()),
        ]);
        safetensors::serialize_to_file(views, Some(metadata), path)
            .map_err(|e| ModelError::format(path, e))
    }

    /// Restores the moments and update count written by [`save`](Self::save); returns the
    /// progress JSON. Every parameter must be present with its shape.
    pub fn load(&mut self, path: &Path) -> Result<String, ModelError> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        let (_, header) =
            SafeTensors::read_metadata(&bytes).map_err(|e| ModelError::format(path, e))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let updates: u64 = meta
            .get("updates")
            .and_then(|u| u.parse().ok())
            .ok_or_else(|| ModelError::format(path, "no update count in the metadata"))?;
        let progress = meta
            .get(PROGRESS_KEY)
            .cloned()
            .ok_or_else(|| ModelError::format(path, "no training progress in the metadata"))?;
        let file = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::format(path, e))?;
        let _guard = tch::no_grad_guard();
        for p in &self.params {
            for (prefix, flat) in [("exp_avg", &self.exp_avg), ("exp_avg_sq", &self.exp_avg_sq)] {
                let mut target = p.view_of(flat)?;
                let name = format!("{prefix}.{}", p.name);
                let view = file.tensor(&name).map_err(|_| ModelError::MissingTensor {
                    path: path.to_path_buf(),
                    name: name.clone(),
                })?;
                let found: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
                if view.dtype() != Dtype::F32 || found != target.size() {
                    return Err(ModelError::ShapeMismatch {
                        path: path.to_path_buf(),
                        name,
                        expected: target.size(),
                        found,
                    });
                }
                let values: Vec<f32> = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let loaded = Tensor::from_slice(&values)
                    .f_reshape(&found)?
                    .f_to_device(target.device())?
                    .f_to_kind(target.kind())?;
                target.f_copy_(&loaded)?;
            }
        }
        self.updates = updates;
        Ok(progress)
    }
}

/// Gives every parameter a gradient that is a view of `grads`. A backward pass then adds into
/// the existing gradient in place (autograd accumulates into a defined `.grad` when it does not
/// build a graph of the backward itself), so the flat buffer holds every gradient.
fn attach_gradients(params: &[Param], grads: &Tensor) -> Result<(), tch::TchError> {
    if params.is_empty() {
        return Ok(());
    }
    // A backward pass of zero defines each `.grad` (as separate tensors at first)…
    let touch = tch::with_grad(|| -> Result<Option<Tensor>, tch::TchError> {
        let mut sum: Option<Tensor> = None;
        for p in params {
            let term = p.value.f_sum(Kind::Float)?.f_mul_scalar(0.0)?;
            sum = Some(match sum {
                Some(sum) => sum.f_add(&term)?,
                None => term,
            });
        }
        Ok(sum)
    })?;
    if let Some(touch) = touch {
        touch.f_backward()?;
    }
    // …then each gradient's data becomes its part of the flat buffer.
    for p in params {
        let mut grad = p.value.grad();
        grad.set_data(&p.view_of(grads)?);
    }
    Ok(())
}

fn f32_bytes(t: &Tensor) -> Result<Vec<u8>, tch::TchError> {
    let cpu = t
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?;
    let n = cpu.numel();
    let mut values = vec![0f32; n];
    cpu.f_copy_data(&mut values, n)?;
    Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, Module, OptimizerConfig};

    fn toy(seed: i64) -> (VarStore, nn::Linear) {
        tch::manual_seed(seed);
        let vs = VarStore::new(Device::Cpu);
        let lin = nn::linear(vs.root() / "h" / "mlp", 4, 3, Default::default());
        (vs, lin)
    }

    fn loss(lin: &nn::Linear) -> Tensor {
        let x = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25, 1.0, 0.0, -0.5, 3.0]).reshape([2, 4]);
        lin.forward(&x).pow_tensor_scalar(2).sum(Kind::Float)
    }

    #[test]
    fn matches_libtorch_adamw() {
        let (vs_a, lin_a) = toy(7);
        // Tests running alongside draw from the global RNG too: copy the weights, not the seed.
        let (mut vs_b, lin_b) = toy(7);
        vs_b.copy(&vs_a).unwrap();
        let mut ours = AdamW::new(&vs_a, 0.0).unwrap();
        let mut theirs = nn::AdamW {
            beta1: BETA1,
            beta2: BETA2,
            wd: 0.0,
            eps: EPS,
            amsgrad: false,
        }
        .build(&vs_b, 1e-2)
        .unwrap();
        for _ in 0..5 {
            ours.zero_grad();
            loss(&lin_a).backward();
            ours.step(1e-2).unwrap();
            theirs.zero_grad();
            loss(&lin_b).backward();
            theirs.step();
        }
        let a = lin_a.ws.copy();
        let b = lin_b.ws.copy();
        let diff = f64::try_from((a - b).abs().max()).unwrap();
        assert!(diff < 1e-6, "weights differ by {diff}");
    }

    #[test]
    fn decay_skips_biases_norms_and_embeddings() {
        assert!(is_decayed("transformer.h.0.attn.c_attn.weight", 2));
        assert!(!is_decayed("transformer.h.0.attn.c_attn.bias", 1));
        assert!(!is_decayed("transformer.h.0.ln_1.weight", 1));
        assert!(!is_decayed("transformer.wte.weight", 2));
        assert!(!is_decayed("transformer.wpe.weight", 2));
    }

    #[test]
    fn state_round_trips_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(OPTIMIZER_FILE);
        let (vs_a, lin_a) = toy(3);
        let mut a = AdamW::new(&vs_a, 0.1).unwrap();
        for _ in 0..3 {
            a.zero_grad();
            loss(&lin_a).backward();
            a.step(1e-2).unwrap();
        }
        a.save(&path, "{\"step\":3}").unwrap();
        // A second model with the same weights and the restored state continues identically.
        let (vs_b, lin_b) = toy(99);
        tch::no_grad(|| {
            lin_b.ws.shallow_clone().copy_(&lin_a.ws);
            if let (Some(bb), Some(ba)) = (&lin_b.bs, &lin_a.bs) {
                bb.shallow_clone().copy_(ba);
            }
        });
        let mut b = AdamW::new(&vs_b, 0.1).unwrap();
        assert_eq!(b.load(&path).unwrap(), "{\"step\":3}");
        assert_eq!(b.updates(), 3);
        for (opt, lin) in [(&mut a, &lin_a), (&mut b, &lin_b)] {
            opt.zero_grad();
            loss(lin).backward();
            opt.step(1e-2).unwrap();
        }
        assert!(lin_a.ws.equal(&lin_b.ws));
    }

    #[test]
    fn gradients_accumulate_in_the_flat_buffer_across_backward_passes() {
        let (vs, lin) = toy(5);
        let mut opt = AdamW::new(&vs, 0.1).unwrap();
        // Every variable and its gradient are views of the flat buffers.
        for p in &opt.params {
            let data = p.view_of(&opt.values).unwrap();
            assert_eq!(p.value.data_ptr(), data.data_ptr(), "{}", p.name);
            let grad = p.view_of(&opt.grads).unwrap();
            assert_eq!(p.value.grad().data_ptr(), grad.data_ptr(), "{}", p.name);
        }
        opt.zero_grad();
        loss(&lin).backward();
        let once = opt.grads.copy();
        assert!(f64::try_from(once.abs().sum(Kind::Float)).unwrap() > 0.0);
        // A second micro-batch adds to the first, as gradient accumulation needs.
        loss(&lin).backward();
        assert!(opt.grads.allclose(&(&once * 2.0), 1e-6, 1e-6, false));
        let weight = lin.ws.grad();
        assert!(weight.allclose(&opt.params[0].view_of(&opt.grads).unwrap(), 0.0, 0.0, false));
        opt.zero_grad();
        assert_eq!(
            f64::try_from(opt.grads.abs().sum(Kind::Float)).unwrap(),
            0.0
        );
        assert_eq!(
            f64::try_from(lin.ws.grad().abs().sum(Kind::Float)).unwrap(),
            0.0
        );
    }

    #[test]
    fn decay_shrinks_only_the_decayed_parameters() {
        let (vs, lin) = toy(6);
        let mut opt = AdamW::new(&vs, 0.5).unwrap();
        assert_eq!(opt.decayed(), vec!["h.mlp.weight"]);
        let (w, b) = (lin.ws.copy(), lin.bs.as_ref().unwrap().copy());
        // No gradient: Adam's step is zero, so only the decay moves the weights.
        opt.zero_grad();
        opt.step(0.1).unwrap();
        assert!(lin.ws.allclose(&(&w * 0.95), 1e-6, 1e-7, false));
        assert!(lin.bs.as_ref().unwrap().equal(&b));
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let (vs, lin) = toy(1);
        let mut opt = AdamW::new(&vs, 0.0).unwrap();
        opt.zero_grad();
        (loss(&lin) * 100.0).backward();
        let before = opt.unscale_and_clip(1.0, Some(0.5)).unwrap();
        assert!(before > 0.5);
        let after = opt.unscale_and_clip(1.0, None).unwrap();
        assert!((after - 0.5).abs() < 1e-3, "norm after clipping {after}");
    }
}
