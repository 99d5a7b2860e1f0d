//! File tests of the passes, in the manner of Cranelift's filetests.
//!
//! Every `tests/filetests/<dir>/*.mmcir` file starts with `; test <pass>` (optionally followed
//! by `precise-output`) and holds one or more cases, each a `graph <stage> { .. }` in the IR
//! text format. The pass named by the test line ([`PASSES`]) runs on each case; its output must
//! verify, and must compute what the input computes: every output the two graphs share is
//! compared in the interpreter on seeded random inputs (floats in [-2, 2], integers in
//! `0..=1`, so that any index is in range for an axis of size 2 or more).
//!
//! The `;` lines after a case's closing `}` are matched against the printed output: with the
//! `filecheck` crate (`check:`, `nextln:`, `sameln:`, `not:`, `unordered:`, `regex:`), or, in a
//! `precise-output` file, as the whole expected text (`; ` then one printed line each).
//! `MMC_BLESS=1` rewrites those expected blocks from the actual output. Lines starting with `;;`
//! are prose.
//!
//! The directory names the pass and the file names the rule it exercises
//! (`simplify/reshape_reshape.mmcir` pairs with the `reshape-reshape` rule).

use mmc_ir::text::{parse, print};
use mmc_ir::{relative_error, verify, DType, Graph, Interpreter, Precision, Tensor};
use mmc_passes::fuse::FuseLimits;
use mmc_passes::pipeline::{
    Autodiff, BoxError, Fuse, FuseAccumulate, FuseElementwise, FuseLossGrad, Pass, Recompute,
    Schedule, Simplify,
};
use mmc_passes::RecomputeMode;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A pass that a test line can name.
type PassFn = fn() -> Box<dyn Pass>;

/// The registry of testable passes: `; test <name>` runs the pass built here. (`memory` is
/// a program pass whose result is a layout, not a graph, and the routed MoE's dense input is
/// hundreds of lines: `passes/tests/memory.rs` and `passes/tests/fuse_moe.rs` test them.)
const PASSES: &[(&str, PassFn)] = &[
    ("simplify", || Box::new(Simplify)),
    ("fuse", || {
        Box::new(Fuse {
            limits: FuseLimits::default(),
        })
    }),
    ("recompute", || {
        Box::new(Recompute {
            mode: RecomputeMode::Full,
        })
    }),
    ("schedule", || Box::new(Schedule)),
    ("fuse-elementwise", || Box::new(FuseElementwise)),
    ("fuse-loss-grad", || Box::new(FuseLossGrad)),
    ("fuse-accumulate", || Box::new(FuseAccumulate)),
    ("autodiff", || {
        Box::new(Autodiff {
            loss: "loss".into(),
            trainable: Arc::new(|_| true),
        })
    }),
];

/// Two outputs agree when their relative error is at most this (the rules are exact; this
/// only forgives the sign of a zero and the summation order of merged gradients).
const TOLERANCE: f64 = 1e-6;

/// One `graph` case of a file, by line numbers (0-based, end exclusive).
struct Case {
    /// The graph text's lines: from `graph` to the closing `}`.
    graph: std::ops::Range<usize>,
    /// The `;` directive lines right after the graph (prose `;;` lines excluded).
    directives: std::ops::Range<usize>,
}

/// Splits a file into its cases; an error names the line.
fn cases(lines: &[&str]) -> Result<Vec<Case>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if !lines[i].starts_with("graph ") {
            i += 1;
            continue;
        }
        let start = i;
        while i < lines.len() && lines[i].trim_end() != "}" {
            i += 1;
        }
        if i == lines.len() {
            return Err(format!("line {}: the graph is not closed", start + 1));
        }
        i += 1;
        let graph = start..i;
        let d = i;
        while i < lines.len() && lines[i].starts_with(';') && !lines[i].starts_with(";;") {
            i += 1;
        }
        out.push(Case {
            graph,
            directives: d..i,
        });
    }
    Ok(out)
}

/// Seeded random tensors for every parameter and input of `g`.
fn bindings(g: &Graph, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = HashMap::new();
    for (name, ty, _) in g.params().chain(g.inputs()) {
        let values: Vec<f64> = (0..ty.numel())
            .map(|_| match ty.dtype {
                d if d.is_float() => rng.random_range(-2.0..=2.0),
                DType::Bool => f64::from(rng.random_range(0..=1u8)),
                _ => f64::from(rng.random_range(0..=1u8)),
            })
            .collect();
        let t = Tensor::from_f64(ty.dtype, ty.shape.clone(), &values).expect("sized");
        out.insert(name.to_string(), t);
    }
    out
}

