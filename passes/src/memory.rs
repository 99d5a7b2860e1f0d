//! Static memory planning: every value a scheduled program computes gets a fixed slot in one
//! activation arena, so the runtime allocates that arena once and never allocates per op, and
//! the planned peak is the real one.
//!
//! Three steps, as in XLA's buffer assignment and tinygrad's memory planner:
//! 1. liveness: a value is needed from its node to its last reader (graph outputs to the end,
//!    except streamed ones: state updates, which the runtime takes out of the arena as soon as
//!    they are computed, so their slots are reused);
//! 2. in-place reuse ([`mmc_ir::arena::reuse_kind`]): a reshape shares its operand's buffer,
//!    and a float elementwise op takes over an operand buffer that dies at it, so a chain of
//!    elementwise ops runs in one buffer;
//! 3. placement: buffers get offsets by greedy best fit, in two orders, keeping the smaller
//!    arena: by decreasing size over the whole program (XLA's heap simulator,
//!    `GlobalDecreasingSizeBestFit`), and in program order with a best-fit free list
//!    (tinygrad's arena). Both use interval structures, so a 400k-value graph plans in about a
//!    second.
//!
//! Parameters and per-step inputs are not in the arena: they are state and batch data, bound by
//! name. Sizes come from the caller's bytes per element, so a report uses the declared dtypes
//! while the interpreter (8-byte words) plans with [`ElemBytes::words`].

use crate::emit::PassError;
use crate::schedule::schedule_streaming;
use mmc_ir::arena::WORD_BYTES;
use mmc_ir::arena::{live_ends, streamed_values, ArenaLayout, Buffers, ElemBytes, Group, Slot};
use mmc_ir::arena::{LayoutError, Reuse};
use mmc_ir::plan::Program;
use mmc_ir::{DType, Graph, Value};
use std::collections::{BTreeMap, BTreeSet};

/// Slots start at multiples of this many bytes (a cache line; vector loads want it).
pub const ALIGN: u64 = mmc_ir::arena::ALIGN_BYTES;

/// Which placement gave the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Decreasing size, best fit over the whole program (XLA).
    BySize,
    /// Program order, best-fit free list (tinygrad).
    ByTime,
}

/// A program's memory plan: the arena layout that goes into the plan, with the liveness and
/// buffers it was derived from, for reports and checks.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    pub layout: ArenaLayout,
    /// The buffers: groups of values sharing one slot, with the program points they live.
    pub buffers: Buffers,
    /// The last program point each value is needed at (see [`mmc_ir::arena::live_ends`]).
    pub ends: Vec<u32>,
    /// The largest sum of buffer sizes live at one program point: the lower bound for any
    /// placement of these buffers.
    pub largest_live_set: u64,
    pub placement: Placement,
}

impl MemoryPlan {
    /// Bytes of the arena.
    pub fn arena_bytes(&self) -> u64 {
        self.layout.size
    }

    /// Where a value lives; `None` for parameters and inputs.
    pub fn slot(&self, v: Value) -> Option<Slot> {
        self.layout.slots.get(v.0 as usize).copied().flatten()
    }

    /// The program points (node indices, inclusive; the node count stands for "after the
    /// program") during which a value computed in the arena is needed.
    pub fn interval(&self, graph: &Graph, v: Value) -> Option<(u32, u32)> {
        self.slot(v)?;
        let def = graph.value_data(v)?.node.0;
        Some((def, self.ends[v.0 as usize].max(def)))
    }

    /// Checks the layout against the graph: sizes, and no two buffers overlapping while both
    /// are live (see [`ArenaLayout::check`]).
    pub fn verify(&self, graph: &Graph) -> Result<(), LayoutError> {
        self.layout.check(graph)
    }
}

/// Schedules a program for the interpreter and attaches its arena layout (8-byte words), with
/// its state updates streamed ([`update_values`]): what the compile pipeline does to each
/// program of a plan, so that `mmc run` allocates one arena per program and replays every
/// step in it. The layout is checked before it is kept.
pub fn plan_program(program: &Program) -> Result<Program, PassError> {
    let before = update_values(&program.graph, program);
    let graph = schedule_streaming(&program.graph, |_| WORD_BYTES, &before)?;
    let streamed = update_values(&graph, program);
    let plan = plan_memory_streaming(&graph, |_| WORD_BYTES, &streamed);
    plan.verify(&graph)
        .expect("the planner's layouts pass the layout check");
    Ok(Program {
        name: program.name.clone(),
        graph,
        updates: program.updates.clone(),
        memory: Some(plan.layout),
    })
}

/// The values of `graph` (the graph of `program`, or a reordering of it) that the runtime
/// streams: those output only as state updates (`program.updates`), ascending.
pub fn update_values(graph: &Graph, program: &Program) -> Vec<u32> {
    let updates: BTreeSet<&str> = program.updates.iter().map(|u| u.output.as_str()).collect();
    streamed_values(graph, |name| updates.contains(name))
}

