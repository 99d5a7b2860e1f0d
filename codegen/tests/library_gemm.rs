//! The GEMM library calls against the reference interpreter: batched matmuls, the product of
//! an epilogue, grouped matmuls and their gradients, f32 and f64, on 1 and 2 threads, with
//! sizes that are no multiple of a vector width or tile (1, 7, 33, 130), empty experts and
//! uneven offsets, small enough to run on the calling thread and large enough to run in the
//! pool. Offsets that do not split the rows are refused before anything is
//! written.
//!
//! Tolerances come from the error bound of a dot product of length k in precision u: every
//! element within `gamma(k) (|A| |B|)_ij` of the exact product, `gamma(k) = k u / (1 - k u)`,
//! whatever the order of the sums. `|A| |B|` is the interpreter's result on the operands'
//! absolute values, so the bound is per element and tight (a wrong row or a wrong offset
//! misses it by orders of magnitude, as two tests below check).

use mmc_codegen::library::{self, Float, Grouped, LibraryCall, LibraryError, MatMul, Workspace};
use mmc_ir::elementwise::Program;
use mmc_ir::{
    BinaryOp, DType, FusedOp, Graph, Interpreter, Op, Precision, ScopeId, Stage, Tensor,
    TensorData, Value,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// A buffer of bytes aligned for any element type (the arena's alignment).
struct Buf {
    words: Vec<u64>,
    len: usize,
}

impl Buf {
    fn new(bytes: &[u8]) -> Buf {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        for (i, b) in bytes.iter().enumerate() {
            words[i / 8] |= u64::from(*b) << (8 * (i % 8));
        }
        Buf {
            words,
            len: bytes.len(),
        }
    }

    /// A buffer of `len` bytes filled with `fill` (to see what a call left unwritten).
    fn filled(len: usize, fill: u8) -> Buf {
        Buf::new(&vec![fill; len])
    }

    fn bytes(&self) -> Vec<u8> {
        self.words
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .take(self.len)
            .collect()
    }

    fn ptr(&mut self) -> *mut u8 {
        self.words.as_mut_ptr().cast()
    }
}

/// A graph with one node under test, its random inputs and the interpreter's results on them
/// and on their absolute values.
struct Case {
    g: Graph,
    inputs: HashMap<String, Tensor>,
    node: Option<Value>,
}

impl Case {
    fn new() -> Case {
        Case {
            g: Graph::new(Stage::Optimizer),
            inputs: HashMap::new(),
            node: None,
        }
    }

    fn input(&mut self, t: Tensor) -> Value {
        let name = format!("in{}", self.inputs.len());
        let ty = t.ty();
        self.inputs.insert(name.clone(), t);
        self.add(Op::Input { name, ty }, &[])
    }

    fn random(&mut self, rng: &mut ChaCha8Rng, dtype: DType, shape: &[usize]) -> Value {
        let n: usize = shape.iter().product();
        let data: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        self.input(Tensor::from_f64(dtype, shape.to_vec(), &data).expect("sizes agree"))
    }

    fn offsets(&mut self, off: &[i64]) -> Value {
        self.input(Tensor::new(vec![off.len()], TensorData::I64(off.to_vec())).expect("a vector"))
    }

    fn add(&mut self, op: Op, ins: &[Value]) -> Value {
        let id = self
            .g
            .add_node(op, ins, ScopeId::default())
            .unwrap_or_else(|e| panic!("a well-typed test node: {e}"));
        self.g.result(id)
    }

    /// Makes `op` over `ins` the node under test.
    fn test(&mut self, op: Op, ins: &[Value]) -> Value {
        let v = self.add(op, ins);
        self.node = Some(v);
        v
    }

    fn node(&self) -> &mmc_ir::Node {
        let v = self.node.expect("a node under test");
        self.g.node(self.g.value_data(v).expect("a value").node)
    }

    fn call(&self) -> LibraryCall {
        library::for_node(&self.g, self.node())
            .expect("a GEMM op has a library call")
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The interpreter's values of `values` on the inputs, or on their absolute values.
    fn interpret(&self, values: &[Value], abs: bool) -> Vec<Tensor> {
        let mut g = self.g.clone();
        for (i, &v) in values.iter().enumerate() {
            g.add_output(format!("out{i}"), v);
        }
        let inputs: HashMap<String, Tensor> = self
            .inputs
            .iter()
            .map(|(k, t)| {
                let t = match (abs, t.dtype()) {
                    (true, DType::F32 | DType::F64) => {
                        let v: Vec<f64> = t.to_f64_vec().iter().map(|x| x.abs()).collect();
                        Tensor::from_f64(t.dtype(), t.shape().to_vec(), &v).expect("same size")
                    }
                    _ => t.clone(),
                };
                (k.clone(), t)
            })
            .collect();
        let out = Interpreter::new(&g, Precision::Declared)
            .expect("verifies")
            .run(&inputs)
            .expect("runs");
        (0..values.len())
            .map(|i| out.get(&format!("out{i}")).expect("an output").clone())
            .collect()
    }

    /// The node's buffers: its inputs' bytes, then outputs filled with a pattern.
    fn buffers(&self) -> Vec<Buf> {
        let node = self.node();
        let mut bufs: Vec<Buf> = node
            .inputs
            .iter()
            .map(|&v| {
                let name = match &self.g.node(self.g.value_data(v).expect("a value").node).op {
                    Op::Input { name, .. } => name.clone(),
                    other => panic!("operands are inputs, not {}", other.name()),
                };
                Buf::new(&self.inputs[&name].to_le_bytes())
            })
            .collect();
        for &v in &node.outputs {
            let ty = self.g.ty(v);
            bufs.push(Buf::filled(ty.numel() * ty.dtype.size_bytes(), 0x7f));
        }
        bufs
    }
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool")
}

fn execute(call: &LibraryCall, bufs: &mut [Buf], threads: usize) -> Result<(), LibraryError> {
    let ptrs: Vec<*mut u8> = bufs.iter_mut().map(Buf::ptr).collect();
    // SAFETY: the buffers were made from the node's operand and result types, aligned to 8.
    let mut ws = Workspace::new(call.workspace_bytes(threads)).expect("a workspace");
    unsafe { call.execute(&ptrs, &mut ws, &pool(threads)) }
}

fn decode(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes"))))
            .collect(),
        DType::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        other => panic!("no float results of {other}"),
    }
}

/// Whether `got` is within the dot-product bound for length `k` of the interpreter's `want`,
/// given `abs`, the interpreter's product of the absolute values.
fn within(dtype: DType, k: usize, got: &[f64], want: &Tensor, abs: &Tensor) -> Result<(), String> {
    let u = match dtype {
        DType::F32 => f64::from(f32::EPSILON) / 2.0,
        _ => f64::EPSILON / 2.0,
    };
    // The call's error and (for f32) the rounding of the interpreter's f64 result, or (for
    // f64) the interpreter's own error; the rounding of `abs` is in the slack of k + 2.
    let gamma = |k: usize| k as f64 * u / (1.0 - k as f64 * u);
    let (want, abs) = (want.to_f64_vec(), abs.to_f64_vec());
    assert_eq!(got.len(), want.len(), "result sizes");
    for (i, ((g, w), a)) in got.iter().zip(&want).zip(&abs).enumerate() {
        let tol = 2.0 * gamma(k + 2) * a;
        if (g - w).abs() > tol || g.is_nan() {
            return Err(format!(
                "element {i}: got {g}, want {w} (tolerance {tol:e}, k = {k})"
            ));
        }
    }
    Ok(())
}

/// Runs the node's call on 1 and 2 threads and checks each output against the interpreter,
/// the i-th with dot products of length `ks[i]`.
fn check(case: &Case, ks: &[usize]) {
    let call = case.call();
    let node = case.node().clone();
    assert_eq!(call.buffers(), node.inputs.len() + node.outputs.len());
    let want = case.interpret(&node.outputs, false);
    let abs = case.interpret(&node.outputs, true);
    for threads in [1, 2] {
        let mut bufs = case.buffers();
        execute(&call, &mut bufs, threads).unwrap_or_else(|e| panic!("{call:?}: {e}"));
        for (i, &v) in node.outputs.iter().enumerate() {
            let dtype = case.g.ty(v).dtype;
            let got = decode(dtype, &bufs[node.inputs.len() + i].bytes());
            within(dtype, ks[i], &got, &want[i], &abs[i])
                .unwrap_or_else(|e| panic!("{call:?} on {threads} thread(s), output {i}: {e}"));
        }
    }
}

const SIZES: [usize; 4] = [1, 7, 33, 130];

#[test]
fn matmul_matches_the_interpreter() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for dtype in [DType::F32, DType::F64] {
        for m in SIZES {
            for k in SIZES {
                for n in SIZES {
                    let mut c = Case::new();
                    let a = c.random(&mut rng, dtype, &[m, k]);
                    let b = c.random(&mut rng, dtype, &[k, n]);
                    c.test(Op::MatMul, &[a, b]);
                    assert_eq!(
                        c.call(),
                        LibraryCall::MatMul(MatMul {
                            dtype: Float::of(dtype).expect("a float"),
                            batch: 1,
                            m,
                            k,
                            n
                        })
                    );
                    check(&c, &[k]);
                }
            }
        }
    }
}

