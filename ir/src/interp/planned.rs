//! Running a graph over a static arena: the memory plan's layout made real.
//!
//! The arena is allocated once (8-byte words: f64 values, or i64 bit patterns for integers and
//! bools) and every value the program computes is kept at its planned slot, so the planned
//! peak is the real one and a runtime reuses the same memory every step. Parameters and
//! inputs are bound from outside as in [`Interpreter::run`]. Matmuls and float elementwise ops
//! write into their slots directly (in place where the plan reuses an operand's buffer); other
//! ops run through the same evaluation as the plain path, their operands copied out of the
//! arena, their result copied in. Results are bit-identical to [`Interpreter::run`].
//!
//! Outputs the layout streams (state updates) are converted and handed to the caller as soon
//! as their node has run, so their slots are reused for later values instead of holding every
//! update to the end.

use super::{
    binary_f, unary_f, Bindings, Dyn, EvalError, InterpError, Interpreter, Outputs, Precision, Val,
};
use crate::arena::{in_arena, ArenaLayout, LayoutError, Slot, WORD_BYTES};
use crate::interp::kernels::{self, Buf};
use crate::op::{BinaryOp, Op, UnaryOp};
use crate::{Graph, Tensor, TensorType, Value};
use std::collections::HashMap;
use std::ops::Range;

/// What a streaming run ([`Interpreter::run_in_stream`]) reads its parameters and inputs from
/// and hands its streamed outputs to, in one object, so that the receiver may update what it
/// binds (a separate sink could not change tensors the bindings lend to the run).
pub trait Stream: Bindings {
    /// Takes the streamed output `name`, just computed.
    fn stream(&mut self, name: &str, value: Tensor);
}

/// Memory for activation arenas, in interpreter words. One arena serves any number of
/// programs run one after another (it grows to the largest layout once), so a runtime
/// allocates it once and replays every step in it.
#[derive(Default)]
pub struct Arena {
    words: Vec<f64>,
}

impl Arena {
    /// An arena of `bytes` bytes (rounded up to words).
    pub fn with_bytes(bytes: u64) -> Result<Arena, LayoutError> {
        let mut a = Arena::default();
        a.reserve(bytes)?;
        Ok(a)
    }

    /// Grows the arena to `bytes` bytes if it is smaller; an error, not an abort, when the
    /// memory is not there.
    pub fn reserve(&mut self, bytes: u64) -> Result<(), LayoutError> {
        let too_big = || LayoutError::Alloc(bytes);
        let words = usize::try_from(bytes.div_ceil(WORD_BYTES as u64)).map_err(|_| too_big())?;
        if self.words.len() < words {
            self.words
                .try_reserve_exact(words - self.words.len())
                .map_err(|_| too_big())?;
            self.words.resize(words, 0.0);
        }
        Ok(())
    }

    /// Bytes the arena holds.
    pub fn bytes(&self) -> u64 {
        (self.words.len() * WORD_BYTES) as u64
    }
}

/// Word range of a slot.
fn word_range(s: Slot) -> Range<usize> {
    let start = (s.offset / WORD_BYTES as u64) as usize;
    start..start + (s.bytes / WORD_BYTES as u64) as usize
}

/// Where an operand is: in the arena, or an owned parameter or input.
pub(super) enum Src<'a> {
    Arena(Range<usize>),
    Owned(&'a Val),
}

/// The output slice and the arena operands' slices of one node at once; `None` if an operand
/// overlaps the output (the caller then computes in place or through a copy).
pub(super) fn split<'a>(
    words: &'a mut [f64],
    out: &Range<usize>,
    ins: &[Range<usize>],
) -> Option<(&'a mut [f64], Vec<&'a [f64]>)> {
    let len = words.len();
    let ok = |r: &Range<usize>| r.start <= r.end && r.end <= len;
    if !ok(out) || !ins.iter().all(ok) {
        return None;
    }
    if ins
        .iter()
        .any(|r| !r.is_empty() && !out.is_empty() && r.start < out.end && out.start < r.end)
    {
        return None;
    }
    let base = words.as_mut_ptr();
    // SAFETY: every range is inside `words` (checked above), and the mutable one is disjoint
    // from every shared one (checked above); shared ones may overlap each other. All live for
    // `'a`, the borrow of `words`.
    unsafe {
        let o = std::slice::from_raw_parts_mut(base.add(out.start), out.len());
        let i = ins
            .iter()
            .map(|r| std::slice::from_raw_parts(base.add(r.start) as *const f64, r.len()))
            .collect();
        Some((o, i))
    }
}

