//! Static activation arenas: where every value of a program lives while it is needed.
//!
//! A scheduled program is run over one arena, allocated once, in which each value that the
//! program computes has a fixed `(offset, bytes)` slot; parameters and per-step inputs are bound
//! from outside (state and batch data) and have none. Slots of values that are never live at
//! the same time may overlap, and a value may share its operand's slot in two cases: a reshape
//! is a view of its operand, and a float elementwise op may overwrite an operand that dies at
//! it. This module holds the layout that the memory planner writes into a plan, the liveness
//! and aliasing rules that the planner and the checker share, and the check that a plan's
//! layout fits its graph (run at plan load, so a bad layout is an error, never wrong results).

use crate::{DType, Graph, Op, Value};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt;

/// Bytes of one interpreter word: the reference interpreter keeps every element, float or
/// integer, as one 8-byte word, so a layout it runs on plans 8 bytes per element.
pub const WORD_BYTES: usize = 8;

/// The alignment planners give slots (a cache line; vector loads want it). The layout check
/// uses it to bound an arena's size.
pub const ALIGN_BYTES: u64 = 64;

/// Where one value lives in the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "[u64; 2]", into = "[u64; 2]")]
pub struct Slot {
    pub offset: u64,
    pub bytes: u64,
}

impl Slot {
    /// One past the last byte of the slot.
    pub fn end(&self) -> u64 {
        self.offset + self.bytes
    }
}

impl From<[u64; 2]> for Slot {
    fn from([offset, bytes]: [u64; 2]) -> Self {
        Slot { offset, bytes }
    }
}

impl From<Slot> for [u64; 2] {
    fn from(s: Slot) -> Self {
        [s.offset, s.bytes]
    }
}

/// Bytes per element of each dtype, as a layout was planned: the declared sizes for reports
/// and for generated code, [`ElemBytes::words`] for the interpreter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElemBytes([usize; DType::ALL.len()]);

impl ElemBytes {
    /// The table of a function.
    pub fn from_fn(f: impl Fn(DType) -> usize) -> Self {
        ElemBytes(DType::ALL.map(f))
    }

    /// Every dtype as stored in memory ([`DType::size_bytes`]).
    pub fn declared() -> Self {
        Self::from_fn(DType::size_bytes)
    }

    /// Every dtype as one interpreter word.
    pub fn words() -> Self {
        Self::from_fn(|_| WORD_BYTES)
    }

    pub fn of(&self, d: DType) -> usize {
        let i = DType::ALL
            .iter()
            .position(|&x| x == d)
            .expect("DType::ALL lists every dtype");
        self.0[i]
    }

    /// Whether every dtype is one interpreter word.
    pub fn is_words(&self) -> bool {
        self.0.iter().all(|&b| b == WORD_BYTES)
    }

    /// Bytes of a value of `graph` (saturating: a type too large to count cannot fit anyway).
    pub fn value_bytes(&self, graph: &Graph, v: Value) -> u64 {
        let ty = graph.ty(v);
        ty.shape
            .iter()
            .try_fold(self.of(ty.dtype) as u64, |n, &d| n.checked_mul(d as u64))
            .unwrap_or(u64::MAX)
    }
}

impl Serialize for ElemBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let m: BTreeMap<&str, usize> = DType::ALL
            .iter()
            .zip(self.0)
            .map(|(d, b)| (d.name(), b))
            .collect();
        m.serialize(s)
    }
}

impl<'de> Deserialize<'de> for ElemBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let m = BTreeMap::<String, usize>::deserialize(d)?;
        let mut t = [0; DType::ALL.len()];
        for (i, dt) in DType::ALL.iter().enumerate() {
            t[i] = *m.get(dt.name()).ok_or_else(|| {
                crate::plan::custom_error(format!("elem_bytes has no entry for {dt}"))
            })?;
            if t[i] == 0 {
                return Err(crate::plan::custom_error(format!(
                    "elem_bytes gives {dt} 0 bytes"
                )));
            }
        }
        if let Some(k) = m.keys().find(|k| k.parse::<DType>().is_err()) {
            return Err(crate::plan::custom_error(format!(
                "elem_bytes names `{k}`, which is not a dtype"
            )));
        }
        Ok(ElemBytes(t))
    }
}

/// The arena of one program: its size and every value's slot (`None` for parameters and
/// inputs, which live outside it). Indexed by value number, so it belongs to one exact graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArenaLayout {
    pub elem_bytes: ElemBytes,
    /// Bytes of the arena.
    pub size: u64,
    pub slots: Vec<Option<Slot>>,
    /// Graph outputs moved out of the arena as soon as they are computed (state updates: the
    /// runtime takes each one at its node), ascending value ids. Being an output does not keep
    /// such a value live to the end, so its slot is reused once its last reader has run.
    /// (Always serialised: the plan body's format has no field names to skip by.)
    #[serde(default)]
    pub streamed: Vec<u32>,
}

