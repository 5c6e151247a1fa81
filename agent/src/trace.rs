//! `sluice-agent trace`: live redirect decisions for control-socket clients.
//!
//! The programs write decisions to a ring buffer only while the `GLOBAL_TRACE` flag is set.
//! The first client turns it on and starts the one reader of the ring buffer; every client gets
//! what it reads (filtered to its pod), and the last one to leave turns it off again. With no
//! client attached nothing is written and nothing in userspace wakes up.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::{io::unix::AsyncFd, sync::broadcast, task::JoinHandle};
use tracing::warn;

use crate::{
    agent::Agent,
    dataplane::{Dataplane, TraceRecord},
};

/// Records a slow client may fall behind by before it misses some.
const BACKLOG: usize = 4096;

/// One line of a trace stream.
#[derive(Debug, Clone, Serialize)]
pub struct TraceLine {
    /// `namespace/name`, if the pod is known.
    pub pod: Option<String>,
    #[serde(flatten)]
    pub record: TraceRecord,
}

struct Hub {
    tx: broadcast::Sender<TraceRecord>,
    state: Mutex<HubState>,
}

#[derive(Default)]
struct HubState {
    clients: usize,
    reader: Option<JoinHandle<()>>,
}

fn hub() -> &'static Hub {
    static HUB: OnceLock<Hub> = OnceLock::new();
    HUB.get_or_init(|| Hub {
        tx: broadcast::channel(BACKLOG).0,
        state: Mutex::new(HubState::default()),
    })
}

/// A client's subscription; dropping it detaches the client.
pub struct Subscription {
    pub rx: broadcast::Receiver<TraceRecord>,
    dp: Arc<Dataplane>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut st = hub().state.lock().unwrap_or_else(|p| p.into_inner());
        st.clients -= 1;
        if st.clients == 0 {
            if let Err(e) = self.dp.set_trace(false) {
                warn!(error = %e, "turning tracing off");
            }
            if let Some(reader) = st.reader.take() {
                reader.abort();
            }
        }
    }
}

/// Attaches a trace client (on the agent's runtime).
pub fn subscribe(dp: &Arc<Dataplane>) -> Result<Subscription, crate::dataplane::Error> {
    let hub = hub();
    let mut st = hub.state.lock().unwrap_or_else(|p| p.into_inner());
    let rx = hub.tx.subscribe();
    if st.clients == 0 {
        let reader = dp.trace_reader()?;
        dp.set_trace(true)?;
        let tx = hub.tx.clone();
        st.reader = Some(tokio::spawn(read(reader, tx)));
    }
    st.clients += 1;
    Ok(Subscription {
        rx,
        dp: Arc::clone(dp),
    })
}

async fn read(reader: crate::dataplane::TraceReader, tx: broadcast::Sender<TraceRecord>) {
    // SAFETY: the reader owns its ring buffer fd for as long as the AsyncFd lives.
    let registered =
        unsafe { AsyncFd::register_with_interest(reader, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e.into_parts().1, "cannot poll the trace ring buffer");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        for record in guard.get_inner_mut().drain() {
            // No receiver left only means the last client is leaving.
            let _ = tx.send(record);
        }
        guard.clear_ready();
    }
}

/// Names records by pod, and says whether one is about the pod a client asked for.
pub struct PodNames {
    agent: Arc<Agent>,
    by_cookie: HashMap<u64, String>,
    by_ip: HashMap<IpAddr, String>,
    refreshed: Option<Instant>,
}

impl PodNames {
    pub fn new(agent: Arc<Agent>) -> Self {
        let mut names = PodNames {
            agent,
            by_cookie: HashMap::new(),
            by_ip: HashMap::new(),
            refreshed: None,
        };
        names.refresh();
        names
    }

    fn refresh(&mut self) {
        // At most once a second, however many records name an unknown pod.
        if self
            .refreshed
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.refreshed = Some(Instant::now());
        self.by_cookie.clear();
        self.by_ip.clear();
        for p in self.agent.pod_records() {
            let name = format!("{}/{}", p.namespace, p.name);
            for ip in &p.ips {
                self.by_ip.insert(*ip, name.clone());
            }
            self.by_cookie.insert(p.netns_cookie, name);
        }
    }

    fn lookup(&self, r: &TraceRecord) -> Option<String> {
        self.by_cookie
            .get(&r.netns)
            .or_else(|| r.pod_addr.and_then(|ip| self.by_ip.get(&ip)))
            .cloned()
    }

    /// The pod a record is about (`namespace/name`).
    pub fn name(&mut self, r: &TraceRecord) -> Option<String> {
        if let Some(name) = self.lookup(r) {
            return Some(name);
        }
        self.refresh();
        self.lookup(r)
    }

    /// Whether `namespace/name` is an enrolled pod.
    pub fn knows(&mut self, pod: &str) -> bool {
        self.refreshed = None;
        self.refresh();
        self.by_cookie.values().any(|n| n == pod)
    }
}
