//! The GEMMs behind [`super::LibraryCall`]: how each call is cut into products and spread
//! over the pool. Each product runs the packed loop nest of [`super::packed`] on the `gemm`
//! crate's micro-kernels, with its packed blocks in the workspace the runtime allocated once;
//! any strides are taken (so the transposed operands of the grouped gradient are read in
//! place, never copied). The micro-kernels beat `matrixmultiply` on every shape of the model
//! (the README's "GEMM library calls" table).
//!
//! Parallelism: one GEMM is split over every thread of the pool by its output, or, for a
//! small output over a long contraction, cut along the contraction into one single-threaded
//! product per thread whose partial results are summed; a batch of small matrices is spread
//! one matrix per task instead when that divides evenly. The experts
//! of a grouped call are spread one per task, except those with more than one thread's share
//! of the rows (an uneven routing), which run first, each over the whole pool. Products too
//! small to share run on the calling thread.

use super::packed::{self, Need, Parts};
use super::{Grouped, MatMul};
use half::bf16;
use rayon::prelude::*;
use std::any::TypeId;

/// The element types of the calls: f32 and f64, which the library multiplies as they are,
/// and bf16, stored as bf16 and multiplied in f32 (see [`via_f32`]).
pub(super) trait Elem: Copy + Send + Sync + std::ops::AddAssign + 'static {
    const ZERO: Self;
    const ONE: Self;
    /// Whether the library multiplies this type itself (f32, f64): partial products of a
    /// split contraction can then be summed in it.
    const NATIVE: bool;
    fn to_f32(self) -> f32;
    fn to_f64(self) -> f64;
    /// Rounded to nearest, ties to even.
    fn from_f32(x: f32) -> Self;
}

impl Elem for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    const NATIVE: bool = true;
    fn to_f32(self) -> f32 {
        self
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn from_f32(x: f32) -> f32 {
        x
    }
}

impl Elem for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    const NATIVE: bool = true;
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f32(x: f32) -> f64 {
        f64::from(x)
    }
}

impl Elem for bf16 {
    const ZERO: bf16 = bf16::ZERO;
    const ONE: bf16 = bf16::ONE;
    const NATIVE: bool = false;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    fn from_f32(x: f32) -> bf16 {
        bf16::from_f32(x)
    }
}

/// A read-only matrix operand: its base and its row and column strides, in elements.
#[derive(Clone, Copy)]
pub(super) struct Operand<T> {
    pub ptr: *const T,
    pub rs: isize,
    pub cs: isize,
}

impl<T> Operand<T> {
    /// The operand a view of the buffer at `p` describes.
    ///
    /// # Safety
    /// The view's offset is inside the buffer.
    unsafe fn view(p: *mut u8, v: super::View) -> Self {
        Operand {
            // SAFETY: the caller's contract.
            ptr: unsafe { p.cast::<T>().add(v.offset) }.cast_const(),
            rs: v.row_stride as isize,
            cs: v.col_stride as isize,
        }
    }

    /// The same operand read as another type (of the same layout).
    fn cast<U>(self) -> Operand<U> {
        Operand {
            ptr: self.ptr.cast(),
            rs: self.rs,
            cs: self.cs,
        }
    }

    /// The operand from its element (i, j) on.
    ///
    /// # Safety
    /// Element (i, j) is inside the operand.
    unsafe fn at(self, i: usize, j: usize) -> Self {
        Operand {
            // SAFETY: the caller's contract.
            ptr: unsafe { self.ptr.offset(i as isize * self.rs + j as isize * self.cs) },
            ..self
        }
    }

    /// The dense row-major [rows, cols] matrix at `ptr`.
    fn rows(ptr: *const T, cols: usize) -> Self {
        Operand {
            ptr,
            rs: cols as isize,
            cs: 1,
        }
    }

    /// The transpose of the dense row-major [cols, rows] matrix at `ptr`, read in place.
    fn transposed(ptr: *const T, rows: usize) -> Self {
        Operand {
            ptr,
            rs: 1,
            cs: rows as isize,
        }
    }
}

