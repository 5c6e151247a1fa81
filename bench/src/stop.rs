//! Ctrl-C and SIGTERM set a flag instead of killing the bench, so every guard (namespaces,
//! cgroup, pins, agent, rules) is dropped on the way out. Long loops check [`requested`].
use std::sync::OnceLock;
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use anyhow::{Result, bail};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

pub fn install() -> Result<()> {
    let flag = FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(flag))?;
    }
    Ok(())
}

pub fn requested() -> bool {
    FLAG.get().is_some_and(|f| f.load(Ordering::SeqCst))
}

/// Fails (so that `?` unwinds through the guards) once a stop was requested.
pub fn check() -> Result<()> {
    if requested() {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}