impl<'g> Interpreter<'g> {
    /// Verifies `graph` and checks `layout` against it ([`ArenaLayout::check_words`]), to run
    /// it with [`Interpreter::run_in`].
    pub fn with_layout(
        graph: &'g Graph,
        precision: Precision,
        layout: &'g ArenaLayout,
    ) -> Result<Self, InterpError> {
        let mut i = Interpreter::new(graph, precision)?;
        layout.check_words(graph)?;
        i.layout = Some(layout);
        Ok(i)
    }

    /// [`Interpreter::with_layout`] for a graph and layout the caller has already checked (a
    /// runtime checks them once, when it loads the plan). A layout that does not fit gives
    /// wrong values or an error, never undefined behaviour: every slice is bounds-checked.
    pub fn for_checked_layout(
        graph: &'g Graph,
        precision: Precision,
        layout: &'g ArenaLayout,
    ) -> Self {
        let mut i = Interpreter::for_verified(graph, precision);
        i.layout = Some(layout);
        i
    }

    /// Runs the graph once over `arena` (grown to the layout's size if smaller), keeping every
    /// value the program computes at its slot. Returns the same outputs as
    /// [`Interpreter::run`], streamed ones included; without a layout it is
    /// [`Interpreter::run`].
    pub fn run_in<B: Bindings + ?Sized>(
        &self,
        arena: &mut Arena,
        bindings: &B,
    ) -> Result<Outputs, InterpError> {
        let mut streamed: HashMap<String, Tensor> = HashMap::new();
        let rest = self.run_in_streaming(arena, bindings, &mut |name, t| {
            streamed.insert(name.to_string(), t);
        })?;
        if streamed.is_empty() {
            return Ok(rest);
        }
        let mut rest: HashMap<String, Tensor> = rest.0.into_iter().collect();
        let outs = self
            .graph
            .outputs()
            .iter()
            .map(|(name, _)| {
                let t = streamed
                    .remove(name)
                    .or_else(|| rest.remove(name))
                    .expect("every output is streamed or returned");
                (name.clone(), t)
            })
            .collect();
        Ok(Outputs(outs))
    }

