//! A scripted ZDS client: says hello, then reads requests and answers them the way a
//! [`Policy`] says, recording everything in a [`Transcript`].

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::conn::ZdsConn;
use super::error::ZdsError;
use super::transcript::{End, Entry, Response, Transcript};

/// The error text of every NACK a [`Policy`] (or `sluice-testkit peer --nack-uid`) sends.
pub const TEST_NACK: &str = "test nack";

/// How a [`ZdsClient`] answers. The default acks everything at once.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Do not send the ZdsHello (to see how the agent copes).
    pub skip_hello: bool,
    /// uid → how many more requests naming it get a NACK ([`TEST_NACK`]) before acks.
    pub nack: HashMap<String, u32>,
    /// Hold every response back this long, failing if the agent sends meanwhile.
    pub ack_delay: Option<Duration>,
    /// Answer this many requests, then record later ones without answering.
    pub stop_responding_after: Option<usize>,
    /// Hang up after answering this many requests (0: right after the hello).
    pub disconnect_after: Option<usize>,
    /// Keep reading after a violation that real ztunnel hangs up on.
    pub tolerate_fatal: bool,
}

impl Policy {
    pub fn ack_all() -> Policy {
        Policy::default()
    }

    /// NACK the first `times` requests naming `uid`.
    pub fn nack_uid(mut self, uid: impl Into<String>, times: u32) -> Policy {
        self.nack.insert(uid.into(), times);
        self
    }

    pub fn delay_acks(mut self, delay: Duration) -> Policy {
        self.ack_delay = Some(delay);
        self
    }

    pub fn stop_responding_after(mut self, answered: usize) -> Policy {
        self.stop_responding_after = Some(answered);
        self
    }

    pub fn disconnect_after(mut self, answered: usize) -> Policy {
        self.disconnect_after = Some(answered);
        self
    }

    pub fn without_hello(mut self) -> Policy {
        self.skip_hello = true;
        self
    }

    pub fn tolerate_fatal(mut self) -> Policy {
        self.tolerate_fatal = true;
        self
    }

    /// The response due for a request naming `uid`; consumes one NACK of that uid.
    fn response_for(&mut self, uid: Option<&str>) -> Response {
        if let Some(left) = uid.and_then(|u| self.nack.get_mut(u))
            && *left > 0
        {
            *left -= 1;
            return Response::Nack(TEST_NACK.to_string());
        }
        Response::Ack
    }
}

/// A client loop running on its own thread. Entries are streamed as they are answered
/// (or, once the client stopped answering, as they arrive).
pub struct ZdsClient {
    thread: Option<JoinHandle<Transcript>>,
    entries: Receiver<Entry>,
    /// A second handle on the socket, to wake the loop when stopping.
    waker: ZdsConn,
    stopping: Arc<AtomicBool>,
}

impl ZdsClient {
    /// Runs the loop on the calling thread until the connection ends.
    pub fn run(conn: ZdsConn, policy: Policy) -> Transcript {
        run_loop(&conn, policy, None, &AtomicBool::new(false))
    }

    /// Runs the loop on a new thread.
    pub fn spawn(conn: ZdsConn, policy: Policy) -> io::Result<ZdsClient> {
        let waker = conn.try_clone()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let flag = stopping.clone();
        let thread = thread::Builder::new()
            .name("zds-client".into())
            .spawn(move || run_loop(&conn, policy, Some(tx), &flag))?;
        Ok(ZdsClient {
            thread: Some(thread),
            entries: rx,
            waker,
            stopping,
        })
    }

    /// The next entry, or None on timeout or when the loop has ended.
    pub fn next_entry(&self, timeout: Duration) -> Option<Entry> {
        self.entries.recv_timeout(timeout).ok()
    }

