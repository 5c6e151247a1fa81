//! Writing a run down: `results.json` (everything, percentiles included), `results.md` (the
//! tables and headline ratios) and one SVG plot per figure.
mod markdown;
mod plot;

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use crate::driver::Results;

pub fn write(dir: &Path, results: &Results) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_string_pretty(results)?;
    fs::write(dir.join("results.json"), json + "\n")?;
    for fig in &results.figures {
        plot::figure(&dir.join(plot::file_name(fig)), fig)
            .with_context(|| format!("plotting figure {}", fig.id))?;
    }
    fs::write(dir.join("results.md"), markdown::render(results))?;
    Ok(())
}

/// Three significant digits or so, no exponent.
pub fn num(v: f64) -> String {
    let a = v.abs();
    // Whole numbers (counts) and large ones print without decimals.
    if (v.fract() == 0.0 && a < 1e12) || a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}
