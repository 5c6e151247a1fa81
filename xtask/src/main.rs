//! Developer and CI entry point: `cargo xtask <command>` (aliased in `.cargo/config.toml`).
mod bench;
mod bootstrap;
mod cmd;
mod demo;
mod fuzz;
mod helm;
mod image;
mod kube_apiserver;
mod test;
mod vm;

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
        /// Kernels for the VM suite that runs after the host's (`none` skips it).
        #[arg(long, value_enum, default_value_t = KernelChoice::All)]
        vm_kernel: KernelChoice,
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
    /// Release build, then the agent's container image (an OCI archive for `ctr images
    /// import`, `podman load`, `skopeo`) in target/sluice-image/; prints its path and name.
    Image,
    /// Bootstrap, then run the parsers' fuzz targets (cargo-fuzz, nightly) for a while each.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
        /// Targets to run (default: all of them).
        targets: Vec<String>,
    },
    /// Build kube-apiserver v1.20.2 and fetch etcd for the tests, unless already cached
    /// (under `$XDG_CACHE_HOME/sluice`, default `~/.cache/sluice`); prints their directory.
    KubeApiserver,
    /// The privileged integration suite: on this kernel, or with `--vm` in qemu on Debian's
    /// 6.1 and 6.12 cloud kernels.
    IntegrationTest {
        /// Run in qemu (software emulation) instead of on the host's kernel.
        #[arg(long)]
        vm: bool,
        /// Which kernel(s) with `--vm`.
        #[arg(long, value_enum, default_value_t = KernelChoice::All)]
        kernel: KernelChoice,
        /// libtest threads per test executable in the guest.
        #[arg(long, default_value_t = 2)]
        test_threads: u32,
        /// Seconds a test executable may run in the guest before it is killed.
        #[arg(long, default_value_t = 600)]
        executable_timeout: u64,
        /// Seconds a guest may run, boot to power-off, before qemu is killed.
        #[arg(long, default_value_t = 1800)]
        guest_timeout: u64,
        /// Passed to every test executable, e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelChoice {
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.12")]
    V6_12,
    All,
    /// Only valid for `test`: skip the VM suite.
    None,
}

impl KernelChoice {
    pub fn series(self) -> Vec<vm::Series> {
        match self {
            KernelChoice::V6_1 => vec![vm::Series::V6_1],
            KernelChoice::V6_12 => vec![vm::Series::V6_12],
            KernelChoice::All => vm::Series::ALL.to_vec(),
            KernelChoice::None => Vec::new(),
        }
    }
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
        Command::Test { vm_kernel, args } => test::run(vm_kernel, &args),
        Command::Demo => demo::run(),
        Command::Bench { quick, out } => bench::run(
            quick,
            &out.unwrap_or_else(|| workspace_root().join("bench")),
        ),
        Command::Image => {
            bootstrap::run()?;
            let image = image::build(image::Binaries::Release)?;
            println!("{}\t{}", image.archive.display(), image.reference);
            Ok(())
        }
        Command::Fuzz { seconds, targets } => {
            bootstrap::run()?;
            let targets = if targets.is_empty() {
                fuzz::TARGETS.iter().map(|t| t.to_string()).collect()
            } else {
                targets
            };
            fuzz::run(&targets, seconds)
        }
        Command::KubeApiserver => {
            let dir = kube_apiserver::ensure()?;
            println!("{}", dir.display());
            Ok(())
        }
        Command::IntegrationTest {
            vm,
            kernel,
            test_threads,
            executable_timeout,
            guest_timeout,
            args,
        } => {
            let vm = vm.then(|| {
                let mut opts = vm::Options::new(kernel.series(), args.clone());
                opts.run.test_threads = test_threads;
                opts.run.executable_timeout = std::time::Duration::from_secs(executable_timeout);
                opts.timeout = std::time::Duration::from_secs(guest_timeout);
                opts
            });
            test::integration(vm, args)
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

/// `${XDG_CACHE_HOME:-~/.cache}/sluice/<entry>`: slow prerequisites, outside the clone and
/// keyed by version in `entry`, so that every clone and worktree on the machine shares them.
pub fn cache_dir(entry: &str) -> Result<PathBuf> {
    let base = match env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            PathBuf::from(env::var_os("HOME").context("neither XDG_CACHE_HOME nor HOME is set")?)
                .join(".cache")
        }
    };
    Ok(base.join("sluice").join(entry))
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
