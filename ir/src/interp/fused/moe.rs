//! The routed MoE ops. The (token, slot) pairs of `top` [tokens, k] are laid out in expert
//! order, stably: pair `p = t * k + j` goes before pair `q` when its expert is smaller, or equal
//! and `p < q`. Row `r` of the permuted layout holds the pair `order[r]`; `pos` is the inverse.
//!
//! Expert indices come from data, so an index outside `0..experts` (or a negative one, where
//! the op has no expert count) is an op error, never a panic; so are offsets that do not split
//! the rows into consecutive groups.

use super::{dot, gemm};

/// The routing of `tokens` tokens to `k` experts each: `top` [tokens, k].
#[derive(Clone, Copy)]
pub struct Pairs<'a> {
    pub top: &'a [i64],
    pub tokens: usize,
    pub k: usize,
}

impl Pairs<'_> {
    /// The expert of every pair, checked against `experts` when the op knows the count and
    /// against 0 otherwise.
    fn check(&self, experts: Option<usize>) -> Result<(), String> {
        let bad = |&e: &i64| e < 0 || experts.is_some_and(|n| e >= n as i64);
        match self.top.iter().position(bad) {
            None => Ok(()),
            Some(p) => Err(format!(
                "expert index {} (token {}, slot {}) is out of range{}",
                self.top[p],
                p / self.k,
                p % self.k,
                match experts {
                    Some(n) => format!(" 0..{n}"),
                    None => ": expert indices are not negative".into(),
                }
            )),
        }
    }

    /// `order[r]`: the pair at row `r` of the permuted layout, by a counting sort over
    /// `experts` experts (stable, so ties stay in pair order).
    fn order(&self, experts: usize) -> Result<Vec<usize>, String> {
        self.check(Some(experts))?;
        let mut next = vec![0usize; experts + 1];
        for &e in self.top {
            next[e as usize + 1] += 1;
        }
        for e in 0..experts {
            next[e + 1] += next[e];
        }
        let mut order = vec![0; self.top.len()];
        for (p, &e) in self.top.iter().enumerate() {
            order[next[e as usize]] = p;
            next[e as usize] += 1;
        }
        Ok(order)
    }

    /// `pos[p]`: the row of pair `p` in the permuted layout. The op knows no expert count, so
    /// this is a stable sort by expert (the same order as [`Pairs::order`] for any count that
    /// covers the indices).
    fn positions(&self) -> Result<Vec<usize>, String> {
        self.check(None)?;
        let mut order: Vec<usize> = (0..self.top.len()).collect();
        order.sort_by_key(|&p| self.top[p]);
        let mut pos = vec![0; order.len()];
        for (r, &p) in order.iter().enumerate() {
            pos[p] = r;
        }
        Ok(pos)
    }
}

/// `xs[r] = x[token(order[r])]`, rows of `hidden`.
pub fn permute(x: &[f64], pairs: Pairs, hidden: usize, experts: usize) -> Result<Vec<f64>, String> {
    let order = pairs.order(experts)?;
    let mut xs = Vec::with_capacity(order.len() * hidden);
    for p in order {
        let t = p / pairs.k;
        xs.extend_from_slice(&x[t * hidden..(t + 1) * hidden]);
    }
    Ok(xs)
}

/// `offsets[e]`: how many pairs go to experts below `e` (so `offsets[experts]` is every pair).
pub fn expert_offsets(pairs: Pairs, experts: usize) -> Result<Vec<i64>, String> {
    pairs.check(Some(experts))?;
    let mut off = vec![0i64; experts + 1];
    for &e in pairs.top {
        off[e as usize + 1] += 1;
    }
    for e in 0..experts {
        off[e + 1] += off[e];
    }
    Ok(off)
}

/// The shape of a grouped matmul: xs [rows, inner], w [experts, inner, cols], and the offsets
/// [experts + 1] that split the rows of xs by expert.
pub struct Grouped<'a> {
    pub rows: usize,
    pub inner: usize,
    pub cols: usize,
    pub experts: usize,
    pub offsets: &'a [i64],
}

