//! The routed-MoE rule (`passes/src/fuse/moe.rs`): the routed graph computes what the dense
//! one does (interpreter, f64 and f32, seeded random weights: the per-expert weights bound to
//! the dense graph, their stacking to the routed one), near misses do not fuse, and the
//! routed experts cost k/E of the dense experts' FLOPs.

use mmc_frontend::dsl::BuildResult;
use mmc_frontend::models::qwen3_moe::{causal_lm, TextInputs};
use mmc_frontend::{ModelBuilder, Sym, TextConfig};
use mmc_ir::interp::Precision;
use mmc_ir::plan::ParamStacking;
use mmc_ir::{verify, DType, FusedOp, Graph, Interpreter, Op, Stage, Tensor, TensorData};
use mmc_passes::fuse::moe::{fuse_moe, MoeReport};
use std::collections::BTreeMap;

/// A seeded stream of values in [-1, 1) (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    fn tensor(&mut self, dtype: DType, shape: &[usize], scale: f64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| scale * self.next()).collect();
        Tensor::from_f64(dtype, shape.to_vec(), &v).unwrap()
    }
}

/// Seeded values for every parameter and input of `g` (integer inputs get ids below
/// `vocab`, `segment_ids` all 1, `position_ids` 0.., `labels` ids).
fn bindings(g: &Graph, seed: u64, vocab: usize) -> BTreeMap<String, Tensor> {
    let mut rng = Rng(seed);
    let mut out = BTreeMap::new();
    for (name, ty, _) in g.params().chain(g.inputs()) {
        let t = if ty.dtype == DType::I64 {
            let n = ty.numel();
            let s = *ty.shape.last().unwrap_or(&1);
            let v: Vec<i64> = (0..n)
                .map(|i| match name {
                    "segment_ids" => 1,
                    "position_ids" => (i % s) as i64,
                    _ => ((rng.next() + 1.0) * 0.5 * vocab as f64) as i64 % vocab as i64,
                })
                .collect();
            Tensor::new(ty.shape.clone(), TensorData::I64(v)).unwrap()
        } else {
            rng.tensor(ty.dtype, &ty.shape, 0.5)
        };
        out.insert(name.to_string(), t);
    }
    out
}

/// The stacked tensors of `report`, assembled from the per-expert bindings.
fn stack(report: &MoeReport, b: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    let mut out = b.clone();
    for s in &report.stackings {
        let parts: Vec<&Tensor> = s.parts.iter().map(|p| &b[&p.name]).collect();
        out.insert(s.stacked.clone(), s.stack(&parts).unwrap());
    }
    out
}

fn run(g: &Graph, b: &BTreeMap<String, Tensor>, p: Precision) -> Vec<(String, Tensor)> {
    Interpreter::new(g, p)
        .unwrap()
        .run(b)
        .unwrap_or_else(|e| panic!("{e}"))
        .0
}

/// Runs both graphs and checks every output within `tol` (relative error per tensor).
fn assert_same(dense: &Graph, routed: &Graph, report: &MoeReport, p: Precision, tol: f64) {
    let b = bindings(dense, 7, 16);
    let want = run(dense, &b, p);
    let got = run(routed, &stack(report, &b), p);
    assert_eq!(want.len(), got.len());
    for ((n, w), (m, g)) in want.iter().zip(&got) {
        assert_eq!(n, m);
        assert_eq!(w.ty(), g.ty(), "{n}");
        let err = mmc_ir::relative_error(g, w);
        eprintln!("  {n}: relative error {err:.3e}");
        assert!(err <= tol, "{n}: relative error {err:.3e} above {tol:.0e}");
    }
}

fn count(g: &Graph, pred: impl Fn(&Op) -> bool) -> usize {
    g.nodes().iter().filter(|n| pred(&n.op)).count()
}

fn is_fused(op: &Op, f: fn(&FusedOp) -> bool) -> bool {
    matches!(op, Op::Fused(x) if f(x))
}

