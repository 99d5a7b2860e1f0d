//! PIL's convolution resampler (Pillow's `Resample.c`) for bicubic on 8-bit RGB.
//!
//! `fast_image_resize`'s Catmull-Rom convolution is meant to be the same filter, but its
//! fixed-point weights (at most 15 bits; PIL uses 22) and pass order put pixels up to 18 grey
//! levels away from PIL on the test images. Tiles are model input, so this reimplements PIL's
//! arithmetic: weights computed in f64 as PIL does, normalised, converted to 22-bit fixed
//! point, two passes with the intermediate image rounded to 8 bits, in PIL's pass order.

use image::RgbImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's bicubic kernel (a = -0.5, support 2).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point weights of one pass: for output pixel `i`, source pixels
/// `first[i] .. first[i] + count[i]` weighted by `weights[i * ksize ..]`.
struct Pass {
    ksize: usize,
    first: Vec<usize>,
    count: Vec<usize>,
    weights: Vec<i32>,
}

fn precompute(in_size: u32, out_size: u32) -> Pass {
    let scale = f64::from(in_size) / f64::from(out_size);
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    let ksize = support.ceil() as usize * 2 + 1;
    let n = out_size as usize;
    let mut pass = Pass {
        ksize,
        first: Vec::with_capacity(n),
        count: Vec::with_capacity(n),
        weights: vec![0; n * ksize],
    };
    let inv = 1.0 / filter_scale;
    let mut w = vec![0f64; ksize];
    for xx in 0..n {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) casts truncate toward zero; negative starts clamp to 0 either way.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size));
        let count = (xmax - xmin).max(0) as usize;
        let xmin = xmin as usize;
        let mut total = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(count) {
            *wx = bicubic(((x + xmin) as f64 - center + 0.5) * inv);
            total += *wx;
        }
        for (x, &wx) in w.iter().enumerate().take(count) {
            let v = if total != 0.0 { wx / total } else { wx };
            let fixed = v * f64::from(1u32 << PRECISION_BITS);
            pass.weights[xx * ksize + x] = if v < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        pass.first.push(xmin);
        pass.count.push(count);
    }
    pass
}

/// PIL's `clip8`: drop the fraction (arithmetic shift, i.e. floor) and saturate.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i64 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass over `rows` of `src` (`src_w` pixels wide): `pass.first.len()` wide.
fn horizontal(src: &[u8], src_w: usize, rows: std::ops::Range<usize>, pass: &Pass) -> Vec<u8> {
    let src_stride = src_w * 3;
    let out_w = pass.first.len();
    let mut out = vec![0u8; rows.len() * out_w * 3];
    for (row_out, y) in out.chunks_exact_mut(out_w * 3).zip(rows) {
        let row = &src[y * src_stride..(y + 1) * src_stride];
        for (xx, px_out) in row_out.chunks_exact_mut(3).enumerate() {
            let k = &pass.weights[xx * pass.ksize..][..pass.count[xx]];
            let px = &row[pass.first[xx] * 3..];
            let mut acc = [HALF; 3];
            for (x, &kx) in k.iter().enumerate() {
                for c in 0..3 {
                    acc[c] += i64::from(px[x * 3 + c]) * i64::from(kx);
                }
            }
            for c in 0..3 {
                px_out[c] = clip8(acc[c]);
            }
        }
    }
    out
}

/// Vertical pass over `src` (`width` pixels wide); output row `yy` reads rows from
/// `pass.first[yy] - row_offset`.
fn vertical(src: &[u8], width: usize, row_offset: usize, pass: &Pass) -> Vec<u8> {
    let stride = width * 3;
    let mut out = vec![0u8; pass.first.len() * stride];
    for (yy, row_out) in out.chunks_exact_mut(stride).enumerate() {
        let k = &pass.weights[yy * pass.ksize..][..pass.count[yy]];
        let first = pass.first[yy] - row_offset;
        for (i, o) in row_out.iter_mut().enumerate() {
            let mut acc = HALF;
            for (y, &ky) in k.iter().enumerate() {
                acc += i64::from(src[(first + y) * stride + i]) * i64::from(ky);
            }
            *o = clip8(acc);
        }
    }
    out
}

/// Resizes an RGB image exactly as Pillow's `Image.resize(size, BICUBIC)` does. Equal sizes
/// are copied by the caller, as in PIL.
///
/// `pillow13`: Pillow 13 runs the vertical pass first when the height shrinks by more than
/// twice as many pixels as the width; earlier Pillow always starts with the horizontal pass.
/// The two orders round the intermediate image differently (up to tens of grey levels on
/// noisy, strongly squeezed images).
pub(super) fn resize_bicubic_rgb(
    img: &RgbImage,
    width: u32,
    height: u32,
    pillow13: bool,
) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    if width == 0 || height == 0 || in_w == 0 || in_h == 0 {
        return RgbImage::new(width, height);
    }
    let need_h = width != in_w;
    let need_v = height != in_h;
    let dh = i64::from(in_h) - i64::from(height);
    let dw = i64::from(in_w) - i64::from(width);
    let vertical_first = pillow13 && dh > 0 && dh > dw * 2;
    let src = img.as_raw();
    let (w_in, w_out) = (in_w as usize, width as usize);
    let out = match (need_h, need_v) {
        (false, false) => src.clone(),
        (true, false) => horizontal(src, w_in, 0..in_h as usize, &precompute(in_w, width)),
        (false, true) => vertical(src, w_in, 0, &precompute(in_h, height)),
        (true, true) if vertical_first => {
            let tmp = vertical(src, w_in, 0, &precompute(in_h, height));
            horizontal(&tmp, w_in, 0..height as usize, &precompute(in_w, width))
        }
        (true, true) => {
            // Only the source rows the vertical pass reads go through the horizontal pass.
            let vert = precompute(in_h, height);
            let last = height as usize - 1;
            let rows = vert.first[0]..vert.first[last] + vert.count[last];
            let first_row = rows.start;
            let tmp = horizontal(src, w_in, rows, &precompute(in_w, width));
            vertical(&tmp, w_out, first_row, &vert)
        }
    };
    RgbImage::from_raw(width, height, out).unwrap_or_else(|| RgbImage::new(width, height))
}
