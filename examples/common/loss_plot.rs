//! The loss curves of a run as a PNG: training loss per step and the evaluation loss where
//! it was computed.

use plotters::prelude::*;
use std::path::Path;

/// Draws `train` (step, loss) and `eval` (step, loss) into a PNG at `path`.
pub fn draw(path: &Path, title: &str, train: &[(usize, f64)], eval: &[(usize, f64)]) -> anyhow::Result<()> {
    // Text is drawn with a font embedded in the binary, so no system font is needed.
    plotters::style::register_font("sans-serif", FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT)
        .map_err(|_| anyhow::anyhow!("the embedded font could not be loaded"))?;
    let all = train.iter().chain(eval);
    let last_step = all.clone().map(|&(s, _)| s).max().unwrap_or(1).max(1);
    let (low, high) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, l)| (lo.min(l), hi.max(l)));
    anyhow::ensure!(low.is_finite() && high.is_finite(), "no finite loss to plot");
    let margin = ((high - low) * 0.05).max(1e-3);

    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0usize..last_step, (low - margin)..(high + margin))?;
    chart.configure_mesh().x_desc("step").y_desc("loss (nats per token)").label_style(("sans-serif", 15)).draw()?;
    chart
        .draw_series(LineSeries::new(train.iter().copied(), BLUE.stroke_width(2)))?
        .label("training (global batch)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    if !eval.is_empty() {
        chart
            .draw_series(LineSeries::new(eval.iter().copied(), RED.stroke_width(2)))?
            .label("evaluation (held-out text)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart.draw_series(eval.iter().map(|&p| Circle::new(p, 4, RED.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()?;
    Ok(())
}
