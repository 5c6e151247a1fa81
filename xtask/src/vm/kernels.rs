//! The kernels the VM suite boots: Debian's cloud kernels (the unsigned image package, whose
//! modules come in the same package), newest version available, and the modules the tests need.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::apt::{Apt, Package};
use crate::cmd;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Series {
    /// Debian 12's kernel (bookworm).
    #[value(name = "6.1")]
    V6_1,
    /// The 6.12 kernel Debian 12 ships alongside (bookworm-backports, bookworm-security).
    #[value(name = "6.12")]
    V6_12,
}

impl Series {
    pub const ALL: [Series; 2] = [Series::V6_1, Series::V6_12];

    pub fn label(self) -> &'static str {
        match self {
            Series::V6_1 => "6.1",
            Series::V6_12 => "6.12",
        }
    }

    /// Package names: `linux-image-6.1.0-57-cloud-amd64-unsigned`,
    /// `linux-image-6.12.117+deb12-cloud-amd64-unsigned` (older backports: `6.12.12+bpo`).
    fn package_pattern(self) -> &'static str {
        match self {
            Series::V6_1 => r"^linux-image-6\.1\.[0-9]+-[0-9]+-cloud-amd64-unsigned$",
            Series::V6_12 => r"^linux-image-6\.12\.[0-9]+\+[a-z0-9]+-cloud-amd64-unsigned$",
        }
    }
}

/// Modules the guest loads at boot, with their dependencies (built-in ones need nothing).
/// Add here what a new test needs; a name a kernel lacks is reported, not fatal.
pub const MODULES: &[&str] = &[
    // Test topologies: veth pairs between network namespaces.
    "veth",
    // sock_diag, with which enrollment finds ztunnel listeners that predate it (a real node
    // autoloads these; the guest has no modprobe helper).
    "inet_diag",
    "tcp_diag",
    // iptables (nft backend) in test namespaces: kube-proxy's MASQUERADE stand-in, and the
    // upstream rule set (TPROXY, CONNMARK, owner, REDIRECT) the benchmarks compare against.
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nft_masq",
    "nft_redir",
    "nft_ct",
    "nft_socket",
    "nft_tproxy",
    "xt_MASQUERADE",
    "xt_REDIRECT",
    "xt_TPROXY",
    "xt_connmark",
    "xt_mark",
    "xt_owner",
    "xt_conntrack",
    "xt_socket",
    "xt_tcpudp",
];

pub struct Kernel {
    pub series: Series,
    pub package: Package,
    /// `uname -r` of the guest.
    pub release: String,
    pub vmlinuz: PathBuf,
    root: PathBuf,
}

/// Modules to `insmod`, in load order, and what the kernel has built in or lacks.
#[derive(Default)]
pub struct ModuleSet {
    pub files: Vec<PathBuf>,
    pub builtin: Vec<String>,
    pub missing: Vec<String>,
}

impl Kernel {
    /// The newest package of `series`, downloaded and unpacked unless a run already did.
    pub fn fetch(apt: &Apt, series: Series) -> Result<Kernel> {
        let package = apt.newest(series.package_pattern())?;
        eprintln!("kernel {}: {package}", series.label());
        // The package carries no modules.dep (its postinst makes one); depmod builds it.
        let root = apt.unpacked(&package, |root| {
            let release = release_in(root)?;
            let depmod = cmd::which("depmod").context("depmod (Debian package kmod) not found")?;
            cmd::run(Command::new(depmod).arg("-b").arg(root).arg(release))
        })?;
        let release = release_in(&root)?;
        let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
        if !vmlinuz.is_file() {
            bail!("{package} has no {}", vmlinuz.display());
        }
        Ok(Kernel {
            series,
            package,
            release,
            vmlinuz,
            root,
        })
    }

    /// The modules for `names` with their dependencies, dependencies first, decompressed
    /// (busybox's insmod reads plain `.ko`; 6.12's are `.ko.xz`) into the cached unpack.
    pub fn modules(&self, names: &[&str]) -> Result<ModuleSet> {
        let modprobe =
            cmd::which("modprobe").context("modprobe (Debian package kmod) not found")?;
        let mut set = ModuleSet::default();
        let mut seen = Vec::new();
        for &name in names {
            // -C /dev/null: the host's modprobe.d (blacklists, install hooks) is not the guest's.
            let out = Command::new(&modprobe)
                .args(["-C", "/dev/null", "--show-depends", "-d"])
                .arg(&self.root)
                .args(["-S", &self.release, name])
                .output()
                .context("running modprobe --show-depends")?;
            if !out.status.success() {
                set.missing.push(name.to_string());
                continue;
            }
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(builtin) = line.strip_prefix("builtin ") {
                    set.builtin.push(builtin.trim().to_string());
                } else if let Some(path) = line.strip_prefix("insmod ") {
                    let path = PathBuf::from(path.trim());
                    if !seen.contains(&path) {
                        set.files.push(self.decompressed(&path)?);
                        seen.push(path);
                    }
                }
            }
        }
        Ok(set)
    }

    fn decompressed(&self, module: &Path) -> Result<PathBuf> {
        let name = module.file_name().context("module path")?.to_string_lossy();
        let (plain, tool) = if let Some(base) = name.strip_suffix(".xz") {
            (base, "xz")
        } else if let Some(base) = name.strip_suffix(".zst") {
            (base, "zstd")
        } else {
            return Ok(module.to_path_buf());
        };
        let dir = self.root.join("sluice-decompressed");
        let out = dir.join(plain);
        if out.is_file() {
            return Ok(out);
        }
        fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!("{plain}.tmp-{}", std::process::id()));
        let file = fs::File::create(&tmp)?;
        let status = Command::new(tool)
            .arg("-dc")
            .arg(module)
            .stdout(file)
            .status()
            .with_context(|| format!("running {tool}"))?;
        if !status.success() {
            let _ = fs::remove_file(&tmp);
            bail!("{tool} -dc {} failed ({status})", module.display());
        }
        fs::rename(&tmp, &out)?;
        Ok(out)
    }
}

/// The one `lib/modules/<release>` directory of an unpacked kernel package.
fn release_in(root: &Path) -> Result<String> {
    let dir = root.join("lib/modules");
    let mut releases: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .collect();
    match releases.len() {
        1 => Ok(releases.remove(0)),
        n => bail!("{} holds {n} kernel releases, expected 1", dir.display()),
    }
}
