//! The GEMMs behind [`super::LibraryCall`], on the `gemm` crate: its AVX-512 (x86-v4) and
//! AVX2 kernels are picked at run time from the CPU's features, it takes any strides (so the
//! transposed operands of the grouped gradient are read in place, never copied), and it
//! parallelises on the rayon pool it is called in. It beat `matrixmultiply` on every shape of
//! the model (the README's "GEMM library calls" table).
//!
//! Parallelism: one GEMM is split by the library over every thread of the pool, or, for a
//! small output over a long contraction, cut along the contraction into one single-threaded
//! product per thread whose partial results are summed; a batch of small matrices is spread
//! one matrix per task instead when that divides evenly. The experts
//! of a grouped call are spread one per task, except those with more than one thread's share
//! of the rows (an uneven routing), which run first, each over the whole pool. Products too
//! small to share run on the calling thread.

use super::{Grouped, MatMul};
use gemm::Parallelism;
use half::bf16;
use rayon::prelude::*;
use std::any::TypeId;
use std::cell::RefCell;

/// The element types of the calls: f32 and f64, which the library multiplies as they are,
/// and bf16, stored as bf16 and multiplied in f32 (see [`via_f32`]).
pub(super) trait Elem: Copy + Send + Sync + std::ops::AddAssign + 'static {
    const ZERO: Self;
    const ONE: Self;
    /// Whether the library multiplies this type itself (f32, f64): partial products of a
    /// split contraction can then be summed in it.
    const NATIVE: bool;
    fn to_f32(self) -> f32;
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
    fn from_f32(x: f32) -> bf16 {
        bf16::from_f32(x)
    }
}

/// A read-only matrix operand: its base and its row and column strides, in elements.
#[derive(Clone, Copy)]
struct Operand<T> {
    ptr: *const T,
    rs: isize,
    cs: isize,
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

/// Multiply-adds below which a call runs on the calling thread, not in the pool: the `gemm`
/// crate's own threading threshold, under which it would use one thread anyway, so handing
/// the work to the pool would only add a wake-up.
const INLINE_WORK: usize = 48 * 48 * 256;

/// Runs `f` in `pool`, or on the calling thread (one thread's parallelism) for `work`
/// multiply-adds below [`INLINE_WORK`].
fn on_pool(pool: &rayon::ThreadPool, work: usize, f: impl FnOnce(bool) + Send) {
    if work < INLINE_WORK {
        f(false)
    } else {
        pool.install(|| f(true))
    }
}

/// The parallelism for one GEMM on the current pool.
fn parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// A row-major output: its base, its row stride in elements, and whether the product is
/// added to what it holds.
#[derive(Clone, Copy)]
struct Dst<T> {
    ptr: *mut T,
    rs: isize,
    accumulate: bool,
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
/// zeroed (or left as it is). Operands of one type the library multiplies (f32, f64) go to it
/// as they are; any bf16 takes [`via_f32`].
///
/// # Safety
/// The operands cover [m, k] and [k, n] readable elements at their strides, `dst` [m, n]
/// writable ones at its row stride (at least n) that overlap neither.
unsafe fn product<A: Elem, B: Elem, C: Elem>(
    (m, k, n): (usize, usize, usize),
    lhs: Operand<A>,
    rhs: Operand<B>,
    dst: Dst<C>,
    par: Parallelism,
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
    let same = TypeId::of::<A>() == TypeId::of::<C>() && TypeId::of::<B>() == TypeId::of::<C>();
    if !(same && C::NATIVE) {
        // SAFETY: the caller's contract.
        unsafe { via_f32((m, k, n), lhs, rhs, dst, par) };
        return;
    }
    // SAFETY: A, B and C are one type (checked above), so the casts change nothing; the
    // caller's contract; with `read_dst` the library computes dst = alpha * dst + beta * lhs
    // @ rhs, without it dst = beta * lhs @ rhs (alpha unused).
    unsafe {
        if TypeId::of::<C>() == TypeId::of::<f32>() {
            native::<f32>((m, k, n), lhs.cast(), rhs.cast(), dst.cast(), par);
        } else {
            native::<f64>((m, k, n), lhs.cast(), rhs.cast(), dst.cast(), par);
        }
    }
}

/// The library's own product over f32 or f64.
///
/// # Safety
/// As for [`product`], with k > 0.
unsafe fn native<T: Elem>(
    (m, k, n): (usize, usize, usize),
    lhs: Operand<T>,
    rhs: Operand<T>,
    dst: Dst<T>,
    par: Parallelism,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            1,
            dst.rs,
            dst.accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        );
    }
}

