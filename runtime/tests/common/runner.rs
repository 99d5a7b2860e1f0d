//! The small optimizer-like program the compiled-runner tests replay, and its runner.

// Each test binary that includes this module uses part of it.
#![allow(dead_code)]

use mmc_codegen::compiled::Compiler;
use mmc_ir::plan::{Program, StateUpdate};
use mmc_ir::{BinaryOp, DType, Graph, Op, ReduceKind, ScopeId, Stage};
use mmc_ir::{Tensor, TensorType, UnaryOp, Value};
use mmc_runtime::compiled::CompiledRunner;

fn add(g: &mut Graph, op: Op, ins: &[Value]) -> Value {
    let id = g
        .add_node(op, ins, ScopeId::default())
        .expect("a valid node");
    g.result(id)
}

/// `m' = 0.9 m + w * x`, `w' = w - 0.1 m'`, `v' = v + 1` computed before `v` is read again,
/// `loss = sum(w' * w') + sum(v)`.
pub fn program() -> Program {
    program_of(3)
}

/// [`program`] over tensors of `rows` x 1037 (more than one tile of a kernel from 4 rows on).
pub fn program_of(rows: usize) -> Program {
    let t = TensorType::new(DType::F32, vec![rows, 1037]);
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

pub fn tensor(seed: u64) -> Tensor {
    tensor_of(3, seed)
}

/// A [`tensor`] of `rows` x 1037.
pub fn tensor_of(rows: usize, seed: u64) -> Tensor {
    let v: Vec<f64> = (0..rows * 1037)
        .map(|i| ((i as u64 * 7919 + seed * 31) % 1000) as f64 / 500.0 - 1.0)
        .collect();
    Tensor::from_f64(DType::F32, vec![rows, 1037], &v).expect("sizes")
}

pub fn compiled(p: &Program, dir: &std::path::Path, threads: usize) -> CompiledRunner {
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
    load(&c, cp, dir, threads)
}

/// Compiles any program and loads it on `threads` threads.
pub fn compiled_any(p: &Program, dir: &std::path::Path, threads: usize) -> CompiledRunner {
    let mut c = Compiler::default();
    let cp = c.program(p).expect("compiles");
    load(&c, cp, dir, threads)
}

/// Builds the kernels of `c` into a library in `dir` and loads `cp` over it.
fn load(
    c: &Compiler,
    cp: mmc_codegen::compiled::CompiledProgram,
    dir: &std::path::Path,
    threads: usize,
) -> CompiledRunner {
    let so = dir.join(format!("{}.so", cp.name));
    let hash =
        mmc_codegen::cpu::build_library(&c.kernels, &mmc_codegen::cpu::CpuTarget::host(), &so)
            .expect("builds");
    let entries = c.kernels.iter().map(Into::into).collect();
    // SAFETY: just built from this program.
    unsafe { CompiledRunner::new(&so, &hash, entries, vec![cp], threads) }.expect("loads")
}