    /// Skips entries until one matches `pred`; fails on timeout or when the loop ended.
    pub fn wait_for(
        &self,
        pred: impl Fn(&Entry) -> bool,
        timeout: Duration,
    ) -> Result<Entry, String> {
        let deadline = Instant::now() + timeout;
        let mut skipped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.entries.recv_timeout(left) {
                Ok(e) if pred(&e) => return Ok(e),
                Ok(e) => skipped.push(e),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "no matching ZDS request within {timeout:?}; skipped {skipped:?}"
                    ));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!("the ZDS client ended; skipped {skipped:?}"));
                }
            }
        }
    }

    /// Waits for the loop to end by itself (the agent closes, or the policy hangs up).
    pub fn join(mut self) -> Transcript {
        self.join_thread()
    }

    /// Hangs up and returns the transcript.
    pub fn finish(mut self) -> Transcript {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.waker.shutdown();
        self.join_thread()
    }

    fn join_thread(&mut self) -> Transcript {
        let Some(t) = self.thread.take() else {
            return Transcript::new();
        };
        t.join().unwrap_or_else(|_| {
            let mut t = Transcript::new();
            t.set_end(End::Io("the ZDS client thread panicked".into()));
            t
        })
    }
}

impl Drop for ZdsClient {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stopping.store(true, Ordering::SeqCst);
            let _ = self.waker.shutdown();
            self.join_thread();
        }
    }
}

fn run_loop(
    conn: &ZdsConn,
    mut policy: Policy,
    stream: Option<Sender<Entry>>,
    stopping: &AtomicBool,
) -> Transcript {
    let mut t = Transcript::new();
    let end = serve(conn, &mut policy, &mut t, stream.as_ref());
    let end = if stopping.load(Ordering::SeqCst) {
        End::Stopped
    } else {
        end
    };
    t.set_end(end);
    // Like ztunnel, leave by closing; the agent sees EOF.
    let _ = conn.shutdown();
    t
}

