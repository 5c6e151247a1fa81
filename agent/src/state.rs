//! The agent's persisted pod table: what a restarted agent rebuilds its state from.
//!
//! One small JSON file per pod (`pods/<uid>.json`), replaced atomically (write a temporary
//! file, rename it over the old one), so an operation on one pod costs the same with 1 or 1,000
//! pods enrolled and a torn write can only ever leave a stray temporary file. Each record
//! carries a phase written *before* the dataplane is touched, so a crash in the middle of an
//! enrollment or unenrollment is finished or undone on restart instead of leaving a pod
//! half-known.
//!
//! Files are not fsynced: the state must survive the agent process (a crash, SIGKILL, an
//! upgrade), and the page cache does; it does not need to survive the machine, because a
//! reboot takes every pod network namespace with it (and the default directory is on tmpfs).
use std::{
    io::{self, Write as _},
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Format of the pod files; a file with another version is refused, not guessed at.
const FORMAT_VERSION: u32 = 2;
const PODS_DIR: &str = "pods";
/// The single-file table written by agents before format 2; migrated on first start.
const LEGACY_FILE: &str = "pods.json";
/// A record is tiny; anything bigger is not one of ours.
const MAX_RECORD: u64 = 64 * 1024;

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
struct RecordFile {
    version: u32,
    pod: PodRecord,
}

#[derive(Deserialize)]
struct LegacyFile {
    version: u32,
    pods: Vec<PodRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "state file {path} is unreadable ({reason}); the agent will not start with pods missing from its table, because ztunnel would stop serving them. Recover with `sluice-agent uninstall --force` (removes all redirection from this node cleanly; pods are enrolled again by the CNI plugin or Kubernetes when the agent starts), or restore the file"
    )]
    Corrupt { path: PathBuf, reason: String },
}

/// Decodes one pod file. Pure, so it can be fuzzed: every rejected input is an `Err`.
pub fn decode_record(bytes: &[u8]) -> Result<PodRecord, String> {
    let file: RecordFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if file.version != FORMAT_VERSION {
        return Err(format!("unknown format version {}", file.version));
    }
    checked(file.pod)
}

/// Decodes the legacy single-file table (format 1). Pure, so it can be fuzzed.
pub fn decode_legacy(bytes: &[u8]) -> Result<Vec<PodRecord>, String> {
    let legacy: LegacyFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if legacy.version != 1 {
        return Err(format!("unknown format version {}", legacy.version));
    }
    legacy.pods.into_iter().map(checked).collect()
}

/// A record whose uid can name its file.
fn checked(pod: PodRecord) -> Result<PodRecord, String> {
    if valid_uid(&pod.uid) {
        Ok(pod)
    } else {
        Err(format!("invalid pod uid {:?}", pod.uid))
    }
}

/// Encodes one pod file. Fails only for a netns path that is not UTF-8 (JSON cannot hold it);
/// writing an empty file instead would leave a record the next start refuses.
pub fn encode_record(pod: &PodRecord) -> Result<Vec<u8>, String> {
    let file = RecordFile {
        version: FORMAT_VERSION,
        pod: pod.clone(),
    };
    serde_json::to_vec_pretty(&file).map_err(|e| format!("encoding pod {:?}: {e}", pod.uid))
}

/// Whether `uid` can name a pod file (and so be enrolled): Kubernetes UIDs, container ids.
pub fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 253
        && !uid.starts_with('.')
        && uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
    /// Held for the life of the process: one agent per state directory at a time (during a
    /// rolling update the new agent waits here for the old one to exit).
    _lock: std::sync::Arc<nix::fcntl::Flock<std::fs::File>>,
}

impl StateStore {
    /// Uses `dir` (created, root-only, if missing), waiting for any other agent that holds it.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let io_err = |source| StateError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir.join(PODS_DIR)).map_err(io_err)?;
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

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn pods_dir(&self) -> PathBuf {
        self.dir.join(PODS_DIR)
    }

    /// The file holding `uid`'s record.
    pub fn record_path(&self, uid: &str) -> PathBuf {
        self.pods_dir().join(format!("{uid}.json"))
    }

