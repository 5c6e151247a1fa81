//! Finds the network namespace of a pod that is already running (enrolled live, or found
//! again after an agent restart), by scanning `/proc` as istio-cni does: a process belongs to
//! a pod when its cgroup path names the pod's UID, and the process's netns is the pod's only
//! if it really holds *all* of the pod's IPs. The IP check matters: the cgroup ties a process
//! to a pod, not to a netns, and a process may be visiting another namespace (`nsenter`,
//! a debug container), which must never get this pod's redirection.
//!
//! Cgroup path shapes understood (any hierarchy line of `/proc/<pid>/cgroup`, v1 or v2, and
//! any prefix, e.g. from a cgroup namespace or a nested runtime):
//! - cgroupfs driver: `/kubepods/burstable/pod<uid>/<container>`, `/kubepods/pod<uid>/<container>`;
//! - systemd driver: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with
//!   _ for ->.slice/cri-containerd-<container>.scope`.
//!
//! All of this is blocking (it enters namespaces on helper threads): call it from
//! `spawn_blocking`.
use std::{
    collections::{HashMap, HashSet},
    fs, io,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use tracing::{debug, warn};

use crate::{
    dataplane::pod_net,
    netns::{Netns, NetnsError},
};

/// A pod to look for: its UID and every IP Kubernetes gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodToFind {
    pub uid: String,
    pub ips: Vec<IpAddr>,
}

/// A pod's network namespace, found and verified.
#[derive(Debug)]
pub struct FoundNetns {
    /// Open: holding it keeps the namespace alive.
    pub netns: Netns,
    /// A path naming the namespace for as long as the pod lives, where there is one: the
    /// runtime's bind mount (`/var/run/netns/cni-…`); otherwise `/proc/<pid>/ns/net` of the
    /// pod's oldest process (valid only while that process lives).
    pub path: PathBuf,
    /// The process it was found through: the pod's oldest in that namespace.
    pub pid: u32,
}

/// A namespace that a pod's process was in but that did not hold all the pod's IPs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub uid: String,
    pub pid: u32,
    pub netns_inode: u64,
    /// The namespace's addresses; the pod's IPs missing from them.
    pub held: Vec<IpAddr>,
    pub missing: Vec<IpAddr>,
}

#[derive(Debug, Default)]
pub struct ScanResult {
    /// By pod UID. Pods that were not found are absent.
    pub found: HashMap<String, FoundNetns>,
    pub refused: Vec<Refusal>,
}

/// Where to look: `/proc`, the directories where runtimes bind-mount pod namespaces, and the
/// host's own namespace (never a pod's, whatever a cgroup says).
#[derive(Debug, Clone)]
pub struct ProcScanner {
    proc_root: PathBuf,
    netns_dirs: Vec<PathBuf>,
    host_netns: (u64, u64),
}

impl ProcScanner {
    /// The real `/proc`, `/var/run/netns` and `/run/netns`; the host netns is the agent's own
    /// (it runs with hostNetwork).
    pub fn new() -> io::Result<Self> {
        Self::with_paths("/proc", vec!["/var/run/netns".into(), "/run/netns".into()])
    }

    pub fn with_paths(proc_root: impl Into<PathBuf>, netns_dirs: Vec<PathBuf>) -> io::Result<Self> {
        let me = fs::metadata("/proc/self/ns/net")?;
        Ok(ProcScanner {
            proc_root: proc_root.into(),
            netns_dirs,
            host_netns: (me.dev(), me.ino()),
        })
    }

