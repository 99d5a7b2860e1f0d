//! The strided GEMM library call (`LibraryCall::Gemm`, the products inside fused ops) against
//! a plain triple loop in f64: views at offsets inside larger buffers, operands transposed in
//! place, an output with padded rows (the padding left as it was), accumulation, an empty
//! contraction, the long-contraction split over threads, on 1 and 2 threads, f32, f64, bf16
//! and bf16 mixed with f32 (products in f32 over converted blocks, several blocks deep and
//! wide).
//! Views that leave their buffer, or an output whose elements repeat, are refused before
//! anything is written.
//!
//! Tolerance: the dot-product bound `gamma(k) (|A| |B|)_ij` (plus the rounding of the sum
//! with what an accumulating output held), as in `library_gemm.rs`.

use mmc_codegen::library::{Float, Gemm, LibraryCall, LibraryError, View, Workspace};
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
    fn call(&self, dtypes: [Float; 3]) -> Gemm {
        let (m, k, n) = self.mkn;
        Gemm {
            dtypes,
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

/// `x` as the nearest value of `dtype`.
fn exact(x: f64, dtype: Float) -> f64 {
    match dtype {
        Float::F32 => f64::from(x as f32),
        Float::F64 => x,
        Float::BF16 => half::bf16::from_f64(x).to_f64(),
    }
}

/// Buffer contents in f64 (values the dtype represents exactly).
fn random(rng: &mut ChaCha8Rng, len: usize, dtype: Float) -> Vec<f64> {
    (0..len)
        .map(|_| exact(rng.random_range(-1.0..1.0), dtype))
        .collect()
}

/// `v` stored in `dtype`, in 8-byte words (aligned for every dtype).
fn store(v: &[f64], dtype: Float) -> Vec<u64> {
    let bytes: Vec<u8> = match dtype {
        Float::F32 => v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
        Float::F64 => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        Float::BF16 => v
            .iter()
            .flat_map(|&x| half::bf16::from_f64(x).to_le_bytes())
            .collect(),
    };
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    for (i, b) in bytes.iter().enumerate() {
        words[i / 8] |= u64::from(*b) << (8 * (i % 8));
    }
    words
}

/// The `len` values of `dtype` in `words`, as f64.
fn load(words: &[u64], len: usize, dtype: Float) -> Vec<f64> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    (0..len)
        .map(|i| match dtype {
            Float::F32 => f64::from(f32::from_le_bytes(
                bytes[4 * i..4 * i + 4].try_into().expect("4 bytes"),
            )),
            Float::F64 => f64::from_le_bytes(bytes[8 * i..8 * i + 8].try_into().expect("8 bytes")),
            Float::BF16 => half::bf16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f64(),
        })
        .collect()
}

/// Runs the call over buffers holding `bufs` in its dtypes; returns dst as f64, or the error
/// and whether dst changed.
fn run(
    call: &Gemm,
    bufs: &[Vec<f64>; 3],
    threads: usize,
) -> Result<Vec<f64>, (LibraryError, bool)> {
    let call_ = LibraryCall::Gemm(call.clone());
    let mut b: Vec<Vec<u64>> = bufs
        .iter()
        .zip(call.dtypes)
        .map(|(v, d)| store(v, d))
        .collect();
    let before = b[2].clone();
    let ptrs: Vec<*mut u8> = b.iter_mut().map(|v| v.as_mut_ptr().cast()).collect();
    // SAFETY: the buffers hold the call's lens elements of its dtypes, 8-byte aligned.
    let mut ws = Workspace::new(call_.workspace_bytes(threads)).expect("a workspace");
    let r = unsafe { call_.execute(&ptrs, &mut ws, &pool(threads)) };
    let changed = b[2] != before;
    r.map_err(|e| (e, changed))?;
    Ok(load(&b[2], bufs[2].len(), call.dtypes[2]))
}

use Float::{BF16 as H, F32 as S, F64 as D};

/// The dtype combinations checked: each of the library's own, and bf16 with f32 (a bf16
/// model's products and its f32 logits and sums).
const DTYPES: [[Float; 3]; 7] = [
    [S, S, S],
    [D, D, D],
    [H, H, H],
    [H, H, S],
    [S, H, H],
    [S, H, S],
    [H, S, H],
];

/// Unit roundoff of `d`.
fn unit(d: Float) -> f64 {
    match d {
        Float::F32 => f64::from(f32::EPSILON) / 2.0,
        Float::F64 => f64::EPSILON / 2.0,
        Float::BF16 => 2f64.powi(-8),
    }
}

/// Checks one problem on every dtype combination and both thread counts against the triple
/// loop: within the dot-product bound of the accumulator (f32 for bf16), plus one rounding
/// of the result to dst's type.
fn check(p: Problem, seed: u64) {
    let (m, k, n) = p.mkn;
    for dtypes in DTYPES {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bufs = [
            random(&mut rng, p.lens[0], dtypes[0]),
            random(&mut rng, p.lens[1], dtypes[1]),
            random(&mut rng, p.lens[2], dtypes[2]),
        ];
        let acc = if dtypes[2] == D { D } else { S };
        let u = unit(acc);
        let gamma = |k: usize| k as f64 * u / (1.0 - k as f64 * u);
        let last = if dtypes[2] == acc {
            0.0
        } else {
            unit(dtypes[2])
        };
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
                let acc_err = gamma(k + 1) * (a + prior.abs());
                bound[d] = acc_err + last * ((prior + s).abs() + acc_err);
            }
        }
        for threads in [1, 2] {
            let got =
                run(&p.call(dtypes), &bufs, threads).unwrap_or_else(|(e, _)| panic!("{p:?}: {e}"));
            for (e, ((g, w), b)) in got.iter().zip(&want).zip(&bound).enumerate() {
                if in_dst[e] {
                    assert!(
                        (g - w).abs() <= *b,
                        "{dtypes:?} {p:?} on {threads} thread(s): element {e} is {g}, want {w} (bound {b})"
                    );
                } else {
                    assert_eq!(
                        g, w,
                        "{dtypes:?} {p:?}: element {e} outside dst was written"
                    );
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
        let call = p.call([S; 3]);
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
    assert_eq!(good.call([S; 3]).check(), Ok(()));
    // f64 does not mix with the narrower types.
    for dtypes in [[D, D, S], [H, D, D]] {
        match good.call(dtypes).check() {
            Err(LibraryError::View { what: "dtypes", .. }) => {}
            other => panic!("{dtypes:?}: {other:?}"),
        }
    }
}

#[test]
fn converted_products_span_several_tiles_and_blocks() {
    // More rows and columns than one f32 tile (256 x 1024) of the bf16 path and more
    // contraction than one packed block (512 deep on the CPUs measured), so its tiles, its blocks and
    // their f32 accumulation all take part;
    // transposed and row-major operands, accumulating and not.
    for (mkn, accumulate) in [((1100, 600, 70), false), ((20, 2100, 1030), true)] {
        let (m, k, n) = mkn;
        check(
            Problem {
                mkn,
                lhs: View::transposed(0, m),
                rhs: View::rows(0, n),
                dst: View::rows(0, n),
                lens: [k * m, k * n, m * n],
                accumulate,
            },
            6,
        );
        check(
            Problem {
                mkn,
                lhs: View::rows(0, k),
                rhs: View::transposed(0, k),
                dst: View::rows(0, n),
                lens: [m * k, n * k, m * n],
                accumulate,
            },
            7,
        );
    }
}
