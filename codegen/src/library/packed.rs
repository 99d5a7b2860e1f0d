//! The GEMM loop nest of the library calls: operand blocks packed into the call's workspace
//! and multiplied by the `gemm` crate's micro-kernels (gemm-f32 and gemm-f64: AVX-512,
//! AVX2 with FMA, or scalar, picked from the CPU's features at run time).
//!
//! Why not the crate's own driver: it allocates its packing buffers inside every call, and a
//! replayed step must allocate nothing. Here the runtime sizes one [`Workspace`] for the
//! plan's calls when it loads the plan and every call packs into it, the contract an
//! accelerator library's operators have too (a workspace the caller allocates). Packing also
//! converts: a bf16 operand becomes f32 as it is packed, with no separate copy.
//!
//! The loop nest is BLIS's. The micro-kernels write a column-major tile, so the product is
//! computed transposed, `dst^T [n, m] = rhs^T [n, k] @ lhs^T [k, m]`: the kernel's rows are
//! dst's columns (panels of `mr` of rhs^T, one thread's block at a time) and its columns dst's
//! rows (panels of `nr` of lhs^T, shared by the threads of a parallel product).

use super::gemm::{Dst, Elem, Operand};
use gemm_common::microkernel::MicroKernelFn;
use std::any::TypeId;
use std::sync::OnceLock;

/// Kernel rows (in full tiles) up to which lhs is read in place rather than packed: the
/// `gemm` crate's threshold on x86.
const DIRECT_ROWS: usize = 128;

/// The most kernel columns (dst rows) of one block. The crate sizes them from the last-level
/// cache, which on a large server is hundreds of MiB: capped so that a block of lhs^T, in
/// every thread's slot, stays a few MiB.
const MAX_NC: usize = 4096;

/// A type the micro-kernels multiply (f32, f64), with this CPU's kernels for it.
pub(super) trait Native: Elem {
    /// The kernels and the blocking for this CPU.
    fn kernels() -> &'static Kernels<Self>;
    /// `x` in this type (a bf16 or f32 operand packed for f32 kernels).
    fn load<S: Elem>(x: S) -> Self;
}

/// One instruction set's micro-kernels for one type, and the block sizes for this CPU's
/// caches.
pub(super) struct Kernels<T: 'static> {
    /// Lanes of one vector.
    lanes: usize,
    /// Rows (a multiple of `lanes`) and columns of a full tile.
    mr: usize,
    nr: usize,
    /// The kernel for `ceil(rows / lanes) = i + 1` and `cols = j + 1`, at `i * nr + j`.
    ukr: &'static [MicroKernelFn<T>],
    /// The largest depth, kernel rows and kernel columns of one packed block.
    kc: usize,
    mc: usize,
    nc: usize,
}

impl<T> Kernels<T> {
    fn new<const NR: usize, const MD: usize>(
        lanes: usize,
        ukr: &'static [[MicroKernelFn<T>; NR]; MD],
    ) -> Kernels<T> {
        let (mr, nr) = (lanes * MD, NR);
        // The crate's blocking for a large product on this CPU's caches: the caps of every
        // block (a smaller product takes less).
        let big = 1 << 16;
        let p = gemm_common::cache::kernel_params(big, big, big, mr, nr, size_of::<T>());
        Kernels {
            lanes,
            mr,
            nr,
            ukr: ukr.as_flattened(),
            kc: p.kc.max(1),
            mc: p.mc.max(mr).next_multiple_of(mr),
            nc: p.nc.clamp(nr, MAX_NC).next_multiple_of(nr),
        }
    }
}

impl Native for f32 {
    fn kernels() -> &'static Kernels<f32> {
        static K: OnceLock<Kernels<f32>> = OnceLock::new();
        K.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use gemm_f32::microkernel as uk;
                if std::arch::is_x86_feature_detected!("avx512f") {
                    return Kernels::new(16, &uk::avx512f::f32::UKR);
                }
                if std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("avx2")
                {
                    return Kernels::new(8, &uk::fma::f32::UKR);
                }
            }
            Kernels::new(1, &gemm_f32::microkernel::scalar::f32::UKR)
        })
    }
    fn load<S: Elem>(x: S) -> f32 {
        x.to_f32()
    }
}