    /// Scans every process once and returns the namespaces found for `pods`.
    pub fn find(&self, pods: &[PodToFind]) -> io::Result<ScanResult> {
        let wanted: HashMap<&str, &PodToFind> = pods.iter().map(|p| (p.uid.as_str(), p)).collect();
        let mut result = ScanResult::default();
        if wanted.is_empty() {
            return Ok(result);
        }
        // Candidates per pod, by netns inode: the oldest process seen in it.
        let mut candidates: HashMap<&str, HashMap<u64, Candidate>> = HashMap::new();
        for entry in fs::read_dir(&self.proc_root)? {
            let Ok(entry) = entry else { continue };
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // Processes come and go while we scan: any error just skips this one.
            let Some(c) = self.candidate(&entry.path(), pid, &wanted) else {
                continue;
            };
            let per_pod = candidates.entry(c.uid).or_default();
            match per_pod.get(&c.inode) {
                Some(old) if old.starttime <= c.starttime => {}
                _ => {
                    per_pod.insert(c.inode, c);
                }
            }
        }

        let mut verdicts: HashMap<u64, Result<Vec<IpAddr>, NetnsError>> = HashMap::new();
        for (uid, by_inode) in candidates {
            let pod = wanted[uid];
            let mut by_age: Vec<&Candidate> = by_inode.values().collect();
            by_age.sort_by_key(|c| c.starttime);
            for c in by_age {
                let ns_path = self.proc_root.join(c.pid.to_string()).join("ns/net");
                let netns = match Netns::open(&ns_path) {
                    Ok(ns) if ns.inode() == c.inode => ns,
                    _ => continue, // exited, or its pid was reused
                };
                let held = verdicts.entry(c.inode).or_insert_with(|| {
                    netns.run(pod_net::addresses).and_then(|r| {
                        r.map_err(|source| NetnsError::Io {
                            path: ns_path.clone(),
                            what: "listing addresses",
                            source,
                        })
                    })
                });
                let held = match held {
                    Ok(h) => h.clone(),
                    Err(e) => {
                        debug!(uid, pid = c.pid, error = %e, "cannot read a candidate netns");
                        continue;
                    }
                };
                let missing: Vec<IpAddr> = pod
                    .ips
                    .iter()
                    .filter(|ip| !held.contains(ip))
                    .copied()
                    .collect();
                if !missing.is_empty() || pod.ips.is_empty() {
                    warn!(
                        uid,
                        pid = c.pid,
                        ?missing,
                        "refusing a netns that does not hold all the pod's IPs"
                    );
                    result.refused.push(Refusal {
                        uid: uid.to_string(),
                        pid: c.pid,
                        netns_inode: c.inode,
                        held,
                        missing,
                    });
                    continue;
                }
                if result.found.contains_key(uid) {
                    // Two namespaces holding the same IPs: keep the oldest process's, like
                    // istio-cni; the other is not a pod sandbox this node created.
                    warn!(
                        uid,
                        pid = c.pid,
                        "a second netns holds the pod's IPs; keeping the older one"
                    );
                    continue;
                }
                let path = self.stable_path(c.inode, netns.device()).unwrap_or(ns_path);
                result.found.insert(
                    uid.to_string(),
                    FoundNetns {
                        netns,
                        path,
                        pid: c.pid,
                    },
                );
            }
        }
        Ok(result)
    }

    fn candidate<'a>(
        &self,
        dir: &Path,
        pid: u32,
        wanted: &HashMap<&'a str, &PodToFind>,
    ) -> Option<Candidate<'a>> {
        let cgroup = fs::read_to_string(dir.join("cgroup")).ok()?;
        let uid = pod_uid_from_cgroup(&cgroup)?;
        let (&uid, _) = wanted.get_key_value(uid.as_str())?;
        let ns = fs::metadata(dir.join("ns/net")).ok()?;
        if (ns.dev(), ns.ino()) == self.host_netns {
            debug!(uid, pid, "a pod's process in the host netns; ignoring it");
            return None;
        }
        let starttime = starttime(&fs::read_to_string(dir.join("stat")).ok()?)?;
        Some(Candidate {
            uid,
            pid,
            inode: ns.ino(),
            starttime,
        })
    }

    /// A runtime's bind mount of the namespace, if there is one.
    fn stable_path(&self, inode: u64, dev: u64) -> Option<PathBuf> {
        let mut seen = HashSet::new();
        for dir in &self.netns_dirs {
            // /var/run is usually a symlink to /run: look at each real directory once.
            let Ok(real) = fs::canonicalize(dir) else {
                continue;
            };
            if !seen.insert(real) {
                continue;
            }
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            for e in entries.flatten() {
                if fs::metadata(e.path()).is_ok_and(|m| m.ino() == inode && m.dev() == dev) {
                    return Some(e.path());
                }
            }
        }
        None
    }
}

#[derive(Debug)]
struct Candidate<'a> {
    uid: &'a str,
    pid: u32,
    inode: u64,
    starttime: u64,
}

/// The pod UID named by a process's cgroup paths (`/proc/<pid>/cgroup` contents), in the
/// canonical dashed lowercase form. `None` if no line names a pod, or two name different pods.
pub fn pod_uid_from_cgroup(contents: &str) -> Option<String> {
    let mut found: Option<String> = None;
    for line in contents.lines() {
        // hierarchy-ID:controller-list:path; the path may itself contain ':'.
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        for segment in path.split('/') {
            if let Some(uid) = uid_in_segment(segment) {
                match &found {
                    Some(f) if *f != uid => return None,
                    _ => found = Some(uid),
                }
            }
        }
    }
    found
}

