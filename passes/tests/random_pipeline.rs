//! Every pass of the pipeline on seeded random small graphs (issue 10, item 5).
//!
//! Each case chains random pieces built with the frontend DSL, in the primitive forms the
//! fusion rules match (elementwise chains with broadcasts, RMSNorm, LayerNorm, softmax,
//! SwiGLU, GELU, RoPE, attention with packed segments and GQA, a dense MoE, the LM head with
//! the shifted cross-entropy) or as near misses of them that must stay unfused (a norm over a
//! non-last axis or with a wrong 1/n, softmax over a non-last axis, GELU with the wrong erf
//! scale, SwiGLU with `exp(+g)`, RoPE with swapped halves, a `kj < qi` mask, key segments from
//! another tensor, attention with the softmax over the queries, a dense MoE missing an expert,
//! weighting an expert by another's column or summing one twice, a flipped loss, the picked
//! logit from other logits). Sizes, pieces and the recompute mode are random. The passes run
//! in pipeline order (`fuse-moe`, `fuse`, `simplify`, `autodiff`, `simplify`, `recompute`,
//! `schedule`, then the `memory` pass's `plan_memory`), and after each:
//!
//! - the graph verifies;
//! - forward passes: every output matches the frontend graph within 1e-9 (f64 interpreter);
//! - backward passes: the loss and every gradient match autodiff of the unfused graph within
//!   1e-8 (a stacked expert gradient block by block);
//! - the memory-planned program run in an arena gives the plain run's bits, twice in a row;
//! - after fusion, the fused ops are exactly those of the positive pieces.
//!
//! The optimizer step (gradient accumulation, the apply program) is not run: recompute and
//! scheduling run on the autodiff graph itself, so its outputs (loss and gradients) can be
//! compared. A failure names its seed; `RANDOM_PIPELINE_SEED=n` reruns that case alone, and
//! `RANDOM_PIPELINE_CASES=n` runs n cases instead of the default.

mod fuse_common;

use fuse_common::{count_live, ints, max_rel_diff};
use mmc_frontend::dsl::BuildResult;
use mmc_frontend::models::qwen3_moe::packed_causal_mask;
use mmc_frontend::{ModelBuilder, Sym};
use mmc_ir::arena::WORD_BYTES;
use mmc_ir::interp::Arena;
use mmc_ir::plan::{Init, ParamStacking};
use mmc_ir::{text, verify, CmpOp, DType, Graph, Interpreter, Op, Precision, Tensor, UnaryOp};
use mmc_passes::memory::plan_memory;
use mmc_passes::pipeline::{
    Autodiff, Fuse, FuseElementwise, FuseMoe, Pass, Recompute, Schedule, Simplify,
};
use mmc_passes::recompute::RecomputeMode;
use mmc_passes::{activation_peak, recompute, RecomputeError, GRAD_PREFIX};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// How many random graphs the test builds.
const CASES: u64 = 500;
/// Forward passes keep every output within this relative error.
const FORWARD_TOL: f64 = 1e-9;
/// The backward passes keep the loss and gradients within this relative error.
const GRAD_TOL: f64 = 1e-8;
/// Errors are relative to the largest magnitude of the expected tensor, or to this fraction of
/// the largest magnitude of all expected outputs when that is more: a gradient that is nearly
/// zero (a key a saturated softmax hardly weighs, a bias a softmax over another axis cancels)
/// carries the rounding of the case's large terms. (Seed 398 has an expert whose gradient is
/// 5e-5 of the largest, through attention, SwiGLU, the MoE, log-softmax and GELU: it differs by
/// 1e-6 of itself, 5e-11 of the largest; without any one of those pieces, by under 1e-9.)
const NORM_FLOOR: f64 = 1e-2;

/// How a norm departs from the frontend's.
#[derive(Clone, Copy, Debug, PartialEq)]
enum NormMiss {
    None,
    /// Normalised over the sequence axis, not the last one.
    Axis,
    /// The mean (RMSNorm) or the variance (LayerNorm) is scaled by 1/(n - 1).
    Scale,
}

/// Which mask an attention piece applies.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mask {
    /// `packed_causal_mask(segment_ids)`: fuses.
    PackedCausal,
    /// The packed causal mask, but the softmax over the query axis.
    QueryAxisSoftmax,
    /// Key segments from another tensor than the query segments.
    MixedIds,
    /// `kj < qi`: a token does not see itself (its first row is all -inf, so NaN: the piece
    /// is a side output, not part of the loss).
    Strict,
}

/// One random piece: x [b, s, d] to a value of the same shape.
#[derive(Clone, Debug)]
enum Piece {
    /// Elementwise ops (the codes of [`chain`]); nothing fuses.
    Chain(Vec<u8>),
    Rms(NormMiss),
    Layer(NormMiss),
    /// Softmax over `axis` (fuses when it is the last).
    Softmax(usize),
    /// Log-softmax over `axis` (fuses when it is the last).
    LogSoftmax(usize),
    /// The SwiGLU MLP; `true`: the sigmoid uses `exp(+g)`.
    SwiGlu(bool),
    /// GELU; `true`: the erf argument is scaled by 0.5 instead of 1/sqrt 2.
    Gelu(bool),
    /// RoPE over `heads` heads; `full`: tables of the full shape; `swapped`: the halves of
    /// the rotation swapped.
    Rope {
        heads: usize,
        full: bool,
        swapped: bool,
    },
    Attention(AttnShape),
    Moe(MoeShape),
}

/// An attention piece.
#[derive(Clone, Copy, Debug)]
struct AttnShape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    mask: Mask,
    /// The decoder's q/k RMSNorm and RoPE before the scores.
    qk_norm_rope: bool,
}

/// A dense MoE piece.
#[derive(Clone, Copy, Debug)]
struct MoeShape {
    experts: usize,
    k: usize,
    norm_topk: bool,
    /// The experts' intermediate size.
    width: usize,
    miss: MoeMiss,
}

