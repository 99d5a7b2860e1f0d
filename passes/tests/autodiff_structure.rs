//! Structural properties of the autodiff pass: frozen parameters cost no backward work, every
//! trainable parameter gets a gradient output, the result is a verified `Stage::Autodiff` graph
//! that extends the forward graph, errors name the problem, and ties follow the documented
//! convention (the gradient is split evenly).

use mmc_ir::{
    verify, BinaryOp, DType, FusedOp, Graph, Interpreter, Op, Precision, ReduceKind, ScopeId,
    Stage, Tensor, TensorData, TensorType, UnaryOp, Value,
};
use mmc_passes::{autodiff, grad_output, AutodiffError, GRAD_PREFIX};
use std::collections::{BTreeMap, HashSet};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn f32ty(shape: &[usize]) -> TensorType {
    TensorType::new(DType::F32, shape.to_vec())
}

fn node_in(g: &mut Graph, scope: ScopeId, op: Op, inputs: &[Value]) -> Value {
    let id = g.add_node(op, inputs, scope).unwrap();
    g.result(id)
}

fn node(g: &mut Graph, op: Op, inputs: &[Value]) -> Value {
    node_in(g, ScopeId::default(), op, inputs)
}

fn param(g: &mut Graph, name: &str, ty: TensorType) -> Value {
    node(
        g,
        Op::Param {
            name: name.into(),
            ty,
        },
        &[],
    )
}

fn input(g: &mut Graph, name: &str, ty: TensorType) -> Value {
    node(
        g,
        Op::Input {
            name: name.into(),
            ty,
        },
        &[],
    )
}

fn unary(g: &mut Graph, scope: ScopeId, u: UnaryOp, x: Value) -> Value {
    node_in(g, scope, Op::Unary(u), &[x])
}

fn binary(g: &mut Graph, scope: ScopeId, b: BinaryOp, x: Value, y: Value) -> Value {
    node_in(g, scope, Op::Binary(b), &[x, y])
}

/// `sum(x)` as a 0-d tensor.
fn sum_all(g: &mut Graph, x: Value) -> Value {
    let rank = g.ty(x).rank();
    let s = node(
        g,
        Op::Reduce {
            kind: ReduceKind::Sum,
            axes: (0..rank).collect(),
        },
        &[x],
    );
    node(g, Op::Reshape { shape: vec![] }, &[s])
}

fn f64_tensor(shape: &[usize], values: &[f64]) -> Tensor {
    Tensor::new(shape.to_vec(), TensorData::F64(values.to_vec())).unwrap()
}

fn run(g: &Graph, bindings: &BTreeMap<String, Tensor>) -> mmc_ir::Outputs {
    Interpreter::new(g, Precision::F64)
        .unwrap()
        .run(bindings)
        .unwrap()
}

