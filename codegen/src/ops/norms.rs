//! RMSNorm and LayerNorm (and their backward ops), softmax and log-softmax over rows of the
//! last axis: statistics accumulated in f64 in the interpreter's order, each result rounded
//! once. An item takes [`LANES`] rows (one for softmax and log-softmax, whose exponentials
//! dominate), their reduction chains interleaved in one loop.
//!
//! The norms' weight gradients are column sums over the rows. They take a second launch that
//! parallelises by column: the first launch (over the rows) writes `dx` and each row's
//! statistics to scratch, the second (one item per block of [`COLS`] columns) accumulates the
//! block's sums in f64 scratch, visiting the rows in order, so every sum is added in the
//! interpreter's order and `dw`/`db` are its values bit for bit.

use super::{launch_name, Arg, Launch, Lowered, Work};
use crate::kernel::{Access, Buffer, KernelError};
use crate::loops::{cst, idx, load, Expr, LoopBuilder, LoopKernel, Var};
use mmc_ir::{DType, FusedOp, Graph, Node, Op};

const F64: DType = DType::F64;

/// Columns per item of a column-sum launch: a multiple of every vector width, small enough
/// that a hidden size of 512 still gives 8 items to spread over the threads.
pub(super) const COLS: usize = 64;

/// Rows per tile: about 4,096 elements of work per tile, at least one row.
pub(super) fn rows_per_tile(row: usize) -> usize {
    (4096 / row.max(1)).max(1)
}

/// The lowering of `node` if it is one of this module's ops.
pub(super) fn lower(g: &Graph, node: &Node, name: &str) -> Option<Result<Lowered, KernelError>> {
    let Op::Fused(f) = &node.op else {
        return None;
    };
    Some(match f {
        FusedOp::RmsNorm { eps } => rms_norm(g, node, name, *eps),
        FusedOp::RmsNormGrad { eps } => rms_norm_grad(g, node, name, *eps),
        FusedOp::LayerNorm { eps } => layer_norm(g, node, name, *eps),
        FusedOp::LayerNormGrad { eps } => layer_norm_grad(g, node, name, *eps),
        FusedOp::Softmax => softmax(g, node, name),
        FusedOp::SoftmaxGrad => softmax_grad(g, node, name),
        FusedOp::LogSoftmax => log_softmax(g, node, name),
        FusedOp::LogSoftmaxGrad => log_softmax_grad(g, node, name),
        _ => return None,
    })
}

/// The float dtype of `node`'s results: f32, f64 or bf16 (the kernels compute in f64 and
/// round once); f16 has no kernels yet.
pub(super) fn float(g: &Graph, node: &Node) -> Result<DType, KernelError> {
    let d = g.ty(node.outputs[0]).dtype;
    match d {
        DType::F32 | DType::F64 | DType::BF16 => Ok(d),
        dtype => Err(KernelError::Dtype {
            op: node.op.name(),
            dtype,
        }),
    }
}

/// A finished kernel, or the description's bug as a [`KernelError`].
pub(super) fn finish(k: LoopBuilder) -> Result<LoopKernel, KernelError> {
    k.finish().map_err(|e| KernelError::Invalid(e.to_string()))
}

/// Rows per item of the kernels whose row reductions are chains of f64 additions: the
/// chains of four rows are interleaved, so they overlap in the FPU instead of each waiting
/// on its last addition, and each still adds in the interpreter's order.
const LANES: usize = 4;

/// What a row kernel works over: `rows` rows of `n` elements of dtype `d` (the node's first
/// operand, `shape`), `lanes` rows per item.
struct Rows {
    d: DType,
    n: usize,
    rows: usize,
    shape: Vec<usize>,
    lanes: usize,
}

/// One row of an item: its index and the offset of its first element.
#[derive(Clone, Copy)]
struct Lane {
    row: Var,
    base: Var,
}

impl Rows {
    fn of(g: &Graph, node: &Node, lanes: usize) -> Result<Rows, KernelError> {
        let d = float(g, node)?;
        let shape = g.ty(node.inputs[0]).shape.to_vec();
        let n = *shape.last().unwrap_or(&1);
        let rows = shape.iter().product::<usize>() / n.max(1);
        Ok(Rows {
            d,
            n,
            rows,
            shape,
            lanes,
        })
    }

