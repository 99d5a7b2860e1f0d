//! Tensor types: a dtype and a static shape.

use crate::DType;
use std::fmt;

/// The static shape of a tensor, outermost dimension first. A scalar has an empty shape.
pub type Shape = Vec<usize>;

/// The type of an SSA value: element type plus static shape.
///
/// Shapes are static by design: a plan is compiled for fixed batch, sequence and tile counts.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorType {
    pub fn new(dtype: DType, shape: impl Into<Shape>) -> Self {
        TensorType {
            dtype,
            shape: shape.into(),
        }
    }

    /// A 0-d tensor of the given dtype.
    pub fn scalar(dtype: DType) -> Self {
        TensorType::new(dtype, Vec::new())
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes that one value of this type occupies.
    pub fn size_bytes(&self) -> usize {
        self.numel() * self.dtype.size_bytes()
    }

    /// [`TensorType::size_bytes`], or `None` when it does not fit a `usize`: the parsers reject
    /// such types, so that no size computed from a type read from text can overflow.
    pub fn checked_size_bytes(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(self.dtype.size_bytes(), |n, &d| n.checked_mul(d))
    }

    /// The same shape with another dtype.
    pub fn with_dtype(&self, dtype: DType) -> Self {
        TensorType::new(dtype, self.shape.clone())
    }
}

/// Writes a shape as `[2, 3, 4]`.
pub struct DisplayShape<'a>(pub &'a [usize]);

impl fmt::Display for DisplayShape<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, DisplayShape(&self.shape))
    }
}

impl std::str::FromStr for TensorType {
    type Err = String;

    /// Parses the display form, `f32[2, 3]` (`f32[]` for a scalar).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not a tensor type such as f32[2, 3]");
        let (dtype, rest) = s.trim().split_once('[').ok_or_else(bad)?;
        let dims = rest.strip_suffix(']').ok_or_else(bad)?;
        let dtype: DType = dtype.parse().map_err(|_| bad())?;
        let shape = if dims.trim().is_empty() {
            Vec::new()
        } else {
            dims.split(',')
                .map(|d| d.trim().parse::<usize>().map_err(|_| bad()))
                .collect::<Result<Vec<_>, _>>()?
        };
        let t = TensorType::new(dtype, shape);
        if t.checked_size_bytes().is_none() {
            return Err(format!("`{s}` is too large: its size in bytes overflows"));
        }
        Ok(t)
    }
}
