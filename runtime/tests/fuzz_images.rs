//! Fuzzes image decoding (JPEG through libjpeg-turbo, PNG, WebP, GIF and BMP through the `image`
//! crate) and what follows it for a training sample (InternVL's tiling, the tile pipeline).
//! Every fixture and demo image, damaged as cut downloads and bad disks damage them (truncated,
//! bytes flipped, chunks lost or repeated, sizes in the headers changed), must decode or fail
//! with a one-line error naming the image; never a panic, a hang, or an allocation that takes
//! the process down. A training set holds millions of images from the web, and one bad file
//! must cost a warning, not the run.

#[path = "../../tests/fuzz/mod.rs"]
mod fuzz;

use fuzz::{FileCase, Input, Rng};
use mmc_runtime::data::image::{decode_rgb, open_rgb, tile, TilePipeline, TilePolicy};
use std::path::PathBuf;

fn root() -> PathBuf {
    fuzz::workspace(env!("CARGO_MANIFEST_DIR"))
}

/// (name, bytes) of every image of the fixtures and the demo.
fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for dir in ["tests/fixtures/images", "configs/demo/images"] {
        let mut names: Vec<String> = std::fs::read_dir(root().join(dir))
            .expect("an image folder")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| {
                [".jpg", ".png", ".webp", ".gif", ".bmp"]
                    .iter()
                    .any(|x| n.ends_with(x))
            })
            .collect();
        names.sort();
        for n in names {
            let bytes = fuzz::seed(&root(), &format!("{dir}/{n}"));
            out.push((n, bytes));
        }
    }
    out
}

/// The CRC-32 of PNG chunks (ISO 3309), so that a changed header is read, not rejected.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Sizes a header may claim: empty, tiny, odd, the format's maximum.
const DIMS: &[u32] = &[
    0,
    1,
    2,
    3,
    7,
    255,
    256,
    4097,
    30000,
    65535,
    65536,
    1 << 24,
    u32::MAX,
];

