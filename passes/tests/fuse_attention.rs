//! The attention fusion rules: the Qwen3 form (GQA expansion, packed causal mask built once
//! outside the layers, f32 softmax) and the InternViT form (no mask) become
//! `fused.attention`; each near miss of the brief stays primitive; the interpreter gives the
//! same result before and after.

mod fuse_common;

use fuse_common::*;
use mmc_frontend::models::qwen3_moe::packed_causal_mask;
use mmc_frontend::{ModelBuilder, Sym};
use mmc_ir::{CmpOp, DType, FusedOp, Graph, Tensor};
use std::collections::HashMap;

/// Which mask the attention applies.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mask {
    /// `packed_causal_mask(segment_ids)`, as the Qwen3 decoder builds it.
    PackedCausal,
    /// The same with `kj < qi`: a token does not see itself.
    Strict,
    /// Query segments from `segment_ids`, key segments from another tensor.
    MixedIds,
    /// A bool mask given as an input, not derived from segment ids.
    Given,
    /// No mask (InternViT).
    None,
}

/// How the query heads reach the key/value heads.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Heads {
    /// k and v used as they are (InternViT).
    Direct,
    /// The GQA expansion of the Qwen3 decoder (reshape, broadcast, reshape).
    Gqa,
    /// 6 query heads over 4 key/value heads: the expansion to 12 heads is sliced to 6, so
    /// query head h reads kv head h / 3, not h / (6 / 4).
    NotDividing,
}

/// One attention graph to fuse.
#[derive(Clone, Debug)]
struct Case {
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    layers: usize,
    mask: Mask,
    kv: Heads,
    softmax_axis: usize,
    /// A constant scale (`hd^-0.5`); `false`: the scale is an input.
    const_scale: bool,
    dtype: DType,
}

impl Case {
    /// The Qwen3 decoder's attention core, f32.
    fn qwen() -> Self {
        Case {
            batch: 1,
            seq: 8,
            heads: 4,
            kv_heads: 2,
            head_dim: 4,
            layers: 2,
            mask: Mask::PackedCausal,
            kv: Heads::Gqa,
            softmax_axis: 3,
            const_scale: true,
            dtype: DType::F32,
        }
    }

    /// The InternViT attention core: no mask, as many kv heads as query heads.
    fn vit() -> Self {
        Case {
            kv_heads: 4,
            kv: Heads::Direct,
            mask: Mask::None,
            layers: 1,
            ..Case::qwen()
        }
    }

    fn scale(&self) -> f64 {
        (self.head_dim as f64).powf(-0.5)
    }
}

/// The mask of `kj op qi` and equal segments, shaped [b, 1, s, s] like `packed_causal_mask`.
fn mask_with(b: &mut ModelBuilder, seg_q: Sym, seg_k: Sym, op: CmpOp) -> Sym {
    let shape = b.shape(seg_q);
    let (bs, s) = (shape[0], shape[1]);
    let qi = b.iota(DType::I64, &[s, s], 0).unwrap();
    let kj = b.iota(DType::I64, &[s, s], 1).unwrap();
    let causal = b.compare(op, kj, qi).unwrap();
    let q = b.reshape(seg_q, &[bs, s, 1]).unwrap();
    let k = b.reshape(seg_k, &[bs, 1, s]).unwrap();
    let same = b.compare(CmpOp::Eq, q, k).unwrap();
    let mask = b.and(same, causal).unwrap();
    b.reshape(mask, &[bs, 1, s, s]).unwrap()
}

