//! GEMM GFLOP/s of the library calls on the model's shapes, against the machine's FMA peak
//! (and, with `--compare`, against `matrixmultiply`, the alternative the call was chosen over).
//!
//!   cargo bench -p mmc-codegen --bench gemm -- [--threads 2] [--json] [--compare]
//!       [--no-peak | --peak-only] [--shape NAME=M,K,N ...] [--grouped NAME=EXPERTS,ROWS_PER_EXPERT,INNER,COLS ...]
//!
//! Every shape is `[M, K] @ [K, N]`, f32, dense row-major operands (what the IR gives: autodiff
//! materialises transposes with `permute`). A grouped shape times `fused.grouped_matmul` and
//! its gradient with equal rows per expert. Each figure is the best of 3 rounds of at least
//! 0.2 s. The FMA peak is a loop of independent AVX-512 (or AVX2) FMAs on every thread of the
//! pool at once: the most the cores can multiply-add, which no GEMM reaches. `--json` prints
//! one JSON object per line (for bench/gemm.py) instead of the table.

use mmc_codegen::library::{Float, Grouped, LibraryCall, MatMul, Workspace};
use std::hint::black_box;
use std::time::Instant;

/// The default shapes: the LM head of the vocabulary-dominated configuration (forward and its
/// two gradients), a square-ish projection, and an expert GEMM with its two gradients.
const SHAPES: &[(&str, usize, usize, usize)] = &[
    ("lm_head fwd", 1024, 512, 151936),
    ("lm_head dX", 1024, 151936, 512),
    ("lm_head dW", 512, 1024, 151936),
    ("proj 2048x1024x1024", 2048, 1024, 1024),
    ("expert gate_up fwd", 256, 1024, 1536),
    ("expert gate_up dX", 256, 1536, 1024),
    ("expert gate_up dW", 1024, 256, 1536),
];

/// The default grouped shape: the experts configuration's 32 experts, 256 rows each.
const GROUPED: &[(&str, usize, usize, usize, usize)] =
    &[("grouped gate_up 32x256", 32, 256, 1024, 1536)];

struct Args {
    threads: usize,
    json: bool,
    compare: bool,
    peak: bool,
    peak_only: bool,
    shapes: Vec<(String, usize, usize, usize)>,
    grouped: Vec<(String, usize, usize, usize, usize)>,
}

fn parse_sizes(s: &str, n: usize) -> Result<(String, Vec<usize>), String> {
    let (name, dims) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("`{s}`: expected NAME=SIZES"))?;
    let dims = dims
        .split(',')
        .map(|d| d.trim().parse::<usize>().map_err(|e| format!("`{s}`: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if dims.len() != n {
        return Err(format!("`{s}`: expected {n} sizes"));
    }
    Ok((name.to_string(), dims))
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        threads: 2,
        json: false,
        compare: false,
        peak: true,
        peak_only: false,
        shapes: Vec::new(),
        grouped: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--threads" => a.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?,
            "--json" => a.json = true,
            "--compare" => a.compare = true,
            "--no-peak" => a.peak = false,
            "--peak-only" => a.peak_only = true,
            "--shape" => {
                let (name, d) = parse_sizes(&value()?, 3)?;
                a.shapes.push((name, d[0], d[1], d[2]));
            }
            "--grouped" => {
                let (name, d) = parse_sizes(&value()?, 4)?;
                a.grouped.push((name, d[0], d[1], d[2], d[3]));
            }
            // `cargo bench` passes `--bench` to every bench binary.
            "--bench" => {}
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if a.peak_only {
        a.peak = true;
    } else if a.shapes.is_empty() && a.grouped.is_empty() {
        a.shapes = SHAPES
            .iter()
            .map(|&(n, m, k, nn)| (n.to_string(), m, k, nn))
            .collect();
        a.grouped = GROUPED
            .iter()
            .map(|&(n, e, r, i, c)| (n.to_string(), e, r, i, c))
            .collect();
    }
    Ok(a)
}

/// Seconds per run of `f`: the best of 3 rounds, each at least 0.2 s, after one warm-up.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let (t0, mut n) = (Instant::now(), 0u32);
        loop {
            f();
            n += 1;
            let dt = t0.elapsed().as_secs_f64();
            if dt >= 0.2 {
                best = best.min(dt / f64::from(n));
                break;
            }
        }
    }
    best
}

/// Deterministic data in [-1, 1) (a linear congruential sequence: the values do not matter
/// to the speed, only that they are ordinary floats).
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// One timed GEMM.
struct Record {
    name: String,
    imp: &'static str,
    dims: String,
    flops: f64,
    secs: f64,
}

