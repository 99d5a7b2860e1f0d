//! One positive and one negative test per fusion rule (egg's `tests/math.rs` in spirit): each
//! positive builds the primitive form exactly as the frontend DSL emits it, each negative a
//! near miss that must stay primitive. Every case also runs both graphs on the interpreter
//! and compares the outputs. The file tests under `tests/filetests/fuse/` run here too, until
//! the shared file-test runner takes them over.

use mmc_frontend::dsl::BuildResult;
use mmc_frontend::{ModelBuilder, Sym};
use mmc_ir::plan::Init;
use mmc_ir::{
    text, verify, DType, Graph, Interpreter, Op, Precision, Shape, Stage, Tensor, UnaryOp,
};
use mmc_passes::fuse::rules::FuseRewrite;
use mmc_passes::fuse::{fuse, fuse_with, FuseLimits};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A graph with one output `y` declared by `f` (params f32, activations in `compute`).
fn build(compute: DType, f: impl FnOnce(&mut ModelBuilder) -> BuildResult<Sym>) -> Graph {
    let mut b = ModelBuilder::new(DType::F32, compute);
    let y = f(&mut b).expect("the test graph declares");
    b.output("y", y);
    b.finish()
}

/// Seeded uniform values in [-2, 2] for every float leaf of `g`.
fn bindings(g: &Graph, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = HashMap::new();
    for (name, ty, _) in g.params().chain(g.inputs()) {
        let vals: Vec<f64> = (0..ty.numel())
            .map(|i| match ty.dtype {
                d if d.is_float() => rng.random_range(-2.0..2.0),
                DType::Bool => f64::from(u8::from(i % 3 != 1)),
                _ => (i % 3) as f64,
            })
            .collect();
        let t = Tensor::from_f64(ty.dtype, ty.shape.clone(), &vals).expect("sized to the type");
        out.insert(name.to_string(), t);
    }
    out
}

/// Every output of `g` on `b`.
fn run(g: &Graph, b: &HashMap<String, Tensor>) -> Vec<(String, Vec<f64>)> {
    Interpreter::new(g, Precision::Declared)
        .expect("the graph verifies")
        .run(b)
        .expect("the graph runs")
        .0
        .into_iter()
        .map(|(n, t)| (n, t.to_f64_vec()))
        .collect()
}

/// Asserts that `f` computes what `g` computes, within `tol` relative to the largest output.
fn assert_same_outputs(g: &Graph, f: &Graph, tol: f64) {
    let b = bindings(g, 11);
    for ((name, want), (_, got)) in run(g, &b).into_iter().zip(run(f, &b)) {
        let norm = want.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
        for (i, (w, x)) in want.iter().zip(&got).enumerate() {
            assert!(
                (w - x).abs() <= tol * norm,
                "output {name}[{i}]: {x} after fusion, {w} before"
            );
        }
    }
}

/// The graph after fusion, checked by the verifier.
fn fused(g: &Graph) -> Graph {
    let (f, report) = fuse(g, &FuseLimits::default()).expect("the pass runs");
    assert!(report.saturated(), "{report}");
    verify(&f).expect("the fused graph verifies");
    assert_eq!(f.stage, Stage::Fused);
    f
}

fn count(g: &Graph, name: &str) -> usize {
    g.nodes().iter().filter(|n| n.op.name() == name).count()
}

fn fused_count(g: &Graph) -> usize {
    g.nodes()
        .iter()
        .filter(|n| matches!(n.op, Op::Fused(_)))
        .count()
}

/// Fuses `g`, expects exactly one `op` and only a few leftover nodes, and compares outputs.
fn assert_fuses(g: &Graph, op: &str, tol: f64) -> Graph {
    let f = fused(g);
    assert_eq!(count(&f, op), 1, "{}", text::print(&f));
    assert_eq!(fused_count(&f), 1, "{}", text::print(&f));
    assert_same_outputs(g, &f, tol);
    f
}

/// Fuses `g` and expects nothing fused and the same outputs.
fn assert_stays(g: &Graph) {
    let f = fused(g);
    assert_eq!(fused_count(&f), 0, "{}", text::print(&f));
    assert_same_outputs(g, &f, 0.0);
}

const EPS: f64 = 1e-6;

// ---------------------------------------------------------------------------------------------
// rms-norm, rms-norm-cast
// ---------------------------------------------------------------------------------------------