/// Builds `c.layers` attention layers (the output of one is the next one's queries) with
/// the mask built once before them, as `qwen3_moe::decoder` does. Output `o`.
fn build(c: &Case) -> Graph {
    let mut b = ModelBuilder::new(DType::F32, c.dtype);
    let (bs, s, nh, nkv, hd) = (c.batch, c.seq, c.heads, c.kv_heads, c.head_dim);
    let mut q = b.input("q", c.dtype, &[bs, nh, s, hd]).unwrap();
    let k = b.input("k", c.dtype, &[bs, nkv, s, hd]).unwrap();
    let v = b.input("v", c.dtype, &[bs, nkv, s, hd]).unwrap();
    let seg = b.input("segment_ids", DType::I64, &[bs, s]).unwrap();
    let scale_in = (!c.const_scale).then(|| b.input("scale", c.dtype, &[1]).unwrap());
    let mask = match c.mask {
        Mask::PackedCausal => Some(packed_causal_mask(&mut b, seg).unwrap()),
        Mask::Strict => Some(mask_with(&mut b, seg, seg, CmpOp::Lt)),
        Mask::MixedIds => {
            let other = b.input("other_ids", DType::I64, &[bs, s]).unwrap();
            Some(mask_with(&mut b, seg, other, CmpOp::Le))
        }
        Mask::Given => Some(b.input("mask", DType::Bool, &[bs, 1, s, s]).unwrap()),
        Mask::None => None,
    };
    for layer in 0..c.layers {
        q = b
            .scope(format!("layers.{layer}.self_attn"), |b| {
                let expand = |b: &mut ModelBuilder, t: Sym| match c.kv {
                    Heads::Direct => Ok(t),
                    Heads::Gqa => {
                        let rep = nh / nkv;
                        let t = b.reshape(t, &[bs, nkv, 1, s, hd])?;
                        let t = b.broadcast_to(t, &[bs, nkv, rep, s, hd])?;
                        b.reshape(t, &[bs, nh, s, hd])
                    }
                    Heads::NotDividing => {
                        let t = b.reshape(t, &[bs, nkv, 1, s, hd])?;
                        let t = b.broadcast_to(t, &[bs, nkv, 3, s, hd])?;
                        let t = b.reshape(t, &[bs, 3 * nkv, s, hd])?;
                        b.slice(t, 1, 0, nh)
                    }
                };
                let k = expand(b, k)?;
                let v = expand(b, v)?;
                let kt = b.transpose(k, 2, 3)?;
                let scores = b.matmul(q, kt)?;
                let scores = match scale_in {
                    None => b.mul_scalar(scores, c.scale())?,
                    Some(sc) => b.mul(scores, sc)?,
                };
                let scores = b.cast(scores, DType::F32)?;
                let scores = match mask {
                    Some(m) => {
                        let neg_inf = b.full(f64::NEG_INFINITY, DType::F32, &[1])?;
                        b.select(m, scores, neg_inf)?
                    }
                    None => scores,
                };
                let probs = b.softmax(scores, c.softmax_axis)?;
                let probs = b.cast(probs, c.dtype)?;
                b.matmul(probs, v)
            })
            .unwrap();
    }
    b.output("o", q);
    b.finish()
}

/// Seeded q, k, v (and scale, mask, other ids) with two packed samples and padding.
fn bindings(c: &Case, g: &Graph) -> HashMap<String, Tensor> {
    let (bs, s) = (c.batch, c.seq);
    let seg: Vec<i64> = (0..bs).flat_map(|_| packed_segments(s)).collect();
    let mut fixed = HashMap::new();
    fixed.insert("segment_ids".to_string(), ints(&[bs, s], &seg));
    let other: Vec<i64> = seg.iter().map(|&x| (x + 1) % 3).collect();
    fixed.insert("other_ids".to_string(), ints(&[bs, s], &other));
    let mask: Vec<f64> = (0..bs * s * s)
        .map(|i| f64::from(u8::from(i % s <= (i / s) % s && i % 3 != 1)))
        .collect();
    fixed.insert(
        "mask".to_string(),
        Tensor::from_f64(DType::Bool, vec![bs, 1, s, s], &mask).unwrap(),
    );
    let scale = Tensor::from_f64(c.dtype, vec![1], &[c.scale()]).unwrap();
    fixed.insert("scale".to_string(), scale);
    bind_floats(g, 7, 2.0, fixed)
}

/// Fuses the case (checking that `rule` fired, when given), checks that the interpreter
/// result is unchanged, and returns the fused graph.
fn fuse_and_compare(c: &Case, rule: Option<&str>) -> Graph {
    let g = build(c);
    let f = match rule {
        Some(r) => fused_by(&g, r),
        None => fused(&g),
    };
    let b = bindings(c, &g);
    let (want, got) = (run(&g, &b, "o"), run(&f, &b, "o"));
    let diff = max_rel_diff(&got, &want);
    assert!(diff <= 1e-5, "{c:?}: the fused result differs by {diff:e}");
    f
}

