#![no_main]
//! sluice-cni's input: the `CNI_*` environment and the network configuration on stdin, then
//! the prevResult conversions and pod IPs an accepted call goes on to compute.
//!
//! Input: `KEY=VALUE` lines (the environment), a NUL byte, then stdin.
use std::{ffi::OsString, os::unix::ffi::OsStringExt as _};

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sluice_agent::cni::{
    config::NetConf,
    env::collect_env,
    plugin::Invocation,
    result::{convert, pod_ips},
    spec::{CniError, Version},
};

fuzz_target!(|data: &[u8]| {
    let (env, stdin) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&[][..], data),
    };
    let vars = env.split(|&b| b == b'\n').filter_map(|line| {
        let eq = line.iter().position(|&b| b == b'=')?;
        Some((
            OsString::from_vec(line[..eq].to_vec()),
            OsString::from_vec(line[eq + 1..].to_vec()),
        ))
    });
    let vars = match collect_env(vars) {
        Ok(v) => v,
        Err(e) => return rejected(&e, Version::V1_1_0),
    };
    let (version, conf) = match Invocation::parse(stdin, &vars) {
        Err(r) => return rejected(&r.error, r.version),
        Ok(Invocation::Version { .. }) => return,
        Ok(Invocation::Net { conf, .. }) => (conf.version, conf),
    };
    // The options read back the same from what the installer writes for them.
    let mut written = serde_json::to_value(&conf.options).expect("options encode");
    written["cniVersion"] = version.as_str().into();
    let back = NetConf::parse(written.to_string().as_bytes()).expect("written options parse");
    assert_eq!(back.options, conf.options);
    let Some(prev) = &conf.prev_result else {
        return;
    };
    let ips = pod_ips(prev);
    if let Err(e) = &ips {
        rejected(e, version);
    }
    for to in Version::ALL {
        match convert(prev, version, to) {
            Ok(there) => {
                assert_eq!(there["cniVersion"], to.as_str());
                // Converting is idempotent and never changes the pod's addresses.
                assert_eq!(
                    convert(&there, to, to).expect("a converted result converts"),
                    there
                );
                assert_eq!(pod_ips(&there), ips);
            }
            Err(e) => rejected(&e, version),
        }
    }
});

/// A rejection says what is wrong, as a spec error object the runtime can read.
fn rejected(e: &CniError, version: Version) {
    assert!(!e.msg.is_empty());
    let out: Value = serde_json::from_str(&e.to_json(version)).expect("the error object is JSON");
    assert_eq!(out["code"], e.code);
    assert_eq!(out["msg"], e.msg.as_str());
}
