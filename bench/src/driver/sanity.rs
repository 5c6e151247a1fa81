//! The smoke check `--quick` exists for (and every run gets): every setup ran every traffic
//! figure, counts are non-zero, numbers are finite, and every attempt is either a sample or a
//! counted error. Never a speed threshold.
use super::results::Results;
use super::setup::Setup;

pub fn check(results: &Results) -> Vec<String> {
    let mut problems = Vec::new();
    for fig in &results.figures {
        problems.extend(
            fig.problems
                .iter()
                .map(|p| format!("figure {}: {p}", fig.id)),
        );
        if fig.rows.is_empty() {
            problems.push(format!("figure {} ({}) has no rows", fig.id, fig.title));
        }
        let expected: &[Setup] = match fig.id {
            1..=5 => &Setup::ALL,
            8 => &[Setup::Sluice, Setup::SluiceAccel],
            _ => &[],
        };
        for setup in expected {
            if !fig.rows.iter().any(|r| r.setup == setup.name()) {
                problems.push(format!("figure {}: {} did not run", fig.id, setup.name()));
            }
        }
        for row in &fig.rows {
            let at = format!("figure {} / {} / {}", fig.id, row.setup, row.case);
            if row.count == 0 {
                problems.push(format!("{at}: no sample ({:?})", row.error_kinds));
            }
            let numbers = [row.p50, row.p99, row.mean, row.min, row.max];
            if numbers
                .iter()
                .chain(&row.percentiles)
                .any(|v| !v.is_finite())
            {
                problems.push(format!("{at}: a number is not finite"));
            }
            if row.attempts != row.count as u64 + row.errors {
                problems.push(format!(
                    "{at}: {} attempts but {} samples and {} errors",
                    row.attempts, row.count, row.errors
                ));
            }
            if row.rate_per_s.is_some_and(|r| !r.is_finite() || r <= 0.0) {
                problems.push(format!("{at}: rate {:?}", row.rate_per_s));
            }
        }
        for fact in &fig.facts {
            if !fact.value.is_finite() || fact.value < 0.0 {
                problems.push(format!("figure {}: {} = {}", fig.id, fact.what, fact.value));
            }
        }
    }
    for id in 1..=8 {
        if !results.figures.iter().any(|f| f.id == id) {
            problems.push(format!("figure {id} is missing"));
        }
    }
    problems
}
