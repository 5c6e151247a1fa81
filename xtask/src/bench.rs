//! `cargo xtask bench [--quick] [--out DIR]`: bootstrap, release build of the agent and the
//! bench, then hand over to `sluice-bench run` (bench/), which runs every setup and writes
//! `results.md`, `results.json` and the SVG plots (default: `bench/` at the workspace root).
use std::{os::unix::process::CommandExt, path::Path, process::Command};

use anyhow::{Context, Result};

use crate::{bootstrap, cmd, target_dir};

pub fn run(quick: bool, out: &Path) -> Result<()> {
    bootstrap::run()?;
    // The agent and the bench driver, optimised: the numbers are about them.
    cmd::run(cmd::cargo().args([
        "build",
        "--release",
        "--package",
        "sluice-agent",
        "--package",
        "sluice-bench",
        "--bins",
    ]))?;
    // Figure 9 runs the agent against the tests' kube-apiserver (built once, cached).
    let kube_bins = crate::kube_apiserver::ensure()?;
    let release = target_dir().join("release");
    let bench = release.join("sluice-bench");
    exec_bench(
        &bench,
        &release.join("sluice-agent"),
        &kube_bins,
        quick,
        out,
    )
}

/// Runs `sluice-bench run` and returns (or fails) with it: for `cargo xtask test`'s smoke check.
pub fn smoke(profile_dir: &Path, out: &Path) -> Result<()> {
    let mut c = bench_command(
        &profile_dir.join("sluice-bench"),
        &profile_dir.join("sluice-agent"),
        true,
        out,
    );
    cmd::run(&mut c)
}

fn bench_command(bench: &Path, agent: &Path, quick: bool, out: &Path) -> Command {
    let mut c = Command::new(bench);
    c.env("SLUICE_AGENT_BIN", agent)
        .arg("run")
        .arg("--out")
        .arg(out);
    if quick {
        c.arg("--quick");
    }
    c
}

fn exec_bench(bench: &Path, agent: &Path, kube_bins: &Path, quick: bool, out: &Path) -> Result<()> {
    anyhow::ensure!(bench.exists(), "{} was not built", bench.display());
    let mut c = bench_command(bench, agent, quick, out);
    c.env("SLUICE_KUBE_BIN_DIR", kube_bins);
    eprintln!("$ {}", cmd::display(&c));
    // exec: the bench owns the terminal, and Ctrl-C, so its guards clean up.
    let err = c.exec();
    Err(err).with_context(|| format!("cannot exec {}", bench.display()))
}
