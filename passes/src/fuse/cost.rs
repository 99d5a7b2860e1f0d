//! The cost model of fusion: bytes moved plus FLOPs, per e-node.
//!
//! Every op that materialises its result reads its operands and writes its result once, so it
//! moves `sum(operand bytes) + result bytes`; its FLOPs are a per-element count (4 for a
//! transcendental such as `exp`, 1 for an add) or the matmul's `2 m n k`. Reshapes and
//! broadcasts are views (a stride change), so they move nothing; their consumers pay for
//! reading the full-size view. Arguments (values computed outside the region) and attribute
//! leaves are free.
//!
//! A fused op moves only its operands and its result, never the intermediates of the subgraph
//! it replaces, and does the same arithmetic: so it always costs less than that subgraph,
//! unless the subgraph's intermediates are needed anyway, which only a DAG-aware extractor
//! ([`super::extract`]) can see.

use super::lang::{Data, Fuse, FuseGraph};
use egg::{Id, Language};

/// How much one FLOP weighs against one byte moved. The model only ranks alternatives, and
/// the kernels fusion targets are bandwidth-bound, so bytes and FLOPs count alike.
pub const FLOP_WEIGHT: f64 = 1.0;

/// FLOPs per element of a transcendental function (exp, log, erf, rsqrt, ...).
pub const TRANSCENDENTAL_FLOPS: f64 = 4.0;

/// The estimated cost of one e-node.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NodeCost {
    /// Bytes read and written.
    pub bytes: f64,
    /// Arithmetic operations.
    pub flops: f64,
}

impl NodeCost {
    /// The scalar the extractor minimises.
    pub fn total(&self) -> f64 {
        self.bytes + FLOP_WEIGHT * self.flops
    }
}

/// The cost of e-node `node` whose result has data `out`, reading its operands' data with
/// `data`. Ill-typed nodes cost infinity, so no extractor picks them.
pub fn node_cost<'a>(node: &Fuse, out: &Data, data: impl Fn(Id) -> &'a Data) -> NodeCost {
    let Some(out_ty) = out.tensor() else {
        return match out {
            Data::Attr(_) => NodeCost::default(),
            _ => NodeCost {
                bytes: f64::INFINITY,
                flops: f64::INFINITY,
            },
        };
    };
    let n = out_ty.numel() as f64;
    let out_bytes = out_ty.size_bytes() as f64;
    let in_bytes: f64 = node
        .children()
        .iter()
        .filter_map(|&c| data(c).tensor())
        .map(|t| t.size_bytes() as f64)
        .sum();
    let moved = |flops: f64| NodeCost {
        bytes: in_bytes + out_bytes,
        flops,
    };
    let operand = |i: usize| data(node.children()[i]).tensor();
    use Fuse::*;
    match node {
        Arg(_) | Num(_) | Float(_) | Bool(_) | DType(_) | Ty(_) | Ints(_) => NodeCost::default(),
        Reshape(_) | Broadcast(_) => NodeCost::default(),
        Const(_) | Iota(_) => NodeCost {
            bytes: out_bytes,
            flops: 0.0,
        },
        Exp(_) | Log(_) | Sqrt(_) | Rsqrt(_) | Tanh(_) | Erf(_) | Sin(_) | Cos(_) | Pow(_) => {
            moved(TRANSCENDENTAL_FLOPS * n)
        }
        Neg(_) | Abs(_) | Recip(_) | Not(_) | Add(_) | Sub(_) | Mul(_) | Div(_) | Max(_)
        | Min(_) | And(_) | Or(_) | Eq(_) | Ne(_) | Lt(_) | Le(_) | Gt(_) | Ge(_) | Select(_)
        | Cast(_) => moved(n),
        ReduceSum(_) | ReduceMax(_) | CumSum(_) => {
            moved(operand(0).map_or(n, |t| t.numel() as f64))
        }
        Permute(_) | Slice(_) | Pad(_) | Concat(_) | Gather(_) | ScatterAdd(_) => moved(0.0),
        TopK(_) | ArgSort(_) => {
            let m = operand(0).map_or(n, |t| t.numel() as f64);
            let row = operand(0)
                .and_then(|t| t.shape.last().copied())
                .unwrap_or(1)
                .max(2) as f64;
            moved(m * row.log2())
        }
        MatMul(_) => {
            let k = operand(0)
                .and_then(|t| t.shape.last().copied())
                .unwrap_or(1) as f64;
            moved(2.0 * n * k)
        }
        // Per element: x^2, sum, scale, w * x * r.
        RmsNorm(_) => moved(4.0 * n),
        // Per element: sum, subtract, square, sum, scale, * w, + b.
        LayerNorm(_) => moved(7.0 * n),
        // Per element: max, subtract, exp, sum, divide.
        Softmax(_) => moved((4.0 + TRANSCENDENTAL_FLOPS) * n),
        // Per element: max, subtract, exp, sum, subtract (the log is per row).
        LogSoftmax(_) => moved((4.0 + TRANSCENDENTAL_FLOPS) * n),
        // Per element: neg, exp, add, div, mul.
        SwiGlu(_) => moved((4.0 + TRANSCENDENTAL_FLOPS) * n),
        // Per element: scale, erf, add, halve, mul.
        Gelu(_) => moved((4.0 + TRANSCENDENTAL_FLOPS) * n),
        // Per element: two muls and an add (the rotation is addressing).
        Rope(_) => moved(3.0 * n),
        Attention(_) => {
            // q [b, h, s, d]: scores and the weighted sum are 2 b h s s d each, plus the
            // softmax over [b, h, s, s].
            let (s, d) = operand(0)
                .filter(|t| t.rank() == 4)
                .map_or((1.0, 1.0), |t| (t.shape[2] as f64, t.shape[3] as f64));
            let rows = n / d.max(1.0);
            moved(4.0 * rows * s * d + (4.0 + TRANSCENDENTAL_FLOPS) * rows * s)
        }
        LinearCrossEntropy(_) => {
            let (rows, k) = operand(0)
                .filter(|t| t.rank() == 2)
                .map_or((1.0, 1.0), |t| (t.shape[0] as f64, t.shape[1] as f64));
            let v = operand(1)
                .filter(|t| t.rank() == 2)
                .map_or(1.0, |t| t.shape[0] as f64);
            moved(2.0 * rows * v * k + (4.0 + TRANSCENDENTAL_FLOPS) * rows * v)
        }
        MoePermute(_) | ExpertOffsets(_) => moved(n),
        GroupedMatMul(_) => {
            let a = operand(0)
                .and_then(|t| t.shape.last().copied())
                .unwrap_or(1) as f64;
            moved(2.0 * n * a)
        }
        MoeUnpermute(_) => {
            let rows = operand(0).map_or(n, |t| t.numel() as f64);
            moved(2.0 * rows)
        }
    }
}

