//! Snapshots of `mmc dump-ir` for the tiny InternVL3.5 at every stage the pipeline builds
//! (`cargo insta review` after a pass changes them on purpose). Each program is kept as its
//! first lines, a count of every op, and its summary, so a snapshot stays small and still shows
//! what a pass changed: a fused op appearing, a rule folding reshapes away.

use mmc::driver::{dump_ir, DumpFormat, DumpPoint};
use mmc_frontend::Config;
use mmc_ir::Stage;
use std::collections::BTreeMap;
use std::path::Path;

/// How many lines of each program's text the digest keeps.
const HEAD: usize = 40;

/// The digest of a dump: per program, its header comment, its first lines, an op histogram,
/// and the summary comments.
fn digest(text: &str) -> String {
    let mut out = String::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        // A section: optional `; <label>` header, `graph .. {`, body, `}`, summary comments.
        let start = i;
        while i < lines.len() && !lines[i].starts_with("graph ") {
            out.push_str(lines[i]);
            out.push('\n');
            i += 1;
        }
        if i == lines.len() {
            break;
        }
        let graph_start = i;
        while i < lines.len() && lines[i] != "}" {
            i += 1;
        }
        let body = &lines[graph_start..i];
        for l in body.iter().take(HEAD) {
            out.push_str(l);
            out.push('\n');
        }
        out.push_str(&format!(
            "  ;; ... {} more lines ...\n}}\n",
            body.len().saturating_sub(HEAD)
        ));
        let mut ops: BTreeMap<&str, usize> = BTreeMap::new();
        for l in body {
            if let Some((_, rhs)) = l.split_once(" = ") {
                if l.trim_start().starts_with('%') {
                    let op = rhs.split_whitespace().next().unwrap_or("?");
                    *ops.entry(op).or_default() += 1;
                }
            }
        }
        out.push_str(";; ops:");
        for (op, n) in &ops {
            out.push_str(&format!(" {op} {n},"));
        }
        out.pop();
        out.push('\n');
        i += 1;
        while i < lines.len()
            && lines[i].starts_with(';')
            && !lines[i + 1..]
                .first()
                .is_some_and(|n| n.starts_with("graph "))
        {
            out.push_str(lines[i]);
            out.push('\n');
            i += 1;
        }
        if i == start {
            i += 1;
        }
    }
    out
}

fn dump(stage: Stage) -> String {
    let cfg = Config::load(Path::new("configs/internvl35-tiny.toml")).expect("the tiny config");
    dump_ir(&cfg, &DumpPoint::Stage(stage), DumpFormat::Text)
        .unwrap_or_else(|e| panic!("{stage}: {e:#}"))
}

#[test]
fn tiny_frontend() {
    insta::assert_snapshot!(digest(&dump(Stage::Frontend)));
}

#[test]
fn tiny_fused() {
    insta::assert_snapshot!(digest(&dump(Stage::Fused)));
}

#[test]
fn tiny_autodiff() {
    insta::assert_snapshot!(digest(&dump(Stage::Autodiff)));
}

#[test]
fn tiny_optimizer() {
    insta::assert_snapshot!(digest(&dump(Stage::Optimizer)));
}

/// The scheduled programs: each computed value's arena slot (`; @offset +bytes`) ends its
/// line, and each program's arena size follows it.
#[test]
fn tiny_scheduled() {
    let text = dump(Stage::Scheduled);
    let mut shown = digest(&text);
    shown.push_str(";; the first computed values of micro_step with their arena slots:\n");
    for l in text.lines().filter(|l| l.contains("  ; @")).take(30) {
        shown.push_str(l);
        shown.push('\n');
    }
    insta::assert_snapshot!(shown);
}

#[test]
fn every_stage_the_pipeline_builds_has_a_snapshot() {
    // A stage that becomes built (parallel, with sharding) needs its snapshot here.
    let cfg = Config::load(Path::new("configs/internvl35-tiny.toml")).unwrap();
    let declared = mmc::driver::training_forward(&cfg).unwrap();
    let pipeline = mmc::driver::pipeline_for(&cfg, &declared.graph, Default::default()).unwrap();
    let built: Vec<Stage> = Stage::ALL
        .into_iter()
        .filter(|s| pipeline.builds(*s))
        .collect();
    assert_eq!(
        built,
        [
            Stage::Frontend,
            Stage::Fused,
            Stage::Autodiff,
            Stage::Optimizer,
            Stage::Scheduled
        ]
    );
}

