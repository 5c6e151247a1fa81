//! Where the dataplane keeps its state on bpffs. Pins are what make redirection outlive the
//! agent process, and what a restarted agent adopts instead of attaching again.
//!
//! ```text
//! <root>/maps-v<MAP_ABI>/<MAP>              maps, shared by every agent version with this layout
//! <root>/cgroup/<object id>/<program>       cgroup links of the programs of one eBPF object build
//! <root>/progs/<object id>/sl_sk_lookup     that build's sk_lookup program, shared by every pod
//! <root>/pods/<netns cookie>/sk_lookup      the sk_lookup link of one enrolled pod netns
//! ```
use std::{
    io,
    path::{Path, PathBuf},
};

use sluice_common::MAP_ABI;

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, Clone)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        PinLayout { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join(format!("maps-v{MAP_ABI}"))
    }

    pub fn cgroup_dir(&self) -> PathBuf {
        self.root.join("cgroup")
    }

    pub fn cgroup_links(&self, object_id: &str) -> PathBuf {
        self.cgroup_dir().join(object_id)
    }

    pub fn progs_dir(&self) -> PathBuf {
        self.root.join("progs")
    }

    /// Where one build pins the programs that per-pod links point at.
    pub fn progs(&self, object_id: &str) -> PathBuf {
        self.progs_dir().join(object_id)
    }

    pub fn pods(&self) -> PathBuf {
        self.root.join("pods")
    }

    pub fn pod(&self, netns_cookie: u64) -> PathBuf {
        self.pods().join(netns_cookie.to_string())
    }

    /// The pin of a pod's sk_lookup link.
    pub fn pod_link(&self, netns_cookie: u64) -> PathBuf {
        self.pod(netns_cookie).join("sk_lookup")
    }

    /// Creates the directories, mounting bpffs at /sys/fs/bpf first if the root is under it
    /// and nothing is mounted there yet (a fresh node, or a DaemonSet without the host mount).
    pub fn create(&self) -> io::Result<()> {
        let parent = self.root.parent().unwrap_or(Path::new("/"));
        if !is_bpffs(parent)? {
            if parent == Path::new(DEFAULT_BPFFS) {
                mount_bpffs(parent)?;
            } else {
                return Err(io::Error::other(format!(
                    "{} is not on a bpf filesystem",
                    parent.display()
                )));
            }
        }
        for dir in [
            self.root.clone(),
            self.maps(),
            self.cgroup_dir(),
            self.progs_dir(),
            self.pods(),
        ] {
            std::fs::create_dir_all(&dir)?;
        }
        Ok(())
    }
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    match nix::sys::statfs::statfs(path) {
        Ok(fs) => Ok(fs.filesystem_type().0 == BPF_FS_MAGIC),
        Err(nix::errno::Errno::ENOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn mount_bpffs(path: &Path) -> io::Result<()> {
    std::fs::create_dir_all(path)?;
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )?;
    Ok(())
}

/// Detaches every link pinned under `path`, then removes the tree.
pub fn detach_and_remove(path: &Path) -> io::Result<()> {
    detach_links(path);
    remove_tree(path)
}

fn detach_links(path: &Path) {
    let Ok(entries) = std::fs::read_dir(path) else {
        return;
    };
    for entry in entries.flatten() {
        let p = entry.path();
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            detach_links(&p);
        } else if let Ok(fd) = super::bpf_sys::obj_get(&p) {
            // Maps and programs refuse LINK_DETACH; only links are detached.
            let _ = super::bpf_sys::link_detach(std::os::fd::AsFd::as_fd(&fd));
        }
    }
}

/// Removes a pin directory tree.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
