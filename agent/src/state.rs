//! The agent's persisted pod table: what a restarted agent rebuilds its state from.
//!
//! One JSON file, replaced atomically (write, fsync, rename, fsync the directory) after every
//! change. Each record carries a phase written *before* the dataplane is touched, so a crash
//! in the middle of an enrollment or unenrollment is finished or undone on restart instead of
//! leaving a pod half-known.
use std::{
    io::{self, Write as _},
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

const FILE: &str = "pods.json";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Written before the dataplane enrolls the pod.
    Enrolling,
    Enrolled,
    /// Written before the dataplane unenrolls the pod.
    Unenrolling,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Where the pod's netns was found, and which namespace that was (the inode tells a
    /// recycled path from the pod's own namespace).
    pub netns: PathBuf,
    pub netns_inode: u64,
    pub netns_cookie: u64,
    pub ips: Vec<IpAddr>,
    pub dns_capture: bool,
    pub bypass_inbound: bool,
    #[serde(default = "yes")]
    pub ipv6: bool,
    pub phase: Phase,
    /// The sandbox container whose CNI ADD enrolled the pod; its DEL (or a GC that no longer
    /// lists it) lets the pod go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    pods: Vec<PodRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "state file {path} is unreadable ({reason}); refusing to start with an empty pod table, which would make ztunnel drop every pod. Inspect or remove it."
    )]
    Corrupt { path: PathBuf, reason: String },
}

#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
    /// Held for the life of the process: one agent per state directory at a time (during a
    /// rolling update the new agent waits here for the old one to exit).
    _lock: std::sync::Arc<nix::fcntl::Flock<std::fs::File>>,
}

impl StateStore {
    /// Uses `dir` (created, root-only, if missing).
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let io_err = |source| StateError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join("lock"))
            .map_err(io_err)?;
        let lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        {
            Ok(lock) => lock,
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
                tracing::warn!(dir = %dir.display(), "another agent holds the state directory; waiting for it to exit");
                nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                    .map_err(|(_, e)| io_err(io::Error::from(e)))?
            }
            Err((_, e)) => return Err(io_err(io::Error::from(e))),
        };
        Ok(StateStore {
            dir: dir.to_path_buf(),
            _lock: std::sync::Arc::new(lock),
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The saved records; none if nothing was ever saved.
    pub fn load(&self) -> Result<Vec<PodRecord>, StateError> {
        let path = self.path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let file: File = serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if file.version != FORMAT_VERSION {
            return Err(StateError::Corrupt {
                path,
                reason: format!("unknown format version {}", file.version),
            });
        }
        Ok(file.pods)
    }

    pub fn save(&self, pods: &[PodRecord]) -> Result<(), StateError> {
        let path = self.path();
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let io_err = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        let body = serde_json::to_vec_pretty(&File {
            version: FORMAT_VERSION,
            pods: pods.to_vec(),
        })
        .map_err(|e| io_err(io::Error::other(e)))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err)?;
        f.write_all(&body).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
        std::fs::rename(&tmp, &path).map_err(io_err)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err)?;
        Ok(())
    }

    /// Removes the state file and directory (uninstall).
    pub fn remove(&self) -> io::Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(uid: &str) -> PodRecord {
        PodRecord {
            uid: uid.into(),
            name: "n".into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
            netns: "/run/netns/x".into(),
            netns_inode: 1,
            netns_cookie: 2,
            ips: vec!["10.0.0.1".parse().unwrap()],
            dns_capture: true,
            bypass_inbound: false,
            ipv6: true,
            phase: Phase::Enrolled,
            container_id: None,
        }
    }

    fn tempdir() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::env::temp_dir().join(format!("sluice-state-test-{}-{n}", std::process::id()))
    }

    #[test]
    fn round_trips_and_starts_empty() {
        let dir = tempdir();
        let store = StateStore::open(&dir).unwrap();
        assert!(store.load().unwrap().is_empty());
        store.save(&[record("a"), record("b")]).unwrap();
        assert_eq!(store.load().unwrap(), vec![record("a"), record("b")]);
        store.remove().unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_an_empty_table() {
        let dir = tempdir();
        let store = StateStore::open(&dir).unwrap();
        std::fs::write(store.path(), b"{not json").unwrap();
        assert!(matches!(store.load(), Err(StateError::Corrupt { .. })));
        std::fs::write(store.path(), br#"{"version":99,"pods":[]}"#).unwrap();
        assert!(matches!(store.load(), Err(StateError::Corrupt { .. })));
        store.remove().unwrap();
    }
}
