//! The reconciler's core, a pure function: what a pod should be ([`Desired`]) against what it
//! is ([`Enrolled`], and the sandbox the runtime last announced) gives the next step. The
//! worker applies that step, looks again, and repeats until there is nothing left to do, so
//! each rule here only has to say what comes first.
use crate::k8s::annotate::Redirection;

/// A pod's options, resolved against the agent's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub dns_capture: bool,
    pub bypass_inbound: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Desired {
    /// In the mesh, with these options.
    In(Options),
    /// Not in the mesh: the policy skips it, or it is gone from the cluster.
    Out,
    /// Not known yet (its namespace is not cached): change nothing.
    Unknown,
}

/// The pod as the agent's table has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    pub options: Options,
    pub netns_inode: u64,
    /// The recorded path still names that netns. When it does not, the pod's sandbox is gone
    /// (or the process the netns was found through exited).
    pub netns_live: bool,
    /// The sandbox whose CNI ADD enrolled it.
    pub container_id: Option<String>,
}

/// The sandbox the pod's latest CNI ADD announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    pub container_id: String,
    /// Its netns, if its path still opens.
    pub netns_inode: Option<u64>,
    /// Its CNI DEL came: the sandbox is being torn down.
    pub deleted: bool,
}

impl Sandbox {
    fn live(&self) -> Option<u64> {
        self.netns_inode.filter(|_| !self.deleted)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub desired: Desired,
    pub enrolled: Option<Enrolled>,
    pub sandbox: Option<Sandbox>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Enroll in the netns of the CNI sandbox (replacing an enrollment elsewhere), or take an
    /// enrollment in that same netns over as that sandbox's.
    EnrollSandbox(Options),
    /// Find the running pod's netns through `/proc` and enroll it there (the same netns under
    /// a new path: the record follows it). Found nowhere: an enrollment in a netns that is
    /// gone is let go.
    EnrollScanned(Options),
    /// Change the options of the enrollment in place.
    Update(Options),
    Unenroll,
}

/// The next step for a pod, `None` when it is where it should be (or nothing can be done
/// until something changes: a new sandbox, a known namespace).
pub fn next_step(facts: &Facts) -> Option<Step> {
    let options = match facts.desired {
        Desired::Unknown => return None,
        Desired::Out => return facts.enrolled.as_ref().map(|_| Step::Unenroll),
        Desired::In(o) => o,
    };
    let sandbox = facts.sandbox.as_ref();
    let live_sandbox = sandbox.and_then(Sandbox::live);
    let Some(e) = &facts.enrolled else {
        return match sandbox {
            Some(_) if live_sandbox.is_some() => Some(Step::EnrollSandbox(options)),
            // Its sandbox went away: the next one comes with a CNI ADD. Scanning now could
            // find the dying sandbox's processes.
            Some(_) => None,
            None => Some(Step::EnrollScanned(options)),
        };
    };
    if let (Some(s), Some(inode)) = (sandbox, live_sandbox)
        && (inode != e.netns_inode || e.container_id.as_ref() != Some(&s.container_id))
    {
        return Some(Step::EnrollSandbox(options));
    }
    if let Some(s) = sandbox
        && live_sandbox.is_none()
        && e.container_id.as_ref() == Some(&s.container_id)
    {
        // The sandbox it was enrolled for is being torn down: let go of its netns now.
        return Some(Step::Unenroll);
    }
    if !e.netns_live {
        return Some(Step::EnrollScanned(options));
    }
    (e.options != options).then_some(Step::Update(options))
}

/// What the `ambient.istio.io/redirection` annotation should say: nothing unless the pod is
/// redirected; `enabled` once ztunnel acknowledged it. An `enabled` pod is not set back to
/// `pending` while ztunnel merely reconnects (each reconnect re-sends every pod), only when
/// it was enrolled anew (`fresh`: another netns).
pub fn annotation(
    enrolled: bool,
    acked: bool,
    fresh: bool,
    current: Option<Redirection>,
) -> Option<Redirection> {
    if !enrolled {
        return None;
    }
    if acked || (current == Some(Redirection::Enabled) && !fresh) {
        Some(Redirection::Enabled)
    } else {
        Some(Redirection::Pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Options = Options {
        dns_capture: true,
        bypass_inbound: false,
    };
    const B: Options = Options {
        dns_capture: false,
        bypass_inbound: true,
    };

    fn enrolled(inode: u64, live: bool, container: Option<&str>, options: Options) -> Enrolled {
        Enrolled {
            options,
            netns_inode: inode,
            netns_live: live,
            container_id: container.map(str::to_string),
        }
    }

    fn sandbox(container: &str, inode: Option<u64>, deleted: bool) -> Sandbox {
        Sandbox {
            container_id: container.into(),
            netns_inode: inode,
            deleted,
        }
    }

    /// (case, desired, enrolled, sandbox, expected step)
    type Case = (
        &'static str,
        Desired,
        Option<Enrolled>,
        Option<Sandbox>,
        Option<Step>,
    );

    #[rustfmt::skip]
    #[test]
    fn next_step_table() {
        use Desired::*;
        use Step::*;
        let cases: Vec<Case> = vec![
            ("unknown: hands off", Unknown, Some(enrolled(1, true, None, A)), None, None),
            ("unknown, not enrolled", Unknown, None, None, None),
            ("out and enrolled", Out, Some(enrolled(1, true, None, A)), None, Some(Unenroll)),
            ("out, enrolled in a dead netns", Out, Some(enrolled(1, false, None, A)), None, Some(Unenroll)),
            ("out, with a live sandbox", Out, Some(enrolled(1, true, Some("c"), A)), Some(sandbox("c", Some(1), false)), Some(Unenroll)),
            ("out and not enrolled", Out, None, Some(sandbox("c", Some(1), false)), None),
            ("in, running pod found in /proc", In(A), None, None, Some(EnrollScanned(A))),
            ("in, CNI ADD announced its sandbox", In(A), None, Some(sandbox("c", Some(1), false)), Some(EnrollSandbox(A))),
            ("in, sandbox deleted: wait for the next ADD", In(A), None, Some(sandbox("c", Some(1), true)), None),
            ("in, sandbox netns gone: wait for the next ADD", In(A), None, Some(sandbox("c", None, false)), None),
            ("in sync", In(A), Some(enrolled(1, true, None, A)), None, None),
            ("in sync with its sandbox", In(A), Some(enrolled(1, true, Some("c"), A)), Some(sandbox("c", Some(1), false)), None),
            ("options changed", In(B), Some(enrolled(1, true, None, A)), None, Some(Update(B))),
            ("options changed, with its sandbox", In(B), Some(enrolled(1, true, Some("c"), A)), Some(sandbox("c", Some(1), false)), Some(Update(B))),
            ("found in /proc, then its ADD: the sandbox takes it over", In(A), Some(enrolled(1, true, None, A)), Some(sandbox("c", Some(1), false)), Some(EnrollSandbox(A))),
            ("a new sandbox", In(A), Some(enrolled(1, true, Some("c"), A)), Some(sandbox("d", Some(2), false)), Some(EnrollSandbox(A))),
            ("a new sandbox, old netns already gone", In(A), Some(enrolled(1, false, Some("c"), A)), Some(sandbox("d", Some(2), false)), Some(EnrollSandbox(A))),
            ("its sandbox deleted", In(A), Some(enrolled(1, true, Some("c"), A)), Some(sandbox("c", Some(1), true)), Some(Unenroll)),
            ("its sandbox's netns gone", In(A), Some(enrolled(1, false, Some("c"), A)), Some(sandbox("c", None, false)), Some(Unenroll)),
            ("another sandbox deleted (an old one's DEL)", In(A), Some(enrolled(1, true, Some("c"), A)), Some(sandbox("b", Some(3), true)), None),
            ("netns path gone: look again", In(A), Some(enrolled(1, false, None, A)), None, Some(EnrollScanned(A))),
            ("netns path gone, options changed: find it first", In(B), Some(enrolled(1, false, None, A)), None, Some(EnrollScanned(B))),
        ];
        for (case, desired, enrolled, sandbox, want) in cases {
            let facts = Facts { desired, enrolled, sandbox };
            assert_eq!(next_step(&facts), want, "{case}");
        }
    }

    #[rustfmt::skip]
    #[test]
    fn annotation_table() {
        use Redirection::*;
        // (case, enrolled, acked, fresh, current, want)
        let cases = [
            ("not enrolled", false, false, false, Some(Enabled), None),
            ("not enrolled, none", false, true, false, None, None),
            ("enrolled, waiting for ztunnel", true, false, false, None, Some(Pending)),
            ("acked", true, true, false, Some(Pending), Some(Enabled)),
            ("acked, freshly", true, true, true, None, Some(Enabled)),
            ("ztunnel reconnecting: stays enabled", true, false, false, Some(Enabled), Some(Enabled)),
            ("enrolled anew: pending again", true, false, true, Some(Enabled), Some(Pending)),
        ];
        for (case, enrolled, acked, fresh, current, want) in cases {
            assert_eq!(annotation(enrolled, acked, fresh, current), want, "{case}");
        }
    }
}
