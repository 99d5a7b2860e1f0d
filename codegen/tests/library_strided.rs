//! The strided GEMM library call (`LibraryCall::Gemm`, the products inside fused ops) against
//! a plain triple loop in f64: views at offsets inside larger buffers, operands transposed in
//! place, an output with padded rows (the padding left as it was), accumulation, an empty
//! contraction, the long-contraction split over threads, on 1 and 2 threads, f32 and f64.
//! Views that leave their buffer, or an output whose elements repeat, are refused before
//! anything is written.
//!
//! Tolerance: the dot-product bound `gamma(k) (|A| |B|)_ij` (plus the rounding of the sum
//! with what an accumulating output held), as in `library_gemm.rs`.

use mmc_codegen::library::{Float, Gemm, LibraryCall, LibraryError, View};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool")
}

/// One problem: sizes, views, buffer lengths and whether it accumulates.
#[derive(Clone, Copy, Debug)]
struct Problem {
    mkn: (usize, usize, usize),
    lhs: View,
    rhs: View,
    dst: View,
    lens: [usize; 3],
    accumulate: bool,
}

impl Problem {
    fn call(&self, dtype: Float) -> Gemm {
        let (m, k, n) = self.mkn;
        Gemm {
            dtype,
            m,
            k,
            n,
            lhs: self.lhs,
            rhs: self.rhs,
            dst: self.dst,
            lens: self.lens,
            accumulate: self.accumulate,
        }
    }
}

fn at(v: View, i: usize, j: usize) -> usize {
    v.offset + i * v.row_stride + j * v.col_stride
}

/// Buffer contents in f64 (values the dtype represents exactly).
fn random(rng: &mut ChaCha8Rng, len: usize, dtype: Float) -> Vec<f64> {
    (0..len)
        .map(|_| {
            let x: f64 = rng.random_range(-1.0..1.0);
            match dtype {
                Float::F32 => f64::from(x as f32),
                Float::F64 => x,
            }
        })
        .collect()
}

/// Runs the call over buffers holding `bufs` in its dtype; returns dst as f64, or the error.
fn run(
    call: &Gemm,
    bufs: &[Vec<f64>; 3],
    threads: usize,
) -> Result<Vec<f64>, (LibraryError, bool)> {
    let call_ = LibraryCall::Gemm(call.clone());
    let result = |r: Result<(), LibraryError>, dst_changed: bool| r.map_err(|e| (e, dst_changed));
    match call.dtype {
        Float::F32 => {
            let mut b: Vec<Vec<f32>> = bufs
                .iter()
                .map(|v| v.iter().map(|&x| x as f32).collect())
                .collect();
            let before = b[2].clone();
            let ptrs: Vec<*mut u8> = b.iter_mut().map(|v| v.as_mut_ptr().cast()).collect();
            // SAFETY: the buffers hold the call's lens elements of f32.
            let r = unsafe { call_.execute(&ptrs, &pool(threads)) };
            let changed = b[2] != before;
            result(r, changed)?;
            Ok(b[2].iter().map(|&x| f64::from(x)).collect())
        }
        Float::F64 => {
            let mut b = bufs.clone();
            let before = b[2].clone();
            let ptrs: Vec<*mut u8> = b.iter_mut().map(|v| v.as_mut_ptr().cast()).collect();
            // SAFETY: as above, f64.
            let r = unsafe { call_.execute(&ptrs, &pool(threads)) };
            let changed = b[2] != before;
            result(r, changed)?;
            Ok(b[2].clone())
        }
    }
}

/// Checks one problem on both dtypes and thread counts against the triple loop.
fn check(p: Problem, seed: u64) {
    let (m, k, n) = p.mkn;
    for dtype in [Float::F32, Float::F64] {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bufs = [
            random(&mut rng, p.lens[0], dtype),
            random(&mut rng, p.lens[1], dtype),
            random(&mut rng, p.lens[2], dtype),
        ];
        let u = match dtype {
            Float::F32 => f64::from(f32::EPSILON) / 2.0,
            Float::F64 => f64::EPSILON / 2.0,
        };
        let gamma = |k: usize| k as f64 * u / (1.0 - k as f64 * u);
        let mut want = bufs[2].clone();
        let mut bound = vec![0.0; p.lens[2]];
        let mut in_dst = vec![false; p.lens[2]];
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut a) = (0.0, 0.0);
                for c in 0..k {
                    let x = bufs[0][at(p.lhs, i, c)] * bufs[1][at(p.rhs, c, j)];
                    s += x;
                    a += x.abs();
                }
                let d = at(p.dst, i, j);
                in_dst[d] = true;
                let prior = if p.accumulate { bufs[2][d] } else { 0.0 };
                want[d] = prior + s;
                bound[d] = gamma(k + 1) * (a + prior.abs());
            }
        }
        for threads in [1, 2] {
            let got =
                run(&p.call(dtype), &bufs, threads).unwrap_or_else(|(e, _)| panic!("{p:?}: {e}"));
            for (e, ((g, w), b)) in got.iter().zip(&want).zip(&bound).enumerate() {
                if in_dst[e] {
                    assert!(
                        (g - w).abs() <= *b,
                        "{dtype:?} {p:?} on {threads} thread(s): element {e} is {g}, want {w} (bound {b})"
                    );
                } else {
                    assert_eq!(g, w, "{dtype:?} {p:?}: element {e} outside dst was written");
                }
            }
        }
    }
}

