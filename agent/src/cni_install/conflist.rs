//! Editing one CNI network configuration: chaining sluice-cni's entry last into it, or taking
//! it out. Pure (bytes in, bytes out); `files` does the I/O.
//!
//! - A `.conf` (one plugin) becomes a conflist whose first plugin is that config, untouched,
//!   as libcni itself converts one (`ConfListFromConf`).
//! - Any sluice-cni entry already there is removed and ours appended last: the plugin must
//!   run after the one that creates the pod's interface and IPs.
//! - Everything else is kept as it was, key order included (serde_json `preserve_order`).
//! - A file we cannot read as a network configuration is an error, and is not rewritten.
use serde_json::{Map, Value};

use crate::cni::{config::PLUGIN_TYPE, spec::Version};

/// A single-plugin config (`.conf`, `.json`) or a plugin list (`.conflist`), as libcni tells
/// them apart: by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Conf,
    ConfList,
}

impl Kind {
    pub fn of(file_name: &str) -> Option<Kind> {
        if file_name.ends_with(".conflist") {
            Some(Kind::ConfList)
        } else if file_name.ends_with(".conf") || file_name.ends_with(".json") {
            Some(Kind::Conf)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfError {
    #[error("not valid JSON: {0}")]
    Malformed(String),
    #[error("not a JSON object")]
    NotAnObject,
    #[error("has no \"plugins\" list")]
    NoPlugins,
    #[error("plugins[{0}] is not an object")]
    BadPlugin(usize),
    #[error("has no cniVersion")]
    NoVersion,
    #[error(
        "uses cniVersion {0:?}, which sluice-cni does not speak (it speaks 0.3.0 to 1.1.0); not chaining into it"
    )]
    Unsupported(String),
    #[error("is sluice-cni's own configuration, not a primary CNI's")]
    OnlyOurs,
}

/// Whether `plugin` is a sluice-cni entry.
fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn parse(bytes: &[u8]) -> Result<Map<String, Value>, ConfError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ConfError::NotAnObject),
        Err(e) => Err(ConfError::Malformed(e.to_string())),
    }
}

fn check_version(obj: &Map<String, Value>) -> Result<(), ConfError> {
    match obj.get("cniVersion").and_then(Value::as_str) {
        None => Err(ConfError::NoVersion),
        Some(v) if Version::parse(v).is_some() => Ok(()),
        Some(v) => Err(ConfError::Unsupported(v.to_string())),
    }
}

/// The config as a plugin list: a conflist's object, or a conf wrapped into one.
fn as_list(kind: Kind, obj: Map<String, Value>) -> Result<Map<String, Value>, ConfError> {
    let list = match kind {
        Kind::ConfList => obj,
        Kind::Conf => {
            if is_ours(&Value::Object(obj.clone())) {
                return Err(ConfError::OnlyOurs);
            }
            let mut list = Map::new();
            for k in ["cniVersion", "name"] {
                if let Some(v) = obj.get(k) {
                    list.insert(k.into(), v.clone());
                }
            }
            list.insert("plugins".into(), Value::Array(vec![Value::Object(obj)]));
            list
        }
    };
    check_version(&list)?;
    match list.get("plugins") {
        Some(Value::Array(plugins)) => {
            if let Some(i) = plugins.iter().position(|p| !p.is_object()) {
                return Err(ConfError::BadPlugin(i));
            }
        }
        _ => return Err(ConfError::NoPlugins),
    }
    Ok(list)
}

fn plugins(list: &mut Map<String, Value>) -> &mut Vec<Value> {
    match list.get_mut("plugins") {
        Some(Value::Array(p)) => p,
        _ => unreachable!("as_list checked plugins"),
    }
}

fn render(list: Map<String, Value>) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(&Value::Object(list)).unwrap_or_default();
    out.push(b'\n');
    out
}

/// The config with `entry` chained last, as a conflist; `None` if it already is exactly that
/// (a conflist ending with `entry` and no other sluice-cni entry).
pub fn chain(kind: Kind, bytes: &[u8], entry: &Value) -> Result<Option<Vec<u8>>, ConfError> {
    let mut list = as_list(kind, parse(bytes)?)?;
    let plugins = plugins(&mut list);
    let ours = plugins.iter().filter(|p| is_ours(p)).count();
    if kind == Kind::ConfList && ours == 1 && plugins.last() == Some(entry) {
        return Ok(None);
    }
    plugins.retain(|p| !is_ours(p));
    if plugins.is_empty() {
        return Err(ConfError::OnlyOurs);
    }
    plugins.push(entry.clone());
    Ok(Some(render(list)))
}

/// Whether the config chains `entry` last already.
pub fn is_chained(kind: Kind, bytes: &[u8], entry: &Value) -> bool {
    matches!(chain(kind, bytes, entry), Ok(None))
}

/// Whether the config has any sluice-cni entry.
pub fn has_any_entry(kind: Kind, bytes: &[u8]) -> bool {
    parse(bytes)
        .and_then(|o| as_list(kind, o))
        .map(|mut l| plugins(&mut l).iter().any(is_ours))
        .unwrap_or(false)
}

