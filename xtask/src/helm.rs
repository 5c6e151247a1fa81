//! The real Helm engine for the chart test, fetched once and cached outside the clone.
//!
//! Debian has no `helm`, and no registry this project reaches ships the `helm` binary for
//! Linux. PyPI's `helm-sdkpy` ships Helm itself (v4.3.0's `action` package, built with cgo
//! into `libhelm_sdkpy.so`) behind a small C ABI: install, upgrade, uninstall, lint. The test
//! loads that library and drives it as `helm` would, against the test kube-apiserver. Only
//! the library is kept (its Python wrapper wants Python ≥ 3.12, and is not needed): the wheel
//! is fetched with `pip download` (pip's own index configuration), unpacked, and the library
//! renamed into `${XDG_CACHE_HOME:-~/.cache}/sluice/helm-sdkpy-<version>/`.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::cmd;

pub const HELM_SDKPY_VERSION: &str = "0.1.32";
/// The Helm release `helm-sdkpy` 0.1.32 is built from.
pub const HELM_VERSION: &str = "v4.3.0";
const LIBRARY: &str = "libhelm_sdkpy.so";

fn cache_dir() -> Result<PathBuf> {
    crate::cache_dir(&format!("helm-sdkpy-{HELM_SDKPY_VERSION}"))
}

/// The library's path, fetching it first if it is not cached.
pub fn ensure() -> Result<PathBuf> {
    let dir = cache_dir()?;
    let lib = dir.join(LIBRARY);
    let present = lib.is_file();
    eprintln!(
        "checking Helm {HELM_VERSION} (helm-sdkpy {HELM_SDKPY_VERSION}) in {}… {}",
        dir.display(),
        if present { "present" } else { "missing" }
    );
    if present {
        return Ok(lib);
    }
    let platform = match env::consts::ARCH {
        "x86_64" => "linux-amd64",
        "aarch64" => "linux-arm64",
        other => bail!("helm-sdkpy ships no library for {other}"),
    };
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Beside the cache entry, so that the finished library is renamed into place.
    let scratch = dir.join(format!("fetch-{}", std::process::id()));
    let result = fetch(&scratch, platform, &lib);
    let _ = fs::remove_dir_all(&scratch);
    result?;
    Ok(lib)
}

fn fetch(scratch: &Path, platform: &str, lib: &Path) -> Result<()> {
    fs::create_dir_all(scratch)?;
    eprintln!("fetching helm-sdkpy {HELM_SDKPY_VERSION} (Helm {HELM_VERSION} as a library)…");
    cmd::run(
        Command::new("python3")
            .args(["-m", "pip", "download", "--quiet", "--no-deps"])
            // The wheel is pure Python around the library; its metadata asks for 3.12.
            .args(["--only-binary=:all:", "--python-version", "3.12", "--dest"])
            .arg(scratch)
            .arg(format!("helm-sdkpy=={HELM_SDKPY_VERSION}")),
    )?;
    let wheel = fs::read_dir(scratch)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip downloaded no wheel")?;
    let unpacked = scratch.join("wheel");
    cmd::run(
        Command::new("python3")
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(&unpacked),
    )?;
    let found = unpacked
        .join("helm_sdkpy/_lib")
        .join(platform)
        .join(LIBRARY);
    if !found.is_file() {
        bail!("the helm-sdkpy wheel has no {platform}/{LIBRARY}");
    }
    fs::rename(&found, lib).with_context(|| format!("moving the library to {}", lib.display()))
}
