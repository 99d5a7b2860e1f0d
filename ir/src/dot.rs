//! Graphviz output, for looking at a graph's structure.

use crate::graph::Graph;
use crate::Op;
use petgraph::dot::{Config, Dot};
use petgraph::graph::DiGraph;

/// Renders `graph` as Graphviz dot: one box per node, one edge per operand.
pub fn to_dot(graph: &Graph) -> String {
    let mut g: DiGraph<String, String> = DiGraph::new();
    let mut index = Vec::with_capacity(graph.nodes().len());
    let mut producer = vec![None; graph.num_values()];
    for (i, node) in graph.nodes().iter().enumerate() {
        let types: Vec<String> = node
            .outputs
            .iter()
            .map(|&v| graph.ty(v).to_string())
            .collect();
        let head = match &node.op {
            Op::Param { name, .. } | Op::Input { name, .. } => {
                format!("{} {name}", node.op.name())
            }
            op => op.name().to_string(),
        };
        let idx = g.add_node(format!("{head}\n{}", types.join(", ")));
        index.push(idx);
        for &v in &node.outputs {
            producer[v.0 as usize] = Some(i);
        }
        for (k, v) in node.inputs.iter().enumerate() {
            if let Some(Some(p)) = producer.get(v.0 as usize) {
                g.add_edge(index[*p], idx, k.to_string());
            }
        }
    }
    for (name, v) in graph.outputs() {
        let out = g.add_node(format!("output {name}"));
        if let Some(Some(p)) = producer.get(v.0 as usize) {
            g.add_edge(index[*p], out, String::new());
        }
    }
    format!("{}", Dot::with_config(&g, &[Config::EdgeNoLabel]))
}
