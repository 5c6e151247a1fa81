//! The guest's initramfs: busybox as the init and shell, the userland tools the tests exec
//! with their shared libraries, the kernel's modules, the workspace binaries and test
//! executables at their host paths (tests find `sluice-testkit` and `sluice-agent` by the
//! absolute path cargo compiled in), and the init script with its run list.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};

use super::{artifacts::Artifacts, kernels::ModuleSet, rootfs::Rootfs};
use crate::cmd;

/// Programs the tests (and people debugging a guest) exec, taken from the host with their
/// libraries. Debian packages: iproute2, iptables, bpftool, procps, util-linux (see
/// bootstrap.rs).
pub const TOOLS: &[&str] = &[
    "ip",
    "iptables",
    "ip6tables",
    "iptables-save",
    "iptables-restore",
    "ip6tables-save",
    "ip6tables-restore",
    "bpftool",
    "sysctl",
    // The capability test runs the agent with a reduced bounding set.
    "setpriv",
];

const INIT: &str = include_str!("init.sh");

/// How the guest runs the test executables.
pub struct RunConfig {
    pub test_threads: u32,
    pub executable_timeout: Duration,
    /// Passed to every test executable (a libtest filter, `--nocapture`...).
    pub test_args: Vec<String>,
}

/// Everything but the kernel's modules: the same for every kernel.
pub fn base(
    busybox: &Path,
    artifacts: &Artifacts,
    run: &RunConfig,
    stage: &Path,
) -> Result<Rootfs> {
    let mut fs = Rootfs::default();
    for dir in ["/proc", "/sys", "/dev", "/run", "/root", "/var", "/etc"] {
        fs.dir(dir, 0o755);
    }
    fs.dir("/tmp", 0o1777);
    // The host's layout of the program directories (merged /usr: `/bin -> usr/bin`...), so
    // busybox links its applets and the loader finds libraries where the host has them.
    for dir in ["/bin", "/sbin", "/lib", "/lib64", "/usr/bin", "/usr/sbin"] {
        if Path::new(dir).exists() {
            fs.host_path(Path::new(dir))?;
        }
    }
    fs.symlink("/var/run", "../run");
    // The kernel opens it for init's stdio before anything is mounted.
    fs.char_dev("/dev/console", 5, 1);
    fs.data("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644);
    fs.data("/etc/group", "root:x:0:\n", 0o644);
    fs.data("/etc/hosts", "127.0.0.1 localhost\n::1 localhost\n", 0o644);
    fs.file("/sluice/busybox", busybox)?;
    fs.data("/init", INIT, 0o755);

    let mut elves = Vec::new();
    for tool in TOOLS {
        let path = cmd::which(tool).with_context(|| format!("{tool} is not installed"))?;
        elves.push(fs.host_path(&path)?);
    }
    // Test binaries keep their symbols (backtraces name functions) but not their DWARF.
    for exe in artifacts
        .bins
        .iter()
        .chain(artifacts.tests.iter().map(|t| &t.path))
    {
        let dir = exe.parent().context("executable path")?;
        let real_dir = fs.host_path(dir)?;
        let name = exe.file_name().context("executable path")?;
        fs.file(real_dir.join(name), &stripped(exe, stage)?)?;
        elves.push(exe.clone());
    }
    let mut libs = Vec::new();
    for elf in &elves {
        libs.extend(fs.shared_libs(elf)?);
    }
    // iptables loads its matches and targets with dlopen, from beside libxtables.
    if let Some(libxtables) = libs.iter().find(|l| {
        l.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("libxtables.so"))
    }) {
        let plugins = libxtables.with_file_name("xtables");
        for plugin in
            fs::read_dir(&plugins).with_context(|| format!("reading {}", plugins.display()))?
        {
            let plugin = plugin?.path();
            fs.host_path(&plugin)?;
            fs.shared_libs(&plugin)?;
        }
    }

    let tests: String = artifacts
        .tests
        .iter()
        .map(|t| format!("{}\t{}\n", t.label, t.path.display()))
        .collect();
    fs.data("/sluice/tests", tests, 0o644);
    fs.data("/sluice/env", env_file(run), 0o644);
    Ok(fs)
}

/// Adds the kernel's modules and their load order.
pub fn add_modules(fs: &mut Rootfs, modules: &ModuleSet) -> Result<()> {
    let mut order = String::new();
    for (i, ko) in modules.files.iter().enumerate() {
        let name = ko.file_name().context("module path")?.to_string_lossy();
        let path = format!("/sluice/modules/{i:02}-{name}");
        fs.file(&path, ko)?;
        order.push_str(&path);
        order.push('\n');
    }
    fs.data("/sluice/load-order", order, 0o644);
    Ok(())
}

fn env_file(run: &RunConfig) -> String {
    let args: Vec<String> = run.test_args.iter().map(|a| shell_quote(a)).collect();
    format!(
        // SLUICE_TEST_CHURN: the churn test's 100,000 connections would take most of an hour
        // under software emulation; 20,000 still overflow nothing and keep its assertions.
        "export CI=true RUST_BACKTRACE=1 HOME=/root TMPDIR=/tmp SLUICE_TEST_CHURN=20000\n\
         TEST_THREADS={}\nBINARY_TIMEOUT={}\nset -- {}\n",
        run.test_threads,
        run.executable_timeout.as_secs(),
        args.join(" ")
    )
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A copy of `exe` without debug info in `stage`, remade only when `exe` is newer.
fn stripped(exe: &Path, stage: &Path) -> Result<PathBuf> {
    let out = stage.join(exe.file_name().context("executable path")?);
    let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&out).is_some() && modified(&out) >= modified(exe) {
        return Ok(out);
    }
    fs::create_dir_all(stage)?;
    cmd::query(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&out)
            .arg(exe),
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_quotes_test_args() {
        let env = env_file(&RunConfig {
            test_threads: 2,
            executable_timeout: Duration::from_secs(600),
            test_args: vec!["enroll".into(), "it's".into()],
        });
        assert!(
            env.contains("TEST_THREADS=2\nBINARY_TIMEOUT=600\n"),
            "{env}"
        );
        assert!(env.ends_with("set -- 'enroll' 'it'\\''s'\n"), "{env}");
    }
}
