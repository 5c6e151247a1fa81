//! One SVG per figure, drawn with plotters' SVG backend (no font library: the viewer renders
//! the text). One panel per case; in each, every setup's distribution as a percentile curve
//! (p0..p99, so one outlier does not flatten the rest).
use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::driver::{Figure, Row};

const PANEL_W: u32 = 420;
const PANEL_H: u32 = 320;
const COLS: usize = 3;

pub fn file_name(fig: &Figure) -> String {
    format!("fig{}-{}.svg", fig.id, fig.slug)
}

fn color(setup: &str, i: usize) -> RGBColor {
    match setup {
        "floor" => RGBColor(110, 110, 110),
        "iptables" => RGBColor(31, 119, 180),
        "sluice" => RGBColor(214, 39, 40),
        "sluice+accel" => RGBColor(255, 127, 14),
        _ => [
            RGBColor(214, 39, 40),
            RGBColor(148, 103, 189),
            RGBColor(44, 160, 44),
            RGBColor(31, 119, 180),
            RGBColor(140, 86, 75),
            RGBColor(227, 119, 194),
            RGBColor(23, 190, 207),
        ][i % 7],
    }
}

pub fn figure(path: &Path, fig: &Figure) -> Result<()> {
    let err = |e: &dyn std::fmt::Debug| anyhow!("{e:?}");
    let mut cases: Vec<&str> = Vec::new();
    for row in &fig.rows {
        if !cases.contains(&row.case.as_str()) {
            cases.push(&row.case);
        }
    }
    let cols = cases.len().clamp(1, COLS);
    let lines = cases.len().div_ceil(COLS).max(1);
    let size = (PANEL_W * cols as u32, PANEL_H * lines as u32 + 40);
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let title = format!("{}. {}", fig.id, fig.title);
    let root = root
        .titled(&title, ("sans-serif", 22))
        .map_err(|e| err(&e))?;
    let panels = root.split_evenly((lines, cols));
    for (panel, case) in panels.iter().zip(&cases) {
        let rows: Vec<&Row> = fig.rows.iter().filter(|r| r.case == *case).collect();
        let unit = rows
            .first()
            .and_then(|r| r.unit.clone())
            .unwrap_or_else(|| fig.unit.clone());
        let top = rows
            .iter()
            .filter_map(|r| r.percentiles.get(99))
            .fold(0.0f64, |a, b| a.max(*b));
        let top = if top > 0.0 { top * 1.1 } else { 1.0 };
        let mut chart = ChartBuilder::on(panel)
            .caption(*case, ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(32)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..100f64, 0f64..top)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc(unit.as_str())
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, row) in rows.iter().enumerate() {
            let c = color(&row.setup, i);
            let points: Vec<(f64, f64)> = row
                .percentiles
                .iter()
                .take(100)
                .enumerate()
                .map(|(p, v)| (p as f64, *v))
                .collect();
            chart
                .draw_series(LineSeries::new(points, c.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(format!(
                    "{} (p50 {} {unit})",
                    row.setup,
                    super::num(row.p50)
                ))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
