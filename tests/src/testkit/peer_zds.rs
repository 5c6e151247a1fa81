//! `sluice-testkit peer --zds SOCKET`: behaves like ztunnel towards the agent. Connects
//! (retrying with backoff), says hello, and for each request: Add starts the listener set
//! inside the pod's netns, Keep keeps it, Del stops it, SnapshotSent stops every one the
//! connection did not name. A lost connection is re-established while the listeners keep
//! serving; the next snapshot decides which survive. Exits when stdin closes.
//!
//! Events, one JSON object per line (besides the peer's own, which carry `"uid"`):
//! - `{"event":"zds_connect","attempt":N,"error":E,"retry_in_ms":MS|null}` (failed try)
//! - `{"event":"zds_connected","attempt":N,"connection":C}` (hello sent)
//! - `{"event":"zds","kind":"add"|"keep"|"del"|"snapshot_sent"|"empty","uid":U,
//!   "name":N,"namespace":NS,"service_account":SA,"fds":F,"len":L,"running":B,
//!   "connection":C}`
//!   (`name`/`namespace`/`service_account` for Add only, `uid`/`running` when the
//!   request names one)
//! - `{"event":"zds_violation","index":I,"fatal":B,"error":E,"connection":C}`
//! - `{"event":"zds_response","kind":K,"uid":U,"error":E,"connection":C}` (E empty: ack)
//! - `{"event":"workload_started","uid":U,"started":"new"|"kept"|"replaced"}` (kept: a
//!   repeated Add for the netns already served, whose listeners stay up, as in ztunnel),
//!   `{"event":"workload_stopped","uid":U,"reason":"del"|"snapshot"}`
//! - `{"event":"snapshot_done","uids":[...],"stopped":[...],"connection":C}`
//! - `{"event":"zds_disconnected","reason":R,"connection":C}`
//! - `{"event":"error","context":X,"error":E}`

use std::collections::{BTreeSet, HashSet};
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use serde_json::{Value, json};

use super::output::Output;
use super::peer_args::ZdsArgs;
use super::peer_cmd::wait_for_stdin_eof;
use crate::peer::{Event, Started, Workloads};
use crate::zds::proto::workload_request::Payload;
use crate::zds::{Kind, Received, Response, TEST_NACK, Transcript, Violation, ZdsConn, ZdsError};

/// ztunnel's reconnect backoff starts here and doubles...
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// ...up to this (ztunnel goes to 15 s; tests want a restarted agent found quickly).
const MAX_BACKOFF: Duration = Duration::from_secs(1);

pub fn run(tag: Option<String>, args: ZdsArgs) -> ExitCode {
    let out = Arc::new(Output::stdout());
    let (events_tx, events_rx) = mpsc::channel::<Event>();
    let printer = out.clone();
    thread::spawn(move || {
        for event in events_rx {
            if printer.emit(&event).is_err() {
                break;
            }
        }
    });

    // Whichever ends first decides the exit: stdin closing, or giving up on the socket. A
    // give-up wins even if stdin closes first: the test that saw its event closes stdin next.
    let gave_up = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = mpsc::channel::<ExitCode>();
    let stdin_done = done_tx.clone();
    thread::spawn(move || {
        wait_for_stdin_eof();
        let _ = stdin_done.send(ExitCode::SUCCESS);
    });
    let gave_up_flag = gave_up.clone();
    let spawned = thread::Builder::new().name("zds".into()).spawn(move || {
        let mut peer = ZdsPeer::new(args, out, Workloads::new(events_tx, tag), gave_up_flag);
        let _ = done_tx.send(peer.serve());
    });
    if spawned.is_err() {
        return ExitCode::FAILURE;
    }
    // Returning exits the process; the listener threads go with it.
    let code = done_rx.recv().unwrap_or(ExitCode::FAILURE);
    if gave_up.load(Ordering::SeqCst) {
        return ExitCode::FAILURE;
    }
    code
}

struct ZdsPeer {
    args: ZdsArgs,
    out: Arc<Output>,
    workloads: Workloads,
    /// Uids whose first Add is still to be NACKed.
    nacks_left: HashSet<String>,
    /// Counts connections, so events of an old one can be told apart.
    connection: u32,
    /// Set before the give-up event is emitted.
    gave_up: Arc<AtomicBool>,
}

impl ZdsPeer {
    fn new(
        args: ZdsArgs,
        out: Arc<Output>,
        workloads: Workloads,
        gave_up: Arc<AtomicBool>,
    ) -> ZdsPeer {
        ZdsPeer {
            nacks_left: args.nack_uids.iter().cloned().collect(),
            args,
            out,
            workloads,
            connection: 0,
            gave_up,
        }
    }

    fn emit(&self, value: Value) {
        // A gone reader only means nobody listens; stdin closing ends us anyway.
        let _ = self.out.emit(&value);
    }

    /// Serves connection after connection; returns only if the first connect fails and
    /// retrying was not asked for.
    fn serve(&mut self) -> ExitCode {
        loop {
            let may_give_up = self.connection == 0 && !self.args.retry_connect;
            let Some(conn) = self.connect(may_give_up) else {
                return ExitCode::FAILURE;
            };
            let reason = self.serve_connection(&conn);
            drop(conn);
            self.emit(json!({
                "event": "zds_disconnected",
                "reason": reason,
                "connection": self.connection,
            }));
        }
    }

