//! The VM suite's verdict: one row per test with its outcome on each kernel, the reason
//! for every test that did not pass, and one line per kernel with its counts and times.
use std::{fs, path::Path, time::Duration};

use super::{KernelRun, artifacts::Artifacts, guest_report::Outcome};

/// Prints the summary; returns how many (test, kernel) pairs failed or did not run.
pub fn print(artifacts: &Artifacts, runs: &[KernelRun]) -> usize {
    let rows: Vec<(String, Vec<Outcome>)> = artifacts
        .tests
        .iter()
        .flat_map(|exe| {
            let per_kernel: Vec<Vec<Outcome>> = runs
                .iter()
                .map(|r| r.report.outcomes(&exe.label, &exe.tests, r.timed_out))
                .collect();
            exe.tests.iter().enumerate().map(move |(i, test)| {
                let outcomes = per_kernel.iter().map(|o| o[i].clone()).collect();
                (format!("{}::{test}", exe.label), outcomes)
            })
        })
        .collect();

    let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(4);
    eprintln!("\nVM suite, per test and kernel:");
    let header: String = runs
        .iter()
        .map(|r| format!("  {:<8}", r.kernel.series.label()))
        .collect();
    eprintln!("  {:<width$}{header}", "test");
    for (name, outcomes) in &rows {
        let cells: String = outcomes
            .iter()
            .map(|o| format!("  {:<8}", o.word()))
            .collect();
        eprintln!("  {name:<width$}{cells}");
    }

    let mut failed = 0;
    let mut printed_heading = false;
    for (name, outcomes) in &rows {
        for (run, outcome) in runs.iter().zip(outcomes) {
            let reason = match outcome {
                Outcome::Failed(why) | Outcome::NotRun(why) => why,
                Outcome::Passed | Outcome::Ignored => continue,
            };
            if !printed_heading {
                eprintln!("\nDid not pass:");
                printed_heading = true;
            }
            let kernel = run.kernel.series.label();
            eprintln!("  [{kernel}] {name}: {} — {reason}", outcome.word());
            failed += 1;
        }
    }

    eprintln!("\nKernels:");
    let (mut passed_all, mut failed_all) = (0, 0);
    for (k, run) in runs.iter().enumerate() {
        let count = |f: fn(&Outcome) -> bool| rows.iter().filter(|(_, o)| f(&o[k])).count();
        let passed = count(|o| matches!(o, Outcome::Passed));
        let failed = count(|o| matches!(o, Outcome::Failed(_)));
        let ignored = count(|o| matches!(o, Outcome::Ignored));
        let not_run = count(|o| matches!(o, Outcome::NotRun(_)));
        passed_all += passed;
        failed_all += failed + not_run;
        eprintln!(
            "  {:<5} {} ({}): {passed} passed, {failed} failed, {ignored} ignored, {not_run} not run; \
             guest {}{}, initramfs {} MiB",
            run.kernel.series.label(),
            run.kernel.package,
            run.report.release.as_deref().unwrap_or("never booted"),
            fmt_duration(run.guest_time),
            if run.timed_out {
                " (killed at its timeout)"
            } else {
                ""
            },
            run.initramfs_bytes >> 20,
        );
        if !run.modules.missing.is_empty() || !run.report.module_failures.is_empty() {
            eprintln!(
                "        modules missing: [{}], failed to load: [{}]",
                run.modules.missing.join(", "),
                run.report.module_failures.join(", ")
            );
        }
    }
    // The closing line CI reads.
    eprintln!("vm: {passed_all} passed, {failed_all} failed");
    failed
}

/// The last `n` lines of a log, indented.
pub fn print_tail(path: &Path, n: usize) {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    for line in &lines[lines.len().saturating_sub(n)..] {
        eprintln!("  | {line}");
    }
}

pub fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