/// Batch dimensions: 6 and 9 matrices (spread one per task on 2 threads) and 3 (one after
/// the other, each over both threads), with a leading batch of 1 too; the small products run
/// on the calling thread, the large ones in the pool.
#[test]
fn batched_matmul_matches_the_interpreter() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for dtype in [DType::F32, DType::F64] {
        for batch in [vec![2, 3], vec![3], vec![1], vec![1, 9]] {
            for (m, k, n) in [(7, 33, 5), (33, 130, 130), (1, 7, 130)] {
                let mut c = Case::new();
                let a = c.random(&mut rng, dtype, &[batch.clone(), vec![m, k]].concat());
                let b = c.random(&mut rng, dtype, &[batch.clone(), vec![k, n]].concat());
                c.test(Op::MatMul, &[a, b]);
                check(&c, &[k]);
            }
        }
    }
}

/// A contraction much longer than the output's sides is cut into one slice per thread, the
/// partial products summed (the LM head's input gradient).
#[test]
fn long_contractions_match_the_interpreter() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for dtype in [DType::F32, DType::F64] {
        for (batch, m, k, n) in [(1, 7, 4099, 33), (1, 33, 8191, 7), (3, 7, 4099, 33)] {
            let mut c = Case::new();
            let a = c.random(&mut rng, dtype, &[batch, m, k]);
            let b = c.random(&mut rng, dtype, &[batch, k, n]);
            c.test(Op::MatMul, &[a, b]);
            check(&c, &[k]);
        }
    }
}

