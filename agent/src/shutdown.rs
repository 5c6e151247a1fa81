//! The agent-wide stop signal: a watch channel that flips to `true` once.
use tokio::sync::watch;

/// Resolves once `rx` says stop (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The borrowed value is dropped at once: the future stays Send.
    let _ = rx.wait_for(|stop| *stop).await.is_ok();
}
