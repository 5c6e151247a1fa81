//! The plugin's logic against a scripted agent, for each command and version. The binary
//! against the real agent and a real runtime is tested in `tests/tests/cni_*.rs`.
use serde_json::json;

use super::*;
use crate::{cni::config::LogLevel, control::api::EnrollReply, zds::AckState};

/// Answers every call with `answer` and records what was asked.
struct Scripted {
    answer: Result<Value, AgentCallError>,
    calls: Vec<Request>,
}

impl Scripted {
    fn new(answer: Result<Value, AgentCallError>) -> Self {
        Scripted {
            answer,
            calls: vec![],
        }
    }

    fn enrolled() -> Self {
        Self::new(Ok(serde_json::to_value(CniAddReply::Enrolled(
            EnrollReply {
                uid: "u".into(),
                netns_cookie: 1,
                ztunnel: AckState::Pending,
                already_enrolled: false,
                enroll_us: None,
            },
        ))
        .unwrap()))
    }

    fn down() -> Self {
        Self::new(Err(AgentCallError::Unreachable("ENOENT".into())))
    }
}

impl AgentLink for Scripted {
    fn call(&mut self, req: &Request, _timeout: Duration) -> Result<Value, AgentCallError> {
        self.calls.push(req.clone());
        self.answer.clone()
    }
}

