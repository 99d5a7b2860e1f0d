//! One annotation line to one packable sample: media decoded and tiled, the conversation
//! templated and tokenised, lengths checked against the plan's static shapes.

use super::chat::{ChatSample, Media, Origin, Role};
use super::config::{DataConfig, DatasetSource, OverLength};
use super::image::{open_rgb, tile, TilePipeline, TilePolicy};
use super::pack::Prepared;
use super::template::{self, Encode};
use super::tokenizer::TextTokenizer;
use super::video::{sample_frames, SamplingMethod};
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A sample that cannot be used, with where it comes from. The message can quote the sample
/// (a path, a turn), so its line breaks are shown escaped to keep it on one line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{origin}: {}", super::one_line(message))]
pub struct SampleError {
    pub origin: Origin,
    pub message: String,
}

/// What became of a sample.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Ready to pack; `truncated` when a text-only sample was cut to the sequence length.
    Ready { sample: Prepared, truncated: bool },
    /// Too long for the plan's shapes without cutting an image (or, with `skip`, a text).
    TooLong { tokens: usize, tiles: usize },
}

/// A line of an annotation file and the dataset it belongs to.
#[derive(Debug, Clone)]
pub struct Entry {
    pub origin: Origin,
    pub source: usize,
    pub sample: Result<ChatSample, String>,
}

impl Encode for TextTokenizer {
    fn encode_text(&self, text: &str) -> Result<Vec<u32>, String> {
        self.encode(text).map_err(|e| e.to_string())
    }
}

/// Everything needed to turn entries into samples; shared by the worker threads.
pub struct SampleMaker {
    pub tokenizer: Arc<TextTokenizer>,
    pub pipeline: TilePipeline,
    pub config: Arc<DataConfig>,
    pub sampling: SamplingMethod,
    pub tokens_per_tile: usize,
    pub seq_length: usize,
    /// 0 for a text-only model.
    pub max_tiles: usize,
    pub seed: u64,
}

