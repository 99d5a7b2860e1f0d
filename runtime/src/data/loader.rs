//! The training data loader: data.json in, the plan's global batches out.
//!
//! Samples are read from the annotation files up front (so a malformed line is reported before
//! training starts), then prepared (decoded, tiled, templated) by worker threads ahead of the
//! step, in a fixed order: file order without `shuffle`, a seeded permutation per epoch with
//! it. Each sample is identified by its position `k` in that endless stream, which also seeds
//! its random choices, so a run resumed at a position sees exactly the same samples and batches.
//!
//! With `group_by_length`, each global batch's share of the order is sorted by length and
//! spread over its micro-batches so that their total lengths are even, as InternVL's
//! length-grouped sampler does. An epoch ends its last micro-batch, which is incomplete when
//! the next epoch's first sample would still have fitted: with `drop_last` it is dropped, as a
//! PyTorch sampler drops the last batch; without, it is padded.

use super::chat::{read_annotations, AnnotationError, Origin};
use super::config::{DataConfig, DataConfigError};
use super::image::TilePipeline;
use super::pack::{Geometry, MicroBatchBuilder, PackedMicroBatch, Prepared};
use super::sample::{Entry, Outcome, SampleError, SampleMaker};
use super::tokenizer::{TextTokenizer, TokenizerError};
use super::video::SamplingMethod;
use crate::loss::{loss_weights, Row};
use crate::trainer::MicroBatch;
use mmc_ir::plan::{LossReduction, TrainSettings};
use mmc_ir::{Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Why the loader cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Config(#[from] DataConfigError),
    #[error(transparent)]
    Annotation(#[from] AnnotationError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Sample(#[from] SampleError),
    #[error("{}: {message}", path.display())]
    Mismatch { path: PathBuf, message: String },
    #[error("{}: the dataset is empty (no samples in {})", path.display(), files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "))]
    Empty { path: PathBuf, files: Vec<PathBuf> },
}

/// Where the loader is in its stream: the next sample not yet in a returned batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataPosition {
    pub sample: u64,
}

/// What happened to the samples so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataCounts {
    /// Samples placed into batches.
    pub used: u64,
    /// Samples left out because they do not fit the plan's shapes without cutting an image.
    pub skipped_too_long: u64,
    /// Text-only samples cut to the sequence length.
    pub truncated: u64,
    /// Bad samples skipped (with `skip_bad_samples`).
    pub bad: u64,
    /// Samples of an epoch's incomplete last micro-batch, dropped with `drop_last`.
    pub dropped_last: u64,
}

struct PoolState {
    next_job: u64,
    consumed: u64,
    results: HashMap<u64, Result<Outcome, SampleError>>,
    stop: bool,
}

struct Shared {
    state: Mutex<PoolState>,
    ready: Condvar,
    maker: SampleMaker,
    entries: Vec<Entry>,
    orders: Mutex<HashMap<u64, Arc<Vec<usize>>>>,
    shuffle: bool,
    /// Each entry's length estimate, with `group_by_length`.
    lengths: Option<Vec<usize>>,
    /// Samples per global batch and micro-batches per global batch, for length grouping.
    group: usize,
    chunks: usize,
    seed: u64,
    ahead: u64,
}

/// InternVL's length-grouped order (its `get_length_grouped_indices`): the order is cut into
/// groups of one global batch, each group sorted by length (longest first) and dealt out to
/// `chunks` micro-batches, each sample going to the micro-batch with the least total length
/// that is not yet full; the group is then the micro-batches one after another. A group that
/// does not split evenly (the epoch's last) is dealt round-robin.
pub fn length_grouped(
    order: &[usize],
    lengths: &[usize],
    group: usize,
    chunks: usize,
) -> Vec<usize> {
    let mut out = Vec::with_capacity(order.len());
    for g in order.chunks(group.max(1)) {
        let mut sorted = g.to_vec();
        sorted.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        let chunks = chunks.max(1);
        let mut dealt: Vec<Vec<usize>> = vec![Vec::new(); chunks];
        if !sorted.len().is_multiple_of(chunks) {
            for (j, &i) in sorted.iter().enumerate() {
                dealt[j % chunks].push(i);
            }
        } else {
            let per = sorted.len() / chunks;
            let mut load: Vec<Option<usize>> = vec![Some(0); chunks];
            for &i in &sorted {
                let (c, _) = load
                    .iter()
                    .enumerate()
                    .filter_map(|(c, l)| l.map(|l| (c, l)))
                    .min_by_key(|&(c, l)| (l, c))
                    .expect("a chunk has room while samples remain");
                dealt[c].push(i);
                load[c] = (dealt[c].len() < per).then(|| load[c].unwrap_or(0) + lengths[i]);
            }
        }
        out.extend(dealt.into_iter().flatten());
    }
    out
}

