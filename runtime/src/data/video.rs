//! Video samples: which frames InternVL's data pipeline picks from a video, and decoding them.
//!
//! A video sample becomes `Frame-1: <image>`, `Frame-2: <image>`, ... in the prompt, one image per
//! frame, so the frame policy decides both the pixels and the sequence length. To train the same
//! model InternVL trains, the policy follows InternVL's `read_frames_decord` / `read_frames_gif` /
//! `read_frames_folder` and `get_frame_indices` (internvl_chat/internvl/train/dataset.py), quirks
//! included; the places where this module deliberately differs are called out on
//! [`sample_frames`].
//!
//! Three kinds of "video" are read:
//! - a container file (mp4, mkv, avi, webm, ...), decoded with FFmpeg; this needs the `video`
//!   Cargo feature (on by default), and without it these files fail with
//!   [`VideoError::Unsupported`];
//! - a `.gif`, decoded with the `image` crate;
//! - a directory of frame images, in name order (digit runs compared as numbers).

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fs;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use image::{AnimationDecoder, RgbImage};
use rand::Rng;

/// How frames are picked (data.json `sampling_method`): "rand" (a random frame per segment),
/// "middle" (segment middles), or "fpsX.Y" (InternVL's fps sampling).
///
/// "rand" is InternVL's training default; "middle" is deterministic, which makes it the one to
/// use for evaluation and parity tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplingMethod {
    /// One random frame from each of `num_frames` equal segments.
    Rand,
    /// The middle frame of each of `num_frames` equal segments.
    Middle,
    /// Frames at this many frames per second of video time, whatever `num_frames` is.
    Fps(f64),
}

/// A `sampling_method` value that is none of the accepted spellings.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "unknown sampling_method {value:?}: expected \"rand\", \"middle\" or \"fps<frames per second>\" \
     such as \"fps1.0\" (a positive number)"
)]
pub struct SamplingMethodError {
    /// The rejected value, as written.
    pub value: String,
}

/// Writes the data.json spelling, so errors and logs show what the config said.
impl std::fmt::Display for SamplingMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SamplingMethod::Rand => f.write_str("rand"),
            SamplingMethod::Middle => f.write_str("middle"),
            SamplingMethod::Fps(rate) => write!(f, "fps{rate}"),
        }
    }
}

impl FromStr for SamplingMethod {
    type Err = SamplingMethodError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || SamplingMethodError {
            value: s.to_string(),
        };
        match s {
            "rand" => Ok(SamplingMethod::Rand),
            "middle" => Ok(SamplingMethod::Middle),
            _ => {
                let rate = s.strip_prefix("fps").ok_or_else(err)?;
                let rate: f64 = rate.trim().parse().map_err(|_| err())?;
                if rate.is_finite() && rate > 0.0 {
                    Ok(SamplingMethod::Fps(rate))
                } else {
                    Err(err())
                }
            }
        }
    }
}

/// What [`sample_frames`] needs to know about a video before choosing frames.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VideoInfo {
    /// Number of frames, counted the way decord's `len(VideoReader)` counts them (see [`probe`]).
    pub frames: usize,
    /// Average frame rate. GIFs and frame folders report 1.0, the rate InternVL assumes for them.
    pub fps: f64,
}

