//! `[train]`, `[parallel]` and `[target]`: how the model is trained and where.

use mmc_ir::plan::LrSchedule;
pub use mmc_ir::plan::{LossReduction, LrDecayStyle};
use serde::Deserialize;

/// Number formats for compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDType {
    F32,
    #[default]
    Bf16,
}

/// Which activations are recomputed in the backward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    #[default]
    None,
    Selective,
    Full,
}

/// `[train]`: batch geometry and optimizer settings (Megatron's argument names).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub micro_batch_size: usize,
    pub global_batch_size: usize,
    pub seq_length: usize,
    pub max_tiles: usize,
    pub dtype: ComputeDType,
    pub lr: f64,
    pub min_lr: f64,
    pub lr_warmup_iters: usize,
    pub lr_warmup_fraction: Option<f64>,
    pub lr_decay_style: LrDecayStyle,
    pub weight_decay: f64,
    /// Also decay 1-D parameters (norm weights, biases, layer scales); Megatron does not.
    pub weight_decay_1d: bool,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub clip_grad: f64,
    pub seed: u64,
    pub freeze: Vec<String>,
    pub recompute: Recompute,
    /// The activation memory of one micro-step, in GB (10^9 bytes), that recompute must fit:
    /// the recompute pass then chooses what to recompute (fewest extra FLOPs, greedily). It
    /// replaces `recompute`, so the two cannot both be given; `None` when the TOML omits it.
    pub recompute_budget_gb: Option<f64>,
    pub loss_reduction: LossReduction,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            micro_batch_size: 1,
            global_batch_size: 1,
            seq_length: 4096,
            max_tiles: 12,
            dtype: ComputeDType::Bf16,
            lr: 1e-5,
            min_lr: 0.0,
            lr_warmup_iters: 0,
            lr_warmup_fraction: None,
            lr_decay_style: LrDecayStyle::Constant,
            weight_decay: 0.0,
            weight_decay_1d: false,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            clip_grad: 1.0,
            seed: 1234,
            freeze: Vec::new(),
            recompute: Recompute::None,
            recompute_budget_gb: None,
            loss_reduction: LossReduction::Token,
        }
    }
}

impl TrainConfig {
    /// The learning-rate schedule these keys describe.
    pub fn schedule(&self) -> LrSchedule {
        LrSchedule {
            lr: self.lr,
            min_lr: self.min_lr,
            warmup_iters: self.lr_warmup_iters,
            warmup_fraction: self.lr_warmup_fraction,
            decay_style: self.lr_decay_style,
        }
    }

    /// Megatron's argument validation for `[train]`: each value in its range, with the key
    /// named, so that a typo is an error at compile time rather than a damaged plan or a
    /// diverged run. `dp` is `[parallel] dp`, a factor of the global batch.
    pub(super) fn check(&self, dp: usize) -> Result<(), String> {
        if self.micro_batch_size == 0 {
            return Err("`micro_batch_size` must be at least 1".into());
        }
        if self.seq_length < 2 {
            return Err(format!(
                "`seq_length` must be at least 2, not {}",
                self.seq_length
            ));
        }
        let dp = dp.max(1);
        let per_step = self.micro_batch_size.checked_mul(dp);
        if self.global_batch_size == 0
            || !per_step.is_some_and(|s| self.global_batch_size.is_multiple_of(s))
        {
            return Err(format!(
                "`global_batch_size` ({}) must be a positive multiple of micro_batch_size x dp ({})",
                self.global_batch_size,
                per_step.map_or_else(|| format!("{} x {dp}", self.micro_batch_size), |s| s.to_string())
            ));
        }
        self.schedule().check()?;
        for (key, v) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(format!("`{key}` must be in [0, 1), not {v}"));
            }
        }
        if !(self.adam_eps.is_finite() && self.adam_eps > 0.0) {
            return Err(format!(
                "`adam_eps` must be a finite number > 0, not {}",
                self.adam_eps
            ));
        }
        for (key, v, what) in [
            ("weight_decay", self.weight_decay, ""),
            ("clip_grad", self.clip_grad, " (0 turns clipping off)"),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!(
                    "`{key}` must be a finite number >= 0{what}, not {v}"
                ));
            }
        }
        if let Some(gb) = self.recompute_budget_gb {
            if !(gb.is_finite() && gb > 0.0) {
                return Err(format!(
                    "`recompute_budget_gb` must be a finite number of GB > 0, not {gb}"
                ));
            }
            if self.recompute != Recompute::None {
                let mode = match self.recompute {
                    Recompute::Full => "full",
                    _ => "selective",
                };
                return Err(format!(
                    "`recompute_budget_gb` ({gb}) and `recompute = \"{mode}\"` both say what to recompute; give one: the budget lets mmc choose, the mode fixes the choice"
                ));
            }
        }
        if let Some(p) = self.freeze.iter().find(|p| p.trim_matches('.').is_empty()) {
            return Err(format!(
                "`freeze` entry \"{p}\" is not a parameter-name prefix"
            ));
        }
        Ok(())
    }
}

/// `[parallel]`: world size = tp x dp; ep divides dp.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    pub tp: usize,
    pub ep: usize,
    pub dp: usize,
    pub zero: u8,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig {
            tp: 1,
            ep: 1,
            dp: 1,
            zero: 0,
        }
    }
}

/// Which machine the plan is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    #[default]
    Cpu,
    Ascend,
}

/// `[target]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TargetConfig {
    pub kind: TargetKind,
    pub devices: usize,
    /// The memory of one device; the memory plan will be checked against it. `None` when the
    /// TOML does not give it.
    pub device_memory_gb: Option<f64>,
}

impl Default for TargetConfig {
    fn default() -> Self {
        TargetConfig {
            kind: TargetKind::Cpu,
            devices: 1,
            device_memory_gb: None,
        }
    }
}