impl Native for f64 {
    fn kernels() -> &'static Kernels<f64> {
        static K: OnceLock<Kernels<f64>> = OnceLock::new();
        K.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use gemm_f64::microkernel as uk;
                if std::arch::is_x86_feature_detected!("avx512f") {
                    return Kernels::new(8, &uk::avx512f::f64::UKR);
                }
                if std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("avx2")
                {
                    return Kernels::new(4, &uk::fma::f64::UKR);
                }
            }
            Kernels::new(1, &gemm_f64::microkernel::scalar::f64::UKR)
        })
    }
    fn load<S: Elem>(x: S) -> f64 {
        x.to_f64()
    }
}

/// The blocks of one product: depth `kc`, `mc` kernel rows (dst columns) and `nc` kernel
/// columns (dst rows), each the CPU's cap or the product's own size if smaller.
#[derive(Clone, Copy)]
struct Blocking {
    kc: usize,
    mc: usize,
    nc: usize,
}

impl Blocking {
    /// For a product over `threads`: its kernel rows are cut into a multiple of `threads`
    /// blocks of about equal size, so that each thread packs and multiplies its own block of
    /// rhs^T against the shared lhs^T block (rather than every thread packing a block that
    /// they then split by panels: 256 x 512 x 512 on 2 threads went from 280 to 315 GFLOP/s).
    fn new<T>(kern: &Kernels<T>, (m, k, n): (usize, usize, usize), threads: usize) -> Blocking {
        let (mr, threads) = (kern.mr, threads.max(1));
        let tiles = n.max(1).div_ceil(mr);
        let blocks = tiles
            .div_ceil(kern.mc / mr)
            .next_multiple_of(threads)
            .min(tiles);
        Blocking {
            kc: kern.kc.min(k.max(1)),
            mc: tiles.div_ceil(blocks) * mr,
            nc: kern.nc.min(m.max(1).next_multiple_of(kern.nr)),
        }
    }

    /// Elements of the packed lhs^T block ([kc, nc]).
    fn lhs_elems(self) -> usize {
        self.kc * self.nc
    }

    /// Elements of the packed rhs^T block ([mc, kc]).
    fn rhs_elems(self) -> usize {
        self.mc * self.kc
    }
}

/// Rows and columns of the f32 tile a product into bf16 accumulates in ([`super::gemm`]'s
/// `via_f32`).
pub(super) const TILE_ROWS: usize = 256;
pub(super) const TILE_COLS: usize = 1024;

/// The bytes of a workspace, by part: what one call needs on a pool of some threads. The
/// shared lhs^T block comes first, then one slot per thread (its own lhs^T block, its rhs^T
/// block and its tile), then the partial results.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Need {
    /// A packed lhs^T block: the one a parallel product's threads share, and each thread's
    /// own for a single-threaded product (one of several running at once).
    pub lhs: usize,
    /// A thread's packed rhs^T block.
    pub rhs: usize,
    /// A thread's f32 tile, for a product into bf16.
    pub tile: usize,
    /// The partial results of a contraction split over the threads.
    pub partials: usize,
}

/// Rounds a part up to a cache line, so every part starts aligned for any element type.
fn line(bytes: usize) -> usize {
    bytes.next_multiple_of(64)
}

impl Need {
    /// What a product of `(m, k, n)` multiplied in `T` takes, into a bf16 dst when
    /// `bf16_dst` (through the f32 tile, so its blocks are the tile's at most).
    pub fn product<T: Native>((m, k, n): (usize, usize, usize), bf16_dst: bool) -> Need {
        let (m, n) = if bf16_dst {
            (m.min(TILE_ROWS), n.min(TILE_COLS))
        } else {
            (m, n)
        };
        let b = Blocking::new(T::kernels(), (m, k, n), 1);
        let e = size_of::<T>();
        Need {
            lhs: line(b.lhs_elems() * e),
            rhs: line(b.rhs_elems() * e),
            tile: if bf16_dst {
                line(TILE_ROWS * TILE_COLS * 4)
            } else {
                0
            },
            partials: 0,
        }
    }

    /// Each part the larger of the two.
    pub fn max(self, o: Need) -> Need {
        Need {
            lhs: self.lhs.max(o.lhs),
            rhs: self.rhs.max(o.rhs),
            tile: self.tile.max(o.tile),
            partials: self.partials.max(o.partials),
        }
    }

