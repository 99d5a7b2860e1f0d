//! Attention, one query row at a time: the scores of a row live in one reused buffer of `seq`
//! values, so no [batch, heads, seq, seq] tensor ever exists.
//!
//! A row is computed as the primitive form computes it: visible scores `q . k_j * scale`,
//! masked ones -inf, then `exp(s - max) / sum` and the weighted sum of the value rows. A row
//! whose maximum is not finite (every key masked, or a NaN or infinite score) is all NaN, as the
//! softmax of such a row is in the primitive form.

use super::dot;
use crate::interp::nan_max;

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
    /// The offset of row `i` of query head `h` of batch `b` in q.
    fn q_row(&self, b: usize, h: usize, i: usize) -> usize {
        ((b * self.q_heads + h) * self.seq + i) * self.head_dim
    }

    /// The offset of the first key of the kv head query head `h` reads, in k and v.
    fn kv_base(&self, b: usize, h: usize) -> usize {
        let group = self.q_heads / self.kv_heads;
        (b * self.kv_heads + h / group) * self.seq * self.head_dim
    }
}

/// Which keys a query sees: the causal bound and the segment ids of one batch row.
struct Mask<'a> {
    causal: bool,
    seg: Option<&'a [i64]>,
}

impl Mask<'_> {
    /// The keys `0..end` that may be visible to query `i` (the causal bound).
    fn end(&self, i: usize, seq: usize) -> usize {
        if self.causal {
            i + 1
        } else {
            seq
        }
    }

    fn visible(&self, i: usize, j: usize) -> bool {
        self.seg.is_none_or(|s| s[i] == s[j])
    }
}

/// Fills `p[..end]` with the softmax probabilities of query row `q` over the keys `k` (rows of
/// `d`), masked keys 0. Returns false, with `p` all NaN, when the row's maximum is not finite.
fn probabilities(q: &[f64], k: &[f64], mask: &Mask, i: usize, scale: f64, p: &mut [f64]) -> bool {
    let d = q.len();
    let mut m = f64::NEG_INFINITY;
    for (j, pj) in p.iter_mut().enumerate() {
        *pj = if mask.visible(i, j) {
            dot(q, &k[j * d..(j + 1) * d]) * scale
        } else {
            f64::NEG_INFINITY
        };
        m = nan_max(m, *pj);
    }
    if !m.is_finite() {
        p.iter_mut().for_each(|pj| *pj = f64::NAN);
        return false;
    }
    let mut sum = 0.0;
    for pj in p.iter_mut() {
        *pj = (*pj - m).exp();
        sum += *pj;
    }
    p.iter_mut().for_each(|pj| *pj /= sum);
    true
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
    let mut p = vec![0.0; s];
    for b in 0..dims.batch {
        let mask = Mask {
            causal,
            seg: seg.map(|x| &x[b * s..(b + 1) * s]),
        };
        for h in 0..dims.q_heads {
            let kv = dims.kv_base(b, h);
            let (k, v) = (&k[kv..kv + s * d], &v[kv..kv + s * d]);
            for i in 0..s {
                let at = dims.q_row(b, h, i);
                let end = mask.end(i, s);
                let p = &mut p[..end];
                probabilities(&q[at..at + d], k, &mask, i, scale, p);
                let out = &mut o[at..at + d];
                for (j, &pj) in p.iter().enumerate() {
                    if pj != 0.0 {
                        axpy(pj, &v[j * d..(j + 1) * d], out);
                    }
                }
            }
        }
    }
    o
}

/// The gradients (dq, dk, dv) of [`forward`] for the output gradient `d_out`, recomputing each
/// row's probabilities: with `dp_j = do . v_j` and `ds_j = p_j (dp_j - do . o)`,
/// `dq += scale ds_j k_j`, `dk_j += scale ds_j q`, `dv_j += p_j do`, dk and dv summed over the
/// query heads that share a kv head.
///
/// A NaN row (see the module) gets what the primitive form's backward gives it (see
/// [`nan_row`]).
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
    let mut p = vec![0.0; s];
    let mut o = vec![0.0; d];
    for b in 0..dims.batch {
        let mask = Mask {
            causal,
            seg: seg.map(|x| &x[b * s..(b + 1) * s]),
        };
        for h in 0..dims.q_heads {
            let kv = dims.kv_base(b, h);
            let (k, v) = (&k[kv..kv + s * d], &v[kv..kv + s * d]);
            let (dk, dv) = (&mut dk[kv..kv + s * d], &mut dv[kv..kv + s * d]);
            for i in 0..s {
                let at = dims.q_row(b, h, i);
                let (qi, doi) = (&q[at..at + d], &d_out[at..at + d]);
                let end = mask.end(i, s);
                let p = &mut p[..end];
                if !probabilities(qi, k, &mask, i, scale, p) {
                    nan_row(&mask, i, end, d, &mut dq[at..at + d], dk, dv);
                    continue;
                }
                o.iter_mut().for_each(|x| *x = 0.0);
                for (j, &pj) in p.iter().enumerate() {
                    if pj != 0.0 {
                        axpy(pj, &v[j * d..(j + 1) * d], &mut o);
                    }
                }
                let delta = dot(doi, &o);
                let dqi = &mut dq[at..at + d];
                for (j, &pj) in p.iter().enumerate() {
                    if !mask.visible(i, j) {
                        continue;
                    }
                    let rows = j * d..(j + 1) * d;
                    let ds = pj * (dot(doi, &v[rows.clone()]) - delta) * scale;
                    axpy(ds, &k[rows.clone()], dqi);
                    axpy(ds, qi, &mut dk[rows.clone()]);
                    axpy(pj, doi, &mut dv[rows]);
                }
            }
        }
    }
    (dq, dk, dv)
}

/// The gradients of a NaN row `i` in the primitive form: its softmax row is NaN over all `seq`
/// keys, so every value row gets NaN (`dv = p^T do`); the mask's select passes that NaN on only
/// at the visible scores, so dq of the row and dk of each visible key are NaN, and a row with
/// no visible key adds nothing to either.
fn nan_row(
    mask: &Mask,
    i: usize,
    end: usize,
    d: usize,
    dq: &mut [f64],
    dk: &mut [f64],
    dv: &mut [f64],
) {
    dv.iter_mut().for_each(|x| *x = f64::NAN);
    for j in (0..end).filter(|&j| mask.visible(i, j)) {
        dk[j * d..(j + 1) * d]
            .iter_mut()
            .for_each(|x| *x = f64::NAN);
        dq.iter_mut().for_each(|x| *x = f64::NAN);
    }
}

/// `y += a * x`.
fn axpy(a: f64, x: &[f64], y: &mut [f64]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}
