//! The compiled form of a plan's programs: what `mmc run --backend compiled` replays.
//!
//! Each scheduled program becomes a flat list of steps over locations fixed at compile time:
//! kernel launches (by index in the plan's kernel table) and library calls, each with its
//! buffer arguments as offsets in the activation arena or the scratch region, or as state and
//! input tensors bound by name. The arena is laid out in the declared dtypes (4 bytes per f32
//! element), unlike the interpreter's 8-byte words. A state update whose state no node reads
//! after it is computed is written straight into the state tensor (no copy, no second buffer);
//! the others are copied into their state when the program ends.

use crate::kernel::{GeneratedKernel, KernelError};
pub use crate::native::KernelEntry;
use crate::ops::{lower_node, Arg, Work};
use mmc_ir::arena::ALIGN_BYTES;
use mmc_ir::plan::Program;
use mmc_ir::{DType, FusedOp, Op, TensorType, Value};
use mmc_passes::memory::plan_memory_outside;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Where a buffer lives at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Loc {
    /// At this byte offset of the activation arena.
    Arena(u64),
    /// Tensor number `i` of the program's `bound` list: a state tensor, or a data input.
    Bound(u32),
    /// At this byte offset of the scratch region.
    Scratch(u64),
}

/// What a step runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Callee {
    /// Kernel number `i` of the plan's kernel table.
    Kernel(u32),
    /// A library routine the runtime runs (the GEMMs).
    Library(crate::library::LibraryCall),
}

/// One step: a callee over its buffers, for the node `node` of the program's graph (named in
/// errors).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub node: u32,
    pub callee: Callee,
    pub args: Vec<Loc>,
}

/// A program output: its location and type, and the state it replaces, if any.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Output {
    pub name: String,
    pub loc: Loc,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// For a state update: the state's number in `bound`. An update written in place has
    /// its `loc` there already; the others are copied there when the program ends.
    pub update: Option<u32>,
}

/// A program compiled to steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompiledProgram {
    pub name: String,
    pub arena_bytes: u64,
    pub scratch_bytes: u64,
    /// The tensors bound from outside, by name, with their types: the state tensors the
    /// steps read or write, and the data inputs (per micro-batch, or per-step scalars). As
    /// for the interpreter, a name is looked up in the state first, then in the data.
    pub bound: Vec<(String, DType, Vec<usize>)>,
    pub steps: Vec<Step>,
    pub outputs: Vec<Output>,
}

/// The compiled steps of a plan's programs and the kernel table they launch from: what a
/// plan file's steps section holds (beside the library with the kernels).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompiledSteps {
    pub programs: Vec<CompiledProgram>,
    pub kernels: Vec<KernelEntry>,
}

/// The bytes of the activation arena and of the scratch region that `programs` share: the
/// programs run one at a time, so each region is the largest any of them needs.
pub fn shared_regions(programs: &[CompiledProgram]) -> (u64, u64) {
    programs.iter().fold((0, 0), |(a, s), p| {
        (a.max(p.arena_bytes), s.max(p.scratch_bytes))
    })
}

impl CompiledSteps {
    /// The section's bytes (postcard).
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("compiled steps serialise")
    }

    /// Decodes a steps section (its integrity is the plan file's section hash).
    pub fn from_bytes(bytes: &[u8]) -> Result<CompiledSteps, String> {
        postcard::from_bytes(bytes).map_err(|e| format!("its compiled steps do not decode: {e}"))
    }
}

/// Why a program could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("program `{program}`, node {node} (`{op}`): {error}")]
    Node {
        program: String,
        node: u32,
        op: &'static str,
        error: KernelError,
    },
}

/// The kernels of a whole plan, shared by its programs, and each program's steps. Kernels
/// that differ only in name (the same op over the same shapes, in every layer) are compiled
/// once.
#[derive(Default)]
pub struct Compiler {
    pub kernels: Vec<GeneratedKernel>,
    by_body: HashMap<String, u32>,
}

fn align(x: u64) -> u64 {
    x.div_ceil(ALIGN_BYTES) * ALIGN_BYTES
}

