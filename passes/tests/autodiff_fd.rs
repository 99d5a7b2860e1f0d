//! Property tests of every VJP rule of the autodiff pass against central finite differences.
//!
//! Each test builds `out = op(params.., inputs..)` with its float operands as (f32-declared)
//! parameters and its index/condition operands as inputs, adds the scalar loss
//! `L = sum(out * R)` for a random input `R`, differentiates it with [`autodiff`] and compares
//! every `grad:<param>` output with central differences of `L`. Both sides run on the reference
//! interpreter in [`Precision::F64`], with every float bound as an f64 tensor, so nothing is
//! rounded to f32. Inputs stay in each op's smooth domain (no ties for max/min/reduce_max, no
//! zeros for abs/recip/div, positive bases for log/sqrt/rsqrt/pow).

use mmc_ir::{
    verify, BinaryOp, DType, FusedOp, Graph, Interpreter, Op, Precision, ReduceKind, ScopeId,
    Shape, Stage, Tensor, TensorData, TensorType, UnaryOp, Value,
};
use mmc_passes::{autodiff, grad_output};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::collections::BTreeMap;

// ---------------------------------------------------------------------------------------------
// Random values
// ---------------------------------------------------------------------------------------------

/// splitmix64: a tiny deterministic generator for the values of one case.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Magnitude in [lo, hi] with a random sign: away from zero.
    fn signed(&mut self, lo: f64, hi: f64) -> f64 {
        let m = self.uniform(lo, hi);
        if self.coin() {
            m
        } else {
            -m
        }
    }

    /// Uniform in 0..n.
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }

    fn vec(&mut self, n: usize, mut f: impl FnMut(&mut Rng) -> f64) -> Vec<f64> {
        (0..n).map(|_| f(self)).collect()
    }

    /// A random subset of `0..rank` in random order (possibly empty).
    fn axes(&mut self, rank: usize) -> Vec<usize> {
        let mut axes: Vec<usize> = (0..rank).filter(|_| self.coin()).collect();
        self.shuffle(&mut axes);
        axes
    }

    /// `n` values, pairwise at least 0.15 apart, in random order (no ties anywhere).
    fn distinct(&mut self, n: usize) -> Vec<f64> {
        let mut v: Vec<f64> = (0..n)
            .map(|i| 0.2 * i as f64 - 0.1 * n as f64 + self.uniform(0.0, 0.05))
            .collect();
        self.shuffle(&mut v);
        v
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

// ---------------------------------------------------------------------------------------------
// Graph builder and the finite-difference check
// ---------------------------------------------------------------------------------------------

/// A forward graph under construction, with the tensors bound to its parameters and inputs.
struct Builder {
    g: Graph,
    bindings: BTreeMap<String, Tensor>,
    params: Vec<String>,
    rng: Rng,
    what: String,
}

/// A finished forward graph with output `loss`.
struct Case {
    g: Graph,
    bindings: BTreeMap<String, Tensor>,
    params: Vec<String>,
    what: String,
}

impl Builder {
    fn new(stage: Stage, seed: u64, what: impl Into<String>) -> Self {
        Builder {
            g: Graph::new(stage),
            bindings: BTreeMap::new(),
            params: Vec::new(),
            rng: Rng(seed),
            what: what.into(),
        }
    }

    fn node(&mut self, op: Op, inputs: &[Value]) -> Value {
        let desc = format!("{op:?}");
        let id = self
            .g
            .add_node(op, inputs, ScopeId::default())
            .unwrap_or_else(|e| panic!("{}: cannot add {desc}: {e}", self.what));
        self.g.result(id)
    }

    /// A parameter declared `dtype`, bound to an f64 tensor holding `values`.
    fn param(&mut self, name: &str, dtype: DType, shape: &[usize], values: Vec<f64>) -> Value {
        let v = self.node(
            Op::Param {
                name: name.into(),
                ty: TensorType::new(dtype, shape.to_vec()),
            },
            &[],
        );
        self.bindings
            .insert(name.into(), f64_tensor(shape, &values));
        self.params.push(name.into());
        v
    }

    /// An f32 parameter with values drawn by `f`.
    fn param_with(&mut self, name: &str, shape: &[usize], f: impl FnMut(&mut Rng) -> f64) -> Value {
        let values = self.rng.vec(numel(shape), f);
        self.param(name, DType::F32, shape, values)
    }

    fn input(&mut self, name: &str, ty: TensorType, t: Tensor) -> Value {
        let v = self.node(
            Op::Input {
                name: name.into(),
                ty,
            },
            &[],
        );
        self.bindings.insert(name.into(), t);
        v
    }

    /// An index input of `dtype` (i64 or i32).
    fn index_input(&mut self, name: &str, dtype: DType, shape: &[usize], idx: Vec<i64>) -> Value {
        let data = match dtype {
            DType::I64 => TensorData::I64(idx),
            DType::I32 => TensorData::I32(idx.iter().map(|&i| i as i32).collect()),
            d => panic!("not an index dtype: {d}"),
        };
        let t = Tensor::new(shape.to_vec(), data).unwrap();
        self.input(name, TensorType::new(dtype, shape.to_vec()), t)
    }

    fn bool_input(&mut self, name: &str, shape: &[usize], b: Vec<bool>) -> Value {
        let t = Tensor::new(shape.to_vec(), TensorData::Bool(b)).unwrap();
        self.input(name, TensorType::new(DType::Bool, shape.to_vec()), t)
    }

    /// Adds `loss = sum(out * R)` (a 0-d tensor) and returns the finished case.
    fn finish(mut self, out: Value) -> Case {
        let ty = self.g.ty(out).clone();
        let n = ty.numel();
        let r_values = self.rng.vec(n, |r| r.signed(0.5, 1.5));
        let r = self.input("r", ty.clone(), f64_tensor(&ty.shape, &r_values));
        let prod = self.node(Op::Binary(BinaryOp::Mul), &[out, r]);
        let s = self.node(
            Op::Reduce {
                kind: ReduceKind::Sum,
                axes: (0..ty.rank()).collect(),
            },
            &[prod],
        );
        let loss = self.node(Op::Reshape { shape: vec![] }, &[s]);
        self.g.add_output("loss", loss);
        Case {
            g: self.g,
            bindings: self.bindings,
            params: self.params,
            what: self.what,
        }
    }
}

fn f64_tensor(shape: &[usize], values: &[f64]) -> Tensor {
    Tensor::new(shape.to_vec(), TensorData::F64(values.to_vec())).unwrap()
}

/// Relative tolerance of the gradient check.
const REL_TOL: f64 = 1e-6;
/// Below this gradient norm the check is absolute, with bound `REL_TOL * ABS_BELOW`.
const ABS_BELOW: f64 = 1e-2;

fn run_loss(interp: &Interpreter, bindings: &BTreeMap<String, Tensor>) -> f64 {
    let outs = interp.run(bindings).expect("the forward graph runs");
    outs.get("loss").expect("loss output").to_f64_vec()[0]
}

/// Differentiates the case and compares every parameter gradient with central differences of
/// the loss of `fd_graph` (the case's own graph when `None`; the harness self-test passes a
/// different one).
fn check(case: Case, fd_graph: Option<&Graph>) -> Result<(), TestCaseError> {
    let Case {
        g,
        mut bindings,
        params,
        what,
    } = case;
    verify(&g).map_err(|e| TestCaseError::fail(format!("{what}: forward graph: {e}")))?;
    let grad = autodiff(&g, "loss", |_| true)
        .map_err(|e| TestCaseError::fail(format!("{what}: autodiff failed: {e}")))?;
    verify(&grad).map_err(|e| TestCaseError::fail(format!("{what}: autodiff graph: {e}")))?;
    prop_assert_eq!(grad.stage, Stage::Autodiff);

    let grads = Interpreter::new(&grad, Precision::F64)
        .unwrap()
        .run(&bindings)
        .map_err(|e| TestCaseError::fail(format!("{what}: backward run: {e}")))?;
    let loss_ad = grads
        .get("loss")
        .expect("the loss output is kept")
        .to_f64_vec()[0];
    let loss_fwd = run_loss(&Interpreter::new(&g, Precision::F64).unwrap(), &bindings);
    prop_assert_eq!(loss_ad, loss_fwd, "{}: loss differs after autodiff", what);
    let forward = Interpreter::new(fd_graph.unwrap_or(&g), Precision::F64).unwrap();

    for name in &params {
        let declared = g
            .params()
            .find(|(n, _, _)| n == name)
            .map(|(_, t, _)| t.clone())
            .unwrap();
        let t = grads
            .get(&grad_output(name))
            .ok_or_else(|| TestCaseError::fail(format!("{what}: no output grad:{name}")))?;
        prop_assert_eq!(
            t.shape(),
            declared.shape.as_slice(),
            "{}: grad:{} has the wrong shape",
            what,
            name
        );
        prop_assert_eq!(t.dtype(), DType::F64, "{}: F64 run returns f64", what);
        let ad = t.to_f64_vec();

        let base_t = bindings[name].clone();
        let base = base_t.to_f64_vec();
        let shape = base_t.shape().to_vec();
        let mut fd = vec![0.0; base.len()];
        for k in 0..base.len() {
            let x = base[k];
            let h = 1e-6 * x.abs().max(1.0);
            let (xp, xm) = (x + h, x - h);
            let mut v = base.clone();
            v[k] = xp;
            bindings.insert(name.clone(), f64_tensor(&shape, &v));
            let lp = run_loss(&forward, &bindings);
            v[k] = xm;
            bindings.insert(name.clone(), f64_tensor(&shape, &v));
            let lm = run_loss(&forward, &bindings);
            fd[k] = (lp - lm) / (xp - xm);
        }
        bindings.insert(name.clone(), base_t);

        let diff = ad
            .iter()
            .zip(&fd)
            .map(|(a, f)| (a - f) * (a - f))
            .sum::<f64>()
            .sqrt();
        let norm = fd.iter().map(|f| f * f).sum::<f64>().sqrt();
        let ok = if norm > ABS_BELOW {
            diff / norm <= REL_TOL
        } else {
            diff <= REL_TOL * ABS_BELOW
        };
        prop_assert!(
            ok,
            "{}: grad:{} (shape {:?}) disagrees with finite differences: \
             |ad - fd| = {:e}, |fd| = {:e}\n  ad = {:?}\n  fd = {:?}",
            what,
            name,
            shape,
            diff,
            norm,
            ad,
            fd
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Strategies and configuration
// ---------------------------------------------------------------------------------------------

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 28,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Rank 1–3, dims 1–4.
fn shape() -> impl Strategy<Value = Shape> {
    prop::collection::vec(1usize..=4, 1..=3)
}

fn index_dtype(rng: &mut Rng) -> DType {
    if rng.coin() {
        DType::I64
    } else {
        DType::I32
    }
}

// ---------------------------------------------------------------------------------------------
// Per-op cases
// ---------------------------------------------------------------------------------------------

/// A value in the smooth domain of `u`.
fn unary_domain(u: UnaryOp, r: &mut Rng) -> f64 {
    match u {
        UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt => r.uniform(0.5, 2.0),
        UnaryOp::Recip | UnaryOp::Abs => r.signed(0.2, 2.0),
        _ => r.uniform(-2.0, 2.0),
    }
}

fn check_unary(u: UnaryOp, shape: &[usize], seed: u64) -> Result<(), TestCaseError> {
    let mut b = Builder::new(Stage::Frontend, seed, format!("{u:?} on {shape:?}"));
    let x = b.param_with("x", shape, |r| unary_domain(u, r));
    let out = b.node(Op::Unary(u), &[x]);
    check(b.finish(out), None)
}

fn check_binary(op: BinaryOp, shape: &[usize], seed: u64) -> Result<(), TestCaseError> {
    let mut b = Builder::new(Stage::Frontend, seed, format!("{op:?} on {shape:?}"));
    let n = numel(shape);
    let (xs, ys): (Vec<f64>, Vec<f64>) = match op {
        BinaryOp::Div => (
            b.rng.vec(n, |r| r.uniform(-2.0, 2.0)),
            b.rng.vec(n, |r| r.signed(0.5, 2.0)),
        ),
        BinaryOp::Pow => (
            b.rng.vec(n, |r| r.uniform(0.5, 2.0)),
            b.rng.vec(n, |r| r.uniform(-2.0, 2.0)),
        ),
        BinaryOp::Max | BinaryOp::Min => {
            // Operands at least 0.1 apart, either one winning.
            let xs = b.rng.vec(n, |r| r.uniform(-2.0, 2.0));
            let ys = xs.iter().map(|&x| x + b.rng.signed(0.1, 1.0)).collect();
            (xs, ys)
        }
        _ => (
            b.rng.vec(n, |r| r.uniform(-2.0, 2.0)),
            b.rng.vec(n, |r| r.uniform(-2.0, 2.0)),
        ),
    };
    let x = b.param("x", DType::F32, shape, xs);
    let y = b.param("y", DType::F32, shape, ys);
    let out = b.node(Op::Binary(op), &[x, y]);
    check(b.finish(out), None)
}

fn check_select(shape: &[usize], seed: u64) -> Result<(), TestCaseError> {
    let mut b = Builder::new(Stage::Frontend, seed, format!("select on {shape:?}"));
    let n = numel(shape);
    let conds: Vec<bool> = (0..n).map(|_| b.rng.coin()).collect();
    let c = b.bool_input("cond", shape, conds);
    let x = b.param_with("a", shape, |r| r.uniform(-2.0, 2.0));
    let y = b.param_with("b", shape, |r| r.uniform(-2.0, 2.0));
    let out = b.node(Op::Select, &[c, x, y]);
    check(b.finish(out), None)
}

fn check_cast(from: DType, to: DType, shape: &[usize], seed: u64) -> Result<(), TestCaseError> {
    let mut b = Builder::new(
        Stage::Frontend,
        seed,
        format!("cast {from} -> {to} on {shape:?}"),
    );
    let values = b.rng.vec(numel(shape), |r| r.uniform(-2.0, 2.0));
    let x = b.param("x", from, shape, values);
    // A nonlinearity on each side, so the cast sits between two non-trivial adjoints.
    let x = b.node(Op::Unary(UnaryOp::Tanh), &[x]);
    let c = b.node(Op::Cast { to }, &[x]);
    let out = b.node(Op::Unary(UnaryOp::Sin), &[c]);
    check(b.finish(out), None)
}

fn check_reduce(kind: ReduceKind, shape: &[usize], seed: u64) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed ^ 0xA5A5);
    let axes = rng.axes(shape.len());
    let mut b = Builder::new(
        Stage::Frontend,
        seed,
        format!("reduce {kind:?} axes {axes:?} on {shape:?}"),
    );
    let values = match kind {
        ReduceKind::Sum => b.rng.vec(numel(shape), |r| r.uniform(-2.0, 2.0)),
        // Pairwise distinct: every reduced group has a unique maximum.
        ReduceKind::Max => b.rng.distinct(numel(shape)),
    };
    let x = b.param("x", DType::F32, shape, values);
    let out = b.node(Op::Reduce { kind, axes }, &[x]);
    check(b.finish(out), None)
}

fn check_broadcast(target: &[usize], seed: u64) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed ^ 0xB0B0);
    let from: Vec<usize> = target
        .iter()
        .map(|&d| if rng.coin() { 1 } else { d })
        .collect();
    let mut b = Builder::new(
        Stage::Frontend,
        seed,
        format!("broadcast {from:?} -> {target:?}"),
    );
    let x = b.param_with("x", &from, |r| r.uniform(-2.0, 2.0));
    let out = b.node(
        Op::Broadcast {
            shape: target.to_vec(),
        },
        &[x],
    );
    check(b.finish(out), None)
}