    /// The bytes of one thread's slot.
    fn slot(self) -> usize {
        self.lhs + self.rhs + self.tile
    }

    /// The bytes on a pool of `threads`.
    pub fn bytes(self, threads: usize) -> usize {
        self.lhs + threads.max(1) * self.slot() + line(self.partials)
    }
}

/// The memory the calls of a plan pack their operands into: allocated once (zeroed, 64-byte
/// aligned) for the pool it serves, reused by every call.
pub struct Workspace {
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: plain memory owned by the workspace; a call uses it only while it holds it mutably.
unsafe impl Send for Workspace {}

impl Workspace {
    /// A workspace of `bytes`, or `None` when that cannot be allocated.
    pub fn new(bytes: usize) -> Option<Workspace> {
        if bytes == 0 {
            return Some(Workspace {
                ptr: std::ptr::NonNull::<u64>::dangling().as_ptr().cast(),
                bytes: 0,
            });
        }
        let layout = std::alloc::Layout::from_size_align(bytes, 64).ok()?;
        // SAFETY: a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(Workspace { ptr, bytes })
    }

    /// Its size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The parts of a call that needs `need` on `threads` threads (which fit: the caller
    /// checked).
    pub(super) fn parts(&mut self, need: Need, threads: usize) -> Parts {
        debug_assert!(need.bytes(threads) <= self.bytes);
        Parts {
            base: self.ptr,
            need,
            threads: threads.max(1),
        }
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if self.bytes > 0 {
            // SAFETY: allocated in `new` with this layout.
            unsafe {
                std::alloc::dealloc(
                    self.ptr,
                    std::alloc::Layout::from_size_align_unchecked(self.bytes, 64),
                )
            }
        }
    }
}

/// A call's view of the workspace: where its shared block, each thread's slot and its
/// partial results are. Copied into the tasks of the call, which use disjoint parts.
#[derive(Clone, Copy)]
pub(super) struct Parts {
    base: *mut u8,
    need: Need,
    threads: usize,
}

// SAFETY: the tasks of one call use the shared block (packed once, then only read), the slot
// of the thread they run on, and disjoint partial results.
unsafe impl Send for Parts {}
// SAFETY: as for Send.
unsafe impl Sync for Parts {}

/// One thread's slot: its packed blocks and its f32 tile.
#[derive(Clone, Copy)]
pub(super) struct Slot {
    lhs: *mut u8,
    rhs: *mut u8,
    pub tile: *mut f32,
}

impl Parts {
    fn shared(self) -> *mut u8 {
        self.base
    }

    /// The slot of the pool thread running the caller (the first one off the pool: a call
    /// run on the caller's thread). A task uses its slot without blocking on another task,
    /// so a thread never runs two tasks over one slot at once.
    pub fn slot(self) -> Slot {
        let t = rayon::current_thread_index().unwrap_or(0) % self.threads;
        let n = self.need;
        // SAFETY: slot t lies inside the workspace, which holds `need.bytes(threads)`.
        unsafe {
            let s = self.base.add(n.lhs + t * n.slot());
            Slot {
                lhs: s,
                rhs: s.add(n.lhs),
                tile: s.add(n.lhs + n.rhs).cast(),
            }
        }
    }

