//! `cargo xtask image`: the agent's container image, assembled by the xtask itself (there is
//! no container engine here, and no base image can be pulled): an OCI image archive that
//! `ctr images import` (containerd), `podman load` or `skopeo copy oci-archive:...` read.
//!
//! One layer, as the runtime stage of `deploy/Containerfile` builds it: the release
//! `sluice-agent` and `sluice-cni` (the tests' debug build in `cargo xtask test`) in
//! /usr/local/bin (debug info stripped), the shared
//! libraries they load, at their host paths (their `ldd` list, symlinks included), `/tmp`, and
//! `/var/run` as a link to `/run`, as on the nodes. Every
//! timestamp is 0 and no creation date is recorded, so the same binaries give the same image
//! digest. The archive goes to `target/sluice-image/`, beside the binaries it is made of:
//! rebuilding it takes seconds once the release build is there (cargo's own cache).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::{cmd, vm::rootfs::Rootfs};

/// The image's name: `localhost/` marks a local image (podman's convention), so no runtime
/// tries to pull it from a registry; push it to yours and set the chart's `image.repository`.
pub const REPOSITORY: &str = "localhost/sluice-agent";
const BINARIES: &[&str] = &["sluice-agent", "sluice-cni"];
const BIN_DIR: &str = "/usr/local/bin";

/// What `build` made.
pub struct Image {
    pub archive: PathBuf,
    /// `localhost/sluice-agent:<version>`.
    pub reference: String,
    /// The binaries in the image (stripped), for tests that run this build on the host.
    pub bin_dir: PathBuf,
}

/// Which binaries go into the image.
#[derive(Clone, Copy)]
pub enum Binaries {
    /// `cargo build --release` (what `cargo xtask image` ships).
    Release,
    /// The debug build `cargo xtask test` has already made for every other test: the same
    /// programs and code paths, and no second (release) build of the whole tree, which would
    /// cost CI minutes.
    TestBuild,
}

pub fn build(binaries: Binaries) -> Result<Image> {
    let profile = match binaries {
        Binaries::Release => {
            cmd::run(cmd::cargo().args([
                "build",
                "--release",
                "--package",
                "sluice-agent",
                "--bins",
            ]))?;
            "release"
        }
        Binaries::TestBuild => "debug",
    };
    let version = env!("CARGO_PKG_VERSION");
    let out = crate::target_dir().join("sluice-image");
    let bin_dir = out.join("bin");
    fs::create_dir_all(&bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;

    let mut rootfs = Rootfs::default();
    for name in BINARIES {
        let stripped = bin_dir.join(name);
        cmd::run(
            Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&stripped)
                .arg(crate::target_dir().join(profile).join(name)),
        )?;
        rootfs.file(Path::new(BIN_DIR).join(name), &stripped)?;
        rootfs.shared_libs(&stripped)?;
    }
    // Scratch space for anything that wants it (the binaries themselves write none).
    rootfs.dir("/tmp", 0o1777);
    // As on the nodes: a pod netns is `/var/run/netns/<name>` or `/run/netns/<name>` (the
    // agent keeps the path it was given), and a mount at either must serve both.
    rootfs.dir("/run", 0o755);
    rootfs.symlink("/var/run", "../run");
    let mut layer = Vec::new();
    rootfs.write_tar(&mut layer)?;

    let reference = format!("{REPOSITORY}:{version}");
    let archive = out.join(format!("sluice-agent-{version}.oci.tar"));
    let blobs = oci_blobs(&layer, version);
    write_archive(&archive, &blobs, &reference, version)?;
    eprintln!(
        "image {reference}: {} (layer {} MiB)",
        archive.display(),
        layer.len() >> 20
    );
    Ok(Image {
        archive,
        reference,
        bin_dir,
    })
}

struct Blob {
    media_type: &'static str,
    bytes: Vec<u8>,
}

impl Blob {
    fn digest(&self) -> String {
        format!("sha256:{}", hex(&Sha256::digest(&self.bytes)))
    }

    fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest(), "size": self.bytes.len()})
    }
}

/// Layer, config and manifest, the manifest last.
fn oci_blobs(layer: &[u8], version: &str) -> Vec<Blob> {
    let layer = Blob {
        media_type: "application/vnd.oci.image.layer.v1.tar",
        bytes: layer.to_vec(),
    };
    let config = json!({
        "architecture": arch(),
        "os": "linux",
        "config": {
            "Env": [format!("PATH={BIN_DIR}:/usr/bin:/bin")],
            "Cmd": ["sluice-agent", "run"],
            "Labels": {
                "org.opencontainers.image.title": "sluice-agent",
                "org.opencontainers.image.version": version,
            },
        },
        // An uncompressed layer's diff ID is its digest.
        "rootfs": {"type": "layers", "diff_ids": [layer.digest()]},
    });
    let config = Blob {
        media_type: "application/vnd.oci.image.config.v1+json",
        bytes: serde_json::to_vec(&config).expect("JSON"),
    };
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config.descriptor(),
        "layers": [layer.descriptor()],
    });
    let manifest = Blob {
        media_type: "application/vnd.oci.image.manifest.v1+json",
        bytes: serde_json::to_vec(&manifest).expect("JSON"),
    };
    vec![layer, config, manifest]
}

/// An OCI image layout in a tar: `oci-layout`, `index.json` naming the manifest, the blobs.
fn write_archive(path: &Path, blobs: &[Blob], reference: &str, version: &str) -> Result<()> {
    let manifest = blobs.last().context("no manifest")?;
    let mut descriptor = manifest.descriptor();
    descriptor["platform"] = json!({"architecture": arch(), "os": "linux"});
    // containerd names the imported image after the first; the OCI tag is the second.
    descriptor["annotations"] = json!({
        "io.containerd.image.name": reference,
        "org.opencontainers.image.ref.name": version,
    });
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [descriptor],
    });
    let mut files: Vec<(String, Vec<u8>)> = vec![
        (
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
        ("index.json".into(), serde_json::to_vec(&index)?),
    ];
    for blob in blobs {
        let name = format!("blobs/sha256/{}", &blob.digest()["sha256:".len()..]);
        files.push((name, blob.bytes.clone()));
    }
    let tmp = path.with_extension("tmp");
    let mut tar = tar::Builder::new(
        fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
    );
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(0);
        tar.append_data(&mut h, dir, std::io::empty())?;
    }
    for (name, bytes) in &files {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(bytes.len() as u64);
        h.set_mtime(0);
        tar.append_data(&mut h, name, bytes.as_slice())?;
    }
    tar.into_inner()?.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The OCI name of this machine's architecture.
fn arch() -> String {
    std::env::consts::ARCH
        .replace("x86_64", "amd64")
        .replace("aarch64", "arm64")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
