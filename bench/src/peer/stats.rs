//! What the peer saw, for the driver to check that traffic really went through it.
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;
use sluice_tests::sockets::OrigDstFrom;

#[derive(Debug, Default)]
pub struct Stats {
    outbound_sol_ip: AtomicU64,
    outbound_sol_ipv6: AtomicU64,
    outbound_local: AtomicU64,
    outbound_at_orig: AtomicU64,
    inbound: AtomicU64,
    upstream_failed: AtomicU64,
    dns: AtomicU64,
    errors: AtomicU64,
    workloads: AtomicU64,
}

#[derive(Debug, Serialize)]
pub struct Snapshot {
    /// Outbound connections by where their original destination came from.
    pub outbound_sol_ip: u64,
    pub outbound_sol_ipv6: u64,
    pub outbound_local: u64,
    /// Outbound connections whose accepted socket's local address is their original
    /// destination (a TPROXY-like hand-over: Sluice's `sk_lookup`; not iptables' REDIRECT).
    pub outbound_at_orig: u64,
    pub inbound: u64,
    pub upstream_failed: u64,
    pub dns: u64,
    pub errors: u64,
    pub workloads: u64,
}

impl Stats {
    pub fn outbound(&self, from: OrigDstFrom) {
        match from {
            OrigDstFrom::SolIp => &self.outbound_sol_ip,
            OrigDstFrom::SolIpv6 => &self.outbound_sol_ipv6,
            OrigDstFrom::Local => &self.outbound_local,
        }
        .fetch_add(1, Relaxed);
    }
    pub fn outbound_at_orig(&self) {
        self.outbound_at_orig.fetch_add(1, Relaxed);
    }
    pub fn inbound(&self) {
        self.inbound.fetch_add(1, Relaxed);
    }
    pub fn upstream_failed(&self) {
        self.upstream_failed.fetch_add(1, Relaxed);
    }
    pub fn dns(&self) {
        self.dns.fetch_add(1, Relaxed);
    }
    pub fn error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }
    pub fn workloads(&self, delta: i64) {
        if delta >= 0 {
            self.workloads.fetch_add(delta as u64, Relaxed);
        } else {
            self.workloads.fetch_sub(delta.unsigned_abs(), Relaxed);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            outbound_sol_ip: self.outbound_sol_ip.load(Relaxed),
            outbound_sol_ipv6: self.outbound_sol_ipv6.load(Relaxed),
            outbound_local: self.outbound_local.load(Relaxed),
            outbound_at_orig: self.outbound_at_orig.load(Relaxed),
            inbound: self.inbound.load(Relaxed),
            upstream_failed: self.upstream_failed.load(Relaxed),
            dns: self.dns.load(Relaxed),
            errors: self.errors.load(Relaxed),
            workloads: self.workloads.load(Relaxed),
        }
    }
}
