//! Images for InternVL training: decoding, InternVL's dynamic tiling and the per-tile
//! transform pipeline of MindSpeed-MM's `data.json`.
//!
//! The reference is InternVL's Python data path: PIL's `Image.open(p).convert("RGB")`,
//! InternVL's `dynamic_preprocess` (PIL's bicubic `Image.resize` and `crop`) and torchvision's
//! `Resize`/`ToTensor`/`Normalize` on PIL images. Every step here reproduces what those do,
//! including their quirks, so that a sample gives the same pixel values in mmc as in the
//! Python training code (see `tests/fixtures/images/` and `runtime/tests/image_parity.rs` for
//! how close). Resizing follows Pillow 13 by default; [`resize_bicubic_as`] also reproduces
//! older releases, whose pass order differs.

use image::{DynamicImage, ImageFormat, RgbImage};
use std::borrow::Cow;
use std::io::Cursor;
use std::path::Path;

mod pil_resample;

/// Why an image could not be turned into RGB pixels. Every variant names the file (or the
/// in-memory name given to [`decode_rgb`]) so that a bad sample can be found in the dataset.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The path does not exist (often a wrong `data_folder` in data.json).
    #[error("image {name}: file not found")]
    NotFound { name: String },
    /// The file exists but could not be read (permissions, a directory, I/O failure).
    #[error("image {name}: cannot read the file: {source}")]
    Io {
        name: String,
        source: std::io::Error,
    },
    /// The content is no image format mmc decodes (JPEG, PNG, WebP, GIF, BMP).
    #[error("image {name}: unsupported format: {detail}")]
    Unsupported { name: String, detail: String },
    /// The data stops early: an empty file, a cut download.
    #[error("image {name}: truncated data: {detail}")]
    Truncated { name: String, detail: String },
    /// The data is damaged or inconsistent.
    #[error("image {name}: corrupt data: {detail}")]
    Corrupt { name: String, detail: String },
    /// Decoding would allocate more than the decoder's limit.
    #[error("image {name}: too large to decode: {detail}")]
    TooLarge { name: String, detail: String },
}

impl ImageError {
    /// The file (or in-memory name) the error is about.
    pub fn name(&self) -> &str {
        match self {
            ImageError::NotFound { name }
            | ImageError::Io { name, .. }
            | ImageError::Unsupported { name, .. }
            | ImageError::Truncated { name, .. }
            | ImageError::Corrupt { name, .. }
            | ImageError::TooLarge { name, .. } => name,
        }
    }
}

/// Reads and decodes an image file into 8-bit RGB, as PIL's
/// `Image.open(path).convert("RGB")` does (see [`decode_rgb`] for the details).
///
/// The format is taken from the content, not from the file name, as PIL does.
pub fn open_rgb(path: &Path) -> Result<RgbImage, ImageError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ImageError::NotFound { name: name.clone() }
        } else {
            ImageError::Io {
                name: name.clone(),
                source,
            }
        }
    })?;
    decode_rgb(&bytes, &name)
}

