//! Per-label loss weights, which make the graph's `sum(weight * cross_entropy)` equal to the
//! configured reduction over the whole global batch.
//!
//! The model graph computes `Σ w_t · ce_t` for each micro-batch; summed over the micro-batches
//! and data-parallel ranks of one optimizer step, that is the loss of the global batch when the
//! weights are normalised over the global batch, which is what this module does. This keeps the
//! graph independent of the reduction and makes gradient accumulation a plain sum.

use mmc_ir::plan::LossReduction;

/// One packed row of a micro-batch: labels aligned with the input ids, and segment ids
/// (0 = padding, k = the k-th sample of the row).
#[derive(Clone, Copy, Debug)]
pub struct Row<'a> {
    pub labels: &'a [i64],
    pub segment_ids: &'a [i64],
}

/// Whether the label at position `t` of a row is trained on: it is not ignored (-100), and the
/// token before it belongs to the same sample (the first token of a packed sample would
/// otherwise be predicted from the previous sample).
fn counts(row: &Row<'_>, t: usize) -> bool {
    t >= 1
        && row.labels[t] >= 0
        && row.segment_ids[t] != 0
        && row.segment_ids[t - 1] == row.segment_ids[t]
}

/// Weights for every label of every row of one global batch (InternVL's `len2weight`,
/// normalised so that they sum to 1). Rows without labelled tokens get zeros; a batch
/// without any labelled token gets all zeros.
pub fn loss_weights(reduction: LossReduction, rows: &[Row<'_>]) -> Vec<Vec<f32>> {
    // Labelled-token count of every (row, segment) sample.
    let mut sample_len: Vec<std::collections::BTreeMap<i64, usize>> =
        Vec::with_capacity(rows.len());
    for row in rows {
        let mut m = std::collections::BTreeMap::new();
        for t in 0..row.labels.len() {
            if counts(row, t) {
                *m.entry(row.segment_ids[t]).or_insert(0) += 1;
            }
        }
        sample_len.push(m);
    }
    let per_token = |n: usize| -> f64 {
        match reduction {
            LossReduction::Token => 1.0,
            LossReduction::Sample => 1.0 / n as f64,
            LossReduction::Square => 1.0 / (n as f64).sqrt(),
        }
    };
    let total: f64 = sample_len
        .iter()
        .flat_map(|m| m.values())
        .map(|&n| n as f64 * per_token(n))
        .sum();
    rows.iter()
        .zip(&sample_len)
        .map(|(row, lens)| {
            (0..row.labels.len())
                .map(|t| {
                    if total > 0.0 && counts(row, t) {
                        (per_token(lens[&row.segment_ids[t]]) / total) as f32
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_weights_are_uniform_over_the_batch() {
        let l1 = [-100, 5, 6, 7];
        let l2 = [-100, -100, 8, 9];
        let s = [1, 1, 1, 1];
        let rows = [
            Row {
                labels: &l1,
                segment_ids: &s,
            },
            Row {
                labels: &l2,
                segment_ids: &s,
            },
        ];
        let w = loss_weights(LossReduction::Token, &rows);
        assert_eq!(w[0], vec![0.0, 0.2, 0.2, 0.2]);
        assert_eq!(w[1], vec![0.0, 0.0, 0.2, 0.2]);
    }

    #[test]
    fn sample_and_square_weights() {
        // Row 0 packs two samples: segment 1 with 2 labels, segment 2 with 1 label (its first
        // token is not predicted across the boundary).
        let l = [1, 2, 3, 4, 5, 0];
        let s = [1, 1, 1, 2, 2, 0];
        let rows = [Row {
            labels: &l,
            segment_ids: &s,
        }];
        let w = loss_weights(LossReduction::Sample, &rows);
        assert_eq!(w[0], vec![0.0, 0.25, 0.25, 0.0, 0.5, 0.0]);
        let w = loss_weights(LossReduction::Square, &rows);
        let total = 2.0f64.sqrt() + 1.0;
        let a = (1.0 / 2.0f64.sqrt() / total) as f32;
        let b = (1.0 / total) as f32;
        assert_eq!(w[0], vec![0.0, a, a, 0.0, b, 0.0]);
        let sum: f32 = w[0].iter().sum();
        assert!((sum - 1.0).abs() < 1e-6);
    }

    #[test]
    fn no_labels_gives_zero_weights() {
        let l = [-100, -100];
        let s = [1, 1];
        let w = loss_weights(
            LossReduction::Token,
            &[Row {
                labels: &l,
                segment_ids: &s,
            }],
        );
        assert_eq!(w[0], vec![0.0, 0.0]);
    }
}
