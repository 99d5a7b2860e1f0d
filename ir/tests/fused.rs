//! The interpreter's fused ops: every forward op against the primitive subgraph it replaces
//! (built as the frontend DSL emits it), every backward op against central finite differences,
//! and wrong routing data as op errors.
//!
//! Each forward case builds one graph holding both forms, outputs `prim` and `fused`, and runs
//! it in [`Precision::F64`] (the two agree to 1e-12) and in [`Precision::Declared`] (they agree
//! to f32 rounding; where the fused op reads graph inputs directly, its declared result is
//! exactly its f64 result rounded once to f32). Input values are f32-representable, so both
//! runs see the same inputs.

use mmc_ir::interp::InterpError;
use mmc_ir::{
    verify, BinaryOp, CmpOp, DType, FusedOp, Graph, Interpreter, Op, Outputs, Precision,
    ReduceKind, ScopeId, Stage, Tensor, TensorData, TensorType, UnaryOp, Value,
};
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

    /// Uniform in [lo, hi), rounded to f32 so that f32 and f64 bindings hold the same value.
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (lo + (hi - lo) * u) as f32 as f64
    }

    /// Magnitude in [lo, hi) with a random sign.
    fn signed(&mut self, lo: f64, hi: f64) -> f64 {
        let m = self.uniform(lo, hi);
        if self.next_u64() & 1 == 1 {
            m
        } else {
            -m
        }
    }

    /// Uniform in 0..n.
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

// ---------------------------------------------------------------------------------------------
// A copy of the frontend DSL (frontend/src/dsl.rs) over a bare graph: the same primitive ops,
// in the same order, with the same numpy broadcasting.
// ---------------------------------------------------------------------------------------------

/// The values bound to one graph input.
#[derive(Clone)]
enum Data {
    F(Vec<f64>),
    I(Vec<i64>),
}

struct B {
    g: Graph,
    data: BTreeMap<String, (TensorType, Data)>,
    rng: Rng,
}

impl B {
    fn new(seed: u64) -> Self {
        B {
            g: Graph::new(Stage::Fused),
            data: BTreeMap::new(),
            rng: Rng(seed),
        }
    }

    #[track_caller]
    fn nodes(&mut self, op: Op, inputs: &[Value]) -> Vec<Value> {
        let desc = format!("{op:?}");
        let id = self
            .g
            .add_node(op, inputs, ScopeId::default())
            .unwrap_or_else(|e| panic!("cannot add {desc}: {e}"));
        self.g.node(id).outputs.to_vec()
    }

    #[track_caller]
    fn node(&mut self, op: Op, inputs: &[Value]) -> Value {
        self.nodes(op, inputs)[0]
    }

    fn fused(&mut self, op: FusedOp, inputs: &[Value]) -> Value {
        self.node(Op::Fused(op), inputs)
    }

    fn shape(&self, x: Value) -> Vec<usize> {
        self.g.ty(x).shape.clone()
    }

    fn dtype(&self, x: Value) -> DType {
        self.g.ty(x).dtype
    }

    fn input(&mut self, name: &str, ty: TensorType, data: Data) -> Value {
        let v = self.node(
            Op::Input {
                name: name.into(),
                ty: ty.clone(),
            },
            &[],
        );
        self.data.insert(name.into(), (ty, data));
        v
    }

    /// An f32 input with values uniform in [lo, hi).
    fn rand(&mut self, name: &str, shape: &[usize], lo: f64, hi: f64) -> Value {
        let values = self.rng.vec(numel(shape), lo, hi);
        self.floats(name, shape, values)
    }

    fn floats(&mut self, name: &str, shape: &[usize], values: Vec<f64>) -> Value {
        let ty = TensorType::new(DType::F32, shape.to_vec());
        self.input(name, ty, Data::F(values))
    }

    fn ints(&mut self, name: &str, shape: &[usize], values: Vec<i64>) -> Value {
        let ty = TensorType::new(DType::I64, shape.to_vec());
        self.input(name, ty, Data::I(values))
    }

    /// The tensors bound to the inputs: f64 ones for an F64 run, declared ones otherwise.
    fn bindings(&self, precision: Precision) -> BTreeMap<String, Tensor> {
        self.data
            .iter()
            .map(|(name, (ty, d))| {
                let t = match (d, precision) {
                    (Data::I(v), _) => {
                        Tensor::new(ty.shape.clone(), TensorData::I64(v.clone())).unwrap()
                    }
                    (Data::F(v), Precision::F64) => {
                        Tensor::new(ty.shape.clone(), TensorData::F64(v.clone())).unwrap()
                    }
                    (Data::F(v), Precision::Declared) => {
                        Tensor::from_f64(ty.dtype, ty.shape.clone(), v).unwrap()
                    }
                };
                (name.clone(), t)
            })
            .collect()
    }

    fn run(&self, precision: Precision) -> Result<Outputs, InterpError> {
        Interpreter::new(&self.g, precision)?.run(&self.bindings(precision))
    }

    // ---- the DSL ----

    fn full(&mut self, value: f64, dtype: DType, shape: &[usize]) -> Value {
        let ty = TensorType::new(dtype, shape.to_vec());
        self.node(Op::Const { value, ty }, &[])
    }

    fn full_like(&mut self, value: f64, like: Value) -> Value {
        let ty = self.g.ty(like).clone();
        self.full(value, ty.dtype, &ty.shape)
    }

    fn iota(&mut self, dtype: DType, shape: &[usize], axis: usize) -> Value {
        let ty = TensorType::new(dtype, shape.to_vec());
        self.node(Op::Iota { axis, ty }, &[])
    }

    fn unary(&mut self, u: UnaryOp, x: Value) -> Value {
        self.node(Op::Unary(u), &[x])
    }

    fn broadcast_shape(&self, a: &[usize], b: &[usize]) -> Vec<usize> {
        let rank = a.len().max(b.len());
        let pad = |s: &[usize]| {
            let mut v = vec![1; rank - s.len()];
            v.extend_from_slice(s);
            v
        };
        let (a, b) = (pad(a), pad(b));
        a.iter()
            .zip(&b)
            .map(|(&x, &y)| match (x, y) {
                _ if x == y => x,
                (1, _) => y,
                (_, 1) => x,
                _ => panic!("shapes {a:?} and {b:?} do not broadcast"),
            })
            .collect()
    }

    fn broadcast_to(&mut self, x: Value, shape: &[usize]) -> Value {
        let s = self.shape(x);
        if s == shape {
            return x;
        }
        let mut padded = vec![1; shape.len() - s.len()];
        padded.extend_from_slice(&s);
        let x = if padded != s {
            self.reshape(x, &padded)
        } else {
            x
        };
        if padded == shape {
            return x;
        }
        self.node(
            Op::Broadcast {
                shape: shape.to_vec(),
            },
            &[x],
        )
    }

    fn broadcast_pair(&mut self, a: Value, b: Value) -> (Value, Value) {
        let shape = self.broadcast_shape(&self.shape(a), &self.shape(b));
        (self.broadcast_to(a, &shape), self.broadcast_to(b, &shape))
    }

    fn binary(&mut self, op: BinaryOp, a: Value, b: Value) -> Value {
        let (a, b) = self.broadcast_pair(a, b);
        self.node(Op::Binary(op), &[a, b])
    }

    fn add(&mut self, a: Value, b: Value) -> Value {
        self.binary(BinaryOp::Add, a, b)
    }

    fn sub(&mut self, a: Value, b: Value) -> Value {
        self.binary(BinaryOp::Sub, a, b)
    }

    fn mul(&mut self, a: Value, b: Value) -> Value {
        self.binary(BinaryOp::Mul, a, b)
    }

    fn div(&mut self, a: Value, b: Value) -> Value {
        self.binary(BinaryOp::Div, a, b)
    }