/// Decodes an image held in memory into 8-bit RGB the way PIL's `convert("RGB")` sees it;
/// `name` is only used in errors.
///
/// Formats: JPEG, PNG, WebP, GIF and BMP, recognised by their content. The conversion follows
/// PIL rather than the `image` crate where the two differ:
/// - alpha is dropped, not composited (PIL's RGBA → RGB keeps the colour of fully
///   transparent pixels); grey is replicated; palettes are expanded;
/// - 16-bit RGB(A) and grey+alpha keep the high byte of each sample;
/// - 16-bit grey PNGs (PIL mode `I;16`) are clamped to 0..=255, not scaled: PIL's
///   `I;16 → RGB` conversion saturates, so every value above 255 becomes white;
/// - EXIF orientation is ignored: InternVL never calls `exif_transpose`;
/// - a JPEG without its end-of-image marker is an error, as in PIL with its default
///   `LOAD_TRUNCATED_IMAGES = False`. (InternVL's training scripts set it to `True` and
///   then train on the partially decoded image; mmc rejects such files instead.)
///
/// JPEGs are decoded by libjpeg-turbo (the `turbojpeg` crate), as in PIL, so their pixels are
/// PIL's; CMYK JPEGs, which it cannot turn into RGB, go through the `image` crate and differ by
/// at most 1. Images that need more than the `image` crate's default allocation limit
/// (512 MiB) are [`ImageError::TooLarge`], where InternVL sets `MAX_IMAGE_PIXELS = None`.
pub fn decode_rgb(bytes: &[u8], name: &str) -> Result<RgbImage, ImageError> {
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| map_image_error(image::ImageError::IoError(e), name))?;
    let format = match reader.format() {
        Some(f) => f,
        None if bytes.is_empty() => {
            return Err(ImageError::Truncated {
                name: name.to_string(),
                detail: "the file is empty".to_string(),
            })
        }
        None => {
            return Err(ImageError::Unsupported {
                name: name.to_string(),
                detail: "the content is not a known image format".to_string(),
            })
        }
    };
    if format == ImageFormat::Jpeg {
        check_jpeg_complete(bytes).map_err(|detail| ImageError::Truncated {
            name: name.to_string(),
            detail: detail.to_string(),
        })?;
        // libjpeg-turbo allocates whatever the header claims, without the `image` crate's
        // limit: a damaged header makes a few kilobytes cost gigabytes and seconds.
        if let Ok(h) = turbojpeg::read_header(bytes) {
            let limit = image::Limits::default().max_alloc.unwrap_or(u64::MAX);
            let need = (h.width as u64)
                .saturating_mul(h.height as u64)
                .saturating_mul(3);
            if need > limit {
                return Err(ImageError::TooLarge {
                    name: name.to_string(),
                    detail: format!(
                        "the header gives {}x{} pixels, {} MiB decoded, more than the limit of {} MiB",
                        h.width,
                        h.height,
                        need >> 20,
                        limit >> 20
                    ),
                });
            }
        }
        // libjpeg-turbo, PIL's own decoder, gives PIL's pixels exactly (same IDCT and chroma
        // upsampling); colour spaces it cannot turn into RGB (CMYK) take the general path.
        if let Ok(img) = turbojpeg::decompress(bytes, turbojpeg::PixelFormat::RGB) {
            let (w, h) = (img.width as u32, img.height as u32);
            let mut rgb = Vec::with_capacity(img.width * img.height * 3);
            for row in img.pixels.chunks(img.pitch).take(img.height) {
                rgb.extend_from_slice(&row[..img.width * 3]);
            }
            if let Some(out) = RgbImage::from_raw(w, h, rgb) {
                return Ok(out);
            }
        }
    }
    let decoded = reader.decode().map_err(|e| map_image_error(e, name))?;
    let png_grey16 = format == ImageFormat::Png && png_is_grey16(bytes);
    Ok(to_rgb_like_pil(decoded, png_grey16))
}

fn map_image_error(e: image::ImageError, name: &str) -> ImageError {
    let name = name.to_string();
    // Some decoders end their messages with a line break; the error is one line.
    let detail = |e: &dyn std::fmt::Display| super::one_line(e.to_string().trim());
    match e {
        image::ImageError::Unsupported(e) => ImageError::Unsupported {
            name,
            detail: detail(&e),
        },
        image::ImageError::Limits(e) => ImageError::TooLarge {
            name,
            detail: detail(&e),
        },
        image::ImageError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            ImageError::Truncated {
                name,
                detail: detail(&e),
            }
        }
        other => ImageError::Corrupt {
            name,
            detail: detail(&other),
        },
    }
}

/// Whether a PNG's header says 16-bit greyscale (colour type 0), which PIL opens as mode
/// `I;16` and converts to RGB by clamping, unlike every other 16-bit layout.
fn png_is_grey16(bytes: &[u8]) -> bool {
    // signature (8), IHDR length (4), "IHDR" (4), width (4), height (4), depth, colour type
    bytes.len() > 25 && &bytes[12..16] == b"IHDR" && bytes[24] == 16 && bytes[25] == 0
}

