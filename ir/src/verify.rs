//! The verifier: checks that a graph is well formed before and after every pass.
//!
//! It checks SSA (every operand defined by an earlier node, every value defined once), types
//! (stored result types equal what inference derives), unique names for parameters, inputs and
//! outputs, and the rules of the graph's stage (no fused op in a frontend graph).

use crate::graph::{Graph, NodeId};
use crate::infer::infer;
use crate::op::OpClass;
use crate::Op;
use std::collections::HashSet;
use std::fmt;

/// One problem found by the verifier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifierIssue {
    /// The offending node, when the problem belongs to one.
    pub node: Option<NodeId>,
    /// The offending node as the text format prints it (`%7 = add %3, %6 : f32[2]`), so that a
    /// report can be read without the whole dump beside it, as Cranelift's `VerifierError`
    /// carries its instruction.
    pub context: Option<String>,
    pub message: String,
}

impl fmt::Display for VerifierIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.node, &self.context) {
            (Some(n), Some(line)) => write!(f, "node {} (`{line}`): {}", n.0, self.message),
            (Some(n), None) => write!(f, "node {}: {}", n.0, self.message),
            (None, _) => f.write_str(&self.message),
        }
    }
}

/// The printed line of every node, in node order: the lines of [`crate::text::print`] that
/// define values (its `scope` and `output` lines and the braces are left out).
pub fn node_lines(graph: &Graph) -> Vec<String> {
    let text = crate::text::print(graph);
    text.lines()
        .skip(1)
        .filter(|l| !l.starts_with("  scope ") && !l.starts_with("  output ") && *l != "}")
        .map(|l| l.trim().to_string())
        .collect()
}

/// All problems of a graph that failed verification.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct VerifyError {
    pub issues: Vec<VerifierIssue>,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the graph is malformed: ")?;
        for (i, issue) in self.issues.iter().take(5).enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{issue}")?;
        }
        if self.issues.len() > 5 {
            write!(f, "; and {} more", self.issues.len() - 5)?;
        }
        Ok(())
    }
}

/// Checks `graph`; returns every problem found.
pub fn verify(graph: &Graph) -> Result<(), VerifyError> {
    let mut issues = Vec::new();
    let mut defined = vec![false; graph.num_values()];
    let mut names = HashSet::new();

    for (id, node) in graph.iter_nodes() {
        let mut report = |message: String| {
            issues.push(VerifierIssue {
                node: Some(id),
                context: None,
                message,
            })
        };

        let mut operand_types = Vec::with_capacity(node.inputs.len());
        for &v in &node.inputs {
            match graph.value_data(v) {
                Some(data) if defined[v.0 as usize] => operand_types.push(&data.ty),
                Some(_) => report(format!("operand %{} is used before it is defined", v.0)),
                None => report(format!("operand %{} does not exist", v.0)),
            }
        }

        for (i, &v) in node.outputs.iter().enumerate() {
            match graph.value_data(v) {
                Some(d) if d.node == id && d.index as usize == i && !defined[v.0 as usize] => {
                    defined[v.0 as usize] = true
                }
                _ => report(format!("result %{} is not defined by this node", v.0)),
            }
        }

        if node.op.class() == OpClass::Fused && !graph.stage.allows_fused() {
            report(format!(
                "fused op `{}` in a {} graph (only the fusion pass creates fused ops)",
                node.op.name(),
                graph.stage
            ));
        }

        if let Op::Param { name, .. } | Op::Input { name, .. } = &node.op {
            if !names.insert(name.clone()) {
                report(format!("the name \"{name}\" is bound twice"));
            }
        }

        if operand_types.len() == node.inputs.len() {
            match infer(&node.op, &operand_types) {
                Ok(expected) => {
                    let stored: Vec<_> =
                        node.outputs.iter().map(|&v| graph.value_data(v)).collect();
                    let matches = expected.len() == stored.len()
                        && expected
                            .iter()
                            .zip(&stored)
                            .all(|(e, s)| s.is_some_and(|s| &s.ty == e));
                    if !matches {
                        let shown: Vec<String> = stored
                            .iter()
                            .map(|s| s.map_or("?".to_string(), |s| s.ty.to_string()))
                            .collect();
                        let wanted: Vec<String> = expected.iter().map(|t| t.to_string()).collect();
                        report(format!(
                            "`{}` produces {} but the node says {}",
                            node.op.name(),
                            wanted.join(", "),
                            shown.join(", ")
                        ));
                    }
                }
                Err(e) => report(e.to_string()),
            }
        }
    }

    let mut output_names = HashSet::new();
    for (name, v) in graph.outputs() {
        if name.is_empty() || !output_names.insert(name.as_str()) {
            issues.push(VerifierIssue {
                node: None,
                context: None,
                message: format!("output name \"{name}\" is empty or repeated"),
            });
        }
        if !defined.get(v.0 as usize).copied().unwrap_or(false) {
            issues.push(VerifierIssue {
                node: None,
                context: None,
                message: format!("output \"{name}\" refers to the unknown value %{}", v.0),
            });
        }
    }

    if issues.is_empty() {
        Ok(())
    } else {
        // Printing is linear in the graph, so it runs once and only for a graph that failed.
        let lines = node_lines(graph);
        for issue in &mut issues {
            if let Some(n) = issue.node {
                issue.context = lines.get(n.0 as usize).cloned();
            }
        }
        Err(VerifyError { issues })
    }
}
