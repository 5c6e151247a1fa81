//! Checks made before the agent touches anything: each missing prerequisite is one line that
//! names it and says how to provide it, instead of an error deep inside a bpf or netlink call
//! after half the programs were attached.
use std::path::{Path, PathBuf};

use caps::{CapSet, Capability};

use crate::dataplane::features::{self, MIN_KERNEL};

/// Why `MIN_KERNEL` (the table of every feature and its release is in `dataplane/features.rs`).
const MIN_KERNEL_WHY: &str = "sk_lookup's ingress_ifindex";

/// `CGROUP2_SUPER_MAGIC` and `BPF_FS_MAGIC` from linux/magic.h.
const CGROUP2_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// Capabilities the agent cannot work without, and why (the README lists the same).
pub const REQUIRED_CAPS: &[(Capability, &str)] = &[
    (
        Capability::CAP_SYS_ADMIN,
        "entering pod network namespaces (setns), mounting bpffs, loading eBPF",
    ),
    (
        Capability::CAP_NET_ADMIN,
        "attaching eBPF to cgroups and namespaces, routing rules and sysctls in pods",
    ),
];

/// Capabilities kept after startup if the agent was given them; every other one is dropped.
pub const KEPT_CAPS: &[(Capability, &str)] = &[
    (Capability::CAP_SYS_ADMIN, "as above"),
    (Capability::CAP_NET_ADMIN, "as above"),
    (
        Capability::CAP_BPF,
        "eBPF maps and programs (implied by CAP_SYS_ADMIN on older kernels)",
    ),
    (
        Capability::CAP_PERFMON,
        "eBPF helpers that read kernel memory",
    ),
    (
        Capability::CAP_SYS_PTRACE,
        "opening running pods' network namespaces under /proc",
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "kernel {release} is too old: Sluice needs Linux >= {MIN_KERNEL} ({MIN_KERNEL_WHY}); run the agent on a newer kernel"
    )]
    KernelTooOld { release: String },
    #[error(
        "kernel BTF is missing (/sys/kernel/btf/vmlinux): Sluice needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf,
    #[error(
        "missing capability {cap} (needed for {why}): grant it (securityContext.capabilities.add: [{}]) or run the agent privileged",
        cap.to_string().trim_start_matches("CAP_")
    )]
    MissingCap { cap: Capability, why: &'static str },
    #[error(
        "{path} is not a cgroup v2 mount: mount cgroup2 (e.g. `mount -t cgroup2 none /sys/fs/cgroup`) and mount it into the agent, or pass --cgroup with a cgroup v2 directory"
    )]
    NoCgroup2 { path: PathBuf },
    #[error(
        "the pin root {path} is not on bpffs: mount bpffs (`mount -t bpf bpf {DEFAULT_BPFFS}`) and mount it into the agent, or pass --pin-root under a bpffs mount"
    )]
    NoBpffs { path: PathBuf },
    #[error("preflight: {0}")]
    Io(String),
}

/// Everything `sluice-agent run` needs, checked in order of how fundamental it is.
pub fn check(pin_root: &Path, cgroup: &Path) -> Result<(), PreflightError> {
    check_kernel(&features::kernel_release())?;
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(PreflightError::NoBtf);
    }
    check_caps()?;
    check_cgroup2(cgroup)?;
    check_bpffs(pin_root)
}

/// `release` is `uname -r`, e.g. `6.1.0-28-cloud-amd64` or `6.18.44-fc-v669`.
pub fn check_kernel(release: &str) -> Result<(), PreflightError> {
    let too_old = || PreflightError::KernelTooOld {
        release: release.to_string(),
    };
    let version = |s: &str| -> Option<(u32, u32)> {
        let mut parts = s
            .split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some((major, minor))
    };
    let min = version(MIN_KERNEL).unwrap_or((0, 0));
    match version(release) {
        Some(v) if v >= min => Ok(()),
        _ => Err(too_old()),
    }
}

fn check_caps() -> Result<(), PreflightError> {
    let effective = caps::read(None, CapSet::Effective)
        .map_err(|e| PreflightError::Io(format!("reading capabilities: {e}")))?;
    for (cap, why) in REQUIRED_CAPS {
        if !effective.contains(cap) {
            return Err(PreflightError::MissingCap { cap: *cap, why });
        }
    }
    Ok(())
}

