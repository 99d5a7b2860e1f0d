//! A harness for the node lowerings: builds a one-node graph over given inputs, runs the
//! reference interpreter on it, lowers the node (`mmc_codegen::ops::lower_node`), compiles its
//! kernels for the host, runs them on 1 and 2 threads over fresh buffers (results and scratch
//! filled with garbage first), and compares every result with the interpreter's.

#![allow(dead_code)]

use mmc_codegen::cpu::{build_library, CpuTarget};
use mmc_codegen::kernel::GeneratedKernel;
use mmc_codegen::library::Workspace;
use mmc_codegen::native::{KernelLibrary, NativeError};
use mmc_codegen::ops::{lower_node, Arg, Lowered, Work};
use mmc_ir::{DType, Graph, Interpreter, Op, Precision, ScopeId, Stage, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// A thread pool of `threads` threads, as the runtime makes one per run.
pub fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool")
}

/// Random floats in `[-2, 2)` of `dtype` and `shape`, seeded.
pub fn random(dtype: DType, shape: &[usize], seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
    Tensor::from_f64(dtype, shape.to_vec(), &v).expect("sizes agree")
}

/// An i64 tensor.
pub fn ints(shape: &[usize], v: Vec<i64>) -> Tensor {
    Tensor::new(shape.to_vec(), TensorData::I64(v)).expect("sizes agree")
}

/// The bytes of `t` as kernels store them (bools one byte each).
pub fn bytes(t: &Tensor) -> Vec<u8> {
    match t.data() {
        TensorData::Bool(v) => v.iter().map(|&b| u8::from(b)).collect(),
        _ => t.to_le_bytes(),
    }
}

fn elem_bytes(d: DType) -> usize {
    match d {
        DType::Bool => 1,
        d => d.size_bytes(),
    }
}

/// The elements of stored bytes of dtype `d`, as f64.
pub fn values(d: DType, b: &[u8]) -> Vec<f64> {
    match d {
        DType::F32 => b
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        DType::F64 => b
            .chunks(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        DType::I64 => b
            .chunks(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        DType::I32 => b
            .chunks(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        DType::BF16 => b
            .chunks(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        DType::Bool => b.iter().map(|&x| x as f64).collect(),
        other => panic!("no test values for {other}"),
    }
}

/// A one-node graph of `op` over inputs `in0..`, its results the outputs `out0..`.
pub fn one_node(op: Op, inputs: &[Tensor]) -> Graph {
    let mut g = Graph::new(Stage::Optimizer);
    let ins: Vec<_> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let id = g
                .add_node(
                    Op::Input {
                        name: format!("in{i}"),
                        ty: mmc_ir::TensorType::new(t.dtype(), t.shape()),
                    },
                    &[],
                    ScopeId::default(),
                )
                .expect("an input");
            g.result(id)
        })
        .collect();
    let id = g
        .add_node(op, &ins, ScopeId::default())
        .unwrap_or_else(|e| panic!("a well-typed node: {e}"));
    let outs = g.node(id).outputs.clone();
    for (i, v) in outs.into_iter().enumerate() {
        g.add_output(format!("out{i}"), v);
    }
    g
}

/// The reference interpreter's results of `g` (from [`one_node`]) on `inputs`.
pub fn interpret(
    g: &Graph,
    inputs: &[Tensor],
) -> Result<mmc_ir::Outputs, mmc_ir::interp::InterpError> {
    let bind: HashMap<String, Tensor> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("in{i}"), t.clone()))
        .collect();
    Interpreter::new(g, Precision::Declared)
        .expect("verifies")
        .run(&bind)
}

/// What the compiled node gave: its results as stored bytes, per thread count.
pub struct Run {
    pub lowered: Lowered,
    pub outputs: Vec<Vec<u8>>,
}

