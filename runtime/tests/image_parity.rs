//! Parity of mmc's image path with PIL + torchvision, against `tests/fixtures/images/`
//! (made by `tests/fixtures/make_image_fixtures.py`): decoding, PIL's bicubic resize,
//! InternVL's tiling, the per-tile pipeline, and clean errors for damaged files.

use image::RgbImage;
use mmc_runtime::data::image::{
    candidate_grids, decode_rgb, open_rgb, resize_bicubic, resize_bicubic_as, tile, ImageError,
    Pillow, TilePipeline, TilePolicy, TileTransform, IMAGENET_MEAN, IMAGENET_STD,
};
use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;
use std::sync::OnceLock;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/images")
}

fn reference() -> SafeTensors<'static> {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    let bytes = BYTES.get_or_init(|| {
        std::fs::read(dir().join("reference.safetensors")).expect("reference.safetensors")
    });
    SafeTensors::deserialize(bytes).expect("valid safetensors")
}

fn ref_u8(st: &SafeTensors, key: &str) -> (Vec<usize>, Vec<u8>) {
    let t = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    assert_eq!(t.dtype(), Dtype::U8, "{key}");
    (t.shape().to_vec(), t.data().to_vec())
}

fn ref_f32(st: &SafeTensors, key: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    assert_eq!(t.dtype(), Dtype::F32, "{key}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    (t.shape().to_vec(), v.collect())
}

fn ref_i64(st: &SafeTensors, key: &str) -> (Vec<usize>, Vec<i64>) {
    let t = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    assert_eq!(t.dtype(), Dtype::I64, "{key}");
    let v = t.data().chunks_exact(8).map(|b| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        i64::from_le_bytes(a)
    });
    (t.shape().to_vec(), v.collect())
}

fn ref_image(st: &SafeTensors, key: &str) -> RgbImage {
    let (shape, data) = ref_u8(st, key);
    assert_eq!(shape.len(), 3, "{key}");
    assert_eq!(shape[2], 3, "{key}");
    RgbImage::from_raw(shape[1] as u32, shape[0] as u32, data).expect("size")
}

/// Largest per-channel difference and how many channel values differ at all.
fn diff(a: &RgbImage, b: &RgbImage) -> (u8, usize) {
    assert_eq!(a.dimensions(), b.dimensions());
    let mut max = 0;
    let mut count = 0;
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        count += usize::from(d != 0);
    }
    (max, count)
}

const SOURCES: [&str; 8] = [
    "wide",
    "tall",
    "square",
    "near_square",
    "three_two",
    "tiny",
    "five_four",
    "four_three",
];

#[test]
fn lossless_decoding_equals_pil() {
    let st = reference();
    for name in SOURCES {
        let want = ref_image(&st, &format!("source/{name}"));
        for ext in ["png", "webp"] {
            let got = open_rgb(&dir().join(format!("{name}.{ext}"))).expect("decodes");
            assert_eq!(diff(&got, &want), (0, 0), "{name}.{ext}");
        }
    }
    for file in [
        "rgba.png",
        "grey.png",
        "la.png",
        "bilevel.png",
        "palette.png",
        "palette_trns.png",
        "palette.gif",
        "palette_trns.gif",
        "grey16.png",
        "rgb16.png",
        "rgba16.png",
        "tiny.bmp",
    ] {
        let want = ref_image(&st, &format!("decode/{file}"));
        let got = open_rgb(&dir().join(file)).expect("decodes");
        assert_eq!(diff(&got, &want), (0, 0), "{file}");
    }
}