/// RMSNorm as `ModelBuilder::rms_norm` declares it, on x [2, 3, 8].
fn rms_norm_graph(compute: DType) -> Graph {
    build(compute, |b| {
        let x = b.input("x", compute, &[2, 3, 8])?;
        b.rms_norm("norm", x, EPS)
    })
}

#[test]
fn rms_norm_f32_fuses() {
    let f = assert_fuses(&rms_norm_graph(DType::F32), "fused.rms_norm", 1e-6);
    assert_eq!(count(&f, "rsqrt"), 0);
}

#[test]
fn rms_norm_bf16_fuses_its_cast_form() {
    let g = rms_norm_graph(DType::BF16);
    assert!(
        count(&g, "cast") >= 2,
        "the bf16 form casts to f32 and back"
    );
    let f = assert_fuses(&g, "fused.rms_norm", 1e-2);
    let node = f
        .nodes()
        .iter()
        .find(|n| n.op.name() == "fused.rms_norm")
        .expect("fused");
    assert_eq!(f.ty(node.outputs[0]).dtype, DType::BF16);
    assert_eq!(f.ty(node.inputs[0]).dtype, DType::BF16);
}

/// `w * (x * rsqrt(mean(x^2, axis) + eps))` with the mean over `axis` scaled by `1/n`.
fn rms_like(axis: usize, n: f64) -> Graph {
    build(DType::F32, |b| {
        let x = b.input("x", DType::F32, &[4, 4])?;
        let w = b.param("norm.weight", &[4], Init::Const(1.0))?;
        let sq = b.mul(x, x)?;
        let s = b.sum(sq, &[axis], true)?;
        let ms = b.mul_scalar(s, 1.0 / n)?;
        let ms = b.add_scalar(ms, EPS)?;
        let r = b.rsqrt(ms)?;
        let y = b.mul(x, r)?;
        b.mul(w, y)
    })
}

#[test]
fn rms_norm_matches_its_own_rebuild() {
    // The hand-built form over the last axis is the DSL's: it fuses.
    assert_fuses(&rms_like(1, 4.0), "fused.rms_norm", 1e-6);
}

#[test]
fn rms_norm_over_a_non_last_axis_stays() {
    assert_stays(&rms_like(0, 4.0));
}

#[test]
fn rms_norm_with_the_wrong_mean_scale_stays() {
    assert_stays(&rms_like(1, 3.0));
}

// ---------------------------------------------------------------------------------------------
// layer-norm, layer-norm-cast
// ---------------------------------------------------------------------------------------------

fn layer_norm_graph(compute: DType) -> Graph {
    build(compute, |b| {
        let x = b.input("x", compute, &[2, 3, 8])?;
        b.layer_norm("norm", x, 1e-5)
    })
}

#[test]
fn layer_norm_f32_fuses() {
    let f = assert_fuses(&layer_norm_graph(DType::F32), "fused.layer_norm", 1e-5);
    assert_eq!(count(&f, "reduce_sum"), 0);
}

#[test]
fn layer_norm_bf16_fuses_its_cast_form() {
    assert_fuses(&layer_norm_graph(DType::BF16), "fused.layer_norm", 1e-2);
}

/// LayerNorm whose variance is scaled by `1/var_n` (the unbiased estimator when d - 1).
fn layer_norm_like(var_n: f64) -> Graph {
    build(DType::F32, |b| {
        let x = b.input("x", DType::F32, &[3, 8])?;
        let w = b.param("norm.weight", &[8], Init::Const(1.0))?;
        let bias = b.param("norm.bias", &[8], Init::Const(0.0))?;
        let mu = b.mean(x, &[1], true)?;
        let c = b.sub(x, mu)?;
        let sq = b.mul(c, c)?;
        let s = b.sum(sq, &[1], true)?;
        let var = b.mul_scalar(s, 1.0 / var_n)?;
        let var = b.add_scalar(var, 1e-5)?;
        let r = b.rsqrt(var)?;
        let y = b.mul(c, r)?;
        let y = b.mul(y, w)?;
        b.add(y, bias)
    })
}

#[test]
fn layer_norm_matches_its_own_rebuild() {
    assert_fuses(&layer_norm_like(8.0), "fused.layer_norm", 1e-5);
}

#[test]
fn layer_norm_with_the_unbiased_variance_stays() {
    assert_stays(&layer_norm_like(7.0));
}

