//! The text format (printer and parser) and the Graphviz output.

use mmc_ir::op::{Attrs, BINARY, COMPARE, UNARY};
use mmc_ir::text::{parse, print, ParseError};
use mmc_ir::{
    verify, BinaryOp, CmpOp, DType, FusedOp, Graph, Interpreter, Op, Precision, ReduceKind,
    ScopeId, Stage, Tensor, TensorType, UnaryOp, Value,
};
use proptest::prelude::*;
use std::collections::HashMap;

fn ty(dtype: DType, shape: &[usize]) -> TensorType {
    TensorType::new(dtype, shape.to_vec())
}

fn add(g: &mut Graph, scope: ScopeId, op: Op, inputs: &[Value]) -> Value {
    let id = g.add_node(op, inputs, scope).expect("well typed");
    g.result(id)
}

/// Embedding lookup, RMSNorm from primitives, logits, a causal-style mask and the top two
/// logits: scopes, params, inputs, list/float/bool attributes, a long chain, two outputs.
fn sample_graph() -> Graph {
    let mut g = Graph::new(Stage::Frontend);
    let root = g.intern_scope("");
    let ids = add(
        &mut g,
        root,
        Op::Input {
            name: "ids".into(),
            ty: ty(DType::I64, &[2, 1]),
        },
        &[],
    );

    let embed = g.intern_scope("model.embed");
    let table = add(
        &mut g,
        embed,
        Op::Param {
            name: "model.embed.weight".into(),
            ty: ty(DType::F32, &[5, 4]),
        },
        &[],
    );
    let idx = add(&mut g, embed, Op::Broadcast { shape: vec![2, 4] }, &[ids]);
    let h = add(&mut g, embed, Op::Gather { axis: 0 }, &[table, idx]);

    let norm = g.intern_scope("model.norm");
    let w = add(
        &mut g,
        norm,
        Op::Param {
            name: "model.norm.weight".into(),
            ty: ty(DType::F32, &[4]),
        },
        &[],
    );
    let sq = add(&mut g, norm, Op::Binary(BinaryOp::Mul), &[h, h]);
    let ss = add(
        &mut g,
        norm,
        Op::Reduce {
            kind: ReduceKind::Sum,
            axes: vec![1],
        },
        &[sq],
    );
    let quarter = add(
        &mut g,
        norm,
        Op::Const {
            value: 0.25,
            ty: ty(DType::F32, &[2, 1]),
        },
        &[],
    );
    let ms = add(&mut g, norm, Op::Binary(BinaryOp::Mul), &[ss, quarter]);
    let eps = add(
        &mut g,
        norm,
        Op::Const {
            value: 1e-6,
            ty: ty(DType::F32, &[2, 1]),
        },
        &[],
    );
    let ms = add(&mut g, norm, Op::Binary(BinaryOp::Add), &[ms, eps]);
    let r = add(&mut g, norm, Op::Unary(UnaryOp::Rsqrt), &[ms]);
    let r = add(&mut g, norm, Op::Broadcast { shape: vec![2, 4] }, &[r]);
    let hn = add(&mut g, norm, Op::Binary(BinaryOp::Mul), &[h, r]);
    let w = add(&mut g, norm, Op::Reshape { shape: vec![1, 4] }, &[w]);
    let w = add(&mut g, norm, Op::Broadcast { shape: vec![2, 4] }, &[w]);
    let hn = add(&mut g, norm, Op::Binary(BinaryOp::Mul), &[hn, w]);

    let head = g.intern_scope("lm_head");
    let wh = add(
        &mut g,
        head,
        Op::Param {
            name: "lm_head.weight".into(),
            ty: ty(DType::F32, &[5, 4]),
        },
        &[],
    );
    let wt = add(&mut g, head, Op::Permute { perm: vec![1, 0] }, &[wh]);
    let logits = add(&mut g, head, Op::MatMul, &[hn, wt]);

    let pos = add(
        &mut g,
        root,
        Op::Iota {
            axis: 1,
            ty: ty(DType::I64, &[2, 5]),
        },
        &[],
    );
    let limit = add(
        &mut g,
        root,
        Op::Const {
            value: 3.0,
            ty: ty(DType::I64, &[2, 5]),
        },
        &[],
    );
    let keep = add(&mut g, root, Op::Compare(CmpOp::Lt), &[pos, limit]);
    let ninf = add(
        &mut g,
        root,
        Op::Const {
            value: f64::NEG_INFINITY,
            ty: ty(DType::F32, &[2, 5]),
        },
        &[],
    );
    let masked = add(&mut g, root, Op::Select, &[keep, logits, ninf]);
    let order = add(&mut g, root, Op::ArgSort { descending: true }, &[masked]);
    let top2 = add(
        &mut g,
        root,
        Op::Slice {
            start: vec![0, 0],
            end: vec![2, 2],
        },
        &[order],
    );
    g.add_output("logits", masked);
    g.add_output("top2", top2);
    g
}

