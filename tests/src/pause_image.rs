//! The sandbox ("pause") image for the containerd test, built by the test itself as a docker
//! archive (`ctr images import` reads it): one layer with Debian's static busybox, whose
//! `sleep` is the sandbox's only process. No registry, no network.
use std::{io::Write as _, path::Path};

use anyhow::{Context as _, Result};
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// The name containerd knows the image by (its `sandbox_image`).
pub const PAUSE_IMAGE: &str = "sluice.test/pause:1";
/// Debian's busybox-static.
pub const BUSYBOX: &str = "/bin/busybox";

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The image as a docker archive (`docker save` format).
pub fn docker_archive(busybox: &Path) -> Result<Vec<u8>> {
    let bin = std::fs::read(busybox).with_context(|| {
        format!(
            "reading {} (Debian's busybox-static; cargo xtask test installs it)",
            busybox.display()
        )
    })?;
    let mut layer = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    layer.append_data(&mut dir, "bin/", std::io::empty())?;
    let mut file = tar::Header::new_gnu();
    file.set_mode(0o755);
    file.set_size(bin.len() as u64);
    layer.append_data(&mut file, "bin/busybox", bin.as_slice())?;
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_mode(0o777);
    link.set_size(0);
    layer.append_link(&mut link, "bin/sleep", "busybox")?;
    let layer = layer.into_inner()?;
    let diff_id = sha256(&layer);

    let config = serde_json::to_vec(&json!({
        "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        "os": "linux",
        // SIGKILL is how the runtime stops a sandbox; sleep needs no signal handling.
        "config": {"Entrypoint": ["/bin/sleep", "2147483647"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]}
    }))?;
    let config_name = format!("{}.json", sha256(&config));
    let layer_name = format!("{diff_id}/layer.tar");
    let manifest = serde_json::to_vec(&json!([{
        "Config": config_name,
        "RepoTags": [PAUSE_IMAGE],
        "Layers": [layer_name]
    }]))?;

    let mut archive = tar::Builder::new(Vec::new());
    for (name, body) in [
        ("manifest.json", manifest.as_slice()),
        (config_name.as_str(), config.as_slice()),
        (layer_name.as_str(), layer.as_slice()),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(body.len() as u64);
        archive.append_data(&mut h, name, body)?;
    }
    let mut out = archive.into_inner()?;
    out.flush()?;
    Ok(out)
}