    fn binary_scalar(&mut self, op: BinaryOp, x: Value, c: f64) -> Value {
        let c = self.full_like(c, x);
        self.node(Op::Binary(op), &[x, c])
    }

    fn add_scalar(&mut self, x: Value, c: f64) -> Value {
        self.binary_scalar(BinaryOp::Add, x, c)
    }

    fn mul_scalar(&mut self, x: Value, c: f64) -> Value {
        self.binary_scalar(BinaryOp::Mul, x, c)
    }

    fn compare(&mut self, op: CmpOp, a: Value, b: Value) -> Value {
        let (a, b) = self.broadcast_pair(a, b);
        self.node(Op::Compare(op), &[a, b])
    }

    fn compare_scalar(&mut self, op: CmpOp, x: Value, c: f64) -> Value {
        let c = self.full_like(c, x);
        self.node(Op::Compare(op), &[x, c])
    }

    fn select(&mut self, cond: Value, a: Value, b: Value) -> Value {
        let shape = self.broadcast_shape(&self.shape(a), &self.shape(b));
        let shape = self.broadcast_shape(&self.shape(cond), &shape);
        let cond = self.broadcast_to(cond, &shape);
        let a = self.broadcast_to(a, &shape);
        let b = self.broadcast_to(b, &shape);
        self.node(Op::Select, &[cond, a, b])
    }

    fn cast(&mut self, x: Value, dtype: DType) -> Value {
        if self.dtype(x) == dtype {
            return x;
        }
        self.node(Op::Cast { to: dtype }, &[x])
    }

    fn reduce(&mut self, kind: ReduceKind, x: Value, axes: &[usize], keepdim: bool) -> Value {
        let r = self.node(
            Op::Reduce {
                kind,
                axes: axes.to_vec(),
            },
            &[x],
        );
        if keepdim {
            return r;
        }
        let shape: Vec<usize> = self
            .shape(x)
            .iter()
            .enumerate()
            .filter(|(i, _)| !axes.contains(i))
            .map(|(_, &d)| d)
            .collect();
        self.reshape(r, &shape)
    }

    fn sum(&mut self, x: Value, axes: &[usize], keepdim: bool) -> Value {
        self.reduce(ReduceKind::Sum, x, axes, keepdim)
    }

    fn max(&mut self, x: Value, axes: &[usize], keepdim: bool) -> Value {
        self.reduce(ReduceKind::Max, x, axes, keepdim)
    }

    fn mean(&mut self, x: Value, axes: &[usize], keepdim: bool) -> Value {
        let shape = self.shape(x);
        let n: usize = axes.iter().map(|&a| shape[a]).product();
        let s = self.sum(x, axes, keepdim);
        self.mul_scalar(s, 1.0 / n as f64)
    }

    fn sum_all(&mut self, x: Value) -> Value {
        let axes: Vec<usize> = (0..self.shape(x).len()).collect();
        self.sum(x, &axes, false)
    }

    fn reshape(&mut self, x: Value, shape: &[usize]) -> Value {
        if self.shape(x) == shape {
            return x;
        }
        self.node(
            Op::Reshape {
                shape: shape.to_vec(),
            },
            &[x],
        )
    }

    fn permute(&mut self, x: Value, perm: &[usize]) -> Value {
        if perm.iter().enumerate().all(|(i, &p)| i == p) {
            return x;
        }
        self.node(
            Op::Permute {
                perm: perm.to_vec(),
            },
            &[x],
        )
    }

    fn transpose(&mut self, x: Value, a: usize, b: usize) -> Value {
        let mut perm: Vec<usize> = (0..self.shape(x).len()).collect();
        perm.swap(a, b);
        self.permute(x, &perm)
    }

    fn slice(&mut self, x: Value, axis: usize, start: usize, end: usize) -> Value {
        let shape = self.shape(x);
        let mut s = vec![0; shape.len()];
        let mut e = shape;
        s[axis] = start;
        e[axis] = end;
        self.node(Op::Slice { start: s, end: e }, &[x])
    }

    fn concat(&mut self, xs: &[Value], axis: usize) -> Value {
        self.node(Op::Concat { axis }, xs)
    }

    fn matmul(&mut self, a: Value, b: Value) -> Value {
        let (sa, sb) = (self.shape(a), self.shape(b));
        let batch = self.broadcast_shape(&sa[..sa.len() - 2], &sb[..sb.len() - 2]);
        let full = |s: &[usize]| {
            let mut v = batch.clone();
            v.extend_from_slice(&s[s.len() - 2..]);
            v
        };
        let a = self.broadcast_to(a, &full(&sa));
        let b = self.broadcast_to(b, &full(&sb));
        self.node(Op::MatMul, &[a, b])
    }

    /// `x @ w^T` for `w` [out, in].
    fn linear_with(&mut self, x: Value, w: Value) -> Value {
        let wt = self.transpose(w, 0, 1);
        let shape = self.shape(x);
        let (&last, lead) = shape.split_last().unwrap();
        let rows: usize = lead.iter().product();
        let x2 = self.reshape(x, &[rows, last]);
        let y = self.matmul(x2, wt);
        let mut out = lead.to_vec();
        out.push(self.shape(w)[0]);
        self.reshape(y, &out)
    }

    fn gather(&mut self, x: Value, idx: Value, axis: usize) -> Value {
        self.node(Op::Gather { axis }, &[x, idx])
    }

    fn scatter_add(&mut self, x: Value, idx: Value, src: Value, axis: usize) -> Value {
        self.node(Op::ScatterAdd { axis }, &[x, idx, src])
    }

    fn topk(&mut self, x: Value, k: usize) -> Value {
        self.node(Op::TopK { k }, &[x])
    }

    fn softmax(&mut self, x: Value, axis: usize) -> Value {
        let m = self.max(x, &[axis], true);
        let z = self.sub(x, m);
        let e = self.unary(UnaryOp::Exp, z);
        let s = self.sum(e, &[axis], true);
        self.div(e, s)
    }

    fn logsumexp(&mut self, x: Value, axis: usize) -> Value {
        let m = self.max(x, &[axis], true);
        let z = self.sub(x, m);
        let e = self.unary(UnaryOp::Exp, z);
        let s = self.sum(e, &[axis], true);
        let l = self.unary(UnaryOp::Log, s);
        self.add(l, m)
    }

    fn log_softmax(&mut self, x: Value, axis: usize) -> Value {
        let l = self.logsumexp(x, axis);
        self.sub(x, l)
    }

    fn silu(&mut self, x: Value) -> Value {
        let n = self.unary(UnaryOp::Neg, x);
        let e = self.unary(UnaryOp::Exp, n);
        let d = self.add_scalar(e, 1.0);
        self.div(x, d)
    }

    fn gelu(&mut self, x: Value) -> Value {
        let s = self.mul_scalar(x, std::f64::consts::FRAC_1_SQRT_2);
        let e = self.unary(UnaryOp::Erf, s);
        let one = self.add_scalar(e, 1.0);
        let h = self.mul_scalar(x, 0.5);
        self.mul(h, one)
    }

    /// `ModelBuilder::rms_norm` with the weight given.
    fn rms_norm(&mut self, x: Value, w: Value, eps: f64) -> Value {
        let dtype = self.dtype(x);
        let axis = self.shape(x).len() - 1;
        let xf = self.cast(x, DType::F32);
        let sq = self.mul(xf, xf);
        let ms = self.mean(sq, &[axis], true);
        let ms = self.add_scalar(ms, eps);
        let r = self.unary(UnaryOp::Rsqrt, ms);
        let y = self.mul(xf, r);
        let y = self.cast(y, dtype);
        self.mul(w, y)
    }

