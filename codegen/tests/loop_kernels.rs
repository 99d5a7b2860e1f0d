//! Loop kernels: the control flow and index arithmetic of the loop form on hand-written
//! kernels, a checked access refusing an index out of range, the verifier refusing ill-typed
//! bodies, and the node lowerings of `mmc_codegen::ops` against the interpreter.

mod common;

use common::{check, pool, random};
use mmc_codegen::cpu::{build_library, CpuTarget};
use mmc_codegen::kernel::GeneratedKernel;
use mmc_codegen::loops::{cst, idx, load, load_checked, select, LoopBuilder};
use mmc_codegen::native::{KernelLibrary, NativeError};
use mmc_ir::{DType, FusedOp, Op};

fn run(
    k: mmc_codegen::loops::LoopKernel,
    bufs: &mut [Vec<u8>],
    threads: usize,
) -> Result<(), NativeError> {
    let k = GeneratedKernel::from(k);
    let dir = tempfile::tempdir().expect("a temporary folder");
    let so = dir.path().join("k.so");
    let hash = build_library(std::slice::from_ref(&k), &CpuTarget::host(), &so).expect("builds");
    // SAFETY: just built.
    let lib = unsafe { KernelLibrary::load(&so, &hash, vec![k]) }.expect("loads");
    let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
    // SAFETY: the buffers have the kernels' sizes.
    unsafe { lib.launch(0, &ptrs, &pool(threads)) }
}

