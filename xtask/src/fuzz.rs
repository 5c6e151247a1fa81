//! The parsers' fuzz targets (`fuzz/`, cargo-fuzz with libFuzzer on nightly): a bounded run of
//! each in `cargo xtask test`, longer runs with `cargo xtask fuzz`.
//!
//! Each target starts from its committed seeds (`fuzz/seeds/<target>`) and the corpus earlier
//! runs grew (`fuzz/corpus/<target>`, not committed). A crash, a failed assertion, a hang or an
//! oversized allocation fails the run; libFuzzer writes the input to `fuzz/artifacts/<target>/`.
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::{cmd, workspace_root};

/// One per parser family: the control socket's JSON, ZDS messages and seqpacket receive, the
/// persisted state, the CNI plugin's input, and the node's CNI config files.
pub const TARGETS: &[&str] = &["control", "zds", "state", "cni", "conflist"];

/// Seconds per target in `cargo xtask test`.
pub const GATE_SECONDS: u64 = 10;

/// Inputs up to what the agent itself accepts (64 KiB control lines, pod files and ZDS
/// packets); no single allocation over 64 MiB, so nothing may size a buffer from a length it
/// read; an input that takes 10 s is a hang.
const LIBFUZZER_ARGS: &[&str] = &[
    "-max_len=65536",
    "-malloc_limit_mb=64",
    "-rss_limit_mb=2048",
    "-timeout=10",
    "-print_final_stats=1",
];

fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

/// `cargo +nightly fuzz`, from the workspace root (where xtask runs), which finds `fuzz/`.
fn cargo_fuzz() -> Command {
    let mut c = cmd::cargo();
    c.args(["+nightly", "fuzz"]);
    c
}

/// Builds every target once, then runs each for `seconds`.
pub fn run(targets: &[String], seconds: u64) -> Result<()> {
    for t in targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!("no fuzz target {t:?}; there are {}", TARGETS.join(", "));
        }
    }
    cmd::run(cargo_fuzz().arg("build"))?;
    for t in targets {
        run_one(t, seconds)?;
    }
    Ok(())
}

/// Every target, for the gate.
pub fn gate() -> Result<()> {
    let all: Vec<String> = TARGETS.iter().map(|t| t.to_string()).collect();
    run(&all, GATE_SECONDS)
}

fn run_one(target: &str, seconds: u64) -> Result<()> {
    let dir = fuzz_dir();
    let corpus = dir.join("corpus").join(target);
    let seeds = dir.join("seeds").join(target);
    let artifacts = dir.join("artifacts").join(target);
    for d in [&corpus, &artifacts] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let before = files(&artifacts)?;
    // libFuzzer prints a line per new input: kept in a log, shown only when the run fails.
    let log_path = dir.join("artifacts").join(format!("{target}.log"));
    let log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut c = cargo_fuzz();
    c.args(["run", target])
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .args(LIBFUZZER_ARGS)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    eprintln!("$ {}", cmd::display(&c));
    let status = c
        .status()
        .with_context(|| format!("cannot start `{}`", cmd::display(&c)))?;
    let output = fs::read_to_string(&log_path).unwrap_or_default();
    if !status.success() {
        let tail: Vec<&str> = output.lines().rev().take(40).collect();
        for line in tail.into_iter().rev() {
            eprintln!("  {line}");
        }
        let found: Vec<String> = files(&artifacts)?
            .difference(&before)
            .map(|p| p.display().to_string())
            .collect();
        let reproduce = found.first().map_or_else(
            || "libFuzzer wrote no input".to_string(),
            |p| format!("replay it with `cargo +nightly fuzz run {target} {p}`"),
        );
        bail!(
            "fuzz target {target} failed ({status}); input: {}; {reproduce}; full log: {}",
            if found.is_empty() {
                "none".to_string()
            } else {
                found.join(", ")
            },
            log_path.display()
        );
    }
    eprintln!("fuzz {target}: {}", summary(&output));
    Ok(())
}

/// "N runs, coverage C, +K new inputs, peak RSS M MB" from libFuzzer's final stats.
fn summary(log: &str) -> String {
    let stat = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .map_or("?", str::trim)
    };
    let cov = log
        .lines()
        .rev()
        .find_map(|l| l.split_once(" cov: "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("?");
    format!(
        "{} runs, coverage {cov}, {} new inputs, peak RSS {} MB, nothing found",
        stat("number_of_executed_units"),
        stat("new_units_added"),
        stat("peak_rss_mb"),
    )
}

fn files(dir: &Path) -> Result<BTreeSet<PathBuf>> {
    Ok(fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_reads_libfuzzers_final_stats() {
        let log = "#1024\tpulse  cov: 10 ft: 12 corp: 3/40b\n\
                   #9000\tDONE   cov: 321 ft: 900 corp: 50/2Kb exec/s: 450 rss: 80Mb\n\
                   stat::number_of_executed_units: 9000\n\
                   stat::average_exec_per_sec:     450\n\
                   stat::new_units_added:          47\n\
                   stat::peak_rss_mb:              80\n";
        assert_eq!(
            summary(log),
            "9000 runs, coverage 321, 47 new inputs, peak RSS 80 MB, nothing found"
        );
    }
}
