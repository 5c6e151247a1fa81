//! Boots a kernel and initramfs under qemu's software emulation (TCG: there is no KVM on
//! the CI machines) and streams the guest's report lines as they arrive. The console
//! (first serial port) goes to a log file; the report (second serial port) comes through
//! qemu's stdout. A guest that outlives its deadline is killed.
use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::cmd;

pub struct Boot<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub cpus: u32,
    pub memory_mib: u32,
    pub console_log: PathBuf,
    /// Every report line is also kept here.
    pub report_log: PathBuf,
    pub timeout: Duration,
}

pub enum Ended {
    /// qemu exited by itself (the guest powered off, or its kernel panicked: `panic=-1`
    /// reboots and `-no-reboot` turns that into an exit).
    Exited,
    TimedOut,
}

/// Runs the guest to the end, calling `on_line` with each report line.
pub fn run(boot: &Boot, mut on_line: impl FnMut(&str)) -> Result<Ended> {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .args(["-accel", "tcg,thread=multi", "-cpu", "max"])
    .args(["-smp", &boot.cpus.to_string()])
    .args(["-m", &format!("{}M", boot.memory_mib)])
    .arg("-kernel")
    .arg(boot.kernel)
    .arg("-initrd")
    .arg(boot.initrd)
    // mitigations=off: speculation barriers cost much under emulation and test nothing here.
    .args([
        "-append",
        "console=ttyS0 quiet panic=-1 mitigations=off rdinit=/init",
    ])
    .arg("-chardev")
    .arg(format!(
        "file,id=console,path={}",
        boot.console_log.display()
    ))
    .args(["-serial", "chardev:console"])
    .args(["-chardev", "stdio,id=report,signal=off"])
    .args(["-serial", "chardev:report"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    eprintln!("$ {}", cmd::display(&qemu));
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line);
            if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                break;
            }
        }
    });

    let mut log = File::create(&boot.report_log)
        .with_context(|| format!("creating {}", boot.report_log.display()))?;
    let deadline = Instant::now() + boot.timeout;
    let ended = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                writeln!(log, "{line}")?;
                on_line(&line);
            }
            // qemu closed its stdout: it is exiting.
            Err(RecvTimeoutError::Disconnected) => break Ended::Exited,
            Err(RecvTimeoutError::Timeout) => {
                eprintln!(
                    "the guest is still running after {:?}: killing qemu",
                    boot.timeout
                );
                let _ = child.kill();
                break Ended::TimedOut;
            }
        }
    };
    let status = child.wait().context("waiting for qemu")?;
    let _ = reader.join();
    if matches!(ended, Ended::Exited) && !status.success() {
        eprintln!("qemu exited with {status}");
    }
    Ok(ended)
}