/// Every op of the IR at least once, in a fused-stage graph, with awkward names and constants.
fn every_op_graph() -> Graph {
    let mut g = Graph::new(Stage::Fused);
    let s = g.intern_scope("blk.0 \"quoted\\scope\"");
    let r = ScopeId::default();
    let x = add(
        &mut g,
        r,
        Op::Input {
            name: "x \"odd\"\\name\nline2".into(),
            ty: ty(DType::F32, &[2, 3]),
        },
        &[],
    );
    let w = add(
        &mut g,
        s,
        Op::Param {
            name: "w".into(),
            ty: ty(DType::F32, &[3]),
        },
        &[],
    );
    let mut cur = x;
    for u in UNARY.into_iter().filter(|u| *u != UnaryOp::Not) {
        cur = add(&mut g, s, Op::Unary(u), &[cur]);
    }
    for b in BINARY
        .into_iter()
        .filter(|b| !matches!(b, BinaryOp::And | BinaryOp::Or))
    {
        cur = add(&mut g, r, Op::Binary(b), &[cur, x]);
    }
    let mut masks = Vec::new();
    for c in COMPARE {
        masks.push(add(&mut g, s, Op::Compare(c), &[cur, x]));
    }
    let m = add(&mut g, r, Op::Binary(BinaryOp::And), &[masks[0], masks[1]]);
    let m = add(&mut g, r, Op::Binary(BinaryOp::Or), &[m, masks[2]]);
    let m = add(&mut g, r, Op::Unary(UnaryOp::Not), &[m]);
    let big = add(
        &mut g,
        r,
        Op::Const {
            value: 1e20,
            ty: ty(DType::F32, &[2, 3]),
        },
        &[],
    );
    let cur = add(&mut g, r, Op::Select, &[m, cur, big]);
    let ci = add(&mut g, r, Op::Cast { to: DType::I32 }, &[cur]);
    let red = add(
        &mut g,
        r,
        Op::Reduce {
            kind: ReduceKind::Max,
            axes: vec![1, 0],
        },
        &[cur],
    );
    let red = add(
        &mut g,
        r,
        Op::Reduce {
            kind: ReduceKind::Sum,
            axes: vec![],
        },
        &[red],
    );
    let bc = add(&mut g, r, Op::Broadcast { shape: vec![2, 3] }, &[red]);
    let rs = add(
        &mut g,
        r,
        Op::Reshape {
            shape: vec![3, 1, 2],
        },
        &[bc],
    );
    let pm = add(
        &mut g,
        r,
        Op::Permute {
            perm: vec![2, 0, 1],
        },
        &[rs],
    );
    let sl = add(
        &mut g,
        r,
        Op::Slice {
            start: vec![1, 1, 0],
            end: vec![2, 3, 1],
        },
        &[pm],
    );
    let pd = add(
        &mut g,
        r,
        Op::Pad {
            low: vec![0, 1, 0],
            high: vec![1, 0, 2],
        },
        &[sl],
    );
    let cc = add(&mut g, r, Op::Concat { axis: 1 }, &[pd, pd, pd]);
    let ct = add(&mut g, r, Op::Permute { perm: vec![1, 0] }, &[cur]);
    let mm = add(&mut g, r, Op::MatMul, &[cur, ct]);
    let idx = add(
        &mut g,
        r,
        Op::Iota {
            axis: 0,
            ty: ty(DType::I64, &[2, 3]),
        },
        &[],
    );
    let ga = add(&mut g, r, Op::Gather { axis: 0 }, &[cur, idx]);
    let sa = add(&mut g, r, Op::ScatterAdd { axis: 0 }, &[cur, idx, ga]);
    let tk = add(&mut g, r, Op::TopK { k: 2 }, &[sa]);
    let asrt = add(&mut g, r, Op::ArgSort { descending: false }, &[ci]);
    let cs = add(&mut g, r, Op::CumSum { axis: 1 }, &[asrt]);
    let nan = add(
        &mut g,
        r,
        Op::Const {
            value: -0.0,
            ty: ty(DType::F64, &[]),
        },
        &[],
    );
    let bt = add(
        &mut g,
        r,
        Op::Const {
            value: 1.0,
            ty: ty(DType::Bool, &[4]),
        },
        &[],
    );
    let rn = add(
        &mut g,
        s,
        Op::Fused(FusedOp::RmsNorm { eps: 1e-5 }),
        &[cur, w],
    );
    g.add_output("cc", cc);
    g.add_output("tk", tk);
    g.add_output("cs", cs);
    g.add_output("zero", nan);
    g.add_output("bools", bt);
    g.add_output("rn", rn);
    g.add_output("mm", mm);
    g.add_output("again \"x\"", x);
    g
}

