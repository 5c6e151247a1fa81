//! Running tools (ip, iptables-nft-restore, nft) inside a network namespace the bench made,
//! never the machine's: the child enters the namespace between fork and exec, which is what
//! istio-cni's node agent does in-process before it execs iptables-restore.
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Runs `program args` in `netns` with `stdin` fed to it; returns its wall time (fork to exit).
pub fn run_in(netns: &Path, program: &str, args: &[&str], stdin: &str) -> Result<Duration> {
    let ns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    let fd = ns.as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setns is async-signal-safe; the fd stays open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let line = format!("{program} {}", args.join(" "));
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {line}"))?;
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.as_bytes())
            .with_context(|| format!("feeding {line}"))?;
    }
    let out = child.wait_with_output()?;
    let took = t0.elapsed();
    if !out.status.success() {
        bail!(
            "{line} in {} failed ({}): {}",
            netns.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(took)
}

/// `ip [-4|-6] -batch -` inside `netns`.
pub fn ip_batch(netns: &Path, family: Option<&str>, lines: &[String]) -> Result<()> {
    let mut args = Vec::new();
    args.extend(family);
    args.extend(["-batch", "-"]);
    run_in(netns, "ip", &args, &(lines.join("\n") + "\n")).map(drop)
}

/// `ip -batch -` in the bench's own namespace (for `netns add/del`, which name namespaces).
pub fn ip_batch_here(lines: &[String], force: bool) -> Result<()> {
    let mut args = vec!["-batch", "-"];
    if force {
        args.insert(0, "-force");
    }
    let mut child = Command::new("ip")
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting ip -batch")?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all((lines.join("\n") + "\n").as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ip -batch failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Writes a sysctl inside `netns` (a thread enters it: /proc/sys/net follows the opener).
pub fn sysctl(netns: &Path, key: &str, value: &str) -> Result<()> {
    let file = Path::new("/proc/sys").join(key.replace('.', "/"));
    sluice_tests::harness::run_in_netns(netns, || std::fs::write(&file, value))?
        .with_context(|| format!("sysctl {key}={value} in {}", netns.display()))
}