/// Rows and columns of an output tile of [`via_f32`], and the contraction's block: the f32
/// scratch is a [TILE, TILE] tile of dst and [TILE, DEPTH] and [DEPTH, TILE] blocks of the
/// operands (20 MiB a thread). A contraction of at most DEPTH (the models' hidden sizes) is
/// one block, so a band of lhs rows is converted once for all its tiles and each rhs element
/// once per band. Measured inside a training step on the bf16 LM head `[441, 512] @ [512,
/// 151936]` (2 threads, AVX2): 74-81 GFLOP/s with blocks of 256 (lhs converted again for
/// every tile), 88-105 this way, against 115-128 for the same product in f32.
const TILE: usize = 1024;
const DEPTH: usize = 2048;

thread_local! {
    /// Each thread's f32 scratch for [`via_f32`], kept between calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A product with bf16 operands or result, in f32: the library's f32 kernels on f32 copies
/// of operand blocks, accumulating in f32 over the whole contraction, each result rounded
/// once to dst's type. bf16 storage with f32 accumulation, as PyTorch's CPU bf16 matmul; this
/// CPU has no bf16 multiply instructions (no AVX-512 BF16), and the conversion costs one pass
/// over each operand block per tile. f32 operands are read in place; a block keeps its
/// operand's layout (row- or column-major) so the copy reads contiguously.
///
/// # Safety
/// As for [`product`], with k > 0.
unsafe fn via_f32<A: Elem, B: Elem, C: Elem>(
    (m, k, n): (usize, usize, usize),
    lhs: Operand<A>,
    rhs: Operand<B>,
    dst: Dst<C>,
    par: Parallelism,
) {
    let direct_dst = TypeId::of::<C>() == TypeId::of::<f32>();
    let run = |scratch: &mut Vec<f32>| {
        let need = TILE * TILE + 2 * TILE * DEPTH;
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        let (ct, rest) = scratch.split_at_mut(TILE * TILE);
        let (at, bt) = rest.split_at_mut(TILE * DEPTH);
        for i0 in (0..m).step_by(TILE) {
            let mt = TILE.min(m - i0);
            // One block deep: the band's lhs block, converted once for all its tiles.
            // SAFETY: the block is inside lhs.
            let band = (k <= DEPTH).then(|| unsafe { f32_block(lhs.at(i0, 0), (mt, k), at) });
            for j0 in (0..n).step_by(TILE) {
                let nt = TILE.min(n - j0);
                // SAFETY: the tile is inside dst.
                let dtile = unsafe { dst.ptr.offset(i0 as isize * dst.rs + j0 as isize) };
                let out = if direct_dst {
                    Dst {
                        ptr: dtile.cast::<f32>(),
                        rs: dst.rs,
                        accumulate: dst.accumulate,
                    }
                } else {
                    if dst.accumulate {
                        for i in 0..mt {
                            // SAFETY: row i of the tile holds nt readable elements.
                            let row = unsafe {
                                std::slice::from_raw_parts(dtile.offset(i as isize * dst.rs), nt)
                            };
                            for (c, x) in ct[i * nt..(i + 1) * nt].iter_mut().zip(row) {
                                *c = x.to_f32();
                            }
                        }
                    }
                    Dst {
                        ptr: ct.as_mut_ptr(),
                        rs: nt as isize,
                        accumulate: dst.accumulate,
                    }
                };
                for p0 in (0..k).step_by(DEPTH) {
                    let kt = DEPTH.min(k - p0);
                    // SAFETY: the blocks are inside the operands.
                    let (a, b) = unsafe {
                        (
                            match band {
                                Some(a) => a,
                                None => f32_block(lhs.at(i0, p0), (mt, kt), at),
                            },
                            f32_block(rhs.at(p0, j0), (kt, nt), bt),
                        )
                    };
                    let out = Dst {
                        accumulate: out.accumulate || p0 > 0,
                        ..out
                    };
                    // SAFETY: the blocks are [mt, kt] and [kt, nt], the tile [mt, nt].
                    unsafe { native::<f32>((mt, kt, nt), a, b, out, par) };
                }
                if !direct_dst {
                    for i in 0..mt {
                        // SAFETY: row i of the tile holds nt writable elements.
                        let row = unsafe {
                            std::slice::from_raw_parts_mut(dtile.offset(i as isize * dst.rs), nt)
                        };
                        for (x, c) in row.iter_mut().zip(&ct[i * nt..(i + 1) * nt]) {
                            *x = C::from_f32(*c);
                        }
                    }
                }
            }
        }
    };
    // A thread that waits inside the library's parallel product may run another task that
    // multiplies bf16 too: it then takes a scratch of its own.
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => run(&mut scratch),
        Err(_) => run(&mut Vec::new()),
    });
}

