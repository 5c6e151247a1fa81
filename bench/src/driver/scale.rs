//! Figure 7: one node with many enrolled pods (1,000 in the full run). Two of them are real
//! pods with a veth (the first and the last enrolled), the rest cheap ones. Enrollment time of
//! the first 10 against the last 10, connect latency in the first and the last pod, the BPF
//! map memory and RSS of the agent before and after, and what one `/metrics` scrape costs.
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use sluice_tests::agent_proc::METRICS_PORT;

use super::enroller::{Cli, Enroller, PodRef};
use super::procs::{Agent, Client, Peer};
use super::procstat;
use super::results::{Figure, Rows};
use super::topo::{CheapPods, DEST_ADDRS};
use super::{Env, Plan, progress};
use crate::proto::Job;
use crate::{ports, stop};

const WAIT: Duration = Duration::from_secs(20);
const SCRAPES: usize = 10;
const EDGE: usize = 10;

pub fn run(env: &Env, plan: &Plan) -> Result<Figure> {
    let n = plan.scale_pods.max(2 * EDGE);
    progress(format!("scale: making {n} pods"));
    let first = env.topo.client_pod()?;
    let last = env.topo.client_pod()?;
    let cheap = CheapPods::new(n - 2, 0)?;
    let node = env.topo.node().path();
    let agent = Agent::start(node, &env.cgroup, false)?;
    let pid = agent.pid()?;
    let zds = agent.zds_socket().display().to_string();
    let mut peer = Peer::start(&env.bench, node, &env.cgroup, &["--zds", &zds])?;
    peer.wait_event("zds_connected", WAIT)?;
    let cli = Cli { agent: &agent };

    let mut fig = Figure::new(7, "scale", &format!("Scale: {n} pods on one node"), "ms");
    let (maps0, memlock0) = procstat::map_memory(pid)?;
    let rss0 = procstat::rss_bytes(pid)?;

    let mut pods: Vec<PodRef<'_>> = vec![PodRef {
        uid: "",
        netns: first.path(),
        ip: first.ip,
    }];
    pods.extend(cheap.pods().iter().map(|p| PodRef {
        uid: "",
        netns: &p.path,
        ip: p.ip,
    }));
    pods.push(PodRef {
        uid: "",
        netns: last.path(),
        ip: last.ip,
    });
    let mut rows = Rows::default();
    let started = Instant::now();
    for (i, pod) in pods.iter().enumerate() {
        stop::check()?;
        let uid = format!("bench-scale-{i}");
        let e = cli.enroll(&PodRef { uid: &uid, ..*pod })?;
        let case = if i < EDGE {
            Some("enroll, first 10")
        } else if i >= n - EDGE {
            Some("enroll, last 10")
        } else {
            None
        };
        if let Some(case) = case {
            if let Some(a) = e.agent {
                rows.acc("sluice · agent", case)
                    .add_sample(a.as_secs_f64() * 1e3);
            }
            rows.acc("sluice · CLI", case)
                .add_sample(e.caller.as_secs_f64() * 1e3);
        }
        if (i + 1) % 100 == 0 {
            progress(format!(
                "  {} pods enrolled ({:.0} s)",
                i + 1,
                started.elapsed().as_secs_f64()
            ));
        }
    }

    let mut problems = Vec::new();
    for (case, pod) in [("connect, pod 1", &first), ("connect, last pod", &last)] {
        progress(format!("scale: {case}"));
        let mut client = Client::start(&env.bench, pod.path(), &env.cgroup)?;
        let before = peer.stats()?;
        let r = client.run(
            &Job::Connect {
                addrs: (0..DEST_ADDRS)
                    .map(|i| ports::dest(i, ports::CLOSE))
                    .collect(),
                count: plan.connects,
                client_closes: false,
                deadline_ms: 120_000,
            },
            Duration::from_secs(150),
        )?;
        let after = peer.stats()?;
        let seen = after.outbound_sol_ip + after.outbound_sol_ipv6
            - before.outbound_sol_ip
            - before.outbound_sol_ipv6;
        if seen < r.connections {
            problems.push(format!(
                "scale / {case}: {} connections but the peer handled {seen}",
                r.connections
            ));
        }
        rows.acc("sluice", case).add_job(&r);
        rows.set_unit("sluice", case, "µs");
    }

    progress("scale: map memory, RSS, /metrics");
    let (maps1, memlock1) = procstat::map_memory(pid)?;
    let rss1 = procstat::rss_bytes(pid)?;
    let cpu0 = procstat::cpu_seconds(pid)?;
    let mut body_len = 0;
    for _ in 0..SCRAPES {
        let t0 = Instant::now();
        let (code, body) = agent.proc.http_get(METRICS_PORT, "/metrics")?;
        let took = t0.elapsed();
        ensure!(code == 200, "/metrics answered {code}");
        body_len = body.len();
        rows.acc("sluice", "/metrics scrape")
            .add_sample(took.as_secs_f64() * 1e3);
    }
    let scrape_cpu = (procstat::cpu_seconds(pid)? - cpu0) / SCRAPES as f64;

    fig.rows = rows.rows(false);
    fig.problems = problems;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    fig.fact("sluice", "BPF maps held by the agent", maps1 as f64, "maps");
    fig.fact(
        "sluice",
        "map memory (memlock), 0 pods",
        mib(memlock0),
        "MiB",
    );
    fig.fact(
        "sluice",
        &format!("map memory (memlock), {n} pods"),
        mib(memlock1),
        "MiB",
    );
    fig.fact("sluice", "agent RSS, 0 pods", mib(rss0), "MiB");
    fig.fact("sluice", &format!("agent RSS, {n} pods"), mib(rss1), "MiB");
    fig.fact(
        "sluice",
        "agent CPU per /metrics scrape",
        scrape_cpu * 1e3,
        "ms",
    );
    fig.fact("sluice", "/metrics body", body_len as f64 / 1024.0, "KiB");
    fig.notes.push(format!(
        "Pods enrolled one after another with `sluice-agent enroll`; the first and the last have a veth to the node, the others a dummy interface. Maps at 0 pods: {maps0}. Memory is the kernel's memlock figure of each map the agent holds (/proc/<pid>/fdinfo)."
    ));
    Ok(fig)
}
