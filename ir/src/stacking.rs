//! Parameter stacking: one tensor that holds several logical tensors side by side.
//!
//! The routed MoE reads each layer's experts as two stacked weights, `[E, H, 2I]` (gate and up,
//! transposed) and `[E, I, H]` (down, transposed), while checkpoints, the HF layout and an
//! unfused plan know the per-expert tensors. The fusion pass that creates a stacked parameter
//! records how it is assembled; the plan keeps the record for every state tensor derived from
//! it (gradient accumulator, Adam moments), so the runtime holds the stacked tensor and still
//! reads and writes the logical ones by name. Stacking only moves elements, so going from the
//! logical tensors to the stack and back is exact (bit for bit, in every dtype).

use crate::{Tensor, TensorData, TensorType};
use serde::{Deserialize, Serialize};

/// Where one logical tensor sits in a stacked one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StackPart {
    /// The logical tensor's name, as checkpoints and an unfused plan know it.
    pub name: String,
    /// Its index on the stacked tensor's first axis (the expert).
    pub expert: usize,
    /// The first column of its block on the stacked tensor's last axis.
    pub column: usize,
    /// Columns of the block (the logical tensor's size along the stacked last axis).
    pub width: usize,
    /// Whether the block holds the logical tensor transposed: a logical `[width, a]` tensor
    /// fills `stacked[expert, :, column..column + width]` as its transpose (a torch Linear
    /// weight `[out, in]` read as `in x out`); otherwise a logical `[a, width]` one fills it
    /// as it is.
    pub transposed: bool,
}

/// How one stacked tensor `[E, a, c]` is assembled from logical 2-d tensors of its dtype.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ParamStacking {
    /// The stacked tensor's name (what the programs read).
    pub stacked: String,
    /// Its type, `[E, a, c]`.
    #[serde(with = "crate::plan::type_text")]
    pub ty: TensorType,
    /// The logical tensors, which together cover every element exactly once.
    pub parts: Vec<StackPart>,
}

/// Why a stacking does not fit its tensors.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("stacking `{stacked}`: {message}")]
pub struct StackingError {
    pub stacked: String,
    pub message: String,
}

impl ParamStacking {
    fn error(&self, message: String) -> StackingError {
        StackingError {
            stacked: self.stacked.clone(),
            message,
        }
    }

    /// `(E, a, c)`, the stacked shape.
    fn dims(&self) -> (usize, usize, usize) {
        match self.ty.shape.as_slice() {
            &[e, a, c] => (e, a, c),
            _ => (0, 0, 0),
        }
    }

    /// The type of part `i` (the stacked dtype; `[width, a]` when transposed, else
    /// `[a, width]`).
    pub fn part_type(&self, i: usize) -> TensorType {
        let (_, a, _) = self.dims();
        let p = &self.parts[i];
        let shape = if p.transposed {
            [p.width, a]
        } else {
            [a, p.width]
        };
        TensorType::new(self.ty.dtype, shape)
    }

    /// The same stacking for a state tensor derived from the stacked one and its parts by a
    /// role prefix (`adam_m:` makes `adam_m:<stacked>` from `adam_m:<part>`).
    pub fn with_prefix(&self, prefix: &str) -> ParamStacking {
        ParamStacking {
            stacked: format!("{prefix}{}", self.stacked),
            ty: self.ty.clone(),
            parts: self
                .parts
                .iter()
                .map(|p| StackPart {
                    name: format!("{prefix}{}", p.name),
                    ..p.clone()
                })
                .collect(),
        }
    }

    /// Checks that the stacked type is `[E, a, c]` and that the parts' blocks cover it
    /// exactly once, with distinct names.
    pub fn check(&self) -> Result<(), StackingError> {
        if self.ty.rank() != 3 {
            return Err(self.error(format!("the stacked type {} is not [E, a, c]", self.ty)));
        }
        let (e, _, c) = self.dims();
        let mut names = std::collections::HashSet::new();
        let mut blocks: Vec<Vec<(usize, usize)>> = vec![Vec::new(); e];
        for p in &self.parts {
            if !names.insert(p.name.as_str()) {
                return Err(self.error(format!("part `{}` appears twice", p.name)));
            }
            if p.expert >= e || p.width == 0 || p.column + p.width > c {
                return Err(self.error(format!(
                    "part `{}` (expert {}, columns {}..{}) lies outside {}",
                    p.name,
                    p.expert,
                    p.column,
                    p.column + p.width,
                    self.ty
                )));
            }
            blocks[p.expert].push((p.column, p.column + p.width));
        }
        for (i, b) in blocks.iter_mut().enumerate() {
            b.sort_unstable();
            let mut at = 0;
            for &(s, end) in b.iter() {
                if s != at {
                    return Err(self.error(format!(
                        "expert {i}: columns {at}..{s} are {}",
                        if s > at {
                            "not covered"
                        } else {
                            "covered twice"
                        }
                    )));
                }
                at = end;
            }
            if at != c {
                return Err(self.error(format!("expert {i}: columns {at}..{c} are not covered")));
            }
        }
        Ok(())
    }