/// Checks that a JPEG stream reaches its end-of-image marker. The decoder would fill a
/// truncated image with grey and report success; PIL raises "image file is truncated".
fn check_jpeg_complete(bytes: &[u8]) -> Result<(), &'static str> {
    const MISSING_EOI: &str = "the JPEG data ends before its end-of-image marker";
    let n = bytes.len();
    let mut pos = 2; // after SOI, which format detection has seen
    loop {
        // Find the next marker: 0xFF (possibly repeated as fill) followed by its code.
        while pos < n && bytes[pos] != 0xFF {
            pos += 1;
        }
        while pos < n && bytes[pos] == 0xFF {
            pos += 1;
        }
        let Some(&code) = bytes.get(pos) else {
            return Err(MISSING_EOI);
        };
        pos += 1;
        match code {
            0xD9 => return Ok(()),
            0x01 | 0xD0..=0xD8 => continue, // markers without a length
            _ => {}
        }
        let (Some(&hi), Some(&lo)) = (bytes.get(pos), bytes.get(pos + 1)) else {
            return Err(MISSING_EOI);
        };
        pos += usize::from(hi) << 8 | usize::from(lo);
        if code == 0xDA {
            // Entropy-coded data: 0xFF is only a marker when not followed by a stuffed
            // zero or a restart code.
            loop {
                if pos + 1 >= n {
                    return Err(MISSING_EOI);
                }
                if bytes[pos] == 0xFF {
                    let next = bytes[pos + 1];
                    if next == 0x00 || (0xD0..=0xD7).contains(&next) {
                        pos += 2;
                        continue;
                    }
                    if next != 0xFF {
                        break;
                    }
                }
                pos += 1;
            }
        }
    }
}

/// PIL's `convert("RGB")` of what PIL would have opened (see [`decode_rgb`]).
fn to_rgb_like_pil(img: DynamicImage, png_grey16: bool) -> RgbImage {
    fn map<const N: usize, T: Copy>(
        w: u32,
        h: u32,
        raw: &[T],
        f: impl Fn(&[T]) -> [u8; 3],
    ) -> RgbImage {
        let mut out = Vec::with_capacity(raw.len() / N * 3);
        for px in raw.chunks_exact(N) {
            out.extend_from_slice(&f(px));
        }
        // The buffer has exactly w * h * 3 bytes, so this cannot fail.
        RgbImage::from_raw(w, h, out).unwrap_or_else(|| RgbImage::new(w, h))
    }
    let (w, h) = (img.width(), img.height());
    let hi = |v: u16| (v >> 8) as u8;
    match img {
        DynamicImage::ImageRgb8(im) => im,
        DynamicImage::ImageRgba8(im) => map::<4, u8>(w, h, im.as_raw(), |p| [p[0], p[1], p[2]]),
        DynamicImage::ImageLuma8(im) => map::<1, u8>(w, h, im.as_raw(), |p| [p[0]; 3]),
        DynamicImage::ImageLumaA8(im) => map::<2, u8>(w, h, im.as_raw(), |p| [p[0]; 3]),
        DynamicImage::ImageRgb16(im) => {
            map::<3, u16>(w, h, im.as_raw(), |p| [hi(p[0]), hi(p[1]), hi(p[2])])
        }
        DynamicImage::ImageRgba16(im) => {
            map::<4, u16>(w, h, im.as_raw(), |p| [hi(p[0]), hi(p[1]), hi(p[2])])
        }
        DynamicImage::ImageLuma16(im) => {
            map::<1, u16>(w, h, im.as_raw(), |p| [p[0].min(255) as u8; 3])
        }
        DynamicImage::ImageLumaA16(im) if png_grey16 => {
            // 16-bit grey with a tRNS colour key: still mode I;16 for PIL.
            map::<2, u16>(w, h, im.as_raw(), |p| [p[0].min(255) as u8; 3])
        }
        DynamicImage::ImageLumaA16(im) => map::<2, u16>(w, h, im.as_raw(), |p| [hi(p[0]); 3]),
        other => other.to_rgb8(),
    }
}

/// Which Pillow release's bicubic resize to reproduce. They differ in the order of the two
/// passes, which changes the rounding of the intermediate image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pillow {
    /// Pillow 12 and earlier: always the horizontal pass first.
    Pillow12,
    /// Pillow 13 and later: the vertical pass first when the height shrinks by more than
    /// twice as many pixels as the width. The default, being the reference environment of
    /// mmc's fixtures.
    #[default]
    Pillow13,
}

