//! Host tensors: the values that bind parameters and inputs and that the interpreter returns.

use crate::{DType, DisplayShape, Shape, TensorType};
use half::{bf16, f16};

/// Typed element storage of a host tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F64(Vec<f64>),
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    Bool(Vec<bool>),
}

impl TensorData {
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F64(_) => DType::F64,
            TensorData::F32(_) => DType::F32,
            TensorData::BF16(_) => DType::BF16,
            TensorData::F16(_) => DType::F16,
            TensorData::I64(_) => DType::I64,
            TensorData::I32(_) => DType::I32,
            TensorData::Bool(_) => DType::Bool,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            TensorData::F64(v) => v.len(),
            TensorData::F32(v) => v.len(),
            TensorData::BF16(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Errors from building or converting host tensors.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    #[error("{len} elements do not fill shape {shape}", shape = DisplayShape(.shape))]
    LengthMismatch { len: usize, shape: Shape },
    #[error("{got} bytes do not hold {numel} {dtype} elements")]
    ByteLength {
        got: usize,
        numel: usize,
        dtype: DType,
    },
}

/// A dense, row-major host tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Shape,
    data: TensorData,
}

impl Tensor {
    pub fn new(shape: impl Into<Shape>, data: TensorData) -> Result<Self, TensorError> {
        let shape = shape.into();
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(TensorError::LengthMismatch {
                len: data.len(),
                shape,
            });
        }
        Ok(Tensor { shape, data })
    }

    /// A tensor of `dtype` from f64 values, rounded to the dtype (ints truncate toward zero;
    /// bf16 through f32, see [`round_bf16`]).
    pub fn from_f64(
        dtype: DType,
        shape: impl Into<Shape>,
        values: &[f64],
    ) -> Result<Self, TensorError> {
        Self::from_f64_iter(dtype, shape, values.iter().copied())
    }

    /// [`Tensor::from_f64`] from an iterator, rounding each value as it comes: a large
    /// tensor (an initialised weight) is built without an f64 copy of it first.
    pub fn from_f64_iter(
        dtype: DType,
        shape: impl Into<Shape>,
        values: impl Iterator<Item = f64>,
    ) -> Result<Self, TensorError> {
        let data = match dtype {
            DType::F64 => TensorData::F64(values.collect()),
            DType::F32 => TensorData::F32(values.map(|x| x as f32).collect()),
            DType::BF16 => TensorData::BF16(values.map(|x| bf16::from_f32(x as f32)).collect()),
            DType::F16 => TensorData::F16(values.map(f16::from_f64).collect()),
            DType::I64 => TensorData::I64(values.map(|x| x as i64).collect()),
            DType::I32 => TensorData::I32(values.map(|x| x as i32).collect()),
            DType::Bool => TensorData::Bool(values.map(|x| x != 0.0).collect()),
        };
        Tensor::new(shape, data)
    }

    /// A tensor of `dtype` from little-endian bytes, as stored in safetensors files.
    pub fn from_le_bytes(
        dtype: DType,
        shape: impl Into<Shape>,
        bytes: &[u8],
    ) -> Result<Self, TensorError> {
        let shape = shape.into();
        let numel: usize = shape.iter().product();
        if bytes.len() != numel * dtype.size_bytes() {
            return Err(TensorError::ByteLength {
                got: bytes.len(),
                numel,
                dtype,
            });
        }
        fn chunks<const N: usize, T>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            bytes
                .chunks_exact(N)
                .map(|c| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(c);
                    f(a)
                })
                .collect()
        }
        let data = match dtype {
            DType::F64 => TensorData::F64(chunks(bytes, f64::from_le_bytes)),
            DType::F32 => TensorData::F32(chunks(bytes, f32::from_le_bytes)),
            DType::BF16 => TensorData::BF16(chunks(bytes, bf16::from_le_bytes)),
            DType::F16 => TensorData::F16(chunks(bytes, f16::from_le_bytes)),
            DType::I64 => TensorData::I64(chunks(bytes, i64::from_le_bytes)),
            DType::I32 => TensorData::I32(chunks(bytes, i32::from_le_bytes)),
            DType::Bool => TensorData::Bool(bytes.iter().map(|&b| b != 0).collect()),
        };
        Tensor::new(shape, data)
    }

    /// The elements as little-endian bytes (the safetensors layout).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match &self.data {
            TensorData::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::Bool(v) => v.iter().map(|&b| b as u8).collect(),
        }
    }

    pub fn scalar_f32(x: f32) -> Self {
        Tensor {
            shape: vec![],
            data: TensorData::F32(vec![x]),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn ty(&self) -> TensorType {
        TensorType::new(self.dtype(), self.shape.clone())
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// The elements' storage, for generated code that reads and writes tensors in place
    /// (bools are one byte each, 0 or 1, as kernels store them).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        match &mut self.data {
            TensorData::F64(v) => v.as_mut_ptr().cast(),
            TensorData::F32(v) => v.as_mut_ptr().cast(),
            TensorData::BF16(v) => v.as_mut_ptr().cast(),
            TensorData::F16(v) => v.as_mut_ptr().cast(),
            TensorData::I64(v) => v.as_mut_ptr().cast(),
            TensorData::I32(v) => v.as_mut_ptr().cast(),
            TensorData::Bool(v) => v.as_mut_ptr().cast(),
        }
    }

    /// The elements' storage, read-only (see [`Tensor::as_mut_ptr`]).
    pub fn as_ptr(&self) -> *const u8 {
        match &self.data {
            TensorData::F64(v) => v.as_ptr().cast(),
            TensorData::F32(v) => v.as_ptr().cast(),
            TensorData::BF16(v) => v.as_ptr().cast(),
            TensorData::F16(v) => v.as_ptr().cast(),
            TensorData::I64(v) => v.as_ptr().cast(),
            TensorData::I32(v) => v.as_ptr().cast(),
            TensorData::Bool(v) => v.as_ptr().cast(),
        }
    }

    pub fn data(&self) -> &TensorData {
        &self.data
    }

    pub fn into_data(self) -> TensorData {
        self.data
    }

    /// The elements widened to f64 (bools as 0/1).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match &self.data {
            TensorData::F64(v) => v.clone(),
            TensorData::F32(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
            TensorData::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            TensorData::I64(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::I32(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::Bool(v) => v.iter().map(|&x| x as u8 as f64).collect(),
        }
    }

    /// The same values in another dtype.
    pub fn cast(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        match (&self.data, dtype) {
            (TensorData::I64(v), DType::I32) => Tensor {
                shape: self.shape.clone(),
                data: TensorData::I32(v.iter().map(|&x| x as i32).collect()),
            },
            (TensorData::I32(v), DType::I64) => Tensor {
                shape: self.shape.clone(),
                data: TensorData::I64(v.iter().map(|&x| x as i64).collect()),
            },
            _ => Tensor::from_f64(dtype, self.shape.clone(), &self.to_f64_vec())
                .expect("same element count"),
        }
    }
}

impl Tensor {
    /// Concatenates tensors of one dtype along `axis`; `None` when their dtypes, ranks or other
    /// dimensions differ.
    pub fn concat(parts: &[Tensor], axis: usize) -> Option<Tensor> {
        let first = parts.first()?;
        let rank = first.shape.len();
        let dtype = first.dtype();
        let same = parts.iter().all(|t| {
            t.dtype() == dtype
                && t.shape.len() == rank
                && axis < rank
                && (0..rank).all(|i| i == axis || t.shape[i] == first.shape[i])
        });
        if !same {
            return None;
        }
        let outer: usize = first.shape[..axis].iter().product();
        let bytes: Vec<Vec<u8>> = parts.iter().map(|t| t.to_le_bytes()).collect();
        let chunk: Vec<usize> = parts
            .iter()
            .map(|t| t.shape[axis..].iter().product::<usize>() * dtype.size_bytes())
            .collect();
        let mut out = Vec::with_capacity(bytes.iter().map(|b| b.len()).sum());
        for o in 0..outer {
            for (b, &c) in bytes.iter().zip(&chunk) {
                out.extend_from_slice(&b[o * c..(o + 1) * c]);
            }
        }
        let mut shape = first.shape.clone();
        shape[axis] = parts.iter().map(|t| t.shape[axis]).sum();
        Tensor::from_le_bytes(dtype, shape, &out).ok()
    }
}

/// The relative error ‖a − b‖ / ‖b‖ (Euclidean norms over all elements), the measure every
/// parity test uses. Returns the absolute norm ‖a − b‖ when b is all zeros.
pub fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_f64_vec(), b.to_f64_vec());
    let diff: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    if norm == 0.0 {
        diff
    } else {
        diff / norm
    }
}

/// `x` rounded to bf16 as PyTorch rounds a bf16 op's result: to f32, then to the nearest bf16
/// (ties to even). For `+ - * /` and `sqrt` this is the one correct rounding of the exact
/// value (f32 carries more than twice bf16's precision), and it is what a kernel computing in
/// f32 gives, so the interpreter and the compiled kernels agree bit for bit.
pub fn round_bf16(x: f64) -> f64 {
    bf16::from_f32(x as f32).to_f64()
}
