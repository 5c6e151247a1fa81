use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use super::cgroup::Cgroup;

/// How long harness calls wait for a helper's answer unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Path of the `sluice-testkit` binary: `$SLUICE_TESTKIT`, else next to the running
/// test's `deps/` directory (`target/<profile>/sluice-testkit`). Integration tests of
/// this package should prefer `env!("CARGO_BIN_EXE_sluice-testkit")`, which also makes
/// cargo build it.
pub fn testkit_path() -> PathBuf {
    sibling_binary("SLUICE_TESTKIT", "sluice-testkit")
}

/// A binary of this workspace: `$env_var` if set, else `target/<profile>/<name>`, next to the
/// running test's `deps/` directory.
pub fn sibling_binary(env_var: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_var) {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().unwrap_or(Path::new("."));
    let profile_dir = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    profile_dir.join(name)
}

/// A helper process placed in a network namespace and cgroup before it execs.
/// Its stdin stays open (closing it asks a testkit helper to exit); each stdout line is
/// parsed as JSON (non-JSON lines arrive as `{"event":"raw","line":...}`); stderr is
/// inherited. Drop kills and reaps it.
pub struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<Value>,
    /// Lines received but not yet claimed by [`Proc::take`].
    pending: VecDeque<Value>,
    label: String,
}

impl Proc {
    /// Starts `bin args...` inside `netns` (a netns file such as `/run/netns/<name>`)
    /// and `cgroup`; `None` keeps the caller's.
    pub fn spawn(
        bin: &Path,
        args: &[&str],
        netns: Option<&Path>,
        cgroup: Option<&Cgroup>,
    ) -> Result<Proc> {
        // Opened before fork: between fork and exec only raw syscalls are safe.
        let netns_file = netns
            .map(|p| File::open(p).with_context(|| format!("opening netns {}", p.display())))
            .transpose()?;
        let procs_file = cgroup
            .map(|c| {
                let p = c.path().join("cgroup.procs");
                OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .with_context(|| format!("opening {}", p.display()))
            })
            .transpose()?;
        let netns_fd = netns_file.as_ref().map(|f| f.as_raw_fd());
        let procs_fd = procs_file.as_ref().map(|f| f.as_raw_fd());

        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: the closure only makes async-signal-safe syscalls on fds that stay
        // open until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(fd) = netns_fd
                    && libc::setns(fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process, i.e. this child, into the cgroup.
                if let Some(fd) = procs_fd
                    && libc::write(fd, b"0".as_ptr().cast(), 1) != 1
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let label = format!("{} {}", bin.display(), args.join(" "));
        let mut child = cmd.spawn().with_context(|| format!("spawning {label}"))?;
        drop((netns_file, procs_file));

        let stdout = child.stdout.take().context("child stdout")?;
        let (tx, rx) = mpsc::channel();
        thread::Builder::new()
            .name("proc-stdout".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let value = serde_json::from_str(&line)
                        .unwrap_or_else(|_| json!({"event": "raw", "line": line}));
                    if tx.send(value).is_err() {
                        break;
                    }
                }
            })
            .context("spawning stdout reader")?;
        Ok(Proc {
            stdin: child.stdin.take(),
            child,
            lines: rx,
            pending: VecDeque::new(),
            label,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Writes one line (a newline is appended) to the helper's stdin.
    pub fn send_line(&mut self, line: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("stdin of {} already closed", self.label))?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .with_context(|| format!("writing to {}", self.label))
    }

    /// Returns (and removes) the first line, pending or new, that satisfies `pred`;
    /// other lines stay queued in order. Fails after `timeout` or when the helper's
    /// stdout closes.
    pub fn take(&mut self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Result<Value> {
        if let Some(pos) = self.pending.iter().position(&pred) {
            return Ok(self.pending.remove(pos).expect("position is in range"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if pred(&v) => return Ok(v),
                Ok(v) => self.pending.push_back(v),
                Err(RecvTimeoutError::Timeout) => bail!(
                    "timed out after {timeout:?} waiting on {}; unclaimed lines: {:?}",
                    self.label,
                    self.pending
                ),
                Err(RecvTimeoutError::Disconnected) => bail!(
                    "{} exited ({:?}); unclaimed lines: {:?}",
                    self.label,
                    self.child.try_wait().ok().flatten(),
                    self.pending
                ),
            }
        }
    }

    /// Removes and returns every line received so far that satisfies `pred`.
    pub fn drain(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.pending.extend(self.lines.try_iter());
        let (taken, kept): (VecDeque<Value>, VecDeque<Value>) =
            self.pending.drain(..).partition(|v| pred(v));
        self.pending = kept;
        taken.into()
    }

    /// Closes stdin, which makes a testkit helper exit.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{} still running after {timeout:?}", self.label);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stdin = None;
        self.kill();
    }
}