/// The [rows, cols] block at `src` as f32: `src` itself when it is f32, else copied into
/// `buf` in its layout (row-major when its columns are adjacent, column-major when its rows
/// are).
///
/// # Safety
/// `src` covers [rows, cols] readable elements at its strides; `buf` holds rows * cols.
unsafe fn f32_block<T: Elem>(
    src: Operand<T>,
    (rows, cols): (usize, usize),
    buf: &mut [f32],
) -> Operand<f32> {
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        return src.cast();
    }
    let by_rows = src.cs == 1 || src.rs != 1;
    let (outer, inner, os, is) = if by_rows {
        (rows, cols, src.rs, src.cs)
    } else {
        (cols, rows, src.cs, src.rs)
    };
    for o in 0..outer {
        let line = &mut buf[o * inner..(o + 1) * inner];
        // SAFETY: line o of the block holds `inner` elements `is` apart.
        unsafe {
            let p = src.ptr.offset(o as isize * os);
            if is == 1 {
                let s = std::slice::from_raw_parts(p, inner);
                for (d, x) in line.iter_mut().zip(s) {
                    *d = x.to_f32();
                }
            } else {
                for (j, d) in line.iter_mut().enumerate() {
                    *d = (*p.offset(j as isize * is)).to_f32();
                }
            }
        }
    }
    if by_rows {
        Operand {
            ptr: buf.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    } else {
        Operand {
            ptr: buf.as_ptr(),
            rs: 1,
            cs: rows as isize,
        }
    }
}

