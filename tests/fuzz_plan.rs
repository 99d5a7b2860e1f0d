//! Fuzzes reading a compiled plan (`plan.bin`: a binary container whose body, in postcard,
//! holds programs as graphs in mmc's text form) and the graph text parser and verifier it runs.
//! The plan of the tiny Qwen3-MoE, damaged as disks damage files (bytes flipped, inserted,
//! truncated) or as a faulty writer would (the body's bytes changed or graph lines lost,
//! repeated or with other numbers, behind valid checksums), must read or fail with a one-line
//! error; never a panic or a hang. `mmc run` reads plans written elsewhere, perhaps by another
//! version, perhaps cut short.
//!
//! Only the public API is used (`Plan::to_bytes`, `Plan::from_bytes`, `RawPlanFile` to take
//! the container apart and put it back together with fresh checksums, `text::parse`, `verify`),
//! so that damage behind valid checksums reaches the body's decoder and the plan's checks.

#[path = "fuzz/mod.rs"]
mod fuzz;

use fuzz::{FileCase, Rng};
use mmc_frontend::Config;
use mmc_ir::plan::Plan;
use mmc_ir::plan_file::{RawPlanFile, SectionKind, INTERPRETER_TARGET};
use mmc_ir::{text, verify};
use std::path::Path;

fn plan() -> Plan {
    let toml = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/qwen3-moe-tiny.toml");
    let cfg = Config::load(&toml).unwrap_or_else(|e| panic!("{e}"));
    mmc::driver::compile_plan(&cfg).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Words of graph text to put where others were: op names, dtypes, attribute names, values.
const GRAPH_WORDS: &[&str] = &[
    "add",
    "mul",
    "matmul",
    "reshape",
    "broadcast",
    "permute",
    "slice",
    "concat",
    "gather",
    "scatter_add",
    "reduce_sum",
    "reduce_max",
    "softmax",
    "select",
    "const",
    "iota",
    "input",
    "param",
    "argsort",
    "cast",
    "exp",
    "rsqrt",
    "f32",
    "bf16",
    "f16",
    "i64",
    "i32",
    "bool",
    "f64",
    "axis",
    "axes",
    "perm",
    "start",
    "end",
    "shape",
    "value",
    "descending",
    "true",
    "false",
    "inf",
    "nan",
    "-inf",
];

const GRAPH_NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "3",
    "64",
    "999999",
    "4294967296",
    "18446744073709551615",
    "99999999999999999999999",
    "1e308",
    "-0",
    "0.5",
];

/// A graph-text-aware mutation: a line removed, repeated or swapped (SSA and order break), a
/// number, word or value reference of a line replaced (shapes, axes, operands, op names).
fn mutate_graph(rng: &mut Rng, text: &str) -> (String, String) {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    if lines.len() < 3 || rng.chance(0.3) {
        return fuzz::mutate_lines(rng, text);
    }
    // Not the first and last lines (`graph ... {` and `}`) most of the time.
    let i = if rng.chance(0.9) {
        rng.range(1, lines.len() - 2)
    } else {
        rng.below(lines.len())
    };
    // Tokens of the line: runs of word characters, with their byte range.
    let line = lines[i].clone();
    let mut tokens: Vec<(usize, usize)> = Vec::new();
    let mut start = None;
    for (k, c) in line
        .char_indices()
        .chain(std::iter::once((line.len(), ' ')))
    {
        let word = c.is_ascii_alphanumeric() || c == '_' || c == '%' || c == '.' || c == '-';
        match (word, start) {
            (true, None) => start = Some(k),
            (false, Some(s)) => {
                tokens.push((s, k));
                start = None;
            }
            _ => {}
        }
    }
    if tokens.is_empty() {
        return fuzz::mutate_lines(rng, text);
    }
    let (s, e) = *rng.pick(&tokens);
    let old = &line[s..e];
    let new = if let Some(n) = old.strip_prefix('%') {
        let n: u64 = n.parse().unwrap_or(0);
        let choices = [0, n.saturating_sub(1), n + 1, n.saturating_mul(2), 999_999];
        format!("%{}", rng.pick(&choices))
    } else if old.starts_with(|c: char| c.is_ascii_digit() || c == '-') {
        rng.pick(GRAPH_NUMBERS).to_string()
    } else {
        rng.pick(GRAPH_WORDS).to_string()
    };
    let how = format!("graph line {}: `{old}` -> `{new}`", i + 1);
    lines[i] = format!("{}{new}{}", &line[..s], &line[e..]);
    (lines.join("\n") + "\n", how)
}

/// Reads graph text as `Plan::from_bytes` does: parse, then verify.
fn read_graph(text: &str) -> Result<(), String> {
    let g = text::parse(text).map_err(|e| e.to_string())?;
    verify(&g).map_err(|e| e.to_string())
}

/// A plan file for the interpreter around `body`, with checksums that match it.
fn with_body(body: &[u8]) -> Vec<u8> {
    RawPlanFile {
        target: INTERPRETER_TARGET.into(),
        sections: vec![(SectionKind::Body, body)],
    }
    .to_bytes()
}

/// The plan's body, and where in it the string `s` is: postcard writes a string as its length
/// (a varint) and its bytes, so the span covers both.
fn string_span(body: &[u8], s: &str) -> (usize, usize) {
    let enc = postcard::to_allocvec(s).expect("a string serialises");
    let at = body
        .windows(enc.len())
        .position(|w| w == enc.as_slice())
        .unwrap_or_else(|| panic!("`{}` is not in the plan body", s.escape_debug()));
    (at, at + enc.len())
}