/// Why a video could not be read or sampled. Every message is one line and names the file, so a
/// bad sample in a large data set can be found from the log.
#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    /// The path does not exist.
    #[error("video {}: no such file or directory", path.display())]
    Missing {
        /// The video's path.
        path: PathBuf,
    },
    /// The file system refused (permissions, a directory that cannot be listed, ...).
    #[error("video {}: {source}", path.display())]
    Io {
        /// The video's path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// FFmpeg (or the GIF decoder) does not recognise the file: not a video, or one damaged
    /// beyond recognition (an mp4 cut before its header, for instance).
    #[error("video {}: not a readable video ({reason})", path.display())]
    NotAVideo {
        /// The video's path.
        path: PathBuf,
        /// What the decoder said.
        reason: String,
    },
    /// The container holds no video stream (an audio file, a subtitle file, ...).
    #[error("video {}: the file has no video stream", path.display())]
    NoVideoStream {
        /// The video's path.
        path: PathBuf,
    },
    /// The file opens but its data is damaged or cut short.
    #[error("video {}: corrupt or truncated: {reason}", path.display())]
    Corrupt {
        /// The video's path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The decoder failed on the file's data, or has no decoder for its codec.
    #[error("video {}: decoding failed: {reason}", path.display())]
    Decode {
        /// The video's path.
        path: PathBuf,
        /// What the decoder said.
        reason: String,
    },
    /// The video (or frame folder) has no frames at all.
    #[error("video {}: it has no frames", path.display())]
    NoFrames {
        /// The video's path.
        path: PathBuf,
    },
    /// A frame past the end was asked for.
    #[error("video {}: frame {index} was asked for but only {available} frames could be read", path.display())]
    FrameOutOfRange {
        /// The video's path.
        path: PathBuf,
        /// The first missing frame.
        index: usize,
        /// How many frames the video has.
        available: usize,
    },
    /// One image of a frame folder cannot be decoded.
    #[error("video {}: frame image {}: {source}", path.display(), frame.display())]
    FrameImage {
        /// The frame folder's path.
        path: PathBuf,
        /// The frame image that failed.
        frame: PathBuf,
        /// The image decoder's error.
        source: image::ImageError,
    },
    /// The sampling request cannot be met (bad frame range, a clip outside the video, nothing
    /// sampled).
    #[error("video {}: {reason}", path.display())]
    BadRequest {
        /// The video's path.
        path: PathBuf,
        /// What is wrong with the request.
        reason: String,
    },
    /// Video files need FFmpeg, which this build left out.
    #[error(
        "video {}: decoding video files needs the `video` feature of mmc-runtime (FFmpeg), which this \
         build was compiled without; rebuild without `--no-default-features` (or with `--features video`) \
         and the FFmpeg development libraries installed; frame folders and GIFs work without it",
        path.display()
    )]
    Unsupported {
        /// The video's path.
        path: PathBuf,
    },
}

/// The three kinds of "video" InternVL reads, told apart the way its loader does (directory,
/// `.gif`, anything else).
enum Source {
    Folder,
    Gif,
    Container,
}

fn classify(path: &Path) -> Result<Source, VideoError> {
    let meta = fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => VideoError::Missing {
            path: path.to_path_buf(),
        },
        _ => VideoError::Io {
            path: path.to_path_buf(),
            source: e,
        },
    })?;
    if meta.is_dir() {
        return Ok(Source::Folder);
    }
    let is_gif = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gif"));
    Ok(if is_gif {
        Source::Gif
    } else {
        Source::Container
    })
}

/// Reads a video's frame count and frame rate.
///
/// Container files are counted by demuxing every packet of the video stream without decoding,
/// which is how decord (InternVL's reader) counts, so `frames` agrees with InternVL's `vlen` even
/// for formats whose header has no frame count (Matroska, WebM) or a wrong one. When the header
/// does give a count and fewer packets can be read, the file is reported as truncated. The rate
/// is the stream's average frame rate (decord's `get_avg_fps`), falling back to the nominal rate.
pub fn probe(path: &Path) -> Result<VideoInfo, VideoError> {
    match classify(path)? {
        Source::Folder => Ok(VideoInfo {
            frames: folder_files(path)?.len(),
            fps: 1.0,
        }),
        Source::Gif => {
            let mut frames = 0;
            for frame in gif_decoder(path)?.into_frames() {
                frame.map_err(|e| gif_error(path, e))?;
                frames += 1;
            }
            if frames == 0 {
                return Err(VideoError::NoFrames {
                    path: path.to_path_buf(),
                });
            }
            Ok(VideoInfo { frames, fps: 1.0 })
        }
        Source::Container => container::probe(path),
    }
}