    /// A kernel with one item per `lanes` rows.
    fn kernel(&self, name: String) -> LoopBuilder {
        let items = self.rows.div_ceil(self.lanes);
        LoopBuilder::new(name, items, rows_per_tile(self.n * self.lanes))
    }

    /// The item's rows: `lanes` consecutive ones, the last item's repeating the last row
    /// where the rows run out (it computes that row again and stores the same values, so no
    /// lane needs a branch). Every pass of a kernel over a row must therefore give the same
    /// values when repeated: with more than one lane, none reads back what it wrote.
    fn lanes(&self, k: &mut LoopBuilder) -> Vec<Lane> {
        let last = idx(self.rows.max(1) - 1);
        (0..self.lanes)
            .map(|l| {
                let row = k.var(
                    DType::I64,
                    (k.item() * idx(self.lanes) + idx(l)).min(last.clone()),
                );
                let base = k.var(DType::I64, row.val() * idx(self.n));
                Lane { row, base }
            })
            .collect()
    }

    /// Element `j` of lane `l`'s row of buffer `b`, as f64.
    fn at(&self, b: usize, l: Lane, j: Expr) -> Expr {
        load(b, l.base.val() + j).cast(F64)
    }

    /// Stores `v` (f64) at element `j` of lane `l`'s row of `b`, rounded once.
    fn put(&self, k: &mut LoopBuilder, b: usize, l: Lane, j: Expr, v: Expr) {
        k.store(b, l.base.val() + j, v.cast(self.d));
    }

    /// `for j in 0..n { body(lane, j) }` for each lane in turn.
    fn each(
        &self,
        k: &mut LoopBuilder,
        ls: &[Lane],
        mut body: impl FnMut(&mut LoopBuilder, usize, Expr),
    ) {
        for l in 0..ls.len() {
            k.for_(idx(0), idx(self.n), |k, j| body(k, l, j));
        }
    }
}

/// `sums` row sums per lane, `sum over j in 0..n of terms(lane, j)[s]` in f64, each added in
/// order from 0 as the interpreter's `iter().sum()` and `+=` loops add; the lanes' (and the
/// sums') chains interleaved in one loop.
fn row_sums(
    k: &mut LoopBuilder,
    r: &Rows,
    ls: &[Lane],
    sums: usize,
    terms: impl Fn(usize, Expr) -> Vec<Expr>,
) -> Vec<Vec<Var>> {
    let acc: Vec<Vec<Var>> = ls
        .iter()
        .map(|_| (0..sums).map(|_| k.var(F64, cst(0.0, F64))).collect())
        .collect();
    k.for_(idx(0), idx(r.n), |k, j| {
        for (l, a) in acc.iter().enumerate() {
            for (s, t) in a.iter().zip(terms(l, j.clone())) {
                k.set(*s, s.val() + t);
            }
        }
    });
    acc
}

/// One row sum per lane (see [`row_sums`]).
fn row_sum(
    k: &mut LoopBuilder,
    r: &Rows,
    ls: &[Lane],
    term: impl Fn(usize, Expr) -> Expr,
) -> Vec<Var> {
    row_sums(k, r, ls, 1, |l, j| vec![term(l, j)])
        .into_iter()
        .map(|v| v[0])
        .collect()
}

/// Each lane's row maximum of buffer `b` (NaN if the row has one, as the interpreter's
/// `nan_max`).
fn row_max(k: &mut LoopBuilder, r: &Rows, ls: &[Lane], b: usize) -> Vec<Var> {
    let m: Vec<Var> = ls
        .iter()
        .map(|_| k.var(F64, cst(f64::NEG_INFINITY, F64)))
        .collect();
    k.for_(idx(0), idx(r.n), |k, j| {
        for (&m, &l) in m.iter().zip(ls) {
            k.set(m, m.val().max(r.at(b, l, j.clone())));
        }
    });
    m
}

