//! One ztunnel connection: hello, then its queue of requests, one at a time, each waiting for
//! its Ack. Anything unexpected from ztunnel (garbage, an unsolicited message, a missing Ack)
//! ends this connection only; ztunnel reconnects and gets a fresh snapshot.
use std::{os::fd::AsFd, sync::Arc, time::Duration};

use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::{
    AckResult,
    hub::{Hub, Job, JobKind},
    proto::{
        AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version, WorkloadRequest,
        WorkloadResponse, ZdsHello, workload_request::Payload, workload_response,
    },
    wire::SeqPacket,
};
use crate::metrics::Metrics;

/// ztunnel reads requests into a 1 KiB buffer.
pub const MAX_REQUEST: usize = 1024;
/// Responses can be long: a NACK's text may carry a backtrace.
const RESPONSE_BUFFER: usize = 64 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct ConnConfig {
    pub hello_timeout: Duration,
    pub ack_timeout: Duration,
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig {
            hello_timeout: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("ztunnel closed the connection")]
    Closed,
    #[error("no answer from ztunnel within {0:?}")]
    Timeout(Duration),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl ConnError {
    fn kind(&self) -> &'static str {
        match self {
            ConnError::Closed => "closed",
            ConnError::Timeout(_) => "timeout",
            ConnError::Protocol(_) => "protocol",
            ConnError::Io(_) => "io",
        }
    }
}

/// Serves one accepted connection until it ends or `shutdown` flips (between requests, so an
/// in-flight request always gets its answer first).
pub async fn serve(
    sock: SeqPacket,
    hub: Arc<Hub>,
    cfg: ConnConfig,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; RESPONSE_BUFFER];
    if let Err(e) = read_hello(&sock, &mut buf, cfg.hello_timeout).await {
        warn!(error = %e, "dropping ztunnel connection before hello");
        metrics.error(e.kind());
        return;
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = hub.register(tx);
    metrics.ztunnel_connected.inc();
    let mut conn = Connection {
        sock,
        id,
        hub: Arc::clone(&hub),
        cfg,
        metrics: Arc::clone(&metrics),
        snapshot_sent: false,
    };
    let outcome: Result<(), ConnError> = loop {
        tokio::select! {
            biased;
            _ = crate::shutdown::stopped(&mut shutdown) => break Ok(()),
            job = rx.recv() => match job {
                Some(job) => {
                    if let Err(e) = conn.process(job, &mut buf).await {
                        break Err(e);
                    }
                }
                None => break Ok(()),
            },
            ready = conn.sock.readable() => {
                break Err(match ready {
                    Err(e) => e.into(),
                    Ok(()) => match conn.sock.recv(&mut buf).await {
                        Ok(None) => ConnError::Closed,
                        Ok(Some(_)) => ConnError::Protocol("unsolicited message from ztunnel".into()),
                        Err(e) => e.into(),
                    },
                });
            }
        }
    };
    hub.unregister(id);
    metrics.ztunnel_connected.dec();
    // Whoever waits on queued jobs learns they were not sent.
    rx.close();
    while let Ok(job) = rx.try_recv() {
        if let Some(done) = job.done {
            let _ = done.send(AckResult::NotSent("the ztunnel connection closed".into()));
        }
    }
    match outcome {
        Ok(()) => info!(connection = id, "ztunnel connection done"),
        Err(ConnError::Closed) => info!(connection = id, "ztunnel disconnected"),
        Err(e) => {
            warn!(connection = id, error = %e, "dropping ztunnel connection");
            metrics.error(e.kind());
        }
    }
}

async fn read_hello(sock: &SeqPacket, buf: &mut [u8], timeout: Duration) -> Result<(), ConnError> {
    let received = tokio::time::timeout(timeout, sock.recv(buf))
        .await
        .map_err(|_| ConnError::Timeout(timeout))??;
    let r = received.ok_or(ConnError::Closed)?;
    if r.truncated || !r.fds.is_empty() {
        return Err(ConnError::Protocol("malformed hello".into()));
    }
    let hello =
        ZdsHello::decode(&buf[..r.len]).map_err(|e| ConnError::Protocol(format!("hello: {e}")))?;
    if hello.version != Version::V1 as i32 {
        // Newer ztunnels still speak V1 messages; note it and carry on.
        warn!(
            version = hello.version,
            "ztunnel says an unknown ZDS version"
        );
    }
    Ok(())
}

struct Connection {
    sock: SeqPacket,
    id: u64,
    hub: Arc<Hub>,
    cfg: ConnConfig,
    metrics: Arc<Metrics>,
    snapshot_sent: bool,
}

