//! The arithmetic of one fused CPU decoding step over plain f32 slices: a matrix product over a
//! column range of HF's `[in, out]` weights for a few rows, LayerNorm, GPT-2's activations and
//! single-query attention over the KV cache. Each is written so the compiler vectorises it;
//! the products read every weight once per step whatever the number of rows, which is what
//! bounds decoding speed.

#![allow(unsafe_code)]

use crate::softmax_weights::exp_nonpositive;
use std::ops::Range;

/// Most rows the single-sweep product takes; [`max_rows`] is the limit for callers.
pub(crate) const MAX_ROWS: usize = 4;

/// Most rows a [`Product`] takes on this CPU: past [`MAX_ROWS`], only the register-blocked
/// kernels, which need AVX2 and FMA, beat libtorch's matrix products.
pub(crate) fn max_rows() -> usize {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        return crate::cpu_tiles::MAX_ROWS;
    }
    MAX_ROWS
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// Defines `fn $name(args) $body`, with the body compiled twice: as written, and with AVX2 and
/// FMA, which run where the CPU has them. The same operations in the same order (Rust never
/// fuses a multiply and an add on its own), so the same results, in wider vectors. Bodies use
/// plain loops: an iterator adapter's `fold` is a function of its own, which would not be
/// compiled with the wider vectors.
macro_rules! with_avx2 {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn portable($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            if $crate::cpu_kernels::has_avx2_fma() {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) {
                    portable($($arg),*)
                }
                // SAFETY: the features were just detected.
                unsafe { wide($($arg),*) };
                return;
            }
            portable($($arg),*)
        }
    };
}
pub(crate) use with_avx2;

/// What follows the sum of a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Epilogue {
    None,
    /// GPT-2's tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
}

impl Epilogue {
    #[inline(always)]
    pub(crate) fn apply(self, values: &mut [f32]) {
        match self {
            Epilogue::None => {}
            Epilogue::GeluTanh => values.iter_mut().for_each(|v| *v = gelu_tanh(*v)),
            Epilogue::Relu => values.iter_mut().for_each(|v| *v = v.max(0.0)),
        }
    }
}

/// `epilogue(bias + x · w)` for a few rows: `x` is `rows × k`, `w` is `k × n` row-major (HF's
/// Conv1D layout).
#[derive(Clone, Copy)]
pub(crate) struct Product<'a> {
    pub x: &'a [f32],
    pub rows: usize,
    pub w: &'a [f32],
    pub n: usize,
    pub bias: Option<&'a [f32]>,
    pub epilogue: Epilogue,
}

impl Product<'_> {
    /// Writes columns `cols` of the `rows × n` result at `out`; `rows` is at most [`max_rows`].
    ///
    /// # Safety
    /// `out` must be valid for writes of `rows × n` f32 and no other thread may touch columns
    /// `cols` of it during the call.
    pub(crate) unsafe fn write_columns(&self, cols: Range<usize>, out: *mut f32) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            if self.rows > MAX_ROWS {
                // SAFETY: the features were just detected; the contract is the caller's.
                unsafe { crate::cpu_tiles::write_columns(self, cols, out) };
            } else {
                // SAFETY: as above.
                unsafe { write_columns_avx2(self, cols, out) };
            }
            return;
        }
        // SAFETY: the caller's contract.
        unsafe { write_columns_portable(self, cols, out) }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn write_columns_avx2(p: &Product<'_>, cols: Range<usize>, out: *mut f32) {
    // SAFETY: forwarded contract; the body is compiled again with the wider instructions.
    unsafe { write_columns_portable(p, cols, out) }
}

#[inline(always)]
unsafe fn write_columns_portable(p: &Product<'_>, cols: Range<usize>, out: *mut f32) {
    let Product {
        x,
        rows,
        w,
        n,
        bias,
        epilogue,
    } = *p;
    assert!(rows <= MAX_ROWS);
    let k = x.len() / rows.max(1);
    assert!(x.len() == rows * k && w.len() >= k * n && cols.end <= n);
    let (c0, c1) = (cols.start, cols.end);
    let width = c1.saturating_sub(c0);
    // The sums accumulate in place in `out`; the weights stream row after row, in order.
    let mut sums: [&mut [f32]; MAX_ROWS] = Default::default();
    for (r, slot) in sums.iter_mut().enumerate().take(rows) {
        // SAFETY: row r, columns c0..c1 of `out` are this call's to write (caller's contract).
        let row = unsafe { std::slice::from_raw_parts_mut(out.add(r * n + c0), width) };
        match bias {
            Some(bias) => row.copy_from_slice(&bias[c0..c1]),
            None => row.fill(0.0),
        }
        *slot = row;
    }
    let mut i = 0;
    while i + 4 <= k {
        let w0 = &w[i * n + c0..i * n + c1];
        let w1 = &w[(i + 1) * n + c0..(i + 1) * n + c1];
        let w2 = &w[(i + 2) * n + c0..(i + 2) * n + c1];
        let w3 = &w[(i + 3) * n + c0..(i + 3) * n + c1];
        for (r, row) in sums.iter_mut().enumerate().take(rows) {
            let xr = &x[r * k + i..r * k + i + 4];
            let (x0, x1, x2, x3) = (xr[0], xr[1], xr[2], xr[3]);
            for ((((s, &p), &q), &u), &v) in row.iter_mut().zip(w0).zip(w1).zip(w2).zip(w3) {
                *s += x0 * p + x1 * q + x2 * u + x3 * v;
            }
        }
        i += 4;
    }
    for i in i..k {
        let wi = &w[i * n + c0..i * n + c1];
        for (r, row) in sums.iter_mut().enumerate().take(rows) {
            let xi = x[r * k + i];
            row.iter_mut().zip(wi).for_each(|(s, &p)| *s += xi * p);
        }
    }
    for row in sums.iter_mut().take(rows) {
        epilogue.apply(row);
    }
}

