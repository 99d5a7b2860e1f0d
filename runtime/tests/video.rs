//! Video frame sampling and decoding against tests/fixtures/video (made by
//! tests/fixtures/make_video_fixtures.py): InternVL's frame indices computed with numpy, and the
//! test video decoded by PyAV.

use std::path::{Path, PathBuf};

use image::RgbImage;
use mmc_runtime::data::video::{self, SamplingMethod, VideoError};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use safetensors::{Dtype, SafeTensors};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/video")
        .join(name)
}

struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    fn load() -> Self {
        let bytes =
            std::fs::read(fixture("reference.safetensors")).expect("read reference.safetensors");
        Reference { bytes }
    }

    fn tensor(&self, name: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).expect("parse reference.safetensors");
        let t = st
            .tensor(name)
            .unwrap_or_else(|e| panic!("tensor {name}: {e}"));
        (t.dtype(), t.shape().to_vec(), t.data().to_vec())
    }

    fn ints(&self, name: &str) -> Vec<i64> {
        let (dtype, _, data) = self.tensor(name);
        match dtype {
            Dtype::I64 => data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::I32 => data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            d => panic!("{name}: unexpected dtype {d:?}"),
        }
    }

    fn floats(&self, name: &str) -> Vec<f64> {
        let (dtype, _, data) = self.tensor(name);
        assert_eq!(dtype, Dtype::F64, "{name}");
        data.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn usizes(&self, name: &str) -> Vec<usize> {
        self.ints(name).into_iter().map(|v| v as usize).collect()
    }

    /// Case `k` of a ragged list stored as `name` + `name_offsets`.
    fn ragged(&self, name: &str) -> Vec<Vec<usize>> {
        let flat = self.usizes(name);
        let offsets = self.usizes(&format!("{name}_offsets"));
        offsets
            .windows(2)
            .map(|w| flat[w[0]..w[1]].to_vec())
            .collect()
    }

    /// Frames of a uint8 [T, H, W, 3] tensor.
    fn frames(&self, name: &str) -> Vec<RgbImage> {
        let (dtype, shape, data) = self.tensor(name);
        assert_eq!(dtype, Dtype::U8);
        let (h, w) = (shape[1], shape[2]);
        data.chunks_exact(h * w * 3)
            .map(|c| RgbImage::from_raw(w as u32, h as u32, c.to_vec()).unwrap())
            .collect()
    }

    /// The source frames (palette[source_index]): what frames/ and video.gif hold.
    fn source_frames(&self) -> Vec<RgbImage> {
        let (_, shape, index) = self.tensor("source_index");
        let (_, _, palette) = self.tensor("palette");
        let (h, w) = (shape[1], shape[2]);
        index
            .chunks_exact(h * w)
            .map(|frame| {
                let px: Vec<u8> = frame
                    .iter()
                    .flat_map(|&i| palette[3 * i as usize..3 * i as usize + 3].to_vec())
                    .collect();
                RgbImage::from_raw(w as u32, h as u32, px).unwrap()
            })
            .collect()
    }
}

#[cfg(feature = "video")]
fn max_abs_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// The fixture "videos" this build can read: container files need the `video` feature.
fn readable() -> Vec<&'static str> {
    if cfg!(feature = "video") {
        vec!["video.mp4", "frames", "video.gif"]
    } else {
        vec!["frames", "video.gif"]
    }
}

