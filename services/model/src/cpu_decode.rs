//! Single-token decoding of up to 16 rows on CPU (4 without AVX2) as one pass over the
//! weights, shared by a small thread team. Through libtorch a step of a small model is ~15
//! operations per layer, each with its dispatch, allocation and OpenMP fork and join, and these
//! cost more than reading the layer's weights; here a layer is four team jobs over plain f32
//! slices (see `cpu_step`). Larger batches keep libtorch's path, whose matrix-matrix products
//! win once the weights are reused enough. This module checks that a step applies and lays its
//! inputs out; `cpu_step` runs it.

#![allow(unsafe_code)]

use crate::attention::{Block, LayerNorm};
use crate::cpu_kernels::{max_rows, Epilogue};
use crate::cpu_step::{CacheSlots, Step, Workspace};
use crate::cpu_team::Team;
use crate::kv_cache::KvCache;
use tch::{Device, Kind, Tensor};

thread_local! {
    /// One team per decoding thread (the engine's), sized like libtorch's thread count.
    static TEAM: Team = Team::new(team_size());
    /// The step's buffers, kept between steps.
    static WORKSPACE: std::cell::RefCell<Workspace> = std::cell::RefCell::new(Workspace::default());
}

fn team_size() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    usize::try_from(tch::get_num_threads())
        .unwrap_or(1)
        .clamp(1, cores)
}

/// What a fused step reads of a model whose tied head is laid out `[n_embd, vocab]`.
pub(crate) struct ModelView<'a> {
    pub blocks: &'a [Block],
    pub wpe: &'a Tensor,
    pub ln_f: &'a LayerNorm,
    pub head: &'a Tensor,
    pub n_positions: i64,
}

/// The logits of the fused step when it applies to this step: a CPU model in f32 with a
/// supported activation and at most [`max_rows`] rows. `None` means the caller decodes
/// through libtorch; the cache has then not changed (beyond spare capacity).
pub(crate) fn decode_step(
    model: &ModelView<'_>,
    input_ids: &Tensor,
    cache: &mut KvCache,
) -> Option<Tensor> {
    let rows = usize::try_from(input_ids.size1().ok()?).ok()?;
    if rows == 0 || rows > max_rows() || input_ids.device() != Device::Cpu {
        return None;
    }
    // The checks and conversions below take about as long as a parked helper takes to wake.
    let _ = TEAM.try_with(Team::wake);
    let layers = model
        .blocks
        .iter()
        .map(LayerSlices::of)
        .collect::<Option<Vec<_>>>()?;
    let wpe = f32s(model.wpe)?;
    let head = f32s(model.head)?;
    let ln_f = Norm::of(model.ln_f)?;
    let (d, vocab) = model.head.size2().ok()?;
    let (d, vocab) = (usize::try_from(d).ok()?, usize::try_from(vocab).ok()?);
    let ids = Vec::<i64>::try_from(input_ids.to_kind(Kind::Int64)).ok()?;
    if ids
        .iter()
        .any(|&id| usize::try_from(id).map_or(true, |id| id >= vocab))
    {
        return None; // libtorch's path reports the bad id
    }
    let cache_ok = cache
        .keys
        .iter()
        .chain(&cache.values)
        .all(|t| t.kind() == Kind::Float && t.device() == Device::Cpu)
        && cache.batch_size() == rows as i64;
    if !cache_ok {
        return None;
    }
    let team_result = TEAM.try_with(|team| {
        cache.reserve(1);
        decode_rows(
            team, model, &layers, wpe, head, &ln_f, d, vocab, &ids, cache,
        )
    });
    team_result.ok().flatten()
}

