//! Static shapes from variable samples: samples are placed into the plan's micro-batch
//! (`micro_batch_size` rows of `seq_length` tokens, `max_tiles` tile slots), packed several per
//! row or one per row, and the rest padded.
//!
//! Packed samples keep their own RoPE positions (restarting at 0) and segment ids (from 1 within
//! a row; 0 marks padding), so the model's mask keeps them from attending to each other. Tiles
//! fill the slots in the order their `<IMG_CONTEXT>` tokens appear (rows in order, samples in
//! order within a row), which is the order the model splices features in.

use super::template::IGNORE_INDEX;

/// A sample ready to be placed: tokens, labels and its tiles (CHW floats, one after another).
#[derive(Clone, Debug, PartialEq)]
pub struct Prepared {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub tiles: Vec<f32>,
    pub n_tiles: usize,
    /// The tile grid (columns, rows) of each image, before any thumbnail; (1, 1) per video
    /// frame.
    pub grids: Vec<(usize, usize)>,
}

/// The static shape of a micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub micro_batch_size: usize,
    pub seq_length: usize,
    pub max_tiles: usize,
    /// Floats per tile (3 x size x size); 0 for a text-only model.
    pub tile_len: usize,
    pub pad_id: i64,
    /// Several samples per row (else one per row).
    pub packing: bool,
}

impl Geometry {
    /// Whether a sample fits an empty micro-batch at all.
    pub fn fits(&self, s: &Prepared) -> bool {
        s.input_ids.len() <= self.seq_length && s.n_tiles <= self.max_tiles
    }
}

/// One micro-batch being filled.
#[derive(Clone, Debug)]
pub struct MicroBatchBuilder {
    geo: Geometry,
    input_ids: Vec<i64>,
    labels: Vec<i64>,
    position_ids: Vec<i64>,
    segment_ids: Vec<i64>,
    pixel_values: Vec<f32>,
    /// Rows opened so far (the last one is where samples go).
    rows_used: usize,
    /// Tokens in the last open row.
    row_len: usize,
    /// Samples in the last open row.
    row_samples: i64,
    tiles_used: usize,
    samples: usize,
}

/// A finished micro-batch in the plan's shapes (row-major `[micro_batch_size, seq_length]`).
#[derive(Clone, Debug, PartialEq)]
pub struct PackedMicroBatch {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub position_ids: Vec<i64>,
    pub segment_ids: Vec<i64>,
    /// `[max_tiles, 3, size, size]`, unused slots zero.
    pub pixel_values: Vec<f32>,
    pub samples: usize,
    pub tiles_used: usize,
}

impl MicroBatchBuilder {
    pub fn new(geo: Geometry) -> Self {
        let n = geo.micro_batch_size * geo.seq_length;
        MicroBatchBuilder {
            geo,
            input_ids: vec![geo.pad_id; n],
            labels: vec![IGNORE_INDEX; n],
            position_ids: vec![0; n],
            segment_ids: vec![0; n],
            pixel_values: vec![0.0; geo.max_tiles * geo.tile_len],
            rows_used: 0,
            row_len: 0,
            row_samples: 0,
            tiles_used: 0,
            samples: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.samples == 0
    }

    /// Samples placed so far.
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Whether `s` would be placed: `Some(true)` in the open row (packing), `Some(false)` in
    /// a new row, `None` when it does not fit.
    pub fn room_for(&self, s: &Prepared) -> Option<bool> {
        let g = self.geo;
        if self.tiles_used + s.n_tiles > g.max_tiles {
            return None;
        }
        let len = s.input_ids.len();
        let same_row = g.packing && self.rows_used > 0 && self.row_len + len <= g.seq_length;
        if !same_row && (self.rows_used == g.micro_batch_size || len > g.seq_length) {
            return None;
        }
        Some(same_row)
    }

    /// Places `s` if there is room (it must fit an empty micro-batch); returns whether it did.
    pub fn try_place(&mut self, s: &Prepared) -> bool {
        let g = self.geo;
        let Some(same_row) = self.room_for(s) else {
            return false;
        };
        let len = s.input_ids.len();
        if !same_row {
            self.rows_used += 1;
            self.row_len = 0;
            self.row_samples = 0;
        }
        let row = self.rows_used - 1;
        let start = row * g.seq_length + self.row_len;
        self.row_samples += 1;
        for i in 0..len {
            self.input_ids[start + i] = s.input_ids[i];
            self.labels[start + i] = s.labels[i];
            self.position_ids[start + i] = i as i64;
            self.segment_ids[start + i] = self.row_samples;
        }
        self.row_len += len;
        let off = self.tiles_used * g.tile_len;
        self.pixel_values[off..off + s.tiles.len()].copy_from_slice(&s.tiles);
        self.tiles_used += s.n_tiles;
        self.samples += 1;
        true
    }

    pub fn finish(self) -> PackedMicroBatch {
        PackedMicroBatch {
            input_ids: self.input_ids,
            labels: self.labels,
            position_ids: self.position_ids,
            segment_ids: self.segment_ids,
            pixel_values: self.pixel_values,
            samples: self.samples,
            tiles_used: self.tiles_used,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize, tiles: usize, tile_len: usize, tag: i64) -> Prepared {
        Prepared {
            input_ids: vec![tag; len],
            labels: vec![tag; len],
            tiles: vec![tag as f32; tiles * tile_len],
            n_tiles: tiles,
            grids: Vec::new(),
        }
    }

    fn geo(packing: bool) -> Geometry {
        Geometry {
            micro_batch_size: 2,
            seq_length: 8,
            max_tiles: 3,
            tile_len: 2,
            pad_id: 0,
            packing,
        }
    }

    #[test]
    fn packing_restarts_positions_and_numbers_segments() {
        let mut b = MicroBatchBuilder::new(geo(true));
        assert!(b.try_place(&sample(3, 1, 2, 7)));
        assert!(b.try_place(&sample(4, 1, 2, 8)));
        assert!(b.try_place(&sample(5, 0, 2, 9))); // does not fit row 0 (7 + 5 > 8): row 1
        assert!(!b.try_place(&sample(4, 0, 2, 5))); // row 1 has 5, no row left
        assert!(!b.try_place(&sample(1, 2, 2, 5))); // tiles: 2 used + 2 > 3
        let m = b.finish();
        assert_eq!(&m.segment_ids[..8], &[1, 1, 1, 2, 2, 2, 2, 0]);
        assert_eq!(&m.position_ids[..8], &[0, 1, 2, 0, 1, 2, 3, 0]);
        assert_eq!(&m.segment_ids[8..], &[1, 1, 1, 1, 1, 0, 0, 0]);
        assert_eq!(m.labels[7], -100);
        assert_eq!(&m.pixel_values, &[7.0, 7.0, 8.0, 8.0, 0.0, 0.0]);
        assert_eq!((m.samples, m.tiles_used), (3, 2));
    }

    #[test]
    fn without_packing_each_sample_gets_a_row() {
        let mut b = MicroBatchBuilder::new(geo(false));
        assert!(b.try_place(&sample(2, 0, 2, 1)));
        assert!(b.try_place(&sample(2, 0, 2, 2)));
        assert!(!b.try_place(&sample(2, 0, 2, 3)));
        let m = b.finish();
        assert_eq!(
            &m.segment_ids,
            &[1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0]
        );
    }
}