// ---------------------------------------------------------------------------------------------
// Snapshots
// ---------------------------------------------------------------------------------------------

#[test]
fn print_snapshot() {
    let g = sample_graph();
    assert_eq!(verify(&g), Ok(()));
    insta::assert_snapshot!(print(&g));
}

#[test]
fn dot_snapshot() {
    insta::assert_snapshot!(mmc_ir::dot::to_dot(&sample_graph()));
}

#[test]
fn dot_labels_are_graphviz_escaped() {
    let mut g = Graph::new(Stage::Frontend);
    let x = add(
        &mut g,
        ScopeId::default(),
        Op::Input {
            name: "say \"hi\"".into(),
            ty: ty(DType::F32, &[2]),
        },
        &[],
    );
    let y = add(&mut g, ScopeId::default(), Op::Unary(UnaryOp::Neg), &[x]);
    g.add_output("y", y);
    let dot = mmc_ir::dot::to_dot(&g);
    // One escaped quote per quote in the name, a Graphviz line break, no doubled quoting.
    assert!(
        dot.contains(r#"[ label = "input say \"hi\"\lf32[2]" ]"#),
        "{dot}"
    );
    assert!(dot.contains(r#"[ label = "neg\lf32[2]" ]"#), "{dot}");
    assert!(dot.contains(r#"[ label = "output y" ]"#), "{dot}");
    assert!(dot.contains("0 -> 1"), "{dot}");
    assert!(dot.contains("1 -> 2"), "{dot}");
}

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

#[track_caller]
fn round_trip(g: &Graph) -> Graph {
    let text = print(g);
    let parsed = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(print(&parsed), text);
    assert_eq!(verify(&parsed), Ok(()), "{text}");
    parsed
}

#[test]
fn sample_graph_round_trips_structurally() {
    let g = sample_graph();
    assert_eq!(round_trip(&g), g);
}

#[test]
fn every_op_round_trips_structurally() {
    let g = every_op_graph();
    assert_eq!(verify(&g), Ok(()));
    let text = print(&g);
    assert!(text.contains("value=1e20"), "{text}");
    assert!(text.contains("value=-0.0"), "{text}");
    assert!(
        text.contains("scope \"blk.0 \\\"quoted\\\\scope\\\"\""),
        "{text}"
    );
    let parsed = round_trip(&g);
    assert_eq!(parsed, g);
    assert_eq!(
        parsed.inputs().next().unwrap().0,
        "x \"odd\"\\name\nline2",
        "escapes in names survive"
    );
    // Every op mnemonic appears.
    for name in [
        "param",
        "input",
        "const",
        "iota",
        "select",
        "cast",
        "reduce_sum",
        "reduce_max",
        "broadcast",
        "reshape",
        "permute",
        "slice",
        "pad",
        "concat",
        "matmul",
        "gather",
        "scatter_add",
        "topk",
        "argsort",
        "cumsum",
        "fused.rms_norm",
        "not",
        "and",
        "or",
    ] {
        assert!(
            text.contains(&format!(" = {name} ")),
            "{name} missing:\n{text}"
        );
    }
}

/// Every fused op (`mmc_ir::fused::all()`, plus attention without segment ids and with other
/// attributes) on small operands of the types its typing rule wants, each result an output.
fn every_fused_op_graph() -> Graph {
    let mut g = Graph::new(Stage::Fused);
    let r = ScopeId::default();
    let input = |g: &mut Graph, name: &str, dtype: DType, shape: &[usize]| {
        add(
            g,
            r,
            Op::Input {
                name: name.into(),
                ty: ty(dtype, shape),
            },
            &[],
        )
    };
    let x = input(&mut g, "x", DType::F32, &[2, 4]);
    let w = input(&mut g, "w", DType::F32, &[4]);
    let b = input(&mut g, "b", DType::F32, &[4]);
    let cos = input(&mut g, "cos", DType::F32, &[1, 4]);
    let sin = input(&mut g, "sin", DType::F32, &[1, 4]);
    let q = input(&mut g, "q", DType::F32, &[1, 2, 3, 4]);
    let kv = input(&mut g, "kv", DType::F32, &[1, 1, 3, 4]);
    let seg = input(&mut g, "seg", DType::I64, &[1, 3]);
    let head = input(&mut g, "head", DType::F32, &[5, 4]);
    let target = input(&mut g, "target", DType::I64, &[2]);
    let weight = input(&mut g, "weight", DType::F32, &[2]);
    let dloss = input(&mut g, "dloss", DType::F32, &[]);
    let top = input(&mut g, "top", DType::I64, &[2, 1]);
    let top_w = input(&mut g, "top_w", DType::F32, &[2, 1]);
    let ew = input(&mut g, "ew", DType::F32, &[1, 4, 3]);
    let off = input(&mut g, "off", DType::I64, &[2]);
    let gy = input(&mut g, "gy", DType::F32, &[2, 3]);
    let wt = input(&mut g, "wt", DType::F32, &[4, 3]);
    let operands = |op: &FusedOp| -> Vec<Value> {
        use FusedOp::*;
        match op {
            RmsNorm { .. } => vec![x, w],
            LayerNorm { .. } => vec![x, w, b],
            Softmax | LogSoftmax | Gelu | SumSquares => vec![x],
            SwiGlu | SoftmaxGrad | LogSoftmaxGrad | GeluGrad => vec![x, x],
            Rope | RopeGrad => vec![x, cos, sin],
            Attention { .. } => vec![q, kv, kv, seg],
            LinearCrossEntropy { .. } => vec![x, head, target, weight],
            MoePermute { .. } | MoePermuteGrad => vec![x, top],
            ExpertOffsets { .. } => vec![top],
            GroupedMatMul => vec![x, ew, off],
            MoeUnpermute => vec![x, top, top_w],
            RmsNormGrad { .. } | LayerNormGrad { .. } => vec![x, w, x],
            SwiGluGrad => vec![x, x, x],
            AttentionGrad { .. } => vec![q, kv, kv, seg, q],
            LinearCrossEntropyGrad { .. } | LinearCrossEntropyWithGrad { .. } => {
                vec![x, head, target, weight, dloss]
            }
            GroupedMatMulGrad => vec![x, ew, off, gy],
            MoeUnpermuteGrad => vec![x, top, top_w, x],
            Elementwise { .. } => vec![x],
            MatMulEpilogue { .. } => vec![x, wt, gy],
        }
    };
    let mut ops: Vec<(FusedOp, Vec<Value>)> = mmc_ir::fused::all()
        .into_iter()
        .map(|op| {
            let ins = operands(&op);
            (op, ins)
        })
        .collect();
    let odd = FusedOp::Attention {
        scale: 0.35355339059327373,
        causal: false,
    };
    let odd_grad = FusedOp::AttentionGrad {
        scale: 1e-3,
        causal: false,
    };
    ops.push((odd, vec![q, kv, kv]));
    ops.push((odd_grad, vec![q, kv, kv, q]));
    ops.push((
        FusedOp::LinearCrossEntropy { chunk: 1 },
        operands(&FusedOp::LinearCrossEntropy { chunk: 1 }),
    ));
    for (i, (op, ins)) in ops.into_iter().enumerate() {
        let id = g.add_node(Op::Fused(op), &ins, r).expect("well typed");
        for (j, &v) in g.node(id).outputs.clone().iter().enumerate() {
            g.add_output(format!("r{i}.{j}"), v);
        }
    }
    g
}

#[test]
fn every_fused_op_round_trips_and_runs() {
    let g = every_fused_op_graph();
    assert_eq!(verify(&g), Ok(()));
    let text = print(&g);
    let parsed = round_trip(&g);
    assert_eq!(parsed, g);
    for op in mmc_ir::fused::all() {
        let name = op.name();
        assert!(
            text.contains(&format!(" = {name} ")),
            "{name} missing:\n{text}"
        );
    }
    // The backward ops print all their results on one line.
    for (name, results) in [
        ("fused.rms_norm_grad", 2),
        ("fused.layer_norm_grad", 3),
        ("fused.swiglu_grad", 2),
        ("fused.attention_grad", 3),
        ("fused.linear_cross_entropy_grad", 2),
        ("fused.grouped_matmul_grad", 2),
        ("fused.moe_unpermute_grad", 2),
    ] {
        let line = text
            .lines()
            .find(|l| l.contains(&format!(" = {name} ")))
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"));
        let lhs = line.trim().split(" = ").next().unwrap();
        assert_eq!(lhs.matches('%').count(), results, "{line}");
    }
    assert!(
        text.contains("scale=0.35355339059327373 causal=false"),
        "{text}"
    );
    assert!(text.contains("chunk=1024"), "{text}");
    // The parsed program runs (every top index is expert 0 of 1, the offsets split 2 rows).
    let mut binds = bind_all(&parsed);
    binds.insert(
        "top".into(),
        Tensor::new(vec![2, 1], mmc_ir::TensorData::I64(vec![0, 0])).unwrap(),
    );
    binds.insert(
        "off".into(),
        Tensor::new(vec![2], mmc_ir::TensorData::I64(vec![0, 2])).unwrap(),
    );
    binds.insert(
        "target".into(),
        Tensor::new(vec![2], mmc_ir::TensorData::I64(vec![4, -100])).unwrap(),
    );
    binds.insert(
        "seg".into(),
        Tensor::new(vec![1, 3], mmc_ir::TensorData::I64(vec![1, 1, 2])).unwrap(),
    );
    let outs = Interpreter::new(&parsed, Precision::Declared)
        .unwrap()
        .run(&binds)
        .unwrap();
    assert_eq!(outs.0.len(), g.outputs().len());
}

#[test]
fn nan_and_infinite_constants_round_trip_as_text() {
    let mut g = Graph::new(Stage::Frontend);
    let r = ScopeId::default();
    let mut outs = Vec::new();
    for v in [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        5e-324,
        f64::MAX,
        -1.5,
    ] {
        outs.push(add(
            &mut g,
            r,
            Op::Const {
                value: v,
                ty: ty(DType::F64, &[1]),
            },
            &[],
        ));
    }
    for (i, v) in outs.into_iter().enumerate() {
        g.add_output(format!("c{i}"), v);
    }
    let text = print(&g);
    for needle in ["value=nan", "value=inf", "value=-inf", "value=5e-324"] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    let parsed = round_trip(&g);
    let values: Vec<f64> = parsed
        .nodes()
        .iter()
        .map(|n| match n.op {
            Op::Const { value, .. } => value,
            _ => unreachable!(),
        })
        .collect();
    assert!(values[0].is_nan());
    assert_eq!(
        &values[1..],
        &[f64::INFINITY, f64::NEG_INFINITY, 5e-324, f64::MAX, -1.5]
    );
}

#[test]
fn scopes_can_return_to_the_root() {
    let mut g = Graph::new(Stage::Frontend);
    let a = g.intern_scope("a");
    let r = ScopeId::default();
    let x = add(
        &mut g,
        a,
        Op::Input {
            name: "x".into(),
            ty: ty(DType::F32, &[]),
        },
        &[],
    );
    let y = add(&mut g, r, Op::Unary(UnaryOp::Neg), &[x]);
    let z = add(&mut g, a, Op::Unary(UnaryOp::Neg), &[y]);
    g.add_output("z", z);
    let text = print(&g);
    assert_eq!(
        text,
        "graph frontend {\n  scope \"a\"\n  %0 = input \"x\" : f32[]\n  scope \"\"\n  \
         %1 = neg %0 : f32[]\n  scope \"a\"\n  %2 = neg %1 : f32[]\n  output \"z\" = %2\n}\n"
    );
    let parsed = round_trip(&g);
    assert_eq!(parsed, g);
    assert_eq!(parsed.scope_name(parsed.nodes()[1].scope), "");
    assert_eq!(parsed.scope_name(parsed.nodes()[2].scope), "a");
}

#[test]
fn parser_renumbers_values_in_definition_order() {
    let text = "\
; a comment line
graph autodiff {

  %7 = input \"a\" : f64[2]   ; trailing comment
  %3 = exp %7 : f64[2]
  output \"y\" = %3
  output \"a\" = %7
}
";
    let g = parse(text).unwrap();
    assert_eq!(g.stage, Stage::Autodiff);
    assert_eq!(verify(&g), Ok(()));
    assert_eq!(
        print(&g),
        "graph autodiff {\n  %0 = input \"a\" : f64[2]\n  %1 = exp %0 : f64[2]\n  \
         output \"y\" = %1\n  output \"a\" = %0\n}\n"
    );
}

#[test]
fn parsed_graphs_run() {
    let g = parse(
        "graph frontend {
  %0 = input \"x\" : f32[3]
  %1 = const value=2 : f32[3]
  %2 = mul %0, %1 : f32[3]
  %3 = cumsum %2 axis=0 : f32[3]
  output \"y\" = %3
}",
    )
    .unwrap();
    let mut binds = HashMap::new();
    binds.insert(
        "x".to_string(),
        Tensor::from_f64(DType::F32, vec![3], &[1.0, 2.0, 3.0]).unwrap(),
    );
    let outs = Interpreter::new(&g, Precision::Declared)
        .unwrap()
        .run(&binds)
        .unwrap();
    assert_eq!(outs.get("y").unwrap().to_f64_vec(), [2.0, 6.0, 12.0]);
}

#[test]
fn op_names_round_trip_through_from_parts() {
    let t = [ty(DType::F32, &[2])];
    for op in UNARY
        .into_iter()
        .map(Op::Unary)
        .chain(BINARY.into_iter().map(Op::Binary))
        .chain(COMPARE.into_iter().map(Op::Compare))
        .chain([Op::Select, Op::MatMul])
    {
        let back = Op::from_parts(op.name(), None, &Attrs::default(), &t).unwrap();
        assert_eq!(back, op);
    }
}

// ---------------------------------------------------------------------------------------------
// Parse errors
// ---------------------------------------------------------------------------------------------

#[track_caller]
fn parse_err(text: &str) -> ParseError {
    match parse(text) {
        Ok(g) => panic!("parsed:\n{}", print(&g)),
        Err(e) => e,
    }
}

#[track_caller]
fn expect_parse_err(text: &str, line: usize, needle: &str) {
    let e = parse_err(text);
    assert_eq!(e.line, line, "{e}");
    assert!(e.message.contains(needle), "{needle:?} missing from {e}");
    assert!(e.to_string().starts_with(&format!("line {line}: ")), "{e}");
}

#[test]
fn error_unknown_op() {
    expect_parse_err(
        "graph frontend {
  %0 = input \"x\" : f32[2]
  %1 = frobnicate %0 : f32[2]
  output \"y\" = %1
}",
        3,
        "unknown op `frobnicate`",
    );
}

#[test]
fn error_undefined_value() {
    expect_parse_err(
        "graph frontend {
  ; comments and blank lines still count

  %0 = input \"x\" : f32[2]
  %1 = add %0, %5 : f32[2]
}",
        5,
        "%5 is not defined",
    );
    expect_parse_err(
        "graph frontend {
  %0 = input \"x\" : f32[2]
  output \"y\" = %1
}",
        3,
        "%1 is not defined",
    );
    expect_parse_err(
        "graph frontend {
  %0 = input \"x\" : f32[2]
  %0 = neg %0 : f32[2]
}",
        3,
        "%0 is defined twice",
    );
}

