//! The recompute pass on small layered models (norms, masked attention, SiLU and GELU MLPs,
//! f32 or bf16 with cast parameters): every mode leaves the interpreter's loss and gradients
//! bit-identical, `full` clones whole layers and keeps only their inputs, `selective` clones
//! attention cores and activations only, a budget is met, and the activation peak is counted
//! as documented.

mod common;

use common::{assert_bit_identical, assert_only_layer_outputs_kept, bindings, run, Rng};
use mmc_ir::{
    verify, BinaryOp, CmpOp, DType, FusedOp, Graph, Op, ReduceKind, Stage, Tensor, TensorType,
    UnaryOp, Value,
};
use mmc_passes::cost::node_flops;
use mmc_passes::optimizer::AdamW;
use mmc_passes::{
    activation_peak, live_values, recompute, train_step, Emitter, RecomputeError, RecomputeMode,
    RecomputeReport, TrainStepSpec,
};

/// The shape of one random model.
#[derive(Clone, Debug)]
struct Spec {
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    ffn: usize,
    /// Per layer: a GELU MLP (else SiLU-gated).
    gelu: Vec<bool>,
    fused_norm: bool,
    dtype: DType,
}

impl Spec {
    fn random(rng: &mut Rng) -> Spec {
        let layers = 1 + rng.below(3);
        Spec {
            batch: 1 + rng.below(2),
            seq: 2 + rng.below(5),
            heads: 1 + rng.below(2),
            head_dim: 2 + 2 * rng.below(2),
            ffn: 3 + rng.below(4),
            gelu: (0..layers).map(|_| rng.below(2) == 0).collect(),
            fused_norm: rng.below(2) == 0,
            dtype: if rng.below(3) == 0 {
                DType::BF16
            } else {
                DType::F32
            },
        }
    }

    fn fixed() -> Spec {
        Spec {
            batch: 2,
            seq: 8,
            heads: 2,
            head_dim: 4,
            ffn: 12,
            gelu: vec![false, true, false],
            fused_norm: false,
            dtype: DType::F32,
        }
    }

    fn dim(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Builds in named scopes, as the frontend does.
struct B<'g> {
    e: Emitter<'g>,
    spec: Spec,
}

impl B<'_> {
    fn scope(&mut self, name: &str) {
        self.e.scope = self.e.graph.intern_scope(name);
    }

    /// An f32 parameter cast to the compute dtype at its use.
    fn param(&mut self, name: &str, shape: &[usize]) -> Value {
        let p = self
            .e
            .op(
                Op::Param {
                    name: name.into(),
                    ty: TensorType::new(DType::F32, shape.to_vec()),
                },
                &[],
            )
            .unwrap();
        self.e.cast(p, self.spec.dtype).unwrap()
    }

    fn rms_norm(&mut self, x: Value, name: &str) -> Value {
        let shape = self.e.ty(x).shape;
        let d = *shape.last().unwrap();
        let w = self.param(&format!("{name}.weight"), &[d]);
        if self.spec.fused_norm {
            return self
                .e
                .op(Op::Fused(FusedOp::RmsNorm { eps: 1e-6 }), &[x, w])
                .unwrap();
        }
        let e = &mut self.e;
        let x2 = e.mul(x, x).unwrap();
        let ss = e.sum_keep(x2, &[shape.len() - 1]).unwrap();
        let ms = e.scale(ss, 1.0 / d as f64).unwrap();
        let eps = e.konst(1e-6, ms).unwrap();
        let ms = e.add(ms, eps).unwrap();
        let r = e.unary(UnaryOp::Rsqrt, ms).unwrap();
        let r = e.broadcast(r, &shape).unwrap();
        let y = e.mul(x, r).unwrap();
        let mut ws = vec![1; shape.len()];
        ws[shape.len() - 1] = d;
        let w = e.reshape(w, &ws).unwrap();
        let w = e.broadcast(w, &shape).unwrap();
        e.mul(w, y).unwrap()
    }

    /// `x [rows, a] @ W^T` for a parameter `W [b, a]`.
    fn linear(&mut self, x: Value, name: &str, out: usize) -> Value {
        let a = *self.e.ty(x).shape.last().unwrap();
        let w = self.param(&format!("{name}.weight"), &[out, a]);
        let wt = self.e.transpose_last(w).unwrap();
        self.e.op(Op::MatMul, &[x, wt]).unwrap()
    }