// ---------------------------------------------------------------------------------------------
// softmax
// ---------------------------------------------------------------------------------------------

fn softmax_graph(axis: usize) -> Graph {
    build(DType::F32, |b| {
        let x = b.input("x", DType::F32, &[3, 4])?;
        b.softmax(x, axis)
    })
}

#[test]
fn softmax_over_the_last_axis_fuses() {
    let f = assert_fuses(&softmax_graph(1), "fused.softmax", 1e-6);
    assert_eq!(count(&f, "exp"), 0);
}

#[test]
fn softmax_over_axis_0_of_a_matrix_stays() {
    assert_stays(&softmax_graph(0));
}

// ---------------------------------------------------------------------------------------------
// log-softmax
// ---------------------------------------------------------------------------------------------

fn log_softmax_graph(axis: usize) -> Graph {
    build(DType::F32, |b| {
        let x = b.input("x", DType::F32, &[3, 4])?;
        b.log_softmax(x, axis)
    })
}

#[test]
fn log_softmax_over_the_last_axis_fuses() {
    let f = assert_fuses(&log_softmax_graph(1), "fused.log_softmax", 1e-6);
    assert_eq!(count(&f, "exp"), 0);
    assert_eq!(count(&f, "log"), 0);
}

#[test]
fn log_softmax_over_axis_0_of_a_matrix_stays() {
    assert_stays(&log_softmax_graph(0));
}

/// `x - logsumexp(z)` for another tensor `z` of x's type is not a log-softmax of either.
#[test]
fn x_minus_the_logsumexp_of_another_tensor_stays() {
    let g = build(DType::F32, |b| {
        let x = b.input("x", DType::F32, &[3, 4])?;
        let z = b.input("z", DType::F32, &[3, 4])?;
        let l = b.logsumexp(z, 1)?;
        b.sub(x, l)
    });
    assert_stays(&g);
}

// ---------------------------------------------------------------------------------------------
// swiglu
// ---------------------------------------------------------------------------------------------

/// `silu(g) * u` as the MLP declares it; with `sign_error`, the sigmoid uses `exp(+g)`.
fn swiglu_graph(sign_error: bool) -> Graph {
    build(DType::F32, |b| {
        let g = b.input("gate", DType::F32, &[4, 6])?;
        let u = b.input("up", DType::F32, &[4, 6])?;
        let a = if sign_error {
            let e = b.exp(g)?;
            let d = b.add_scalar(e, 1.0)?;
            b.div(g, d)?
        } else {
            b.silu(g)?
        };
        b.mul(a, u)
    })
}

#[test]
fn swiglu_fuses() {
    assert_fuses(&swiglu_graph(false), "fused.swiglu", 1e-6);
}

#[test]
fn swiglu_with_exp_of_plus_gate_stays() {
    assert_stays(&swiglu_graph(true));
}

// ---------------------------------------------------------------------------------------------
// gelu
// ---------------------------------------------------------------------------------------------

/// `x/2 * (1 + erf(x * c))`: the exact GELU when `c = 1/sqrt 2`.
fn gelu_graph(c: Option<f64>) -> Graph {
    build(DType::F32, |b| {
        let x = b.input("x", DType::F32, &[4, 6])?;
        match c {
            None => b.gelu(x),
            Some(c) => {
                let s = b.mul_scalar(x, c)?;
                let e = b.erf(s)?;
                let one = b.add_scalar(e, 1.0)?;
                let h = b.mul_scalar(x, 0.5)?;
                b.mul(h, one)
            }
        }
    })
}

#[test]
fn gelu_fuses() {
    let f = assert_fuses(&gelu_graph(None), "fused.gelu", 1e-6);
    assert_eq!(count(&f, "erf"), 0);
}

#[test]
fn gelu_with_the_wrong_erf_scale_stays() {
    assert_stays(&gelu_graph(Some(0.5)));
}

// ---------------------------------------------------------------------------------------------
// rope, rope-full-tables
// ---------------------------------------------------------------------------------------------

/// How the rotated half is put together.
#[derive(Clone, Copy)]
enum Rotate {
    /// `cat(-x2, x1)`, as `apply_rope` does.
    Right,
    /// `cat(x1, -x2)`: the halves swapped.
    Swapped,
    /// `cat(-x1, x2)`: the negation on the wrong half.
    WrongSign,
}