fn fs_magic(path: &Path) -> Option<i64> {
    nix::sys::statfs::statfs(path)
        .ok()
        .map(|s| s.filesystem_type().0)
}

fn check_cgroup2(cgroup: &Path) -> Result<(), PreflightError> {
    if fs_magic(cgroup) != Some(CGROUP2_MAGIC) {
        return Err(PreflightError::NoCgroup2 {
            path: cgroup.to_path_buf(),
        });
    }
    Ok(())
}

/// The pin root (or the nearest existing directory above it) must be on bpffs; the default
/// location may still be unmounted, since the dataplane mounts bpffs there itself.
fn check_bpffs(pin_root: &Path) -> Result<(), PreflightError> {
    let mut dir = pin_root;
    while !dir.exists() {
        match dir.parent() {
            Some(p) => dir = p,
            None => break,
        }
    }
    let on_bpffs = fs_magic(dir) == Some(BPF_FS_MAGIC);
    let default_mountable = pin_root.starts_with(DEFAULT_BPFFS) && dir.starts_with(DEFAULT_BPFFS);
    if on_bpffs || default_mountable {
        Ok(())
    } else {
        Err(PreflightError::NoBpffs {
            path: pin_root.to_path_buf(),
        })
    }
}

/// Drops every capability the agent does not need once it runs (from the bounding,
/// inheritable, permitted and effective sets). Returns what is kept.
pub fn drop_capabilities() -> Result<Vec<Capability>, PreflightError> {
    let err = |what: &str, e: caps::errors::CapsError| PreflightError::Io(format!("{what}: {e}"));
    let permitted = caps::read(None, CapSet::Permitted).map_err(|e| err("reading caps", e))?;
    let keep: caps::CapsHashSet = KEPT_CAPS
        .iter()
        .map(|(c, _)| *c)
        .filter(|c| permitted.contains(c))
        .collect();
    // The bounding set first: that needs CAP_SETPCAP, which goes with the permitted set.
    for cap in caps::all() {
        if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap).map_err(|e| err("bounding set", e))?;
        }
    }
    caps::set(None, CapSet::Inheritable, &caps::CapsHashSet::new())
        .map_err(|e| err("inheritable set", e))?;
    caps::set(None, CapSet::Effective, &keep).map_err(|e| err("effective set", e))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(|e| err("permitted set", e))?;
    let mut kept: Vec<Capability> = keep.into_iter().collect();
    kept.sort_by_key(|c| c.index());
    Ok(kept)
}

/// For messages: a capability list like `CAP_NET_ADMIN,CAP_SYS_ADMIN`.
pub fn cap_names(caps: &[Capability]) -> String {
    caps.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_are_compared_numerically() {
        for ok in [
            "6.6.0",
            "6.18.44-fc-v669",
            "7.0",
            "6.12.111+deb12-cloud-amd64",
            "6.1.0-28-cloud-amd64",
            "5.17.0",
        ] {
            check_kernel(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for old in ["5.16.20", "5.15.0-91-generic", "4.19", "garbage", ""] {
            let e = check_kernel(old).unwrap_err();
            assert!(
                matches!(e, PreflightError::KernelTooOld { .. }),
                "{old}: {e}"
            );
            let msg = e.to_string();
            assert!(msg.contains("Linux >= ") && !msg.contains('\n'), "{msg}");
        }
    }

    #[test]
    fn a_directory_off_bpffs_is_refused_in_one_line() {
        let e = check_bpffs(Path::new("/tmp/not-bpffs/sluice")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("mount -t bpf") && !msg.contains('\n'), "{msg}");
        // The default location may be mounted by the agent itself.
        check_bpffs(Path::new("/sys/fs/bpf/sluice")).unwrap();
    }

    #[test]
    fn a_directory_off_cgroup2_is_refused_in_one_line() {
        let e = check_cgroup2(Path::new("/tmp")).unwrap_err();
        assert!(e.to_string().contains("cgroup v2"), "{e}");
    }
}