/// Plans the arena of a scheduled graph with `elem_bytes` bytes per element, every output
/// kept to the end.
pub fn plan_memory(graph: &Graph, elem_bytes: impl Fn(DType) -> usize) -> MemoryPlan {
    plan_memory_streaming(graph, elem_bytes, &[])
}

/// [`plan_memory`] with the outputs `streamed` (ascending value ids, such as
/// [`update_values`]) taken out of the arena at their node: each is needed only up to its
/// last reader, and the layout lists them ([`ArenaLayout::streamed`]).
pub fn plan_memory_streaming(
    graph: &Graph,
    elem_bytes: impl Fn(DType) -> usize,
    streamed: &[u32],
) -> MemoryPlan {
    plan_memory_outside(graph, elem_bytes, streamed, &[])
}

/// [`plan_memory_streaming`] with the values `outside` (ascending value ids) taking no room in
/// the arena: a backend that writes them straight into their state tensor (a state updated
/// in place) needs no slot for them.
pub fn plan_memory_outside(
    graph: &Graph,
    elem_bytes: impl Fn(DType) -> usize,
    streamed: &[u32],
    outside: &[u32],
) -> MemoryPlan {
    let elem = ElemBytes::from_fn(elem_bytes);
    let ends = live_ends(graph, streamed);
    let bytes = |v: Value| {
        if outside.binary_search(&v.0).is_ok() {
            0
        } else {
            elem.value_bytes(graph, v)
        }
    };
    // An overwrite is always taken when legal: the result needs a buffer of that size anyway,
    // and the operand's dies here.
    let buffers = Buffers::build(graph, &ends, bytes, |_, legal| {
        legal
            .iter()
            .find(|(_, r)| *r == Reuse::View)
            .or(legal.first())
            .map(|(k, _)| *k)
    });
    let points = graph.nodes().len() + 1;
    let largest_live_set = buffers.largest_live_set(points);
    let by_time = place_by_time(&buffers.groups);
    let by_size = place_by_size(&buffers.groups, points);
    let (offsets, placement) = match by_size {
        Some(s) if arena_end(&buffers.groups, &s) <= arena_end(&buffers.groups, &by_time) => {
            (s, Placement::BySize)
        }
        _ => (by_time, Placement::ByTime),
    };
    let size = arena_end(&buffers.groups, &offsets);
    let slots = buffers
        .group
        .iter()
        .enumerate()
        .map(|(v, g)| {
            g.map(|g| Slot {
                offset: offsets[g as usize],
                bytes: bytes(Value(v as u32)),
            })
        })
        .collect();
    MemoryPlan {
        layout: ArenaLayout {
            elem_bytes: elem,
            size,
            slots,
            streamed: streamed.to_vec(),
        },
        buffers,
        ends,
        largest_live_set,
        placement,
    }
}

fn reserved(bytes: u64) -> u64 {
    bytes.div_ceil(ALIGN) * ALIGN
}

fn arena_end(groups: &[Group], offsets: &[u64]) -> u64 {
    groups
        .iter()
        .zip(offsets)
        .map(|(g, &o)| o + g.bytes)
        .max()
        .unwrap_or(0)
}

/// A best-fit free list over an unbounded address space: free blocks by offset (to merge
/// neighbours) and by (size, offset) (to find the smallest that fits).
struct FreeList {
    by_offset: BTreeMap<u64, u64>,
    by_size: BTreeSet<(u64, u64)>,
}

impl FreeList {
    fn new() -> Self {
        let mut f = FreeList {
            by_offset: BTreeMap::new(),
            by_size: BTreeSet::new(),
        };
        f.insert(0, u64::MAX / 2);
        f
    }

    fn insert(&mut self, off: u64, size: u64) {
        self.by_offset.insert(off, size);
        self.by_size.insert((size, off));
    }

    fn remove(&mut self, off: u64, size: u64) {
        self.by_offset.remove(&off);
        self.by_size.remove(&(size, off));
    }

    fn alloc(&mut self, size: u64) -> u64 {
        let &(bsize, off) = self
            .by_size
            .range((size, 0)..)
            .next()
            .expect("the last block is unbounded");
        self.remove(off, bsize);
        if bsize > size {
            self.insert(off + size, bsize - size);
        }
        off
    }

    fn free(&mut self, mut off: u64, mut size: u64) {
        if let Some((&poff, &psize)) = self.by_offset.range(..off).next_back() {
            if poff + psize == off {
                self.remove(poff, psize);
                off = poff;
                size += psize;
            }
        }
        if let Some(&nsize) = self.by_offset.get(&(off + size)) {
            self.remove(off + size, nsize);
            size += nsize;
        }
        self.insert(off, size);
    }
}