/// Why a layout does not fit a graph.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("the layout has {got} slots, but the graph has {expected} values")]
    SlotCount { expected: usize, got: usize },
    #[error("value %{0} is computed by the program but has no arena slot")]
    MissingSlot(u32),
    #[error("value %{0} is a parameter or input (bound from outside), but has an arena slot")]
    OutsideValue(u32),
    #[error("value %{value} needs {expected} bytes, but its slot has {got}")]
    Size { value: u32, expected: u64, got: u64 },
    #[error("the slot of value %{value} ends at byte {end}, past the arena's {size} bytes")]
    OutOfArena { value: u32, end: u64, size: u64 },
    #[error("the slots of values %{a} and %{b} overlap while both are live")]
    Overlap { a: u32, b: u32 },
    #[error("the layout is not in interpreter words: {0}")]
    NotWords(String),
    #[error("the arena's {size} bytes exceed the {total} bytes of all its slots side by side")]
    Oversized { size: u64, total: u64 },
    #[error("cannot allocate an arena of {0} bytes")]
    Alloc(u64),
    #[error("value %{0} is listed as streamed, but it is not a graph output")]
    StreamedNotOutput(u32),
    #[error("the streamed values are not in ascending order without repeats at %{0}")]
    StreamedOrder(u32),
}

/// Whether a node's value lives in the arena: everything but parameters and inputs.
pub fn in_arena(op: &Op) -> bool {
    !matches!(op, Op::Param { .. } | Op::Input { .. })
}

/// How a node's result may share an operand's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    /// The result is a view of the operand (a reshape): they share the buffer, which lives as
    /// long as either is needed.
    View,
    /// The result overwrites the operand element by element (a float elementwise op), legal
    /// only when the operand's buffer is not needed after this node.
    Overwrite,
}

/// How `op`'s result may reuse the buffer of its operand number `operand`, by the op alone
/// (the planner and the checker add the liveness and size conditions).
pub fn reuse_kind(graph: &Graph, node: &crate::Node, operand: usize) -> Option<Reuse> {
    let x = node.inputs[operand];
    let float = graph.ty(x).dtype.is_float() && graph.ty(node.outputs[0]).dtype.is_float();
    match &node.op {
        Op::Reshape { .. } => Some(Reuse::View),
        Op::Unary(u) if *u != crate::UnaryOp::Not && float => Some(Reuse::Overwrite),
        Op::Binary(b) if !matches!(b, crate::BinaryOp::And | crate::BinaryOp::Or) && float => {
            Some(Reuse::Overwrite)
        }
        // A program reads each chunk of its operands before writing that chunk of its result,
        // so an operand of the result's shape (not one read broadcast) may be overwritten.
        // (Not an epilogue's extras: its product is written first.)
        Op::Fused(crate::FusedOp::Elementwise { shape, .. })
            if float && graph.ty(x).shape == *shape =>
        {
            Some(Reuse::Overwrite)
        }
        _ => None,
    }
}

/// For every value, the last program point at which it is needed: the last node reading it,
/// its own node when nothing reads it, and `graph.nodes().len()` (a point after the last node)
/// for graph outputs, except those in `streamed` (value ids), which are taken out of the arena
/// at their node and so are needed no later than their last reader.
pub fn live_ends(graph: &Graph, streamed: &[u32]) -> Vec<u32> {
    let n = graph.nodes().len() as u32;
    let mut end: Vec<u32> = (0..graph.num_values())
        .map(|v| graph.value_data(Value(v as u32)).map_or(0, |d| d.node.0))
        .collect();
    for (i, node) in graph.nodes().iter().enumerate() {
        for v in &node.inputs {
            end[v.0 as usize] = i as u32;
        }
    }
    for (_, v) in graph.outputs() {
        if streamed.binary_search(&v.0).is_err() {
            end[v.0 as usize] = n;
        }
    }
    end
}

/// The values of `graph` to stream: those whose every output name `stream` accepts (a value
/// that is also returned under another name must stay in the arena to the end), ascending, as
/// [`ArenaLayout::streamed`] lists them.
pub fn streamed_values(graph: &Graph, stream: impl Fn(&str) -> bool) -> Vec<u32> {
    let mut all: BTreeMap<u32, bool> = BTreeMap::new();
    for (name, v) in graph.outputs() {
        *all.entry(v.0).or_insert(true) &= stream(name);
    }
    all.into_iter()
        .filter(|&(_, s)| s)
        .map(|(v, _)| v)
        .collect()
}

