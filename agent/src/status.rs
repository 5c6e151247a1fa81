//! What `sluice-agent status` reports: collected from the pod table, ztunnel's answers and
//! the dataplane, and rendered as tables.
use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::{agent::Agent, dataplane::LinkStatus, zds::AckState};

/// Gathers the status. Blocking (it asks the kernel about links, maps and counters): call it on
/// the blocking pool. Takes no pod's operation lock, so it never waits for an enrollment.
pub fn collect(agent: &Agent) -> Status {
    let states = agent.hub.states();
    let pods = agent
        .pods
        .records()
        .into_iter()
        .map(|r| PodStatus {
            ztunnel: states.get(&r.uid).cloned().unwrap_or(AckState::Pending),
            uid: r.uid,
            name: r.name,
            namespace: r.namespace,
            netns: r.netns.display().to_string(),
            netns_cookie: r.netns_cookie,
            ips: r.ips,
            dns_capture: r.dns_capture,
            bypass_inbound: r.bypass_inbound,
            ipv6: r.ipv6,
            container_id: r.container_id,
        })
        .collect();
    let (object_id, links, maps, counters) = {
        let dp = agent.dp();
        (
            dp.object_id().to_string(),
            dp.links(),
            dp.map_fill(),
            dp.counters(),
        )
    };
    Status {
        ready: agent.is_ready(),
        object_id,
        ztunnel_connections: agent.hub.connections(),
        pods,
        links,
        maps: maps
            .into_iter()
            .map(|m| MapFillStatus {
                name: m.name.to_string(),
                used: m.used,
                capacity: m.capacity,
            })
            .collect(),
        counters: counters
            .into_iter()
            .map(|(c, v)| (c.name().to_string(), v))
            .collect(),
    }
}

/// One pod as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodStatus {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub netns: String,
    pub netns_cookie: u64,
    pub ips: Vec<IpAddr>,
    pub dns_capture: bool,
    pub bypass_inbound: bool,
    #[serde(default = "yes")]
    pub ipv6: bool,
    pub ztunnel: AckState,
    /// Set when the pod was enrolled by a CNI ADD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub ready: bool,
    pub object_id: String,
    pub ztunnel_connections: usize,
    pub pods: Vec<PodStatus>,
    pub links: Vec<LinkStatus>,
    pub maps: Vec<MapFillStatus>,
    pub counters: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapFillStatus {
    pub name: String,
    pub used: usize,
    pub capacity: usize,
}

fn yes() -> bool {
    true
}

/// Renders a status as the human-readable tables of `sluice-agent status`.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "agent: {}   ztunnel connections: {}   eBPF object: {}",
        if s.ready { "ready" } else { "not ready" },
        s.ztunnel_connections,
        s.object_id
    );
    let _ = writeln!(out, "\nPODS ({})", s.pods.len());
    let rows: Vec<Vec<String>> = s
        .pods
        .iter()
        .map(|p| {
            let ips: Vec<String> = p.ips.iter().map(ToString::to_string).collect();
            let ztunnel = match &p.ztunnel {
                AckState::Pending => "pending".to_string(),
                AckState::Acked => "acked".to_string(),
                AckState::Nacked(e) => format!("nacked: {e}"),
            };
            let mut opts = vec![];
            if !p.dns_capture {
                opts.push("no-dns");
            }
            if p.bypass_inbound {
                opts.push("bypass-inbound");
            }
            if !p.ipv6 {
                opts.push("no-ipv6");
            }
            vec![
                format!("{}/{}", p.namespace, p.name),
                p.uid.clone(),
                p.netns.clone(),
                ips.join(","),
                ztunnel,
                opts.join(","),
            ]
        })
        .collect();
    table(
        &mut out,
        &["POD", "UID", "NETNS", "IPS", "ZTUNNEL", "OPTIONS"],
        &rows,
    );
    let _ = writeln!(out, "\nLINKS ({})", s.links.len());
    let rows: Vec<Vec<String>> = s
        .links
        .iter()
        .map(|l| {
            vec![
                l.kind.clone(),
                l.pin.clone(),
                l.netns_cookie.map(|c| c.to_string()).unwrap_or_default(),
                l.link_id.to_string(),
                l.prog_id.to_string(),
            ]
        })
        .collect();
    table(
        &mut out,
        &["KIND", "PIN", "NETNS COOKIE", "LINK", "PROG"],
        &rows,
    );
    let _ = writeln!(out, "\nMAPS");
    let rows: Vec<Vec<String>> = s
        .maps
        .iter()
        .map(|m| vec![m.name.clone(), m.used.to_string(), m.capacity.to_string()])
        .collect();
    table(&mut out, &["MAP", "USED", "CAPACITY"], &rows);
    let _ = writeln!(out, "\nCOUNTERS");
    let rows: Vec<Vec<String>> = s
        .counters
        .iter()
        .map(|(k, v)| vec![k.clone(), v.to_string()])
        .collect();
    table(&mut out, &["COUNTER", "VALUE"], &rows);
    out
}

fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_string()
    };
    let _ = writeln!(out, "{}", line(header.to_vec()));
    for row in rows {
        let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
    }
}
