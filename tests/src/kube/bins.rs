use std::{env, path::PathBuf};

use anyhow::{Result, bail};

/// Set by `cargo xtask test`: the directory holding `kube-apiserver` and `etcd`.
pub const BIN_DIR_VAR: &str = "SLUICE_KUBE_BIN_DIR";
/// Keep in step with `xtask/src/kube_apiserver.rs`.
const CACHE_SUBDIR: &str = "sluice/kube-apiserver-v1.20.2/bin";

/// The server binaries.
#[derive(Debug, Clone)]
pub struct KubeBins {
    pub apiserver: PathBuf,
    pub etcd: PathBuf,
}

impl KubeBins {
    /// `$SLUICE_KUBE_BIN_DIR`, else xtask's cache directory. Missing binaries skip the test
    /// (`None`, with a notice), except under `CI=true`, where they are an error.
    pub fn locate() -> Result<Option<KubeBins>> {
        let dir = match env::var_os(BIN_DIR_VAR) {
            Some(d) => PathBuf::from(d),
            None => {
                let cache = env::var_os("XDG_CACHE_HOME")
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
                    .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                    .unwrap_or_default();
                cache.join(CACHE_SUBDIR)
            }
        };
        let bins = KubeBins {
            apiserver: dir.join("kube-apiserver"),
            etcd: dir.join("etcd"),
        };
        if bins.apiserver.is_file() && bins.etcd.is_file() {
            return Ok(Some(bins));
        }
        let msg = format!(
            "no kube-apiserver/etcd in {}: run `cargo xtask kube-apiserver` (or `cargo xtask test`)",
            dir.display()
        );
        if env::var("CI").is_ok_and(|v| v == "true") {
            bail!("{msg}");
        }
        eprintln!("skipping: {msg}");
        Ok(None)
    }
}
