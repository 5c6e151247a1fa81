//! The CNI installer: puts `sluice-cni` into the node's CNI binary directory and chains its
//! entry into the configuration the runtime uses, and keeps both there.
//!
//! - [`conflist`]: editing one config (pure); [`files`]: ranking configs like libcni, atomic
//!   writes; [`throttle`]: spacing out restorations;
//! - [`Installer`]: one pass (plan, then apply) and uninstall; [`watch`]: the agent's loop
//!   that re-runs a pass whenever the directories change, with readiness and throttling;
//!   [`setup`]: from the command line to an installer, and `sluice-agent install-cni`.
//!
//! An agent that stops (upgrade, restart) leaves the entry and binary in place: pods created
//! meanwhile fail their ADD until the agent is back, rather than starting un-redirected.
pub mod conflist;
pub mod files;
pub mod setup;
pub mod throttle;
pub mod watch;

use std::{
    io,
    path::{Path, PathBuf},
};

use serde_json::Value;

use crate::cni::config::{PLUGIN_TYPE, PluginOptions};
use conflist::{ConfError, Kind};

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{} {error}; leaving it alone", path.display())]
    Conf { path: PathBuf, error: ConfError },
    #[error(
        "cannot turn {} into {}: that file exists and is not sluice's; leaving both alone",
        from.display(), to.display()
    )]
    Collision { from: PathBuf, to: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What one pass found, and what it would write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No network configuration yet: waiting for the primary CNI to write one.
    NoConfig,
    /// The config the runtime uses (`path`) chains our entry.
    Chained(PathBuf),
    /// `source` (the config the runtime uses) lacks our entry: write `bytes` to `target`
    /// (`source`, or its `.conflist` twin for a `.conf`) with `mode`, then remove `source` if
    /// it differs.
    Write {
        source: PathBuf,
        target: PathBuf,
        bytes: Vec<u8>,
        mode: u32,
        /// It had a sluice-cni entry, just not ours (other options, or not last).
        had_entry: bool,
    },
}

#[derive(Debug)]
pub struct Installer {
    conf_dir: PathBuf,
    bin_dir: PathBuf,
    plugin: PathBuf,
    entry: Value,
    /// The plugin and its installed copy as the last check left them.
    binary_seen: Option<(files::Stamp, files::Stamp)>,
}

impl Installer {
    /// `plugin` is the binary to install (as `sluice-cni` in `bin_dir`); `options` become the
    /// entry's keys.
    pub fn new(conf_dir: &Path, bin_dir: &Path, plugin: &Path, options: &PluginOptions) -> Self {
        let mut entry = serde_json::Map::new();
        entry.insert("type".into(), PLUGIN_TYPE.into());
        if let Ok(Value::Object(o)) = serde_json::to_value(options) {
            entry.extend(o);
        }
        Installer {
            conf_dir: conf_dir.to_path_buf(),
            bin_dir: bin_dir.to_path_buf(),
            plugin: plugin.to_path_buf(),
            entry: Value::Object(entry),
            binary_seen: None,
        }
    }