/// `x * cos + rotate(x) * sin` on x [1, 2, 3, 4] with tables of shape `table`, as
/// `qwen3_moe.rs`'s `apply_rope` declares it.
fn rope_graph(table: &[usize], rotate: Rotate) -> Graph {
    let table: Shape = table.to_vec();
    build(DType::F32, |b| {
        let x = b.input("x", DType::F32, &[1, 2, 3, 4])?;
        let cos = b.input("cos", DType::F32, &table)?;
        let sin = b.input("sin", DType::F32, &table)?;
        let x1 = b.slice(x, 3, 0, 2)?;
        let x2 = b.slice(x, 3, 2, 4)?;
        let rot = match rotate {
            Rotate::Right => {
                let n = b.unary(UnaryOp::Neg, x2)?;
                b.concat(&[n, x1], 3)?
            }
            Rotate::Swapped => {
                let n = b.unary(UnaryOp::Neg, x2)?;
                b.concat(&[x1, n], 3)?
            }
            Rotate::WrongSign => {
                let n = b.unary(UnaryOp::Neg, x1)?;
                b.concat(&[n, x2], 3)?
            }
        };
        let a = b.mul(x, cos)?;
        let r = b.mul(rot, sin)?;
        b.add(a, r)
    })
}

#[test]
fn rope_with_broadcast_tables_fuses() {
    let f = assert_fuses(
        &rope_graph(&[1, 1, 3, 4], Rotate::Right),
        "fused.rope",
        1e-6,
    );
    // The tables enter unbroadcast: the op broadcasts them itself.
    let node = f
        .nodes()
        .iter()
        .find(|n| n.op.name() == "fused.rope")
        .expect("fused");
    assert_eq!(f.ty(node.inputs[1]).shape, vec![1, 1, 3, 4]);
    assert_eq!(count(&f, "concat"), 0);
}

#[test]
fn rope_with_swapped_halves_stays() {
    assert_stays(&rope_graph(&[1, 1, 3, 4], Rotate::Swapped));
}

#[test]
fn rope_full_tables_fuses() {
    assert_fuses(
        &rope_graph(&[1, 2, 3, 4], Rotate::Right),
        "fused.rope",
        1e-6,
    );
}

#[test]
fn rope_full_tables_with_the_negation_on_the_wrong_half_stays() {
    assert_stays(&rope_graph(&[1, 2, 3, 4], Rotate::WrongSign));
}

// ---------------------------------------------------------------------------------------------
// The engine around the rules
// ---------------------------------------------------------------------------------------------

#[test]
fn a_rule_that_changes_a_type_never_fires() {
    // exp(x) "=" cast(x, bf16): well-formed, but of another type than the e-class it would join.
    let bad: FuseRewrite = egg::rewrite!("bad-cast"; "(exp ?x)" => "(cast ?x bf16)");
    let g = build(DType::F32, |b| {
        let x = b.input("x", DType::F32, &[2, 3])?;
        b.exp(x)
    });
    let (f, report) = fuse_with(&g, &FuseLimits::default(), vec![bad]).expect("the pass runs");
    assert_eq!(report.rule_applications.get("bad-cast").copied(), None);
    assert_eq!(count(&f, "cast"), 0);
    assert_eq!(count(&f, "exp"), 1);
}

#[test]
fn a_forward_graph_is_required() {
    let mut g = softmax_graph(1);
    g.stage = Stage::Autodiff;
    let err = fuse(&g, &FuseLimits::default()).expect_err("an autodiff graph is refused");
    assert!(err.to_string().contains("frontend or fused"), "{err}");
    g.stage = Stage::Fused;
    let (f, _) = fuse(&g, &FuseLimits::default()).expect("a fused graph is taken");
    assert_eq!(count(&f, "fused.softmax"), 1);
}

#[test]
fn the_node_limit_is_reported() {
    let g = layer_norm_graph(DType::F32);
    let limits = FuseLimits {
        nodes: 10,
        ..FuseLimits::default()
    };
    let (f, report) = fuse(&g, &limits).expect("the pass runs");
    assert!(report.node_limit_hit().is_some(), "{report}");
    // Whatever was found is still correct.
    assert_same_outputs(&g, &f, 1e-5);
}

// ---------------------------------------------------------------------------------------------
// File tests (tests/filetests/fuse/*.mmcir)
// ---------------------------------------------------------------------------------------------

