//! What the peer reports. One [`Event`] per observable step, so tests can assert on
//! exactly what ztunnel would have seen (original destination, client address, ...).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::sockets::OrigDstFrom;

/// One peer event. Serialises to a flat JSON object: `{"event":"<kind>", ...fields,
/// "netns":"<tag>", "uid":"<uid>"}`; `netns` and `uid` are present only when the
/// listener set was started with them (see [`super::Labels`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    #[serde(flatten)]
    pub kind: EventKind,
    /// Which workload / network namespace the listener set belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// The ZDS workload uid the listener set serves (ZDS mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// Every listener is bound; connections made from now on are accepted.
    Ready,
    /// A connection accepted on 15001.
    Outbound(Accepted),
    OutboundConnected(Connected),
    OutboundFailed(Failed),
    /// A connection accepted on 15006.
    Inbound(Accepted),
    InboundConnected(Connected),
    InboundFailed(Failed),
    /// A connection accepted on 15008.
    Hbone {
        peer: SocketAddr,
        local: SocketAddr,
    },
    /// After `CONNECT <target>`: `orig_dst` is the target.
    HboneConnected(Connected),
    HboneFailed(Failed),
    /// A datagram received on 15053/udp (answered right away).
    DnsUdp {
        peer: SocketAddr,
        local: SocketAddr,
        len: usize,
    },
    /// A connection accepted on 15053/tcp.
    DnsTcp(Accepted),
    /// Something went wrong outside any single connection (e.g. accept failed).
    Error {
        context: String,
        error: String,
    },
}

/// An accepted connection and the original destination the peer derived for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Accepted {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub orig_dst: SocketAddr,
    pub orig_dst_from: OrigDstFrom,
}

/// The peer reached `orig_dst` for client `peer`; `upstream_local` is the upstream
/// socket's own address (the client's IP for inbound/HBONE, which use it as source).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Connected {
    pub peer: SocketAddr,
    pub orig_dst: SocketAddr,
    pub upstream_local: SocketAddr,
}

/// The peer could not reach `orig_dst` for client `peer`; the client is closed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failed {
    pub peer: SocketAddr,
    pub orig_dst: SocketAddr,
    pub errno: Option<i32>,
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_flat_with_optional_tag() {
        let ev = Event {
            kind: EventKind::Outbound(Accepted {
                peer: "10.77.0.2:40000".parse().unwrap(),
                local: "10.77.1.2:15001".parse().unwrap(),
                orig_dst: "10.77.1.2:8080".parse().unwrap(),
                orig_dst_from: OrigDstFrom::SolIp,
            }),
            netns: None,
            uid: None,
        };
        let json = serde_json::to_string(&ev).unwrap();
        assert_eq!(
            json,
            r#"{"event":"outbound","peer":"10.77.0.2:40000","local":"10.77.1.2:15001","orig_dst":"10.77.1.2:8080","orig_dst_from":"sol_ip"}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), ev);

        let ready = Event {
            kind: EventKind::Ready,
            netns: Some("pod-a".into()),
            uid: Some("uid-1".into()),
        };
        let json = serde_json::to_string(&ready).unwrap();
        assert_eq!(json, r#"{"event":"ready","netns":"pod-a","uid":"uid-1"}"#);
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), ready);
    }
}
