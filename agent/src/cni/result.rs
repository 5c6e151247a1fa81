//! The result sluice-cni passes on: the prevResult it was given, converted to the version the
//! runtime asked for, and the pod IPs read from it.
//!
//! Results are handled as JSON values, not typed structs, so that whatever the previous plugins
//! put there (fields of newer spec versions, vendor fields) goes through untouched; only what
//! the spec changes between versions is converted:
//! - before 1.0.0, each IP carries `"version": "4"|"6"`; from 1.0.0 it does not;
//! - interface `mtu`, `socketPath` and `pciID` (1.1.0) do not exist before 1.0.0.
use std::net::IpAddr;

use serde_json::Value;

use super::spec::{CniError, Version, code};

/// Interface fields that results before 1.0.0 cannot carry.
const IFACE_FIELDS_SINCE_1_0: [&str; 3] = ["mtu", "socketPath", "pciID"];

/// `prev` in version `to`. A prevResult without `cniVersion` is taken to be `assumed`.
pub fn convert(prev: &Value, assumed: Version, to: Version) -> Result<Value, CniError> {
    let Value::Object(obj) = prev else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "prevResult is not a JSON object",
        ));
    };
    let from = match obj.get("cniVersion") {
        None | Some(Value::Null) => assumed,
        Some(Value::String(s)) => Version::parse(s).ok_or_else(|| {
            CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("prevResult has cniVersion {s:?}, which sluice-cni cannot convert"),
            )
        })?,
        Some(_) => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "prevResult.cniVersion is not a string",
            ));
        }
    };
    let mut out = obj.clone();
    out.insert("cniVersion".into(), Value::String(to.as_str().into()));
    if let Some(Value::Array(ips)) = out.get_mut("ips") {
        for (i, ip) in ips.iter_mut().enumerate() {
            let Value::Object(ip) = ip else {
                return Err(bad_ip(i, "is not an object"));
            };
            if to.ips_have_version() {
                if !ip.contains_key("version") {
                    let addr = ip
                        .get("address")
                        .and_then(Value::as_str)
                        .and_then(parse_cidr_ip)
                        .ok_or_else(|| bad_ip(i, "has no valid address"))?;
                    let family = if addr.is_ipv4() { "4" } else { "6" };
                    ip.insert("version".into(), Value::String(family.into()));
                }
            } else {
                ip.remove("version");
            }
        }
    }
    if to < Version::V1_0_0
        && from >= Version::V1_0_0
        && let Some(Value::Array(ifaces)) = out.get_mut("interfaces")
    {
        for iface in ifaces.iter_mut().filter_map(Value::as_object_mut) {
            for f in IFACE_FIELDS_SINCE_1_0 {
                iface.remove(f);
            }
        }
    }
    Ok(Value::Object(out))
}

/// The pod's addresses: every IP of the result, except those on an interface outside the
/// sandbox (a bridge plugin reports the host-side interfaces too).
pub fn pod_ips(result: &Value) -> Result<Vec<IpAddr>, CniError> {
    let ifaces = result.get("interfaces").and_then(Value::as_array);
    let in_sandbox = |idx: u64| -> bool {
        let Some(iface) = ifaces.and_then(|l| l.get(idx as usize)) else {
            return true;
        };
        iface
            .get("sandbox")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
    };
    let mut out = Vec::new();
    let Some(ips) = result.get("ips").and_then(Value::as_array) else {
        return Ok(out);
    };
    for (i, ip) in ips.iter().enumerate() {
        let addr = ip
            .get("address")
            .and_then(Value::as_str)
            .and_then(parse_cidr_ip)
            .ok_or_else(|| bad_ip(i, "has no valid address"))?;
        let on_sandbox = ip
            .get("interface")
            .and_then(Value::as_u64)
            .is_none_or(in_sandbox);
        if on_sandbox && !out.contains(&addr) {
            out.push(addr);
        }
    }
    Ok(out)
}

/// `10.0.0.2/24` → `10.0.0.2`.
fn parse_cidr_ip(s: &str) -> Option<IpAddr> {
    let (ip, prefix) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    prefix.parse::<u8>().ok().filter(|&p| p <= max)?;
    Some(ip)
}

