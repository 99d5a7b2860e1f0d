//! The verifier and the typing rules that `Graph::add_node` enforces.

use mmc_ir::verify::VerifierIssue;
use mmc_ir::{
    verify, BinaryOp, CmpOp, DType, FusedOp, Graph, GraphError, NodeId, Op, ReduceKind, ScopeId,
    Stage, TensorType, TypeError, UnaryOp, Value, VerifyError,
};

fn ty(dtype: DType, shape: &[usize]) -> TensorType {
    TensorType::new(dtype, shape.to_vec())
}

fn root() -> ScopeId {
    ScopeId::default()
}

fn add(g: &mut Graph, op: Op, inputs: &[Value]) -> Value {
    let id = g.add_node(op, inputs, root()).expect("well typed");
    g.result(id)
}

fn input(g: &mut Graph, name: &str, t: TensorType) -> Value {
    add(
        g,
        Op::Input {
            name: name.into(),
            ty: t,
        },
        &[],
    )
}

fn param(g: &mut Graph, name: &str, t: TensorType) -> Value {
    add(
        g,
        Op::Param {
            name: name.into(),
            ty: t,
        },
        &[],
    )
}

/// The verifier's issues, or a panic if it accepts the graph.
#[track_caller]
fn issues(g: &Graph) -> Vec<VerifierIssue> {
    match verify(g) {
        Ok(()) => panic!("the verifier accepted a malformed graph"),
        Err(VerifyError { issues }) => {
            assert!(!issues.is_empty());
            issues
        }
    }
}

/// Asserts that some issue's message contains every one of `needles`; returns that issue.
#[track_caller]
fn expect_issue(g: &Graph, needles: &[&str]) -> VerifierIssue {
    let all = issues(g);
    all.iter()
        .find(|i| needles.iter().all(|n| i.message.contains(n)))
        .cloned()
        .unwrap_or_else(|| panic!("no issue mentions {needles:?}; got {all:?}"))
}

/// A graph with a bit of everything, well formed.
fn good_graph(stage: Stage) -> Graph {
    let mut g = Graph::new(stage);
    let scope = g.intern_scope("layer");
    let x = input(&mut g, "x", ty(DType::F32, &[2, 3]));
    let ids = input(&mut g, "ids", ty(DType::I64, &[2, 1]));
    let w = g
        .add_node(
            Op::Param {
                name: "layer.w".into(),
                ty: ty(DType::F32, &[3, 4]),
            },
            &[],
            scope,
        )
        .unwrap();
    let w = g.result(w);
    let h = g.add_node(Op::MatMul, &[x, w], scope).unwrap();
    let h = g.result(h);
    let e = add(&mut g, Op::Unary(UnaryOp::Exp), &[h]);
    let s = add(
        &mut g,
        Op::Reduce {
            kind: ReduceKind::Sum,
            axes: vec![1],
        },
        &[e],
    );
    let sb = add(&mut g, Op::Broadcast { shape: vec![2, 4] }, &[s]);
    let p = add(&mut g, Op::Binary(BinaryOp::Div), &[e, sb]);
    let idx = add(&mut g, Op::Broadcast { shape: vec![2, 4] }, &[ids]);
    let zero = add(
        &mut g,
        Op::Const {
            value: 0.0,
            ty: ty(DType::I64, &[2, 4]),
        },
        &[],
    );
    let mask = add(&mut g, Op::Compare(CmpOp::Gt), &[idx, zero]);
    let pz = add(
        &mut g,
        Op::Const {
            value: 0.0,
            ty: ty(DType::F32, &[2, 4]),
        },
        &[],
    );
    let y = add(&mut g, Op::Select, &[mask, p, pz]);
    let top = add(&mut g, Op::TopK { k: 2 }, &[y]);
    g.add_output("probs", y);
    g.add_output("top", top);
    g
}

// ---------------------------------------------------------------------------------------------
// Accepted graphs
// ---------------------------------------------------------------------------------------------

#[test]
fn accepts_good_graphs_in_every_stage() {
    for stage in Stage::ALL {
        let g = good_graph(stage);
        assert_eq!(verify(&g), Ok(()), "stage {stage}");
    }
}

#[test]
fn accepts_the_empty_graph() {
    assert_eq!(verify(&Graph::new(Stage::Frontend)), Ok(()));
}