    /// [`Interpreter::run_in`], handing each output that the layout streams
    /// ([`ArenaLayout::streamed`]) to `sink` as soon as its node has run, and returning the
    /// others; the values are those of [`Interpreter::run`], bit for bit.
    pub fn run_in_streaming<B: Bindings + ?Sized>(
        &self,
        arena: &mut Arena,
        bindings: &B,
        sink: &mut dyn FnMut(&str, Tensor),
    ) -> Result<Outputs, InterpError> {
        struct Sink<'a, B: ?Sized>(&'a B, &'a mut dyn FnMut(&str, Tensor));
        impl<B: Bindings + ?Sized> Bindings for Sink<'_, B> {
            fn lookup(&self, name: &str) -> Option<&Tensor> {
                self.0.lookup(name)
            }
        }
        impl<B: Bindings + ?Sized> Stream for Sink<'_, B> {
            fn stream(&mut self, name: &str, value: Tensor) {
                (self.1)(name, value)
            }
        }
        self.run_in_stream(arena, &mut Sink(bindings, sink))
    }

    /// [`Interpreter::run_in_streaming`] with the bindings and the sink in one object, which
    /// may change what it binds as outputs arrive: the run looks a parameter or input up at
    /// each node that reads it (its f64 copy lives only while that node runs), so a runtime
    /// can replace a state tensor with its update as soon as the update arrives, provided no
    /// node reading that parameter or input comes after it and no output returns it.
    pub fn run_in_stream<S: Stream + ?Sized>(
        &self,
        arena: &mut Arena,
        io: &mut S,
    ) -> Result<Outputs, InterpError> {
        let g = self.graph;
        let Some(layout) = self.layout else {
            return self.run(&Dyn(&*io));
        };
        if layout.slots.len() != g.num_values() {
            return Err(InterpError::Layout(LayoutError::SlotCount {
                expected: g.num_values(),
                got: layout.slots.len(),
            }));
        }
        // The output names of each streamed value.
        let mut streamed: HashMap<u32, Vec<&str>> =
            layout.streamed.iter().map(|&v| (v, Vec::new())).collect();
        for (name, v) in g.outputs() {
            if let Some(names) = streamed.get_mut(&v.0) {
                names.push(name);
            }
        }
        arena.reserve(layout.size)?;
        let words = &mut arena.words;
        let slot = |v: Value| layout.slots[v.0 as usize].map(word_range);
        // Parameters and inputs are converted where a node reads them, and the copy dropped
        // after that node: the state is not held twice (in its dtype and in f64) for the
        // whole run.
        let bind_source = |v: Value, io: &S| -> Result<Val, InterpError> {
            let node = g.node(g.value_data(v).expect("a value of this graph").node);
            self.eval(&node.op, &[], g.ty(v), &Dyn(io))
                .map_err(|e| match e {
                    EvalError::Msg(m) => InterpError::Op {
                        node: g.value_data(v).map_or(0, |d| d.node.0 as usize),
                        op: node.op.name(),
                        message: m,
                    },
                    EvalError::Binding(b) => b,
                })
        };
        for (i, node) in g.nodes().iter().enumerate() {
            let op_err = |message: String| InterpError::Op {
                node: i,
                op: node.op.name(),
                message,
            };
            let out = node.outputs[0];
            let out_ty = g.ty(out);
            if !in_arena(&node.op) {
                if let Some(names) = streamed.get(&out.0) {
                    let v = bind_source(out, &*io)?;
                    emit(io, names, self.to_tensor(&v));
                }
                continue;
            }
            let out_r = slot(out).ok_or(LayoutError::MissingSlot(out.0))?;
            let bound: Vec<Option<Val>> = node
                .inputs
                .iter()
                .map(|&v| match slot(v) {
                    Some(_) => Ok(None),
                    None => bind_source(v, &*io).map(Some),
                })
                .collect::<Result<_, _>>()?;
            let srcs: Vec<Src> = node
                .inputs
                .iter()
                .zip(&bound)
                .map(|(&v, b)| match (slot(v), b) {
                    (Some(r), _) => Src::Arena(r),
                    (None, Some(b)) => Src::Owned(b),
                    (None, None) => unreachable!("a source operand is bound"),
                })
                .collect();
            let done = node.outputs.len() == 1
                && self
                    .direct(node, out_ty, &out_r, &srcs, words)
                    .map_err(|e| match e {
                        EvalError::Msg(m) => op_err(m),
                        EvalError::Binding(b) => b,
                    })?;
            if !done {
                // The general path: operands copied out, the result copied in.
                let copies: Vec<Option<Val>> = node
                    .inputs
                    .iter()
                    .zip(&srcs)
                    .map(|(&v, s)| match s {
                        Src::Arena(r) => Some(read(g.ty(v), &words[r.clone()])),
                        Src::Owned(_) => None,
                    })
                    .collect();
                let args: Vec<&Val> = copies
                    .iter()
                    .zip(&srcs)
                    .map(|(c, s)| match (c, s) {
                        (Some(c), _) => c,
                        (None, Src::Owned(v)) => *v,
                        (None, Src::Arena(_)) => unreachable!("arena operands are copied"),
                    })
                    .collect();
                let results = self
                    .eval_node(node, &args, &Dyn(&*io))
                    .map_err(|e| match e {
                        EvalError::Msg(m) => op_err(m),
                        EvalError::Binding(b) => b,
                    })?;
                drop(args);
                drop(copies);
                for (&v, result) in node.outputs.iter().zip(&results) {
                    let r = slot(v).ok_or(LayoutError::MissingSlot(v.0))?;
                    write(&result.buf, &mut words[r]);
                }
            }
            drop(srcs);
            for v in &node.outputs {
                if let Some(names) = streamed.get(&v.0) {
                    let r = slot(*v).ok_or(LayoutError::MissingSlot(v.0))?;
                    emit(io, names, self.to_tensor(&read(g.ty(*v), &words[r])));
                }
            }
        }
        let mut outs = Vec::new();
        for (name, v) in g.outputs() {
            if streamed.contains_key(&v.0) {
                continue;
            }
            let t = match slot(*v) {
                Some(r) => self.to_tensor(&read(g.ty(*v), &words[r])),
                None => self.to_tensor(&bind_source(*v, &*io)?),
            };
            outs.push((name.clone(), t));
        }
        Ok(Outputs(outs))
    }

    /// Every result of a node on the general path, in output order. (Ops with several results,
    /// such as fused ops with their statistics, dispatch here.)
    fn eval_node(
        &self,
        node: &crate::Node,
        args: &[&Val],
        bindings: &dyn Bindings,
    ) -> Result<Vec<Val>, EvalError> {
        if let Op::Fused(f) = &node.op {
            let tys: Vec<&TensorType> = node.outputs.iter().map(|&v| self.graph.ty(v)).collect();
            let bufs = self.eval_fused(f, args, &tys)?;
            return Ok(tys
                .into_iter()
                .zip(bufs)
                .map(|(ty, buf)| self.make(ty, buf))
                .collect());
        }
        let ty = self.graph.ty(node.outputs[0]);
        Ok(vec![self.eval(&node.op, args, ty, bindings)?])
    }

    /// Computes reshapes, float elementwise ops, matmuls, layout ops, float reductions,
    /// comparisons, selects, gathers and scatter-adds straight into the arena, reading their
    /// operands in place; `Ok(false)` when the node needs the general path.
    fn direct(
        &self,
        node: &crate::Node,
        ty: &TensorType,
        out: &Range<usize>,
        srcs: &[Src],
        words: &mut [f64],
    ) -> Result<bool, EvalError> {
        if matches!(node.op, Op::Fused(_)) {
            return self.direct_program(node, ty, out, srcs, words);
        }
        if let Some(done) = self.direct_layout(node, ty, out, srcs, words)? {
            return Ok(done);
        }
        Ok(self.direct_elementwise(node, ty, out, srcs, words))
    }

    /// The layout ops, reductions, comparisons, selects, gathers and scatter-adds of
    /// [`Interpreter::direct`]; `None` for other ops. Their results never share an operand's
    /// slot, so every operand is read as a separate slice (`Some(false)` if one overlaps).
    fn direct_layout(
        &self,
        node: &crate::Node,
        ty: &TensorType,
        out: &Range<usize>,
        srcs: &[Src],
        words: &mut [f64],
    ) -> Result<Option<bool>, EvalError> {
        use crate::op::{CmpOp, ReduceKind};
        let g = self.graph;
        let in_ty = |k: usize| g.ty(node.inputs[k]);
        let handled = matches!(
            node.op,
            Op::Broadcast { .. }
                | Op::Permute { .. }
                | Op::Slice { .. }
                | Op::Compare(_)
                | Op::Select
                | Op::Gather { .. }
        ) || matches!(node.op, Op::Reduce { .. } | Op::ScatterAdd { .. } if ty.dtype.is_float());
        if !handled {
            return Ok(None);
        }
        let arena_ins: Vec<Range<usize>> = srcs
            .iter()
            .filter_map(|s| match s {
                Src::Arena(r) => Some(r.clone()),
                Src::Owned(_) => None,
            })
            .collect();
        let Some((o, ins)) = split(words, out, &arena_ins) else {
            return Ok(Some(false));
        };
        let mut ins = ins.into_iter();
        let a: Vec<&[f64]> = srcs
            .iter()
            .map(|s| match s {
                Src::Arena(_) => ins.next().expect("one slice per arena operand"),
                Src::Owned(v) => match &v.buf {
                    Buf::F(x) => x.as_slice(),
                    Buf::I(x) => bytemuck::cast_slice::<i64, f64>(x),
                },
            })
            .collect();
        let ints = |w: &[f64]| -> Vec<i64> { bytemuck::cast_slice::<f64, i64>(w).to_vec() };
        match &node.op {
            Op::Broadcast { shape } => {
                let src = &in_ty(0).shape;
                let st = kernels::strides(src);
                let bs: Vec<usize> = (0..shape.len())
                    .map(|i| if src[i] == 1 { 0 } else { st[i] })
                    .collect();
                kernels::view_into(a[0], shape, &bs, 0, o);
            }
            Op::Permute { perm } => {
                let st = kernels::strides(&in_ty(0).shape);
                let ps: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
                kernels::view_into(a[0], &ty.shape, &ps, 0, o);
            }
            Op::Slice { start, .. } => {
                let st = kernels::strides(&in_ty(0).shape);
                let base: usize = start.iter().zip(&st).map(|(a, b)| a * b).sum();
                kernels::view_into(a[0], &ty.shape, &st, base, o);
            }
            Op::Reduce { kind, .. } => {
                let (ishape, oshape) = (&in_ty(0).shape, &ty.shape);
                let r = match kind {
                    ReduceKind::Sum => kernels::reduce(a[0], ishape, oshape, 0.0, |p, q| p + q),
                    ReduceKind::Max => {
                        kernels::reduce(a[0], ishape, oshape, f64::NEG_INFINITY, super::nan_max)
                    }
                };
                o.copy_from_slice(&r);
                self.round_slice(ty.dtype, o);
            }
            Op::Compare(c) => {
                let cmp = |ord: Option<std::cmp::Ordering>| -> i64 {
                    use std::cmp::Ordering::*;
                    (match c {
                        CmpOp::Eq => ord == Some(Equal),
                        CmpOp::Ne => ord != Some(Equal),
                        CmpOp::Lt => ord == Some(Less),
                        CmpOp::Le => matches!(ord, Some(Less | Equal)),
                        CmpOp::Gt => ord == Some(Greater),
                        CmpOp::Ge => matches!(ord, Some(Greater | Equal)),
                    }) as i64
                };
                let res: Vec<i64> = if in_ty(0).dtype.is_float() {
                    a[0].iter()
                        .zip(a[1])
                        .map(|(x, y)| cmp(x.partial_cmp(y)))
                        .collect()
                } else {
                    let (x, y) = (ints(a[0]), ints(a[1]));
                    x.iter().zip(&y).map(|(x, y)| cmp(Some(x.cmp(y)))).collect()
                };
                bytemuck::cast_slice_mut::<f64, i64>(o).copy_from_slice(&res);
            }
            Op::Select => {
                let c = bytemuck::cast_slice::<f64, i64>(a[0]);
                for (k, e) in o.iter_mut().enumerate() {
                    *e = if c[k] != 0 { a[1][k] } else { a[2][k] };
                }
            }
            Op::Gather { axis } => {
                let idx = ints(a[1]);
                let offs = super::index_offsets(&in_ty(0).shape, &in_ty(1).shape, &idx, *axis)?;
                o.iter_mut().zip(&offs).for_each(|(e, &off)| *e = a[0][off]);
            }
            Op::ScatterAdd { axis } => {
                let idx = ints(a[1]);
                let offs = super::index_offsets(&in_ty(0).shape, &in_ty(1).shape, &idx, *axis)?;
                o.copy_from_slice(a[0]);
                offs.iter().zip(a[2]).for_each(|(&off, &s)| o[off] += s);
                self.round_slice(ty.dtype, o);
            }
            _ => unreachable!("only the ops matched above"),
        }
        Ok(Some(true))
    }

    /// Reshapes, float elementwise ops and matmuls of [`Interpreter::direct`].
    fn direct_elementwise(
        &self,
        node: &crate::Node,
        ty: &TensorType,
        out: &Range<usize>,
        srcs: &[Src],
        words: &mut [f64],
    ) -> bool {
        let float = ty.dtype.is_float();
        match (&node.op, srcs) {
            (Op::Const { value, .. }, []) => {
                let o = &mut words[out.clone()];
                if float {
                    o.fill(*value);
                    self.round_slice(ty.dtype, o);
                } else {
                    let v = Interpreter::wrap_int(ty.dtype, vec![*value as i64]);
                    bytemuck::cast_slice_mut::<f64, i64>(o).fill(v[0]);
                }
                true
            }
            // A float to float cast is a copy rounded to the new type.
            (Op::Cast { .. }, [x]) if float && self.graph.ty(node.inputs[0]).dtype.is_float() => {
                match x {
                    Src::Arena(r) => {
                        let Some((o, i)) = split(words, out, std::slice::from_ref(r)) else {
                            return false;
                        };
                        o.copy_from_slice(i[0]);
                    }
                    Src::Owned(v) => words[out.clone()].copy_from_slice(v.f()),
                }
                self.round_slice(ty.dtype, &mut words[out.clone()]);
                true
            }
            // A view of its operand's buffer: already in place.
            (Op::Reshape { .. }, [Src::Arena(r)]) if r == out => true,
            (Op::Unary(u), [x]) if float && *u != UnaryOp::Not => {
                let f = unary_f(*u);
                match x {
                    Src::Arena(r) if r == out => {
                        words[out.clone()].iter_mut().for_each(|e| *e = f(*e))
                    }
                    Src::Arena(r) => {
                        let Some((o, i)) = split(words, out, std::slice::from_ref(r)) else {
                            return false;
                        };
                        o.iter_mut().zip(i[0]).for_each(|(o, &x)| *o = f(x));
                    }
                    Src::Owned(v) => {
                        let o = &mut words[out.clone()];
                        o.iter_mut().zip(v.f()).for_each(|(o, &x)| *o = f(x));
                    }
                }
                self.round_slice(ty.dtype, &mut words[out.clone()]);
                true
            }
            (Op::Binary(b), [x, y]) if float && !matches!(b, BinaryOp::And | BinaryOp::Or) => {
                let f = binary_f(*b);
                let is_out = |s: &Src| matches!(s, Src::Arena(r) if r == out);
                let arena_ins: Vec<Range<usize>> = [x, y]
                    .iter()
                    .filter_map(|s| match s {
                        Src::Arena(r) if !is_out(s) => Some(r.clone()),
                        _ => None,
                    })
                    .collect();
                let Some((o, ins)) = split(words, out, &arena_ins) else {
                    return false;
                };
                let mut ins = ins.into_iter();
                let px = operand(x, out, &mut ins);
                let py = operand(y, out, &mut ins);
                match (px, py) {
                    (Opnd::Out, Opnd::Out) => o.iter_mut().for_each(|e| *e = f(*e, *e)),
                    (Opnd::Out, Opnd::Slice(y)) => {
                        o.iter_mut().zip(y).for_each(|(e, &y)| *e = f(*e, y))
                    }
                    (Opnd::Slice(x), Opnd::Out) => {
                        o.iter_mut().zip(x).for_each(|(e, &x)| *e = f(x, *e))
                    }
                    (Opnd::Slice(x), Opnd::Slice(y)) => o
                        .iter_mut()
                        .zip(x.iter().zip(y))
                        .for_each(|(e, (&x, &y))| *e = f(x, y)),
                }
                self.round_slice(ty.dtype, o);
                true
            }
            // An empty product has nothing to write.
            (Op::MatMul, _) if out.is_empty() => true,
            (Op::MatMul, [_, _]) => self.product_into(node, ty.dtype, out, srcs, words),
            _ => false,
        }
    }
}