/// InternVL's get_frame_indices: `num_frames` frames out of `vlen` (segment boundaries from
/// linspace(0, vlen, n+1) truncated to int; padding with the last index when vlen < num_frames ...).
///
/// For "rand" and "middle", `n = min(num_frames, vlen)` segments `[b_i, b_{i+1})` come from
/// `b_i = trunc(i * vlen / n)`. "middle" takes `(b_i + b_{i+1} - 1) / 2`. "rand" takes a uniform
/// index in `[b_i, b_{i+1} - 2]` (InternVL draws from `range(b_i, b_{i+1} - 1)`, so the last frame
/// of a segment is never picked); when some segment has a single frame that range is empty, and
/// InternVL falls back to `n` distinct random frames of the whole video, sorted, which is
/// reproduced here. The list is then padded to `num_frames` with its last index.
///
/// `Fps(r)` ignores `num_frames` and takes the frame nearest (ties to even) to each time
/// `(k + 1/2) / r` seconds within the video, given the video's frame rate `fps`; it may return
/// fewer frames than asked for, or none for a video shorter than half a sampling period.
///
/// Returns an empty list when `vlen` or `num_frames` is 0.
pub fn frame_indices(
    num_frames: usize,
    vlen: usize,
    method: SamplingMethod,
    fps: f64,
    rng: &mut impl Rng,
) -> Vec<usize> {
    match method {
        SamplingMethod::Fps(rate) => fps_indices(vlen, fps, rate, usize::MAX),
        SamplingMethod::Rand | SamplingMethod::Middle => {
            let n = num_frames.min(vlen);
            if n == 0 {
                return Vec::new();
            }
            let bounds = segment_bounds(n, vlen);
            let mut out: Vec<usize> = if method == SamplingMethod::Middle {
                bounds.windows(2).map(|w| (w[0] + w[1] - 1) / 2).collect()
            } else if bounds.windows(2).all(|w| w[1] - w[0] >= 2) {
                bounds
                    .windows(2)
                    .map(|w| rng.random_range(w[0]..w[1] - 1))
                    .collect()
            } else {
                let mut picked = rand::seq::index::sample(rng, vlen, n).into_vec();
                picked.sort_unstable();
                picked
            };
            if let Some(&last) = out.last() {
                out.resize(num_frames, last);
            }
            out
        }
    }
}

/// `np.linspace(0, vlen, n + 1).astype(int)`, computed as numpy does (`i * (vlen / n)`, the last
/// point set to `vlen` exactly) so the truncation lands on the same integers.
fn segment_bounds(n: usize, vlen: usize) -> Vec<usize> {
    let step = vlen as f64 / n as f64;
    (0..=n)
        .map(|i| {
            if i == n {
                vlen
            } else {
                (i as f64 * step) as usize
            }
        })
        .collect()
}

/// InternVL's fps sampling, reproducing `np.arange(d/2, duration + d/2, d)` (length
/// `ceil((stop - start) / d)`, element `i` = `start + i * ((start + d) - start)`) and `np.around`.
/// Stops after `limit` indices.
fn fps_indices(vlen: usize, input_fps: f64, output_fps: f64, limit: usize) -> Vec<usize> {
    if !(input_fps.is_finite() && output_fps.is_finite() && input_fps > 0.0 && output_fps > 0.0) {
        return Vec::new();
    }
    let duration = vlen as f64 / input_fps;
    let delta = 1.0 / output_fps;
    let start = 0.0 + delta / 2.0;
    let stop = duration + delta / 2.0;
    let len = ((stop - start) / delta).ceil();
    if len.is_nan() || len < 1.0 {
        return Vec::new();
    }
    let step = (start + delta) - start;
    let mut out = Vec::new();
    let mut i = 0.0_f64;
    while i < len && out.len() < limit {
        let t = match i {
            0.0 => start,
            1.0 => start + delta,
            _ => start + i * step,
        };
        let index = (t * input_fps).round_ties_even();
        if index >= vlen as f64 {
            break; // the times increase, so every later index is past the end too
        }
        if index >= 0.0 {
            out.push(index as usize);
        }
        i += 1.0;
    }
    out
}

/// Decodes the frames at `indices` (sorted or not, repeats allowed) as RGB images.
///
/// Frame `i` is the `i`-th frame in presentation order. A container file is decoded once,
/// sequentially, up to the largest index, and only the frames asked for are converted to RGB
/// (swscale, `SWS_BILINEAR`, honouring the frame's colour matrix and range, as PyAV's
/// `to_ndarray(format="rgb24")` and decord's filter graph do). GIF frames are composited and
/// their alpha dropped; folder frames are converted to RGB.
pub fn read_frames(path: &Path, indices: &[usize]) -> Result<Vec<RgbImage>, VideoError> {
    match classify(path)? {
        Source::Folder => read_folder(path, &folder_files(path)?, indices),
        Source::Gif => read_gif(path, indices),
        Source::Container => container::read(path, indices),
    }
}

