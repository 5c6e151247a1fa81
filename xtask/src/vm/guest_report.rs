//! Parses the guest's report: the init script's `@@sluice-vm` markers around each test
//! executable's plain libtest output (`test <name> ... ok`, then a `failures:` section with
//! each failed test's captured output). libtest's JSON format is nightly-only.
use std::collections::BTreeMap;

const MARKER: &str = "@@sluice-vm ";

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Passed,
    Ignored,
    /// With the first line of the panic message (or whatever the test printed last).
    Failed(String),
    /// With why: the executable crashed or was killed, or the guest stopped first.
    NotRun(String),
}

impl Outcome {
    pub fn word(&self) -> &'static str {
        match self {
            Outcome::Passed => "ok",
            Outcome::Ignored => "ignored",
            Outcome::Failed(_) => "FAILED",
            Outcome::NotRun(_) => "NOT RUN",
        }
    }
}

#[derive(Default, Debug)]
pub struct Executable {
    pub results: BTreeMap<String, Outcome>,
    /// Exit status from the init script; `None` if the guest never said.
    pub exit: Option<i32>,
    /// Tests libtest said had been running for over 60 s (if it is killed, these hung).
    pub slow: Vec<String>,
    /// Captured output of each failed test, from the `failures:` section.
    failure_text: BTreeMap<String, Vec<String>>,
    in_failure: Option<String>,
}

/// Something worth showing live, as it happens.
#[derive(Debug, PartialEq)]
pub enum Event {
    Kernel(String),
    Start(String),
    Result {
        label: String,
        test: String,
        outcome: String,
    },
    Exit {
        label: String,
        status: i32,
    },
    ModuleFailed(String),
    Done,
}

#[derive(Default, Debug)]
pub struct GuestReport {
    pub release: Option<String>,
    pub module_failures: Vec<String>,
    pub executables: BTreeMap<String, Executable>,
    /// The init script got to the end.
    pub done: bool,
    current: Option<String>,
}

impl GuestReport {
    pub fn feed(&mut self, line: &str) -> Option<Event> {
        if let Some(marker) = line.strip_prefix(MARKER) {
            return self.marker(marker);
        }
        let label = self.current.clone()?;
        let exe = self.executables.entry(label.clone()).or_default();
        if let Some((test, outcome)) = test_line(line) {
            let result = match outcome {
                "ok" => Outcome::Passed,
                o if o.starts_with("ignored") => Outcome::Ignored,
                _ => Outcome::Failed(String::new()),
            };
            exe.results.insert(test.to_string(), result);
            return Some(Event::Result {
                label,
                test: test.to_string(),
                outcome: outcome.to_string(),
            });
        }
        if let Some(test) = line
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" has been running for over 60 seconds"))
        {
            exe.slow.push(test.to_string());
        } else if let Some(test) = line
            .strip_prefix("---- ")
            .and_then(|l| l.strip_suffix(" stdout ----"))
        {
            exe.in_failure = Some(test.to_string());
        } else if line == "failures:" || line.starts_with("test result: ") {
            exe.in_failure = None;
        } else if let Some(test) = &exe.in_failure {
            exe.failure_text
                .entry(test.clone())
                .or_default()
                .push(line.to_string());
        }
        None
    }

    fn marker(&mut self, marker: &str) -> Option<Event> {
        let (word, rest) = marker.split_once(' ').unwrap_or((marker, ""));
        match word {
            "kernel" => {
                self.release = Some(rest.to_string());
                Some(Event::Kernel(rest.to_string()))
            }
            "module-failed" => {
                self.module_failures.push(rest.to_string());
                Some(Event::ModuleFailed(rest.to_string()))
            }
            "start" => {
                self.current = Some(rest.to_string());
                self.executables.entry(rest.to_string()).or_default();
                Some(Event::Start(rest.to_string()))
            }
            "exit" => {
                let (label, status) = rest.rsplit_once(' ')?;
                let status = status.parse().ok()?;
                let exe = self.executables.entry(label.to_string()).or_default();
                exe.exit = Some(status);
                exe.in_failure = None;
                self.current = None;
                Some(Event::Exit {
                    label: label.to_string(),
                    status,
                })
            }
            "done" => {
                self.done = true;
                Some(Event::Done)
            }
            _ => None,
        }
    }

    /// The outcome of every test in `tests` (the executable's `--list` on the host), with
    /// a reason for each that has none.
    pub fn outcomes(&self, label: &str, tests: &[String], timed_out: bool) -> Vec<Outcome> {
        let exe = self.executables.get(label);
        tests
            .iter()
            .map(|test| {
                let Some(exe) = exe else {
                    return Outcome::NotRun(if timed_out {
                        "the guest was killed at its timeout before this executable ran".into()
                    } else {
                        "the guest stopped before this executable ran (see the console log)".into()
                    });
                };
                match exe.results.get(test) {
                    Some(Outcome::Failed(_)) => Outcome::Failed(exe.failure_reason(test)),
                    Some(other) => other.clone(),
                    None => Outcome::NotRun(exe.not_run_reason(test, timed_out)),
                }
            })
            .collect()
    }
}