/// Resizes like PIL's `Image.resize((width, height), Image.BICUBIC)` on an RGB image (Pillow
/// 13 and later; see [`resize_bicubic_as`]), the resampling InternVL's tiling and
/// torchvision's `Resize` on PIL images both use.
///
/// PIL's bicubic is a convolution (a = -0.5) whose support widens when downscaling (so it
/// antialiases), run one axis at a time with 8-bit rounding in between. Matching it matters
/// because the tiles are the model's input. An unchanged size returns a copy, as PIL does;
/// an empty source gives a black image.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    resize_bicubic_as(img, width, height, Pillow::default())
}

/// [`resize_bicubic`] as a given Pillow release does it, for matching data preprocessed with
/// an older Pillow.
pub fn resize_bicubic_as(img: &RgbImage, width: u32, height: u32, pillow: Pillow) -> RgbImage {
    if img.dimensions() == (width, height) {
        return img.clone();
    }
    pil_resample::resize_bicubic_rgb(img, width, height, pillow == Pillow::Pillow13)
}

/// How an image is cut into tiles, from InternVL's data arguments (`force_image_size`,
/// `min_dynamic_patch`, `max_dynamic_patch`, `use_thumbnail`, `dynamic_image_size`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TilePolicy {
    /// Side of a square tile in pixels (448 for InternVL3.5).
    pub image_size: u32,
    /// Fewest tiles a grid may have.
    pub min_tiles: usize,
    /// Most tiles a grid may have (not counting the thumbnail).
    pub max_tiles: usize,
    /// Whether a downscaled whole image follows the tiles when there is more than one.
    pub use_thumbnail: bool,
    /// `false`: no tiling; the whole image is the one tile and the pipeline resizes it.
    pub dynamic: bool,
}

/// The tiles of one image, in the order the model sees them.
#[derive(Clone, Debug, PartialEq)]
pub struct Tiles {
    /// Columns of the grid (1 when not dynamic).
    pub cols: usize,
    /// Rows of the grid (1 when not dynamic).
    pub rows: usize,
    /// The `cols * rows` tiles in row-major order, then the thumbnail if one was added.
    pub images: Vec<RgbImage>,
}

/// InternVL's candidate grids `(cols, rows)` in the exact order its `dynamic_preprocess` visits
/// them: a Python `set` of every grid with `min <= cols * rows <= max`, sorted (stably) by
/// `cols * rows`. Grids of equal area therefore come in CPython's set iteration order, and
/// that order decides some ties (only when `min_tiles > 1`), so it is reproduced here.
pub fn candidate_grids(min_tiles: usize, max_tiles: usize) -> Vec<(usize, usize)> {
    // The generator visits n = min..=max, cols = 1..=n, rows = 1..=n; a grid is first
    // inserted at n = max(min, cols, rows), and within one n in (cols, rows) order.
    let mut firsts: Vec<(usize, usize, usize)> = Vec::new();
    for cols in 1..=max_tiles {
        for rows in 1..=max_tiles / cols {
            if cols * rows >= min_tiles {
                firsts.push((min_tiles.max(cols).max(rows), cols, rows));
            }
        }
    }
    firsts.sort_unstable();
    let mut set = pyset::TupleSet::default();
    for &(_, cols, rows) in &firsts {
        set.add(cols, rows);
    }
    let mut grids = set.iter_order();
    grids.sort_by_key(|&(c, r)| c * r); // stable, like Python's sorted
    grids
}

/// InternVL's `find_closest_aspect_ratio`: the grid whose aspect ratio is closest to the
/// image's; on an exact tie a later (larger) grid wins only if the image has more than half
/// the grid's pixels.
fn closest_grid(
    width: u32,
    height: u32,
    image_size: u32,
    grids: &[(usize, usize)],
) -> (usize, usize) {
    let aspect = f64::from(width) / f64::from(height);
    let area = f64::from(width) * f64::from(height);
    let side = f64::from(image_size);
    let mut best_diff = f64::INFINITY;
    let mut best = (1, 1);
    for &(cols, rows) in grids {
        let diff = (aspect - cols as f64 / rows as f64).abs();
        if diff < best_diff {
            best_diff = diff;
            best = (cols, rows);
        } else if diff == best_diff && area > 0.5 * side * side * (cols * rows) as f64 {
            best = (cols, rows);
        }
    }
    best
}

