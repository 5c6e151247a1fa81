//! Figures 1–5 and 8: traffic from a client pod through the peer to the destination app, for
//! every setup, in interleaved rounds; then figure 2 (churn), once per setup, each on a fresh
//! pod so no TIME_WAIT socket of one setup is left in the way of the next.
//!
//! After every job the peer's counters must show the client's connections (or DNS queries)
//! arriving through it, with the original destination from SO_ORIGINAL_DST (floor: from the
//! local address): a setup whose traffic bypassed the peer is reported, never measured.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;

use super::procs::PeerStats;
use super::procstat;
use super::results::{Figure, Rows};
use super::setup::{Active, Setup};
use super::topo::DEST_ADDRS;
use super::{Env, Plan, progress};
use crate::proto::{Job, JobResult};
use crate::{floor, ports, stop};

/// Extra wait for a job's answer beyond its own deadline.
const SLACK: Duration = Duration::from_secs(30);
const WARM_UP_CONNECTS: u64 = 50;

/// Where the client dials destination `i` on `port`: the floor dials the peer itself.
fn target(setup: Setup, i: usize, port: u16) -> SocketAddr {
    let dst = ports::dest(i, port);
    match setup {
        Setup::Floor => floor::encode(dst).expect("destination addresses encode"),
        _ => dst,
    }
}

fn targets(setup: Setup, port: u16) -> Vec<SocketAddr> {
    (0..DEST_ADDRS).map(|i| target(setup, i, port)).collect()
}

fn dns_server(setup: Setup) -> SocketAddr {
    match setup {
        // No redirection: the client asks ztunnel's DNS port itself.
        Setup::Floor => "127.0.0.1:15053".parse().expect("literal"),
        _ => ports::DNS_SERVER,
    }
}

#[derive(Clone, Copy)]
enum Expect {
    Connections,
    DnsAnswers,
}

struct Runner<'a, 'e> {
    active: &'a mut Active<'e>,
    /// (figure, problem)
    problems: &'a mut Vec<(u8, String)>,
    /// Per (figure, setup): blocking calls the client retried after an early `EAGAIN`.
    eagain: &'a mut BTreeMap<(u8, &'static str), u64>,
}

impl Runner<'_, '_> {
    /// Runs `job`, then checks the peer saw what the client did.
    fn job(
        &mut self,
        fig: u8,
        what: &str,
        job: Job,
        deadline: Duration,
        expect: Expect,
    ) -> Result<JobResult> {
        stop::check()?;
        let before = self.active.peer.stats()?;
        let r = self.active.client.run(&job, deadline + SLACK)?;
        let after = self.active.peer.stats()?;
        let setup = self.active.setup;
        if r.early_eagain > 0 {
            *self.eagain.entry((fig, setup.name())).or_default() += r.early_eagain;
        }
        let (seen, made, how) = match expect {
            Expect::Connections => {
                let seen = if setup == Setup::Floor {
                    after.outbound_local - before.outbound_local
                } else {
                    redirected(&after) - redirected(&before)
                };
                (seen, r.connections, "connections")
            }
            Expect::DnsAnswers => (
                after.dns - before.dns,
                r.samples.len() as u64,
                "DNS answers",
            ),
        };
        if seen < made {
            self.problems.push((
                fig,
                format!(
                    "{} / {what}: the client got {made} {how} but the peer handled {seen}: traffic went around it",
                    setup.name()
                ),
            ));
        }
        // Sluice hands each connection to the peer's listener as TPROXY would: the accepted
        // socket's own local address is the original destination (what ztunnel falls back
        // to), and SO_ORIGINAL_DST says the same.
        let at_orig = after.outbound_at_orig - before.outbound_at_orig;
        if setup.is_sluice() && matches!(expect, Expect::Connections) && at_orig < made {
            self.problems.push((
                fig,
                format!(
                    "{} / {what}: {made} connections, but only {at_orig} reached the peer with their original destination as local address",
                    setup.name()
                ),
            ));
        }
        Ok(r)
    }

