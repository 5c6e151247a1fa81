//! `cargo xtask demo`: placeholder until the real demo is written here.
use std::{os::unix::process::CommandExt, process::Command};

use anyhow::{Context, Result};

use crate::{bootstrap, cmd, target_dir};

pub fn run() -> Result<()> {
    bootstrap::run()?;
    // Default members: the eBPF crate only builds for the bpf target.
    cmd::run(cmd::cargo().args(["build", "--bins"]))?;
    let demo = target_dir().join("debug/sluice-demo");
    if !demo.exists() {
        eprintln!("demo not implemented yet");
        std::process::exit(1);
    }
    eprintln!("$ {}", demo.display());
    // exec: the demo owns the terminal (and Ctrl-C) from here on.
    let err = Command::new(&demo).exec();
    Err(err).with_context(|| format!("cannot exec {}", demo.display()))
}
