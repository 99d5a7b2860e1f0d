//! Training data given directly as tensors in a safetensors file: the simple form of `--data`
//! (the InternVL chat JSONL pipeline builds the same micro-batches from raw data).
//!
//! The file holds `input_ids` and `labels` (i64 [rows, seq_length]), optionally `position_ids`
//! and `segment_ids` (same shape; default: positions from 0 and one sample per row), and for a
//! vision model optionally `pixel_values` (f32 [rows / micro_batch_size, tiles, channels, tile,
//! tile], the tiles of each micro-batch, at most max_tiles of them, padded with empty slots; or
//! [tiles, channels, tile, tile] when the file holds one micro-batch; default: empty slots).
//! Rows are used in file order, wrapping around; with `pixel_values` the rows must split into
//! whole micro-batches, so that every micro-batch, wrapped or not, keeps its own tiles.
//!
//! Every value is checked when the file is opened, so that a bad token id is reported with
//! its tensor, row and column rather than as an index error deep inside a program.

use crate::data::loader::assemble;
use crate::data::pack::PackedMicroBatch;
use crate::data::template::IGNORE_INDEX;
use crate::trainer::MicroBatch;
use crate::weights::{Checkpoint, WeightError};
use mmc_ir::plan::TrainSettings;
use mmc_ir::{DType, Tensor, TensorData};
use std::path::{Path, PathBuf};

/// Why a tensor data file cannot be used with a plan.
#[derive(Debug, thiserror::Error)]
pub enum TensorDataError {
    #[error(transparent)]
    File(#[from] WeightError),
    #[error("{}: {message}", path.display())]
    Shape { path: PathBuf, message: String },
    #[error("{}: `{tensor}` row {row}, position {position}: {message}", path.display())]
    Value {
        path: PathBuf,
        tensor: &'static str,
        row: usize,
        position: usize,
        message: String,
    },
}

/// The first value of a `[rows, seq]` tensor that `bad` rejects, with its row and position.
fn first_bad(
    path: &Path,
    tensor: &'static str,
    values: &[i64],
    seq: usize,
    bad: impl Fn(i64) -> Option<String>,
) -> Result<(), TensorDataError> {
    match values
        .iter()
        .enumerate()
        .find_map(|(i, &v)| bad(v).map(|m| (i, m)))
    {
        None => Ok(()),
        Some((i, message)) => Err(TensorDataError::Value {
            path: path.to_path_buf(),
            tensor,
            row: i / seq,
            position: i % seq,
            message,
        }),
    }
}

/// Rows of pre-tokenised training data.
pub struct TensorBatches {
    rows: usize,
    seq: usize,
    micro: usize,
    accum: usize,
    reduction: mmc_ir::plan::LossReduction,
    input_ids: Vec<i64>,
    labels: Vec<i64>,
    position_ids: Vec<i64>,
    segment_ids: Vec<i64>,
    /// Per micro-batch tile slots, flattened; `None` for text-only models.
    pixels: Option<(Vec<usize>, Vec<f32>)>,
}

fn ints(t: &Tensor) -> Vec<i64> {
    match t.data() {
        TensorData::I64(v) => v.clone(),
        TensorData::I32(v) => v.iter().map(|&x| x as i64).collect(),
        _ => t.to_f64_vec().iter().map(|&x| x as i64).collect(),
    }
}

impl TensorBatches {
    /// Opens a data file and checks it against the plan's batch geometry.
    pub fn open(
        path: &Path,
        settings: &TrainSettings,
        tile_shape: Option<[usize; 3]>,
    ) -> Result<Self, TensorDataError> {
        let file = Checkpoint::open(path)?;
        let shape_err = |message: String| TensorDataError::Shape {
            path: path.to_path_buf(),
            message,
        };
        let seq = settings.seq_length;
        let read_rows = |name: &str| -> Result<Option<Vec<i64>>, TensorDataError> {
            match file.shape(name) {
                None => Ok(None),
                Some(s) if s.len() == 2 && s[1] == seq => {
                    Ok(Some(ints(&file.read(name, DType::I64)?)))
                }
                Some(s) => Err(shape_err(format!(
                    "`{name}` has shape {}, but the plan needs [rows, {seq}] (seq_length)",
                    mmc_ir::DisplayShape(s)
                ))),
            }
        };
        let input_ids =
            read_rows("input_ids")?.ok_or_else(|| shape_err("no `input_ids` tensor".into()))?;
        let labels = read_rows("labels")?.ok_or_else(|| shape_err("no `labels` tensor".into()))?;
        let rows = input_ids.len() / seq;
        if labels.len() != input_ids.len() {
            return Err(shape_err(
                "`labels` and `input_ids` have different row counts".into(),
            ));
        }
        let micro = settings.micro_batch_size;
        if rows < micro {
            return Err(shape_err(format!(
                "{rows} rows are fewer than one micro-batch ({micro})"
            )));
        }
        let vocab = settings.model.vocab_size as i64;
        first_bad(path, "input_ids", &input_ids, seq, |v| {
            (!(0..vocab).contains(&v))
                .then(|| format!("token id {v} is outside the vocabulary (0..{vocab})"))
        })?;
        first_bad(path, "labels", &labels, seq, |v| {
            (v != IGNORE_INDEX && !(0..vocab).contains(&v)).then(|| {
                format!("label {v} is neither {IGNORE_INDEX} (ignored) nor a token id (0..{vocab})")
            })
        })?;
        let position_ids = match read_rows("position_ids")? {
            Some(p) if p.len() == input_ids.len() => p,
            Some(_) => {
                return Err(shape_err(
                    "`position_ids` must have the shape of `input_ids`".into(),
                ))
            }
            None => (0..rows).flat_map(|_| 0..seq as i64).collect(),
        };
        let segment_ids = match read_rows("segment_ids")? {
            Some(p) if p.len() == input_ids.len() => p,
            Some(_) => {
                return Err(shape_err(
                    "`segment_ids` must have the shape of `input_ids`".into(),
                ))
            }
            None => vec![1; input_ids.len()],
        };
        first_bad(path, "position_ids", &position_ids, seq, |v| {
            (v < 0).then(|| format!("position {v} is negative"))
        })?;
        first_bad(path, "segment_ids", &segment_ids, seq, |v| {
            (v < 0).then(|| {
                format!("segment id {v} is negative (0 marks padding, 1.. the samples of a row)")
            })
        })?;
        let pixels = match tile_shape {
            None => None,
            Some(tile) => {
                let slots = settings.max_tiles;
                let per_mb: Vec<usize> = [slots].into_iter().chain(tile).collect();
                let micro_batches = rows / micro;
                let fits = |s: &[usize]| -> Option<(usize, usize)> {
                    // [micro_batches, tiles, c, h, w], or [tiles, c, h, w] for one micro-batch.
                    let (m, rest) = match s.len() {
                        5 => (s[0], &s[1..]),
                        4 => (1, s),
                        _ => return None,
                    };
                    (m == micro_batches && rest[0] <= slots && rest[1..] == tile[..])
                        .then_some((m, rest[0]))
                };
                match file.shape("pixel_values") {
                    None => Some((per_mb, Vec::new())),
                    Some(_) if !rows.is_multiple_of(micro) => {
                        return Err(shape_err(format!(
                            "`pixel_values` holds the tiles of each micro-batch of {micro} rows, but the file's {rows} rows do not split into whole micro-batches"
                        )))
                    }
                    Some(s) => match fits(s) {
                        Some((m, tiles)) => {
                            let t = file.read("pixel_values", DType::F32)?;
                            let TensorData::F32(v) = t.into_data() else {
                                unreachable!("read as f32")
                            };
                            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                                let tile_len: usize = tile.iter().product();
                                return Err(shape_err(format!(
                                    "`pixel_values` holds {} at micro-batch {}, tile {} (element {}); pixel values must be finite",
                                    v[i],
                                    i / (tiles * tile_len).max(1),
                                    i / tile_len % tiles.max(1),
                                    i % tile_len
                                )));
                            }
                            // Pad every micro-batch's tiles to the plan's slot count.
                            let tile_len: usize = tile.iter().product();
                            let mut padded = vec![0.0f32; m * slots * tile_len];
                            for mb in 0..m {
                                let src = &v[mb * tiles * tile_len..(mb + 1) * tiles * tile_len];
                                padded[mb * slots * tile_len..][..src.len()].copy_from_slice(src);
                            }
                            Some((per_mb, padded))
                        }
                        None => {
                            return Err(shape_err(format!(
                                "`pixel_values` has shape {}, but the plan needs [{micro_batches}, <= {slots}, {}] (the tiles of each micro-batch)",
                                mmc_ir::DisplayShape(s),
                                tile.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
                            )))
                        }
                    },
                }
            }
        };
        Ok(TensorBatches {
            rows,
            seq,
            micro,
            accum: settings.grad_accum_steps,
            reduction: settings.loss_reduction,
            input_ids,
            labels,
            position_ids,
            segment_ids,
            pixels,
        })
    }