#[test]
fn error_missing_closing_brace() {
    expect_parse_err(
        "graph frontend {
  %0 = input \"x\" : f32[2]
  output \"y\" = %0
",
        3,
        "not closed",
    );
    expect_parse_err("", 1, "not closed");
}

#[test]
fn error_bad_type() {
    expect_parse_err(
        "graph frontend {
  %0 = input \"x\" : f33[2]
}",
        2,
        "unknown dtype `f33`",
    );
    expect_parse_err(
        "graph frontend {
  %0 = input \"x\" : f32[2]
  %1 = neg %0 : f32[2, x]
}",
        3,
        "expected a dimension size",
    );
    expect_parse_err(
        "graph frontend {
  %0 = input \"x\" : f32[-2]
}",
        2,
        "expected a dimension size",
    );
}

#[test]
fn error_unknown_attribute() {
    expect_parse_err(
        "graph frontend {
  %0 = input \"x\" : f32[2, 3]
  %1 = reduce_sum %0 axes=[1] keepdims=true : f32[2, 1]
}",
        3,
        "`reduce_sum` has no attribute `keepdims`",
    );
    expect_parse_err(
        "graph frontend {
  %0 = input \"x\" : f32[2, 3]
  %1 = reduce_sum %0 : f32[2, 1]
}",
        3,
        "missing attribute `axes`",
    );
    expect_parse_err(
        "graph frontend {
  %0 = input \"x\" : f32[2, 3]
  %1 = permute %0 perm=[1, -1] : f32[3, 2]
}",
        3,
        "non-negative",
    );
    expect_parse_err(
        "graph frontend {
  %0 = input \"x\" : f32[2, 3]
  %1 = argsort %0 descending=1 : i64[2, 3]
}",
        3,
        "true or false",
    );
}