#[test]
fn accepts_an_input_used_directly_as_an_output_twice() {
    let mut g = Graph::new(Stage::Frontend);
    let x = input(&mut g, "x", ty(DType::Bool, &[]));
    g.add_output("a", x);
    g.add_output("b", x);
    assert_eq!(verify(&g), Ok(()));
}

// ---------------------------------------------------------------------------------------------
// Rejected graphs
// ---------------------------------------------------------------------------------------------

#[test]
fn rejects_use_before_definition() {
    let mut g = Graph::new(Stage::Frontend);
    // Node 0 reads %1, which node 1 defines.
    g.push_node_unchecked(
        Op::Unary(UnaryOp::Neg),
        &[Value(1)],
        vec![ty(DType::F32, &[2])],
        root(),
    );
    let x = g.push_node_unchecked(
        Op::Input {
            name: "x".into(),
            ty: ty(DType::F32, &[2]),
        },
        &[],
        vec![ty(DType::F32, &[2])],
        root(),
    );
    assert_eq!(g.result(x), Value(1));
    g.add_output("y", Value(0));
    let issue = expect_issue(&g, &["%1", "used before it is defined"]);
    assert_eq!(issue.node, Some(NodeId(0)));
    // The issue carries the node as the printer shows it (its operand is not yet defined).
    assert_eq!(issue.context.as_deref(), Some("%0 = neg %?1 : f32[2]"));
    assert!(
        issue
            .to_string()
            .starts_with("node 0 (`%0 = neg %?1 : f32[2]`): "),
        "{issue}"
    );
}

#[test]
fn rejects_an_operand_that_does_not_exist() {
    let mut g = Graph::new(Stage::Frontend);
    g.push_node_unchecked(
        Op::Unary(UnaryOp::Neg),
        &[Value(42)],
        vec![ty(DType::F32, &[2])],
        root(),
    );
    let issue = expect_issue(&g, &["%42", "does not exist"]);
    assert_eq!(issue.node, Some(NodeId(0)));
}

#[test]
fn rejects_a_wrong_stored_result_type() {
    let mut g = Graph::new(Stage::Frontend);
    let x = input(&mut g, "x", ty(DType::F32, &[2, 3]));
    let bad = g.push_node_unchecked(
        Op::Reduce {
            kind: ReduceKind::Sum,
            axes: vec![1],
        },
        &[x],
        vec![ty(DType::F32, &[2])],
        root(),
    );
    let issue = expect_issue(&g, &["`reduce_sum` produces f32[2, 1]", "says f32[2]"]);
    assert_eq!(issue.node, Some(bad));

    // A wrong dtype is caught the same way.
    let mut g = Graph::new(Stage::Frontend);
    let x = input(&mut g, "x", ty(DType::F32, &[2]));
    g.push_node_unchecked(
        Op::Compare(CmpOp::Lt),
        &[x, x],
        vec![ty(DType::F32, &[2])],
        root(),
    );
    expect_issue(&g, &["`lt` produces bool[2]", "says f32[2]"]);
}

#[test]
fn rejects_a_node_that_fails_type_inference() {
    let mut g = Graph::new(Stage::Frontend);
    let a = input(&mut g, "a", ty(DType::F32, &[2]));
    let b = input(&mut g, "b", ty(DType::F32, &[3]));
    g.push_node_unchecked(
        Op::Binary(BinaryOp::Add),
        &[a, b],
        vec![ty(DType::F32, &[2])],
        root(),
    );
    let issue = expect_issue(&g, &["`add`", "operand types differ", "f32[2]", "f32[3]"]);
    assert_eq!(issue.node, Some(NodeId(2)));
}

#[test]
fn rejects_a_fused_op_in_a_frontend_graph_only() {
    let build = |stage: Stage| {
        let mut g = Graph::new(stage);
        let x = input(&mut g, "x", ty(DType::BF16, &[2, 8]));
        let w = param(&mut g, "norm.weight", ty(DType::BF16, &[8]));
        let y = add(&mut g, Op::Fused(FusedOp::RmsNorm { eps: 1e-6 }), &[x, w]);
        g.add_output("y", y);
        g
    };
    let g = build(Stage::Frontend);
    let issue = expect_issue(&g, &["fused op `fused.rms_norm`", "frontend graph"]);
    assert_eq!(issue.node, Some(NodeId(2)));
    assert_eq!(issues(&g).len(), 1);
    for stage in Stage::ALL.into_iter().filter(|&s| s != Stage::Frontend) {
        assert_eq!(verify(&build(stage)), Ok(()), "stage {stage}");
    }
}