    /// The stacked tensor from its parts (in `parts` order, each of its `part_type`).
    pub fn stack(&self, parts: &[&Tensor]) -> Result<Tensor, StackingError> {
        self.check()?;
        if parts.len() != self.parts.len() {
            return Err(self.error(format!(
                "{} parts given, the stacking has {}",
                parts.len(),
                self.parts.len()
            )));
        }
        let mut out = zeros(&self.ty);
        for (i, t) in parts.iter().enumerate() {
            self.place(&mut out, i, t)?;
        }
        Ok(Tensor::new(self.ty.shape.clone(), out).expect("the data has the stacked size"))
    }

    /// `stacked` with part `i` replaced by `part`.
    pub fn write_part(
        &self,
        stacked: Tensor,
        i: usize,
        part: &Tensor,
    ) -> Result<Tensor, StackingError> {
        self.check_stacked(&stacked)?;
        self.check_part(i, part)?;
        let mut data = stacked.into_data();
        self.place(&mut data, i, part)?;
        Ok(Tensor::new(self.ty.shape.clone(), data).expect("the data has the stacked size"))
    }

    /// Part `i` of `stacked`, as its own tensor.
    pub fn read_part(&self, stacked: &Tensor, i: usize) -> Result<Tensor, StackingError> {
        self.check_stacked(stacked)?;
        let ty = self.part_type(i);
        let geo = self.geometry(i);
        macro_rules! read {
            ($($v:ident),*) => {
                match stacked.data() {
                    $(TensorData::$v(s) => TensorData::$v(geo.read(s)),)*
                }
            };
        }
        let data = read!(F64, F32, BF16, F16, I64, I32, Bool);
        Ok(Tensor::new(ty.shape, data).expect("the block has the part's size"))
    }

    fn check_stacked(&self, t: &Tensor) -> Result<(), StackingError> {
        if t.ty() != self.ty {
            return Err(self.error(format!("the stacked tensor is {}, not {}", t.ty(), self.ty)));
        }
        Ok(())
    }

    fn geometry(&self, i: usize) -> Geometry {
        let (_, a, c) = self.dims();
        let p = &self.parts[i];
        Geometry {
            base: p.expert * a * c + p.column,
            rows: a,
            row_stride: c,
            width: p.width,
            transposed: p.transposed,
        }
    }

    fn check_part(&self, i: usize, part: &Tensor) -> Result<(), StackingError> {
        let want = self.part_type(i);
        if part.ty() != want {
            return Err(self.error(format!(
                "part `{}` is {}, the stacking needs {want}",
                self.parts[i].name,
                part.ty()
            )));
        }
        Ok(())
    }

    fn place(&self, out: &mut TensorData, i: usize, part: &Tensor) -> Result<(), StackingError> {
        self.check_part(i, part)?;
        let geo = self.geometry(i);
        macro_rules! write {
            ($($v:ident),*) => {
                match (out, part.data()) {
                    $((TensorData::$v(d), TensorData::$v(s)) => geo.write(d, s),)*
                    _ => unreachable!("the dtypes were checked equal"),
                }
            };
        }
        write!(F64, F32, BF16, F16, I64, I32, Bool);
        Ok(())
    }
}

/// Where a block lies in the flat stacked data.
struct Geometry {
    /// Flat index of the block's first element.
    base: usize,
    rows: usize,
    row_stride: usize,
    width: usize,
    transposed: bool,
}

impl Geometry {
    /// Flat index in the part of the block's element (row r, column j).
    fn part_index(&self, r: usize, j: usize) -> usize {
        if self.transposed {
            j * self.rows + r
        } else {
            r * self.width + j
        }
    }

    fn write<T: Copy>(&self, dst: &mut [T], src: &[T]) {
        for r in 0..self.rows {
            let row = self.base + r * self.row_stride;
            for j in 0..self.width {
                dst[row + j] = src[self.part_index(r, j)];
            }
        }
    }

    fn read<T: Copy + Default>(&self, src: &[T]) -> Vec<T> {
        let mut out = vec![T::default(); self.rows * self.width];
        for r in 0..self.rows {
            let row = self.base + r * self.row_stride;
            for j in 0..self.width {
                out[self.part_index(r, j)] = src[row + j];
            }
        }
        out
    }
}

