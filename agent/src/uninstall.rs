//! `sluice-agent uninstall`: stop a running agent, then remove every pin, link, pod rule,
//! socket and state file the agent created, leaving the node as it found it.
use std::{path::Path, time::Duration};

use anyhow::Context as _;
use tracing::info;

use crate::{
    cli::NodeArgs,
    cni_install::Installer,
    control::{api::Request, client},
    dataplane::{self, Dataplane, DataplaneConfig},
    netns::Netns,
    state::StateStore,
};

pub fn uninstall(args: &NodeArgs, control_socket: &Path) -> anyhow::Result<()> {
    stop_running_agent(control_socket)?;
    // The CNI entry first: from here on new pods start without asking for an agent.
    if let Some(conf_dir) = &args.cni_conf_dir {
        let rewritten = Installer::uninstall(conf_dir, &args.cni_bin_dir)?;
        info!(configs = ?rewritten, "removed the sluice-cni entry and binary");
    }
    let store = StateStore::open(&args.state_dir).context("opening the state directory")?;
    let records = store.load()?;
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => dataplane::cgroup2_root()?,
    };
    let dp = Dataplane::load(&DataplaneConfig {
        pin_root: args.pin_root.clone(),
        cgroup,
        accelerate: false,
        ebpf_debug_log: false,
    })?;
    dp.uninstall(|cookie| {
        let r = records.iter().find(|r| r.netns_cookie == cookie)?;
        Netns::open(&r.netns)
            .ok()
            .filter(|ns| ns.inode() == r.netns_inode)
    })?;
    for socket in [&args.zds_socket, &control_socket.to_path_buf()] {
        match std::fs::remove_file(socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    store.remove()?;
    info!("uninstalled: no pins, links, pod rules, sockets, state or CNI entry left");
    Ok(())
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