    /// The partial results (`need.partials` bytes).
    pub fn partials<T>(self) -> *mut T {
        // SAFETY: the partials follow the slots, inside the workspace.
        unsafe {
            self.base
                .add(self.need.lhs + self.threads * self.need.slot())
                .cast()
        }
    }
}

/// A pointer that may cross to a pool thread (see [`product`]'s tasks).
#[derive(Clone, Copy)]
struct Ptr<T>(*mut T);
// SAFETY: the tasks of one product write disjoint parts of what it points to.
unsafe impl<T> Send for Ptr<T> {}
// SAFETY: as for Send.
unsafe impl<T> Sync for Ptr<T> {}

impl<T> Ptr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

/// Runs `f(part)` for parts `0..parts`, halving by `rayon::join` (no heap allocation).
fn each_part(parts: usize, first: usize, f: &(dyn Fn(usize) + Sync)) {
    if parts <= 1 {
        f(first);
        return;
    }
    let half = parts / 2;
    rayon::join(
        || each_part(half, first, f),
        || each_part(parts - half, first + half, f),
    );
}

/// `dst [m, n] = lhs [m, k] @ rhs [k, n]` (`+=` when dst accumulates), multiplied in `T`
/// with the operands converted as they are packed; over the current pool's threads when
/// `parallel` (the caller is inside the pool), else on the calling thread.
///
/// # Safety
/// As for [`super::gemm`]'s products, with k > 0; `parts` has room for
/// [`Need::product`] of these sizes (without the tile) on the current pool.
pub(super) unsafe fn product<A: Elem, B: Elem, T: Native>(
    (m, k, n): (usize, usize, usize),
    lhs: Operand<A>,
    rhs: Operand<B>,
    dst: Dst<T>,
    parallel: bool,
    parts: Parts,
) {
    let kern = T::kernels();
    let (mr, nr, lanes) = (kern.mr, kern.nr, kern.lanes);
    let threads = if parallel {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    let b = Blocking::new(kern, (m, k, n), threads);
    // Like the `gemm` crate: lhs rows of T, adjacent along the contraction, are read where
    // they lie unless the kernel rows are so many that a packed copy pays for itself.
    let direct = TypeId::of::<A>() == TypeId::of::<T>() && lhs.cs == 1 && n <= DIRECT_ROWS * mr;
    let own = parts.slot();
    // The lhs^T block: shared by a parallel product's threads, else the thread's own.
    let lhs_block = Ptr(if parallel { parts.shared() } else { own.lhs }.cast::<T>());
    let (lhs_s, rhs_s, dst_s) = (
        Ptr(lhs.ptr.cast_mut()),
        Ptr(rhs.ptr.cast_mut()),
        Ptr(dst.ptr),
    );
    for jc in (0..m).step_by(b.nc) {
        let nb = b.nc.min(m - jc);
        let panels = nb.div_ceil(nr);
        for pc in (0..k).step_by(b.kc) {
            let kt = b.kc.min(k - pc);
            let overwrite = pc == 0 && !dst.accumulate;
            let pack_lhs = |part: usize| {
                let lhs = Operand {
                    ptr: lhs_s.get().cast_const(),
                    ..lhs
                };
                let (r0, r1) = (part * panels / threads, (part + 1) * panels / threads);
                for r in r0..r1 {
                    let j = jc + r * nr;
                    // SAFETY: rows j.. (at most nr, within m) and columns pc..pc + kt of lhs;
                    // panel r of the block, written by this part alone.
                    unsafe {
                        pack_lhs_panel(
                            lhs,
                            (j, nr.min(m - j)),
                            (pc, kt),
                            nr,
                            lhs_block.get().add(r * nr * kt),
                        )
                    };
                }
            };
            let m_blocks = n.div_ceil(b.mc);
            let jobs = m_blocks * panels;
            let compute = |part: usize| {
                let rhs = Operand {
                    ptr: rhs_s.get().cast_const(),
                    ..rhs
                };
                let rhs_block = parts.slot().rhs.cast::<T>();
                let mut packed = usize::MAX;
                let (j0, j1) = (part * jobs / threads, (part + 1) * jobs / threads);
                for job in j0..j1 {
                    let (ib, r) = (job / panels, job % panels);
                    let i0 = ib * b.mc;
                    let mb = b.mc.min(n - i0);
                    if packed != ib {
                        // SAFETY: columns i0..i0 + mb (within n) and rows pc..pc + kt of
                        // rhs, into this thread's slot.
                        unsafe { pack_rhs_block(rhs, (i0, mb), (pc, kt), mr, rhs_block) };
                        packed = ib;
                    }
                    let j = jc + r * nr;
                    let nj = nr.min(m - j);
                    // The lhs^T panel: packed (nr apart per step), or lhs's rows in place.
                    let (panel, panel_rs, panel_cs) = if direct {
                        // SAFETY: row j, column pc of lhs is inside it.
                        let at = unsafe { lhs_s.get().offset(j as isize * lhs.rs + pc as isize) };
                        (at.cast::<T>().cast_const(), 1, lhs.rs)
                    } else {
                        // SAFETY: panel r of the packed block.
                        (
                            unsafe { lhs_block.get().add(r * nr * kt) }.cast_const(),
                            nr as isize,
                            1,
                        )
                    };
                    for q in 0..mb.div_ceil(mr) {
                        let i = i0 + q * mr;
                        let mi = mr.min(n - i);
                        let ukr = kern.ukr[(mi.div_ceil(lanes) - 1) * nr + nj - 1];
                        // SAFETY: the tile [mi, nj] of dst^T at (i, j) is dst's rows j..j + nj,
                        // columns i..i + mi, written by this job alone; the panels hold kt
                        // steps of mr and nr elements (zero-padded).
                        unsafe {
                            ukr(
                                mi,
                                nj,
                                kt,
                                dst_s.get().offset(j as isize * dst.rs + i as isize),
                                rhs_block.add(q * mr * kt),
                                panel,
                                dst.rs,
                                1,
                                mr as isize,
                                panel_rs,
                                panel_cs,
                                T::ONE,
                                T::ONE,
                                if overwrite { 0 } else { 1 },
                                false,
                                false,
                                false,
                                std::ptr::null(),
                            )
                        };
                    }
                }
            };
            if !direct {
                each_part(threads, 0, &pack_lhs);
            }
            each_part(threads, 0, &compute);
        }
    }
}

/// Packs rows `j..j + rows` (at most `nr`) and columns `p0..p0 + kt` of lhs, converted to
/// T, as one panel of lhs^T: `out[p * nr + jj] = lhs[j + jj, p0 + p]`, zero past `rows`.
///
/// # Safety
/// The block is inside lhs; `out` holds `kt * nr` writable elements.
unsafe fn pack_lhs_panel<A: Elem, T: Native>(
    lhs: Operand<A>,
    (j, rows): (usize, usize),
    (p0, kt): (usize, usize),
    nr: usize,
    out: *mut T,
) {
    // SAFETY: the caller's contract.
    unsafe {
        let out = std::slice::from_raw_parts_mut(out, kt * nr);
        let at = |jj: usize, p: usize| {
            *lhs.ptr
                .offset((j + jj) as isize * lhs.rs + (p0 + p) as isize * lhs.cs)
        };
        if lhs.rs == 1 && lhs.cs != 1 {
            // Rows adjacent (a transposed view): read along the rows.
            for (p, o) in out.chunks_exact_mut(nr).enumerate() {
                for (jj, x) in o.iter_mut().enumerate() {
                    *x = if jj < rows {
                        T::load(at(jj, p))
                    } else {
                        T::ZERO
                    };
                }
            }
        } else {
            for jj in 0..nr {
                for p in 0..kt {
                    out[p * nr + jj] = if jj < rows {
                        T::load(at(jj, p))
                    } else {
                        T::ZERO
                    };
                }
            }
        }
    }
}

/// Packs columns `i0..i0 + cols` and rows `p0..p0 + kt` of rhs, converted to T, as panels of
/// `mr` rows of rhs^T: panel q holds `out[q * mr * kt + p * mr + ii] = rhs[p0 + p, i0 + q * mr
/// + ii]`, zero past `cols`.
///
/// # Safety
/// The block is inside rhs; `out` holds `cols.next_multiple_of(mr) * kt` writable elements.
unsafe fn pack_rhs_block<B: Elem, T: Native>(
    rhs: Operand<B>,
    (i0, cols): (usize, usize),
    (p0, kt): (usize, usize),
    mr: usize,
    out: *mut T,
) {
    let panels = cols.div_ceil(mr);
    // SAFETY: the caller's contract.
    unsafe {
        let out = std::slice::from_raw_parts_mut(out, panels * mr * kt);
        for (q, panel) in out.chunks_exact_mut(mr * kt).enumerate() {
            let i = i0 + q * mr;
            let width = mr.min(i0 + cols - i);
            let base = rhs.ptr.offset(i as isize * rhs.cs + p0 as isize * rhs.rs);
            if rhs.cs == 1 {
                // Columns adjacent (row-major): each step's mr elements are contiguous.
                for (p, o) in panel.chunks_exact_mut(mr).enumerate() {
                    let src = std::slice::from_raw_parts(base.offset(p as isize * rhs.rs), width);
                    for (x, &s) in o.iter_mut().zip(src) {
                        *x = T::load(s);
                    }
                    o[width..].fill(T::ZERO);
                }
            } else {
                // Columns of rhs adjacent along the contraction (a transposed view, the
                // grouped gradient's w_e^T): f32 blocks of 8 x 8 transposed in registers.
                let (done_ii, done_p) = if rhs.rs == 1 {
                    transpose_f32(base, rhs.cs, (width, kt), mr, panel.as_mut_ptr())
                } else {
                    (0, 0)
                };
                for ii in 0..mr {
                    if ii >= width {
                        for p in 0..kt {
                            panel[p * mr + ii] = T::ZERO;
                        }
                        continue;
                    }
                    let col = base.offset(ii as isize * rhs.cs);
                    let from = if ii < done_ii { done_p } else { 0 };
                    for p in from..kt {
                        panel[p * mr + ii] = T::load(*col.offset(p as isize * rhs.rs));
                    }
                }
            }
        }
    }
}

/// Writes `out[p * mr + ii] = src[ii * cs + p]` for the whole 8 x 8 blocks of `ii < cols`,
/// `p < kt`, when the operand and the packed type are both f32 and the CPU has AVX; returns
/// the columns and steps done (the rest is the caller's: every `ii` from `.0` on, and every
/// `p` from `.1` on for the others). A scalar transpose costs a load and a store per element,
/// a third of the grouped gradient's time; eight loads, 24 shuffles and eight stores per 64
/// elements do it in well under half.
///
/// # Safety
/// `src` points at `cols` rows of `kt` elements, `cs` apart; `out` holds `kt * mr` elements.
#[allow(unused_variables)]
unsafe fn transpose_f32<B: 'static, T: 'static>(
    src: *const B,
    cs: isize,
    (cols, kt): (usize, usize),
    mr: usize,
    out: *mut T,
) -> (usize, usize) {
    #[cfg(target_arch = "x86_64")]
    if TypeId::of::<B>() == TypeId::of::<f32>()
        && TypeId::of::<T>() == TypeId::of::<f32>()
        && std::arch::is_x86_feature_detected!("avx")
    {
        let (ci, cp) = (cols / 8 * 8, kt / 8 * 8);
        for ii in (0..ci).step_by(8) {
            for p in (0..cp).step_by(8) {
                // SAFETY: rows ii..ii + 8 (< cols) at steps p..p + 8 (< kt) of src, and
                // out's steps p..p + 8 at columns ii..ii + 8 (< mr); AVX is present.
                unsafe {
                    transpose_8x8(
                        src.cast::<f32>().offset(ii as isize * cs + p as isize),
                        cs,
                        out.cast::<f32>().add(p * mr + ii),
                        mr,
                    )
                };
            }
        }
        return (ci, cp);
    }
    (0, 0)
}

/// `dst[q * dst_stride + r] = src[r * src_stride + q]` for r, q < 8.
///
/// # Safety
/// The 8 rows of 8 f32 at `src` are readable, those at `dst` writable; AVX is present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_8x8(src: *const f32, src_stride: isize, dst: *mut f32, dst_stride: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    unsafe {
        let row = |r: isize| _mm256_loadu_ps(src.offset(r * src_stride));
        let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
        let (r4, r5, r6, r7) = (row(4), row(5), row(6), row(7));
        // Pairs of rows interleaved, then quads: s_c holds columns c and c + 4 of rows 0-3
        // (low half) or 4-7.
        let (t0, t1) = (_mm256_unpacklo_ps(r0, r1), _mm256_unpackhi_ps(r0, r1));
        let (t2, t3) = (_mm256_unpacklo_ps(r2, r3), _mm256_unpackhi_ps(r2, r3));
        let (t4, t5) = (_mm256_unpacklo_ps(r4, r5), _mm256_unpackhi_ps(r4, r5));
        let (t6, t7) = (_mm256_unpacklo_ps(r6, r7), _mm256_unpackhi_ps(r6, r7));
        let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let put = |q: usize, v| _mm256_storeu_ps(dst.add(q * dst_stride), v);
        put(0, _mm256_permute2f128_ps::<0x20>(s0, s4));
        put(1, _mm256_permute2f128_ps::<0x20>(s1, s5));
        put(2, _mm256_permute2f128_ps::<0x20>(s2, s6));
        put(3, _mm256_permute2f128_ps::<0x20>(s3, s7));
        put(4, _mm256_permute2f128_ps::<0x31>(s0, s4));
        put(5, _mm256_permute2f128_ps::<0x31>(s1, s5));
        put(6, _mm256_permute2f128_ps::<0x31>(s2, s6));
        put(7, _mm256_permute2f128_ps::<0x31>(s3, s7));
    }
}
