//! Scheduling: a topological order of the nodes that lowers the peak of live bytes, which is
//! what the memory planner's arena must hold at its fullest.
//!
//! The live bytes at a node are the sizes of the values computed so far and still needed
//! there (graph outputs are needed to the end, unless streamed: see [`schedule_streaming`]);
//! parameters and inputs are bound from outside
//! and do not count. Two orders are tried and the one with the lower peak is kept, the input
//! order included, so the pass never makes the peak worse:
//! - sinking: a node whose result is larger than the operands that die at it moves to just
//!   before its first user (the frontend emits constants, broadcasts and masks long before
//!   they are read);
//! - a greedy list scheduler, which among the ready nodes runs the one that frees the most
//!   bytes net of what it allocates (ties go to program order), as in the memory-aware list
//!   schedulers of XLA and TVM.
//!
//! The graph is only reordered: every node computes what it computed, so the interpreter's
//! results are identical.

use crate::emit::PassError;
use mmc_ir::arena::{in_arena, ElemBytes};
use mmc_ir::{DType, Graph, GraphError, NodeId, Value};
use std::cmp::Reverse;
use std::collections::BinaryHeap;

const PASS: &str = "schedule";

/// Reorders `graph` to lower its peak of live bytes at the declared dtype sizes.
pub fn schedule(graph: &Graph) -> Result<Graph, PassError> {
    schedule_with(graph, DType::size_bytes)
}

/// [`schedule`] with sizes of `elem_bytes` bytes per element.
pub fn schedule_with(
    graph: &Graph,
    elem_bytes: impl Fn(DType) -> usize,
) -> Result<Graph, PassError> {
    schedule_streaming(graph, elem_bytes, &[])
}

/// [`schedule_with`] for a run that takes the outputs `streamed` (value ids, see
/// [`mmc_ir::arena::ArenaLayout::streamed`]) out of the arena at their node: they are needed
/// only to their last reader, so computing them early costs nothing.
pub fn schedule_streaming(
    graph: &Graph,
    elem_bytes: impl Fn(DType) -> usize,
    streamed: &[u32],
) -> Result<Graph, PassError> {
    let kept = kept_outputs(graph, streamed);
    let elem = ElemBytes::from_fn(elem_bytes);
    let bytes: Vec<u64> = (0..graph.num_values())
        .map(|v| elem.value_bytes(graph, Value(v as u32)))
        .collect();
    let identity: Vec<NodeId> = (0..graph.nodes().len() as u32).map(NodeId).collect();
    let mut best = (peak_of_order(graph, &identity, &bytes, &kept), identity);
    for order in [
        sink_order(graph, &bytes, &kept),
        greedy_order(graph, &bytes, &kept),
    ] {
        let peak = peak_of_order(graph, &order, &bytes, &kept);
        if peak < best.0 {
            best = (peak, order);
        }
    }
    graph.reordered(&best.1).map_err(|e| PassError {
        pass: PASS,
        source: GraphError::Reorder(e),
    })
}

/// The peak of live bytes of `graph` as it is ordered, with `elem_bytes` bytes per element.
pub fn peak_live_bytes(graph: &Graph, elem_bytes: impl Fn(DType) -> usize) -> u64 {
    let elem = ElemBytes::from_fn(elem_bytes);
    let bytes: Vec<u64> = (0..graph.num_values())
        .map(|v| elem.value_bytes(graph, Value(v as u32)))
        .collect();
    let identity: Vec<NodeId> = (0..graph.nodes().len() as u32).map(NodeId).collect();
    peak_of_order(graph, &identity, &bytes, &kept_outputs(graph, &[]))
}

/// Whether each value is an output kept to the end of the run (not in `streamed`).
fn kept_outputs(graph: &Graph, streamed: &[u32]) -> Vec<bool> {
    let mut o = vec![false; graph.num_values()];
    for (_, v) in graph.outputs() {
        o[v.0 as usize] = streamed.binary_search(&v.0).is_err();
    }
    o
}

/// The peak of live bytes if the nodes ran in `order` (a topological order), the outputs
/// `kept` live to the end.
fn peak_of_order(graph: &Graph, order: &[NodeId], bytes: &[u64], kept: &[bool]) -> u64 {
    let n = order.len();
    let mut pos = vec![0u32; n];
    for (p, id) in order.iter().enumerate() {
        pos[id.0 as usize] = p as u32;
    }
    let mut end: Vec<u32> = (0..graph.num_values())
        .map(|v| pos[graph.value_data(Value(v as u32)).expect("value").node.0 as usize])
        .collect();
    for (i, node) in graph.nodes().iter().enumerate() {
        for v in &node.inputs {
            end[v.0 as usize] = end[v.0 as usize].max(pos[i]);
        }
    }
    for (_, v) in graph.outputs() {
        if kept[v.0 as usize] {
            end[v.0 as usize] = n as u32;
        }
    }
    let mut delta = vec![0i128; n + 2];
    for (i, node) in graph.nodes().iter().enumerate() {
        if !in_arena(&node.op) {
            continue;
        }
        for v in &node.outputs {
            delta[pos[i] as usize] += bytes[v.0 as usize] as i128;
            delta[end[v.0 as usize] as usize + 1] -= bytes[v.0 as usize] as i128;
        }
    }
    let (mut live, mut peak) = (0i128, 0i128);
    for d in delta {
        live += d;
        peak = peak.max(live);
    }
    peak as u64
}