fn serve(
    conn: &ZdsConn,
    policy: &mut Policy,
    t: &mut Transcript,
    stream: Option<&Sender<Entry>>,
) -> End {
    let publish = |t: &Transcript| {
        if let (Some(tx), Some(e)) = (stream, t.entries().last()) {
            let _ = tx.send(e.clone());
        }
    };
    if !policy.skip_hello
        && let Err(e) = conn.send_hello()
    {
        return End::Io(format!("sending hello: {e}"));
    }
    let mut answered = 0;
    loop {
        if policy.disconnect_after == Some(answered) {
            return End::Disconnected;
        }
        let received = match conn.recv_request(None) {
            Ok(r) => r,
            Err(ZdsError::Closed) => return End::Closed,
            Err(e) => {
                let end = match t.record_error(&e) {
                    Some(v) if v.fatal => End::ProtocolError(v.to_string()),
                    _ => End::Io(e.to_string()),
                };
                if !policy.tolerate_fatal || !matches!(end, End::ProtocolError(_)) {
                    return end;
                }
                continue;
            }
        };
        let found = t.record(&received);
        // The fds are closed here; the entry keeps what the checks needed.
        drop(received.fds);
        if let Some(v) = found.iter().find(|v| v.fatal)
            && !policy.tolerate_fatal
        {
            publish(t);
            return End::ProtocolError(v.to_string());
        }
        if policy.stop_responding_after.is_some_and(|n| answered >= n) {
            publish(t);
            continue;
        }
        if let Some(delay) = policy.ack_delay {
            match conn.expect_no_request_within(delay) {
                Ok(()) => {}
                Err(e) => {
                    if t.record_error(&e).is_none() {
                        return End::Io(e.to_string());
                    }
                }
            }
        }
        let uid = t.entries().last().and_then(|e| e.uid.clone());
        let response = policy.response_for(uid.as_deref());
        let sent = match &response {
            Response::Ack => conn.send_ack(),
            Response::Nack(msg) => conn.send_nack(msg),
        };
        if let Err(e) = sent {
            publish(t);
            return End::Io(format!("sending response: {e}"));
        }
        t.record_response(response);
        answered += 1;
        publish(t);
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::{AsFd, OwnedFd};

    use prost::Message;

    use super::super::conn::{Kind, recv_packet, send_packet};
    use super::super::proto::{
        AddWorkload, KeepWorkload, SnapshotSent, WorkloadInfo, WorkloadRequest, WorkloadResponse,
        workload_request::Payload, workload_response,
    };
    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    fn send(agent: &OwnedFd, p: Payload) {
        let bytes = WorkloadRequest { payload: Some(p) }.encode_to_vec();
        match &bytes[..] {
            // AddWorkload (field 1) carries the netns.
            [0x0a, ..] => {
                let netns = File::open("/proc/self/ns/net").unwrap();
                send_packet(agent.as_fd(), &bytes, &[netns.as_fd()]).unwrap();
            }
            _ => send_packet(agent.as_fd(), &bytes, &[]).unwrap(),
        }
    }

    fn add(uid: &str) -> Payload {
        Payload::Add(AddWorkload {
            uid: uid.into(),
            workload_info: Some(WorkloadInfo::default()),
        })
    }

    /// The error text of the next response (empty for an ack).
    fn response(agent: &OwnedFd) -> String {
        let p = recv_packet(agent.as_fd()).unwrap();
        match WorkloadResponse::decode(&p.data[..]).unwrap().payload {
            Some(workload_response::Payload::Ack(a)) => a.error,
            None => panic!("response without payload"),
        }
    }

    #[test]
    fn acks_nacks_and_streams() {
        let (conn, agent) = ZdsConn::pair().unwrap();
        let client = ZdsClient::spawn(conn, Policy::ack_all().nack_uid("b", 1)).unwrap();
        assert_eq!(recv_packet(agent.as_fd()).unwrap().data, [0x08, 0x01]);
        send(&agent, add("a"));
        assert_eq!(response(&agent), "");
        send(&agent, add("b"));
        assert_eq!(response(&agent), TEST_NACK);
        send(&agent, add("b"));
        assert_eq!(response(&agent), "");
        send(&agent, Payload::SnapshotSent(SnapshotSent {}));
        assert_eq!(response(&agent), "");
        let snap = client
            .wait_for(|e| e.kind == Kind::SnapshotSent, WAIT)
            .unwrap();
        assert_eq!(snap.response, Some(Response::Ack));
        drop(agent);
        let t = client.join();
        t.check_invariants().unwrap();
        assert_eq!(t.end(), Some(&End::Closed));
        assert_eq!(
            t.entries()[1].response,
            Some(Response::Nack(TEST_NACK.into()))
        );
    }

    #[test]
    fn a_request_during_a_held_back_ack_is_a_violation() {
        let (conn, agent) = ZdsConn::pair().unwrap();
        let policy = Policy::ack_all()
            .without_hello()
            .delay_acks(Duration::from_millis(200));
        let client = ZdsClient::spawn(conn, policy).unwrap();
        send(&agent, add("a"));
        send(&agent, Payload::SnapshotSent(SnapshotSent {}));
        let t = client.finish();
        let err = t.check_invariants().unwrap_err().to_string();
        assert!(
            err.contains("before the previous one was answered"),
            "{err}"
        );
        assert_eq!(t.end(), Some(&End::Stopped));
    }

    #[test]
    fn silence_and_fatal_violations() {
        let (conn, agent) = ZdsConn::pair().unwrap();
        let policy = Policy::ack_all().without_hello().stop_responding_after(1);
        let client = ZdsClient::spawn(conn, policy).unwrap();
        send(&agent, add("a"));
        assert_eq!(response(&agent), "");
        send(&agent, Payload::SnapshotSent(SnapshotSent {}));
        let e = client.next_entry(WAIT).unwrap();
        assert_eq!(e.kind, Kind::Add);
        let e = client.next_entry(WAIT).unwrap();
        assert_eq!((e.kind, e.response), (Kind::SnapshotSent, None));
        // Keep after the snapshot: ztunnel hangs up, and so does the client.
        send(&agent, Payload::Keep(KeepWorkload { uid: "a".into() }));
        let t = client.join();
        assert!(matches!(t.end(), Some(End::ProtocolError(m)) if m.contains("Keep after")));
        // Two violations: the unanswered snapshot, and the Keep.
        assert_eq!(t.violations().len(), 2, "{:?}", t.violations());
    }

    #[test]
    fn disconnects_when_told() {
        let (conn, agent) = ZdsConn::pair().unwrap();
        let client = ZdsClient::spawn(conn, Policy::ack_all().disconnect_after(1)).unwrap();
        recv_packet(agent.as_fd()).unwrap();
        send(&agent, add("a"));
        assert_eq!(response(&agent), "");
        let t = client.join();
        assert_eq!(t.end(), Some(&End::Disconnected));
        assert_eq!(recv_packet(agent.as_fd()).unwrap().len, 0, "EOF");
    }
}
