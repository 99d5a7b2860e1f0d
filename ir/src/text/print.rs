use crate::graph::{Graph, ScopeId, Value};
use crate::op::{Attr, Op};
use std::collections::HashMap;
use std::fmt::Write;

/// Formats a float so that parsing it back gives the same bits.
pub(crate) fn fmt_float(x: f64) -> String {
    if x.is_nan() {
        "nan".to_string()
    } else {
        format!("{x:?}")
    }
}

/// Quotes a string for the text format.
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn fmt_attr(a: &Attr) -> String {
    match a {
        Attr::Int(i) => i.to_string(),
        Attr::Float(f) => fmt_float(*f),
        Attr::Bool(b) => b.to_string(),
        Attr::Ints(v) => {
            let items: Vec<String> = v.iter().map(|i| i.to_string()).collect();
            format!("[{}]", items.join(", "))
        }
        Attr::Str(s) => quote(s),
    }
}

/// Prints `graph` in the text format.
pub fn print(graph: &Graph) -> String {
    let mut out = String::new();
    let mut numbers: HashMap<Value, usize> = HashMap::new();
    let name_of = |v: Value, numbers: &mut HashMap<Value, usize>| -> String {
        match numbers.get(&v) {
            Some(n) => format!("%{n}"),
            None => format!("%?{}", v.0),
        }
    };
    let _ = writeln!(out, "graph {} {{", graph.stage);
    let mut scope = ScopeId::default();
    for node in graph.nodes() {
        if node.scope != scope {
            scope = node.scope;
            let _ = writeln!(out, "  scope {}", quote(graph.scope_name(scope)));
        }
        let operands: Vec<String> = node
            .inputs
            .iter()
            .map(|&v| name_of(v, &mut numbers))
            .collect();
        let mut results = Vec::new();
        for &v in &node.outputs {
            let n = numbers.len();
            numbers.insert(v, n);
            results.push(format!("%{n}"));
        }
        let mut line = format!("  {} = {}", results.join(", "), node.op.name());
        if let Op::Param { name, .. } | Op::Input { name, .. } = &node.op {
            let _ = write!(line, " {}", quote(name));
        }
        if !operands.is_empty() {
            let _ = write!(line, " {}", operands.join(", "));
        }
        for (k, v) in node.op.attrs() {
            let _ = write!(line, " {k}={}", fmt_attr(&v));
        }
        let types: Vec<String> = node
            .outputs
            .iter()
            .map(|&v| graph.value_data(v).map_or("?".into(), |d| d.ty.to_string()))
            .collect();
        let _ = writeln!(out, "{line} : {}", types.join(", "));
    }
    for (name, v) in graph.outputs() {
        let _ = writeln!(
            out,
            "  output {} = {}",
            quote(name),
            name_of(*v, &mut numbers)
        );
    }
    out.push_str("}\n");
    out
}