    fn attention(&mut self, x: Value, mask: Value, layer: &str) -> Value {
        let (b, s, h, dh) = (
            self.spec.batch,
            self.spec.seq,
            self.spec.heads,
            self.spec.head_dim,
        );
        let d = h * dh;
        self.scope(&format!("{layer}.self_attn"));
        let flat = self.e.reshape(x, &[b * s, d]).unwrap();
        let mut heads = Vec::new();
        for p in ["q_proj", "k_proj", "v_proj"] {
            self.scope(&format!("{layer}.self_attn.{p}"));
            let y = self.linear(flat, &format!("{layer}.self_attn.{p}"), d);
            self.scope(&format!("{layer}.self_attn"));
            let y = self.e.reshape(y, &[b, s, h, dh]).unwrap();
            heads.push(self.e.permute(y, &[0, 2, 1, 3]).unwrap());
        }
        let e = &mut self.e;
        let kt = e.transpose_last(heads[1]).unwrap();
        let scores = e.op(Op::MatMul, &[heads[0], kt]).unwrap();
        let scores = e.scale(scores, 1.0 / (dh as f64).sqrt()).unwrap();
        let m = e.broadcast(mask, &[b, h, s, s]).unwrap();
        let ninf = e.konst(f64::NEG_INFINITY, scores).unwrap();
        let scores = e.select(m, scores, ninf).unwrap();
        let mx = e
            .op(
                Op::Reduce {
                    kind: ReduceKind::Max,
                    axes: vec![3],
                },
                &[scores],
            )
            .unwrap();
        let mx = e.broadcast(mx, &[b, h, s, s]).unwrap();
        let z = e.sub(scores, mx).unwrap();
        let ex = e.unary(UnaryOp::Exp, z).unwrap();
        let sum = e.sum_keep(ex, &[3]).unwrap();
        let sum = e.broadcast(sum, &[b, h, s, s]).unwrap();
        let probs = e.div(ex, sum).unwrap();
        let o = e.op(Op::MatMul, &[probs, heads[2]]).unwrap();
        let o = e.permute(o, &[0, 2, 1, 3]).unwrap();
        let o = e.reshape(o, &[b * s, d]).unwrap();
        self.scope(&format!("{layer}.self_attn.o_proj"));
        let o = self.linear(o, &format!("{layer}.self_attn.o_proj"), d);
        self.e.reshape(o, &[b, s, d]).unwrap()
    }

    fn mlp(&mut self, x: Value, layer: &str, gelu: bool) -> Value {
        let (b, s, d, f) = (
            self.spec.batch,
            self.spec.seq,
            self.spec.dim(),
            self.spec.ffn,
        );
        self.scope(&format!("{layer}.mlp"));
        let flat = self.e.reshape(x, &[b * s, d]).unwrap();
        self.scope(&format!("{layer}.mlp.gate_proj"));
        let gate = self.linear(flat, &format!("{layer}.mlp.gate_proj"), f);
        self.scope(&format!("{layer}.mlp"));
        let act = if gelu {
            let e = &mut self.e;
            let t = e.scale(gate, std::f64::consts::FRAC_1_SQRT_2).unwrap();
            let t = e.unary(UnaryOp::Erf, t).unwrap();
            let one = e.konst(1.0, t).unwrap();
            let t = e.add(t, one).unwrap();
            let half = e.scale(gate, 0.5).unwrap();
            e.mul(half, t).unwrap()
        } else {
            self.scope(&format!("{layer}.mlp.up_proj"));
            let up = self.linear(flat, &format!("{layer}.mlp.up_proj"), f);
            self.scope(&format!("{layer}.mlp"));
            let e = &mut self.e;
            let n = e.neg(gate).unwrap();
            let ex = e.unary(UnaryOp::Exp, n).unwrap();
            let one = e.konst(1.0, ex).unwrap();
            let den = e.add(ex, one).unwrap();
            let silu = e.div(gate, den).unwrap();
            e.mul(silu, up).unwrap()
        };
        self.scope(&format!("{layer}.mlp.down_proj"));
        let y = self.linear(act, &format!("{layer}.mlp.down_proj"), d);
        self.e.reshape(y, &[b, s, d]).unwrap()
    }
}

