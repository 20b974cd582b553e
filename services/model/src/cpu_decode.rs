//! Single-token decoding of up to 16 rows on CPU (4 without AVX2) as one pass over the
//! weights, shared by a small thread team. Through libtorch a step of a small model is ~15
//! operations per layer, each with its dispatch, allocation and OpenMP fork and join, and these
//! cost more than reading the layer's weights; here a layer is five team jobs over plain f32
//! slices. Larger batches keep libtorch's path, whose matrix-matrix products win once the
//! weights are reused enough.

#![allow(unsafe_code)]

use crate::attention::{Block, LayerNorm};
use crate::cpu_kernels::{attend, layer_norm, max_rows, sum_partials, Epilogue, Product};
use crate::cpu_team::Team;
use crate::kv_cache::KvCache;
use std::ops::Range;
use tch::{Device, Kind, Tensor};

/// Column ranges are cut at multiples of one cache line of f32, so members never share one.
const COLUMN_ALIGN: usize = 16;

thread_local! {
    /// One team per decoding thread (the engine's), sized like libtorch's thread count.
    static TEAM: Team = Team::new(team_size());
    /// Partial sums of the large products, kept between steps: allocating the head's (hundreds
    /// of KiB) each step would fault fresh pages in every time.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
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

    let mut h = vec![0f32; rows * d];
    let mut qkv = vec![0f32; rows * 3 * d];
    let mut att = vec![0f32; rows * d];
    let mut y = vec![0f32; rows * d];
    let inner = layers.first().map_or(0, |l| l.fc_b.len());
    let mut f = vec![0f32; rows * inner];
    let mut scratch = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    for (layer, (keys, values)) in layers.iter().zip(&kv) {
        normalise_rows(&x, &layer.ln_1, d, &mut h);
        let p = biased(&h, rows, layer.attn_w, layer.attn_b, Epilogue::None);
        product(team, p, &mut scratch, &mut qkv);
        let slots = CacheSlots {
            keys: *keys,
            values: *values,
            cap,
            start,
        };
        attend_heads(team, &qkv, layer.heads, d, rows, slots, &visible, &mut att);
        let p = biased(&att, rows, layer.proj_w, layer.proj_b, Epilogue::None);
        product(team, p, &mut scratch, &mut y);
        x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
        normalise_rows(&x, &layer.ln_2, d, &mut h);
        let p = biased(&h, rows, layer.fc_w, layer.fc_b, layer.epilogue);
        product(team, p, &mut scratch, &mut f);
        let p = biased(&f, rows, layer.mlp_w, layer.mlp_b, Epilogue::None);
        product(team, p, &mut scratch, &mut y);
        x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
    }
    normalise_rows(&x, ln_f, d, &mut h);
    // SAFETY: `logits` is a fresh contiguous rows × vocab f32 tensor, written only here.
    let out = unsafe { std::slice::from_raw_parts_mut(out.ptr(), rows * vocab) };
    let p = Product {
        x: &h,
        rows,
        w: head,
        n: vocab,
        bias: None,
        epilogue: Epilogue::None,
    };
    product(team, p, &mut scratch, out);
    SCRATCH.with(|s| *s.borrow_mut() = scratch);
    let _ = cache.positions.g_add_scalar_(1);
    cache.len = start as i64 + 1;
    Some(logits)
}

/// `epilogue(x · w + bias)` with as many columns as the bias.
fn biased<'a>(
    x: &'a [f32],
    rows: usize,
    w: &'a [f32],
    bias: &'a [f32],
    epilogue: Epilogue,
) -> Product<'a> {
    Product {
        x,
        rows,
        w,
        n: bias.len(),
        bias: Some(bias),
        epilogue,
    }
}

/// One layer's cache: where the new slot goes and how many slots a (row, head) has.
#[derive(Clone, Copy)]
struct CacheSlots {
    keys: SyncPtr,
    values: SyncPtr,
    cap: usize,
    start: usize,
}

