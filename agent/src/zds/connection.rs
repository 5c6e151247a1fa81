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
    wire::{Received, SeqPacket},
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
    let version = message(&r, buf)
        .and_then(decode_hello)
        .map_err(|e| ConnError::Protocol(format!("hello: {e}")))?;
    if version != Version::V1 as i32 {
        // Newer ztunnels still speak V1 messages; note it and carry on.
        warn!(version, "ztunnel says an unknown ZDS version");
    }
    Ok(())
}

/// The bytes of a packet from ztunnel, which never sends one that does not fit our buffer or
/// that carries file descriptors.
pub fn message<'a>(r: &Received, buf: &'a [u8]) -> Result<&'a [u8], String> {
    if r.truncated {
        return Err("oversized message".into());
    }
    if !r.fds.is_empty() {
        return Err("message carried file descriptors".into());
    }
    buf.get(..r.len)
        .ok_or_else(|| format!("message of {} bytes in a {}-byte buffer", r.len, buf.len()))
}

/// ztunnel's hello: the ZDS version it speaks. Pure, so it can be fuzzed.
pub fn decode_hello(msg: &[u8]) -> Result<i32, String> {
    ZdsHello::decode(msg)
        .map(|h| h.version)
        .map_err(|e| e.to_string())
}

/// ztunnel's answer to one request. Pure, so it can be fuzzed.
pub fn decode_ack(msg: &[u8]) -> Result<AckResult, String> {
    let resp = WorkloadResponse::decode(msg).map_err(|e| e.to_string())?;
    match resp.payload {
        Some(workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(AckResult::Acked),
        Some(workload_response::Payload::Ack(ack)) => Ok(AckResult::Nacked(ack.error)),
        None => Err("response without payload".into()),
    }
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
        message(&r, buf)
            .and_then(decode_ack)
            .map_err(|e| ConnError::Protocol(format!("response: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::zds::proto::{Ack, WorkloadInfo};

    fn text() -> impl Strategy<Value = String> {
        "\\PC{0,16}"
    }

    fn request() -> impl Strategy<Value = WorkloadRequest> {
        let info = prop::option::of((text(), text(), text()).prop_map(
            |(name, namespace, service_account)| WorkloadInfo {
                name,
                namespace,
                service_account,
            },
        ));
        let payload = prop_oneof![
            (text(), info)
                .prop_map(|(uid, workload_info)| Payload::Add(AddWorkload { uid, workload_info })),
            text().prop_map(|uid| Payload::Del(DelWorkload { uid })),
            text().prop_map(|uid| Payload::Keep(KeepWorkload { uid })),
            Just(Payload::SnapshotSent(SnapshotSent {})),
        ];
        prop::option::of(payload).prop_map(|payload| WorkloadRequest { payload })
    }

    fn ack_bytes(error: &str) -> Vec<u8> {
        WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack {
                error: error.into(),
            })),
        }
        .encode_to_vec()
    }

    proptest! {
        /// What the agent sends, ztunnel (or the test peer) reads back the same.
        #[test]
        fn requests_round_trip(req in request()) {
            let bytes = req.encode_to_vec();
            prop_assert_eq!(WorkloadRequest::decode(bytes.as_slice()).unwrap(), req);
        }

        /// An Ack is an ACK when its error is empty and a NACK carrying that error otherwise.
        #[test]
        fn acks_decode_to_what_ztunnel_meant(error in text()) {
            let want = if error.is_empty() {
                AckResult::Acked
            } else {
                AckResult::Nacked(error.clone())
            };
            prop_assert_eq!(decode_ack(&ack_bytes(&error)).unwrap(), want);
        }

        /// A hello carries its version through, known or not.
        #[test]
        fn hellos_round_trip(version in any::<i32>()) {
            let bytes = ZdsHello { version }.encode_to_vec();
            prop_assert_eq!(decode_hello(&bytes).unwrap(), version);
        }

        /// A cut-off Ack is an error, or (cut before the payload) a response without one.
        #[test]
        fn truncated_acks_are_errors(error in "\\PC{1,16}", cut in 0.0..1.0f64) {
            let bytes = ack_bytes(&error);
            let n = (bytes.len() as f64 * cut) as usize;
            prop_assert!(decode_ack(&bytes[..n]).is_err());
        }
    }

    #[test]
    fn what_does_not_fit_or_carries_fds_is_refused() {
        let buf = ack_bytes("");
        let ok = Received {
            len: buf.len(),
            truncated: false,
            fds: Vec::new(),
        };
        assert_eq!(message(&ok, &buf), Ok(buf.as_slice()));
        let truncated = Received {
            truncated: true,
            ..ok
        };
        assert!(message(&truncated, &buf).unwrap_err().contains("oversized"));
        let fd = std::fs::File::open("/dev/null").unwrap().into();
        let with_fd = Received {
            len: buf.len(),
            truncated: false,
            fds: vec![fd],
        };
        assert!(message(&with_fd, &buf).unwrap_err().contains("descriptors"));
        let past_end = Received {
            len: buf.len() + 1,
            truncated: false,
            fds: Vec::new(),
        };
        assert!(message(&past_end, &buf).is_err());
    }
}
