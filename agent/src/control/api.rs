//! The control socket's messages: one JSON object per line each way. Used by the CLI
//! (`sluice-agent enroll/unenroll/status`) and the CNI plugin, which must stay tiny (std only).
use std::{net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::zds::AckState;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Enroll(EnrollRequest),
    Unenroll {
        uid: String,
    },
    Status,
    /// Stop the agent gracefully (as SIGTERM does); redirection stays in place.
    Shutdown,
    Ping,
    /// Stream redirect decisions (of one pod, `namespace/name`, if given): one `ok` response,
    /// then one JSON object per line (`crate::trace::TraceLine`) until the client hangs up.
    Trace {
        #[serde(default)]
        pod: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub service_account: String,
    /// Path of the pod's network namespace (`/var/run/netns/...`, `/proc/<pid>/ns/net`).
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
    /// Defaults to the agent's setting (`AMBIENT_DNS_CAPTURE`).
    #[serde(default)]
    pub dns_capture: Option<bool>,
    #[serde(default)]
    pub bypass_inbound: bool,
    /// How long to wait for ztunnel's ACK before answering; `None` uses the agent's default.
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollReply {
    pub uid: String,
    pub netns_cookie: u64,
    /// ztunnel's answer so far: `pending` if it has not acknowledged (yet).
    pub ztunnel: AckState,
    /// The pod was already enrolled (the request was a retry).
    pub already_enrolled: bool,
    /// Microseconds the agent spent enrolling (dataplane and state, not waiting for ztunnel):
    /// the per-request value behind the `sluice_enroll_duration_seconds` histogram.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enroll_us: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl Response {
    pub fn ok(result: impl Serialize) -> Self {
        match serde_json::to_value(result) {
            Ok(v) => Response {
                ok: true,
                error: None,
                result: Some(v),
            },
            Err(e) => Response::err(format!("encoding the result: {e}")),
        }
    }

    pub fn err(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(msg.into()),
            result: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_json_shape() {
        let req: Request = serde_json::from_str(
            r#"{"op":"enroll","uid":"u","name":"n","namespace":"ns","netns":"/run/netns/p","ips":["10.0.0.1","fd00::1"]}"#,
        )
        .unwrap();
        let Request::Enroll(e) = req else {
            panic!("not an enroll")
        };
        assert_eq!(e.ips.len(), 2);
        assert_eq!(e.dns_capture, None);
        assert!(!e.bypass_inbound);
        assert_eq!(
            serde_json::to_string(&Request::Unenroll { uid: "u".into() }).unwrap(),
            r#"{"op":"unenroll","uid":"u"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"op":"status"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
    }
}
