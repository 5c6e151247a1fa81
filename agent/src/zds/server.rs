//! The ZDS listening socket and its accept loop.
use std::{path::Path, sync::Arc};

use tokio::sync::watch;
use tracing::{info, warn};

use super::{ConnConfig, Hub, connection, wire::SeqPacketListener};
use crate::metrics::Metrics;

/// ztunnel runs as root on the node; nobody else may talk to us as ztunnel.
const SOCKET_MODE: u32 = 0o600;

pub struct Server {
    listener: SeqPacketListener,
}

impl Server {
    /// Binds the socket (replacing a stale one left by a previous agent).
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        let listener = SeqPacketListener::bind(path, SOCKET_MODE)?;
        info!(path = %path.display(), "ZDS socket listening");
        Ok(Server { listener })
    }

    /// Accepts ztunnel connections until `shutdown`, then waits for every connection to finish
    /// its in-flight request.
    pub async fn run(
        self,
        hub: Arc<Hub>,
        cfg: ConnConfig,
        metrics: Arc<Metrics>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = crate::shutdown::stopped(&mut shutdown) => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(sock) => {
                        tasks.spawn(connection::serve(sock, Arc::clone(&hub), cfg, Arc::clone(&metrics), shutdown.clone()));
                    }
                    Err(e) => {
                        warn!(error = %e, "accepting a ztunnel connection");
                        metrics.error("accept");
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        drop(self.listener);
        while tasks.join_next().await.is_some() {}
    }
}
