//! The installer's file operations: which config the runtime uses, and atomic replacement of
//! configs and of the plugin binary (a runtime never reads a half-written file).
use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use super::conflist::Kind;

/// Suffix of our temporary files: not a CNI extension, so a runtime never loads one.
const TMP_SUFFIX: &str = ".sluice-tmp";

/// The network configurations in `dir` in the order libcni and containerd rank them: files
/// ending in `.conf`, `.conflist` or `.json`, sorted by name; the first one is used.
pub fn config_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if Kind::of(name).is_none() {
            continue;
        }
        // Follows symlinks, as the runtime's open does; directories are skipped.
        if fs::metadata(entry.path()).is_ok_and(|m| m.is_file()) {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Replaces `path` with `bytes` and permission bits `mode`: written to a temporary file in the
/// same directory, synced, renamed over `path`, and the directory synced.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = tmp_path(path)?;
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have cut bits from `mode`.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// What a file looked like: enough to tell it was not touched since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    mode: u32,
}

impl Stamp {
    /// Not modified in the last two seconds (timestamps can be as coarse as a jiffy or a
    /// second).
    fn settled(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        now - self.mtime_ns > 2_000_000_000
    }

    pub fn of(path: &Path) -> io::Result<Stamp> {
        use std::os::unix::fs::MetadataExt as _;
        let m = fs::metadata(path)?;
        Ok(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            mode: m.mode(),
        })
    }
}

/// Installs `src` at `dst` (mode 0755) unless `dst` already has the same bytes. Returns
/// whether it wrote. A runtime exec'ing the old binary keeps running it: the new one is a new
/// file renamed into place. `seen` remembers both files as they were after the last call, so
/// that an untouched pair is not read again.
pub fn install_binary(
    src: &Path,
    dst: &Path,
    seen: &mut Option<(Stamp, Stamp)>,
) -> io::Result<bool> {
    let now = (Stamp::of(src)?, Stamp::of(dst).ok());
    if let (Some(prev), (s, Some(d))) = (*seen, now)
        && prev == (s, d)
    {
        return Ok(false);
    }
    let new = fs::read(src)?;
    let same = fs::read(dst).is_ok_and(|old| old == new)
        && fs::metadata(dst).is_ok_and(|m| m.permissions().mode() & 0o777 == 0o755);
    if !same {
        write_atomic(dst, &new, 0o755)?;
    }
    let after = (now.0, Stamp::of(dst)?);
    // A file changed again within its timestamp's tick keeps its stamp (same length, same
    // mtime): stamps are trusted only once both files have been still for a while.
    *seen = (after.0.settled() && after.1.settled()).then_some(after);
    Ok(!same)
}

/// Permission bits of `path`.
pub fn mode_of(path: &Path) -> io::Result<u32> {
    Ok(fs::metadata(path)?.permissions().mode() & 0o7777)
}

/// Removes `path`; a missing file is fine.
pub fn remove(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => sync_dir(path),
    }
}

fn tmp_path(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::other(format!("{} has no file name", path.display())))?;
    Ok(path.with_file_name(format!(".{name}{TMP_SUFFIX}")))
}

fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tempdir(tag: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sluice-{tag}-{}-{n}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn configs_are_ranked_by_name_and_extension() {
        let dir = tempdir("files-rank");
        for name in [
            "99-last.conflist",
            "10-b.conf",
            "10-a.json",
            "05-x.conflist.sluice-tmp",
            "00-notes.txt",
            ".10-hidden.conflist.sluice-tmp",
        ] {
            fs::write(dir.join(name), "{}").unwrap();
        }
        fs::create_dir(dir.join("01-dir.conflist")).unwrap();
        let names: Vec<String> = config_files(&dir)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["10-a.json", "10-b.conf", "99-last.conflist"]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn atomic_writes_set_the_mode_and_leave_no_temporary() {
        let dir = tempdir("files-write");
        let p = dir.join("10-x.conflist");
        write_atomic(&p, b"one", 0o600).unwrap();
        assert_eq!(mode_of(&p).unwrap(), 0o600);
        write_atomic(&p, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(mode_of(&p).unwrap(), 0o644);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_binary_is_copied_only_when_it_differs() {
        let dir = tempdir("files-bin");
        let (src, dst) = (dir.join("src"), dir.join("sluice-cni"));
        let mut seen = None;
        fs::write(&src, b"v1").unwrap();
        assert!(install_binary(&src, &dst, &mut seen).unwrap());
        assert_eq!(mode_of(&dst).unwrap(), 0o755);
        assert!(!install_binary(&src, &dst, &mut seen).unwrap());
        assert!(!install_binary(&src, &dst, &mut None).unwrap());
        fs::write(&src, b"v2").unwrap();
        assert!(install_binary(&src, &dst, &mut seen).unwrap());
        assert_eq!(fs::read(&dst).unwrap(), b"v2");
        // Someone else's change to the installed copy is noticed.
        write_atomic(&dst, b"tampered", 0o755).unwrap();
        assert!(install_binary(&src, &dst, &mut seen).unwrap());
        assert_eq!(fs::read(&dst).unwrap(), b"v2");
        // Files still for a while are remembered by their stamps, and not read again.
        let past = std::time::SystemTime::now() - std::time::Duration::from_secs(10);
        for f in [&src, &dst] {
            fs::File::options()
                .write(true)
                .open(f)
                .unwrap()
                .set_modified(past)
                .unwrap();
        }
        assert!(!install_binary(&src, &dst, &mut seen).unwrap());
        assert!(seen.is_some());
        remove(&dst).unwrap();
        remove(&dst).unwrap();
        fs::remove_dir_all(dir).unwrap();
    }
}