    /// Every saved record, migrating a legacy single-file table first. Any unreadable file is
    /// an error (never silently an empty or shorter table).
    pub fn load(&self) -> Result<Vec<PodRecord>, StateError> {
        self.migrate_legacy()?;
        let dir = self.pods_dir();
        let io_err = |source| StateError::Io {
            path: dir.clone(),
            source,
        };
        let mut records = Vec::new();
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(io_err)?
            .collect::<Result<_, _>>()
            .map_err(io_err)?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".tmp") {
                // A write that never got renamed: the record it would have replaced is intact.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(uid) = name.strip_suffix(".json") else {
                continue;
            };
            let record = read_record(&path)?;
            if record.uid != uid {
                return Err(StateError::Corrupt {
                    path,
                    reason: format!("it holds pod {:?}", record.uid),
                });
            }
            records.push(record);
        }
        Ok(records)
    }

    /// Writes `pod`'s record (atomically replacing any earlier one).
    pub fn put(&self, pod: &PodRecord) -> Result<(), StateError> {
        let path = self.record_path(&pod.uid);
        let tmp = path.with_extension("json.tmp");
        let io_err = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        if let Some(phase) = crate::failpoints::arg("state-put")
            && (phase == "any" || phase == format!("{:?}", pod.phase).to_lowercase())
        {
            return Err(io_err(io::Error::other("failpoint state-put")));
        }
        let body = encode_record(pod)
            .map_err(|e| io_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        write_atomically(&tmp, &path, &body).map_err(io_err)
    }

    /// Forgets `uid`'s record; forgetting one that is not there is fine.
    pub fn remove(&self, uid: &str) -> Result<(), StateError> {
        let path = self.record_path(uid);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(StateError::Io { path, source: e })
            }
            _ => Ok(()),
        }
    }

    /// Removes the whole state directory (uninstall).
    pub fn remove_all(&self) -> io::Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// An agent before format 2 kept every pod in one `pods.json`: split it into pod files,
    /// then remove it. A crash half-way is harmless (the legacy file goes last, and wins).
    fn migrate_legacy(&self) -> Result<(), StateError> {
        let path = self.dir.join(LEGACY_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let corrupt = |reason: String| StateError::Corrupt {
            path: path.clone(),
            reason,
        };
        let pods = decode_legacy(&bytes).map_err(corrupt)?;
        for pod in &pods {
            self.put(pod)?;
        }
        std::fs::remove_file(&path).map_err(|source| StateError::Io { path, source })?;
        tracing::info!(
            pods = pods.len(),
            "migrated the pod table to one file per pod"
        );
        Ok(())
    }
}