impl Grouped<'_> {
    /// The row range of each expert: the offsets must start at 0, never decrease and end at
    /// the row count.
    fn groups(&self) -> Result<Vec<(usize, usize)>, String> {
        let off = self.offsets;
        let shown = || format!("{off:?}");
        if off.first() != Some(&0) {
            return Err(format!("offsets {} do not start at 0", shown()));
        }
        if off.last() != Some(&(self.rows as i64)) {
            return Err(format!(
                "offsets {} do not end at the row count {}",
                shown(),
                self.rows
            ));
        }
        if let Some(e) = off.windows(2).position(|w| w[1] < w[0]) {
            return Err(format!(
                "offsets {} decrease at expert {e}, so its row count is negative",
                shown()
            ));
        }
        Ok(off
            .windows(2)
            .map(|w| (w[0] as usize, w[1] as usize))
            .collect())
    }
}

/// Rows `offsets[e]..offsets[e + 1]` of xs times `w[e]`, for every expert.
pub fn grouped_matmul(g: &Grouped, xs: &[f64], w: &[f64]) -> Result<Vec<f64>, String> {
    let (a, c) = (g.inner, g.cols);
    let mut out = vec![0.0; g.rows * c];
    for (e, (lo, hi)) in g.groups()?.into_iter().enumerate() {
        gemm(
            (hi - lo, a, c),
            &xs[lo * a..hi * a],
            (a, 1),
            &w[e * a * c..(e + 1) * a * c],
            (c, 1),
            0.0,
            &mut out[lo * c..hi * c],
        );
    }
    Ok(out)
}

/// The gradients (dxs, dw) of [`grouped_matmul`]: per expert `dxs_e = dy_e w_e^T` and
/// `dw_e = xs_e^T dy_e` (zero for an expert without rows).
pub fn grouped_matmul_grad(
    g: &Grouped,
    xs: &[f64],
    w: &[f64],
    dy: &[f64],
) -> Result<(Vec<f64>, Vec<f64>), String> {
    let (a, c) = (g.inner, g.cols);
    let mut dxs = vec![0.0; g.rows * a];
    let mut dw = vec![0.0; g.experts * a * c];
    for (e, (lo, hi)) in g.groups()?.into_iter().enumerate() {
        let (xs_e, dy_e) = (&xs[lo * a..hi * a], &dy[lo * c..hi * c]);
        let w_e = &w[e * a * c..(e + 1) * a * c];
        gemm(
            (hi - lo, c, a),
            dy_e,
            (c, 1),
            w_e,
            (1, c),
            0.0,
            &mut dxs[lo * a..hi * a],
        );
        gemm(
            (a, hi - lo, c),
            xs_e,
            (1, a),
            dy_e,
            (c, 1),
            0.0,
            &mut dw[e * a * c..(e + 1) * a * c],
        );
    }
    Ok((dxs, dw))
}

/// `out[t] = sum_j weights[t, j] * ys[pos(t, j)]`, rows of `hidden`.
pub fn unpermute(
    ys: &[f64],
    pairs: Pairs,
    weights: &[f64],
    hidden: usize,
) -> Result<Vec<f64>, String> {
    let pos = pairs.positions()?;
    let mut out = vec![0.0; pairs.tokens * hidden];
    for (p, &r) in pos.iter().enumerate() {
        let t = p / pairs.k;
        let row = &ys[r * hidden..(r + 1) * hidden];
        for (o, y) in out[t * hidden..(t + 1) * hidden].iter_mut().zip(row) {
            *o += weights[p] * y;
        }
    }
    Ok(out)
}

/// The gradient of [`permute`]: `dx[t] = sum_j dxs[pos(t, j)]`.
pub fn permute_grad(dxs: &[f64], pairs: Pairs, hidden: usize) -> Result<Vec<f64>, String> {
    let ones = vec![1.0; pairs.top.len()];
    unpermute(dxs, pairs, &ones, hidden)
}

/// The gradients (dys, dweights) of [`unpermute`]: `dys[pos(t, j)] = weights[t, j] * dout[t]`
/// and `dweights[t, j] = ys[pos(t, j)] . dout[t]`.
pub fn unpermute_grad(
    ys: &[f64],
    pairs: Pairs,
    weights: &[f64],
    dout: &[f64],
    hidden: usize,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    let pos = pairs.positions()?;
    let mut dys = vec![0.0; ys.len()];
    let mut dw = vec![0.0; weights.len()];
    for (p, &r) in pos.iter().enumerate() {
        let t = p / pairs.k;
        let d = &dout[t * hidden..(t + 1) * hidden];
        let rows = r * hidden..(r + 1) * hidden;
        dw[p] = dot(&ys[rows.clone()], d);
        for (g, d) in dys[rows].iter_mut().zip(d) {
            *g = weights[p] * d;
        }
    }
    Ok((dys, dw))
}
