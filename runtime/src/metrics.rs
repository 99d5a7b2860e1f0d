//! Per-step metrics: a text line for the log and one JSON object per step for `--metrics`.

use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

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
}

impl StepMetrics {
    /// The log line of a step.
    pub fn line(&self, train_iters: u64) -> String {
        format!(
            "step {}/{} | loss {:.6} | grad_norm {:.4} | lr {:.3e} | {:.0} ms | {:.0} tokens/s",
            self.step,
            train_iters,
            self.loss,
            self.grad_norm,
            self.lr,
            self.step_ms,
            self.tokens_per_s
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
