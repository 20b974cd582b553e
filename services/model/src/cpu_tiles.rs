//! The product of 5 to 16 rows on AVX-512 or AVX2 with FMA. Each weight vector loaded serves a
//! group of rows from registers, so a step of 16 rows costs about the arithmetic of its products
//! instead of 16 passes over the weights, and no packed copy of the weights is made: columns go
//! in tiles, and each pass over a tile reads a few weight rows in long, in-order runs.

#![allow(unsafe_code)]

use crate::cpu_kernels::{prefetch, Product, FLOATS_PER_LINE};
use std::arch::x86_64::*;
use std::ops::Range;

/// Most rows these kernels take. Measured on GPT-2 small (2 cores, AVX-512), a decode step
/// against libtorch's: 8 rows 40 against 45–49 ms, 16 rows 50–55 against 56–66 ms, 32 rows
/// 92–94 against 81–102 ms, 64 rows 158–163 against 119–136 ms: past 16, libtorch's packed
/// matrix products are as fast or faster.
pub(crate) const MAX_ROWS: usize = 16;
/// Weight rows per pass over a column block: the block's sums go back to memory after each
/// pass, which is cheap next to the multiply-adds of 16 weight rows.
const ROWS_PER_PASS: usize = 16;
/// The sums of one column tile, every row: they stay in L2, and the tile is wide enough that
/// each weight row is read in runs of kilobytes, which the prefetcher follows. Tiles sized for
/// L1 (24 KiB) made the weight reads short strided runs and measured 30% slower.
const TILE_SUM_BYTES: usize = 256 << 10;