/// Cuts an image into tiles as InternVL's `dynamic_preprocess` does (or returns it whole
/// when `policy.dynamic` is false, leaving the resizing to the [`TilePipeline`]).
///
/// The image is resized (PIL bicubic) to `image_size * cols` by `image_size * rows` for the
/// closest grid and cut row by row; with `use_thumbnail` and more than one tile, the whole
/// image resized to `image_size` square comes last. An empty image gives black tiles.
pub fn tile(img: &RgbImage, policy: &TilePolicy) -> Tiles {
    if !policy.dynamic {
        return Tiles {
            cols: 1,
            rows: 1,
            images: vec![img.clone()],
        };
    }
    let s = policy.image_size;
    let grids = candidate_grids(policy.min_tiles, policy.max_tiles);
    let (cols, rows) = closest_grid(img.width(), img.height(), s, &grids);
    let resized = resize_bicubic(img, s * cols as u32, s * rows as u32);
    let mut images = Vec::with_capacity(cols * rows + 1);
    for k in 0..cols * rows {
        let (x, y) = ((k % cols) as u32 * s, (k / cols) as u32 * s);
        images.push(image::imageops::crop_imm(&resized, x, y, s, s).to_image());
    }
    if policy.use_thumbnail && images.len() != 1 {
        images.push(resize_bicubic(img, s, s));
    }
    Tiles { cols, rows, images }
}

/// One step of the per-tile pipeline (`train_pipeline.image` in MindSpeed-MM's data.json).
#[derive(Clone, Debug, PartialEq)]
pub enum TileTransform {
    /// InternVL's `expand2square`: pad the shorter side, centred, with `fill`.
    Pad2Square { fill: [u8; 3] },
    /// torchvision's `Resize([height, width], BICUBIC)` on a PIL image: PIL's bicubic.
    Resize { width: u32, height: u32 },
    /// torchvision's `ToTensor`: bytes to floats in [0, 1], HWC to CHW.
    ToTensor,
    /// torchvision's `Normalize` (`norm_fun`): `(x - mean) / std` per channel.
    Normalize { mean: [f32; 3], std: [f32; 3] },
}

/// The largest side a `Resize` of the pipeline may give: tiles are a few hundred pixels, and an
/// absurd size would allocate gigabytes per tile before any message.
pub const MAX_RESIZE_SIDE: u32 = 4096;

/// The transforms every tile goes through before it becomes model input.
///
/// Image steps (`Pad2Square`, `Resize`) act on the 8-bit image, float steps (`Normalize`) on
/// the tensor, each group in list order; the result is always CHW floats.
#[derive(Clone, Debug, PartialEq)]
pub struct TilePipeline(pub Vec<TileTransform>);