/// Each lane's `1 / sqrt(sum(x^2) * (1/n) + eps)` of its row of `bx`.
fn rms_scale(k: &mut LoopBuilder, r: &Rows, ls: &[Lane], bx: usize, eps: f64) -> Vec<Var> {
    let ss = row_sum(k, r, ls, |l, j| {
        let v = r.at(bx, ls[l], j);
        v.clone() * v
    });
    ss.into_iter()
        .map(|ss| {
            let ms = ss.val() * cst(1.0 / r.n as f64, F64);
            k.var(F64, cst(1.0, F64) / (ms + cst(eps, F64)).sqrt())
        })
        .collect()
}

/// Each lane's row mean of `bx` and `1 / sqrt(var + eps)` (biased variance).
fn moments(k: &mut LoopBuilder, r: &Rows, ls: &[Lane], bx: usize, eps: f64) -> Vec<(Var, Var)> {
    let inv_n = cst(1.0 / r.n as f64, F64);
    let s = row_sum(k, r, ls, |l, j| r.at(bx, ls[l], j));
    let mu: Vec<Var> = s
        .iter()
        .map(|s| k.var(F64, s.val() * inv_n.clone()))
        .collect();
    let sq = row_sum(k, r, ls, |l, j| {
        let c = r.at(bx, ls[l], j) - mu[l].val();
        c.clone() * c
    });
    mu.into_iter()
        .zip(sq)
        .map(|(mu, sq)| {
            let var = sq.val() * inv_n.clone();
            (mu, k.var(F64, cst(1.0, F64) / (var + cst(eps, F64)).sqrt()))
        })
        .collect()
}

/// `y = w * (x * r)` with `r = 1 / sqrt(sum(x^2) * (1/n) + eps)` per row.
fn rms_norm(g: &Graph, node: &Node, name: &str, eps: f64) -> Result<Lowered, KernelError> {
    let r = Rows::of(g, node, LANES)?;
    let mut k = r.kernel(launch_name(name, 0));
    let (bx, bw) = (k.read(r.d, &r.shape), k.read(r.d, &[r.n]));
    let by = k.write(r.d, &r.shape);
    let ls = r.lanes(&mut k);
    let s = rms_scale(&mut k, &r, &ls, bx, eps);
    r.each(&mut k, &ls, |k, l, j| {
        let v = r.at(bx, ls[l], j.clone());
        let w = load(bw, j.clone()).cast(F64);
        r.put(k, by, ls[l], j, w * (v * s[l].val()));
    });
    Ok(Lowered::single(node, finish(k)?.into()))
}

/// (x, w, dy) -> (dx, dw): with `g = w * dy`, `dx = r * g - x * r^3 * mean(g * x)` per row
/// (launch 0, which also keeps each row's `r`), and `dw = sum over rows of dy * x * r`
/// (launch 1, by column).
fn rms_norm_grad(g: &Graph, node: &Node, name: &str, eps: f64) -> Result<Lowered, KernelError> {
    let r = Rows::of(g, node, LANES)?;
    let mut k = r.kernel(launch_name(name, 0));
    let (bx, bw, bd) = (
        k.read(r.d, &r.shape),
        k.read(r.d, &[r.n]),
        k.read(r.d, &r.shape),
    );
    let bdx = k.write(r.d, &r.shape);
    let bst = k.write(F64, &[r.rows, 1]);
    let ls = r.lanes(&mut k);
    let s = rms_scale(&mut k, &r, &ls, bx, eps);
    let gx = row_sum(&mut k, &r, &ls, |l, j| {
        load(bw, j.clone()).cast(F64) * r.at(bd, ls[l], j.clone()) * r.at(bx, ls[l], j)
    });
    let c: Vec<Var> = (0..ls.len())
        .map(|l| {
            let (s, gx) = (s[l].val(), gx[l].val());
            k.var(F64, s.clone() * s.clone() * s * gx / cst(r.n as f64, F64))
        })
        .collect();
    r.each(&mut k, &ls, |k, l, j| {
        let w = load(bw, j.clone()).cast(F64);
        let v =
            s[l].val() * w * r.at(bd, ls[l], j.clone()) - c[l].val() * r.at(bx, ls[l], j.clone());
        r.put(k, bdx, ls[l], j, v);
    });
    for (l, s) in ls.iter().zip(&s) {
        k.store(bst, l.row.val(), s.val());
    }
    let rows = finish(k)?;
    let cols = column_sums(&r, launch_name(name, 1), 1, 1, |st, x, dy| {
        vec![dy * x * st[0].clone()]
    })?;
    Ok(Lowered {
        launches: vec![
            Launch {
                work: Work::Kernel(rows.into()),
                args: vec![
                    Arg::Input(0),
                    Arg::Input(1),
                    Arg::Input(2),
                    Arg::Output(0),
                    Arg::Scratch(0),
                ],
            },
            Launch {
                work: Work::Kernel(cols.into()),
                args: vec![
                    Arg::Input(0),
                    Arg::Input(2),
                    Arg::Scratch(0),
                    Arg::Scratch(1),
                    Arg::Output(1),
                ],
            },
        ],
        scratch: vec![scratch(&[r.rows, 1]), scratch(&[1, r.n])],
    })
}