#[test]
fn error_structure() {
    expect_parse_err("graph nowhere {\n}", 1, "unknown stage `nowhere`");
    expect_parse_err("grph frontend {\n}", 1, "expected `graph <stage> {`");
    expect_parse_err("graph frontend {\n}\n%0 = x", 3, "after the closing");
    expect_parse_err(
        "graph frontend {\n  %0 = input : f32[2]\n}",
        2,
        "needs a quoted name",
    );
    expect_parse_err(
        "graph frontend {\n  %0 = input \"x\" : f32[2] extra\n}",
        2,
        "unexpected text",
    );
    expect_parse_err(
        "graph frontend {\n  %0 = input \"x : f32[2]\n}",
        2,
        "unterminated string",
    );
    expect_parse_err(
        "graph frontend {\n  %0 = input \"x\" : f32[2]\n  @\n}",
        3,
        "unexpected character",
    );
    expect_parse_err(
        "graph frontend {\n  %0, %1 = input \"x\" : f32[2]\n}",
        2,
        "2 result(s) but 1 type(s)",
    );
}

#[test]
fn parsed_but_ill_typed_programs_are_rejected_by_verify() {
    let mismatched = parse(
        "graph frontend {
  %0 = input \"a\" : f32[2]
  %1 = input \"b\" : f32[3]
  %2 = add %0, %1 : f32[2]
  output \"y\" = %2
}",
    )
    .expect("syntactically fine");
    let err = verify(&mismatched).unwrap_err();
    assert!(err.to_string().contains("operand types differ"), "{err}");

    let wrong_result = parse(
        "graph frontend {
  %0 = input \"a\" : f32[2, 3]
  %1 = reduce_max %0 axes=[0] : f32[3]
}",
    )
    .unwrap();
    let err = verify(&wrong_result).unwrap_err();
    assert!(
        err.to_string()
            .contains("`reduce_max` produces f32[1, 3] but the node says f32[3]"),
        "{err}"
    );

    let fused_in_frontend = parse(
        "graph frontend {
  %0 = input \"x\" : f32[2, 4]
  %1 = param \"w\" : f32[4]
  %2 = fused.rms_norm %0, %1 eps=1e-6 : f32[2, 4]
}",
    )
    .unwrap();
    let err = verify(&fused_in_frontend).unwrap_err();
    assert!(err.to_string().contains("fused op"), "{err}");
    assert_eq!(
        verify(&parse(&print(&fused_in_frontend).replace("frontend", "fused")).unwrap()),
        Ok(())
    );

    let dup = parse(
        "graph frontend {
  %0 = param \"w\" : f32[2]
  %1 = param \"w\" : f32[2]
}",
    )
    .unwrap();
    assert!(verify(&dup)
        .unwrap_err()
        .to_string()
        .contains("bound twice"));
}