/// Lowers, compiles and runs the node of `g` (from [`one_node`]) on `threads` threads.
pub fn run_compiled(g: &Graph, inputs: &[Tensor], threads: usize) -> Result<Run, NativeError> {
    let id = g
        .nodes()
        .iter()
        .position(|n| !matches!(n.op, Op::Input { .. }))
        .expect("a node under test");
    let node = &g.nodes()[id];
    let lowered = lower_node(g, node, "t").unwrap_or_else(|e| panic!("lowers: {e}"));
    let kernels: Vec<GeneratedKernel> = lowered.kernels().cloned().collect();
    let dir = tempfile::tempdir().expect("a temporary folder");
    let so = dir.path().join("node.so");
    let hash = build_library(&kernels, &CpuTarget::host(), &so).unwrap_or_else(|e| panic!("{e}"));
    // SAFETY: just built from these kernels.
    let lib = unsafe { KernelLibrary::load(&so, &hash, kernels) }.expect("loads");
    let mut ins: Vec<Vec<u8>> = inputs.iter().map(bytes).collect();
    let mut outs: Vec<Vec<u8>> = node
        .outputs
        .iter()
        .map(|&v| {
            let t = g.ty(v);
            vec![0xA5; t.numel() * elem_bytes(t.dtype)]
        })
        .collect();
    let mut scratch: Vec<Vec<u8>> = lowered
        .scratch
        .iter()
        .map(|b| vec![0x5A; b.shape.iter().product::<usize>() * elem_bytes(b.dtype)])
        .collect();
    let pool = pool(threads);
    let mut next_kernel = 0;
    for (i, launch) in lowered.launches.iter().enumerate() {
        let ptrs: Vec<*mut u8> = launch
            .args
            .iter()
            .map(|a| match *a {
                Arg::Input(k) => ins[k].as_mut_ptr(),
                Arg::Output(k) => outs[k].as_mut_ptr(),
                Arg::Scratch(k) => scratch[k].as_mut_ptr(),
            })
            .collect();
        let need = launch.work.buffer_bytes();
        assert_eq!(need.len(), launch.args.len(), "launch {i}: buffer count");
        for (a, n) in launch.args.iter().zip(need) {
            let have = match *a {
                Arg::Input(k) => ins[k].len(),
                Arg::Output(k) => outs[k].len(),
                Arg::Scratch(k) => scratch[k].len(),
            };
            assert_eq!(have as u64, n, "launch {i}: buffer size");
        }
        // SAFETY: each pointer is a buffer of the size the launch says (checked above); the
        // library call's outputs are buffers of their own.
        match &launch.work {
            Work::Kernel(_) | Work::Copy(_) => {
                unsafe { lib.launch(next_kernel, &ptrs, &pool) }?;
                next_kernel += 1;
            }
            Work::Library(call) => {
                let mut ws = Workspace::new(call.workspace_bytes(threads)).expect("a workspace");
                unsafe { call.execute(&ptrs, &mut ws, &pool) }
                    .map_err(|e| NativeError::Library(e.to_string()))?
            }
        }
    }
    Ok(Run {
        lowered,
        outputs: outs,
    })
}

/// Checks `op` over `inputs` against the interpreter on 1 and 2 threads: every result
/// element within `tol` relative (to the larger of its magnitude and 1) of the interpreter's
/// (NaN where it has NaN, an infinity where it has that infinity).
pub fn check(op: Op, inputs: &[Tensor], tol: f64) {
    let g = one_node(op, inputs);
    let want = interpret(&g, inputs).expect("the interpreter runs it");
    for threads in [1, 2] {
        let run = run_compiled(&g, inputs, threads).unwrap_or_else(|e| panic!("{e}"));
        for (i, got) in run.outputs.iter().enumerate() {
            let w = want.get(&format!("out{i}")).expect("an output");
            let (a, b) = (values(w.dtype(), got), w.to_f64_vec());
            assert_eq!(a.len(), b.len());
            for (e, (x, y)) in a.iter().zip(&b).enumerate() {
                let ok =
                    (x.is_nan() && y.is_nan()) || x == y || (x - y).abs() <= tol * y.abs().max(1.0);
                assert!(
                    ok,
                    "result {i} element {e} on {threads} thread(s): {x} vs the interpreter's {y}\n{}",
                    run.lowered
                        .launches
                        .iter()
                        .map(|l| l.work.to_string())
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
        }
    }
}