with_avx2! {
    /// `dst[r][c - cols.start] = epilogue(bias[c] + Σ_p partials[p][r][c])` for `c` in `cols`:
    /// the sums of a product whose inner dimension was cut into chunks (`partials` is
    /// `parts × rows × n`), added in chunk order, into the compact `rows × |cols|` `dst`.
    pub(crate) fn sum_partials(
        partials: &[f32],
        rows: usize,
        n: usize,
        bias: Option<&[f32]>,
        epilogue: Epilogue,
        cols: Range<usize>,
        dst: &mut [f32],
    ) {
        let parts = partials.len() / (rows * n).max(1);
        let width = cols.len();
        for (r, dst) in dst.chunks_exact_mut(width.max(1)).enumerate().take(rows) {
            match bias {
                Some(bias) => dst.copy_from_slice(&bias[cols.clone()]),
                None => dst.fill(0.0),
            }
            for p in 0..parts {
                let part = &partials[(p * rows + r) * n..][cols.clone()];
                dst.iter_mut().zip(part).for_each(|(d, &v)| *d += v);
            }
            epilogue.apply(dst);
        }
    }
}

/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, as `torch.nn.functional.gelu(approximate="tanh")`.
#[inline]
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)))
}

/// `tanh(u) = ±(1 − e)/(1 + e)` with `e = e^(−2|u|) ≤ 1`: no branches or library calls, so the
/// activation of a hidden layer becomes SIMD code (libm's `tanhf` was a twentieth of a
/// 16-row step of GPT-2 small). Within 1e-7 of `tanh` everywhere.
#[inline]
fn tanh(u: f32) -> f32 {
    let e = exp_nonpositive(-2.0 * u.abs());
    ((1.0 - e) / (1.0 + e)).copysign(u)
}

/// LayerNorm of one row into `out`, statistics in f64 like libtorch's CPU kernel accumulates.
pub(crate) fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], eps: f64, out: &mut [f32]) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = x
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    let rstd = 1.0 / (var + eps).sqrt();
    let (mean, rstd) = (mean as f32, rstd as f32);
    for (((o, &v), &g), &b) in out.iter_mut().zip(x).zip(weight).zip(bias) {
        *o = (v - mean) * rstd * g + b;
    }
}

with_avx2! {
    /// One query against `slots` cached keys and values of one head (`[slots, head_dim]` each,
    /// contiguous): softmax(q·kᵀ/√d) · v into `out`, skipping slots whose `visible` is false.
    pub(crate) fn attend(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        visible: Option<&[bool]>,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let d = q.len();
        let slots = keys.len() / d;
        let scale = 1.0 / (d as f32).sqrt();
        scores.clear();
        scores.resize(slots, 0.0);
        for (t, (s, k)) in scores.iter_mut().zip(keys.chunks_exact(d)).enumerate() {
            // Each head's keys and values are short runs (a few KiB) that the hardware
            // prefetcher barely starts on before they end; ask for keys a few slots ahead, and
            // for this slot's values, which the weighted sum below reads next. Measured on
            // GPT-2 small, 16 rows: 45.1 → 42.6 ms a step (medians of 3, alternating).
            let key_ahead = keys.as_ptr().wrapping_add((t + KEYS_AHEAD) * d);
            let value = values.as_ptr().wrapping_add(t * d);
            for line in (0..d).step_by(FLOATS_PER_LINE) {
                prefetch(key_ahead.wrapping_add(line));
                prefetch(value.wrapping_add(line));
            }
            *s = if visible.is_some_and(|v| !v[t]) {
                f32::NEG_INFINITY
            } else {
                dot(q, k) * scale
            };
        }
        let mut max = f32::NEG_INFINITY;
        for &s in scores.iter() {
            max = max.max(s);
        }
        let mut total = 0f32;
        for s in scores.iter_mut() {
            *s = exp_nonpositive(*s - max);
            total += *s;
        }
        out.fill(0.0);
        for (&p, v) in scores.iter().zip(values.chunks_exact(d)) {
            if p != 0.0 {
                let p = p / total;
                for (o, &x) in out.iter_mut().zip(v) {
                    *o += p * x;
                }
            }
        }
    }
}

