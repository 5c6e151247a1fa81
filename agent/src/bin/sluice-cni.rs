//! `sluice-cni`: the chained CNI plugin a container runtime runs, last in the pod's chain, to
//! have the sluice agent enroll the pod before its app starts. See `sluice_agent::cni`.
use std::{io::Read as _, process::ExitCode, time::Instant};

use sluice_agent::cni::{
    config::LogLevel,
    env::collect_env,
    log::Logger,
    plugin::{self, Invocation, SocketAgent},
    spec::{CniError, LATEST, Version, code},
};

/// Far more than any network configuration; a bound so that garbage cannot exhaust memory.
const MAX_STDIN: u64 = 4 << 20;

fn main() -> ExitCode {
    let started = Instant::now();
    let mut early_log = Logger::stderr(LogLevel::Warn);
    let mut stdin = Vec::new();
    match std::io::stdin().take(MAX_STDIN + 1).read_to_end(&mut stdin) {
        Ok(n) if n as u64 > MAX_STDIN => {
            let e = CniError::new(
                code::IO_FAILURE,
                format!("the network configuration on stdin is larger than {MAX_STDIN} bytes"),
            );
            return fail(&e, LATEST, &mut early_log);
        }
        Ok(_) => {}
        Err(e) => {
            let e =
                CniError::new(code::IO_FAILURE, "cannot read stdin").with_details(e.to_string());
            return fail(&e, LATEST, &mut early_log);
        }
    }
    let vars = match collect_env(std::env::vars_os()) {
        Ok(v) => v,
        Err(e) => return fail(&e, LATEST, &mut early_log),
    };
    let inv = match Invocation::parse(&stdin, &vars) {
        Ok(inv) => inv,
        Err(r) => return fail(&r.error, r.version, &mut early_log),
    };
    let Some(options) = inv.options() else {
        // VERSION: nothing to ask, nothing to log.
        return finish(
            plugin::execute(&inv, &mut NoAgent, &mut early_log),
            &inv,
            &mut early_log,
        );
    };
    let mut log = Logger::new(options.log_level, options.log_file.as_deref());
    let command = vars.get("CNI_COMMAND").map(String::as_str).unwrap_or("");
    let container: String = vars
        .get("CNI_CONTAINERID")
        .map(|c| c.chars().take(12).collect())
        .unwrap_or_default();
    log.set_context(format!("{command} {container}").trim_end().to_string());
    let socket = options.agent_socket.clone();
    let result = plugin::execute(&inv, &mut SocketAgent(&socket), &mut log);
    log.debug(&format!("done in {} µs", started.elapsed().as_micros()));
    finish(result, &inv, &mut log)
}

fn finish(
    result: Result<Option<String>, CniError>,
    inv: &Invocation,
    log: &mut Logger,
) -> ExitCode {
    match result {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => fail(&e, inv.version(), log),
    }
}

/// The spec's error object on stdout, a line in the log, and a non-zero exit.
fn fail(e: &CniError, version: Version, log: &mut Logger) -> ExitCode {
    println!("{}", e.to_json(version));
    log.log(LogLevel::Debug, &format!("failed: {e}"));
    ExitCode::FAILURE
}

/// VERSION never talks to the agent.
struct NoAgent;

impl plugin::AgentLink for NoAgent {
    fn call(
        &mut self,
        _: &sluice_agent::control::api::Request,
        _: std::time::Duration,
    ) -> Result<serde_json::Value, plugin::AgentCallError> {
        Err(plugin::AgentCallError::Unreachable("not asked".into()))
    }
}
