//! The CPU backend's elementwise kernels against the reference interpreter: every elementwise
//! op over every dtype the kernels take, casts between them, broadcast reads, and random fused
//! programs, on sizes that are no multiple of a vector width or of the tile (so the last tile
//! is partial), with special values (zeros of both signs, infinities, NaN, integer extremes).
//! Results must equal the interpreter's bit for bit (NaN as NaN); only `erf`, which the
//! interpreter takes from the `libm` crate and the kernels from the C library, may differ by
//! one unit in the last place. The library calls nothing but libc and libm, and a changed
//! library is refused.

use mmc_codegen::cpu::{build_library, CpuTarget};
use mmc_codegen::kernel::GeneratedKernel;
use mmc_codegen::kernel::Kernel;
use mmc_codegen::native::KernelLibrary;
use mmc_ir::elementwise::Program;
use mmc_ir::{
    BinaryOp, DType, FusedOp, Graph, Interpreter, Op, Precision, ScopeId, Stage, Tensor,
    TensorData, TensorType, UnaryOp, Value,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// 2 x 2,063 = 4,126 elements: two tiles of 4,096, the second of 30.
const SHAPE: [usize; 2] = [2, 2063];

struct Bench {
    g: Graph,
    inputs: HashMap<String, Tensor>,
    rng: ChaCha8Rng,
    /// The nodes under test, each an output `k<i>`.
    nodes: Vec<Value>,
}

impl Bench {
    fn new() -> Bench {
        Bench {
            g: Graph::new(Stage::Optimizer),
            inputs: HashMap::new(),
            rng: ChaCha8Rng::seed_from_u64(7),
            nodes: Vec::new(),
        }
    }

    fn input(&mut self, dtype: DType, shape: &[usize]) -> Value {
        let name = format!("in{}", self.inputs.len());
        let n: usize = shape.iter().product();
        let specials = [
            0.0,
            -0.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            1e30,
            -1e-30,
        ];
        let t = match dtype {
            DType::F32 | DType::F64 => {
                let data: Vec<f64> = (0..n)
                    .map(|i| {
                        if i % 97 < specials.len() {
                            specials[i % 97]
                        } else {
                            self.rng.random_range(-3.0..3.0)
                        }
                    })
                    .collect();
                Tensor::from_f64(dtype, shape.to_vec(), &data).expect("sizes agree")
            }
            DType::I64 => {
                let data: Vec<i64> = (0..n)
                    .map(|i| match i % 101 {
                        0 => i64::MIN,
                        1 => i64::MAX,
                        _ => self.rng.random_range(-5..=5),
                    })
                    .collect();
                Tensor::new(shape.to_vec(), TensorData::I64(data)).expect("sizes agree")
            }
            DType::I32 => {
                let data: Vec<i32> = (0..n)
                    .map(|i| match i % 101 {
                        0 => i32::MIN,
                        1 => i32::MAX,
                        _ => self.rng.random_range(-5..=5),
                    })
                    .collect();
                Tensor::new(shape.to_vec(), TensorData::I32(data)).expect("sizes agree")
            }
            DType::Bool => {
                let data: Vec<bool> = (0..n).map(|_| self.rng.random_bool(0.5)).collect();
                Tensor::new(shape.to_vec(), TensorData::Bool(data)).expect("sizes agree")
            }
            other => panic!("no test data for {other}"),
        };
        self.inputs.insert(name.clone(), t);
        self.add(
            Op::Input {
                name,
                ty: TensorType::new(dtype, shape),
            },
            &[],
        )
    }

    fn add(&mut self, op: Op, ins: &[Value]) -> Value {
        let id = self
            .g
            .add_node(op, ins, ScopeId::default())
            .unwrap_or_else(|e| panic!("a well-typed test node: {e}"));
        self.g.result(id)
    }

    /// Adds `op` over fresh inputs of `dtypes` as a node under test.
    fn test(&mut self, op: Op, dtypes: &[DType]) {
        let ins: Vec<Value> = dtypes.iter().map(|&d| self.input(d, &SHAPE)).collect();
        let v = self.add(op, &ins);
        self.nodes.push(v);
    }

    fn test_values(&mut self, op: Op, ins: &[Value]) {
        let v = self.add(op, ins);
        self.nodes.push(v);
    }
}

/// The bytes of `t` as the kernels store them (bools one byte each).
fn bytes(t: &Tensor) -> Vec<u8> {
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

/// Whether two stored elements agree: equal bits, both NaN, or (with `ulps`) within that many
/// units in the last place.
fn agree(d: DType, a: &[u8], b: &[u8], ulps: u64) -> bool {
    match d {
        DType::F32 => {
            let (x, y) = (
                f32::from_le_bytes(a.try_into().unwrap()),
                f32::from_le_bytes(b.try_into().unwrap()),
            );
            (x.is_nan() && y.is_nan())
                || x.to_bits() == y.to_bits()
                || (x.to_bits() as i64 - y.to_bits() as i64).unsigned_abs() <= ulps
        }
        DType::F64 => {
            let (x, y) = (
                f64::from_le_bytes(a.try_into().unwrap()),
                f64::from_le_bytes(b.try_into().unwrap()),
            );
            (x.is_nan() && y.is_nan())
                || x.to_bits() == y.to_bits()
                || (x.to_bits() as i128 - y.to_bits() as i128).unsigned_abs() <= ulps as u128
        }
        _ => a == b,
    }
}

/// Compiles a kernel per node under test for the host, runs each on 1 and 2 threads, and
/// compares.
fn run_and_compare(bench: Bench) {
    run_and_compare_for(bench, &CpuTarget::host())
}

/// [`run_and_compare`] with kernels compiled for `target`.
fn run_and_compare_for(bench: Bench, target: &CpuTarget) {
    let Bench {
        mut g,
        inputs,
        nodes,
        ..
    } = bench;
    for (i, &v) in nodes.iter().enumerate() {
        g.add_output(format!("k{i}"), v);
    }
    let want = Interpreter::new(&g, Precision::Declared)
        .expect("verifies")
        .run(&inputs)
        .expect("runs");
    let kernels: Vec<Kernel> = nodes
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let node = g.node(g.value_data(v).expect("a value").node);
            Kernel::for_node(&g, node, format!("k{i}")).unwrap_or_else(|e| panic!("k{i}: {e}"))
        })
        .collect();
    let dir = tempfile::tempdir().expect("a temporary folder");
    let so = dir.path().join("kernels.so");
    let generated: Vec<GeneratedKernel> = kernels.iter().cloned().map(Into::into).collect();
    let hash = build_library(&generated, target, &so).unwrap_or_else(|e| panic!("{e}"));
    // SAFETY: the library was just built from these kernels.
    let lib = unsafe { KernelLibrary::load(&so, &hash, generated) }.expect("loads");
    for (i, &v) in nodes.iter().enumerate() {
        let node = g.node(g.value_data(v).expect("a value").node).clone();
        let mut bufs: Vec<Vec<u8>> = node
            .inputs
            .iter()
            .map(|&x| {
                let name = match &g.node(g.value_data(x).unwrap().node).op {
                    Op::Input { name, .. } => name.clone(),
                    other => panic!("operands are inputs, not {}", other.name()),
                };
                bytes(&inputs[&name])
            })
            .collect();
        let out_ty = g.ty(v).clone();
        let eb = elem_bytes(out_ty.dtype);
        let expected = bytes(want.get(&format!("k{i}")).expect("an output"));
        let ulps = if kernels[i].program.to_string().contains("erf") {
            1
        } else {
            0
        };
        for threads in [1, 2] {
            bufs.push(vec![0xAB; out_ty.numel() * eb]);
            let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
            // SAFETY: one buffer per kernel buffer, each of its size; the output is separate.
            unsafe { lib.launch(i, &ptrs, &pool(threads)) }.expect("launches");
            let got = bufs.pop().expect("the output");
            for (e, (a, b)) in got.chunks(eb).zip(expected.chunks(eb)).enumerate() {
                assert!(
                    agree(out_ty.dtype, a, b, ulps),
                    "kernel k{i} ({}) on {threads} thread(s), element {e}: {a:?} vs the interpreter's {b:?}\n{}",
                    node.op.name(),
                    kernels[i]
                );
            }
        }
    }
}

