//! The expert merge: MindSpeed-MM stores each MoE layer's experts as two stacked tensors, and
//! so do mmc's checkpoints. For a layer with E experts of width I over hidden size H:
//!
//! - `<layer>.mlp.experts.gate_up_proj` `[E, H, 2I]`: expert e's block is cat(gate_e, up_e)
//!   (`[2I, H]`, gate rows first) transposed;
//! - `<layer>.mlp.experts.down_proj` `[E, I, H]`: expert e's block is down_e (`[H, I]`)
//!   transposed.
//!
//! (MindSpeed's files view the gate_up bytes as `[E*H, 2I]`; transformers v5 keeps the same
//! names in memory but as `[E, 2I, H]` and `[E, H, I]`.) The per-expert tensors are the HF
//! checkpoint's `<layer>.mlp.experts.<e>.{gate,up,down}_proj.weight`, which are also the names
//! of the model's parameters. The rules work on bytes of any element size, so a bf16
//! checkpoint round-trips bit for bit, and on any name prefix (`adam_m:`), so optimizer state
//! stacks the same way.

use std::collections::BTreeMap;

/// Which of a layer's two stacked tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackKind {
    /// `[E, H, 2I]` from gate and up.
    GateUp,
    /// `[E, I, H]` from down.
    Down,
}

/// One stacked tensor and the per-expert tensors it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertStack {
    /// `<layer>.mlp.experts.gate_up_proj` or `<layer>.mlp.experts.down_proj`.
    pub name: String,
    pub kind: StackKind,
    /// Per expert, in order: `[gate, up]` for `GateUp`, `[down]` for `Down`.
    pub experts: Vec<Vec<String>>,
    /// Hidden size H and expert width I.
    pub hidden: usize,
    pub width: usize,
}

impl ExpertStack {
    /// The stacked shape: `[E, H, 2I]` or `[E, I, H]`.
    pub fn shape(&self) -> Vec<usize> {
        let e = self.experts.len();
        match self.kind {
            StackKind::GateUp => vec![e, self.hidden, 2 * self.width],
            StackKind::Down => vec![e, self.width, self.hidden],
        }
    }

    /// Elements of one expert's block.
    pub fn block_len(&self) -> usize {
        match self.kind {
            StackKind::GateUp => 2 * self.hidden * self.width,
            StackKind::Down => self.hidden * self.width,
        }
    }

    /// Expert e's block from its per-expert tensors' bytes (`parts` as in `experts[e]`).
    pub fn block(&self, parts: &[&[u8]], elem: usize) -> Vec<u8> {
        match self.kind {
            StackKind::GateUp => {
                let mut rows = Vec::with_capacity(parts[0].len() + parts[1].len());
                rows.extend_from_slice(parts[0]);
                rows.extend_from_slice(parts[1]);
                transpose(&rows, 2 * self.width, self.hidden, elem)
            }
            StackKind::Down => transpose(parts[0], self.hidden, self.width, elem),
        }
    }

    /// The per-expert tensors' bytes of one block (the inverse of [`ExpertStack::block`]).
    pub fn unblock(&self, block: &[u8], elem: usize) -> Vec<Vec<u8>> {
        match self.kind {
            StackKind::GateUp => {
                let mut gate = transpose(block, self.hidden, 2 * self.width, elem);
                let up = gate.split_off(gate.len() / 2);
                vec![gate, up]
            }
            StackKind::Down => vec![transpose(block, self.width, self.hidden, elem)],
        }
    }
}

/// `[rows, cols]` to `[cols, rows]`, for elements of `elem` bytes. Works in tiles so that both
/// sides stay in cache (a conversion transposes every expert of a checkpoint), with the common
/// element sizes copied as fixed-size values.
pub fn transpose(src: &[u8], rows: usize, cols: usize, elem: usize) -> Vec<u8> {
    debug_assert_eq!(src.len(), rows * cols * elem);
    let mut out = vec![0u8; src.len()];
    match elem {
        1 => transpose_n::<1>(src, &mut out, rows, cols),
        2 => transpose_n::<2>(src, &mut out, rows, cols),
        4 => transpose_n::<4>(src, &mut out, rows, cols),
        8 => transpose_n::<8>(src, &mut out, rows, cols),
        _ => {
            for r in 0..rows {
                for c in 0..cols {
                    let from = (r * cols + c) * elem;
                    let to = (c * rows + r) * elem;
                    out[to..to + elem].copy_from_slice(&src[from..from + elem]);
                }
            }
        }
    }
    out
}

fn transpose_n<const N: usize>(src: &[u8], out: &mut [u8], rows: usize, cols: usize) {
    const TILE: usize = 32;
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    let (from, to) = ((r * cols + c) * N, (c * rows + r) * N);
                    out[to..to + N].copy_from_slice(&src[from..from + N]);
                }
            }
        }
    }
}

/// Splits `<layer>.mlp.experts.<e>.<proj>.weight` into (`<layer>.mlp.experts`, e, proj).
fn expert_name(name: &str) -> Option<(&str, usize, &str)> {
    let (head, proj) = name.strip_suffix(".weight")?.rsplit_once('.')?;
    let (group, e) = head.rsplit_once('.')?;
    if !group.ends_with(".mlp.experts") || !matches!(proj, "gate_proj" | "up_proj" | "down_proj") {
        return None;
    }
    Some((group, e.parse().ok()?, proj))
}

