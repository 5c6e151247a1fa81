//! Developer and CI entry point: `cargo xtask <command>` (aliased in `.cargo/config.toml`).
mod bench;
mod bootstrap;
mod cmd;
mod demo;
mod kube_apiserver;
mod test;

use std::{env, path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Sluice build, test and demo tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install missing prerequisites (Debian packages, nightly rust-src, bpf-linker).
    Bootstrap,
    /// Bootstrap, then build every host crate and target.
    Build,
    /// Bootstrap, fmt check, clippy, then every test (privileged ones need root).
    Test {
        /// Passed to the test runner, e.g. `cargo xtask test -- --test-threads=1`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Bootstrap, build, then run the demo.
    Demo,
    /// Bootstrap, release build, then run every benchmark setup and write the results.
    Bench {
        /// Far fewer samples and pods: a smoke check that every setup works (< 2 minutes).
        #[arg(long)]
        quick: bool,
        /// Where results.md, results.json and the SVG plots go (default: bench/).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Build kube-apiserver v1.20.2 and fetch etcd for the tests, unless already cached
    /// (under `$XDG_CACHE_HOME/sluice`, default `~/.cache/sluice`); prints their directory.
    KubeApiserver,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the context chain on one line, without anyhow's backtrace.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    put_cargo_bin_on_path()?;
    // Every command (cargo, rustup, ...) runs from the workspace root, wherever we were called.
    env::set_current_dir(workspace_root()).context("entering the workspace root")?;
    match command {
        Command::Bootstrap => bootstrap::run(),
        Command::Build => {
            bootstrap::run()?;
            cmd::run(cmd::cargo().args(["build", "--all-targets"]))
        }
        Command::Test { args } => test::run(&args),
        Command::Demo => demo::run(),
        Command::Bench { quick, out } => bench::run(
            quick,
            &out.unwrap_or_else(|| workspace_root().join("bench")),
        ),
        Command::KubeApiserver => {
            let dir = kube_apiserver::ensure()?;
            println!("{}", dir.display());
            Ok(())
        }
    }
}

/// The workspace root: xtask lives one level below it.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// Where cargo puts build output (respects `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// `$CARGO_HOME/bin` (default `~/.cargo/bin`): where `cargo install` puts bpf-linker.
pub fn cargo_bin_dir() -> Result<PathBuf> {
    let home = match env::var_os("CARGO_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?)
            .join(".cargo"),
    };
    Ok(home.join("bin"))
}

/// Fresh machines (and sudo) often lack `~/.cargo/bin` on PATH; bpf-linker must be found there
/// by rustc when aya-build compiles the eBPF crate, so every child inherits it.
fn put_cargo_bin_on_path() -> Result<()> {
    let bin = cargo_bin_dir()?;
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    if dirs.contains(&bin) {
        return Ok(());
    }
    dirs.insert(0, bin);
    let joined = env::join_paths(dirs).context("building PATH")?;
    // SAFETY: called at the start of main, before any other thread exists.
    unsafe { env::set_var("PATH", joined) };
    Ok(())
}
