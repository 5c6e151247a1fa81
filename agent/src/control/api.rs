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
    /// sluice-cni ADD: enroll the pod if it must be (see `policy`).
    CniAdd(CniAddRequest),
    /// sluice-cni CHECK: a pod that must be enrolled is.
    CniCheck(CniAddRequest),
    /// sluice-cni DEL: let go of what ADD enrolled for this container.
    CniDel(CniDelRequest),
    /// sluice-cni GC: let go of CNI enrollments of containers the runtime no longer has.
    CniGc {
        valid_container_ids: Vec<String>,
    },
    /// sluice-cni STATUS.
    CniStatus,
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
    /// The sandbox container whose CNI ADD enrolled the pod (`None`: enrolled by hand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
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

/// A pod as the runtime names it in `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniPod {
    pub namespace: String,
    pub name: String,
    /// `K8S_POD_UID`; some runtimes do not pass it (see `policy::pod_uid`).
    #[serde(default)]
    pub uid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniAddRequest {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    pub pod: CniPod,
    /// The pod's addresses, from prevResult.
    pub ips: Vec<IpAddr>,
    /// The plugin config's `ambient_namespaces`, if it has one.
    #[serde(default)]
    pub ambient_namespaces: Option<Vec<String>>,
    /// The plugin config's `exclude_namespaces`.
    #[serde(default)]
    pub exclude_namespaces: Vec<String>,
    /// How long the plugin waits for the answer; the agent waits for ztunnel less than that.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum CniAddReply {
    /// The pod must not be enrolled: the plugin passes it through.
    Skipped { reason: String },
    /// Redirection is in place (ztunnel may not have acknowledged yet).
    Enrolled(EnrollReply),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniDelRequest {
    pub container_id: String,
    #[serde(default)]
    pub pod: Option<CniPod>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniDelReply {
    /// The uid let go, if this container had enrolled one.
    pub unenrolled: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniGcReply {
    pub unenrolled: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniStatusReply {
    pub ready: bool,
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

    #[test]
    fn cni_requests_have_a_stable_json_shape() {
        let req: Request = serde_json::from_str(
            r#"{"op":"cni_add","container_id":"c","netns":"/var/run/netns/cni-1","ifname":"eth0",
                "pod":{"namespace":"ns","name":"p"},"ips":["10.0.0.1"]}"#,
        )
        .unwrap();
        let Request::CniAdd(a) = req else {
            panic!("not a cni_add")
        };
        assert_eq!(a.pod.uid, None);
        assert_eq!(a.ambient_namespaces, None);
        assert_eq!(
            serde_json::to_string(&Request::CniGc {
                valid_container_ids: vec!["a".into()]
            })
            .unwrap(),
            r#"{"op":"cni_gc","valid_container_ids":["a"]}"#
        );
        let skipped = CniAddReply::Skipped { reason: "r".into() };
        assert_eq!(
            serde_json::to_string(&skipped).unwrap(),
            r#"{"outcome":"skipped","reason":"r"}"#
        );
    }
}
