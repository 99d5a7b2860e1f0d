//! Checkpoint reading: sharded and single-file layouts, and a clear error for every kind of
//! damage (missing, extra, misshapen tensors; truncated files; inconsistent index).

use mmc_ir::{DType, Tensor, TensorData, TensorType, WeightSource};
use mmc_runtime::weights::ParamSpec;
use mmc_runtime::{Checkpoint, WeightError};
use safetensors::tensor::TensorView;
use std::path::Path;

fn write(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            (
                n.to_string(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn spec(name: &str, shape: &[usize]) -> ParamSpec {
    ParamSpec {
        name: name.into(),
        source: WeightSource::Tensor(name.into()),
        ty: TensorType::new(DType::F32, shape),
    }
}

fn sharded(dir: &Path) {
    write(
        &dir.join("a.safetensors"),
        &[("x", vec![2], vec![1.0, 2.0])],
    );
    write(
        &dir.join("b.safetensors"),
        &[("y", vec![1, 2], vec![3.0, 4.0]), ("z", vec![], vec![5.0])],
    );
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"x": "a.safetensors", "y": "b.safetensors", "z": "b.safetensors"}}"#,
    )
    .unwrap();
}

#[test]
fn sharded_checkpoints_load_and_convert() {
    let dir = tempfile::tempdir().unwrap();
    sharded(dir.path());
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.names().collect::<Vec<_>>(), ["x", "y", "z"]);
    let params = [spec("x", &[2]), spec("y", &[1, 2]), spec("z", &[])];
    let w = ck.load(&params).unwrap();
    assert_eq!(
        w["y"],
        Tensor::new(vec![1, 2], TensorData::F32(vec![3.0, 4.0])).unwrap()
    );
    let bf = ck.read("x", DType::BF16).unwrap();
    assert_eq!(bf.dtype(), DType::BF16);
    assert_eq!(bf.to_f64_vec(), vec![1.0, 2.0]);
}

#[test]
fn each_problem_names_its_tensor() {
    let dir = tempfile::tempdir().unwrap();
    sharded(dir.path());
    let ck = Checkpoint::open(dir.path()).unwrap();
    let e = ck
        .check(&[spec("x", &[2]), spec("y", &[2, 1]), spec("z", &[])])
        .unwrap_err();
    assert!(matches!(e, WeightError::Shape { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("b.safetensors: tensor `y` has shape [1, 2], but parameter `y` needs [2, 1]"),
        "{e}"
    );
    let e = ck
        .check(&[spec("x", &[2]), spec("y", &[1, 2])])
        .unwrap_err();
    assert!(
        e.to_string().contains("tensor `z` is not a parameter"),
        "{e}"
    );
    let e = ck
        .check(&[
            spec("x", &[2]),
            spec("y", &[1, 2]),
            spec("z", &[]),
            spec("w", &[3]),
        ])
        .unwrap_err();
    assert!(e.to_string().contains("tensor `w` is missing"), "{e}");
    let e = ck.check(&[spec("w", &[3])]).unwrap_err().to_string();
    assert!(e.contains("and 3 more problems"), "{e}");
    assert!(!e.contains('\n'));
}

#[test]
fn a_truncated_shard_is_reported_with_its_file() {
    let dir = tempfile::tempdir().unwrap();
    sharded(dir.path());
    let b = dir.path().join("b.safetensors");
    let bytes = std::fs::read(&b).unwrap();
    std::fs::write(&b, &bytes[..bytes.len() - 3]).unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("b.safetensors") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn an_index_that_disagrees_with_the_shards_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    sharded(dir.path());
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors"}}"#,
    )
    .unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("model.safetensors.index.json") && e.contains("`y`"),
        "{e}"
    );
    std::fs::write(dir.path().join("model.safetensors.index.json"), "{not json").unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains("invalid JSON"), "{e}");
}

#[test]
fn a_single_file_and_a_folder_with_one_file_both_open() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("model.safetensors");
    write(&f, &[("x", vec![1], vec![7.0])]);
    assert_eq!(Checkpoint::open(&f).unwrap().len(), 1);
    assert_eq!(Checkpoint::open(dir.path()).unwrap().len(), 1);
    let empty = tempfile::tempdir().unwrap();
    let e = Checkpoint::open(empty.path()).unwrap_err().to_string();
    assert!(e.contains("no model.safetensors.index.json"), "{e}");
    std::fs::write(dir.path().join("garbage.safetensors"), b"12345678").unwrap();
    let e = Checkpoint::open(&dir.path().join("garbage.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("garbage.safetensors: not a valid safetensors file"),
        "{e}"
    );
}

#[test]
fn concatenated_sources_join_tensors_and_check_the_joined_shape() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("model.safetensors");
    write(
        &f,
        &[
            ("q", vec![1, 2], vec![1.0, 2.0]),
            ("k", vec![2, 2], vec![3.0, 4.0, 5.0, 6.0]),
        ],
    );
    let ck = Checkpoint::open(&f).unwrap();
    let spec = |rows: usize| ParamSpec {
        name: "qk".into(),
        source: WeightSource::Concat {
            parts: vec!["q".into(), "k".into()],
            axis: 0,
        },
        ty: TensorType::new(DType::F32, [rows, 2]),
    };
    let w = ck.load(&[spec(3)]).unwrap();
    assert_eq!(w["qk"].to_f64_vec(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let e = ck.check(&[spec(4)]).unwrap_err().to_string();
    assert!(
        e.contains("`q ++ k` has shape [3, 2], but parameter `qk` needs [4, 2]"),
        "{e}"
    );
}