/// A random shape of rank 1–3 with `n` elements.
fn factor(rng: &mut Rng, n: usize) -> Shape {
    let rank = 1 + rng.below(3);
    let mut rest = n;
    let mut shape = Vec::new();
    for _ in 1..rank {
        let divisors: Vec<usize> = (1..=rest).filter(|&d| rest.is_multiple_of(d)).collect();
        let d = divisors[rng.below(divisors.len())];
        shape.push(d);
        rest /= d;
    }
    shape.push(rest);
    rng.shuffle(&mut shape);
    shape
}

fn check_reshape(shape: &[usize], seed: u64) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed ^ 0xC0C0);
    let to = factor(&mut rng, numel(shape));
    let mut b = Builder::new(
        Stage::Frontend,
        seed,
        format!("reshape {shape:?} -> {to:?}"),
    );
    let x = b.param_with("x", shape, |r| r.uniform(-2.0, 2.0));
    let y = b.node(Op::Reshape { shape: to.clone() }, &[x]);
    // A position-dependent consumer, so a wrong element order shows.
    let out = b.node(Op::Unary(UnaryOp::Sin), &[y]);
    check(b.finish(out), None)
}

fn check_permute(shape: &[usize], seed: u64) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed ^ 0xD0D0);
    let mut perm: Vec<usize> = (0..shape.len()).collect();
    rng.shuffle(&mut perm);
    let mut b = Builder::new(
        Stage::Frontend,
        seed,
        format!("permute {perm:?} on {shape:?}"),
    );
    let x = b.param_with("x", shape, |r| r.uniform(-2.0, 2.0));
    let out = b.node(Op::Permute { perm }, &[x]);
    check(b.finish(out), None)
}

