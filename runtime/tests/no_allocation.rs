//! The compiled runner allocates no buffers per step: after the first run, replaying the
//! program allocates only its returned outputs (here the loss: a few small allocations), never
//! a tensor of the program's size. A counting allocator sees every allocation of the process,
//! so this file holds one test (nothing else runs beside it).

#[path = "common/runner.rs"]
mod runner;

use mmc_ir::Tensor;
use runner::{compiled, program_of, tensor_of};
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

#[test]
fn replaying_a_program_allocates_no_buffers() {
    // 64 x 1037 f32 (265 KB): 17 tiles a kernel, so two threads split every launch.
    let rows = 64;
    let p = program_of(rows);
    let dir = tempfile::tempdir().expect("a folder");
    for threads in [1, 2] {
        let mut runner = compiled(&p, dir.path(), threads);
        let mut state: HashMap<String, Tensor> = [("w", 1), ("m", 2), ("v", 3)]
            .into_iter()
            .map(|(n, seed)| (n.to_string(), tensor_of(rows, seed)))
            .collect();
        let data: BTreeMap<String, Tensor> = [("x".to_string(), tensor_of(rows, 10))].into();
        // The first run may size the runner's reusable tables.
        runner.run("apply", &mut state, &data).expect("runs");
        ALLOCATIONS.store(0, Ordering::Relaxed);
        LARGEST.store(0, Ordering::Relaxed);
        COUNTING.store(true, Ordering::Relaxed);
        let mut outs = Vec::new();
        for _ in 0..5 {
            outs.push(runner.run("apply", &mut state, &data).expect("runs"));
        }
        COUNTING.store(false, Ordering::Relaxed);
        let (n, largest) = (
            ALLOCATIONS.load(Ordering::Relaxed),
            LARGEST.load(Ordering::Relaxed),
        );
        drop(outs);
        // No allocation comes near the program's tensors (the largest is the returned map's
        // node), and only the outputs allocate: a few per replay.
        println!("{threads} thread(s): {n} allocations in 5 replays, the largest {largest} bytes");
        assert!(
            largest < 4096,
            "{threads} thread(s): an allocation of {largest} bytes in a replay"
        );
        assert!(
            n <= 5 * 8,
            "{threads} thread(s): {n} allocations in 5 replays (the outputs take a few each)"
        );
    }
}