#[test]
fn rejects_duplicate_parameter_names() {
    let mut g = Graph::new(Stage::Frontend);
    param(&mut g, "w", ty(DType::F32, &[2]));
    param(&mut g, "w", ty(DType::F32, &[3]));
    let issue = expect_issue(&g, &["\"w\"", "bound twice"]);
    assert_eq!(issue.node, Some(NodeId(1)));

    // Parameters and inputs share one namespace.
    let mut g = Graph::new(Stage::Frontend);
    param(&mut g, "x", ty(DType::F32, &[2]));
    input(&mut g, "x", ty(DType::F32, &[2]));
    expect_issue(&g, &["\"x\"", "bound twice"]);
}

#[test]
fn rejects_empty_parameter_names() {
    let mut g = Graph::new(Stage::Frontend);
    g.push_node_unchecked(
        Op::Param {
            name: String::new(),
            ty: ty(DType::F32, &[2]),
        },
        &[],
        vec![ty(DType::F32, &[2])],
        root(),
    );
    expect_issue(&g, &["`param`", "name is empty"]);
}

#[test]
fn rejects_duplicate_output_names() {
    let mut g = Graph::new(Stage::Frontend);
    let x = input(&mut g, "x", ty(DType::F32, &[2]));
    let y = add(&mut g, Op::Unary(UnaryOp::Neg), &[x]);
    g.add_output("y", x);
    g.add_output("y", y);
    let issue = expect_issue(&g, &["output name \"y\"", "repeated"]);
    assert_eq!(issue.node, None);
    assert_eq!(issues(&g).len(), 1);
}

#[test]
fn rejects_empty_output_names() {
    let mut g = Graph::new(Stage::Frontend);
    let x = input(&mut g, "x", ty(DType::F32, &[2]));
    g.add_output("", x);
    let issue = expect_issue(&g, &["output name \"\"", "empty"]);
    assert_eq!(issue.node, None);
}

#[test]
fn rejects_an_output_of_an_unknown_value() {
    let mut g = Graph::new(Stage::Frontend);
    input(&mut g, "x", ty(DType::F32, &[2]));
    g.add_output("y", Value(7));
    let issue = expect_issue(&g, &["output \"y\"", "unknown value %7"]);
    assert_eq!(issue.node, None);
}

#[test]
fn reports_every_issue_and_summarizes_them() {
    let mut g = Graph::new(Stage::Frontend);
    let x = input(&mut g, "x", ty(DType::F32, &[2]));
    input(&mut g, "x", ty(DType::F32, &[2]));
    g.push_node_unchecked(
        Op::Unary(UnaryOp::Exp),
        &[x],
        vec![ty(DType::F64, &[2])],
        root(),
    );
    g.add_output("", x);
    g.add_output("z", Value(99));
    let err = verify(&g).unwrap_err();
    assert_eq!(err.issues.len(), 4, "{err}");
    let text = err.to_string();
    assert!(text.starts_with("the graph is malformed: "), "{text}");
    for part in [
        "node 1 (`%1 = input \"x\" : f32[2]`): the name \"x\" is bound twice",
        "node 2 (`%2 = exp %0 : f64[2]`): `exp` produces f32[2] but the node says f64[2]",
        "output name \"\" is empty or repeated",
        "output \"z\" refers to the unknown value %99",
    ] {
        assert!(text.contains(part), "{part:?} missing from {text}");
    }
}

