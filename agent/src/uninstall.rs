//! `sluice-agent uninstall`: stop a running agent, then remove every pin, link, pod rule,
//! socket and state file the agent created, leaving the node as it found it.
//!
//! With `--force` it also works when the pod records cannot be read (the recovery the agent
//! names when it refuses to start on a corrupt state): each enrolled namespace is then found
//! by its netns cookie among /var/run/netns and /proc.
use std::{
    collections::{BTreeMap, HashSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use tracing::{info, warn};

use crate::{
    cli::UninstallArgs,
    cni_install::Installer,
    control::{api::Request, client},
    dataplane::{self, Dataplane, DataplaneConfig},
    netns::Netns,
    state::{PodRecord, StateStore},
};

pub fn uninstall(args: &UninstallArgs, control_socket: &Path) -> anyhow::Result<()> {
    let node = &args.node;
    stop_running_agent(control_socket)?;
    let store = StateStore::open(&node.state_dir).context("opening the state directory")?;
    let records = match store.load() {
        Ok(r) => Some(r),
        Err(e) if args.force => {
            warn!(error = %e, "the pod records are unreadable; finding pod namespaces by scanning");
            None
        }
        Err(e) => {
            return Err(anyhow::anyhow!(
                "{e} (`sluice-agent uninstall --force` removes everything without the records)"
            ));
        }
    };
    // The CNI entry next (the records are readable, or --force): from here on new pods
    // start without asking for an agent.
    if let Some(conf_dir) = &node.cni_conf_dir {
        let rewritten = Installer::uninstall(conf_dir, &node.cni_bin_dir)?;
        info!(configs = ?rewritten, "removed the sluice-cni entry and binary");
    }
    let cgroup = match &node.cgroup {
        Some(c) => c.clone(),
        None => dataplane::cgroup2_root()?,
    };
    let dp = Dataplane::load(&DataplaneConfig {
        pin_root: node.pin_root.clone(),
        cgroup,
        accelerate: false,
        ebpf_debug_log: false,
    })?;
    let finder = Finder::new(records);
    dp.uninstall(|cookie| finder.find(cookie))?;
    for socket in [&node.zds_socket, &control_socket.to_path_buf()] {
        match std::fs::remove_file(socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    store.remove_all()?;
    info!("uninstalled: no pins, links, pod rules, sockets, state or CNI entry left");
    Ok(())
}

/// How to open the namespace of an enrolled netns cookie: from its record, else (no records,
/// or a record whose path no longer opens) by scanning the node's namespaces, so that no
/// enrolled namespace that still exists is left with its rules and sysctls.
struct Finder {
    records: Vec<PodRecord>,
    scanned: std::cell::OnceCell<BTreeMap<u64, PathBuf>>,
}

impl Finder {
    fn new(records: Option<Vec<PodRecord>>) -> Self {
        Finder {
            records: records.unwrap_or_default(),
            scanned: std::cell::OnceCell::new(),
        }
    }

    fn find(&self, cookie: u64) -> Option<Netns> {
        let recorded = self
            .records
            .iter()
            .find(|r| r.netns_cookie == cookie)
            .and_then(|r| {
                Netns::open(&r.netns)
                    .ok()
                    .filter(|ns| ns.inode() == r.netns_inode)
            });
        recorded.or_else(|| {
            let path = self.scanned.get_or_init(scan_namespaces).get(&cookie)?;
            Netns::open(path).ok()
        })
    }
}

/// The network namespaces reachable from bind mounts and processes, by cookie (each distinct
/// namespace entered once).
fn scan_namespaces() -> BTreeMap<u64, PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    for dir in ["/var/run/netns", "/run/netns"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            candidates.extend(entries.flatten().map(|e| e.path()));
        }
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        candidates.extend(
            entries
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .map(|e| e.path().join("ns/net")),
        );
    }
    let mut seen = HashSet::new();
    let mut found = BTreeMap::new();
    for path in candidates {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        if let Some(cookie) = Netns::open(&path).ok().and_then(|ns| ns.cookie().ok()) {
            found.insert(cookie, path);
        }
    }
    found
}

/// Asks a running agent to stop and waits until its control socket is gone.
fn stop_running_agent(control_socket: &Path) -> anyhow::Result<()> {
    if client::call(control_socket, &Request::Ping, Duration::from_secs(2)).is_err() {
        return Ok(());
    }
    info!("stopping the running agent first");
    client::call(control_socket, &Request::Shutdown, Duration::from_secs(5))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(control_socket).is_ok() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the running agent did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