fn env(command: &str, ns: &str) -> EnvVars {
    [
        ("CNI_COMMAND", command.to_string()),
        ("CNI_CONTAINERID", "c0ffee".into()),
        ("CNI_NETNS", "/var/run/netns/cni-1".into()),
        ("CNI_IFNAME", "eth0".into()),
        (
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME=web;K8S_POD_UID=uid-1"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn prev(version: Version) -> Value {
    let mut ip = json!({"interface": 1, "address": "10.78.0.5/24", "gateway": "10.78.0.1"});
    if version.ips_have_version() {
        ip["version"] = "4".into();
    }
    json!({
        "cniVersion": version.as_str(),
        "interfaces": [{"name": "veth1"}, {"name": "eth0", "sandbox": "/var/run/netns/cni-1"}],
        "ips": [ip],
        "dns": {}
    })
}

fn conf(version: Version, extra: Value) -> Vec<u8> {
    let mut c = json!({
        "cniVersion": version.as_str(),
        "name": "k8s-pod-network",
        "type": "sluice-cni",
        "prevResult": prev(version),
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c.to_string().into_bytes()
}

fn run(stdin: &[u8], vars: &EnvVars, agent: &mut Scripted) -> Result<Option<String>, CniError> {
    let inv = Invocation::parse(stdin, vars).map_err(|r| r.error)?;
    let mut quiet = Logger::new(LogLevel::Error, Some(Path::new("/dev/null")));
    execute(&inv, agent, &mut quiet)
}

#[test]
fn version_answers_in_the_requested_version() {
    let vars = [("CNI_COMMAND".to_string(), "VERSION".to_string())].into();
    for v in Version::ALL {
        let stdin = json!({"cniVersion": v.as_str()}).to_string();
        let out = run(stdin.as_bytes(), &vars, &mut Scripted::down())
            .unwrap()
            .unwrap();
        let out: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(out["cniVersion"], v.as_str());
        assert_eq!(out["supportedVersions"].as_array().unwrap().len(), 5);
    }
    let out = run(b"", &vars, &mut Scripted::down()).unwrap().unwrap();
    assert!(out.contains("\"1.1.0\""), "{out}");
}

#[test]
fn add_prints_prev_result_and_enrolls_in_every_version() {
    for v in Version::ALL {
        let mut agent = Scripted::enrolled();
        let out = run(&conf(v, json!({})), &env("ADD", "mesh"), &mut agent)
            .unwrap()
            .unwrap();
        let out: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(out, prev(v), "{v}");
        let [Request::CniAdd(req)] = &agent.calls[..] else {
            panic!("{:?}", agent.calls)
        };
        assert_eq!(req.container_id, "c0ffee");
        assert_eq!(req.pod.namespace, "mesh");
        assert_eq!(req.pod.uid.as_deref(), Some("uid-1"));
        assert_eq!(
            req.ips,
            vec!["10.78.0.5".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(req.netns, Path::new("/var/run/netns/cni-1"));
    }
}

#[test]
fn add_converts_prev_result_to_the_requested_version() {
    let mut c: Value = serde_json::from_slice(&conf(Version::V0_4_0, json!({}))).unwrap();
    c["prevResult"] = prev(Version::V1_0_0);
    let out = run(
        c.to_string().as_bytes(),
        &env("ADD", "mesh"),
        &mut Scripted::enrolled(),
    )
    .unwrap()
    .unwrap();
    let out: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(out, prev(Version::V0_4_0));
}

#[test]
fn agent_down_fails_pods_that_may_need_enrollment_only() {
    let v = Version::V1_0_0;
    let listed = json!({"ambient_namespaces": ["mesh"]});
    // Listed namespace: fail, code 11, and say what to do.
    let err = run(
        &conf(v, listed.clone()),
        &env("ADD", "mesh"),
        &mut Scripted::down(),
    )
    .unwrap_err();
    assert_eq!(err.code, code::TRY_AGAIN);
    assert!(
        err.msg.contains("mesh/web") && err.msg.contains("sluice-agent"),
        "{err}"
    );
    // Not listed, and the list is complete: pass.
    run(
        &conf(v, listed),
        &env("ADD", "other"),
        &mut Scripted::down(),
    )
    .unwrap();
    // No list: only the agent knows, so fail closed.
    let err = run(
        &conf(v, json!({})),
        &env("ADD", "other"),
        &mut Scripted::down(),
    )
    .unwrap_err();
    assert_eq!(err.code, code::TRY_AGAIN);
    // Excluded: pass without asking.
    let mut agent = Scripted::down();
    run(&conf(v, json!({})), &env("ADD", "kube-system"), &mut agent).unwrap();
    assert!(agent.calls.is_empty());
    // DEL always succeeds.
    assert_eq!(
        run(
            &conf(v, json!({})),
            &env("DEL", "mesh"),
            &mut Scripted::down()
        ),
        Ok(None)
    );
}

#[test]
fn a_slow_or_refusing_agent_fails_add() {
    for e in [
        AgentCallError::NoAnswer("timed out".into()),
        AgentCallError::Refused("netns does not hold the pod's IPs".into()),
    ] {
        let err = run(
            &conf(Version::V1_1_0, json!({"ambient_namespaces": []})),
            &env("ADD", "other"),
            &mut Scripted::new(Err(e.clone())),
        )
        .unwrap_err();
        assert_eq!(err.code, code::TRY_AGAIN, "{e:?}");
    }
}

#[test]
fn skipped_pods_and_non_kubernetes_containers_pass() {
    let mut agent = Scripted::new(Ok(json!({"outcome": "skipped", "reason": "not ambient"})));
    run(
        &conf(Version::V1_0_0, json!({})),
        &env("ADD", "x"),
        &mut agent,
    )
    .unwrap();
    let mut vars = env("ADD", "x");
    vars.remove("CNI_ARGS");
    let mut agent = Scripted::down();
    run(&conf(Version::V1_0_0, json!({})), &vars, &mut agent).unwrap();
    assert!(agent.calls.is_empty());
}

#[test]
fn add_needs_a_prev_result() {
    let mut c: Value = serde_json::from_slice(&conf(Version::V1_0_0, json!({}))).unwrap();
    c.as_object_mut().unwrap().remove("prevResult");
    let err = run(
        c.to_string().as_bytes(),
        &env("ADD", "mesh"),
        &mut Scripted::enrolled(),
    )
    .unwrap_err();
    assert_eq!(err.code, code::INVALID_CONFIG);
    assert!(err.msg.contains("chained"), "{err}");
}

#[test]
fn commands_are_checked_against_the_version() {
    for (cmd, v) in [
        ("CHECK", Version::V0_3_1),
        ("STATUS", Version::V1_0_0),
        ("GC", Version::V0_4_0),
    ] {
        let err = run(
            &conf(v, json!({})),
            &env(cmd, "mesh"),
            &mut Scripted::enrolled(),
        )
        .unwrap_err();
        assert_eq!(err.code, code::INCOMPATIBLE_VERSION, "{cmd} {v}");
    }
    for v in [Version::V0_4_0, Version::V1_0_0, Version::V1_1_0] {
        assert_eq!(
            run(
                &conf(v, json!({})),
                &env("CHECK", "mesh"),
                &mut Scripted::enrolled()
            ),
            Ok(None)
        );
    }
}

#[test]
fn check_reports_a_pod_the_agent_does_not_redirect() {
    let mut agent = Scripted::new(Err(AgentCallError::Refused("not enrolled".into())));
    let err = run(
        &conf(Version::V1_0_0, json!({})),
        &env("CHECK", "mesh"),
        &mut agent,
    )
    .unwrap_err();
    assert_eq!(err.code, code::TRY_AGAIN);
    assert!(matches!(agent.calls[..], [Request::CniCheck(_)]));
}

#[test]
fn status_follows_the_agent() {
    let v = Version::V1_1_0;
    let vars = [("CNI_COMMAND".to_string(), "STATUS".to_string())].into();
    let mut ready = Scripted::new(Ok(json!({"ready": true})));
    assert_eq!(run(&conf(v, json!({})), &vars, &mut ready), Ok(None));
    for mut agent in [Scripted::new(Ok(json!({"ready": false}))), Scripted::down()] {
        let err = run(&conf(v, json!({})), &vars, &mut agent).unwrap_err();
        assert_eq!(err.code, code::NOT_AVAILABLE);
    }
}

#[test]
fn gc_passes_the_valid_container_ids() {
    let vars = [("CNI_COMMAND".to_string(), "GC".to_string())].into();
    let mut agent = Scripted::new(Ok(json!({"unenrolled": []})));
    let stdin = conf(
        Version::V1_1_0,
        json!({"cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}]}),
    );
    assert_eq!(run(&stdin, &vars, &mut agent), Ok(None));
    assert_eq!(
        agent.calls,
        vec![Request::CniGc {
            valid_container_ids: vec!["a".into()]
        }]
    );
    let err = run(&stdin, &vars, &mut Scripted::down()).unwrap_err();
    assert_eq!(err.code, code::TRY_AGAIN);
}

#[test]
fn garbage_is_an_error_in_the_callers_version() {
    let r = Invocation::parse(b"{\"cniVersion\":\"0.4.0\"}", &EnvVars::new()).unwrap_err();
    assert_eq!(r.error.code, code::INVALID_ENV);
    assert_eq!(r.version, Version::V0_4_0);
    let r = Invocation::parse(b"\xff\xfe", &env("ADD", "mesh")).unwrap_err();
    assert_eq!(r.error.code, code::DECODE);
    assert_eq!(r.version, LATEST);
}