/// The forward graph of `spec`: input `x`, mask, target; output `loss` = sum(norm(h) * target).
fn forward(spec: &Spec) -> Graph {
    let mut g = Graph::new(Stage::Fused);
    let scope = g.intern_scope("model");
    let mut b = B {
        e: Emitter {
            graph: &mut g,
            scope,
            pass: "test",
        },
        spec: spec.clone(),
    };
    let (bs, s, d) = (spec.batch, spec.seq, spec.dim());
    let input = |b: &mut B, name: &str, dtype, shape: &[usize]| {
        b.e.op(
            Op::Input {
                name: name.into(),
                ty: TensorType::new(dtype, shape.to_vec()),
            },
            &[],
        )
        .unwrap()
    };
    let x = input(&mut b, "x", DType::F32, &[bs, s, d]);
    let mask = input(&mut b, "mask", DType::Bool, &[bs, 1, s, s]);
    let target = input(&mut b, "target", DType::F32, &[bs, s, d]);
    let mut h = b.e.cast(x, spec.dtype).unwrap();
    for (l, &gelu) in spec.gelu.iter().enumerate() {
        let layer = format!("model.layers.{l}");
        b.scope(&format!("{layer}.input_layernorm"));
        let n = b.rms_norm(h, &format!("{layer}.input_layernorm"));
        let a = b.attention(n, mask, &layer);
        b.scope(&layer);
        h = b.e.add(h, a).unwrap();
        b.scope(&format!("{layer}.post_attention_layernorm"));
        let n = b.rms_norm(h, &format!("{layer}.post_attention_layernorm"));
        let m = b.mlp(n, &layer, gelu);
        b.scope(&layer);
        h = b.e.add(h, m).unwrap();
    }
    b.scope("model.norm");
    let n = b.rms_norm(h, "model.norm");
    b.scope("loss");
    let n = b.e.cast(n, DType::F32).unwrap();
    let p = b.e.mul(n, target).unwrap();
    let loss = b.e.sum_all(p).unwrap();
    g.add_output("loss", loss);
    verify(&g).unwrap_or_else(|e| panic!("{e}"));
    g
}

