//! Per-step metrics: a text line for the log and one JSON object per step for `--metrics`;
//! the expert load of the MoE layers; the throughput summary at the end of a run.

use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Tokens each MoE layer's router sent to each of its experts during one optimizer step,
/// keyed by decoder layer index: summed over the step's micro-batches, non-padding tokens
/// only, each token counted once per top-k pick (a layer's counts sum to tokens x top-k).
/// Serialised as `{"<layer>": [count, ...]}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ExpertLoad(pub BTreeMap<usize, Vec<u64>>);

impl ExpertLoad {
    /// Adds one micro-batch's counts of `layer`. Fails (naming the sizes) when the layer
    /// already has counts for another number of experts.
    pub fn add(&mut self, layer: usize, counts: &[u64]) -> Result<(), String> {
        let acc = self.0.entry(layer).or_insert_with(|| vec![0; counts.len()]);
        if acc.len() != counts.len() {
            return Err(format!(
                "layer {layer} has {} experts in one micro-batch and {} in another",
                acc.len(),
                counts.len()
            ));
        }
        for (a, c) in acc.iter_mut().zip(counts) {
            *a += c;
        }
        Ok(())
    }

    /// Each layer's [`imbalance`] (layers that routed no token are left out).
    pub fn imbalances(&self) -> BTreeMap<usize, f64> {
        self.0
            .iter()
            .filter_map(|(&l, c)| imbalance(c).map(|x| (l, x)))
            .collect()
    }

    /// The most imbalanced layer and its imbalance (the first such layer on a tie).
    pub fn worst(&self) -> Option<(usize, f64)> {
        self.imbalances()
            .into_iter()
            .fold(None, |best, (l, x)| match best {
                Some((_, b)) if b >= x => best,
                _ => Some((l, x)),
            })
    }
}

/// How unevenly a layer's tokens spread over its experts: the largest count over the mean
/// count (1 when every expert got the same number, E when one expert got them all). `None`
/// when there are no experts or no token was routed.
pub fn imbalance(counts: &[u64]) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    let max = *counts.iter().max()?;
    if total == 0 {
        return None;
    }
    Some(max as f64 * counts.len() as f64 / total as f64)
}

/// What one optimizer step reports.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub lm_loss: f64,
    pub aux_loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    /// Non-padding tokens in the global batch.
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub step_ms: f64,
    /// Peak resident memory of the process so far, in bytes (0 where the OS does not say).
    pub peak_memory_bytes: u64,
    /// Tokens per expert of each MoE layer (empty for a dense model).
    pub expert_load: ExpertLoad,
    /// Each MoE layer's max/mean expert load ([`imbalance`]), keyed like `expert_load`.
    pub expert_imbalance: BTreeMap<usize, f64>,
}

impl StepMetrics {
    /// The log line of a step; with MoE layers it ends with the worst layer's max/mean
    /// expert load.
    pub fn line(&self, train_iters: u64) -> String {
        let mut line = format!(
            "step {}/{} | loss {:.6} | grad_norm {:.4} | lr {:.3e} | {:.0} ms | {:.0} tokens/s",
            self.step,
            train_iters,
            self.loss,
            self.grad_norm,
            self.lr,
            self.step_ms,
            self.tokens_per_s
        );
        if let Some((layer, x)) = self.expert_load.worst() {
            line.push_str(&format!(" | expert load max/mean {x:.2} (layer {layer})"));
        }
        line
    }
}

/// The wall time, samples and non-padding tokens of each step of a run, for the summary
/// printed at its end (like MindSpeed's `--log-tps`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Throughput {
    /// (step number, seconds, samples, tokens) per step, in order.
    steps: Vec<(u64, f64, usize, usize)>,
}

/// What [`Throughput::summary`] computes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ThroughputSummary {
    /// Steps the run took.
    pub steps: usize,
    /// The step numbers the means are over: all the run's steps but its first (the warm-up)
    /// when there are two or more.
    pub first_measured: u64,
    pub last_measured: u64,
    /// Whether the first (warm-up) step is left out of the means.
    pub warm_up_left_out: bool,
    /// Mean seconds per iteration over the measured steps.
    pub secs_per_iter: f64,
    pub samples_per_s: f64,
    /// Non-padding tokens per second.
    pub tokens_per_s: f64,
}

impl Throughput {
    /// Records step `step`: `secs` seconds over `samples` samples and `tokens` non-padding
    /// tokens.
    pub fn record(&mut self, step: u64, secs: f64, samples: usize, tokens: usize) {
        self.steps.push((step, secs, samples, tokens));
    }

    /// The means over the recorded steps, leaving out the first (it pays for first touches of
    /// memory and caches) unless it is the only one; `None` before any step.
    pub fn summary(&self) -> Option<ThroughputSummary> {
        let measured = match self.steps.len() {
            0 => return None,
            1 => &self.steps[..],
            _ => &self.steps[1..],
        };
        let secs: f64 = measured.iter().map(|s| s.1).sum();
        let samples: usize = measured.iter().map(|s| s.2).sum();
        let tokens: usize = measured.iter().map(|s| s.3).sum();
        let per_s = |n: usize| n as f64 / secs.max(1e-9);
        Some(ThroughputSummary {
            steps: self.steps.len(),
            first_measured: measured[0].0,
            last_measured: measured[measured.len() - 1].0,
            warm_up_left_out: measured.len() < self.steps.len(),
            secs_per_iter: secs / measured.len() as f64,
            samples_per_s: per_s(samples),
            tokens_per_s: per_s(tokens),
        })
    }
}