/// Hands a streamed value to `io` under each of its output names.
fn emit<S: Stream + ?Sized>(io: &mut S, names: &[&str], t: Tensor) {
    if let Some((last, rest)) = names.split_last() {
        for name in rest {
            io.stream(name, t.clone());
        }
        io.stream(last, t);
    }
}

/// An elementwise operand: the output itself (computing in place) or a slice.
enum Opnd<'s> {
    Out,
    Slice(&'s [f64]),
}

/// The operand `s` of a node writing `out`, taking arena slices from `ins` in operand order.
fn operand<'s>(
    s: &Src<'s>,
    out: &Range<usize>,
    ins: &mut impl Iterator<Item = &'s [f64]>,
) -> Opnd<'s> {
    match s {
        Src::Arena(r) if r == out => Opnd::Out,
        Src::Arena(_) => Opnd::Slice(ins.next().expect("one slice per arena operand")),
        Src::Owned(v) => Opnd::Slice(v.f()),
    }
}

/// A value of type `ty` read out of its words.
fn read(ty: &TensorType, w: &[f64]) -> Val {
    let buf = if ty.dtype.is_float() {
        Buf::F(w.to_vec())
    } else {
        Buf::I(bytemuck::cast_slice::<f64, i64>(w).to_vec())
    };
    Val {
        ty: ty.clone(),
        buf,
    }
}

/// A result written into its words.
fn write(buf: &Buf, w: &mut [f64]) {
    match buf {
        Buf::F(v) => w.copy_from_slice(v),
        Buf::I(v) => bytemuck::cast_slice_mut::<f64, i64>(w).copy_from_slice(v),
    }
}