/// The conflist without any sluice-cni entry; `None` if it had none (or is not a conflist).
pub fn unchain(kind: Kind, bytes: &[u8]) -> Result<Option<Vec<u8>>, ConfError> {
    if kind != Kind::ConfList {
        return Ok(None);
    }
    let mut list = as_list(kind, parse(bytes)?)?;
    let plugins = plugins(&mut list);
    let before = plugins.len();
    plugins.retain(|p| !is_ours(p));
    if plugins.len() == before {
        return Ok(None);
    }
    Ok(Some(render(list)))
}

#[cfg(test)]
mod tests {
    //! Golden files: `testdata/<case>.in` is the primary CNI's file, `<case>.out` what the
    //! installer must write (`UPDATE_GOLDEN=1` rewrites the `.out` files).
    use std::path::Path;

    use serde_json::json;

    use super::*;

    fn entry() -> Value {
        json!({
            "type": "sluice-cni",
            "agent_socket": "/var/run/sluice/agent.sock",
            "timeout_ms": 15000,
            "log_level": "info",
            "exclude_namespaces": ["kube-system"],
            "ambient_namespaces": ["demo"]
        })
    }

    /// The golden files are compiled in, so the test binary runs anywhere (the VM suite too).
    macro_rules! golden {
        ($case:literal, $kind:expr) => {
            golden(
                $case,
                $kind,
                include_bytes!(concat!("testdata/", $case, ".in")),
                include_str!(concat!("testdata/", $case, ".out")),
            )
        };
    }

    fn golden(case: &str, kind: Kind, input: &[u8], want: &str) {
        let got = chain(kind, input, &entry())
            .unwrap_or_else(|e| panic!("{case}: {e}"))
            .unwrap_or_else(|| panic!("{case}: unchanged"));
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cni_install/testdata");
            std::fs::write(dir.join(format!("{case}.out")), &got).unwrap();
            return;
        }
        assert_eq!(String::from_utf8(got.clone()).unwrap(), want, "{case}");
        // Chaining the result again changes nothing; unchaining gives the foreign plugins back.
        assert_eq!(chain(Kind::ConfList, &got, &entry()), Ok(None), "{case}");
        let back: Value =
            serde_json::from_slice(&unchain(Kind::ConfList, &got).unwrap().unwrap()).unwrap();
        let plugins = back["plugins"].as_array().unwrap();
        assert!(plugins.iter().all(|p| !is_ours(p)), "{case}");
    }

    #[test]
    fn a_conf_becomes_a_conflist_around_it() {
        golden!("bridge-conf", Kind::Conf);
    }

    #[test]
    fn appended_last_to_a_conflist_with_foreign_plugins_untouched() {
        golden!("calico-conflist", Kind::ConfList);
    }

    #[test]
    fn an_old_entry_is_replaced_and_ours_goes_last() {
        golden!("stale-entry-conflist", Kind::ConfList);
    }

    #[test]
    fn a_0_3_1_flannel_conflist_is_chained() {
        golden!("flannel-conflist", Kind::ConfList);
    }

    #[test]
    fn what_cannot_be_chained_is_an_error() {
        let e = entry();
        for (kind, bytes, want) in [
            (Kind::ConfList, &b"{\"plugins\": ["[..], "not valid JSON"),
            (Kind::ConfList, b"[]", "not a JSON object"),
            (
                Kind::ConfList,
                br#"{"cniVersion":"1.0.0","name":"x"}"#,
                "plugins",
            ),
            (
                Kind::ConfList,
                br#"{"cniVersion":"1.0.0","plugins":[1]}"#,
                "plugins[0]",
            ),
            (
                Kind::ConfList,
                br#"{"plugins":[{"type":"bridge"}]}"#,
                "no cniVersion",
            ),
            (
                Kind::Conf,
                br#"{"cniVersion":"0.2.0","type":"bridge"}"#,
                "0.2.0",
            ),
            (
                Kind::ConfList,
                br#"{"cniVersion":"1.3.0","plugins":[{"type":"bridge"}]}"#,
                "1.3.0",
            ),
            (
                Kind::Conf,
                br#"{"cniVersion":"1.0.0","type":"sluice-cni"}"#,
                "own",
            ),
            (
                Kind::ConfList,
                br#"{"cniVersion":"1.0.0","plugins":[{"type":"sluice-cni"}]}"#,
                "own",
            ),
        ] {
            let err = chain(kind, bytes, &e).unwrap_err();
            assert!(err.to_string().contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn an_entry_with_other_options_is_rewritten() {
        let mut old = entry();
        old["timeout_ms"] = 1.into();
        let file = json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "ptp"}, old]});
        let bytes = file.to_string();
        assert!(!is_chained(Kind::ConfList, bytes.as_bytes(), &entry()));
        assert!(has_any_entry(Kind::ConfList, bytes.as_bytes()));
        let out = chain(Kind::ConfList, bytes.as_bytes(), &entry())
            .unwrap()
            .unwrap();
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(out["plugins"][1], entry());
        assert_eq!(out["plugins"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn kinds_follow_libcni_extensions() {
        assert_eq!(Kind::of("10-x.conflist"), Some(Kind::ConfList));
        assert_eq!(Kind::of("10-x.conf"), Some(Kind::Conf));
        assert_eq!(Kind::of("10-x.json"), Some(Kind::Conf));
        assert_eq!(Kind::of("10-x.conf.bak"), None);
    }
}