/// An empty contraction writes zeros (the output buffer starts as a non-zero pattern).
#[test]
fn matmul_over_an_empty_contraction_is_zero() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut c = Case::new();
    let a = c.random(&mut rng, DType::F32, &[2, 7, 0]);
    let b = c.random(&mut rng, DType::F32, &[2, 0, 33]);
    c.test(Op::MatMul, &[a, b]);
    check(&c, &[0]);
}

/// A product of square matrices with the operands swapped misses the bound: the tolerance
/// is tight enough to see a wrong answer.
#[test]
fn a_wrong_product_is_caught() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut c = Case::new();
    let a = c.random(&mut rng, DType::F32, &[33, 33]);
    let b = c.random(&mut rng, DType::F32, &[33, 33]);
    let out = c.test(Op::MatMul, &[a, b]);
    let (want, abs) = (c.interpret(&[out], false), c.interpret(&[out], true));
    let mut bufs = c.buffers();
    bufs.swap(0, 1);
    execute(&c.call(), &mut bufs, 2).expect("runs");
    let got = decode(DType::F32, &bufs[2].bytes());
    assert!(within(DType::F32, 33, &got, &want[0], &abs[0]).is_err());
}

/// The epilogue's call is its product: a, b, then the output, which the product fills.
#[test]
fn epilogue_call_is_the_product() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for dtype in [DType::F32, DType::F64] {
        let mut c = Case::new();
        let a = c.random(&mut rng, dtype, &[3, 33, 130]);
        let b = c.random(&mut rng, dtype, &[3, 130, 7]);
        let bias = c.random(&mut rng, dtype, &[1, 1, 7]);
        let product = c.add(Op::MatMul, &[a, b]);
        let epi = c.test(
            Op::Fused(FusedOp::MatMulEpilogue {
                program: Program::single(Op::Binary(BinaryOp::Add), 2),
            }),
            &[a, b, bias],
        );
        let call = c.call();
        assert_eq!(call.buffers(), 3);
        let (want, abs) = (
            c.interpret(&[product], false),
            c.interpret(&[product], true),
        );
        for threads in [1, 2] {
            let mut bufs = c.buffers();
            // The buffers of the call: a, b and the epilogue's output (not the bias).
            let mut call_bufs = vec![bufs.remove(0), bufs.remove(0), bufs.remove(1)];
            execute(&call, &mut call_bufs, threads).expect("runs");
            let got = decode(dtype, &call_bufs[2].bytes());
            within(dtype, 130, &got, &want[0], &abs[0]).unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(c.g.ty(epi).shape, c.g.ty(product).shape);
    }
}