// ---------------------------------------------------------------------------------------------
// Property: random op chains build, verify, print, parse back and run identically
// ---------------------------------------------------------------------------------------------

const FLOAT_UNARY: [UnaryOp; 11] = [
    UnaryOp::Neg,
    UnaryOp::Abs,
    UnaryOp::Exp,
    UnaryOp::Log,
    UnaryOp::Sqrt,
    UnaryOp::Rsqrt,
    UnaryOp::Recip,
    UnaryOp::Tanh,
    UnaryOp::Erf,
    UnaryOp::Sin,
    UnaryOp::Cos,
];

const FLOAT_BINARY: [BinaryOp; 6] = [
    BinaryOp::Add,
    BinaryOp::Sub,
    BinaryOp::Mul,
    BinaryOp::Div,
    BinaryOp::Max,
    BinaryOp::Min,
];

/// Builds a chain on one input from `(kind, seed)` steps; every step is valid by construction.
fn random_chain(dtype: DType, shape: &[usize], steps: &[(u8, u32)]) -> Graph {
    let mut g = Graph::new(Stage::Frontend);
    let x = add(
        &mut g,
        ScopeId::default(),
        Op::Input {
            name: "x".into(),
            ty: ty(dtype, shape),
        },
        &[],
    );
    let mut cur = x;
    for (i, &(kind, seed)) in steps.iter().enumerate() {
        // Scopes are interned on first use so the parsed graph interns them in the same order.
        let scope = if seed & 0x100 != 0 {
            g.intern_scope(&format!("blk.{}", seed % 3))
        } else {
            ScopeId::default()
        };
        let t = g.ty(cur).clone();
        let rank = t.rank();
        let pick = |n: usize| (seed as usize) % n;
        let bits = (seed >> 10) as usize;
        match kind % 8 {
            0 => cur = add(&mut g, scope, Op::Unary(FLOAT_UNARY[pick(11)]), &[cur]),
            1 => {
                let other = match bits % 3 {
                    0 => cur,
                    1 => add(
                        &mut g,
                        scope,
                        Op::Const {
                            value: (seed % 7) as f64 * 0.5 - 1.25,
                            ty: t.clone(),
                        },
                        &[],
                    ),
                    _ => add(
                        &mut g,
                        scope,
                        Op::Param {
                            name: format!("p{i}"),
                            ty: t.clone(),
                        },
                        &[],
                    ),
                };
                cur = add(
                    &mut g,
                    scope,
                    Op::Binary(FLOAT_BINARY[pick(6)]),
                    &[cur, other],
                );
            }
            2 => {
                let mut axes: Vec<usize> = (0..rank).filter(|a| bits >> a & 1 == 1).collect();
                if seed & 0x200 != 0 {
                    axes.reverse();
                }
                let kind = if seed & 1 == 0 {
                    ReduceKind::Sum
                } else {
                    ReduceKind::Max
                };
                cur = add(&mut g, scope, Op::Reduce { kind, axes }, &[cur]);
            }
            3 => {
                let shape = match pick(3) {
                    0 => vec![t.numel()],
                    1 => t.shape.iter().rev().copied().collect(),
                    _ if rank < 4 => {
                        let mut s = t.shape.clone();
                        s.insert(bits % (rank + 1), 1);
                        s
                    }
                    _ => vec![t.numel()],
                };
                cur = add(&mut g, scope, Op::Reshape { shape }, &[cur]);
            }
            4 => {
                let mut perm: Vec<usize> = (0..rank).map(|d| (d + pick(rank)) % rank).collect();
                if bits & 1 == 1 {
                    perm.reverse();
                }
                cur = add(&mut g, scope, Op::Permute { perm }, &[cur]);
            }
            5 => {
                let shape: Vec<usize> = t
                    .shape
                    .iter()
                    .enumerate()
                    .map(|(d, &n)| if n == 1 { 1 + (bits >> d) % 3 } else { n })
                    .collect();
                cur = add(&mut g, scope, Op::Broadcast { shape }, &[cur]);
            }
            6 => {
                let zero = add(
                    &mut g,
                    scope,
                    Op::Const {
                        value: 0.0,
                        ty: t.clone(),
                    },
                    &[],
                );
                let cmp = [CmpOp::Lt, CmpOp::Ge, CmpOp::Ne][pick(3)];
                let mask = add(&mut g, scope, Op::Compare(cmp), &[cur, zero]);
                cur = add(&mut g, scope, Op::Select, &[mask, cur, zero]);
            }
            _ => {
                let axis = pick(rank);
                cur = if t.numel() <= 32 && bits & 1 == 1 {
                    add(&mut g, scope, Op::Concat { axis }, &[cur, cur])
                } else {
                    add(&mut g, scope, Op::CumSum { axis }, &[cur])
                };
            }
        }
    }
    g.add_output("y", cur);
    g.add_output("x", x);
    g
}

