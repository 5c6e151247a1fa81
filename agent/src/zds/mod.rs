//! ZDS, ztunnel's node-agent protocol, server side: ztunnel connects to our SOCK_SEQPACKET
//! socket and we tell it which pod network namespaces to serve.
//!
//! - `proto`: the messages; `wire`: seqpacket sockets with fd passing;
//! - `hub`: connections and workloads (snapshot on connect, Adds to the newest, Dels to all);
//! - `connection`: one connection's request/ack loop; `server`: the accept loop.
pub mod connection;
pub mod hub;
pub mod proto;
pub mod server;
pub mod wire;

use std::sync::Arc;

use crate::netns::Netns;

pub use connection::ConnConfig;
pub use hub::{Hub, RetryPolicy};
pub use server::Server;

/// Size of the encoded Add for this workload (ztunnel reads at most 1 KiB).
pub fn add_request_len(uid: &str, info: &proto::WorkloadInfo) -> usize {
    use prost::Message as _;
    let add = proto::AddWorkload {
        uid: uid.to_string(),
        workload_info: Some(info.clone()),
    };
    proto::WorkloadRequest {
        payload: Some(proto::workload_request::Payload::Add(add)),
    }
    .encoded_len()
}

/// What ztunnel needs to serve one pod.
#[derive(Debug, Clone)]
pub struct Workload {
    pub uid: String,
    pub info: proto::WorkloadInfo,
    /// The pod's netns, held open. `None` when it cannot be opened right now (after an agent
    /// restart): ztunnel is then told to keep what it has.
    pub netns: Option<Arc<Netns>>,
}

/// What became of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckResult {
    Acked,
    Nacked(String),
    /// Not sent: no ztunnel connected, the connection closed first, or the request would be
    /// fatal to ztunnel (too large, a Keep after the snapshot).
    NotSent(String),
}

/// ztunnel's view of a workload, as far as the newest connection told us.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "error")]
pub enum AckState {
    Pending,
    Acked,
    Nacked(String),
}
