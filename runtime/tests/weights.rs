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

/// Writes a safetensors file of one dtype from raw little-endian bytes per tensor.
fn write_raw(path: &Path, dtype: safetensors::Dtype, tensors: &[(&str, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| (n.to_string(), TensorView::new(dtype, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Writes a file with a hand-made header (JSON) followed by `data_len` zero bytes.
fn write_header(path: &Path, header: &str, data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + data_len, 0);
    std::fs::write(path, bytes).unwrap();
}

/// An error with its sources, joined as `anyhow`'s `{:#}` prints them (what `mmc` shows).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    s
}

#[test]
fn a_float_parameter_refuses_integer_tensors_and_the_other_way_round() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("model.safetensors");
    let ints: Vec<u8> = [1i32, 2].iter().flat_map(|x| x.to_le_bytes()).collect();
    write_raw(&f, safetensors::Dtype::I32, &[("w", vec![2], ints)]);
    let ck = Checkpoint::open(&f).unwrap();
    let e = ck.check(&[spec("w", &[2])]).unwrap_err();
    assert!(matches!(e, WeightError::DtypeMismatch { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("model.safetensors: tensor `w` has dtype i32, but parameter `w` needs f32"),
        "{text}"
    );
    assert!(!text.contains('\n'));
    assert!(ck.load(&[spec("w", &[2])]).is_err());
    // Integer data reads as integers of another width (token ids), never as floats.
    assert_eq!(ck.read("w", DType::I64).unwrap().to_f64_vec(), [1.0, 2.0]);
    let e = ck.read("w", DType::F32).unwrap_err().to_string();
    assert!(
        e.contains("tensor `w` has dtype i32, but it is read as f32"),
        "{e}"
    );
    // An integer parameter refuses float data.
    let g = dir.path().join("floats.safetensors");
    write(&g, &[("n", vec![1], vec![1.0])]);
    let ck = Checkpoint::open(&g).unwrap();
    let int_param = ParamSpec {
        ty: TensorType::new(DType::I64, [1]),
        ..spec("n", &[1])
    };
    let e = ck.check(&[int_param]).unwrap_err().to_string();
    assert!(
        e.contains("tensor `n` has dtype f32, but parameter `n` needs i64"),
        "{e}"
    );
    assert!(ck.read("n", DType::I64).is_err());
}

#[test]
fn float_checkpoints_of_any_width_load_into_f32_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("model.safetensors");
    let bf: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
        .collect();
    write_raw(&f, safetensors::Dtype::BF16, &[("w", vec![2], bf)]);
    let w = Checkpoint::open(&f)
        .unwrap()
        .load(&[spec("w", &[2])])
        .unwrap();
    assert_eq!(w["w"].dtype(), DType::F32);
    assert_eq!(w["w"].to_f64_vec(), [1.5, -2.0]);
}

#[test]
fn nan_or_infinite_values_are_named_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("model.safetensors");
    write(
        &f,
        &[
            ("a", vec![2], vec![1.0, 2.0]),
            (
                "w",
                vec![2, 3],
                vec![0.0, 1.0, f32::NAN, 3.0, f32::INFINITY, 5.0],
            ),
        ],
    );
    let ck = Checkpoint::open(&f).unwrap();
    let params = [spec("a", &[2]), spec("w", &[2, 3])];
    // The check reads no values; loading does.
    ck.check(&params).unwrap();
    let e = ck.load(&params).unwrap_err();
    assert!(matches!(e, WeightError::NonFinite { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!(
            "{}: tensor `w` holds 2 NaN or infinite values as f32 (the first at index [0, 2])",
            f.display()
        )
    );
    // A concatenated parameter names the part, with the part's own index.
    let spec_qk = ParamSpec {
        name: "aw".into(),
        source: WeightSource::Concat {
            parts: vec!["a".into(), "w".into()],
            axis: 0,
        },
        ty: TensorType::new(DType::F32, [8]),
    };
    let g = dir.path().join("flat.safetensors");
    write(
        &g,
        &[
            ("a", vec![2], vec![1.0, 2.0]),
            (
                "w",
                vec![6],
                vec![0.0, 1.0, 2.0, 3.0, 4.0, f32::NEG_INFINITY],
            ),
        ],
    );
    let e = Checkpoint::open(&g)
        .unwrap()
        .load(&[spec_qk])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tensor `w` holds 1 NaN or infinite value as f32 (the first at index [5])"),
        "{e}"
    );
}

#[test]
fn an_f64_value_too_large_for_f32_is_reported_as_infinite() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("model.safetensors");
    let big: Vec<u8> = [1.0f64, 1e300]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    write_raw(&f, safetensors::Dtype::F64, &[("w", vec![2], big)]);
    let e = Checkpoint::open(&f)
        .unwrap()
        .load(&[spec("w", &[2])])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tensor `w` holds 1 NaN or infinite value as f32"),
        "{e}"
    );
}

#[test]
fn a_damaged_header_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("model.safetensors");
    let cases = [
        (
            r#"{"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}"#,
            20,
            "tensor `w`: shape [2, 3] of F32 is 24 bytes, but data_offsets [0, 20] span 20",
        ),
        (
            r#"{"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}"#,
            8,
            "tensor `w`: unknown dtype `Q4`",
        ),
        (
            r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}"#,
            12,
            "tensor `b`: data_offsets [4, 12] overlap tensor `a` (which ends at 8)",
        ),
        (
            r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}"#,
            12,
            "tensor `b`: data_offsets [8, 12] leave a gap after tensor `a` (which ends at 4)",
        ),
        (
            r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}"#,
            12,
            "tensor `b`: data_offsets [8, 16] run past the end of the data (12 bytes after the header; truncated?)",
        ),
        (
            r#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}"#,
            8,
            "tensor `w`: data_offsets [8, 0] end before they begin",
        ),
        (
            r#"{"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}"#,
            8,
            "tensor `w`: `shape` is not a list of sizes",
        ),
    ];
    for (header, data_len, want) in cases {
        write_header(&f, header, data_len);
        let e = Checkpoint::open(&f).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("{}: not a valid safetensors file: {want}", f.display())
        );
    }
}

#[test]
fn a_missing_shard_is_one_line_with_the_os_error_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"x": "missing.safetensors"}}"#,
    )
    .unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(e, WeightError::Io { .. }), "{e}");
    let shown = chain(&e);
    assert!(shown.contains("missing.safetensors: "), "{shown}");
    let os_text = std::fs::File::open(dir.path().join("missing.safetensors"))
        .unwrap_err()
        .to_string();
    assert_eq!(shown.matches(&os_text).count(), 1, "{shown}");
    assert!(!shown.contains('\n'));
}
