//! Figure 6: enrollment, per pod. Sluice, once per caller (`sluice-agent enroll`, then
//! `sluice-cni` exec'd as a runtime execs it; see `enroller`), into the same agent: lone pods
//! (each into an agent with nothing else enrolled, then let go), then a batch back to back,
//! then the batch let go (timed: CLI `unenroll`, CNI DEL). Each enrollment is timed inside the
//! agent, by the caller, and, for lone pods, until the pod's first connection reaches the peer
//! (a probe inside the pod retries every 200 µs from before the request). For the plugin, its
//! exec time beyond the agent's own work is a row of its own (issue 9's budget: < 5 ms).
//! iptables: upstream's rule set applied with `iptables-nft-restore` in each namespace, the
//! tool entered into the namespace as istio-cni does; what `ip netns exec` would add on top is
//! timed separately.
use std::time::Duration;

use anyhow::{Context, Result};

use super::enroller::{Cli, Cni, Enrolled, Enroller, PodRef};
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

/// The figure's two cases.
struct Cases {
    lone: &'static str,
    batch: String,
}

pub fn run(env: &Env, plan: &Plan) -> Result<Figure> {
    let cases = Cases {
        lone: "1 pod",
        batch: format!("{} pods back to back", plan.enroll_batch),
    };
    let mut rows = Rows::default();
    let mut problems = Vec::new();
    {
        let per_caller = plan.enroll_single + plan.enroll_batch;
        let pods = CheapPods::new(2 * per_caller, 0)?;
        let agent = Agent::start(env.topo.node().path(), &env.cgroup, false)?;
        let zds = agent.zds_socket().display().to_string();
        let mut peer = Peer::start(
            &env.bench,
            env.topo.node().path(),
            &env.cgroup,
            &["--zds", &zds],
        )?;
        peer.wait_event("zds_connected", WAIT)?;
        let (cli_pods, cni_pods) = pods.pods().split_at(per_caller);
        let cli = Cli { agent: &agent };
        let cni = Cni::new(&agent, env.topo.node().path())?;
        for (caller, pods, prefix) in [
            (&cli as &dyn Enroller, cli_pods, "cli"),
            (&cni as &dyn Enroller, cni_pods, "cni"),
        ] {
            progress(format!(
                "enrollment: sluice through the {}, {} lone pod(s), then {} back to back",
                caller.name(),
                plan.enroll_single,
                plan.enroll_batch
            ));
            let run = CallerRun {
                env,
                caller,
                prefix,
                cases: &cases,
            };
            run.measure(pods, plan.enroll_single, &mut rows, &mut problems)?;
        }
        if rows.acc("sluice · agent", cases.lone).samples.is_empty() {
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
            let case = if i < plan.enroll_single {
                cases.lone
            } else {
                &cases.batch
            };
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
    fig.notes.push("sluice · agent: the agent's own time (dataplane and state, `enroll_us` in its reply to the CLI); sluice · CLI: `sluice-agent enroll` from exec to exit (includes ztunnel's ACK); sluice · CLI unenroll: `sluice-agent unenroll`, exec to exit; sluice · to traffic: from the request until a connection from inside the pod reached the peer.".into());
    fig.notes.push("sluice · CNI ADD / DEL: `sluice-cni` exec'd as containerd's libcni execs the last plugin of a chain (CNI_* environment, the network configuration with a primary CNI's prevResult on stdin, in the node's namespace), spawn to exit; sluice · CNI ADD beyond the agent: that minus the agent's own time for the same enrollment (its `sluice_enroll_duration_seconds_sum` across the call), i.e. the plugin's exec, parsing, control-socket round trip and ztunnel's ACK.".into());
    fig.notes.push("iptables: `iptables-nft-restore --noflush` of upstream's in-pod IPv4 rules, exec'd inside the pod's namespace (v4+v6: with `ip6tables-nft-restore`); ip netns exec: what running it through `ip netns exec` adds (`ip netns exec <pod> true`).".into());
    Ok(fig)
}

/// One caller's lone pods, batch and unenrollments, into the running agent.
struct CallerRun<'a> {
    env: &'a Env,
    caller: &'a dyn Enroller,
    prefix: &'static str,
    cases: &'a Cases,
}

impl CallerRun<'_> {
    fn measure(
        &self,
        pods: &[CheapPod],
        singles: usize,
        rows: &mut Rows,
        problems: &mut Vec<String>,
    ) -> Result<()> {
        let (lone, batched) = pods.split_at(singles);
        let to_traffic = match self.caller.name() {
            "CLI" => "sluice · to traffic".to_string(),
            other => format!("sluice · to traffic ({other})"),
        };
        for (i, pod) in lone.iter().enumerate() {
            stop::check()?;
            let uid = format!("bench-{}-lone-{i}", self.prefix);
            let mut probe = Client::start(&self.env.bench, &pod.path, &self.env.cgroup)?;
            probe.send(&Job::Probe {
                addr: ports::dest(0, ports::CLOSE),
                interval_us: 200,
                deadline_ms: WAIT.as_millis() as u64,
            })?;
            probe.wait_event("probing", WAIT)?;
            let t0 = mono_ns();
            let e = self.caller.enroll(&pod_ref(&uid, pod))?;
            let r = probe.result(WAIT + WAIT)?;
            self.record(rows, self.cases.lone, &e);
            match r.first_success_ns {
                Some(t) => rows
                    .acc(&to_traffic, self.cases.lone)
                    .add_sample(t.saturating_sub(t0) as f64 / 1e6),
                None => {
                    rows.acc(&to_traffic, self.cases.lone)
                        .add_error("never redirected");
                    problems.push(format!("lone pod {uid}: no connection reached the peer"));
                }
            }
            let t = self.caller.unenroll(&uid)?;
            rows.acc(&self.unenroll_row(), self.cases.lone)
                .add_sample(ms(t));
        }
        let mut uids = Vec::new();
        for (i, pod) in batched.iter().enumerate() {
            stop::check()?;
            let uid = format!("bench-{}-batch-{i}", self.prefix);
            let e = self.caller.enroll(&pod_ref(&uid, pod))?;
            self.record(rows, &self.cases.batch, &e);
            uids.push(uid);
        }
        for uid in uids {
            stop::check()?;
            let t = self
                .caller
                .unenroll(&uid)
                .with_context(|| format!("letting go of {uid}"))?;
            rows.acc(&self.unenroll_row(), &self.cases.batch)
                .add_sample(ms(t));
        }
        Ok(())
    }

    fn unenroll_row(&self) -> String {
        match self.caller.name() {
            "CLI" => "sluice · CLI unenroll".into(),
            _ => "sluice · CNI DEL".into(),
        }
    }

    fn record(&self, rows: &mut Rows, case: &str, e: &Enrolled) {
        let name = self.caller.name();
        rows.acc(&format!("sluice · {name}"), case)
            .add_sample(ms(e.caller));
        match (name, e.agent) {
            ("CLI", Some(agent)) => rows.acc("sluice · agent", case).add_sample(ms(agent)),
            (_, Some(agent)) => rows
                .acc(&format!("sluice · {name} beyond the agent"), case)
                .add_sample(ms(e.caller.saturating_sub(agent))),
            (_, None) => {}
        }
    }
}

fn pod_ref<'a>(uid: &'a str, pod: &'a CheapPod) -> PodRef<'a> {
    PodRef {
        uid,
        netns: &pod.path,
        ip: pod.ip,
    }
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
