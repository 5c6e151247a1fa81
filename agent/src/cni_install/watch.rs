//! The installer inside `sluice-agent run`: a pass at start, then one whenever the CNI config
//! or binary directory changes (inotify), and every 30 s as a safety net.
//!
//! Readiness (`/readyz`) is held at "not ready" while the config the runtime uses lacks our
//! entry, or the binary cannot be installed. When something keeps taking the entry away (a
//! primary CNI that rewrites its config on a loop), restorations are throttled and each one is
//! logged with what happened to the file and how often it has happened.
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd, RawFd},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::{error, info, warn};

use super::{Installer, Plan, throttle::Throttle};
use crate::{cni::config::PLUGIN_TYPE, readiness::Readiness};

/// Readiness conditions.
pub const CONFIG_CONDITION: &str = "cni-config";
pub const BINARY_CONDITION: &str = "cni-binary";
const RESYNC: Duration = Duration::from_secs(30);
/// Lets a burst of events (a file written in several steps) end before looking.
const SETTLE: Duration = Duration::from_millis(20);

/// Holds readiness at once (before the agent reports ready), then returns the installer's
/// loop, which runs until `stop` and leaves the entry and binary in place when it ends.
pub fn start(
    installer: Installer,
    readiness: Arc<Readiness>,
    stop: watch::Receiver<bool>,
) -> impl std::future::Future<Output = io::Result<()>> + Send + 'static {
    readiness.block(CONFIG_CONDITION, "the CNI installer has not run yet");
    run(installer, readiness, stop)
}

async fn run(
    installer: Installer,
    readiness: Arc<Readiness>,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut keeper = Keeper::new(installer, Arc::clone(&readiness));
    let mut dirs: Option<DirWatch> = None;
    loop {
        if dirs.is_none() {
            dirs = match DirWatch::new(&keeper.installer) {
                Ok(d) => Some(d),
                Err(e) => {
                    keeper.problem(
                        CONFIG_CONDITION,
                        format!("watching the CNI directories: {e}"),
                    );
                    None
                }
            };
        }
        let now = Instant::now();
        let (k, wait) = tokio::task::spawn_blocking(move || {
            let wait = keeper.pass(now);
            (keeper, wait)
        })
        .await
        .map_err(io::Error::other)?;
        keeper = k;
        let deadline = tokio::time::Instant::now() + wait.unwrap_or(RESYNC);
        tokio::select! {
            _ = crate::shutdown::stopped(&mut stop) => return Ok(()),
            _ = tokio::time::sleep_until(deadline) => {}
            changed = next_change(&mut dirs) => {
                if !changed {
                    // A directory was removed or replaced, or events were lost: watch anew.
                    dirs = None;
                }
                tokio::time::sleep(SETTLE).await;
                if let Some(d) = &mut dirs
                    && !d.drain()
                {
                    dirs = None;
                }
            }
        }
    }
}