/// Program order: at each point, frees the buffers that died before it, then gives each new
/// buffer (largest first) the smallest free block that holds it. `O(n log n)`.
fn place_by_time(groups: &[Group]) -> Vec<u64> {
    let mut offsets = vec![0; groups.len()];
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_by_key(|&i| (groups[i].start, std::cmp::Reverse(groups[i].bytes)));
    let mut by_end: Vec<usize> = order.clone();
    by_end.sort_by_key(|&i| groups[i].end);
    let mut free = FreeList::new();
    let mut next_end = 0;
    for &i in &order {
        let g = groups[i];
        while next_end < by_end.len() && groups[by_end[next_end]].end < g.start {
            let d = by_end[next_end];
            if groups[d].bytes > 0 {
                free.free(offsets[d], reserved(groups[d].bytes));
            }
            next_end += 1;
        }
        if g.bytes > 0 {
            offsets[i] = free.alloc(reserved(g.bytes));
        }
    }
    offsets
}

/// Decreasing size, best fit: each buffer, largest first, goes into the smallest gap left by
/// the already placed buffers that are live at some point of its interval (or above them all).
/// Those buffers are found in a segment tree over program points; a buffer overlapping many
/// placed ones costs as many steps, so the placement gives up (`None`) past a work budget
/// proportional to the graph, and the program-order placement stands alone.
fn place_by_size(groups: &[Group], points: usize) -> Option<Vec<u64>> {
    let budget = 64 * groups.len() as u64 + 1_000_000;
    let mut work = 0u64;
    let mut order: Vec<usize> = (0..groups.len()).filter(|&i| groups[i].bytes > 0).collect();
    order.sort_by_key(|&i| {
        let g = groups[i];
        (std::cmp::Reverse(g.bytes), g.start, g.end)
    });
    let mut tree = SegmentTree::new(points, groups.len());
    let mut offsets = vec![0; groups.len()];
    let mut busy: Vec<(u64, u64)> = Vec::new();
    for &i in &order {
        let g = groups[i];
        busy.clear();
        tree.overlapping(g.start, g.end, |j| {
            busy.push((offsets[j], offsets[j] + reserved(groups[j].bytes)))
        });
        work += busy.len() as u64 + 1;
        if work > budget {
            return None;
        }
        busy.sort_unstable();
        let size = reserved(g.bytes);
        let (mut best, mut best_gap) = (None, u64::MAX);
        let mut at = 0;
        for &(lo, hi) in &busy {
            if lo > at {
                let gap = lo - at;
                if gap >= size && gap < best_gap {
                    best = Some(at);
                    best_gap = gap;
                }
            }
            at = at.max(hi);
        }
        offsets[i] = best.unwrap_or(at);
        tree.insert(g.start, g.end, i);
    }
    Some(offsets)
}

/// Intervals of program points, each stored in the `O(log n)` nodes that exactly cover it; a
/// query lists every stored interval that meets a given one, each once.
struct SegmentTree {
    size: usize,
    /// Intervals covering each node's whole range (and not its parent's).
    cover: Vec<Vec<u32>>,
    /// Intervals stored strictly below each node, so that a query covering a node lists them
    /// without descending.
    below: Vec<Vec<u32>>,
    /// The query that last reported each interval, to report it once.
    seen: Vec<u32>,
    query_id: u32,
}

impl SegmentTree {
    fn new(points: usize, intervals: usize) -> Self {
        let size = points.next_power_of_two().max(1);
        SegmentTree {
            size,
            cover: vec![Vec::new(); 2 * size],
            below: vec![Vec::new(); 2 * size],
            seen: vec![u32::MAX; intervals],
            query_id: 0,
        }
    }

    fn insert(&mut self, lo: u32, hi: u32, id: usize) {
        let (lo, hi) = (lo as usize, hi as usize);
        let mut stack = vec![(1usize, 0usize, self.size - 1)];
        while let Some((node, nlo, nhi)) = stack.pop() {
            if hi < nlo || nhi < lo {
                continue;
            }
            if lo <= nlo && nhi <= hi {
                self.cover[node].push(id as u32);
                continue;
            }
            self.below[node].push(id as u32);
            let mid = (nlo + nhi) / 2;
            stack.push((2 * node, nlo, mid));
            stack.push((2 * node + 1, mid + 1, nhi));
        }
    }

    /// Calls `f` for every stored interval meeting `lo..=hi`, each once.
    fn overlapping(&mut self, lo: u32, hi: u32, mut f: impl FnMut(usize)) {
        self.query_id += 1;
        let q = self.query_id;
        let (lo, hi) = (lo as usize, hi as usize);
        let mut report = |seen: &mut [u32], ids: &[u32]| {
            for &i in ids {
                if seen[i as usize] != q {
                    seen[i as usize] = q;
                    f(i as usize);
                }
            }
        };
        let mut stack = vec![(1usize, 0usize, self.size - 1)];
        while let Some((node, nlo, nhi)) = stack.pop() {
            if hi < nlo || nhi < lo {
                continue;
            }
            // The node meets the query, so every interval covering it does.
            report(&mut self.seen, &self.cover[node]);
            if lo <= nlo && nhi <= hi {
                report(&mut self.seen, &self.below[node]);
                continue;
            }
            let mid = (nlo + nhi) / 2;
            stack.push((2 * node, nlo, mid));
            stack.push((2 * node + 1, mid + 1, nhi));
        }
    }
}