/// Slots ahead of the one being scored whose keys are requested from memory.
const KEYS_AHEAD: usize = 8;
/// f32 values in a 64-byte cache line.
pub(crate) const FLOATS_PER_LINE: usize = 16;

/// Asks the CPU to bring the cache line holding `at` into L1 ahead of use. A prefetch never
/// faults and changes no value, so `at` may lie past the end of a slice (it is formed with
/// wrapping arithmetic and never read).
#[inline(always)]
pub(crate) fn prefetch(at: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it reads nothing architecturally and cannot fault.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// A dot product with eight independent sums, so it vectorises without fast-math.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (x, y) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in a[chunks..].iter().zip(&b[chunks..]) {
        tail += x * y;
    }
    let mut sum = 0f32;
    for lane in lanes {
        sum += lane;
    }
    sum + tail
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn reference_product(x: &[f32], rows: usize, w: &[f32], n: usize, bias: &[f32]) -> Vec<f64> {
        let k = x.len() / rows;
        let mut out = vec![0f64; rows * n];
        for r in 0..rows {
            for c in 0..n {
                out[r * n + c] = f64::from(bias[c])
                    + (0..k)
                        .map(|i| f64::from(x[r * k + i]) * f64::from(w[i * n + c]))
                        .sum::<f64>();
            }
        }
        out
    }

    /// Writes a `rows × k` by `k × n` product with a bias in two column ranges through `write`,
    /// and asserts the result is the f64 reference's within 1e-4 everywhere.
    pub(crate) fn assert_product_in_two_ranges(
        (rows, k, n): (usize, usize, usize),
        what: &str,
        write: impl Fn(&Product<'_>, Range<usize>, *mut f32),
    ) {
        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
            .collect();
        let w: Vec<f32> = (0..k * n)
            .map(|i| ((i * 11 % 17) as f32 - 8.0) * 0.05)
            .collect();
        let bias: Vec<f32> = (0..n).map(|i| (i % 5) as f32 * 0.01).collect();
        let product = Product {
            x: &x,
            rows,
            w: &w,
            n,
            bias: Some(&bias),
            epilogue: Epilogue::None,
        };
        let mut out = vec![f32::NAN; rows * n];
        for cols in [0..1000, 1000..n] {
            write(&product, cols, out.as_mut_ptr());
        }
        let expected = reference_product(&x, rows, &w, n, &bias);
        for (i, (&got, &want)) in out.iter().zip(&expected).enumerate() {
            assert!(
                (f64::from(got) - want).abs() < 1e-4,
                "{what}, element {i}: {got} vs {want}"
            );
        }
    }

    #[allow(unsafe_code)]
    #[test]
    fn column_ranges_of_a_product_assemble_the_whole_product() {
        // k not a multiple of 4 and n not a multiple of the block, to cover every tail.
        assert_product_in_two_ranges((3, 67, 2085), "3 rows", |product, cols, out| {
            // SAFETY: `out` holds rows × n values and the calls write disjoint columns.
            unsafe { product.write_columns(cols, out) }
        });
    }

    #[test]
    fn gelu_tanh_matches_its_formula_in_f64() {
        for i in -400..400 {
            let x = i as f32 * 0.02;
            let xf = f64::from(x);
            let want = 0.5
                * xf
                * (1.0
                    + ((2.0 / std::f64::consts::PI).sqrt() * (xf + 0.044715 * xf.powi(3))).tanh());
            assert!((f64::from(gelu_tanh(x)) - want).abs() < 1e-6, "x = {x}");
        }
    }

    #[test]
    fn attention_ignores_hidden_slots_and_weights_the_rest_by_softmax() {
        let q = [1.0f32, 0.0, 0.0, 0.0];
        // Three slots; the middle one would dominate but is hidden.
        let keys = [
            0.0f32, 0.0, 0.0, 0.0, 50.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0,
        ];
        let values = [
            1.0f32, 0.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0,
        ];
        let mut out = [0f32; 4];
        attend(
            &q,
            &keys,
            &values,
            Some(&[true, false, true]),
            &mut Vec::new(),
            &mut out,
        );
        // scores 0 and 2/√4 = 1 → weights 1/(1+e) and e/(1+e)
        let e = std::f32::consts::E;
        let expected = [1.0 / (1.0 + e), 0.0, e / (1.0 + e), 0.0];
        for (o, x) in out.iter().zip(expected) {
            assert!((o - x).abs() < 1e-6, "{out:?} vs {expected:?}");
        }
    }

    #[test]
    fn layer_norm_centres_and_scales_a_row() {
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let mut out = [0f32; 4];
        layer_norm(&x, &[2.0; 4], &[1.0; 4], 0.0, &mut out);
        let rstd = 1.0 / 1.25f32.sqrt();
        for (o, v) in out.iter().zip(x) {
            assert!((o - ((v - 2.5) * rstd * 2.0 + 1.0)).abs() < 1e-6);
        }
    }
}