/// How a dense MoE departs from the frontend's.
#[derive(Clone, Copy, Debug, PartialEq)]
enum MoeMiss {
    None,
    /// The last expert is left out of the sum.
    MissingExpert,
    /// Expert 1 is weighted by the routing column of expert 0.
    WrongColumn,
    /// Expert 0 is summed twice (as expert 0 and in place of expert 1).
    DuplicateExpert,
}

/// How the scalar loss is formed from the last value.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Loss {
    /// `sum(y * r)` with a random input r.
    Dot,
    /// The LM head and `shifted_cross_entropy`: fuses.
    CrossEntropy,
    /// The same with `picked - lse`: stays.
    Flipped,
    /// The picked logit from other logits (an input) than the logsumexp's: stays.
    OtherLogits,
}

/// A random case: sizes, pieces, loss, recompute mode.
#[derive(Clone, Debug)]
struct Case {
    seed: u64,
    batch: usize,
    seq: usize,
    hidden: usize,
    vocab: usize,
    pieces: Vec<Piece>,
    loss: Loss,
    recompute: RecomputeMode,
}

fn pick<T: Copy>(rng: &mut ChaCha8Rng, xs: &[T]) -> T {
    xs[rng.random_range(0..xs.len())]
}

impl Case {
    fn random(seed: u64) -> Case {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let batch = rng.random_range(1..=2);
        let seq = rng.random_range(3..=8);
        let hidden = pick(&mut rng, &[4, 8, 16]);
        let n = rng.random_range(1..=6);
        let mut pieces = Vec::new();
        for _ in 0..n {
            let miss = rng.random_bool(0.35);
            let norm_miss = |rng: &mut ChaCha8Rng| {
                if miss {
                    pick(rng, &[NormMiss::Axis, NormMiss::Scale])
                } else {
                    NormMiss::None
                }
            };
            let p = match rng.random_range(0..10) {
                0 => Piece::Chain(
                    (0..rng.random_range(1..=5))
                        .map(|_| rng.random_range(0..7))
                        .collect(),
                ),
                1 => Piece::Rms(norm_miss(&mut rng)),
                2 => Piece::Layer(if miss {
                    NormMiss::Scale
                } else {
                    NormMiss::None
                }),
                3 => {
                    let axis = if miss {
                        if batch > 1 {
                            pick(&mut rng, &[0, 1])
                        } else {
                            1
                        }
                    } else {
                        2
                    };
                    if rng.random_bool(0.5) {
                        Piece::Softmax(axis)
                    } else {
                        Piece::LogSoftmax(axis)
                    }
                }
                4 => Piece::SwiGlu(miss),
                5 => Piece::Gelu(miss),
                6 => Piece::Rope {
                    heads: pick(&mut rng, &[1, 2]),
                    full: rng.random_bool(0.5),
                    swapped: miss,
                },
                7 | 8 => {
                    let heads = pick(&mut rng, &[1, 2, 4]);
                    // Query heads a multiple of the key/value heads (GQA).
                    let kv_heads = pick(&mut rng, &[1, 2, 4].map(|k: usize| k.min(heads)));
                    Piece::Attention(AttnShape {
                        heads,
                        kv_heads,
                        head_dim: pick(&mut rng, &[2, 4]),
                        mask: if miss {
                            pick(
                                &mut rng,
                                &[Mask::QueryAxisSoftmax, Mask::MixedIds, Mask::Strict],
                            )
                        } else {
                            Mask::PackedCausal
                        },
                        qk_norm_rope: rng.random_bool(0.5),
                    })
                }
                _ => {
                    let experts = rng.random_range(2..=4);
                    Piece::Moe(MoeShape {
                        experts,
                        k: rng.random_range(1..=experts),
                        norm_topk: rng.random_bool(0.5),
                        width: pick(&mut rng, &[2, 4]),
                        miss: if miss {
                            pick(
                                &mut rng,
                                &[
                                    MoeMiss::MissingExpert,
                                    MoeMiss::WrongColumn,
                                    MoeMiss::DuplicateExpert,
                                ],
                            )
                        } else {
                            MoeMiss::None
                        },
                    })
                }
            };
            pieces.push(p);
        }
        let loss = match rng.random_range(0..6) {
            0 | 1 => Loss::Dot,
            2 | 3 => Loss::CrossEntropy,
            4 => Loss::Flipped,
            _ => Loss::OtherLogits,
        };
        let recompute = pick(
            &mut rng,
            &[
                RecomputeMode::None,
                RecomputeMode::Selective,
                RecomputeMode::Full,
                // Resolved against the graph (see `check_case`).
                RecomputeMode::Budget { bytes: 0 },
            ],
        );
        Case {
            seed,
            batch,
            seq,
            hidden,
            vocab: pick(&mut rng, &[8, 12]),
            pieces,
            loss,
            recompute,
        }
    }
}

/// What a graph under construction shares between its pieces.
struct Ctx {
    batch: usize,
    seq: usize,
    hidden: usize,
    segment_ids: Option<Sym>,
    mask: Option<Sym>,
    inputs: usize,
    /// Fused ops the positive pieces should leave after `simplify`, by mnemonic.
    expected: BTreeMap<&'static str, usize>,
}

impl Ctx {
    fn expect(&mut self, op: &'static str, n: usize) {
        if n > 0 {
            *self.expected.entry(op).or_default() += n;
        }
    }

    fn input(&mut self, b: &mut ModelBuilder, prefix: &str, shape: &[usize]) -> BuildResult {
        self.inputs += 1;
        let name = format!("{prefix}{}", self.inputs);
        b.input(&name, DType::F32, shape)
    }

    fn segments(&mut self, b: &mut ModelBuilder) -> BuildResult {
        if let Some(s) = self.segment_ids {
            return Ok(s);
        }
        let s = b.input("segment_ids", DType::I64, &[self.batch, self.seq])?;
        self.segment_ids = Some(s);
        Ok(s)
    }

    /// The packed causal mask, built once before the layers as the decoder does.
    fn packed_mask(&mut self, b: &mut ModelBuilder) -> BuildResult {
        if let Some(m) = self.mask {
            return Ok(m);
        }
        let seg = self.segments(b)?;
        let m = packed_causal_mask(b, seg)?;
        self.mask = Some(m);
        Ok(m)
    }
}

