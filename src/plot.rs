//! The loss curve of a run, drawn to SVG.

use anyhow::{Context, Result};
use plotters::prelude::*;
use std::path::Path;

/// Draws loss against step.
pub fn loss_svg(path: &Path, losses: &[(u64, f64)]) -> Result<()> {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let max_step = losses.last().map_or(1, |l| l.0).max(2);
        let (lo, hi) = losses
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, l)| {
                (lo.min(l), hi.max(l))
            });
        let pad = ((hi - lo) * 0.05).max(1e-3);
        let mut chart = ChartBuilder::on(&root)
            .caption("training loss", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(1u64..max_step, (lo - pad)..(hi + pad))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .draw()?;
        chart.draw_series(LineSeries::new(losses.iter().copied(), &BLUE))?;
        root.present()?;
        Ok(())
    };
    draw()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot draw {}", path.display()))
}