impl Shared {
    /// The entry at stream position `k`.
    fn entry_at(&self, k: u64) -> usize {
        let n = self.entries.len() as u64;
        let (epoch, i) = (k / n, (k % n) as usize);
        if !self.shuffle && self.lengths.is_none() {
            return i;
        }
        let mut orders = self.orders.lock().unwrap_or_else(|p| p.into_inner());
        let order = orders
            .entry(epoch)
            .or_insert_with(|| {
                let mut v: Vec<usize> = (0..self.entries.len()).collect();
                if self.shuffle {
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                        self.seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407),
                    );
                    v.shuffle(&mut rng);
                }
                if let Some(lengths) = &self.lengths {
                    v = length_grouped(&v, lengths, self.group, self.chunks);
                }
                Arc::new(v)
            })
            .clone();
        orders.retain(|&e, _| e + 2 >= epoch);
        order[i]
    }

    fn work(&self) {
        loop {
            let k = {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                while !st.stop && st.next_job >= st.consumed + self.ahead {
                    st = self.ready.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                if st.stop {
                    return;
                }
                st.next_job += 1;
                st.next_job - 1
            };
            let entry = &self.entries[self.entry_at(k)];
            let result = self.maker.make(entry, k);
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.results.insert(k, result);
            self.ready.notify_all();
        }
    }

    fn take(&self, k: u64) -> Result<Outcome, SampleError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = st.results.remove(&k) {
                st.consumed = k + 1;
                self.ready.notify_all();
                return r;
            }
            st = self.ready.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

struct Pool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.stop = true;
        }
        self.shared.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Turns packed micro-batches of one global batch into the micro-step's inputs, with loss
/// weights normalised over the whole global batch. Returns them and the non-padding tokens.
pub fn assemble(
    packed: &[PackedMicroBatch],
    micro_batch_size: usize,
    seq_length: usize,
    max_tiles: usize,
    tile_shape: Option<[usize; 3]>,
    reduction: LossReduction,
) -> (Vec<MicroBatch>, usize) {
    let rows: Vec<Row> = packed
        .iter()
        .flat_map(|m| {
            (0..micro_batch_size).map(move |r| Row {
                labels: &m.labels[r * seq_length..(r + 1) * seq_length],
                segment_ids: &m.segment_ids[r * seq_length..(r + 1) * seq_length],
            })
        })
        .collect();
    let weights = loss_weights(reduction, &rows);
    let tokens = packed
        .iter()
        .flat_map(|m| m.segment_ids.iter())
        .filter(|&&s| s != 0)
        .count();
    let shape = vec![micro_batch_size, seq_length];
    let out = packed
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let int =
                |v: &[i64]| Tensor::new(shape.clone(), TensorData::I64(v.to_vec())).expect("sizes");
            let mut t = BTreeMap::new();
            t.insert("input_ids".to_string(), int(&m.input_ids));
            t.insert("labels".to_string(), int(&m.labels));
            t.insert("position_ids".to_string(), int(&m.position_ids));
            t.insert("segment_ids".to_string(), int(&m.segment_ids));
            let w: Vec<f32> = weights[i * micro_batch_size..(i + 1) * micro_batch_size].concat();
            t.insert(
                "loss_weights".to_string(),
                Tensor::new(shape.clone(), TensorData::F32(w)).expect("sizes"),
            );
            if let Some(tile) = tile_shape {
                let mut px_shape = vec![max_tiles];
                px_shape.extend(tile);
                t.insert(
                    "pixel_values".to_string(),
                    Tensor::new(px_shape, TensorData::F32(m.pixel_values.clone())).expect("sizes"),
                );
            }
            MicroBatch(t)
        })
        .collect();
    (out, tokens)
}