#[test]
fn other_ops_and_dtypes_have_no_call() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut c = Case::new();
    let a = c.random(&mut rng, DType::F32, &[7, 33]);
    c.test(Op::Unary(mmc_ir::UnaryOp::Neg), &[a]);
    assert!(library::for_node(&c.g, c.node()).is_none());
    let mut c = Case::new();
    let a = c.random(&mut rng, DType::F16, &[7, 33]);
    let b = c.random(&mut rng, DType::F16, &[33, 7]);
    c.test(Op::MatMul, &[a, b]);
    assert!(matches!(
        library::for_node(&c.g, c.node()),
        Some(Err(LibraryError::Dtype {
            dtype: DType::F16,
            ..
        }))
    ));
}

/// Random offsets over `rows` rows and `experts` experts, with empty experts (at the start,
/// in the middle and at the end) whenever there are 3 or more.
fn random_offsets(rng: &mut ChaCha8Rng, rows: usize, experts: usize) -> Vec<i64> {
    let mut cuts: Vec<i64> = (0..experts - 1)
        .map(|_| rng.random_range(0..=rows as i64))
        .collect();
    if experts >= 3 {
        cuts[0] = 0;
        cuts[experts / 2] = cuts[experts / 2 - 1];
        cuts[experts - 2] = rows as i64;
    }
    cuts.sort_unstable();
    [vec![0], cuts, vec![rows as i64]].concat()
}

fn grouped_case(
    rng: &mut ChaCha8Rng,
    dtype: DType,
    (rows, inner, cols, experts): (usize, usize, usize, usize),
    offsets: &[i64],
    grad: bool,
) -> Case {
    let mut c = Case::new();
    let xs = c.random(rng, dtype, &[rows, inner]);
    let w = c.random(rng, dtype, &[experts, inner, cols]);
    let off = c.offsets(offsets);
    if grad {
        let dy = c.random(rng, dtype, &[rows, cols]);
        c.test(Op::Fused(FusedOp::GroupedMatMulGrad), &[xs, w, off, dy]);
    } else {
        c.test(Op::Fused(FusedOp::GroupedMatMul), &[xs, w, off]);
    }
    c
}

#[test]
fn grouped_matmul_and_its_gradient_match_the_interpreter() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for dtype in [DType::F32, DType::F64] {
        for (rows, inner, cols, experts) in [
            (1, 7, 33, 1),
            (33, 130, 7, 4),
            (130, 33, 130, 5),
            (7, 1, 33, 8),
            (130, 130, 1, 3),
            (130, 130, 130, 5),
        ] {
            let offsets = random_offsets(&mut rng, rows, experts);
            let largest = offsets
                .windows(2)
                .map(|w| (w[1] - w[0]) as usize)
                .max()
                .unwrap_or(0);
            let sizes = (rows, inner, cols, experts);
            let g = Grouped {
                dtype: Float::of(dtype).expect("a float"),
                rows,
                inner,
                cols,
                experts,
            };
            let fwd = grouped_case(&mut rng, dtype, sizes, &offsets, false);
            assert_eq!(fwd.call(), LibraryCall::GroupedMatMul(g.clone()));
            check(&fwd, &[inner]);
            let bwd = grouped_case(&mut rng, dtype, sizes, &offsets, true);
            assert_eq!(bwd.call(), LibraryCall::GroupedMatMulGrad(g));
            check(&bwd, &[cols, largest]);
        }
    }
}

/// Every row in one expert, no rows at all, and one expert with most of the rows (which runs
/// over the whole pool while the others are spread one per task): the weight gradients of
/// the experts without rows are 0.
#[test]
fn grouped_matmul_with_empty_and_uneven_experts() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for (rows, offsets) in [
        (33, vec![0, 0, 33, 33]),
        (0, vec![0, 0, 0, 0]),
        (130, vec![0, 100, 100, 130]),
        (130, vec![0, 5, 125, 130]),
    ] {
        let largest = offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0) as usize;
        for dtype in [DType::F32, DType::F64] {
            for grad in [false, true] {
                let c = grouped_case(&mut rng, dtype, (rows, 130, 130, 3), &offsets, grad);
                check(&c, &[130, largest]);
            }
        }
    }
}