/// As [`Product::write_columns`], for any number of rows, with the widest vectors the CPU has.
///
/// # Safety
/// The CPU has AVX2 and FMA; `out` is valid for `rows × n` f32 and columns `cols` of it are
/// this call's alone.
pub(crate) unsafe fn write_columns(p: &Product<'_>, cols: Range<usize>, out: *mut f32) {
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was just detected; the rest is the caller's contract.
        unsafe { write_columns_avx512(p, cols, out) }
    } else {
        // SAFETY: the caller's contract.
        unsafe { write_columns_avx2(p, cols, out) }
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn write_columns_avx512(p: &Product<'_>, cols: Range<usize>, out: *mut f32) {
    // SAFETY: forwarded contract.
    unsafe { tiles::<Avx512>(p, cols, out) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn write_columns_avx2(p: &Product<'_>, cols: Range<usize>, out: *mut f32) {
    // SAFETY: forwarded contract.
    unsafe { tiles::<Avx2>(p, cols, out) }
}

/// A register-blocked kernel: `BLOCK` columns by up to `GROUP` rows of sums held in registers.
trait Kernel {
    const BLOCK: usize;
    const GROUP: usize;
    /// # Safety
    /// The kernel's features are present; `at` lies inside its slices and `rows ≤ GROUP`.
    unsafe fn accumulate(at: &Block, rows: usize);
}

#[inline(always)]
unsafe fn tiles<K: Kernel>(p: &Product<'_>, cols: Range<usize>, out: *mut f32) {
    let Product {
        x,
        rows,
        w,
        n,
        bias,
        epilogue,
    } = *p;
    let k = x.len() / rows.max(1);
    assert!(x.len() == rows * k && w.len() >= k * n && cols.end <= n);
    let tile = (TILE_SUM_BYTES / (rows.max(1) * 4)).max(K::BLOCK) / K::BLOCK * K::BLOCK;
    let mut t0 = cols.start;
    while t0 < cols.end {
        let t1 = (t0 + tile).min(cols.end);
        // SAFETY: row r, columns t0..t1 of `out` are this call's to write (caller's contract).
        let row =
            |r: usize| unsafe { std::slice::from_raw_parts_mut(out.add(r * n + t0), t1 - t0) };
        for r in 0..rows {
            match bias {
                Some(bias) => row(r).copy_from_slice(&bias[t0..t1]),
                None => row(r).fill(0.0),
            }
        }
        let blocked = t0 + (t1 - t0) / K::BLOCK * K::BLOCK;
        let mut k0 = 0;
        while k0 < k {
            let ks = k0..(k0 + ROWS_PER_PASS).min(k);
            for column in (t0..blocked).step_by(K::BLOCK) {
                prefetch_weights(
                    w,
                    n,
                    ks.clone(),
                    column + PREFETCH_AHEAD * K::BLOCK,
                    K::BLOCK,
                );
                let mut r0 = 0;
                while r0 < rows {
                    let group = (rows - r0).min(K::GROUP);
                    let at = Block {
                        x: x.as_ptr(),
                        k,
                        w: w.as_ptr(),
                        n,
                        ks: ks.clone(),
                        column,
                        out,
                        row: r0,
                    };
                    // SAFETY: rows r0..r0+group and columns column..column+BLOCK lie inside
                    // the asserted sizes (column + BLOCK ≤ blocked ≤ t1) and are this call's.
                    unsafe { K::accumulate(&at, group) };
                    r0 += group;
                }
            }
            k0 = ks.end;
        }
        // The last columns of the tile, fewer than a block.
        for i in 0..k {
            let wi = &w[i * n + blocked..i * n + t1];
            for r in 0..rows {
                let xi = x[r * k + i];
                let sums = &mut row(r)[blocked - t0..];
                sums.iter_mut()
                    .zip(wi)
                    .for_each(|(s, &v)| *s = xi.mul_add(v, *s));
            }
        }
        for r in 0..rows {
            epilogue.apply(row(r));
        }
        t0 = t1;
    }
}

/// Blocks ahead of the one being multiplied whose weights are requested from memory. A pass
/// reads 16 weight rows at once, each in a run that crosses a 4 KiB page every 21 blocks, where
/// the hardware prefetcher stops and starts again; without this, over half of the kernel's time
/// went to its weight loads. Measured on GPT-2 small (2 cores, AVX-512, medians of 3 runs of
/// 128 steps, alternating): 16 rows 46.6 → 37.6 ms a step, 8 rows 41.2 → 36.3 ms; 4 blocks
/// ahead measured 44.6, 8 blocks 50.0, 1 block 52.1 against 45.9 for 2 in a noisier run.
const PREFETCH_AHEAD: usize = 2;

/// Requests columns `column..column + width` of weight rows `ks`. Past a row's end this asks
/// for the next row's first columns, or for memory past `w`: a prefetch never faults, so no
/// bounds are checked on this hot path.
#[inline(always)]
fn prefetch_weights(w: &[f32], n: usize, ks: Range<usize>, column: usize, width: usize) {
    for i in ks {
        let row = w.as_ptr().wrapping_add(i * n + column);
        for line in (0..width).step_by(FLOATS_PER_LINE) {
            prefetch(row.wrapping_add(line));
        }
    }
}

/// One register block: rows `row..`, columns `column..column + BLOCK`, weight rows `ks`.
struct Block {
    x: *const f32,
    k: usize,
    w: *const f32,
    n: usize,
    ks: Range<usize>,
    column: usize,
    out: *mut f32,
    row: usize,
}

/// Defines a kernel over one vector type: three vectors of columns, `$group` rows at most.
macro_rules! register_kernel {
    ($kernel:ident, $feature:literal, $vector:ty, $lanes:literal, $group:literal,
     $zero:ident, $load:ident, $store:ident, $splat:ident, $fma:ident) => {
        struct $kernel;

        impl $kernel {
            /// `out[rows][columns] += Σ_ks x[rows][i] · w[i][columns]`, sums in registers.
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn rows<const R: usize>(at: &Block) {
                let Block {
                    x,
                    k,
                    w,
                    n,
                    column,
                    out,
                    row,
                    ..
                } = *at;
                // SAFETY: the caller's contract covers every pointer formed below.
                unsafe {
                    let mut acc: [[$vector; 3]; R] = [[$zero(); 3]; R];
                    for (r, sums) in acc.iter_mut().enumerate() {
                        let o = out.add((row + r) * n + column);
                        for (v, sum) in sums.iter_mut().enumerate() {
                            *sum = $load(o.add($lanes * v));
                        }
                    }
                    for i in at.ks.clone() {
                        let wi = w.add(i * n + column);
                        let (w0, w1, w2) =
                            ($load(wi), $load(wi.add($lanes)), $load(wi.add(2 * $lanes)));
                        for (r, sums) in acc.iter_mut().enumerate() {
                            let xi = $splat(*x.add((row + r) * k + i));
                            sums[0] = $fma(xi, w0, sums[0]);
                            sums[1] = $fma(xi, w1, sums[1]);
                            sums[2] = $fma(xi, w2, sums[2]);
                        }
                    }
                    for (r, sums) in acc.iter().enumerate() {
                        let o = out.add((row + r) * n + column);
                        for (v, sum) in sums.iter().enumerate() {
                            $store(o.add($lanes * v), *sum);
                        }
                    }
                }
            }
        }

        impl Kernel for $kernel {
            const BLOCK: usize = 3 * $lanes;
            const GROUP: usize = $group;

            #[inline(always)]
            unsafe fn accumulate(at: &Block, rows: usize) {
                // SAFETY: the trait's contract; each arm's R is at most GROUP.
                unsafe {
                    match rows {
                        1 => Self::rows::<1>(at),
                        2 => Self::rows::<2>(at),
                        3 => Self::rows::<3>(at),
                        4 => Self::rows::<4>(at),
                        5 if $group >= 5 => Self::rows::<5>(at),
                        6 if $group >= 6 => Self::rows::<6>(at),
                        7 if $group >= 7 => Self::rows::<7>(at),
                        _ if $group >= 8 => Self::rows::<8>(at),
                        _ => unreachable!("a group has at most {} rows", $group),
                    }
                }
            }
        }
    };
}

// 16 vector registers: 12 sums, three weight vectors and the broadcast row value.
register_kernel!(
    Avx2,
    "avx2,fma",
    __m256,
    8,
    4,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps
);
// 32 vector registers: 24 sums, three weight vectors and the broadcast row values.
register_kernel!(
    Avx512,
    "avx512f",
    __m512,
    16,
    8,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_kernels::tests::assert_product_in_two_ranges;

    /// Every kernel this CPU can run against an f64 reference: groups of every size, column
    /// tails, several tiles and a bias.
    #[test]
    fn each_kernel_matches_the_reference_product() {
        type KernelFn = unsafe fn(&Product<'_>, Range<usize>, *mut f32);
        let kernels: [(&str, bool, KernelFn); 2] = [
            (
                "avx2",
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"),
                write_columns_avx2,
            ),
            (
                "avx512",
                std::is_x86_feature_detected!("avx512f"),
                write_columns_avx512,
            ),
        ];
        // n = 9000: two tiles of 16 rows (4096 columns each) and a tail shorter than a block.
        for shape in [(5, 67, 2085), (13, 33, 2085), (16, 70, 9000)] {
            for (name, available, kernel) in kernels {
                if available {
                    let what = format!("{name}, {} rows", shape.0);
                    assert_product_in_two_ranges(shape, &what, |product, cols, out| {
                        // SAFETY: the kernel's features were detected; `out` holds rows × n
                        // values and the calls write disjoint columns.
                        unsafe { kernel(product, cols, out) }
                    });
                }
            }
        }
    }
}