impl Executable {
    /// The panic message with its `Caused by:` chain on one line, or the last thing the
    /// test printed.
    fn failure_reason(&self, test: &str) -> String {
        let lines = self.failure_text.get(test).map_or(&[][..], Vec::as_slice);
        if let Some(i) = lines.iter().position(|l| l.contains("panicked at")) {
            let message: Vec<&str> = lines[i + 1..]
                .iter()
                .map(|l| l.trim())
                .take_while(|l| {
                    !l.starts_with("stack backtrace:")
                        && !l.starts_with("Stack backtrace:")
                        && !l.starts_with("note:")
                })
                .filter(|l| !l.is_empty() && *l != "Caused by:")
                // anyhow numbers the causes when there are several: `0: ...`.
                .map(|l| {
                    l.split_once(": ")
                        .filter(|(n, _)| n.parse::<u32>().is_ok())
                        .map_or(l, |(_, c)| c)
                })
                .collect();
            // A cause the message already quotes (`{e:#}` then `{e:?}`) is said once.
            let mut joined = String::new();
            for part in message {
                if !joined.contains(part) {
                    if !joined.is_empty() {
                        joined.push_str(": ");
                    }
                    joined.push_str(part);
                }
            }
            if !joined.is_empty() {
                return joined;
            }
        }
        lines
            .iter()
            .rev()
            .map(|l| l.trim())
            .find(|l| !l.is_empty() && !l.starts_with("note:"))
            .map_or_else(|| "no output captured".into(), str::to_string)
    }

    fn not_run_reason(&self, test: &str, timed_out: bool) -> String {
        let hung = self.slow.iter().any(|t| t == test);
        match self.exit {
            // busybox `timeout -s KILL`: 128 + SIGKILL.
            Some(137) if hung => "hung: killed at the per-executable timeout".into(),
            Some(137) => "the executable was killed at its timeout first".into(),
            Some(status) => {
                format!(
                    "the executable exited ({status}) before reporting it (see the console log)"
                )
            }
            None if timed_out => "the guest was killed at its timeout while it ran".into(),
            None => "the guest stopped while it ran (see the console log)".into(),
        }
    }
}

/// `test <name> ... <outcome>`.
fn test_line(line: &str) -> Option<(&str, &str)> {
    let (name, outcome) = line.strip_prefix("test ")?.split_once(" ... ")?;
    let outcome = outcome.trim();
    let known = outcome == "ok" || outcome == "FAILED" || outcome.starts_with("ignored");
    known.then_some((name, outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(lines: &str) -> GuestReport {
        let mut r = GuestReport::default();
        for l in lines.lines() {
            r.feed(l);
        }
        r
    }

    const RUN: &str = "\
@@sluice-vm kernel 6.1.0-57-cloud-amd64
@@sluice-vm start agent_e2e

running 3 tests
test enrolls ... ok
test skipped ... ignored, needs a cluster
test attaches ... FAILED

failures:

---- attaches stdout ----

thread 'attaches' (77) panicked at tests/tests/agent_e2e.rs:10:5:
enroll: attaching TC program: Invalid argument (TCX needs kernel ≥ 6.6)
stack backtrace:
   0: x
note: Some details are omitted

failures:
    attaches

test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out
@@sluice-vm exit agent_e2e 101
@@sluice-vm start other
test stuck has been running for over 60 seconds
@@sluice-vm exit other 137
";

    #[test]
    fn outcomes_with_reasons() {
        let r = feed(RUN);
        assert_eq!(r.release.as_deref(), Some("6.1.0-57-cloud-amd64"));
        let tests = ["enrolls", "skipped", "attaches", "never"].map(String::from);
        assert_eq!(
            r.outcomes("agent_e2e", &tests, false),
            [
                Outcome::Passed,
                Outcome::Ignored,
                Outcome::Failed(
                    "enroll: attaching TC program: Invalid argument (TCX needs kernel ≥ 6.6)"
                        .into()
                ),
                Outcome::NotRun(
                    "the executable exited (101) before reporting it (see the console log)".into()
                ),
            ]
        );
        let other = r.outcomes("other", &["stuck".into(), "queued".into()], false);
        assert_eq!(
            other,
            [
                Outcome::NotRun("hung: killed at the per-executable timeout".into()),
                Outcome::NotRun("the executable was killed at its timeout first".into()),
            ]
        );
        assert!(!r.done);
        assert!(matches!(
            &r.outcomes("third", &["t".into()], true)[0],
            Outcome::NotRun(why) if why.contains("before this executable ran")
        ));
    }

    #[test]
    fn an_anyhow_panic_reports_its_causes() {
        let r = feed(
            "@@sluice-vm start x\ntest t ... FAILED\n\nfailures:\n\n---- t stdout ----\n\n\
             thread 't' (3109) panicked at tests/tests/x.rs:256:14:\n\
             called `Result::unwrap()` on an `Err` value: BPF_PROG_QUERY\n\nCaused by:\n\
             \x20   0: BPF_PROG_QUERY\n\
             \x20   1: Invalid argument (os error 22)\n\nStack backtrace:\n   0: f\n\n\
             failures:\n    t\n@@sluice-vm exit x 101\n",
        );
        assert_eq!(
            r.outcomes("x", &["t".into()], false),
            [Outcome::Failed(
                "called `Result::unwrap()` on an `Err` value: BPF_PROG_QUERY: \
                 Invalid argument (os error 22)"
                    .into()
            )]
        );
    }

    #[test]
    fn a_test_that_returned_an_error_reports_its_last_line() {
        let r = feed(
            "@@sluice-vm start x\ntest t ... FAILED\n\nfailures:\n\n---- t stdout ----\n\
             Error: no cgroup2 mount\n\nfailures:\n    t\n\n@@sluice-vm exit x 101\n",
        );
        assert_eq!(
            r.outcomes("x", &["t".into()], false),
            [Outcome::Failed("Error: no cgroup2 mount".into())]
        );
    }

    #[test]
    fn stray_output_is_not_a_result() {
        let mut r = GuestReport::default();
        assert_eq!(r.feed("test x ... ok"), None, "outside an executable");
        r.feed("@@sluice-vm start e");
        assert_eq!(r.feed("test x ... maybe"), None);
        assert_eq!(
            r.feed("@@sluice-vm exit e 0"),
            Some(Event::Exit {
                label: "e".into(),
                status: 0
            })
        );
    }
}