/// The fused attention nodes of `f`, each checked to be one `fused.attention` of the
/// expected scale and causality.
fn attention_nodes<'g>(f: &'g Graph, c: &Case, causal: bool) -> Vec<&'g mmc_ir::Node> {
    let nodes = fused_nodes(f, "fused.attention");
    for n in &nodes {
        match fused_op(n) {
            FusedOp::Attention { scale, causal: cz } => {
                assert!((scale - c.scale()).abs() < 1e-12, "scale {scale}");
                assert_eq!(*cz, causal);
            }
            other => panic!("{other:?}"),
        }
    }
    nodes
}

#[test]
fn qwen_attention_with_packed_causal_mask_fuses_with_unexpanded_kv() {
    let c = Case::qwen();
    let f = fuse_and_compare(&c, Some("attention-packed-causal"));
    let nodes = attention_nodes(&f, &c, true);
    assert_eq!(nodes.len(), c.layers, "one fused attention per layer");
    let seg = f.inputs().find(|(n, _, _)| *n == "segment_ids").unwrap().2;
    let k = f.inputs().find(|(n, _, _)| *n == "k").unwrap().2;
    let v = f.inputs().find(|(n, _, _)| *n == "v").unwrap().2;
    for n in nodes {
        assert_eq!(n.inputs.len(), 4, "q, k, v, segment ids");
        assert_eq!(n.inputs[1], k, "k without the GQA expansion");
        assert_eq!(n.inputs[2], v, "v without the GQA expansion");
        assert_eq!(n.inputs[3], seg);
    }
    // Nothing of the primitive form is needed any more: no softmax, no mask, no expansion.
    for op in ["reduce_max", "exp", "select", "iota", "broadcast", "matmul"] {
        assert_eq!(count_live(&f, op), 0, "`{op}` is left in the fused graph");
    }
}

#[test]
fn qwen_attention_fuses_in_bf16_with_its_casts() {
    let c = Case {
        dtype: DType::BF16,
        ..Case::qwen()
    };
    let g = build(&c);
    assert!(
        count(&g, "cast") >= 2,
        "the bf16 form casts around the softmax"
    );
    let f = fused_by(&g, "attention-packed-causal-f32-softmax");
    assert_eq!(attention_nodes(&f, &c, true).len(), c.layers);
    assert_eq!(count_live(&f, "exp"), 0);
    assert_eq!(count_live(&f, "cast"), 0);
    // The fused op rounds once where the primitive form rounds every step to bf16.
    let b = bindings(&c, &g);
    let diff = max_rel_diff(&run(&f, &b, "o"), &run(&g, &b, "o"));
    assert!(diff <= 2e-2, "the bf16 result differs by {diff:e}");
}

#[test]
fn a_single_layer_still_sees_the_mask_built_before_it() {
    let c = Case {
        layers: 1,
        ..Case::qwen()
    };
    let f = fuse_and_compare(&c, Some("attention-packed-causal"));
    assert_eq!(attention_nodes(&f, &c, true).len(), 1);
}

#[test]
fn bf16_attention_fuses_with_a_batch_of_two() {
    let c = Case {
        batch: 2,
        dtype: DType::BF16,
        ..Case::qwen()
    };
    let f = fused_by(&build(&c), "attention-packed-causal-batched-f32-softmax");
    assert_eq!(attention_nodes(&f, &c, true).len(), c.layers);
}

#[test]
fn unmasked_attention_with_an_f32_softmax_fuses() {
    let c = Case {
        dtype: DType::BF16,
        ..Case::vit()
    };
    let g = build(&c);
    assert!(count(&g, "cast") >= 2);
    let f = fused_by(&g, "attention-f32-softmax");
    assert_eq!(attention_nodes(&f, &c, false).len(), 1);
}

#[test]
fn attention_fuses_with_a_batch_of_two() {
    let c = Case {
        batch: 2,
        ..Case::qwen()
    };
    let f = fuse_and_compare(&c, Some("attention-packed-causal-batched"));
    assert_eq!(attention_nodes(&f, &c, true).len(), c.layers);
}

#[test]
fn multi_head_attention_without_expansion_fuses() {
    let c = Case {
        kv_heads: 4,
        ..Case::qwen()
    };
    let f = fuse_and_compare(&c, Some("attention-packed-causal"));
    let nodes = attention_nodes(&f, &c, true);
    assert_eq!(nodes.len(), c.layers);
    let k = f.inputs().find(|(n, _, _)| *n == "k").unwrap().2;
    assert!(nodes.iter().all(|n| n.inputs[1] == k));
}