/// A sample's length for length-grouped sampling, as InternVL estimates it: the line's
/// `length` if it has one, else the tokens of its turns joined by newlines plus the image
/// tokens of the most tiles it may get (`max_dynamic_patch` + thumbnail) when it has media.
fn length_estimate(
    entry: &Entry,
    tokenizer: &TextTokenizer,
    config: &DataConfig,
    tokens_per_tile: Option<usize>,
    counted: &mut HashMap<String, usize>,
) -> usize {
    let Ok(sample) = &entry.sample else {
        return 0;
    };
    if let Some(l) = sample.length {
        return l;
    }
    let text: Vec<&str> = sample
        .conversations
        .iter()
        .map(|t| t.value.as_str())
        .collect();
    // A repeated dataset (`repeat_time`) holds each text many times: tokenised once.
    let text = text.join("\n");
    let tokens = match counted.get(&text) {
        Some(&n) => n,
        None => {
            let n = tokenizer.encode(&text).map_or(0, |t| t.len());
            counted.insert(text, n);
            n
        }
    };
    let media = !matches!(sample.media, super::chat::Media::Text);
    let tiles = config.max_dynamic_patch + config.use_thumbnail as usize;
    tokens
        + if media {
            tokens_per_tile.unwrap_or(0) * tiles
        } else {
            0
        }
}

/// The data pipeline of a run.
pub struct DataLoader {
    config: Arc<DataConfig>,
    geometry: Geometry,
    tile_shape: Option<[usize; 3]>,
    accum: usize,
    reduction: LossReduction,
    pool: Pool,
    /// The next stream position to fetch.
    next: u64,
    /// A prepared sample that did not fit the last micro-batch, with its position and whether
    /// it was truncated.
    carry: Option<(u64, Prepared, bool)>,
    counts: DataCounts,
    /// The epoch of the last micro-batch returned, to tell an epoch too small to fill one.
    last_epoch: Option<u64>,
    /// Bad samples seen, for the warning lines (kept short).
    pub warnings: Vec<String>,
}

