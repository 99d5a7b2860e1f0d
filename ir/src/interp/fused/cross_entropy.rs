//! The LM head fused with the weighted cross-entropy, `chunk` rows at a time: the logits of one
//! chunk ([chunk, vocab]) are the largest buffer, never the [rows, vocab] of the primitive form.

use super::gemm;
use crate::interp::nan_max;

/// The operands of a linear cross-entropy: h [rows, hidden], w [vocab, hidden], target [rows]
/// (negative = ignored), weight [rows].
pub struct Problem<'a> {
    pub h: &'a [f64],
    pub w: &'a [f64],
    pub target: &'a [i64],
    pub weight: &'a [f64],
    pub rows: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub chunk: usize,
}

impl Problem<'_> {
    /// Rejects a target at or above the vocabulary size (the primitive form's gather of the
    /// target logit fails on it too).
    fn check_targets(&self) -> Result<(), String> {
        match self.target.iter().position(|&t| t >= self.vocab as i64) {
            Some(i) => Err(format!(
                "target {} of row {i} is out of range for a vocabulary of {}",
                self.target[i], self.vocab
            )),
            None => Ok(()),
        }
    }

    /// Calls `f(first_row, logits)` for each chunk, `logits` the chunk's rows of `h w^T`.
    fn for_each_chunk(&self, mut f: impl FnMut(usize, &mut [f64])) {
        let c = self.chunk.clamp(1, self.rows.max(1));
        let (k, v) = (self.hidden, self.vocab);
        let mut logits = vec![0.0; c * v];
        for r0 in (0..self.rows).step_by(c) {
            let n = c.min(self.rows - r0);
            let logits = &mut logits[..n * v];
            gemm(
                (n, k, v),
                &self.h[r0 * k..(r0 + n) * k],
                (k, 1),
                self.w,
                (1, k),
                0.0,
                logits,
            );
            f(r0, logits);
        }
    }
}

/// `max + log(sum(exp(row - max)))`, as the primitive logsumexp.
fn logsumexp(row: &[f64]) -> f64 {
    let m = row.iter().copied().fold(f64::NEG_INFINITY, nan_max);
    row.iter().map(|x| (x - m).exp()).sum::<f64>().ln() + m
}

/// `sum_i weight_i * (logsumexp_j(h_i . w_j) - h_i . w_{target_i})` over the rows whose target is
/// not negative.
pub fn forward(p: &Problem) -> Result<f64, String> {
    p.check_targets()?;
    let v = p.vocab;
    let mut loss = 0.0;
    p.for_each_chunk(|r0, logits| {
        for (i, row) in logits.chunks(v.max(1)).enumerate() {
            let t = p.target[r0 + i];
            if t >= 0 {
                loss += (logsumexp(row) - row[t as usize]) * p.weight[r0 + i];
            }
        }
    });
    Ok(loss)
}

/// The gradients (dh, dw) of [`forward`] scaled by `dloss`: per chunk the logit gradient
/// `dloss * weight_i * (softmax(logits_i) - onehot(target_i))`, then `dh = dlogits w` and
/// `dw += dlogits^T h`.
pub fn backward(p: &Problem, dloss: f64) -> Result<(Vec<f64>, Vec<f64>), String> {
    p.check_targets()?;
    let (k, v) = (p.hidden, p.vocab);
    let mut dh = vec![0.0; p.rows * k];
    let mut dw = vec![0.0; v * k];
    p.for_each_chunk(|r0, logits| {
        let n = logits.len() / v.max(1);
        for (i, row) in logits.chunks_mut(v.max(1)).enumerate() {
            let t = p.target[r0 + i];
            if t < 0 {
                row.iter_mut().for_each(|x| *x = 0.0);
                continue;
            }
            let g = dloss * p.weight[r0 + i];
            let lse = logsumexp(row);
            row.iter_mut().for_each(|x| *x = (*x - lse).exp() * g);
            row[t as usize] -= g;
        }
        gemm(
            (n, v, k),
            logits,
            (v, 1),
            p.w,
            (k, 1),
            0.0,
            &mut dh[r0 * k..(r0 + n) * k],
        );
        gemm(
            (v, n, k),
            logits,
            (1, v),
            &p.h[r0 * k..(r0 + n) * k],
            (k, 1),
            1.0,
            &mut dw,
        );
    });
    Ok((dh, dw))
}