/// One case of a file test: the graph text and its directives.
struct Case {
    graph: String,
    checks: Vec<(bool, String)>,
}

/// Splits a `; test fuse` file into its `graph` cases, each with the `; check:` (true) and
/// `; not:` (false) lines that follow it.
fn cases(text: &str) -> Vec<Case> {
    let mut out: Vec<Case> = Vec::new();
    let mut in_graph = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("graph ") {
            in_graph = true;
            out.push(Case {
                graph: String::new(),
                checks: Vec::new(),
            });
        }
        if in_graph {
            let case = out.last_mut().expect("a case is open");
            case.graph.push_str(line);
            case.graph.push('\n');
            if t == "}" {
                in_graph = false;
            }
            continue;
        }
        let Some(case) = out.last_mut() else {
            continue;
        };
        if let Some(s) = t.strip_prefix("; check:") {
            case.checks.push((true, s.trim().to_string()));
        } else if let Some(s) = t.strip_prefix("; not:") {
            case.checks.push((false, s.trim().to_string()));
        }
    }
    out
}

/// Checks directives with filecheck's semantics: each `check` matches after the previous
/// match, each `not` must not occur between the matches around it (or after the last one).
fn check_directives(out: &str, directives: &[(bool, String)]) -> Result<(), String> {
    let mut at = 0;
    let mut pending: Vec<&str> = Vec::new();
    for (check, s) in directives {
        if !*check {
            pending.push(s);
            continue;
        }
        let k = out[at..]
            .find(s.as_str())
            .ok_or_else(|| format!("`; check: {s}` not found"))?;
        if let Some(n) = pending.iter().find(|n| out[at..at + k].contains(**n)) {
            return Err(format!("`; not: {n}` occurs before `{s}`"));
        }
        pending.clear();
        at += k + s.len();
    }
    match pending.iter().find(|n| out[at..].contains(**n)) {
        Some(n) => Err(format!("`; not: {n}` occurs after the last check")),
        None => Ok(()),
    }
}

#[test]
fn directives_follow_filecheck() {
    let d = |c: bool, s: &str| (c, s.to_string());
    let out = "a\nb\nc\n";
    assert!(check_directives(out, &[d(true, "a"), d(true, "c")]).is_ok());
    assert!(check_directives(out, &[d(true, "c"), d(true, "a")]).is_err());
    assert!(check_directives(out, &[d(true, "a"), d(false, "b"), d(true, "c")]).is_err());
    // A not only holds between its neighbours.
    assert!(check_directives(out, &[d(true, "b"), d(false, "a"), d(true, "c")]).is_ok());
    assert!(check_directives(out, &[d(true, "a"), d(false, "c")]).is_err());
}

/// Runs one file: every case parses, fuses, verifies, satisfies its directives and computes
/// what it computed before.
fn file_test(name: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/filetests/fuse")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("the file test exists");
    assert!(text.starts_with("; test fuse"), "{name}: not a fuse test");
    let cases = cases(&text);
    assert!(!cases.is_empty(), "{name}: no cases");
    for (i, case) in cases.iter().enumerate() {
        let g = text::parse(&case.graph).unwrap_or_else(|e| panic!("{name} case {i}: {e}"));
        verify(&g).unwrap_or_else(|e| panic!("{name} case {i}: {e}"));
        let f = fused(&g);
        let printed = text::print(&f);
        if let Err(e) = check_directives(&printed, &case.checks) {
            panic!("{name} case {i}: {e} in\n{printed}");
        }
        let bf16 = g
            .nodes()
            .iter()
            .any(|n| n.outputs.iter().any(|&v| g.ty(v).dtype == DType::BF16));
        assert_same_outputs(&g, &f, if bf16 { 1e-2 } else { 1e-5 });
    }
}

#[test]
fn file_rms_norm() {
    file_test("rms_norm.mmcir");
}

#[test]
fn file_layer_norm() {
    file_test("layer_norm.mmcir");
}

#[test]
fn file_softmax() {
    file_test("softmax.mmcir");
}

#[test]
fn file_log_softmax() {
    file_test("log_softmax.mmcir");
}

#[test]
fn file_swiglu() {
    file_test("swiglu.mmcir");
}

#[test]
fn file_gelu() {
    file_test("gelu.mmcir");
}

#[test]
fn file_rope() {
    file_test("rope.mmcir");
}