/// The whole policy of InternVL's read_frames_decord: t_num = random integer in [min_num_frames,
/// max_num_frames] (capped by `cap`, the most frames the sample may hold), then frame_indices, then
/// read_frames. Clip support (start, end in seconds) as InternVL does.
///
/// For a container file with `clip = (start, end)`, the clip has `trunc((end - start) * fps)`
/// frames starting at frame `trunc(start * fps)`, as in InternVL. GIFs and frame folders follow
/// InternVL's `read_frames_gif` and `read_frames_folder`: they use a frame rate of 1 and ignore
/// `clip`; a GIF returns each picked frame once, in order (InternVL keeps frames whose index is in
/// the list, so padding repeats vanish); a folder with at most `t_num` frames returns all of them.
///
/// Deliberate differences from InternVL, all for inputs on which InternVL crashes or builds an
/// unbounded sample:
/// - fps sampling is cut to `min(max_num_frames, cap)` frames (InternVL's `get_frame_indices`
///   has this `max_num_frames` cut, but `read_frames_decord` does not pass it);
/// - a clip reaching past the end of the video is shortened to the video;
/// - sampling that picks no frame at all (fps sampling of a very short video) is an error.
pub fn sample_frames(
    path: &Path,
    min_num_frames: usize,
    max_num_frames: usize,
    cap: usize,
    method: SamplingMethod,
    clip: Option<(f64, f64)>,
    rng: &mut impl Rng,
) -> Result<Vec<RgbImage>, VideoError> {
    let bad = |reason: String| VideoError::BadRequest {
        path: path.to_path_buf(),
        reason,
    };
    if min_num_frames > max_num_frames {
        return Err(bad(format!(
            "min_num_frames ({min_num_frames}) is larger than max_num_frames ({max_num_frames})"
        )));
    }
    if max_num_frames == 0 || cap == 0 {
        return Err(bad(format!(
            "cannot sample at most {} frames",
            max_num_frames.min(cap)
        )));
    }
    let source = classify(path)?;
    let t_num = rng.random_range(min_num_frames..=max_num_frames).min(cap);
    let limit = max_num_frames.min(cap);
    let pick = |vlen: usize, fps: f64, rng: &mut _| match method {
        SamplingMethod::Fps(rate) => fps_indices(vlen, fps, rate, limit),
        _ => frame_indices(t_num, vlen, method, fps, rng),
    };
    let frames = match source {
        Source::Container => {
            let info = container::probe(path)?;
            let (vlen, first) = match clip {
                None => (info.frames, 0),
                Some(clip) => clip_range(clip, info).map_err(bad)?,
            };
            let indices: Vec<usize> = pick(vlen, info.fps, rng)
                .into_iter()
                .map(|i| i + first)
                .collect();
            if indices.is_empty() {
                Vec::new()
            } else {
                container::read(path, &indices)?
            }
        }
        Source::Gif => {
            let vlen = probe(path)?.frames;
            let mut indices = pick(vlen, 1.0, rng);
            indices.sort_unstable();
            indices.dedup();
            read_gif(path, &indices)?
        }
        Source::Folder => {
            let files = folder_files(path)?;
            let indices = if files.len() > t_num {
                pick(files.len(), 1.0, rng)
            } else {
                (0..files.len()).collect()
            };
            read_folder(path, &files, &indices)?
        }
    };
    if frames.is_empty() {
        return Err(bad(format!("sampling_method {method} picked no frames")));
    }
    Ok(frames)
}

/// The clip's frame count and first frame, InternVL's `int(duration * fps)` and `int(start * fps)`.
fn clip_range((start, end): (f64, f64), info: VideoInfo) -> Result<(usize, usize), String> {
    if !(start.is_finite() && end.is_finite() && start >= 0.0 && end > start) {
        return Err(format!(
            "clip ({start}, {end}) is not a time range (start >= 0, end > start, in seconds)"
        ));
    }
    let first = (start * info.fps) as usize;
    if first >= info.frames {
        return Err(format!(
            "clip ({start}, {end}) starts after the video's {} frames at {} fps",
            info.frames, info.fps
        ));
    }
    let vlen = (((end - start) * info.fps) as usize).min(info.frames - first);
    if vlen == 0 {
        return Err(format!(
            "clip ({start}, {end}) holds no frame at {} fps",
            info.fps
        ));
    }
    Ok((vlen, first))
}

