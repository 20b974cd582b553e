//! The team jobs of one fused decoding step: four per layer and one for the head, each cut into
//! fixed chunks that members take first come, first served. A product's inner dimension is cut
//! into chunks, each chunk's partial sums go to a buffer of its own, and the job that needs the
//! product adds the partials up in chunk order for the columns it uses: attention the query, key
//! and value columns of its head, the MLP its slice of the hidden layer, and the jobs that need
//! the whole residual stream (a few hundred values a row) all of it, every member alike.
//!
//! Why chunks and not a fixed share per member: a member the machine slows down (a shared
//! core, a thread just woken) takes fewer, instead of the team waiting for its share. With
//! fixed halves, the decoding thread of the 4 × 256 model waited for its helper about a tenth
//! of each step; with chunks and the fewer meetings, a step measured about 6% faster. Why the
//! fixed chunk order: the logits do not depend on which member took which chunk, nor on how
//! many members there are, so a seeded request gives the same text whatever the scheduling.

#![allow(unsafe_code)]

use crate::cpu_decode::{LayerSlices, Norm, SyncPtr};
use crate::cpu_kernels::{attend, layer_norm, sum_partials, Epilogue, Product};
use crate::cpu_team::Team;
use std::borrow::Cow;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Chunks of a product's inner dimension (and of the MLP's hidden layer) for a step of `rows`:
/// enough that the last one to finish is short, few enough that the partial sums (rows × the
/// product's columns each, written and read back) stay cheap next to the weights. Measured
/// steps of GPT-2 small with 8, 4 and 2 chunks: 16 rows 45.3, 44.3 and 42.7 ms, 8 rows 33.3,
/// 31.6 and 32.0 ms; on the 4 × 256 model one row 1.36, 1.33 and 1.33 ms.
fn chunks_for(rows: usize) -> usize {
    if rows > 8 {
        2
    } else {
        4
    }
}
/// Columns of the head per chunk (a multiple of a cache line of f32): each weight row is read in
/// runs of 25 KiB, which the prefetcher follows; runs of 6 KiB measured slower.
const HEAD_CHUNK: usize = 6288;

/// A step's buffers, kept by the decoding thread between steps: allocating them each step
/// would fault fresh pages in every time.
#[derive(Default)]
pub(crate) struct Workspace {
    /// Partial sums, a block per chunk; a job reads the buffer the job before it wrote and
    /// writes the other.
    ping: Vec<f32>,
    pong: Vec<f32>,
    /// Per member: its copy of the residual stream, then its normalised copy (rows × d each).
    own: Vec<f32>,
}

/// One layer's cache: where the new slot goes and how many slots a (row, head) has.
#[derive(Clone, Copy)]
pub(crate) struct CacheSlots {
    pub keys: SyncPtr,
    pub values: SyncPtr,
    pub cap: usize,
    pub start: usize,
}

/// Which cache slots a row may attend to; `None` when all of them.
pub(crate) type Visible<'v> = dyn Fn(usize) -> Option<&'v [bool]> + Sync + 'v;

/// Everything a step reads besides its input.
pub(crate) struct Step<'a> {
    pub team: &'a Team,
    pub rows: usize,
    pub d: usize,
    pub layers: &'a [LayerSlices<'a>],
    pub caches: &'a [CacheSlots],
    pub visible: &'a Visible<'a>,
    pub ln_f: &'a Norm<'a>,
    /// The tied head, `[d, vocab]`.
    pub head: &'a [f32],
    pub vocab: usize,
}

/// Partial sums waiting in a buffer: `parts` blocks of rows × `n`, and the bias that completes
/// them.
#[derive(Clone, Copy)]
struct Pending<'a> {
    at: SyncPtr,
    parts: usize,
    bias: &'a [f32],
}

