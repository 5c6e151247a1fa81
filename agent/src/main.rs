use std::{process::ExitCode, time::Duration};

use clap::Parser as _;
use sluice_agent::{
    cli::{Cli, Command},
    cni_install::setup,
    control::{
        api::{EnrollRequest, Request},
        client,
    },
    k8s, logging, run, status, uninstall,
};

fn main() -> ExitCode {
    // Test builds only: faults named in FAILPOINTS (see the `failpoints` feature).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    logging::init(&cli.log_level, cli.log_format);
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let socket = cli.control_socket;
    match cli.command {
        Command::Run(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let result = runtime.block_on(run::run(args, socket));
            // A blocking call still in flight (a netns step, a scrape) must not keep a
            // stopping agent alive: everything it owns is pinned or on disk already.
            runtime.shutdown_timeout(Duration::from_secs(5));
            result
        }
        Command::Enroll(a) => {
            let wait = a.wait_ms.unwrap_or(5000);
            let req = Request::Enroll(EnrollRequest {
                uid: a.uid,
                name: a.name,
                namespace: a.namespace,
                service_account: a.service_account,
                netns: a.netns,
                ips: a.ips,
                dns_capture: a.dns_capture,
                bypass_inbound: a.bypass_inbound,
                wait_ms: a.wait_ms,
                container_id: None,
            });
            let result = client::call(
                &socket,
                &req,
                Duration::from_millis(wait) + Duration::from_secs(30),
            )?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
        Command::Unenroll { uid } => {
            client::call(&socket, &Request::Unenroll { uid }, Duration::from_secs(30))?;
            Ok(())
        }
        Command::Status { json } => {
            let result = client::call(&socket, &Request::Status, Duration::from_secs(10))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                let s: status::Status = serde_json::from_value(result)?;
                print!("{}", status::render(&s));
            }
            Ok(())
        }
        Command::Uninstall(args) => uninstall::uninstall(&args, &socket),
        Command::Trace { pod, json } => {
            let mut out = std::io::stdout().lock();
            client::stream(&socket, &Request::Trace { pod }, |line| {
                use std::io::Write as _;
                let text = if json {
                    line.to_string()
                } else {
                    trace_line(&line)
                };
                writeln!(out, "{text}").and_then(|()| out.flush()).is_ok()
            })?;
            Ok(())
        }
        Command::InstallCni(a) => {
            // In a cluster, labels decide: the entry must not carry a namespace list.
            let policy = setup::policy(&a.cni, k8s::in_cluster().then_some(""));
            let Some(mut installer) = setup::installer(&a.node, &a.cni, &policy, &socket)? else {
                anyhow::bail!("install-cni needs --cni-conf-dir (or MOUNTED_CNI_NET_DIR)");
            };
            let config = setup::install_once(&mut installer, a.wait)?;
            println!("{}", config.display());
            Ok(())
        }
    }
}

/// `pod  verdict  src -> dst  reason` for people.
fn trace_line(v: &serde_json::Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
    format!(
        "{:<30} {:<10} {:>45} -> {:<45} {}",
        s("pod"),
        s("verdict"),
        s("src"),
        s("dst"),
        s("reason")
    )
}
