//! A small written FLOP model, so that passes which trade work for memory (recompute) or pick
//! among equivalent forms can say what a node costs.
//!
//! The counts are those of the textbook: a matmul `[.., m, k] x [.., k, n]` costs `2 m n k` per
//! batch element; an elementwise op (unary, binary, compare, select, cast) one per result
//! element; a reduction, a cumulative sum, a gather or a scatter-add one per input (or index)
//! element; a sort `n log2 n` per row and a top-k one per input element. Moving data (reshape,
//! permute, broadcast, slice, pad, concat) and sources (params, inputs, constants, iota) cost
//! nothing. A fused op costs what the primitive subgraph it replaces costs.

use mmc_ir::{FusedOp, Graph, Node, Op, TensorType};

/// The FLOPs of one node of `g`.
pub fn node_flops(g: &Graph, node: &Node) -> u64 {
    let ins: Vec<&TensorType> = node.inputs.iter().map(|&v| g.ty(v)).collect();
    let outs: Vec<&TensorType> = node.outputs.iter().map(|&v| g.ty(v)).collect();
    op_flops(&node.op, &ins, &outs)
}

/// The FLOPs of all nodes of `g`.
pub fn graph_flops(g: &Graph) -> u64 {
    g.nodes().iter().map(|n| node_flops(g, n)).sum()
}

/// The FLOPs of `op` applied to operands of types `ins` giving results of types `outs`.
pub fn op_flops(op: &Op, ins: &[&TensorType], outs: &[&TensorType]) -> u64 {
    let numel = |t: &TensorType| t.numel() as u64;
    let out = || outs.first().map_or(0, |t| numel(t));
    let first_in = || ins.first().map_or(0, |t| numel(t));
    match op {
        Op::Param { .. } | Op::Input { .. } | Op::Const { .. } | Op::Iota { .. } => 0,
        Op::Broadcast { .. }
        | Op::Reshape { .. }
        | Op::Permute { .. }
        | Op::Slice { .. }
        | Op::Pad { .. }
        | Op::Concat { .. } => 0,
        Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Select | Op::Cast { .. } => out(),
        Op::Reduce { .. } | Op::CumSum { .. } | Op::TopK { .. } => first_in(),
        // One read per index element; scatter-add adds one source element per index element.
        Op::Gather { .. } => out(),
        Op::ScatterAdd { .. } => ins.get(1).map_or(0, |t| numel(t)),
        Op::ArgSort { .. } => {
            let x = ins.first().map_or(0, |t| numel(t));
            let n = ins
                .first()
                .and_then(|t| t.shape.last().copied())
                .unwrap_or(1) as u64;
            x * log2_ceil(n)
        }
        Op::MatMul => matmul_flops(ins),
        Op::Fused(f) => fused_flops(f, ins, outs),
    }
}

/// `2 m n k` per batch element of `[.., m, k] x [.., k, n]`.
fn matmul_flops(ins: &[&TensorType]) -> u64 {
    let (Some(x), Some(y)) = (ins.first(), ins.get(1)) else {
        return 0;
    };
    let Some(&n) = y.shape.last() else {
        return 0;
    };
    // x has batch * m * k elements, each multiplied and added into n results.
    2 * x.numel() as u64 * n as u64
}

fn log2_ceil(n: u64) -> u64 {
    (u64::BITS - n.saturating_sub(1).leading_zeros()) as u64
}

/// The fused ops this version of the IR has, each as its primitive form counts.
fn fused_flops(f: &FusedOp, ins: &[&TensorType], outs: &[&TensorType]) -> u64 {
    match f {
        FusedOp::RmsNorm { .. } => {
            // x*x, the sum, x*r and w*(x r): four per element; mean, +eps and rsqrt per row.
            let x = ins.first().map_or(0, |t| t.numel() as u64);
            let rows = ins.first().map_or(0, |t| {
                (t.numel() / t.shape.last().copied().unwrap_or(1).max(1)) as u64
            });
            4 * x + 3 * rows
        }
        FusedOp::Elementwise { program, .. } => {
            program.flops_per_element() * outs.first().map_or(0, |t| t.numel() as u64)
        }
        FusedOp::MatMulEpilogue { program } => {
            matmul_flops(ins)
                + program.flops_per_element() * outs.first().map_or(0, |t| t.numel() as u64)
        }
        // Fused ops added after this model: as elementwise over their operands and results,
        // until their own line is written in `fused_flops_by_name`.
        #[allow(unreachable_patterns)]
        other => fused_flops_by_name(Op::Fused(other.clone()).name(), ins, outs),
    }
}

