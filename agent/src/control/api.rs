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
            // A `null` result is sent as none, which is how it reads back.
            Ok(v) => Response {
                ok: true,
                error: None,
                result: (!v.is_null()).then_some(v),
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

/// Reads one request line. Pure, so it can be fuzzed: whatever it rejects is an `Err` whose
/// text goes back to the client.
pub fn decode_request(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))
}

/// Reads one response line (the client's side).
pub fn decode_response(line: &[u8]) -> Result<Response, serde_json::Error> {
    serde_json::from_slice(line)
}

/// One message as a line on the socket, either way.
pub fn encode_line(msg: &impl Serialize) -> Result<Vec<u8>, serde_json::Error> {
    let mut line = serde_json::to_vec(msg)?;
    line.push(b'\n');
    Ok(line)
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

#[cfg(test)]
mod round_trips {
    //! Every message encodes to a line that decodes to the same message.
    use proptest::prelude::*;

    use super::*;

    fn text() -> impl Strategy<Value = String> {
        "\\PC{0,12}"
    }

    fn enroll() -> impl Strategy<Value = EnrollRequest> {
        (
            (text(), text(), text(), text(), text()),
            prop::collection::vec(any::<IpAddr>(), 0..4),
            (
                any::<Option<bool>>(),
                any::<bool>(),
                any::<Option<u64>>(),
                prop::option::of(text()),
            ),
        )
            .prop_map(
                |(
                    (uid, name, namespace, service_account, netns),
                    ips,
                    (dns_capture, bypass_inbound, wait_ms, container_id),
                )| EnrollRequest {
                    uid,
                    name,
                    namespace,
                    service_account,
                    netns: netns.into(),
                    ips,
                    dns_capture,
                    bypass_inbound,
                    wait_ms,
                    container_id,
                },
            )
    }

    fn pod() -> impl Strategy<Value = CniPod> {
        (text(), text(), prop::option::of(text())).prop_map(|(namespace, name, uid)| CniPod {
            namespace,
            name,
            uid,
        })
    }

    fn cni_add() -> impl Strategy<Value = CniAddRequest> {
        (
            (text(), text(), text(), pod()),
            prop::collection::vec(any::<IpAddr>(), 0..4),
            prop::option::of(prop::collection::vec(text(), 0..3)),
            prop::collection::vec(text(), 0..3),
            any::<Option<u64>>(),
        )
            .prop_map(
                |(
                    (container_id, netns, ifname, pod),
                    ips,
                    ambient_namespaces,
                    exclude_namespaces,
                    timeout_ms,
                )| CniAddRequest {
                    container_id,
                    netns: netns.into(),
                    ifname,
                    pod,
                    ips,
                    ambient_namespaces,
                    exclude_namespaces,
                    timeout_ms,
                },
            )
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            enroll().prop_map(Request::Enroll),
            text().prop_map(|uid| Request::Unenroll { uid }),
            Just(Request::Status),
            Just(Request::Shutdown),
            Just(Request::Ping),
            prop::option::of(text()).prop_map(|pod| Request::Trace { pod }),
            cni_add().prop_map(Request::CniAdd),
            cni_add().prop_map(Request::CniCheck),
            (text(), prop::option::of(pod())).prop_map(|(container_id, pod)| Request::CniDel(
                CniDelRequest { container_id, pod }
            )),
            prop::collection::vec(text(), 0..4).prop_map(|valid_container_ids| Request::CniGc {
                valid_container_ids
            }),
            Just(Request::CniStatus),
        ]
    }

    fn enroll_reply() -> impl Strategy<Value = EnrollReply> {
        let ack = prop_oneof![
            Just(AckState::Pending),
            Just(AckState::Acked),
            text().prop_map(AckState::Nacked),
        ];
        (
            text(),
            any::<u64>(),
            ack,
            any::<bool>(),
            any::<Option<u64>>(),
        )
            .prop_map(
                |(uid, netns_cookie, ztunnel, already_enrolled, enroll_us)| EnrollReply {
                    uid,
                    netns_cookie,
                    ztunnel,
                    already_enrolled,
                    enroll_us,
                },
            )
    }

    /// A result as the agent sends one: any of the replies, or none.
    fn response() -> impl Strategy<Value = Response> {
        prop_oneof![
            text().prop_map(Response::err),
            Just(Response::ok(())),
            Just(Response::ok("pong")),
            enroll_reply().prop_map(Response::ok),
            enroll_reply().prop_map(|r| Response::ok(CniAddReply::Enrolled(r))),
            text().prop_map(|reason| Response::ok(CniAddReply::Skipped { reason })),
            prop::option::of(text())
                .prop_map(|unenrolled| Response::ok(CniDelReply { unenrolled })),
            prop::collection::vec(text(), 0..3)
                .prop_map(|unenrolled| Response::ok(CniGcReply { unenrolled })),
            any::<bool>().prop_map(|ready| Response::ok(CniStatusReply { ready })),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(req in request()) {
            let line = encode_line(&req).unwrap();
            prop_assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            prop_assert_eq!(decode_request(&line).unwrap(), req);
        }

        #[test]
        fn responses_round_trip(resp in response()) {
            let line = encode_line(&resp).unwrap();
            prop_assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            prop_assert_eq!(decode_response(&line).unwrap(), resp);
        }

        #[test]
        fn enroll_replies_round_trip(reply in enroll_reply()) {
            let resp = decode_response(&encode_line(&Response::ok(&reply)).unwrap()).unwrap();
            let back: EnrollReply = serde_json::from_value(resp.result.unwrap()).unwrap();
            prop_assert_eq!(back, reply);
        }
    }

    /// A number too large for u64 is read as a float, which must read back as itself (found
    /// by fuzzing).
    #[test]
    fn large_numbers_read_back_the_same() {
        let line = br#"{"ok":true,"result":{"enroll_us":1111111111111111111812}}"#;
        let resp = decode_response(line).unwrap();
        assert_eq!(decode_response(&encode_line(&resp).unwrap()).unwrap(), resp);
    }

    #[test]
    fn a_line_that_is_not_utf8_is_a_malformed_request() {
        let err = decode_request(b"{\"op\":\"unenroll\",\"uid\":\"\xff\"}\n").unwrap_err();
        assert!(err.starts_with("malformed request:"), "{err}");
        assert!(err.contains("invalid unicode"), "{err}");
    }
}