fn check_slice(shape: &[usize], seed: u64) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed ^ 0xE0E0);
    let mut start = Vec::new();
    let mut end = Vec::new();
    for &d in shape {
        let s = rng.below(d);
        let e = s + 1 + rng.below(d - s);
        start.push(s);
        end.push(e);
    }
    let mut b = Builder::new(
        Stage::Frontend,
        seed,
        format!("slice {start:?}..{end:?} of {shape:?}"),
    );
    let x = b.param_with("x", shape, |r| r.uniform(-2.0, 2.0));
    let out = b.node(Op::Slice { start, end }, &[x]);
    check(b.finish(out), None)
}

fn check_pad(shape: &[usize], seed: u64) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed ^ 0xF0F0);
    let low: Vec<usize> = shape.iter().map(|_| rng.below(3)).collect();
    let high: Vec<usize> = shape.iter().map(|_| rng.below(3)).collect();
    let mut b = Builder::new(
        Stage::Frontend,
        seed,
        format!("pad low {low:?} high {high:?} of {shape:?}"),
    );
    let x = b.param_with("x", shape, |r| r.uniform(-2.0, 2.0));
    let out = b.node(Op::Pad { low, high }, &[x]);
    check(b.finish(out), None)
}

fn check_concat(shape: &[usize], seed: u64) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed ^ 0x1111);
    let axis = rng.below(shape.len());
    let parts = 2 + rng.below(2);
    let shapes: Vec<Shape> = (0..parts)
        .map(|_| {
            let mut s = shape.to_vec();
            s[axis] = 1 + rng.below(4);
            s
        })
        .collect();
    let mut b = Builder::new(
        Stage::Frontend,
        seed,
        format!("concat axis {axis} of {shapes:?}"),
    );
    let vals: Vec<Value> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| b.param_with(&format!("x{i}"), s, |r| r.uniform(-2.0, 2.0)))
        .collect();
    let out = b.node(Op::Concat { axis }, &vals);
    check(b.finish(out), None)
}