#[test]
fn primitive_elementwise_ops_match_the_interpreter() {
    use mmc_ir::op::{BINARY, COMPARE, UNARY};
    let mut b = Bench::new();
    let all = [DType::F32, DType::F64, DType::I64, DType::I32, DType::Bool];
    // Every unary, binary and comparison op of the IR over every dtype its typing accepts, so
    // an op added to the IR is tested here the day it is added.
    let mut ops: Vec<(Op, Vec<DType>)> = Vec::new();
    for d in all {
        ops.extend(UNARY.iter().map(|&u| (Op::Unary(u), vec![d])));
        ops.extend(BINARY.iter().map(|&o| (Op::Binary(o), vec![d, d])));
        ops.extend(COMPARE.iter().map(|&c| (Op::Compare(c), vec![d, d])));
        ops.push((Op::Select, vec![DType::Bool, d, d]));
    }
    let mut tested = 0;
    for (op, dtypes) in ops {
        let tys: Vec<TensorType> = dtypes.iter().map(|&d| TensorType::new(d, SHAPE)).collect();
        let refs: Vec<&TensorType> = tys.iter().collect();
        if mmc_ir::infer::infer(&op, &refs).is_ok() {
            b.test(op, &dtypes);
            tested += 1;
        }
    }
    // Floats: 11 unary and 7 binary ops each; ints: neg, abs and 5 binary ops each; bools:
    // not, and, or; and 6 comparisons and a select per dtype.
    assert_eq!(
        tested,
        2 * 18 + 2 * 7 + 3 + 5 * 7,
        "the ops the typing accepts"
    );
    for d in all {
        let values: &[f64] = match d {
            DType::F32 | DType::F64 => &[0.0, -0.0, 1.5, -7.0, 3e9, f64::INFINITY],
            DType::Bool => &[0.0, 1.0],
            _ => &[0.0, -7.0, 12.0],
        };
        for &value in values {
            b.test(
                Op::Const {
                    value,
                    ty: TensorType::new(d, SHAPE),
                },
                &[],
            );
        }
    }
    for from in all {
        for to in all {
            b.test(Op::Cast { to }, &[from]);
        }
    }
    run_and_compare(b);
}