fn read_record(path: &Path) -> Result<PodRecord, StateError> {
    let corrupt = |reason: String| StateError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|source| StateError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.len() > MAX_RECORD {
        return Err(corrupt(format!("{} bytes is too large", meta.len())));
    }
    let bytes = std::fs::read(path).map_err(|source| StateError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_record(&bytes).map_err(corrupt)
}

fn write_atomically(tmp: &Path, path: &Path, body: &[u8]) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp)?;
    f.write_all(body)?;
    drop(f);
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn record(uid: &str) -> PodRecord {
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
        store.put(&record("a")).unwrap();
        store.put(&record("b")).unwrap();
        let mut b = record("b");
        b.phase = Phase::Unenrolling;
        store.put(&b).unwrap();
        assert_eq!(store.load().unwrap(), vec![record("a"), b]);
        store.remove("a").unwrap();
        store.remove("a").unwrap();
        assert_eq!(store.load().unwrap().len(), 1);
        store.remove_all().unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn a_corrupt_or_truncated_file_is_an_error_naming_it_and_the_way_out() {
        let dir = tempdir();
        let store = StateStore::open(&dir).unwrap();
        store.put(&record("a")).unwrap();
        let path = store.record_path("a");
        let full = std::fs::read(&path).unwrap();
        for bad in [
            &full[..full.len() / 2],
            b"{not json".as_slice(),
            br#"{"version":99,"pod":{}}"#.as_slice(),
            b"".as_slice(),
        ] {
            std::fs::write(&path, bad).unwrap();
            let err = store.load().unwrap_err();
            assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains("sluice-agent uninstall --force"), "{msg}");
        }
        // A record under another pod's name is corrupt too.
        std::fs::write(store.record_path("b"), encode_record(&record("a")).unwrap()).unwrap();
        std::fs::write(&path, &full).unwrap();
        assert!(matches!(store.load(), Err(StateError::Corrupt { .. })));
        store.remove_all().unwrap();
    }

    #[test]
    fn a_leftover_temporary_file_is_ignored() {
        let dir = tempdir();
        let store = StateStore::open(&dir).unwrap();
        store.put(&record("a")).unwrap();
        std::fs::write(store.record_path("a").with_extension("json.tmp"), b"{trunc").unwrap();
        assert_eq!(store.load().unwrap(), vec![record("a")]);
        store.remove_all().unwrap();
    }

    #[test]
    fn a_legacy_table_is_migrated_once() {
        let dir = tempdir();
        std::fs::create_dir_all(&dir).unwrap();
        let legacy = serde_json::json!({"version": 1, "pods": [record("a"), record("b")]});
        std::fs::write(dir.join(LEGACY_FILE), legacy.to_string()).unwrap();
        let store = StateStore::open(&dir).unwrap();
        assert_eq!(store.load().unwrap(), vec![record("a"), record("b")]);
        assert!(!dir.join(LEGACY_FILE).exists());
        assert_eq!(store.load().unwrap().len(), 2);
        store.remove_all().unwrap();
    }

    #[test]
    fn a_record_that_cannot_be_encoded_is_an_error_not_an_empty_file() {
        use std::os::unix::ffi::OsStrExt as _;
        let dir = tempdir();
        let store = StateStore::open(&dir).unwrap();
        let mut bad = record("a");
        bad.netns = std::ffi::OsStr::from_bytes(b"/proc/1/ns/\xff").into();
        let err = store.put(&bad).unwrap_err();
        assert!(err.to_string().contains("UTF-8"), "{err}");
        assert!(!store.record_path("a").exists());
        assert!(store.load().unwrap().is_empty());
        store.remove_all().unwrap();
    }

    #[test]
    fn legacy_tables_with_a_bad_uid_or_version_are_refused() {
        let table = |version, uid: &str| {
            serde_json::json!({"version": version, "pods": [record(uid)]}).to_string()
        };
        assert_eq!(
            decode_legacy(table(1, "a").as_bytes()),
            Ok(vec![record("a")])
        );
        let err = decode_legacy(table(1, "../a").as_bytes()).unwrap_err();
        assert!(err.contains("invalid pod uid"), "{err}");
        let err = decode_legacy(table(2, "a").as_bytes()).unwrap_err();
        assert!(err.contains("version 2"), "{err}");
    }

    fn arb_record() -> impl proptest::strategy::Strategy<Value = PodRecord> {
        use proptest::prelude::*;
        let phase = prop_oneof![
            Just(Phase::Enrolling),
            Just(Phase::Enrolled),
            Just(Phase::Unenrolling)
        ];
        (
            (
                "[a-z0-9][a-z0-9_.-]{0,40}",
                "\\PC{0,12}",
                "\\PC{0,12}",
                "\\PC{0,12}",
            ),
            ("/\\PC{0,20}", any::<u64>(), any::<u64>()),
            prop::collection::vec(any::<IpAddr>(), 0..4),
            (any::<bool>(), any::<bool>(), any::<bool>(), phase),
            prop::option::of("[a-f0-9]{1,64}"),
        )
            .prop_map(
                |(
                    (uid, name, namespace, service_account),
                    (netns, netns_inode, netns_cookie),
                    ips,
                    (dns_capture, bypass_inbound, ipv6, phase),
                    container_id,
                )| PodRecord {
                    uid,
                    name,
                    namespace,
                    service_account,
                    netns: netns.into(),
                    netns_inode,
                    netns_cookie,
                    ips,
                    dns_capture,
                    bypass_inbound,
                    ipv6,
                    phase,
                    container_id,
                },
            )
    }

    proptest::proptest! {
        /// What `put` writes, `load` reads back: every field, whatever its value.
        #[test]
        fn records_round_trip(pod in arb_record()) {
            let bytes = encode_record(&pod).unwrap();
            proptest::prop_assert_eq!(decode_record(&bytes).unwrap(), pod);
        }

        /// A cut-off record is an error, never a different record.
        #[test]
        fn truncated_records_are_errors(pod in arb_record(), cut in 0.0..1.0f64) {
            let bytes = encode_record(&pod).unwrap();
            let n = (bytes.len() as f64 * cut) as usize;
            proptest::prop_assert!(decode_record(&bytes[..n]).is_err());
        }
    }

    #[test]
    fn uids_that_cannot_name_a_file_are_refused() {
        for ok in ["0b6c1f0e-7d1a-4e4b-9b1d-2f3c4d5e6f70", "pod_1.a", "x"] {
            assert!(valid_uid(ok), "{ok}");
        }
        for bad in ["", ".", "..", "../x", "a/b", "a b", "é", &"x".repeat(254)] {
            assert!(!valid_uid(bad), "{bad:?}");
        }
    }
}
