//! Attention: `softmax(q k^T * scale [masked]) v` becomes one `fused.attention`.
//!
//! Two forms come from the frontend:
//!
//! - the Qwen3 decoder (`frontend/src/models/qwen3_moe.rs`, `attention`): k and v expanded
//!   from the kv heads to the query heads (GQA), scores cast to f32 (a no-op the DSL drops in
//!   f32 models), `select(mask, scores, -inf)` with `mask = packed_causal_mask(segment_ids)`,
//!   softmax over the keys, cast back. It becomes
//!   `fused.attention q, k, v, segment_ids scale=.. causal=true` on the *unexpanded* k and v.
//!   With one query head the [b, 1, s, s] mask already has the scores' shape and is not
//!   broadcast over the heads: the `-one-head` rules take that form;
//! - InternViT (`frontend/src/models/internvit.rs`, `attention`): no mask. It becomes
//!   `fused.attention q, k, v scale=.. causal=false`.
//!
//! The mask is built once before the decoder layers, so the rule needs the mask's producers in
//! the e-graph of a layer: the engine brings a global value's producers into a layer's template
//! as context where that keeps identical layers one template (`region.rs`): in every layer that
//! reads the mask, also when other layers of the stack do not.
//!
//! What does not fuse: a mask other than `kj <= qi` and equal segments of one tensor, a
//! softmax over another axis, a scale that is not a constant, and a GQA expansion that is
//! not "query head h reads kv head h / rep" (that k stays expanded, as plain multi-head
//! attention).

use super::{attr_of, pat, tensor_of, var, Cond, FuseRewrite};
use crate::fuse::guard::union_if_typed;
use crate::fuse::lang::{AttrValue, Float, Fuse, FuseGraph, TensorAnalysis};
use egg::{rewrite, Applier, Id, Pattern, PatternAst, Subst, Symbol};
use mmc_ir::{DType, TensorType};

/// The rules of this module, one per form (see [`pattern`] for the pieces).
#[rustfmt::skip]
pub fn rules() -> Vec<FuseRewrite> {
    vec![
        rewrite!("attention-packed-causal"; {pattern(packed(false, true), false)} => {FuseAttention { causal: true }} if is_attention() if is_packed_causal_mask(false)),
        rewrite!("attention-packed-causal-batched"; {pattern(packed(true, true), false)} => {FuseAttention { causal: true }} if is_attention() if is_packed_causal_mask(true)),
        rewrite!("attention-packed-causal-f32-softmax"; {pattern(packed(false, true), true)} => {FuseAttention { causal: true }} if is_attention() if is_packed_causal_mask(false)),
        rewrite!("attention-packed-causal-batched-f32-softmax"; {pattern(packed(true, true), true)} => {FuseAttention { causal: true }} if is_attention() if is_packed_causal_mask(true)),
        rewrite!("attention-packed-causal-one-head"; {pattern(packed(false, false), false)} => {FuseAttention { causal: true }} if is_attention() if is_packed_causal_mask(false)),
        rewrite!("attention-packed-causal-batched-one-head"; {pattern(packed(true, false), false)} => {FuseAttention { causal: true }} if is_attention() if is_packed_causal_mask(true)),
        rewrite!("attention-packed-causal-one-head-f32-softmax"; {pattern(packed(false, false), true)} => {FuseAttention { causal: true }} if is_attention() if is_packed_causal_mask(false)),
        rewrite!("attention-packed-causal-batched-one-head-f32-softmax"; {pattern(packed(true, false), true)} => {FuseAttention { causal: true }} if is_attention() if is_packed_causal_mask(true)),
        rewrite!("attention"; {pattern(Mask::None, false)} => {FuseAttention { causal: false }} if is_attention()),
        rewrite!("attention-f32-softmax"; {pattern(Mask::None, true)} => {FuseAttention { causal: false }} if is_attention()),
    ]
}

/// Which mask the pattern expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mask {
    /// `packed_causal_mask(?seg)`; `batch_broadcast` when the batch is larger than 1, where
    /// the [1, s, s] causal part is broadcast to [b, s, s]; `head_broadcast` when there are
    /// several query heads, where the [b, 1, s, s] mask is broadcast over them (with one head
    /// the shapes already agree and the DSL emits no broadcast).
    PackedCausal {
        batch_broadcast: bool,
        head_broadcast: bool,
    },
    /// No mask.
    None,
}

/// The packed causal mask, broadcast over the batch and over the heads as given.
fn packed(batch_broadcast: bool, head_broadcast: bool) -> Mask {
    Mask::PackedCausal {
        batch_broadcast,
        head_broadcast,
    }
}