/// FLOPs of the graph's matrix products: 2mkn per (batched) matmul and per grouped row.
fn matmul_flops(g: &Graph) -> u64 {
    g.nodes()
        .iter()
        .map(|n| {
            let ty = |i: usize| g.ty(n.inputs[i]);
            match &n.op {
                Op::MatMul => {
                    let (a, b) = (ty(0), ty(1));
                    let r = a.rank();
                    let batch: usize = a.shape[..r - 2].iter().product();
                    2 * (batch * a.shape[r - 2] * a.shape[r - 1] * b.shape[r - 1]) as u64
                }
                Op::Fused(FusedOp::GroupedMatMul) => {
                    let (xs, w) = (ty(0), ty(1));
                    2 * (xs.shape[0] * xs.shape[1] * w.shape[2]) as u64
                }
                _ => 0,
            }
        })
        .sum()
}

/// How a hand-built block departs from the frontend's dense form.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Miss {
    None,
    /// The last expert is left out of the sum.
    MissingExpert,
    /// Expert 0 is summed twice, expert 1 never.
    DuplicateExpert,
    /// Expert 1 runs on another input.
    OtherX,
    /// Expert 1 is weighted by column 0.
    WrongColumn,
    /// The routing weights are scattered onto ones.
    NonZeroBase,
    /// Expert 0's gate weight also feeds an output.
    WeightUsedOutside,
    /// Expert 1's hidden activation also feeds an output.
    ValueUsedOutside,
    /// The sum has one more term (the input).
    ExtraTerm,
    /// Expert 1 uses relu-like `g * up` instead of silu(g) * up.
    NotSilu,
}

struct Shape {
    tokens: usize,
    hidden: usize,
    width: usize,
    experts: usize,
    k: usize,
    norm_topk: bool,
}

/// `down(silu(gate(x)) * up(x))`, as the frontend declares an expert.
fn swiglu(b: &mut ModelBuilder, x: Sym, s: &Shape, miss: Miss, e: usize) -> BuildResult {
    let g = b.linear("gate_proj", x, s.width, false)?;
    let u = b.linear("up_proj", x, s.width, false)?;
    let a = if miss == Miss::NotSilu && e == 1 {
        g
    } else {
        b.silu(g)?
    };
    let h = b.mul(a, u)?;
    if miss == Miss::ValueUsedOutside && e == 1 {
        b.output("leak", h);
    }
    b.linear("down_proj", h, s.hidden, false)
}

/// The dense MoE block as `frontend/src/models/qwen3_moe.rs` declares it, on input `x` [T, H]
/// in scope `layer.mlp`; outputs `out` and `chosen`.
fn dense_block(s: &Shape, miss: Miss, dtype: DType) -> Graph {
    let mut b = ModelBuilder::new(dtype, dtype);
    let (t, e, k) = (s.tokens, s.experts, s.k);
    let x = b.input("x", dtype, &[t, s.hidden]).unwrap();
    let x2 = b.input("x2", dtype, &[t, s.hidden]).unwrap();
    let (out, chosen) = b
        .scope("layer.mlp", |b| {
            let logits = b.linear("gate", x, e, false)?;
            let logits = b.cast(logits, DType::F32)?;
            let probs = b.softmax(logits, 1)?;
            let top = b.topk(probs, k)?;
            let mut weights = b.gather(probs, top, 1)?;
            if s.norm_topk {
                let sum = b.sum(weights, &[1], true)?;
                weights = b.div(weights, sum)?;
            }
            let weights = b.cast(weights, dtype)?;
            let base = if miss == Miss::NonZeroBase { 1.0 } else { 0.0 };
            let zeros = b.full(base, dtype, &[t, e])?;
            let dense = b.scatter_add(zeros, top, weights, 1)?;
            let fzeros = b.full(0.0, DType::F32, &[t, e])?;
            let ones = b.full(1.0, DType::F32, &[t, k])?;
            let chosen = b.scatter_add(fzeros, top, ones, 1)?;
            let mut out: Option<Sym> = None;
            for ei in 0..e {
                if miss == Miss::MissingExpert && ei == e - 1 {
                    continue;
                }
                let which = if miss == Miss::DuplicateExpert && ei == 1 {
                    0
                } else {
                    ei
                };
                let input = if miss == Miss::OtherX && ei == 1 {
                    x2
                } else {
                    x
                };
                let y = b.scope(format!("experts.{which}"), |b| {
                    swiglu(b, input, s, miss, which)
                })?;
                let col = if miss == Miss::WrongColumn && ei == 1 {
                    0
                } else {
                    which
                };
                let w = b.slice(dense, 1, col, col + 1)?;
                let y = b.mul(y, w)?;
                out = Some(match out {
                    Some(acc) => b.add(acc, y)?,
                    None => y,
                });
            }
            let mut out = out.expect("at least one expert");
            if miss == Miss::ExtraTerm {
                out = b.add(out, x)?;
            }
            Ok((out, chosen))
        })
        .unwrap();
    if miss == Miss::WeightUsedOutside {
        let w = b
            .scope("layer.mlp.experts.0.gate_proj", |b| {
                b.param(
                    "weight",
                    &[s.width, s.hidden],
                    mmc_ir::plan::Init::Const(0.0),
                )
            })
            .unwrap();
        b.output("gate0", w);
    }
    b.output("out", out);
    b.output("chosen", chosen);
    b.finish()
}

