//! `Graph::reordered`: a topological permutation keeps what the graph computes, with values
//! renumbered and outputs, scopes and stage kept; anything else is refused.

use mmc_ir::text::{parse, print};
use mmc_ir::{Graph, Interpreter, NodeId, Precision, ReorderError, Tensor};
use std::collections::HashMap;

fn graph() -> Graph {
    parse(
        "graph autodiff {
  %0 = input \"x\" : f32[2]
  %1 = const value=2 : f32[2]
  scope \"a\"
  %2 = exp %0 : f32[2]
  %3 = mul %2, %1 : f32[2]
  output \"y\" = %3
  output \"e\" = %2
}",
    )
    .unwrap()
}

#[test]
fn a_topological_permutation_keeps_the_results() {
    let g = graph();
    let order = [NodeId(0), NodeId(2), NodeId(1), NodeId(3)];
    let r = g.reordered(&order).unwrap();
    assert_eq!(r.stage, g.stage);
    mmc_ir::verify(&r).unwrap();
    // The const moved after the exp and values are renumbered in the new order.
    assert!(matches!(r.nodes()[2].op, mmc_ir::Op::Const { .. }));
    assert_eq!(r.output("e").map(|v| v.0), Some(1));
    assert_eq!(r.output("y").map(|v| v.0), Some(3));
    let names: Vec<&str> = r.outputs().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["y", "e"]);
    for (a, b) in
        g.nodes()
            .iter()
            .zip(&[&r.nodes()[0], &r.nodes()[2], &r.nodes()[1], &r.nodes()[3]])
    {
        assert_eq!(g.scope_name(a.scope), r.scope_name(b.scope));
    }
    let binds: HashMap<String, Tensor> = [(
        "x".to_string(),
        Tensor::from_f64(mmc_ir::DType::F32, vec![2], &[0.5, -1.0]).unwrap(),
    )]
    .into();
    let run = |g: &Graph| {
        Interpreter::new(g, Precision::Declared)
            .unwrap()
            .run(&binds)
            .unwrap()
    };
    assert_eq!(run(&r), run(&g));
    // The identity order gives the same graph back.
    let id: Vec<NodeId> = (0..4).map(NodeId).collect();
    assert_eq!(print(&g.reordered(&id).unwrap()), print(&g));
}

#[test]
fn orders_that_are_not_topological_permutations_are_refused() {
    let g = graph();
    let e = |o: &[u32]| {
        let order: Vec<NodeId> = o.iter().map(|&i| NodeId(i)).collect();
        g.reordered(&order).unwrap_err()
    };
    assert_eq!(
        e(&[0, 1, 2]),
        ReorderError::Length {
            expected: 4,
            got: 3
        }
    );
    assert_eq!(e(&[0, 1, 2, 2]), ReorderError::Duplicate(2));
    assert_eq!(e(&[0, 1, 2, 9]), ReorderError::UnknownNode(9));
    assert_eq!(
        e(&[0, 1, 3, 2]),
        ReorderError::NotTopological { user: 3, def: 2 }
    );
    assert!(e(&[0, 1, 3, 2]).to_string().contains("before node 2"));
}