fn bind_all(g: &Graph) -> HashMap<String, Tensor> {
    g.params()
        .chain(g.inputs())
        .map(|(name, t, _)| {
            let values: Vec<f64> = (0..t.numel())
                .map(|k| ((k * 7 + name.len()) as f64 * 0.37).sin() * 3.0)
                .collect();
            (
                name.to_string(),
                Tensor::from_f64(t.dtype, t.shape.clone(), &values).unwrap(),
            )
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn random_chains_round_trip(
        dtype in prop::sample::select(vec![DType::F32, DType::F64, DType::BF16, DType::F16]),
        shape in prop::collection::vec(1usize..=4, 1..=3),
        steps in prop::collection::vec((any::<u8>(), any::<u32>()), 1..10),
    ) {
        let g = random_chain(dtype, &shape, &steps);
        prop_assert_eq!(verify(&g), Ok(()));
        let text = print(&g);
        let parsed = parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(print(&parsed), text.clone());
        prop_assert_eq!(verify(&parsed), Ok(()));
        prop_assert!(parsed == g, "structural mismatch for\n{}", text);

        // Both graphs compute the same bits.
        let binds = bind_all(&g);
        let a = Interpreter::new(&g, Precision::Declared).unwrap().run(&binds).unwrap();
        let b = Interpreter::new(&parsed, Precision::Declared).unwrap().run(&binds).unwrap();
        prop_assert_eq!(a.0.len(), 2);
        for ((na, ta), (nb, tb)) in a.0.iter().zip(&b.0) {
            prop_assert_eq!(na, nb);
            prop_assert_eq!(ta.ty(), tb.ty());
            prop_assert_eq!(ta.to_le_bytes(), tb.to_le_bytes());
        }
        prop_assert_eq!(a.get("y").unwrap().ty(), g.ty(g.output("y").unwrap()).clone());
    }
}
