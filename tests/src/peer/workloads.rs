//! One listener set per ZDS workload, the way ztunnel keeps one proxy per pod: started
//! inside the pod's netns on Add, replaced on a repeated Add, stopped on Del or when a
//! snapshot no longer names the pod.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::mpsc::Sender;

use super::{Event, Labels, Peer};

pub struct Workloads {
    running: BTreeMap<String, Peer>,
    events: Sender<Event>,
    /// Copied into every event as `netns`, next to the workload's uid.
    tag: Option<String>,
}

impl Workloads {
    pub fn new(events: Sender<Event>, tag: Option<String>) -> Workloads {
        Workloads {
            running: BTreeMap::new(),
            events,
            tag,
        }
    }

    /// Starts `uid`'s listener set inside `netns`, replacing a running one. Returns
    /// whether one was replaced. On error nothing runs for `uid` any more.
    pub fn start(&mut self, uid: &str, netns: BorrowedFd<'_>) -> io::Result<bool> {
        // The old set must release the ports before the new one binds them: with the
        // same netns (a re-sent Add) the binds would fail otherwise.
        let replaced = self.stop(uid);
        let labels = Labels {
            netns: self.tag.clone(),
            uid: Some(uid.to_string()),
        };
        let peer = Peer::start_labelled_in_netns(netns, self.events.clone(), labels)?;
        self.running.insert(uid.to_string(), peer);
        Ok(replaced)
    }

    /// Stops `uid`'s listener set; false if none ran.
    pub fn stop(&mut self, uid: &str) -> bool {
        self.running.remove(uid).map(Peer::stop).is_some()
    }

    /// Stops every listener set whose uid is not in `keep`; returns their uids.
    pub fn retain(&mut self, keep: &BTreeSet<String>) -> Vec<String> {
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|uid| !keep.contains(*uid))
            .cloned()
            .collect();
        for uid in &gone {
            self.stop(uid);
        }
        gone
    }

    pub fn is_running(&self, uid: &str) -> bool {
        self.running.contains_key(uid)
    }

    pub fn uids(&self) -> impl Iterator<Item = &str> {
        self.running.keys().map(String::as_str)
    }
}