/// A buffer pointer that may cross to a pool thread: the tasks of one call read the inputs
/// and write disjoint parts of the outputs, as the functions below ensure.
struct Shared<T>(*mut T);

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Shared<T> {}

// SAFETY: see the type's comment; the pointees are f32 or f64.
unsafe impl<T: Send> Send for Shared<T> {}
// SAFETY: as for Send.
unsafe impl<T: Sync> Sync for Shared<T> {}

impl<T> Shared<T> {
    fn new(p: *const T) -> Self {
        Shared(p.cast_mut())
    }

    /// The pointer (a method, so that a closure captures the whole `Shared`).
    fn get(self) -> *mut T {
        self.0
    }
}

/// Multiply-adds below which a call runs on the calling thread, not in the pool: handing so
/// little work to the pool would cost more in wake-ups than it saves (the `gemm` crate's own
/// threading threshold).
const INLINE_WORK: usize = 48 * 48 * 256;

/// Runs `f` in `pool`, or on the calling thread (`f(false)`: one thread) for `work`
/// multiply-adds below [`INLINE_WORK`].
fn on_pool(pool: &rayon::ThreadPool, work: usize, f: impl FnOnce(bool) + Send) {
    if work < INLINE_WORK {
        f(false)
    } else {
        pool.install(|| f(true))
    }
}

/// A row-major output: its base, its row stride in elements, and whether the product is
/// added to what it holds.
#[derive(Clone, Copy)]
pub(super) struct Dst<T> {
    pub ptr: *mut T,
    pub rs: isize,
    pub accumulate: bool,
}

impl<T> Dst<T> {
    fn cast<U>(self) -> Dst<U> {
        Dst {
            ptr: self.ptr.cast(),
            rs: self.rs,
            accumulate: self.accumulate,
        }
    }

    /// The dense row-major [_, cols] matrix at `ptr`, overwritten.
    fn rows(ptr: *mut T, cols: usize) -> Self {
        Dst {
            ptr,
            rs: cols as isize,
            accumulate: false,
        }
    }
}

/// `dst [m, n] = lhs [m, k] @ rhs [k, n]` (or `+=` when it accumulates); with `k == 0` dst is
/// zeroed (or left as it is). f32 and f64 results are multiplied in their type by the packed
/// loop nest, a bf16 operand converted as it is packed; a bf16 result takes [`via_f32`].
/// Over the current pool when `parallel`.
///
/// # Safety
/// The operands cover [m, k] and [k, n] readable elements at their strides, `dst` [m, n]
/// writable ones at its row stride (at least n) that overlap neither; `parts` has room for
/// [`Need::product`] of these sizes; f64 is never mixed with another type.
unsafe fn product<A: Elem, B: Elem, C: Elem>(
    (m, k, n): (usize, usize, usize),
    lhs: Operand<A>,
    rhs: Operand<B>,
    dst: Dst<C>,
    parallel: bool,
    parts: Parts,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !dst.accumulate {
            for i in 0..m {
                // SAFETY: row i of dst holds n writable elements.
                unsafe {
                    std::slice::from_raw_parts_mut(dst.ptr.offset(i as isize * dst.rs), n)
                        .fill(C::ZERO)
                };
            }
        }
        return;
    }
    // SAFETY: the caller's contract; the casts are to C's own type.
    unsafe {
        if TypeId::of::<C>() == TypeId::of::<f32>() {
            packed::product::<A, B, f32>((m, k, n), lhs, rhs, dst.cast(), parallel, parts);
        } else if TypeId::of::<C>() == TypeId::of::<f64>() {
            packed::product::<A, B, f64>((m, k, n), lhs, rhs, dst.cast(), parallel, parts);
        } else {
            via_f32((m, k, n), lhs, rhs, dst, parallel, parts);
        }
    }
}

