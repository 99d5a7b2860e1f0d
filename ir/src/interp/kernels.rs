//! The reference implementations of the primitive ops over row-major buffers.
//!
//! Floats are computed in f64 and rounded by the caller to the declared dtype, so each op is
//! "the exact result, rounded once". Integers and bools live in i64 buffers.

use crate::Shape;

/// Element storage inside the interpreter.
#[derive(Clone, Debug, PartialEq)]
pub enum Buf {
    F(Vec<f64>),
    I(Vec<i64>),
}

/// Row-major strides of `shape`.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Calls `f(k, offset)` for every coordinate of `shape` in row-major order, where `k` counts the
/// coordinates and `offset = base + Σ coord[i] * strides[i]`. Broadcasts (stride 0), permutes
/// (permuted strides), slices (a base) and reductions (stride 0 on reduced axes) are all this.
pub fn for_each_offset(
    shape: &[usize],
    strides: &[usize],
    base: usize,
    mut f: impl FnMut(usize, usize),
) {
    let n: usize = shape.iter().product();
    if n == 0 {
        return;
    }
    let rank = shape.len();
    let mut coord = vec![0usize; rank];
    let mut offset = base;
    for k in 0..n {
        f(k, offset);
        for d in (0..rank).rev() {
            coord[d] += 1;
            offset += strides[d];
            if coord[d] < shape[d] {
                break;
            }
            offset -= strides[d] * shape[d];
            coord[d] = 0;
        }
    }
}

/// Reads `src` through a strided view: element `k` of the result is `src[offset(k)]`.
///
/// The innermost axis is copied as a run (stride 1) or a repeated value (stride 0, a
/// broadcast), which is where big layout ops spend their time.
pub fn view<T: Copy>(src: &[T], shape: &[usize], strides: &[usize], base: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(shape.iter().product());
    let Some((&inner, outer)) = shape.split_last() else {
        out.push(src[base]);
        return out;
    };
    let inner_stride = strides[strides.len() - 1];
    let outer_strides = &strides[..strides.len() - 1];
    for_each_offset(outer, outer_strides, base, |_, off| match inner_stride {
        0 => out.extend(std::iter::repeat_n(src[off], inner)),
        1 => out.extend_from_slice(&src[off..off + inner]),
        s => out.extend((0..inner).map(|i| src[off + i * s])),
    });
    out
}

/// [`view`] into `out` (as many elements as `shape` has), for planned runs that write results
/// straight into their arena slot.
pub fn view_into<T: Copy>(
    src: &[T],
    shape: &[usize],
    strides: &[usize],
    base: usize,
    out: &mut [T],
) {
    let Some((&inner, outer)) = shape.split_last() else {
        out[0] = src[base];
        return;
    };
    let inner_stride = strides[strides.len() - 1];
    let outer_strides = &strides[..strides.len() - 1];
    for_each_offset(outer, outer_strides, base, |k, off| {
        let o = &mut out[k * inner..(k + 1) * inner];
        match inner_stride {
            0 => o.fill(src[off]),
            1 => o.copy_from_slice(&src[off..off + inner]),
            s => o
                .iter_mut()
                .enumerate()
                .for_each(|(i, e)| *e = src[off + i * s]),
        }
    });
}

/// Gathers a buffer through a strided view (either element kind).
pub fn view_buf(src: &Buf, shape: &[usize], strides: &[usize], base: usize) -> Buf {
    match src {
        Buf::F(v) => Buf::F(view(v, shape, strides, base)),
        Buf::I(v) => Buf::I(view(v, shape, strides, base)),
    }
}

/// Writes `src` (laid out as `shape`) into `dst` through a strided view.
pub fn write_view<T: Copy>(
    dst: &mut [T],
    src: &[T],
    shape: &[usize],
    strides: &[usize],
    base: usize,
) {
    for_each_offset(shape, strides, base, |k, off| dst[off] = src[k]);
}

/// Reduces over the axes where `out_shape` is 1 and `in_shape` is not (keeping dims).
pub fn reduce<T: Copy>(
    src: &[T],
    in_shape: &[usize],
    out_shape: &[usize],
    init: T,
    combine: impl Fn(T, T) -> T,
) -> Vec<T> {
    let out_strides = strides(out_shape);
    let rstrides: Vec<usize> = (0..in_shape.len())
        .map(|i| if out_shape[i] == 1 { 0 } else { out_strides[i] })
        .collect();
    let mut acc = vec![init; out_shape.iter().product()];
    for_each_offset(in_shape, &rstrides, 0, |k, off| {
        acc[off] = combine(acc[off], src[k])
    });
    acc
}