/// The FLOPs of the fused ops of the shared fused-op interface, by mnemonic, so that the
/// model covers each op the day the fusion pass adds it; an unknown mnemonic counts one FLOP
/// per element of every operand and result.
pub fn fused_flops_by_name(mnemonic: &str, ins: &[&TensorType], outs: &[&TensorType]) -> u64 {
    let n = |i: usize| ins.get(i).map_or(0, |t| t.numel() as u64);
    let last = |i: usize| {
        ins.get(i)
            .and_then(|t| t.shape.last().copied())
            .unwrap_or(1)
            .max(1) as u64
    };
    let dim = |i: usize, a: usize| {
        ins.get(i)
            .and_then(|t| t.shape.get(a).copied())
            .unwrap_or(0) as u64
    };
    match mnemonic {
        "fused.rms_norm" => 4 * n(0) + 3 * (n(0) / last(0)),
        // Mean, x - mu, its square, the sum, the scale, w and b: seven per element.
        "fused.layer_norm" => 7 * n(0) + 3 * (n(0) / last(0)),
        // max, x - max, exp, sum, divide.
        "fused.softmax" => 5 * n(0),
        // max, x - max, exp, sum, x - lse per element; log and + max per row.
        "fused.log_softmax" => 5 * n(0) + 2 * (n(0) / last(0)),
        // neg, exp, +1, divide, times up.
        "fused.swiglu" => 5 * n(0),
        // x / sqrt 2, erf, +1, x / 2, product.
        "fused.gelu" => 5 * n(0),
        // Two products and a sum per element (the rotated half is a move).
        "fused.rope" => 3 * n(0),
        "fused.attention" => {
            // q [b, hq, s, d], k [b, hkv, s, d]: q k^T and p v (2 s s d each per head), plus
            // the scale, mask and softmax over the [b, hq, s, s] scores.
            let (b, hq, s, d) = (dim(0, 0), dim(0, 1), dim(0, 2), dim(0, 3));
            let sk = dim(1, 2);
            let scores = b * hq * s * sk;
            4 * scores * d + 7 * scores
        }
        "fused.linear_cross_entropy" => {
            // h [n, k], w [v, k]: the logits (2 n v k), their logsumexp (3 per logit).
            let (rows, k) = (dim(0, 0), dim(0, 1));
            let v = dim(1, 0);
            2 * rows * v * k + 3 * rows * v
        }
        "fused.linear_cross_entropy_grad" | "fused.linear_cross_entropy_with_grad" => {
            // The logits, dh = dlogits w and dw = dlogits^T h (2 n v k each), the softmax
            // and its scaling (5 per logit).
            let (rows, k) = (dim(0, 0), dim(0, 1));
            let v = dim(1, 0);
            6 * rows * v * k + 5 * rows * v
        }
        "fused.grouped_matmul" => {
            // xs [n, a] against w [E, a, c]: each row meets one expert.
            let (rows, a) = (dim(0, 0), dim(0, 1));
            let c = ins
                .get(1)
                .and_then(|t| t.shape.get(2).copied())
                .unwrap_or(0) as u64;
            2 * rows * a * c
        }
        "fused.moe_permute" | "fused.moe_permute_grad" | "fused.expert_offsets" => 0,
        "fused.moe_unpermute" => 2 * n(0),
        "fused.sum_squares" => 2 * n(0),
        _ => {
            ins.iter().map(|t| t.numel() as u64).sum::<u64>()
                + outs.iter().map(|t| t.numel() as u64).sum::<u64>()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmc_ir::{BinaryOp, DType, ReduceKind, ScopeId, UnaryOp};

    fn t(shape: &[usize]) -> TensorType {
        TensorType::new(DType::F32, shape.to_vec())
    }

    #[test]
    fn matmul_is_two_m_n_k_per_batch() {
        let x = t(&[3, 4, 5]);
        let y = t(&[3, 5, 7]);
        let o = t(&[3, 4, 7]);
        assert_eq!(op_flops(&Op::MatMul, &[&x, &y], &[&o]), 2 * 3 * 4 * 7 * 5);
    }

    #[test]
    fn elementwise_counts_result_elements_and_reductions_input_elements() {
        let x = t(&[2, 6]);
        let r = t(&[2, 1]);
        assert_eq!(op_flops(&Op::Unary(UnaryOp::Exp), &[&x], &[&x]), 12);
        assert_eq!(op_flops(&Op::Binary(BinaryOp::Mul), &[&x, &x], &[&x]), 12);
        let sum = Op::Reduce {
            kind: ReduceKind::Sum,
            axes: vec![1],
        };
        assert_eq!(op_flops(&sum, &[&x], &[&r]), 12);
        let perm = Op::Permute { perm: vec![1, 0] };
        assert_eq!(op_flops(&perm, &[&x], &[&t(&[6, 2])]), 0);
        let bc = Op::Broadcast { shape: vec![2, 6] };
        assert_eq!(op_flops(&bc, &[&r], &[&x]), 0);
    }

    #[test]
    fn argsort_is_n_log_n_per_row() {
        let x = t(&[3, 8]);
        let i = TensorType::new(DType::I64, vec![3, 8]);
        let op = Op::ArgSort { descending: true };
        assert_eq!(op_flops(&op, &[&x], &[&i]), 24 * 3);
    }

    #[test]
    fn fused_rms_norm_costs_its_primitive_form() {
        let x = t(&[4, 8]);
        let w = t(&[8]);
        let op = Op::Fused(FusedOp::RmsNorm { eps: 1e-6 });
        assert_eq!(op_flops(&op, &[&x, &w], &[&x]), 4 * 32 + 3 * 4);
        assert_eq!(
            fused_flops_by_name("fused.rms_norm", &[&x, &w], &[&x]),
            4 * 32 + 3 * 4
        );
    }

    #[test]
    fn fused_log_softmax_costs_its_primitive_form() {
        let (x, r) = (t(&[3, 7]), t(&[3, 1]));
        let reduce = |kind| Op::Reduce {
            kind,
            axes: vec![1],
        };
        let un = |u| Op::Unary(u);
        let sub = Op::Binary(BinaryOp::Sub);
        // x - (log(sum(exp(x - max x))) + max x), the broadcasts free.
        let prim = op_flops(&reduce(ReduceKind::Max), &[&x], &[&r])
            + op_flops(&sub, &[&x, &x], &[&x])
            + op_flops(&un(UnaryOp::Exp), &[&x], &[&x])
            + op_flops(&reduce(ReduceKind::Sum), &[&x], &[&r])
            + op_flops(&un(UnaryOp::Log), &[&r], &[&r])
            + op_flops(&Op::Binary(BinaryOp::Add), &[&r, &r], &[&r])
            + op_flops(&sub, &[&x, &x], &[&x]);
        let op = Op::Fused(FusedOp::LogSoftmax);
        assert_eq!(op_flops(&op, &[&x], &[&x]), prim);
        assert_eq!(prim, 5 * 21 + 2 * 3);
    }

    #[test]
    fn fused_attention_counts_both_matmuls_and_the_softmax() {
        let q = t(&[1, 4, 16, 8]);
        let kv = t(&[1, 2, 16, 8]);
        let scores = 4 * 16 * 16;
        assert_eq!(
            fused_flops_by_name("fused.attention", &[&q, &kv, &kv], &[&q]),
            4 * scores * 8 + 7 * scores
        );
        // An unknown mnemonic is elementwise over everything it touches.
        assert_eq!(fused_flops_by_name("fused.future", &[&q], &[&q]), 2 * 512);
    }

    #[test]
    fn graph_flops_sums_the_nodes() {
        let mut g = mmc_ir::Graph::new(mmc_ir::Stage::Frontend);
        let s = ScopeId::default();
        let x = g
            .add_node(
                Op::Input {
                    name: "x".into(),
                    ty: t(&[2, 3]),
                },
                &[],
                s,
            )
            .unwrap();
        let w = g
            .add_node(
                Op::Param {
                    name: "w".into(),
                    ty: t(&[3, 4]),
                },
                &[],
                s,
            )
            .unwrap();
        let (x, w) = (g.result(x), g.result(w));
        let m = g.add_node(Op::MatMul, &[x, w], s).unwrap();
        let m = g.result(m);
        g.add_node(Op::Unary(UnaryOp::Tanh), &[m], s).unwrap();
        assert_eq!(graph_flops(&g), 2 * 2 * 4 * 3 + 8);
    }
}