fn check_matmul(
    batch: Option<usize>,
    m: usize,
    k: usize,
    n: usize,
    seed: u64,
) -> Result<(), TestCaseError> {
    let lead: Vec<usize> = batch.into_iter().collect();
    let xs: Shape = lead.iter().copied().chain([m, k]).collect();
    let ys: Shape = lead.iter().copied().chain([k, n]).collect();
    let mut b = Builder::new(Stage::Frontend, seed, format!("matmul {xs:?} x {ys:?}"));
    let x = b.param_with("x", &xs, |r| r.uniform(-2.0, 2.0));
    let y = b.param_with("y", &ys, |r| r.uniform(-2.0, 2.0));
    let out = b.node(Op::MatMul, &[x, y]);
    check(b.finish(out), None)
}

/// Index tensor shape for gather/scatter along `axis` of `shape`: `shape` with 1..=d+2 on the
/// axis (more than d entries forces repeated indices), values in `0..shape[axis]`.
fn indices(rng: &mut Rng, shape: &[usize], axis: usize) -> (Shape, Vec<i64>) {
    let d = shape[axis];
    let mut ishape = shape.to_vec();
    ishape[axis] = 1 + rng.below(d + 2);
    let idx = (0..numel(&ishape)).map(|_| rng.below(d) as i64).collect();
    (ishape, idx)
}

