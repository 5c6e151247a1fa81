//! One plugin call: parse what the runtime gave (pure), then carry out the command, asking the
//! agent over its control socket where needed.
//!
//! The rules that keep a pod from running un-redirected:
//! - ADD fails (code 11, the runtime retries) when the pod may need enrollment and the agent
//!   cannot be asked, does not answer in time, or cannot enroll it;
//! - it passes the pod through, without asking, when the pod is not a Kubernetes pod or its
//!   namespace is excluded, and when the agent is unreachable but the config's complete
//!   `ambient_namespaces` list does not name the namespace;
//! - DEL always succeeds: the agent also lets go of pods whose netns disappeared.
use std::{path::Path, time::Duration};

use serde_json::{Value, json};

use super::{
    config::{self, NetConf, PluginOptions},
    env::{Env, EnvVars},
    log::Logger,
    result,
    spec::{CniError, Command, LATEST, Version, code},
};
use crate::control::{
    api::{
        CniAddReply, CniAddRequest, CniDelReply, CniDelRequest, CniGcReply, CniPod, CniStatusReply,
        Request,
    },
    client::{self, ClientError},
};

/// Why the agent gave no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentCallError {
    /// Nothing listens on the socket (the agent is down or restarting).
    Unreachable(String),
    /// It accepted the call but did not answer in time, or the connection broke.
    NoAnswer(String),
    /// It answered with an error.
    Refused(String),
}

/// The agent, as the plugin sees it. The real one is [`SocketAgent`]; tests substitute others.
pub trait AgentLink {
    fn call(&mut self, req: &Request, timeout: Duration) -> Result<Value, AgentCallError>;
}

/// The agent behind its control socket.
pub struct SocketAgent<'a>(pub &'a Path);

impl AgentLink for SocketAgent<'_> {
    fn call(&mut self, req: &Request, timeout: Duration) -> Result<Value, AgentCallError> {
        client::call(self.0, req, timeout).map_err(|e| match e {
            ClientError::Connect { .. } => AgentCallError::Unreachable(e.to_string()),
            ClientError::Refused(msg) => AgentCallError::Refused(msg),
            other => AgentCallError::NoAnswer(other.to_string()),
        })
    }
}

/// A parsed call.
#[derive(Debug, Clone, PartialEq)]
pub enum Invocation {
    Version {
        requested: Option<Version>,
    },
    /// Every other command, with its network configuration.
    Net {
        env: Env,
        conf: Box<NetConf>,
    },
}

/// A call that could not be parsed: the error, and the version to report it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub error: CniError,
    pub version: Version,
}

impl Invocation {
    /// Everything the runtime gave, checked. Pure: no I/O.
    pub fn parse(stdin: &[u8], vars: &EnvVars) -> Result<Invocation, Rejected> {
        // The version first, so that even an env error is reported in the caller's version.
        let version = config::requested_version(stdin).ok().flatten();
        let reject = |error| Rejected {
            error,
            version: version.unwrap_or(LATEST),
        };
        let env = Env::parse(vars).map_err(reject)?;
        if env.command == Command::Version {
            let requested = config::requested_version(stdin).map_err(reject)?;
            return Ok(Invocation::Version { requested });
        }
        let conf = NetConf::parse(stdin).map_err(reject)?;
        if !conf.version.allows(env.command) {
            return Err(reject(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "{} does not exist in CNI {}; set cniVersion to 1.1.0 or later in the network configuration",
                    env.command.as_str(),
                    conf.version
                ),
            )));
        }
        Ok(Invocation::Net {
            env,
            conf: Box::new(conf),
        })
    }

    /// The version errors are reported in.
    pub fn version(&self) -> Version {
        match self {
            Invocation::Version { requested } => requested.unwrap_or(LATEST),
            Invocation::Net { conf, .. } => conf.version,
        }
    }

    pub fn options(&self) -> Option<&PluginOptions> {
        match self {
            Invocation::Version { .. } => None,
            Invocation::Net { conf, .. } => Some(&conf.options),
        }
    }
}

/// Carries out the call: what to print on stdout (if anything), or the error.
pub fn execute(
    inv: &Invocation,
    agent: &mut dyn AgentLink,
    log: &mut Logger,
) -> Result<Option<String>, CniError> {
    let (env, conf) = match inv {
        Invocation::Version { requested } => {
            let out = json!({
                "cniVersion": requested.unwrap_or(LATEST).as_str(),
                "supportedVersions": Version::ALL.map(Version::as_str),
            });
            return Ok(Some(out.to_string()));
        }
        Invocation::Net { env, conf } => (env, conf),
    };
    let call = Call {
        env,
        conf,
        timeout: Duration::from_millis(conf.options.timeout_ms),
    };
    match env.command {
        Command::Add => call.add(agent, log).map(|r| Some(r.to_string())),
        Command::Check => call.check(agent, log).map(|()| None),
        Command::Del => {
            call.del(agent, log);
            Ok(None)
        }
        Command::Status => call.status(agent).map(|()| None),
        Command::Gc => call.gc(agent, log).map(|()| None),
        Command::Version => unreachable!("handled above"),
    }
}