/// The micro-step graph (forward, backward, gradient accumulation) of `spec`.
fn micro_step(spec: &Spec) -> Graph {
    let fwd = forward(spec);
    let ts = train_step(
        &fwd,
        &TrainStepSpec {
            loss: "loss",
            trainable: &|_| true,
            decay: &|_, _| false,
            adamw: AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
                clip_grad: 1.0,
            },
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    ts.micro_step.graph
}

/// Seeded data; the mask keeps the diagonal so no row is fully masked.
fn data(g: &Graph, seed: u64) -> std::collections::BTreeMap<String, Tensor> {
    bindings(g, &mut Rng(seed), &|name, ty, rng| {
        (name == "mask").then(|| {
            let s = ty.shape[3];
            let vals: Vec<f64> = (0..ty.numel())
                .map(|i| {
                    let (q, k) = ((i / s) % s, i % s);
                    (q == k || rng.below(3) != 0) as u8 as f64
                })
                .collect();
            Tensor::from_f64(DType::Bool, ty.shape.clone(), &vals).unwrap()
        })
    })
}

fn apply(g: &Graph, mode: RecomputeMode) -> (Graph, RecomputeReport) {
    let (out, report) = recompute(g, mode).unwrap_or_else(|e| panic!("{mode}: {e}"));
    verify(&out).unwrap_or_else(|e| panic!("{mode}: {e}"));
    assert_eq!(out.stage, g.stage);
    assert_eq!(report.peak_after, activation_peak(&out).bytes, "{mode}");
    assert_eq!(report.peak_before, activation_peak(g).bytes, "{mode}");
    // The live set at the peak adds up to the peak.
    let peak = activation_peak(&out);
    let live: u64 = live_values(&out, peak.node)
        .iter()
        .map(|&v| out.ty(v).size_bytes() as u64)
        .sum();
    assert_eq!(live, peak.bytes, "{mode}");
    (out, report)
}

/// The nodes the pass cloned (their scopes are `recompute:<forward scope>`).
fn clones(g: &Graph) -> Vec<&mmc_ir::Node> {
    g.nodes()
        .iter()
        .filter(|n| g.scope_name(n.scope).starts_with("recompute:"))
        .collect()
}

#[test]
fn every_mode_keeps_loss_and_gradients_bit_identical_on_random_models() {
    let mut rng = Rng(7);
    for case in 0..24 {
        let spec = Spec::random(&mut rng);
        let g = micro_step(&spec);
        let b = data(&g, case);
        let want = run(&g, &b);
        let (_, none) = apply(&g, RecomputeMode::None);
        let (_, full) = apply(&g, RecomputeMode::Full);
        let budget = (none.peak_before + full.peak_after) / 2;
        for mode in [
            RecomputeMode::Selective,
            RecomputeMode::Full,
            RecomputeMode::Budget { bytes: budget },
        ] {
            let (out, report) = apply(&g, mode);
            let must =
                !matches!(mode, RecomputeMode::Budget { bytes } if bytes >= none.peak_before);
            assert!(
                !must || report.recomputed_nodes > 0,
                "case {case} {mode}: {spec:?}"
            );
            assert_bit_identical(
                &want,
                &run(&out, &b),
                &format!("case {case} {mode} {spec:?}"),
            );
        }
    }
}

#[test]
fn none_returns_the_graph_unchanged() {
    let g = micro_step(&Spec::fixed());
    let (out, report) = apply(&g, RecomputeMode::None);
    assert_eq!(out, g);
    assert_eq!(
        (
            report.saved_bytes,
            report.extra_flops,
            report.recomputed_nodes
        ),
        (0, 0, 0)
    );
}

#[test]
fn full_recompute_keeps_only_layer_inputs_for_the_backward_pass() {
    let g = micro_step(&Spec::fixed());
    let (out, report) = apply(&g, RecomputeMode::Full);
    assert_eq!((report.full_layers, report.selective_units), (3, 0));
    assert_only_layer_outputs_kept(&out);
    // Without recompute the backward pass reads the layers' insides (the check can fail).
    assert!(std::panic::catch_unwind(|| assert_only_layer_outputs_kept(&g)).is_err());
    // Every matmul of every layer runs again, each clone in `recompute:<its scope>`, except the
    // down projections of layers 0 and 1: they feed only the next layer's input, which is kept
    // (the last layer's output is not a checkpoint: the final norm's backward reads a clone).
    let cloned = clones(&out);
    assert_eq!(cloned.len(), report.recomputed_nodes);
    let matmuls = |g: &Graph, pred: &dyn Fn(&str) -> bool| {
        g.nodes()
            .iter()
            .filter(|n| n.op == Op::MatMul && pred(g.scope_name(n.scope)))
            .count()
    };
    let in_layers = matmuls(&g, &|s| s.starts_with("model.layers."));
    assert_eq!(
        matmuls(&out, &|s| s.starts_with("recompute:model.layers.")),
        in_layers - 2
    );
    let flops: u64 = cloned.iter().map(|n| node_flops(&out, n)).sum();
    assert_eq!(report.extra_flops, flops);
    assert!(
        report.peak_after < report.peak_before,
        "{report}: the peak must drop"
    );
    assert_eq!(report.saved_bytes, report.peak_before - report.peak_after);
    assert!(
        report.to_string().starts_with("recompute full: saves "),
        "{report}"
    );
}

#[test]
fn selective_recomputes_attention_cores_and_activations_only() {
    let spec = Spec::fixed();
    let g = micro_step(&spec);
    let (out, sel) = apply(&g, RecomputeMode::Selective);
    // Per layer one attention core and one activation.
    assert_eq!((sel.full_layers, sel.selective_units), (0, 6));
    let cloned = clones(&out);
    let count = |name: &str| cloned.iter().filter(|n| n.op.name() == name).count();
    // The score product q k^T only; never a projection.
    assert_eq!(count("matmul"), 3);
    // The softmax exp of each layer, plus the SiLU exps of layers 0 and 2.
    assert_eq!(count("exp"), 3 + 2);
    assert_eq!(count("erf"), 1);
    assert_eq!(count("select"), 3);
    // Norms are not recomputed.
    assert_eq!(count("rsqrt"), 0);
    let (_, full) = apply(&g, RecomputeMode::Full);
    assert!(
        full.peak_after <= sel.peak_after && sel.peak_after < sel.peak_before,
        "none {} selective {} full {}",
        sel.peak_before,
        sel.peak_after,
        full.peak_after
    );
    assert!(sel.extra_flops < full.extra_flops, "{sel} / {full}");
}

#[test]
fn a_budget_is_met_with_no_more_flops_than_full() {
    let g = micro_step(&Spec::fixed());
    let b = data(&g, 3);
    let want = run(&g, &b);
    let (_, full) = apply(&g, RecomputeMode::Full);
    let (_, sel) = apply(&g, RecomputeMode::Selective);
    for budget in [
        full.peak_after,
        (full.peak_after + sel.peak_after) / 2,
        sel.peak_after,
        (sel.peak_after + sel.peak_before) / 2,
    ] {
        let (out, r) = apply(&g, RecomputeMode::Budget { bytes: budget });
        assert!(r.peak_after <= budget, "{r} over {budget}");
        assert!(r.extra_flops <= full.extra_flops, "{r} / {full}");
        assert_bit_identical(&want, &run(&out, &b), &format!("budget {budget}"));
    }
    // A budget above the peak recomputes nothing.
    let (_, r) = apply(
        &g,
        RecomputeMode::Budget {
            bytes: full.peak_before,
        },
    );
    assert_eq!(r.recomputed_nodes, 0);
    // Below the smallest reachable peak: an error that says how far to raise the key.
    let e = recompute(
        &g,
        RecomputeMode::Budget {
            bytes: full.peak_after - 1,
        },
    )
    .unwrap_err();
    assert_eq!(
        e,
        RecomputeError::BudgetTooSmall {
            budget_bytes: full.peak_after - 1,
            smallest_bytes: full.peak_after
        }
    );
    let msg = e.to_string();
    assert!(
        msg.contains("recompute_budget_gb") && msg.contains("smallest activation peak"),
        "{msg}"
    );
}

#[test]
fn the_activation_peak_counts_live_values_in_program_order() {
    // x (input, not counted) -> a = exp x [4 f32 = 16 B] -> b = a * a -> c = sum b [4 B];
    // outputs c and new:acc = c + acc (state, not counted).
    let mut g = Graph::new(Stage::Autodiff);
    let s = g.intern_scope("");
    let mut e = Emitter {
        graph: &mut g,
        scope: s,
        pass: "test",
    };
    let ty = TensorType::new(DType::F32, vec![4]);
    let x = e
        .op(
            Op::Input {
                name: "x".into(),
                ty: ty.clone(),
            },
            &[],
        )
        .unwrap();
    let acc = e
        .op(
            Op::Input {
                name: "acc".into(),
                ty: TensorType::new(DType::F32, vec![1]),
            },
            &[],
        )
        .unwrap();
    let a = e.unary(UnaryOp::Exp, x).unwrap();
    let b = e.binary(BinaryOp::Mul, a, a).unwrap();
    let c = e.sum_keep(b, &[0]).unwrap();
    let unused = e.compare(CmpOp::Gt, c, acc).unwrap();
    let _ = unused;
    let new = e.add(c, acc).unwrap();
    g.add_output("c", c);
    g.add_output("new:acc", new);
    // While b is computed, a (16) and b (16) are live; then a and b die.
    let p = activation_peak(&g);
    assert_eq!(p.bytes, 32);
    assert_eq!(p.node, 3);
    let mut tail = g.clone();
    tail.retain_outputs(|n, _| n == "c");
    assert_eq!(activation_peak(&tail).bytes, 32);

    // A parameter gradient (read by the accumulation) is not an activation: a 400-byte
    // gradient beside a 16-byte activation.
    let mut g = Graph::new(Stage::Autodiff);
    let s = g.intern_scope("grad:w");
    let acc_scope = g.intern_scope("grad_accumulate");
    let mut e = Emitter {
        graph: &mut g,
        scope: s,
        pass: "test",
    };
    let big = TensorType::new(DType::F32, vec![100]);
    let x = e
        .op(
            Op::Input {
                name: "x".into(),
                ty: ty.clone(),
            },
            &[],
        )
        .unwrap();
    let a = e.unary(UnaryOp::Exp, x).unwrap();
    let grad = e.full(0.5, big.clone()).unwrap();
    e.scope = acc_scope;
    let acc = e
        .op(
            Op::Input {
                name: "grad_acc:w".into(),
                ty: big,
            },
            &[],
        )
        .unwrap();
    let sum = e.add(acc, grad).unwrap();
    g.add_output("a", a);
    g.add_output("new:grad_acc:w", sum);
    assert_eq!(activation_peak(&g).bytes, 16);
}