#[test]
fn the_digest_keeps_every_program_and_its_summary() {
    let text = "; a\ngraph optimizer {\n  %0 = input \"x\" : f32[2]\n  %1 = exp %0 : f32[2]\n  output \"y\" = %1\n}\n; summary of m (a)\n; nodes: 2\n; b\ngraph optimizer {\n  %0 = input \"x\" : f32[2]\n}\n; summary of m (b)\n";
    let d = digest(text);
    assert!(d.starts_with("; a\ngraph optimizer {\n"), "{d}");
    assert!(
        d.contains(";; ops: exp 1, input 1\n; summary of m (a)\n; nodes: 2\n; b\n"),
        "{d}"
    );
    assert!(d.ends_with(";; ops: input 1\n; summary of m (b)\n"), "{d}");
}

/// `--stage kernels` prints the kernel IR of both scheduled programs and their coverage, and
/// every kernel it prints is one that LLVM compiles: the whole set builds into one library.
#[test]
fn the_kernel_stage_prints_kernels_that_compile() {
    let cfg = Config::load(Path::new("configs/internvl35-tiny.toml")).expect("the tiny config");
    let text = dump_ir(&cfg, &DumpPoint::Kernels, DumpFormat::Text).expect("dumps");
    for program in ["micro_step", "apply"] {
        assert!(
            text.contains(&format!("; kernels of program {program}")),
            "{program}"
        );
    }
    assert_eq!(
        text.matches("computing nodes have generated kernels")
            .count(),
        2
    );
    let plan = mmc::driver::compile_plan(&cfg).expect("compiles");
    // Attention and the linear cross-entropy, forward and backward, are printed loop kernels.
    let mut fused = std::collections::BTreeSet::new();
    for p in &plan.programs {
        for (id, node) in p.graph.iter_nodes() {
            let name = node.op.name();
            if !name.starts_with("fused.attention") && !name.starts_with("fused.linear_cross") {
                continue;
            }
            let l = mmc_codegen::ops::lower_node(&p.graph, node, &format!("k{}", id.0))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            for launch in &l.launches {
                let printed = launch.work.to_string();
                assert!(text.contains(&printed), "{name}: {printed} is not printed");
            }
            assert!(l
                .kernels()
                .all(|k| matches!(k, mmc_codegen::kernel::GeneratedKernel::Loop(_))));
            fused.insert(name);
        }
    }
    assert_eq!(
        fused.into_iter().collect::<Vec<_>>(),
        [
            "fused.attention",
            "fused.attention_grad",
            "fused.linear_cross_entropy_with_grad"
        ]
    );
    let mut kernels = Vec::new();
    for p in &plan.programs {
        for (id, node) in p.graph.iter_nodes() {
            let name = format!("{}_k{}", p.name, id.0);
            if let Ok(l) = mmc_codegen::ops::lower_node(&p.graph, node, &name) {
                kernels.extend(l.kernels().cloned());
            }
        }
    }
    let printed = text.matches("\nkernel ").count()
        + text.matches("\nloop kernel ").count()
        + usize::from(text.starts_with("kernel "));
    assert_eq!(printed, kernels.len());
    assert!(
        text.contains("library matmul f32"),
        "GEMMs are library calls"
    );
    // Every computing node of both programs has kernels or a library call.
    for line in text.lines().filter(|l| l.contains("computing nodes have")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[1], words[3], "{line}");
    }
    assert!(kernels.len() > 1000, "{}", kernels.len());
    let dir = tempfile::tempdir().expect("a temporary folder");
    mmc_codegen::cpu::build_library(
        &kernels,
        &mmc_codegen::cpu::CpuTarget::host(),
        &dir.path().join("tiny.so"),
    )
    .expect("every kernel compiles");
}