/// Offsets one row off give a different answer that the bound sees.
#[test]
fn an_off_by_one_offset_is_caught() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let c = grouped_case(
        &mut rng,
        DType::F32,
        (33, 33, 7, 3),
        &[0, 10, 20, 33],
        false,
    );
    let out = c.node().outputs[0];
    let (want, abs) = (c.interpret(&[out], false), c.interpret(&[out], true));
    let mut bufs = c.buffers();
    let shifted: Vec<u8> = [0i64, 11, 20, 33]
        .iter()
        .flat_map(|o| o.to_le_bytes())
        .collect();
    bufs[2] = Buf::new(&shifted);
    execute(&c.call(), &mut bufs, 2).expect("valid offsets");
    let got = decode(DType::F32, &bufs[3].bytes());
    assert!(within(DType::F32, 33, &got, &want[0], &abs[0]).is_err());
}

/// Offsets that do not split the rows are an error, and nothing is written.
#[test]
fn bad_offsets_are_refused() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for grad in [false, true] {
        let c = grouped_case(&mut rng, DType::F32, (33, 7, 5, 3), &[0, 10, 20, 33], grad);
        for bad in [
            [1i64, 10, 20, 33],
            [0, 20, 10, 33],
            [0, 10, 20, 32],
            [0, 10, 20, 34],
            [0, 40, 20, 33],
            [0, -5, 20, 33],
            [0, 10, 20, i64::MAX],
        ] {
            let mut bufs = c.buffers();
            let bytes: Vec<u8> = bad.iter().flat_map(|o| o.to_le_bytes()).collect();
            bufs[2] = Buf::new(&bytes);
            let err = execute(&c.call(), &mut bufs, 2).expect_err("bad offsets");
            assert!(
                matches!(&err, LibraryError::Offsets { rows: 33, offsets, .. } if offsets == &bad),
                "{err}"
            );
            let untouched = c.buffers();
            for (b, u) in bufs.iter().zip(&untouched).skip(4) {
                assert_eq!(b.bytes(), u.bytes(), "an output was written");
            }
        }
    }
}

#[test]
fn wrong_buffer_count_is_refused() {
    let call = LibraryCall::MatMul(MatMul {
        dtype: Float::F32,
        batch: 1,
        m: 1,
        k: 1,
        n: 1,
    });
    let mut b = [Buf::filled(4, 0), Buf::filled(4, 0)];
    assert_eq!(
        execute(&call, &mut b, 1),
        Err(LibraryError::Buffers {
            expected: 3,
            got: 2
        })
    );
}

/// A workspace smaller than the call needs (a runner that sized it for fewer threads, or for
/// another plan) is refused before anything is packed into it.
#[test]
fn a_short_workspace_is_refused() {
    let call = LibraryCall::MatMul(MatMul {
        dtype: Float::F32,
        batch: 1,
        m: 300,
        k: 200,
        n: 100,
    });
    let need = call.workspace_bytes(2);
    assert!(need > 0, "a packed product needs a workspace");
    assert!(need >= call.workspace_bytes(1));
    let mut bufs = [300 * 200, 200 * 100, 300 * 100].map(|n| Buf::filled(4 * n, 0));
    let ptrs: Vec<*mut u8> = bufs.iter_mut().map(Buf::ptr).collect();
    let mut ws = Workspace::new(call.workspace_bytes(1)).expect("a workspace");
    // SAFETY: the buffers have the call's sizes.
    let got = unsafe { call.execute(&ptrs, &mut ws, &pool(2)) };
    assert_eq!(
        got,
        Err(LibraryError::Workspace {
            need,
            have: call.workspace_bytes(1),
            threads: 2
        })
    );
}

/// A call is plain data: it survives a round trip through a serialised plan.
#[test]
fn calls_serialise() {
    let calls = [
        LibraryCall::MatMul(MatMul {
            dtype: Float::F64,
            batch: 6,
            m: 7,
            k: 33,
            n: 130,
        }),
        LibraryCall::GroupedMatMulGrad(Grouped {
            dtype: Float::F32,
            rows: 130,
            inner: 33,
            cols: 7,
            experts: 4,
        }),
    ];
    for call in calls {
        let text = serde_json::to_string(&call).expect("serialises");
        let back: LibraryCall = serde_json::from_str(&text).expect("deserialises");
        assert_eq!(back, call);
    }
}