/// An f64 scratch buffer of `shape`.
fn scratch(shape: &[usize]) -> Buffer {
    Buffer {
        dtype: F64,
        shape: shape.to_vec(),
        access: Access::Write,
    }
}

/// The column-sum launch of a norm's backward: buffers (x, dy, stats `[rows, s]` f64,
/// acc `[sums, n]` f64, then `sums` results `[n]`); one item per block of [`COLS`] columns.
/// Each block's sums start at 0 and add `terms(row stats, x, dy)` (f64) row after row, then
/// are rounded once into the results.
fn column_sums(
    r: &Rows,
    name: String,
    stats: usize,
    sums: usize,
    terms: impl FnOnce(&[Expr], Expr, Expr) -> Vec<Expr>,
) -> Result<LoopKernel, KernelError> {
    let n = r.n;
    let mut k = LoopBuilder::new(name, n.div_ceil(COLS), 1);
    let (bx, bd) = (k.read(r.d, &r.shape), k.read(r.d, &r.shape));
    let bst = k.read(F64, &[r.rows, stats]);
    let bacc = k.write(F64, &[sums, n]);
    let outs: Vec<usize> = (0..sums).map(|_| k.write(r.d, &[n])).collect();
    let lo = k.var(DType::I64, k.item() * idx(COLS));
    let hi = k.var(DType::I64, (lo.val() + idx(COLS)).min(idx(n)));
    k.for_(lo.val(), hi.val(), |k, j| {
        for o in 0..sums {
            k.store(bacc, idx(o * n) + j.clone(), cst(0.0, F64));
        }
    });
    k.for_(idx(0), idx(r.rows), |k, row| {
        let st: Vec<Expr> = (0..stats)
            .map(|s| {
                let v = load(bst, row.clone() * idx(stats) + idx(s));
                k.var(F64, v).val()
            })
            .collect();
        k.for_(lo.val(), hi.val(), |k, j| {
            let at = row * idx(n) + j.clone();
            let x = load(bx, at.clone()).cast(F64);
            let dy = load(bd, at).cast(F64);
            for (o, t) in terms(&st, x, dy).into_iter().enumerate() {
                let a = idx(o * n) + j.clone();
                k.store(bacc, a.clone(), load(bacc, a) + t);
            }
        });
    });
    k.for_(lo.val(), hi.val(), |k, j| {
        for (o, &b) in outs.iter().enumerate() {
            k.store(b, j.clone(), load(bacc, idx(o * n) + j.clone()).cast(r.d));
        }
    });
    finish(k)
}

