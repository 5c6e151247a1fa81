//! `sluice-bench run`: every setup on the same pods, peer, client and destination app, in one
//! run, then the report. Rounds interleave the setups (floor, iptables, sluice, sluice+accel,
//! floor, ...) so the machine's noise spreads evenly over them.
mod enroll;
mod enroller;
mod exec;
mod kube_label;
mod procs;
mod procstat;
mod results;
mod rules;
mod sanity;
mod scale;
mod setup;
mod topo;
mod traffic;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use sluice_tests::harness::{Cgroup, ensure_bpffs_mounted, require_root};

pub use results::{Figure, Results, Row};

use self::procs::Server;
use self::results::Meta;
use self::setup::Setup;
use self::topo::Topo;

/// How much of everything: the full run and `--quick`.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    pub rounds: u32,
    /// Figure 1: short connections per round.
    pub connects: u64,
    /// Figure 2: connections in the churn run.
    pub churn: u64,
    /// Figure 3: round trips per size per round.
    pub round_trips: u64,
    /// Figure 4: bytes per connection, repeats per round.
    pub stream_bytes: u64,
    pub stream_repeats: u32,
    /// Figure 5: queries per mode per round.
    pub dns: u64,
    /// Figure 6: lone enrollments, and the back-to-back batch.
    pub enroll_single: usize,
    pub enroll_batch: usize,
    /// Figure 7: pods on the node.
    pub scale_pods: usize,
    /// Figure 8: connections per cost measurement.
    pub cost_connects: u64,
    /// Figure 9: running pods in the namespace that is labelled.
    pub label_pods: usize,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                rounds: 1,
                connects: 300,
                churn: 2_000,
                round_trips: 300,
                stream_bytes: 8 << 20,
                stream_repeats: 1,
                dns: 200,
                enroll_single: 2,
                enroll_batch: 10,
                scale_pods: 30,
                cost_connects: 1_000,
                label_pods: 10,
            }
        } else {
            Plan {
                quick,
                // More, shorter rounds: the machine's noise drifts over minutes, and each
                // setup should see as many of its moods as the others.
                rounds: 5,
                connects: 1_800,
                churn: 40_000,
                round_trips: 1_800,
                stream_bytes: 128 << 20,
                stream_repeats: 2,
                dns: 1_200,
                enroll_single: 10,
                enroll_batch: 100,
                scale_pods: 1_000,
                cost_connects: 6_000,
                label_pods: 100,
            }
        }
    }
}

/// What every figure runs against.
pub struct Env {
    pub bench: PathBuf,
    pub cgroup: Cgroup,
    pub topo: Topo,
    _server: Server,
}

impl Env {
    fn new() -> Result<Env> {
        let bench = std::env::current_exe().context("locating sluice-bench")?;
        let agent = sluice_tests::agent_proc::agent_bin();
        if !agent.exists() {
            bail!(
                "{} is missing: build it (cargo xtask bench does), or set SLUICE_AGENT_BIN",
                agent.display()
            );
        }
        ensure_bpffs_mounted()?;
        let cgroup = Cgroup::new("sbench")?;
        let topo = Topo::new()?;
        let server = Server::start(&bench, topo.dest().path(), &cgroup)?;
        Ok(Env {
            bench,
            cgroup,
            topo,
            _server: server,
        })
    }
}

/// Prints one progress line (stderr, so stdout stays clean).
pub fn progress(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

pub fn run(quick: bool, out: &Path) -> Result<()> {
    if !require_root() {
        bail!("the bench creates network namespaces and loads eBPF: run it as root");
    }
    crate::stop::install()?;
    let started = Instant::now();
    let plan = Plan::new(quick);
    progress(format!(
        "{} run: {} round(s) of floor, iptables, sluice, sluice+accel",
        if quick { "quick" } else { "full" },
        plan.rounds
    ));
    let env = Env::new()?;
    progress("topology ready: node, destination pod with 200 addresses, destination app");
    let mut figures = traffic::run(&env, &plan)?;
    figures.push(enroll::run(&env, &plan)?);
    figures.push(scale::run(&env, &plan)?);
    figures.push(kube_label::run(&env, &plan)?);
    figures.sort_by_key(|f| f.id);
    drop(env);
    let mut results = Results {
        meta: Meta {
            quick,
            rounds: plan.rounds,
            kernel: kernel(),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            wall_s: started.elapsed().as_secs_f64(),
            setups: Setup::ALL.iter().map(|s| s.name().to_string()).collect(),
        },
        figures,
        problems: Vec::new(),
    };
    results.problems = sanity::check(&results);
    crate::report::write(out, &results)?;
    progress(format!(
        "done in {:.0} s; results in {}",
        results.meta.wall_s,
        out.display()
    ));
    if !results.problems.is_empty() {
        bail!(
            "the results are not sane:\n  {}",
            results.problems.join("\n  ")
        );
    }
    Ok(())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
