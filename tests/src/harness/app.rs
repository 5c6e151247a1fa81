use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::cgroup::Cgroup;
use super::process::{DEFAULT_TIMEOUT, Proc};

/// Typed client for `sluice-testkit app` running in some netns (and cgroup).
///
/// Each method sends one command with a fresh `seq` and waits for the matching response.
/// `Err` means the harness itself failed (timeout, helper died); a refused or failed
/// connection is a normal outcome reported in the result (`ok == false`, `errno`).
pub struct App {
    proc: Mutex<Proc>,
    seq: Mutex<u64>,
    timeout: Duration,
}

/// Extra knobs for [`App::connect_with`] / [`App::hold_with`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConnectOptions {
    /// Line sent right after connecting, before reading the banner.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preface: Option<String>,
    /// Line sent after the banner; its echo is returned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send: Option<String>,
    /// Source address to bind (port 0) before connecting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<IpAddr>,
    /// SO_MARK to set before connecting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mark: Option<u32>,
    /// Connect/read timeout in the helper (default 3000 ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// IPv4 without the don't-fragment bit.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub fragmentable: bool,
}

/// Response of connect/hold/ping.
#[derive(Clone, Debug, Deserialize)]
pub struct ConnectResult {
    pub ok: bool,
    pub errno: Option<i32>,
    pub error: Option<String>,
    /// Which step failed: "socket", "bind", "connect", "preface", "banner", "send", "echo".
    pub stage: Option<String>,
    /// getpeername() of the client socket: what the application believes it talks to.
    pub peername: Option<SocketAddr>,
    /// getsockname() of the client socket.
    pub sockname: Option<SocketAddr>,
    /// `HELLO peer=<ip:port> local=<ip:port>` as sent by the server.
    pub banner: Option<String>,
    pub echo: Option<String>,
}

impl ConnectResult {
    /// The client address the server saw (the `peer=` part of the banner).
    pub fn banner_peer(&self) -> Option<SocketAddr> {
        self.banner_field("peer=")
    }

    /// The server's local address (the `local=` part of the banner).
    pub fn banner_local(&self) -> Option<SocketAddr> {
        self.banner_field("local=")
    }

    fn banner_field(&self, key: &str) -> Option<SocketAddr> {
        self.banner
            .as_deref()?
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))?
            .parse()
            .ok()
    }

    /// Turns `ok == false` into an error describing the failure.
    pub fn ensure_ok(&self) -> Result<&ConnectResult> {
        if !self.ok {
            bail!("connection failed: {self:?}");
        }
        Ok(self)
    }
}

/// Response of dns_udp/dns_tcp.
#[derive(Clone, Debug, Deserialize)]
pub struct DnsResult {
    pub ok: bool,
    pub errno: Option<i32>,
    pub error: Option<String>,
    pub stage: Option<String>,
    /// Query id that was sent.
    pub id: Option<u16>,
    /// Where recvfrom() said the UDP reply came from.
    pub reply_from: Option<SocketAddr>,
    /// getpeername() (TCP, or connected UDP).
    pub peername: Option<SocketAddr>,
    pub sockname: Option<SocketAddr>,
    /// The reply had the query's id and the QR bit.
    #[serde(default)]
    pub valid: bool,
    pub len: Option<usize>,
}

/// Response of loop_stop.
#[derive(Clone, Debug, Deserialize)]
pub struct LoopStats {
    pub attempts: u64,
    pub failures: u64,
    /// `{"errno":N|null,"error":"...","stage":"..."}` of the first failure.
    pub first_error: Option<Value>,
    /// The loop had stopped itself (time/attempt safety limit) before loop_stop.
    #[serde(default)]
    pub hit_limit: bool,
}