fn seed_for(seed: u64, k: u64) -> u64 {
    // SplitMix64 of the stream position: each sample's randomness does not depend on which
    // worker thread prepared it.
    let mut z = seed ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SampleMaker {
    fn resolve(&self, source: &DatasetSource, p: &str) -> PathBuf {
        let path = Path::new(p);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            source.root.join(path)
        }
    }

    /// Tiles per image: the dataset's `max_dynamic_patch` (meta file) or data.json's, shared
    /// among the `n` images of a sample (InternVL: `max(1, max_dynamic_patch // n)`).
    fn policy(&self, source: &DatasetSource, n: usize) -> TilePolicy {
        let max = source
            .max_dynamic_patch
            .unwrap_or(self.config.max_dynamic_patch);
        let max = (max / n.max(1)).max(1);
        TilePolicy {
            image_size: self.config.image_size as u32,
            min_tiles: self.config.min_dynamic_patch.min(max),
            max_tiles: max,
            use_thumbnail: self.config.use_thumbnail,
            dynamic: self.config.dynamic_image_size,
        }
    }

    /// Prepares the `k`-th sample of the stream (k seeds its random choices).
    pub fn make(&self, entry: &Entry, k: u64) -> Result<Outcome, SampleError> {
        let err = |message: String| SampleError {
            origin: entry.origin.clone(),
            message,
        };
        let sample = entry.sample.clone().map_err(err)?;
        let source = &self.config.sources[entry.source];
        let mut turns = sample.conversations;
        let first_human = turns.iter().position(|t| t.role == Role::Human);
        let mut grids = Vec::new();
        let (tiles, image_tokens, text_only): (Vec<Vec<f32>>, Vec<usize>, bool) = match &sample
            .media
        {
            Media::Text => (Vec::new(), Vec::new(), true),
            _ if self.max_tiles == 0 => {
                return Err(err(
                    "the sample has an image or video, but the model has no vision part".into(),
                ))
            }
            Media::Image(p) => {
                let Some(h) = first_human else {
                    return Err(err("an image sample needs a human turn".into()));
                };
                if !turns
                    .iter()
                    .any(|t| t.role == Role::Human && t.value.contains("<image>"))
                {
                    turns[h].value = format!("<image>\n{}", turns[h].value);
                }
                let img = open_rgb(&self.resolve(source, p)).map_err(|e| err(e.to_string()))?;
                let t = tile(&img, &self.policy(source, 1));
                grids.push((t.cols, t.rows));
                let n = t.images.len();
                let tiles = t.images.iter().map(|i| self.pipeline.apply(i)).collect();
                (tiles, vec![n * self.tokens_per_tile], false)
            }
            Media::Images(ps) => {
                let policy = self.policy(source, ps.len());
                let mut tiles = Vec::new();
                let mut counts = Vec::new();
                for p in ps {
                    let img = open_rgb(&self.resolve(source, p)).map_err(|e| err(e.to_string()))?;
                    let t = tile(&img, &policy);
                    grids.push((t.cols, t.rows));
                    counts.push(t.images.len() * self.tokens_per_tile);
                    tiles.extend(t.images.iter().map(|i| self.pipeline.apply(i)));
                }
                (tiles, counts, false)
            }
            Media::Video { path, clip } => {
                let Some(h) = first_human else {
                    return Err(err("a video sample needs a human turn".into()));
                };
                if !turns[h].value.contains("<video>") {
                    turns[h].value = format!("<video>\n{}", turns[h].value);
                }
                let with_frames = |n: usize| {
                    let mut t = turns.clone();
                    let frames: Vec<String> =
                        (1..=n).map(|i| format!("Frame-{i}: <image>")).collect();
                    t[h].value =
                        t[h].value
                            .replacen("<video>\n", &format!("{}\n", frames.join("\n")), 1);
                    t
                };
                // The most frames that fit the tile slots and the sequence.
                let mut cap = self.max_tiles.min(self.config.max_num_frame);
                while cap > 0 {
                    let len = template::apply(
                        &with_frames(cap),
                        &vec![self.tokens_per_tile; cap],
                        false,
                        &*self.tokenizer,
                    )
                    .map_err(err)?
                    .input_ids
                    .len();
                    if len <= self.seq_length {
                        break;
                    }
                    cap -= 1;
                }
                if cap == 0 {
                    return Ok(Outcome::TooLong {
                        tokens: self.seq_length + 1,
                        tiles: 1,
                    });
                }
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed_for(self.seed, k));
                let frames = sample_frames(
                    &self.resolve(source, path),
                    self.config.min_num_frame,
                    self.config.max_num_frame,
                    cap,
                    self.sampling,
                    *clip,
                    &mut rng,
                )
                .map_err(|e| err(e.to_string()))?;
                turns = with_frames(frames.len());
                grids.extend(frames.iter().map(|_| (1, 1)));
                let tiles = frames.iter().map(|f| self.pipeline.apply(f)).collect();
                (tiles, vec![self.tokens_per_tile; frames.len()], false)
            }
        };
        // Without dynamic tiling a tile is the whole image, and only a `Resize` in the pipeline
        // brings it to the slot size the packer copies it into.
        let side = self.config.image_size;
        if let Some(bad) = tiles.iter().find(|t| t.len() != 3 * side * side) {
            return Err(err(format!(
                "the train_pipeline made a tile of {} values where the model takes 3 x {side} x {side}; \
                 it must resize tiles to image_size",
                bad.len()
            )));
        }
        let t = template::apply(&turns, &image_tokens, text_only, &*self.tokenizer).map_err(err)?;
        let (mut input_ids, mut labels) = (t.input_ids, t.labels);
        let n_tiles = tiles.len();
        let too_long = Outcome::TooLong {
            tokens: input_ids.len(),
            tiles: n_tiles,
        };
        if n_tiles > self.max_tiles {
            return Ok(too_long);
        }
        let mut truncated = false;
        if input_ids.len() > self.seq_length {
            if !(text_only && self.config.text_over_length == OverLength::Truncate) {
                return Ok(too_long);
            }
            input_ids.truncate(self.seq_length);
            labels.truncate(self.seq_length);
            truncated = true;
        }
        Ok(Outcome::Ready {
            sample: Prepared {
                input_ids,
                labels,
                tiles: tiles.concat(),
                n_tiles,
                grids,
            },
            truncated,
        })
    }
}