/// Stores each row's new key and value in the cache, then attends, one (row, head) unit at a
/// time, the units dealt round the team.
#[allow(clippy::too_many_arguments)]
fn attend_heads<'v>(
    team: &Team,
    qkv: &[f32],
    heads: usize,
    d: usize,
    rows: usize,
    slots: CacheSlots,
    visible: &(dyn Fn(usize) -> Option<&'v [bool]> + Sync),
    att: &mut [f32],
) {
    let CacheSlots {
        keys,
        values,
        cap,
        start,
    } = slots;
    let hd = d / heads;
    let att_ptr = SyncPtr(att.as_mut_ptr());
    team.run(&|member, members| {
        let mut scores = Vec::with_capacity(start + 1);
        for unit in (member..rows * heads).step_by(members) {
            let (r, hh) = (unit / heads, unit % heads);
            let row = &qkv[r * 3 * d..(r + 1) * 3 * d];
            let q = &row[hh * hd..(hh + 1) * hd];
            let k_new = &row[d + hh * hd..d + (hh + 1) * hd];
            let v_new = &row[2 * d + hh * hd..2 * d + (hh + 1) * hd];
            let base = (r * heads + hh) * cap * hd;
            // SAFETY: unit (r, hh) alone owns head hh of row r in this layer's cache and
            // columns hh·hd.. of row r in `att`; the cache holds rows × heads × cap × hd
            // (checked by the caller) and start < cap.
            unsafe {
                let k_at = keys.ptr().add(base + start * hd);
                let v_at = values.ptr().add(base + start * hd);
                std::ptr::copy_nonoverlapping(k_new.as_ptr(), k_at, hd);
                std::ptr::copy_nonoverlapping(v_new.as_ptr(), v_at, hd);
                let k_all = std::slice::from_raw_parts(keys.ptr().add(base), (start + 1) * hd);
                let v_all = std::slice::from_raw_parts(values.ptr().add(base), (start + 1) * hd);
                let out = std::slice::from_raw_parts_mut(att_ptr.ptr().add(r * d + hh * hd), hd);
                attend(q, k_all, v_all, visible(r), &mut scores, out);
            }
        }
    });
}

/// `out = x · w + b` (then `epilogue`), rows × n. Each member reads a contiguous band of weight
/// rows, one sequential stream, into its own partial sums, then adds up its share of the
/// columns. Splitting the columns instead makes every member read a piece of every row, and
/// measured ~10% slower on the 4 × 256 model's blocks.
fn product(team: &Team, p: Product<'_>, scratch: &mut Vec<f32>, out: &mut [f32]) {
    let Product { x, rows, w, n, .. } = p;
    assert_eq!(out.len(), rows * n, "product output size");
    let k = x.len() / rows;
    let members = team.members();
    if members == 1 {
        // SAFETY: `out` holds rows × n f32 and this thread is the only one.
        unsafe { p.write_columns(0..n, out.as_mut_ptr()) };
        return;
    }
    // Every member overwrites its whole block, so the buffer needs no clearing.
    let need = members * rows * n;
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    let partials = SyncPtr(scratch.as_mut_ptr());
    team.run(&|member, members| {
        let band = member_columns(k, member, members);
        // SAFETY: member `member` alone writes block `member` (rows × n) of the partial sums.
        let block = unsafe { partials.ptr().add(member * rows * n) };
        if band.is_empty() {
            // SAFETY: as above.
            unsafe { std::slice::from_raw_parts_mut(block, rows * n) }.fill(0.0);
            return;
        }
        let xs: std::borrow::Cow<'_, [f32]> = if rows == 1 {
            x[band.clone()].into()
        } else {
            (0..rows)
                .flat_map(|r| x[r * k..][band.clone()].iter().copied())
                .collect::<Vec<_>>()
                .into()
        };
        let band_weights = &w[band.start * n..band.end * n];
        // SAFETY: as above.
        let partial = Product {
            x: &xs,
            w: band_weights,
            bias: None,
            epilogue: Epilogue::None,
            ..p
        };
        unsafe { partial.write_columns(0..n, block) };
    });
    let sums: &[f32] = &scratch[..need];
    let ptr = SyncPtr(out.as_mut_ptr());
    team.run(&|member, members| {
        let cols = member_columns(n, member, members);
        // SAFETY: `out` holds rows × n f32; members write disjoint column ranges.
        unsafe { sum_partials(sums, rows, n, p.bias, p.epilogue, cols, ptr.ptr()) };
    });
}

/// Member `member`'s share of `n` columns, cut at cache-line multiples.
fn member_columns(n: usize, member: usize, members: usize) -> Range<usize> {
    let per = n.div_ceil(members).div_ceil(COLUMN_ALIGN) * COLUMN_ALIGN;
    (member * per).min(n)..((member + 1) * per).min(n)
}

fn normalise_rows(x: &[f32], norm: &Norm<'_>, d: usize, out: &mut [f32]) {
    for (row, dst) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        layer_norm(row, norm.weight, norm.bias, norm.eps, dst);
    }
}

struct Norm<'a> {
    weight: &'a [f32],
    bias: &'a [f32],
    eps: f64,
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
struct LayerSlices<'a> {
    ln_1: Norm<'a>,
    attn_w: &'a [f32],
    attn_b: &'a [f32],
    proj_w: &'a [f32],
    proj_b: &'a [f32],
    ln_2: Norm<'a>,
    fc_w: &'a [f32],
    fc_b: &'a [f32],
    mlp_w: &'a [f32],
    mlp_b: &'a [f32],
    heads: usize,
    epilogue: Epilogue,
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
struct SyncPtr(*mut f32);
// SAFETY: every use writes a region no other member touches during the same job.
unsafe impl Send for SyncPtr {}
// SAFETY: as above.
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// Through a method, so closures capture the `SyncPtr` and not its raw field.
    fn ptr(self) -> *mut f32 {
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