fn check_gather(shape: &[usize], axis: usize, seed: u64) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed ^ 0x2222 ^ axis as u64);
    let (ishape, idx) = indices(&mut rng, shape, axis);
    let dtype = index_dtype(&mut rng);
    let mut b = Builder::new(
        Stage::Frontend,
        seed,
        format!("gather axis {axis} of {shape:?} with {dtype}{ishape:?} {idx:?}"),
    );
    let x = b.param_with("x", shape, |r| r.uniform(-2.0, 2.0));
    let i = b.index_input("idx", dtype, &ishape, idx);
    let out = b.node(Op::Gather { axis }, &[x, i]);
    check(b.finish(out), None)
}

fn check_scatter_add(shape: &[usize], axis: usize, seed: u64) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed ^ 0x3333 ^ axis as u64);
    let (ishape, idx) = indices(&mut rng, shape, axis);
    let dtype = index_dtype(&mut rng);
    let mut b = Builder::new(
        Stage::Frontend,
        seed,
        format!("scatter_add axis {axis} into {shape:?} with {dtype}{ishape:?} {idx:?}"),
    );
    let x = b.param_with("x", shape, |r| r.uniform(-2.0, 2.0));
    let i = b.index_input("idx", dtype, &ishape, idx);
    let src = b.param_with("src", &ishape, |r| r.uniform(-2.0, 2.0));
    let s = b.node(Op::ScatterAdd { axis }, &[x, i, src]);
    // A nonlinear consumer: accumulated entries then get a different gradient than single ones.
    let out = b.node(Op::Unary(UnaryOp::Sin), &[s]);
    check(b.finish(out), None)
}

