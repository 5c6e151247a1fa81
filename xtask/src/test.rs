//! `cargo xtask test`: the single gate developers and CI run.
use std::{
    env, fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::{KernelChoice, bootstrap, cmd, helm, image, kube_apiserver, vm};

/// Tells the tests where `kube-apiserver` and `etcd` are (see `tests/src/kube`).
const KUBE_BIN_DIR_VAR: &str = "SLUICE_KUBE_BIN_DIR";
/// Tell the deploy tests where the Helm library, the image archive and its name, and the
/// image's (release) binaries are (see `tests/src/deploy`).
const HELM_LIB_VAR: &str = "SLUICE_HELM_LIB";
const IMAGE_ARCHIVE_VAR: &str = "SLUICE_IMAGE_ARCHIVE";
const IMAGE_REF_VAR: &str = "SLUICE_IMAGE_REF";
const IMAGE_BIN_DIR_VAR: &str = "SLUICE_IMAGE_BIN_DIR";

/// Runs every step, then ends with a one-line summary (exiting 1 on failure, so the summary
/// stays the last line).
pub fn run(vm_kernel: KernelChoice, extra: &[String]) -> Result<()> {
    let start = Instant::now();
    let result = steps(extra).and_then(|()| {
        // After the host's suite: a broken build fails fast there, not after a VM boot.
        vm::run(&vm::Options::new(vm_kernel.series(), Vec::new()))
    });
    let elapsed = fmt_elapsed(start.elapsed());
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        eprintln!("xtask test: FAILED after {elapsed}");
        std::process::exit(1);
    }
    eprintln!("xtask test: all checks passed in {elapsed}");
    Ok(())
}

fn steps(extra: &[String]) -> Result<()> {
    let root = bootstrap::is_root();
    if !root {
        // In CI a skipped privileged test would look like a pass; refuse instead.
        if is_ci() {
            bail!("CI must run the privileged eBPF tests: run `cargo xtask test` as root");
        }
        eprintln!("warning: not root, so the privileged eBPF tests will skip");
    }
    bootstrap::run()?;
    if root {
        mount_bpffs()?;
    }

    cmd::run(cmd::cargo().args(["fmt", "--all", "--check"]))?;
    // The fuzz crate is a workspace of its own (it builds on nightly, with sanitizers).
    cmd::run(cmd::cargo().args([
        "fmt",
        "--all",
        "--check",
        "--manifest-path",
        "fuzz/Cargo.toml",
    ]))?;
    // No `--workspace` here or below: the default members are every crate except the eBPF
    // one, which only builds for the bpf target (the agent's build.rs builds and embeds it).
    cmd::run(
        cmd::cargo()
            .args(["clippy", "--all-targets"])
            .args(TEST_FEATURES)
            .args(["--", "-D", "warnings"]),
    )?;
    // The eBPF crate gets its own clippy run, on the toolchain and target it is built with.
    cmd::run(cmd::cargo().args([
        "+nightly",
        "clippy",
        "--package",
        "sluice-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
        "--",
        "-D",
        "warnings",
    ]))?;

    // The agent tests run the real `sluice-agent` binary, which `cargo test` does not build
    // for another package's integration tests.
    cmd::run(cmd::cargo().args(["build", "--bins"]).args(TEST_FEATURES))?;
    // The Kubernetes tests run against a real kube-apiserver and etcd (built once, cached).
    let kube_bins = kube_apiserver::ensure()?;
    // The deploy tests: the chart through the real Helm engine, the image in containerd.
    let helm_lib = helm::ensure()?;
    let image = image::build(image::Binaries::TestBuild)?;
    let mut test = cmd::cargo();
    test.arg("test")
        .args(TEST_FEATURES)
        .env("RUST_BACKTRACE", "1")
        .env(KUBE_BIN_DIR_VAR, &kube_bins)
        .env(HELM_LIB_VAR, &helm_lib)
        .env(IMAGE_ARCHIVE_VAR, &image.archive)
        .env(IMAGE_REF_VAR, &image.reference)
        .env(IMAGE_BIN_DIR_VAR, &image.bin_dir);
    if !extra.is_empty() {
        test.arg("--").args(extra);
    }
    cmd::run(&mut test)?;
    // The parsers' fuzz targets, a bounded run each: a crash fails the gate.
    crate::fuzz::gate()?;
    if root {
        bench_smoke()?;
    }
    Ok(())
}

/// `sluice-bench run --quick` on the debug build `cargo build --bins` just made: every setup
/// runs and its numbers are sane (never a speed threshold). Results go to a scratch directory.
fn bench_smoke() -> Result<()> {
    let out = env::temp_dir().join(format!("sluice-bench-smoke-{}", std::process::id()));
    let result = crate::bench::smoke(&crate::target_dir().join("debug"), &out);
    let _ = fs::remove_dir_all(&out);
    result
}

/// The agent under test carries fault injection (`FAILPOINTS`), which the crash-window tests
/// use; every step builds with the same features so nothing (the eBPF object included) is
/// built twice.
pub const TEST_FEATURES: &[&str] = &["--features", "sluice-agent/failpoints"];

/// `cargo xtask integration-test [--vm]`: only the privileged suite, on this kernel or in VMs.
pub fn integration(vm: Option<vm::Options>, args: Vec<String>) -> Result<()> {
    bootstrap::run()?;
    if let Some(opts) = vm {
        if opts.kernels.is_empty() {
            bail!("--kernel none leaves nothing to run");
        }
        return vm::run(&opts);
    }
    if !bootstrap::is_root() {
        bail!("the privileged suite needs root on the host (or use --vm)");
    }
    mount_bpffs()?;
    cmd::run(cmd::cargo().args(["build", "--bins"]).args(TEST_FEATURES))?;
    let mut test = cmd::cargo();
    test.args(["test", "--package", "sluice-tests"])
        .args(TEST_FEATURES)
        .env("RUST_BACKTRACE", "1")
        .env("CI", "true");
    if !args.is_empty() {
        test.arg("--").args(&args);
    }
    cmd::run(&mut test)
}

fn is_ci() -> bool {
    env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// The tests pin maps under /sys/fs/bpf; some machines (containers, fresh VMs) lack the mount.
fn mount_bpffs() -> Result<()> {
    const DIR: &str = "/sys/fs/bpf";
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mounted = mounts.lines().any(|l| {
        let mut fields = l.split_whitespace().skip(1);
        fields.next() == Some(DIR) && fields.next() == Some("bpf")
    });
    eprintln!(
        "checking bpffs at {DIR}… {}",
        if mounted { "mounted" } else { "missing" }
    );
    if !mounted {
        if !Path::new(DIR).exists() {
            fs::create_dir_all(DIR)?;
        }
        eprintln!("mounting bpffs at {DIR}…");
        cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", DIR]))?;
    }
    Ok(())
}

fn fmt_elapsed(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