/// Finds the expert groups among `tensors` (name and shape): each layer whose experts
/// 0..E all have gate `[I, H]`, up `[I, H]` and down `[H, I]` gives its two stacks. Tensors of
/// incomplete or inconsistent groups are not stacked. Returns the stacks, in name order.
pub fn expert_stacks<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
) -> Vec<ExpertStack> {
    // group -> expert -> proj -> shape
    let mut groups: BTreeMap<&str, BTreeMap<usize, BTreeMap<&str, &[usize]>>> = BTreeMap::new();
    for (name, shape) in tensors {
        if let Some((group, e, proj)) = expert_name(name) {
            groups
                .entry(group)
                .or_default()
                .entry(e)
                .or_default()
                .insert(proj, shape);
        }
    }
    let mut out = Vec::new();
    for (group, experts) in groups {
        let n = experts.len();
        if experts.keys().copied().ne(0..n) {
            continue;
        }
        let dims = |projs: &BTreeMap<&str, &[usize]>| -> Option<(usize, usize)> {
            let (g, u, d) = (
                projs.get("gate_proj")?,
                projs.get("up_proj")?,
                projs.get("down_proj")?,
            );
            let (&[i, h], &[i2, h2], &[h3, i3]) = (*g, *u, *d) else {
                return None;
            };
            (i == i2 && i == i3 && h == h2 && h == h3).then_some((h, i))
        };
        let Some((hidden, width)) = experts.values().next().and_then(dims) else {
            continue;
        };
        if experts.values().any(|p| dims(p) != Some((hidden, width))) {
            continue;
        }
        let name = |e: usize, proj: &str| format!("{group}.{e}.{proj}.weight");
        out.push(ExpertStack {
            name: format!("{group}.gate_up_proj"),
            kind: StackKind::GateUp,
            experts: (0..n)
                .map(|e| vec![name(e, "gate_proj"), name(e, "up_proj")])
                .collect(),
            hidden,
            width,
        });
        out.push(ExpertStack {
            name: format!("{group}.down_proj"),
            kind: StackKind::Down,
            experts: (0..n).map(|e| vec![name(e, "down_proj")]).collect(),
            hidden,
            width,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(v: &[u16]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn stacks_are_found_per_layer_and_incomplete_groups_are_left_alone() {
        let g = [2usize, 3];
        let d = [3usize, 2];
        let mut t: Vec<(String, Vec<usize>)> = Vec::new();
        for layer in ["m.layers.0", "m.layers.1"] {
            for e in 0..2 {
                for (p, s) in [("gate_proj", g), ("up_proj", g), ("down_proj", d)] {
                    t.push((format!("{layer}.mlp.experts.{e}.{p}.weight"), s.to_vec()));
                }
            }
        }
        // Layer 2 lacks expert 0's up_proj.
        t.push((
            "m.layers.2.mlp.experts.0.gate_proj.weight".into(),
            g.to_vec(),
        ));
        t.push((
            "m.layers.2.mlp.experts.0.down_proj.weight".into(),
            d.to_vec(),
        ));
        t.push(("m.layers.0.mlp.gate.weight".into(), vec![2, 3]));
        let stacks = expert_stacks(t.iter().map(|(n, s)| (n.as_str(), s.as_slice())));
        let names: Vec<&str> = stacks.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "m.layers.0.mlp.experts.gate_up_proj",
                "m.layers.0.mlp.experts.down_proj",
                "m.layers.1.mlp.experts.gate_up_proj",
                "m.layers.1.mlp.experts.down_proj"
            ]
        );
        assert_eq!(stacks[0].shape(), vec![2, 3, 4]);
        assert_eq!(stacks[1].shape(), vec![2, 2, 3]);
        assert_eq!(
            stacks[0].experts[1],
            [
                "m.layers.0.mlp.experts.1.gate_proj.weight",
                "m.layers.0.mlp.experts.1.up_proj.weight"
            ]
        );
    }

    #[test]
    fn blocks_are_mindspeeds_layout_and_unblock_inverts_them() {
        // I = 2, H = 3: gate [[1,2,3],[4,5,6]], up [[7,8,9],[10,11,12]].
        let s = ExpertStack {
            name: "x.gate_up_proj".into(),
            kind: StackKind::GateUp,
            experts: vec![vec!["g".into(), "u".into()]],
            hidden: 3,
            width: 2,
        };
        let (gate, up) = (bytes(&[1, 2, 3, 4, 5, 6]), bytes(&[7, 8, 9, 10, 11, 12]));
        let block = s.block(&[&gate, &up], 2);
        // [H, 2I]: row h is gate[:, h] then up[:, h].
        assert_eq!(block, bytes(&[1, 4, 7, 10, 2, 5, 8, 11, 3, 6, 9, 12]));
        assert_eq!(s.unblock(&block, 2), vec![gate, up]);
        let d = ExpertStack {
            kind: StackKind::Down,
            ..s
        };
        let down = bytes(&[1, 2, 3, 4, 5, 6]); // [H=3, I=2]
        let block = d.block(&[&down], 2);
        assert_eq!(block, bytes(&[1, 3, 5, 2, 4, 6])); // [I, H]
        assert_eq!(d.unblock(&block, 2), vec![down]);
    }

    #[test]
    fn tiled_transpose_matches_the_plain_one_for_every_element_size() {
        let (rows, cols) = (37, 70);
        for elem in [1, 2, 3, 4, 8] {
            let src: Vec<u8> = (0..rows * cols * elem)
                .map(|i| (i * 7 % 251) as u8)
                .collect();
            let t = transpose(&src, rows, cols, elem);
            for r in 0..rows {
                for c in 0..cols {
                    let (a, b) = ((r * cols + c) * elem, (c * rows + r) * elem);
                    assert_eq!(src[a..a + elem], t[b..b + elem], "elem {elem}");
                }
            }
            assert_eq!(transpose(&t, cols, rows, elem), src);
        }
    }
}