/// The readers of each node, in program order, with repeats for repeated operands.
fn users(graph: &Graph) -> Vec<Vec<u32>> {
    let mut users = vec![Vec::new(); graph.nodes().len()];
    for (i, node) in graph.nodes().iter().enumerate() {
        for v in &node.inputs {
            let def = graph.value_data(*v).expect("value").node.0;
            users[def as usize].push(i as u32);
        }
    }
    users
}

/// Bytes of a node's results (0 outside the arena).
fn out_bytes(graph: &Graph, i: usize, bytes: &[u64]) -> u64 {
    let node = &graph.nodes()[i];
    if !in_arena(&node.op) {
        return 0;
    }
    node.outputs.iter().map(|v| bytes[v.0 as usize]).sum()
}

/// Sinks each node whose results outweigh the operands that die at it (in program order) to
/// just before its first user; other nodes keep their place after their operands. Outputs
/// `kept` to the end never die.
fn sink_order(graph: &Graph, bytes: &[u64], kept: &[bool]) -> Vec<NodeId> {
    let n = graph.nodes().len();
    let users = users(graph);
    let last = graph.last_uses();
    let is_output = kept;
    let sinks: Vec<bool> = (0..n)
        .map(|i| {
            let node = &graph.nodes()[i];
            let dying: u64 = node
                .inputs
                .iter()
                .filter(|v| last[v.0 as usize] == Some(i) && !is_output[v.0 as usize])
                .filter(|v| in_arena(&graph.node(graph.value_data(**v).expect("value").node).op))
                .map(|v| bytes[v.0 as usize])
                .sum();
            !users[i].is_empty()
                && node.outputs.iter().all(|v| !is_output[v.0 as usize])
                && out_bytes(graph, i, bytes) > dying
        })
        .collect();
    let mut placed = vec![false; n];
    let mut order = Vec::with_capacity(n);
    // (node, next operand to look at)
    let mut stack: Vec<(usize, usize)> = Vec::new();
    for root in 0..n {
        if sinks[root] || placed[root] {
            continue;
        }
        stack.push((root, 0));
        while let Some(&mut (t, ref mut k)) = stack.last_mut() {
            let inputs = &graph.nodes()[t].inputs;
            if let Some(v) = inputs.get(*k) {
                *k += 1;
                let d = graph.value_data(*v).expect("value").node.0 as usize;
                if !placed[d] {
                    placed[d] = true;
                    stack.push((d, 0));
                }
                continue;
            }
            stack.pop();
            placed[t] = true;
            order.push(NodeId(t as u32));
        }
    }
    order
}

/// List scheduling: runs, among the nodes whose operands are computed, the one with the
/// lowest (bytes it allocates − bytes of operands it is the last reader of), ties to program
/// order. Priorities change as other readers run; stale heap entries are skipped.
fn greedy_order(graph: &Graph, bytes: &[u64], kept: &[bool]) -> Vec<NodeId> {
    let n = graph.nodes().len();
    let users = users(graph);
    let def = |v: &Value| graph.value_data(*v).expect("value").node.0 as usize;
    let is_output = kept;
    // Readers not yet scheduled, per value; operands not yet computed, per node.
    let mut pending_readers = vec![0u32; graph.num_values()];
    let mut waiting = vec![0u32; n];
    for (i, node) in graph.nodes().iter().enumerate() {
        for v in &node.inputs {
            pending_readers[v.0 as usize] += 1;
        }
        waiting[i] = node.inputs.len() as u32;
    }
    let freed = |i: usize, pending: &[u32]| -> i128 {
        let node = &graph.nodes()[i];
        let mut f = 0i128;
        for (k, v) in node.inputs.iter().enumerate() {
            if node.inputs[..k].contains(v) {
                continue;
            }
            let reads = node.inputs.iter().filter(|x| *x == v).count() as u32;
            if pending[v.0 as usize] == reads
                && !is_output[v.0 as usize]
                && in_arena(&graph.nodes()[def(v)].op)
            {
                f += bytes[v.0 as usize] as i128;
            }
        }
        out_bytes(graph, i, bytes) as i128 - f
    };
    let mut heap: BinaryHeap<Reverse<(i128, u32)>> = BinaryHeap::new();
    let mut score = vec![0i128; n];
    let mut done = vec![false; n];
    for i in 0..n {
        if waiting[i] == 0 {
            score[i] = freed(i, &pending_readers);
            heap.push(Reverse((score[i], i as u32)));
        }
    }
    let mut order = Vec::with_capacity(n);
    while let Some(Reverse((s, i))) = heap.pop() {
        let i = i as usize;
        if done[i] || s != score[i] {
            continue;
        }
        done[i] = true;
        order.push(NodeId(i as u32));
        let node = &graph.nodes()[i];
        for v in &node.inputs {
            pending_readers[v.0 as usize] -= 1;
        }
        // A value down to its last pending reader makes that reader free it: rescore it. (A
        // value read twice by its last reader is down to 2.)
        for v in &node.inputs {
            let p = pending_readers[v.0 as usize];
            if (1..=2).contains(&p)
                && !is_output[v.0 as usize]
                && in_arena(&graph.nodes()[def(v)].op)
            {
                for &u in &users[def(v)] {
                    let u = u as usize;
                    if !done[u] && waiting[u] == 0 && graph.nodes()[u].inputs.contains(v) {
                        let s = freed(u, &pending_readers);
                        if s != score[u] {
                            score[u] = s;
                            heap.push(Reverse((s, u as u32)));
                        }
                    }
                }
            }
        }
        for &u in &users[i] {
            let u = u as usize;
            waiting[u] -= 1;
            if waiting[u] == 0 {
                score[u] = freed(u, &pending_readers);
                heap.push(Reverse((score[u], u as u32)));
            }
        }
    }
    order
}