#[test]
fn broadcast_reads_and_fused_programs_match_the_interpreter() {
    let mut b = Bench::new();
    // A bias row and a scale column read broadcast, through a GELU-like program.
    let x = b.input(DType::F32, &SHAPE);
    let row = b.input(DType::F32, &[1, SHAPE[1]]);
    let col = b.input(DType::F32, &[SHAPE[0], 1]);
    let program: Program = "$3 = add $0 $1; $4 = const 0.7071067811865476 f32; $5 = mul $3 $4; \
                            $6 = erf $5; $7 = const 1.0 f32; $8 = add $6 $7; $9 = mul $3 $8; \
                            $10 = mul $9 $2"
        .parse()
        .expect("a program");
    b.test_values(
        Op::Fused(FusedOp::Elementwise {
            program,
            shape: SHAPE.to_vec(),
        }),
        &[x, row, col],
    );
    // AdamW's moment update with a bf16-free cast chain and a comparison.
    let (m, g) = (b.input(DType::F32, &SHAPE), b.input(DType::F32, &SHAPE));
    let program: Program = "$2 = const 0.9 f32; $3 = mul $0 $2; $4 = const 0.1 f32; \
                            $5 = mul $1 $4; $6 = add $3 $5; $7 = cast $6 f64; $8 = sqrt $7; \
                            $9 = const 0.0 f64; $10 = gt $8 $9; $11 = cast $8 f32; \
                            $12 = select $10 $11 $6"
        .parse()
        .expect("a program");
    b.test_values(
        Op::Fused(FusedOp::Elementwise {
            program,
            shape: SHAPE.to_vec(),
        }),
        &[m, g],
    );
    // Random programs over two operands and a broadcast row.
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for _ in 0..40 {
        let ops = ["add", "sub", "mul", "max", "min", "div"];
        let unary = ["exp", "tanh", "neg", "abs", "sin", "sqrt"];
        let mut insts = Vec::new();
        let len = rng.random_range(1..8);
        for regs in 3u32..3 + len {
            let a = rng.random_range(0..regs);
            let text = if rng.random_bool(0.5) {
                let c = rng.random_range(0..regs);
                format!(
                    "${regs} = {} ${a} ${c}",
                    ops[rng.random_range(0..ops.len())]
                )
            } else {
                format!("${regs} = {} ${a}", unary[rng.random_range(0..unary.len())])
            };
            insts.push(text);
        }
        let program: Program = insts.join("; ").parse().expect("a random program");
        let x = b.input(DType::F32, &SHAPE);
        let y = b.input(DType::F32, &SHAPE);
        let r = b.input(DType::F32, &[1, SHAPE[1]]);
        b.test_values(
            Op::Fused(FusedOp::Elementwise {
                program,
                shape: SHAPE.to_vec(),
            }),
            &[x, y, r],
        );
    }
    run_and_compare(b);
}