/// ImageNet statistics, InternVL's default normalisation.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// See [`IMAGENET_MEAN`].
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl TilePipeline {
    /// InternVL's `build_transform(is_train=False, input_size, pad2square=False)`: the
    /// transform used for every tile when data.json gives no pipeline.
    pub fn internvl_default(image_size: u32) -> TilePipeline {
        TilePipeline(vec![
            TileTransform::Resize {
                width: image_size,
                height: image_size,
            },
            TileTransform::ToTensor,
            TileTransform::Normalize {
                mean: IMAGENET_MEAN,
                std: IMAGENET_STD,
            },
        ])
    }

    /// Parses a `train_pipeline.image` list from MindSpeed-MM's data.json, e.g.
    /// `[{"trans_type": "Pad2Square", "param": {"mean": [0.485, 0.456, 0.406]}},
    ///   {"trans_type": "Resize", "param": {"size": [448, 448], "interpolation": "BICUBIC"}},
    ///   {"trans_type": "ToTensor"}, {"trans_type": "norm_fun", "param": {"mean": [...], "std": [...]}}]`.
    ///
    /// Only what mmc reproduces exactly is accepted; anything else (another transform, another
    /// interpolation, a resize of the shorter edge, image steps after `ToTensor`) is an error
    /// naming the entry, rather than a silently different preprocessing.
    pub fn from_json(list: &serde_json::Value) -> Result<TilePipeline, String> {
        let entries = list
            .as_array()
            .ok_or_else(|| "train_pipeline.image must be a list of transforms".to_string())?;
        let mut out = Vec::with_capacity(entries.len());
        let mut tensor = false;
        for (i, entry) in entries.iter().enumerate() {
            let t = parse_transform(entry, tensor).map_err(|msg| {
                let kind = entry
                    .get("trans_type")
                    .and_then(|v| v.as_str())
                    .unwrap_or("?");
                super::one_line(&format!("train_pipeline.image[{i}] ({kind}): {msg}"))
            })?;
            tensor |= t == TileTransform::ToTensor;
            out.push(t);
        }
        Ok(TilePipeline(out))
    }

    /// Width and height of the output for an input of `width` by `height` pixels.
    pub fn output_dims(&self, width: u32, height: u32) -> (u32, u32) {
        let mut dims = (width, height);
        for t in &self.0 {
            match *t {
                TileTransform::Pad2Square { .. } => {
                    let side = dims.0.max(dims.1);
                    dims = (side, side);
                }
                TileTransform::Resize { width, height } => dims = (width, height),
                TileTransform::ToTensor | TileTransform::Normalize { .. } => {}
            }
        }
        dims
    }

    /// Side of the output for a square input tile of side `input` (the height if the
    /// pipeline resizes to a non-square size).
    pub fn output_size(&self, input: u32) -> u32 {
        self.output_dims(input, input).1
    }

    /// Runs the pipeline on one tile: CHW floats, `3 * height * width` of them, equal to what
    /// torchvision's transforms give on the PIL tile (in [0, 1] if the list does not
    /// normalise).
    pub fn apply(&self, tile: &RgbImage) -> Vec<f32> {
        let mut img = Cow::Borrowed(tile);
        for t in &self.0 {
            match *t {
                TileTransform::Pad2Square { fill } => {
                    if let Some(padded) = pad_to_square(&img, fill) {
                        img = Cow::Owned(padded);
                    }
                }
                TileTransform::Resize { width, height } => {
                    if img.dimensions() != (width, height) {
                        img = Cow::Owned(resize_bicubic(&img, width, height));
                    }
                }
                TileTransform::ToTensor | TileTransform::Normalize { .. } => {}
            }
        }
        let plane = img.width() as usize * img.height() as usize;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
            for c in 0..3 {
                // torchvision: byte tensor .to(float32).div(255)
                out[c * plane + i] = f32::from(px[c]) / 255.0;
            }
        }
        for t in &self.0 {
            if let TileTransform::Normalize { mean, std } = *t {
                for c in 0..3 {
                    for v in &mut out[c * plane..(c + 1) * plane] {
                        *v = (*v - mean[c]) / std[c];
                    }
                }
            }
        }
        out
    }

    /// Runs the pipeline on every tile and stacks the results: `[n_tiles, 3, H, W]` floats,
    /// InternVL's `pixel_values` for one image.
    pub fn apply_all(&self, tiles: &Tiles) -> Vec<f32> {
        let mut out = Vec::new();
        for t in &tiles.images {
            out.extend(self.apply(t));
        }
        out
    }
}

/// InternVL's `expand2square`; `None` when the image is already square (no copy).
fn pad_to_square(img: &RgbImage, fill: [u8; 3]) -> Option<RgbImage> {
    let (w, h) = img.dimensions();
    if w == h {
        return None;
    }
    let side = w.max(h);
    let mut out = RgbImage::from_pixel(side, side, image::Rgb(fill));
    let (x0, y0) = if w > h {
        (0, (w - h) / 2)
    } else {
        ((h - w) / 2, 0)
    };
    image::imageops::replace(&mut out, img, i64::from(x0), i64::from(y0));
    Some(out)
}

