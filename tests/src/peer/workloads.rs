//! One listener set per ZDS workload, the way ztunnel keeps one proxy per pod: started
//! inside the pod's netns on Add, kept on a repeated Add for the same netns (ztunnel compares
//! the netns inode and keeps its proxy), replaced on an Add with a new netns, stopped on Del
//! or when a snapshot no longer names the pod.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::mpsc::Sender;

use super::{Event, Labels, Peer};

/// What an Add did to a workload's listener set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// Nothing ran for the uid: a listener set was started.
    New,
    /// The same netns was already served: the running set was kept, untouched (no gap).
    Kept,
    /// Another netns was served (the pod got a new sandbox): the old set was replaced.
    Replaced,
}

/// A network namespace's identity: device and inode of its nsfs file.
type NetnsId = (u64, u64);

fn netns_id(fd: BorrowedFd<'_>) -> io::Result<NetnsId> {
    let st = nix::sys::stat::fstat(fd).map_err(io::Error::from)?;
    Ok((st.st_dev, st.st_ino))
}

pub struct Workloads {
    running: BTreeMap<String, (NetnsId, Peer)>,
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

    /// Serves `uid` inside `netns`: keeps a set already serving that netns, else starts one
    /// (replacing a set serving another netns). On error nothing runs for `uid` any more.
    pub fn start(&mut self, uid: &str, netns: BorrowedFd<'_>) -> io::Result<Started> {
        let id = netns_id(netns)?;
        if self
            .running
            .get(uid)
            .is_some_and(|(running, _)| *running == id)
        {
            return Ok(Started::Kept);
        }
        let replaced = self.stop(uid);
        let labels = Labels {
            netns: self.tag.clone(),
            uid: Some(uid.to_string()),
        };
        let peer = Peer::start_labelled_in_netns(netns, self.events.clone(), labels)?;
        self.running.insert(uid.to_string(), (id, peer));
        Ok(if replaced {
            Started::Replaced
        } else {
            Started::New
        })
    }

    /// Stops `uid`'s listener set; false if none ran.
    pub fn stop(&mut self, uid: &str) -> bool {
        self.running
            .remove(uid)
            .map(|(_, peer)| peer.stop())
            .is_some()
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
