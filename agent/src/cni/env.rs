//! The runtime's half of a plugin call: the `CNI_*` environment variables.
use std::{collections::BTreeMap, ffi::OsString, path::PathBuf};

use super::spec::{CniError, Command, code};

/// The `CNI_*` variables of the process, by name.
pub type EnvVars = BTreeMap<String, String>;

/// Keeps the `CNI_*` variables; one that is not UTF-8 is an error naming it.
pub fn collect_env(
    vars: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<EnvVars, CniError> {
    let mut out = EnvVars::new();
    for (k, v) in vars {
        let Some(k) = k.to_str().filter(|k| k.starts_with("CNI_")) else {
            continue;
        };
        let v = v
            .into_string()
            .map_err(|_| CniError::new(code::INVALID_ENV, format!("{k} is not valid UTF-8")))?;
        out.insert(k.to_string(), v);
    }
    Ok(out)
}

/// The pod identity a Kubernetes runtime passes in `CNI_ARGS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    /// containerd passes it; some runtimes do not (the agent then derives one).
    pub pod_uid: Option<String>,
    pub infra_container_id: Option<String>,
}

impl CniArgs {
    /// `K=V;K=V` (libcni's format). Unknown keys are ignored whatever `IgnoreUnknown` says:
    /// we only read the pod identity.
    pub fn parse(s: &str) -> Result<CniArgs, CniError> {
        let mut args = CniArgs::default();
        for pair in s.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
                )
            })?;
            let v = (!v.is_empty()).then(|| v.to_string());
            match k {
                "K8S_POD_NAMESPACE" => args.pod_namespace = v,
                "K8S_POD_NAME" => args.pod_name = v,
                "K8S_POD_UID" => args.pod_uid = v,
                "K8S_POD_INFRA_CONTAINER_ID" => args.infra_container_id = v,
                _ => {}
            }
        }
        Ok(args)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: Option<String>,
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    pub args: CniArgs,
}

impl Env {
    /// Reads and checks what `command` needs (the spec's "Parameters" section).
    pub fn parse(vars: &EnvVars) -> Result<Env, CniError> {
        let get = |k: &str| vars.get(k).filter(|v| !v.is_empty()).cloned();
        let command = match vars.get("CNI_COMMAND").map(String::as_str) {
            None | Some("") => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    "CNI_COMMAND is not set: sluice-cni is a CNI plugin, run by a container runtime",
                ));
            }
            Some(c) => Command::parse(c).ok_or_else(|| {
                CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_COMMAND {c:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"),
                )
            })?,
        };
        let container_id = get("CNI_CONTAINERID");
        let netns = get("CNI_NETNS").map(PathBuf::from);
        let ifname = get("CNI_IFNAME");
        let needs_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let mut missing = Vec::new();
        if needs_container {
            if container_id.is_none() {
                missing.push("CNI_CONTAINERID");
            }
            if ifname.is_none() {
                missing.push("CNI_IFNAME");
            }
            // DEL may come after the netns is gone.
            if netns.is_none() && command != Command::Del {
                missing.push("CNI_NETNS");
            }
        }
        if !missing.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("{} needs {} set", command.as_str(), missing.join(", ")),
            ));
        }
        if let Some(id) = &container_id
            && !valid_container_id(id)
        {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_CONTAINERID {id:?}: must be letters, digits, '_', '.', '-'"),
            ));
        }
        if let Some(ns) = &netns
            && !ns.is_absolute()
        {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_NETNS {} is not an absolute path", ns.display()),
            ));
        }
        let args = match vars.get("CNI_ARGS") {
            Some(a) => CniArgs::parse(a)?,
            None => CniArgs::default(),
        };
        Ok(Env {
            command,
            container_id,
            netns,
            ifname,
            args,
        })
    }
}

/// libcni's rule: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
fn valid_container_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> EnvVars {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn add_reads_the_pod_identity() {
        let env = Env::parse(&vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=u-1",
            ),
        ]))
        .unwrap();
        assert_eq!(env.command, Command::Add);
        assert_eq!(env.args.pod_namespace.as_deref(), Some("ns"));
        assert_eq!(env.args.pod_name.as_deref(), Some("p"));
        assert_eq!(env.args.pod_uid.as_deref(), Some("u-1"));
        assert_eq!(env.args.infra_container_id.as_deref(), Some("abc123"));
    }

    #[test]
    fn missing_and_bad_variables_are_named() {
        let err = Env::parse(&vars(&[])).unwrap_err();
        assert_eq!(err.code, code::INVALID_ENV);
        let err = Env::parse(&vars(&[("CNI_COMMAND", "BOOM")])).unwrap_err();
        assert!(err.msg.contains("BOOM"), "{err}");
        let err = Env::parse(&vars(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")])).unwrap_err();
        assert!(
            err.msg.contains("CNI_CONTAINERID") && err.msg.contains("CNI_NETNS"),
            "{err}"
        );
        // DEL without a netns is fine.
        Env::parse(&vars(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .unwrap();
        let err = Env::parse(&vars(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "../etc"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .unwrap_err();
        assert!(err.msg.contains("CNI_CONTAINERID"), "{err}");
        let err = Env::parse(&vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "relative"),
        ]))
        .unwrap_err();
        assert!(err.msg.contains("absolute"), "{err}");
        let err = CniArgs::parse("K8S_POD_NAME").unwrap_err();
        assert!(err.msg.contains("KEY=VALUE"), "{err}");
        // VERSION, STATUS and GC need nothing else.
        for c in ["VERSION", "STATUS", "GC"] {
            Env::parse(&vars(&[("CNI_COMMAND", c)])).unwrap();
        }
    }

    #[test]
    fn only_cni_variables_are_kept_and_must_be_utf8() {
        use std::os::unix::ffi::OsStringExt as _;
        let got = collect_env([
            ("PATH".into(), "/bin".into()),
            ("CNI_COMMAND".into(), "ADD".into()),
        ])
        .unwrap();
        assert_eq!(got.len(), 1);
        let err = collect_env([("CNI_NETNS".into(), OsString::from_vec(vec![0xff]))]).unwrap_err();
        assert!(err.msg.contains("CNI_NETNS"), "{err}");
    }
}
