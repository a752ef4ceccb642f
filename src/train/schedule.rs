//! Learning rate per optimizer update: linear warmup, then cosine decay to a floor.

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// Peak learning rate, reached at the end of warmup.
    pub lr: f64,
    /// Floor the cosine decays to. `lr_at(total)` is exactly this; the last update of the run,
    /// `total - 1`, is one cosine step above it.
    pub min_lr: f64,
    /// Updates of linear warmup from lr/warmup to lr.
    pub warmup: usize,
    /// Total optimizer updates of the run.
    pub total: usize,
}

impl Schedule {
    /// Learning rate of update `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
        self.min_lr + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (self.lr - self.min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_floor() {
        let s = Schedule { lr: 1e-3, min_lr: 1e-4, warmup: 10, total: 110 };
        assert!((s.lr_at(0) - 1e-4).abs() < 1e-12);
        assert!((s.lr_at(9) - 1e-3).abs() < 1e-12);
        assert!((s.lr_at(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr_at(60) - 5.5e-4).abs() < 1e-12, "midpoint is the mean of peak and floor");
        assert!((s.lr_at(110) - 1e-4).abs() < 1e-12);
        assert!((s.lr_at(10_000) - 1e-4).abs() < 1e-12);
        for i in 10..110 {
            assert!(s.lr_at(i + 1) <= s.lr_at(i));
        }
    }
}
