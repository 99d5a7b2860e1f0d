//! The backward of the fused ops: every forward fused op differentiates into its fused backward
//! op, once per forward node, and the result is the true gradient.
//!
//! Three checks, on small graphs shaped like the real model's (attention with grouped-query
//! heads, a causal mask and padded packed segments; the routed MoE chain with its router; the
//! fused LM-head loss with ignored targets and a chunk smaller than the rows):
//! - central finite differences of the loss on the f64 interpreter agree with every parameter
//!   gradient (as `autodiff_fd.rs` does for the primitive ops; every float operand of the fused
//!   op is a parameter here, so its gradient is checked too);
//! - the gradients of the fused graph equal, to 1e-9 in f64, those of the primitive graph it
//!   stands for (the forms `frontend/src/dsl.rs` and `frontend/src/models/qwen3_moe.rs` emit);
//! - structure: the backward holds the fused backward op and no primitive expansion, the fused
//!   loss's backward has no [rows, vocab] tensor, and backward ops are never differentiated.

use mmc_ir::{
    verify, BinaryOp, CmpOp, DType, FusedOp, Graph, Interpreter, Op, Precision, ReduceKind,
    ScopeId, Stage, Tensor, TensorData, TensorType, UnaryOp, Value,
};
use mmc_passes::{autodiff, grad_output, AutodiffError};
use std::collections::{BTreeMap, BTreeSet};

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

    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
    }

    fn vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn f64_tensor(shape: &[usize], values: &[f64]) -> Tensor {
    Tensor::new(shape.to_vec(), TensorData::F64(values.to_vec())).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Graph builder
// ---------------------------------------------------------------------------------------------

/// A forward graph under construction, with the f64 tensors bound to its parameters and inputs.
struct Net {
    g: Graph,
    bind: BTreeMap<String, Tensor>,
    params: Vec<String>,
}

/// A finished forward graph with the scalar output `loss`.
struct Case {
    g: Graph,
    bind: BTreeMap<String, Tensor>,
    params: Vec<String>,
}

impl Net {
    fn new(stage: Stage) -> Self {
        Net {
            g: Graph::new(stage),
            bind: BTreeMap::new(),
            params: Vec::new(),
        }
    }

    fn op(&mut self, op: Op, ins: &[Value]) -> Value {
        let desc = format!("{op:?}");
        let id = self
            .g
            .add_node(op, ins, ScopeId::default())
            .unwrap_or_else(|e| panic!("cannot add {desc}: {e}"));
        self.g.result(id)
    }

    fn shape(&self, x: Value) -> Vec<usize> {
        self.g.ty(x).shape.clone()
    }

    /// An f32 parameter bound to `values`.
    fn param(&mut self, name: &str, shape: &[usize], values: &[f64]) -> Value {
        let ty = TensorType::new(DType::F32, shape.to_vec());
        let v = self.op(
            Op::Param {
                name: name.into(),
                ty,
            },
            &[],
        );
        self.bind.insert(name.into(), f64_tensor(shape, values));
        self.params.push(name.into());
        v
    }

    /// An f32 per-step input bound to `values` (gets no gradient).
    fn input(&mut self, name: &str, shape: &[usize], values: &[f64]) -> Value {
        let ty = TensorType::new(DType::F32, shape.to_vec());
        let v = self.op(
            Op::Input {
                name: name.into(),
                ty,
            },
            &[],
        );
        self.bind.insert(name.into(), f64_tensor(shape, values));
        v
    }

    /// An i64 per-step input.
    fn index(&mut self, name: &str, shape: &[usize], idx: Vec<i64>) -> Value {
        let ty = TensorType::new(DType::I64, shape.to_vec());
        let v = self.op(
            Op::Input {
                name: name.into(),
                ty,
            },
            &[],
        );
        let t = Tensor::new(shape.to_vec(), TensorData::I64(idx)).unwrap();
        self.bind.insert(name.into(), t);
        v
    }

    fn fused(&mut self, f: FusedOp, ins: &[Value]) -> Value {
        self.op(Op::Fused(f), ins)
    }

    fn full(&mut self, value: f64, dtype: DType, shape: &[usize]) -> Value {
        let ty = TensorType::new(dtype, shape.to_vec());
        self.op(Op::Const { value, ty }, &[])
    }

    fn bin(&mut self, b: BinaryOp, x: Value, y: Value) -> Value {
        self.op(Op::Binary(b), &[x, y])
    }

    fn add(&mut self, x: Value, y: Value) -> Value {
        self.bin(BinaryOp::Add, x, y)
    }

    fn sub(&mut self, x: Value, y: Value) -> Value {
        self.bin(BinaryOp::Sub, x, y)
    }

    fn mul(&mut self, x: Value, y: Value) -> Value {
        self.bin(BinaryOp::Mul, x, y)
    }

    fn div(&mut self, x: Value, y: Value) -> Value {
        self.bin(BinaryOp::Div, x, y)
    }

    fn un(&mut self, u: UnaryOp, x: Value) -> Value {
        self.op(Op::Unary(u), &[x])
    }

    /// `x * c` for a scalar c.
    fn scale(&mut self, x: Value, c: f64) -> Value {
        let s = self.shape(x);
        let k = self.full(c, self.g.ty(x).dtype, &s);
        self.mul(x, k)
    }

    fn reshape(&mut self, x: Value, shape: &[usize]) -> Value {
        self.op(
            Op::Reshape {
                shape: shape.to_vec(),
            },
            &[x],
        )
    }

    /// Broadcasts x to `shape`, padding its rank with leading size-1 axes first.
    fn bcast(&mut self, x: Value, shape: &[usize]) -> Value {
        let mut s = self.shape(x);
        if s.len() < shape.len() {
            let mut padded = vec![1; shape.len() - s.len()];
            padded.extend(&s);
            s = padded;
            let x2 = self.reshape(x, &s);
            return self.bcast(x2, shape);
        }
        if s == shape {
            return x;
        }
        self.op(
            Op::Broadcast {
                shape: shape.to_vec(),
            },
            &[x],
        )
    }

    fn reduce(&mut self, kind: ReduceKind, x: Value, axis: usize) -> Value {
        self.op(
            Op::Reduce {
                kind,
                axes: vec![axis],
            },
            &[x],
        )
    }

    /// The sum of all elements as a 0-d tensor.
    fn sum_all(&mut self, x: Value) -> Value {
        let rank = self.shape(x).len();
        let s = self.op(
            Op::Reduce {
                kind: ReduceKind::Sum,
                axes: (0..rank).collect(),
            },
            &[x],
        );
        self.reshape(s, &[])
    }

    fn permute(&mut self, x: Value, perm: &[usize]) -> Value {
        self.op(
            Op::Permute {
                perm: perm.to_vec(),
            },
            &[x],
        )
    }

    /// `x[.., start..end, ..]` on `axis`.
    fn slice(&mut self, x: Value, axis: usize, start: usize, end: usize) -> Value {
        let shape = self.shape(x);
        let mut lo = vec![0; shape.len()];
        let mut hi = shape;
        lo[axis] = start;
        hi[axis] = end;
        self.op(Op::Slice { start: lo, end: hi }, &[x])
    }

    fn concat(&mut self, xs: &[Value], axis: usize) -> Value {
        self.op(Op::Concat { axis }, xs)
    }

    fn matmul(&mut self, x: Value, y: Value) -> Value {
        self.op(Op::MatMul, &[x, y])
    }

    /// Adds `loss = sum(out * R)` (or `out * R` for a scalar `out`) with R drawn by `rng`.
    fn finish(mut self, out: Value, rng: &mut Rng) -> Case {
        let shape = self.shape(out);
        let r_vals = rng.vec(numel(&shape), 0.5, 1.5);
        let r = self.input("r", &shape, &r_vals);
        let p = self.mul(out, r);
        let loss = if shape.is_empty() { p } else { self.sum_all(p) };
        self.g.add_output("loss", loss);
        Case {
            g: self.g,
            bind: self.bind,
            params: self.params,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The primitive forms the fused ops stand for (as the frontend emits them, in f32)
// ---------------------------------------------------------------------------------------------

/// `w * (x * rsqrt(mean(x^2) + eps))` over the last axis (`ModelBuilder::rms_norm`).
fn prim_rms_norm(n: &mut Net, x: Value, w: Value, eps: f64) -> Value {
    let s = n.shape(x);
    let last = s.len() - 1;
    let sq = n.mul(x, x);
    let ms = n.reduce(ReduceKind::Sum, sq, last);
    let ms = n.scale(ms, 1.0 / s[last] as f64);
    let e = n.full(eps, DType::F32, &n.shape(ms));
    let ms = n.add(ms, e);
    let r = n.un(UnaryOp::Rsqrt, ms);
    let r = n.bcast(r, &s);
    let y = n.mul(x, r);
    let w = n.bcast(w, &s);
    n.mul(w, y)
}

/// `(x - mu) * rsqrt(var + eps) * w + b` over the last axis (`ModelBuilder::layer_norm`).
fn prim_layer_norm(n: &mut Net, x: Value, w: Value, b: Value, eps: f64) -> Value {
    let s = n.shape(x);
    let last = s.len() - 1;
    let inv = 1.0 / s[last] as f64;
    let mu = n.reduce(ReduceKind::Sum, x, last);
    let mu = n.scale(mu, inv);
    let mu = n.bcast(mu, &s);
    let c = n.sub(x, mu);
    let sq = n.mul(c, c);
    let var = n.reduce(ReduceKind::Sum, sq, last);
    let var = n.scale(var, inv);
    let e = n.full(eps, DType::F32, &n.shape(var));
    let var = n.add(var, e);
    let r = n.un(UnaryOp::Rsqrt, var);
    let r = n.bcast(r, &s);
    let y = n.mul(c, r);
    let w = n.bcast(w, &s);
    let y = n.mul(y, w);
    let b = n.bcast(b, &s);
    n.add(y, b)
}

/// Softmax over the last axis, stabilised by the row maximum (`ModelBuilder::softmax`).
fn prim_softmax(n: &mut Net, x: Value) -> Value {
    let s = n.shape(x);
    let last = s.len() - 1;
    let m = n.reduce(ReduceKind::Max, x, last);
    let m = n.bcast(m, &s);
    let z = n.sub(x, m);
    let e = n.un(UnaryOp::Exp, z);
    let sum = n.reduce(ReduceKind::Sum, e, last);
    let sum = n.bcast(sum, &s);
    n.div(e, sum)
}

/// Log-softmax over the last axis, `x - logsumexp(x)` with the logsumexp stabilised by the row
/// maximum (`ModelBuilder::log_softmax`).
fn prim_log_softmax(n: &mut Net, x: Value) -> Value {
    let s = n.shape(x);
    let last = s.len() - 1;
    let m = n.reduce(ReduceKind::Max, x, last);
    let mb = n.bcast(m, &s);
    let z = n.sub(x, mb);
    let e = n.un(UnaryOp::Exp, z);
    let sum = n.reduce(ReduceKind::Sum, e, last);
    let l = n.un(UnaryOp::Log, sum);
    let lse = n.add(l, m);
    let lse = n.bcast(lse, &s);
    n.sub(x, lse)
}

/// `gate / (1 + exp(-gate)) * up` (`ModelBuilder::silu` and the MLP's product).
fn prim_swiglu(n: &mut Net, gate: Value, up: Value) -> Value {
    let ng = n.un(UnaryOp::Neg, gate);
    let e = n.un(UnaryOp::Exp, ng);
    let one = n.full(1.0, DType::F32, &n.shape(e));
    let d = n.add(e, one);
    let a = n.div(gate, d);
    n.mul(a, up)
}

/// `x/2 * (1 + erf(x / sqrt 2))` (`ModelBuilder::gelu`).
fn prim_gelu(n: &mut Net, x: Value) -> Value {
    let s = n.scale(x, std::f64::consts::FRAC_1_SQRT_2);
    let e = n.un(UnaryOp::Erf, s);
    let one = n.full(1.0, DType::F32, &n.shape(e));
    let one = n.add(e, one);
    let h = n.scale(x, 0.5);
    n.mul(h, one)
}

/// `x * cos + cat(-x2, x1) * sin` (`apply_rope` of qwen3_moe.rs).
fn prim_rope(n: &mut Net, x: Value, cos: Value, sin: Value) -> Value {
    let s = n.shape(x);
    let last = s.len() - 1;
    let d = s[last];
    let x1 = n.slice(x, last, 0, d / 2);
    let x2 = n.slice(x, last, d / 2, d);
    let nx2 = n.un(UnaryOp::Neg, x2);
    let rot = n.concat(&[nx2, x1], last);
    let cos = n.bcast(cos, &s);
    let sin = n.bcast(sin, &s);
    let a = n.mul(x, cos);
    let r = n.mul(rot, sin);
    n.add(a, r)
}

/// Grouped-query attention as `attention` of qwen3_moe.rs computes it: kv heads expanded by
/// broadcast, scores scaled, masked by select with -inf (causal and same-segment), softmax, and
/// the product with v.
fn prim_attention(
    n: &mut Net,
    q: Value,
    k: Value,
    v: Value,
    seg: Option<Value>,
    scale: f64,
    causal: bool,
) -> Value {
    let qs = n.shape(q);
    let (b, hq, s, d) = (qs[0], qs[1], qs[2], qs[3]);
    let hkv = n.shape(k)[1];
    let rep = hq / hkv;
    let expand = |n: &mut Net, t: Value| {
        let t = n.reshape(t, &[b, hkv, 1, s, d]);
        let t = n.bcast(t, &[b, hkv, rep, s, d]);
        n.reshape(t, &[b, hq, s, d])
    };
    let k = expand(n, k);
    let v = expand(n, v);
    let kt = n.permute(k, &[0, 1, 3, 2]);
    let scores = n.matmul(q, kt);
    let scores = n.scale(scores, scale);
    let full = [b, hq, s, s];
    let mut mask: Option<Value> = None;
    if causal {
        let qi = n.op(
            Op::Iota {
                axis: 0,
                ty: TensorType::new(DType::I64, vec![s, s]),
            },
            &[],
        );
        let kj = n.op(
            Op::Iota {
                axis: 1,
                ty: TensorType::new(DType::I64, vec![s, s]),
            },
            &[],
        );
        let c = n.op(Op::Compare(CmpOp::Le), &[kj, qi]);
        mask = Some(n.bcast(c, &full));
    }
    if let Some(seg) = seg {
        let sq = n.reshape(seg, &[b, s, 1]);
        let sq = n.bcast(sq, &[b, s, s]);
        let sk = n.reshape(seg, &[b, 1, s]);
        let sk = n.bcast(sk, &[b, s, s]);
        let same = n.op(Op::Compare(CmpOp::Eq), &[sq, sk]);
        let same = n.reshape(same, &[b, 1, s, s]);
        let same = n.bcast(same, &full);
        mask = Some(match mask {
            Some(m) => n.bin(BinaryOp::And, m, same),
            None => same,
        });
    }
    let scores = match mask {
        Some(m) => {
            let ninf = n.full(f64::NEG_INFINITY, DType::F32, &full);
            n.op(Op::Select, &[m, scores, ninf])
        }
        None => scores,
    };
    let probs = prim_softmax(n, scores);
    n.matmul(probs, v)
}

/// `sum_i weight_i * (logsumexp(h_i w^T) - (h_i w^T)[target_i])` over rows with a target
/// >= 0, as `shifted_cross_entropy` of qwen3_moe.rs computes it from materialised logits.
fn prim_linear_cross_entropy(n: &mut Net, h: Value, w: Value, target: Value, wt: Value) -> Value {
    let rows = n.shape(h)[0];
    let wt_t = n.permute(w, &[1, 0]);
    let logits = n.matmul(h, wt_t);
    let ls = n.shape(logits);
    let m = n.reduce(ReduceKind::Max, logits, 1);
    let mb = n.bcast(m, &ls);
    let z = n.sub(logits, mb);
    let e = n.un(UnaryOp::Exp, z);
    let sum = n.reduce(ReduceKind::Sum, e, 1);
    let l = n.un(UnaryOp::Log, sum);
    let lse = n.add(l, m);
    let zero_i = n.full(0.0, DType::I64, &[rows]);
    let valid = n.op(Op::Compare(CmpOp::Ge), &[target, zero_i]);
    let safe = n.op(Op::Select, &[valid, target, zero_i]);
    let idx = n.reshape(safe, &[rows, 1]);
    let picked = n.op(Op::Gather { axis: 1 }, &[logits, idx]);
    let ce = n.sub(lse, picked);
    let ce = n.reshape(ce, &[rows]);
    let zero_w = n.full(0.0, DType::F32, &[rows]);
    let wv = n.op(Op::Select, &[valid, wt, zero_w]);
    let wce = n.mul(ce, wv);
    n.sum_all(wce)
}

// ---------------------------------------------------------------------------------------------
// The cases: each builds its fused form or, with `fused = false`, the primitive form it stands
// for, from the same values
// ---------------------------------------------------------------------------------------------

fn stage(fused: bool) -> Stage {
    if fused {
        Stage::Fused
    } else {
        Stage::Frontend
    }
}

/// RMSNorm of x [2, 3, 4] (a q-norm over the head dim).
fn case_rms_norm(fused: bool, seed: u64) -> Case {
    let mut rng = Rng(seed);
    let mut n = Net::new(stage(fused));
    let xv = rng.vec(24, -2.0, 2.0);
    let wv = rng.vec(4, -1.5, 1.5);
    let x = n.param("x", &[2, 3, 4], &xv);
    let w = n.param("w", &[4], &wv);
    let eps = 1e-3;
    let y = if fused {
        n.fused(FusedOp::RmsNorm { eps }, &[x, w])
    } else {
        prim_rms_norm(&mut n, x, w, eps)
    };
    n.finish(y, &mut rng)
}

/// LayerNorm of x [3, 5] (a ViT layer's norm).
fn case_layer_norm(fused: bool, seed: u64) -> Case {
    let mut rng = Rng(seed);
    let mut n = Net::new(stage(fused));
    let xv = rng.vec(15, -2.0, 2.0);
    let wv = rng.vec(5, -1.5, 1.5);
    let bv = rng.vec(5, -0.5, 0.5);
    let x = n.param("x", &[3, 5], &xv);
    let w = n.param("w", &[5], &wv);
    let b = n.param("b", &[5], &bv);
    let eps = 1e-5;
    let y = if fused {
        n.fused(FusedOp::LayerNorm { eps }, &[x, w, b])
    } else {
        prim_layer_norm(&mut n, x, w, b, eps)
    };
    n.finish(y, &mut rng)
}

/// Softmax of x [2, 3, 5] over the last axis.
fn case_softmax(fused: bool, seed: u64) -> Case {
    let mut rng = Rng(seed);
    let mut n = Net::new(stage(fused));
    let xv = rng.vec(30, -3.0, 3.0);
    let x = n.param("x", &[2, 3, 5], &xv);
    let y = if fused {
        n.fused(FusedOp::Softmax, &[x])
    } else {
        prim_softmax(&mut n, x)
    };
    n.finish(y, &mut rng)
}

/// Log-softmax of x [2, 3, 7] over the last axis.
fn case_log_softmax(fused: bool, seed: u64) -> Case {
    let mut rng = Rng(seed);
    let mut n = Net::new(stage(fused));
    let xv = rng.vec(42, -3.0, 3.0);
    let x = n.param("x", &[2, 3, 7], &xv);
    let y = if fused {
        n.fused(FusedOp::LogSoftmax, &[x])
    } else {
        prim_log_softmax(&mut n, x)
    };
    n.finish(y, &mut rng)
}

/// SwiGLU of gate, up [4, 6].
fn case_swiglu(fused: bool, seed: u64) -> Case {
    let mut rng = Rng(seed);
    let mut n = Net::new(stage(fused));
    let gv = rng.vec(24, -3.0, 3.0);
    let uv = rng.vec(24, -2.0, 2.0);
    let gate = n.param("gate", &[4, 6], &gv);
    let up = n.param("up", &[4, 6], &uv);
    let y = if fused {
        n.fused(FusedOp::SwiGlu, &[gate, up])
    } else {
        prim_swiglu(&mut n, gate, up)
    };
    n.finish(y, &mut rng)
}

/// GELU of x [3, 7].
fn case_gelu(fused: bool, seed: u64) -> Case {
    let mut rng = Rng(seed);
    let mut n = Net::new(stage(fused));
    let xv = rng.vec(21, -3.0, 3.0);
    let x = n.param("x", &[3, 7], &xv);
    let y = if fused {
        n.fused(FusedOp::Gelu, &[x])
    } else {
        prim_gelu(&mut n, x)
    };
    n.finish(y, &mut rng)
}

/// RoPE of x [2, 3, 4, 6] with per-sample tables cos, sin [2, 1, 4, 6] (as the model reshapes
/// them for its heads); the tables are inputs.
fn case_rope(fused: bool, seed: u64) -> Case {
    let mut rng = Rng(seed);
    let mut n = Net::new(stage(fused));
    let xv = rng.vec(144, -2.0, 2.0);
    let angles = rng.vec(48, -3.0, 3.0);
    let cv: Vec<f64> = angles.iter().map(|a| a.cos()).collect();
    let sv: Vec<f64> = angles.iter().map(|a| a.sin()).collect();
    let x = n.param("x", &[2, 3, 4, 6], &xv);
    let cos = n.input("cos", &[2, 1, 4, 6], &cv);
    let sin = n.input("sin", &[2, 1, 4, 6], &sv);
    let y = if fused {
        n.fused(FusedOp::Rope, &[x, cos, sin])
    } else {
        prim_rope(&mut n, x, cos, sin)
    };
    n.finish(y, &mut rng)
}

/// The attention variants: which masks apply.
#[derive(Clone, Copy, Debug)]
struct Masks {
    causal: bool,
    segments: bool,
}

const MASKS: [Masks; 4] = [
    Masks {
        causal: true,
        segments: true,
    },
    Masks {
        causal: true,
        segments: false,
    },
    Masks {
        causal: false,
        segments: true,
    },
    Masks {
        causal: false,
        segments: false,
    },
];

/// Attention with q [2, 4, 6, 4] and k, v [2, 2, 6, 4] (two query heads per kv head), scale
/// 1/sqrt(head_dim), and (if `m.segments`) two packed samples, the second padded with segment 0.
fn case_attention(fused: bool, m: Masks, seed: u64) -> Case {
    let mut rng = Rng(seed);
    let mut n = Net::new(stage(fused));
    let (b, hq, hkv, s, d) = (2, 4, 2, 6, 4);
    let qv = rng.vec(b * hq * s * d, -1.5, 1.5);
    let kv = rng.vec(b * hkv * s * d, -1.5, 1.5);
    let vv = rng.vec(b * hkv * s * d, -1.5, 1.5);
    let q = n.param("q", &[b, hq, s, d], &qv);
    let k = n.param("k", &[b, hkv, s, d], &kv);
    let v = n.param("v", &[b, hkv, s, d], &vv);
    let seg = m.segments.then(|| {
        n.index(
            "segment_ids",
            &[b, s],
            vec![1, 1, 1, 2, 2, 0, 1, 1, 1, 1, 0, 0],
        )
    });
    let scale = 0.5;
    let o = if fused {
        let mut ins = vec![q, k, v];
        ins.extend(seg);
        let causal = m.causal;
        n.fused(FusedOp::Attention { scale, causal }, &ins)
    } else {
        prim_attention(&mut n, q, k, v, seg, scale, m.causal)
    };
    n.finish(o, &mut rng)
}

/// The fused LM-head loss on h [7, 3], a head w [5, 3], targets with two ignored rows (-100)
/// and weights with one zero, processed in chunks of 3 rows (so the last chunk is short).
fn case_linear_cross_entropy(fused: bool, seed: u64) -> Case {
    let mut rng = Rng(seed);
    let mut n = Net::new(stage(fused));
    let (rows, hidden, vocab) = (7, 3, 5);
    let hv = rng.vec(rows * hidden, -1.5, 1.5);
    let wv = rng.vec(vocab * hidden, -1.5, 1.5);
    let mut weights = rng.vec(rows, 0.5, 1.5);
    weights[2] = 0.0;
    let h = n.param("h", &[rows, hidden], &hv);
    let w = n.param("lm_head", &[vocab, hidden], &wv);
    let target = n.index("target", &[rows], vec![3, -100, 0, 4, 1, -100, 2]);
    let wt = n.input("weight", &[rows], &weights);
    let loss = if fused {
        n.fused(
            FusedOp::LinearCrossEntropy { chunk: 3 },
            &[h, w, target, wt],
        )
    } else {
        prim_linear_cross_entropy(&mut n, h, w, target, wt)
    };
    n.finish(loss, &mut rng)
}

/// The top-k experts of each token, a fixed table with experts appearing in several slots.
const TOP: [i64; 12] = [2, 0, 1, 2, 0, 3, 2, 1, 3, 0, 1, 3];

/// `moe_permute` of x [6, 4] by the fixed top-2 table `TOP` over 4 experts.
fn case_moe_permute(seed: u64) -> Case {
    let mut rng = Rng(seed);
    let mut n = Net::new(Stage::Fused);
    let xv = rng.vec(24, -2.0, 2.0);
    let x = n.param("x", &[6, 4], &xv);
    let top = n.index("top", &[6, 2], TOP.to_vec());
    let xs = n.fused(FusedOp::MoePermute { experts: 4 }, &[x, top]);
    n.finish(xs, &mut rng)
}

/// `grouped_matmul` of xs [7, 3] over 4 experts with offsets [0, 2, 2, 5, 7] (expert 1 has no
/// rows, so its weight gradient must be zero).
fn case_grouped_matmul(seed: u64) -> Case {
    let mut rng = Rng(seed);
    let mut n = Net::new(Stage::Fused);
    let xv = rng.vec(21, -2.0, 2.0);
    let wv = rng.vec(4 * 3 * 5, -1.5, 1.5);
    let xs = n.param("xs", &[7, 3], &xv);
    let w = n.param("w", &[4, 3, 5], &wv);
    let off = n.index("offsets", &[5], vec![0, 2, 2, 5, 7]);
    let y = n.fused(FusedOp::GroupedMatMul, &[xs, w, off]);
    n.finish(y, &mut rng)
}

/// `moe_unpermute` of ys [12, 4] with the table `TOP` and trainable weights [6, 2].
fn case_moe_unpermute(seed: u64) -> Case {
    let mut rng = Rng(seed);
    let mut n = Net::new(Stage::Fused);
    let yv = rng.vec(48, -2.0, 2.0);
    let wv = rng.vec(12, 0.1, 1.0);
    let ys = n.param("ys", &[12, 4], &yv);
    let top = n.index("top", &[6, 2], TOP.to_vec());
    let wts = n.param("weights", &[6, 2], &wv);
    let out = n.fused(FusedOp::MoeUnpermute, &[ys, top, wts]);
    n.finish(out, &mut rng)
}

/// Sizes of the MoE case: tokens, hidden, experts, experts per token, expert intermediate.
const MOE: (usize, usize, usize, usize, usize) = (6, 4, 4, 2, 3);

/// Router values whose top-k choice is stable under the finite-difference steps: on every
/// token the k-th and (k+1)-th router logits are at least 0.1 apart.
fn moe_values(seed: u64) -> (Rng, Vec<f64>, Vec<f64>) {
    let (t, h, e, k, _) = MOE;
    for attempt in 0u64.. {
        let mut rng = Rng(seed.wrapping_add(attempt.wrapping_mul(0x1234_5678_9ABC)));
        let xv = rng.vec(t * h, -1.5, 1.5);
        let gv = rng.vec(e * h, -1.5, 1.5);
        let stable = (0..t).all(|ti| {
            let mut logits: Vec<f64> = (0..e)
                .map(|ei| (0..h).map(|j| xv[ti * h + j] * gv[ei * h + j]).sum())
                .collect();
            logits.sort_by(|a, b| b.total_cmp(a));
            logits[k - 1] - logits[k] >= 0.1
        });
        if stable {
            return (rng, xv, gv);
        }
    }
    unreachable!("the attempts are unbounded")
}

/// The routed MoE block of a decoder layer on x [6, 4]: router softmax, top-2 of 4 experts
/// with renormalised weights, then either the fused chain moe_permute -> grouped_matmul
/// (stacked gate/up [E, H, 2I]) -> swiglu -> grouped_matmul (down [E, I, H]) -> moe_unpermute,
/// or the dense form of `moe` in qwen3_moe.rs (every expert on every token, weighted by the
/// scattered router weights), reading the per-expert matrices out of the same stacked weights.
fn case_moe(fused: bool, seed: u64) -> Case {
    let (t, h, e, k, i) = MOE;
    let (mut rng, xv, gv) = moe_values(seed);
    let guv = rng.vec(e * h * 2 * i, -1.0, 1.0);
    let dv = rng.vec(e * i * h, -1.0, 1.0);
    let mut n = Net::new(stage(fused));
    let x = n.param("x", &[t, h], &xv);
    let gate = n.param("mlp.gate.weight", &[e, h], &gv);
    let w_gu = n.param("mlp.experts.gate_up", &[e, h, 2 * i], &guv);
    let w_down = n.param("mlp.experts.down", &[e, i, h], &dv);
    let gt = n.permute(gate, &[1, 0]);
    let logits = n.matmul(x, gt);
    let probs = if fused {
        n.fused(FusedOp::Softmax, &[logits])
    } else {
        prim_softmax(&mut n, logits)
    };
    let top = n.op(Op::TopK { k }, &[probs]);
    let wts = n.op(Op::Gather { axis: 1 }, &[probs, top]);
    let s = n.reduce(ReduceKind::Sum, wts, 1);
    let s = n.bcast(s, &[t, k]);
    let wts = n.div(wts, s);
    let out = if fused {
        let xs = n.fused(FusedOp::MoePermute { experts: e }, &[x, top]);
        let off = n.fused(FusedOp::ExpertOffsets { experts: e }, &[top]);
        let gu = n.fused(FusedOp::GroupedMatMul, &[xs, w_gu, off]);
        let g = n.slice(gu, 1, 0, i);
        let u = n.slice(gu, 1, i, 2 * i);
        let a = n.fused(FusedOp::SwiGlu, &[g, u]);
        let ys = n.fused(FusedOp::GroupedMatMul, &[a, w_down, off]);
        n.fused(FusedOp::MoeUnpermute, &[ys, top, wts])
    } else {
        let zeros = n.full(0.0, DType::F32, &[t, e]);
        let dense = n.op(Op::ScatterAdd { axis: 1 }, &[zeros, top, wts]);
        let mut acc: Option<Value> = None;
        for ei in 0..e {
            let wgu = n.slice(w_gu, 0, ei, ei + 1);
            let wgu = n.reshape(wgu, &[h, 2 * i]);
            let wg = n.slice(wgu, 1, 0, i);
            let wu = n.slice(wgu, 1, i, 2 * i);
            let g = n.matmul(x, wg);
            let u = n.matmul(x, wu);
            let a = prim_swiglu(&mut n, g, u);
            let wd = n.slice(w_down, 0, ei, ei + 1);
            let wd = n.reshape(wd, &[i, h]);
            let y = n.matmul(a, wd);
            let we = n.slice(dense, 1, ei, ei + 1);
            let we = n.bcast(we, &[t, h]);
            let y = n.mul(y, we);
            acc = Some(match acc {
                Some(prev) => n.add(prev, y),
                None => y,
            });
        }
        acc.expect("there are experts")
    };
    n.finish(out, &mut rng)
}

/// Every fused case with its name, in its fused form.
fn fused_cases(seed: u64) -> Vec<(&'static str, Case)> {
    let mut cases = vec![
        ("rms_norm", case_rms_norm(true, seed)),
        ("layer_norm", case_layer_norm(true, seed)),
        ("softmax", case_softmax(true, seed)),
        ("log_softmax", case_log_softmax(true, seed)),
        ("swiglu", case_swiglu(true, seed)),
        ("gelu", case_gelu(true, seed)),
        ("rope", case_rope(true, seed)),
        (
            "linear_cross_entropy",
            case_linear_cross_entropy(true, seed),
        ),
        ("moe_permute", case_moe_permute(seed)),
        ("grouped_matmul", case_grouped_matmul(seed)),
        ("moe_unpermute", case_moe_unpermute(seed)),
        ("moe", case_moe(true, seed)),
    ];
    for m in MASKS {
        cases.push(("attention", case_attention(true, m, seed)));
    }
    cases
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

fn run(g: &Graph, bind: &BTreeMap<String, Tensor>) -> mmc_ir::Outputs {
    Interpreter::new(g, Precision::F64)
        .unwrap_or_else(|e| panic!("the graph does not load: {e}"))
        .run(bind)
        .unwrap_or_else(|e| panic!("the graph does not run: {e}"))
}

/// The graph with its backward, every parameter trainable, verified.
fn differentiate(g: &Graph) -> Graph {
    verify(g).unwrap_or_else(|e| panic!("forward graph: {e}"));
    let out = autodiff(g, "loss", |_| true).unwrap_or_else(|e| panic!("autodiff: {e}"));
    verify(&out).unwrap_or_else(|e| panic!("autodiff graph: {e}"));
    out
}

/// Relative tolerance of the finite-difference check, as in `autodiff_fd.rs`.
const FD_TOL: f64 = 1e-6;

/// Compares every parameter gradient of `case` with central differences of its loss.
fn fd_check(what: &str, case: &Case) {
    let grad = differentiate(&case.g);
    let outs = run(&grad, &case.bind);
    let forward = Interpreter::new(&case.g, Precision::F64).unwrap();
    let loss_at = |bind: &BTreeMap<String, Tensor>| {
        forward.run(bind).unwrap().get("loss").unwrap().to_f64_vec()[0]
    };
    let loss0 = loss_at(&case.bind);
    assert!(loss0.is_finite(), "{what}: loss {loss0}");
    assert_eq!(
        outs.get("loss").unwrap().to_f64_vec()[0],
        loss0,
        "{what}: the loss changes under autodiff"
    );
    let mut bind = case.bind.clone();
    for name in &case.params {
        let ad = outs.get(&grad_output(name)).unwrap().to_f64_vec();
        let base_t = case.bind[name].clone();
        let base = base_t.to_f64_vec();
        let shape = base_t.shape().to_vec();
        let mut fd = vec![0.0; base.len()];
        for (j, slot) in fd.iter_mut().enumerate() {
            let h = 1e-6 * base[j].abs().max(1.0);
            let mut v = base.clone();
            v[j] = base[j] + h;
            bind.insert(name.clone(), f64_tensor(&shape, &v));
            let lp = loss_at(&bind);
            v[j] = base[j] - h;
            bind.insert(name.clone(), f64_tensor(&shape, &v));
            let lm = loss_at(&bind);
            *slot = (lp - lm) / (2.0 * h);
        }
        bind.insert(name.clone(), base_t);
        let diff = ad
            .iter()
            .zip(&fd)
            .map(|(a, f)| (a - f) * (a - f))
            .sum::<f64>()
            .sqrt();
        let norm = fd.iter().map(|f| f * f).sum::<f64>().sqrt();
        assert!(
            diff <= FD_TOL * norm.max(1e-2),
            "{what}: grad:{name} disagrees with finite differences: |ad - fd| = {diff:e}, \
             |fd| = {norm:e}\n  ad = {ad:?}\n  fd = {fd:?}"
        );
    }
}

/// Tolerance of the fused-versus-primitive comparison (f64 throughout).
const SAME_TOL: f64 = 1e-9;

/// Asserts that the fused and the primitive graph have the same loss and gradients.
fn same_grads(what: &str, fused: &Case, prim: &Case) {
    assert_eq!(fused.params, prim.params, "{what}: the same parameters");
    assert!(
        fused.g.nodes().iter().any(|n| matches!(n.op, Op::Fused(_))),
        "{what}: the fused form has a fused op"
    );
    let fo = run(&differentiate(&fused.g), &fused.bind);
    let po = run(&differentiate(&prim.g), &prim.bind);
    let mut names = vec!["loss".to_string()];
    names.extend(fused.params.iter().map(|p| grad_output(p)));
    for name in &names {
        let a = fo.get(name).unwrap().to_f64_vec();
        let b = po.get(name).unwrap().to_f64_vec();
        let scale = b.iter().fold(1.0f64, |m, x| m.max(x.abs()));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f64, f64::max);
        assert!(
            worst <= SAME_TOL * scale && a.iter().all(|x| x.is_finite()),
            "{what}: {name} of the fused graph differs from the primitive graph's by {worst:e}\n  \
             fused = {a:?}\n  prim  = {b:?}"
        );
    }
}

const SEEDS: [u64; 3] = [1, 0xDEAD_BEEF, 0x5EED_0010];

// ---------------------------------------------------------------------------------------------
// Finite differences
// ---------------------------------------------------------------------------------------------

#[test]
fn fd_rms_norm() {
    for seed in SEEDS {
        fd_check("rms_norm", &case_rms_norm(true, seed));
    }
}

#[test]
fn fd_layer_norm() {
    for seed in SEEDS {
        fd_check("layer_norm", &case_layer_norm(true, seed));
    }
}

#[test]
fn fd_softmax() {
    for seed in SEEDS {
        fd_check("softmax", &case_softmax(true, seed));
    }
}

#[test]
fn fd_log_softmax() {
    for seed in SEEDS {
        fd_check("log_softmax", &case_log_softmax(true, seed));
    }
}

#[test]
fn fd_swiglu() {
    for seed in SEEDS {
        fd_check("swiglu", &case_swiglu(true, seed));
    }
}

#[test]
fn fd_gelu() {
    for seed in SEEDS {
        fd_check("gelu", &case_gelu(true, seed));
    }
}

#[test]
fn fd_rope() {
    for seed in SEEDS {
        fd_check("rope", &case_rope(true, seed));
    }
}

#[test]
fn fd_attention_gqa_causal_segments() {
    for seed in SEEDS {
        for m in MASKS {
            fd_check(&format!("attention {m:?}"), &case_attention(true, m, seed));
        }
    }
}

#[test]
fn fd_linear_cross_entropy_ignored_targets_short_chunk() {
    for seed in SEEDS {
        fd_check(
            "linear_cross_entropy",
            &case_linear_cross_entropy(true, seed),
        );
    }
}

#[test]
fn fd_moe_permute() {
    for seed in SEEDS {
        fd_check("moe_permute", &case_moe_permute(seed));
    }
}

#[test]
fn fd_grouped_matmul_with_an_empty_expert() {
    for seed in SEEDS {
        let case = case_grouped_matmul(seed);
        fd_check("grouped_matmul", &case);
        let outs = run(&differentiate(&case.g), &case.bind);
        let dw = outs.get("grad:w").unwrap().to_f64_vec();
        assert!(dw[15..30].iter().all(|&x| x == 0.0), "expert 1 has no rows");
    }
}

#[test]
fn fd_moe_unpermute() {
    for seed in SEEDS {
        fd_check("moe_unpermute", &case_moe_unpermute(seed));
    }
}

#[test]
fn fd_moe_chain_with_router() {
    for seed in SEEDS {
        fd_check("moe", &case_moe(true, seed));
    }
}

// ---------------------------------------------------------------------------------------------
// Fused gradients equal the primitive graph's
// ---------------------------------------------------------------------------------------------

#[test]
fn fused_gradients_equal_primitive_gradients() {
    for seed in SEEDS {
        let pairs = [
            (
                "rms_norm",
                case_rms_norm(true, seed),
                case_rms_norm(false, seed),
            ),
            (
                "layer_norm",
                case_layer_norm(true, seed),
                case_layer_norm(false, seed),
            ),
            (
                "softmax",
                case_softmax(true, seed),
                case_softmax(false, seed),
            ),
            (
                "log_softmax",
                case_log_softmax(true, seed),
                case_log_softmax(false, seed),
            ),
            ("swiglu", case_swiglu(true, seed), case_swiglu(false, seed)),
            ("gelu", case_gelu(true, seed), case_gelu(false, seed)),
            ("rope", case_rope(true, seed), case_rope(false, seed)),
            (
                "linear_cross_entropy",
                case_linear_cross_entropy(true, seed),
                case_linear_cross_entropy(false, seed),
            ),
            ("moe", case_moe(true, seed), case_moe(false, seed)),
        ];
        for (what, f, p) in &pairs {
            same_grads(what, f, p);
        }
        for m in MASKS {
            same_grads(
                &format!("attention {m:?}"),
                &case_attention(true, m, seed),
                &case_attention(false, m, seed),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Structure
// ---------------------------------------------------------------------------------------------

/// The fused backward op of a forward fused op (`None` for expert_offsets: no gradient).
fn backward_name(f: &FusedOp) -> Option<&'static str> {
    use FusedOp::*;
    let op = match f {
        RmsNorm { eps } => RmsNormGrad { eps: *eps },
        LayerNorm { eps } => LayerNormGrad { eps: *eps },
        Softmax => SoftmaxGrad,
        LogSoftmax => LogSoftmaxGrad,
        SwiGlu => SwiGluGrad,
        Gelu => GeluGrad,
        Rope => RopeGrad,
        Attention { scale, causal } => AttentionGrad {
            scale: *scale,
            causal: *causal,
        },
        LinearCrossEntropy { chunk } => LinearCrossEntropyGrad { chunk: *chunk },
        MoePermute { .. } => MoePermuteGrad,
        GroupedMatMul => GroupedMatMulGrad,
        MoeUnpermute => MoeUnpermuteGrad,
        ExpertOffsets { .. } => return None,
        other => panic!("{} is not a forward op", other.name()),
    };
    Some(op.name())
}

fn count_by_name(g: &Graph, from: usize) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for n in &g.nodes()[from..] {
        *counts.entry(n.op.name()).or_default() += 1;
    }
    counts
}

#[test]
fn each_fused_forward_node_gets_one_fused_backward_node() {
    for (what, case) in fused_cases(7) {
        let n_fwd = case.g.nodes().len();
        let out = differentiate(&case.g);
        let forward = count_by_name(&case.g, 0);
        let backward = count_by_name(&out, n_fwd);
        let mut want: BTreeMap<&'static str, usize> = BTreeMap::new();
        for n in case.g.nodes() {
            if let Op::Fused(f) = &n.op {
                if let Some(b) = backward_name(f) {
                    *want.entry(b).or_default() += 1;
                }
            }
        }
        let got: BTreeMap<&'static str, usize> = backward
            .iter()
            .filter(|(k, _)| k.starts_with("fused."))
            .map(|(k, v)| (*k, *v))
            .collect();
        assert_eq!(got, want, "{what}: fused backward nodes");
        // The backward of a single fused op is that op's backward node plus the loss's own
        // backward (`sum(out * R)`), never a primitive expansion of the fused op.
        if forward.keys().filter(|k| k.starts_with("fused.")).count() == 1 {
            let allowed: BTreeSet<&str> = ["const", "broadcast", "reshape", "mul"].into();
            for name in backward.keys().filter(|k| !k.starts_with("fused.")) {
                assert!(
                    allowed.contains(name),
                    "{what}: the backward holds a primitive `{name}`: {backward:?}"
                );
            }
        }
        // Backward nodes live in `grad` scopes.
        for n in &out.nodes()[n_fwd..] {
            assert!(out.scope_name(n.scope).starts_with("grad"), "{what}");
        }
    }
}

#[test]
fn the_fused_loss_backward_has_no_rows_by_vocab_tensor() {
    let (rows, hidden, vocab) = (16, 4, 32);
    let build = |fused: bool| {
        let mut rng = Rng(3);
        let mut n = Net::new(stage(fused));
        let hv = rng.vec(rows * hidden, -1.0, 1.0);
        let wv = rng.vec(vocab * hidden, -1.0, 1.0);
        let h = n.param("h", &[rows, hidden], &hv);
        let w = n.param("lm_head", &[vocab, hidden], &wv);
        let target: Vec<i64> = (0..rows as i64).map(|r| (r * 7) % vocab as i64).collect();
        let target = n.index("target", &[rows], target);
        let wt = n.input("weight", &[rows], &vec![1.0; rows]);
        let loss = if fused {
            n.fused(
                FusedOp::LinearCrossEntropy { chunk: 4 },
                &[h, w, target, wt],
            )
        } else {
            prim_linear_cross_entropy(&mut n, h, w, target, wt)
        };
        n.finish(loss, &mut rng)
    };
    let largest = |g: &Graph| {
        (0..g.num_values())
            .map(|v| g.ty(Value(v as u32)).numel())
            .max()
            .unwrap_or(0)
    };
    let fused = differentiate(&build(true).g);
    assert!(fused
        .nodes()
        .iter()
        .any(|n| n.op.name() == "fused.linear_cross_entropy_grad"));
    assert_eq!(
        largest(&fused),
        vocab * hidden,
        "the head weight and its gradient"
    );
    assert!(largest(&fused) < rows * vocab);
    // The primitive form does materialise the logits and their gradient: the check above is
    // not vacuous.
    let prim = differentiate(&build(false).g);
    assert_eq!(largest(&prim), rows * vocab);
}

/// `sum(rms_norm(x, w))` in the fused stage, with x and w trainable.
fn rms_norm_loss() -> Graph {
    case_rms_norm(true, 5).g
}

#[test]
fn backward_ops_are_never_differentiated_again() {
    // A second derivative: differentiate a function of a gradient of the autodiff graph.
    let mut g = differentiate(&rms_norm_loss());
    let gx = g.output(&grad_output("x")).unwrap();
    let sq = g
        .add_node(Op::Binary(BinaryOp::Mul), &[gx, gx], ScopeId::default())
        .unwrap();
    let sq = g.result(sq);
    let axes: Vec<usize> = (0..g.ty(sq).rank()).collect();
    let s = g
        .add_node(
            Op::Reduce {
                kind: ReduceKind::Sum,
                axes,
            },
            &[sq],
            ScopeId::default(),
        )
        .unwrap();
    let s = g.result(s);
    let s = g
        .add_node(Op::Reshape { shape: vec![] }, &[s], ScopeId::default())
        .unwrap();
    let s = g.result(s);
    g.add_output("grad_norm", s);
    let err = autodiff(&g, "grad_norm", |_| true).unwrap_err();
    assert_eq!(
        err,
        AutodiffError::BackwardOp {
            op: "fused.rms_norm_grad"
        }
    );
    assert!(err
        .to_string()
        .contains("does not differentiate backward ops"));
    // Differentiating the forward loss of that graph again is fine: the backward ops are not
    // on its path.
    autodiff(&g, "loss", |_| true).unwrap();
}

#[test]
fn float_operands_without_a_gradient_must_not_be_trainable() {
    // RoPE's tables as trainable parameters.
    let mut n = Net::new(Stage::Fused);
    let x = n.param("x", &[1, 1, 2, 4], &[0.5; 8]);
    let cos = n.param("cos", &[1, 1, 2, 4], &[0.5; 8]);
    let sin = n.input("sin", &[1, 1, 2, 4], &[0.5; 8]);
    let y = n.fused(FusedOp::Rope, &[x, cos, sin]);
    let case = n.finish(y, &mut Rng(1));
    let err = autodiff(&case.g, "loss", |_| true).unwrap_err();
    assert_eq!(
        err,
        AutodiffError::NoGradient {
            op: "fused.rope",
            operand: "cos"
        }
    );
    assert!(err.to_string().contains("cos"));
    // A frozen table is fine.
    autodiff(&case.g, "loss", |p| p != "cos").unwrap();

    // Loss weights computed from a trainable parameter.
    let mut n = Net::new(Stage::Fused);
    let h = n.param("h", &[2, 3], &[0.5; 6]);
    let w = n.param("lm_head", &[4, 3], &[0.25; 12]);
    let target = n.index("target", &[2], vec![1, 3]);
    let scale = n.param("scale", &[2], &[1.0, 2.0]);
    let wt = n.un(UnaryOp::Exp, scale);
    let loss = n.fused(
        FusedOp::LinearCrossEntropy { chunk: 1 },
        &[h, w, target, wt],
    );
    let case = n.finish(loss, &mut Rng(1));
    let err = autodiff(&case.g, "loss", |_| true).unwrap_err();
    assert_eq!(
        err,
        AutodiffError::NoGradient {
            op: "fused.linear_cross_entropy",
            operand: "weight"
        }
    );
    autodiff(&case.g, "loss", |p| p != "scale").unwrap();
}

#[test]
fn frozen_operands_still_share_one_backward_node() {
    // Only w of the RMSNorm is trainable: one rms_norm_grad, and x gets no gradient output.
    let g = rms_norm_loss();
    let out = autodiff(&g, "loss", |p| p == "w").unwrap();
    verify(&out).unwrap();
    let backward = count_by_name(&out, g.nodes().len());
    assert_eq!(backward.get("fused.rms_norm_grad"), Some(&1));
    let names: Vec<&str> = out.outputs().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["loss", "grad:w"]);
    // Nothing trainable: no backward at all.
    let out = autodiff(&g, "loss", |_| false).unwrap();
    assert_eq!(out.nodes().len(), g.nodes().len());
}
