//! The data pipeline against InternVL's Python pipeline (PIL + torchvision + the transformers
//! tokenizer): token ids, labels, tile grids and pixels of every sample of
//! tests/fixtures/data_parity (written by tests/fixtures/make_fixtures.py, section data).

mod common;

use common::{repo, settings};
use mmc_ir::DType;
use mmc_runtime::data::sample::Outcome;
use mmc_runtime::data::{DataLoader, DataPosition};
use mmc_runtime::Checkpoint;

#[test]
fn every_sample_matches_the_python_pipeline() {
    let dir = repo("tests/fixtures/data_parity");
    let loader = DataLoader::open(
        &dir.join("data.json"),
        &settings(1, 1024, 7, 1),
        DataPosition { sample: 0 },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let reference = Checkpoint::open(&dir.join("reference.safetensors")).unwrap();
    let n = loader.samples_per_epoch() as usize;
    assert!(n >= 20, "only {n} samples");
    let mut worst_pixel = 0.0f64;
    for i in 0..n {
        let Outcome::Ready { sample, truncated } =
            loader.prepare(i).unwrap_or_else(|e| panic!("{e}"))
        else {
            panic!("sample {i} does not fit");
        };
        assert!(!truncated);
        let ints = |name: &str| -> Vec<i64> {
            reference
                .read(&format!("sample{i}.{name}"), DType::I64)
                .unwrap_or_else(|e| panic!("{e}"))
                .to_f64_vec()
                .iter()
                .map(|&x| x as i64)
                .collect()
        };
        assert_eq!(sample.input_ids, ints("input_ids"), "sample {i}: token ids");
        assert_eq!(sample.labels, ints("labels"), "sample {i}: labels");
        let name = format!("sample{i}.pixel_values");
        if reference.shape(&name).is_some() {
            let grids: Vec<(usize, usize)> = ints("grids")
                .chunks(2)
                .map(|c| (c[0] as usize, c[1] as usize))
                .collect();
            assert_eq!(sample.grids, grids, "sample {i}: tile grids");
            let want = reference.read(&name, DType::F32).unwrap();
            assert_eq!(sample.n_tiles, want.shape()[0], "sample {i}: tiles");
            let got = &sample.tiles;
            let want = want.to_f64_vec();
            assert_eq!(got.len(), want.len());
            let max = got
                .iter()
                .zip(&want)
                .map(|(&a, &b)| (a as f64 - b).abs())
                .fold(0.0, f64::max);
            assert!(max <= 2e-2, "sample {i}: pixel difference {max}");
            worst_pixel = worst_pixel.max(max);
        } else {
            assert_eq!(sample.n_tiles, 0, "sample {i} is text-only");
        }
    }
    eprintln!("{n} samples: ids and labels identical; worst pixel difference {worst_pixel:.2e}");
}