#[test]
fn vit_attention_fuses_without_mask() {
    let c = Case::vit();
    let f = fuse_and_compare(&c, Some("attention"));
    let nodes = attention_nodes(&f, &c, false);
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].inputs.len(), 3, "q, k, v and no segment ids");
    assert_eq!(count(&f, "exp"), 0);
}

/// One query head (and one kv head): the DSL does not broadcast the [b, 1, s, s] mask over
/// the heads, which the `-one-head` rules take.
fn one_head(batch: usize, dtype: DType) -> Case {
    Case {
        heads: 1,
        kv_heads: 1,
        batch,
        dtype,
        ..Case::qwen()
    }
}

#[test]
fn single_head_attention_fuses() {
    let c = one_head(1, DType::F32);
    let f = fuse_and_compare(&c, Some("attention-packed-causal-one-head"));
    assert_eq!(attention_nodes(&f, &c, true).len(), c.layers);
}

#[test]
fn single_head_attention_fuses_with_a_batch_of_two() {
    let c = one_head(2, DType::F32);
    let f = fuse_and_compare(&c, Some("attention-packed-causal-batched-one-head"));
    assert_eq!(attention_nodes(&f, &c, true).len(), c.layers);
}

#[test]
fn bf16_single_head_attention_fuses() {
    let c = one_head(1, DType::BF16);
    let f = fused_by(&build(&c), "attention-packed-causal-one-head-f32-softmax");
    assert_eq!(attention_nodes(&f, &c, true).len(), c.layers);
}

#[test]
fn bf16_single_head_attention_fuses_with_a_batch_of_two() {
    let c = one_head(2, DType::BF16);
    let f = fused_by(
        &build(&c),
        "attention-packed-causal-batched-one-head-f32-softmax",
    );
    assert_eq!(attention_nodes(&f, &c, true).len(), c.layers);
}

/// The near misses: the graph stays as it was (no fused attention), and still computes the
/// same.
fn assert_not_fused(c: &Case) {
    let f = fuse_and_compare(c, None);
    assert!(
        fused_nodes(&f, "fused.attention").is_empty(),
        "{c:?} must not fuse into attention"
    );
}

#[test]
fn a_strict_causal_mask_does_not_fuse() {
    assert_not_fused(&Case {
        mask: Mask::Strict,
        ..Case::qwen()
    });
}

#[test]
fn a_strict_causal_mask_over_one_head_does_not_fuse() {
    assert_not_fused(&Case {
        mask: Mask::Strict,
        ..one_head(2, DType::F32)
    });
}

#[test]
fn a_mask_mixing_segment_ids_with_another_tensor_does_not_fuse() {
    assert_not_fused(&Case {
        mask: Mask::MixedIds,
        ..Case::qwen()
    });
}

#[test]
fn a_mask_not_derived_from_segment_ids_does_not_fuse() {
    assert_not_fused(&Case {
        mask: Mask::Given,
        ..Case::qwen()
    });
}

#[test]
fn a_softmax_over_another_axis_does_not_fuse() {
    assert_not_fused(&Case {
        softmax_axis: 2,
        ..Case::qwen()
    });
    assert_not_fused(&Case {
        softmax_axis: 2,
        ..Case::vit()
    });
}

#[test]
fn a_scale_that_is_not_a_constant_does_not_fuse() {
    assert_not_fused(&Case {
        const_scale: false,
        ..Case::qwen()
    });
    assert_not_fused(&Case {
        const_scale: false,
        ..Case::vit()
    });
}

#[test]
fn kv_heads_that_do_not_divide_are_not_taken_as_gqa() {
    // 6 query heads, 4 kv heads: the GQA rewrite must not hand the 4-head k and v to the
    // fused op (6 % 4 != 0, and the head mapping is not h / (hq / hkv)).
    let c = Case {
        heads: 6,
        kv_heads: 4,
        kv: Heads::NotDividing,
        ..Case::qwen()
    };
    let f = fuse_and_compare(&c, None);
    for n in fused_nodes(&f, "fused.attention") {
        let k = f.ty(n.inputs[1]);
        assert_eq!(k.shape[1], 6, "k must keep the query head count, got {k}");
    }
}

#[test]
fn file_test_attention() {
    run_file_test("fuse/attention.mmcir");
}
