//! The network configuration on stdin: the spec's fields and sluice-cni's own options (its
//! entry in the conflist, which the agent's installer writes).
use std::path::PathBuf;

use serde::Serialize;
use serde_json::{Map, Value};

use super::spec::{CniError, Version, code};

/// Where the agent's control socket is by default (`sluice-agent --control-socket`).
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/sluice/agent.sock";
/// The plugin's `type`, which is also its binary's name.
pub const PLUGIN_TYPE: &str = "sluice-cni";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

impl LogLevel {
    pub fn parse(s: &str) -> Option<LogLevel> {
        Some(match s.to_ascii_lowercase().as_str() {
            "error" => LogLevel::Error,
            "warn" | "warning" => LogLevel::Warn,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
        }
    }
}

/// sluice-cni's options, as keys of its plugin entry (snake_case, as istio-cni's are).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PluginOptions {
    /// The agent's control socket.
    pub agent_socket: PathBuf,
    /// How long one call may wait for the agent (enrollment included), in milliseconds.
    pub timeout_ms: u64,
    pub log_level: LogLevel,
    /// Append log lines here; unset: stderr (the runtime's log).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_file: Option<PathBuf>,
    /// Pods in these namespaces pass straight through, without asking the agent.
    pub exclude_namespaces: Vec<String>,
    /// Namespaces whose pods must be enrolled. When present, the list is complete (standalone
    /// mode): while the agent is unreachable, pods outside it pass and pods in it fail. When
    /// absent, only the agent knows, so every pod outside `exclude_namespaces` fails while the
    /// agent is unreachable (fail closed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ambient_namespaces: Option<Vec<String>>,
}

impl Default for PluginOptions {
    fn default() -> Self {
        PluginOptions {
            agent_socket: DEFAULT_AGENT_SOCKET.into(),
            timeout_ms: 15_000,
            log_level: LogLevel::Info,
            log_file: None,
            exclude_namespaces: vec!["kube-system".into()],
            ambient_namespaces: None,
        }
    }
}

/// One entry of `cni.dev/valid-attachments` (GC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

/// What stdin said.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub version: Version,
    pub name: Option<String>,
    pub prev_result: Option<Value>,
    pub options: PluginOptions,
    /// GC only.
    pub valid_attachments: Option<Vec<Attachment>>,
}

impl NetConf {
    /// Parses the network configuration. A bad option is an error naming it, never a default.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let obj = object(stdin)?;
        let version = version_of(&obj)?.ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "the network configuration has no cniVersion",
            )
        })?;
        let name = match obj.get("name") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => return Err(bad_field("name", "a string", other)),
        };
        let prev_result = match obj.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(other) => return Err(bad_field("prevResult", "an object", other)),
        };
        let valid_attachments = match obj.get("cni.dev/valid-attachments") {
            None | Some(Value::Null) => None,
            Some(v) => Some(attachments(v)?),
        };
        Ok(NetConf {
            version,
            name,
            prev_result,
            options: options(&obj)?,
            valid_attachments,
        })
    }
}

/// The requested version for VERSION: `None` when stdin does not name one.
pub fn requested_version(stdin: &[u8]) -> Result<Option<Version>, CniError> {
    if stdin.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    version_of(&object(stdin)?)
}

fn object(stdin: &[u8]) -> Result<Map<String, Value>, CniError> {
    match serde_json::from_slice::<Value>(stdin) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(CniError::new(
            code::DECODE,
            "the network configuration on stdin is not a JSON object",
        )),
        Err(e) => Err(CniError::new(
            code::DECODE,
            "the network configuration on stdin is not valid JSON",
        )
        .with_details(e.to_string())),
    }
}

fn version_of(obj: &Map<String, Value>) -> Result<Option<Version>, CniError> {
    match obj.get("cniVersion") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Version::parse(s).map(Some).ok_or_else(|| {
            CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "cniVersion {s:?} is not supported; sluice-cni speaks {}",
                    Version::ALL.map(Version::as_str).join(", ")
                ),
            )
        }),
        Some(other) => Err(bad_field("cniVersion", "a string", other)),
    }
}