/// Scope names of the nodes autodiff appended after the `n_forward` forward nodes.
fn appended_scopes(g: &Graph, n_forward: usize) -> Vec<String> {
    g.nodes()[n_forward..]
        .iter()
        .map(|n| g.scope_name(n.scope).to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Frozen parameters
// ---------------------------------------------------------------------------------------------

/// `loss = sum(exp(tanh(a)^2) * fb)` where `fb` is `cos(sin(frozen.b)^2)` built in scope
/// `frozen_chain`, or a constant when `frozen_const`. Returns the graph and the values computed
/// only from `frozen.b` except the chain's result `fb` (empty for the constant variant).
fn frozen_graph(frozen_const: bool) -> (Graph, Vec<Value>) {
    let mut g = Graph::new(Stage::Frontend);
    let root = ScopeId::default();
    let a_scope = g.intern_scope("a_chain");
    let f_scope = g.intern_scope("frozen_chain");
    let a = param(&mut g, "a", f32ty(&[4]));
    let (fb, private) = if frozen_const {
        let c = node_in(
            &mut g,
            f_scope,
            Op::Const {
                value: 0.5,
                ty: f32ty(&[4]),
            },
            &[],
        );
        (c, vec![])
    } else {
        let b = node_in(
            &mut g,
            f_scope,
            Op::Param {
                name: "frozen.b".into(),
                ty: f32ty(&[4]),
            },
            &[],
        );
        let s = unary(&mut g, f_scope, UnaryOp::Sin, b);
        let s2 = binary(&mut g, f_scope, BinaryOp::Mul, s, s);
        let fb = unary(&mut g, f_scope, UnaryOp::Cos, s2);
        (fb, vec![b, s, s2])
    };
    let t = unary(&mut g, a_scope, UnaryOp::Tanh, a);
    let u = binary(&mut g, a_scope, BinaryOp::Mul, t, t);
    let v = unary(&mut g, a_scope, UnaryOp::Exp, u);
    let p = binary(&mut g, root, BinaryOp::Mul, v, fb);
    let loss = sum_all(&mut g, p);
    g.add_output("loss", loss);
    (g, private)
}

fn not_frozen(name: &str) -> bool {
    !name.starts_with("frozen")
}

#[test]
fn frozen_chain_gets_no_backward_nodes() {
    let (g, private) = frozen_graph(false);
    let n = g.nodes().len();
    let out = autodiff(&g, "loss", not_frozen).unwrap();

    let scopes = appended_scopes(&out, n);
    assert!(!scopes.is_empty());
    assert!(
        !scopes.iter().any(|s| s == "grad:frozen_chain"),
        "backward nodes in the frozen chain's scope: {scopes:?}"
    );
    assert!(scopes.iter().any(|s| s == "grad:a_chain"));

    // No backward node reads a value that only the frozen chain needs (its result `fb` is
    // read legitimately: it is the other factor of the product).
    let private: HashSet<Value> = private.into_iter().collect();
    for (i, nd) in out.nodes()[n..].iter().enumerate() {
        assert!(
            !nd.inputs.iter().any(|v| private.contains(v)),
            "appended node {} (`{}`) reads a frozen-only value",
            n + i,
            nd.op.name()
        );
    }

    assert!(out.output(&grad_output("a")).is_some());
    assert!(out.output(&grad_output("frozen.b")).is_none());
    let grads: Vec<&str> = out
        .outputs()
        .iter()
        .filter(|(name, _)| name.starts_with(GRAD_PREFIX))
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(grads, ["grad:a"]);
}

#[test]
fn freezing_removes_all_backward_work_of_the_frozen_chain() {
    let (g, _) = frozen_graph(false);
    let (gc, _) = frozen_graph(true);
    let frozen = autodiff(&g, "loss", not_frozen).unwrap();
    let constant = autodiff(&gc, "loss", not_frozen).unwrap();
    let appended = frozen.nodes().len() - g.nodes().len();
    let appended_const = constant.nodes().len() - gc.nodes().len();
    assert_eq!(
        appended, appended_const,
        "freezing `frozen.b` must cost exactly what a constant in its place costs"
    );

    // Sanity: training it does add backward work, in the frozen chain's scope.
    let all = autodiff(&g, "loss", |_| true).unwrap();
    assert!(all.nodes().len() - g.nodes().len() > appended);
    assert!(appended_scopes(&all, g.nodes().len())
        .iter()
        .any(|s| s == "grad:frozen_chain"));
    assert!(all.output(&grad_output("frozen.b")).is_some());
}

#[test]
fn freezing_does_not_change_the_other_gradients() {
    let (g, _) = frozen_graph(false);
    let frozen = autodiff(&g, "loss", not_frozen).unwrap();
    let all = autodiff(&g, "loss", |_| true).unwrap();
    let mut b = BTreeMap::new();
    b.insert("a".to_string(), f64_tensor(&[4], &[-0.7, 0.1, 0.4, 1.3]));
    b.insert(
        "frozen.b".to_string(),
        f64_tensor(&[4], &[0.3, -1.1, 0.8, 2.0]),
    );
    let ga = run(&frozen, &b).get("grad:a").unwrap().clone();
    let gb = run(&all, &b).get("grad:a").unwrap().clone();
    assert_eq!(ga, gb);
}

#[test]
fn nothing_trainable_means_no_backward_graph() {
    let (g, _) = frozen_graph(false);
    let out = autodiff(&g, "loss", |_| false).unwrap();
    assert_eq!(out.nodes(), g.nodes());
    assert_eq!(out.outputs(), g.outputs());
    assert_eq!(out.stage, Stage::Autodiff);
}

// ---------------------------------------------------------------------------------------------
// Parameters the loss does not depend on
// ---------------------------------------------------------------------------------------------

#[test]
fn unused_trainable_param_gets_a_zero_gradient() {
    let mut g = Graph::new(Stage::Frontend);
    let root = ScopeId::default();
    let x = param(&mut g, "x", f32ty(&[3]));
    let _unused = param(&mut g, "unused", f32ty(&[2, 3]));
    let y = unary(&mut g, root, UnaryOp::Sin, x);
    let loss = sum_all(&mut g, y);
    g.add_output("loss", loss);

    let out = autodiff(&g, "loss", |_| true).unwrap();
    verify(&out).unwrap();
    let gv = out.output("grad:unused").expect("a gradient output");
    assert_eq!(
        out.ty(gv),
        &f32ty(&[2, 3]),
        "the gradient has the param type"
    );

    let mut b = BTreeMap::new();
    b.insert("x".to_string(), f64_tensor(&[3], &[0.1, 0.2, 0.3]));
    b.insert("unused".to_string(), f64_tensor(&[2, 3], &[1.0; 6]));
    let outs = run(&out, &b);
    let z = outs.get("grad:unused").unwrap();
    assert_eq!(z.shape(), &[2, 3]);
    assert_eq!(z.to_f64_vec(), vec![0.0; 6]);
    let gx = outs.get("grad:x").unwrap().to_f64_vec();
    for (g, x) in gx.iter().zip([0.1f64, 0.2, 0.3]) {
        assert!((g - x.cos()).abs() < 1e-15);
    }
}

/// A parameter that reaches the loss only through index- and mask-producing ops (argsort,
/// topk, comparisons) has a zero gradient, and those ops get no backward nodes.
#[test]
fn param_behind_non_differentiable_ops_gets_a_zero_gradient() {
    let mut g = Graph::new(Stage::Frontend);
    let root = ScopeId::default();
    let x = param(&mut g, "x", f32ty(&[2, 4]));
    let k = param(&mut g, "keys", f32ty(&[2, 4]));
    let order = node(&mut g, Op::ArgSort { descending: true }, &[k]);
    let top = node(&mut g, Op::TopK { k: 2 }, &[k]);
    let sorted = node(&mut g, Op::Gather { axis: 1 }, &[x, order]);
    let best = node(&mut g, Op::Gather { axis: 1 }, &[x, top]);
    let zero = node(
        &mut g,
        Op::Const {
            value: 0.0,
            ty: f32ty(&[2, 4]),
        },
        &[],
    );
    let pos = node(&mut g, Op::Compare(mmc_ir::CmpOp::Gt), &[k, zero]);
    let masked = node(&mut g, Op::Select, &[pos, x, zero]);
    let s1 = sum_all(&mut g, sorted);
    let s2 = sum_all(&mut g, best);
    let s3 = sum_all(&mut g, masked);
    let s = binary(&mut g, root, BinaryOp::Add, s1, s2);
    let loss = binary(&mut g, root, BinaryOp::Add, s, s3);
    g.add_output("loss", loss);

    let n = g.nodes().len();
    let out = autodiff(&g, "loss", |_| true).unwrap();
    verify(&out).unwrap();
    for nd in &out.nodes()[n..] {
        assert!(
            !matches!(nd.op, Op::ArgSort { .. } | Op::TopK { .. }),
            "no backward for index ops"
        );
    }
    let mut b = BTreeMap::new();
    let xs = [0.5, -1.0, 2.0, 0.25, 1.5, -0.5, 0.75, -2.0];
    let ks = [0.3, -0.2, 0.9, 0.1, -0.4, 0.8, 0.2, -0.6];
    b.insert("x".to_string(), f64_tensor(&[2, 4], &xs));
    b.insert("keys".to_string(), f64_tensor(&[2, 4], &ks));
    let outs = run(&out, &b);
    assert_eq!(outs.get("grad:keys").unwrap().to_f64_vec(), vec![0.0; 8]);
    // d/dx: 1 from the full sort, 1 for each top-2 element, 1 where keys > 0.
    let expected = [3.0, 1.0, 3.0, 2.0, 1.0, 3.0, 3.0, 1.0];
    assert_eq!(outs.get("grad:x").unwrap().to_f64_vec(), expected);
}

// ---------------------------------------------------------------------------------------------
// Shape of the result
// ---------------------------------------------------------------------------------------------

/// A graph with an RMSNorm, a matmul, a softmax and a second forward output, in the fused
/// stage.
fn mixed_graph() -> Graph {
    let mut g = Graph::new(Stage::Fused);
    let root = ScopeId::default();
    let x = param(&mut g, "x", f32ty(&[2, 3]));
    let w = param(&mut g, "norm.w", f32ty(&[3]));
    let m = param(&mut g, "proj", f32ty(&[3, 4]));
    let h = node(&mut g, Op::Fused(FusedOp::RmsNorm { eps: 1e-6 }), &[x, w]);
    let logits = node(&mut g, Op::MatMul, &[h, m]);
    let mx = node(
        &mut g,
        Op::Reduce {
            kind: ReduceKind::Max,
            axes: vec![1],
        },
        &[logits],
    );
    let mx = node(&mut g, Op::Broadcast { shape: vec![2, 4] }, &[mx]);
    let z = binary(&mut g, root, BinaryOp::Sub, logits, mx);
    let e = unary(&mut g, root, UnaryOp::Exp, z);
    let target = input(&mut g, "target", f32ty(&[2, 4]));
    let p = binary(&mut g, root, BinaryOp::Mul, e, target);
    let loss = sum_all(&mut g, p);
    g.add_output("logits", logits);
    g.add_output("loss", loss);
    g
}

#[test]
fn result_verifies_and_is_in_the_autodiff_stage() {
    let graphs = [mixed_graph(), frozen_graph(false).0, frozen_graph(true).0];
    for g in &graphs {
        verify(g).unwrap();
        let modes: [fn(&str) -> bool; 2] = [|_| true, not_frozen];
        for trainable in modes {
            let out = autodiff(g, "loss", trainable).unwrap();
            verify(&out).unwrap_or_else(|e| panic!("autodiff output fails to verify: {e}"));
            assert_eq!(out.stage, Stage::Autodiff);
        }
    }
}

#[test]
fn result_extends_the_forward_graph() {
    let g = mixed_graph();
    let out = autodiff(&g, "loss", |_| true).unwrap();
    // The forward program is kept unchanged, as a prefix.
    assert_eq!(&out.nodes()[..g.nodes().len()], g.nodes());
    // Forward outputs first, then one gradient per trainable parameter, in parameter order,
    // each of its parameter's type.
    let names: Vec<&str> = out.outputs().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["logits", "loss", "grad:x", "grad:norm.w", "grad:proj"]
    );
    for (name, ty, _) in g.params() {
        let gv = out.output(&grad_output(name)).unwrap();
        assert_eq!(out.ty(gv), ty, "grad:{name}");
    }
    // Backward nodes live in `grad` scopes.
    for s in appended_scopes(&out, g.nodes().len()) {
        assert!(s.starts_with("grad"), "backward node in scope `{s}`");
    }
    // The forward results are unchanged by the backward nodes.
    let mut b = BTreeMap::new();
    b.insert(
        "x".to_string(),
        f64_tensor(&[2, 3], &[0.5, -1.0, 2.0, 0.25, 1.5, -0.5]),
    );
    b.insert("norm.w".to_string(), f64_tensor(&[3], &[1.0, 0.5, -0.75]));
    b.insert(
        "proj".to_string(),
        f64_tensor(
            &[3, 4],
            &(0..12).map(|i| 0.1 * i as f64 - 0.5).collect::<Vec<_>>(),
        ),
    );
    b.insert(
        "target".to_string(),
        f64_tensor(&[2, 4], &[1.0, 0.0, 0.0, 0.5, 0.0, 1.0, 0.25, 0.0]),
    );
    let fwd = run(&g, &b);
    let both = run(&out, &b);
    assert_eq!(fwd.get("loss"), both.get("loss"));
    assert_eq!(fwd.get("logits"), both.get("logits"));
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_loss_output_is_an_error() {
    let g = mixed_graph();
    let err = autodiff(&g, "nope", |_| true).unwrap_err();
    assert_eq!(err, AutodiffError::NoSuchOutput("nope".into()));
    assert!(err.to_string().contains("nope"));
}

#[test]
fn non_scalar_loss_is_an_error() {
    let g = mixed_graph();
    let err = autodiff(&g, "logits", |_| true).unwrap_err();
    assert_eq!(
        err,
        AutodiffError::NotAScalar {
            name: "logits".into(),
            ty: f32ty(&[2, 4]),
        }
    );
    assert!(err.to_string().contains("logits"));
}

#[test]
fn integer_scalar_loss_is_an_error() {
    let mut g = Graph::new(Stage::Frontend);
    let n = input(&mut g, "n", TensorType::new(DType::I64, vec![]));
    let _ = param(&mut g, "p", f32ty(&[2]));
    g.add_output("count", n);
    let err = autodiff(&g, "count", |_| true).unwrap_err();
    assert_eq!(
        err,
        AutodiffError::NotAScalar {
            name: "count".into(),
            ty: TensorType::new(DType::I64, vec![]),
        }
    );
}

#[test]
fn one_element_but_not_rank_zero_loss_is_an_error() {
    let mut g = Graph::new(Stage::Frontend);
    let p = param(&mut g, "p", f32ty(&[1]));
    g.add_output("loss", p);
    assert!(matches!(
        autodiff(&g, "loss", |_| true),
        Err(AutodiffError::NotAScalar { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Conventions at non-differentiable points (finite differences cannot check these)
// ---------------------------------------------------------------------------------------------

#[test]
fn ties_split_the_gradient_evenly() {
    let mut g = Graph::new(Stage::Frontend);
    let root = ScopeId::default();
    let a = param(&mut g, "a", f32ty(&[3]));
    let b = param(&mut g, "b", f32ty(&[3]));
    let c = param(&mut g, "c", f32ty(&[2, 3]));
    let mx = binary(&mut g, root, BinaryOp::Max, a, b);
    let mn = binary(&mut g, root, BinaryOp::Min, a, b);
    let rm = node(
        &mut g,
        Op::Reduce {
            kind: ReduceKind::Max,
            axes: vec![1],
        },
        &[c],
    );
    let s1 = sum_all(&mut g, mx);
    let s2 = sum_all(&mut g, mn);
    let s3 = sum_all(&mut g, rm);
    let s = binary(&mut g, root, BinaryOp::Add, s1, s2);
    let s = binary(&mut g, root, BinaryOp::Add, s, s3);
    g.add_output("loss", s);
    let out = autodiff(&g, "loss", |_| true).unwrap();

    let mut bind = BTreeMap::new();
    bind.insert("a".to_string(), f64_tensor(&[3], &[1.0, 2.0, -1.0]));
    bind.insert("b".to_string(), f64_tensor(&[3], &[1.0, 0.0, 3.0]));
    bind.insert(
        "c".to_string(),
        f64_tensor(&[2, 3], &[2.0, 2.0, 1.0, 5.0, 5.0, 5.0]),
    );
    let outs = run(&out, &bind);
    // max and min each give the tied element half: 0.5 + 0.5.
    assert_eq!(outs.get("grad:a").unwrap().to_f64_vec(), [1.0, 1.0, 1.0]);
    assert_eq!(outs.get("grad:b").unwrap().to_f64_vec(), [1.0, 1.0, 1.0]);
    let gc = outs.get("grad:c").unwrap().to_f64_vec();
    let third = 1.0 / 3.0;
    assert_eq!(gc, [0.5, 0.5, 0.0, third, third, third]);
}

#[test]
fn abs_has_zero_gradient_at_zero() {
    let mut g = Graph::new(Stage::Frontend);
    let root = ScopeId::default();
    let x = param(&mut g, "x", f32ty(&[3]));
    let y = unary(&mut g, root, UnaryOp::Abs, x);
    let loss = sum_all(&mut g, y);
    g.add_output("loss", loss);
    let out = autodiff(&g, "loss", |_| true).unwrap();
    let mut b = BTreeMap::new();
    b.insert("x".to_string(), f64_tensor(&[3], &[-2.0, 0.0, 3.0]));
    assert_eq!(
        run(&out, &b).get("grad:x").unwrap().to_f64_vec(),
        [-1.0, 0.0, 1.0]
    );
}
