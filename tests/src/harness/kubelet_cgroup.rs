//! Cgroups named the way the kubelet names a pod's container cgroups, so code that finds
//! pods through `/proc/<pid>/cgroup` can be tested with real processes.
//!
//! Each one lives under a unique top directory of its hierarchy (so tests never touch a real
//! `kubepods` tree and can run in parallel); the paths below it are the kubelet's:
//! - cgroupfs driver: `<top>/kubepods/burstable/pod<uid>/<container>`
//! - systemd driver: `<top>.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with _>.slice/cri-containerd-<container>.scope`
//!
//! On cgroup v1 (the `pids` hierarchy for cgroupfs, `name=systemd` for systemd) or v2.
//! Drop kills what is left in it and removes the directories.
use std::{
    fs, io,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{cgroup::cgroup2_mount, mounts::cgroup_v1_mount, names::unique};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupLayout {
    V1Cgroupfs,
    V1Systemd,
    V2Cgroupfs,
    V2Systemd,
}

impl CgroupLayout {
    pub const ALL: [CgroupLayout; 4] = [
        CgroupLayout::V1Cgroupfs,
        CgroupLayout::V1Systemd,
        CgroupLayout::V2Cgroupfs,
        CgroupLayout::V2Systemd,
    ];

    /// Where this layout's hierarchy is mounted, if the machine has it.
    pub fn mount(self) -> Option<PathBuf> {
        match self {
            CgroupLayout::V1Cgroupfs => cgroup_v1_mount("pids"),
            CgroupLayout::V1Systemd => cgroup_v1_mount("name=systemd"),
            CgroupLayout::V2Cgroupfs | CgroupLayout::V2Systemd => cgroup2_mount().ok(),
        }
    }

    /// The kubelet's path for `container` of pod `uid`, below `top`.
    fn relative(self, top: &str, uid: &str, container: &str) -> Vec<String> {
        let systemd_uid = uid.replace('-', "_");
        match self {
            CgroupLayout::V1Cgroupfs | CgroupLayout::V2Cgroupfs => vec![
                top.to_string(),
                "kubepods".into(),
                "burstable".into(),
                format!("pod{uid}"),
                container.to_string(),
            ],
            CgroupLayout::V1Systemd | CgroupLayout::V2Systemd => vec![
                format!("{top}.slice"),
                "kubepods-burstable.slice".into(),
                format!("kubepods-burstable-pod{systemd_uid}.slice"),
                format!("cri-containerd-{container}.scope"),
            ],
        }
    }
}

/// One container cgroup of one pod.
#[derive(Debug)]
pub struct KubeletCgroup {
    /// Every directory created, top first.
    dirs: Vec<PathBuf>,
}

impl KubeletCgroup {
    pub fn new(layout: CgroupLayout, uid: &str, container: &str) -> Result<KubeletCgroup> {
        let mount = layout
            .mount()
            .with_context(|| format!("no cgroup hierarchy for {layout:?} on this machine"))?;
        Self::new_under(layout, &mount, uid, container)
    }

    /// The same below `parent`, a directory of `layout`'s hierarchy: e.g. below a test's own
    /// cgroup v2, so that cgroup programs attached there see the pod's processes too.
    pub fn new_under(
        layout: CgroupLayout,
        parent: &Path,
        uid: &str,
        container: &str,
    ) -> Result<KubeletCgroup> {
        let mut made = KubeletCgroup { dirs: Vec::new() };
        let mut path = parent.to_path_buf();
        for part in layout.relative(&unique("sl"), uid, container) {
            path.push(part);
            fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
            made.dirs.push(path.clone());
        }
        Ok(made)
    }

    /// The container cgroup, where processes go.
    pub fn leaf(&self) -> &Path {
        self.dirs.last().expect("at least one directory")
    }

    pub fn add_pid(&self, pid: u32) -> Result<()> {
        let procs = self.leaf().join("cgroup.procs");
        fs::write(&procs, pid.to_string())
            .with_context(|| format!("moving pid {pid} into {}", self.leaf().display()))
    }

    fn kill_all(&self) {
        let leaf = self.leaf();
        if fs::write(leaf.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        let procs = fs::read_to_string(leaf.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl Drop for KubeletCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        for dir in self.dirs.iter().rev() {
            loop {
                self.kill_all();
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() >= deadline => {
                        eprintln!("warning: could not remove cgroup {}: {e}", dir.display());
                        return;
                    }
                    // EBUSY until the killed processes are gone.
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    }
}