/// A random elementwise chain: tanh, exp of tanh, mul by a broadcast weight, add of a
/// broadcast input, neg, `x * tanh x`, add of the chain's input.
fn chain(b: &mut ModelBuilder, c: &mut Ctx, x: Sym, ops: &[u8]) -> BuildResult {
    let (bs, s, d) = (c.batch, c.seq, c.hidden);
    let mut y = x;
    for (i, &op) in ops.iter().enumerate() {
        y = match op {
            0 => b.unary(UnaryOp::Tanh, y)?,
            1 => {
                let t = b.unary(UnaryOp::Tanh, y)?;
                b.exp(t)?
            }
            2 => {
                let w = b.param(&format!("w{i}"), &[d], Init::Const(1.0))?;
                b.mul(y, w)?
            }
            3 => {
                let r = c.input(b, "bias", &[1, s, 1])?;
                b.add(r, y)?
            }
            4 => b.neg(y)?,
            5 => {
                let t = b.unary(UnaryOp::Tanh, y)?;
                b.mul(y, t)?
            }
            _ => {
                let r = c.input(b, "row", &[bs, 1, d])?;
                let y = b.mul(y, r)?;
                b.add(y, x)?
            }
        };
    }
    Ok(y)
}

/// `w * (x * rsqrt(sum(x^2, axis) * scale + eps))`, or the DSL's RMSNorm.
fn rms(b: &mut ModelBuilder, c: &mut Ctx, x: Sym, miss: NormMiss) -> BuildResult {
    let (s, d) = (c.seq, c.hidden);
    if miss == NormMiss::None {
        c.expect("fused.rms_norm", 1);
        return b.rms_norm("norm", x, 1e-6);
    }
    let (axis, scale) = match miss {
        NormMiss::Axis => (1, 1.0 / s as f64),
        _ => (2, 1.0 / (d - 1) as f64),
    };
    let w = b.param("norm.weight", &[d], Init::Const(1.0))?;
    let sq = b.mul(x, x)?;
    let sum = b.sum(sq, &[axis], true)?;
    let ms = b.mul_scalar(sum, scale)?;
    let ms = b.add_scalar(ms, 1e-6)?;
    let r = b.rsqrt(ms)?;
    let y = b.mul(x, r)?;
    b.mul(w, y)
}

/// The DSL's LayerNorm, or one with the unbiased variance.
fn layer(b: &mut ModelBuilder, c: &mut Ctx, x: Sym, miss: NormMiss) -> BuildResult {
    let d = c.hidden;
    if miss == NormMiss::None {
        c.expect("fused.layer_norm", 1);
        return b.layer_norm("norm", x, 1e-5);
    }
    let w = b.param("norm.weight", &[d], Init::Const(1.0))?;
    let bias = b.param("norm.bias", &[d], Init::Const(0.0))?;
    let mu = b.mean(x, &[2], true)?;
    let cx = b.sub(x, mu)?;
    let sq = b.mul(cx, cx)?;
    let s = b.sum(sq, &[2], true)?;
    let var = b.mul_scalar(s, 1.0 / (d - 1) as f64)?;
    let var = b.add_scalar(var, 1e-5)?;
    let r = b.rsqrt(var)?;
    let y = b.mul(cx, r)?;
    let y = b.mul(y, w)?;
    b.add(y, bias)
}

/// `down(silu(gate(x)) * up(x))`; with `sign_error` the sigmoid is `1 / (1 + exp(g))`.
fn swiglu(b: &mut ModelBuilder, c: &mut Ctx, x: Sym, sign_error: bool) -> BuildResult {
    let d = c.hidden;
    if !sign_error {
        c.expect("fused.swiglu", 1);
    }
    let g = b.linear("gate_proj", x, 2 * d, false)?;
    let u = b.linear("up_proj", x, 2 * d, false)?;
    let a = if sign_error {
        let e = b.exp(g)?;
        let den = b.add_scalar(e, 1.0)?;
        b.div(g, den)?
    } else {
        b.silu(g)?
    };
    let h = b.mul(a, u)?;
    b.linear("down_proj", h, d, false)
}

/// The DSL's GELU, or `x/2 * (1 + erf(x / 2))`.
fn gelu(b: &mut ModelBuilder, c: &mut Ctx, x: Sym, wrong: bool) -> BuildResult {
    if !wrong {
        c.expect("fused.gelu", 1);
        return b.gelu(x);
    }
    let s = b.mul_scalar(x, 0.5)?;
    let e = b.erf(s)?;
    let one = b.add_scalar(e, 1.0)?;
    let h = b.mul_scalar(x, 0.5)?;
    b.mul(h, one)
}

/// x viewed as [b, heads, s, d / heads], rotated as `apply_rope` does (or with the halves
/// swapped), and viewed back.
fn rope(
    b: &mut ModelBuilder,
    c: &mut Ctx,
    x: Sym,
    heads: usize,
    full: bool,
    swapped: bool,
) -> BuildResult {
    let (bs, s, d) = (c.batch, c.seq, c.hidden);
    let hd = d / heads;
    let table: Vec<usize> = if full {
        vec![bs, heads, s, hd]
    } else {
        vec![bs, 1, s, hd]
    };
    let cos = c.input(b, "cos", &table)?;
    let sin = c.input(b, "sin", &table)?;
    if !swapped {
        c.expect("fused.rope", 1);
    }
    let t = b.reshape(x, &[bs, s, heads, hd])?;
    let t = b.transpose(t, 1, 2)?;
    let x1 = b.slice(t, 3, 0, hd / 2)?;
    let x2 = b.slice(t, 3, hd / 2, hd)?;
    let n = b.neg(x2)?;
    let rot = if swapped {
        b.concat(&[x1, n], 3)?
    } else {
        b.concat(&[n, x1], 3)?
    };
    let a = b.mul(t, cos)?;
    let r = b.mul(rot, sin)?;
    let y = b.add(a, r)?;
    let y = b.transpose(y, 1, 2)?;
    b.reshape(y, &[bs, s, d])
}

