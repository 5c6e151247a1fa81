//! What the deploy tests need: the real Helm engine ([`helm`]), the manifests as Kubernetes
//! objects ([`manifests`]), and the agent's container image ([`image`]).
//!
//! `cargo xtask test` provides the Helm library and the image and names them in the
//! environment; each is looked for in its default place otherwise. A missing one skips the
//! test outside CI and fails it under `CI=true`, as the other prerequisites do.
pub mod helm;
pub mod image;
pub mod manifests;

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// The repository root (deploy/ is read from there).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `path` if it exists; else `None` with a notice (outside CI) or an error (under CI).
pub(crate) fn prerequisite(path: PathBuf, what: &str) -> Result<Option<PathBuf>> {
    if path.exists() {
        return Ok(Some(path));
    }
    let msg = format!(
        "no {what} at {} (`cargo xtask test` provides it)",
        path.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        bail!("{msg}");
    }
    eprintln!("skipping: {msg}");
    Ok(None)
}

/// `${XDG_CACHE_HOME:-~/.cache}/sluice`, where xtask caches what is slow to make.
pub(crate) fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_default()
        .join("sluice")
}