impl Step<'_> {
    /// Runs every layer and the head on `x` (rows × d embeddings) and writes the rows × vocab
    /// logits at `out`, storing each layer's new keys and values in its cache slots.
    ///
    /// # Safety
    /// `out` must be valid for rows × vocab f32 writes that nothing else touches, and every
    /// [`CacheSlots`] must point at a `[rows, heads, cap, head_dim]` cache with `start < cap`.
    pub(crate) unsafe fn run(&self, x: &[f32], workspace: &mut Workspace, out: SyncPtr) {
        let (rows, d) = (self.rows, self.d);
        let inner = self.layers.first().map_or(0, |l| l.fc_b.len());
        let heads = self.layers.iter().map(|l| l.heads).max().unwrap_or(0);
        let chunks = chunks_for(rows);
        let ping = grown(&mut workspace.ping, chunks * rows * (3 * d).max(inner));
        let pong = grown(&mut workspace.pong, chunks.max(heads) * rows * d);
        let own = grown(&mut workspace.own, self.team.members() * 2 * rows * d);
        // The product waiting in `pong` to join the residual stream; none before the first layer.
        let mut residual: Option<Pending<'_>> = None;
        for (layer, &slots) in self.layers.iter().zip(self.caches) {
            let next = AtomicUsize::new(0);
            self.team.run(&|m, _| {
                // SAFETY: the ownership rules of each buffer (see `Workspace`, `own` and the
                // chunk claims); likewise in the jobs below.
                unsafe {
                    let (x_own, h) = self.own(own, m);
                    self.advance(x, x_own, h, residual);
                    normalise_rows(x_own, &layer.ln_1, d, h);
                    self.inner_chunks(&next, h, layer.attn_w, 3 * d, ping);
                }
            });
            let next = AtomicUsize::new(0);
            self.team.run(&|_, _| unsafe {
                while let Some(head) = claim(&next, layer.heads) {
                    self.attention_head(layer, head, slots, ping, pong);
                }
            });
            let attention = Pending {
                at: pong,
                parts: layer.heads,
                bias: layer.proj_b,
            };
            let next = AtomicUsize::new(0);
            self.team.run(&|m, _| unsafe {
                let (x_own, h) = self.own(own, m);
                self.advance(x, x_own, h, Some(attention));
                normalise_rows(x_own, &layer.ln_2, d, h);
                self.inner_chunks(&next, h, layer.fc_w, inner, ping);
            });
            let next = AtomicUsize::new(0);
            self.team.run(&|_, _| unsafe {
                while let Some(chunk) = claim(&next, chunks) {
                    self.mlp_chunk(layer, chunk, inner, ping, pong);
                }
            });
            residual = Some(Pending {
                at: pong,
                parts: chunks,
                bias: layer.mlp_b,
            });
        }
        let next = AtomicUsize::new(0);
        self.team.run(&|m, _| unsafe {
            let (x_own, h) = self.own(own, m);
            self.advance(x, x_own, h, residual);
            normalise_rows(x_own, self.ln_f, d, h);
            let head = Product {
                x: h,
                rows,
                w: self.head,
                n: self.vocab,
                bias: None,
                epilogue: Epilogue::None,
            };
            while let Some(chunk) = claim(&next, self.vocab.div_ceil(HEAD_CHUNK)) {
                let cols = chunk * HEAD_CHUNK..((chunk + 1) * HEAD_CHUNK).min(self.vocab);
                head.write_columns(cols, out.ptr());
            }
        });
    }

    /// Member `m`'s residual stream and its normalised copy.
    ///
    /// # Safety
    /// Only member `m` may call this, once per job.
    #[allow(clippy::mut_from_ref)]
    unsafe fn own(&self, own: SyncPtr, m: usize) -> (&mut [f32], &mut [f32]) {
        let len = self.rows * self.d;
        // SAFETY: block m of `own` (2 × rows × d) is member m's alone.
        unsafe {
            let at = own.ptr().add(m * 2 * len);
            (
                std::slice::from_raw_parts_mut(at, len),
                std::slice::from_raw_parts_mut(at.add(len), len),
            )
        }
    }

    /// Brings a member's residual stream up to date: the embeddings before the first layer,
    /// else `x += bias + Σ partials` of the product waiting (`scratch` is overwritten).
    ///
    /// # Safety
    /// No member writes the waiting partials during this job.
    unsafe fn advance(
        &self,
        embeddings: &[f32],
        x: &mut [f32],
        scratch: &mut [f32],
        waiting: Option<Pending<'_>>,
    ) {
        let Some(Pending { at, parts, bias }) = waiting else {
            x.copy_from_slice(embeddings);
            return;
        };
        let (rows, d) = (self.rows, self.d);
        // SAFETY: the caller's contract.
        let partials = unsafe { std::slice::from_raw_parts(at.ptr(), parts * rows * d) };
        sum_partials(partials, rows, d, Some(bias), Epilogue::None, 0..d, scratch);
        x.iter_mut().zip(&*scratch).for_each(|(a, b)| *a += b);
    }

    /// Claims chunks of the inner dimension of `h · w` (`w` is d × n) until none is left,
    /// writing chunk c's partial sums (rows × n) to block c at `partials`.
    ///
    /// # Safety
    /// The blocks are written only by the member that claims their chunk from `next`.
    unsafe fn inner_chunks(
        &self,
        next: &AtomicUsize,
        h: &[f32],
        w: &[f32],
        n: usize,
        partials: SyncPtr,
    ) {
        let (rows, d) = (self.rows, self.d);
        let chunks = chunks_for(rows);
        while let Some(chunk) = claim(next, chunks) {
            let band = chunk_of(d, chunk, chunks);
            let x = band_of(h.as_ptr(), rows, d, band.clone());
            // SAFETY: the caller's contract.
            unsafe { band_partial(&x, rows, w, n, band, partials.ptr().add(chunk * rows * n)) };
        }
    }

    /// Attention for one head of every row: finishes the head's query, key and value from the
    /// `c_attn` partials, stores the key and value in the cache, attends, and writes the head's
    /// partial sums of the output projection to block `head` of `out`.
    ///
    /// # Safety
    /// Only the member that claimed `head` may call this; nobody writes `qkv_partials` during
    /// the job.
    unsafe fn attention_head(
        &self,
        layer: &LayerSlices<'_>,
        head: usize,
        slots: CacheSlots,
        qkv_partials: SyncPtr,
        out: SyncPtr,
    ) {
        let (rows, d) = (self.rows, self.d);
        let hd = d / layer.heads;
        // SAFETY: the caller's contract.
        let partials = unsafe {
            std::slice::from_raw_parts(qkv_partials.ptr(), chunks_for(rows) * rows * 3 * d)
        };
        // This head's queries, keys and values, each rows × hd.
        let mut qkv = vec![0f32; 3 * rows * hd];
        for (part, dst) in qkv.chunks_exact_mut(rows * hd).enumerate() {
            let cols = part * d + head * hd..part * d + (head + 1) * hd;
            sum_partials(
                partials,
                rows,
                3 * d,
                Some(layer.attn_b),
                Epilogue::None,
                cols,
                dst,
            );
        }
        let (q, kv) = qkv.split_at(rows * hd);
        let (k_new, v_new) = kv.split_at(rows * hd);
        let CacheSlots {
            keys,
            values,
            cap,
            start,
        } = slots;
        let mut att = vec![0f32; rows * hd];
        let mut scores = Vec::with_capacity(start + 1);
        for (r, out) in att.chunks_exact_mut(hd).enumerate() {
            let new = r * hd..(r + 1) * hd;
            // SAFETY: head `head` of row r in the cache is this claim's alone; the cache holds
            // rows × heads × cap × hd f32 and start < cap (the caller's contract).
            unsafe {
                let base = (r * layer.heads + head) * cap * hd;
                let (k_all, v_all) = (keys.ptr().add(base), values.ptr().add(base));
                let at = start * hd;
                std::ptr::copy_nonoverlapping(k_new[new.clone()].as_ptr(), k_all.add(at), hd);
                std::ptr::copy_nonoverlapping(v_new[new.clone()].as_ptr(), v_all.add(at), hd);
                let k_all = std::slice::from_raw_parts(k_all, (start + 1) * hd);
                let v_all = std::slice::from_raw_parts(v_all, (start + 1) * hd);
                attend(&q[new], k_all, v_all, (self.visible)(r), &mut scores, out);
            }
        }
        let band = head * hd..(head + 1) * hd;
        // SAFETY: block `head` of `out` is this claim's alone.
        unsafe {
            band_partial(
                &att,
                rows,
                layer.proj_w,
                d,
                band,
                out.ptr().add(head * rows * d),
            )
        };
    }

    /// One chunk of the MLP: its slice of the hidden layer, finished from the `c_fc` partials
    /// and activated, then its partial sums of the output projection, to block `chunk` of `out`.
    ///
    /// # Safety
    /// Only the member that claimed `chunk` may call this; nobody writes `fc_partials` during
    /// the job.
    unsafe fn mlp_chunk(
        &self,
        layer: &LayerSlices<'_>,
        chunk: usize,
        inner: usize,
        fc_partials: SyncPtr,
        out: SyncPtr,
    ) {
        let (rows, d) = (self.rows, self.d);
        let chunks = chunks_for(rows);
        let band = chunk_of(inner, chunk, chunks);
        // SAFETY: the caller's contract.
        let partials =
            unsafe { std::slice::from_raw_parts(fc_partials.ptr(), chunks * rows * inner) };
        let mut hidden = vec![0f32; rows * band.len()];
        let bias = Some(layer.fc_b);
        sum_partials(
            partials,
            rows,
            inner,
            bias,
            layer.epilogue,
            band.clone(),
            &mut hidden,
        );
        // SAFETY: block `chunk` of `out` is this claim's alone.
        unsafe {
            band_partial(
                &hidden,
                rows,
                layer.mlp_w,
                d,
                band,
                out.ptr().add(chunk * rows * d),
            )
        };
    }
}