/// The PNG's chunks: (offset of the length field, type, data length).
fn png_chunks(b: &[u8]) -> Vec<(usize, [u8; 4], usize)> {
    let mut out = Vec::new();
    let mut pos = 8;
    while pos + 12 <= b.len() {
        let len = u32::from_be_bytes(b[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        let kind: [u8; 4] = b[pos + 4..pos + 8].try_into().expect("4 bytes");
        out.push((pos, kind, len));
        pos = match pos.checked_add(12 + len) {
            Some(p) => p,
            None => break,
        };
    }
    out
}

/// A PNG-aware mutation: a chunk removed, repeated or moved, or the header's size, depth or
/// colour type changed with its CRC fixed.
fn mutate_png(rng: &mut Rng, b: &mut Vec<u8>) -> Option<String> {
    let chunks = png_chunks(b);
    let (pos, kind, len) = *chunks.first()?;
    let end = |p: usize, l: usize| (p + 12 + l).min(b.len());
    Some(match rng.below(4) {
        0 if &kind == b"IHDR" && len >= 13 && pos + 12 + len <= b.len() => {
            let field = rng.below(4);
            let at = pos + 8 + [0, 4, 8, 9][field];
            if field < 2 {
                let v = *rng.pick(DIMS);
                b[at..at + 4].copy_from_slice(&v.to_be_bytes());
            } else {
                b[at] = *rng.pick(&[0u8, 1, 2, 3, 4, 6, 7, 8, 16, 255]);
            }
            let crc = crc32(&b[pos + 4..pos + 8 + len]);
            b[pos + 8 + len..pos + 12 + len].copy_from_slice(&crc.to_be_bytes());
            format!("IHDR field {field} changed, CRC fixed")
        }
        1 => {
            let (p, k, l) = *rng.pick(&chunks);
            b.drain(p..end(p, l));
            format!("{} chunk removed", String::from_utf8_lossy(&k))
        }
        2 => {
            let (p, k, l) = *rng.pick(&chunks);
            let chunk = b[p..end(p, l)].to_vec();
            let (at, _, _) = *rng.pick(&chunks);
            b.splice(at..at, chunk);
            format!("{} chunk repeated", String::from_utf8_lossy(&k))
        }
        _ => {
            let (p, k, l) = *rng.pick(&chunks);
            let data = p + 8;
            if l > 0 && data + l <= b.len() {
                let i = data + rng.below(l);
                b[i] ^= 1 << rng.below(8);
                let crc = crc32(&b[p + 4..data + l]);
                if data + l + 4 <= b.len() {
                    b[data + l..data + l + 4].copy_from_slice(&crc.to_be_bytes());
                }
            }
            format!(
                "a bit of {} flipped, CRC fixed",
                String::from_utf8_lossy(&k)
            )
        }
    })
}

/// A JPEG-aware mutation: the frame header's size or component count changed, or a marker
/// segment removed or repeated.
fn mutate_jpeg(rng: &mut Rng, b: &mut Vec<u8>) -> Option<String> {
    // Marker segments before the scan: (offset of 0xFF, code, length with its own 2 bytes).
    let mut segs = Vec::new();
    let mut pos = 2;
    while pos + 4 <= b.len() && b[pos] == 0xFF {
        let code = b[pos + 1];
        let len = usize::from(u16::from_be_bytes([b[pos + 2], b[pos + 3]]));
        segs.push((pos, code, len));
        if code == 0xDA {
            break;
        }
        pos += 2 + len;
    }
    if segs.is_empty() {
        return None;
    }
    let sof = segs
        .iter()
        .find(|(_, c, _)| matches!(c, 0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF));
    Some(match (rng.below(3), sof) {
        (0, Some(&(p, _, _))) if p + 9 < b.len() => {
            // SOF: length (2), precision (1), height (2), width (2), components (1).
            let field = rng.below(4);
            match field {
                0 | 1 => {
                    let v = (*rng.pick(DIMS)).min(65535) as u16;
                    let at = p + 5 + 2 * field;
                    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
                    format!("frame {} = {v}", ["height", "width"][field])
                }
                2 => {
                    b[p + 4] = *rng.pick(&[0u8, 1, 7, 12, 16, 255]);
                    "frame precision changed".into()
                }
                _ => {
                    b[p + 9] = *rng.pick(&[0u8, 1, 2, 4, 5, 255]);
                    "frame component count changed".into()
                }
            }
        }
        (1, _) => {
            let &(p, c, l) = rng.pick(&segs);
            let e = (p + 2 + l).min(b.len());
            b.drain(p..e);
            format!("segment {c:#x} removed")
        }
        _ => {
            let &(p, c, l) = rng.pick(&segs);
            let e = (p + 2 + l).min(b.len());
            let seg = b[p..e].to_vec();
            let &(at, _, _) = rng.pick(&segs);
            b.splice(at..at, seg);
            format!("segment {c:#x} repeated")
        }
    })
}

/// A damaged image: 1-3 format-aware or byte-level mutations.
fn mutated_image(rng: &mut Rng, bytes: &[u8]) -> (Vec<u8>, Vec<String>) {
    let mut b = bytes.to_vec();
    let mut how = Vec::new();
    for _ in 0..rng.range(1, 3) {
        let aware = if rng.chance(0.4) {
            if b.starts_with(b"\x89PNG") {
                mutate_png(rng, &mut b)
            } else if b.starts_with(&[0xFF, 0xD8]) {
                mutate_jpeg(rng, &mut b)
            } else {
                None
            }
        } else {
            None
        };
        how.push(aware.unwrap_or_else(|| fuzz::mutate_bytes_in(rng, &mut b, 0)));
    }
    (b, how)
}

#[test]
fn damaged_images_decode_or_give_a_clear_error() {
    let seeds = seeds();
    let scratch = fuzz::Scratch::new("images");
    let policy = TilePolicy {
        image_size: 56,
        min_tiles: 1,
        max_tiles: 6,
        use_thumbnail: true,
        dynamic: true,
    };
    let pipeline = TilePipeline::internvl_default(56);
    fuzz::run(
        "images",
        fuzz::case_count(5000),
        |rng| {
            let (name, bytes) = rng.pick(&seeds);
            let (bytes, how) = mutated_image(rng, bytes);
            FileCase {
                name: name.clone(),
                bytes,
                how,
            }
        },
        |case| {
            // Mostly in memory; sometimes from a file, as the loader reads them.
            let decoded = if case.bytes.len() % 4 == 0 {
                let path = scratch.path().join(&case.name);
                case.save(scratch.path());
                open_rgb(&path)
            } else {
                decode_rgb(&case.bytes, &case.name)
            };
            let img = decoded.map_err(|e| e.to_string())?;
            // What a sample does next, for images of a size a sample could have.
            if u64::from(img.width()) * u64::from(img.height()) <= 1 << 22 {
                let tiles = tile(&img, &policy);
                let values = pipeline.apply_all(&tiles);
                assert_eq!(values.len(), tiles.images.len() * 3 * 56 * 56);
            }
            Ok(())
        },
    );
}

// Inputs the fuzzer found, kept as plain tests.

#[test]
fn a_jpeg_header_claiming_gigapixels_is_too_large_not_decoded() {
    // Found as a demo JPEG of 2 KB whose frame header claimed 30000 x 30000 pixels:
    // libjpeg-turbo allocated and decoded 2.7 GB for it (seconds). Its largest size, 65000 a
    // side, needs 12.7 GB.
    let mut b = fuzz::seed(&root(), "tests/fixtures/images/tiny.jpg");
    let sof = (2..b.len() - 1)
        .find(|&i| b[i] == 0xFF && matches!(b[i + 1], 0xC0 | 0xC2))
        .expect("a frame header");
    let side = 65000u16.to_be_bytes();
    b[sof + 5..sof + 9].copy_from_slice(&[side[0], side[1], side[0], side[1]]);
    let e = fuzz::within("decode_rgb", move || decode_rgb(&b, "huge.jpg")).expect_err("too large");
    assert!(
        matches!(e, mmc_runtime::data::image::ImageError::TooLarge { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("65000x65000"), "{e}");
}

#[test]
fn decoder_messages_stay_on_one_line() {
    // Found (and cut down) as a JPEG whose markers end right after a restart marker: the JPEG
    // decoder's message ended with a line break.
    let e = decode_rgb(&[0xFF, 0xD8, 0xFF, 0xD4, 0xFF, 0xD9], "cut.jpg")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("image cut.jpg: ") && !e.contains('\n'),
        "{e:?}"
    );
}