/// Values grouped into buffers: a group is one allocation shared by a value and the views and
/// in-place results made from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Buffers {
    /// The group of each value; `None` outside the arena.
    pub group: Vec<Option<u32>>,
    pub groups: Vec<Group>,
}

/// One buffer: the program points during which it is needed, its size and its first value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group {
    pub start: u32,
    /// Inclusive.
    pub end: u32,
    pub bytes: u64,
    pub first: Value,
}

impl Buffers {
    /// Groups the values of `graph`. At each node, `choose` gets the legal ways for its result
    /// to join an operand's group (operand number and kind) and picks one or none. Legal means:
    /// the operand is in the arena and of the result's size, and for an overwrite, its group
    /// is needed up to this node and no later.
    pub fn build(
        graph: &Graph,
        ends: &[u32],
        bytes: impl Fn(Value) -> u64,
        mut choose: impl FnMut(Value, &[(usize, Reuse)]) -> Option<usize>,
    ) -> Buffers {
        let mut group: Vec<Option<u32>> = vec![None; graph.num_values()];
        let mut groups: Vec<Group> = Vec::new();
        let mut legal = Vec::new();
        for (i, node) in graph.nodes().iter().enumerate() {
            if !in_arena(&node.op) {
                continue;
            }
            let i = i as u32;
            for &y in &node.outputs {
                legal.clear();
                if node.outputs.len() == 1 {
                    for (k, x) in node.inputs.iter().enumerate() {
                        let Some(gx) = group[x.0 as usize] else {
                            continue;
                        };
                        let gx = &groups[gx as usize];
                        if gx.bytes != bytes(y) {
                            continue;
                        }
                        match reuse_kind(graph, node, k) {
                            Some(Reuse::View) => legal.push((k, Reuse::View)),
                            Some(Reuse::Overwrite) if gx.end == i => {
                                legal.push((k, Reuse::Overwrite))
                            }
                            _ => {}
                        }
                    }
                }
                let joined = if legal.is_empty() {
                    None
                } else {
                    choose(y, &legal)
                };
                let end = ends[y.0 as usize].max(i);
                match joined {
                    Some(k) => {
                        let gid = group[node.inputs[k].0 as usize].expect("legal operand");
                        let g = &mut groups[gid as usize];
                        g.end = g.end.max(end);
                        group[y.0 as usize] = Some(gid);
                    }
                    None => {
                        group[y.0 as usize] = Some(groups.len() as u32);
                        groups.push(Group {
                            start: i,
                            end,
                            bytes: bytes(y),
                            first: y,
                        });
                    }
                }
            }
        }
        Buffers { group, groups }
    }

    /// The largest sum of buffer sizes needed at one program point: no placement of these
    /// buffers fits in less.
    pub fn largest_live_set(&self, points: usize) -> u64 {
        let mut delta = vec![0i128; points + 2];
        for g in &self.groups {
            delta[g.start as usize] += g.bytes as i128;
            delta[g.end as usize + 1] -= g.bytes as i128;
        }
        let (mut live, mut peak) = (0i128, 0i128);
        for d in delta {
            live += d;
            peak = peak.max(live);
        }
        peak as u64
    }
}

