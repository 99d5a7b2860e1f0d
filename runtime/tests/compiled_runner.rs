//! The compiled runner against the interpreter on a small optimizer-like program: state read
//! and updated (in place when nothing reads the state afterwards, copied at the end when
//! something does), a data input, a reduction output, replayed over several steps.

use mmc_codegen::compiled::Compiler;
use mmc_ir::plan::{Program, StateUpdate};
use mmc_ir::{BinaryOp, DType, Graph, Interpreter, Op, Precision, ReduceKind, ScopeId, Stage};
use mmc_ir::{Tensor, TensorType, UnaryOp, Value};
use mmc_runtime::compiled::{CompiledError, CompiledRunner};
use std::collections::{BTreeMap, HashMap};

fn add(g: &mut Graph, op: Op, ins: &[Value]) -> Value {
    let id = g
        .add_node(op, ins, ScopeId::default())
        .expect("a valid node");
    g.result(id)
}

/// `m' = 0.9 m + w * x`, `w' = w - 0.1 m'`, `v' = v + 1` computed before `v` is read again,
/// `loss = sum(w' * w') + sum(v)`.
fn program() -> Program {
    let t = TensorType::new(DType::F32, vec![3, 1037]);
    let mut g = Graph::new(Stage::Optimizer);
    let w = add(
        &mut g,
        Op::Param {
            name: "w".into(),
            ty: t.clone(),
        },
        &[],
    );
    let m = add(
        &mut g,
        Op::Param {
            name: "m".into(),
            ty: t.clone(),
        },
        &[],
    );
    let v = add(
        &mut g,
        Op::Param {
            name: "v".into(),
            ty: t.clone(),
        },
        &[],
    );
    let x = add(
        &mut g,
        Op::Input {
            name: "x".into(),
            ty: t.clone(),
        },
        &[],
    );
    let c = |g: &mut Graph, value: f64| {
        add(
            g,
            Op::Const {
                value,
                ty: t.clone(),
            },
            &[],
        )
    };
    let one = c(&mut g, 1.0);
    let v_new = add(&mut g, Op::Binary(BinaryOp::Add), &[v, one]);
    let k9 = c(&mut g, 0.9);
    let m9 = add(&mut g, Op::Binary(BinaryOp::Mul), &[m, k9]);
    let wx = add(&mut g, Op::Binary(BinaryOp::Mul), &[w, x]);
    let m_new = add(&mut g, Op::Binary(BinaryOp::Add), &[m9, wx]);
    let k1 = c(&mut g, 0.1);
    let step = add(&mut g, Op::Binary(BinaryOp::Mul), &[m_new, k1]);
    let w_new = add(&mut g, Op::Binary(BinaryOp::Sub), &[w, step]);
    let sq = add(&mut g, Op::Binary(BinaryOp::Mul), &[w_new, w_new]);
    let all = |g: &mut Graph, x: Value| {
        add(
            g,
            Op::Reduce {
                kind: ReduceKind::Sum,
                axes: vec![0, 1],
            },
            &[x],
        )
    };
    let s1 = all(&mut g, sq);
    let vt = add(&mut g, Op::Unary(UnaryOp::Abs), &[v]);
    let s2 = all(&mut g, vt);
    let loss = add(&mut g, Op::Binary(BinaryOp::Add), &[s1, s2]);
    g.add_output("loss", loss);
    g.add_output("w_new", w_new);
    g.add_output("m_new", m_new);
    g.add_output("v_new", v_new);
    let up = |o: &str, s: &str| StateUpdate {
        output: o.into(),
        state: s.into(),
    };
    Program::new(
        "apply",
        g,
        vec![up("w_new", "w"), up("m_new", "m"), up("v_new", "v")],
    )
}

fn tensor(seed: u64) -> Tensor {
    let v: Vec<f64> = (0..3 * 1037)
        .map(|i| ((i as u64 * 7919 + seed * 31) % 1000) as f64 / 500.0 - 1.0)
        .collect();
    Tensor::from_f64(DType::F32, vec![3, 1037], &v).expect("sizes")
}