impl DataLoader {
    /// Opens a data.json for a plan: checks it against the model, loads the tokenizer, reads
    /// every annotation line, and starts `num_workers` threads at stream position `start`.
    pub fn open(
        path: &std::path::Path,
        settings: &TrainSettings,
        start: DataPosition,
    ) -> Result<DataLoader, DataError> {
        let config = DataConfig::load(path)?;
        let mismatch = |message: String| DataError::Mismatch {
            path: path.to_path_buf(),
            message,
        };
        let facts = &settings.model;
        let vision = facts.tile_size.is_some();
        if let (Some(tile), Some(tpt)) = (facts.tile_size, facts.tokens_per_tile) {
            if config.image_size != tile {
                return Err(mismatch(format!(
                    "`image_size` is {}, but the model's tiles are {tile} pixels",
                    config.image_size
                )));
            }
            if config.tokens_per_tile() != tpt {
                return Err(mismatch(format!(
                    "`patch_size` {} and `down_sample_ratio` {} give {} tokens per tile, but the model makes {tpt}",
                    config.patch_size,
                    config.down_sample_ratio,
                    config.tokens_per_tile()
                )));
            }
        }
        let tokenizer = TextTokenizer::from_dir(&config.tokenizer_dir)?;
        if let Some(id) = facts.img_context_token_id {
            let have = tokenizer
                .token_to_id(super::template::IMG_CONTEXT)
                .map(i64::from);
            if have != Some(id) {
                return Err(mismatch(format!(
                    "the tokenizer in {} gives `<IMG_CONTEXT>` the id {}, but the model expects {id} (img_context_token_id)",
                    config.tokenizer_dir.display(),
                    have.map_or("none".to_string(), |h| h.to_string())
                )));
            }
        }
        if tokenizer.vocab_size() > facts.vocab_size {
            return Err(mismatch(format!(
                "the tokenizer in {} has {} tokens, more than the model's vocabulary ({})",
                config.tokenizer_dir.display(),
                tokenizer.vocab_size(),
                facts.vocab_size
            )));
        }
        if config.pad_id >= facts.vocab_size as i64 {
            return Err(mismatch(format!(
                "`dataloader_param.collate_param.pad_id` {} is outside the model's vocabulary (vocab_size {})",
                config.pad_id, facts.vocab_size
            )));
        }
        if let (Some(data), Some(model)) = (&config.template_name, &facts.template) {
            if data != model {
                return Err(mismatch(format!(
                    "`dataset_param.template_name` is \"{data}\", but the model's template is \"{model}\" ([model] template or its hf_config); make them agree"
                )));
            }
        }
        let pipeline = match &config.train_pipeline {
            Some(list) => TilePipeline::from_json(list).map_err(|m| {
                mismatch(format!(
                    "`dataset_param.preprocess_parameters.train_pipeline.image`: {m}"
                ))
            })?,
            None => TilePipeline::internvl_default(config.image_size as u32),
        };
        // Both sides: a tile of another width would not fit its slot of the batch.
        let side = config.image_size as u32;
        let (w, h) = pipeline.output_dims(side, side);
        if vision && (w as usize, h as usize) != (config.image_size, config.image_size) {
            return Err(mismatch(format!(
                "the train_pipeline makes tiles of {w}x{h} pixels, but the model takes {}x{}",
                config.image_size, config.image_size
            )));
        }
        let sampling: SamplingMethod =
            config
                .sampling_method
                .parse()
                .map_err(|e: super::video::SamplingMethodError| {
                    mismatch(format!("`dataset_param.sampling_method`: {e}"))
                })?;

        let mut entries = Vec::new();
        for (si, source) in config.sources.iter().enumerate() {
            let lines = read_annotations(&source.annotation)?;
            let mut list: Vec<Entry> = Vec::with_capacity(lines.len());
            for (origin, sample) in lines {
                if let (Err(message), false) = (&sample, config.skip_bad_samples) {
                    return Err(DataError::Annotation(AnnotationError::Line {
                        origin,
                        message: message.clone(),
                    }));
                }
                list.push(Entry {
                    origin,
                    source: si,
                    sample,
                });
            }
            let t = source.repeat_time;
            if t < 1.0 {
                list.truncate((list.len() as f64 * t) as usize);
            }
            let copies = if t > 1.0 { t as usize } else { 1 };
            for _ in 0..copies {
                entries.extend(list.iter().cloned());
            }
        }
        if entries.is_empty() {
            return Err(DataError::Empty {
                path: path.to_path_buf(),
                files: config
                    .sources
                    .iter()
                    .map(|s| s.annotation.clone())
                    .collect(),
            });
        }

        let group = settings.micro_batch_size * settings.grad_accum_steps * settings.data_parallel;
        let lengths = config.group_by_length.then(|| {
            let mut counted = HashMap::new();
            entries
                .iter()
                .map(|e| {
                    length_estimate(e, &tokenizer, &config, facts.tokens_per_tile, &mut counted)
                })
                .collect()
        });
        let geometry = Geometry {
            micro_batch_size: settings.micro_batch_size,
            seq_length: settings.seq_length,
            max_tiles: settings.max_tiles,
            tile_len: facts.tile_size.map_or(0, |t| 3 * t * t),
            pad_id: config.pad_id,
            packing: config.packing,
        };
        let config = Arc::new(config);
        let maker = SampleMaker {
            tokenizer: Arc::new(tokenizer),
            pipeline,
            config: config.clone(),
            sampling,
            tokens_per_tile: facts.tokens_per_tile.unwrap_or(0),
            seq_length: settings.seq_length,
            max_tiles: settings.max_tiles,
            seed: config.seed.unwrap_or(settings.seed),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(PoolState {
                next_job: start.sample,
                consumed: start.sample,
                results: HashMap::new(),
                stop: false,
            }),
            ready: Condvar::new(),
            maker,
            entries,
            orders: Mutex::new(HashMap::new()),
            shuffle: config.shuffle,
            lengths,
            group,
            chunks: settings.grad_accum_steps * settings.data_parallel,
            seed: config.seed.unwrap_or(settings.seed),
            ahead: (4 * config.num_workers)
                .max(2 * settings.micro_batch_size * settings.grad_accum_steps)
                as u64,
        });
        let threads = (0..config.num_workers)
            .map(|_| {
                let s = shared.clone();
                std::thread::spawn(move || s.work())
            })
            .collect();
        Ok(DataLoader {
            geometry,
            tile_shape: facts.tile_size.map(|t| [3, t, t]),
            accum: settings.grad_accum_steps,
            reduction: settings.loss_reduction,
            config,
            pool: Pool { shared, threads },
            next: start.sample,
            carry: None,
            counts: DataCounts::default(),
            last_epoch: None,
            warnings: Vec::new(),
        })
    }

    pub fn config(&self) -> &DataConfig {
        &self.config
    }

    /// Samples in one pass over the data.
    pub fn samples_per_epoch(&self) -> u64 {
        self.pool.shared.entries.len() as u64
    }

    /// The position of the next sample not yet in a returned batch.
    pub fn position(&self) -> DataPosition {
        DataPosition {
            sample: self.carry.as_ref().map_or(self.next, |(k, _, _)| *k),
        }
    }

    pub fn counts(&self) -> DataCounts {
        self.counts
    }

    /// The next prepared sample of the stream (and whether it was truncated), counting the
    /// ones left out.
    fn next_sample(&mut self) -> Result<(u64, Prepared, bool), DataError> {
        loop {
            let k = self.next;
            self.next += 1;
            match self.pool.shared.take(k) {
                Ok(Outcome::Ready { sample, truncated }) => return Ok((k, sample, truncated)),
                Ok(Outcome::TooLong { .. }) => self.counts.skipped_too_long += 1,
                Err(e) if self.config.skip_bad_samples => {
                    self.counts.bad += 1;
                    if self.warnings.len() < 100 {
                        self.warnings.push(e.to_string());
                    }
                }
                Err(e) => return Err(e.into()),
            }
            if self.counts.skipped_too_long + self.counts.bad > 1000 && self.counts.used == 0 {
                return Err(DataError::Mismatch {
                    path: self.config.path.clone(),
                    message: "the first 1000 samples were all left out (too long for seq_length / max_tiles, or bad); check the data and the plan's shapes".into(),
                });
            }
        }
    }

    /// The micro-batches of the next global batch (with loss weights over all of them) and
    /// its number of non-padding tokens.
    pub fn next_global_batch(&mut self) -> Result<(Vec<MicroBatch>, usize), DataError> {
        let n = self.samples_per_epoch();
        let mut packed = Vec::with_capacity(self.accum);
        while packed.len() < self.accum {
            let mut b = MicroBatchBuilder::new(self.geometry);
            let mut epoch = None;
            let mut truncated_here = 0;
            let incomplete_at_epoch_end = loop {
                let (k, s, truncated) = match self.carry.take() {
                    Some(c) => c,
                    None => self.next_sample()?,
                };
                if epoch.is_some_and(|e| e != k / n) {
                    // The first sample of the next epoch: this micro-batch was the epoch's
                    // last, and incomplete if that sample would still have fitted.
                    let incomplete = b.room_for(&s).is_some();
                    self.carry = Some((k, s, truncated));
                    break incomplete;
                }
                if b.try_place(&s) {
                    epoch = Some(k / n);
                    truncated_here += truncated as u64;
                    continue;
                }
                if b.is_empty() {
                    return Err(DataError::Mismatch {
                        path: self.config.path.clone(),
                        message: format!(
                            "{}: the sample does not fit an empty micro-batch",
                            self.origin(k)
                        ),
                    });
                }
                self.carry = Some((k, s, truncated));
                break false;
            };
            if incomplete_at_epoch_end && self.config.drop_last {
                if self.last_epoch != epoch {
                    return Err(DataError::Mismatch {
                        path: self.config.path.clone(),
                        message: format!(
                            "one epoch ({n} samples) does not fill a micro-batch, so `dataloader_param.drop_last` drops every one; set drop_last to false or add data"
                        ),
                    });
                }
                self.counts.dropped_last += b.samples() as u64;
                continue;
            }
            self.counts.used += b.samples() as u64;
            self.counts.truncated += truncated_here;
            self.last_epoch = epoch;
            packed.push(b.finish());
        }
        Ok(assemble(
            &packed,
            self.geometry.micro_batch_size,
            self.geometry.seq_length,
            self.geometry.max_tiles,
            self.tile_shape,
            self.reduction,
        ))
    }

    /// Prepares entry `index` of the dataset (in file order) on its own, as the workers would at
    /// stream position `index` of the first epoch without shuffling. For tests and tools.
    pub fn prepare(&self, index: usize) -> Result<Outcome, SampleError> {
        let s = &self.pool.shared;
        s.maker.make(&s.entries[index], index as u64)
    }

    /// Where a sample of the stream comes from (for messages).
    pub fn origin(&self, k: u64) -> Origin {
        let s = &self.pool.shared;
        s.entries[s.entry_at(k)].origin.clone()
    }
}