fn check_cumsum(shape: &[usize], axis: usize, seed: u64) -> Result<(), TestCaseError> {
    let mut b = Builder::new(
        Stage::Frontend,
        seed,
        format!("cumsum axis {axis} of {shape:?}"),
    );
    let x = b.param_with("x", shape, |r| r.uniform(-2.0, 2.0));
    let out = b.node(Op::CumSum { axis }, &[x]);
    check(b.finish(out), None)
}

fn check_rms_norm(shape: &[usize], seed: u64) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed ^ 0x4444);
    let eps = [1e-6, 1e-3, 0.1, 1.0][rng.below(4)];
    let mut b = Builder::new(
        Stage::Fused,
        seed,
        format!("rms_norm eps {eps} on {shape:?}"),
    );
    let last = *shape.last().unwrap();
    let x = b.param_with("x", shape, |r| r.signed(0.3, 2.0));
    let w = b.param_with("w", &[last], |r| r.uniform(-2.0, 2.0));
    let out = b.node(Op::Fused(FusedOp::RmsNorm { eps }), &[x, w]);
    check(b.finish(out), None)
}

/// `ce = mean_b(logsumexp(logits_b) - logits_b[label_b])` with `logits = x @ w`: max-shifted
/// softmax, gather of the label column, reductions, broadcasts and a rank-0 result.
fn check_softmax_ce(
    batch: usize,
    d: usize,
    classes: usize,
    seed: u64,
) -> Result<(), TestCaseError> {
    let mut b = Builder::new(
        Stage::Frontend,
        seed,
        format!("softmax-ce batch {batch} d {d} classes {classes}"),
    );
    let x = b.param_with("x", &[batch, d], |r| r.uniform(-1.5, 1.5));
    let w = b.param_with("w", &[d, classes], |r| r.uniform(-1.5, 1.5));
    let labels: Vec<i64> = (0..batch).map(|_| b.rng.below(classes) as i64).collect();
    let lab = b.index_input("labels", DType::I64, &[batch, 1], labels);
    let logits = b.node(Op::MatMul, &[x, w]);
    let m = b.node(
        Op::Reduce {
            kind: ReduceKind::Max,
            axes: vec![1],
        },
        &[logits],
    );
    let mb = b.node(
        Op::Broadcast {
            shape: vec![batch, classes],
        },
        &[m],
    );
    let z = b.node(Op::Binary(BinaryOp::Sub), &[logits, mb]);
    let e = b.node(Op::Unary(UnaryOp::Exp), &[z]);
    let s = b.node(
        Op::Reduce {
            kind: ReduceKind::Sum,
            axes: vec![1],
        },
        &[e],
    );
    let lse = b.node(Op::Unary(UnaryOp::Log), &[s]);
    let lseb = b.node(
        Op::Broadcast {
            shape: vec![batch, classes],
        },
        &[lse],
    );
    let logp = b.node(Op::Binary(BinaryOp::Sub), &[z, lseb]);
    let picked = b.node(Op::Gather { axis: 1 }, &[logp, lab]);
    let total = b.node(
        Op::Reduce {
            kind: ReduceKind::Sum,
            axes: vec![0, 1],
        },
        &[picked],
    );
    let total = b.node(Op::Reshape { shape: vec![] }, &[total]);
    let scale = b.node(
        Op::Const {
            value: -1.0 / batch as f64,
            ty: TensorType::new(DType::F32, vec![]),
        },
        &[],
    );
    let ce = b.node(Op::Binary(BinaryOp::Mul), &[total, scale]);
    check(b.finish(ce), None)
}

