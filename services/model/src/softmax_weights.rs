//! Unnormalised softmax weights over a whole vocabulary and a draw from them, written so the
//! compiler vectorises them: sampling without top-k or top-p touches every one of ~50k logits
//! per row per step, and a scalar `f64::exp` loop plus a running-sum scan cost a small model
//! about a tenth of its decoding time.

#![allow(unsafe_code)]

use crate::cpu_kernels::with_avx2;

/// Elements per partial sum: the draw scans sums first, then one chunk.
const CHUNK: usize = 64;

/// `e^x` in f32 for the `x <= 0` a shifted softmax produces, to about one ulp (Cephes' `expf`
/// polynomial), and exactly 0 below -87 (so impossible tokens, at -inf, weigh nothing). No
/// branches or library calls, so a loop over it becomes SIMD code; results do not depend on
/// how it is vectorised, which keeps seeded sampling reproducible.
#[inline]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 · 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let clamped = x.max(-87.0);
    let shifted = clamped * LOG2E + ROUND;
    let n = shifted - ROUND;
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    let two_n = f32::from_bits(((n_bits + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        e_r * two_n
    }
}

/// Weights `exp((logit - max) · inv_temperature)` of every logit and their partial sums.
#[derive(Debug, Default)]
pub(crate) struct SoftmaxWeights {
    pub weights: Vec<f32>,
    chunk_sums: Vec<f64>,
    pub total: f64,
}

impl SoftmaxWeights {
    /// Fills the weights for `logits` (NaN already replaced, `max` their finite maximum).
    pub fn fill(&mut self, logits: &[f32], max: f32, inv_temperature: f32) {
        self.weights.clear();
        self.weights.resize(logits.len(), 0.0);
        self.chunk_sums.clear();
        self.chunk_sums.resize(logits.len().div_ceil(CHUNK), 0.0);
        fill_weights(
            logits,
            max,
            inv_temperature,
            &mut self.weights,
            &mut self.chunk_sums,
        );
        self.total = self.chunk_sums.iter().sum();
    }

    /// The index whose cumulative weight first passes `u · total` (`u` in [0, 1)); rounding
    /// that leaves the target past the end picks the last index with weight.
    pub fn draw(&self, u: f64) -> usize {
        let target = u * self.total;
        let mut mass = 0.0;
        for (chunk, &sum) in self.chunk_sums.iter().enumerate() {
            if target < mass + sum {
                let start = chunk * CHUNK;
                let end = (start + CHUNK).min(self.weights.len());
                for (i, &w) in self.weights[start..end].iter().enumerate() {
                    mass += f64::from(w);
                    if target < mass {
                        return start + i;
                    }
                }
                // The chunk's sum was added in another order: rounding may leave the target
                // just past its running sum. Its last weighted index is the right pick then.
                return start
                    + self.weights[start..end]
                        .iter()
                        .rposition(|&w| w > 0.0)
                        .unwrap_or(0);
            }
            mass += sum;
        }
        self.weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
    }
}

with_avx2! {
    /// The weights and each chunk's sum.
    fn fill_weights(
        logits: &[f32],
        max: f32,
        inv_temperature: f32,
        weights: &mut [f32],
        chunk_sums: &mut [f64],
    ) {
        for (w, &l) in weights.iter_mut().zip(logits) {
            *w = exp_nonpositive((l - max) * inv_temperature);
        }
        for (sum, chunk) in chunk_sums.iter_mut().zip(weights.chunks(CHUNK)) {
            *sum = lane_sum(chunk);
        }
    }
}

/// Sum of `values` in f64 over eight independent lanes: a single running sum is one long
/// dependency chain the compiler may not reorder; lanes let it use SIMD, and the fixed order
/// keeps the result the same on every run.
#[inline(always)]
fn lane_sum(values: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let mut groups = values.chunks_exact(8);
    for group in &mut groups {
        for (lane, &v) in lanes.iter_mut().zip(group) {
            *lane += f64::from(v);
        }
    }
    for (lane, &v) in lanes.iter_mut().zip(groups.remainder()) {
        *lane += f64::from(v);
    }
    let mut sum = 0.0;
    for lane in lanes {
        sum += lane;
    }
    sum
}

/// Largest of `values` (-inf for none), over eight lanes for the same reason as `lane_sum`.
pub(crate) fn lane_max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut groups = values.chunks_exact(8);
    for group in &mut groups {
        for (lane, &v) in lanes.iter_mut().zip(group) {
            *lane = if v > *lane { v } else { *lane };
        }
    }
    for (lane, &v) in lanes.iter_mut().zip(groups.remainder()) {
        *lane = if v > *lane { v } else { *lane };
    }
    lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_f64_exp_to_a_few_ulp_and_is_zero_for_impossible_tokens() {
        let mut worst = 0.0f64;
        let mut x = 0.0f32;
        while x > -87.0 {
            let exact = f64::from(x).exp();
            let got = f64::from(exp_nonpositive(x));
            worst = worst.max(((got - exact) / exact).abs());
            x -= 0.000_73;
        }
        assert!(
            worst < 4.0 * f64::from(f32::EPSILON),
            "relative error {worst}"
        );
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-88.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn draw_follows_the_cumulative_weights_across_chunks() {
        let logits: Vec<f32> = (0..1000).map(|i| -((i % 37) as f32) / 5.0).collect();
        let mut s = SoftmaxWeights::default();
        s.fill(&logits, 0.0, 1.0);
        let direct: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        assert!((s.total - direct).abs() / direct < 1e-6);
        // Every target lands on the index a plain running sum gives.
        for k in 0..500 {
            let u = f64::from(k) / 500.0;
            let target = u * s.total;
            let mut mass = 0.0;
            let expected = s
                .weights
                .iter()
                .position(|&w| {
                    mass += f64::from(w);
                    target < mass
                })
                .unwrap();
            assert_eq!(s.draw(u), expected, "u {u}");
        }
    }

    #[test]
    fn draw_never_picks_a_token_without_weight() {
        let mut logits = vec![f32::NEG_INFINITY; 300];
        logits[17] = 0.0;
        logits[250] = -1.0;
        let mut s = SoftmaxWeights::default();
        s.fill(&logits, 0.0, 1.0);
        for k in 0..100 {
            let picked = s.draw(f64::from(k) / 100.0);
            assert!(picked == 17 || picked == 250, "{picked}");
        }
        // A target rounded past the end falls back to the last weighted index.
        assert_eq!(s.draw(1.0), 250);
    }
}