#[test]
fn views_transposes_and_padding() {
    let (m, k, n) = (7, 33, 13);
    // Row-major operands at offsets, dst rows padded to 16 and offset.
    check(
        Problem {
            mkn: (m, k, n),
            lhs: View::rows(5, k),
            rhs: View::rows(3, n),
            dst: View {
                offset: 2,
                row_stride: 16,
                col_stride: 1,
            },
            lens: [5 + m * k, 3 + k * n + 4, 2 + m * 16],
            accumulate: false,
        },
        1,
    );
    // Both operands transposed in place (lhs stored [k, m], rhs stored [n, k]).
    check(
        Problem {
            mkn: (m, k, n),
            lhs: View::transposed(0, m),
            rhs: View::transposed(k, k),
            dst: View::rows(0, n),
            lens: [k * m, k + n * k, m * n],
            accumulate: false,
        },
        2,
    );
}

#[test]
fn accumulation_adds_to_what_dst_holds() {
    for (m, k, n) in [(9, 17, 130), (130, 1, 7), (1, 40, 1)] {
        check(
            Problem {
                mkn: (m, k, n),
                lhs: View::transposed(0, m),
                rhs: View::rows(0, n),
                dst: View::rows(0, n),
                lens: [k * m, k * n, m * n],
                accumulate: true,
            },
            3,
        );
    }
}

#[test]
fn pooled_products_and_the_long_contraction_split() {
    // Large enough for the pool; the second and third have k >= 4 max(m, n), which splits
    // the contraction over the threads (the cross-entropy's dh shape).
    for (mkn, accumulate) in [
        ((130, 257, 140), false),
        ((16, 4099, 15), false),
        ((16, 4099, 15), true),
    ] {
        let (m, k, n) = mkn;
        check(
            Problem {
                mkn,
                lhs: View::rows(0, k),
                rhs: View::rows(n, n),
                dst: View {
                    offset: 1,
                    row_stride: n + 3,
                    col_stride: 1,
                },
                lens: [m * k, n + k * n, 1 + m * (n + 3)],
                accumulate,
            },
            4,
        );
    }
}

#[test]
fn an_empty_contraction_zeroes_or_keeps_dst() {
    for accumulate in [false, true] {
        check(
            Problem {
                mkn: (3, 0, 5),
                lhs: View::rows(0, 0),
                rhs: View::rows(0, 5),
                dst: View::rows(0, 5),
                lens: [0, 0, 15],
                accumulate,
            },
            5,
        );
    }
}

#[test]
fn views_outside_their_buffers_are_refused_unwritten() {
    let good = Problem {
        mkn: (4, 6, 5),
        lhs: View::rows(0, 6),
        rhs: View::rows(0, 5),
        dst: View::rows(0, 5),
        lens: [24, 30, 20],
        accumulate: false,
    };
    let mut bad = Vec::new();
    // One element too far, for each buffer in turn.
    for b in 0..3 {
        let mut p = good;
        p.lens[b] -= 1;
        bad.push((p, ["lhs", "rhs", "dst"][b]));
    }
    let mut p = good;
    p.rhs.offset = 1;
    bad.push((p, "rhs"));
    // dst rows that overlap (stride below n), and a column stride other than 1.
    let mut p = good;
    p.dst.row_stride = 4;
    bad.push((p, "dst"));
    let mut p = good;
    p.dst = View::transposed(0, 4);
    bad.push((p, "dst"));
    // Offsets that overflow.
    let mut p = good;
    p.lhs.offset = usize::MAX - 2;
    bad.push((p, "lhs"));
    for (p, what) in bad {
        let call = p.call(Float::F32);
        match call.check() {
            Err(LibraryError::View { what: w, .. }) => assert_eq!(w, what, "{p:?}"),
            other => panic!("{p:?}: {other:?}"),
        }
        // The buffers are as long as the good call needs, so a run would not fault.
        let bufs = [vec![1.0; 24], vec![1.0; 30], vec![7.0; 20]];
        match run(&call, &bufs, 2) {
            Err((LibraryError::View { .. }, changed)) => assert!(!changed, "{p:?} wrote dst"),
            other => panic!("{p:?} ran: {:?}", other.map(|_| ())),
        }
    }
    assert_eq!(good.call(Float::F32).check(), Ok(()));
}