/// The library's undefined dynamic symbols are the C library's and libm's only.
#[test]
fn the_library_needs_only_libc_and_libm() {
    use object::{Object, ObjectSymbol};
    let mut b = Bench::new();
    for u in [
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Tanh,
        UnaryOp::Erf,
        UnaryOp::Sin,
    ] {
        b.test(Op::Unary(u), &[DType::F32]);
    }
    b.test(Op::Binary(BinaryOp::Pow), &[DType::F32, DType::F32]);
    b.test(Op::Cast { to: DType::I64 }, &[DType::F32]);
    let kernels: Vec<Kernel> = b
        .nodes
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            Kernel::for_node(
                &b.g,
                b.g.node(b.g.value_data(v).unwrap().node),
                format!("k{i}"),
            )
            .expect("a kernel")
        })
        .collect();
    let dir = tempfile::tempdir().expect("a temporary folder");
    let so = dir.path().join("kernels.so");
    let generated: Vec<GeneratedKernel> = kernels.iter().cloned().map(Into::into).collect();
    build_library(&generated, &CpuTarget::host(), &so).expect("builds");
    let data = std::fs::read(&so).expect("reads");
    let file = object::File::parse(&*data).expect("an ELF object");
    let libm = ["exp", "log", "tanh", "erf", "sin", "cos", "pow"];
    // What the C toolchain's startup files reference in every shared object.
    let libc = [
        "__cxa_finalize",
        "__gmon_start__",
        "_ITM_deregisterTMCloneTable",
        "_ITM_registerTMCloneTable",
    ];
    let mut undefined = Vec::new();
    for s in file.dynamic_symbols() {
        if s.is_undefined() {
            let name = s.name().expect("a symbol name").to_string();
            assert!(
                libm.contains(&name.as_str()) || libc.contains(&name.as_str()),
                "the kernel library needs `{name}`"
            );
            undefined.push(name);
        }
    }
    assert!(undefined.iter().any(|n| n == "log"), "{undefined:?}");
    for k in &kernels {
        assert!(
            file.dynamic_symbols()
                .any(|s| !s.is_undefined() && s.name() == Ok(k.name.as_str())),
            "{} is exported",
            k.name
        );
    }
}

/// A library whose bytes changed after it was built is refused, naming it.
#[test]
fn a_changed_library_is_refused() {
    let mut b = Bench::new();
    b.test(Op::Unary(UnaryOp::Neg), &[DType::F32]);
    let v = b.nodes[0];
    let k = Kernel::for_node(&b.g, b.g.node(b.g.value_data(v).unwrap().node), "k0".into())
        .expect("a kernel");
    let dir = tempfile::tempdir().expect("a temporary folder");
    let so = dir.path().join("kernels.so");
    let k = GeneratedKernel::from(k);
    let hash = build_library(std::slice::from_ref(&k), &CpuTarget::host(), &so).expect("builds");
    let mut bytes = std::fs::read(&so).expect("reads");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&so, &bytes).expect("writes");
    // SAFETY: the load is refused before the library is opened.
    let e = unsafe { KernelLibrary::load(&so, &hash, vec![k]) }
        .err()
        .expect("a changed library is refused");
    let msg = e.to_string();
    assert!(
        msg.contains("kernels.so") && msg.contains("refusing"),
        "{msg}"
    );
}