fn print(args: &Args, r: &Record, peak: f64) {
    let gflops = r.flops / r.secs / 1e9;
    let Record {
        name, imp, dims, ..
    } = r;
    if args.json {
        println!(
            "{{\"gemm\": \"{name}\", \"impl\": \"{imp}\", \"dims\": \"{dims}\", \"dtype\": \"f32\", \
             \"ms\": {:.3}, \"gflops\": {gflops:.1}, \"threads\": {}}}",
            r.secs * 1e3,
            args.threads
        );
    } else {
        let of_peak = if peak.is_nan() {
            "-".to_string()
        } else {
            format!("{:.0}%", 100.0 * gflops / peak)
        };
        println!(
            "{name:<28} {imp:<15} {dims:<22} {:>10.3} ms {gflops:>8.1} GFLOP/s {of_peak:>5} of peak",
            r.secs * 1e3,
        );
    }
}

/// Runs a call on host buffers with its workspace.
fn run(call: &LibraryCall, bufs: &mut [&mut [u8]], ws: &mut Workspace, pool: &rayon::ThreadPool) {
    let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
    // SAFETY: the buffers were sized from the call's fields by the caller.
    unsafe { call.execute(&ptrs, ws, pool) }.expect("a valid call");
}

/// The workspace of `call` on `pool`, allocated once before it is timed (as the runtime does).
fn workspace(call: &LibraryCall, pool: &rayon::ThreadPool) -> Workspace {
    Workspace::new(call.workspace_bytes(pool.current_num_threads())).expect("a workspace")
}

fn bytes(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: f32 has no invalid bit patterns and u8 no alignment.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), std::mem::size_of_val(v)) }
}

fn dense(args: &Args, pool: &rayon::ThreadPool) -> Vec<Record> {
    let mut out = Vec::new();
    for (name, m, k, n) in &args.shapes {
        let (m, k, n) = (*m, *k, *n);
        let (mut a, mut b, mut c) = (data(m * k, 1), data(k * n, 2), vec![0f32; m * n]);
        let call = LibraryCall::MatMul(MatMul {
            dtype: Float::F32,
            batch: 1,
            m,
            k,
            n,
        });
        let dims = format!("{m} x {k} x {n}");
        let mut ws = workspace(&call, pool);
        let t = time(|| {
            run(
                &call,
                &mut [bytes(&mut a), bytes(&mut b), bytes(&mut c)],
                &mut ws,
                pool,
            )
        });
        out.push(Record {
            name: name.clone(),
            imp: "mmc",
            dims: dims.clone(),
            flops: call.flops(),
            secs: t,
        });
        if args.compare {
            // The `gemm` crate's own driver over the same micro-kernels (it allocates its
            // packing buffers in each call).
            let threads = pool.current_num_threads();
            let t = time(|| {
                pool.install(|| {
                    // SAFETY: dense row-major a [m, k], b [k, n], c [m, n]; the crate's
                    // column-major view of the row-major product is its transpose.
                    unsafe {
                        gemm::gemm(
                            n,
                            m,
                            k,
                            c.as_mut_ptr(),
                            n as isize,
                            1,
                            false,
                            b.as_ptr(),
                            n as isize,
                            1,
                            a.as_ptr(),
                            k as isize,
                            1,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            if threads > 1 {
                                gemm::Parallelism::Rayon(threads)
                            } else {
                                gemm::Parallelism::None
                            },
                        )
                    }
                })
            });
            out.push(Record {
                name: name.clone(),
                imp: "gemm crate",
                dims: dims.clone(),
                flops: call.flops(),
                secs: t,
            });
            let t = time(|| {
                // SAFETY: dense row-major a [m, k], b [k, n], c [m, n].
                unsafe {
                    matrixmultiply::sgemm(
                        m,
                        k,
                        n,
                        1.0,
                        a.as_ptr(),
                        k as isize,
                        1,
                        b.as_ptr(),
                        n as isize,
                        1,
                        0.0,
                        c.as_mut_ptr(),
                        n as isize,
                        1,
                    )
                }
            });
            out.push(Record {
                name: name.clone(),
                imp: "matrixmultiply",
                dims,
                flops: call.flops(),
                secs: t,
            });
        }
    }
    out
}