impl ArenaLayout {
    /// Checks that the layout fits `graph`: one slot per value computed in the arena (none for
    /// parameters and inputs), of the value's size, inside the arena, streamed values that are
    /// graph outputs, and no two slots overlapping while both are needed (a streamed output
    /// only up to its last reader), except a result sharing its operand's slot as
    /// [`reuse_kind`] allows. `O(n log n)` in the number of values.
    pub fn check(&self, graph: &Graph) -> Result<(), LayoutError> {
        if self.slots.len() != graph.num_values() {
            return Err(LayoutError::SlotCount {
                expected: graph.num_values(),
                got: self.slots.len(),
            });
        }
        if let Some(w) = self.streamed.windows(2).find(|w| w[0] >= w[1]) {
            return Err(LayoutError::StreamedOrder(w[1]));
        }
        let outputs: std::collections::HashSet<u32> =
            graph.outputs().iter().map(|(_, v)| v.0).collect();
        if let Some(&v) = self.streamed.iter().find(|v| !outputs.contains(v)) {
            return Err(LayoutError::StreamedNotOutput(v));
        }
        for node in graph.nodes() {
            for &v in &node.outputs {
                match (in_arena(&node.op), self.slots[v.0 as usize]) {
                    (true, None) => return Err(LayoutError::MissingSlot(v.0)),
                    (false, Some(_)) => return Err(LayoutError::OutsideValue(v.0)),
                    (true, Some(s)) => {
                        let expected = self.elem_bytes.value_bytes(graph, v);
                        if s.bytes != expected {
                            return Err(LayoutError::Size {
                                value: v.0,
                                expected,
                                got: s.bytes,
                            });
                        }
                        match s.offset.checked_add(s.bytes) {
                            Some(end) if end <= self.size => {}
                            _ => {
                                return Err(LayoutError::OutOfArena {
                                    value: v.0,
                                    end: s.offset.saturating_add(s.bytes),
                                    size: self.size,
                                })
                            }
                        }
                    }
                    (false, None) => {}
                }
            }
        }
        // No arena needs more than every slot side by side (each aligned): a larger
        // size is a damaged plan, refused before anything allocates it.
        let total = self.slots.iter().flatten().fold(0u64, |t, s| {
            t.saturating_add(s.bytes.div_ceil(ALIGN_BYTES).saturating_mul(ALIGN_BYTES))
        });
        if self.size > total {
            return Err(LayoutError::Oversized {
                size: self.size,
                total,
            });
        }
        let ends = live_ends(graph, &self.streamed);
        let slot = |v: Value| self.slots[v.0 as usize].expect("checked above");
        let buffers = Buffers::build(
            graph,
            &ends,
            |v| slot(v).bytes,
            |y, legal| {
                let node = graph.node(graph.value_data(y).expect("graph value").node);
                legal
                    .iter()
                    .find(|(k, _)| slot(node.inputs[*k]) == slot(y))
                    .map(|(k, _)| *k)
            },
        );
        let placed = buffers
            .groups
            .iter()
            .map(|g| (*g, slot(g.first)))
            .collect::<Vec<_>>();
        match first_overlap(&placed) {
            Some((a, b)) => Err(LayoutError::Overlap { a: a.0, b: b.0 }),
            None => Ok(()),
        }
    }

    /// [`ArenaLayout::check`], and that the layout is in interpreter words with word-aligned
    /// slots, so that the interpreter can run it.
    pub fn check_words(&self, graph: &Graph) -> Result<(), LayoutError> {
        if !self.elem_bytes.is_words() {
            return Err(LayoutError::NotWords(format!(
                "it was planned with {:?} bytes per element",
                self.elem_bytes.0
            )));
        }
        if !self.size.is_multiple_of(WORD_BYTES as u64) {
            return Err(LayoutError::NotWords(format!(
                "the arena's {} bytes are not whole words",
                self.size
            )));
        }
        if let Some((v, s)) = self.slots.iter().enumerate().find_map(|(v, s)| {
            s.filter(|s| !s.offset.is_multiple_of(WORD_BYTES as u64))
                .map(|s| (v, s))
        }) {
            return Err(LayoutError::NotWords(format!(
                "value %{v} starts at byte {}, not at a word",
                s.offset
            )));
        }
        self.check(graph)
    }
}

/// The first two buffers (by their first values) that overlap in both time and space, by a
/// sweep over time keeping the live buffers ordered by offset (they are disjoint, so a new
/// buffer needs comparing with its two neighbours only).
pub fn first_overlap(placed: &[(Group, Slot)]) -> Option<(Value, Value)> {
    let mut order: Vec<usize> = (0..placed.len())
        .filter(|&i| placed[i].1.bytes > 0)
        .collect();
    order.sort_by_key(|&i| placed[i].0.start);
    // offset -> (end offset, index) of the live buffers; a heap of (end time, offset) to evict.
    let mut live: BTreeMap<u64, (u64, usize)> = BTreeMap::new();
    let mut expiry: BinaryHeap<Reverse<(u32, u64)>> = BinaryHeap::new();
    for i in order {
        let (g, s) = placed[i];
        while let Some(&Reverse((end, off))) = expiry.peek() {
            if end >= g.start {
                break;
            }
            expiry.pop();
            live.remove(&off);
        }
        if let Some((_, &(pend, j))) = live.range(..=s.offset).next_back() {
            if pend > s.offset {
                return Some((placed[j].0.first, g.first));
            }
        }
        if let Some((&noff, &(_, j))) = live.range(s.offset..).next() {
            if noff < s.end() {
                return Some((placed[j].0.first, g.first));
            }
        }
        live.insert(s.offset, (s.end(), i));
        expiry.push(Reverse((g.end, s.offset)));
    }
    None
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{}+{}", self.offset, self.bytes)
    }
}
