//! The compiled runner allocates no buffers per step: after the first run, replaying a
//! program allocates only its returned outputs (here the loss: a few small allocations), never
//! a tensor of the program's size, nor a GEMM's packing buffers (they are in the workspace the
//! runner allocated once). A counting allocator sees every allocation of the process, so this
//! file holds one test (nothing else runs beside it).

#[path = "common/runner.rs"]
mod runner;

use mmc_ir::plan::Program;
use mmc_ir::{DType, FusedOp, Graph, Op, ReduceKind, ScopeId, Stage, Tensor, TensorType, Value};
use mmc_runtime::compiled::CompiledRunner;
use runner::{compiled, compiled_any, program_of, tensor_of};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The system allocator, counting allocations and their largest size while `COUNTING` is set.
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; the counters are atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: the caller's contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn add(g: &mut Graph, op: Op, ins: &[Value]) -> Value {
    let id = g
        .add_node(op, ins, ScopeId::default())
        .expect("a valid node");
    g.result(id)
}

/// Every way a library call runs, each over the pool: a product reading its lhs in place
/// (`a @ b`), one packing it (`c @ d`, more than 8192 output columns), the same product in
/// bf16 (through the f32 tile), a contraction split over the threads (`e @ f`), and a grouped
/// matmul over four experts; `loss` sums them all.
fn gemm_program() -> (Program, BTreeMap<String, Tensor>) {
    let mut g = Graph::new(Stage::Fused);
    let mut data = BTreeMap::new();
    let mut input = |g: &mut Graph, name: &str, dtype: DType, shape: &[usize]| {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|i| ((i * 7919 + name.len() * 31) % 1000) as f64 / 500.0 - 1.0)
            .collect();
        let t = if dtype == DType::I64 {
            // Grouped offsets: 4 experts over 256 rows, unevenly.
            Tensor::from_f64(dtype, shape.to_vec(), &[0.0, 40.0, 140.0, 141.0, 256.0])
        } else {
            Tensor::from_f64(dtype, shape.to_vec(), &v)
        }
        .expect("sizes");
        data.insert(name.to_string(), t);
        add(
            g,
            Op::Input {
                name: name.into(),
                ty: TensorType::new(dtype, shape.to_vec()),
            },
            &[],
        )
    };
    let f = DType::F32;
    let (a, b) = (
        input(&mut g, "a", f, &[96, 200]),
        input(&mut g, "b", f, &[200, 300]),
    );
    let (c, d) = (
        input(&mut g, "c", f, &[70, 64]),
        input(&mut g, "d", f, &[64, 9000]),
    );
    let (e, f2) = (
        input(&mut g, "e", f, &[32, 8192]),
        input(&mut g, "f", f, &[8192, 32]),
    );
    let xs = input(&mut g, "xs", f, &[256, 64]);
    let w = input(&mut g, "w", f, &[4, 64, 96]);
    let off = input(&mut g, "offsets", DType::I64, &[5]);
    let mut parts = vec![
        add(&mut g, Op::MatMul, &[a, b]),
        add(&mut g, Op::MatMul, &[c, d]),
        add(&mut g, Op::MatMul, &[e, f2]),
        add(&mut g, Op::Fused(FusedOp::GroupedMatMul), &[xs, w, off]),
    ];
    let to = |g: &mut Graph, x, to| add(g, Op::Cast { to }, &[x]);
    let (ah, bh) = (to(&mut g, a, DType::BF16), to(&mut g, b, DType::BF16));
    let abh = add(&mut g, Op::MatMul, &[ah, bh]);
    parts.push(to(&mut g, abh, DType::F32));
    let sums: Vec<Value> = parts
        .into_iter()
        .map(|x| {
            add(
                &mut g,
                Op::Reduce {
                    kind: ReduceKind::Sum,
                    axes: vec![0, 1],
                },
                &[x],
            )
        })
        .collect();
    let mut loss = sums[0];
    for &s in &sums[1..] {
        loss = add(&mut g, Op::Binary(mmc_ir::BinaryOp::Add), &[loss, s]);
    }
    g.add_output("loss", loss);
    (Program::new("gemms", g, vec![]), data)
}

/// Runs `name` once (the first run may size the runner's reusable tables), then five times
/// counting allocations, and checks that only small ones (the outputs') happened.
fn replays_without_buffers(
    what: &str,
    runner: &mut CompiledRunner,
    name: &str,
    state: &mut HashMap<String, Tensor>,
    data: &BTreeMap<String, Tensor>,
) {
    let first = runner.run(name, state, data).expect("runs");
    ALLOCATIONS.store(0, Ordering::Relaxed);
    LARGEST.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
    let mut outs = Vec::new();
    for _ in 0..5 {
        outs.push(runner.run(name, state, data).expect("runs"));
    }
    COUNTING.store(false, Ordering::Relaxed);
    let (n, largest) = (
        ALLOCATIONS.load(Ordering::Relaxed),
        LARGEST.load(Ordering::Relaxed),
    );
    if state.is_empty() {
        // Without state, every replay computes the same outputs.
        for o in &outs {
            assert_eq!(o, &first, "{what}: a replay changed the outputs");
        }
    }
    drop(outs);
    // No allocation comes near the program's tensors (the largest is the returned map's
    // node), and only the outputs allocate: a few per replay.
    println!("{what}: {n} allocations in 5 replays, the largest {largest} bytes");
    assert!(
        largest < 4096,
        "{what}: an allocation of {largest} bytes in a replay"
    );
    assert!(
        n <= 5 * 8,
        "{what}: {n} allocations in 5 replays (the outputs take a few each)"
    );
}

#[test]
fn replaying_a_program_allocates_no_buffers() {
    // 64 x 1037 f32 (265 KB): 17 tiles a kernel, so two threads split every launch.
    let rows = 64;
    let p = program_of(rows);
    let (gemms, gemm_data) = gemm_program();
    let dir = tempfile::tempdir().expect("a folder");
    for threads in [1, 2] {
        let mut runner = compiled(&p, dir.path(), threads);
        let mut state: HashMap<String, Tensor> = [("w", 1), ("m", 2), ("v", 3)]
            .into_iter()
            .map(|(n, seed)| (n.to_string(), tensor_of(rows, seed)))
            .collect();
        let data: BTreeMap<String, Tensor> = [("x".to_string(), tensor_of(rows, 10))].into();
        let what = format!("kernels, {threads} thread(s)");
        replays_without_buffers(&what, &mut runner, "apply", &mut state, &data);

        let mut runner = compiled_any(&gemms, dir.path(), threads);
        assert!(runner.workspace_bytes() > 0, "the GEMMs have a workspace");
        let what = format!("library calls, {threads} thread(s)");
        replays_without_buffers(&what, &mut runner, "gemms", &mut HashMap::new(), &gemm_data);
    }
}
