//! `cargo xtask demo`: bootstrap, build, then hand over to `sluice-demo` (tests/src/bin), which
//! drives the real agent, peer and apps against network-namespace pods and cleans up.
use std::{os::unix::process::CommandExt, process::Command};

use anyhow::{Context, Result};

use crate::{bootstrap, cmd, target_dir};

pub fn run() -> Result<()> {
    bootstrap::run()?;
    // Default members: the eBPF crate only builds for the bpf target.
    cmd::run(cmd::cargo().args(["build", "--bins"]))?;
    let demo = target_dir().join("debug/sluice-demo");
    anyhow::ensure!(demo.exists(), "{} was not built", demo.display());
    eprintln!("$ {}", demo.display());
    // exec: the demo owns the terminal (and Ctrl-C) from here on.
    let err = Command::new(&demo).exec();
    Err(err).with_context(|| format!("cannot exec {}", demo.display()))
}