/// A batched matmul.
///
/// # Safety
/// `a`, `b` and `out` hold `batch` matrices of [m, k], [k, n] and [m, n]; out overlaps
/// neither input.
pub(super) unsafe fn matmul<T: Elem>(
    c: &MatMul,
    a: *const T,
    b: *const T,
    out: *mut T,
    pool: &rayon::ThreadPool,
) {
    let &MatMul { batch, m, k, n, .. } = c;
    let threads = pool.current_num_threads();
    let (a, b, out) = (Shared::new(a), Shared::new(b), Shared::new(out));
    // SAFETY (both arms): matrix `i` of each buffer starts `i` matrices in and the matrices
    // of out are disjoint, so the tasks write disjoint memory.
    let one = move |i: usize, par| unsafe {
        product(
            (m, k, n),
            Operand::rows(a.get().add(i * m * k), k),
            Operand::rows(b.get().add(i * k * n), n),
            Dst::rows(out.get().add(i * m * n), n),
            par,
        )
    };
    let work = batch.saturating_mul(m).saturating_mul(k).saturating_mul(n);
    on_pool(pool, work, |pooled| {
        if !pooled {
            for i in 0..batch {
                one(i, Parallelism::None);
            }
        } else if batch > 1 && threads > 1 && (batch % threads == 0 || batch >= 4 * threads) {
            (0..batch)
                .into_par_iter()
                .for_each(|i| one(i, Parallelism::None));
        } else if T::NATIVE && threads > 1 && k >= SPLIT_K * m.max(n) {
            for i in 0..batch {
                // SAFETY: as for `one`.
                unsafe {
                    split_k(
                        (m, k, n),
                        Operand::rows(a.get().add(i * m * k), k),
                        Operand::rows(b.get().add(i * k * n), n),
                        Dst::rows(out.get().add(i * m * n), n),
                    )
                }
            }
        } else {
            for i in 0..batch {
                one(i, parallelism());
            }
        }
    });
}

/// How much longer than the output's longer side the contraction must be for [`split_k`].
/// Measured at 2 threads: the LM head's input gradient `[1024, 151936] @ [151936, 512]` went
/// from 208 to 248 GFLOP/s with it, `[2048, 8192] @ [8192, 1024]` from 216 to 223-242.
const SPLIT_K: usize = 4;

/// `dst = lhs @ rhs` (or `+=`) with the contraction cut into one slice per thread of the
/// current pool, each a single-threaded product into its own partial result, summed at the
/// end: for a small output over a long contraction, where splitting the output gives each
/// thread too little of it.
///
/// # Safety
/// As for [`product`].
unsafe fn split_k<T: Elem>(
    (m, k, n): (usize, usize, usize),
    lhs: Operand<T>,
    rhs: Operand<T>,
    dst: Dst<T>,
) {
    let parts = rayon::current_num_threads().min(k).max(1);
    let mut partial = vec![T::ZERO; (parts - 1) * m * n];
    let (lhs_ptr, rhs_ptr, dst_ptr) = (Shared::new(lhs.ptr), Shared::new(rhs.ptr), Shared(dst.ptr));
    let partials = Shared(partial.as_mut_ptr());
    (0..parts).into_par_iter().for_each(|p| {
        let (k0, k1) = (p * k / parts, (p + 1) * k / parts);
        // SAFETY: columns k0..k1 of lhs and rows k0..k1 of rhs are within the operands; part
        // 0 writes dst, part p > 0 the p-th of the (parts - 1) dense partial results.
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
                Parallelism::None,
            );
        }
    });
    let partial = &partial;
    (0..m).into_par_iter().for_each(|i| {
        // SAFETY: row i of dst holds n elements, written above; the rows are disjoint (a row
        // stride of at least n), so each task has its own.
        let row =
            unsafe { std::slice::from_raw_parts_mut(dst_ptr.get().offset(i as isize * dst.rs), n) };
        for part in partial.chunks_exact(m * n) {
            for (x, y) in row.iter_mut().zip(&part[i * n..(i + 1) * n]) {
                *x += *y;
            }
        }
    });
}

/// A [`super::Gemm`]: one product over views of its buffers, split over the pool as a
/// single matmul is (by the library, or along a long contraction when the three types are
/// one the library multiplies).
///
/// # Safety
/// The buffers hold the call's `lens` elements of A, B and C, its views checked inside them;
/// dst overlaps neither input.
pub(super) unsafe fn strided<A: Elem, B: Elem, C: Elem>(
    c: &super::Gemm,
    [lhs, rhs, dst]: [*mut u8; 3],
    pool: &rayon::ThreadPool,
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
    let same = TypeId::of::<A>() == TypeId::of::<C>() && TypeId::of::<B>() == TypeId::of::<C>();
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
        // SAFETY: the caller's contract; with `same`, A and B are C.
        unsafe {
            if pooled && same && C::NATIVE && threads > 1 && k >= SPLIT_K * m.max(n) {
                split_k::<C>((m, k, n), lhs.cast(), rhs.cast(), dst);
            } else if pooled {
                product((m, k, n), lhs, rhs, dst, parallelism());
            } else {
                product((m, k, n), lhs, rhs, dst, Parallelism::None);
            }
        }
    });
}