#[test]
fn summary_lists_at_most_five_issues() {
    let mut g = Graph::new(Stage::Frontend);
    for _ in 0..7 {
        g.push_node_unchecked(
            Op::Unary(UnaryOp::Neg),
            &[Value(1000)],
            vec![ty(DType::F32, &[])],
            root(),
        );
    }
    let err = verify(&g).unwrap_err();
    assert_eq!(err.issues.len(), 7);
    assert!(err.to_string().ends_with("; and 2 more"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Type inference through Graph::add_node
// ---------------------------------------------------------------------------------------------

/// Adds inputs of the given types and then `op` on them; returns the type error.
#[track_caller]
fn type_error(op: Op, operands: &[TensorType]) -> TypeError {
    let mut g = Graph::new(Stage::Frontend);
    let vals: Vec<Value> = operands
        .iter()
        .enumerate()
        .map(|(i, t)| input(&mut g, &format!("x{i}"), t.clone()))
        .collect();
    let before = g.nodes().len();
    match g.add_node(op, &vals, root()) {
        Err(GraphError::Type(e)) => {
            assert_eq!(g.nodes().len(), before, "a rejected node must not be added");
            e
        }
        Err(other) => panic!("expected a type error, got {other}"),
        Ok(_) => panic!("the op was accepted"),
    }
}

#[track_caller]
fn expect_type_error(op: Op, operands: &[TensorType], name: &str, needles: &[&str]) {
    let e = type_error(op, operands);
    assert_eq!(e.op, name, "{e}");
    for n in needles {
        assert!(e.reason.contains(n), "{n:?} missing from {e}");
    }
    assert!(e.to_string().starts_with(&format!("`{name}`: ")), "{e}");
}

#[test]
fn matmul_contraction_mismatch() {
    expect_type_error(
        Op::MatMul,
        &[ty(DType::F32, &[2, 3]), ty(DType::F32, &[4, 5])],
        "matmul",
        &["contraction dimensions differ", "f32[2, 3]", "f32[4, 5]"],
    );
    expect_type_error(
        Op::MatMul,
        &[ty(DType::F32, &[2, 2, 3]), ty(DType::F32, &[3, 3, 4])],
        "matmul",
        &["batch dimensions differ"],
    );
    expect_type_error(
        Op::MatMul,
        &[ty(DType::I64, &[2, 2]), ty(DType::I64, &[2, 2])],
        "matmul",
        &["float"],
    );
}

#[test]
fn broadcast_of_a_non_one_dim() {
    expect_type_error(
        Op::Broadcast { shape: vec![4, 3] },
        &[ty(DType::F32, &[2, 3])],
        "broadcast",
        &["dimension 0 of f32[2, 3] cannot expand to 4"],
    );
    expect_type_error(
        Op::Broadcast { shape: vec![2, 3] },
        &[ty(DType::F32, &[3])],
        "broadcast",
        &["rank"],
    );
}

#[test]
fn reshape_with_a_different_element_count() {
    expect_type_error(
        Op::Reshape { shape: vec![4, 2] },
        &[ty(DType::F32, &[2, 3])],
        "reshape",
        &["6 elements", "[4, 2]"],
    );
}

#[test]
fn permute_that_is_not_a_permutation() {
    expect_type_error(
        Op::Permute {
            perm: vec![0, 0, 1],
        },
        &[ty(DType::F32, &[2, 3, 4])],
        "permute",
        &["[0, 0, 1] is not a permutation"],
    );
    expect_type_error(
        Op::Permute { perm: vec![0, 3] },
        &[ty(DType::F32, &[2, 3])],
        "permute",
        &["not a permutation"],
    );
    expect_type_error(
        Op::Permute { perm: vec![1, 0] },
        &[ty(DType::F32, &[2, 3, 4])],
        "permute",
        &["does not fit"],
    );
}

#[test]
fn slice_out_of_range() {
    expect_type_error(
        Op::Slice {
            start: vec![0, 1],
            end: vec![2, 5],
        },
        &[ty(DType::F32, &[2, 4])],
        "slice",
        &["1..5 is out of range on axis 1"],
    );
    expect_type_error(
        Op::Slice {
            start: vec![2],
            end: vec![1],
        },
        &[ty(DType::F32, &[4])],
        "slice",
        &["2..1"],
    );
    expect_type_error(
        Op::Slice {
            start: vec![0],
            end: vec![1],
        },
        &[ty(DType::F32, &[4, 4])],
        "slice",
        &["one entry per dimension"],
    );
}

#[test]
fn gather_with_a_float_index() {
    expect_type_error(
        Op::Gather { axis: 0 },
        &[ty(DType::F32, &[4, 2]), ty(DType::F32, &[3, 2])],
        "gather",
        &["indices must be i32 or i64, got f32"],
    );
    expect_type_error(
        Op::Gather { axis: 0 },
        &[ty(DType::F32, &[4, 2]), ty(DType::I64, &[3, 1])],
        "gather",
        &["must match f32[4, 2] outside axis 0"],
    );
    expect_type_error(
        Op::ScatterAdd { axis: 0 },
        &[
            ty(DType::F32, &[4]),
            ty(DType::I64, &[3]),
            ty(DType::F32, &[2]),
        ],
        "scatter_add",
        &["source f32[2]"],
    );
}

#[test]
fn binary_op_on_mismatched_shapes() {
    expect_type_error(
        Op::Binary(BinaryOp::Add),
        &[ty(DType::F32, &[2, 3]), ty(DType::F32, &[3, 2])],
        "add",
        &["operand types differ: f32[2, 3] vs f32[3, 2]"],
    );
    expect_type_error(
        Op::Binary(BinaryOp::Mul),
        &[ty(DType::F32, &[2]), ty(DType::BF16, &[2])],
        "mul",
        &["operand types differ"],
    );
}

#[test]
fn div_on_ints() {
    expect_type_error(
        Op::Binary(BinaryOp::Div),
        &[ty(DType::I64, &[2]), ty(DType::I64, &[2])],
        "div",
        &["not defined on i64"],
    );
    expect_type_error(
        Op::Binary(BinaryOp::And),
        &[ty(DType::F32, &[2]), ty(DType::F32, &[2])],
        "and",
        &["not defined on f32"],
    );
    expect_type_error(
        Op::Unary(UnaryOp::Exp),
        &[ty(DType::I32, &[2])],
        "exp",
        &["not defined on i32"],
    );
    expect_type_error(
        Op::Unary(UnaryOp::Not),
        &[ty(DType::F32, &[2])],
        "not",
        &["not defined on f32"],
    );
}

#[test]
fn topk_k_too_big() {
    expect_type_error(
        Op::TopK { k: 6 },
        &[ty(DType::F32, &[2, 5])],
        "topk",
        &["k = 6 does not fit the last axis of f32[2, 5]"],
    );
    expect_type_error(
        Op::TopK { k: 0 },
        &[ty(DType::F32, &[2, 5])],
        "topk",
        &["k = 0"],
    );
}

#[test]
fn concat_with_mismatched_dims() {
    expect_type_error(
        Op::Concat { axis: 1 },
        &[ty(DType::F32, &[2, 3]), ty(DType::F32, &[3, 3])],
        "concat",
        &["f32[3, 3] does not match f32[2, 3] outside axis 1"],
    );
    expect_type_error(
        Op::Concat { axis: 0 },
        &[ty(DType::F32, &[2]), ty(DType::I32, &[2])],
        "concat",
        &["does not match"],
    );
    expect_type_error(
        Op::Concat { axis: 2 },
        &[ty(DType::F32, &[2, 3])],
        "concat",
        &["axis 2 is out of range for rank 2"],
    );
}

#[test]
fn other_typing_rules() {
    expect_type_error(
        Op::Reduce {
            kind: ReduceKind::Max,
            axes: vec![1, 1],
        },
        &[ty(DType::F32, &[2, 3])],
        "reduce_max",
        &["axis 1 is repeated"],
    );
    expect_type_error(
        Op::Select,
        &[
            ty(DType::F32, &[2]),
            ty(DType::F32, &[2]),
            ty(DType::F32, &[2]),
        ],
        "select",
        &["condition must be bool"],
    );
    expect_type_error(
        Op::Const {
            value: 0.5,
            ty: ty(DType::I32, &[2]),
        },
        &[],
        "const",
        &["0.5 is not representable in i32"],
    );
    expect_type_error(
        Op::Fused(FusedOp::RmsNorm { eps: 1e-6 }),
        &[ty(DType::F32, &[2, 4]), ty(DType::F32, &[2])],
        "fused.rms_norm",
        &["weight f32[2]"],
    );
    expect_type_error(
        Op::Unary(UnaryOp::Neg),
        &[ty(DType::F32, &[2]), ty(DType::F32, &[2])],
        "neg",
        &["takes 1 operand(s), got 2"],
    );
}

#[test]
fn unknown_operand_value() {
    let mut g = Graph::new(Stage::Frontend);
    let err = g
        .add_node(Op::Unary(UnaryOp::Neg), &[Value(3)], root())
        .unwrap_err();
    assert_eq!(err, GraphError::UnknownValue(Value(3)));
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert!(g.nodes().is_empty());
}