/// The cost of an e-node of `egraph` (its e-class data gives the result type).
pub fn enode_cost(egraph: &FuseGraph, node: &Fuse) -> f64 {
    let out = node_out_data(egraph, node);
    node_cost(node, &out, |c| &egraph[c].data).total()
}

/// The data of the result of `node`, from its e-class when it is in the e-graph.
fn node_out_data(egraph: &FuseGraph, node: &Fuse) -> Data {
    match egraph.lookup(node.clone()) {
        Some(id) => egraph[id].data.clone(),
        None => super::lang::node_data(node, |c| egraph[c].data.clone()),
    }
}

/// egg's tree cost (a node plus the costs of its children, shared children counted once per
/// use) over the same per-node model: the baseline the DAG extractor is compared with.
pub struct TreeCost<'a> {
    /// The e-graph whose e-class data gives the types.
    pub egraph: &'a FuseGraph,
}

impl egg::CostFunction<Fuse> for TreeCost<'_> {
    type Cost = f64;

    fn cost<C>(&mut self, enode: &Fuse, mut costs: C) -> f64
    where
        C: FnMut(Id) -> f64,
    {
        let own = enode_cost(self.egraph, enode);
        enode.fold(own, |sum, id| sum + costs(id))
    }
}

#[cfg(test)]
mod tests {
    use super::super::extract::extract_dag;
    use super::super::lang::{Fuse, FuseGraph};
    use super::super::{guard, rules};
    use super::*;
    use egg::{RecExpr, Runner};

    fn one(expr: &str) -> (FuseGraph, Id) {
        let mut eg = FuseGraph::default();
        let id = eg.add_expr(&expr.parse::<RecExpr<Fuse>>().expect("a valid expression"));
        eg.rebuild();
        (eg, id)
    }

    #[test]
    fn elementwise_ops_move_operands_and_result() {
        let (eg, id) = one("(add (arg 0 f32[2,4]) (arg 1 f32[2,4]))");
        let node = eg[id].nodes[0].clone();
        let c = node_cost(&node, &eg[id].data, |c| &eg[c].data);
        assert_eq!(c.bytes, 3.0 * 32.0);
        assert_eq!(c.flops, 8.0);
        let (eg, id) = one("(exp (arg 0 bf16[10]))");
        let c = node_cost(&eg[id].nodes[0], &eg[id].data, |c| &eg[c].data);
        assert_eq!(c.bytes, 40.0);
        assert_eq!(c.flops, 4.0 * 10.0);
    }

    #[test]
    fn views_and_arguments_are_free_matmul_pays_its_flops() {
        let (eg, id) = one("(broadcast (reshape (arg 0 f32[4]) [1,4]) [8,4])");
        assert_eq!(enode_cost(&eg, &eg[id].nodes[0]), 0.0);
        let (eg, id) = one("(matmul (arg 0 f32[2,3]) (arg 1 f32[3,5]))");
        let c = node_cost(&eg[id].nodes[0], &eg[id].data, |c| &eg[c].data);
        assert_eq!(c.flops, 2.0 * 2.0 * 5.0 * 3.0);
        assert_eq!(c.bytes, 4.0 * (6.0 + 15.0 + 10.0));
    }

    #[test]
    fn a_fused_node_costs_less_than_the_subgraph_it_replaces() {
        // RMSNorm over [4, 16] in the DSL's f32 form.
        let x = "(arg 0 f32[4,16])";
        let mean_sq = format!("(mul (reduce_sum (mul {x} {x}) [1]) (const 0.0625 f32[4,1]))");
        let r = format!("(broadcast (rsqrt (add {mean_sq} (const 1e-6 f32[4,1]))) [4,16])");
        let w = "(broadcast (reshape (arg 1 f32[16]) [1,16]) [4,16])";
        let (eg, root) = one(&format!("(mul {w} (mul {x} {r}))"));
        let before = extract_dag(&eg, &[root]).expect("extracts").cost;
        let runner = Runner::default()
            .with_egraph(eg)
            .run(&guard::guarded(rules::rules()));
        let eg = runner.egraph;
        let root = eg.find(root);
        assert!(eg[root].nodes.iter().any(|n| matches!(n, Fuse::RmsNorm(_))));
        let after = extract_dag(&eg, &[root]).expect("extracts");
        assert!(matches!(after.choice[&root], Fuse::RmsNorm(_)));
        assert!(after.cost < before / 3.0, "{} vs {before}", after.cost);
        // The fused node moves x, w and y once.
        assert_eq!(after.cost, 4.0 * (64.0 + 16.0 + 64.0) + 4.0 * 64.0);
    }
}