/// Measured with zune-jpeg 0.5 (through `image` 0.25) against libjpeg-turbo 3 (Pillow 13):
/// colour JPEGs differ by about 0.4 grey levels on average, with rare large differences where
/// the 4:2:0 chroma is upsampled differently (mostly the last column, up to 15 levels);
/// greyscale and CMYK JPEGs by at most 1; lossy WebP not at all.
#[test]
fn lossy_decoding_is_close_to_pil() {
    let st = reference();
    let mut files: Vec<String> = SOURCES.iter().map(|n| format!("{n}.jpg")).collect();
    files.extend(
        [
            "grey.jpg",
            "exif_rotated.jpg",
            "progressive.jpg",
            "lossy.webp",
            "cmyk.jpg",
        ]
        .map(String::from),
    );
    let mut failures = Vec::new();
    let mut worst = 0;
    for file in &files {
        let want = ref_image(&st, &format!("decode/{file}"));
        let got = open_rgb(&dir().join(file)).expect("decodes");
        // Also checks that EXIF orientation 6 was not applied (the size would be swapped).
        assert_eq!(got.dimensions(), want.dimensions(), "{file}");
        let (max, count) = diff(&got, &want);
        let pairs = got.as_raw().iter().zip(want.as_raw());
        let total: u64 = pairs.clone().map(|(a, b)| u64::from(a.abs_diff(*b))).sum();
        let mean = total as f64 / want.len() as f64;
        let over2 = pairs.filter(|(a, b)| a.abs_diff(**b) > 2).count();
        println!(
            "{file}: max |mmc - PIL| = {max}, mean {mean:.3}, {count} of {} values differ, \
             {over2} by more than 2",
            want.len()
        );
        worst = worst.max(max);
        let (max_bound, mean_bound) = match file.as_str() {
            // CMYK goes through the image crate; everything else through libjpeg-turbo or a
            // lossless path, which give PIL's exact pixels.
            "cmyk.jpg" => (1, 0.05),
            _ => (0, 0.0),
        };
        if max > max_bound || mean > mean_bound {
            failures.push(format!(
                "{file}: max {max} (bound {max_bound}), mean {mean:.3}"
            ));
        }
    }
    println!("worst difference: {worst}");
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
fn resize_is_within_one_level_of_pil() {
    let st = reference();
    let mut keys: Vec<String> = st
        .names()
        .into_iter()
        .filter(|k| k.starts_with("resize/"))
        .map(String::from)
        .collect();
    keys.sort();
    assert!(keys.len() >= 10);
    let (mut worst, mut worst12, mut differing) = (0, 0, 0);
    for key in keys {
        let case = key.strip_prefix("resize/").expect("prefix");
        let src_name = case.split('/').next().expect("resize/<source>/<w>x<h>");
        let src = ref_image(&st, &format!("source/{src_name}"));
        let want = ref_image(&st, &key);
        let (w, h) = want.dimensions();
        let got = resize_bicubic(&src, w, h);
        let (max, count) = diff(&got, &want);
        // Pillow 12 and earlier: stored where its pass order gives a different result
        let key12 = format!("resize_pillow12/{case}");
        let want12 = if st.names().contains(&key12.as_str()) {
            ref_image(&st, &key12)
        } else {
            want.clone()
        };
        let (max12, count12) = diff(&resize_bicubic_as(&src, w, h, Pillow::Pillow12), &want12);
        println!(
            "{case}: Pillow 13: max {max} ({count} differ), Pillow 12: max {max12} ({count12} differ)"
        );
        worst = worst.max(max);
        worst12 = worst12.max(max12);
        differing += count + count12;
        assert!(
            max <= 1 && max12 <= 1,
            "{case}: max difference {max} / {max12}"
        );
    }
    println!(
        "worst difference: {worst} (Pillow 13), {worst12} (Pillow 12); {differing} values differ"
    );
    // Same size: a copy, as PIL's resize returns.
    let src = ref_image(&st, "source/tiny");
    assert_eq!(resize_bicubic(&src, 20, 15), src);
}

#[test]
fn candidate_grids_follow_pythons_set_order() {
    let st = reference();
    let mut n = 0;
    for key in st.names() {
        let Some(range) = key.strip_prefix("grids/") else {
            continue;
        };
        let (min, max) = range.split_once('_').expect("grids/<min>_<max>");
        let (min, max): (usize, usize) = (min.parse().expect("min"), max.parse().expect("max"));
        let (_, flat) = ref_i64(&st, key);
        let want: Vec<(usize, usize)> = flat
            .chunks_exact(2)
            .map(|p| (p[0] as usize, p[1] as usize))
            .collect();
        assert_eq!(candidate_grids(min, max), want, "{key}");
        n += 1;
    }
    assert!(n >= 5);
}

fn policies() -> serde_json::Value {
    let text = std::fs::read_to_string(dir().join("policies.json")).expect("policies.json");
    serde_json::from_str(&text).expect("valid JSON")
}

#[test]
fn tiles_and_pixels_match_pil_and_torchvision() {
    let st = reference();
    let policies = policies();
    let mut checked = 0;
    let mut worst = 0f32;
    for key in st.names() {
        let Some(rest) = key
            .strip_prefix("tiles/")
            .and_then(|k| k.strip_suffix("/grid"))
        else {
            continue;
        };
        let (name, pname) = rest.split_once('/').expect("tiles/<source>/<policy>");
        let p = &policies[pname];
        let size = p["image_size"].as_u64().expect("image_size") as u32;
        let policy = TilePolicy {
            image_size: size,
            min_tiles: p["min_tiles"].as_u64().expect("min") as usize,
            max_tiles: p["max_tiles"].as_u64().expect("max") as usize,
            use_thumbnail: p["use_thumbnail"].as_bool().expect("thumb"),
            dynamic: p["dynamic"].as_bool().expect("dynamic"),
        };
        let pipeline = match &p["pipeline"] {
            serde_json::Value::Null => TilePipeline::internvl_default(size),
            list => TilePipeline::from_json(list).expect("pipeline parses"),
        };
        let img = open_rgb(&dir().join(format!("{name}.png"))).expect("decodes");
        let tiles = tile(&img, &policy);

        let (_, grid) = ref_i64(&st, key);
        let (_, num) = ref_i64(&st, &format!("tiles/{rest}/num_tiles"));
        assert_eq!(
            [tiles.cols as i64, tiles.rows as i64],
            grid[..],
            "{rest}: grid"
        );
        assert_eq!(tiles.images.len() as i64, num[0], "{rest}: tile count");

        let (shape, want) = ref_f32(&st, &format!("tiles/{rest}/pixels"));
        let side = pipeline.output_size(policy.image_size) as usize;
        assert_eq!(shape, [tiles.images.len(), 3, shape[2], shape[3]], "{rest}");
        if policy.dynamic {
            assert_eq!(shape[2..], [side, side], "{rest}: output_size");
        }
        let got = pipeline.apply_all(&tiles);
        assert_eq!(got.len(), want.len(), "{rest}");
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!(
            "{rest}: grid {grid:?}, {} tiles, max |mmc - torchvision| = {max:e}",
            num[0]
        );
        assert!(max <= 2e-2, "{rest}: max difference {max}");
        worst = worst.max(max);
        checked += 1;
    }
    println!("{checked} cases, worst {worst:e}");
    assert!(checked >= 20);
}

#[test]
fn exact_aspect_ties_follow_internvl() {
    // 100x80 is exactly between 1:1 and 3:2; with 28-pixel tiles the 3x2 grid wins because the
    // image has more than half its pixels, with 56-pixel tiles it does not (2x2 then beats 1x1
    // for the same reason).
    let img = RgbImage::new(100, 80);
    let policy = |s| TilePolicy {
        image_size: s,
        min_tiles: 1,
        max_tiles: 6,
        use_thumbnail: false,
        dynamic: true,
    };
    let t = tile(&img, &policy(28));
    assert_eq!((t.cols, t.rows, t.images.len()), (3, 2, 6));
    let t = tile(&img, &policy(56));
    assert_eq!((t.cols, t.rows, t.images.len()), (2, 2, 4));
}

#[test]
fn tiles_are_row_major_crops_then_thumbnail() {
    let img = open_rgb(&dir().join("wide.png")).expect("decodes");
    let policy = TilePolicy {
        image_size: 28,
        min_tiles: 1,
        max_tiles: 6,
        use_thumbnail: true,
        dynamic: true,
    };
    let tiles = tile(&img, &policy);
    let whole = resize_bicubic(&img, 28 * tiles.cols as u32, 28 * tiles.rows as u32);
    for (k, t) in tiles.images[..tiles.cols * tiles.rows].iter().enumerate() {
        let (x, y) = ((k % tiles.cols) as u32 * 28, (k / tiles.cols) as u32 * 28);
        let crop = image::imageops::crop_imm(&whole, x, y, 28, 28).to_image();
        assert_eq!(t, &crop, "tile {k}");
    }
    assert_eq!(tiles.images.last(), Some(&resize_bicubic(&img, 28, 28)));
    // one tile: no thumbnail
    let tiny = tile(
        &img,
        &TilePolicy {
            max_tiles: 1,
            ..policy.clone()
        },
    );
    assert_eq!(tiny.images.len(), 1);
    // not dynamic: the image itself
    let whole = tile(
        &img,
        &TilePolicy {
            dynamic: false,
            ..policy
        },
    );
    assert_eq!((whole.cols, whole.rows), (1, 1));
    assert_eq!(whole.images, vec![img]);
}

fn mindspeed_example() -> serde_json::Value {
    // examples/internvl3.5/data.json of MindSpeed-MM
    serde_json::from_str(
        r#"[
            {"trans_type": "Pad2Square", "param": {"mean": [0.485, 0.456, 0.406]}},
            {"trans_type": "Resize", "param": {"size": [448, 448], "interpolation": "BICUBIC", "antialias": null}},
            {"trans_type": "ToTensor"},
            {"trans_type": "norm_fun", "param": {"mean":[0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
        ]"#,
    )
    .expect("valid JSON")
}

#[test]
fn pipeline_parses_mindspeeds_example() {
    let p = TilePipeline::from_json(&mindspeed_example()).expect("parses");
    assert_eq!(
        p.0,
        vec![
            TileTransform::Pad2Square {
                fill: [123, 116, 103]
            },
            TileTransform::Resize {
                width: 448,
                height: 448
            },
            TileTransform::ToTensor,
            TileTransform::Normalize {
                mean: IMAGENET_MEAN,
                std: IMAGENET_STD
            },
        ]
    );
    assert_eq!(p.output_size(448), 448);
    assert_eq!(p.output_size(100), 448);
    let mut without_pad = mindspeed_example();
    without_pad.as_array_mut().expect("list").remove(0);
    assert_eq!(
        TilePipeline::from_json(&without_pad).expect("parses"),
        TilePipeline::internvl_default(448)
    );
}

#[test]
fn pipeline_rejects_what_it_cannot_reproduce() {
    let bad = |json: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(json).expect("valid JSON");
        TilePipeline::from_json(&v).expect_err(json)
    };
    let e = bad(r#"[{"trans_type": "RandomHorizontalFlip", "param": {"p": 0.5}}]"#);
    assert!(
        e.contains("RandomHorizontalFlip") && e.contains("[0]"),
        "{e}"
    );
    let e = bad(r#"[{"trans_type": "ToTensor"}, {"trans_type": "Blur"}]"#);
    assert!(e.contains("Blur") && e.contains("[1]"), "{e}");
    let e = bad(
        r#"[{"trans_type": "Resize", "param": {"size": [448, 448], "interpolation": "BILINEAR"}}]"#,
    );
    assert!(e.contains("BILINEAR"), "{e}");
    let e = bad(r#"[{"trans_type": "Resize", "param": {"size": [448, 448]}}]"#);
    assert!(e.contains("interpolation"), "{e}");
    let e =
        bad(r#"[{"trans_type": "Resize", "param": {"size": 448, "interpolation": "BICUBIC"}}]"#);
    assert!(e.contains("448") && e.contains("shorter edge"), "{e}");
    let e = bad(
        r#"[{"trans_type": "Resize", "param": {"size": [448, 448], "interpolation": "bicubic", "scale": 2}}]"#,
    );
    assert!(e.contains("scale"), "{e}");
    let e = bad(r#"[{"trans_type": "norm_fun", "param": {"mean": [0, 0, 0], "std": [1, 1, 1]}}]"#);
    assert!(e.contains("before ToTensor"), "{e}");
    let e = bad(
        r#"[{"trans_type": "ToTensor"}, {"trans_type": "Pad2Square", "param": {"mean": [0, 0, 0]}}]"#,
    );
    assert!(e.contains("after ToTensor"), "{e}");
    let e = bad(
        r#"[{"trans_type": "ToTensor"}, {"trans_type": "norm_fun", "param": {"mean": [0, 0], "std": [1, 1, 1]}}]"#,
    );
    assert!(e.contains("mean"), "{e}");
    let e = bad(r#"{"trans_type": "ToTensor"}"#);
    assert!(e.contains("list"), "{e}");
    // lower-case bicubic is fine
    let ok: serde_json::Value = serde_json::from_str(
        r#"[{"trans_type": "Resize", "param": {"size": [32, 48], "interpolation": "bicubic"}}]"#,
    )
    .expect("valid JSON");
    let p = TilePipeline::from_json(&ok).expect("parses");
    assert_eq!(
        p.0,
        vec![TileTransform::Resize {
            width: 48,
            height: 32
        }]
    );
    assert_eq!(p.output_dims(10, 10), (48, 32));
}

#[test]
fn pipeline_without_to_tensor_gives_unit_floats() {
    let img = open_rgb(&dir().join("tiny.png")).expect("decodes");
    let out = TilePipeline(vec![]).apply(&img);
    let plane = (img.width() * img.height()) as usize;
    assert_eq!(out.len(), 3 * plane);
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            assert_eq!(out[c * plane + i], f32::from(px[c]) / 255.0);
        }
    }
    // Pad2Square alone: the padding colour shows in [0, 1] floats
    let p = TilePipeline(vec![TileTransform::Pad2Square { fill: [255, 0, 51] }]);
    let out = p.apply(&img); // 20x15 -> 20x20, 2 rows of padding on top
    assert_eq!(out.len(), 3 * 400);
    assert_eq!([out[0], out[400], out[800]], [1.0, 0.0, 0.2]);
    assert_eq!(out[2 * 20], f32::from(img.get_pixel(0, 0)[0]) / 255.0);
}

#[test]
fn damaged_files_are_errors_naming_the_file() {
    let check = |file: &str, what: fn(&ImageError) -> bool| {
        let path = dir().join(file);
        let e = open_rgb(&path).expect_err(file);
        let msg = e.to_string();
        println!("{file}: {msg}");
        assert!(what(&e), "{file}: unexpected kind: {e:?}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert_eq!(e.name(), path.display().to_string());
    };
    check("does_not_exist.png", |e| {
        matches!(e, ImageError::NotFound { .. })
    });
    check("truncated.jpg", |e| {
        matches!(e, ImageError::Truncated { .. })
    });
    check("truncated.png", |e| {
        matches!(e, ImageError::Truncated { .. } | ImageError::Corrupt { .. })
    });
    check("garbage.jpg", |e| {
        matches!(e, ImageError::Unsupported { .. })
    });
    check("empty.png", |e| matches!(e, ImageError::Truncated { .. }));
    // a directory is not readable as a file
    let e = open_rgb(&dir()).expect_err("directory");
    assert!(matches!(e, ImageError::Io { .. }), "{e:?}");

    // in memory: a JPEG with its end-of-image marker cut off, a PNG with a damaged IDAT
    let jpg = std::fs::read(dir().join("tiny.jpg")).expect("read");
    let e = decode_rgb(&jpg[..jpg.len() - 2], "cut.jpg").expect_err("no EOI");
    assert!(
        matches!(e, ImageError::Truncated { .. }) && e.to_string().contains("cut.jpg"),
        "{e}"
    );
    let mut png = std::fs::read(dir().join("tiny.png")).expect("read");
    let mid = png.len() / 2;
    png[mid] ^= 0x5a;
    let e = decode_rgb(&png, "flipped.png").expect_err("bad CRC");
    assert!(e.to_string().contains("flipped.png"), "{e}");
    // a PNG signature followed by garbage; a TIFF header (a format mmc does not decode)
    let mut fake = b"\x89PNG\r\n\x1a\n".to_vec();
    fake.extend((0..200u32).map(|i| (i * 37 % 251) as u8));
    let e = decode_rgb(&fake, "fake.png").expect_err("garbage after the signature");
    assert!(
        matches!(e, ImageError::Corrupt { .. } | ImageError::Truncated { .. }),
        "{e:?}"
    );
    let e = decode_rgb(b"II*\x00\x08\x00\x00\x00\x00\x00", "scan.tif").expect_err("TIFF");
    assert!(matches!(e, ImageError::Unsupported { .. }), "{e:?}");
    assert!(e.to_string().contains("scan.tif"), "{e}");
}

#[test]
fn every_truncation_is_an_error_or_an_image_never_a_panic() {
    for file in [
        "tiny.png",
        "tiny.jpg",
        "tiny.webp",
        "palette.gif",
        "tiny.bmp",
        "lossy.webp",
    ] {
        let bytes = std::fs::read(dir().join(file)).expect("read");
        let mut errors = 0;
        for n in 0..bytes.len() {
            match decode_rgb(&bytes[..n], file) {
                Ok(img) => assert!(img.width() > 0 && img.height() > 0),
                Err(e) => {
                    assert_eq!(e.name(), file);
                    errors += 1;
                }
            }
        }
        println!("{file}: {errors} of {} prefixes are errors", bytes.len());
        if file.ends_with(".jpg") {
            assert_eq!(errors, bytes.len(), "every cut JPEG must be rejected");
        }
    }
}