fn grouped(args: &Args, pool: &rayon::ThreadPool) -> Vec<Record> {
    let mut out = Vec::new();
    for (name, experts, per, inner, cols) in &args.grouped {
        let (experts, per, inner, cols) = (*experts, *per, *inner, *cols);
        let rows = experts * per;
        let g = Grouped {
            dtype: Float::F32,
            rows,
            inner,
            cols,
            experts,
        };
        let mut offsets: Vec<i64> = (0..=experts).map(|e| (e * per) as i64).collect();
        // SAFETY: i64 has no invalid bit patterns and u8 no alignment.
        let off = unsafe {
            std::slice::from_raw_parts_mut(
                offsets.as_mut_ptr().cast::<u8>(),
                std::mem::size_of_val(&offsets[..]),
            )
        };
        let (mut xs, mut w) = (data(rows * inner, 3), data(experts * inner * cols, 4));
        let (mut y, mut dy) = (vec![0f32; rows * cols], data(rows * cols, 5));
        let (mut dxs, mut dw) = (vec![0f32; rows * inner], vec![0f32; experts * inner * cols]);
        let dims = format!("{experts} x [{per} x {inner} x {cols}]");
        let fwd = LibraryCall::GroupedMatMul(g.clone());
        let mut ws = workspace(&fwd, pool);
        let t = time(|| {
            run(
                &fwd,
                &mut [bytes(&mut xs), bytes(&mut w), off, bytes(&mut y)],
                &mut ws,
                pool,
            )
        });
        out.push(Record {
            name: name.clone(),
            imp: "mmc",
            dims: dims.clone(),
            flops: fwd.flops(),
            secs: t,
        });
        let bwd = LibraryCall::GroupedMatMulGrad(g);
        let mut ws = workspace(&bwd, pool);
        let t = time(|| {
            run(
                &bwd,
                &mut [
                    bytes(&mut xs),
                    bytes(&mut w),
                    off,
                    bytes(&mut dy),
                    bytes(&mut dxs),
                    bytes(&mut dw),
                ],
                &mut ws,
                pool,
            )
        });
        out.push(Record {
            name: format!("{name} grad"),
            imp: "mmc",
            dims,
            flops: bwd.flops(),
            secs: t,
        });
    }
    out
}

/// The FMA peak in GFLOP/s (f32) of `pool`'s threads, each running independent FMA chains,
/// and the instruction set used.
fn fma_peak(pool: &rayon::ThreadPool) -> (f64, &'static str) {
    #[cfg(target_arch = "x86_64")]
    {
        let (isa, lanes): (&str, f64) = if std::arch::is_x86_feature_detected!("avx512f") {
            ("avx512", 16.0)
        } else if std::arch::is_x86_feature_detected!("fma") {
            ("avx2+fma", 8.0)
        } else {
            return (f64::NAN, "none");
        };
        let iters: u64 = 20_000_000;
        let threads = pool.current_num_threads();
        let once = || {
            let t0 = Instant::now();
            pool.broadcast(|_| {
                // SAFETY: the feature was detected above.
                black_box(unsafe {
                    if lanes == 16.0 {
                        fma::avx512(black_box(iters))
                    } else {
                        fma::avx2(black_box(iters))
                    }
                })
            });
            t0.elapsed().as_secs_f64()
        };
        once();
        let best = (0..5).map(|_| once()).fold(f64::INFINITY, f64::min);
        let flops = threads as f64 * iters as f64 * fma::CHAINS as f64 * lanes * 2.0;
        (flops / best / 1e9, isa)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = pool;
        (f64::NAN, "none")
    }
}

#[cfg(target_arch = "x86_64")]
mod fma {
    use std::arch::x86_64::*;

    /// Independent accumulators: more than FMA latency x FMA ports (4 x 2), so the loop is
    /// bound by throughput.
    pub const CHAINS: usize = 16;

    /// `iters` rounds of CHAINS independent 16-lane FMAs.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512(iters: u64) -> f32 {
        let (x, y) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, x, y);
            }
        }
        let mut s = _mm512_setzero_ps();
        for a in acc {
            s = _mm512_add_ps(s, a);
        }
        _mm512_reduce_add_ps(s)
    }

    /// `iters` rounds of CHAINS independent 8-lane FMAs.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2(iters: u64) -> f32 {
        let (x, y) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, x, y);
            }
        }
        let mut s = _mm256_setzero_ps();
        for a in acc {
            s = _mm256_add_ps(s, a);
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), s);
        out.iter().sum()
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    // matrixmultiply's threading reads its thread count from the environment once.
    std::env::set_var("MATMUL_NUM_THREADS", args.threads.to_string());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()
        .expect("a thread pool");
    // The peak before and after the GEMMs, the better kept: on a shared machine a burst of
    // load lowers one of them.
    let (mut peak, mut isa) = (f64::NAN, "not measured");
    if args.peak {
        (peak, isa) = fma_peak(&pool);
    }
    let mut records = dense(&args, &pool);
    records.extend(grouped(&args, &pool));
    if args.peak {
        peak = peak.max(fma_peak(&pool).0);
    }
    if args.peak && args.json {
        println!(
            "{{\"fma_peak_gflops\": {peak:.1}, \"isa\": \"{isa}\", \"threads\": {}}}",
            args.threads
        );
    } else if args.peak {
        println!(
            "FMA peak ({isa}, f32, {} threads): {peak:.1} GFLOP/s",
            args.threads
        );
    }
    for r in &records {
        print(&args, r, peak);
    }
}
