//! Fetches Debian packages (the VM kernels, busybox) through a private apt configuration
//! under the VM cache: its own sources, lists and caches, so the host's apt state is never
//! touched and nothing gets installed. Packages are unpacked with `dpkg-deb -x` into a
//! directory keyed by name and version, which later runs reuse.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};

use super::apt_sources;
use crate::{bootstrap, cmd};

/// Package lists older than this are refreshed; younger ones are reused without asking a
/// mirror (a warm run stays offline).
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    pub version: String,
}

impl std::fmt::Display for Package {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.name, self.version)
    }
}

pub struct Apt {
    dir: PathBuf,
    packages: PathBuf,
}

impl Apt {
    /// Sets up the private configuration under `cache` and refreshes its package lists if
    /// they are missing, stale, or were made from other sources.
    pub fn open(cache: &Path) -> Result<Apt> {
        let apt = Apt {
            dir: cache.join("apt"),
            packages: cache.join("packages"),
        };
        for dir in [
            apt.dir.join("sources.list.d"),
            apt.dir.join("preferences.d"),
            apt.dir.join("lists/partial"),
            apt.dir.join("cache/archives/partial"),
            apt.packages.clone(),
        ] {
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let sources = apt_sources::derive_from_host()?;
        let sources_file = apt.dir.join("sluice.sources");
        let stamp = apt.dir.join("lists/sluice-updated");
        let fresh = fs::read_to_string(&stamp).is_ok_and(|s| s == sources)
            && fs::metadata(&stamp)
                .and_then(|m| m.modified())
                .is_ok_and(|t| age(t) < LISTS_MAX_AGE);
        eprintln!(
            "checking VM package lists… {}",
            if fresh { "fresh" } else { "stale or missing" }
        );
        if !fresh {
            fs::write(&sources_file, &sources)?;
            let _ = fs::remove_file(&stamp);
            cmd::run(apt.command("apt-get").arg("update"))?;
            fs::write(&stamp, &sources)?;
        }
        Ok(apt)
    }

    /// `apt-get`/`apt-cache` with every directory pointed into the private configuration.
    fn command(&self, program: &str) -> Command {
        let dir = self.dir.display();
        let mut c = Command::new(program);
        c.env("DEBIAN_FRONTEND", "noninteractive").args([
            "-q".to_string(),
            format!("-oDir::Etc::sourcelist={dir}/sluice.sources"),
            format!("-oDir::Etc::sourceparts={dir}/sources.list.d"),
            format!("-oDir::Etc::preferences={dir}/preferences"),
            format!("-oDir::Etc::preferencesparts={dir}/preferences.d"),
            format!("-oDir::State::Lists={dir}/lists"),
            format!("-oDir::Cache={dir}/cache"),
            "-oAcquire::Languages=none".to_string(),
        ]);
        if bootstrap::is_root() {
            // apt's `_apt` sandbox user cannot write into root's private directories.
            c.arg("-oAPT::Sandbox::User=root");
        }
        c
    }

    /// The newest version of any package whose name matches `pattern` (an anchored regex).
    pub fn newest(&self, pattern: &str) -> Result<Package> {
        let names = cmd::query(
            self.command("apt-cache")
                .args(["search", "--names-only"])
                .arg(pattern),
        )?;
        let names: Vec<&str> = names
            .lines()
            .filter_map(|l| l.split(" - ").next())
            .collect();
        if names.is_empty() {
            bail!("no package in the VM's apt sources matches {pattern}");
        }
        // `madison` lists every available version of each name: `name | version | origin`.
        let table = cmd::query(self.command("apt-cache").arg("madison").args(&names))?;
        let mut best: Option<Package> = None;
        for line in table.lines() {
            let mut cols = line.split('|').map(str::trim);
            let (Some(name), Some(version)) = (cols.next(), cols.next()) else {
                continue;
            };
            let newer = match &best {
                None => true,
                Some(b) => version_gt(version, &b.version)?,
            };
            if newer {
                best = Some(Package {
                    name: name.to_string(),
                    version: version.to_string(),
                });
            }
        }
        best.with_context(|| format!("apt-cache madison listed no version for {pattern}"))
    }

    /// The directory `pkg` is unpacked in, downloading and unpacking it first if no earlier
    /// run did. `prepare` runs once on a fresh unpack, before it is published to later runs.
    pub fn unpacked(
        &self,
        pkg: &Package,
        prepare: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let dir = self
            .packages
            .join(format!("{}_{}", pkg.name, pkg.version.replace(':', "%3a")));
        if dir.is_dir() {
            eprintln!("using cached {pkg}");
            return Ok(dir);
        }
        // Not `with_extension`: versions have dots.
        let work = PathBuf::from(format!("{}.tmp-{}", dir.display(), std::process::id()));
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work)?;
        let result = (|| {
            cmd::run(
                self.command("apt-get")
                    .arg("download")
                    .arg(format!("{}={}", pkg.name, pkg.version))
                    .current_dir(&work),
            )?;
            let deb = fs::read_dir(&work)?
                .filter_map(|e| Some(e.ok()?.path()))
                .find(|p| p.extension().is_some_and(|e| e == "deb"))
                .context("apt-get download left no .deb")?;
            let root = work.join("root");
            cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
            fs::remove_file(&deb)?;
            prepare(&root)?;
            fs::rename(&root, &dir).with_context(|| format!("publishing {}", dir.display()))
        })();
        let _ = fs::remove_dir_all(&work);
        result?;
        Ok(dir)
    }
}

fn age(t: SystemTime) -> Duration {
    SystemTime::now().duration_since(t).unwrap_or_default()
}

/// Debian version order, as dpkg itself defines it.
fn version_gt(a: &str, b: &str) -> Result<bool> {
    let status = Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .context("running dpkg --compare-versions")?;
    Ok(status.success())
}

#[cfg(test)]
mod tests {
    #[test]
    fn dpkg_orders_kernel_versions() {
        assert!(super::version_gt("6.1.192-3", "6.1.192-2").unwrap());
        assert!(super::version_gt("6.12.117-1~deb12u1", "6.12.95-1~bpo12+1").unwrap());
        assert!(!super::version_gt("6.12.95-1~bpo12+1", "6.12.95-1").unwrap());
    }
}