    /// Untimed traffic through the fresh pod, peer and agent before anything is measured.
    fn warm_up(&mut self) -> Result<()> {
        let setup = self.active.setup;
        let short = Duration::from_secs(30);
        self.job(
            1,
            "warm-up",
            Job::Connect {
                addrs: targets(setup, ports::CLOSE),
                count: WARM_UP_CONNECTS,
                client_closes: false,
                deadline_ms: short.as_millis() as u64,
            },
            short,
            Expect::Connections,
        )?;
        self.job(
            4,
            "warm-up",
            Job::Stream {
                addr: target(setup, 0, ports::SINK),
                bytes: 1 << 20,
                parallel: 1,
                repeats: 1,
                deadline_ms: short.as_millis() as u64,
            },
            short,
            Expect::Connections,
        )
        .map(drop)
    }
}

/// Outbound connections whose original destination came from SO_ORIGINAL_DST.
fn redirected(s: &PeerStats) -> u64 {
    s.outbound_sol_ip + s.outbound_sol_ipv6
}

pub fn run(env: &Env, plan: &Plan) -> Result<Vec<Figure>> {
    let (mut f1, mut f3, mut f4, mut f5, mut f8) = (
        Rows::default(),
        Rows::default(),
        Rows::default(),
        Rows::default(),
        Rows::default(),
    );
    let mut problems = Vec::new();
    let mut eagain = BTreeMap::new();
    let mut rss = Vec::new();
    let long = Duration::from_secs(if plan.quick { 30 } else { 180 });
    for round in 1..=plan.rounds {
        for setup in Setup::ALL {
            progress(format!(
                "round {round}/{}: {} — connect, request/response, throughput, DNS{}",
                plan.rounds,
                setup.name(),
                if setup.is_sluice() {
                    ", agent cost"
                } else {
                    ""
                }
            ));
            let mut active = Active::start(env, setup)?;
            let name = setup.name();
            let mut run = Runner {
                active: &mut active,
                problems: &mut problems,
                eagain: &mut eagain,
            };
            run.warm_up()?;
            let r = run.job(
                1,
                "connect",
                Job::Connect {
                    addrs: targets(setup, ports::CLOSE),
                    count: plan.connects,
                    client_closes: false,
                    deadline_ms: long.as_millis() as u64,
                },
                long,
                Expect::Connections,
            )?;
            f1.acc(name, "connect → first byte").add_job(&r);

            for (case, size) in [("1 B", 1usize), ("1 KiB", 1024)] {
                let r = run.job(
                    3,
                    &format!("request/response {case}"),
                    Job::RequestResponse {
                        addr: target(setup, 0, ports::ECHO),
                        size,
                        count: plan.round_trips,
                        deadline_ms: long.as_millis() as u64,
                    },
                    long,
                    Expect::Connections,
                )?;
                f3.acc(name, case).add_job(&r);
            }

            for (case, parallel) in [("1 connection", 1usize), ("8 in parallel", 8)] {
                let r = run.job(
                    4,
                    &format!("throughput {case}"),
                    Job::Stream {
                        addr: target(setup, 0, ports::SINK),
                        bytes: plan.stream_bytes / parallel as u64,
                        parallel,
                        repeats: plan.stream_repeats,
                        deadline_ms: long.as_millis() as u64,
                    },
                    long,
                    Expect::Connections,
                )?;
                f4.acc(name, case).add_job(&r);
            }

            for (case, connected) in [("connect+send (glibc)", true), ("sendto (musl)", false)] {
                let r = run.job(
                    5,
                    &format!("DNS {case}"),
                    Job::Dns {
                        server: dns_server(setup),
                        count: plan.dns,
                        connected,
                        deadline_ms: long.as_millis() as u64,
                    },
                    long,
                    Expect::DnsAnswers,
                )?;
                f5.acc(name, case).add_job(&r);
            }

            if let Some(pid) = run.active.agent.as_ref().map(|a| a.pid()).transpose()? {
                // Nobody scrapes, traces or asks for status while this runs.
                let cpu0 = procstat::cpu_seconds(pid)?;
                let r = run.job(
                    8,
                    "agent cost",
                    Job::Connect {
                        addrs: targets(setup, ports::CLOSE),
                        count: plan.cost_connects,
                        client_closes: false,
                        deadline_ms: long.as_millis() as u64,
                    },
                    long,
                    Expect::Connections,
                )?;
                let cpu = procstat::cpu_seconds(pid)? - cpu0;
                let acc = f8.acc(name, "agent CPU per 1,000 connections");
                if r.connections > 0 {
                    acc.add_sample(cpu * 1e3 / (r.connections as f64 / 1e3));
                } else {
                    acc.add_error("no connection");
                }
                if round == plan.rounds {
                    rss.push((name, procstat::rss_bytes(pid)?));
                }
            }
        }
    }

    let mut churn = Rows::default();
    for setup in Setup::ALL {
        progress(format!(
            "churn: {} — {} short connections to {DEST_ADDRS} addresses, client closes first",
            setup.name(),
            plan.churn
        ));
        let mut active = Active::start(env, setup)?;
        let mut run = Runner {
            active: &mut active,
            problems: &mut problems,
            eagain: &mut eagain,
        };
        let deadline = Duration::from_secs(if plan.quick { 60 } else { 300 });
        let r = run.job(
            2,
            "churn",
            Job::Connect {
                addrs: targets(setup, ports::WAIT_EOF),
                count: plan.churn,
                client_closes: true,
                deadline_ms: deadline.as_millis() as u64,
            },
            deadline,
            Expect::Connections,
        )?;
        progress(format!(
            "  {:.0} connections/s, errors {:?}{}",
            r.samples.len() as f64 / r.elapsed_s.max(1e-9),
            r.errors,
            if r.timed_out {
                " (stopped at the deadline)"
            } else {
                ""
            }
        ));
        churn
            .acc(setup.name(), "40,000 connections, 200 addresses")
            .add_job(&r);
    }

    let mut fig1 = Figure::new(1, "connect", "Connect latency", "µs");
    fig1.rows = f1.rows(false);
    fig1.notes.push(format!(
        "Short connections round robin over {DEST_ADDRS} destination addresses; the server writes one byte and closes first. {} per round.",
        plan.connects
    ));

    let mut fig2 = Figure::new(2, "churn", "Churn, client closes first", "µs");
    fig2.headline_rate = true;
    fig2.higher_is_better = true;
    fig2.rows = churn.rows(true);
    if plan.churn != 40_000 {
        for row in &mut fig2.rows {
            row.case = format!("{} connections, 200 addresses", plan.churn);
        }
    }
    fig2.notes.push("One client, one connection at a time, as fast as it can; each connection reads its first byte and closes (TIME_WAIT stays with the client). The headline is the rate of successful connections; EADDRNOTAVAIL is counted apart from other errors. Samples are per-connection times.".into());

    let mut fig3 = Figure::new(
        3,
        "request-response",
        "Request/response on one connection",
        "µs",
    );
    fig3.rows = f3.rows(false);
    fig3.notes.push(format!(
        "One long connection to an echo server; {} round trips per size per round.",
        plan.round_trips
    ));

    let mut fig4 = Figure::new(4, "throughput", "Throughput", "Gbit/s");
    fig4.higher_is_better = true;
    fig4.rows = f4.rows(false);
    fig4.notes.push(format!(
        "{} MiB per repeat (split over the parallel connections) into a sink, {} repeat(s) per round; each sample is one repeat's aggregate rate.",
        plan.stream_bytes >> 20,
        plan.stream_repeats
    ));

    let mut fig5 = Figure::new(5, "dns", "DNS over UDP", "µs");
    fig5.rows = f5.rows(false);
    fig5.notes.push(format!(
        "A new socket per query, as resolvers do; {} queries per mode per round, answered by the peer's DNS port.",
        plan.dns
    ));

    let mut fig8 = Figure::new(8, "agent-cost", "Agent cost with nobody watching", "ms CPU");
    fig8.rows = f8.rows(false);
    for (setup, bytes) in rss {
        fig8.fact(
            setup,
            "agent RSS after the cost run",
            bytes as f64 / (1 << 20) as f64,
            "MiB",
        );
    }
    fig8.notes.push(format!(
        "utime+stime of the agent process (/proc/<pid>/stat) over {} short connections, per 1,000; one sample per round. floor and iptables have no agent.",
        plan.cost_connects
    ));

    let mut figures = vec![fig1, fig2, fig3, fig4, fig5, fig8];
    for ((id, setup), n) in eagain {
        if let Some(f) = figures.iter_mut().find(|f| f.id == id) {
            f.fact(
                setup,
                "blocking reads/writes that failed with EAGAIN before their timeout (retried)",
                n as f64,
                "calls",
            );
        }
    }
    for (id, problem) in problems {
        if let Some(f) = figures.iter_mut().find(|f| f.id == id) {
            f.problems.push(problem);
        }
    }
    Ok(figures)
}