/// A product into bf16 (or another type the kernels do not multiply): each tile of dst is
/// computed in the f32 tile of the thread's workspace slot, accumulating in f32 over the
/// whole contraction, and rounded once to dst's type. bf16 storage with f32 accumulation, as
/// PyTorch's CPU bf16 matmul, on any x86 CPU (bf16 multiply instructions, AVX-512 BF16 or
/// AMX, are not used yet).
///
/// # Safety
/// As for [`product`], with k > 0.
unsafe fn via_f32<A: Elem, B: Elem, C: Elem>(
    (m, k, n): (usize, usize, usize),
    lhs: Operand<A>,
    rhs: Operand<B>,
    dst: Dst<C>,
    parallel: bool,
    parts: Parts,
) {
    let tile = parts.slot().tile;
    for i0 in (0..m).step_by(packed::TILE_ROWS) {
        let mt = packed::TILE_ROWS.min(m - i0);
        for j0 in (0..n).step_by(packed::TILE_COLS) {
            let nt = packed::TILE_COLS.min(n - j0);
            // SAFETY: the tile is inside dst; the slot's tile holds TILE_ROWS x TILE_COLS
            // f32s, of which this uses [mt, nt] densely; the blocks are inside the operands.
            unsafe {
                let dtile = dst.ptr.offset(i0 as isize * dst.rs + j0 as isize);
                let ct = std::slice::from_raw_parts_mut(tile, mt * nt);
                if dst.accumulate {
                    for (i, c) in ct.chunks_exact_mut(nt).enumerate() {
                        let row = std::slice::from_raw_parts(dtile.offset(i as isize * dst.rs), nt);
                        for (c, x) in c.iter_mut().zip(row) {
                            *c = x.to_f32();
                        }
                    }
                }
                let out = Dst {
                    ptr: tile,
                    rs: nt as isize,
                    accumulate: dst.accumulate,
                };
                packed::product::<A, B, f32>(
                    (mt, k, nt),
                    lhs.at(i0, 0),
                    rhs.at(0, j0),
                    out,
                    parallel,
                    parts,
                );
                for (i, c) in ct.chunks_exact(nt).enumerate() {
                    let row = std::slice::from_raw_parts_mut(dtile.offset(i as isize * dst.rs), nt);
                    for (x, c) in row.iter_mut().zip(c) {
                        *x = C::from_f32(*c);
                    }
                }
            }
        }
    }
}

/// What a product of `(m, k, n)` in `C` needs of the workspace: its packed blocks, in the
/// type it is multiplied in, and the f32 tile of a bf16 result.
fn product_need<C: Elem>(mkn: (usize, usize, usize)) -> Need {
    if TypeId::of::<C>() == TypeId::of::<f64>() {
        Need::product::<f64>(mkn, false)
    } else {
        Need::product::<f32>(mkn, TypeId::of::<C>() != TypeId::of::<f32>())
    }
}

/// Whether a product of `(m, k, n)` in types A, B, C over `threads` threads cuts its
/// contraction ([`split_k`]): only when the three types are one the kernels multiply.
fn splits_k<A: Elem, B: Elem, C: Elem>(threads: usize, (m, k, n): (usize, usize, usize)) -> bool {
    let same = TypeId::of::<A>() == TypeId::of::<C>() && TypeId::of::<B>() == TypeId::of::<C>();
    same && C::NATIVE && threads > 1 && k >= SPLIT_K * m.max(n)
}

/// What a product of `(m, k, n)` in types A, B, C needs of the workspace on `threads`
/// threads: its packed blocks, and the partial results when it cuts its contraction.
fn call_need<A: Elem, B: Elem, C: Elem>(threads: usize, mkn: (usize, usize, usize)) -> Need {
    let need = product_need::<C>(mkn);
    if splits_k::<A, B, C>(threads, mkn) {
        let (m, _, n) = mkn;
        need.max(Need {
            partials: (threads - 1) * m * n * size_of::<C>(),
            ..Need::default()
        })
    } else {
        need
    }
}

/// What a [`MatMul`] needs of the workspace on `threads` threads.
pub(super) fn matmul_need<T: Elem>(c: &MatMul, threads: usize) -> Need {
    call_need::<T, T, T>(threads, (c.m, c.k, c.n))
}