struct Call<'a> {
    env: &'a Env,
    conf: &'a NetConf,
    timeout: Duration,
}

/// Whether the agent needs to hear about a pod at all.
enum Scope {
    /// Not a Kubernetes pod, or an excluded namespace: pass through.
    Outside(String),
    Pod(CniPod),
}

impl Call<'_> {
    fn scope(&self) -> Scope {
        let a = &self.env.args;
        let (Some(namespace), Some(name)) = (&a.pod_namespace, &a.pod_name) else {
            return Scope::Outside(
                "not a Kubernetes pod (no K8S_POD_NAMESPACE and K8S_POD_NAME in CNI_ARGS)".into(),
            );
        };
        if self.conf.options.exclude_namespaces.contains(namespace) {
            return Scope::Outside(format!("namespace {namespace} is excluded"));
        }
        Scope::Pod(CniPod {
            namespace: namespace.clone(),
            name: name.clone(),
            uid: a.pod_uid.clone(),
        })
    }

    fn container_id(&self) -> String {
        self.env.container_id.clone().unwrap_or_default()
    }

    fn add_request(&self, pod: CniPod, ips: Vec<std::net::IpAddr>) -> CniAddRequest {
        let o = &self.conf.options;
        CniAddRequest {
            container_id: self.container_id(),
            netns: self.env.netns.clone().unwrap_or_default(),
            ifname: self.env.ifname.clone().unwrap_or_default(),
            pod,
            ips,
            ambient_namespaces: o.ambient_namespaces.clone(),
            exclude_namespaces: o.exclude_namespaces.clone(),
            timeout_ms: Some(o.timeout_ms),
        }
    }

    /// Whether an unreachable agent may be ignored for this pod: only when the config's
    /// complete list of ambient namespaces says it is not one of them.
    fn known_unwanted(&self, pod: &CniPod) -> bool {
        self.conf
            .options
            .ambient_namespaces
            .as_ref()
            .is_some_and(|l| !l.contains(&pod.namespace))
    }

    fn refusal(&self, pod: &CniPod, e: AgentCallError) -> CniError {
        let who = format!("{}/{}", pod.namespace, pod.name);
        let socket = self.conf.options.agent_socket.display();
        let (msg, details) = match e {
            AgentCallError::Unreachable(d) => (
                format!(
                    "cannot reach the sluice agent at {socket}, and pod {who} may need to be enrolled: not letting it start un-redirected (is sluice-agent running on this node? the runtime retries)"
                ),
                d,
            ),
            AgentCallError::NoAnswer(d) => (
                format!(
                    "the sluice agent did not answer about pod {who} within {} ms (the runtime retries)",
                    self.timeout.as_millis()
                ),
                d,
            ),
            AgentCallError::Refused(d) => (
                format!("the sluice agent could not enroll pod {who} (the runtime retries)"),
                d,
            ),
        };
        CniError::new(code::TRY_AGAIN, msg).with_details(details)
    }

    fn add(&self, agent: &mut dyn AgentLink, log: &mut Logger) -> Result<Value, CniError> {
        let prev = self.conf.prev_result.as_ref().ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "no prevResult: sluice-cni is a chained plugin and must come after the plugin that sets up the pod's interface and IPs",
            )
        })?;
        let out = result::convert(prev, self.conf.version, self.conf.version)?;
        let pod = match self.scope() {
            Scope::Outside(why) => {
                log.debug(&format!("{why}; passing through"));
                return Ok(out);
            }
            Scope::Pod(pod) => pod,
        };
        let ips = result::pod_ips(&out)?;
        let req = Request::CniAdd(self.add_request(pod.clone(), ips));
        match agent.call(&req, self.timeout) {
            Ok(answer) => match serde_json::from_value::<CniAddReply>(answer) {
                Ok(CniAddReply::Skipped { reason }) => {
                    log.info(&format!(
                        "pod {}/{} not enrolled: {reason}",
                        pod.namespace, pod.name
                    ));
                    Ok(out)
                }
                Ok(CniAddReply::Enrolled(r)) => {
                    log.info(&format!(
                        "pod {}/{} enrolled (uid {}, ztunnel {:?}{})",
                        pod.namespace,
                        pod.name,
                        r.uid,
                        r.ztunnel,
                        if r.already_enrolled { ", already" } else { "" }
                    ));
                    Ok(out)
                }
                Err(e) => Err(CniError::new(
                    code::TRY_AGAIN,
                    "the sluice agent's answer is unreadable (a plugin and agent of different versions?)",
                )
                .with_details(e.to_string())),
            },
            Err(AgentCallError::Unreachable(d)) if self.known_unwanted(&pod) => {
                log.warn(&format!(
                    "agent unreachable ({d}); pod {}/{} is not in ambient_namespaces, passing through",
                    pod.namespace, pod.name
                ));
                Ok(out)
            }
            Err(e) => {
                let err = self.refusal(&pod, e);
                log.error(&err.to_string());
                Err(err)
            }
        }
    }

    fn check(&self, agent: &mut dyn AgentLink, log: &mut Logger) -> Result<(), CniError> {
        if let Some(prev) = &self.conf.prev_result {
            result::convert(prev, self.conf.version, self.conf.version)?;
        }
        let pod = match self.scope() {
            Scope::Outside(_) => return Ok(()),
            Scope::Pod(pod) => pod,
        };
        let ips = match &self.conf.prev_result {
            Some(prev) => result::pod_ips(prev)?,
            None => vec![],
        };
        let req = Request::CniCheck(self.add_request(pod.clone(), ips));
        match agent.call(&req, self.timeout) {
            Ok(_) => Ok(()),
            Err(AgentCallError::Unreachable(_)) if self.known_unwanted(&pod) => Ok(()),
            Err(AgentCallError::Refused(d)) => {
                let err = CniError::new(
                    code::TRY_AGAIN,
                    format!(
                        "pod {}/{} should be redirected but is not",
                        pod.namespace, pod.name
                    ),
                )
                .with_details(d);
                log.error(&err.to_string());
                Err(err)
            }
            Err(e) => Err(self.refusal(&pod, e)),
        }
    }

    /// Never fails: a DEL that fails would leave the runtime unable to remove the pod.
    fn del(&self, agent: &mut dyn AgentLink, log: &mut Logger) {
        let pod = match self.scope() {
            Scope::Pod(pod) => Some(pod),
            Scope::Outside(_) => None,
        };
        let req = Request::CniDel(CniDelRequest {
            container_id: self.container_id(),
            pod,
        });
        match agent.call(&req, self.timeout) {
            Ok(v) => match serde_json::from_value::<CniDelReply>(v) {
                Ok(CniDelReply {
                    unenrolled: Some(uid),
                }) => log.info(&format!("pod {uid} unenrolled")),
                _ => log.debug("nothing enrolled for this container"),
            },
            Err(e) => log.warn(&format!(
                "could not tell the agent ({e:?}); it lets go of the pod once its netns is gone"
            )),
        }
    }

    fn status(&self, agent: &mut dyn AgentLink) -> Result<(), CniError> {
        let socket = self.conf.options.agent_socket.display();
        match agent.call(&Request::CniStatus, self.timeout) {
            Ok(v) => match serde_json::from_value::<CniStatusReply>(v) {
                Ok(CniStatusReply { ready: true }) => Ok(()),
                _ => Err(CniError::new(
                    code::NOT_AVAILABLE,
                    format!("the sluice agent at {socket} is not ready (starting or stopping)"),
                )),
            },
            Err(e) => Err(CniError::new(
                code::NOT_AVAILABLE,
                format!("cannot reach the sluice agent at {socket}: pods that need enrollment cannot start"),
            )
            .with_details(format!("{e:?}"))),
        }
    }

    fn gc(&self, agent: &mut dyn AgentLink, log: &mut Logger) -> Result<(), CniError> {
        let valid = self
            .conf
            .valid_attachments
            .iter()
            .flatten()
            .map(|a| a.container_id.clone())
            .collect();
        let req = Request::CniGc {
            valid_container_ids: valid,
        };
        match agent.call(&req, self.timeout) {
            Ok(v) => {
                if let Ok(r) = serde_json::from_value::<CniGcReply>(v)
                    && !r.unenrolled.is_empty()
                {
                    log.info(&format!("unenrolled {:?}", r.unenrolled));
                }
                Ok(())
            }
            Err(e) => Err(CniError::new(
                code::TRY_AGAIN,
                format!(
                    "cannot garbage-collect: the sluice agent at {} did not answer",
                    self.conf.options.agent_socket.display()
                ),
            )
            .with_details(format!("{e:?}"))),
        }
    }
}

#[cfg(test)]
mod tests;