/// The primitive form of attention as the frontend emits it, from named pieces. `f32_softmax`:
/// the scores are cast to f32 before the mask and the probabilities cast back after the
/// softmax (the bf16 form). Binds `?q`, `?kx`, `?vx` (k and v as the product reads them,
/// possibly GQA-expanded), `?scale` and, with a mask, `?seg`, `?col`, `?row`, `?m4`, `?c3`.
pub fn pattern(mask: Mask, f32_softmax: bool) -> Pattern<Fuse> {
    // scores = q k^T * scale, k^T swapping the last two axes of [b, h, s, d]
    let scores = "(mul (matmul ?q (permute ?kx [0,1,3,2])) (const ?scale ?scale_ty))";
    let scores = if f32_softmax {
        format!("(cast {scores} f32)")
    } else {
        scores.to_string()
    };
    let logits = match mask {
        Mask::None => scores,
        Mask::PackedCausal {
            batch_broadcast,
            head_broadcast,
        } => {
            // same = seg_q == seg_k: the ids as a column [b, s, 1] and a row [b, 1, s]
            let same =
                "(eq (broadcast (reshape ?seg ?col) ?bq) (broadcast (reshape ?seg ?row) ?bk))";
            // causal = kj <= qi on [s, s] (iota axis 1 is the key, axis 0 the query), as [1, s, s]
            let causal = "(reshape (le (iota 1 ?ity) (iota 0 ?ity)) ?c3)";
            let causal = if batch_broadcast {
                format!("(broadcast {causal} ?c3b)")
            } else {
                causal.to_string()
            };
            // mask = (same and causal) as [b, 1, s, s], broadcast over the heads (if several)
            let mask = format!("(reshape (and {same} {causal}) ?m4)");
            let mask = if head_broadcast {
                format!("(broadcast {mask} ?mh)")
            } else {
                mask
            };
            // -inf where the mask is false
            let neg_inf = "(broadcast (reshape (const -inf ?ninf_ty) ?ninf_r) ?ninf_b)";
            format!("(select {mask} {scores} {neg_inf})")
        }
    };
    // e = exp(x - max(x)) over the keys (axis 3); probs = e / sum(e)
    let e = format!("(exp (sub {logits} (broadcast (reduce_max {logits} [3]) ?bmax)))");
    let probs = format!("(div {e} (broadcast (reduce_sum {e} [3]) ?bsum))");
    let probs = if f32_softmax {
        format!("(cast {probs} ?back)")
    } else {
        probs
    };
    // o = probs v
    pat(&format!("(matmul {probs} ?vx)"))
}

/// The tensor type bound to `v`.
fn tensor<'a>(eg: &'a FuseGraph, s: &Subst, v: &str) -> Option<&'a TensorType> {
    tensor_of(eg, s, var(v))
}

/// The attribute value bound to `v`.
fn attr<'a>(eg: &'a FuseGraph, s: &Subst, v: &str) -> Option<&'a AttrValue> {
    attr_of(eg, s, var(v))
}

/// The integer list bound to `v`.
fn ints<'a>(eg: &'a FuseGraph, s: &Subst, v: &str) -> Option<&'a [usize]> {
    match attr(eg, s, v)? {
        AttrValue::Ints(x) => Some(x),
        _ => None,
    }
}

/// q is [b, h, s, d] and the scores are square (queries and keys of one sequence), as
/// `fused.attention` requires.
fn is_attention() -> impl Cond {
    |eg, _, subst| {
        let (Some(q), Some(k)) = (tensor(eg, subst, "?q"), tensor(eg, subst, "?kx")) else {
            return false;
        };
        q.rank() == 4 && k.rank() == 4 && k.shape[2] == q.shape[2]
    }
}

/// The mask is exactly `packed_causal_mask(?seg)` for the [b, s] segment ids: the column and
/// the row of the ids, the [s, s] iota comparison as [1, s, s] (broadcast to [b, s, s] when
/// `batch_broadcast`), and the result as [b, 1, s, s] (the select's type checks that it is
/// broadcast over the heads, or that there is one head).
fn is_packed_causal_mask(batch_broadcast: bool) -> impl Cond {
    move |eg, _, subst| {
        let Some(seg) = tensor(eg, subst, "?seg") else {
            return false;
        };
        if seg.dtype != DType::I64 || seg.rank() != 2 {
            return false;
        }
        let (b, s) = (seg.shape[0], seg.shape[1]);
        let (Some(col), Some(row), Some(m4), Some(c3)) = (
            ints(eg, subst, "?col"),
            ints(eg, subst, "?row"),
            ints(eg, subst, "?m4"),
            ints(eg, subst, "?c3"),
        ) else {
            return false;
        };
        let iota_ok =
            matches!(attr(eg, subst, "?ity"), Some(AttrValue::Ty(t)) if t.shape == [s, s]);
        // eq is symmetric: the column and the row may come in either order.
        let col_row =
            (col == [b, s, 1] && row == [b, 1, s]) || (col == [b, 1, s] && row == [b, s, 1]);
        let batch_ok = if batch_broadcast {
            ints(eg, subst, "?c3b") == Some(&[b, s, s][..])
        } else {
            b == 1
        };
        iota_ok && col_row && c3 == [1, s, s] && batch_ok && m4 == [b, 1, s, s]
    }
}

