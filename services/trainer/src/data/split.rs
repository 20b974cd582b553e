//! Deterministic train/validation split: the same seed and document count give the same
//! split on every machine and every version (no dependence on a RNG crate's algorithm), so a
//! resumed run validates on the documents it validated on before.

/// Fraction of documents held out when a request does not say (as the original project).
pub const DEFAULT_EVAL_FRACTION: f64 = 0.05;

/// Splits `0..n` into (train, eval), both ascending.
///
/// The eval set is the `round(n * fraction)` indices with the smallest `mix(seed, index)`,
/// at least 1 when `fraction > 0` and `n >= 2`, and never all of them (training needs one
/// document). `fraction` is clamped to `[0, 1]`.
pub fn split_indices(n: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let fraction = if fraction.is_finite() {
        fraction.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let mut n_eval = (n as f64 * fraction).round() as usize;
    if fraction > 0.0 && n >= 2 {
        n_eval = n_eval.max(1);
    }
    n_eval = n_eval.min(n.saturating_sub(1));
    let mut order: Vec<(u64, usize)> = (0..n).map(|i| (mix(seed, i as u64), i)).collect();
    order.sort_unstable();
    let mut eval: Vec<usize> = order[..n_eval].iter().map(|&(_, i)| i).collect();
    let mut train: Vec<usize> = order[n_eval..].iter().map(|&(_, i)| i).collect();
    eval.sort_unstable();
    train.sort_unstable();
    (train, eval)
}

/// SplitMix64 finaliser over (seed, index): a fixed, well-mixed hash.
fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(index)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_a_deterministic_partition() {
        let (train, eval) = split_indices(1000, 0.05, 7);
        assert_eq!(eval.len(), 50);
        assert_eq!(train.len(), 950);
        let mut all: Vec<usize> = train.iter().chain(&eval).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        assert_eq!(split_indices(1000, 0.05, 7), (train, eval.clone()));
        assert_ne!(split_indices(1000, 0.05, 8).1, eval);
    }

    #[test]
    fn small_sets_keep_one_of_each() {
        assert_eq!(split_indices(0, 0.05, 1), (vec![], vec![]));
        assert_eq!(split_indices(1, 0.05, 1), (vec![0], vec![]));
        let (train, eval) = split_indices(2, 0.05, 1);
        assert_eq!((train.len(), eval.len()), (1, 1));
        let (train, eval) = split_indices(3, 0.99, 1);
        assert_eq!((train.len(), eval.len()), (1, 2));
        assert_eq!(split_indices(5, 0.0, 1).1, Vec::<usize>::new());
    }
}