/// Compares the outputs the two graphs share on seeded inputs.
fn same_results(before: &Graph, after: &Graph, seed: u64) -> Result<(), String> {
    let b = bindings(before, seed);
    let run = |g: &Graph| -> Result<mmc_ir::Outputs, String> {
        Interpreter::new(g, Precision::Declared)
            .map_err(|e| e.to_string())?
            .run(&b)
            .map_err(|e| e.to_string())
    };
    let (want, got) = (run(before)?, run(after)?);
    for (name, w) in &want.0 {
        let Some(o) = got.get(name) else { continue };
        if w.shape() != o.shape() || w.dtype() != o.dtype() {
            return Err(format!(
                "output `{name}` changed type: {} -> {}",
                w.ty(),
                o.ty()
            ));
        }
        let both_nan = |t: &Tensor| {
            t.to_f64_vec()
                .iter()
                .map(|x| x.is_nan())
                .collect::<Vec<_>>()
        };
        if both_nan(w) != both_nan(o) {
            return Err(format!("output `{name}`: NaNs moved"));
        }
        let (wc, oc) = (finite(w), finite(o));
        let err = relative_error(&oc, &wc);
        if err > tolerance(before) {
            return Err(format!("output `{name}` differs by {err:.3e}"));
        }
    }
    Ok(())
}

/// The tolerance of a graph's comparison: [`TOLERANCE`], or the rounding of its least precise
/// float dtype, since a fused op rounds once where the primitive form rounds after every op.
fn tolerance(g: &Graph) -> f64 {
    let widest_rounding = (0..g.num_values())
        .map(|v| match g.ty(mmc_ir::Value(v as u32)).dtype {
            DType::BF16 => 2e-2,
            DType::F16 => 2e-3,
            _ => 0.0,
        })
        .fold(0.0, f64::max);
    TOLERANCE.max(widest_rounding)
}

/// The tensor with NaNs zeroed (their positions are compared separately).
fn finite(t: &Tensor) -> Tensor {
    let v: Vec<f64> = t
        .to_f64_vec()
        .into_iter()
        .map(|x| if x.is_nan() { 0.0 } else { x })
        .collect();
    Tensor::from_f64(DType::F64, t.shape().to_vec(), &v).expect("sized")
}

/// Matches `output` against filecheck directives.
fn filecheck(directives: &str, output: &str) -> Result<(), String> {
    let checker = filecheck::CheckerBuilder::new()
        .text(directives)
        .map_err(|e| format!("bad directive: {e}"))?
        .finish();
    if checker.is_empty() {
        return Err("the case has no check directive".into());
    }
    let (ok, explain) = checker
        .explain(output, filecheck::NO_VARIABLES)
        .map_err(|e| format!("bad directive: {e}"))?;
    if ok {
        Ok(())
    } else {
        Err(format!("filecheck failed:\n{explain}\noutput:\n{output}"))
    }
}

/// The expected block of a precise-output case for `output`.
fn expected_block(output: &str) -> Vec<String> {
    output
        .lines()
        .map(|l| format!("; {l}").trim_end().to_string())
        .collect()
}

