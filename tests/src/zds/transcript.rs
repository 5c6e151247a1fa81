//! The record of one ZDS connection and the checker for the protocol rules the agent
//! must keep (docs/zds.md, "Rules"). Rules are checked as
//! each request arrives, so a long-running client can report a violation at once.

use std::collections::BTreeSet;
use std::fmt;
use std::os::fd::AsFd;

use super::conn::{Kind, RECV_BUFFER_LEN, Received};
use super::error::ZdsError;
use super::nsfd::is_netns;
use super::proto::WorkloadInfo;
use super::proto::workload_request::Payload;

/// How the client answered a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    Ack,
    Nack(String),
}

/// One received request, reduced to what the rules need.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub kind: Kind,
    /// The uid of an Add, Keep or Del.
    pub uid: Option<String>,
    /// Only Adds have one.
    pub workload_info: Option<WorkloadInfo>,
    /// Number of fds that came with the request.
    pub fds: usize,
    /// How many of those were network namespaces.
    pub netns_fds: usize,
    /// Packet size in bytes.
    pub len: usize,
    /// None while unanswered (or never answered).
    pub response: Option<Response>,
}

impl Entry {
    pub fn from_received(r: &Received) -> Entry {
        let workload_info = match &r.request.payload {
            Some(Payload::Add(a)) => a.workload_info.clone(),
            _ => None,
        };
        Entry {
            kind: r.kind(),
            uid: r.uid().map(str::to_string),
            workload_info,
            fds: r.fds.len(),
            netns_fds: r.fds.iter().filter(|fd| is_netns(fd.as_fd())).count(),
            len: r.len,
            response: None,
        }
    }

    fn describe(&self) -> String {
        match &self.uid {
            Some(uid) => format!("{} {uid:?}", self.kind.as_str()),
            None => self.kind.as_str().to_string(),
        }
    }
}

/// A broken protocol rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The request (index in the transcript) that broke it; for an undecodable request,
    /// the index it would have had.
    pub index: Option<usize>,
    /// True if real ztunnel drops the connection over it.
    pub fatal: bool,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(i) = self.index {
            write!(f, "request #{i}: ")?;
        }
        f.write_str(&self.message)?;
        if self.fatal {
            f.write_str(" (fatal to ztunnel)")?;
        }
        Ok(())
    }
}