/// `[.., m, k] x [.., k, n]` in f64 (the well-tested `matrixmultiply` dgemm).
pub fn matmul(a: &[f64], b: &[f64], batch: usize, m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; batch * m * n];
    matmul_into(a, b, batch, m, k, n, &mut out);
    out
}

/// [`matmul`] into `out` (`batch * m * n` elements, overwritten whatever they hold), so that
/// a planned run writes the product straight into its arena slot.
pub fn matmul_into(
    a: &[f64],
    b: &[f64],
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f64],
) {
    assert!(a.len() >= batch * m * k && b.len() >= batch * k * n && out.len() == batch * m * n);
    if k == 0 {
        out.fill(0.0);
        return;
    }
    for bi in 0..batch {
        let a = &a[bi * m * k..(bi + 1) * m * k];
        let b = &b[bi * k * n..(bi + 1) * k * n];
        let o = &mut out[bi * m * n..(bi + 1) * m * n];
        if m == 0 || n == 0 {
            continue;
        }
        // SAFETY: the slices hold exactly m*k, k*n and m*n elements laid out row-major, which
        // is what the strides below describe; `o` is a `&mut` and so aliases neither `a` nor
        // `b`. With beta = 0, dgemm does not read `o`.
        unsafe {
            matrixmultiply::dgemm(
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
                o.as_mut_ptr(),
                n as isize,
                1,
            );
        }
    }
}

/// Offsets into `x` for gather / scatter-add: for each index element, the offset of the element
/// it addresses, or the index itself when it is out of `0..dim`.
pub fn index_offsets(
    x_shape: &[usize],
    idx_shape: &[usize],
    idx: &[i64],
    axis: usize,
) -> Result<Vec<usize>, (usize, i64)> {
    let xs = strides(x_shape);
    let mut base_strides = xs.clone();
    base_strides[axis] = 0;
    let dim = x_shape[axis];
    let mut out = Vec::with_capacity(idx.len());
    let mut bad = None;
    for_each_offset(idx_shape, &base_strides, 0, |k, off| {
        let i = idx[k];
        if i < 0 || i as usize >= dim {
            bad.get_or_insert((k, i));
            out.push(0);
        } else {
            out.push(off + i as usize * xs[axis]);
        }
    });
    match bad {
        Some(b) => Err(b),
        None => Ok(out),
    }
}

/// Orders two floats for sorting, with NaN above everything (as torch does).
pub fn float_order(a: &f64, b: &f64) -> std::cmp::Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => std::cmp::Ordering::Equal,
        (true, false) => std::cmp::Ordering::Greater,
        (false, true) => std::cmp::Ordering::Less,
        _ => a.partial_cmp(b).expect("not NaN"),
    }
}

/// Indices that sort each row of length `n` (stable), descending or ascending.
pub fn argsort_rows<T>(
    keys: &[T],
    n: usize,
    descending: bool,
    order: impl Fn(&T, &T) -> std::cmp::Ordering,
) -> Vec<i64> {
    let mut out = Vec::with_capacity(keys.len());
    for row in keys.chunks(n.max(1)) {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.sort_by(|&i, &j| {
            let o = order(&row[i], &row[j]);
            if descending {
                o.reverse()
            } else {
                o
            }
        });
        out.extend(idx.into_iter().map(|i| i as i64));
    }
    out
}

/// Inclusive prefix sums along `axis`, combining with `add` (wrapping for integers).
pub fn cumsum<T: Copy>(src: &[T], shape: &Shape, axis: usize, add: impl Fn(T, T) -> T) -> Vec<T> {
    let mut out = src.to_vec();
    let inner: usize = shape[axis + 1..].iter().product();
    let dim = shape[axis];
    let outer: usize = shape[..axis].iter().product();
    for o in 0..outer {
        for i in 0..inner {
            for d in 1..dim {
                let at = (o * dim + d) * inner + i;
                out[at] = add(out[at - inner], out[at]);
            }
        }
    }
    out
}