    /// `ModelBuilder::layer_norm` with the weight and bias given.
    fn layer_norm(&mut self, x: Value, w: Value, bias: Value, eps: f64) -> Value {
        let dtype = self.dtype(x);
        let axis = self.shape(x).len() - 1;
        let xf = self.cast(x, DType::F32);
        let mu = self.mean(xf, &[axis], true);
        let c = self.sub(xf, mu);
        let sq = self.mul(c, c);
        let var = self.mean(sq, &[axis], true);
        let var = self.add_scalar(var, eps);
        let r = self.unary(UnaryOp::Rsqrt, var);
        let y = self.mul(c, r);
        let w = self.cast(w, DType::F32);
        let bias = self.cast(bias, DType::F32);
        let y = self.mul(y, w);
        let y = self.add(y, bias);
        self.cast(y, dtype)
    }

    // ---- frontend/src/models/qwen3_moe.rs ----

    /// `apply_rope`: `x * cos + rotate_half(x) * sin`.
    fn apply_rope(&mut self, x: Value, cos: Value, sin: Value) -> Value {
        let d = *self.shape(x).last().unwrap();
        let x1 = self.slice(x, 3, 0, d / 2);
        let x2 = self.slice(x, 3, d / 2, d);
        let nx2 = self.unary(UnaryOp::Neg, x2);
        let rot = self.concat(&[nx2, x1], 3);
        let a = self.mul(x, cos);
        let r = self.mul(rot, sin);
        self.add(a, r)
    }

    /// `packed_causal_mask`: [batch, 1, seq, seq], key j visible to query i when j <= i and
    /// both are of one packed sample.
    fn packed_causal_mask(&mut self, segment_ids: Value) -> Value {
        let shape = self.shape(segment_ids);
        let (bs, s) = (shape[0], shape[1]);
        let qi = self.iota(DType::I64, &[s, s], 0);
        let kj = self.iota(DType::I64, &[s, s], 1);
        let causal = self.compare(CmpOp::Le, kj, qi);
        let seg_q = self.reshape(segment_ids, &[bs, s, 1]);
        let seg_k = self.reshape(segment_ids, &[bs, 1, s]);
        let same = self.compare(CmpOp::Eq, seg_q, seg_k);
        let mask = self.binary(BinaryOp::And, same, causal);
        self.reshape(mask, &[bs, 1, s, s])
    }

    /// The core of qwen3 `attention` from the roped q [b, hq, s, d] and k, v [b, hkv, s, d]:
    /// the GQA expand, scaled scores, the mask as a select of -inf (when given), softmax, and
    /// the weighted sum of values. Without a mask it is the InternViT form.
    fn attention(&mut self, q: Value, k: Value, v: Value, mask: Option<Value>) -> Value {
        let (qs, ks) = (self.shape(q), self.shape(k));
        let (bs, nh, s, hd) = (qs[0], qs[1], qs[2], qs[3]);
        let nkv = ks[1];
        let rep = nh / nkv;
        let expand = |b: &mut B, t: Value| {
            let t = b.reshape(t, &[bs, nkv, 1, s, hd]);
            let t = b.broadcast_to(t, &[bs, nkv, rep, s, hd]);
            b.reshape(t, &[bs, nh, s, hd])
        };
        let k = expand(self, k);
        let v = expand(self, v);
        let kt = self.transpose(k, 2, 3);
        let scores = self.matmul(q, kt);
        let scores = self.mul_scalar(scores, (hd as f64).powf(-0.5));
        let scores = self.cast(scores, DType::F32);
        let scores = match mask {
            Some(mask) => {
                let neg_inf = self.full(f64::NEG_INFINITY, DType::F32, &[1]);
                self.select(mask, scores, neg_inf)
            }
            None => scores,
        };
        let probs = self.softmax(scores, 3);
        let probs = self.cast(probs, self.dtype(q));
        self.matmul(probs, v)
    }

    /// `shifted_cross_entropy`: position t predicts `labels[t+1]` with weight
    /// `loss_weights[t+1]`; negative labels are ignored.
    fn shifted_cross_entropy(&mut self, logits: Value, labels: Value, weights: Value) -> Value {
        let shape = self.shape(logits);
        let (bs, s) = (shape[0], shape[1]);
        let next = self.slice(labels, 1, 1, s);
        let pad = self.full(-100.0, DType::I64, &[bs, 1]);
        let target = self.concat(&[next, pad], 1);
        let wnext = self.slice(weights, 1, 1, s);
        let wpad = self.full(0.0, DType::F32, &[bs, 1]);
        let w = self.concat(&[wnext, wpad], 1);
        let valid = self.compare_scalar(CmpOp::Ge, target, 0.0);
        let zero_id = self.full(0.0, DType::I64, &[bs, s]);
        let safe = self.select(valid, target, zero_id);
        let logits = self.cast(logits, DType::F32);
        let lse = self.logsumexp(logits, 2);
        let idx = self.reshape(safe, &[bs, s, 1]);
        let picked = self.gather(logits, idx, 2);
        let ce = self.sub(lse, picked);
        let ce = self.reshape(ce, &[bs, s]);
        let zero_w = self.full(0.0, DType::F32, &[bs, s]);
        let w = self.select(valid, w, zero_w);
        let wce = self.mul(ce, w);
        self.sum_all(wce)
    }
}

// ---------------------------------------------------------------------------------------------
// Comparing the two forms
// ---------------------------------------------------------------------------------------------

/// Whether `a` is within `tol` of `b` elementwise, relative to `max(1, |b|)`; NaN matches NaN
/// and infinities must be equal.
fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(&x, &y)| {
            (x.is_nan() && y.is_nan()) || x == y || (x - y).abs() <= tol * y.abs().max(1.0)
        })
}

/// Agreement of the two forms in an F64 run.
const F64_TOL: f64 = 1e-12;
/// Agreement of the two forms in a Declared run: a few f32 roundings along the primitive chain.
const F32_TOL: f64 = 2e-6;

