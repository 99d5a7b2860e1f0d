//! File tests of the verifier, as Cranelift's `test verifier` files: every
//! `tests/filetests/verify/*.mmcir` holds `graph` cases, and a `; error: <text>` comment on a
//! line says that the verifier reports an issue there whose message contains `<text>`: on a
//! node line, an issue of that node (with the node's printed line as its context); on an
//! `output` line, an issue of no node. Every issue must be expected, so a case without
//! `; error:` must verify. Lines starting with `;;` are prose.

use mmc_ir::text::parse;
use mmc_ir::verify;
use std::path::Path;

/// An expected issue: the node index (`None` for an output line), the text, the source line
/// without its comment, and the file line for messages.
struct Expected {
    node: Option<u32>,
    text: String,
    source: String,
    line: usize,
}

/// Checks one case (the lines of one graph, with the file line of its first).
fn check_case(lines: &[&str], first: usize) -> Vec<String> {
    let src = lines.join("\n");
    let g = match parse(&src) {
        Ok(g) => g,
        Err(e) => return vec![format!("line {}: does not parse: {e}", first + e.line - 1)],
    };
    let mut expected = Vec::new();
    let mut node = 0u32;
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        let is_node = t.starts_with('%');
        if let Some((code, text)) = t.split_once("; error:") {
            expected.push(Expected {
                node: is_node.then_some(node),
                text: text.trim().to_string(),
                source: code.trim().to_string(),
                line: first + i,
            });
        }
        if is_node {
            node += 1;
        }
    }
    let issues = match verify(&g) {
        Ok(()) => Vec::new(),
        Err(e) => e.issues,
    };
    let mut failures = Vec::new();
    let mut used = vec![false; issues.len()];
    for want in &expected {
        let found = issues.iter().enumerate().find(|(k, i)| {
            !used[*k] && i.node.map(|n| n.0) == want.node && i.message.contains(&want.text)
        });
        match found {
            Some((k, issue)) => {
                used[k] = true;
                if want.node.is_some() && issue.context.as_deref() != Some(want.source.as_str()) {
                    failures.push(format!(
                        "line {}: the issue's context is {:?}, not the printed line {:?}",
                        want.line, issue.context, want.source
                    ));
                }
            }
            None => failures.push(format!(
                "line {}: no issue contains {:?}; the verifier said: {}",
                want.line,
                want.text,
                issues
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(" | ")
            )),
        }
    }
    for (issue, used) in issues.iter().zip(used) {
        if !used {
            failures.push(format!("line {first}: an unexpected issue: {issue}"));
        }
    }
    failures
}

#[test]
fn verifier_filetests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/filetests/verify");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/filetests/verify exists")
        .map(|e| e.expect("readable").path())
        .filter(|p| p.extension().is_some_and(|e| e == "mmcir"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let mut failures = Vec::new();
    let mut cases = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).expect("readable");
        let lines: Vec<&str> = text.lines().collect();
        if lines.first().map(|l| l.trim()) != Some("; test verifier") {
            failures.push(format!(
                "{}: the first line must be `; test verifier`",
                f.display()
            ));
            continue;
        }
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
            let end = (i + 1).min(lines.len());
            cases += 1;
            for e in check_case(&lines[start..end], start + 1) {
                failures.push(format!("{}: {e}", f.display()));
            }
            i = end;
        }
    }
    eprintln!("{cases} verifier cases in {} files", files.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn an_issue_prints_its_node_line() {
    let g = parse("graph frontend {\n  %0 = input \"x\" : f32[2]\n  %1 = exp %0 : f32[3]\n  output \"y\" = %1\n}")
        .unwrap();
    let e = verify(&g).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the graph is malformed: node 1 (`%1 = exp %0 : f32[3]`): `exp` produces f32[2] but the node says f32[3]"
    );
}