/// The next unclaimed of `count` chunks, if any.
fn claim(next: &AtomicUsize, count: usize) -> Option<usize> {
    let chunk = next.fetch_add(1, Ordering::Relaxed);
    (chunk < count).then_some(chunk)
}

/// Chunk `c` of `n` cut in `chunks`: the pieces differ in size by one at most.
fn chunk_of(n: usize, c: usize, chunks: usize) -> Range<usize> {
    n * c / chunks..n * (c + 1) / chunks
}

/// The partial sums `x · w[band]` into `block` (rows × n): `x` is the rows × |band| slice of
/// the input and `w` is `k × n`. An empty band writes zeros.
///
/// # Safety
/// `block` is valid for rows × n f32 writes that nothing else touches during the call.
unsafe fn band_partial(
    x: &[f32],
    rows: usize,
    w: &[f32],
    n: usize,
    band: Range<usize>,
    block: *mut f32,
) {
    if band.is_empty() {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(block, rows * n) }.fill(0.0);
        return;
    }
    let p = Product {
        x,
        rows,
        w: &w[band.start * n..band.end * n],
        n,
        bias: None,
        epilogue: Epilogue::None,
    };
    // SAFETY: the caller's contract.
    unsafe { p.write_columns(0..n, block) };
}

/// Columns `band` of the rows × width matrix at `src`, compact: borrowed when there is one row.
///
/// # Safety
/// `src` holds rows × width f32, not written while the result lives.
unsafe fn band_of<'a>(
    src: *const f32,
    rows: usize,
    width: usize,
    band: Range<usize>,
) -> Cow<'a, [f32]> {
    // SAFETY: the caller's contract.
    let row = |r: usize| unsafe {
        std::slice::from_raw_parts(src.add(r * width + band.start), band.len())
    };
    if rows == 1 {
        return row(0).into();
    }
    (0..rows).flat_map(row).copied().collect::<Vec<_>>().into()
}

/// The buffer resized to at least `len` f32, as a pointer the members share.
fn grown(buffer: &mut Vec<f32>, len: usize) -> SyncPtr {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    SyncPtr(buffer.as_mut_ptr())
}

fn normalise_rows(x: &[f32], norm: &Norm<'_>, d: usize, out: &mut [f32]) {
    for (row, dst) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        layer_norm(row, norm.weight, norm.bias, norm.eps, dst);
    }
}
