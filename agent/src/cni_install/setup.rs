//! From the command line to an [`Installer`] and an [`EnrollPolicy`], and the one-shot
//! `sluice-agent install-cni`.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tracing::info;

use super::{Installer, Plan};
use crate::{
    cli::{CniArgs, NodeArgs},
    cni::config::{LogLevel, PLUGIN_TYPE, PluginOptions},
    policy::EnrollPolicy,
};

/// The enrollment policy the flags describe: in Kubernetes mode (`system_namespace` given,
/// Istio's `POD_NAMESPACE`) labels decide and `--ambient-namespaces` is not used.
pub fn policy(cni: &CniArgs, system_namespace: Option<&str>) -> EnrollPolicy {
    let excluded = cni.exclude_namespaces.iter().cloned();
    match system_namespace {
        Some(ns) => EnrollPolicy::kubernetes(ns, excluded),
        None => EnrollPolicy::standalone(cni.ambient_namespaces.iter().cloned(), excluded),
    }
}

/// The installer `node` and `cni` describe; `None` when no CNI config directory is set.
pub fn installer(
    node: &NodeArgs,
    cni: &CniArgs,
    policy: &EnrollPolicy,
    control_socket: &Path,
) -> anyhow::Result<Option<Installer>> {
    let Some(conf_dir) = &node.cni_conf_dir else {
        return Ok(None);
    };
    let options = PluginOptions {
        // The plugin runs on the host, where the socket has the same path (a hostPath mount).
        agent_socket: std::path::absolute(control_socket)?,
        timeout_ms: cni.cni_timeout_ms,
        log_level: LogLevel::parse(&cni.cni_log_level).unwrap_or(LogLevel::Info),
        log_file: cni.cni_log_file.clone(),
        exclude_namespaces: policy.excluded(),
        ambient_namespaces: policy.plugin_ambient_namespaces(),
    };
    let plugin = match &cni.cni_plugin {
        Some(p) => p.clone(),
        None => sibling_plugin()?,
    };
    Ok(Some(Installer::new(
        conf_dir,
        &node.cni_bin_dir,
        &plugin,
        &options,
    )))
}

/// `sluice-cni` next to the running executable (both are in the agent's image).
fn sibling_plugin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the sluice-agent executable")?;
    Ok(exe.with_file_name(PLUGIN_TYPE))
}

/// Installs the binary and chains the entry once. Without a config to chain into, fails, or
/// with `wait`, waits for one.
pub fn install_once(installer: &mut Installer, wait: bool) -> anyhow::Result<PathBuf> {
    installer.ensure_dirs()?;
    if installer.install_binary()? {
        info!(path = %installer.binary().display(), "installed the sluice-cni binary");
    }
    let ino = Inotify::init(InitFlags::IN_CLOEXEC)?;
    ino.add_watch(
        installer.conf_dir(),
        AddWatchFlags::IN_CREATE | AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_MOVED_TO,
    )?;
    loop {
        let plan = installer.plan()?;
        match &plan {
            Plan::Chained(path) => {
                info!(config = %path.display(), "sluice-cni is chained");
                return Ok(path.clone());
            }
            Plan::Write { .. } => {
                let path = installer.apply(&plan)?.unwrap_or_default();
                info!(config = %path.display(), "chained sluice-cni into the CNI configuration");
                return Ok(path);
            }
            Plan::NoConfig if wait => {
                info!(dir = %installer.conf_dir().display(), "no CNI configuration yet; waiting for the primary CNI to write one");
                ino.read_events()?;
            }
            Plan::NoConfig => bail!(
                "no CNI network configuration in {} to chain sluice-cni into (is the primary CNI installed? --wait waits for it)",
                installer.conf_dir().display()
            ),
        }
    }
}