fn shape(experts: usize, k: usize, norm_topk: bool) -> Shape {
    Shape {
        tokens: 6,
        hidden: 8,
        width: 4,
        experts,
        k,
        norm_topk,
    }
}

/// Fuses, verifies and checks that exactly one block was routed.
fn fuse_one(dense: &Graph) -> (Graph, MoeReport) {
    let (routed, report) = fuse_moe(dense).unwrap();
    verify(&routed).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(routed.stage, Stage::Fused);
    assert_eq!(report.layers.len(), 1, "{:?}", report.refused);
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    (routed, report)
}

#[test]
fn the_routed_block_computes_the_dense_one_for_every_k() {
    for (e, k) in [(4, 2), (4, 1), (4, 4), (1, 1), (3, 2)] {
        for norm in [true, false] {
            let s = shape(e, k, norm);
            for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
                let dense = dense_block(&s, Miss::None, dtype);
                let (routed, report) = fuse_one(&dense);
                let what = format!("E={e} k={k} norm_topk={norm} {dtype}");
                eprintln!("{what}");
                assert_same(&dense, &routed, &report, Precision::Declared, tol);
                assert_eq!(report.layers[0].top_k, k, "{what}");
                assert_eq!(report.layers[0].experts, e, "{what}");
            }
        }
    }
}

#[test]
fn the_routed_block_reads_two_stacked_weights_and_keeps_the_router() {
    let s = shape(4, 2, true);
    let dense = dense_block(&s, Miss::None, DType::F32);
    let (routed, report) = fuse_one(&dense);
    let params: Vec<(String, String)> = routed
        .params()
        .map(|(n, t, _)| (n.to_string(), t.to_string()))
        .collect();
    assert_eq!(
        params,
        [
            ("layer.mlp.gate.weight".to_string(), "f32[4, 8]".to_string()),
            (
                "layer.mlp.experts.gate_up_proj".to_string(),
                "f32[4, 8, 8]".to_string()
            ),
            (
                "layer.mlp.experts.down_proj".to_string(),
                "f32[4, 4, 8]".to_string()
            ),
        ]
    );
    // No per-expert GEMM is left: the router's linear is the one matmul.
    assert_eq!(count(&routed, |o| *o == Op::MatMul), 1);
    assert_eq!(
        count(&routed, |o| is_fused(o, |f| *f == FusedOp::GroupedMatMul)),
        2
    );
    for f in [
        |f: &FusedOp| matches!(f, FusedOp::MoePermute { experts: 4 }),
        |f: &FusedOp| matches!(f, FusedOp::ExpertOffsets { experts: 4 }),
        |f: &FusedOp| *f == FusedOp::SwiGlu,
        |f: &FusedOp| *f == FusedOp::MoeUnpermute,
    ] {
        assert_eq!(count(&routed, |o| is_fused(o, f)), 1);
    }
    // The router and `chosen` stay; the dense [T, E] weight matrix is gone.
    assert_eq!(count(&routed, |o| matches!(o, Op::TopK { k: 2 })), 1);
    assert_eq!(count(&routed, |o| matches!(o, Op::ScatterAdd { .. })), 1);
    assert_eq!(count(&dense, |o| matches!(o, Op::ScatterAdd { .. })), 2);
    // The stackings: gate_e^T | up_e^T per expert, then down_e^T.
    let names = |s: &ParamStacking| -> Vec<String> {
        s.parts
            .iter()
            .map(|p| format!("{}@{}:{}+{}", p.name, p.expert, p.column, p.width))
            .collect()
    };
    assert_eq!(report.stackings.len(), 2);
    assert_eq!(
        names(&report.stackings[0])[..3],
        [
            "layer.mlp.experts.0.gate_proj.weight@0:0+4",
            "layer.mlp.experts.0.up_proj.weight@0:4+4",
            "layer.mlp.experts.1.gate_proj.weight@1:0+4",
        ]
    );
    assert_eq!(
        names(&report.stackings[1])[3],
        "layer.mlp.experts.3.down_proj.weight@3:0+8"
    );
    assert!(report
        .stackings
        .iter()
        .all(|s| s.parts.iter().all(|p| p.transposed)));
}

