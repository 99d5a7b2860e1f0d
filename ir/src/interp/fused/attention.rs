//! Attention, a block of query rows at a time: the scores of a block ([`BLOCK`] rows by the
//! keys any of them sees) live in one reused buffer, O(seq) per row, so no
//! [batch, heads, seq, seq] tensor ever exists. Scores and the weighted sums are GEMMs.
//!
//! A row is computed as the primitive form computes it: visible scores `(q . k_j) * scale`,
//! masked ones -inf, then `exp(s - max) / sum` and the weighted sum of the value rows. A row
//! whose maximum is not finite (every key masked, or a NaN or infinite score) is all NaN, as the
//! softmax of such a row is in the primitive form.

use super::gemm;
use crate::interp::nan_max;

/// Query rows per block.
const BLOCK: usize = 32;

/// The sizes of an attention: q is [batch, q_heads, seq, head_dim], k and v
/// [batch, kv_heads, seq, head_dim], and query head h reads kv head `h / (q_heads / kv_heads)`.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub head_dim: usize,
}

impl Dims {
    /// The offset of the first row of query head `h` of batch `b` in q.
    fn q_base(&self, b: usize, h: usize) -> usize {
        (b * self.q_heads + h) * self.seq * self.head_dim
    }

    /// The offset of the first key of the kv head query head `h` reads, in k and v.
    fn kv_base(&self, b: usize, h: usize) -> usize {
        let group = self.q_heads / self.kv_heads;
        (b * self.kv_heads + h / group) * self.seq * self.head_dim
    }

    /// Calls `f(b, h, rows)` for every head and block of query rows.
    fn for_each_block(&self, mut f: impl FnMut(usize, usize, std::ops::Range<usize>)) {
        for b in 0..self.batch {
            for h in 0..self.q_heads {
                for i0 in (0..self.seq).step_by(BLOCK) {
                    f(b, h, i0..(i0 + BLOCK).min(self.seq));
                }
            }
        }
    }
}

/// Which keys a query sees: the causal bound and the segment ids of one batch row.
struct Mask<'a> {
    causal: bool,
    seg: Option<&'a [i64]>,
    seq: usize,
}

impl Mask<'_> {
    fn sees(&self, i: usize, j: usize) -> bool {
        (!self.causal || j <= i) && self.seg.is_none_or(|s| s[i] == s[j])
    }

    /// The keys `lo..hi` outside which no query of `rows` sees anything.
    fn key_range(&self, rows: std::ops::Range<usize>) -> (usize, usize) {
        let (mut lo, mut hi) = (self.seq, 0);
        for i in rows {
            if let Some(j) = (0..self.seq).find(|&j| self.sees(i, j)) {
                lo = lo.min(j);
            }
            if let Some(j) = (0..self.seq).rev().find(|&j| self.sees(i, j)) {
                hi = hi.max(j + 1);
            }
        }
        if lo < hi {
            (lo, hi)
        } else {
            (0, 0)
        }
    }
}

/// One block of query rows `rows` of one head against the keys `keys`.
struct Block<'a> {
    rows: std::ops::Range<usize>,
    keys: (usize, usize),
    mask: &'a Mask<'a>,
    scale: f64,
    d: usize,
}

impl Block<'_> {
    fn width(&self) -> usize {
        self.keys.1 - self.keys.0
    }

    /// Fills `p` (rows x width) with the block's softmax probabilities, masked keys 0, and
    /// returns the rows (relative to the block) whose maximum is not finite; their `p` rows are
    /// zero, and the caller gives them NaN.
    fn probabilities(&self, q: &[f64], k: &[f64], p: &mut [f64]) -> Vec<usize> {
        let (n, w, d) = (self.rows.len(), self.width(), self.d);
        let (lo, hi) = self.keys;
        gemm((n, d, w), q, (d, 1), &k[lo * d..hi * d], (1, d), 0.0, p);
        let mut bad = Vec::new();
        for (r, row) in p.chunks_mut(w.max(1)).take(n).enumerate() {
            let i = self.rows.start + r;
            let mut m = f64::NEG_INFINITY;
            for (jj, s) in row.iter_mut().enumerate() {
                *s = if self.mask.sees(i, lo + jj) {
                    *s * self.scale
                } else {
                    f64::NEG_INFINITY
                };
                m = nan_max(m, *s);
            }
            if !m.is_finite() {
                row.fill(0.0);
                bad.push(r);
                continue;
            }
            let mut sum = 0.0;
            for s in row.iter_mut() {
                *s = (*s - m).exp();
                sum += *s;
            }
            row.iter_mut().for_each(|s| *s /= sum);
        }
        if w == 0 {
            bad = (0..n).collect();
        }
        bad
    }
}

