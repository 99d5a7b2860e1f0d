//! The interpreter's fused ops: each computed directly from its definition in f64 (never by
//! expanding it back into primitives), so the fusion pass is checked against an independent
//! implementation.

use super::kernels::Buf;
use super::Val;
use crate::fused::FusedOp;
use crate::TensorType;

/// The result buffers of fused op `op` (one per result type in `out`), unrounded.
pub(super) fn eval(op: &FusedOp, a: &[&Val], out: &[&TensorType]) -> Result<Vec<Buf>, String> {
    let _ = out;
    match op {
        FusedOp::RmsNorm { eps } => {
            let (x, w) = (a[0].f(), a[1].f());
            let n = w.len();
            let mut y = Vec::with_capacity(x.len());
            for row in x.chunks(n.max(1)) {
                let ms = row.iter().map(|v| v * v).sum::<f64>() / n as f64;
                let r = 1.0 / (ms + eps).sqrt();
                y.extend(row.iter().zip(w).map(|(v, w)| w * (v * r)));
            }
            Ok(vec![Buf::F(y)])
        }
        other => Err(format!("`{}` has no interpreter kernel yet", other.name())),
    }
}