/// `(x - mean) * r * w + b` with `r = 1 / sqrt(var + eps)` per row.
fn layer_norm(g: &Graph, node: &Node, name: &str, eps: f64) -> Result<Lowered, KernelError> {
    let r = Rows::of(g, node, LANES)?;
    let mut k = r.kernel(launch_name(name, 0));
    let (bx, bw, bb) = (
        k.read(r.d, &r.shape),
        k.read(r.d, &[r.n]),
        k.read(r.d, &[r.n]),
    );
    let by = k.write(r.d, &r.shape);
    let ls = r.lanes(&mut k);
    let m = moments(&mut k, &r, &ls, bx, eps);
    r.each(&mut k, &ls, |k, l, j| {
        let (mu, s) = m[l];
        let v = r.at(bx, ls[l], j.clone());
        let w = load(bw, j.clone()).cast(F64);
        let b = load(bb, j.clone()).cast(F64);
        r.put(k, by, ls[l], j, (v - mu.val()) * s.val() * w + b);
    });
    Ok(Lowered::single(node, finish(k)?.into()))
}

/// (x, w, dy) -> (dx, dw, db): with `xh = (x - mean) * r` and `g = w * dy`,
/// `dx = r * (g - mean(g) - xh * mean(g * xh))` per row (launch 0, which keeps each row's
/// mean and `r`), `dw = sum dy * xh` and `db = sum dy` over the rows (launch 1, by column).
fn layer_norm_grad(g: &Graph, node: &Node, name: &str, eps: f64) -> Result<Lowered, KernelError> {
    let r = Rows::of(g, node, LANES)?;
    let mut k = r.kernel(launch_name(name, 0));
    let (bx, bw, bd) = (
        k.read(r.d, &r.shape),
        k.read(r.d, &[r.n]),
        k.read(r.d, &r.shape),
    );
    let bdx = k.write(r.d, &r.shape);
    let bst = k.write(F64, &[r.rows, 2]);
    let ls = r.lanes(&mut k);
    let m = moments(&mut k, &r, &ls, bx, eps);
    let means = row_sums(&mut k, &r, &ls, 2, |l, j| {
        let (mu, s) = m[l];
        let gv = load(bw, j.clone()).cast(F64) * r.at(bd, ls[l], j.clone());
        let xc = r.at(bx, ls[l], j) - mu.val();
        vec![gv.clone(), gv * xc * s.val()]
    });
    let nf = cst(r.n as f64, F64);
    for v in means.iter().flatten() {
        k.set(*v, v.val() / nf.clone());
    }
    r.each(&mut k, &ls, |k, l, j| {
        let ((mu, s), (g_mean, gx_mean)) = (m[l], (means[l][0], means[l][1]));
        let xh = (r.at(bx, ls[l], j.clone()) - mu.val()) * s.val();
        let w = load(bw, j.clone()).cast(F64);
        let gv = w * r.at(bd, ls[l], j.clone());
        let v = s.val() * (gv - g_mean.val() - xh * gx_mean.val());
        r.put(k, bdx, ls[l], j, v);
    });
    for (l, (mu, s)) in ls.iter().zip(&m) {
        k.store(bst, l.row.val() * idx(2), mu.val());
        k.store(bst, l.row.val() * idx(2) + idx(1), s.val());
    }
    let rows = finish(k)?;
    let cols = column_sums(&r, launch_name(name, 1), 2, 2, |st, x, dy| {
        let xh = (x - st[0].clone()) * st[1].clone();
        vec![dy.clone() * xh, dy]
    })?;
    Ok(Lowered {
        launches: vec![
            Launch {
                work: Work::Kernel(rows.into()),
                args: vec![
                    Arg::Input(0),
                    Arg::Input(1),
                    Arg::Input(2),
                    Arg::Output(0),
                    Arg::Scratch(0),
                ],
            },
            Launch {
                work: Work::Kernel(cols.into()),
                args: vec![
                    Arg::Input(0),
                    Arg::Input(2),
                    Arg::Scratch(0),
                    Arg::Scratch(1),
                    Arg::Output(1),
                    Arg::Output(2),
                ],
            },
        ],
        scratch: vec![scratch(&[r.rows, 2]), scratch(&[2, r.n])],
    })
}