impl ThroughputSummary {
    /// The summary line; `total_secs` is the run's wall time.
    pub fn line(&self, total_secs: f64) -> String {
        let steps = if self.first_measured == self.last_measured {
            format!("step {}", self.first_measured)
        } else {
            format!("steps {}-{}", self.first_measured, self.last_measured)
        };
        let over = if self.warm_up_left_out {
            format!(
                "mean of {steps}; the run's first step, {}, is warm-up and left out",
                self.first_measured - 1
            )
        } else {
            format!("{steps} only, warm-up included")
        };
        format!(
            "throughput: {:.1} ms per iteration ({over}) | {:.2} samples/s | {:.0} tokens/s (non-padding) | total {:.1} s",
            self.secs_per_iter * 1e3,
            self.samples_per_s,
            self.tokens_per_s,
            total_secs
        )
    }
}

/// Peak resident set size of this process (Linux: VmHWM), in bytes.
pub fn peak_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Appends one JSON object per step to a file.
pub struct MetricsWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsWriter {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            file: std::fs::File::create(path)?,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, m: &StepMetrics) -> std::io::Result<()> {
        let line = serde_json::to_string(m).map_err(std::io::Error::other)?;
        writeln!(self.file, "{line}")?;
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imbalance_is_the_max_over_the_mean() {
        assert_eq!(imbalance(&[4, 4, 4, 4]), Some(1.0));
        assert_eq!(imbalance(&[8, 0, 0, 0]), Some(4.0));
        // mean 3, max 6
        assert_eq!(imbalance(&[6, 3, 0, 3]), Some(2.0));
        assert_eq!(imbalance(&[0, 0]), None);
        assert_eq!(imbalance(&[]), None);
    }

    #[test]
    fn expert_load_sums_micro_batches_and_finds_the_worst_layer() {
        let mut load = ExpertLoad::default();
        load.add(0, &[1, 2, 3, 2]).unwrap();
        load.add(3, &[4, 0, 0, 0]).unwrap();
        load.add(0, &[3, 2, 1, 2]).unwrap();
        assert_eq!(load.0[&0], [4, 4, 4, 4]);
        assert!(load.add(3, &[1, 1]).unwrap_err().contains("4 experts"));
        assert_eq!(load.imbalances(), BTreeMap::from([(0, 1.0), (3, 4.0)]));
        assert_eq!(load.worst(), Some((3, 4.0)));
        assert_eq!(ExpertLoad::default().worst(), None);
        let json = serde_json::to_string(&load).unwrap();
        assert_eq!(json, r#"{"0":[4,4,4,4],"3":[4,0,0,0]}"#);
    }

    #[test]
    fn the_log_line_names_the_worst_layer() {
        let mut load = ExpertLoad::default();
        load.add(1, &[3, 1]).unwrap();
        let mut m = StepMetrics {
            step: 2,
            loss: 1.0,
            lm_loss: 1.0,
            aux_loss: 0.0,
            grad_norm: 0.5,
            lr: 1e-3,
            tokens: 8,
            tokens_per_s: 16.0,
            step_ms: 500.0,
            peak_memory_bytes: 0,
            expert_imbalance: load.imbalances(),
            expert_load: load,
        };
        assert!(
            m.line(4)
                .ends_with("| 16 tokens/s | expert load max/mean 1.50 (layer 1)"),
            "{}",
            m.line(4)
        );
        m.expert_load = ExpertLoad::default();
        assert!(m.line(4).ends_with("tokens/s"), "{}", m.line(4));
    }

    #[test]
    fn throughput_leaves_out_the_warm_up_step() {
        let mut t = Throughput::default();
        assert_eq!(t.summary(), None);
        // A run resumed at iteration 10.
        t.record(11, 5.0, 2, 100);
        let one = t.summary().unwrap();
        assert_eq!((one.secs_per_iter, one.tokens_per_s), (5.0, 20.0));
        assert!(!one.warm_up_left_out);
        assert!(one.line(5.0).contains("(step 11 only, warm-up included)"));
        t.record(12, 1.0, 2, 100);
        t.record(13, 3.0, 4, 300);
        let s = t.summary().unwrap();
        assert_eq!(
            s,
            ThroughputSummary {
                steps: 3,
                first_measured: 12,
                last_measured: 13,
                warm_up_left_out: true,
                secs_per_iter: 2.0,
                samples_per_s: 1.5,
                tokens_per_s: 100.0,
            }
        );
        assert_eq!(
            s.line(9.5),
            "throughput: 2000.0 ms per iteration (mean of steps 12-13; the run's first step, 11, is warm-up and left out) | 1.50 samples/s | 100 tokens/s (non-padding) | total 9.5 s"
        );
    }
}
