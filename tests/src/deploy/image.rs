//! The agent's container image as `cargo xtask image` builds it (an OCI archive), and the
//! binaries it carries. `cargo xtask test` builds it (from the tests' debug build) and names
//! both in the environment; otherwise they are looked for where `cargo xtask image` puts them.
use std::path::PathBuf;

use anyhow::{Context as _, Result};

/// Set by `cargo xtask test` (see `xtask/src/test.rs`).
pub const ARCHIVE_VAR: &str = "SLUICE_IMAGE_ARCHIVE";
pub const REF_VAR: &str = "SLUICE_IMAGE_REF";
pub const BIN_DIR_VAR: &str = "SLUICE_IMAGE_BIN_DIR";

#[derive(Debug, Clone)]
pub struct AgentImage {
    /// The OCI archive (`ctr images import` reads it).
    pub archive: PathBuf,
    /// The name it imports as, e.g. `localhost/sluice-agent:0.1.0`.
    pub reference: String,
    /// The image's `sluice-agent` and `sluice-cni` (stripped), on the host.
    pub bin_dir: PathBuf,
}

impl AgentImage {
    /// The image `cargo xtask test` built, or `None` (outside CI) if there is none.
    pub fn locate() -> Result<Option<AgentImage>> {
        let version = env!("CARGO_PKG_VERSION");
        let out = super::repo_root().join("target/sluice-image");
        let env_path = |var: &str, default: PathBuf| {
            std::env::var_os(var).map(PathBuf::from).unwrap_or(default)
        };
        let archive = env_path(
            ARCHIVE_VAR,
            out.join(format!("sluice-agent-{version}.oci.tar")),
        );
        let Some(archive) = super::prerequisite(archive, "agent image (`cargo xtask image`)")?
        else {
            return Ok(None);
        };
        let reference =
            std::env::var(REF_VAR).unwrap_or_else(|_| format!("localhost/sluice-agent:{version}"));
        let bin_dir = env_path(BIN_DIR_VAR, out.join("bin"));
        Ok(Some(AgentImage {
            archive,
            reference,
            bin_dir,
        }))
    }

    /// The image's `sluice-agent`, run on the host.
    pub fn agent_bin(&self) -> Result<PathBuf> {
        let bin = self.bin_dir.join("sluice-agent");
        anyhow::ensure!(bin.is_file(), "no {}", bin.display());
        Ok(bin)
    }

    pub fn version(&self) -> Result<&str> {
        self.reference
            .rsplit_once(':')
            .map(|(_, tag)| tag)
            .context("an image reference without a tag")
    }
}
