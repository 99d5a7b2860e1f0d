//! Pre-tokenised training data (`--data FILE.safetensors`): every value checked when the file
//! is opened, with the tensor, row and position named, and micro-batches that keep their own
//! tiles however the rows wrap.

mod common;

use common::settings;
use mmc_ir::TensorData;
use mmc_runtime::tensor_batches::TensorBatches;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::path::{Path, PathBuf};

const SEQ: usize = 8;
const TILE: [usize; 3] = [3, 56, 56];

/// Writes `rows` rows of ids and labels (and optionally tiles) to `dir/data.safetensors`.
fn write(
    dir: &Path,
    ids: &[i64],
    labels: &[i64],
    pixels: Option<(Vec<usize>, Vec<f32>)>,
) -> PathBuf {
    let rows = ids.len() / SEQ;
    let bytes = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = vec![
        ("input_ids", Dtype::I64, vec![rows, SEQ], bytes(ids)),
        ("labels", Dtype::I64, vec![rows, SEQ], bytes(labels)),
    ];
    if let Some((shape, px)) = pixels {
        tensors.push((
            "pixel_values",
            Dtype::F32,
            shape,
            px.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let path = dir.join("data.safetensors");
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

fn open_err(path: &Path, micro: usize) -> String {
    let e = TensorBatches::open(path, &settings(micro, SEQ, 2, 1), Some(TILE))
        .err()
        .expect("the file must be refused")
        .to_string();
    assert!(!e.contains('\n'), "{e}");
    e
}

fn rows(n: usize) -> (Vec<i64>, Vec<i64>) {
    let ids: Vec<i64> = (0..(n * SEQ) as i64).collect();
    (ids.clone(), ids)
}

#[test]
fn token_ids_outside_the_vocabulary_name_the_tensor_row_and_position() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ids, labels) = rows(2);
    ids[SEQ + 3] = 151936;
    let e = open_err(&write(dir.path(), &ids, &labels, None), 1);
    assert!(
        e.contains("`input_ids` row 1, position 3")
            && e.contains("token id 151936 is outside the vocabulary"),
        "{e}"
    );
    let (mut ids, labels) = rows(2);
    ids[2] = -5;
    let e = open_err(&write(dir.path(), &ids, &labels, None), 1);
    assert!(
        e.contains("`input_ids` row 0, position 2") && e.contains("-5"),
        "{e}"
    );
    let (ids, mut labels) = rows(2);
    labels[5] = -1;
    let e = open_err(&write(dir.path(), &ids, &labels, None), 1);
    assert!(
        e.contains("`labels` row 0, position 5") && e.contains("label -1 is neither -100"),
        "{e}"
    );
    // -100 and ids in the vocabulary are fine.
    let (ids, mut labels) = rows(2);
    labels[0] = -100;
    labels[1] = 151935;
    TensorBatches::open(
        &write(dir.path(), &ids, &labels, None),
        &settings(1, SEQ, 2, 1),
        Some(TILE),
    )
    .unwrap();
}

#[test]
fn non_finite_pixel_values_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (ids, labels) = rows(1);
    let n: usize = TILE.iter().product();
    let mut px = vec![0.5f32; n];
    px[n - 1] = f32::NAN;
    let e = open_err(
        &write(dir.path(), &ids, &labels, Some((vec![1, 3, 56, 56], px))),
        1,
    );
    assert!(
        e.contains("`pixel_values` holds NaN at micro-batch 0, tile 0") && e.contains("finite"),
        "{e}"
    );
}

#[test]
fn tiles_need_rows_that_split_into_whole_micro_batches() {
    // 3 rows in micro-batches of 2: step 1 would use rows 0-1, step 2 rows 2 and 0, whose
    // tiles the file cannot say (it gives them per micro-batch).
    let dir = tempfile::tempdir().unwrap();
    let (ids, labels) = rows(3);
    let n: usize = TILE.iter().product();
    let path = write(
        dir.path(),
        &ids,
        &labels,
        Some((vec![1, 3, 56, 56], vec![0.0; n])),
    );
    let e = open_err(&path, 2);
    assert!(e.contains("do not split into whole micro-batches"), "{e}");
}

#[test]
fn wrapped_batches_keep_their_own_tiles() {
    // 4 rows, micro-batches of 2 rows with one tile each, tile k filled with k + 1; three
    // steps wrap around: micro-batch 0, 1, then 0 again.
    let dir = tempfile::tempdir().unwrap();
    let (ids, labels) = rows(4);
    let n: usize = TILE.iter().product();
    let mut px = vec![1.0f32; n];
    px.extend(vec![2.0f32; n]);
    let path = write(dir.path(), &ids, &labels, Some((vec![2, 1, 3, 56, 56], px)));
    let t = TensorBatches::open(&path, &settings(2, SEQ, 2, 1), Some(TILE)).unwrap();
    for (step, (first_row, tile)) in [(0, 1.0), (2, 2.0), (0, 1.0)].into_iter().enumerate() {
        let (mbs, _) = t.global_batch(step as u64);
        let ids = mbs[0].0["input_ids"].to_f64_vec();
        assert_eq!(ids[0], (first_row * SEQ) as f64, "step {step}");
        let TensorData::F32(px) = mbs[0].0["pixel_values"].data() else {
            panic!("f32 tiles")
        };
        // Slot 0 holds the micro-batch's tile, slot 1 is empty.
        assert!(px[..n].iter().all(|&x| x == tile), "step {step}");
        assert!(px[n..].iter().all(|&x| x == 0.0), "step {step}");
    }
}