fn zeros(ty: &TensorType) -> TensorData {
    let n = ty.numel();
    match ty.dtype {
        crate::DType::F64 => TensorData::F64(vec![0.0; n]),
        crate::DType::F32 => TensorData::F32(vec![0.0; n]),
        crate::DType::BF16 => TensorData::BF16(vec![Default::default(); n]),
        crate::DType::F16 => TensorData::F16(vec![Default::default(); n]),
        crate::DType::I64 => TensorData::I64(vec![0; n]),
        crate::DType::I32 => TensorData::I32(vec![0; n]),
        crate::DType::Bool => TensorData::Bool(vec![false; n]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    /// Two experts of gate/up [3, 2] and down [2, 3], stacked as the routed MoE reads them.
    fn gate_up() -> ParamStacking {
        let part = |name: &str, expert, column| StackPart {
            name: name.into(),
            expert,
            column,
            width: 3,
            transposed: true,
        };
        ParamStacking {
            stacked: "e.gate_up_proj".into(),
            ty: TensorType::new(DType::F32, [2, 2, 6]),
            parts: vec![
                part("e.0.gate", 0, 0),
                part("e.0.up", 0, 3),
                part("e.1.gate", 1, 0),
                part("e.1.up", 1, 3),
            ],
        }
    }

    fn t(shape: [usize; 2], from: f32) -> Tensor {
        let n = shape[0] * shape[1];
        Tensor::new(
            shape.to_vec(),
            TensorData::F32((0..n).map(|i| from + i as f32).collect()),
        )
        .unwrap()
    }

    #[test]
    fn stacking_transposes_each_block_into_place_and_back() {
        let s = gate_up();
        let parts = [
            t([3, 2], 0.0),
            t([3, 2], 10.0),
            t([3, 2], 20.0),
            t([3, 2], 30.0),
        ];
        let refs: Vec<&Tensor> = parts.iter().collect();
        let st = s.stack(&refs).unwrap();
        // stacked[0] = [gate0^T | up0^T]: row 0 is gate0[:, 0] then up0[:, 0].
        let v = st.to_f64_vec();
        assert_eq!(&v[..6], &[0.0, 2.0, 4.0, 10.0, 12.0, 14.0]);
        assert_eq!(&v[6..12], &[1.0, 3.0, 5.0, 11.0, 13.0, 15.0]);
        assert_eq!(&v[12..15], &[20.0, 22.0, 24.0]);
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(&s.read_part(&st, i).unwrap(), p);
        }
        let st = s.write_part(st, 2, &t([3, 2], 50.0)).unwrap();
        assert_eq!(s.read_part(&st, 2).unwrap(), t([3, 2], 50.0));
        assert_eq!(s.read_part(&st, 3).unwrap(), parts[3]);
    }

    #[test]
    fn untransposed_parts_fill_their_columns_as_they_are() {
        let s = ParamStacking {
            stacked: "d".into(),
            ty: TensorType::new(DType::F32, [1, 2, 3]),
            parts: vec![StackPart {
                name: "p".into(),
                expert: 0,
                column: 0,
                width: 3,
                transposed: false,
            }],
        };
        let p = t([2, 3], 0.0);
        let st = s.stack(&[&p]).unwrap();
        assert_eq!(st.to_f64_vec(), p.to_f64_vec());
    }

    #[test]
    fn blocks_must_cover_the_stack_exactly_once() {
        let mut s = gate_up();
        s.parts.pop();
        assert!(s.check().unwrap_err().to_string().contains("expert 1"));
        let mut s = gate_up();
        s.parts[1].column = 2;
        assert!(s.check().is_err());
        let mut s = gate_up();
        s.parts[3].name = "e.1.gate".into();
        assert!(s.check().unwrap_err().to_string().contains("twice"));
        let mut s = gate_up();
        s.ty = TensorType::new(DType::F32, [2, 12]);
        assert!(s.check().is_err());
    }

    #[test]
    fn parts_of_another_type_are_refused() {
        let s = gate_up();
        let bad = [
            t([2, 3], 0.0),
            t([3, 2], 0.0),
            t([3, 2], 0.0),
            t([3, 2], 0.0),
        ];
        let refs: Vec<&Tensor> = bad.iter().collect();
        assert!(s.stack(&refs).unwrap_err().to_string().contains("e.0.gate"));
    }

    #[test]
    fn a_prefix_renames_the_stack_and_every_part() {
        let s = gate_up().with_prefix("adam_m:");
        assert_eq!(s.stacked, "adam_m:e.gate_up_proj");
        assert!(s.parts.iter().all(|p| p.name.starts_with("adam_m:e.")));
    }
}