/// `softmax(q k^T * scale + mask) v` for every head.
pub fn forward(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    seg: Option<&[i64]>,
    dims: Dims,
    scale: f64,
    causal: bool,
) -> Vec<f64> {
    let (s, d) = (dims.seq, dims.head_dim);
    let mut o = vec![0.0; q.len()];
    let mut p = vec![0.0; BLOCK * s];
    dims.for_each_block(|b, h, rows| {
        let mask = Mask {
            causal,
            seg: seg.map(|x| &x[b * s..(b + 1) * s]),
            seq: s,
        };
        let block = Block {
            keys: mask.key_range(rows.clone()),
            rows: rows.clone(),
            mask: &mask,
            scale,
            d,
        };
        let (qb, kv) = (dims.q_base(b, h), dims.kv_base(b, h));
        let at = qb + rows.start * d..qb + rows.end * d;
        let (k, v) = (&k[kv..kv + s * d], &v[kv..kv + s * d]);
        let (w, (lo, hi)) = (block.width(), block.keys);
        let p = &mut p[..rows.len() * w];
        let bad = block.probabilities(&q[at.clone()], k, p);
        let out = &mut o[at];
        gemm(
            (rows.len(), w, d),
            p,
            (w, 1),
            &v[lo * d..hi * d],
            (d, 1),
            0.0,
            out,
        );
        for r in bad {
            out[r * d..(r + 1) * d].fill(f64::NAN);
        }
    });
    o
}

/// The gradients (dq, dk, dv) of [`forward`] for the output gradient `d_out`, recomputing each
/// block's probabilities: with `dp = do v^T` and `ds = p (dp - rowsum(p dp)) * scale`,
/// `dq = ds k`, `dk += ds^T q` and `dv += p^T do`, dk and dv summed over the query heads that
/// share a kv head. A NaN row gets what the primitive form's backward gives it ([`nan_row`]).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    seg: Option<&[i64]>,
    d_out: &[f64],
    dims: Dims,
    scale: f64,
    causal: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (s, d) = (dims.seq, dims.head_dim);
    let mut dq = vec![0.0; q.len()];
    let mut dk = vec![0.0; k.len()];
    let mut dv = vec![0.0; v.len()];
    let mut p = vec![0.0; BLOCK * s];
    let mut ds = vec![0.0; BLOCK * s];
    dims.for_each_block(|b, h, rows| {
        let mask = Mask {
            causal,
            seg: seg.map(|x| &x[b * s..(b + 1) * s]),
            seq: s,
        };
        let block = Block {
            keys: mask.key_range(rows.clone()),
            rows: rows.clone(),
            mask: &mask,
            scale,
            d,
        };
        let (qb, kv) = (dims.q_base(b, h), dims.kv_base(b, h));
        let at = qb + rows.start * d..qb + rows.end * d;
        let (qs, dos) = (&q[at.clone()], &d_out[at.clone()]);
        let (k, v) = (&k[kv..kv + s * d], &v[kv..kv + s * d]);
        let (dk, dv) = (&mut dk[kv..kv + s * d], &mut dv[kv..kv + s * d]);
        let (n, w, (lo, hi)) = (rows.len(), block.width(), block.keys);
        let (p, ds) = (&mut p[..n * w], &mut ds[..n * w]);
        let bad = block.probabilities(qs, k, p);
        let keys = lo * d..hi * d;
        gemm((n, d, w), dos, (d, 1), &v[keys.clone()], (1, d), 0.0, ds);
        for (pr, dr) in p.chunks(w.max(1)).zip(ds.chunks_mut(w.max(1))) {
            let delta: f64 = pr.iter().zip(dr.iter()).map(|(p, dp)| p * dp).sum();
            for (dp, &p) in dr.iter_mut().zip(pr) {
                *dp = if p == 0.0 {
                    0.0
                } else {
                    p * (*dp - delta) * scale
                };
            }
        }
        let dq = &mut dq[at];
        gemm((n, w, d), ds, (w, 1), &k[keys.clone()], (d, 1), 0.0, dq);
        gemm(
            (w, n, d),
            ds,
            (1, w),
            qs,
            (d, 1),
            1.0,
            &mut dk[keys.clone()],
        );
        gemm((w, n, d), p, (1, w), dos, (d, 1), 1.0, &mut dv[keys]);
        for r in bad {
            nan_row(&mask, rows.start + r, &mut dq[r * d..(r + 1) * d], dk, dv);
        }
    });
    (dq, dk, dv)
}

/// The gradients of a NaN row `i` in the primitive form: its softmax row is NaN over all keys,
/// so every value row of the head gets NaN (`dv = p^T do`); the mask's select passes that NaN
/// on only at the visible scores, so dq of the row and dk of each visible key are NaN, and a
/// row with no visible key adds nothing to either.
fn nan_row(mask: &Mask, i: usize, dq: &mut [f64], dk: &mut [f64], dv: &mut [f64]) {
    let d = dq.len();
    dv.fill(f64::NAN);
    for j in (0..mask.seq).filter(|&j| mask.sees(i, j)) {
        dk[j * d..(j + 1) * d].fill(f64::NAN);
        dq.fill(f64::NAN);
    }
}