/// A batched matmul.
///
/// # Safety
/// `a`, `b` and `out` hold `batch` matrices of [m, k], [k, n] and [m, n]; out overlaps
/// neither input; `parts` has room for [`matmul_need`] on `pool`.
pub(super) unsafe fn matmul<T: Elem>(
    c: &MatMul,
    a: *const T,
    b: *const T,
    out: *mut T,
    pool: &rayon::ThreadPool,
    parts: Parts,
) {
    let &MatMul { batch, m, k, n, .. } = c;
    let threads = pool.current_num_threads();
    let (a, b, out) = (Shared::new(a), Shared::new(b), Shared::new(out));
    // SAFETY (all arms): matrix `i` of each buffer starts `i` matrices in and the matrices
    // of out are disjoint, so the tasks write disjoint memory.
    let one = move |i: usize, parallel| unsafe {
        product(
            (m, k, n),
            Operand::rows(a.get().add(i * m * k), k),
            Operand::rows(b.get().add(i * k * n), n),
            Dst::rows(out.get().add(i * m * n), n),
            parallel,
            parts,
        )
    };
    let work = batch.saturating_mul(m).saturating_mul(k).saturating_mul(n);
    on_pool(pool, work, |pooled| {
        if !pooled {
            for i in 0..batch {
                one(i, false);
            }
        } else if batch > 1 && threads > 1 && (batch % threads == 0 || batch >= 4 * threads) {
            (0..batch).into_par_iter().for_each(|i| one(i, false));
        } else if splits_k::<T, T, T>(threads, (m, k, n)) {
            for i in 0..batch {
                // SAFETY: as for `one`.
                unsafe {
                    split_k(
                        (m, k, n),
                        Operand::rows(a.get().add(i * m * k), k),
                        Operand::rows(b.get().add(i * k * n), n),
                        Dst::rows(out.get().add(i * m * n), n),
                        parts,
                    )
                }
            }
        } else {
            for i in 0..batch {
                one(i, true);
            }
        }
    });
}

/// How much longer than the output's longer side the contraction must be for [`split_k`].
/// Measured at 2 threads: the LM head's input gradient `[1024, 151936] @ [151936, 512]` went
/// from 208 to 248 GFLOP/s with it, `[2048, 8192] @ [8192, 1024]` from 216 to 223-242.
const SPLIT_K: usize = 4;

/// `dst = lhs @ rhs` (or `+=`) with the contraction cut into one slice per thread of the
/// current pool, each a single-threaded product into its own partial result (the first into
/// dst, the others into the workspace), summed at the end: for a small output over a long
/// contraction, where splitting the output gives each thread too little of it.
///
/// # Safety
/// As for [`product`], with `parts` holding the partial results of [`call_need`] too.
unsafe fn split_k<T: Elem>(
    (m, k, n): (usize, usize, usize),
    lhs: Operand<T>,
    rhs: Operand<T>,
    dst: Dst<T>,
    parts: Parts,
) {
    let threads = rayon::current_num_threads().min(k).max(1);
    let (lhs_ptr, rhs_ptr, dst_ptr) = (Shared::new(lhs.ptr), Shared::new(rhs.ptr), Shared(dst.ptr));
    let partials = Shared(parts.partials::<T>());
    (0..threads).into_par_iter().for_each(|p| {
        let (k0, k1) = (p * k / threads, (p + 1) * k / threads);
        // SAFETY: columns k0..k1 of lhs and rows k0..k1 of rhs are within the operands; part
        // 0 writes dst, part p > 0 the p-th of the (threads - 1) dense partial results.
        unsafe {
            let out = if p == 0 {
                Dst {
                    ptr: dst_ptr.get(),
                    ..dst
                }
            } else {
                Dst::rows(partials.get().add((p - 1) * m * n), n)
            };
            product(
                (m, k1 - k0, n),
                Operand {
                    ptr: lhs_ptr.get().offset(k0 as isize * lhs.cs),
                    ..lhs
                },
                Operand {
                    ptr: rhs_ptr.get().offset(k0 as isize * rhs.rs),
                    ..rhs
                },
                out,
                false,
                parts,
            );
        }
    });
    (0..m).into_par_iter().for_each(|i| {
        // SAFETY: row i of dst holds n elements, written above; the rows are disjoint (a row
        // stride of at least n), so each task has its own; the partials hold (threads - 1)
        // dense [m, n] results, written above.
        unsafe {
            let row = std::slice::from_raw_parts_mut(dst_ptr.get().offset(i as isize * dst.rs), n);
            for p in 1..threads {
                let part =
                    std::slice::from_raw_parts(partials.get().add((p - 1) * m * n + i * n), n);
                for (x, y) in row.iter_mut().zip(part) {
                    *x += *y;
                }
            }
        }
    });
}

