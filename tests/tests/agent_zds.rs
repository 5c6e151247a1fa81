//! The agent's ZDS server against a ZDS client written from the wire facts alone
//! (`sluice_tests::zds`): snapshot order, live adds and dels, NACKs and retries, reconnects,
//! overlapping ztunnels, and bad clients. Every transcript is checked against the protocol's
//! invariants (one netns fd with each Add and none otherwise, workload info on every Add, one
//! snapshot, no Keep after it, < 1024 bytes, one request at a time).
use std::{collections::BTreeSet, path::Path, time::Duration};

use sluice_tests::{
    agent_proc::{AgentFixture, METRICS_PORT},
    zds::{Entry, Kind, Policy, Response, TEST_NACK, ZdsClient, ZdsError},
};

const TESTKIT: &str = env!("CARGO_BIN_EXE_sluice-testkit");
const WAIT: Duration = Duration::from_secs(10);
/// Margin for "nothing more arrives", used only after a positive signal.
const SETTLE: Duration = Duration::from_millis(300);

fn fixture(pods: usize, extra: &[&str]) -> Option<AgentFixture> {
    AgentFixture::start_if_privileged(Path::new(TESTKIT), pods, extra)
}

fn uid(i: usize) -> String {
    AgentFixture::uid(i)
}

fn is(kind: Kind, uid: Option<&str>) -> impl Fn(&Entry) -> bool + '_ {
    move |e| e.kind == kind && e.uid.as_deref() == uid
}

fn connect(fx: &AgentFixture, policy: Policy) -> ZdsClient {
    ZdsClient::spawn(fx.zds_conn().unwrap(), policy).unwrap()
}

/// Enrolls without waiting for ztunnel (`--wait-ms 0`).
fn enroll(fx: &AgentFixture, i: usize) {
    fx.enroll(i, &["--wait-ms", "0"]).unwrap();
}

#[test]
fn snapshot_then_live_adds_and_dels() {
    let Some(fx) = fixture(3, &[]) else { return };
    enroll(&fx, 0);
    enroll(&fx, 1);
    let client = connect(&fx, Policy::ack_all());
    let first = client.wait_for(|e| e.kind == Kind::Add, WAIT).unwrap();
    let second = client.wait_for(|e| e.kind == Kind::Add, WAIT).unwrap();
    client.wait_for(is(Kind::SnapshotSent, None), WAIT).unwrap();
    let snap: BTreeSet<_> = [first.uid.clone().unwrap(), second.uid.clone().unwrap()].into();
    assert_eq!(snap, [uid(0), uid(1)].into());
    let info = first.workload_info.unwrap();
    assert_eq!(info.namespace, "default");
    assert!(
        info.name.starts_with("pod") && info.service_account.starts_with("sa"),
        "{info:?}"
    );

    // Live: an Add as soon as a pod is enrolled (the enroll call reports ztunnel's ACK), a Del
    // as soon as one is unenrolled.
    let reply = fx.enroll(2, &[]).unwrap();
    assert_eq!(reply["ztunnel"]["state"], "acked", "{reply}");
    client.wait_for(is(Kind::Add, Some(&uid(2))), WAIT).unwrap();
    fx.unenroll(0).unwrap();
    client.wait_for(is(Kind::Del, Some(&uid(0))), WAIT).unwrap();
    fx.wait_ztunnel_state("acked", Some(1), WAIT).unwrap();

    let t = client.finish();
    t.check_invariants().unwrap();
    assert_eq!(
        t.kinds(),
        [
            Kind::Add,
            Kind::Add,
            Kind::SnapshotSent,
            Kind::Add,
            Kind::Del
        ]
    );
    assert!(
        t.entries()
            .iter()
            .all(|e| e.response == Some(Response::Ack))
    );
}

#[test]
fn nacked_adds_are_retried_until_acked() {
    let Some(fx) = fixture(1, &[]) else { return };
    let client = connect(&fx, Policy::ack_all().nack_uid(uid(0), 2));
    client.wait_for(is(Kind::SnapshotSent, None), WAIT).unwrap();
    let reply = fx.enroll(0, &[]).unwrap();
    assert_eq!(reply["ztunnel"]["state"], "nacked", "{reply}");
    assert_eq!(reply["ztunnel"]["error"], TEST_NACK);
    for _ in 0..3 {
        client.wait_for(is(Kind::Add, Some(&uid(0))), WAIT).unwrap();
    }
    let t = client.finish();
    t.check_invariants().unwrap();
    let answers: Vec<_> = t
        .entries()
        .iter()
        .filter(|e| e.kind == Kind::Add)
        .map(|e| e.response.clone())
        .collect();
    assert_eq!(
        answers,
        [
            Some(Response::Nack(TEST_NACK.into())),
            Some(Response::Nack(TEST_NACK.into())),
            Some(Response::Ack)
        ]
    );
    fx.wait_ztunnel_state("acked", Some(0), WAIT).unwrap();
}

