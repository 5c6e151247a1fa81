//! ztunnel's side of ZDS, for the Sluice setups: connect to the agent (retrying with backoff,
//! as ztunnel does), say hello, then Add starts a pod's listener set (a repeated Add for the
//! same netns keeps it), Del stops it, SnapshotSent stops the ones not named; every request
//! is acknowledged once done. The wire format comes from the tests' ZDS client.
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde_json::json;
use sluice_tests::testkit::output::Output;
use sluice_tests::zds::{ZdsConn, ZdsError, proto::workload_request::Payload};
use tokio::runtime::Handle;

use super::netns::PodNetns;
use super::workload::{Ctx, Workload};

const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

pub fn serve(socket: &Path, rt: &Handle, ctx: &Arc<Ctx>, home: &Arc<OwnedFd>, out: &Output) {
    let mut workloads: BTreeMap<String, Workload> = BTreeMap::new();
    let mut backoff = FIRST_BACKOFF;
    loop {
        let conn = match ZdsConn::connect(socket).and_then(|c| c.send_hello().map(|()| c)) {
            Ok(c) => c,
            Err(_) => {
                thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = FIRST_BACKOFF;
        let _ = out.emit(&json!({"event": "zds_connected"}));
        let mut named = BTreeSet::new();
        loop {
            let received = match conn.recv_request(None) {
                Ok(r) => r,
                Err(ZdsError::Closed) => break,
                Err(e) => {
                    let _ = out.emit(&json!({"event": "error", "error": e.to_string()}));
                    break;
                }
            };
            let mut fds = received.fds;
            let outcome: Result<(), String> = match received.request.payload {
                Some(Payload::Add(add)) => {
                    named.insert(add.uid.clone());
                    match fds.pop() {
                        Some(fd) => add_workload(&mut workloads, &add.uid, fd, rt, ctx, home),
                        None => Err("AddWorkload without a netns fd".into()),
                    }
                }
                Some(Payload::Keep(keep)) => {
                    named.insert(keep.uid);
                    Ok(())
                }
                Some(Payload::Del(del)) => {
                    named.remove(&del.uid);
                    if workloads.remove(&del.uid).is_some() {
                        ctx.stats.workloads(-1);
                    }
                    Ok(())
                }
                Some(Payload::SnapshotSent(_)) => {
                    let before = workloads.len();
                    workloads.retain(|uid, _| named.contains(uid));
                    ctx.stats.workloads(workloads.len() as i64 - before as i64);
                    Ok(())
                }
                None => Err("no payload".into()),
            };
            let sent = match &outcome {
                Ok(()) => conn.send_ack(),
                Err(e) => conn.send_nack(e),
            };
            if sent.is_err() {
                break;
            }
        }
    }
}

fn add_workload(
    workloads: &mut BTreeMap<String, Workload>,
    uid: &str,
    fd: OwnedFd,
    rt: &Handle,
    ctx: &Arc<Ctx>,
    home: &Arc<OwnedFd>,
) -> Result<(), String> {
    let ns = PodNetns::new(fd, Arc::clone(home));
    let id = ns.id().map_err(|e| e.to_string())?;
    if workloads.get(uid).is_some_and(|w| w.netns_id == id) {
        return Ok(());
    }
    if workloads.remove(uid).is_some() {
        ctx.stats.workloads(-1);
    }
    let w =
        Workload::start(rt, ns, ctx).map_err(|e| format!("starting listeners for {uid}: {e}"))?;
    workloads.insert(uid.to_string(), w);
    Ok(())
}