fn options(obj: &Map<String, Value>) -> Result<PluginOptions, CniError> {
    let mut o = PluginOptions::default();
    if let Some(v) = present(obj, "agent_socket") {
        let s = string(v, "agent_socket", "an absolute path")?;
        if !s.starts_with('/') {
            return Err(bad_field("agent_socket", "an absolute path", v));
        }
        o.agent_socket = s.into();
    }
    if let Some(v) = present(obj, "timeout_ms") {
        o.timeout_ms = v
            .as_u64()
            .filter(|&ms| ms > 0)
            .ok_or_else(|| bad_field("timeout_ms", "a positive integer (milliseconds)", v))?;
    }
    if let Some(v) = present(obj, "log_level") {
        let s = string(v, "log_level", "error, warn, info or debug")?;
        o.log_level = LogLevel::parse(&s)
            .ok_or_else(|| bad_field("log_level", "error, warn, info or debug", v))?;
    }
    if let Some(v) = present(obj, "log_file") {
        let s = string(v, "log_file", "an absolute path")?;
        if !s.starts_with('/') {
            return Err(bad_field("log_file", "an absolute path", v));
        }
        o.log_file = Some(s.into());
    }
    if let Some(v) = present(obj, "exclude_namespaces") {
        o.exclude_namespaces = strings(v, "exclude_namespaces")?;
    }
    if let Some(v) = present(obj, "ambient_namespaces") {
        o.ambient_namespaces = Some(strings(v, "ambient_namespaces")?);
    }
    Ok(o)
}

fn present<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn string(v: &Value, field: &str, expected: &str) -> Result<String, CniError> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| bad_field(field, expected, v))
}

fn strings(v: &Value, field: &str) -> Result<Vec<String>, CniError> {
    let expected = "a list of namespace names";
    v.as_array()
        .ok_or_else(|| bad_field(field, expected, v))?
        .iter()
        .map(|s| string(s, field, expected))
        .collect()
}

fn attachments(v: &Value) -> Result<Vec<Attachment>, CniError> {
    let field = "cni.dev/valid-attachments";
    let expected = "a list of {\"containerID\", \"ifname\"} objects";
    v.as_array()
        .ok_or_else(|| bad_field(field, expected, v))?
        .iter()
        .map(|a| {
            let get = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_string);
            match (get("containerID"), get("ifname")) {
                (Some(container_id), Some(ifname)) => Ok(Attachment {
                    container_id,
                    ifname,
                }),
                _ => Err(bad_field(field, expected, a)),
            }
        })
        .collect()
}