/// What a [`super::Gemm`] of types A, B, C needs of the workspace on `threads` threads.
pub(super) fn strided_need<A: Elem, B: Elem, C: Elem>(c: &super::Gemm, threads: usize) -> Need {
    call_need::<A, B, C>(threads, (c.m, c.k, c.n))
}

/// A [`super::Gemm`]: one product over views of its buffers, split over the pool as a
/// single matmul is (by its output, or along a long contraction when the three types are
/// one the kernels multiply).
///
/// # Safety
/// The buffers hold the call's `lens` elements of A, B and C, its views checked inside them;
/// dst overlaps neither input; `parts` has room for [`strided_need`] on `pool`.
pub(super) unsafe fn strided<A: Elem, B: Elem, C: Elem>(
    c: &super::Gemm,
    [lhs, rhs, dst]: [*mut u8; 3],
    pool: &rayon::ThreadPool,
    parts: Parts,
) {
    let (m, k, n) = (c.m, c.k, c.n);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the views' offsets are inside their buffers (checked).
    let (lhs, rhs) = unsafe {
        (
            Operand::<A>::view(lhs, c.lhs),
            Operand::<B>::view(rhs, c.rhs),
        )
    };
    let dst = Dst {
        // SAFETY: as for the operands.
        ptr: unsafe { dst.cast::<C>().add(c.dst.offset) },
        rs: c.dst.row_stride as isize,
        accumulate: c.accumulate,
    };
    let (lhs_s, rhs_s, dst_s) = (Shared::new(lhs.ptr), Shared::new(rhs.ptr), Shared(dst.ptr));
    let threads = pool.current_num_threads();
    let work = m.saturating_mul(k).saturating_mul(n);
    on_pool(pool, work, move |pooled| {
        let (lhs, rhs, dst) = (
            Operand {
                ptr: lhs_s.get().cast_const(),
                ..lhs
            },
            Operand {
                ptr: rhs_s.get().cast_const(),
                ..rhs
            },
            Dst {
                ptr: dst_s.get(),
                ..dst
            },
        );
        // SAFETY: the caller's contract; a split contraction means A and B are C.
        unsafe {
            if pooled && splits_k::<A, B, C>(threads, (m, k, n)) {
                split_k::<C>((m, k, n), lhs.cast(), rhs.cast(), dst, parts);
            } else {
                product((m, k, n), lhs, rhs, dst, pooled, parts);
            }
        }
    });
}

/// The multiply-adds of a grouped matmul (the same for every split of the rows).
fn work(c: &Grouped) -> usize {
    c.rows.saturating_mul(c.inner).saturating_mul(c.cols)
}

/// What a grouped matmul (its gradient when `grad`) needs of the workspace: an expert may
/// have every row.
pub(super) fn grouped_need<T: Elem>(c: &Grouped, grad: bool) -> Need {
    let (r, a, n) = (c.rows, c.inner, c.cols);
    if grad {
        product_need::<T>((r, n, a)).max(product_need::<T>((a, r, n)))
    } else {
        product_need::<T>((r, a, n))
    }
}

