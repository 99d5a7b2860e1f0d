//! RMSNorm and LayerNorm (and their backward ops), softmax and log-softmax: one item per row
//! of the last axis, statistics accumulated in f64 in the interpreter's order, each result
//! rounded once.

use super::{launch_name, Lowered};
use crate::kernel::KernelError;
use crate::loops::{cst, idx, load, LoopBuilder};
use mmc_ir::{DType, FusedOp, Graph, Node, Op};

/// Rows per tile: about 4,096 elements of work per tile, at least one row.
pub(super) fn rows_per_tile(row: usize) -> usize {
    (4096 / row.max(1)).max(1)
}

/// The lowering of `node` if it is one of this module's ops.
pub(super) fn lower(g: &Graph, node: &Node, name: &str) -> Option<Result<Lowered, KernelError>> {
    match &node.op {
        Op::Fused(FusedOp::RmsNorm { eps }) => Some(rms_norm(g, node, name, *eps)),
        _ => None,
    }
}

fn float(g: &Graph, node: &Node) -> Result<DType, KernelError> {
    let d = g.ty(node.outputs[0]).dtype;
    match d {
        DType::F32 | DType::F64 => Ok(d),
        dtype => Err(KernelError::Dtype {
            op: node.op.name(),
            dtype,
        }),
    }
}

/// `y = w * (x * r)` with `r = 1 / sqrt(sum(x^2) * (1/n) + eps)` per row.
fn rms_norm(g: &Graph, node: &Node, name: &str, eps: f64) -> Result<Lowered, KernelError> {
    let d = float(g, node)?;
    let x = g.ty(node.inputs[0]);
    let n = *x.shape.last().unwrap_or(&1);
    let rows = x.numel() / n.max(1);
    let f64t = DType::F64;
    let mut k = LoopBuilder::new(launch_name(name, 0), rows, rows_per_tile(n));
    let (bx, bw) = (k.read(d, &x.shape), k.read(d, &[n]));
    let by = k.write(d, &x.shape);
    let base = k.item() * idx(n);
    let ss = k.var(f64t, cst(0.0, f64t));
    k.for_(idx(0), idx(n), |k, j| {
        let v = load(bx, base.clone() + j).cast(f64t);
        k.set(ss, ss.val() + v.clone() * v);
    });
    let ms = k.var(f64t, ss.val() * cst(1.0 / n as f64, f64t));
    let r = k.var(f64t, cst(1.0, f64t) / (ms.val() + cst(eps, f64t)).sqrt());
    k.for_(idx(0), idx(n), |k, j| {
        let v = load(bx, base.clone() + j.clone()).cast(f64t);
        let w = load(bw, j.clone()).cast(f64t);
        k.store(by, base.clone() + j, (w * (v * r.val())).cast(d));
    });
    let k = k
        .finish()
        .map_err(|e| KernelError::Invalid(e.to_string()))?;
    Ok(Lowered::single(g, node, k.into()))
}
