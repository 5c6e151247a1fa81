//! Decisions for `sluice-agent trace`. Nothing is written unless a trace client is attached
//! (the agent sets `GLOBAL_TRACE` while one is): one array lookup is all it costs otherwise.
use sluice_common::{Addr, Counter, Decision, GLOBAL_TRACE, TraceEvent};

use crate::{
    counters::bump,
    maps::{TRACE, global_config},
};

/// The connection a decision is about.
pub struct Conn {
    pub netns: u64,
    pub pod_addr: Addr,
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub ifindex: u32,
}

#[inline(always)]
pub fn enabled() -> bool {
    global_config().flags & GLOBAL_TRACE != 0
}

/// Reports `decision` if someone is watching; `conn` is only built then.
#[inline(always)]
pub fn trace(decision: Decision, conn: impl FnOnce() -> Conn) {
    if !enabled() {
        return;
    }
    let c = conn();
    let ev = TraceEvent {
        netns: c.netns,
        pod_addr: c.pod_addr,
        src: c.src,
        dst: c.dst,
        sport: c.sport,
        dport: c.dport,
        decision: decision as u32,
        ifindex: c.ifindex,
        _pad: 0,
    };
    if TRACE.output::<TraceEvent>(&ev, 0).is_err() {
        bump(Counter::TraceLost);
    }
}