    /// Rows in the file.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Global batches in one pass over the file.
    pub fn batches_per_epoch(&self) -> u64 {
        (self.rows as u64)
            .div_ceil((self.micro * self.accum) as u64)
            .max(1)
    }

    /// The micro-batches of global batch `index` (0-based), with loss weights normalised over
    /// the whole global batch. Returns them and the number of non-padding tokens.
    pub fn global_batch(&self, index: u64) -> (Vec<MicroBatch>, usize) {
        let per_step = self.micro * self.accum;
        let first_row = (index as usize * per_step) % self.rows;
        let row_ids: Vec<usize> = (0..per_step).map(|i| (first_row + i) % self.rows).collect();
        let packed: Vec<PackedMicroBatch> = row_ids
            .chunks(self.micro)
            .map(|rows| {
                let gather = |v: &[i64]| -> Vec<i64> {
                    rows.iter()
                        .flat_map(|&r| v[r * self.seq..(r + 1) * self.seq].iter().copied())
                        .collect()
                };
                let pixel_values = match &self.pixels {
                    Some((per_mb, px)) => {
                        let n: usize = per_mb.iter().product();
                        // Rows split into whole micro-batches when tiles are given (checked at
                        // open), so a chunk is always one of the file's micro-batches.
                        let mb = rows[0] / self.micro;
                        if px.is_empty() {
                            vec![0.0; n]
                        } else {
                            px[mb * n..(mb + 1) * n].to_vec()
                        }
                    }
                    None => Vec::new(),
                };
                PackedMicroBatch {
                    input_ids: gather(&self.input_ids),
                    labels: gather(&self.labels),
                    position_ids: gather(&self.position_ids),
                    segment_ids: gather(&self.segment_ids),
                    pixel_values,
                    samples: rows.len(),
                    tiles_used: 0,
                }
            })
            .collect();
        let max_tiles = self.pixels.as_ref().map_or(0, |(p, _)| p[0]);
        let tile = self.pixels.as_ref().map(|(p, _)| [p[1], p[2], p[3]]);
        assemble(
            &packed,
            self.micro,
            self.seq,
            max_tiles,
            tile,
            self.reduction,
        )
    }
}