/// A ztunnel that refuses a pod on every connection, across reconnects: each NACK and each
/// snapshot must not start another retry loop. With a constant 50 ms backoff, one loop sends at
/// most ~20 Adds a second; one loop per reconnect would send several times that.
#[test]
fn a_pod_nacked_across_reconnects_is_retried_on_one_schedule() {
    let Some(fx) = fixture(1, &["--zds-retry-ms", "50"]) else {
        return;
    };
    let policy = || Policy::ack_all().nack_uid(uid(0), 1_000_000);
    let mut client = connect(&fx, policy());
    client.wait_for(is(Kind::SnapshotSent, None), WAIT).unwrap();
    enroll(&fx, 0);
    client.wait_for(is(Kind::Add, Some(&uid(0))), WAIT).unwrap();
    for _ in 0..4 {
        client.finish().check_invariants().unwrap();
        client = connect(&fx, policy());
        client.wait_for(is(Kind::Add, Some(&uid(0))), WAIT).unwrap();
        client.wait_for(is(Kind::SnapshotSent, None), WAIT).unwrap();
    }
    let window = Duration::from_secs(1);
    let start = std::time::Instant::now();
    let mut adds = 0;
    while let Some(left) = window.checked_sub(start.elapsed()) {
        match client.next_entry(left) {
            Some(e) if e.kind == Kind::Add => adds += 1,
            Some(_) => {}
            None => break,
        }
    }
    // A loaded machine only makes retries later, never more frequent: this bound holds.
    assert!((1..=22).contains(&adds), "{adds} Adds in {window:?}");
    let t = client.finish();
    t.check_invariants().unwrap();
}

/// A ztunnel that goes away mid-snapshot (one request unanswered) and comes back gets the
/// whole snapshot again, on the new connection only.
#[test]
fn a_reconnecting_ztunnel_gets_a_full_snapshot() {
    let Some(fx) = fixture(3, &[]) else { return };
    for i in 0..3 {
        enroll(&fx, i);
    }
    let first = connect(&fx, Policy::ack_all().stop_responding_after(1));
    first.wait_for(|e| e.kind == Kind::Add, WAIT).unwrap();
    first.wait_for(|e| e.kind == Kind::Add, WAIT).unwrap();
    let t = first.finish();
    t.check_invariants().unwrap();

    let second = connect(&fx, Policy::ack_all());
    second.wait_for(is(Kind::SnapshotSent, None), WAIT).unwrap();
    let t = second.finish();
    t.check_invariants().unwrap();
    assert_eq!(t.snapshot_uids(), (0..3).map(uid).collect());
    assert_eq!(
        t.kinds()
            .iter()
            .filter(|k| **k == Kind::SnapshotSent)
            .count(),
        1
    );
}

/// During a ztunnel upgrade two connections overlap: Adds go to the newest only, Dels to both.
#[test]
fn overlapping_ztunnels_get_adds_on_the_newest_and_dels_on_all() {
    let Some(fx) = fixture(2, &[]) else { return };
    enroll(&fx, 0);
    let old = connect(&fx, Policy::ack_all());
    old.wait_for(is(Kind::SnapshotSent, None), WAIT).unwrap();
    let new = connect(&fx, Policy::ack_all());
    new.wait_for(is(Kind::Add, Some(&uid(0))), WAIT).unwrap();
    new.wait_for(is(Kind::SnapshotSent, None), WAIT).unwrap();

    fx.enroll(1, &[]).unwrap();
    new.wait_for(is(Kind::Add, Some(&uid(1))), WAIT).unwrap();
    fx.unenroll(0).unwrap();
    new.wait_for(is(Kind::Del, Some(&uid(0))), WAIT).unwrap();
    old.wait_for(is(Kind::Del, Some(&uid(0))), WAIT).unwrap();

    let (old, new) = (old.finish(), new.finish());
    old.check_invariants().unwrap();
    new.check_invariants().unwrap();
    assert_eq!(
        old.kinds(),
        [Kind::Add, Kind::SnapshotSent, Kind::Del],
        "the old ztunnel got no new Add"
    );
    assert_eq!(
        new.kinds(),
        [Kind::Add, Kind::SnapshotSent, Kind::Add, Kind::Del]
    );
}