fn bad_ip(i: usize, what: &str) -> CniError {
    CniError::new(
        code::INVALID_CONFIG,
        format!("prevResult.ips[{i}] {what} (expected \"address\": \"<ip>/<prefix>\")"),
    )
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn bridge_result(version: &str) -> Value {
        let mut ip = json!({"interface": 2, "address": "10.78.0.5/24", "gateway": "10.78.0.1"});
        if version.starts_with("0.") {
            ip["version"] = "4".into();
        }
        json!({
            "cniVersion": version,
            "interfaces": [
                {"name": "cni0", "mac": "aa:bb:cc:dd:ee:01"},
                {"name": "veth1", "mac": "aa:bb:cc:dd:ee:02"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:03", "sandbox": "/var/run/netns/cni-1"}
            ],
            "ips": [ip],
            "routes": [{"dst": "10.78.0.0/16"}],
            "dns": {}
        })
    }

    #[test]
    fn converts_between_the_ip_formats() {
        let v1 = bridge_result("1.0.0");
        let v04 = convert(&v1, Version::V1_0_0, Version::V0_4_0).unwrap();
        assert_eq!(v04, bridge_result("0.4.0"));
        let back = convert(&v04, Version::V0_4_0, Version::V1_1_0).unwrap();
        assert_eq!(back, bridge_result("1.1.0"));
    }

    #[test]
    fn newer_interface_fields_are_dropped_for_old_versions_only() {
        let mut v = bridge_result("1.1.0");
        v["interfaces"][2]["mtu"] = 1400.into();
        v["interfaces"][2]["socketPath"] = "/x".into();
        assert_eq!(
            convert(&v, Version::V1_1_0, Version::V1_0_0).unwrap()["interfaces"][2]["mtu"],
            1400
        );
        let old = convert(&v, Version::V1_1_0, Version::V0_3_1).unwrap();
        assert!(old["interfaces"][2].get("mtu").is_none());
        assert!(old["interfaces"][2].get("socketPath").is_none());
    }

    #[test]
    fn pod_ips_skip_host_side_interfaces() {
        let mut r = bridge_result("1.0.0");
        r["ips"]
            .as_array_mut()
            .unwrap()
            .push(json!({"interface": 0, "address": "10.78.0.1/24"}));
        r["ips"]
            .as_array_mut()
            .unwrap()
            .push(json!({"address": "fd78::5/64"}));
        let ips = pod_ips(&r).unwrap();
        assert_eq!(
            ips,
            vec![
                "10.78.0.5".parse::<IpAddr>().unwrap(),
                "fd78::5".parse().unwrap()
            ]
        );
        let bad = json!({"ips": [{"address": "10.0.0.1"}]});
        assert!(pod_ips(&bad).unwrap_err().msg.contains("ips[0]"));
        assert!(pod_ips(&json!({})).unwrap().is_empty());
    }

    #[test]
    fn unconvertible_results_are_errors() {
        let e = convert(
            &json!({"cniVersion": "0.2.0"}),
            Version::V1_0_0,
            Version::V1_0_0,
        )
        .unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let e = convert(
            &json!({"ips": [{"address": "nope"}]}),
            Version::V1_0_0,
            Version::V0_4_0,
        )
        .unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
    }

    fn arb_version() -> impl Strategy<Value = Version> {
        prop::sample::select(Version::ALL.to_vec())
    }

    /// A result as a plugin of `version` would write it, with arbitrary extra (vendor) keys.
    fn arb_result(version: Version) -> impl Strategy<Value = Value> {
        let ip = (
            any::<bool>(),
            any::<[u8; 4]>(),
            any::<[u16; 8]>(),
            0u8..=32,
            prop::option::of(0u64..3),
        )
            .prop_map(move |(v4, a, b, prefix, iface)| {
                let addr: IpAddr = if v4 { a.into() } else { b.into() };
                let mut ip = json!({"address": format!("{addr}/{prefix}")});
                if let Some(i) = iface {
                    ip["interface"] = i.into();
                }
                if version.ips_have_version() {
                    ip["version"] = (if v4 { "4" } else { "6" }).into();
                }
                ip
            });
        let iface = ("[a-z]{1,8}[0-9]?", any::<bool>(), "[0-9a-f:]{0,17}").prop_map(
            |(name, sandboxed, mac)| {
                let mut i = json!({"name": name, "mac": mac});
                if sandboxed {
                    i["sandbox"] = "/var/run/netns/x".into();
                }
                i
            },
        );
        let extra = prop::collection::btree_map("x-[a-z]{1,6}", "[ -~]{0,12}", 0..3);
        (
            prop::collection::vec(iface, 0..4),
            prop::collection::vec(ip, 0..4),
            extra,
        )
            .prop_map(move |(ifaces, ips, extra)| {
                let mut r = json!({
                    "cniVersion": version.as_str(),
                    "interfaces": ifaces,
                    "ips": ips,
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dns": {"nameservers": ["10.0.0.10"]}
                });
                for (k, v) in extra {
                    r[k] = v.into();
                }
                r
            })
    }

    proptest! {
        /// A result converted to its own version is itself (ADD prints prevResult unchanged).
        #[test]
        fn same_version_is_identity(
            (v, r) in arb_version().prop_flat_map(|v| (Just(v), arb_result(v)))
        ) {
            prop_assert_eq!(convert(&r, v, v).unwrap(), r);
        }

        /// Converting to any version and back gives the original result.
        #[test]
        fn conversion_round_trips(
            (from, r) in arb_version().prop_flat_map(|v| (Just(v), arb_result(v))),
            to in arb_version(),
        ) {
            let there = convert(&r, from, to).unwrap();
            prop_assert_eq!(there["cniVersion"].as_str(), Some(to.as_str()));
            prop_assert_eq!(convert(&there, to, from).unwrap(), r.clone());
            // The pod's addresses do not depend on the version.
            prop_assert_eq!(pod_ips(&there).unwrap(), pod_ips(&r).unwrap());
        }
    }
}