/// `exp(x - max) / sum(exp(x - max))` per row, one row per item (the exponentials, not
/// the sum's chain, take the time). In f64 the exponentials are stored and divided in place;
/// in f32 (where the stored values would be rounded) they are recomputed, the same values.
fn softmax(g: &Graph, node: &Node, name: &str) -> Result<Lowered, KernelError> {
    let r = Rows::of(g, node, 1)?;
    let mut k = r.kernel(launch_name(name, 0));
    let bx = k.read(r.d, &r.shape);
    let by = k.write(r.d, &r.shape);
    let ls = r.lanes(&mut k);
    let m = row_max(&mut k, &r, &ls, bx)[0];
    let l = ls[0];
    if r.d == F64 {
        r.each(&mut k, &ls, |k, _, j| {
            let e = (r.at(bx, l, j.clone()) - m.val()).exp();
            r.put(k, by, l, j, e);
        });
        let s = row_sum(&mut k, &r, &ls, |_, j| r.at(by, l, j))[0];
        r.each(&mut k, &ls, |k, _, j| {
            let v = r.at(by, l, j.clone()) / s.val();
            r.put(k, by, l, j, v);
        });
    } else {
        let s = row_sum(&mut k, &r, &ls, |_, j| (r.at(bx, l, j) - m.val()).exp())[0];
        r.each(&mut k, &ls, |k, _, j| {
            let v = (r.at(bx, l, j.clone()) - m.val()).exp() / s.val();
            r.put(k, by, l, j, v);
        });
    }
    Ok(Lowered::single(node, finish(k)?.into()))
}

/// (y, dy) -> dx = y * (dy - sum(dy * y)) per row.
fn softmax_grad(g: &Graph, node: &Node, name: &str) -> Result<Lowered, KernelError> {
    let r = Rows::of(g, node, LANES)?;
    let mut k = r.kernel(launch_name(name, 0));
    let (by, bd) = (k.read(r.d, &r.shape), k.read(r.d, &r.shape));
    let bdx = k.write(r.d, &r.shape);
    let ls = r.lanes(&mut k);
    let s = row_sum(&mut k, &r, &ls, |l, j| {
        r.at(by, ls[l], j.clone()) * r.at(bd, ls[l], j)
    });
    r.each(&mut k, &ls, |k, l, j| {
        let v = r.at(by, ls[l], j.clone()) * (r.at(bd, ls[l], j.clone()) - s[l].val());
        r.put(k, bdx, ls[l], j, v);
    });
    Ok(Lowered::single(node, finish(k)?.into()))
}

/// `x - (log(sum(exp(x - max))) + max)` per row, one row per item (see [`softmax`]).
fn log_softmax(g: &Graph, node: &Node, name: &str) -> Result<Lowered, KernelError> {
    let r = Rows::of(g, node, 1)?;
    let mut k = r.kernel(launch_name(name, 0));
    let bx = k.read(r.d, &r.shape);
    let by = k.write(r.d, &r.shape);
    let ls = r.lanes(&mut k);
    let l = ls[0];
    let m = row_max(&mut k, &r, &ls, bx)[0];
    let s = row_sum(&mut k, &r, &ls, |_, j| (r.at(bx, l, j) - m.val()).exp())[0];
    let lse = k.var(F64, s.val().log() + m.val());
    r.each(&mut k, &ls, |k, _, j| {
        let v = r.at(bx, l, j.clone()) - lse.val();
        r.put(k, by, l, j, v);
    });
    Ok(Lowered::single(node, finish(k)?.into()))
}

/// (y, dy) -> dx = dy - exp(y) * sum(dy) per row.
fn log_softmax_grad(g: &Graph, node: &Node, name: &str) -> Result<Lowered, KernelError> {
    let r = Rows::of(g, node, LANES)?;
    let mut k = r.kernel(launch_name(name, 0));
    let (by, bd) = (k.read(r.d, &r.shape), k.read(r.d, &r.shape));
    let bdx = k.write(r.d, &r.shape);
    let ls = r.lanes(&mut k);
    let s = row_sum(&mut k, &r, &ls, |l, j| r.at(bd, ls[l], j));
    r.each(&mut k, &ls, |k, l, j| {
        let v = r.at(bd, ls[l], j.clone()) - r.at(by, ls[l], j.clone()).exp() * s[l].val();
        r.put(k, bdx, ls[l], j, v);
    });
    Ok(Lowered::single(node, finish(k)?.into()))
}
