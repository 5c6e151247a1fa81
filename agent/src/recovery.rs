//! Crash recovery: rebuilds the pod table from the saved records against what the dataplane
//! has pinned, finishing or undoing each operation a crash interrupted.
//!
//! | record phase  | dataplane has the pod | outcome                                          |
//! |---------------|-----------------------|--------------------------------------------------|
//! | `unenrolling` | either                | unenrollment finished, record removed            |
//! | `enrolling`   | no                    | the enrollment never happened: record removed    |
//! | `enrolling`   | yes                   | the enrollment completed: kept as enrolled       |
//! | `enrolled`    | yes                   | kept                                             |
//! | `enrolled`    | no (bpffs wiped)      | enrolled again if its netns is still there       |
//!
//! A pod whose netns is gone is dropped; one whose netns merely cannot be opened now is kept
//! (ztunnel gets a Keep for it). A dataplane entry with no record stays redirected (fail
//! closed) until the pod is enrolled again, which adopts it, or the agent is uninstalled.
use std::sync::Arc;

use tracing::{info, warn};

use crate::{
    agent::Pod,
    dataplane::{self, Dataplane, EnrollOptions},
    netns::Netns,
    state::{Phase, PodRecord, StateStore},
};

pub(crate) fn restore(dp: &Dataplane, store: &StateStore, records: Vec<PodRecord>) -> Vec<Pod> {
    let mut kept = Vec::new();
    for record in records {
        match restore_one(dp, record) {
            Restored::Keep(pod) => {
                if let Err(e) = store.put(&pod.record) {
                    warn!(uid = %pod.record.uid, error = %e, "recording a restored pod");
                }
                kept.push(pod);
            }
            Restored::Drop(uid) => {
                if let Err(e) = store.remove(&uid) {
                    warn!(uid, error = %e, "removing the record of a dropped pod");
                }
            }
        }
    }
    let known: Vec<u64> = kept.iter().map(|p| p.record.netns_cookie).collect();
    for (cookie, _) in dp.enrolled() {
        if known.contains(&cookie) {
            continue;
        }
        if dp.netns_alive(cookie) == Some(false) {
            let _ = dp.forget(cookie);
        } else {
            warn!(
                cookie,
                "an enrolled netns has no pod record; it stays redirected until enrolled again or uninstalled"
            );
        }
    }
    kept
}

enum Restored {
    Keep(Pod),
    Drop(String),
}

fn restore_one(dp: &Dataplane, mut record: PodRecord) -> Restored {
    let netns = open_verified(&record);
    let cookie = record.netns_cookie;
    let uid = record.uid.clone();
    match record.phase {
        Phase::Unenrolling => {
            let res = match &netns {
                Some(ns) => match dp.unenroll(ns) {
                    Ok(()) | Err(dataplane::Error::NotEnrolled(_)) => Ok(()),
                    Err(e) => Err(e),
                },
                None => dp.forget(cookie),
            };
            match res {
                Ok(()) => info!(uid, "finished an interrupted unenrollment"),
                Err(e) => {
                    warn!(uid, error = %e, "could not finish an interrupted unenrollment")
                }
            }
            return Restored::Drop(uid);
        }
        Phase::Enrolling if !dp.is_enrolled(cookie) => {
            info!(
                uid,
                "dropping an enrollment interrupted before the dataplane had it"
            );
            return Restored::Drop(uid);
        }
        Phase::Enrolling | Phase::Enrolled => {}
    }
    record.phase = Phase::Enrolled;
    if !dp.is_enrolled(cookie) {
        // The dataplane lost it (bpffs was wiped): enroll again if the pod is still there.
        let Some(ns) = &netns else {
            info!(uid, "dropping a pod whose netns is gone");
            return Restored::Drop(uid);
        };
        let opts = EnrollOptions {
            dns_capture: record.dns_capture,
            bypass_inbound: record.bypass_inbound,
            ipv6: record.ipv6,
        };
        match dp.enroll(ns, &record.ips, opts) {
            Ok(c) => record.netns_cookie = c,
            Err(e) => {
                warn!(uid, error = %e, "could not re-enroll a pod the dataplane lost");
                return Restored::Drop(uid);
            }
        }
    } else if netns.is_none() && dp.netns_alive(cookie) == Some(false) {
        info!(uid, "dropping a pod whose netns is gone");
        let _ = dp.forget(cookie);
        return Restored::Drop(uid);
    }
    Restored::Keep(Pod {
        record,
        netns: netns.map(Arc::new),
    })
}

/// Whether the record's netns path still names the namespace that was enrolled.
pub(crate) fn names_its_netns(record: &PodRecord) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(&record.netns)
        .map(|m| m.ino() == record.netns_inode)
        .unwrap_or(false)
}

/// Opens the record's netns if its path still names the same namespace.
pub(crate) fn open_verified(record: &PodRecord) -> Option<Netns> {
    Netns::open(&record.netns)
        .ok()
        .filter(|ns| ns.inode() == record.netns_inode)
}
