//! What the driver asks a client process to do (one JSON job per stdin line) and what it
//! answers (one `{"event":"result",...}` line per job). Every job is bounded in count and time.
use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "job", rename_all = "snake_case")]
pub enum Job {
    /// Short connections, round robin over `addrs`: connect, read the first byte, then either
    /// close at once (`client_closes`) or wait for the server to close. Sample: connect() to
    /// the first byte, µs.
    Connect {
        addrs: Vec<SocketAddr>,
        count: u64,
        client_closes: bool,
        deadline_ms: u64,
    },
    /// One long connection to an echo server: `count` messages of `size` bytes, each sent
    /// and read back before the next. Sample: one round trip, µs.
    RequestResponse {
        addr: SocketAddr,
        size: usize,
        count: u64,
        deadline_ms: u64,
    },
    /// `parallel` connections to a sink, each sending `bytes` and reading the sink's count,
    /// `repeats` times. Sample: aggregate Gbit/s of one repeat.
    Stream {
        addr: SocketAddr,
        bytes: u64,
        parallel: usize,
        repeats: u32,
        deadline_ms: u64,
    },
    /// DNS queries over UDP from a new socket each (`connected`: connect+send as glibc does,
    /// else sendto as musl does). Sample: query to answer, µs.
    Dns {
        server: SocketAddr,
        count: u64,
        connected: bool,
        deadline_ms: u64,
    },
    /// Connects to `addr` every `interval_us` until a connection is established (each attempt
    /// a new socket, given 5 ms); answers `{"event":"probing"}` first, so the caller can start
    /// the clock after it.
    Probe {
        addr: SocketAddr,
        interval_us: u64,
        deadline_ms: u64,
    },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct JobResult {
    /// One value per success (unit: see the job).
    pub samples: Vec<f64>,
    pub attempts: u64,
    /// Failed attempts by errno name (`EADDRNOTAVAIL`, ...) or `eof`, `short`, `bad_reply`.
    pub errors: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    /// TCP connections that were established (the peer must have seen at least these).
    pub connections: u64,
    /// Probe: CLOCK_MONOTONIC ns of the first success.
    #[serde(default)]
    pub first_success_ns: Option<u64>,
    /// The deadline ended the job before `count`.
    #[serde(default)]
    pub timed_out: bool,
    /// Blocking reads and writes that failed with `EAGAIN` before their timeout, and were
    /// retried (see `client::patient`); a blocking application that takes `EAGAIN` for the
    /// timeout it means would have failed that many times.
    #[serde(default)]
    pub early_eagain: u64,
}

impl JobResult {
    pub fn error(&mut self, kind: impl Into<String>) {
        *self.errors.entry(kind.into()).or_default() += 1;
    }
}
