//! Helpers shared by the recompute tests: a seeded generator, random bindings for a graph's
//! parameters and inputs, and bit-exact comparison of interpreter outputs.

#![allow(dead_code)]

use mmc_ir::{DType, Graph, Interpreter, Op, Outputs, Precision, Tensor, TensorType};
use mmc_passes::recompute::layer_of;
use std::collections::BTreeMap;

/// SplitMix64: a small seeded generator, enough for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Random values for every parameter and input of `g`: `special` may supply a tensor by name;
/// other floats are uniform in [-0.5, 0.5), integers in 0..4, bools true with odds 3/4.
pub fn bindings(
    g: &Graph,
    rng: &mut Rng,
    special: &dyn Fn(&str, &TensorType, &mut Rng) -> Option<Tensor>,
) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for node in g.nodes() {
        let (Op::Param { name, ty } | Op::Input { name, ty }) = &node.op else {
            continue;
        };
        let t = special(name, ty, rng).unwrap_or_else(|| {
            let vals: Vec<f64> = (0..ty.numel())
                .map(|_| match ty.dtype {
                    DType::I64 | DType::I32 => rng.below(4) as f64,
                    DType::Bool => (rng.below(4) != 0) as u8 as f64,
                    _ => rng.uniform(-0.5, 0.5),
                })
                .collect();
            Tensor::from_f64(ty.dtype, ty.shape.clone(), &vals).expect("the length matches")
        });
        out.insert(name.clone(), t);
    }
    out
}

/// Runs `g` with the declared precision.
pub fn run(g: &Graph, b: &BTreeMap<String, Tensor>) -> Outputs {
    Interpreter::new(g, Precision::Declared)
        .unwrap_or_else(|e| panic!("{e}"))
        .run(b)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Asserts that two runs gave the same outputs bit for bit (NaNs included).
pub fn assert_bit_identical(want: &Outputs, got: &Outputs, what: &str) {
    assert_eq!(want.0.len(), got.0.len(), "{what}: output count");
    for ((wn, wt), (gn, gt)) in want.0.iter().zip(&got.0) {
        assert_eq!(wn, gn, "{what}: output order");
        assert_eq!(wt.ty(), gt.ty(), "{what}: {wn}");
        assert!(
            wt.to_le_bytes() == gt.to_le_bytes(),
            "{what}: output {wn} differs"
        );
    }
}

/// After full recompute: the backward pass (and the recompute clones) read no forward value of
/// a layer except the layer's outputs (values some forward node outside the layer reads);
/// everything else inside a layer dies with its last forward use.
pub fn assert_only_layer_outputs_kept(g: &Graph) {
    let forward = |scope: &str| !scope.starts_with("grad") && !scope.starts_with("recompute:");
    let layer = |i: usize| layer_of(g.scope_name(g.nodes()[i].scope));
    let mut leaves_layer = vec![false; g.num_values()];
    for (i, n) in g.nodes().iter().enumerate() {
        if !forward(g.scope_name(n.scope)) {
            continue;
        }
        for &v in &n.inputs {
            let d = g.value_data(v).expect("a value of g").node.0 as usize;
            if layer(d) != layer(i) {
                leaves_layer[v.0 as usize] = true;
            }
        }
    }
    for (_, v) in g.outputs() {
        leaves_layer[v.0 as usize] = true;
    }
    for n in g.nodes() {
        let scope = g.scope_name(n.scope);
        if forward(scope) {
            continue;
        }
        for &v in &n.inputs {
            let d = g.value_data(v).expect("a value of g").node.0 as usize;
            let def = &g.nodes()[d];
            if !forward(g.scope_name(def.scope))
                || layer(d).is_none()
                || matches!(def.op, Op::Param { .. } | Op::Input { .. })
            {
                continue;
            }
            assert!(
                leaves_layer[v.0 as usize],
                "`{}` in `{scope}` reads `{}` of `{}`, which full recompute should have cloned",
                n.op.name(),
                def.op.name(),
                g.scope_name(def.scope)
            );
        }
    }
}