/// One value with many consumers (and an op reading the same value twice): the adjoints of
/// `x` and `t` must accumulate over every use.
fn check_fan_out(shape: &[usize], seed: u64) -> Result<(), TestCaseError> {
    let mut b = Builder::new(Stage::Frontend, seed, format!("fan-out on {shape:?}"));
    let x = b.param_with("x", shape, |r| r.uniform(-1.5, 1.5));
    let y = b.param_with("y", shape, |r| r.uniform(-1.5, 1.5));
    let t = b.node(Op::Unary(UnaryOp::Tanh), &[x]);
    let tt = b.node(Op::Binary(BinaryOp::Mul), &[t, t]);
    let tx = b.node(Op::Binary(BinaryOp::Mul), &[t, x]);
    let et = b.node(Op::Unary(UnaryOp::Exp), &[t]);
    let ty = b.node(Op::Binary(BinaryOp::Sub), &[y, t]);
    let ty = b.node(Op::Binary(BinaryOp::Mul), &[ty, x]);
    let axes: Vec<usize> = (0..shape.len()).collect();
    let st = b.node(
        Op::Reduce {
            kind: ReduceKind::Sum,
            axes,
        },
        &[t],
    );
    let st = b.node(
        Op::Broadcast {
            shape: shape.to_vec(),
        },
        &[st],
    );
    let st = b.node(Op::Binary(BinaryOp::Mul), &[st, y]);
    let a = b.node(Op::Binary(BinaryOp::Add), &[tt, tx]);
    let a = b.node(Op::Binary(BinaryOp::Sub), &[a, et]);
    let a = b.node(Op::Binary(BinaryOp::Add), &[a, ty]);
    let out = b.node(Op::Binary(BinaryOp::Add), &[a, st]);
    check(b.finish(out), None)
}

// ---------------------------------------------------------------------------------------------
// The properties
// ---------------------------------------------------------------------------------------------

macro_rules! unary_props {
    ($($name:ident => $op:ident),* $(,)?) => {
        proptest! {
            #![proptest_config(config())]
            $(
                #[test]
                fn $name(shape in shape(), seed in any::<u64>()) {
                    check_unary(UnaryOp::$op, &shape, seed)?;
                }
            )*
        }
    };
}

unary_props! {
    vjp_neg => Neg,
    vjp_abs => Abs,
    vjp_exp => Exp,
    vjp_log => Log,
    vjp_sqrt => Sqrt,
    vjp_rsqrt => Rsqrt,
    vjp_recip => Recip,
    vjp_tanh => Tanh,
    vjp_erf => Erf,
    vjp_sin => Sin,
    vjp_cos => Cos,
}

macro_rules! binary_props {
    ($($name:ident => $op:ident),* $(,)?) => {
        proptest! {
            #![proptest_config(config())]
            $(
                #[test]
                fn $name(shape in shape(), seed in any::<u64>()) {
                    check_binary(BinaryOp::$op, &shape, seed)?;
                }
            )*
        }
    };
}