fn compiled(p: &Program, dir: &std::path::Path, threads: usize) -> CompiledRunner {
    let mut c = Compiler::default();
    let cp = c.program(p).expect("compiles");
    // w and m are updated in place; v is read after its update is computed, so it is copied.
    let in_place: Vec<&str> = cp
        .outputs
        .iter()
        .filter(|o| matches!((o.update, o.loc), (Some(i), mmc_codegen::compiled::Loc::Bound(j)) if i == j))
        .map(|o| o.name.as_str())
        .collect();
    assert_eq!(in_place, vec!["w_new", "m_new"], "{:?}", cp.outputs);
    let so = dir.join("k.so");
    let hash =
        mmc_codegen::cpu::build_library(&c.kernels, &mmc_codegen::cpu::CpuTarget::host(), &so)
            .expect("builds");
    let entries = c.kernels.iter().map(Into::into).collect();
    // SAFETY: just built from these programs.
    unsafe { CompiledRunner::new(&so, &hash, entries, vec![cp], threads) }.expect("loads")
}

#[test]
fn the_compiled_program_replays_the_interpreters_steps() {
    let p = program();
    let dir = tempfile::tempdir().expect("a folder");
    for threads in [1, 2] {
        let mut runner = compiled(&p, dir.path(), threads);
        let mut state: HashMap<String, Tensor> =
            [("w", tensor(1)), ("m", tensor(2)), ("v", tensor(3))]
                .into_iter()
                .map(|(n, t)| (n.to_string(), t))
                .collect();
        let mut want = state.clone();
        for step in 0..3 {
            let data: BTreeMap<String, Tensor> = [("x".to_string(), tensor(10 + step))].into();
            let out = runner.run("apply", &mut state, &data).expect("runs");
            assert_eq!(
                out.keys().collect::<Vec<_>>(),
                vec!["loss"],
                "updates are not returned"
            );
            let mut bind: HashMap<String, Tensor> = want.clone();
            bind.extend(data.clone());
            let r = Interpreter::new(&p.graph, Precision::Declared)
                .expect("verifies")
                .run(&bind)
                .expect("runs");
            for u in &p.updates {
                want.insert(
                    u.state.clone(),
                    r.get(&u.output).expect("an update").clone(),
                );
            }
            let (a, b) = (
                out["loss"].to_f64_vec()[0],
                r.get("loss").expect("loss").to_f64_vec()[0],
            );
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "step {step}: loss {a} vs {b}"
            );
            for name in ["w", "m", "v"] {
                assert_eq!(
                    state[name], want[name],
                    "step {step}, {name} on {threads} threads"
                );
            }
        }
    }
}

#[test]
fn a_missing_or_mistyped_binding_is_an_error() {
    let p = program();
    let dir = tempfile::tempdir().expect("a folder");
    let mut runner = compiled(&p, dir.path(), 1);
    let mut state: HashMap<String, Tensor> = [("w", tensor(1)), ("m", tensor(2)), ("v", tensor(3))]
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
    let e = runner
        .run("apply", &mut state, &BTreeMap::new())
        .expect_err("x is missing");
    assert!(
        matches!(&e, CompiledError::Unbound { name, .. } if name == "x"),
        "{e}"
    );
    let bad = Tensor::from_f64(DType::F32, vec![3, 1036], &vec![0.0; 3 * 1036]).expect("sizes");
    let e = runner
        .run("apply", &mut state, &[("x".to_string(), bad)].into())
        .expect_err("x is mistyped");
    assert!(
        e.to_string().contains("`x`") && e.to_string().contains("1036"),
        "{e}"
    );
    let e = runner
        .run("micro_step", &mut state, &BTreeMap::new())
        .expect_err("no such program");
    assert!(e.to_string().contains("micro_step"), "{e}");
}