/// Image files of a frame folder, in name order with digit runs compared as numbers: that agrees
/// with InternVL's sort on the `_<number>.jpg` suffix for its `frame_1.jpg ... frame_10.jpg` style
/// and with plain name order for zero-padded names. Hidden files and files whose extension is not
/// a readable image format are skipped.
fn folder_files(dir: &Path) -> Result<Vec<PathBuf>, VideoError> {
    let io = |e| VideoError::Io {
        path: dir.to_path_buf(),
        source: e,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        let p = entry.path();
        let readable = image::ImageFormat::from_path(&p).is_ok_and(|f| f.reading_enabled());
        if readable && p.is_file() {
            files.push((name.to_string(), p));
        }
    }
    if files.is_empty() {
        return Err(VideoError::NoFrames {
            path: dir.to_path_buf(),
        });
    }
    files.sort_by(|a, b| natural_cmp(&a.0, &b.0).then_with(|| a.0.cmp(&b.0)));
    Ok(files.into_iter().map(|(_, p)| p).collect())
}

/// Compares names with runs of ASCII digits compared by value.
fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i].is_ascii_digit() && b[j].is_ascii_digit() {
            let (si, sj) = (i, j);
            while i < a.len() && a[i].is_ascii_digit() {
                i += 1;
            }
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            let x = trim_zeros(&a[si..i]);
            let y = trim_zeros(&b[sj..j]);
            let ord = x.len().cmp(&y.len()).then_with(|| x.cmp(y));
            if ord != Ordering::Equal {
                return ord;
            }
        } else {
            if a[i] != b[j] {
                return a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
    }
    (a.len() - i).cmp(&(b.len() - j))
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let first = digits
        .iter()
        .position(|&d| d != b'0')
        .unwrap_or(digits.len());
    &digits[first..]
}

fn read_folder(
    dir: &Path,
    files: &[PathBuf],
    indices: &[usize],
) -> Result<Vec<RgbImage>, VideoError> {
    let mut cache: HashMap<usize, RgbImage> = HashMap::new();
    let mut out = Vec::with_capacity(indices.len());
    for &i in indices {
        if let Some(img) = cache.get(&i) {
            out.push(img.clone());
            continue;
        }
        let file = files.get(i).ok_or_else(|| VideoError::FrameOutOfRange {
            path: dir.to_path_buf(),
            index: i,
            available: files.len(),
        })?;
        let img_err = |source| VideoError::FrameImage {
            path: dir.to_path_buf(),
            frame: file.clone(),
            source,
        };
        let img = image::ImageReader::open(file)
            .map_err(|e| img_err(image::ImageError::IoError(e)))?
            .with_guessed_format()
            .map_err(|e| img_err(image::ImageError::IoError(e)))?
            .decode()
            .map_err(img_err)?
            .to_rgb8();
        cache.insert(i, img.clone());
        out.push(img);
    }
    Ok(out)
}