impl Connection {
    async fn process(&mut self, job: Job, buf: &mut [u8]) -> Result<(), ConnError> {
        let Job { kind, done } = job;
        let (result, uid) = match self.send_and_wait(&kind, buf).await {
            Ok(r) => r,
            Err(e) => {
                if let Some(done) = done {
                    let _ = done.send(AckResult::NotSent(e.to_string()));
                }
                return Err(e);
            }
        };
        if let (JobKind::Add { .. }, Some(uid)) = (&kind, &uid) {
            self.hub.on_add_result(self.id, uid, &result);
        }
        if let Some(done) = done {
            let _ = done.send(result);
        }
        Ok(())
    }

    /// Sends one request and waits for its answer. Requests that must not be sent (they would
    /// be fatal to ztunnel) are answered `NotSent` without touching the socket.
    async fn send_and_wait(
        &mut self,
        kind: &JobKind,
        buf: &mut [u8],
    ) -> Result<(AckResult, Option<String>), ConnError> {
        let (payload, fd, what, uid) = match kind {
            JobKind::Add {
                workload,
                in_snapshot,
            } => {
                let uid = Some(workload.uid.clone());
                match (&workload.netns, *in_snapshot && !self.snapshot_sent) {
                    (Some(ns), _) => (
                        Payload::Add(AddWorkload {
                            uid: workload.uid.clone(),
                            workload_info: Some(workload.info.clone()),
                        }),
                        Some(Arc::clone(ns)),
                        "add",
                        uid,
                    ),
                    // Cannot open the netns right now: ztunnel should keep what it has. Only
                    // valid before SnapshotSent.
                    (None, true) => (
                        Payload::Keep(KeepWorkload {
                            uid: workload.uid.clone(),
                        }),
                        None,
                        "keep",
                        uid,
                    ),
                    (None, false) => {
                        return Ok((
                            AckResult::NotSent("the pod's netns cannot be opened".into()),
                            uid,
                        ));
                    }
                }
            }
            JobKind::Del { uid } => (
                Payload::Del(DelWorkload { uid: uid.clone() }),
                None,
                "del",
                None,
            ),
            JobKind::SnapshotSent => {
                if self.snapshot_sent {
                    return Ok((AckResult::NotSent("snapshot already sent".into()), None));
                }
                (
                    Payload::SnapshotSent(SnapshotSent {}),
                    None,
                    "snapshot",
                    None,
                )
            }
        };
        let bytes = WorkloadRequest {
            payload: Some(payload),
        }
        .encode_to_vec();
        if bytes.len() >= MAX_REQUEST {
            self.metrics.zds_request(what, "too_large");
            return Ok((
                AckResult::NotSent(format!(
                    "request of {} bytes exceeds ztunnel's buffer",
                    bytes.len()
                )),
                uid,
            ));
        }
        self.sock
            .send(&bytes, fd.as_ref().map(|ns| ns.as_fd()))
            .await?;
        if what == "snapshot" {
            self.snapshot_sent = true;
        }
        let result = self
            .read_ack(buf)
            .await
            .inspect_err(|e| self.metrics.zds_request(what, e.kind()))?;
        self.metrics.zds_request(
            what,
            if matches!(result, AckResult::Acked) {
                "ack"
            } else {
                "nack"
            },
        );
        debug!(
            connection = self.id,
            what,
            uid = uid.as_deref().unwrap_or(""),
            ?result,
            "ztunnel answered"
        );
        Ok((result, uid))
    }

    async fn read_ack(&self, buf: &mut [u8]) -> Result<AckResult, ConnError> {
        let timeout = self.cfg.ack_timeout;
        let received = tokio::time::timeout(timeout, self.sock.recv(buf))
            .await
            .map_err(|_| ConnError::Timeout(timeout))??;
        let r = received.ok_or(ConnError::Closed)?;
        if r.truncated {
            return Err(ConnError::Protocol("oversized response".into()));
        }
        if !r.fds.is_empty() {
            return Err(ConnError::Protocol(
                "response carried file descriptors".into(),
            ));
        }
        let resp = WorkloadResponse::decode(&buf[..r.len])
            .map_err(|e| ConnError::Protocol(format!("response: {e}")))?;
        match resp.payload {
            Some(workload_response::Payload::Ack(ack)) if ack.error.is_empty() => {
                Ok(AckResult::Acked)
            }
            Some(workload_response::Payload::Ack(ack)) => Ok(AckResult::Nacked(ack.error)),
            None => Err(ConnError::Protocol("response without payload".into())),
        }
    }
}
