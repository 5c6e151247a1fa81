//! What a run found: figures of rows, each row a distribution (p50, p99, count, errors) of one
//! setup in one case, plus facts (single numbers such as memory). Serialised as results.json;
//! rendered as results.md and one SVG per figure.
use std::collections::BTreeMap;

use serde::Serialize;

use crate::proto::JobResult;

#[derive(Debug, Serialize)]
pub struct Results {
    pub meta: Meta,
    pub figures: Vec<Figure>,
    /// Problems the sanity check found (empty on a good run).
    pub problems: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Meta {
    pub quick: bool,
    pub rounds: u32,
    pub kernel: String,
    pub cpus: usize,
    pub wall_s: f64,
    pub setups: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Figure {
    pub id: u8,
    pub slug: String,
    pub title: String,
    /// What one sample is (and the unit of p50/p99).
    pub unit: String,
    pub higher_is_better: bool,
    /// The headline compares rates (figure 2) instead of p50s.
    pub headline_rate: bool,
    pub rows: Vec<Row>,
    pub facts: Vec<Fact>,
    pub notes: Vec<String>,
    /// What went wrong while measuring (traffic that bypassed the peer, ...).
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub setup: String,
    pub case: String,
    /// Overrides the figure's unit (figure 7 mixes ms and µs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    pub p50: f64,
    pub p99: f64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    pub count: usize,
    pub attempts: u64,
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    /// Successful operations per second over the whole job (figure 2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_per_s: Option<f64>,
    /// p0, p1, ..., p100: enough to draw the distribution.
    pub percentiles: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Fact {
    pub setup: String,
    pub what: String,
    pub value: f64,
    pub unit: String,
}

/// Samples of one (setup, case) gathered over rounds.
#[derive(Debug, Default, Clone)]
pub struct Acc {
    pub samples: Vec<f64>,
    pub attempts: u64,
    pub errors: BTreeMap<String, u64>,
    pub ok: u64,
    pub seconds: f64,
}

impl Acc {
    pub fn add_job(&mut self, r: &JobResult) {
        self.samples.extend_from_slice(&r.samples);
        self.attempts += r.attempts;
        for (k, v) in &r.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        self.ok += r.samples.len() as u64;
        self.seconds += r.elapsed_s;
    }

    pub fn add_sample(&mut self, v: f64) {
        self.samples.push(v);
        self.attempts += 1;
        self.ok += 1;
    }

    pub fn add_error(&mut self, kind: &str) {
        self.attempts += 1;
        *self.errors.entry(kind.to_string()).or_default() += 1;
    }
}

/// Figure rows in the order first seen.
#[derive(Debug, Default)]
pub struct Rows {
    order: Vec<(String, String)>,
    accs: BTreeMap<(String, String), Acc>,
    units: BTreeMap<(String, String), String>,
}

impl Rows {
    pub fn acc(&mut self, setup: &str, case: &str) -> &mut Acc {
        let key = (setup.to_string(), case.to_string());
        if !self.accs.contains_key(&key) {
            self.order.push(key.clone());
        }
        self.accs.entry(key).or_default()
    }

    pub fn set_unit(&mut self, setup: &str, case: &str, unit: &str) {
        self.units
            .insert((setup.to_string(), case.to_string()), unit.to_string());
    }

    pub fn rows(&self, with_rate: bool) -> Vec<Row> {
        self.order
            .iter()
            .map(|k| {
                let mut row = summarize(&k.0, &k.1, &self.accs[k], with_rate);
                row.unit = self.units.get(k).cloned();
                row
            })
            .collect()
    }
}

pub fn summarize(setup: &str, case: &str, acc: &Acc, with_rate: bool) -> Row {
    let mut s: Vec<f64> = acc
        .samples
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    s.sort_by(f64::total_cmp);
    let percentiles: Vec<f64> = (0..=100).map(|p| percentile(&s, p as f64)).collect();
    let mean = if s.is_empty() {
        0.0
    } else {
        s.iter().sum::<f64>() / s.len() as f64
    };
    Row {
        setup: setup.to_string(),
        case: case.to_string(),
        unit: None,
        p50: percentile(&s, 50.0),
        p99: percentile(&s, 99.0),
        mean,
        min: s.first().copied().unwrap_or(0.0),
        max: s.last().copied().unwrap_or(0.0),
        count: s.len(),
        attempts: acc.attempts,
        errors: acc.errors.values().sum(),
        error_kinds: acc.errors.clone(),
        rate_per_s: (with_rate && acc.seconds > 0.0).then(|| acc.ok as f64 / acc.seconds),
        percentiles,
    }
}

/// Nearest-rank percentile of sorted samples (0 for none).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Figure {
    pub fn new(id: u8, slug: &str, title: &str, unit: &str) -> Figure {
        Figure {
            id,
            slug: slug.to_string(),
            title: title.to_string(),
            unit: unit.to_string(),
            higher_is_better: false,
            headline_rate: false,
            rows: Vec::new(),
            facts: Vec::new(),
            notes: Vec::new(),
            problems: Vec::new(),
        }
    }

    pub fn fact(&mut self, setup: &str, what: &str, value: f64, unit: &str) {
        self.facts.push(Fact {
            setup: setup.to_string(),
            what: what.to_string(),
            value,
            unit: unit.to_string(),
        });
    }

    /// The number the headline compares for a row: its rate (figure 2) or its p50.
    pub fn headline(&self, row: &Row) -> Option<f64> {
        if self.headline_rate {
            row.rate_per_s
        } else {
            Some(row.p50)
        }
    }

    /// `row`'s headline over the same case's headline for `base` (a setup name).
    pub fn ratio(&self, row: &Row, base: &str) -> Option<f64> {
        let b = self
            .rows
            .iter()
            .find(|r| r.setup == base && r.case == row.case && r.count > 0)?;
        if row.count == 0 {
            return None;
        }
        let (v, bv) = (self.headline(row)?, self.headline(b)?);
        (bv > 0.0 && v.is_finite()).then(|| v / bv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&s, 50.0), 50.0);
        assert_eq!(percentile(&s, 99.0), 99.0);
        assert_eq!(percentile(&s, 0.0), 1.0);
        assert_eq!(percentile(&s, 100.0), 100.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }
}