/// `x * cos + rotate_half(x) * sin` for x [b, h, s, d], as `qwen3_moe::apply_rope` declares it.
fn apply_rope(b: &mut ModelBuilder, x: Sym, cos: Sym, sin: Sym) -> BuildResult {
    let d = b.shape(x)[3];
    let x1 = b.slice(x, 3, 0, d / 2)?;
    let x2 = b.slice(x, 3, d / 2, d)?;
    let nx2 = b.neg(x2)?;
    let rot = b.concat(&[nx2, x1], 3)?;
    let a = b.mul(x, cos)?;
    let r = b.mul(rot, sin)?;
    b.add(a, r)
}

/// The Qwen3 decoder's attention (projections, q/k RMSNorm and RoPE when asked, GQA
/// expansion, scaled scores, the mask with a -inf fill, an f32 softmax, the output
/// projection) with the piece's mask.
fn attention(b: &mut ModelBuilder, c: &mut Ctx, x: Sym, a: AttnShape) -> BuildResult {
    let (bs, s, d) = (c.batch, c.seq, c.hidden);
    let (nh, nkv, hd, mask) = (a.heads, a.kv_heads, a.head_dim, a.mask);
    // The rotary tables [b, s, hd], as `rope_tables` gives them.
    let rope = if a.qk_norm_rope {
        c.expect("fused.rms_norm", 2);
        c.expect("fused.rope", 2);
        Some((
            c.input(b, "cos", &[bs, s, hd])?,
            c.input(b, "sin", &[bs, s, hd])?,
        ))
    } else {
        None
    };
    let m = match mask {
        Mask::PackedCausal | Mask::QueryAxisSoftmax => c.packed_mask(b)?,
        Mask::MixedIds | Mask::Strict => {
            let seg_q = c.segments(b)?;
            let seg_k = if mask == Mask::MixedIds {
                c.inputs += 1;
                let name = format!("other_ids{}", c.inputs);
                b.input(&name, DType::I64, &[bs, s])?
            } else {
                seg_q
            };
            let op = if mask == Mask::Strict {
                CmpOp::Lt
            } else {
                CmpOp::Le
            };
            let qi = b.iota(DType::I64, &[s, s], 0)?;
            let kj = b.iota(DType::I64, &[s, s], 1)?;
            let causal = b.compare(op, kj, qi)?;
            let q = b.reshape(seg_q, &[bs, s, 1])?;
            let k = b.reshape(seg_k, &[bs, 1, s])?;
            let same = b.compare(CmpOp::Eq, q, k)?;
            let m = b.and(same, causal)?;
            b.reshape(m, &[bs, 1, s, s])?
        }
    };
    match mask {
        Mask::PackedCausal => c.expect("fused.attention", 1),
        // The softmax over the last axis of masked scores is still a softmax.
        Mask::MixedIds | Mask::Strict => c.expect("fused.softmax", 1),
        Mask::QueryAxisSoftmax => {}
    }
    let axis = if mask == Mask::QueryAxisSoftmax { 2 } else { 3 };
    b.scope("self_attn", |b| {
        let q = b.linear("q_proj", x, nh * hd, false)?;
        let k = b.linear("k_proj", x, nkv * hd, false)?;
        let v = b.linear("v_proj", x, nkv * hd, false)?;
        let mut q = b.reshape(q, &[bs, s, nh, hd])?;
        let mut k = b.reshape(k, &[bs, s, nkv, hd])?;
        let v = b.reshape(v, &[bs, s, nkv, hd])?;
        if rope.is_some() {
            q = b.rms_norm("q_norm", q, 1e-6)?;
            k = b.rms_norm("k_norm", k, 1e-6)?;
        }
        let mut q = b.transpose(q, 1, 2)?;
        let mut k = b.transpose(k, 1, 2)?;
        let v = b.transpose(v, 1, 2)?;
        if let Some((cos, sin)) = rope {
            let cos = b.reshape(cos, &[bs, 1, s, hd])?;
            let sin = b.reshape(sin, &[bs, 1, s, hd])?;
            q = apply_rope(b, q, cos, sin)?;
            k = apply_rope(b, k, cos, sin)?;
        }
        let rep = nh / nkv;
        let expand = |b: &mut ModelBuilder, t: Sym| -> BuildResult {
            let t = b.reshape(t, &[bs, nkv, 1, s, hd])?;
            let t = b.broadcast_to(t, &[bs, nkv, rep, s, hd])?;
            b.reshape(t, &[bs, nh, s, hd])
        };
        let k = expand(b, k)?;
        let v = expand(b, v)?;
        let kt = b.transpose(k, 2, 3)?;
        let scores = b.matmul(q, kt)?;
        let scores = b.mul_scalar(scores, (hd as f64).powf(-0.5))?;
        let scores = b.cast(scores, DType::F32)?;
        let neg_inf = b.full(f64::NEG_INFINITY, DType::F32, &[1])?;
        let scores = b.select(m, scores, neg_inf)?;
        let probs = b.softmax(scores, axis)?;
        let probs = b.cast(probs, b.dtype(q))?;
        let o = b.matmul(probs, v)?;
        let o = b.transpose(o, 1, 2)?;
        let o = b.reshape(o, &[bs, s, nh * hd])?;
        b.linear("o_proj", o, d, false)
    })
}