/// Every violation of a transcript, as one error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violations(pub Vec<Violation>);

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ZDS protocol violation(s):", self.0.len())?;
        for v in &self.0 {
            write!(f, "\n  {v}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Violations {}

/// Why a client stopped reading a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The agent closed it.
    Closed,
    /// The policy said to disconnect.
    Disconnected,
    /// The client was told to stop.
    Stopped,
    /// The agent broke a rule ztunnel does not survive; the client hung up like ztunnel.
    ProtocolError(String),
    /// The socket failed.
    Io(String),
}

/// Requests of one connection in arrival order, with the rules they broke.
#[derive(Clone, Debug, Default)]
pub struct Transcript {
    entries: Vec<Entry>,
    violations: Vec<Violation>,
    snapshot_at: Option<usize>,
    end: Option<End>,
}

impl Transcript {
    pub fn new() -> Transcript {
        Transcript::default()
    }

    /// Records a received request; returns the rules it broke (also kept).
    pub fn record(&mut self, r: &Received) -> Vec<Violation> {
        self.push(Entry::from_received(r))
    }

    /// Records a request (already reduced to an [`Entry`]); returns the rules it broke.
    pub fn push(&mut self, e: Entry) -> Vec<Violation> {
        let i = self.entries.len();
        let mut found = Vec::new();
        let mut broke = |fatal: bool, message: String| {
            found.push(Violation {
                index: Some(i),
                fatal,
                message: format!("{}: {message}", e.describe()),
            });
        };

        if let Some(prev) = self.entries.last()
            && prev.response.is_none()
        {
            broke(
                false,
                format!("arrived before request #{} was answered", i - 1),
            );
        }
        if i == 0 && !matches!(e.kind, Kind::Add | Kind::Keep | Kind::SnapshotSent) {
            broke(
                false,
                "the first request must be Add, Keep or SnapshotSent (the snapshot phase)".into(),
            );
        }
        if e.len >= RECV_BUFFER_LEN {
            broke(
                false,
                format!(
                    "{} bytes; requests must stay under {RECV_BUFFER_LEN}",
                    e.len
                ),
            );
        }
        match e.kind {
            Kind::Add if e.fds != 1 => {
                broke(
                    true,
                    format!("must carry exactly one fd, carries {}", e.fds),
                );
            }
            // ztunnel only notices when setns() fails and NACKs.
            Kind::Add if e.netns_fds != 1 => {
                broke(false, "its fd is not a network namespace".into())
            }
            Kind::Add => {}
            _ if e.fds > 0 => broke(true, format!("must carry no fd, carries {}", e.fds)),
            _ => {}
        }
        if e.kind == Kind::Add && e.workload_info.is_none() {
            broke(true, "has no workload_info".into());
        }
        if e.uid.as_deref() == Some("") {
            broke(false, "empty uid".into());
        }
        match (e.kind, self.snapshot_at) {
            (Kind::Empty, _) => broke(true, "no payload".into()),
            (Kind::Keep, Some(s)) => broke(true, format!("Keep after SnapshotSent (#{s})")),
            (Kind::SnapshotSent, Some(s)) => {
                broke(true, format!("second SnapshotSent (the first was #{s})"));
            }
            (Kind::SnapshotSent, None) => self.snapshot_at = Some(i),
            _ => {}
        }

        self.entries.push(e);
        self.violations.extend(found.iter().cloned());
        found
    }

    /// Records the answer to the latest request. False (and nothing recorded) if there is
    /// no request or it was already answered: a client bug, not an agent one.
    pub fn record_response(&mut self, response: Response) -> bool {
        match self.entries.last_mut() {
            Some(e) if e.response.is_none() => {
                e.response = Some(response);
                true
            }
            _ => false,
        }
    }

    /// Records a failed receive. Returns the violation when the failure is the agent's
    /// fault (oversized, undecodable, too many fds, request before response).
    pub fn record_error(&mut self, err: &ZdsError) -> Option<Violation> {
        let fatal = match err {
            e if e.is_protocol_error() => true,
            ZdsError::RequestBeforeResponse { .. } => false,
            _ => return None,
        };
        let v = Violation {
            index: Some(self.entries.len()),
            fatal,
            message: err.to_string(),
        };
        self.violations.push(v.clone());
        Some(v)
    }

    /// Records a violation found outside [`Transcript::push`].
    pub fn record_violation(&mut self, v: Violation) {
        self.violations.push(v);
    }

    pub fn set_end(&mut self, end: End) {
        self.end = Some(end);
    }

    pub fn end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn kinds(&self) -> Vec<Kind> {
        self.entries.iter().map(|e| e.kind).collect()
    }

    /// Index of the SnapshotSent, once seen.
    pub fn snapshot_index(&self) -> Option<usize> {
        self.snapshot_at
    }

    /// Uids named by Add or Keep before the SnapshotSent (all of them if none came yet):
    /// the workloads ztunnel keeps when the snapshot ends.
    pub fn snapshot_uids(&self) -> BTreeSet<String> {
        let upto = self.snapshot_at.unwrap_or(self.entries.len());
        self.entries[..upto]
            .iter()
            .filter(|e| matches!(e.kind, Kind::Add | Kind::Keep))
            .filter_map(|e| e.uid.clone())
            .collect()
    }

    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// Ok if the agent kept every rule so far: each Add carries exactly one fd, a network
    /// namespace, and workload_info; nothing else carries an fd; every request has a
    /// payload, a non-empty uid where it names one, and fewer than 1024 bytes; the
    /// connection opens with the snapshot phase (Add/Keep/SnapshotSent); at most one
    /// SnapshotSent and no Keep after it; no request before the previous one was answered.
    pub fn check_invariants(&self) -> Result<(), Violations> {
        if self.violations.is_empty() {
            Ok(())
        } else {
            Err(Violations(self.violations.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: Kind, uid: Option<&str>) -> Entry {
        let add = kind == Kind::Add;
        Entry {
            kind,
            uid: uid.map(str::to_string),
            workload_info: add.then(WorkloadInfo::default),
            fds: usize::from(add),
            netns_fds: usize::from(add),
            len: 20,
            response: None,
        }
    }

    /// Pushes and acks each entry, like a synchronous client.
    fn run(entries: impl IntoIterator<Item = Entry>) -> Transcript {
        let mut t = Transcript::new();
        for e in entries {
            t.push(e);
            t.record_response(Response::Ack);
        }
        t
    }

    fn messages(t: &Transcript) -> Vec<String> {
        t.violations().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn accepts_a_normal_connection() {
        let t = run([
            entry(Kind::Add, Some("a")),
            entry(Kind::Keep, Some("b")),
            entry(Kind::SnapshotSent, None),
            entry(Kind::Add, Some("c")),
            entry(Kind::Del, Some("a")),
        ]);
        t.check_invariants().unwrap();
        assert_eq!(t.snapshot_index(), Some(2));
        assert_eq!(
            t.snapshot_uids(),
            BTreeSet::from(["a".to_string(), "b".into()])
        );
    }

    #[test]
    fn rejects_fd_mistakes() {
        let mut no_fd = entry(Kind::Add, Some("a"));
        no_fd.fds = 0;
        no_fd.netns_fds = 0;
        let mut not_netns = entry(Kind::Add, Some("b"));
        not_netns.netns_fds = 0;
        let mut del_with_fd = entry(Kind::Del, Some("a"));
        del_with_fd.fds = 1;
        let t = run([
            no_fd,
            not_netns,
            entry(Kind::SnapshotSent, None),
            del_with_fd,
        ]);
        let v = t.violations();
        assert_eq!(v.len(), 3, "{:?}", messages(&t));
        assert!(v[0].fatal && v[0].message.contains("exactly one fd"));
        assert!(!v[1].fatal && v[1].message.contains("not a network namespace"));
        assert!(v[2].fatal && v[2].message.contains("must carry no fd"));
    }

    #[test]
    fn rejects_snapshot_mistakes() {
        let t = run([
            entry(Kind::SnapshotSent, None),
            entry(Kind::Keep, Some("a")),
            entry(Kind::SnapshotSent, None),
        ]);
        let m = messages(&t);
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m[0].contains("Keep after SnapshotSent"), "{m:?}");
        assert!(m[1].contains("second SnapshotSent"), "{m:?}");
    }

    #[test]
    fn rejects_bad_start_size_info_and_ordering() {
        let mut t = Transcript::new();
        t.push(entry(Kind::Del, Some("a")));
        let mut big = entry(Kind::Add, Some(""));
        big.len = RECV_BUFFER_LEN;
        big.workload_info = None;
        // Not answered before `big` arrives.
        let found = t.push(big);
        let m: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(found.len(), 4, "{m:?}");
        assert!(m[0].contains("before request #0 was answered"), "{m:?}");
        assert!(m[1].contains("1024 bytes"), "{m:?}");
        assert!(m[2].contains("no workload_info"), "{m:?}");
        assert!(m[3].contains("empty uid"), "{m:?}");
        assert!(messages(&t)[0].contains("first request must be"));
        let err = t.check_invariants().unwrap_err().to_string();
        assert!(err.starts_with("5 ZDS protocol violation(s)"), "{err}");
    }

    #[test]
    fn receive_errors_are_violations_only_when_the_agent_is_at_fault() {
        let mut t = Transcript::new();
        assert_eq!(t.record_error(&ZdsError::Closed), None);
        assert_eq!(t.record_error(&ZdsError::Timeout), None);
        t.check_invariants().unwrap();
        let v = t
            .record_error(&ZdsError::Truncated { len: 1100, fds: 0 })
            .unwrap();
        assert!(v.fatal && v.message.contains("1100"), "{v}");
        assert!(t.check_invariants().is_err());
    }
}