/// Garbage instead of a hello, an oversized answer, or an unsolicited message: the agent drops
/// that connection, counts the error, and keeps serving the others.
#[test]
fn bad_clients_are_dropped_and_others_keep_being_served() {
    let Some(fx) = fixture(3, &[]) else { return };
    let good = connect(&fx, Policy::ack_all());
    good.wait_for(is(Kind::SnapshotSent, None), WAIT).unwrap();

    // Not a hello (a field 1 varint that never ends).
    let garbage = fx.zds_conn().unwrap();
    garbage
        .send_raw(&[
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ])
        .unwrap();
    assert!(matches!(
        garbage.recv_request(Some(WAIT)),
        Err(ZdsError::Closed)
    ));

    // A hello, then, at the snapshot's first request, an answer far bigger than any Ack.
    enroll(&fx, 0);
    good.wait_for(is(Kind::Add, Some(&uid(0))), WAIT).unwrap();
    let big = fx.zds_conn().unwrap();
    big.send_hello().unwrap();
    let req = big.recv_request(Some(WAIT)).unwrap();
    assert_eq!(req.kind(), Kind::Add);
    big.send_raw(&vec![0x0a; 70 * 1024]).unwrap();
    assert!(matches!(
        big.recv_request(Some(WAIT)),
        Err(ZdsError::Closed)
    ));

    // A hello, the snapshot answered, then a message nobody asked for.
    let chatty = fx.zds_conn().unwrap();
    chatty.send_hello().unwrap();
    loop {
        let r = chatty.recv_request(Some(WAIT)).unwrap();
        chatty.send_ack().unwrap();
        if r.kind() == Kind::SnapshotSent {
            break;
        }
    }
    chatty.send_ack().unwrap();
    assert!(matches!(
        chatty.recv_request(Some(WAIT)),
        Err(ZdsError::Closed)
    ));

    // The well-behaved connection is untouched. It is no longer the newest (the chatty one was,
    // and is gone), so it gets new Adds again.
    fx.enroll(1, &[]).unwrap();
    good.wait_for(is(Kind::Add, Some(&uid(1))), WAIT).unwrap();
    good.finish().check_invariants().unwrap();
    let (_, metrics) = fx.agent.http_get(METRICS_PORT, "/metrics").unwrap();
    let protocol_errors: u64 = metrics
        .lines()
        .find(|l| l.starts_with("sluice_errors_total{kind=\"protocol\"}"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or(0);
    assert!(protocol_errors >= 3, "{metrics}");
}

/// A ztunnel that stops answering is dropped after the ACK timeout; the next one is served.
#[test]
fn a_silent_ztunnel_is_dropped_after_the_ack_timeout() {
    let Some(fx) = fixture(1, &["--zds-ack-timeout", "1"]) else {
        return;
    };
    enroll(&fx, 0);
    let silent = connect(&fx, Policy::ack_all().stop_responding_after(0));
    silent.wait_for(is(Kind::Add, Some(&uid(0))), WAIT).unwrap();
    // join: the loop ends only when the agent closes the connection.
    let t = silent.join();
    assert!(
        matches!(t.end(), Some(sluice_tests::zds::End::Closed)),
        "{:?}",
        t.end()
    );
    let next = connect(&fx, Policy::ack_all());
    next.wait_for(is(Kind::SnapshotSent, None), WAIT).unwrap();
    next.finish().check_invariants().unwrap();
    fx.wait_ztunnel_state("acked", Some(0), WAIT).unwrap();
}

/// The agent never sends a request before the previous one was answered, even when ztunnel is
/// slow.
#[test]
fn one_request_at_a_time_with_a_slow_ztunnel() {
    let Some(fx) = fixture(3, &[]) else { return };
    for i in 0..3 {
        enroll(&fx, i);
    }
    let slow = connect(
        &fx,
        Policy::ack_all().delay_acks(Duration::from_millis(150)),
    );
    slow.wait_for(is(Kind::SnapshotSent, None), WAIT).unwrap();
    std::thread::sleep(SETTLE);
    let t = slow.finish();
    t.check_invariants().unwrap();
    assert_eq!(t.kinds().len(), 4);
}

#[test]
fn an_identity_too_long_for_ztunnel_is_refused_at_enroll() {
    let Some(fx) = fixture(1, &[]) else { return };
    let pod = fx.topo.pod(0);
    let name = "x".repeat(1000);
    let out = fx
        .agent
        .cli(&[
            "enroll",
            "--netns",
            &pod.path().display().to_string(),
            "--uid",
            "u",
            "--name",
            &name,
            "--namespace",
            "default",
            "--ip",
            &pod.ipv4.to_string(),
        ])
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("too long"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fx.agent.status().unwrap()["pods"].as_array().unwrap().len(),
        0
    );
}
