//! Row-wise and elementwise fused ops: the norms, softmax, SwiGLU, GELU and RoPE, with their
//! backward ops. Each loops over contiguous rows of the last axis and allocates only its results.

use crate::interp::kernels::{for_each_offset, strides};
use crate::interp::nan_max;

/// Rows of length `n` of `x` (one empty row set when `n` is 0).
fn rows(x: &[f64], n: usize) -> std::slice::Chunks<'_, f64> {
    x.chunks(n.max(1))
}

/// `1 / sqrt(mean(row^2) + eps)`, the mean as the frontend forms it (sum times 1/n).
fn rms_scale(row: &[f64], eps: f64) -> f64 {
    let ms = row.iter().map(|v| v * v).sum::<f64>() * (1.0 / row.len() as f64);
    1.0 / (ms + eps).sqrt()
}

/// The mean of a row and `1 / sqrt(var + eps)` with the biased variance.
fn moments(row: &[f64], eps: f64) -> (f64, f64) {
    let inv_n = 1.0 / row.len() as f64;
    let mu = row.iter().sum::<f64>() * inv_n;
    let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() * inv_n;
    (mu, 1.0 / (var + eps).sqrt())
}

/// `w * (x * rsqrt(mean(x^2) + eps))` over the last axis.
pub fn rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len());
    for row in rows(x, w.len()) {
        let r = rms_scale(row, eps);
        y.extend(row.iter().zip(w).map(|(v, w)| w * (v * r)));
    }
    y
}

/// The gradients of [`rms_norm`]: with `g = w * dy`,
/// `dx = r * g - x * r^3 * mean(g * x)` and `dw = sum over rows of dy * x * r`.
pub fn rms_norm_grad(x: &[f64], w: &[f64], dy: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>) {
    let n = w.len();
    let mut dx = Vec::with_capacity(x.len());
    let mut dw = vec![0.0; n];
    for (row, dy) in rows(x, n).zip(rows(dy, n)) {
        let r = rms_scale(row, eps);
        let gx: f64 = row.iter().zip(dy).zip(w).map(|((x, d), w)| w * d * x).sum();
        let c = r * r * r * gx / n as f64;
        dx.extend(
            row.iter()
                .zip(dy)
                .zip(w)
                .map(|((x, d), w)| r * w * d - c * x),
        );
        for ((acc, x), d) in dw.iter_mut().zip(row).zip(dy) {
            *acc += d * x * r;
        }
    }
    (dx, dw)
}

/// `(x - mean) * rsqrt(var + eps) * w + b` over the last axis.
pub fn layer_norm(x: &[f64], w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len());
    for row in rows(x, w.len()) {
        let (mu, r) = moments(row, eps);
        y.extend(
            row.iter()
                .zip(w.iter().zip(b))
                .map(|(v, (w, b))| (v - mu) * r * w + b),
        );
    }
    y
}

/// The gradients of [`layer_norm`]: with `xh = (x - mean) * r` and `g = w * dy`,
/// `dx = r * (g - mean(g) - xh * mean(g * xh))`, `dw = sum dy * xh`, `db = sum dy`.
pub fn layer_norm_grad(
    x: &[f64],
    w: &[f64],
    dy: &[f64],
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = w.len();
    let mut dx = Vec::with_capacity(x.len());
    let mut dw = vec![0.0; n];
    let mut db = vec![0.0; n];
    for (row, dy) in rows(x, n).zip(rows(dy, n)) {
        let (mu, r) = moments(row, eps);
        let (mut g_mean, mut gx_mean) = (0.0, 0.0);
        for ((x, d), w) in row.iter().zip(dy).zip(w) {
            let g = w * d;
            g_mean += g;
            gx_mean += g * (x - mu) * r;
        }
        g_mean /= n as f64;
        gx_mean /= n as f64;
        for (j, (x, d)) in row.iter().zip(dy).enumerate() {
            let xh = (x - mu) * r;
            dx.push(r * (w[j] * d - g_mean - xh * gx_mean));
            dw[j] += d * xh;
            db[j] += d;
        }
    }
    (dx, dw, db)
}

/// Softmax over rows of length `n`, stabilised by the row maximum exactly as the primitive form
/// (`exp(x - max) / sum`): a row of all -inf (or with a NaN or +inf) comes out all NaN.
pub fn softmax(x: &[f64], n: usize) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len());
    for row in rows(x, n) {
        let m = row.iter().copied().fold(f64::NEG_INFINITY, nan_max);
        let start = y.len();
        y.extend(row.iter().map(|v| (v - m).exp()));
        let s: f64 = y[start..].iter().sum();
        y[start..].iter_mut().for_each(|e| *e /= s);
    }
    y
}

/// The gradient of softmax from its result: `dx = y * (dy - sum(dy * y))` per row.
pub fn softmax_grad(y: &[f64], dy: &[f64], n: usize) -> Vec<f64> {
    let mut dx = Vec::with_capacity(y.len());
    for (y, dy) in rows(y, n).zip(rows(dy, n)) {
        let s: f64 = y.iter().zip(dy).map(|(y, d)| y * d).sum();
        dx.extend(y.iter().zip(dy).map(|(y, d)| y * (d - s)));
    }
    dx
}

