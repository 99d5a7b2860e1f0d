//! Size summaries of a graph: what `mmc dump-ir` prints under the program.

use crate::graph::Graph;
use crate::DType;
use std::collections::BTreeMap;
use std::fmt;

/// Counts and sizes of a graph's nodes and parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphSummary {
    pub nodes: usize,
    /// Number of parameter tensors.
    pub param_tensors: usize,
    /// Number of parameter elements (the model's parameter count).
    pub param_count: u64,
    /// Parameter bytes per dtype.
    pub param_bytes: BTreeMap<DType, u64>,
    /// Parameter elements per component: the parameter name with layer and expert numbers
    /// replaced by `*` and the last segment (`weight`, `bias`) dropped.
    pub by_component: BTreeMap<String, u64>,
}

/// The component a parameter belongs to, for grouping counts: `model.layers.3.mlp.experts.7.
/// gate_proj.weight` becomes `model.layers.*.mlp.experts.*.gate_proj`.
pub fn component_of(name: &str) -> String {
    let mut parts: Vec<&str> = name
        .split('.')
        .map(|p| {
            if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
                "*"
            } else {
                p
            }
        })
        .collect();
    if parts.len() > 1 {
        parts.pop();
    }
    parts.join(".")
}

impl GraphSummary {
    pub fn of(graph: &Graph) -> Self {
        let mut s = GraphSummary {
            nodes: graph.nodes().len(),
            param_tensors: 0,
            param_count: 0,
            param_bytes: BTreeMap::new(),
            by_component: BTreeMap::new(),
        };
        for (name, ty, _) in graph.params() {
            let n = ty.numel() as u64;
            s.param_tensors += 1;
            s.param_count += n;
            *s.param_bytes.entry(ty.dtype).or_default() += ty.size_bytes() as u64;
            *s.by_component.entry(component_of(name)).or_default() += n;
        }
        s
    }
}

/// Writes a count with thousands separators.
pub fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for GraphSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "nodes: {}", grouped(self.nodes as u64))?;
        writeln!(
            f,
            "parameters: {} in {} tensors",
            grouped(self.param_count),
            grouped(self.param_tensors as u64)
        )?;
        writeln!(f, "parameter bytes by dtype:")?;
        for (d, b) in &self.param_bytes {
            writeln!(f, "  {:<6} {:>20}", d.name(), grouped(*b))?;
        }
        writeln!(f, "parameters by component:")?;
        let width = self.by_component.keys().map(|k| k.len()).max().unwrap_or(0);
        for (c, n) in &self.by_component {
            writeln!(f, "  {c:<width$}  {:>18}", grouped(*n))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_hide_indices_and_the_last_segment() {
        assert_eq!(
            component_of("model.layers.12.mlp.experts.7.gate_proj.weight"),
            "model.layers.*.mlp.experts.*.gate_proj"
        );
        assert_eq!(component_of("lm_head.weight"), "lm_head");
        assert_eq!(component_of("scale"), "scale");
    }

    #[test]
    fn grouping() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(1234), "1,234");
        assert_eq!(grouped(30_533_387_264), "30,533,387,264");
    }
}