/// `body` with the string at `span` replaced by `s`.
fn replace_string(body: &[u8], span: (usize, usize), s: &str) -> Vec<u8> {
    let enc = postcard::to_allocvec(s).expect("a string serialises");
    [&body[..span.0], &enc, &body[span.1..]].concat()
}

fn body_of(bytes: &[u8]) -> Vec<u8> {
    RawPlanFile::parse(Path::new("plan.bin"), bytes)
        .expect("the plan's container")
        .section(SectionKind::Body)
        .expect("a body section")
        .to_vec()
}

#[test]
fn damaged_plans_read_or_give_a_clear_error() {
    let plan = plan();
    let bytes = plan.to_bytes();
    Plan::from_bytes(Path::new("plan.bin"), &bytes).expect("the plan reads back");
    let body = body_of(&bytes);
    assert_eq!(with_body(&body), bytes);
    let graphs: Vec<String> = plan
        .programs
        .iter()
        .map(|p| text::print(&p.graph))
        .collect();
    let spans: Vec<(usize, usize)> = graphs.iter().map(|g| string_span(&body, g)).collect();
    fuzz::run(
        "plan",
        fuzz::case_count(3000),
        |rng| {
            let (bytes, how) = match rng.below(10) {
                0..=2 => {
                    // The file as a disk or a copy damages it: the checksums see it.
                    let mut b = bytes.clone();
                    let how = if rng.chance(0.3) {
                        fuzz::mutate_bytes_in(rng, &mut b, 0)
                    } else {
                        fuzz::mutate_bytes(rng, &mut b)
                    };
                    (b, vec![how])
                }
                3..=5 => {
                    // The body changed behind valid checksums: the decoder and the checks.
                    let mut b = body.clone();
                    let how = fuzz::mutate_bytes(rng, &mut b);
                    (with_body(&b), vec![format!("body: {how}")])
                }
                _ => {
                    // A program's graph text changed, the rest of the plan intact.
                    let p = rng.below(graphs.len());
                    let (g, how) = mutate_graph(rng, &graphs[p]);
                    (with_body(&replace_string(&body, spans[p], &g)), vec![how])
                }
            };
            FileCase {
                name: "plan.bin".into(),
                bytes,
                how,
            }
        },
        |case| {
            Plan::from_bytes(Path::new("plan.bin"), &case.bytes)
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    );
}

#[test]
fn damaged_graph_texts_parse_and_verify_or_give_a_clear_error() {
    let plan = plan();
    let graphs: Vec<String> = plan
        .programs
        .iter()
        .map(|p| text::print(&p.graph))
        .collect();
    for g in &graphs {
        read_graph(g).expect("the plan's graphs read back");
    }
    fuzz::run(
        "graph_text",
        fuzz::case_count(4000),
        |rng| {
            let p = rng.below(graphs.len());
            let mut text = graphs[p].clone();
            let mut how = Vec::new();
            for _ in 0..rng.range(1, 3) {
                let (t, h) = mutate_graph(rng, &text);
                text = t;
                how.push(h);
            }
            FileCase {
                name: format!("{}.txt", plan.programs[p].name),
                bytes: text.into_bytes(),
                how,
            }
        },
        |case| read_graph(&String::from_utf8_lossy(&case.bytes)),
    );
}

// Inputs the fuzzer found, kept as plain tests.

#[test]
fn a_plan_quoting_a_line_break_is_reported_on_one_line() {
    // Found as a state's `kind` = "line\nbreak", and as a graph line pasted into a type
    // string: the message quoted the damaged text with its line break. Here a state's type,
    // behind checksums that match, so that the body's decoder is what speaks.
    let plan = plan();
    let body = body_of(&plan.to_bytes());
    let ty = plan.state[0].ty.to_string();
    let damaged = with_body(&replace_string(
        &body,
        string_span(&body, &ty),
        "line\nbreak",
    ));
    let e = Plan::from_bytes(Path::new("plan.bin"), &damaged)
        .unwrap_err()
        .to_string();
    assert!(!e.contains('\n') && e.contains("line\\nbreak"), "{e}");
}

#[test]
fn types_and_shapes_too_large_to_count_are_errors() {
    // Found in a debug build as graph lines whose types or attributes were given huge numbers:
    // element counts and padded or concatenated sizes overflowed (a panic there, a wrapped,
    // wrong size in release builds).
    let graph = |body: &str| format!("graph frontend {{\n{body}\n}}\n");
    let e = read_graph(&graph(
        "  %0 = input \"x\" : f32[4294967296, 4294967296]\n  output \"y\" = %0",
    ))
    .unwrap_err();
    assert!(e.contains("too large"), "{e}");
    let e = read_graph(&graph(
        "  %0 = input \"x\" : f32[2]\n  %1 = pad %0 low=[9223372036854775807] \
         high=[9223372036854775807] : f32[2]\n  output \"y\" = %1",
    ))
    .unwrap_err();
    assert!(e.contains("padding"), "{e}");
    let e = read_graph(&graph(
        "  %0 = input \"x\" : bool[12297829382473034411]\n  %1 = concat %0, %0 axis=0 : \
         bool[12297829382473034411]\n  output \"y\" = %1",
    ))
    .unwrap_err();
    assert!(e.contains("concatenating"), "{e}");
    let e = "f32[18446744073709551615, 2]"
        .parse::<mmc_ir::TensorType>()
        .unwrap_err();
    assert!(e.contains("too large"), "{e}");
}
