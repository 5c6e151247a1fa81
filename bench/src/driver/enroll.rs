//! Figure 6: enrollment, per pod. Sluice: lone pods (each into an agent with nothing else
//! enrolled, then un-enrolled) and a batch back to back, timed inside the agent (`enroll_us`
//! in its reply), by the caller (see `enroller`), and, for lone pods, until the pod's first
//! connection reaches the peer (a probe inside the pod retries every 200 µs from before the
//! request). iptables: upstream's rule set applied with `iptables-nft-restore` in each
//! namespace, the tool entered into the namespace as istio-cni does; what `ip netns exec`
//! would add on top is timed separately.
use std::time::Duration;

use anyhow::{Context, Result};

use super::enroller::{Cli, Enroller, PodRef};
use super::exec::run_in;
use super::procs::{Agent, Client, Peer};
use super::results::{Figure, Rows};
use super::rules;
use super::topo::{CheapPod, CheapPods};
use super::{Env, Plan, progress};
use crate::clock::mono_ns;
use crate::proto::Job;
use crate::{ports, stop};

const WAIT: Duration = Duration::from_secs(20);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn run(env: &Env, plan: &Plan) -> Result<Figure> {
    let lone = "1 pod";
    let batch = format!("{} pods back to back", plan.enroll_batch);
    let mut rows = Rows::default();
    let mut problems = Vec::new();
    progress(format!(
        "enrollment: sluice, {} lone pod(s), then {} back to back",
        plan.enroll_single, plan.enroll_batch
    ));
    {
        let pods = CheapPods::new(plan.enroll_single + plan.enroll_batch, 0)?;
        let agent = Agent::start(env.topo.node().path(), &env.cgroup, false)?;
        let zds = agent.zds_socket().display().to_string();
        let mut peer = Peer::start(
            &env.bench,
            env.topo.node().path(),
            &env.cgroup,
            &["--zds", &zds],
        )?;
        peer.wait_event("zds_connected", WAIT)?;
        let cli = Cli { agent: &agent };
        let (singles, batched) = pods.pods().split_at(plan.enroll_single);
        for (i, pod) in singles.iter().enumerate() {
            stop::check()?;
            let uid = format!("bench-lone-{i}");
            let mut probe = Client::start(&env.bench, &pod.path, &env.cgroup)?;
            probe.send(&Job::Probe {
                addr: ports::dest(0, ports::CLOSE),
                interval_us: 200,
                deadline_ms: WAIT.as_millis() as u64,
            })?;
            probe.wait_event("probing", WAIT)?;
            let t0 = mono_ns();
            let e = cli.enroll(&pod_ref(&uid, pod))?;
            let r = probe.result(WAIT + WAIT)?;
            record(&mut rows, &cli, lone, &e);
            match r.first_success_ns {
                Some(t) => rows
                    .acc("sluice · to traffic", lone)
                    .add_sample(t.saturating_sub(t0) as f64 / 1e6),
                None => {
                    rows.acc("sluice · to traffic", lone)
                        .add_error("never redirected");
                    problems.push(format!("lone pod {uid}: no connection reached the peer"));
                }
            }
            cli.unenroll(&uid)?;
        }
        for (i, pod) in batched.iter().enumerate() {
            stop::check()?;
            let e = cli.enroll(&pod_ref(&format!("bench-batch-{i}"), pod))?;
            record(&mut rows, &cli, &batch, &e);
        }
        if rows.acc("sluice · agent", lone).samples.is_empty() {
            problems.push("the agent reported no enroll_us: agent-side times are missing".into());
        }
    }

    progress("enrollment: iptables-nft-restore in each namespace");
    {
        let pods = CheapPods::new(plan.enroll_single + plan.enroll_batch, 0)?;
        let v4 = rules::pod_rules(false);
        let v6 = rules::pod_rules(true);
        for (i, pod) in pods.pods().iter().enumerate() {
            stop::check()?;
            let case = if i < plan.enroll_single { lone } else { &batch };
            let t4 = run_in(&pod.path, "iptables-nft-restore", &["--noflush"], &v4)?;
            let t6 = run_in(&pod.path, "ip6tables-nft-restore", &["--noflush"], &v6)?;
            rows.acc("iptables", case).add_sample(ms(t4));
            rows.acc("iptables v4+v6", case).add_sample(ms(t4 + t6));
            if i >= plan.enroll_single {
                let t = netns_exec_overhead(pod)?;
                rows.acc("ip netns exec (overhead)", case).add_sample(ms(t));
            }
        }
    }

    let mut fig = Figure::new(6, "enrollment", "Enrollment per pod", "ms");
    fig.rows = rows.rows(false);
    fig.problems = problems;
    fig.notes.push("sluice · agent: the agent's own time (dataplane and state, `enroll_us` in its reply); sluice · CLI: `sluice-agent enroll` from exec to exit (includes ztunnel's ACK); sluice · to traffic: from the request until a connection from inside the pod reached the peer.".into());
    fig.notes.push("iptables: `iptables-nft-restore --noflush` of upstream's in-pod IPv4 rules, exec'd inside the pod's namespace (v4+v6: with `ip6tables-nft-restore`); ip netns exec: what running it through `ip netns exec` adds (`ip netns exec <pod> true`).".into());
    Ok(fig)
}

fn pod_ref<'a>(uid: &'a str, pod: &'a CheapPod) -> PodRef<'a> {
    PodRef {
        uid,
        netns: &pod.path,
        ip: pod.ip,
    }
}

fn record(rows: &mut Rows, cli: &Cli<'_>, case: &str, e: &super::enroller::Enrolled) {
    if let Some(agent) = e.agent {
        rows.acc("sluice · agent", case).add_sample(ms(agent));
    }
    rows.acc(&format!("sluice · {}", cli.name()), case)
        .add_sample(ms(e.caller));
}

/// What `ip netns exec <pod> true` takes beyond exec'ing `true` inside the pod directly.
fn netns_exec_overhead(pod: &CheapPod) -> Result<Duration> {
    let t0 = std::time::Instant::now();
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", &pod.name, "true"])
        .status()
        .context("running ip netns exec")?;
    let through_ip = t0.elapsed();
    anyhow::ensure!(status.success(), "ip netns exec {} true failed", pod.name);
    let direct = run_in(&pod.path, "true", &[], "")?;
    Ok(through_ip.saturating_sub(direct))
}
