//! Gradients summed onto their accumulators in place: after `fuse-accumulate`, the compiled
//! program writes the cross-entropy's dw and the embedding's scatter-add straight into their
//! `grad_acc:` state, so no [vocab, hidden] gradient takes room in the arena, and the copy of
//! each accumulator onto itself is dropped.

use mmc_codegen::compiled::{CompiledProgram, Compiler, Loc};
use mmc_ir::plan::{Program, StateUpdate};
use mmc_ir::text::parse;
use mmc_passes::fuse_accumulate::fuse_accumulate;

/// A micro-step's two vocabulary-sized gradients (4096 x 64 f32, 1 MiB each) added to their
/// accumulators, as the training step emits them.
const STEP: &str = r#"graph scheduled {
  %0 = input "h" : f32[8, 64]
  %1 = param "w" : f32[4096, 64]
  %2 = input "target" : i64[8]
  %3 = input "weight" : f32[8]
  %4 = input "dloss" : f32[]
  %5 = input "ids" : i64[8, 64]
  %6 = input "rows" : f32[8, 64]
  %7, %8, %9 = fused.linear_cross_entropy_with_grad %0, %1, %2, %3, %4 chunk=4 : f32[], f32[8, 64], f32[4096, 64]
  %10 = const value=0.0 : f32[4096, 64]
  %11 = scatter_add %10, %5, %6 axis=0 : f32[4096, 64]
  %12 = input "grad_acc:w" : f32[4096, 64]
  %13 = add %12, %9 : f32[4096, 64]
  %14 = input "grad_acc:embed" : f32[4096, 64]
  %15 = add %14, %11 : f32[4096, 64]
  output "loss" = %7
  output "dh" = %8
  output "new:grad_acc:w" = %13
  output "new:grad_acc:embed" = %15
}
"#;

const MIB: u64 = 1 << 20;

fn compile(graph: mmc_ir::Graph, updates: bool) -> CompiledProgram {
    let updates = if updates {
        ["w", "embed"]
            .iter()
            .map(|p| StateUpdate {
                output: format!("new:grad_acc:{p}"),
                state: format!("grad_acc:{p}"),
            })
            .collect()
    } else {
        Vec::new()
    };
    Compiler::default()
        .program(&Program::new("micro_step", graph, updates))
        .expect("compiles")
}

#[test]
fn fused_accumulations_write_the_state_in_place() {
    let g = parse(STEP).expect("parses");
    let (fused, n) = fuse_accumulate(&g).expect("fuses");
    assert_eq!(n, 2);

    // Unfused: both gradients (and the scatter's zeros) live in the arena.
    let before = compile(g, true);
    assert!(before.arena_bytes >= 2 * MIB, "{}", before.arena_bytes);

    // Fused: each sum is written into its accumulator, and the arena holds only small values.
    let after = compile(fused.clone(), true);
    assert!(after.arena_bytes < MIB / 4, "{}", after.arena_bytes);
    for name in ["new:grad_acc:w", "new:grad_acc:embed"] {
        let o = after
            .outputs
            .iter()
            .find(|o| o.name == name)
            .expect("output");
        let state = o.update.expect("a state update");
        assert_eq!(o.loc, Loc::Bound(state), "{name} is not written in place");
    }

    // The accumulators' copies onto themselves are dropped: one step fewer for each op than
    // when the sums are plain outputs (copied from the accumulators into the arena).
    let copied = compile(fused, false);
    assert_eq!(copied.steps.len(), after.steps.len() + 2);
    assert!(copied.arena_bytes >= 2 * MIB);
}
