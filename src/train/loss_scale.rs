//! Loss scaling (DESIGN.md §5). The loss is multiplied by `scale` before backward; after
//! accumulation every gradient is checked (through the global norm) for inf/nan. An overflow
//! skips the update and, in dynamic mode, halves the scale; `growth_interval` clean updates
//! in a row double it. Scales are powers of two, so scaling and unscaling are exact in f32.
//! On the fp32 CPU backend this is the guard that turns a non-finite gradient into a skipped,
//! reported update; on fp16 backends it keeps small gradients from flushing to zero.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// Saved in checkpoints as `"off"`, `"dynamic"` or `{"fixed": 1024.0}`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossScaleMode {
    /// Scale 1; non-finite gradients still skip the update.
    Off,
    /// A constant scale (a power of two).
    Fixed(f32),
    /// Starts at 2¹⁶, halves on overflow, doubles after `growth_interval` clean updates.
    Dynamic,
}

impl LossScaleMode {
    /// `off`, `dynamic`, or a power of two such as `1024`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(LossScaleMode::Off),
            "dynamic" => Ok(LossScaleMode::Dynamic),
            other => match other.parse::<f32>() {
                Ok(v) if v >= 1.0 && v.is_finite() && (v.log2().fract() == 0.0) => Ok(LossScaleMode::Fixed(v)),
                _ => bail!("--loss-scale must be 'off', 'dynamic' or a power of two ≥ 1, got '{other}'"),
            },
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    pub mode: LossScaleMode,
    pub scale: f32,
    /// Clean updates since the last change of scale.
    pub good_steps: u32,
    pub growth_interval: u32,
}

const MIN_SCALE: f32 = 1.0;
const MAX_SCALE: f32 = 16_777_216.0; // 2²⁴

impl LossScaler {
    pub fn new(mode: LossScaleMode) -> Self {
        let scale = match mode {
            LossScaleMode::Off => 1.0,
            LossScaleMode::Fixed(s) => s,
            LossScaleMode::Dynamic => 65536.0,
        };
        LossScaler { mode, scale, good_steps: 0, growth_interval: 2000 }
    }

    /// Records the outcome of one update (`finite`: every gradient was finite).
    pub fn update(&mut self, finite: bool) {
        if self.mode != LossScaleMode::Dynamic {
            return;
        }
        if !finite {
            self.scale = (self.scale * 0.5).max(MIN_SCALE);
            self.good_steps = 0;
        } else {
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                self.scale = (self.scale * 2.0).min(MAX_SCALE);
                self.good_steps = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_on_overflow_grows_after_clean_run() {
        let mut s = LossScaler { growth_interval: 3, ..LossScaler::new(LossScaleMode::Dynamic) };
        s.update(false);
        assert_eq!(s.scale, 32768.0);
        for _ in 0..3 {
            s.update(true);
        }
        assert_eq!(s.scale, 65536.0);
        let mut fixed = LossScaler::new(LossScaleMode::parse("1024").unwrap());
        fixed.update(false);
        assert_eq!(fixed.scale, 1024.0);
        assert!(LossScaleMode::parse("1000").is_err());
        assert!(LossScaleMode::parse("0.5").is_err());
    }
}
