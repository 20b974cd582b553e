//! Learning-rate schedule and the fp16 loss scaler: both pure functions of counters that a
//! checkpoint stores, so a resumed run continues on the same curve.

use serde::{Deserialize, Serialize};

/// Linear warm-up to the peak, then linear decay to zero at `total_steps` (the original
/// project's `get_linear_schedule_with_warmup`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearSchedule {
    pub peak: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LinearSchedule {
    /// Rate of the update that takes the run from `step` to `step + 1` updates done. Unlike
    /// Hugging Face's, the first update already has a non-zero rate (peak / warmup): an update
    /// at rate 0 is a wasted step.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps);
        if decay_steps == 0 {
            return self.peak;
        }
        let left = self.total_steps.saturating_sub(step) as f64;
        self.peak * (left / decay_steps as f64).clamp(0.0, 1.0)
    }
}

/// Dynamic loss scaling for fp16 autocast on CUDA (what PyTorch's GradScaler does): the loss
/// is multiplied before backward so small gradients do not flush to zero in half precision;
/// a step whose gradients overflow is skipped and the scale halved; after `GROWTH_INTERVAL`
/// clean steps it doubles. Disabled (scale 1, never skips) on CPU, which trains in f32.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub enabled: bool,
    pub scale: f64,
    pub clean_steps: u64,
}

const INITIAL_SCALE: f64 = 65_536.0;
const GROWTH_INTERVAL: u64 = 2_000;

impl LossScaler {
    pub fn new(enabled: bool) -> Self {
        LossScaler {
            enabled,
            scale: if enabled { INITIAL_SCALE } else { 1.0 },
            clean_steps: 0,
        }
    }

    /// Records a step's gradient norm; returns whether the update may be applied.
    pub fn update(&mut self, grad_norm: f64) -> bool {
        if !self.enabled {
            return true;
        }
        if !grad_norm.is_finite() {
            self.scale = (self.scale / 2.0).max(1.0);
            self.clean_steps = 0;
            return false;
        }
        self.clean_steps += 1;
        if self.clean_steps >= GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.clean_steps = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_decays_to_zero() {
        let s = LinearSchedule {
            peak: 1.0,
            warmup_steps: 4,
            total_steps: 12,
        };
        let lrs: Vec<f64> = (0..13).map(|i| s.lr(i)).collect();
        assert_eq!(&lrs[..4], &[0.25, 0.5, 0.75, 1.0]);
        assert_eq!(lrs[4], 1.0);
        assert!(lrs.windows(2).skip(4).all(|w| w[1] < w[0] || w[1] == 0.0));
        assert_eq!(lrs[8], 0.5);
        assert_eq!(lrs[12], 0.0);
        assert!(lrs[11] > 0.0);
    }

    #[test]
    fn no_decay_room_keeps_the_peak() {
        let s = LinearSchedule {
            peak: 2.0,
            warmup_steps: 10,
            total_steps: 5,
        };
        assert_eq!(s.lr(0), 0.2);
        assert_eq!(s.lr(20), 2.0);
    }

    #[test]
    fn scaler_backs_off_on_overflow_and_grows_after_clean_steps() {
        let mut s = LossScaler::new(true);
        assert!(!s.update(f64::INFINITY));
        assert_eq!(s.scale, INITIAL_SCALE / 2.0);
        for _ in 0..GROWTH_INTERVAL {
            assert!(s.update(1.0));
        }
        assert_eq!(s.scale, INITIAL_SCALE);
        let mut off = LossScaler::new(false);
        assert!(off.update(f64::NAN));
        assert_eq!(off.scale, 1.0);
    }
}