/// The multiply-adds of a grouped matmul (the same for every split of the rows).
fn work(c: &Grouped) -> usize {
    c.rows.saturating_mul(c.inner).saturating_mul(c.cols)
}

/// Runs `f(e, lo, hi, parallelism)` for every expert `e` with rows `lo..hi`: in the pool
/// (`pooled`), an expert with more than one thread's share of the rows runs over the whole
/// pool, one after the other, and the others are spread one expert per task (measured faster
/// than splitting each expert's GEMM over the threads: 32 experts of 256 rows, 1.1-1.3x);
/// otherwise all run on the calling thread.
fn for_experts(
    groups: &[(usize, usize)],
    rows: usize,
    pooled: bool,
    f: impl Fn(usize, usize, usize, Parallelism) + Sync,
) {
    let threads = rayon::current_num_threads();
    if !pooled || threads <= 1 {
        for (e, &(lo, hi)) in groups.iter().enumerate() {
            f(e, lo, hi, Parallelism::None);
        }
        return;
    }
    let big = |&(lo, hi): &(usize, usize)| (hi - lo) * threads > rows;
    for (e, g) in groups.iter().enumerate().filter(|(_, g)| big(g)) {
        f(e, g.0, g.1, parallelism());
    }
    groups
        .par_iter()
        .enumerate()
        .filter(|(_, g)| !big(g))
        .for_each(|(e, &(lo, hi))| f(e, lo, hi, Parallelism::None));
}

/// A grouped matmul over the checked row ranges `groups`.
///
/// # Safety
/// xs [rows, inner], w [experts, inner, cols] and out [rows, cols] as [`Grouped`] says, with
/// `groups` consecutive ranges within the rows; out overlaps neither input.
pub(super) unsafe fn grouped<T: Elem>(
    c: &Grouped,
    groups: &[(usize, usize)],
    xs: *const T,
    w: *const T,
    out: *mut T,
    pool: &rayon::ThreadPool,
) {
    let (a, n) = (c.inner, c.cols);
    let (xs, w, out) = (Shared::new(xs), Shared::new(w), Shared::new(out));
    on_pool(pool, work(c), |pooled| {
        for_experts(groups, c.rows, pooled, |e, lo, hi, par| {
            // SAFETY: rows lo..hi are within xs and out, expert e within w; the experts'
            // rows of out are disjoint.
            unsafe {
                product(
                    (hi - lo, a, n),
                    Operand::rows(xs.get().add(lo * a), a),
                    Operand::rows(w.get().add(e * a * n), n),
                    Dst::rows(out.get().add(lo * n), n),
                    par,
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
/// output and of xs, dw like w), `groups` consecutive ranges within the rows; the outputs
/// overlap each other and the inputs nowhere.
pub(super) unsafe fn grouped_grad<T: Elem>(
    c: &Grouped,
    groups: &[(usize, usize)],
    [xs, w, dy]: [*const T; 3],
    [dxs, dw]: [*mut T; 2],
    pool: &rayon::ThreadPool,
) {
    let (a, n) = (c.inner, c.cols);
    let [xs, w, dy] = [xs, w, dy].map(Shared::new);
    let [dxs, dw] = [dxs, dw].map(Shared);
    on_pool(pool, 2 * work(c), |pooled| {
        for_experts(groups, c.rows, pooled, |e, lo, hi, par| {
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
                    par,
                );
                product(
                    (a, r, n),
                    Operand::transposed(xs.get().add(lo * a), a),
                    dy_e,
                    Dst::rows(dw.get().add(e * a * n), n),
                    par,
                );
            }
        })
    });
}