/// The unexpanded kv tensor behind `kx` when `kx` is the GQA expansion of the frontend
/// (`reshape [b, hkv, s, d] -> [b, hkv, 1, s, d]`, `broadcast -> [b, hkv, rep, s, d]`,
/// `reshape -> [b, hkv * rep, s, d]`, so query head h reads kv head h / rep), or the
/// `rep = 1` leftover of it (two reshapes back to the same type). `None` otherwise.
pub fn unexpanded_kv(eg: &FuseGraph, kx: Id) -> Option<Id> {
    let t = eg[kx].data.tensor()?;
    if t.rank() != 4 {
        return None;
    }
    let (b, h, s, d) = (t.shape[0], t.shape[1], t.shape[2], t.shape[3]);
    let ints_of = |id: Id| match eg[id].data.attr() {
        Some(AttrValue::Ints(v)) => Some(v.clone()),
        _ => None,
    };
    let reshape_source = |class: Id, shape: &[usize]| -> Option<Id> {
        eg[class].nodes.iter().find_map(|n| match n {
            Fuse::Reshape([x, sh]) if ints_of(*sh).as_deref() == Some(shape) => Some(*x),
            _ => None,
        })
    };
    for node in &eg[kx].nodes {
        let Fuse::Reshape([inner, _]) = node else {
            continue;
        };
        let Some(inner_ty) = eg[*inner].data.tensor() else {
            continue;
        };
        // rep = 1: [b, h, s, d] -> [b, h, 1, s, d] -> [b, h, s, d]
        if inner_ty.shape == [b, h, 1, s, d] {
            if let Some(k) = reshape_source(*inner, &[b, h, 1, s, d]) {
                if eg[k].data.tensor() == Some(t) {
                    return Some(k);
                }
            }
        }
        // rep > 1: the broadcast of [b, hkv, 1, s, d] to [b, hkv, rep, s, d]
        for bnode in &eg[*inner].nodes {
            let Fuse::Broadcast([src, shape]) = bnode else {
                continue;
            };
            let Some(bshape) = ints_of(*shape) else {
                continue;
            };
            let [b2, hkv, rep, s2, d2] = bshape[..] else {
                continue;
            };
            if (b2, s2, d2) != (b, s, d) || hkv * rep != h || hkv == 0 {
                continue;
            }
            let Some(k) = reshape_source(*src, &[b, hkv, 1, s, d]) else {
                continue;
            };
            let want = TensorType::new(t.dtype, [b, hkv, s, d]);
            if eg[k].data.tensor() == Some(&want) {
                return Some(k);
            }
        }
    }
    None
}

/// Adds `fused.attention` over the match to its e-class: k and v unexpanded when both are
/// the GQA expansion of the same number of kv heads, as matched otherwise.
#[derive(Clone, Debug)]
pub struct FuseAttention {
    /// Whether the match had the packed causal mask (then `?seg` is bound).
    pub causal: bool,
}

impl Applier<Fuse, TensorAnalysis> for FuseAttention {
    fn apply_one(
        &self,
        eg: &mut FuseGraph,
        eclass: Id,
        subst: &Subst,
        _searcher_ast: Option<&PatternAst<Fuse>>,
        _rule_name: Symbol,
    ) -> Vec<Id> {
        let Some(AttrValue::Float(scale)) = attr(eg, subst, "?scale").cloned() else {
            return vec![];
        };
        let (q, kx, vx) = (subst[var("?q")], subst[var("?kx")], subst[var("?vx")]);
        let (k, v) = match (unexpanded_kv(eg, kx), unexpanded_kv(eg, vx)) {
            (Some(k), Some(v)) if eg[k].data == eg[v].data => (k, v),
            _ => (kx, vx),
        };
        let mut children = vec![q, k, v];
        if self.causal {
            children.push(subst[var("?seg")]);
        }
        children.push(eg.add(Fuse::Float(Float::new(scale.get()))));
        children.push(eg.add(Fuse::Bool(self.causal)));
        let node = Fuse::Attention(children.into_boxed_slice());
        // The fused op must type as the e-class it joins (q's type is the output's).
        union_if_typed(eg, eclass, node)
    }
}