impl Compiler {
    fn add_kernel(&mut self, k: GeneratedKernel) -> u32 {
        let body = format!("{:?}", k.renamed(String::new()));
        if let Some(&i) = self.by_body.get(&body) {
            return i;
        }
        let i = self.kernels.len() as u32;
        let k = k.renamed(format!("k{i}"));
        self.by_body.insert(body, i);
        self.kernels.push(k);
        i
    }

    /// Compiles one scheduled program: lays out its arena in the declared dtypes, lowers
    /// every node, and fixes every argument's location.
    pub fn program(&mut self, p: &Program) -> Result<CompiledProgram, CompileError> {
        let g = &p.graph;
        let direct = direct_updates(p);
        let streamed: Vec<u32> = {
            let mut v: Vec<u32> = direct.keys().map(|v| v.0).collect();
            v.sort_unstable();
            v
        };
        // The direct updates live in their state tensors, not in the arena.
        let memory = plan_memory_outside(g, DType::size_bytes, &streamed, &streamed);
        let mut bound: Vec<(String, DType, Vec<usize>)> = Vec::new();
        let mut bound_index: HashMap<String, u32> = HashMap::new();
        let mut bind = |name: &str, ty: &TensorType| -> u32 {
            *bound_index.entry(name.to_string()).or_insert_with(|| {
                bound.push((name.to_string(), ty.dtype, ty.shape.clone()));
                bound.len() as u32 - 1
            })
        };
        let updated: HashMap<&str, &str> = p
            .updates
            .iter()
            .map(|u| (u.output.as_str(), u.state.as_str()))
            .collect();
        let mut loc: Vec<Option<Loc>> = vec![None; g.num_values()];
        for node in g.nodes() {
            match &node.op {
                Op::Param { name, ty } | Op::Input { name, ty } => {
                    loc[node.outputs[0].0 as usize] = Some(Loc::Bound(bind(name, ty)));
                }
                _ => {
                    for &o in &node.outputs {
                        loc[o.0 as usize] = Some(match direct.get(&o) {
                            Some(s) => Loc::Bound(bind(s, g.ty(o))),
                            None => Loc::Arena(memory.slot(o).map_or(0, |s| s.offset)),
                        });
                    }
                }
            }
        }
        let mut steps = Vec::new();
        let mut scratch_bytes = 0u64;
        for (id, node) in g.iter_nodes() {
            if matches!(node.op, Op::Param { .. } | Op::Input { .. }) {
                continue;
            }
            let at = |v: Value| loc[v.0 as usize].expect("every value has a location");
            // A reshape whose result shares its operand's buffer is a view: nothing to run.
            if matches!(node.op, Op::Reshape { .. }) && at(node.inputs[0]) == at(node.outputs[0]) {
                continue;
            }
            let name = format!("{}_n{}", p.name, id.0);
            let err = |error| CompileError::Node {
                program: p.name.clone(),
                node: id.0,
                op: node.op.name(),
                error,
            };
            let lowered = lower_node(g, node, &name).map_err(err)?;
            // Steps run one at a time and a node's scratch lives only during its own steps,
            // so every node lays its scratch out from the start of one shared region.
            let mut scratch_at = Vec::new();
            let mut node_scratch = 0u64;
            for b in &lowered.scratch {
                scratch_at.push(node_scratch);
                let n: usize = b.shape.iter().product();
                node_scratch += align((n * b.dtype.size_bytes().max(1)) as u64);
            }
            scratch_bytes = scratch_bytes.max(node_scratch);
            for launch in lowered.launches {
                let args = launch
                    .args
                    .iter()
                    .map(|a| match *a {
                        Arg::Input(i) => at(node.inputs[i]),
                        Arg::Output(i) => at(node.outputs[i]),
                        Arg::Scratch(i) => Loc::Scratch(scratch_at[i]),
                    })
                    .collect::<Vec<Loc>>();
                let callee = match launch.work {
                    // A copy onto itself does nothing.
                    Work::Copy(_) if args[0] == args[1] => continue,
                    Work::Kernel(k) | Work::Copy(k) => Callee::Kernel(self.add_kernel(k)),
                    Work::Library(call) => Callee::Library(call),
                };
                steps.push(Step {
                    node: id.0,
                    callee,
                    args,
                });
            }
        }
        let mut outputs = Vec::new();
        for (name, v) in g.outputs() {
            let ty = g.ty(*v);
            let l = loc[v.0 as usize].expect("every value has a location");
            let update = updated.get(name.as_str()).map(|s| bind(s, ty));
            outputs.push(Output {
                name: name.clone(),
                loc: l,
                dtype: ty.dtype,
                shape: ty.shape.clone(),
                update,
            });
        }
        Ok(CompiledProgram {
            name: p.name.clone(),
            arena_bytes: memory.arena_bytes(),
            scratch_bytes,
            bound,
            steps,
            outputs,
        })
    }
}