fn gif_decoder(
    path: &Path,
) -> Result<image::codecs::gif::GifDecoder<BufReader<fs::File>>, VideoError> {
    let file = fs::File::open(path).map_err(|e| VideoError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let not_gif = |e: image::ImageError| VideoError::NotAVideo {
        path: path.to_path_buf(),
        reason: one_line(&e.to_string()),
    };
    let mut decoder = image::codecs::gif::GifDecoder::new(BufReader::new(file)).map_err(not_gif)?;
    // The GIF decoder trusts the header's canvas size and allocates it for every frame; a damaged
    // header can ask for gigabytes.
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(GIF_MAX_SIDE);
    limits.max_image_height = Some(GIF_MAX_SIDE);
    image::ImageDecoder::set_limits(&mut decoder, limits).map_err(not_gif)?;
    Ok(decoder)
}

/// Largest GIF canvas side accepted, far above any training video.
const GIF_MAX_SIDE: u32 = 8192;

fn gif_error(path: &Path, e: image::ImageError) -> VideoError {
    VideoError::Corrupt {
        path: path.to_path_buf(),
        reason: one_line(&e.to_string()),
    }
}

fn read_gif(path: &Path, indices: &[usize]) -> Result<Vec<RgbImage>, VideoError> {
    let Some(&last) = indices.iter().max() else {
        return Ok(Vec::new());
    };
    let mut wanted: HashMap<usize, RgbImage> =
        indices.iter().map(|&i| (i, RgbImage::new(0, 0))).collect();
    let mut count = 0;
    for frame in gif_decoder(path)?.into_frames() {
        let frame = frame.map_err(|e| gif_error(path, e))?;
        if let Some(slot) = wanted.get_mut(&count) {
            *slot = image::DynamicImage::ImageRgba8(frame.into_buffer()).to_rgb8();
        }
        count += 1;
        if count > last {
            break;
        }
    }
    if count <= last {
        let index = indices
            .iter()
            .copied()
            .filter(|&i| i >= count)
            .min()
            .unwrap_or(last);
        return Err(VideoError::FrameOutOfRange {
            path: path.to_path_buf(),
            index,
            available: count,
        });
    }
    Ok(indices.iter().map(|i| wanted[i].clone()).collect())
}

/// Decoder messages can span lines; errors here are one line each.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(not(feature = "video"))]
mod container {
    use super::{RgbImage, VideoError, VideoInfo};
    use std::path::Path;

    pub(super) fn probe(path: &Path) -> Result<VideoInfo, VideoError> {
        Err(VideoError::Unsupported {
            path: path.to_path_buf(),
        })
    }

    pub(super) fn read(path: &Path, _indices: &[usize]) -> Result<Vec<RgbImage>, VideoError> {
        Err(VideoError::Unsupported {
            path: path.to_path_buf(),
        })
    }
}

#[cfg(feature = "video")]
mod container {
    //! Container files through FFmpeg (ffmpeg-next).

    use super::{one_line, RgbImage, VideoError, VideoInfo};
    use ff::ffi;
    use ffmpeg_next as ff;
    use std::collections::HashMap;
    use std::os::raw::c_int;
    use std::path::Path;
    use std::sync::Once;

    /// FFmpeg logs every damaged packet to stderr; the errors returned here carry what matters,
    /// so its log is silenced once per process.
    fn init() {
        static INIT: Once = Once::new();
        INIT.call_once(|| {
            // Only fails if a library is missing, which the link step already rules out; the
            // decoders work without it.
            let _ = ff::init();
            ff::util::log::set_level(ff::util::log::Level::Quiet);
        });
    }

    fn reason(e: ff::Error) -> String {
        one_line(&e.to_string())
    }

    /// An opened input and its best video stream.
    struct Opened {
        input: ff::format::context::Input,
        stream: usize,
    }

    fn open(path: &Path) -> Result<Opened, VideoError> {
        init();
        let owned = || path.to_path_buf();
        // ffmpeg-next panics on paths that are not UTF-8 or hold NUL; the `file:` prefix keeps a
        // name with a colon from being taken for a protocol.
        let name =
            path.to_str()
                .filter(|s| !s.contains('\0'))
                .ok_or_else(|| VideoError::NotAVideo {
                    path: owned(),
                    reason: "the path is not valid UTF-8".into(),
                })?;
        let input = ff::format::input(&format!("file:{name}")).map_err(|e| match e {
            ff::Error::Other { errno } if errno == ff::util::error::ENOENT => {
                VideoError::Missing { path: owned() }
            }
            e => VideoError::NotAVideo {
                path: owned(),
                reason: reason(e),
            },
        })?;
        if input
            .streams()
            .all(|s| s.parameters().id() == ff::codec::Id::None)
        {
            // What an mp4 cut inside its header looks like: no stream, or streams of no known codec.
            return Err(VideoError::Corrupt {
                path: owned(),
                reason: "the container describes no stream of a known codec".into(),
            });
        }
        let stream = input
            .streams()
            .best(ff::media::Type::Video)
            .map(|s| s.index())
            .ok_or_else(|| VideoError::NoVideoStream { path: owned() })?;
        Ok(Opened { input, stream })
    }

    fn decoder(path: &Path, opened: &Opened) -> Result<ff::decoder::Video, VideoError> {
        let stream =
            opened
                .input
                .stream(opened.stream)
                .ok_or_else(|| VideoError::NoVideoStream {
                    path: path.to_path_buf(),
                })?;
        let codec =
            ff::codec::context::Context::from_parameters(stream.parameters()).map_err(|e| {
                VideoError::Decode {
                    path: path.to_path_buf(),
                    reason: reason(e),
                }
            })?;
        let id = codec.id();
        codec.decoder().video().map_err(|e| VideoError::Decode {
            path: path.to_path_buf(),
            reason: format!("cannot open a decoder for codec {id:?}: {}", reason(e)),
        })
    }

    /// Reads the next packet of the video stream; `None` at the end of the file.
    fn next_packet(path: &Path, opened: &mut Opened) -> Result<Option<ff::Packet>, VideoError> {
        loop {
            let mut packet = ff::Packet::empty();
            match packet.read(&mut opened.input) {
                Ok(()) => {}
                Err(ff::Error::Eof) => return Ok(None),
                Err(e) => {
                    return Err(VideoError::Corrupt {
                        path: path.to_path_buf(),
                        reason: reason(e),
                    })
                }
            }
            if packet.stream() != opened.stream {
                continue;
            }
            if packet.is_corrupt() {
                return Err(VideoError::Corrupt {
                    path: path.to_path_buf(),
                    reason: "a packet of the video stream is damaged or cut short".into(),
                });
            }
            return Ok(Some(packet));
        }
    }

    pub(super) fn probe(path: &Path) -> Result<VideoInfo, VideoError> {
        let mut opened = open(path)?;
        // Fail here, not later in `read`, when there is no decoder for the codec.
        decoder(path, &opened)?;
        let (declared, fps) =
            {
                let stream = opened.input.stream(opened.stream).ok_or_else(|| {
                    VideoError::NoVideoStream {
                        path: path.to_path_buf(),
                    }
                })?;
                let rate = |r: ff::Rational| {
                    let v = f64::from(r);
                    (r.numerator() > 0 && r.denominator() > 0 && v.is_finite()).then_some(v)
                };
                (
                    stream.frames(),
                    rate(stream.avg_frame_rate()).or_else(|| rate(stream.rate())),
                )
            };
        let mut frames = 0usize;
        while next_packet(path, &mut opened)?.is_some() {
            frames += 1;
        }
        if declared > 0 && (frames as i64) < declared {
            return Err(VideoError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("the header lists {declared} frames but only {frames} can be read"),
            });
        }
        if frames == 0 {
            return Err(VideoError::NoFrames {
                path: path.to_path_buf(),
            });
        }
        let fps = fps.ok_or_else(|| VideoError::Corrupt {
            path: path.to_path_buf(),
            reason: "the video stream has no frame rate".into(),
        })?;
        Ok(VideoInfo { frames, fps })
    }

    /// Converts decoded frames to RGB24, rebuilt when the frame layout or colour tags change.
    struct Converter {
        key: (ff::format::Pixel, u32, u32, c_int, c_int),
        scaler: ff::software::scaling::Context,
    }

    impl Converter {
        fn convert(
            slot: &mut Option<Converter>,
            frame: &ff::frame::Video,
        ) -> Result<RgbImage, ff::Error> {
            // SAFETY: reading two plain fields of a valid decoded frame.
            let (space, range) = unsafe {
                let f = frame.as_ptr();
                ((*f).colorspace as c_int, (*f).color_range as c_int)
            };
            let key = (frame.format(), frame.width(), frame.height(), space, range);
            if slot.as_ref().is_none_or(|c| c.key != key) {
                let mut scaler = ff::software::scaling::Context::get(
                    key.0,
                    key.1,
                    key.2,
                    ff::format::Pixel::RGB24,
                    key.1,
                    key.2,
                    ff::software::scaling::Flags::BILINEAR,
                )?;
                set_colorspace(&mut scaler, space, range);
                *slot = Some(Converter { key, scaler });
            }
            let Some(conv) = slot.as_mut() else {
                return Err(ff::Error::Bug);
            };
            let mut rgb = ff::frame::Video::empty();
            conv.scaler.run(frame, &mut rgb)?;
            let (w, h) = (rgb.width() as usize, rgb.height() as usize);
            let stride = rgb.stride(0);
            let data = rgb.data(0);
            let mut pixels = Vec::with_capacity(w * h * 3);
            for row in 0..h {
                pixels.extend_from_slice(&data[row * stride..row * stride + w * 3]);
            }
            RgbImage::from_raw(w as u32, h as u32, pixels).ok_or(ff::Error::Bug)
        }
    }

    /// Applies the frame's YUV matrix and range, as vf_scale (decord) and PyAV do; untagged frames
    /// keep swscale's defaults (BT.601, range from the pixel format).
    fn set_colorspace(scaler: &mut ff::software::scaling::Context, space: c_int, range: c_int) {
        // SAFETY: the context is valid for the scaler's lifetime; the tables returned by
        // sws_getColorspaceDetails / sws_getCoefficients are static or owned by the context and
        // are only read by sws_setColorspaceDetails.
        unsafe {
            let ctx = scaler.as_mut_ptr();
            let mut inv_table: *mut c_int = std::ptr::null_mut();
            let mut table: *mut c_int = std::ptr::null_mut();
            let (mut src_range, mut dst_range, mut brightness, mut contrast, mut saturation) =
                (0, 0, 0, 0, 0);
            if ffi::sws_getColorspaceDetails(
                ctx,
                &mut inv_table,
                &mut src_range,
                &mut table,
                &mut dst_range,
                &mut brightness,
                &mut contrast,
                &mut saturation,
            ) < 0
            {
                return; // RGB input: no YUV matrix to set
            }
            let inv: *const c_int = if space != ffi::AVColorSpace::AVCOL_SPC_UNSPECIFIED as c_int {
                ffi::sws_getCoefficients(space)
            } else {
                inv_table
            };
            if range == ffi::AVColorRange::AVCOL_RANGE_JPEG as c_int {
                src_range = 1;
            } else if range == ffi::AVColorRange::AVCOL_RANGE_MPEG as c_int {
                src_range = 0;
            }
            ffi::sws_setColorspaceDetails(
                ctx, inv, src_range, table, dst_range, brightness, contrast, saturation,
            );
        }
    }

    /// Collects the wanted frames as the decoder hands them out, in presentation order.
    struct Collector<'a> {
        path: &'a Path,
        wanted: HashMap<usize, Option<RgbImage>>,
        last: usize,
        /// Presentation index of the next decoded frame.
        next: usize,
        frame: ff::frame::Video,
        converter: Option<Converter>,
    }

    impl Collector<'_> {
        fn error(&self, e: ff::Error) -> VideoError {
            VideoError::Decode {
                path: self.path.to_path_buf(),
                reason: format!("at frame {}: {}", self.next, reason(e)),
            }
        }

        /// Takes every frame the decoder has ready; true once the last wanted frame is in.
        fn drain(&mut self, decoder: &mut ff::decoder::Video) -> Result<bool, VideoError> {
            loop {
                match decoder.receive_frame(&mut self.frame) {
                    Ok(()) => {
                        if self.wanted.contains_key(&self.next) {
                            let rgb = Converter::convert(&mut self.converter, &self.frame)
                                .map_err(|e| self.error(e))?;
                            self.wanted.insert(self.next, Some(rgb));
                        }
                        self.next += 1;
                        if self.next > self.last {
                            return Ok(true);
                        }
                    }
                    Err(ff::Error::Eof) => return Ok(false),
                    Err(ff::Error::Other { errno }) if errno == ff::util::error::EAGAIN => {
                        return Ok(false)
                    }
                    Err(e) => return Err(self.error(e)),
                }
            }
        }
    }

    pub(super) fn read(path: &Path, indices: &[usize]) -> Result<Vec<RgbImage>, VideoError> {
        let Some(&last) = indices.iter().max() else {
            return Ok(Vec::new());
        };
        let mut opened = open(path)?;
        let mut decoder = decoder(path, &opened)?;
        let mut sink = Collector {
            path,
            wanted: indices.iter().map(|&i| (i, None)).collect(),
            last,
            next: 0,
            frame: ff::frame::Video::empty(),
            converter: None,
        };
        let mut done = false;
        while !done {
            let Some(packet) = next_packet(path, &mut opened)? else {
                break;
            };
            loop {
                match decoder.send_packet(&packet) {
                    Ok(()) => break,
                    // The decoder's output is full: take frames out and send the packet again.
                    Err(ff::Error::Other { errno }) if errno == ff::util::error::EAGAIN => {
                        let before = sink.next;
                        done = sink.drain(&mut decoder)?;
                        if done {
                            break;
                        }
                        if sink.next == before {
                            return Err(sink.error(ff::Error::Other { errno }));
                        }
                    }
                    Err(e) => return Err(sink.error(e)),
                }
            }
            if !done {
                done = sink.drain(&mut decoder)?;
            }
        }
        if !done {
            decoder.send_eof().map_err(|e| sink.error(e))?;
            sink.drain(&mut decoder)?;
        }
        indices
            .iter()
            .map(|i| match sink.wanted.get(i) {
                Some(Some(img)) => Ok(img.clone()),
                _ => Err(VideoError::FrameOutOfRange {
                    path: path.to_path_buf(),
                    index: *i,
                    available: sink.next,
                }),
            })
            .collect()
    }
}