fn parse_transform(
    entry: &serde_json::Value,
    after_to_tensor: bool,
) -> Result<TileTransform, String> {
    let obj = entry
        .as_object()
        .ok_or_else(|| "each transform must be an object with \"trans_type\"".to_string())?;
    for key in obj.keys() {
        if key != "trans_type" && key != "param" {
            return Err(format!(
                "unknown key \"{key}\" (expected trans_type and param)"
            ));
        }
    }
    let kind = obj
        .get("trans_type")
        .and_then(|v| v.as_str())
        .ok_or_else(|| "missing \"trans_type\" string".to_string())?;
    let empty = serde_json::Map::new();
    let params = match obj.get("param") {
        None | Some(serde_json::Value::Null) => &empty,
        Some(serde_json::Value::Object(m)) => m,
        Some(_) => return Err("\"param\" must be an object".to_string()),
    };
    let allow = |allowed: &[&str]| -> Result<(), String> {
        for key in params.keys() {
            if !allowed.contains(&key.as_str()) {
                return Err(format!(
                    "unknown parameter \"{key}\" (accepted: {})",
                    allowed.join(", ")
                ));
            }
        }
        Ok(())
    };
    let image_step = |t: TileTransform| {
        if after_to_tensor {
            Err("comes after ToTensor, where torchvision would transform a tensor, not a PIL image; \
                 mmc supports image steps before ToTensor only"
                .to_string())
        } else {
            Ok(t)
        }
    };
    match kind {
        "Pad2Square" => {
            allow(&["mean"])?;
            let mean = triple(params, "mean")?;
            let mut fill = [0u8; 3];
            for (f, m) in fill.iter_mut().zip(mean) {
                // Python's int(x * 255): truncation toward zero
                let v = (m * 255.0).trunc();
                if !(0.0..=255.0).contains(&v) {
                    return Err(format!("mean {m} gives the fill value {v}, outside 0..=255"));
                }
                *f = v as u8;
            }
            image_step(TileTransform::Pad2Square { fill })
        }
        "Resize" => {
            allow(&["size", "interpolation", "antialias", "max_size"])?;
            let size = params.get("size").ok_or("missing \"size\"")?;
            let dims: Vec<u64> = size
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
                .unwrap_or_default();
            let [height, width] = dims[..] else {
                return Err(format!(
                    "size {size} is not [height, width]: mmc does not implement resizing the \
                     shorter edge"
                ));
            };
            let to_u32 = |v: u64| u32::try_from(v).ok().filter(|&v| v > 0);
            let (Some(height), Some(width)) = (to_u32(height), to_u32(width)) else {
                return Err(format!("size {size} must hold positive pixel counts"));
            };
            if height.max(width) > MAX_RESIZE_SIDE {
                return Err(format!(
                    "size {size} is larger than mmc resizes a tile to ({MAX_RESIZE_SIDE} pixels a side)"
                ));
            }
            match params.get("interpolation") {
                Some(serde_json::Value::String(s)) if s.eq_ignore_ascii_case("bicubic") => {}
                Some(other) => {
                    return Err(format!(
                        "interpolation {other} is not supported: mmc implements BICUBIC only"
                    ))
                }
                None => {
                    return Err("no \"interpolation\": torchvision would default to BILINEAR, \
                         which mmc does not implement; give \"BICUBIC\""
                        .to_string())
                }
            }
            match params.get("antialias") {
                // PIL images are always antialiased, whatever this says.
                None | Some(serde_json::Value::Null | serde_json::Value::Bool(_)) => {}
                Some(other) => return Err(format!("antialias {other} must be null, true or false")),
            }
            match params.get("max_size") {
                None | Some(serde_json::Value::Null) => {}
                Some(_) => return Err("max_size only applies to shorter-edge resizing".to_string()),
            }
            image_step(TileTransform::Resize { width, height })
        }
        "ToTensor" => {
            allow(&[])?;
            if after_to_tensor {
                return Err("a second ToTensor (torchvision would reject a tensor input)".to_string());
            }
            Ok(TileTransform::ToTensor)
        }
        "norm_fun" => {
            allow(&["mean", "std", "inplace"])?;
            if !after_to_tensor {
                return Err("comes before ToTensor; torchvision's Normalize needs a tensor".to_string());
            }
            let mean = triple(params, "mean")?;
            let std = triple(params, "std")?;
            if std.contains(&0.0) {
                return Err("std contains 0".to_string());
            }
            // torchvision turns the Python floats into a float32 tensor
            Ok(TileTransform::Normalize {
                mean: mean.map(|v| v as f32),
                std: std.map(|v| v as f32),
            })
        }
        other => Err(format!(
            "unsupported trans_type \"{other}\" (mmc implements Pad2Square, Resize, ToTensor and norm_fun)"
        )),
    }
}

