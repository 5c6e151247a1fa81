use std::fs::File;
use std::path::{Path, PathBuf};
use std::thread;

use anyhow::{Context, Result, anyhow};
use nix::sched::{CloneFlags, setns};

use super::command::ip;
use super::names::unique;

/// A named network namespace (`ip netns add`), deleted on drop. `lo` is up.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// Creates `<prefix><unique>`. A leftover namespace of the same name can only come
    /// from a crashed earlier process that had our pid, so it is replaced.
    pub fn new(prefix: &str) -> Result<Netns> {
        let name = unique(prefix);
        if let Err(first) = ip(&["netns", "add", &name]) {
            if !Path::new("/run/netns").join(&name).exists() {
                return Err(first);
            }
            let _ = ip(&["netns", "del", &name]);
            ip(&["netns", "add", &name])?;
        }
        let ns = Netns {
            path: Path::new("/run/netns").join(&name),
            name,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, for `setns` or `Proc::spawn`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the namespace file (close-on-exec).
    pub fn open(&self) -> Result<File> {
        File::open(&self.path).with_context(|| format!("opening {}", self.path.display()))
    }

    /// Runs `ip -n <name> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs `f` on a thread that joined this namespace (the caller's thread is untouched).
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        run_in_netns(&self.path, f)
    }

    /// Sets a sysctl inside this namespace, e.g. `("net/ipv4/ip_forward", "1")`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let file = sysctl_path(key);
        // /proc/sys/net resolves against the netns of the thread that opens it.
        self.run(|| std::fs::write(&file, value))?
            .with_context(|| format!("sysctl {key}={value} in netns {}", self.name))
    }

    /// Reads a sysctl inside this namespace.
    pub fn read_sysctl(&self, key: &str) -> Result<String> {
        let file = sysctl_path(key);
        let v = self.run(|| std::fs::read_to_string(&file))??;
        Ok(v.trim().to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: could not delete netns {}: {e:#}", self.name);
        }
    }
}

/// `net.ipv4.ip_forward` or `net/ipv4/ip_forward` → `/proc/sys/net/ipv4/ip_forward`.
/// Use the slash form for keys containing an interface name with a dot.
fn sysctl_path(key: &str) -> PathBuf {
    let rel = if key.contains('/') {
        key.to_string()
    } else {
        key.replace('.', "/")
    };
    Path::new("/proc/sys").join(rel)
}

/// Runs `f` on a fresh thread that entered the network namespace at `path`.
pub fn run_in_netns<R: Send>(path: &Path, f: impl FnOnce() -> R + Send) -> Result<R> {
    let ns = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    thread::scope(|s| {
        s.spawn(|| {
            setns(&ns, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns {}", path.display()))?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow!("thread in netns {} panicked", path.display()))?
    })
}

/// Names listed by `ip netns list`.
pub fn list_netns() -> Result<Vec<String>> {
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}