/// The portable target (baseline x86-64, no AVX) lowers and its kernels, run, match the
/// interpreter too: a broadcast bias through exp and a reduction.
#[test]
fn the_portable_target_matches_the_interpreter() {
    let mut b = Bench::new();
    let mul = dummy_mul(&mut b);
    let k = Kernel::for_node(&b.g, &mul, "k0".into()).expect("a kernel");
    let ir =
        mmc_codegen::cpu::llvm_ir(&[k.clone().into()], &CpuTarget::portable()).expect("lowers");
    assert!(ir.contains("i64 @k0(ptr"), "{ir}");
    let x = b.input(DType::F32, &SHAPE);
    let row = b.input(DType::F32, &[1, SHAPE[1]]);
    let program: Program = "$2 = add $0 $1; $3 = exp $2".parse().expect("a program");
    b.test_values(
        Op::Fused(FusedOp::Elementwise {
            program,
            shape: SHAPE.to_vec(),
        }),
        &[x, row],
    );
    let y = b.input(DType::F32, &[4, 5, 211]);
    b.test_values(
        Op::Reduce {
            kind: mmc_ir::ReduceKind::Sum,
            axes: vec![0, 2],
        },
        &[y],
    );
    run_and_compare_for(b, &CpuTarget::portable());
}

/// A `mul` node under test (the first node of `b`), returned for inspection.
fn dummy_mul(b: &mut Bench) -> mmc_ir::Node {
    b.test(Op::Binary(BinaryOp::Mul), &[DType::F32, DType::F32]);
    let v = b.nodes[0];
    b.g.node(b.g.value_data(v).expect("a value").node).clone()
}

/// Layout ops are copies through an affine index: broadcast, permute, slice and reshape, over
/// floats, integers and bools.
#[test]
fn layout_ops_match_the_interpreter() {
    let mut b = Bench::new();
    for d in [DType::F32, DType::I64, DType::Bool] {
        let x = b.input(d, &[1, SHAPE[1]]);
        b.test_values(
            Op::Broadcast {
                shape: SHAPE.to_vec(),
            },
            &[x],
        );
        let x = b.input(d, &[SHAPE[0], 1]);
        b.test_values(
            Op::Broadcast {
                shape: SHAPE.to_vec(),
            },
            &[x],
        );
        let x = b.input(d, &[SHAPE[1], SHAPE[0]]);
        b.test_values(Op::Permute { perm: vec![1, 0] }, &[x]);
        let x = b.input(d, &[3, 5, 7]);
        b.test_values(
            Op::Permute {
                perm: vec![2, 0, 1],
            },
            &[x],
        );
        let x = b.input(d, &[3, 2100]);
        b.test_values(
            Op::Slice {
                start: vec![1, 20],
                end: vec![3, 20 + SHAPE[1]],
            },
            &[x],
        );
        let x = b.input(d, &[SHAPE[0] * SHAPE[1]]);
        b.test_values(
            Op::Reshape {
                shape: SHAPE.to_vec(),
            },
            &[x],
        );
    }
    run_and_compare(b);
}

/// Sums and maxima over every kind of axis set, floats accumulated in f64 in the
/// interpreter's order (so equal bit for bit), integers wrapping.
#[test]
fn reductions_match_the_interpreter() {
    let mut b = Bench::new();
    for d in [DType::F32, DType::F64, DType::I64, DType::I32] {
        for kind in [mmc_ir::ReduceKind::Sum, mmc_ir::ReduceKind::Max] {
            for (shape, axes) in [
                (vec![3, 1373], vec![1]),
                (vec![3, 1373], vec![0]),
                (vec![3, 1373], vec![0, 1]),
                (vec![4, 5, 211], vec![0, 2]),
                (vec![4, 5, 211], vec![1]),
            ] {
                let x = b.input(d, &shape);
                b.test_values(Op::Reduce { kind, axes }, &[x]);
            }
        }
    }
    run_and_compare(b);
}

/// A thread pool of `threads` threads, as the runtime makes one per run.
pub fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool")
}