fn triple(
    params: &serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Result<[f64; 3], String> {
    let v = params
        .get(key)
        .ok_or_else(|| format!("missing \"{key}\""))?;
    let vals: Vec<f64> = v
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default();
    match vals[..] {
        [a, b, c] if v.as_array().is_some_and(|a| a.len() == 3) => Ok([a, b, c]),
        _ => Err(format!("\"{key}\" must be a list of 3 numbers, got {v}")),
    }
}

/// Just enough of CPython's `set` to know the order in which it iterates a set of
/// `(int, int)` tuples (CPython 3.8+ on 64-bit: xxHash-style tuple hash, open addressing
/// with 9 linear probes then perturbed probing, growth to 4x the used count at 60% fill).
mod pyset {
    const PRIME_1: u64 = 11_400_714_785_074_694_791;
    const PRIME_2: u64 = 14_029_467_366_897_019_727;
    const PRIME_5: u64 = 2_870_177_450_012_600_261;
    const LINEAR_PROBES: usize = 9;
    const PERTURB_SHIFT: u32 = 5;

    /// `hash((a, b))` for small non-negative ints (whose hash is themselves).
    fn tuple_hash(a: usize, b: usize) -> u64 {
        let mut acc = PRIME_5;
        for lane in [a as u64, b as u64] {
            acc = acc.wrapping_add(lane.wrapping_mul(PRIME_2));
            acc = acc.rotate_left(31);
            acc = acc.wrapping_mul(PRIME_1);
        }
        acc = acc.wrapping_add(2 ^ (PRIME_5 ^ 3_527_539));
        if acc == u64::MAX {
            1_546_275_796
        } else {
            acc
        }
    }

    type Entry = (u64, (usize, usize));

    pub(super) struct TupleSet {
        table: Vec<Option<Entry>>,
        fill: usize,
    }

    impl Default for TupleSet {
        fn default() -> Self {
            TupleSet {
                table: vec![None; 8],
                fill: 0,
            }
        }
    }

    impl TupleSet {
        /// The slot for `key`: where it is, or the free slot where it would go.
        fn probe(table: &[Option<Entry>], hash: u64, key: Option<(usize, usize)>) -> usize {
            let mask = table.len() - 1;
            let mut perturb = hash;
            let mut i = (hash as usize) & mask;
            loop {
                let last = if i + LINEAR_PROBES <= mask {
                    i + LINEAR_PROBES
                } else {
                    i
                };
                for (j, entry) in table.iter().enumerate().take(last + 1).skip(i) {
                    match entry {
                        None => return j,
                        Some((_, k)) if Some(*k) == key => return j,
                        Some(_) => {}
                    }
                }
                perturb >>= PERTURB_SHIFT;
                i = (i
                    .wrapping_mul(5)
                    .wrapping_add(1)
                    .wrapping_add(perturb as usize))
                    & mask;
            }
        }

        pub(super) fn add(&mut self, cols: usize, rows: usize) {
            let hash = tuple_hash(cols, rows);
            let slot = Self::probe(&self.table, hash, Some((cols, rows)));
            if self.table[slot].is_some() {
                return;
            }
            self.table[slot] = Some((hash, (cols, rows)));
            self.fill += 1;
            let mask = self.table.len() - 1;
            if self.fill * 5 < mask * 3 {
                return;
            }
            let used = self.fill; // nothing is ever removed
            let min_used = if used > 50_000 { used * 2 } else { used * 4 };
            let mut size = 8;
            while size <= min_used {
                size <<= 1;
            }
            let old = std::mem::replace(&mut self.table, vec![None; size]);
            for (hash, key) in old.into_iter().flatten() {
                let slot = Self::probe(&self.table, hash, None);
                self.table[slot] = Some((hash, key));
            }
        }

        pub(super) fn iter_order(&self) -> Vec<(usize, usize)> {
            self.table.iter().flatten().map(|&(_, k)| k).collect()
        }
    }
}