    pub fn conf_dir(&self) -> &Path {
        &self.conf_dir
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Where the plugin is installed.
    pub fn binary(&self) -> PathBuf {
        self.bin_dir.join(PLUGIN_TYPE)
    }

    /// The entry chained into the config.
    pub fn entry(&self) -> &Value {
        &self.entry
    }

    /// Creates the two directories if missing (the runtime reads them once they exist).
    pub fn ensure_dirs(&self) -> Result<(), InstallError> {
        for d in [&self.conf_dir, &self.bin_dir] {
            std::fs::create_dir_all(d).map_err(io_err(d))?;
        }
        Ok(())
    }

    /// Copies the plugin binary in if it is missing or differs. Returns whether it wrote.
    pub fn install_binary(&mut self) -> Result<bool, InstallError> {
        let dst = self.binary();
        files::install_binary(&self.plugin, &dst, &mut self.binary_seen).map_err(|source| {
            InstallError::Io {
                path: if self.plugin.exists() {
                    dst
                } else {
                    self.plugin.clone()
                },
                source,
            }
        })
    }

    /// Looks at the config the runtime uses and works out what to write.
    pub fn plan(&self) -> Result<Plan, InstallError> {
        let list = files::config_files(&self.conf_dir).map_err(io_err(&self.conf_dir))?;
        let Some(source) = list.into_iter().next() else {
            return Ok(Plan::NoConfig);
        };
        let name = source
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let kind = Kind::of(&name).unwrap_or(Kind::ConfList);
        let bytes = std::fs::read(&source).map_err(io_err(&source))?;
        let conf_err = |error| InstallError::Conf {
            path: source.clone(),
            error,
        };
        let Some(new) = conflist::chain(kind, &bytes, &self.entry).map_err(conf_err)? else {
            return Ok(Plan::Chained(source));
        };
        let target = match kind {
            Kind::ConfList => source.clone(),
            Kind::Conf => {
                let stem = name.rsplit_once('.').map_or(name.as_str(), |(s, _)| s);
                let target = source.with_file_name(format!("{stem}.conflist"));
                // Ours from an earlier pass (the primary rewrote its .conf since): replace it.
                if let Ok(existing) = std::fs::read(&target)
                    && !conflist::has_any_entry(Kind::ConfList, &existing)
                {
                    return Err(InstallError::Collision {
                        from: source,
                        to: target,
                    });
                }
                target
            }
        };
        Ok(Plan::Write {
            mode: files::mode_of(&source).map_err(io_err(&source))?,
            had_entry: conflist::has_any_entry(kind, &bytes),
            source,
            target,
            bytes: new,
        })
    }

    /// Carries out a `Plan::Write`; returns the file the runtime now uses.
    pub fn apply(&self, plan: &Plan) -> Result<Option<PathBuf>, InstallError> {
        let Plan::Write {
            source,
            target,
            bytes,
            mode,
            ..
        } = plan
        else {
            return Ok(None);
        };
        files::write_atomic(target, bytes, *mode).map_err(io_err(target))?;
        if source != target {
            files::remove(source).map_err(io_err(source))?;
        }
        Ok(Some(target.clone()))
    }

    /// Takes sluice-cni out of every config in the directory and removes the binary: entry
    /// first, so the runtime never runs a chain naming a missing plugin. Returns the configs
    /// rewritten.
    pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
        let mut rewritten = Vec::new();
        let list = match files::config_files(conf_dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => vec![],
            other => other.map_err(io_err(conf_dir))?,
        };
        for path in list {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let kind = Kind::of(name).unwrap_or(Kind::ConfList);
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            // A file we cannot parse has no entry of ours we could remove.
            if let Ok(Some(new)) = conflist::unchain(kind, &bytes) {
                let mode = files::mode_of(&path).map_err(io_err(&path))?;
                files::write_atomic(&path, &new, mode).map_err(io_err(&path))?;
                rewritten.push(path);
            }
        }
        let bin = bin_dir.join(PLUGIN_TYPE);
        files::remove(&bin).map_err(io_err(&bin))?;
        Ok(rewritten)
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::PermissionsExt as _};

    use super::*;