fn i64s(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn to_i64s(b: &[u8]) -> Vec<i64> {
    b.chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// A per-row running maximum with its position (a loop, a conditional and a select), a row
/// sum in reverse by index arithmetic, over 7 rows of 5 in tiles of 2 rows (the last partial).
#[test]
fn loops_conditionals_and_index_arithmetic_compute_what_they_say() {
    let (rows, n) = (7usize, 5usize);
    let mut k = LoopBuilder::new("argmax_rows", rows, 2);
    let x = k.read(DType::I64, &[rows, n]);
    let out = k.write(DType::I64, &[rows, 3]);
    let base = k.item() * idx(n);
    let best = k.var(DType::I64, load(x, base.clone()));
    let at = k.var(DType::I64, idx(0));
    let rev = k.var(DType::I64, idx(0));
    k.for_(idx(1), idx(n), |k, j| {
        let v = load(x, base.clone() + j.clone());
        k.if_(v.clone().cmp(mmc_ir::CmpOp::Gt, best.val()), |k| {
            k.set(best, v);
            k.set(at, j.clone());
        });
    });
    k.for_(idx(0), idx(n), |k, j| {
        // Element n-1-j, reached through a division and a remainder of the flat index.
        let flat = base.clone() + idx(n - 1) - j;
        let row = flat.clone().idiv(idx(n));
        let col = flat.irem(idx(n));
        let v = load(x, row * idx(n) + col);
        k.set(rev, rev.val() + select(v.clone().lt(idx(0)), -v.clone(), v));
    });
    let o = k.item() * idx(3);
    k.store(out, o.clone(), best.val());
    k.store(out, o.clone() + idx(1), at.val());
    k.store(out, o + idx(2), rev.val());
    let k = k.finish().expect("verifies");
    let data: Vec<i64> = (0..(rows * n) as i64).map(|i| (i * 37 % 11) - 5).collect();
    for threads in [1, 2] {
        let mut bufs = vec![i64s(&data), vec![0xEE; rows * 3 * 8]];
        run(k.clone(), &mut bufs, threads).expect("runs");
        let got = to_i64s(&bufs[1]);
        for r in 0..rows {
            let row = &data[r * n..(r + 1) * n];
            let (mut b, mut a) = (row[0], 0);
            for (j, &v) in row.iter().enumerate().skip(1) {
                if v > b {
                    (b, a) = (v, j as i64);
                }
            }
            let s: i64 = row.iter().map(|v| v.abs()).sum();
            assert_eq!(
                &got[r * 3..r * 3 + 3],
                &[b, a, s],
                "row {r} on {threads} threads"
            );
        }
    }
}

/// A gather by data (token ids) checks its index: an id out of range stops the kernel with an
/// error naming the buffer, and nothing is written past the buffer.
#[test]
fn a_checked_load_out_of_range_is_an_error_not_a_read() {
    let (vocab, tokens) = (4usize, 6usize);
    let mut k = LoopBuilder::new("gather_rows", tokens, 1);
    let table = k.read(DType::I64, &[vocab]);
    let ids = k.read(DType::I64, &[tokens]);
    let out = k.write(DType::I64, &[tokens]);
    let id = load(ids, k.item());
    k.store(out, k.item(), load_checked(table, id));
    let k = k.finish().expect("verifies");
    let table_v = i64s(&[10, 11, 12, 13]);
    let mut ok = vec![
        table_v.clone(),
        i64s(&[3, 0, 1, 2, 3, 0]),
        vec![0; tokens * 8],
    ];
    run(k.clone(), &mut ok, 2).expect("in range");
    assert_eq!(to_i64s(&ok[2]), vec![13, 10, 11, 12, 13, 10]);
    for bad in [4i64, -1, i64::MAX] {
        let mut bufs = vec![
            table_v.clone(),
            i64s(&[0, 1, bad, 2, 3, 0]),
            vec![0; tokens * 8],
        ];
        let e = run(k.clone(), &mut bufs, 1).expect_err("an id out of range is refused");
        assert!(
            matches!(&e, NativeError::OutOfRange { buffer: 0, .. }),
            "{bad}: {e}"
        );
        assert!(e.to_string().contains("gather_rows"), "{e}");
    }
}

/// The verifier refuses a store of the wrong dtype, a store to a read buffer, a float index,
/// and a division by a value that is not a positive constant.
#[test]
fn ill_typed_loop_kernels_are_refused() {
    let mk = |f: &dyn Fn(&mut LoopBuilder, usize, usize)| {
        let mut k = LoopBuilder::new("bad", 4, 1);
        let r = k.read(DType::F32, &[4]);
        let w = k.write(DType::F32, &[4]);
        f(&mut k, r, w);
        k.finish()
    };
    assert!(mk(&|k, r, w| k.store(w, k.item(), load(r, k.item()))).is_ok());
    type Body = Box<dyn Fn(&mut LoopBuilder, usize, usize)>;
    let cases: Vec<(&str, Body)> = vec![
        (
            "stored to",
            Box::new(|k, _, w| k.store(w, k.item(), cst(1.0, DType::F64))),
        ),
        (
            "read-only",
            Box::new(|k, r, _| k.store(r, k.item(), cst(1.0, DType::F32))),
        ),
        (
            "index of type",
            Box::new(|k, r, w| k.store(w, k.item(), load(r, cst(0.0, DType::F32)))),
        ),
        (
            "positive constant",
            Box::new(|k, r, w| {
                let i = k.item();
                k.store(w, i.clone().idiv(i.clone()), load(r, i))
            }),
        ),
    ];
    for (want, f) in cases {
        let e = mk(&*f).expect_err(want);
        assert!(e.to_string().contains(want), "{want}: {e}");
    }
}

/// RMSNorm rows of 4,100 (past one tile of work, no multiple of a vector), and short rows
/// packed many to a tile, f32 and f64.
#[test]
fn rms_norm_matches_the_interpreter() {
    for (shape, d) in [
        (vec![3usize, 4100], DType::F32),
        (vec![2, 37, 9], DType::F32),
        (vec![5, 33], DType::F64),
    ] {
        let n = *shape.last().unwrap();
        let x = random(d, &shape, 1);
        let w = random(d, &[n], 2);
        let tol = if d == DType::F32 { 1e-7 } else { 1e-14 };
        check(Op::Fused(FusedOp::RmsNorm { eps: 1e-6 }), &[x, w], tol);
    }
}

/// The approximate f32 exponential (`exp~`, for softmax sums) within 4 units in the last
/// place of the exact one wherever the result is a normal f32, right at the extremes (0 far
/// below, infinity above, NaN through), and the accumulation it feeds summed in any order
/// still gives the sum within f64 rounding.
#[test]
fn the_approximate_exp_and_accumulation() {
    let mut xs: Vec<f32> = (0..20001)
        .map(|i| -104.0 + i as f32 * (193.0 / 20000.0))
        .collect();
    xs.extend([
        0.0,
        -0.0,
        1e-30,
        -1e-30,
        88.72,
        88.73,
        -87.33,
        -103.9,
        -200.0,
        200.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ]);
    let n = xs.len();
    let mut k = LoopBuilder::new("exp_approx", n, 1024);
    let bx = k.read(DType::F32, &[n]);
    let by = k.write(DType::F32, &[n]);
    k.store(by, k.item(), load(bx, k.item()).exp_approx());
    let mut bufs = vec![
        xs.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
        vec![0u8; 4 * n],
    ];
    run(k.finish().expect("verifies"), &mut bufs, 2).expect("runs");
    let ys: Vec<f32> = bufs[1]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    for (&x, &y) in xs.iter().zip(&ys) {
        let want = (x as f64).exp();
        if x.is_nan() {
            assert!(y.is_nan());
        } else if want > f32::MAX as f64 * (1.0 + 2e-7) {
            assert_eq!(y, f32::INFINITY, "exp~({x})");
        } else if want < f32::MIN_POSITIVE as f64 {
            assert!(
                (y as f64 - want).abs() <= f32::MIN_POSITIVE as f64,
                "exp~({x}) = {y}"
            );
        } else {
            let ulp = (want as f32).abs() * f32::EPSILON;
            assert!(
                (y as f64 - want).abs() <= 4.0 * ulp as f64,
                "exp~({x}) = {y}, exp = {want}"
            );
        }
    }

    // A row sum by accumulation: any order, f64 rounding only.
    let m = 10_007;
    let vals: Vec<f64> = (0..m)
        .map(|i| ((i * 37 % 101) as f64 - 50.0) / 7.0)
        .collect();
    let mut k = LoopBuilder::new("acc", 1, 1);
    let bv = k.read(DType::F64, &[m]);
    let bs = k.write(DType::F64, &[1]);
    let s = k.var(DType::F64, cst(0.0, DType::F64));
    k.for_(idx(0), idx(m), |k, j| k.accumulate(s, load(bv, j)));
    k.store(bs, idx(0), s.val());
    let mut bufs = vec![
        vals.iter()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<u8>>(),
        vec![0u8; 8],
    ];
    run(k.finish().expect("verifies"), &mut bufs, 1).expect("runs");
    let got = f64::from_le_bytes(bufs[1][..8].try_into().unwrap());
    let want: f64 = vals.iter().sum();
    let abs: f64 = vals.iter().map(|v| v.abs()).sum();
    assert!((got - want).abs() <= abs * 1e-13, "{got} vs {want}");
}