#[allow(clippy::too_many_arguments)]
fn decode_rows(
    team: &Team,
    model: &ModelView<'_>,
    layers: &[LayerSlices<'_>],
    wpe: &[f32],
    head: &[f32],
    ln_f: &Norm<'_>,
    d: usize,
    vocab: usize,
    ids: &[i64],
    cache: &mut KvCache,
) -> Option<Tensor> {
    let rows = ids.len();
    let start = usize::try_from(cache.len).ok()?;
    let cap = usize::try_from(cache.capacity()).ok()?;
    let kv: Vec<(SyncPtr, SyncPtr)> = cache
        .keys
        .iter()
        .zip(&cache.values)
        .map(|(k, v)| Some((mut_f32s(k)?, mut_f32s(v)?)))
        .collect::<Option<_>>()?;
    // The raw writes below rely on these sizes: [rows, heads, cap, head_dim] per layer.
    let sized = |t: &Tensor| t.numel() == rows * d * cap;
    if kv.len() != layers.len() || !cache.keys.iter().chain(&cache.values).all(sized) {
        return None;
    }
    if start >= cap || !is_plain_cpu(&cache.valid, Kind::Bool) || cache.valid.numel() != rows * cap
    {
        return None;
    }
    let positions = Vec::<i64>::try_from(&cache.positions)
        .ok()
        .filter(|p| p.len() == rows)?;
    // x = token embedding (a column of the [n_embd, vocab] head) + position embedding.
    let mut x = vec![0f32; rows * d];
    for (r, (&id, &pos)) in ids.iter().zip(&positions).enumerate() {
        let pos = usize::try_from(pos.clamp(0, model.n_positions - 1)).ok()?;
        let position = wpe.get(pos * d..(pos + 1) * d)?;
        for (j, (xj, &p)) in x[r * d..(r + 1) * d].iter_mut().zip(position).enumerate() {
            *xj = head[j * vocab + id as usize] + p;
        }
    }
    let logits = Tensor::empty([rows as i64, vocab as i64], (Kind::Float, Device::Cpu));
    let out = mut_f32s(&logits)?;
    // Nothing returns `None` past this point: the cache changes from here on.
    let valid_ptr = cache.valid.data_ptr().cast::<bool>();
    // SAFETY: `valid` is a contiguous rows × cap bool tensor (checked above) and `start < cap`
    // after `reserve(1)`; the slot is marked before the slice below is formed.
    let valid = unsafe {
        for r in 0..rows {
            *valid_ptr.add(r * cap + start) = true;
        }
        std::slice::from_raw_parts(valid_ptr.cast_const(), rows * cap)
    };
    let visible = |r: usize| (!cache.dense).then(|| &valid[r * cap..r * cap + start + 1]);

    let caches: Vec<CacheSlots> = kv
        .iter()
        .map(|&(keys, values)| CacheSlots {
            keys,
            values,
            cap,
            start,
        })
        .collect();
    let step = Step {
        team,
        rows,
        d,
        layers,
        caches: &caches,
        visible: &visible,
        ln_f,
        head,
        vocab,
    };
    WORKSPACE.with(|workspace| {
        // SAFETY: `logits` is a fresh contiguous rows × vocab f32 tensor, written only here;
        // each cache is [rows, heads, cap, head_dim] (checked above) and start < cap.
        unsafe { step.run(&x, &mut workspace.borrow_mut(), out) };
    });
    let _ = cache.positions.g_add_scalar_(1);
    cache.len = start as i64 + 1;
    Some(logits)
}

pub(crate) struct Norm<'a> {
    pub weight: &'a [f32],
    pub bias: &'a [f32],
    pub eps: f64,
}

impl<'a> Norm<'a> {
    fn of(ln: &'a LayerNorm) -> Option<Self> {
        Some(Norm {
            weight: f32s(&ln.weight)?,
            bias: f32s(&ln.bias)?,
            eps: ln.eps,
        })
    }
}

/// One block's weights as slices (HF's `[in, out]` layout).
pub(crate) struct LayerSlices<'a> {
    pub ln_1: Norm<'a>,
    pub attn_w: &'a [f32],
    pub attn_b: &'a [f32],
    pub proj_w: &'a [f32],
    pub proj_b: &'a [f32],
    pub ln_2: Norm<'a>,
    pub fc_w: &'a [f32],
    pub fc_b: &'a [f32],
    pub mlp_w: &'a [f32],
    pub mlp_b: &'a [f32],
    pub heads: usize,
    pub epilogue: Epilogue,
}

impl<'a> LayerSlices<'a> {
    fn of(block: &'a Block) -> Option<Self> {
        let epilogue = match block.activation.as_str() {
            "relu" => Epilogue::Relu,
            // Exact (erf) GELU stays on libtorch's path.
            "gelu" => return None,
            _ => Epilogue::GeluTanh,
        };
        Some(LayerSlices {
            ln_1: Norm::of(&block.ln_1)?,
            attn_w: f32s(&block.c_attn.weight)?,
            attn_b: f32s(&block.c_attn.bias)?,
            proj_w: f32s(&block.attn_proj.weight)?,
            proj_b: f32s(&block.attn_proj.bias)?,
            ln_2: Norm::of(&block.ln_2)?,
            fc_w: f32s(&block.c_fc.weight)?,
            fc_b: f32s(&block.c_fc.bias)?,
            mlp_w: f32s(&block.mlp_proj.weight)?,
            mlp_b: f32s(&block.mlp_proj.bias)?,
            heads: usize::try_from(block.n_head).ok()?,
            epilogue,
        })
    }
}

/// A raw pointer the team's members may share: each writes only its own part.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub *mut f32);
// SAFETY: every use writes a region no other member touches during the same job.
unsafe impl Send for SyncPtr {}
// SAFETY: as above.
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// Through a method, so closures capture the `SyncPtr` and not its raw field.
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}

fn is_plain_cpu(t: &Tensor, kind: Kind) -> bool {
    t.kind() == kind && t.device() == Device::Cpu && t.is_contiguous()
}

/// The f32 elements of a contiguous CPU tensor, borrowed with it. Model weights are never
/// written while a step reads them: a serving model is not trained.
fn f32s(t: &Tensor) -> Option<&[f32]> {
    if !is_plain_cpu(t, Kind::Float) {
        return None;
    }
    let len = t.numel();
    if len == 0 {
        return Some(&[]);
    }
    // SAFETY: a contiguous CPU f32 tensor holds `numel` f32 at `data_ptr`, alive while `t` is.
    Some(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, len) })
}

fn mut_f32s(t: &Tensor) -> Option<SyncPtr> {
    (is_plain_cpu(t, Kind::Float) && t.numel() > 0).then(|| SyncPtr(t.data_ptr().cast::<f32>()))
}