#[test]
fn near_misses_do_not_fuse() {
    let cases = [
        (Miss::MissingExpert, "expert 3 of 4 is missing"),
        (Miss::DuplicateExpert, "expert 0 is summed twice"),
        (Miss::OtherX, "reads another input"),
        (Miss::WrongColumn, "expert 0 is summed twice"),
        (Miss::NonZeroBase, "non-zero base"),
        (
            Miss::WeightUsedOutside,
            "`layer.mlp.experts.0.gate_proj.weight` is used outside",
        ),
        (Miss::ValueUsedOutside, "used outside the MoE block"),
        (Miss::ExtraTerm, "not an expert weighted by its column"),
        (Miss::NotSilu, "silu(gate) * up"),
    ];
    for (miss, why) in cases {
        let dense = dense_block(&shape(4, 2, true), miss, DType::F64);
        let (g, report) = fuse_moe(&dense).unwrap();
        assert!(report.layers.is_empty(), "{miss:?} fused");
        assert!(report.stackings.is_empty(), "{miss:?}");
        assert_eq!(report.refused.len(), 1, "{miss:?}: {:?}", report.refused);
        let reason = &report.refused[0].reason;
        assert!(reason.contains(why), "{miss:?}: {reason}");
        assert_eq!(report.refused[0].scope, "layer.mlp");
        // Nothing changed: same nodes, same results.
        assert_eq!(g.nodes(), dense.nodes(), "{miss:?}");
        assert_eq!(count(&g, |o| matches!(o, Op::Fused(_))), 0);
    }
}

#[test]
fn a_graph_without_moe_is_left_alone() {
    let mut b = ModelBuilder::new(DType::F32, DType::F32);
    let x = b.input("x", DType::F32, &[2, 3]).unwrap();
    let y = b.scope("mlp", |b| b.linear("proj", x, 3, false)).unwrap();
    let z = b.add(x, y).unwrap();
    let w = b.mul(z, x).unwrap();
    b.output("w", w);
    let g = b.finish();
    let (f, report) = fuse_moe(&g).unwrap();
    assert_eq!(report, MoeReport::default());
    assert_eq!(f.nodes(), g.nodes());
    assert_eq!(f.outputs(), g.outputs());
}

/// A tiny Qwen3-MoE text config: 2 layers, 4 experts of width 8 over hidden 16.
fn text_config(k: usize, norm_topk: bool) -> TextConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 16,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "num_experts": 4,
        "num_experts_per_tok": k,
        "moe_intermediate_size": 8,
        "norm_topk_prob": norm_topk,
    }))
    .unwrap()
}

/// The whole causal LM of the frontend: loss, lm_loss, aux_loss and logits.
fn causal_lm_graph(cfg: &TextConfig, params: DType, compute: DType) -> Graph {
    let mut b = ModelBuilder::new(params, compute);
    let inputs = TextInputs::declare(&mut b, 1, 5).unwrap();
    let out = causal_lm(&mut b, cfg, &inputs).unwrap();
    b.output("loss", out.loss);
    b.output("lm_loss", out.lm_loss);
    b.output("aux_loss", out.aux_loss);
    b.output("logits", out.logits);
    b.finish()
}

#[test]
fn the_frontends_causal_lm_routes_every_layer_and_keeps_its_losses() {
    for (k, norm) in [(2, true), (2, false), (1, true), (4, false)] {
        let cfg = text_config(k, norm);
        for (params, compute, tol) in [
            (DType::F64, DType::F64, 1e-12),
            (DType::F32, DType::F32, 1e-5),
            // Casts of f32 master weights to a bf16 compute dtype are stacked as they were.
            (DType::F32, DType::BF16, 3e-2),
        ] {
            let dense = causal_lm_graph(&cfg, params, compute);
            let (routed, report) = fuse_moe(&dense).unwrap();
            verify(&routed).unwrap_or_else(|e| panic!("{e}"));
            assert!(report.refused.is_empty(), "{:?}", report.refused);
            let scopes: Vec<&str> = report.layers.iter().map(|l| l.scope.as_str()).collect();
            assert_eq!(scopes, ["model.layers.0.mlp", "model.layers.1.mlp"]);
            assert_eq!(
                report.layers[1].gate_up,
                "model.layers.1.mlp.experts.gate_up_proj"
            );
            assert_eq!(report.stackings.len(), 4);
            eprintln!("k={k} norm_topk={norm} {params}/{compute}");
            assert_same(&dense, &routed, &report, Precision::Declared, tol);
        }
    }
}