    /// Connects and says hello, retrying with exponential backoff like ztunnel.
    fn connect(&mut self, may_give_up: bool) -> Option<ZdsConn> {
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1u64.. {
            let conn = ZdsConn::connect(&self.args.socket).and_then(|c| {
                c.send_hello()?;
                Ok(c)
            });
            match conn {
                Ok(conn) => {
                    self.connection += 1;
                    self.emit(json!({
                        "event": "zds_connected",
                        "attempt": attempt,
                        "connection": self.connection,
                    }));
                    return Some(conn);
                }
                Err(e) => {
                    let retry = (!may_give_up).then_some(backoff.as_millis() as u64);
                    if may_give_up {
                        self.gave_up.store(true, Ordering::SeqCst);
                    }
                    self.emit(json!({
                        "event": "zds_connect",
                        "attempt": attempt,
                        "error": e.to_string(),
                        "retry_in_ms": retry,
                    }));
                    if may_give_up {
                        return None;
                    }
                    thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        None
    }

    /// Answers requests until the connection ends; returns why it ended.
    fn serve_connection(&mut self, conn: &ZdsConn) -> String {
        let mut transcript = Transcript::new();
        // Uids named by Add or Keep since this connection started.
        let mut named = BTreeSet::new();
        loop {
            let received = match conn.recv_request(None) {
                Ok(r) => r,
                Err(ZdsError::Closed) => return "closed by the agent".into(),
                Err(e) => {
                    if let Some(v) = transcript.record_error(&e) {
                        self.emit_violation(&v);
                    }
                    return e.to_string();
                }
            };
            self.emit_request(&received);
            let found = transcript.record(&received);
            for v in &found {
                self.emit_violation(v);
            }
            // Like ztunnel: no answer, hang up, reconnect.
            if let Some(v) = found.iter().find(|v| v.fatal) {
                return format!("protocol error: {v}");
            }

            let kind = received.kind();
            let uid = received.uid().map(str::to_string);
            let mut stopped = Vec::new();
            let outcome = self.handle(&received, &mut named, &mut stopped);
            drop(received);
            let error = outcome.err().unwrap_or_default();
            let sent = if error.is_empty() {
                conn.send_ack()
            } else {
                conn.send_nack(&error)
            };
            if let Err(e) = sent {
                return format!("sending response: {e}");
            }
            transcript.record_response(if error.is_empty() {
                Response::Ack
            } else {
                Response::Nack(error.clone())
            });
            self.emit(json!({
                "event": "zds_response",
                "kind": kind.as_str(),
                "uid": uid,
                "error": error,
                "connection": self.connection,
            }));
            if kind == Kind::SnapshotSent {
                self.emit(json!({
                    "event": "snapshot_done",
                    "uids": named,
                    "stopped": stopped,
                    "connection": self.connection,
                }));
            }
        }
    }

    /// Applies one request to the running workloads; Err is the NACK text.
    fn handle(
        &mut self,
        r: &Received,
        named: &mut BTreeSet<String>,
        stopped: &mut Vec<String>,
    ) -> Result<(), String> {
        match &r.request.payload {
            Some(Payload::Add(add)) => {
                named.insert(add.uid.clone());
                if self.nacks_left.remove(&add.uid) {
                    return Err(TEST_NACK.into());
                }
                // The transcript check made sure there is exactly one fd.
                let netns = r.fds.first().ok_or("AddWorkload without a netns fd")?;
                match self.workloads.start(&add.uid, netns.as_fd()) {
                    Ok(started) => {
                        let started = match started {
                            Started::New => "new",
                            Started::Kept => "kept",
                            Started::Replaced => "replaced",
                        };
                        self.emit(json!({
                            "event": "workload_started",
                            "uid": add.uid,
                            "started": started,
                        }));
                        Ok(())
                    }
                    Err(e) => {
                        let error = format!("starting listeners for {}: {e}", add.uid);
                        self.emit(json!({"event": "error", "context": "add", "error": error}));
                        Err(error)
                    }
                }
            }
            Some(Payload::Keep(keep)) => {
                named.insert(keep.uid.clone());
                Ok(())
            }
            Some(Payload::Del(del)) => {
                named.remove(&del.uid);
                if self.workloads.stop(&del.uid) {
                    self.emit(json!({
                        "event": "workload_stopped",
                        "uid": del.uid,
                        "reason": "del",
                    }));
                }
                Ok(())
            }
            Some(Payload::SnapshotSent(_)) => {
                *stopped = self.workloads.retain(named);
                for uid in stopped.iter() {
                    self.emit(json!({
                        "event": "workload_stopped",
                        "uid": uid,
                        "reason": "snapshot",
                    }));
                }
                Ok(())
            }
            // Rejected as fatal before we get here.
            None => Err("no payload".into()),
        }
    }

    fn emit_request(&self, r: &Received) {
        let mut event = json!({
            "event": "zds",
            "kind": r.kind().as_str(),
            "fds": r.fds.len(),
            "len": r.len,
            "connection": self.connection,
        });
        if let Some(uid) = r.uid() {
            event["uid"] = json!(uid);
            event["running"] = json!(self.workloads.is_running(uid));
        }
        if let Some(Payload::Add(add)) = &r.request.payload {
            let info = add.workload_info.clone().unwrap_or_default();
            event["name"] = json!(info.name);
            event["namespace"] = json!(info.namespace);
            event["service_account"] = json!(info.service_account);
        }
        self.emit(event);
    }

    fn emit_violation(&self, v: &Violation) {
        self.emit(json!({
            "event": "zds_violation",
            "index": v.index,
            "fatal": v.fatal,
            "error": v.to_string(),
            "connection": self.connection,
        }));
    }
}