binary_props! {
    vjp_add => Add,
    vjp_sub => Sub,
    vjp_mul => Mul,
    vjp_div => Div,
    vjp_max => Max,
    vjp_min => Min,
    vjp_pow => Pow,
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn vjp_select(shape in shape(), seed in any::<u64>()) {
        check_select(&shape, seed)?;
    }

    #[test]
    fn vjp_cast_f32_to_f64(shape in shape(), seed in any::<u64>()) {
        check_cast(DType::F32, DType::F64, &shape, seed)?;
    }

    #[test]
    fn vjp_cast_f64_to_f32(shape in shape(), seed in any::<u64>()) {
        check_cast(DType::F64, DType::F32, &shape, seed)?;
    }

    #[test]
    fn vjp_reduce_sum(shape in shape(), seed in any::<u64>()) {
        check_reduce(ReduceKind::Sum, &shape, seed)?;
    }

    #[test]
    fn vjp_reduce_max(shape in shape(), seed in any::<u64>()) {
        check_reduce(ReduceKind::Max, &shape, seed)?;
    }

    #[test]
    fn vjp_broadcast(shape in shape(), seed in any::<u64>()) {
        check_broadcast(&shape, seed)?;
    }

    #[test]
    fn vjp_reshape(shape in shape(), seed in any::<u64>()) {
        check_reshape(&shape, seed)?;
    }

    #[test]
    fn vjp_permute(shape in shape(), seed in any::<u64>()) {
        check_permute(&shape, seed)?;
    }

    #[test]
    fn vjp_slice(shape in shape(), seed in any::<u64>()) {
        check_slice(&shape, seed)?;
    }

    #[test]
    fn vjp_pad(shape in shape(), seed in any::<u64>()) {
        check_pad(&shape, seed)?;
    }

    #[test]
    fn vjp_concat(shape in shape(), seed in any::<u64>()) {
        check_concat(&shape, seed)?;
    }

    #[test]
    fn vjp_matmul(m in 1usize..=4, k in 1usize..=4, n in 1usize..=4, seed in any::<u64>()) {
        check_matmul(None, m, k, n, seed)?;
    }

    #[test]
    fn vjp_matmul_batched(
        batch in 1usize..=4, m in 1usize..=4, k in 1usize..=4, n in 1usize..=4,
        seed in any::<u64>(),
    ) {
        check_matmul(Some(batch), m, k, n, seed)?;
    }

    #[test]
    fn vjp_gather(shape in shape(), seed in any::<u64>()) {
        for axis in 0..shape.len() {
            check_gather(&shape, axis, seed)?;
        }
    }

    #[test]
    fn vjp_scatter_add(shape in shape(), seed in any::<u64>()) {
        for axis in 0..shape.len() {
            check_scatter_add(&shape, axis, seed)?;
        }
    }

    #[test]
    fn vjp_cumsum(shape in shape(), seed in any::<u64>()) {
        for axis in 0..shape.len() {
            check_cumsum(&shape, axis, seed)?;
        }
    }

    #[test]
    fn vjp_fused_rms_norm(shape in shape(), seed in any::<u64>()) {
        check_rms_norm(&shape, seed)?;
    }

    #[test]
    fn vjp_softmax_cross_entropy(
        batch in 1usize..=4, d in 1usize..=4, classes in 2usize..=5, seed in any::<u64>(),
    ) {
        check_softmax_ce(batch, d, classes, seed)?;
    }

    #[test]
    fn vjp_fan_out_accumulates(shape in shape(), seed in any::<u64>()) {
        check_fan_out(&shape, seed)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Self-checks of the harness
// ---------------------------------------------------------------------------------------------

/// The check must be able to fail: with the finite differences taken on a loss scaled by
/// `1 + 1e-5`, a correct autodiff gradient is off by a relative 1e-5 and must be rejected.
#[test]
fn harness_rejects_a_slightly_wrong_gradient() {
    let build = |scale: f64| {
        let mut b = Builder::new(Stage::Frontend, 7, "harness");
        let x = b.param_with("x", &[2, 3], |r| r.uniform(-2.0, 2.0));
        let y = b.node(Op::Unary(UnaryOp::Sin), &[x]);
        let k = b.node(
            Op::Const {
                value: scale,
                ty: TensorType::new(DType::F32, vec![2, 3]),
            },
            &[],
        );
        let out = b.node(Op::Binary(BinaryOp::Mul), &[y, k]);
        b.finish(out)
    };
    assert!(check(build(1.0), None).is_ok());
    let skewed = build(1.0 + 1e-5).g;
    assert!(check(build(1.0), Some(&skewed)).is_err());
}

#[test]
fn rng_helpers_keep_their_promises() {
    let mut r = Rng(42);
    for n in 1..40 {
        let mut v = r.distinct(n);
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert!(v.windows(2).all(|w| w[1] - w[0] >= 0.15));
    }
    for n in 1..60 {
        let s = factor(&mut r, n);
        assert_eq!(numel(&s), n);
        assert!((1..=3).contains(&s.len()));
    }
    for _ in 0..100 {
        assert!(r.signed(0.5, 2.0).abs() >= 0.5);
        let u = r.unit();
        assert!((0.0..1.0).contains(&u));
    }
}