#[test]
fn fusing_twice_changes_nothing_more() {
    let dense = causal_lm_graph(&text_config(2, true), DType::F32, DType::F32);
    let (once, _) = fuse_moe(&dense).unwrap();
    let (twice, report) = fuse_moe(&once).unwrap();
    assert!(report.layers.is_empty() && report.refused.is_empty());
    assert_eq!(twice.nodes(), once.nodes());
}

#[test]
fn routed_experts_cost_k_over_e_of_the_dense_experts() {
    // T = 64 tokens, H = 32, I = 16, E = 8, k = 2: the dense experts do 6 T E H I FLOPs, the
    // routed ones 6 T k H I; the router's 2 T H E is in both.
    let s = Shape {
        tokens: 64,
        hidden: 32,
        width: 16,
        experts: 8,
        k: 2,
        norm_topk: true,
    };
    let dense = dense_block(&s, Miss::None, DType::F32);
    let (routed, _) = fuse_one(&dense);
    let router = 2 * (s.tokens * s.hidden * s.experts) as u64;
    let expert = |n: usize| 6 * (s.tokens * n * s.hidden * s.width) as u64;
    let (fd, fr) = (matmul_flops(&dense), matmul_flops(&routed));
    assert_eq!(fd, router + expert(s.experts));
    assert_eq!(fr, router + expert(s.k));
    let ratio = (fr - router) as f64 / (fd - router) as f64;
    eprintln!(
        "matmul FLOPs: dense {fd}, routed {fr}; experts routed/dense = {ratio} (k/E = {})",
        s.k as f64 / s.experts as f64
    );
    assert_eq!(ratio, 0.25);
}

#[test]
fn the_routed_gradients_are_the_dense_ones_stacked() {
    // Gradients of the loss through the routed graph (its fused backward ops) against the
    // dense graph's, per expert: each stacked gradient's blocks are the per-expert gradients.
    for (k, norm) in [(2, true), (1, false), (4, true)] {
        let cfg = text_config(k, norm);
        let dense = causal_lm_graph(&cfg, DType::F64, DType::F64);
        let (routed, report) = fuse_moe(&dense).unwrap();
        let gd = mmc_passes::autodiff(&dense, "loss", |_| true).unwrap();
        let gr = mmc_passes::autodiff(&routed, "loss", |_| true).unwrap();
        let b = bindings(&dense, 11, 16);
        let want: BTreeMap<String, Tensor> = run(&gd, &b, Precision::F64).into_iter().collect();
        let got: BTreeMap<String, Tensor> = run(&gr, &stack(&report, &b), Precision::F64)
            .into_iter()
            .collect();
        let grad = |n: &str| format!("grad:{n}");
        let mut checked = 0;
        for s in &report.stackings {
            let stacked = &got[&grad(&s.stacked)];
            for (i, p) in s.parts.iter().enumerate() {
                let part = s.read_part(stacked, i).unwrap();
                let w = &want[&grad(&p.name)];
                let err = mmc_ir::relative_error(&part, w);
                assert!(err < 1e-10, "k={k}: grad of `{}`: {err:.2e}", p.name);
                checked += 1;
            }
        }
        assert_eq!(checked, 2 * 4 * 3);
        // Every other gradient (router, attention, norms, embeddings) is unchanged too.
        let mut common = 0;
        for (n, w) in &want {
            if let Some(g) = got.get(n) {
                let err = mmc_ir::relative_error(g, w);
                assert!(err < 1e-10, "k={k}: `{n}`: {err:.2e}");
                common += 1;
            }
        }
        // loss, lm_loss, aux_loss and the 2 x 7 + 3 other parameters' gradients.
        assert!(common >= 3 + 17, "{common}");
    }
}