/// The state updates of `p` written straight into their state: the only update of that
/// state, from a value no other update or output takes, computed by a node other than a
/// parameter or input, after every read of the state, or at its last read by an elementwise
/// kernel that reads the state element by element (which reads each element before it writes
/// it) or by an op that sums onto it (a scatter-add's base, a cross-entropy's dw base).
fn direct_updates(p: &Program) -> HashMap<Value, String> {
    let g = &p.graph;
    let mut last_read: HashMap<&str, usize> = HashMap::new();
    let mut param_value: HashMap<&str, Vec<Value>> = HashMap::new();
    let returned: BTreeMap<u32, usize> =
        g.outputs().iter().fold(BTreeMap::new(), |mut m, (_, v)| {
            *m.entry(v.0).or_default() += 1;
            m
        });
    for (i, node) in g.nodes().iter().enumerate() {
        if let Op::Param { name, .. } | Op::Input { name, .. } = &node.op {
            param_value
                .entry(name.as_str())
                .or_default()
                .push(node.outputs[0]);
            last_read.entry(name.as_str()).or_insert(i);
        }
        for x in &node.inputs {
            if let Some(d) = g.value_data(*x) {
                if let Op::Param { name, .. } | Op::Input { name, .. } = &g.node(d.node).op {
                    let e = last_read.entry(name.as_str()).or_insert(i);
                    *e = (*e).max(i);
                }
            }
        }
    }
    let mut out = HashMap::new();
    for u in &p.updates {
        let count_state = p.updates.iter().filter(|o| o.state == u.state).count();
        let Some(v) = g.output(&u.output) else {
            continue;
        };
        if count_state != 1 || returned.get(&v.0) != Some(&1) {
            continue;
        }
        let Some(d) = g.value_data(v) else { continue };
        let def = d.node.0 as usize;
        let node = g.node(d.node);
        if matches!(node.op, Op::Param { .. } | Op::Input { .. }) {
            continue;
        }
        let params = param_value
            .get(u.state.as_str())
            .cloned()
            .unwrap_or_default();
        let ok = match last_read.get(u.state.as_str()) {
            None => true,
            Some(&r) if r < def => true,
            Some(&r) if r == def => {
                // Read by its own node: an elementwise kernel reading it contiguously, or an
                // accumulating op reading it only as the base its result sums onto (copied
                // into the result, a copy dropped in place, before any sum).
                let reads: Vec<usize> = (0..node.inputs.len())
                    .filter(|&i| params.contains(&node.inputs[i]))
                    .collect();
                match node.op {
                    Op::Unary(_) | Op::Binary(_) | Op::Fused(FusedOp::Elementwise { .. }) => reads
                        .iter()
                        .all(|&i| g.ty(node.inputs[i]).shape == g.ty(v).shape),
                    Op::ScatterAdd { .. } => reads == [0],
                    Op::Fused(FusedOp::LinearCrossEntropyWithGrad { .. }) => {
                        reads == [5] && d.index == 2
                    }
                    _ => false,
                }
            }
            Some(_) => false,
        };
        if ok {
            out.insert(v, u.state.clone());
        }
    }
    out
}