/// Runs the case's graph in both precisions and compares its `prim` and `fused` outputs; with
/// `direct` (the fused op reads graph inputs only), also checks that its declared result is its
/// f64 result rounded once.
#[track_caller]
fn check_forms(b: &B, what: &str, direct: bool) {
    verify(&b.g).unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut fused64 = Vec::new();
    for (precision, tol) in [(Precision::F64, F64_TOL), (Precision::Declared, F32_TOL)] {
        let outs = b
            .run(precision)
            .unwrap_or_else(|e| panic!("{what} ({precision:?}): {e}"));
        let prim = outs.get("prim").unwrap().to_f64_vec();
        let fused = outs.get("fused").unwrap().to_f64_vec();
        assert!(
            close(&fused, &prim, tol),
            "{what} ({precision:?}): the fused op differs from its primitive form\n  \
             fused = {fused:?}\n  prim  = {prim:?}"
        );
        if precision == Precision::F64 {
            fused64 = fused;
        } else if direct {
            let rounded: Vec<f64> = fused64.iter().map(|&x| x as f32 as f64).collect();
            assert!(
                close(&fused, &rounded, 0.0),
                "{what}: the declared fused result is not its f64 result rounded once"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Forward ops against their primitive forms
// ---------------------------------------------------------------------------------------------

#[test]
fn rms_norm_is_the_frontend_rms_norm() {
    for (seed, shape) in [(1, vec![4]), (2, vec![3, 5]), (3, vec![2, 3, 7])] {
        let mut b = B::new(seed);
        let d = *shape.last().unwrap();
        let x = b.rand("x", &shape, -2.0, 2.0);
        let w = b.rand("w", &[d], 0.5, 1.5);
        let prim = b.rms_norm(x, w, 1e-6);
        let fused = b.fused(FusedOp::RmsNorm { eps: 1e-6 }, &[x, w]);
        b.g.add_output("prim", prim);
        b.g.add_output("fused", fused);
        check_forms(&b, &format!("rms_norm {shape:?}"), true);
    }
}

#[test]
fn layer_norm_is_the_frontend_layer_norm() {
    for (seed, shape) in [(4, vec![5]), (5, vec![3, 6]), (6, vec![2, 3, 5])] {
        let mut b = B::new(seed);
        let d = *shape.last().unwrap();
        let x = b.rand("x", &shape, -2.0, 3.0);
        let w = b.rand("w", &[d], 0.5, 1.5);
        let bias = b.rand("b", &[d], -1.0, 1.0);
        let prim = b.layer_norm(x, w, bias, 1e-5);
        let fused = b.fused(FusedOp::LayerNorm { eps: 1e-5 }, &[x, w, bias]);
        b.g.add_output("prim", prim);
        b.g.add_output("fused", fused);
        check_forms(&b, &format!("layer_norm {shape:?}"), true);
    }
}

#[test]
fn softmax_is_the_frontend_softmax_with_nan_for_rows_of_minus_infinity() {
    let mut b = B::new(7);
    let mut values = b.rng.vec(4 * 7, -3.0, 3.0);
    values[7..14].fill(f64::NEG_INFINITY); // a fully masked row
    values[15] = f64::NEG_INFINITY; // a single masked entry
    let x = b.floats("x", &[4, 7], values);
    let prim = b.softmax(x, 1);
    let fused = b.fused(FusedOp::Softmax, &[x]);
    b.g.add_output("prim", prim);
    b.g.add_output("fused", fused);
    check_forms(&b, "softmax", true);
    let y = b
        .run(Precision::F64)
        .unwrap()
        .get("fused")
        .unwrap()
        .to_f64_vec();
    assert!(y[7..14].iter().all(|v| v.is_nan()), "{y:?}");
    assert!(y[..7].iter().chain(&y[14..]).all(|v| v.is_finite()));
    assert_eq!(y[15], 0.0);
}

#[test]
fn log_softmax_is_the_frontend_log_softmax_with_nan_for_rows_of_minus_infinity() {
    let mut b = B::new(10);
    let mut values = b.rng.vec(5 * 13, -3.0, 3.0);
    values[13..26].fill(f64::NEG_INFINITY); // a fully masked row
    values[30] = f64::NEG_INFINITY; // a single masked entry
    let x = b.floats("x", &[5, 13], values);
    let prim = b.log_softmax(x, 1);
    let fused = b.fused(FusedOp::LogSoftmax, &[x]);
    b.g.add_output("prim", prim);
    b.g.add_output("fused", fused);
    check_forms(&b, "log_softmax", true);
    let y = b
        .run(Precision::F64)
        .unwrap()
        .get("fused")
        .unwrap()
        .to_f64_vec();
    assert!(y[13..26].iter().all(|v| v.is_nan()), "{y:?}");
    assert_eq!(y[30], f64::NEG_INFINITY);
    assert!(y[..13]
        .iter()
        .chain(&y[26..30])
        .chain(&y[31..])
        .all(|v| v.is_finite() && *v <= 0.0));
}

/// Rows around +-1000 to +-3000, where `exp(x)` overflows even f64: the fused op must shift by
/// the row maximum as the primitive form does. The primitive form in f32 rounds the logsumexp
/// at the magnitude of the row maximum (an absolute error of about 1e-4 here), so the forms are
/// compared in f64; in f32 the fused op's result is its f64 result rounded once.
#[test]
fn log_softmax_is_stabilised_by_the_row_maximum() {
    let mut b = B::new(11);
    let (rows, n) = (6, 11);
    let mut values = Vec::new();
    for _ in 0..rows {
        let offset = b.rng.signed(1000.0, 3000.0);
        values.extend((0..n).map(|_| (offset + b.rng.uniform(-4.0, 4.0)) as f32 as f64));
    }
    assert!(
        values.iter().any(|v| v.exp().is_infinite()),
        "the case needs the shift"
    );
    let x = b.floats("x", &[3, 2, n], values);
    let prim = b.log_softmax(x, 2);
    let fused = b.fused(FusedOp::LogSoftmax, &[x]);
    b.g.add_output("prim", prim);
    b.g.add_output("fused", fused);
    verify(&b.g).unwrap();
    let outs = b.run(Precision::F64).unwrap();
    let (p, y) = (
        outs.get("prim").unwrap().to_f64_vec(),
        outs.get("fused").unwrap().to_f64_vec(),
    );
    assert!(close(&y, &p, F64_TOL), "fused = {y:?}\n  prim  = {p:?}");
    for row in y.chunks(n) {
        assert!(row.iter().all(|v| v.is_finite() && *v <= 0.0), "{row:?}");
        let total: f64 = row.iter().map(|v| v.exp()).sum();
        assert!(
            (total - 1.0).abs() < 1e-9,
            "the probabilities sum to {total}"
        );
    }
    let declared = b
        .run(Precision::Declared)
        .unwrap()
        .get("fused")
        .unwrap()
        .to_f64_vec();
    let rounded: Vec<f64> = y.iter().map(|&v| v as f32 as f64).collect();
    assert!(
        close(&declared, &rounded, 0.0),
        "the declared result is the f64 one rounded once"
    );
}

#[test]
fn swiglu_and_gelu_are_the_frontend_activations() {
    let mut b = B::new(8);
    let gate = b.rand("gate", &[3, 5], -4.0, 4.0);
    let up = b.rand("up", &[3, 5], -2.0, 2.0);
    let s = b.silu(gate);
    let prim = b.mul(s, up);
    let fused = b.fused(FusedOp::SwiGlu, &[gate, up]);
    b.g.add_output("prim", prim);
    b.g.add_output("fused", fused);
    check_forms(&b, "swiglu", true);

    let mut b = B::new(9);
    let x = b.rand("x", &[2, 3, 5], -4.0, 4.0);
    let prim = b.gelu(x);
    let fused = b.fused(FusedOp::Gelu, &[x]);
    b.g.add_output("prim", prim);
    b.g.add_output("fused", fused);
    check_forms(&b, "gelu", true);
}

#[test]
fn rope_is_apply_rope_with_broadcast_tables() {
    // x [batch, heads, seq, head_dim] with the tables of qwen3 ([batch, 1, seq, d]) and fully
    // broadcast ones ([1, 1, seq, d]).
    for (seed, x_shape, t_shape) in [
        (10, [2, 3, 5, 4], [2, 1, 5, 4]),
        (11, [1, 2, 3, 6], [1, 1, 3, 6]),
        (12, [3, 1, 2, 2], [1, 1, 2, 2]),
        (13, [2, 2, 3, 8], [2, 2, 3, 8]),
    ] {
        let mut b = B::new(seed);
        let x = b.rand("x", &x_shape, -2.0, 2.0);
        let cos = b.rand("cos", &t_shape, -1.0, 1.0);
        let sin = b.rand("sin", &t_shape, -1.0, 1.0);
        let prim = b.apply_rope(x, cos, sin);
        let fused = b.fused(FusedOp::Rope, &[x, cos, sin]);
        b.g.add_output("prim", prim);
        b.g.add_output("fused", fused);
        check_forms(&b, &format!("rope {x_shape:?} with {t_shape:?}"), true);
    }
}

/// Packed segment ids for `batch` rows of `seq` tokens: samples numbered from 1 of random
/// lengths, then padding (segment 0) in some rows.
fn packed_segments(rng: &mut Rng, batch: usize, seq: usize) -> Vec<i64> {
    let mut seg = Vec::with_capacity(batch * seq);
    for row in 0..batch {
        let pad = if row % 2 == 0 { rng.below(3) } else { 0 };
        let mut id = 1;
        let longest = (seq / 3).max(3);
        let mut left = 1 + rng.below(longest);
        for _ in 0..seq - pad {
            if left == 0 {
                id += 1;
                left = 1 + rng.below(longest);
            }
            seg.push(id);
            left -= 1;
        }
        seg.extend(std::iter::repeat_n(0, pad));
    }
    seg
}

/// Which mask an attention case uses.
#[derive(Clone, Copy, Debug)]
enum Masking {
    /// Qwen3: causal within packed samples (`packed_causal_mask`).
    PackedCausal,
    /// Causal over the whole row, no segment ids.
    Causal,
    /// Bidirectional within packed samples.
    Segments,
    /// InternViT: no mask at all.
    None,
}

/// Builds both attention forms on random q [bs, hq, s, d], k and v [bs, hkv, s, d].
fn attention_case(
    seed: u64,
    (bs, hq, hkv, s, d): (usize, usize, usize, usize, usize),
    masking: Masking,
) -> B {
    let mut b = B::new(seed);
    let q = b.rand("q", &[bs, hq, s, d], -1.5, 1.5);
    let k = b.rand("k", &[bs, hkv, s, d], -1.5, 1.5);
    let v = b.rand("v", &[bs, hkv, s, d], -1.0, 1.0);
    let seg_values = packed_segments(&mut b.rng, bs, s);
    let seg = b.ints("segment_ids", &[bs, s], seg_values);
    let scale = (d as f64).powf(-0.5);
    let (mask, causal, with_seg) = match masking {
        Masking::PackedCausal => (Some(b.packed_causal_mask(seg)), true, true),
        Masking::Causal => {
            let qi = b.iota(DType::I64, &[s, s], 0);
            let kj = b.iota(DType::I64, &[s, s], 1);
            let m = b.compare(CmpOp::Le, kj, qi);
            (Some(b.reshape(m, &[1, 1, s, s])), true, false)
        }
        Masking::Segments => {
            let sq = b.reshape(seg, &[bs, s, 1]);
            let sk = b.reshape(seg, &[bs, 1, s]);
            let m = b.compare(CmpOp::Eq, sq, sk);
            (Some(b.reshape(m, &[bs, 1, s, s])), false, true)
        }
        Masking::None => (None, false, false),
    };
    let prim = b.attention(q, k, v, mask);
    let mut operands = vec![q, k, v];
    if with_seg {
        operands.push(seg);
    }
    let fused = b.fused(FusedOp::Attention { scale, causal }, &operands);
    b.g.add_output("prim", prim);
    b.g.add_output("fused", fused);
    b
}

#[test]
fn attention_is_the_qwen3_and_internvit_attention() {
    let sizes = [
        (2, 4, 2, 7, 4), // GQA, hq / hkv = 2
        (1, 2, 2, 5, 3), // plain multi-head, odd head_dim
        (3, 6, 2, 4, 2), // hq / hkv = 3
        (1, 1, 1, 1, 1),
        (2, 2, 1, 9, 5),
        (1, 4, 2, 70, 3), // several blocks of query rows (the kernel takes 32 at a time)
        (2, 2, 1, 33, 4),
    ];
    for (i, &dims) in sizes.iter().enumerate() {
        for masking in [
            Masking::PackedCausal,
            Masking::Causal,
            Masking::Segments,
            Masking::None,
        ] {
            let b = attention_case(20 + i as u64, dims, masking);
            check_forms(&b, &format!("attention {dims:?} {masking:?}"), true);
        }
    }
}

#[test]
fn attention_rows_with_non_finite_scores_are_nan_like_the_primitive_form() {
    // q rows of -inf make every score of their row -inf (k is positive): the softmax of such a
    // row is NaN in the primitive form, and so is the fused op's output row; other rows are
    // unaffected.
    let (bs, h, s, d) = (1, 2, 4, 3);
    let mut b = B::new(30);
    let mut qv = b.rng.vec(bs * h * s * d, -1.0, 1.0);
    qv[d..2 * d].fill(f64::NEG_INFINITY); // head 0, row 1
    qv[(s + 2) * d] = f64::INFINITY; // head 1, row 2
    let q = b.floats("q", &[bs, h, s, d], qv);
    let k = b.rand("k", &[bs, h, s, d], 0.5, 1.0);
    let v = b.rand("v", &[bs, h, s, d], -1.0, 1.0);
    let seg = b.ints("segment_ids", &[bs, s], vec![1, 1, 1, 1]);
    let mask = b.packed_causal_mask(seg);
    let prim = b.attention(q, k, v, Some(mask));
    let scale = (d as f64).powf(-0.5);
    let fused = b.fused(
        FusedOp::Attention {
            scale,
            causal: true,
        },
        &[q, k, v, seg],
    );
    b.g.add_output("prim", prim);
    b.g.add_output("fused", fused);
    check_forms(&b, "attention with non-finite scores", true);
    let o = b
        .run(Precision::F64)
        .unwrap()
        .get("fused")
        .unwrap()
        .to_f64_vec();
    let nan_rows: Vec<usize> = (0..h * s)
        .filter(|r| o[r * d..(r + 1) * d].iter().all(|x| x.is_nan()))
        .collect();
    assert_eq!(nan_rows, [1, s + 2], "{o:?}");
}

#[test]
fn linear_cross_entropy_is_the_lm_head_and_shifted_cross_entropy() {
    let (bs, s, hidden, vocab) = (2, 5, 4, 11);
    let rows = bs * s;
    for chunk in [1, 3, rows, rows + 7] {
        let mut b = B::new(40 + chunk as u64);
        let hv = b.rng.vec(rows * hidden, -1.5, 1.5);
        let h = b.floats("hidden", &[bs, s, hidden], hv);
        let w = b.rand("lm_head", &[vocab, hidden], -1.0, 1.0);
        let labels: Vec<i64> = (0..rows)
            .map(|i| {
                if i % 4 == 1 {
                    -100
                } else {
                    b.rng.below(vocab) as i64
                }
            })
            .collect();
        let labels = b.ints("labels", &[bs, s], labels);
        let weights = b.rand("loss_weights", &[bs, s], 0.0, 0.2);

        let logits = b.linear_with(h, w);
        let logits = b.cast(logits, DType::F32);
        let prim = b.shifted_cross_entropy(logits, labels, weights);

        // The fused form: the shift stays primitive, the head and the loss are one op.
        let next = b.slice(labels, 1, 1, s);
        let pad = b.full(-100.0, DType::I64, &[bs, 1]);
        let target = b.concat(&[next, pad], 1);
        let target = b.reshape(target, &[rows]);
        let wnext = b.slice(weights, 1, 1, s);
        let wpad = b.full(0.0, DType::F32, &[bs, 1]);
        let wt = b.concat(&[wnext, wpad], 1);
        let wt = b.reshape(wt, &[rows]);
        let h2 = b.reshape(h, &[rows, hidden]);
        let fused = b.fused(FusedOp::LinearCrossEntropy { chunk }, &[h2, w, target, wt]);
        b.g.add_output("prim", prim);
        b.g.add_output("fused", fused);
        check_forms(&b, &format!("linear_cross_entropy chunk={chunk}"), true);
    }
}

/// The weights of `experts` SwiGLU experts in the torch layout: gate and up [inter, hidden],
/// down [hidden, inter].
fn expert_weights(b: &mut B, experts: usize, hidden: usize, inter: usize) -> Vec<[Value; 3]> {
    (0..experts)
        .map(|e| {
            [
                b.rand(&format!("experts.{e}.gate"), &[inter, hidden], -1.0, 1.0),
                b.rand(&format!("experts.{e}.up"), &[inter, hidden], -1.0, 1.0),
                b.rand(&format!("experts.{e}.down"), &[hidden, inter], -1.0, 1.0),
            ]
        })
        .collect()
}

/// The dense MoE of qwen3 `moe` from the routing (top, weights): the weights scattered into a
/// [tokens, experts] matrix, every expert's SwiGLU weighted by its column and summed.
fn dense_moe(b: &mut B, x: Value, top: Value, weights: Value, ws: &[[Value; 3]]) -> Value {
    let t = b.shape(x)[0];
    let e = ws.len();
    let zeros = b.full(0.0, b.dtype(x), &[t, e]);
    let dense = b.scatter_add(zeros, top, weights, 1);
    let mut out: Option<Value> = None;
    for (ei, [gate, up, down]) in ws.iter().enumerate() {
        let g = b.linear_with(x, *gate);
        let u = b.linear_with(x, *up);
        let a = b.silu(g);
        let hmid = b.mul(a, u);
        let y = b.linear_with(hmid, *down);
        let w = b.slice(dense, 1, ei, ei + 1);
        let y = b.mul(y, w);
        out = Some(match out {
            Some(acc) => b.add(acc, y),
            None => y,
        });
    }
    out.unwrap()
}

/// The routed MoE the fusion pass makes of it: permute the tokens into expert order, three
/// grouped matmuls with a fused SwiGLU between them, and the weighted unpermute.
fn routed_moe(
    b: &mut B,
    x: Value,
    top: Value,
    weights: Value,
    ws: &[[Value; 3]],
    experts: usize,
) -> Value {
    // Stack the torch-layout weights [out, in] into [E, in, out].
    let stack = |b: &mut B, i: usize| {
        let parts: Vec<Value> = ws
            .iter()
            .map(|w| {
                let s = b.shape(w[i]);
                b.reshape(w[i], &[1, s[0], s[1]])
            })
            .collect();
        let all = b.concat(&parts, 0);
        b.permute(all, &[0, 2, 1])
    };
    let (wg, wu, wd) = (stack(b, 0), stack(b, 1), stack(b, 2));
    let xs = b.fused(FusedOp::MoePermute { experts }, &[x, top]);
    let off = b.fused(FusedOp::ExpertOffsets { experts }, &[top]);
    let g = b.fused(FusedOp::GroupedMatMul, &[xs, wg, off]);
    let u = b.fused(FusedOp::GroupedMatMul, &[xs, wu, off]);
    let a = b.fused(FusedOp::SwiGlu, &[g, u]);
    let y = b.fused(FusedOp::GroupedMatMul, &[a, wd, off]);
    b.fused(FusedOp::MoeUnpermute, &[y, top, weights])
}

#[test]
fn routed_moe_is_the_dense_moe_with_the_frontend_router() {
    // The whole qwen3 router (softmax, top-k, renormalised weights) feeds both forms.
    for (seed, t, hidden, inter, e, k) in [(50, 5, 4, 3, 4, 2), (51, 7, 3, 5, 6, 3)] {
        let mut b = B::new(seed);
        let x = b.rand("x", &[t, hidden], -1.0, 1.0);
        let gate = b.rand("gate", &[e, hidden], -2.0, 2.0);
        let logits = b.linear_with(x, gate);
        let probs = b.softmax(logits, 1);
        let top = b.topk(probs, k);
        let weights = b.gather(probs, top, 1);
        let s = b.sum(weights, &[1], true);
        let weights = b.div(weights, s);
        let ws = expert_weights(&mut b, e, hidden, inter);
        let prim = dense_moe(&mut b, x, top, weights, &ws);
        let fused = routed_moe(&mut b, x, top, weights, &ws, e);
        b.g.add_output("prim", prim);
        b.g.add_output("fused", fused);
        check_forms(&b, &format!("moe t={t} e={e} k={k}"), false);
    }
}

#[test]
fn routed_moe_is_the_dense_moe_with_idle_experts() {
    // Given routings in which the first, a middle and the last expert get no rows.
    let (t, hidden, inter, e, k) = (4, 3, 2, 5, 2);
    let tops: [Vec<i64>; 3] = [
        vec![1, 3, 3, 1, 1, 3, 3, 1],
        vec![2, 1, 1, 2, 3, 1, 2, 3],
        vec![0, 1, 1, 0, 3, 0, 1, 3],
    ];
    for (i, top_values) in tops.into_iter().enumerate() {
        let mut b = B::new(60 + i as u64);
        let x = b.rand("x", &[t, hidden], -1.0, 1.0);
        let top = b.ints("top", &[t, k], top_values);
        let weights = b.rand("weights", &[t, k], 0.1, 1.0);
        let ws = expert_weights(&mut b, e, hidden, inter);
        let prim = dense_moe(&mut b, x, top, weights, &ws);
        let fused = routed_moe(&mut b, x, top, weights, &ws, e);
        b.g.add_output("prim", prim);
        b.g.add_output("fused", fused);
        check_forms(&b, &format!("moe with routing {i}"), false);
    }
}

#[test]
fn moe_permute_orders_pairs_by_expert_then_token_then_slot() {
    let mut b = B::new(70);
    let x = b.floats("x", &[3, 1], vec![10.0, 20.0, 30.0]);
    let top = b.ints("top", &[3, 2], vec![2, 0, 0, 2, 2, 3]);
    let xs = b.fused(FusedOp::MoePermute { experts: 4 }, &[x, top]);
    let off = b.fused(FusedOp::ExpertOffsets { experts: 4 }, &[top]);
    b.g.add_output("xs", xs);
    b.g.add_output("off", off);
    let outs = b.run(Precision::Declared).unwrap();
    // Pairs (token, slot) by expert: e0: (0,1), (1,0); e1: none; e2: (0,0), (1,1), (2,0);
    // e3: (2,1).
    assert_eq!(
        outs.get("xs").unwrap().to_f64_vec(),
        [10.0, 20.0, 10.0, 20.0, 30.0, 30.0]
    );
    assert_eq!(
        outs.get("off").unwrap().data(),
        &TensorData::I64(vec![0, 2, 2, 5, 6])
    );
}

// ---------------------------------------------------------------------------------------------
// Backward ops against central finite differences
// ---------------------------------------------------------------------------------------------

/// Relative tolerance of the gradient check (as in passes/tests/autodiff_fd.rs).
const REL_TOL: f64 = 1e-6;
/// Below this gradient norm the check is absolute, with bound `REL_TOL * ABS_BELOW`.
const ABS_BELOW: f64 = 1e-2;

/// A backward op checked against its forward op: the graph holds `y = fwd(operands)`,
/// `loss = sum(y * dy)` for a random `dy`, and `bwd(..)`, whose results must be the gradients
/// of the loss with respect to the operands `grads` names.
struct GradCase {
    what: String,
    b: B,
    /// For each result of the backward op, the forward operand it is the gradient of.
    grads: Vec<(Value, String)>,
}

/// Builds a [`GradCase`]: `operands` are inputs already in `b`; `bwd_operands` makes the
/// backward op's operands from (the forward operands, the forward result, dy).
fn grad_case(
    mut b: B,
    what: String,
    fwd: FusedOp,
    bwd: FusedOp,
    operands: &[Value],
    bwd_operands: impl FnOnce(&[Value], Value, Value) -> Vec<Value>,
    grads: &[usize],
) -> GradCase {
    let y = b.fused(fwd, operands);
    let ty = b.g.ty(y).clone();
    let dy_values: Vec<f64> = (0..ty.numel()).map(|_| b.rng.signed(0.5, 1.5)).collect();
    let dy = b.floats("dy", &ty.shape, dy_values);
    let prod = b.mul(y, dy);
    let loss = b.sum_all(prod);
    b.g.add_output("loss", loss);
    let ins = bwd_operands(operands, y, dy);
    let results = b.nodes(Op::Fused(bwd), &ins);
    assert_eq!(results.len(), grads.len(), "{what}: result count");
    for (i, r) in results.iter().enumerate() {
        b.g.add_output(format!("grad{i}"), *r);
    }
    let name_of = |v: Value, b: &B| match &b.g.node(b.g.value_data(v).unwrap().node).op {
        Op::Input { name, .. } => name.clone(),
        other => panic!("{what}: operand {other:?} is not an input"),
    };
    let grads = grads
        .iter()
        .map(|&i| (operands[i], name_of(operands[i], &b)))
        .collect();
    GradCase { what, b, grads }
}

/// Checks every result of the case's backward op against central differences of its loss.
fn check_grads(case: GradCase) {
    let GradCase { what, b, grads } = case;
    verify(&b.g).unwrap_or_else(|e| panic!("{what}: {e}"));
    let interp = Interpreter::new(&b.g, Precision::F64).unwrap();
    let mut binds = b.bindings(Precision::F64);
    let outs = interp.run(&binds).unwrap_or_else(|e| panic!("{what}: {e}"));
    for (i, (operand, name)) in grads.iter().enumerate() {
        let got = outs.get(&format!("grad{i}")).unwrap();
        assert_eq!(
            got.shape(),
            b.g.ty(*operand).shape.as_slice(),
            "{what}: the gradient of {name} has the wrong shape"
        );
        let ad = got.to_f64_vec();
        let base_t = binds[name].clone();
        let base = base_t.to_f64_vec();
        let mut fd = vec![0.0; base.len()];
        for k in 0..base.len() {
            let h = 1e-6 * base[k].abs().max(1.0);
            let (xp, xm) = (base[k] + h, base[k] - h);
            let at = |x: f64, binds: &mut BTreeMap<String, Tensor>| {
                let mut v = base.clone();
                v[k] = x;
                let t = Tensor::new(base_t.shape().to_vec(), TensorData::F64(v)).unwrap();
                binds.insert(name.clone(), t);
                let outs = interp.run(&*binds).unwrap();
                outs.get("loss").unwrap().to_f64_vec()[0]
            };
            fd[k] = (at(xp, &mut binds) - at(xm, &mut binds)) / (xp - xm);
        }
        binds.insert(name.clone(), base_t);
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
        assert!(
            ok,
            "{what}: the gradient of {name} disagrees with finite differences: \
             |ad - fd| = {diff:e}, |fd| = {norm:e}\n  ad = {ad:?}\n  fd = {fd:?}"
        );
    }
}

#[test]
fn rms_norm_grad_matches_finite_differences() {
    for (seed, shape) in [(100, vec![5]), (101, vec![3, 4]), (102, vec![2, 3, 3])] {
        let mut b = B::new(seed);
        let d = *shape.last().unwrap();
        let x = b.rand("x", &shape, -2.0, 2.0);
        let w = b.rand("w", &[d], 0.5, 1.5);
        let eps = 1e-5;
        check_grads(grad_case(
            b,
            format!("rms_norm_grad {shape:?}"),
            FusedOp::RmsNorm { eps },
            FusedOp::RmsNormGrad { eps },
            &[x, w],
            |o, _, dy| vec![o[0], o[1], dy],
            &[0, 1],
        ));
    }
}

#[test]
fn layer_norm_grad_matches_finite_differences() {
    for (seed, shape) in [(110, vec![4]), (111, vec![3, 5]), (112, vec![2, 2, 3])] {
        let mut b = B::new(seed);
        let d = *shape.last().unwrap();
        let x = b.rand("x", &shape, -2.0, 2.0);
        let w = b.rand("w", &[d], 0.5, 1.5);
        let bias = b.rand("b", &[d], -1.0, 1.0);
        let eps = 1e-5;
        check_grads(grad_case(
            b,
            format!("layer_norm_grad {shape:?}"),
            FusedOp::LayerNorm { eps },
            FusedOp::LayerNormGrad { eps },
            &[x, w, bias],
            |o, _, dy| vec![o[0], o[1], dy],
            &[0, 1, 2],
        ));
    }
}

#[test]
fn softmax_grad_matches_finite_differences() {
    for (seed, shape) in [(120, vec![6]), (121, vec![3, 5]), (122, vec![2, 2, 3])] {
        let mut b = B::new(seed);
        let x = b.rand("x", &shape, -3.0, 3.0);
        check_grads(grad_case(
            b,
            format!("softmax_grad {shape:?}"),
            FusedOp::Softmax,
            FusedOp::SoftmaxGrad,
            &[x],
            |_, y, dy| vec![y, dy],
            &[0],
        ));
    }
}

#[test]
fn log_softmax_grad_matches_finite_differences() {
    for (seed, shape) in [(125, vec![7]), (126, vec![3, 5]), (127, vec![2, 3, 11])] {
        let mut b = B::new(seed);
        let x = b.rand("x", &shape, -3.0, 3.0);
        check_grads(grad_case(
            b,
            format!("log_softmax_grad {shape:?}"),
            FusedOp::LogSoftmax,
            FusedOp::LogSoftmaxGrad,
            &[x],
            |_, y, dy| vec![y, dy],
            &[0],
        ));
    }
}

#[test]
fn swiglu_and_gelu_grads_match_finite_differences() {
    let mut b = B::new(130);
    let gate = b.rand("gate", &[3, 5], -4.0, 4.0);
    let up = b.rand("up", &[3, 5], -2.0, 2.0);
    check_grads(grad_case(
        b,
        "swiglu_grad".into(),
        FusedOp::SwiGlu,
        FusedOp::SwiGluGrad,
        &[gate, up],
        |o, _, dy| vec![o[0], o[1], dy],
        &[0, 1],
    ));
    let mut b = B::new(131);
    let x = b.rand("x", &[2, 7], -4.0, 4.0);
    check_grads(grad_case(
        b,
        "gelu_grad".into(),
        FusedOp::Gelu,
        FusedOp::GeluGrad,
        &[x],
        |o, _, dy| vec![o[0], dy],
        &[0],
    ));
}

#[test]
fn rope_grad_matches_finite_differences() {
    for (seed, x_shape, t_shape) in [
        (140, [2, 3, 4, 6], [2, 1, 4, 6]),
        (141, [1, 2, 3, 4], [1, 1, 3, 4]),
        (142, [2, 1, 2, 2], [2, 1, 2, 2]),
    ] {
        let mut b = B::new(seed);
        let x = b.rand("x", &x_shape, -2.0, 2.0);
        let cos = b.rand("cos", &t_shape, -1.0, 1.0);
        let sin = b.rand("sin", &t_shape, -1.0, 1.0);
        check_grads(grad_case(
            b,
            format!("rope_grad {x_shape:?} with {t_shape:?}"),
            FusedOp::Rope,
            FusedOp::RopeGrad,
            &[x, cos, sin],
            |o, _, dy| vec![dy, o[1], o[2]],
            &[0],
        ));
    }
}

#[test]
fn attention_grad_matches_finite_differences() {
    let cases = [
        ((2, 4, 2, 5, 3), Masking::PackedCausal),
        ((1, 2, 1, 4, 2), Masking::Causal),
        ((2, 2, 2, 4, 3), Masking::Segments),
        ((1, 3, 1, 3, 2), Masking::None),
        ((1, 2, 1, 37, 2), Masking::PackedCausal), // two blocks of query rows
        ((1, 2, 2, 34, 2), Masking::None),
    ];
    for (i, ((bs, hq, hkv, s, d), masking)) in cases.into_iter().enumerate() {
        let mut b = B::new(150 + i as u64);
        let q = b.rand("q", &[bs, hq, s, d], -1.5, 1.5);
        let k = b.rand("k", &[bs, hkv, s, d], -1.5, 1.5);
        let v = b.rand("v", &[bs, hkv, s, d], -1.0, 1.0);
        let seg_values = packed_segments(&mut b.rng, bs, s);
        let seg = b.ints("segment_ids", &[bs, s], seg_values);
        let (causal, with_seg) = match masking {
            Masking::PackedCausal => (true, true),
            Masking::Causal => (true, false),
            Masking::Segments => (false, true),
            Masking::None => (false, false),
        };
        let mut operands = vec![q, k, v];
        if with_seg {
            operands.push(seg);
        }
        let scale = (d as f64).powf(-0.5);
        check_grads(grad_case(
            b,
            format!("attention_grad {:?} {masking:?}", (bs, hq, hkv, s, d)),
            FusedOp::Attention { scale, causal },
            FusedOp::AttentionGrad { scale, causal },
            &operands,
            |o, _, dy| {
                let mut v = o.to_vec();
                v.push(dy);
                v
            },
            &[0, 1, 2],
        ));
    }
}

#[test]
fn linear_cross_entropy_grad_matches_finite_differences() {
    let (rows, hidden, vocab) = (7, 3, 5);
    for chunk in [1, 3, rows, rows + 2] {
        let mut b = B::new(160 + chunk as u64);
        let h = b.rand("h", &[rows, hidden], -1.5, 1.5);
        let w = b.rand("w", &[vocab, hidden], -1.0, 1.0);
        let target: Vec<i64> = (0..rows)
            .map(|i| {
                if i % 3 == 2 {
                    -100
                } else {
                    b.rng.below(vocab) as i64
                }
            })
            .collect();
        let target = b.ints("target", &[rows], target);
        let weight = b.rand("weight", &[rows], 0.1, 1.0);
        check_grads(grad_case(
            b,
            format!("linear_cross_entropy_grad chunk={chunk}"),
            FusedOp::LinearCrossEntropy { chunk },
            FusedOp::LinearCrossEntropyGrad { chunk },
            &[h, w, target, weight],
            |o, _, dy| vec![o[0], o[1], o[2], o[3], dy],
            &[0, 1],
        ));
    }
}

#[test]
fn grouped_matmul_grad_matches_finite_differences() {
    // Experts 0 and 3 have no rows.
    for (seed, offsets) in [(170, vec![0, 0, 2, 5, 5, 6]), (171, vec![0, 6, 6, 6, 6, 6])] {
        let mut b = B::new(seed);
        let xs = b.rand("xs", &[6, 3], -1.0, 1.0);
        let w = b.rand("w", &[5, 3, 2], -1.0, 1.0);
        let off = b.ints("offsets", &[6], offsets.clone());
        check_grads(grad_case(
            b,
            format!("grouped_matmul_grad {offsets:?}"),
            FusedOp::GroupedMatMul,
            FusedOp::GroupedMatMulGrad,
            &[xs, w, off],
            |o, _, dy| vec![o[0], o[1], o[2], dy],
            &[0, 1],
        ));
    }
}

#[test]
fn moe_permute_and_unpermute_grads_match_finite_differences() {
    let (t, k, h, e) = (4, 2, 3, 5);
    let top = vec![1, 3, 3, 1, 4, 0, 3, 4];
    let mut b = B::new(180);
    let x = b.rand("x", &[t, h], -1.0, 1.0);
    let top_v = b.ints("top", &[t, k], top.clone());
    check_grads(grad_case(
        b,
        "moe_permute_grad".into(),
        FusedOp::MoePermute { experts: e },
        FusedOp::MoePermuteGrad,
        &[x, top_v],
        |o, _, dy| vec![dy, o[1]],
        &[0],
    ));
    let mut b = B::new(181);
    let ys = b.rand("ys", &[t * k, h], -1.0, 1.0);
    let top_v = b.ints("top", &[t, k], top);
    let weights = b.rand("weights", &[t, k], 0.1, 1.0);
    check_grads(grad_case(
        b,
        "moe_unpermute_grad".into(),
        FusedOp::MoeUnpermute,
        FusedOp::MoeUnpermuteGrad,
        &[ys, top_v, weights],
        |o, _, dy| vec![o[0], o[1], o[2], dy],
        &[0, 2],
    ));
}

// ---------------------------------------------------------------------------------------------
// Wrong data: op errors, never panics
// ---------------------------------------------------------------------------------------------

/// Runs a graph whose only output is `op` on fresh inputs and returns the op error's message.
#[track_caller]
fn op_error(op: FusedOp, inputs: &[(&str, TensorType, Data)]) -> String {
    let mut b = B::new(0);
    let vals: Vec<Value> = inputs
        .iter()
        .map(|(n, ty, d)| b.input(n, ty.clone(), d.clone()))
        .collect();
    let results = b.nodes(Op::Fused(op), &vals);
    for (i, r) in results.into_iter().enumerate() {
        b.g.add_output(format!("r{i}"), r);
    }
    match b.run(Precision::Declared) {
        Err(InterpError::Op { message, .. }) => message,
        other => panic!("expected an op error, got {other:?}"),
    }
}

fn f32s(shape: &[usize]) -> TensorType {
    TensorType::new(DType::F32, shape.to_vec())
}

fn i64s(shape: &[usize]) -> TensorType {
    TensorType::new(DType::I64, shape.to_vec())
}

fn halves(shape: &[usize]) -> Data {
    Data::F(vec![0.5; numel(shape)])
}

#[test]
fn expert_indices_out_of_range_are_op_errors() {
    let x = ("x", f32s(&[2, 3]), halves(&[2, 3]));
    let top = |v: Vec<i64>| ("top", i64s(&[2, 2]), Data::I(v));
    for bad in [vec![0, 1, 4, 2], vec![0, -1, 1, 2]] {
        let m = op_error(
            FusedOp::MoePermute { experts: 4 },
            &[x.clone(), top(bad.clone())],
        );
        assert!(m.contains("out of range"), "{m}");
        let m = op_error(FusedOp::ExpertOffsets { experts: 4 }, &[top(bad)]);
        assert!(m.contains("out of range"), "{m}");
    }
    let ys = ("ys", f32s(&[4, 3]), halves(&[4, 3]));
    let wts = ("weights", f32s(&[2, 2]), halves(&[2, 2]));
    let m = op_error(
        FusedOp::MoeUnpermute,
        &[ys.clone(), top(vec![0, 1, -3, 2]), wts.clone()],
    );
    assert!(m.contains("-3"), "{m}");
    let m = op_error(
        FusedOp::MoePermuteGrad,
        &[ys.clone(), top(vec![-1, 1, 0, 2])],
    );
    assert!(m.contains("-1"), "{m}");
    let dout = ("dout", f32s(&[2, 3]), halves(&[2, 3]));
    let m = op_error(
        FusedOp::MoeUnpermuteGrad,
        &[ys, top(vec![0, 1, -2, 2]), wts, dout],
    );
    assert!(m.contains("-2"), "{m}");
}

#[test]
fn offsets_that_do_not_split_the_rows_are_op_errors() {
    let xs = ("xs", f32s(&[5, 2]), halves(&[5, 2]));
    let w = ("w", f32s(&[3, 2, 4]), halves(&[3, 2, 4]));
    let dy = ("dy", f32s(&[5, 4]), halves(&[5, 4]));
    for (bad, needle) in [
        (vec![0, 2, 3, 4], "row count"),
        (vec![0, 2, 3, 6], "row count"),
        (vec![1, 2, 3, 5], "start at 0"),
        (vec![0, 4, 3, 5], "decrease"),
    ] {
        let off = ("offsets", i64s(&[4]), Data::I(bad.clone()));
        let m = op_error(
            FusedOp::GroupedMatMul,
            &[xs.clone(), w.clone(), off.clone()],
        );
        assert!(m.contains(needle), "{bad:?}: {m}");
        let m = op_error(
            FusedOp::GroupedMatMulGrad,
            &[xs.clone(), w.clone(), off, dy.clone()],
        );
        assert!(m.contains(needle), "{bad:?}: {m}");
    }
}

#[test]
fn targets_beyond_the_vocabulary_are_op_errors() {
    let ins = [
        ("h", f32s(&[3, 2]), halves(&[3, 2])),
        ("w", f32s(&[4, 2]), halves(&[4, 2])),
        ("target", i64s(&[3]), Data::I(vec![0, 4, -100])),
        ("weight", f32s(&[3]), halves(&[3])),
    ];
    let m = op_error(FusedOp::LinearCrossEntropy { chunk: 2 }, &ins);
    assert!(m.contains("target 4"), "{m}");
    let mut with_grad = ins.to_vec();
    with_grad.push(("dloss", f32s(&[]), Data::F(vec![1.0])));
    let m = op_error(FusedOp::LinearCrossEntropyGrad { chunk: 2 }, &with_grad);
    assert!(m.contains("target 4"), "{m}");
}
