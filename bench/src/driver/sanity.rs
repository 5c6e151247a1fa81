//! The smoke check `--quick` exists for (and every run gets): every setup ran every traffic
//! figure, attempt counts are non-zero, numbers are finite, every attempt is either a sample or
//! a counted error, and the client's traffic went through the peer. Never a speed threshold,
//! and never a verdict on the dataplane: a setup whose attempts all failed is a finding,
//! reported with its errors.
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
            // A row of errors only is a finding (the table shows them); a row of nothing is not.
            if row.attempts == 0 {
                problems.push(format!("{at}: nothing ran"));
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
    for id in 1..=9 {
        if !results.figures.iter().any(|f| f.id == id) {
            problems.push(format!("figure {id} is missing"));
        }
    }
    problems
}
