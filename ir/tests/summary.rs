//! Parameter counts and sizes of a graph.

use mmc_ir::summary::{component_of, grouped, GraphSummary};
use mmc_ir::{BinaryOp, DType, Graph, Op, ScopeId, Stage, TensorType, Value};
use std::collections::BTreeMap;

fn add(g: &mut Graph, op: Op, inputs: &[Value]) -> Value {
    let id = g.add_node(op, inputs, ScopeId::default()).unwrap();
    g.result(id)
}

fn param(g: &mut Graph, name: &str, dtype: DType, shape: &[usize]) -> Value {
    add(
        g,
        Op::Param {
            name: name.into(),
            ty: TensorType::new(dtype, shape.to_vec()),
        },
        &[],
    )
}

/// Five parameters (two layers of one projection, an embedding, a head, a scalar), one input
/// and a few compute nodes.
fn small_model() -> Graph {
    let mut g = Graph::new(Stage::Frontend);
    let x = add(
        &mut g,
        Op::Input {
            name: "x".into(),
            ty: TensorType::new(DType::F32, vec![2, 3]),
        },
        &[],
    );
    let up0 = param(
        &mut g,
        "model.layers.0.mlp.up_proj.weight",
        DType::F32,
        &[3, 4],
    );
    let up1 = param(
        &mut g,
        "model.layers.1.mlp.up_proj.weight",
        DType::F32,
        &[3, 4],
    );
    param(&mut g, "model.embed_tokens.weight", DType::BF16, &[10, 4]);
    param(&mut g, "lm_head.weight", DType::BF16, &[10, 4]);
    param(&mut g, "scale", DType::F64, &[]);
    let h0 = add(&mut g, Op::MatMul, &[x, up0]);
    let h1 = add(&mut g, Op::MatMul, &[x, up1]);
    let y = add(&mut g, Op::Binary(BinaryOp::Add), &[h0, h1]);
    g.add_output("y", y);
    g
}

#[test]
fn counts_params_bytes_and_components() {
    let s = GraphSummary::of(&small_model());
    // 1 input + 5 params + 2 matmuls + 1 add.
    assert_eq!(s.nodes, 9);
    assert_eq!(s.param_tensors, 5);
    // 12 + 12 + 40 + 40 + 1; the input's 6 elements are not parameters.
    assert_eq!(s.param_count, 105);
    let bytes: BTreeMap<DType, u64> = [
        (DType::F32, 2 * 12 * 4),
        (DType::BF16, 2 * 40 * 2),
        (DType::F64, 8),
    ]
    .into_iter()
    .collect();
    assert_eq!(s.param_bytes, bytes);
    let components: BTreeMap<String, u64> = [
        ("model.layers.*.mlp.up_proj", 24),
        ("model.embed_tokens", 40),
        ("lm_head", 40),
        ("scale", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(s.by_component, components);
}

#[test]
fn display() {
    let s = GraphSummary::of(&small_model());
    let text = s.to_string();
    let expected = "\
nodes: 9
parameters: 105 in 5 tensors
parameter bytes by dtype:
  f64                       8
  f32                      96
  bf16                    160
parameters by component:
  lm_head                                     40
  model.embed_tokens                          40
  model.layers.*.mlp.up_proj                  24
  scale                                        1
";
    assert_eq!(text, expected);
}

#[test]
fn empty_graph() {
    let s = GraphSummary::of(&Graph::new(Stage::Frontend));
    assert_eq!(s.nodes, 0);
    assert_eq!(s.param_tensors, 0);
    assert_eq!(s.param_count, 0);
    assert!(s.param_bytes.is_empty());
    assert!(s.by_component.is_empty());
}

#[test]
fn large_counts_do_not_overflow_and_are_grouped() {
    // 4 experts of 2048 x 7168 bf16 weights: 58,720,256 elements, 117,440,512 bytes.
    let mut g = Graph::new(Stage::Frontend);
    for e in 0..4 {
        param(
            &mut g,
            &format!("model.layers.3.mlp.experts.{e}.gate_proj.weight"),
            DType::BF16,
            &[2048, 7168],
        );
    }
    let s = GraphSummary::of(&g);
    assert_eq!(s.param_count, 58_720_256);
    assert_eq!(s.param_bytes[&DType::BF16], 117_440_512);
    assert_eq!(
        s.by_component["model.layers.*.mlp.experts.*.gate_proj"],
        58_720_256
    );
    assert!(s
        .to_string()
        .contains("parameters: 58,720,256 in 4 tensors"));
    assert_eq!(grouped(117_440_512), "117,440,512");
}

#[test]
fn components() {
    assert_eq!(component_of("model.norm.weight"), "model.norm");
    assert_eq!(
        component_of("vision.blocks.10.attn.qkv.bias"),
        "vision.blocks.*.attn.qkv"
    );
    // Only whole numeric segments are hidden.
    assert_eq!(component_of("model.layer3.w"), "model.layer3");
    assert_eq!(component_of("a..b"), "a.");
}