/// Log-softmax over rows of length `n`, `x - (log(sum(exp(x - max))) + max)` in the order of
/// the primitive form (`ModelBuilder::log_softmax`): a row of all -inf (or with a NaN or +inf)
/// comes out all NaN, as there.
pub fn log_softmax(x: &[f64], n: usize) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len());
    for row in rows(x, n) {
        let m = row.iter().copied().fold(f64::NEG_INFINITY, nan_max);
        let s: f64 = row.iter().map(|v| (v - m).exp()).sum();
        let lse = s.ln() + m;
        y.extend(row.iter().map(|v| v - lse));
    }
    y
}

/// The gradient of log-softmax from its result: `dx = dy - exp(y) * sum(dy)` per row
/// (`exp(y)` is the softmax).
pub fn log_softmax_grad(y: &[f64], dy: &[f64], n: usize) -> Vec<f64> {
    let mut dx = Vec::with_capacity(y.len());
    for (y, dy) in rows(y, n).zip(rows(dy, n)) {
        let s: f64 = dy.iter().sum();
        dx.extend(y.iter().zip(dy).map(|(y, d)| d - y.exp() * s));
    }
    dx
}

/// The logistic sigmoid as the frontend's SiLU forms it, `1 / (1 + exp(-x))`.
fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `gate / (1 + exp(-gate)) * up`.
pub fn swiglu(gate: &[f64], up: &[f64]) -> Vec<f64> {
    gate.iter()
        .zip(up)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect()
}

/// The gradients of [`swiglu`]: `dgate = dy * up * s * (1 + gate * (1 - s))` with `s` the
/// sigmoid of gate, and `dup = dy * silu(gate)`.
pub fn swiglu_grad(gate: &[f64], up: &[f64], dy: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let mut dg = Vec::with_capacity(gate.len());
    let mut du = Vec::with_capacity(gate.len());
    for ((g, u), d) in gate.iter().zip(up).zip(dy) {
        let s = sigmoid(*g);
        dg.push(d * u * s * (1.0 + g * (1.0 - s)));
        du.push(d * g * s);
    }
    (dg, du)
}

/// The exact GELU `x/2 * (1 + erf(x / sqrt 2))`.
pub fn gelu(x: &[f64]) -> Vec<f64> {
    x.iter()
        .map(|&x| x * 0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2)))
        .collect()
}

/// The gradient of [`gelu`]: `dy * (Phi(x) + x * phi(x))` with the standard normal's cdf and
/// density.
pub fn gelu_grad(x: &[f64], dy: &[f64]) -> Vec<f64> {
    let inv_sqrt_2pi = 0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2;
    x.iter()
        .zip(dy)
        .map(|(&x, d)| {
            let cdf = 0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2));
            let pdf = inv_sqrt_2pi * (-0.5 * x * x).exp();
            d * (cdf + x * pdf)
        })
        .collect()
}

/// For each row of a tensor of shape `shape` (all axes but the last), the offset of the row of
/// `table` (of shape `table_shape`: the same rank, size 1 or `shape`'s on every axis) that
/// broadcasts to it.
fn table_rows(shape: &[usize], table_shape: &[usize]) -> Vec<usize> {
    let r = shape.len() - 1;
    let ts = strides(table_shape);
    let bs: Vec<usize> = (0..r)
        .map(|i| if table_shape[i] == 1 { 0 } else { ts[i] })
        .collect();
    let mut offs = Vec::with_capacity(shape[..r].iter().product());
    for_each_offset(&shape[..r], &bs, 0, |_, off| offs.push(off));
    offs
}

/// RoPE over the last axis, `x * cos + cat(-x2, x1) * sin` (x1, x2 the halves of x), with cos
/// and sin broadcast to x. With `transpose`, the adjoint map instead (rope is linear in x, so
/// this is its backward on `x` = dy): `dy * cos + cat(dy2 * sin2, -dy1 * sin1)`.
pub fn rope(
    x: &[f64],
    shape: &[usize],
    (cos, cos_shape): (&[f64], &[usize]),
    (sin, sin_shape): (&[f64], &[usize]),
    transpose: bool,
) -> Vec<f64> {
    let d = shape[shape.len() - 1];
    let h = d / 2;
    let (cr, sr) = (table_rows(shape, cos_shape), table_rows(shape, sin_shape));
    let mut y = Vec::with_capacity(x.len());
    for ((row, &co), &so) in rows(x, d).zip(&cr).zip(&sr) {
        let (c, s) = (&cos[co..co + d], &sin[so..so + d]);
        let (x1, x2) = row.split_at(h);
        if transpose {
            y.extend((0..h).map(|i| x1[i] * c[i] + x2[i] * s[i + h]));
            y.extend((0..h).map(|i| x2[i] * c[i + h] - x1[i] * s[i]));
        } else {
            y.extend((0..h).map(|i| x1[i] * c[i] + -x2[i] * s[i]));
            y.extend((0..h).map(|i| x2[i] * c[i + h] + x1[i] * s[i + h]));
        }
    }
    y
}