#[test]
fn sampling_method_parses_and_rejects() {
    assert_eq!("rand".parse::<SamplingMethod>(), Ok(SamplingMethod::Rand));
    assert_eq!(
        "middle".parse::<SamplingMethod>(),
        Ok(SamplingMethod::Middle)
    );
    assert_eq!(
        "fps1.0".parse::<SamplingMethod>(),
        Ok(SamplingMethod::Fps(1.0))
    );
    assert_eq!(
        "fps0.5".parse::<SamplingMethod>(),
        Ok(SamplingMethod::Fps(0.5))
    );
    // Display writes the data.json spelling back.
    for text in ["rand", "middle", "fps0.5", "fps2"] {
        assert_eq!(text.parse::<SamplingMethod>().unwrap().to_string(), text);
    }
    for bad in [
        "", "random", "Middle", "fps", "fps0", "fps-1", "fpsx", "fpsinf", "1.0",
    ] {
        let err = bad.parse::<SamplingMethod>().unwrap_err().to_string();
        assert!(
            err.contains("sampling_method") && err.contains("middle"),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn probe_counts_frames_and_fps() {
    let r = Reference::load();
    let frames = r.usizes("frame_count")[0];
    let fps = r.floats("avg_fps")[0];
    assert_eq!(frames, 40);
    // The mp4's header has the frame count; the mkv's has none, so only counting packets works.
    let containers: &[&str] = if cfg!(feature = "video") {
        &["video.mp4", "video.mkv"]
    } else {
        &[]
    };
    for &name in containers {
        let info = video::probe(&fixture(name)).unwrap();
        assert_eq!(info.frames, frames, "{name}");
        assert_eq!(info.fps, fps, "{name}");
    }
    for name in ["frames", "video.gif"] {
        let info = video::probe(&fixture(name)).unwrap();
        assert_eq!((info.frames, info.fps), (frames, 1.0), "{name}");
    }
}

#[test]
fn middle_indices_match_internvl() {
    let r = Reference::load();
    let cases = r.usizes("middle_cases");
    let expected = r.ragged("middle");
    assert_eq!(cases.len() / 2, expected.len());
    for (k, want) in expected.iter().enumerate() {
        let (n, vlen) = (cases[2 * k], cases[2 * k + 1]);
        let got = video::frame_indices(n, vlen, SamplingMethod::Middle, 10.0, &mut rng(0));
        assert_eq!(&got, want, "middle, num_frames {n}, vlen {vlen}");
    }
}

#[test]
fn rand_indices_fall_in_their_segments_and_are_reproducible() {
    let r = Reference::load();
    let cases = r.usizes("middle_cases");
    let intervals = r.ragged("intervals");
    let mut checked_segments = 0;
    let mut fallbacks = 0;
    for (k, bounds) in intervals.iter().enumerate() {
        let (n, vlen) = (cases[2 * k], cases[2 * k + 1]);
        let acc = n.min(vlen);
        for seed in 0..5 {
            let got = video::frame_indices(n, vlen, SamplingMethod::Rand, 10.0, &mut rng(seed));
            assert_eq!(
                got,
                video::frame_indices(n, vlen, SamplingMethod::Rand, 10.0, &mut rng(seed))
            );
            assert_eq!(got.len(), n, "num_frames {n}, vlen {vlen}");
            assert!(got.iter().all(|&i| i < vlen));
            // Padding repeats the last picked index.
            assert!(got[acc..].iter().all(|&i| i == got[acc - 1]));
            if bounds.windows(2).all(|w| w[1] - w[0] >= 2) {
                // InternVL: random.choice(range(b_i, b_{i+1} - 1)).
                for (i, w) in bounds.windows(2).enumerate() {
                    assert!(
                        w[0] <= got[i] && got[i] < w[1] - 1,
                        "n {n} vlen {vlen} seg {i}: {} not in {w:?}",
                        got[i]
                    );
                    checked_segments += 1;
                }
            } else {
                // A one-frame segment: InternVL's fallback, distinct sorted frames of the whole video.
                let picked = &got[..acc];
                assert!(
                    picked.windows(2).all(|w| w[0] < w[1]),
                    "n {n} vlen {vlen}: {picked:?}"
                );
                fallbacks += 1;
            }
        }
    }
    assert!(
        checked_segments > 1000 && fallbacks > 100,
        "{checked_segments} {fallbacks}"
    );
    // Different seeds give different picks.
    let a = video::frame_indices(8, 1000, SamplingMethod::Rand, 10.0, &mut rng(1));
    let b = video::frame_indices(8, 1000, SamplingMethod::Rand, 10.0, &mut rng(2));
    assert_ne!(a, b);
}

#[test]
fn padding_when_video_is_shorter_than_num_frames() {
    assert_eq!(
        video::frame_indices(6, 3, SamplingMethod::Middle, 1.0, &mut rng(0)),
        vec![0, 1, 2, 2, 2, 2]
    );
    let got = video::frame_indices(6, 3, SamplingMethod::Rand, 1.0, &mut rng(0));
    assert_eq!(got, vec![0, 1, 2, 2, 2, 2]);
    assert_eq!(
        video::frame_indices(4, 1, SamplingMethod::Rand, 1.0, &mut rng(0)),
        vec![0; 4]
    );
    assert!(video::frame_indices(4, 0, SamplingMethod::Middle, 1.0, &mut rng(0)).is_empty());
    assert!(video::frame_indices(0, 10, SamplingMethod::Middle, 1.0, &mut rng(0)).is_empty());
}

#[test]
fn fps_indices_match_internvl() {
    let r = Reference::load();
    let cases = r.floats("fps_cases");
    let expected = r.ragged("fps");
    assert_eq!(cases.len() / 3, expected.len());
    let mut empty = 0;
    for (j, want) in expected.iter().enumerate() {
        let (out_fps, vlen, in_fps) = (cases[3 * j], cases[3 * j + 1] as usize, cases[3 * j + 2]);
        // num_frames plays no part in fps sampling.
        for n in [1, 8, 1000] {
            let got =
                video::frame_indices(n, vlen, SamplingMethod::Fps(out_fps), in_fps, &mut rng(0));
            assert_eq!(&got, want, "fps{out_fps}, vlen {vlen}, input fps {in_fps}");
        }
        empty += want.is_empty() as usize;
    }
    assert!(
        empty >= 1,
        "the fixture covers a video too short for any fps sample"
    );
}

#[test]
#[cfg(feature = "video")]
fn decoded_frames_match_pyav() {
    let r = Reference::load();
    let decoded = r.frames("decoded");
    let mut worst = 0;
    let mut lists = 0;
    for name in ["video.mp4", "video.mkv"] {
        for k in 0.. {
            let key = format!("read_{k}");
            let st = SafeTensors::deserialize(&r.bytes).unwrap();
            if st.tensor(&key).is_err() {
                break;
            }
            let indices = r.usizes(&key);
            let frames = video::read_frames(&fixture(name), &indices).unwrap();
            assert_eq!(frames.len(), indices.len());
            for (img, &i) in frames.iter().zip(&indices) {
                let d = max_abs_diff(img, &decoded[i]);
                assert!(d <= 2, "{name} frame {i}: max difference {d} grey levels");
                worst = worst.max(d);
            }
            lists += 1;
        }
    }
    assert_eq!(lists, 10);
    println!("max pixel difference to PyAV over all frames: {worst}");
    assert_eq!(
        worst, 0,
        "expected bit-exact RGB (same decoder, same swscale path)"
    );
}

#[test]
fn frame_folder_and_gif_give_the_source_frames() {
    let r = Reference::load();
    let source = r.source_frames();
    let all: Vec<usize> = (0..source.len()).collect();
    for name in ["frames", "video.gif"] {
        let frames = video::read_frames(&fixture(name), &all).unwrap();
        assert_eq!(frames.len(), source.len());
        for (i, (a, b)) in frames.iter().zip(&source).enumerate() {
            assert_eq!(a, b, "{name} frame {i}");
        }
        let picked = video::read_frames(&fixture(name), &[7, 3, 3, 39]).unwrap();
        let want = [&source[7], &source[3], &source[3], &source[39]];
        assert!(picked.iter().zip(want).all(|(a, b)| a == b), "{name}");
    }
}

#[test]
fn frame_folder_sorts_numbers_by_value() {
    let dir = tempfile::tempdir().unwrap();
    for (i, name) in ["f_10.png", "f_2.png", "f_1.png", "notes.txt", ".hidden.png"]
        .iter()
        .enumerate()
    {
        let path = dir.path().join(name);
        if name.ends_with(".png") {
            RgbImage::from_pixel(2, 2, image::Rgb([i as u8, 0, 0]))
                .save(&path)
                .unwrap();
        } else {
            std::fs::write(&path, "not a frame").unwrap();
        }
    }
    let info = video::probe(dir.path()).unwrap();
    assert_eq!(info.frames, 3);
    let frames = video::read_frames(dir.path(), &[0, 1, 2]).unwrap();
    let red: Vec<u8> = frames.iter().map(|f| f.get_pixel(0, 0)[0]).collect();
    assert_eq!(red, vec![2, 1, 0], "f_1, f_2, f_10");
}

#[test]
fn sample_frames_respects_min_max_and_cap() {
    let r = Reference::load();
    let decoded = r.frames("decoded");
    let source = r.source_frames();
    for name in readable() {
        let path = fixture(name);
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..30 {
            let frames = video::sample_frames(
                &path,
                4,
                12,
                100,
                SamplingMethod::Rand,
                None,
                &mut rng(seed),
            )
            .unwrap();
            assert!((4..=12).contains(&frames.len()), "{name}: {}", frames.len());
            seen.insert(frames.len());
            let capped =
                video::sample_frames(&path, 4, 12, 5, SamplingMethod::Rand, None, &mut rng(seed))
                    .unwrap();
            assert!(
                (4..=5).contains(&capped.len()),
                "{name} capped: {}",
                capped.len()
            );
        }
        assert!(seen.len() > 3, "{name}: t_num should vary: {seen:?}");
        let exact = video::sample_frames(&path, 6, 6, 6, SamplingMethod::Middle, None, &mut rng(0))
            .unwrap();
        let want: Vec<usize> =
            video::frame_indices(6, 40, SamplingMethod::Middle, 1.0, &mut rng(0));
        let reference = if name == "video.mp4" {
            &decoded
        } else {
            &source
        };
        assert_eq!(exact.len(), 6);
        for (img, &i) in exact.iter().zip(&want) {
            assert_eq!(img, &reference[i], "{name} middle frame {i}");
        }
        // fps sampling at 2 frames per video-second, cut to min(max, cap). GIFs and folders run at
        // 1 fps, so the indices are [0, 1, 1], and a GIF keeps each frame once.
        let fps = video::sample_frames(
            &path,
            1,
            3,
            100,
            SamplingMethod::Fps(2.0),
            None,
            &mut rng(0),
        )
        .unwrap();
        assert_eq!(fps.len(), if name == "video.gif" { 2 } else { 3 }, "{name}");
    }
    // A folder with fewer frames than t_num gives all of them.
    let all = video::sample_frames(
        &fixture("frames"),
        48,
        64,
        64,
        SamplingMethod::Rand,
        None,
        &mut rng(0),
    )
    .unwrap();
    assert_eq!(all, source);
}

#[test]
#[cfg(feature = "video")]
fn sample_frames_fps_and_padding_of_a_video() {
    let decoded = Reference::load().frames("decoded");
    // The video is 4 s at 10 fps: fps2.0 gives 8 frames when max and cap allow.
    let fps = video::sample_frames(
        &fixture("video.mp4"),
        1,
        32,
        32,
        SamplingMethod::Fps(2.0),
        None,
        &mut rng(0),
    )
    .unwrap();
    assert_eq!(fps.len(), 8);
    // A video with fewer frames than t_num is padded with its last frame.
    let padded = video::sample_frames(
        &fixture("video.mp4"),
        48,
        48,
        64,
        SamplingMethod::Middle,
        None,
        &mut rng(0),
    )
    .unwrap();
    assert_eq!(padded.len(), 48);
    assert!(padded[40..].iter().all(|f| f == &decoded[39]));
}

#[test]
#[cfg(feature = "video")]
fn sample_frames_clip() {
    let r = Reference::load();
    let decoded = r.frames("decoded");
    // Clip 1.0 s .. 2.0 s at 10 fps: frames 10..20; 'middle' of 5 segments of 2 frames.
    let frames = video::sample_frames(
        &fixture("video.mp4"),
        5,
        5,
        8,
        SamplingMethod::Middle,
        Some((1.0, 2.0)),
        &mut rng(0),
    )
    .unwrap();
    let want = [10, 12, 14, 16, 18];
    assert_eq!(frames.len(), want.len());
    for (img, &i) in frames.iter().zip(&want) {
        assert_eq!(img, &decoded[i], "clip frame {i}");
    }
    // A clip reaching past the end is cut to the video; one starting after it is an error.
    let tail = video::sample_frames(
        &fixture("video.mp4"),
        2,
        2,
        8,
        SamplingMethod::Middle,
        Some((3.5, 9.0)),
        &mut rng(0),
    )
    .unwrap();
    // Frames 35..40: segments [35, 37) and [37, 40).
    assert_eq!((&tail[0], &tail[1]), (&decoded[35], &decoded[38]));
    for clip in [(5.0, 6.0), (2.0, 1.0), (f64::NAN, 1.0), (-1.0, 1.0)] {
        let err = video::sample_frames(
            &fixture("video.mp4"),
            2,
            2,
            8,
            SamplingMethod::Middle,
            Some(clip),
            &mut rng(0),
        )
        .unwrap_err();
        assert!(
            matches!(err, VideoError::BadRequest { .. }),
            "{clip:?}: {err}"
        );
    }
}

#[test]
fn sample_frames_rejects_bad_requests() {
    let path = fixture("video.mp4");
    let m = SamplingMethod::Middle;
    for (min, max, cap) in [(8, 4, 10), (0, 0, 10), (1, 4, 0)] {
        let err = video::sample_frames(&path, min, max, cap, m, None, &mut rng(0)).unwrap_err();
        assert!(matches!(err, VideoError::BadRequest { .. }), "{err}");
        assert!(err.to_string().contains("video.mp4"), "{err}");
    }
    // fps sampling of a 4 s video at one frame per 10 s picks nothing.
    if cfg!(feature = "video") {
        let method = SamplingMethod::Fps(0.1);
        let err = video::sample_frames(&path, 1, 8, 8, method, None, &mut rng(0)).unwrap_err();
        assert!(err.to_string().contains("no frames"), "{err}");
    }
    // Frames past the end.
    for name in readable() {
        let err = video::read_frames(&fixture(name), &[3, 40]).unwrap_err();
        assert!(
            matches!(
                err,
                VideoError::FrameOutOfRange {
                    index: 40,
                    available: 40,
                    ..
                }
            ),
            "{name}: {err}"
        );
    }
}

/// Asserts a clear one-line error naming the file, and returns it.
fn check_error(path: &Path, err: VideoError) -> VideoError {
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "multi-line error: {msg}");
    let name = path.file_name().unwrap().to_str().unwrap();
    assert!(msg.contains(name), "error does not name {name}: {msg}");
    println!("{msg}");
    err
}

fn sample(path: &Path, rng: &mut ChaCha8Rng) -> Result<Vec<RgbImage>, VideoError> {
    video::sample_frames(path, 4, 8, 8, SamplingMethod::Rand, None, rng)
}

#[test]
fn missing_and_bad_gifs_and_folders_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rng(0);
    for name in ["missing.mp4", "missing.gif", "missing_folder"] {
        let missing = dir.path().join(name);
        for err in [
            video::probe(&missing).unwrap_err(),
            video::read_frames(&missing, &[0]).unwrap_err(),
            sample(&missing, &mut rng).unwrap_err(),
        ] {
            assert!(matches!(
                check_error(&missing, err),
                VideoError::Missing { .. }
            ));
        }
    }

    // A GIF header asking for a 24864 x 25710 canvas, and a GIF cut in half.
    let bad_gif = dir.path().join("broken.gif");
    std::fs::write(&bad_gif, "GIF89a and then nothing useful").unwrap();
    check_error(&bad_gif, video::probe(&bad_gif).unwrap_err());
    check_error(&bad_gif, video::read_frames(&bad_gif, &[0]).unwrap_err());
    let gif = std::fs::read(fixture("video.gif")).unwrap();
    let cut_gif = dir.path().join("cut.gif");
    std::fs::write(&cut_gif, &gif[..gif.len() / 2]).unwrap();
    check_error(&cut_gif, video::probe(&cut_gif).unwrap_err());
    let all: Vec<usize> = (0..40).collect();
    check_error(&cut_gif, video::read_frames(&cut_gif, &all).unwrap_err());

    let no_frames = dir.path().join("empty_folder");
    std::fs::create_dir(&no_frames).unwrap();
    let err = check_error(&no_frames, video::probe(&no_frames).unwrap_err());
    assert!(matches!(err, VideoError::NoFrames { .. }));

    let bad_frame_dir = dir.path().join("bad_frames");
    std::fs::create_dir(&bad_frame_dir).unwrap();
    std::fs::write(bad_frame_dir.join("frame_0.png"), "not a png").unwrap();
    let err = check_error(
        &bad_frame_dir,
        video::read_frames(&bad_frame_dir, &[0]).unwrap_err(),
    );
    assert!(err.to_string().contains("frame_0.png"), "{err}");
}

#[test]
#[cfg(not(feature = "video"))]
fn video_files_need_the_video_feature() {
    let path = fixture("video.mp4");
    for err in [
        video::probe(&path).unwrap_err(),
        video::read_frames(&path, &[0]).unwrap_err(),
        sample(&path, &mut rng(0)).unwrap_err(),
    ] {
        let err = check_error(&path, err);
        assert!(matches!(err, VideoError::Unsupported { .. }), "{err:?}");
        assert!(err.to_string().contains("`video` feature"), "{err}");
    }
}

#[test]
#[cfg(feature = "video")]
fn bad_video_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rng(0);

    let text = dir.path().join("notes.mp4");
    std::fs::write(&text, "these are meeting notes, not a video\n".repeat(50)).unwrap();
    for err in [
        video::probe(&text).unwrap_err(),
        video::read_frames(&text, &[0]).unwrap_err(),
        sample(&text, &mut rng).unwrap_err(),
    ] {
        let err = check_error(&text, err);
        assert!(
            matches!(
                err,
                VideoError::NotAVideo { .. } | VideoError::NoVideoStream { .. }
            ),
            "{err:?}"
        );
    }

    let empty = dir.path().join("empty.mp4");
    std::fs::write(&empty, b"").unwrap();
    check_error(&empty, video::probe(&empty).unwrap_err());

    // Cut the mp4 (header first, +faststart) inside its header, and inside its frame data.
    let bytes = std::fs::read(fixture("video.mp4")).unwrap();
    for keep in [200, bytes.len() / 2, bytes.len() - 100] {
        let cut = dir.path().join(format!("cut_{keep}.mp4"));
        std::fs::write(&cut, &bytes[..keep]).unwrap();
        let err = check_error(&cut, video::probe(&cut).unwrap_err());
        assert!(
            matches!(
                err,
                VideoError::NotAVideo { .. } | VideoError::Corrupt { .. }
            ),
            "{err:?}"
        );
        check_error(&cut, sample(&cut, &mut rng).unwrap_err());
        // Reading every frame fails too (either the file or its last frames are unreadable).
        let all: Vec<usize> = (0..40).collect();
        check_error(&cut, video::read_frames(&cut, &all).unwrap_err());
    }

    // Garbage after a valid header.
    let mut garbled = bytes.clone();
    let n = garbled.len();
    for (i, b) in garbled[n / 3..].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(151).wrapping_add(7);
    }
    let garbled_path = dir.path().join("garbled.mp4");
    std::fs::write(&garbled_path, &garbled).unwrap();
    let all: Vec<usize> = (0..40).collect();
    match video::read_frames(&garbled_path, &all) {
        Err(err) => {
            check_error(&garbled_path, err);
        }
        // Decoders conceal damage; what matters is that nothing panics.
        Ok(frames) => assert_eq!(frames.len(), 40),
    }

    // A file with audio only.
    let audio = dir.path().join("tone.wav");
    let mut wav = Vec::new();
    let samples = 800u32;
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + samples * 2).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes()); // PCM
    wav.extend_from_slice(&1u16.to_le_bytes()); // mono
    wav.extend_from_slice(&8000u32.to_le_bytes());
    wav.extend_from_slice(&16000u32.to_le_bytes());
    wav.extend_from_slice(&2u16.to_le_bytes());
    wav.extend_from_slice(&16u16.to_le_bytes());
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&(samples * 2).to_le_bytes());
    wav.extend(std::iter::repeat_n(0u8, samples as usize * 2));
    std::fs::write(&audio, wav).unwrap();
    let err = check_error(&audio, video::probe(&audio).unwrap_err());
    assert!(matches!(err, VideoError::NoVideoStream { .. }), "{err:?}");
}
