//! Finding where the cgroup programs attach on a node.
use std::{io, path::PathBuf};

/// The cgroup v2 root (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid
/// ones). Pods have no v2 cgroup of their own on hybrid hosts; the root sees them all.
///
/// Only a mount of the real root qualifies (its inode is 1): inside a container with its own
/// cgroup namespace, the cgroup2 mount shows just the container's cgroup, and attaching there
/// would silently redirect nothing.
pub fn cgroup2_root() -> io::Result<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mounts: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| {
            // "<id> <parent> <dev> <root> <mount point> <opts> ... - <fstype> <source> <super opts>"
            let (pre, post) = line.split_once(" - ")?;
            let mount_point = pre.split_whitespace().nth(4)?;
            (post.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect();
    mounts
        .iter()
        .find(|m| std::fs::metadata(m).map(|md| md.ino() == 1).unwrap_or(false))
        .cloned()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no mount of the cgroup2 root (cgroup2 mounts: {mounts:?}); mount the host's cgroup2 \
                     or pass --cgroup"
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn the_cgroup2_root_is_found_and_is_the_root() {
        // Every machine this runs on mounts cgroup2 (unified or hybrid).
        let root = super::cgroup2_root().unwrap();
        assert_eq!(
            std::fs::metadata(&root).unwrap().ino(),
            1,
            "{}",
            root.display()
        );
        assert!(root.join("cgroup.procs").exists());
    }
}
