//! Reading the programs' decisions (`SL_TRACE`), for `sluice-agent trace`. The programs write
//! there only while the `GLOBAL_TRACE` flag is set (`Dataplane::set_trace`).
use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
};

use aya::maps::{Map, MapData, RingBuf};
use sluice_common::{Decision, TraceEvent, maps};

use super::{Error, PinLayout};

/// One decision, as userspace sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TraceRecord {
    /// The pod's netns cookie, or 0 where the program could not tell (`sk_lookup`).
    pub netns: u64,
    /// The pod-side address of the connection (`sk_lookup`), by which its pod is found.
    pub pod_addr: Option<IpAddr>,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// `redirected`, `exempt` or `dropped`.
    pub verdict: &'static str,
    pub reason: &'static str,
    /// For decisions at socket lookup: the interface the connection arrived on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ifindex: Option<u32>,
}

impl TraceRecord {
    fn from_event(ev: &TraceEvent) -> Option<TraceRecord> {
        let decision = Decision::from_u32(ev.decision)?;
        let pod_addr = IpAddr::from(ev.pod_addr);
        Some(TraceRecord {
            netns: ev.netns,
            pod_addr: (!ev.pod_addr.is_unspecified()).then_some(pod_addr),
            src: SocketAddr::new(ev.src.into(), ev.sport),
            dst: SocketAddr::new(ev.dst.into(), ev.dport),
            verdict: decision.verdict(),
            reason: decision.reason(),
            ifindex: (ev.ifindex != 0).then_some(ev.ifindex),
        })
    }
}

/// The consumer side of the trace ring buffer. Poll its fd for readability, then `drain`.
pub struct TraceReader {
    ring: RingBuf<MapData>,
}

impl TraceReader {
    pub fn open(layout: &PinLayout) -> Result<Self, Error> {
        let pin = layout.maps().join(maps::TRACE);
        let data = MapData::from_pin(&pin).map_err(|source| Error::Map {
            name: maps::TRACE,
            source,
        })?;
        let ring = RingBuf::try_from(Map::RingBuf(data)).map_err(|source| Error::Map {
            name: maps::TRACE,
            source,
        })?;
        Ok(TraceReader { ring })
    }

    /// Every record written since the last call.
    pub fn drain(&mut self) -> Vec<TraceRecord> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<TraceEvent>() {
                // SAFETY: the programs write whole TraceEvents; read unaligned from the ring.
                let ev: TraceEvent =
                    unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<TraceEvent>()) };
                out.extend(TraceRecord::from_event(&ev));
            }
        }
        out
    }
}

impl AsFd for TraceReader {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl AsRawFd for TraceReader {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}