fn bad_field(field: &str, expected: &str, got: &Value) -> CniError {
    let mut shown = got.to_string();
    if shown.len() > 80 {
        // Cut on a character boundary: the value may be any UTF-8 (found by fuzzing).
        let mut end = 77;
        while !shown.is_char_boundary(end) {
            end -= 1;
        }
        shown.truncate(end);
        shown.push_str("...");
    }
    CniError::new(
        code::INVALID_CONFIG,
        format!("network configuration: {field} must be {expected}, not {shown}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_and_options_are_read() {
        let c =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"sluice-cni"}"#).unwrap();
        assert_eq!(c.version, Version::V1_0_0);
        assert_eq!(c.options, PluginOptions::default());
        let c = NetConf::parse(
            br#"{"cniVersion":"0.4.0","type":"sluice-cni","agent_socket":"/run/a.sock","timeout_ms":250,
                "log_level":"DEBUG","log_file":"/tmp/x.log","exclude_namespaces":["a"],"ambient_namespaces":[]}"#,
        )
        .unwrap();
        assert_eq!(c.options.agent_socket, PathBuf::from("/run/a.sock"));
        assert_eq!(c.options.timeout_ms, 250);
        assert_eq!(c.options.log_level, LogLevel::Debug);
        assert_eq!(c.options.exclude_namespaces, vec!["a".to_string()]);
        assert_eq!(c.options.ambient_namespaces, Some(vec![]));
    }

    #[test]
    fn what_the_installer_writes_reads_back_the_same() {
        let o = PluginOptions {
            agent_socket: "/x/agent.sock".into(),
            timeout_ms: 9,
            log_level: LogLevel::Warn,
            log_file: Some("/var/log/s.log".into()),
            exclude_namespaces: vec!["kube-system".into(), "istio-system".into()],
            ambient_namespaces: Some(vec!["demo".into()]),
        };
        let mut v = serde_json::to_value(&o).unwrap();
        v["cniVersion"] = "1.1.0".into();
        let back = NetConf::parse(v.to_string().as_bytes()).unwrap();
        assert_eq!(back.options, o);
    }

    #[test]
    fn bad_input_is_named() {
        for (stdin, code_, needle) in [
            (&b"not json"[..], code::DECODE, "not valid JSON"),
            (b"[1]", code::DECODE, "not a JSON object"),
            (br#"{"name":"x"}"#, code::INVALID_CONFIG, "cniVersion"),
            (
                br#"{"cniVersion":"0.2.0"}"#,
                code::INCOMPATIBLE_VERSION,
                "0.2.0",
            ),
            (br#"{"cniVersion":1}"#, code::INVALID_CONFIG, "cniVersion"),
            (
                br#"{"cniVersion":"1.0.0","timeout_ms":"5"}"#,
                code::INVALID_CONFIG,
                "timeout_ms",
            ),
            (
                br#"{"cniVersion":"1.0.0","timeout_ms":0}"#,
                code::INVALID_CONFIG,
                "timeout_ms",
            ),
            (
                br#"{"cniVersion":"1.0.0","log_level":"loud"}"#,
                code::INVALID_CONFIG,
                "log_level",
            ),
            (
                br#"{"cniVersion":"1.0.0","agent_socket":"rel"}"#,
                code::INVALID_CONFIG,
                "agent_socket",
            ),
            (
                br#"{"cniVersion":"1.0.0","exclude_namespaces":"a"}"#,
                code::INVALID_CONFIG,
                "exclude_namespaces",
            ),
            (
                br#"{"cniVersion":"1.0.0","ambient_namespaces":[1]}"#,
                code::INVALID_CONFIG,
                "ambient_namespaces",
            ),
            (
                br#"{"cniVersion":"1.0.0","prevResult":[]}"#,
                code::INVALID_CONFIG,
                "prevResult",
            ),
            (
                br#"{"cniVersion":"1.1.0","cni.dev/valid-attachments":[{"ifname":"eth0"}]}"#,
                code::INVALID_CONFIG,
                "valid-attachments",
            ),
        ] {
            let err = NetConf::parse(stdin).unwrap_err();
            assert_eq!(err.code, code_, "{err}");
            assert!(err.msg.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn a_long_bad_value_is_cut_on_a_character_boundary() {
        // 'a' then two-byte characters: byte 77 of the quoted value falls inside one.
        let value = format!("a{}", "é".repeat(50));
        let stdin = serde_json::json!({"cniVersion": "1.0.0", "timeout_ms": value}).to_string();
        let err = NetConf::parse(stdin.as_bytes()).unwrap_err();
        assert_eq!(err.code, code::INVALID_CONFIG);
        assert!(err.msg.contains("timeout_ms"), "{err}");
        assert!(err.msg.ends_with("..."), "{err}");
    }

    #[test]
    fn gc_attachments_are_read() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.1.0","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.valid_attachments,
            Some(vec![Attachment {
                container_id: "a".into(),
                ifname: "eth0".into()
            }])
        );
    }

    #[test]
    fn version_requests_may_be_empty() {
        assert_eq!(requested_version(b"").unwrap(), None);
        assert_eq!(requested_version(b"{}").unwrap(), None);
        assert_eq!(
            requested_version(br#"{"cniVersion":"0.4.0"}"#).unwrap(),
            Some(Version::V0_4_0)
        );
    }
}