/// Runs `f(e, lo, hi, parallel)` for every expert `e` with rows `lo..hi` (from the checked
/// `offsets`): in the pool (`pooled`), an expert with more than one thread's share of the
/// rows runs over the whole pool, one after the other, and the others are spread one expert
/// per task (measured faster than splitting each expert's GEMM over the threads: 32 experts
/// of 256 rows, 1.1-1.3x); otherwise all run on the calling thread.
fn for_experts(
    offsets: &[i64],
    rows: usize,
    pooled: bool,
    f: impl Fn(usize, usize, usize, bool) + Sync,
) {
    let group = |e: usize| (offsets[e] as usize, offsets[e + 1] as usize);
    let experts = offsets.len().saturating_sub(1);
    let threads = rayon::current_num_threads();
    if !pooled || threads <= 1 {
        for e in 0..experts {
            let (lo, hi) = group(e);
            f(e, lo, hi, false);
        }
        return;
    }
    let big = |(lo, hi): (usize, usize)| (hi - lo) * threads > rows;
    for e in (0..experts).filter(|&e| big(group(e))) {
        let (lo, hi) = group(e);
        f(e, lo, hi, true);
    }
    (0..experts)
        .into_par_iter()
        .filter(|&e| !big(group(e)))
        .for_each(|e| {
            let (lo, hi) = group(e);
            f(e, lo, hi, false)
        });
}

/// A grouped matmul over the checked `offsets`.
///
/// # Safety
/// xs [rows, inner], w [experts, inner, cols] and out [rows, cols] as [`Grouped`] says, with
/// `offsets` splitting the rows into consecutive ranges; out overlaps neither input; `parts`
/// has room for [`grouped_need`] on `pool`.
pub(super) unsafe fn grouped<T: Elem>(
    c: &Grouped,
    offsets: &[i64],
    [xs, w]: [*const T; 2],
    out: *mut T,
    pool: &rayon::ThreadPool,
    parts: Parts,
) {
    let (a, n) = (c.inner, c.cols);
    let (xs, w, out) = (Shared::new(xs), Shared::new(w), Shared::new(out));
    on_pool(pool, work(c), |pooled| {
        for_experts(offsets, c.rows, pooled, |e, lo, hi, parallel| {
            // SAFETY: rows lo..hi are within xs and out, expert e within w; the experts'
            // rows of out are disjoint.
            unsafe {
                product(
                    (hi - lo, a, n),
                    Operand::rows(xs.get().add(lo * a), a),
                    Operand::rows(w.get().add(e * a * n), n),
                    Dst::rows(out.get().add(lo * n), n),
                    parallel,
                    parts,
                );
            }
        })
    });
}

/// The gradient of a grouped matmul: `dxs_e = dy_e w_e^T` and `dw_e = xs_e^T dy_e`, with the
/// transposes read in place.
///
/// # Safety
/// `[xs, w, dy]` and `[dxs, dw]` as [`Grouped`] says (dy and dxs like the rows of the
/// output and of xs, dw like w), `offsets` splitting the rows into consecutive ranges; the
/// outputs overlap each other and the inputs nowhere; `parts` has room for [`grouped_need`]
/// of the gradient on `pool`.
pub(super) unsafe fn grouped_grad<T: Elem>(
    c: &Grouped,
    offsets: &[i64],
    [xs, w, dy]: [*const T; 3],
    [dxs, dw]: [*mut T; 2],
    pool: &rayon::ThreadPool,
    parts: Parts,
) {
    let (a, n) = (c.inner, c.cols);
    let [xs, w, dy] = [xs, w, dy].map(Shared::new);
    let [dxs, dw] = [dxs, dw].map(Shared);
    on_pool(pool, 2 * work(c), |pooled| {
        for_experts(offsets, c.rows, pooled, |e, lo, hi, parallel| {
            let r = hi - lo;
            // SAFETY: rows lo..hi are within xs, dy and dxs, expert e within w and dw, and
            // the experts' parts of dxs and dw are disjoint; an expert without rows gets
            // dw_e = 0 (a product over k = 0).
            unsafe {
                let dy_e = Operand::rows(dy.get().add(lo * n), n);
                product(
                    (r, n, a),
                    dy_e,
                    Operand::transposed(w.get().add(e * a * n), n),
                    Dst::rows(dxs.get().add(lo * a), a),
                    parallel,
                    parts,
                );
                product(
                    (a, r, n),
                    Operand::transposed(xs.get().add(lo * a), a),
                    dy_e,
                    Dst::rows(dw.get().add(e * a * n), n),
                    parallel,
                    parts,
                );
            }
        })
    });
}