/// The installer's state across passes.
struct Keeper {
    installer: Installer,
    readiness: Arc<Readiness>,
    throttle: Throttle,
    /// The config we last saw chained: a later pass that must write again is a restoration.
    chained: Option<PathBuf>,
    binary_installed: bool,
    /// Last problem logged per condition, so a problem is logged once, not every pass.
    problems: [(&'static str, Option<String>); 2],
}

impl Keeper {
    fn new(installer: Installer, readiness: Arc<Readiness>) -> Self {
        Keeper {
            installer,
            readiness,
            throttle: Throttle::default(),
            chained: None,
            binary_installed: false,
            problems: [(CONFIG_CONDITION, None), (BINARY_CONDITION, None)],
        }
    }

    fn problem(&mut self, condition: &'static str, msg: String) {
        self.readiness.block(condition, msg.clone());
        for (c, last) in &mut self.problems {
            if *c == condition && last.as_deref() != Some(msg.as_str()) {
                warn!(condition, "{msg}");
                *last = Some(msg.clone());
            }
        }
    }

    fn ok(&mut self, condition: &'static str) {
        self.readiness.clear(condition);
        for (c, last) in &mut self.problems {
            if *c == condition && last.take().is_some() {
                info!(condition, "resolved");
            }
        }
    }

    /// One pass: binary, then config. Returns when to look again if sooner than usual.
    fn pass(&mut self, now: Instant) -> Option<Duration> {
        if let Err(e) = self.installer.ensure_dirs() {
            self.problem(CONFIG_CONDITION, e.to_string());
            return None;
        }
        match self.installer.install_binary() {
            Ok(wrote) => {
                if wrote && self.binary_installed {
                    warn!(path = %self.installer.binary().display(), "the sluice-cni binary was removed or changed by someone else; installed it again");
                } else if wrote {
                    info!(path = %self.installer.binary().display(), "installed the sluice-cni binary");
                }
                self.binary_installed = true;
                self.ok(BINARY_CONDITION);
            }
            Err(e) => self.problem(
                BINARY_CONDITION,
                format!("installing the plugin binary: {e}"),
            ),
        }
        let plan = match self.installer.plan() {
            Ok(p) => p,
            Err(e) => {
                self.problem(CONFIG_CONDITION, e.to_string());
                return None;
            }
        };
        match plan {
            Plan::NoConfig => {
                let msg = format!(
                    "no CNI network configuration in {} yet: waiting for the primary CNI to write one",
                    self.installer.conf_dir().display()
                );
                self.problem(CONFIG_CONDITION, msg);
                None
            }
            Plan::Chained(path) => {
                if self.chained.as_ref() != Some(&path) {
                    info!(config = %path.display(), "sluice-cni is chained");
                }
                self.chained = Some(path);
                self.ok(CONFIG_CONDITION);
                None
            }
            Plan::Write {
                ref source,
                had_entry,
                ..
            } => {
                let restoring = self.chained.is_some();
                if restoring && let Some(delay) = self.throttle.delay(now) {
                    let msg = format!(
                        "{} lacks the sluice-cni entry; throttled, restoring it {:.0} s after the last time: it was taken away {} times in the last {} s (something keeps rewriting the file, most likely the primary CNI)",
                        source.display(),
                        self.throttle.gap().unwrap_or(delay).as_secs_f64(),
                        self.throttle.recent(),
                        self.throttle.window().as_secs()
                    );
                    self.problem(CONFIG_CONDITION, msg);
                    return Some(delay);
                }
                let what = self.what_happened(source, had_entry);
                self.readiness.block(
                    CONFIG_CONDITION,
                    format!(
                        "{} lacks the sluice-cni entry; restoring it",
                        source.display()
                    ),
                );
                match self.installer.apply(&plan) {
                    Ok(target) => {
                        let target = target.unwrap_or_else(|| source.clone());
                        if restoring {
                            self.throttle.record(now);
                            let n = self.throttle.recent();
                            let window = self.throttle.window().as_secs();
                            if n > 1 {
                                warn!(config = %target.display(), restorations = n, "restored the sluice-cni entry: {what} ({n} times in the last {window} s)");
                            } else {
                                info!(config = %target.display(), "restored the sluice-cni entry: {what}");
                            }
                        } else {
                            info!(config = %target.display(), "chained sluice-cni into the CNI configuration");
                        }
                        self.chained = Some(target);
                        self.ok(CONFIG_CONDITION);
                    }
                    Err(e) => {
                        error!("{e}");
                        self.problem(CONFIG_CONDITION, e.to_string());
                    }
                }
                None
            }
        }
    }

    /// Who took the entry away, as far as the directory tells.
    fn what_happened(&self, source: &std::path::Path, had_entry: bool) -> String {
        match &self.chained {
            Some(prev) if prev != source && !prev.exists() => format!(
                "{} was removed and {} now ranks first",
                prev.display(),
                source.display()
            ),
            Some(prev) if prev != source => format!(
                "a new configuration {} ranks before {}",
                source.display(),
                prev.display()
            ),
            _ if had_entry => format!(
                "{} was rewritten with a different sluice-cni entry",
                source.display()
            ),
            _ => format!(
                "{} was rewritten without the sluice-cni entry",
                source.display()
            ),
        }
    }
}

/// Waits for a change in either directory. `false`: the watch is broken (a directory went
/// away, events were lost) and must be set up again. Never returns without a watch.
async fn next_change(dirs: &mut Option<DirWatch>) -> bool {
    match dirs {
        Some(d) => d.changed().await,
        None => std::future::pending().await,
    }
}

/// Events after which the watch no longer sees the directory, or missed changes.
const BROKEN: AddWatchFlags = AddWatchFlags::IN_IGNORED
    .union(AddWatchFlags::IN_Q_OVERFLOW)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF);

struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// inotify on the config directory (any change) and the binary directory (our file only).
struct DirWatch {
    fd: AsyncFd<InotifyFd>,
    bin_wd: WatchDescriptor,
}

impl DirWatch {
    fn new(installer: &Installer) -> io::Result<Self> {
        installer.ensure_dirs().map_err(io::Error::other)?;
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let flags = AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF;
        ino.add_watch(installer.conf_dir(), flags)?;
        let bin_wd = ino.add_watch(installer.bin_dir(), flags)?;
        // SAFETY: the InotifyFd owns its fd for as long as the AsyncFd lives.
        let fd = unsafe { AsyncFd::register(InotifyFd(ino)) }.map_err(|e| e.into_parts().1)?;
        Ok(DirWatch { fd, bin_wd })
    }

    async fn changed(&mut self) -> bool {
        loop {
            let Ok(mut guard) = self.fd.readable().await else {
                return false;
            };
            match guard.get_inner().0.read_events() {
                Ok(events) => {
                    let mut relevant = false;
                    for e in events {
                        if e.mask.intersects(BROKEN) {
                            return false;
                        }
                        let ours = e
                            .name
                            .as_ref()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n == PLUGIN_TYPE);
                        relevant |= e.wd != self.bin_wd || ours;
                    }
                    if relevant {
                        return true;
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(_) => return false,
            }
        }
    }

    /// Discards queued events (the pass about to run sees their effect anyway); `false` if
    /// one of them says the watch is broken.
    fn drain(&mut self) -> bool {
        while let Ok(events) = self.fd.get_ref().0.read_events() {
            if events.is_empty() {
                break;
            }
            if events.iter().any(|e| e.mask.intersects(BROKEN)) {
                return false;
            }
        }
        true
    }
}
