//! `sluice-testkit app`: a command server for playing an application inside a pod (or
//! node) network namespace. Reads one JSON command per stdin line, answers each with
//! one JSON line carrying the same `"seq"`; background work (accepted connections)
//! is reported as `{"event":...}` lines in between. Commands run one at a time.

mod bulk;
mod client;
pub mod command;
mod loops;
mod reply;
mod server;
mod sink;

use std::collections::HashMap;
use std::io::BufRead;
use std::net::Shutdown;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use self::client::Conn;
use self::command::Command;
use self::loops::ConnectLoop;
use self::reply::{Failure, Fields, response};
use super::output::Output;

/// Longest command line accepted; longer lines are answered with an error.
const MAX_COMMAND: usize = 64 * 1024;

/// Serves commands from `input` until it closes (or `out` stops accepting lines).
pub fn run(mut input: impl BufRead, out: Arc<Output>) {
    let mut app = AppState {
        out: out.clone(),
        held: HashMap::new(),
        loops: HashMap::new(),
        sink: None,
    };
    loop {
        let line = match crate::sockets::read_line(&mut input, MAX_COMMAND) {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(e) => {
                let reply = response(&Value::Null, Err(Failure::msg(format!("bad input: {e}"))));
                if out.emit(&reply).is_err() {
                    return;
                }
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        if out.emit(&app.handle_line(&line)).is_err() {
            return;
        }
    }
}

struct AppState {
    out: Arc<Output>,
    held: HashMap<String, Conn>,
    loops: HashMap<String, ConnectLoop>,
    sink: Option<sink::Sink>,
}

impl AppState {
    fn handle_line(&mut self, line: &str) -> Value {
        let value: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                return response(
                    &Value::Null,
                    Err(Failure::msg(format!("invalid JSON: {e}"))),
                );
            }
        };
        let seq = value.get("seq").cloned().unwrap_or(Value::Null);
        let outcome = match serde_json::from_value::<Command>(value) {
            Ok(cmd) => self.execute(cmd),
            Err(e) => Err(Failure::msg(format!("bad command: {e}"))),
        };
        response(&seq, outcome)
    }

    fn execute(&mut self, cmd: Command) -> Result<Fields, Failure> {
        match cmd {
            Command::Listen { port, bind } => server::listen(port, bind, self.out.clone())
                .map(|()| Fields::new())
                .map_err(|e| Failure::io("listen", &e)),
            Command::Connect(dial) => client::connect(&dial).map(|(fields, _conn)| fields),
            Command::Hold { id, dial } => {
                if self.held.contains_key(&id) {
                    return Err(Failure::msg(format!("connection {id:?} already held")));
                }
                let (fields, conn) = client::connect(&dial)?;
                self.held.insert(id, conn);
                Ok(fields)
            }
            Command::Ping {
                id,
                send,
                timeout_ms,
            } => {
                let conn = self.held_conn(&id)?;
                if let Some(ms) = timeout_ms {
                    let _ = conn
                        .reader
                        .get_ref()
                        .set_read_timeout(Some(Duration::from_millis(ms.max(1))));
                }
                let echo = client::exchange(conn, &send)?;
                Ok(Fields::from_iter([("echo".to_string(), echo.into())]))
            }
            Command::Close { id } => {
                let conn = self
                    .held
                    .remove(&id)
                    .ok_or_else(|| Failure::msg(format!("no held connection {id:?}")))?;
                let _ = conn.reader.get_ref().shutdown(Shutdown::Both);
                Ok(Fields::new())
            }
            Command::DnsUdp {
                server,
                connected,
                opts,
            } => client::dns_udp(server, connected, &opts),
            Command::DnsTcp { server, opts } => client::dns_tcp(server, &opts),
            Command::LoopStart {
                id,
                addr,
                interval_ms,
                opts,
            } => {
                if self.loops.contains_key(&id) {
                    return Err(Failure::msg(format!("loop {id:?} already running")));
                }
                let interval = interval_ms.map(Duration::from_millis);
                let handle = ConnectLoop::start(addr, interval, opts)
                    .map_err(|e| Failure::io("spawn", &e))?;
                self.loops.insert(id, handle);
                Ok(Fields::new())
            }
            Command::DnsUdpMulti { servers, opts } => client::dns_udp_multi(&servers, &opts),
            Command::Churn { addrs, count, opts } => client::churn(&addrs, count, &opts),
            Command::Bulk {
                addr,
                bytes,
                parallel,
                opts,
            } => bulk::bulk(addr, bytes, parallel, &opts),
            Command::SinkStart { port, hold } => {
                if self.sink.is_some() {
                    return Err(Failure::msg("a sink is running already"));
                }
                self.sink =
                    Some(sink::Sink::start(port, hold).map_err(|e| Failure::io("listen", &e))?);
                Ok(Fields::new())
            }
            Command::SinkStop => self
                .sink
                .take()
                .ok_or_else(|| Failure::msg("no sink running"))?
                .stop(),
            Command::LoopStop { id } => self
                .loops
                .remove(&id)
                .ok_or_else(|| Failure::msg(format!("no loop {id:?}")))?
                .stop(),
        }
    }

    fn held_conn(&mut self, id: &str) -> Result<&mut Conn, Failure> {
        self.held
            .get_mut(id)
            .ok_or_else(|| Failure::msg(format!("no held connection {id:?}")))
    }
}