    fn setup(tag: &str) -> (PathBuf, Installer) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root =
            std::env::temp_dir().join(format!("sluice-inst-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("net.d")).unwrap();
        fs::write(root.join("plugin"), b"#!/bin/true\n").unwrap();
        let options = PluginOptions::default();
        let inst = Installer::new(
            &root.join("net.d"),
            &root.join("bin"),
            &root.join("plugin"),
            &options,
        );
        inst.ensure_dirs().unwrap();
        (root, inst)
    }

    fn write(path: &Path, body: &str, mode: u32) {
        fs::write(path, body).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn pass(inst: &Installer) -> Option<PathBuf> {
        let plan = inst.plan().unwrap();
        inst.apply(&plan).unwrap()
    }

    #[test]
    fn waits_for_a_config_then_chains_the_first_one() {
        let (root, inst) = setup("first");
        assert_eq!(inst.plan().unwrap(), Plan::NoConfig);
        let d = inst.conf_dir().to_path_buf();
        write(
            &d.join("20-b.conflist"),
            r#"{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"ptp"}]}"#,
            0o644,
        );
        write(
            &d.join("10-a.conflist"),
            r#"{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"bridge"}]}"#,
            0o600,
        );
        assert_eq!(pass(&inst), Some(d.join("10-a.conflist")));
        assert_eq!(inst.plan().unwrap(), Plan::Chained(d.join("10-a.conflist")));
        assert_eq!(files::mode_of(&d.join("10-a.conflist")).unwrap(), 0o600);
        // The other file is not the runtime's: untouched.
        assert!(
            !fs::read_to_string(d.join("20-b.conflist"))
                .unwrap()
                .contains("sluice")
        );
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_conf_is_replaced_by_a_conflist_with_its_mode() {
        let (root, inst) = setup("conf");
        let d = inst.conf_dir().to_path_buf();
        write(
            &d.join("10-bridge.conf"),
            r#"{"cniVersion":"0.4.0","name":"br","type":"bridge"}"#,
            0o640,
        );
        assert_eq!(pass(&inst), Some(d.join("10-bridge.conflist")));
        assert!(!d.join("10-bridge.conf").exists());
        assert_eq!(
            files::mode_of(&d.join("10-bridge.conflist")).unwrap(),
            0o640
        );
        // The primary writes its .conf again: it wins the ranking, and is converted again over
        // our earlier conflist.
        write(
            &d.join("10-bridge.conf"),
            r#"{"cniVersion":"0.4.0","name":"br","type":"bridge","mtu":1400}"#,
            0o640,
        );
        assert_eq!(pass(&inst), Some(d.join("10-bridge.conflist")));
        let v: Value =
            serde_json::from_slice(&fs::read(d.join("10-bridge.conflist")).unwrap()).unwrap();
        assert_eq!(v["plugins"][0]["mtu"], 1400);
        // But a conflist that is not ours is never overwritten.
        write(
            &d.join("10-bridge.conflist"),
            r#"{"cniVersion":"0.4.0","name":"other","plugins":[{"type":"x"}]}"#,
            0o644,
        );
        write(
            &d.join("10-bridge.conf"),
            r#"{"cniVersion":"0.4.0","name":"br","type":"bridge"}"#,
            0o640,
        );
        assert!(matches!(inst.plan(), Err(InstallError::Collision { .. })));
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_malformed_config_is_left_alone_with_an_error() {
        let (root, inst) = setup("bad");
        let p = inst.conf_dir().join("10-x.conflist");
        write(&p, "{\"cniVersion\": \"1.0.0\", \"plugins\": [", 0o644);
        let err = inst.plan().unwrap_err();
        assert!(
            err.to_string().contains("10-x.conflist")
                && err.to_string().contains("leaving it alone"),
            "{err}"
        );
        assert_eq!(
            fs::read_to_string(&p).unwrap(),
            "{\"cniVersion\": \"1.0.0\", \"plugins\": ["
        );
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn uninstall_removes_the_entry_and_the_binary() {
        let (root, mut inst) = setup("uninstall");
        let d = inst.conf_dir().to_path_buf();
        let body = r#"{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"bridge"}]}"#;
        write(&d.join("10-a.conflist"), body, 0o600);
        assert!(inst.install_binary().unwrap());
        pass(&inst);
        let rewritten = Installer::uninstall(inst.conf_dir(), inst.bin_dir()).unwrap();
        assert_eq!(rewritten, vec![d.join("10-a.conflist")]);
        assert!(!inst.binary().exists());
        let v: Value = serde_json::from_slice(&fs::read(d.join("10-a.conflist")).unwrap()).unwrap();
        assert_eq!(v, serde_json::from_str::<Value>(body).unwrap());
        assert_eq!(files::mode_of(&d.join("10-a.conflist")).unwrap(), 0o600);
        // Twice is fine.
        assert!(
            Installer::uninstall(inst.conf_dir(), inst.bin_dir())
                .unwrap()
                .is_empty()
        );
        fs::remove_dir_all(root).unwrap();
    }
}