/// The dense MoE block as `qwen3_moe::moe` declares it, on x viewed as [tokens, hidden].
fn moe(b: &mut ModelBuilder, c: &mut Ctx, x: Sym, m: MoeShape) -> BuildResult {
    let (bs, s, d) = (c.batch, c.seq, c.hidden);
    let (e, k, norm_topk, width, miss) = (m.experts, m.k, m.norm_topk, m.width, m.miss);
    let t = bs * s;
    // The router's softmax over the experts fuses either way; the routed block has one
    // SwiGLU over the grouped rows of all experts, the dense near miss one per summed expert.
    c.expect("fused.softmax", 1);
    if miss != MoeMiss::None {
        // A duplicated expert's SwiGLU is one value, read twice.
        let distinct = if miss == MoeMiss::WrongColumn {
            e
        } else {
            e - 1
        };
        c.expect("fused.swiglu", distinct);
    } else {
        c.expect("fused.moe_permute", 1);
        c.expect("fused.moe_unpermute", 1);
        c.expect("fused.swiglu", 1);
    }
    let xt = b.reshape(x, &[t, d])?;
    let out = b.scope("mlp", |b| {
        let logits = b.linear("gate", xt, e, false)?;
        let logits = b.cast(logits, DType::F32)?;
        let probs = b.softmax(logits, 1)?;
        let top = b.topk(probs, k)?;
        let mut weights = b.gather(probs, top, 1)?;
        if norm_topk {
            let sum = b.sum(weights, &[1], true)?;
            weights = b.div(weights, sum)?;
        }
        let weights = b.cast(weights, DType::F32)?;
        let zeros = b.full(0.0, DType::F32, &[t, e])?;
        let dense = b.scatter_add(zeros, top, weights, 1)?;
        let mut out: Option<Sym> = None;
        for ei in 0..e {
            if miss == MoeMiss::MissingExpert && ei == e - 1 {
                continue;
            }
            let which = if miss == MoeMiss::DuplicateExpert && ei == 1 {
                0
            } else {
                ei
            };
            let y = b.scope(format!("experts.{which}"), |b| {
                let g = b.linear("gate_proj", xt, width, false)?;
                let u = b.linear("up_proj", xt, width, false)?;
                let a = b.silu(g)?;
                let h = b.mul(a, u)?;
                b.linear("down_proj", h, d, false)
            })?;
            let col = if miss == MoeMiss::WrongColumn && ei == 1 {
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
        Ok(out.expect("at least one expert is summed"))
    })?;
    b.reshape(out, &[bs, s, d])
}

/// `shifted_cross_entropy` of the LM head on y, or one of its near misses.
fn cross_entropy(
    b: &mut ModelBuilder,
    c: &mut Ctx,
    y: Sym,
    vocab: usize,
    loss: Loss,
) -> BuildResult {
    let (bs, s) = (c.batch, c.seq);
    let flipped = loss == Loss::Flipped;
    if loss == Loss::CrossEntropy {
        c.expect("fused.linear_cross_entropy", 1);
    }
    let labels = b.input("labels", DType::I64, &[bs, s])?;
    let wts = b.input("loss_weights", DType::F32, &[bs, s])?;
    let logits = b.scope("lm_head", |b| {
        let w = b.param("weight", &[vocab, c.hidden], Init::Normal { std: 0.5 })?;
        b.linear_with(y, w)
    })?;
    let logits = b.cast(logits, DType::F32)?;
    let next = b.slice(labels, 1, 1, s)?;
    let pad = b.full(-100.0, DType::I64, &[bs, 1])?;
    let target = b.concat(&[next, pad], 1)?;
    let wnext = b.slice(wts, 1, 1, s)?;
    let wpad = b.full(0.0, DType::F32, &[bs, 1])?;
    let w = b.concat(&[wnext, wpad], 1)?;
    let valid = b.compare_scalar(CmpOp::Ge, target, 0.0)?;
    let zero_id = b.full(0.0, DType::I64, &[bs, s])?;
    let safe = b.select(valid, target, zero_id)?;
    let lse = b.logsumexp(logits, 2)?;
    let idx = b.reshape(safe, &[bs, s, 1])?;
    let source = if loss == Loss::OtherLogits {
        b.input("other_logits", DType::F32, &[bs, s, vocab])?
    } else {
        logits
    };
    let picked = b.gather(source, idx, 2)?;
    let ce = if flipped {
        b.sub(picked, lse)?
    } else {
        b.sub(lse, picked)?
    };
    let ce = b.reshape(ce, &[bs, s])?;
    let zero_w = b.full(0.0, DType::F32, &[bs, s])?;
    let w = b.select(valid, w, zero_w)?;
    let wce = b.mul(ce, w)?;
    b.sum_all(wce)
}

/// Whether a piece reads the packed causal mask built before the layers.
fn reads_packed_mask(p: &Piece) -> bool {
    matches!(
        p,
        Piece::Attention(AttnShape {
            mask: Mask::PackedCausal | Mask::QueryAxisSoftmax,
            ..
        })
    )
}

/// The case's forward graph (outputs `loss`, `y`, and `strict{i}` for each `kj < qi`
/// attention, whose NaN rows stay out of the loss) and the fused ops it should fuse to.
fn build(c: &Case) -> (Graph, BTreeMap<&'static str, usize>) {
    let mut b = ModelBuilder::new(DType::F32, DType::F32);
    let mut ctx = Ctx {
        batch: c.batch,
        seq: c.seq,
        hidden: c.hidden,
        segment_ids: None,
        mask: None,
        inputs: 0,
        expected: BTreeMap::new(),
    };
    let mut x = b
        .input("x", DType::F32, &[c.batch, c.seq, c.hidden])
        .expect("declares");
    // The packed causal mask is built once before the layers, as the decoder does.
    if c.pieces.iter().any(reads_packed_mask) {
        ctx.packed_mask(&mut b).expect("declares");
    }
    let mut side = Vec::new();
    for (i, p) in c.pieces.iter().enumerate() {
        // Each piece in its own layer scope, so full recompute has layers to recompute. The
        // attention layers that read the shared packed mask form a stack of their own: the
        // fusion pass shows a global value to a layer's patterns only when every layer of its
        // stack reads it, as every decoder layer of a model does (see
        // `attention_in_some_layers_of_a_stack_fuses`).
        let scope = if reads_packed_mask(p) {
            format!("decoder.layers.{i}")
        } else {
            format!("layers.{i}")
        };
        let ctx = &mut ctx;
        let y = b
            .scope(scope, |b| match p {
                Piece::Chain(ops) => chain(b, ctx, x, ops),
                Piece::Rms(m) => rms(b, ctx, x, *m),
                Piece::Layer(m) => layer(b, ctx, x, *m),
                Piece::Softmax(axis) => {
                    if *axis == 2 {
                        ctx.expect("fused.softmax", 1);
                    }
                    b.softmax(x, *axis)
                }
                Piece::LogSoftmax(axis) => {
                    if *axis == 2 {
                        ctx.expect("fused.log_softmax", 1);
                    }
                    b.log_softmax(x, *axis)
                }
                Piece::SwiGlu(miss) => swiglu(b, ctx, x, *miss),
                Piece::Gelu(miss) => gelu(b, ctx, x, *miss),
                Piece::Rope {
                    heads,
                    full,
                    swapped,
                } => rope(b, ctx, x, *heads, *full, *swapped),
                Piece::Attention(a) => attention(b, ctx, x, *a),
                Piece::Moe(m) => moe(b, ctx, x, *m),
            })
            .unwrap_or_else(|e| panic!("seed {}: piece {p:?} declares: {e}", c.seed));
        if matches!(
            p,
            Piece::Attention(AttnShape {
                mask: Mask::Strict,
                ..
            })
        ) {
            side.push((format!("strict{i}"), y));
        } else {
            x = y;
        }
    }
    let loss = match c.loss {
        Loss::Dot => {
            let r = b
                .input("r", DType::F32, &[c.batch, c.seq, c.hidden])
                .expect("declares");
            let p = b.mul(x, r).expect("declares");
            b.sum_all(p).expect("declares")
        }
        Loss::CrossEntropy | Loss::Flipped | Loss::OtherLogits => {
            cross_entropy(&mut b, &mut ctx, x, c.vocab, c.loss).expect("declares")
        }
    };
    b.output("loss", loss);
    b.output("y", x);
    for (name, v) in side {
        b.output(&name, v);
    }
    (b.finish(), ctx.expected)
}

/// Seeded bindings: floats uniform in [-1, 1] (cos/sin tables too), segment ids as up to
/// three packed samples then padding per row (`other_ids` the same values), labels in
/// 0..vocab with ignored (-100) positions, loss weights summing to 1 over the valid ones.
fn bindings(c: &Case, g: &Graph) -> HashMap<String, Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(c.seed ^ 0x5eed);
    let (bs, s) = (c.batch, c.seq);
    let mut seg = Vec::new();
    for _ in 0..bs {
        let samples = rng.random_range(1..=3usize);
        let mut cuts: Vec<usize> = (0..samples).map(|_| rng.random_range(1..=s)).collect();
        cuts.sort_unstable();
        for i in 0..s {
            let id = cuts.iter().filter(|&&cut| cut <= i).count() + 1;
            seg.push(if id > samples { 0 } else { id as i64 });
        }
    }
    let labels: Vec<i64> = (0..bs * s)
        .map(|_| {
            if rng.random_bool(0.2) {
                -100
            } else {
                rng.random_range(0..c.vocab as i64)
            }
        })
        .collect();
    let valid = labels.iter().filter(|&&l| l >= 0).count().max(1);
    let weights: Vec<f64> = labels
        .iter()
        .map(|&l| if l >= 0 { 1.0 / valid as f64 } else { 0.0 })
        .collect();
    let mut out = HashMap::new();
    for (name, ty, _) in g.params().chain(g.inputs()) {
        let t = if name == "segment_ids" || name.starts_with("other_ids") {
            ints(&[bs, s], &seg)
        } else if name == "labels" {
            ints(&[bs, s], &labels)
        } else if name == "loss_weights" {
            Tensor::from_f64(DType::F32, vec![bs, s], &weights).expect("sized")
        } else {
            let v: Vec<f64> = (0..ty.numel())
                .map(|_| rng.random_range(-1.0..=1.0))
                .collect();
            Tensor::from_f64(ty.dtype, ty.shape.clone(), &v).expect("sized")
        };
        out.insert(name.to_string(), t);
    }
    out
}

/// The bindings with every stacked expert tensor assembled from its parts.
fn stacked(b: &HashMap<String, Tensor>, stackings: &[ParamStacking]) -> HashMap<String, Tensor> {
    let mut out = b.clone();
    for s in stackings {
        let parts: Vec<&Tensor> = s.parts.iter().map(|p| &b[&p.name]).collect();
        out.insert(s.stacked.clone(), s.stack(&parts).expect("the parts fit"));
    }
    out
}

fn run(g: &Graph, b: &HashMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    Interpreter::new(g, Precision::F64)
        .unwrap_or_else(|e| panic!("{e}"))
        .run(b)
        .unwrap_or_else(|e| panic!("{e}"))
        .0
        .into_iter()
        .collect()
}

/// Checks that `got` has every output of `want` within `tol` (a gradient of a stacked tensor
/// block by block against the per-expert gradients).
fn assert_close(
    what: &str,
    want: &BTreeMap<String, Tensor>,
    got: &BTreeMap<String, Tensor>,
    stackings: &[ParamStacking],
    tol: f64,
) {
    let mut parts: HashMap<String, Tensor> = HashMap::new();
    for s in stackings {
        if let Some(t) = got.get(&format!("{GRAD_PREFIX}{}", s.stacked)) {
            // The f64 interpreter returns f64 tensors: read the blocks in that dtype.
            let mut s = s.clone();
            s.ty.dtype = t.dtype();
            for (i, p) in s.parts.iter().enumerate() {
                let part = s.read_part(t, i).expect("a block of the stack");
                parts.insert(format!("{GRAD_PREFIX}{}", p.name), part);
            }
        }
    }
    let largest = |t: &Tensor| {
        t.to_f64_vec()
            .iter()
            .filter(|x| x.is_finite())
            .fold(0.0f64, |m, x| m.max(x.abs()))
    };
    let floor = NORM_FLOOR * want.values().map(largest).fold(0.0, f64::max);
    for (name, w) in want {
        let g = got
            .get(name)
            .or_else(|| parts.get(name))
            .unwrap_or_else(|| panic!("{what}: no output `{name}`"));
        assert_eq!(g.shape(), w.shape(), "{what}: `{name}`");
        // Relative to the largest magnitude, floored (see `NORM_FLOOR`).
        let norm = largest(w);
        let diff = max_rel_diff(g, w) * norm.max(1e-30) / norm.max(floor).max(1e-30);
        assert!(
            diff <= tol,
            "{what}: `{name}` differs by {diff:e} (above {tol:e}) of its largest magnitude \
             {norm:e}"
        );
    }
}

/// The memory-planned run in an arena gives the plain run's bits, twice in a row.
fn assert_arena_bit_identical(what: &str, g: &Graph, b: &HashMap<String, Tensor>) {
    let plan = plan_memory(g, |_| WORD_BYTES);
    plan.verify(g)
        .unwrap_or_else(|e| panic!("{what}: layout: {e}"));
    let plain = Interpreter::new(g, Precision::F64)
        .expect("verifies")
        .run(b)
        .expect("runs");
    let interp = Interpreter::with_layout(g, Precision::F64, &plan.layout)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut arena = Arena::default();
    for round in 0..2 {
        let planned = interp
            .run_in(&mut arena, b)
            .unwrap_or_else(|e| panic!("{what}: arena run: {e}"));
        assert_eq!(plain.0.len(), planned.0.len(), "{what}: output count");
        for ((n, want), (m, got)) in plain.0.iter().zip(&planned.0) {
            assert_eq!(n, m, "{what}: output order");
            assert!(
                want.to_le_bytes() == got.to_le_bytes(),
                "{what}: `{n}` is not bit-identical in the arena (round {round})"
            );
        }
    }
}

/// How many live nodes of each fused op `g` has.
fn fused_counts(g: &Graph) -> BTreeMap<String, usize> {
    let mut names: Vec<&'static str> = g
        .nodes()
        .iter()
        .filter_map(|n| match &n.op {
            Op::Fused(f) => Some(f.name()),
            _ => None,
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .map(|n| (n.to_string(), count_live(g, n)))
        .filter(|(_, k)| *k > 0)
        .collect()
}

/// Runs one graph pass, checks that the result verifies, and returns it.
fn step(what: &str, pass: &dyn Pass, g: Graph) -> Graph {
    step_with_notes(what, pass, g).0
}

/// [`step`], with the pass's notes.
fn step_with_notes(what: &str, pass: &dyn Pass, g: Graph) -> (Graph, Vec<String>) {
    let mut notes = Vec::new();
    let out = pass
        .run(g, &mut notes)
        .unwrap_or_else(|e| panic!("{what}: pass `{}` failed: {e}", pass.name()));
    verify(&out).unwrap_or_else(|e| {
        panic!(
            "{what}: pass `{}` gave an invalid graph: {e}\n{}",
            pass.name(),
            text::print(&out)
        )
    });
    (out, notes)
}

/// The fused ops some positive piece produces: each must occur in some case.
const FUSED_KINDS: [&str; 10] = [
    "fused.rms_norm",
    "fused.layer_norm",
    "fused.softmax",
    "fused.log_softmax",
    "fused.swiglu",
    "fused.gelu",
    "fused.rope",
    "fused.attention",
    "fused.linear_cross_entropy",
    "fused.moe_permute",
];

/// Checks one random case; returns the fused ops it produced and whether recompute cloned
/// anything (for the test's summary).
fn check_case(seed: u64) -> (BTreeMap<String, usize>, bool) {
    let c = Case::random(seed);
    let what = format!("seed {seed} ({c:?})");
    let (g, expected) = build(&c);
    verify(&g).unwrap_or_else(|e| panic!("{what}: the frontend graph: {e}"));
    let b = bindings(&c, &g);
    let want = run(&g, &b);

    // Forward passes, each against the frontend graph.
    let record = Arc::new(Mutex::new(Vec::new()));
    let fuse_moe = FuseMoe {
        stackings: record.clone(),
    };
    let f = step(&what, &fuse_moe, g.clone());
    let stackings: Vec<ParamStacking> = record.lock().expect("not poisoned").clone();
    let bs = stacked(&b, &stackings);
    assert_close(
        &format!("{what}, after fuse-moe"),
        &want,
        &run(&f, &bs),
        &[],
        FORWARD_TOL,
    );
    let fuse = Fuse {
        limits: Default::default(),
    };
    let (f, notes) = step_with_notes(&what, &fuse, f);
    // A saturation stopped by a limit would hide missed fusions.
    assert!(
        notes.iter().any(|n| n.contains("all saturated")),
        "{what}: {notes:?}"
    );
    assert_close(
        &format!("{what}, after fuse"),
        &want,
        &run(&f, &bs),
        &[],
        FORWARD_TOL,
    );
    let f = step(&what, &Simplify, f);
    assert_close(
        &format!("{what}, after simplify"),
        &want,
        &run(&f, &bs),
        &[],
        FORWARD_TOL,
    );
    let counts = fused_counts(&f);
    let expected: BTreeMap<String, usize> = expected
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let moe_ops = ["fused.expert_offsets", "fused.grouped_matmul"];
    let got: BTreeMap<String, usize> = counts
        .iter()
        .filter(|(k, _)| !moe_ops.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    assert_eq!(
        got,
        expected,
        "{what}: the fused ops after simplify\n{}",
        text::print(&f)
    );
    // A routed block groups its GEMMs; a dense near miss leaves none.
    let routed = counts.get("fused.moe_permute").copied().unwrap_or(0);
    for op in moe_ops {
        let n = counts.get(op).copied().unwrap_or(0);
        assert_eq!(
            n > 0,
            routed > 0,
            "{what}: `{op}` {n} with {routed} routed blocks"
        );
    }

    // Backward passes, each against autodiff of the unfused graph.
    let trainable: mmc_passes::pipeline::Trainable = Arc::new(|_: &str| true);
    let ad = Autodiff {
        loss: "loss".into(),
        trainable: trainable.clone(),
    };
    let reference = step(&what, &ad, g.clone());
    let want_grads = run(&reference, &b);
    let mut a = step(&what, &ad, f);
    let check = |a: &Graph, name: &str| {
        let w = format!("{what}, after {name}");
        assert_close(&w, &want_grads, &run(a, &bs), &stackings, GRAD_TOL);
    };
    check(&a, "autodiff");
    a = step(&what, &Simplify, a);
    check(&a, "simplify");
    // A budget halfway between the peak and the smallest peak recomputation reaches.
    let mode = match c.recompute {
        RecomputeMode::Budget { .. } => {
            let before = activation_peak(&a).bytes;
            let smallest = match recompute(&a, RecomputeMode::Budget { bytes: 0 }) {
                Err(RecomputeError::BudgetTooSmall { smallest_bytes, .. }) => smallest_bytes,
                Ok(_) => 0,
                Err(e) => panic!("{what}: recompute: {e}"),
            };
            RecomputeMode::Budget {
                bytes: smallest + before.saturating_sub(smallest) / 2,
            }
        }
        m => m,
    };
    let before = a.nodes().len();
    a = step(&what, &Recompute { mode }, a);
    let recomputed = a.nodes().len() > before;
    check(&a, "recompute");
    if let RecomputeMode::Budget { bytes } = mode {
        let peak = activation_peak(&a).bytes;
        assert!(
            peak <= bytes,
            "{what}: peak {peak} above the budget {bytes}"
        );
    }
    a = step(&what, &FuseElementwise, a);
    check(&a, "fuse-elementwise");
    a = step(&what, &Schedule, a);
    check(&a, "schedule");
    assert_arena_bit_identical(&format!("{what}, memory"), &a, &bs);
    (counts, recomputed)
}

#[test]
fn every_pass_keeps_random_graphs_and_fuses_only_the_positive_pieces() {
    let t = std::time::Instant::now();
    let mut total: BTreeMap<String, usize> = BTreeMap::new();
    let mut recomputing = 0;
    // `RANDOM_PIPELINE_SEED=n` reruns one case (a failure names its seed);
    // `RANDOM_PIPELINE_CASES=n` runs more cases than the default.
    let env = |name: &str| {
        std::env::var(name).ok().map(|s| {
            s.parse::<u64>()
                .unwrap_or_else(|_| panic!("{name} is a number"))
        })
    };
    let cases = env("RANDOM_PIPELINE_CASES").unwrap_or(CASES);
    let seeds = match env("RANDOM_PIPELINE_SEED") {
        Some(n) => n..n + 1,
        None => 0..cases,
    };
    let all = seeds.start == 0 && seeds.end >= CASES;
    for seed in seeds.clone() {
        let (counts, recomputed) = check_case(seed);
        for (op, n) in counts {
            *total.entry(op).or_default() += n;
        }
        recomputing += usize::from(recomputed);
    }
    eprintln!(
        "{} random graphs in {:.1?}, {recomputing} with recomputed nodes; fused ops: {total:?}",
        seeds.end - seeds.start,
        t.elapsed()
    );
    // Every kind of positive piece was drawn and fused somewhere.
    assert!(!all || recomputing > 0, "recompute never cloned a node");
    for op in if all { &FUSED_KINDS[..] } else { &[] } {
        assert!(total.contains_key(*op), "no case fused `{op}`: {total:?}");
    }
}

/// A one-case graph of `pieces` on x [2, 3, 8] with the dot loss.
fn small_case(pieces: Vec<Piece>) -> Case {
    Case {
        seed: 1,
        batch: 2,
        seq: 3,
        hidden: 8,
        vocab: 12,
        pieces,
        loss: Loss::Dot,
        recompute: RecomputeMode::None,
    }
}

fn packed_attention(heads: usize, kv_heads: usize) -> Piece {
    Piece::Attention(AttnShape {
        heads,
        kv_heads,
        head_dim: 4,
        mask: Mask::PackedCausal,
        qk_norm_rope: false,
    })
}

/// An early run of the random test drew this (one query head, one kv head, the packed causal
/// mask, batch 2). With one query head the DSL emits no broadcast of the [b, 1, s, s] mask
/// over the heads (the shapes already agree); the `-one-head` rules of
/// `fuse/rules/attention.rs` take that form, where the others require
/// `(broadcast (reshape (and ..) ?m4) ?mh)` (the attention stayed primitive before them).
#[test]
fn single_head_attention_fuses() {
    let (g, _) = build(&small_case(vec![packed_attention(1, 1)]));
    let (f, _) = mmc_passes::fuse::fuse(&g, &Default::default()).expect("the pass runs");
    assert_eq!(
        fused_counts(&f).get("fused.attention"),
        Some(&1),
        "{}",
        text::print(&f)
    );
}

/// The packed mask is built before the layers and read by only some layers of the stack
/// `layers` (a GELU layer between two attention layers). `fuse/region.rs` once made a global
/// value's producers context only when every layer of the stack read it, so neither
/// attention saw its mask and neither fused; it now groups the layers by their skeleton, and
/// the two attention layers (one template) see the mask they both read.
#[test]
fn attention_in_some_layers_of_a_stack_fuses() {
    let mut b = ModelBuilder::new(DType::F32, DType::F32);
    let mut ctx = Ctx {
        batch: 2,
        seq: 3,
        hidden: 8,
        segment_ids: None,
        mask: None,
        inputs: 0,
        expected: BTreeMap::new(),
    };
    let mut x = b.input("x", DType::F32, &[2, 3, 8]).expect("declares");
    ctx.packed_mask(&mut b).expect("declares");
    for i in 0..3 {
        let ctx = &mut ctx;
        x = b
            .scope(format!("layers.{i}"), |b| {
                if i == 1 {
                    gelu(b, ctx, x, false)
                } else {
                    let Piece::Attention(a) = packed_attention(2, 1) else {
                        unreachable!("an attention piece")
                    };
                    attention(b, ctx, x, a)
                }
            })
            .expect("declares");
    }
    b.output("y", x);
    let g = b.finish();
    let (f, _) = mmc_passes::fuse::fuse(&g, &Default::default()).expect("the pass runs");
    assert_eq!(
        fused_counts(&f).get("fused.attention"),
        Some(&2),
        "{}",
        text::print(&f)
    );
}
