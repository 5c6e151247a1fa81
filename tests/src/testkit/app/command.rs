//! The commands `sluice-testkit app` accepts, one JSON object per stdin line.
//! Every command may carry a `"seq"` that is echoed in its response.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// TCP server on `[::]:port` (or `bind:port`): banner, then echo.
    Listen {
        port: u16,
        bind: Option<IpAddr>,
    },
    /// Connect, (send `preface`), read the banner, optionally send one line and read its
    /// echo, close.
    Connect(Dial),
    /// Like `connect` (without `send`) but keep the connection under `id`.
    Hold {
        id: String,
        #[serde(flatten)]
        dial: Dial,
    },
    /// Send one line on a held connection and read the echo.
    Ping {
        id: String,
        send: String,
        timeout_ms: Option<u64>,
    },
    Close {
        id: String,
    },
    DnsUdp {
        server: SocketAddr,
        #[serde(default)]
        connected: bool,
        #[serde(flatten)]
        opts: SocketOpts,
    },
    DnsTcp {
        server: SocketAddr,
        #[serde(flatten)]
        opts: SocketOpts,
    },
    /// Background connect+banner+close loop until `loop_stop` (or a safety limit).
    LoopStart {
        id: String,
        addr: SocketAddr,
        interval_ms: Option<u64>,
        #[serde(flatten)]
        opts: SocketOpts,
    },
    LoopStop {
        id: String,
    },
    /// One unconnected UDP socket sends an `example.com A` query to each server in turn, then
    /// reads as many replies (musl's resolver does this with all its nameservers).
    DnsUdpMulti {
        servers: Vec<SocketAddr>,
        #[serde(flatten)]
        opts: SocketOpts,
    },
    /// A minimal ztunnel outbound listener (`[::]:port`, transparent, marked 0x539) that
    /// accepts, reads each connection's original destination the way ztunnel does, and
    /// closes it: cheap enough for churn. No events; counts on `sink_stop`. With `hold`, it
    /// keeps each connection after the client's close and closes them all at `sink_stop`.
    SinkStart {
        port: u16,
        #[serde(default)]
        hold: bool,
    },
    SinkStop,
    /// `count` connects round-robin over `addrs`, each closed at once by the client (no
    /// banner read): short-connection churn.
    Churn {
        addrs: Vec<SocketAddr>,
        count: u64,
        #[serde(flatten)]
        opts: SocketOpts,
    },
    /// `parallel` connections to a `listen` server at once, each sending `bytes` of a known
    /// pattern and checking every echoed byte (`timeout_ms` bounds each read and write).
    Bulk {
        addr: SocketAddr,
        bytes: u64,
        parallel: usize,
        #[serde(flatten)]
        opts: SocketOpts,
    },
}

/// Where and how to connect.
#[derive(Clone, Debug, Deserialize)]
pub struct Dial {
    pub addr: SocketAddr,
    /// A line sent right after connecting, before the banner is read (e.g. the
    /// `CONNECT <ip:port>` line the testkit peer expects on its HBONE port).
    pub preface: Option<String>,
    pub send: Option<String>,
    #[serde(flatten)]
    pub opts: SocketOpts,
}

/// Options any client socket accepts.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
pub struct SocketOpts {
    /// Bind the source address (port 0) before connecting.
    pub bind: Option<IpAddr>,
    /// SO_MARK to set before connecting (e.g. 1337 to look like ztunnel).
    pub mark: Option<u32>,
    /// Connect and per-read timeout; default 3000 ms.
    pub timeout_ms: Option<u64>,
    /// IPv4: send without the don't-fragment bit (`IP_PMTUDISC_DONT`), so that a smaller MTU
    /// on the way fragments the segments.
    #[serde(default)]
    pub fragmentable: bool,
}

pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(3000);

impl SocketOpts {
    pub fn timeout(&self) -> Duration {
        self.timeout_ms
            .map(Duration::from_millis)
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_TIMEOUT)
    }
}
