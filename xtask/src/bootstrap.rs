//! Installs what building and testing need, skipping whatever is already present, so it is
//! cheap enough to run before every build and test.
use std::{fs, process::Command};

use anyhow::{Result, bail};

use crate::cmd;

/// Debian packages bpf-linker is built against (its `llvm-22` feature).
const LINKER_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];

/// Debian packages the integration tests and the bench use. Extend here when they need more
/// tools. (The bench applies upstream's rules with `iptables-nft-restore` and removes its node
/// table with `nft`.)
pub const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "iptables",
    "nftables",
    "bpftool",
    "procps",
    // The CNI tests: a real runtime (containerd, runc), the reference plugins the plugin is
    // chained after, busybox for the test's own pause image, protoc for the CRI bindings.
    "containerd",
    "runc",
    "containernetworking-plugins",
    "busybox-static",
    "protobuf-compiler",
];

/// Debian packages the VM suite uses on the host: the emulator, and the tools that unpack
/// kernels, resolve and decompress modules, and strip test binaries for the initramfs.
/// (The kernels and busybox themselves are only downloaded, never installed.)
const VM_PACKAGES: &[&str] = &["qemu-system-x86", "kmod", "xz-utils", "binutils"];

pub fn run() -> Result<()> {
    apt_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    cargo_fuzz()?;
    Ok(())
}

/// Effective uid 0, read from `/proc/self/status` (its second `Uid:` field).
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|uids| uids.split_whitespace().nth(1))
            == Some("0")
    })
}

fn apt_packages() -> Result<()> {
    let mut missing = Vec::new();
    for &pkg in LINKER_PACKAGES
        .iter()
        .chain(TEST_PACKAGES)
        .chain(VM_PACKAGES)
    {
        let status = cmd::probe(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]));
        let present = status.as_deref() == Some("install ok installed");
        eprintln!(
            "checking package {pkg}… {}",
            if present { "present" } else { "missing" }
        );
        if !present {
            missing.push(pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages need root: sudo apt-get install {}",
            missing.join(" ")
        );
    }
    eprintln!("installing {}…", missing.join(" "));
    // One update and one install for everything missing.
    let apt = || {
        let mut c = Command::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    cmd::run(apt().arg("update"))?;
    cmd::run(
        apt()
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )
}

/// aya-build compiles the eBPF crate with nightly and `-Z build-std=core`, which needs rust-src.
fn nightly_rust_src() -> Result<()> {
    let toolchains = cmd::probe(Command::new("rustup").args(["toolchain", "list"]));
    let has_nightly = toolchains
        .as_deref()
        .is_some_and(|out| out.lines().any(is_plain_nightly));
    eprintln!(
        "checking nightly toolchain… {}",
        if has_nightly { "present" } else { "missing" }
    );
    if !has_nightly {
        eprintln!("installing nightly toolchain…");
        cmd::run(
            Command::new("rustup")
                .args(["toolchain", "install", "nightly"])
                .args(["--profile", "minimal"]),
        )?;
    }

    let components = cmd::probe(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    let has_src = components.as_deref().is_some_and(|out| {
        out.lines()
            .any(|l| l.trim() == "rust-src" || l.trim().starts_with("rust-src-"))
    });
    eprintln!(
        "checking rust-src (nightly)… {}",
        if has_src { "present" } else { "missing" }
    );
    if !has_src {
        eprintln!("installing rust-src (nightly)…");
        cmd::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// `nightly-<host>` (what `+nightly` resolves to), not a dated `nightly-2025-01-01-<host>`.
fn is_plain_nightly(line: &str) -> bool {
    let name = line.split_whitespace().next().unwrap_or_default();
    name == "nightly"
        || name
            .strip_prefix("nightly-")
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

fn bpf_linker() -> Result<()> {
    // main() already put $CARGO_HOME/bin on PATH, so this finds a `cargo install`ed one too.
    let present = cmd::probe(Command::new("bpf-linker").arg("--version")).is_some();
    eprintln!(
        "checking bpf-linker… {}",
        if present { "present" } else { "missing" }
    );
    if present {
        return Ok(());
    }
    eprintln!("installing bpf-linker…");
    // Its build script finds LLVM 22 through `llvm-config` in this directory.
    let path = std::env::var("PATH").unwrap_or_default();
    cmd::run(
        cmd::cargo()
            .env("PATH", format!("/usr/lib/llvm-22/bin:{path}"))
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ]),
    )
}

/// cargo-fuzz runs the parsers' fuzz targets (`fuzz/`) with libFuzzer on nightly.
fn cargo_fuzz() -> Result<()> {
    let present = cmd::probe(cmd::cargo().args(["fuzz", "--version"])).is_some();
    eprintln!(
        "checking cargo-fuzz… {}",
        if present { "present" } else { "missing" }
    );
    if present {
        return Ok(());
    }
    eprintln!("installing cargo-fuzz…");
    cmd::run(cmd::cargo().args(["install", "cargo-fuzz", "--locked", "--version", "^0.13"]))
}