impl App {
    /// Starts `sluice-testkit app` (at `bin`) inside `netns`/`cgroup`.
    pub fn spawn(bin: &Path, netns: Option<&Path>, cgroup: Option<&Cgroup>) -> Result<App> {
        Ok(App {
            proc: Mutex::new(Proc::spawn(bin, &["app"], netns, cgroup)?),
            seq: Mutex::new(0),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// How long to wait for each response (default 10 s).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub fn pid(&self) -> u32 {
        self.lock().pid()
    }

    /// Sends `cmd` (an object with `"cmd"`) with a fresh `seq`; returns the raw response.
    pub fn request(&self, mut cmd: Value) -> Result<Value> {
        let seq = {
            let mut s = self.seq.lock().unwrap_or_else(|p| p.into_inner());
            *s += 1;
            *s
        };
        cmd["seq"] = seq.into();
        let mut proc = self.lock();
        proc.send_line(&cmd.to_string())?;
        proc.take(
            |v| v.get("event").is_none() && v.get("seq") == Some(&Value::from(seq)),
            self.timeout,
        )
        .with_context(|| format!("waiting for response to {cmd}"))
    }

    /// Starts a banner+echo server on `[::]:port` (dual-stack).
    pub fn listen(&self, port: u16) -> Result<()> {
        self.expect_ok(json!({"cmd": "listen", "port": port}))
    }

    /// Connects to `addr`, reads the banner and, if `send` is given, exchanges one line.
    pub fn connect(&self, addr: SocketAddr, send: Option<&str>) -> Result<ConnectResult> {
        let opts = ConnectOptions {
            send: send.map(str::to_string),
            ..Default::default()
        };
        self.connect_with(addr, &opts)
    }

    pub fn connect_with(&self, addr: SocketAddr, opts: &ConnectOptions) -> Result<ConnectResult> {
        self.typed(with_fields(json!({"cmd": "connect", "addr": addr}), opts)?)
    }

    /// Connects and reads the banner, keeping the connection open as `id`.
    pub fn hold(&self, id: &str, addr: SocketAddr) -> Result<ConnectResult> {
        self.hold_with(id, addr, &ConnectOptions::default())
    }

    pub fn hold_with(
        &self,
        id: &str,
        addr: SocketAddr,
        opts: &ConnectOptions,
    ) -> Result<ConnectResult> {
        self.typed(with_fields(
            json!({"cmd": "hold", "id": id, "addr": addr}),
            opts,
        )?)
    }

    /// Sends a line on held connection `id` and reads the echo (`echo` in the result).
    pub fn ping(&self, id: &str, send: &str) -> Result<ConnectResult> {
        self.typed(json!({"cmd": "ping", "id": id, "send": send}))
    }

    pub fn close(&self, id: &str) -> Result<()> {
        self.expect_ok(json!({"cmd": "close", "id": id}))
    }

    /// One `example.com A` query over UDP (sendto, or connect+send when `connected`).
    pub fn dns_udp(&self, server: SocketAddr, connected: bool) -> Result<DnsResult> {
        self.typed(json!({"cmd": "dns_udp", "server": server, "connected": connected}))
    }

    /// One `example.com A` query over TCP.
    pub fn dns_tcp(&self, server: SocketAddr) -> Result<DnsResult> {
        self.typed(json!({"cmd": "dns_tcp", "server": server}))
    }

    /// One unconnected UDP socket queries every server in turn, then reads as many replies.
    pub fn dns_udp_multi(&self, servers: &[SocketAddr]) -> Result<Value> {
        let v = self.request(json!({"cmd": "dns_udp_multi", "servers": servers}))?;
        ensure_ok_value(&v)?;
        Ok(v)
    }

    /// Starts a minimal ztunnel outbound listener on `port` (see the testkit's `sink`).
    pub fn sink_start(&self, port: u16) -> Result<()> {
        self.expect_ok(json!({"cmd": "sink_start", "port": port}))
    }

    /// Like `sink_start`, but the sink keeps every connection after its client has closed,
    /// and closes them at `sink_stop`.
    pub fn sink_start_holding(&self, port: u16) -> Result<()> {
        self.expect_ok(json!({"cmd": "sink_start", "port": port, "hold": true}))
    }

    /// Stops the sink: `{accepted, answered, wrong}`.
    pub fn sink_stop(&self) -> Result<Value> {
        let v = self.request(json!({"cmd": "sink_stop"}))?;
        ensure_ok_value(&v)?;
        Ok(v)
    }

    /// `count` short connections round-robin over `addrs`, closed by the client at once.
    pub fn churn(&self, addrs: &[SocketAddr], count: u64, timeout: Duration) -> Result<Value> {
        let timeout_ms = timeout.as_millis() as u64;
        let v = self.request(
            json!({"cmd": "churn", "addrs": addrs, "count": count, "timeout_ms": timeout_ms}),
        )?;
        ensure_ok_value(&v)?;
        Ok(v)
    }

    /// `parallel` connections to a `listen` server at once, each sending `bytes` of a known
    /// pattern and checking the echo byte for byte; a read or write stalled for `timeout`
    /// fails its connection. The response's `results` has one entry per connection.
    pub fn bulk(
        &self,
        addr: SocketAddr,
        bytes: u64,
        parallel: usize,
        timeout: Duration,
    ) -> Result<Value> {
        let timeout_ms = timeout.as_millis() as u64;
        let v = self.request(json!({"cmd": "bulk", "addr": addr, "bytes": bytes,
            "parallel": parallel, "timeout_ms": timeout_ms}))?;
        ensure_ok_value(&v)?;
        Ok(v)
    }

    /// Starts a background connect+banner+close loop against `addr`.
    pub fn loop_start(&self, id: &str, addr: SocketAddr, interval: Duration) -> Result<()> {
        let interval_ms = interval.as_millis() as u64;
        self.expect_ok(
            json!({"cmd": "loop_start", "id": id, "addr": addr, "interval_ms": interval_ms}),
        )
    }

    /// Like [`App::loop_start`] with a connect/read timeout of its own (default 3 s).
    pub fn loop_start_with_timeout(
        &self,
        id: &str,
        addr: SocketAddr,
        interval: Duration,
        timeout: Duration,
    ) -> Result<()> {
        let interval_ms = interval.as_millis() as u64;
        let timeout_ms = timeout.as_millis() as u64;
        self.expect_ok(json!({"cmd": "loop_start", "id": id, "addr": addr,
            "interval_ms": interval_ms, "timeout_ms": timeout_ms}))
    }

    pub fn loop_stop(&self, id: &str) -> Result<LoopStats> {
        let v = self.request(json!({"cmd": "loop_stop", "id": id}))?;
        ensure_ok_value(&v)?;
        serde_json::from_value(v.clone()).with_context(|| format!("parsing {v}"))
    }

    /// Waits for an asynchronous event (e.g. `{"event":"accepted",...}`) matching `pred`.
    pub fn wait_event(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Result<Value> {
        self.lock()
            .take(|v| v.get("event").is_some() && pred(v), timeout)
    }

    /// Removes and returns the events received so far.
    pub fn events(&self) -> Vec<Value> {
        self.lock().drain(|v| v.get("event").is_some())
    }

    fn typed<T: DeserializeOwned>(&self, cmd: Value) -> Result<T> {
        let v = self.request(cmd)?;
        serde_json::from_value(v.clone()).with_context(|| format!("parsing response {v}"))
    }

    fn expect_ok(&self, cmd: Value) -> Result<()> {
        let v = self.request(cmd)?;
        ensure_ok_value(&v)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Proc> {
        self.proc.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn ensure_ok_value(v: &Value) -> Result<()> {
    if v.get("ok") != Some(&Value::Bool(true)) {
        bail!("app command failed: {v}");
    }
    Ok(())
}

/// Merges the options' (non-empty) fields into a command object.
fn with_fields(mut cmd: Value, opts: &impl Serialize) -> Result<Value> {
    if let (Value::Object(cmd), Value::Object(extra)) = (&mut cmd, serde_json::to_value(opts)?) {
        cmd.extend(extra);
    }
    Ok(cmd)
}