/// Runs one file; returns its failures, and rewrites it in bless mode.
fn run_file(path: &Path, bless: bool) -> Vec<String> {
    let text = std::fs::read_to_string(path).expect("readable test file");
    let lines: Vec<&str> = text.lines().collect();
    let fail = |msg: String| vec![format!("{}: {msg}", path.display())];
    let Some(header) = lines.iter().find(|l| !l.trim().is_empty()) else {
        return fail("empty file".into());
    };
    let words: Vec<&str> = header.split_whitespace().collect();
    let (pass_name, precise) = match words.as_slice() {
        [";", "test", name] => (*name, false),
        [";", "test", name, "precise-output"] => (*name, true),
        _ => return fail("the first line must be `; test <pass> [precise-output]`".into()),
    };
    let Some((_, make)) = PASSES.iter().find(|(n, _)| *n == pass_name) else {
        return fail(format!("no pass named `{pass_name}` in the registry"));
    };
    let dir = path
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str());
    if dir != Some(pass_name) {
        return fail(format!(
            "a `{pass_name}` test belongs in filetests/{pass_name}/"
        ));
    }
    let cases = match cases(&lines) {
        Ok(c) if c.is_empty() => return fail("no `graph` case".into()),
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let pass = make();
    let mut failures = Vec::new();
    let mut blessed: Vec<(std::ops::Range<usize>, Vec<String>)> = Vec::new();
    for (k, case) in cases.iter().enumerate() {
        let at = format!("{}:{}", path.display(), case.graph.start + 1);
        let src = lines[case.graph.clone()].join("\n");
        let result = (|| -> Result<String, String> {
            let input = parse(&src).map_err(|e| format!("parse: {e}"))?;
            verify(&input).map_err(|e| format!("the input does not verify: {e}"))?;
            let mut notes = Vec::new();
            let output = pass
                .run(input.clone(), &mut notes)
                .map_err(|e: BoxError| format!("{pass_name} failed: {e}"))?;
            verify(&output).map_err(|e| format!("{pass_name} produced an invalid graph: {e}"))?;
            same_results(&input, &output, k as u64 + 1)?;
            Ok(print(&output))
        })();
        let output = match result {
            Ok(o) => o,
            Err(e) => {
                failures.push(format!("{at}: {e}"));
                continue;
            }
        };
        let directives = lines[case.directives.clone()].join("\n");
        if precise {
            let want = expected_block(&output);
            let have: Vec<String> = lines[case.directives.clone()]
                .iter()
                .map(|l| l.trim_end().to_string())
                .collect();
            if have != want {
                if bless {
                    blessed.push((case.directives.clone(), want));
                } else {
                    failures.push(format!(
                        "{at}: the output differs from the expected block (MMC_BLESS=1 rewrites it):\n{output}"
                    ));
                }
            }
        } else if let Err(e) = filecheck(&directives, &output) {
            failures.push(format!("{at}: {e}"));
        }
    }
    if !blessed.is_empty() {
        let mut out: Vec<String> = Vec::new();
        let mut i = 0;
        for (range, block) in blessed {
            out.extend(lines[i..range.start].iter().map(|l| l.to_string()));
            out.extend(block);
            i = range.end;
        }
        out.extend(lines[i..].iter().map(|l| l.to_string()));
        std::fs::write(path, out.join("\n") + "\n").expect("writable test file");
    }
    failures
}

fn test_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/filetests");
    let mut files = Vec::new();
    for dir in std::fs::read_dir(&root).expect("tests/filetests exists") {
        let dir = dir.expect("readable").path();
        if !dir.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&dir).expect("readable") {
            let f = f.expect("readable").path();
            if f.extension().is_some_and(|e| e == "mmcir") {
                files.push(f);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn filetests() {
    let bless = std::env::var_os("MMC_BLESS").is_some_and(|v| v == "1");
    let files = test_files();
    assert!(!files.is_empty(), "no file tests found");
    let failures: Vec<String> = files.iter().flat_map(|f| run_file(f, bless)).collect();
    eprintln!("{} file tests run", files.len());
    assert!(
        failures.is_empty(),
        "{} failure(s):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn every_simplify_rule_has_a_file_test() {
    for (_, rule, _) in mmc_passes::simplify::RULES {
        let file = format!("tests/filetests/simplify/{}.mmcir", rule.replace('-', "_"));
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(&file);
        assert!(path.is_file(), "rule `{rule}` has no file test {file}");
    }
}

#[test]
fn a_failing_check_fails() {
    // The runner itself: a check that cannot match, a `not:` that matches, and a changed
    // result must each be reported.
    assert!(filecheck("; check: nowhere", "graph fused {\n}").is_err());
    assert!(filecheck(
        "; check: graph\n; not: exp",
        "graph fused {\n  %1 = exp %0\n}"
    )
    .is_err());
    assert!(filecheck(
        "; check: graph\n; nextln: exp",
        "graph fused {\n  %1 = exp %0\n}"
    )
    .is_ok());
    let a = parse("graph frontend {\n  %0 = input \"x\" : f32[2]\n  %1 = exp %0 : f32[2]\n  output \"y\" = %1\n}").unwrap();
    let b = parse("graph frontend {\n  %0 = input \"x\" : f32[2]\n  %1 = neg %0 : f32[2]\n  output \"y\" = %1\n}").unwrap();
    assert!(same_results(&a, &b, 1).is_err());
    assert!(same_results(&a, &a, 1).is_ok());
}