/// `pod<uid>` as a whole segment (cgroupfs) or after a `-` (systemd's
/// `kubepods-<qos>-pod<uid_with_underscores>.slice`).
fn uid_in_segment(segment: &str) -> Option<String> {
    const UID_LEN: usize = 36;
    let bytes = segment.as_bytes();
    let mut from = 0;
    while let Some(at) = segment[from..].find("pod").map(|i| i + from) {
        from = at + 3;
        let starts_ok = at == 0 || bytes[at - 1] == b'-';
        let Some(uid) = segment.get(at + 3..at + 3 + UID_LEN) else {
            continue;
        };
        let rest = &segment[at + 3 + UID_LEN..];
        let ends_ok = rest.is_empty() || rest == ".slice";
        if starts_ok
            && ends_ok
            && let Some(canonical) = canonical_uid(uid)
        {
            return Some(canonical);
        }
    }
    None
}

/// 8-4-4-4-12 hex digits separated by all `-` or all `_`.
fn canonical_uid(s: &str) -> Option<String> {
    let sep = s.as_bytes().get(8).copied()?;
    if sep != b'-' && sep != b'_' {
        return None;
    }
    let ok = s.bytes().enumerate().all(|(i, b)| match i {
        8 | 13 | 18 | 23 => b == sep,
        _ => b.is_ascii_hexdigit(),
    });
    ok.then(|| s.replace('_', "-").to_ascii_lowercase())
}

/// Field 22 of `/proc/<pid>/stat` (clock ticks since boot), read after the last `)` since the
/// command name may contain anything.
fn starttime(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";

    #[test]
    fn cgroup_paths_of_every_driver_and_version() {
        let cases = [
            // cgroup v1, cgroupfs driver
            "12:memory:/kubepods/burstable/pod2c48913c-b29f-11e7-9350-020968147796/9bca8d63d5fa\n4:pids:/kubepods/burstable/pod2c48913c-b29f-11e7-9350-020968147796/9bca8d63d5fa\n0::/\n",
            // guaranteed QoS has no class directory
            "3:cpu:/kubepods/pod2c48913c-b29f-11e7-9350-020968147796/abc\n",
            // cgroup v2, cgroupfs driver
            "0::/kubepods/besteffort/pod2c48913c-b29f-11e7-9350-020968147796/abc\n",
            // cgroup v2, systemd driver
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2c48913c_b29f_11e7_9350_020968147796.slice/cri-containerd-9bca8d63.scope\n",
            // cgroup v1, systemd driver, guaranteed
            "1:name=systemd:/kubepods.slice/kubepods-pod2c48913c_b29f_11e7_9350_020968147796.slice/docker-9bca.scope\n",
            // nested under a runtime, or seen through a cgroup namespace
            "0::/docker/8d461fa5/kubepods/besteffort/pod2c48913c-b29f-11e7-9350-020968147796/aff3\n",
            "0::/../../pod2c48913c-b29f-11e7-9350-020968147796/9bca\n",
            // upper-case hex is canonicalised
            "0::/kubepods/pod2C48913C-B29F-11E7-9350-020968147796/x\n",
        ];
        for c in cases {
            assert_eq!(pod_uid_from_cgroup(c).as_deref(), Some(UID), "{c}");
        }
    }

    #[test]
    fn paths_that_name_no_pod() {
        let cases = [
            "0::/\n",
            "0::/system.slice/containerd.service\n",
            "4:memory:/process_api/cdba6e5cadfe5491f616f5685ae95f5e\n",
            // a container id that merely contains "pod"
            "0::/kubepods/burstable/podnot-a-uid/x\n",
            // mixed separators
            "0::/kubepods/pod2c48913c-b29f_11e7-9350-020968147796/x\n",
            // too short, too long
            "0::/kubepods/pod2c48913c-b29f-11e7-9350-02096814779/x\n",
            "0::/kubepods/pod2c48913c-b29f-11e7-9350-0209681477960/x\n",
            // "pod" not at a segment or name-part start
            "0::/kubepods/xpod2c48913c-b29f-11e7-9350-020968147796/x\n",
            // a malformed line
            "garbage\n",
            "",
        ];
        for c in cases {
            assert_eq!(pod_uid_from_cgroup(c), None, "{c:?}");
        }
    }

    #[test]
    fn two_pods_in_one_process_is_ambiguous() {
        let c = "4:pids:/kubepods/pod2c48913c-b29f-11e7-9350-020968147796/a\n\
                 0::/kubepods/pod11111111-2222-3333-4444-555555555555/a\n";
        assert_eq!(pod_uid_from_cgroup(c), None);
    }

    #[test]
    fn starttime_survives_odd_command_names() {
        let stat =
            "1234 (a) b (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(starttime(stat), Some(98765));
        assert_eq!(starttime("1234 (x"), None);
    }
}
