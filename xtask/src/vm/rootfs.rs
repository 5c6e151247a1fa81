//! An initramfs as a tree of entries, written as one newc cpio archive straight from the
//! source files. Host files keep their host paths, symlinks included (merged /usr,
//! /etc/alternatives), so a binary finds its loader, libraries and sibling binaries where it
//! expects them.
use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::{self, BufWriter, Write},
    os::unix::fs::PermissionsExt,
    path::{Component, Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use cpio::newc::{Builder, ModeFileType, trailer};

#[derive(Clone)]
enum Entry {
    /// A directory made only because something below it was added; any other entry for
    /// the same path replaces it (a host symlink such as `/lib -> usr/lib` must win).
    Parent,
    Dir {
        mode: u32,
    },
    /// Contents read from a host file at write time.
    File {
        src: PathBuf,
        mode: u32,
    },
    Data {
        bytes: Vec<u8>,
        mode: u32,
    },
    Symlink {
        target: PathBuf,
    },
    CharDev {
        major: u32,
        minor: u32,
        mode: u32,
    },
}

#[derive(Default, Clone)]
pub struct Rootfs {
    entries: BTreeMap<PathBuf, Entry>,
}

impl Rootfs {
    pub fn dir(&mut self, path: impl AsRef<Path>, mode: u32) {
        self.insert(path.as_ref(), Entry::Dir { mode });
    }

    pub fn data(&mut self, path: impl AsRef<Path>, bytes: impl Into<Vec<u8>>, mode: u32) {
        let bytes = bytes.into();
        self.insert(path.as_ref(), Entry::Data { bytes, mode });
    }

    /// `path` in the image holds the contents of host file `src`.
    pub fn file(&mut self, path: impl AsRef<Path>, src: &Path) -> Result<()> {
        let meta = fs::metadata(src).with_context(|| format!("reading {}", src.display()))?;
        let mode = meta.permissions().mode() & 0o7777;
        self.insert(
            path.as_ref(),
            Entry::File {
                src: src.into(),
                mode,
            },
        );
        Ok(())
    }

    pub fn symlink(&mut self, path: impl AsRef<Path>, target: impl Into<PathBuf>) {
        let target = target.into();
        self.insert(path.as_ref(), Entry::Symlink { target });
    }

    pub fn char_dev(&mut self, path: impl AsRef<Path>, major: u32, minor: u32) {
        let entry = Entry::CharDev {
            major,
            minor,
            mode: 0o600,
        };
        self.insert(path.as_ref(), entry);
    }

    /// Mirrors host path `path` (absolute): every symlink met on the way is copied as a
    /// symlink and followed, every directory keeps its mode, the file at the end is copied.
    /// Returns the path's resolved location (where the file really is).
    pub fn host_path(&mut self, path: &Path) -> Result<PathBuf> {
        self.mirror(path, 0)
            .with_context(|| format!("copying {} into the initramfs", path.display()))
    }

    fn mirror(&mut self, path: &Path, depth: u32) -> Result<PathBuf> {
        if depth > 40 {
            bail!("too many levels of symbolic links");
        }
        let comps: Vec<Component> = path.components().collect();
        let mut cur = PathBuf::from("/");
        for (i, comp) in comps.iter().enumerate() {
            match comp {
                Component::RootDir | Component::CurDir | Component::Prefix(_) => continue,
                Component::ParentDir => {
                    // `cur` has no symlink in it (each was resolved), so `..` is lexical.
                    cur.pop();
                    continue;
                }
                Component::Normal(name) => cur.push(name),
            }
            let meta = fs::symlink_metadata(&cur)?;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&cur)?;
                let resolved = cur.parent().unwrap_or(Path::new("/")).join(&target);
                self.symlink(&cur, target);
                let rest: PathBuf = comps[i + 1..].iter().collect();
                return self.mirror(&resolved.join(rest), depth + 1);
            }
            let last = i + 1 == comps.len();
            if meta.is_dir() {
                self.dir(&cur, meta.permissions().mode() & 0o7777);
            } else if last {
                self.file(&cur, &cur)?;
            } else {
                bail!("{} is not a directory", cur.display());
            }
        }
        Ok(cur)
    }

    /// Mirrors the shared libraries `elf` loads (its `ldd` list) and returns them resolved.
    pub fn shared_libs(&mut self, elf: &Path) -> Result<Vec<PathBuf>> {
        let out = Command::new("ldd")
            .arg(elf)
            .output()
            .context("running ldd")?;
        // ldd fails on static executables ("not a dynamic executable"): nothing to copy.
        if !out.status.success() {
            return Ok(Vec::new());
        }
        let mut libs = Vec::new();
        for path in ldd_paths(&String::from_utf8_lossy(&out.stdout))? {
            libs.push(self.host_path(&path)?);
        }
        Ok(libs)
    }

    /// Adds `entry` unless `path` already has an explicit one (the first wins: a file
    /// mirrored twice is the same file), with a [`Entry::Parent`] for each missing parent.
    fn insert(&mut self, path: &Path, entry: Entry) {
        for parent in path.ancestors().skip(1) {
            if parent != Path::new("/") && !self.entries.contains_key(parent) {
                self.entries.insert(parent.to_path_buf(), Entry::Parent);
            }
        }
        match self.entries.get(path) {
            None | Some(Entry::Parent) => {
                self.entries.insert(path.to_path_buf(), entry);
            }
            Some(_) => {}
        }
    }

    /// Writes the archive to `out`; returns its size in bytes.
    pub fn write_cpio(&self, out: &Path) -> Result<u64> {
        let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            // Archive names are relative to the initramfs root.
            let name = path.strip_prefix("/").unwrap_or(path).to_string_lossy();
            let header = Builder::new(&name).ino(ino as u32 + 1);
            match entry {
                Entry::Parent | Entry::Dir { .. } => {
                    let mode = match entry {
                        Entry::Dir { mode } => *mode,
                        _ => 0o755,
                    };
                    let b = header
                        .mode(mode)
                        .set_mode_file_type(ModeFileType::Directory);
                    b.nlink(2).write(&mut w, 0).finish()?;
                }
                Entry::File { src, mode } => {
                    let mut input =
                        File::open(src).with_context(|| format!("reading {}", src.display()))?;
                    let size = input.metadata()?.len();
                    let size = u32::try_from(size)
                        .with_context(|| format!("{} is too large for cpio", src.display()))?;
                    let b = header.mode(*mode).set_mode_file_type(ModeFileType::Regular);
                    let mut entry = b.write(&mut w, size);
                    let copied = io::copy(&mut input, &mut entry)?;
                    if copied != u64::from(size) {
                        bail!("{} changed size while being archived", src.display());
                    }
                    entry.finish()?;
                }
                Entry::Data { bytes, mode } => {
                    let b = header.mode(*mode).set_mode_file_type(ModeFileType::Regular);
                    let mut entry = b.write(&mut w, bytes.len() as u32);
                    entry.write_all(bytes)?;
                    entry.finish()?;
                }
                Entry::Symlink { target } => {
                    let target = target.as_os_str().as_encoded_bytes();
                    let b = header.mode(0o777).set_mode_file_type(ModeFileType::Symlink);
                    let mut entry = b.write(&mut w, target.len() as u32);
                    entry.write_all(target)?;
                    entry.finish()?;
                }
                Entry::CharDev { major, minor, mode } => {
                    let b = header.mode(*mode).set_mode_file_type(ModeFileType::Char);
                    b.rdev_major(*major)
                        .rdev_minor(*minor)
                        .write(&mut w, 0)
                        .finish()?;
                }
            }
        }
        trailer(&mut w)?;
        w.flush()?;
        Ok(w.get_ref().metadata()?.len())
    }
}

impl Rootfs {
    /// Writes the tree as a tar archive (a container image layer): owned by root, every
    /// timestamp 0, so the same files always give the same bytes (and layer digest).
    pub fn write_tar(&self, out: impl Write) -> Result<()> {
        let mut tar = tar::Builder::new(out);
        for (path, entry) in &self.entries {
            let name = path.strip_prefix("/").unwrap_or(path);
            let mut h = tar::Header::new_ustar();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match entry {
                Entry::Parent | Entry::Dir { .. } => {
                    let mode = match entry {
                        Entry::Dir { mode } => *mode,
                        _ => 0o755,
                    };
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(mode);
                    h.set_size(0);
                    tar.append_data(&mut h, name, io::empty())?;
                }
                Entry::File { src, mode } => {
                    let input =
                        File::open(src).with_context(|| format!("reading {}", src.display()))?;
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(input.metadata()?.len());
                    tar.append_data(&mut h, name, input)?;
                }
                Entry::Data { bytes, mode } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(bytes.len() as u64);
                    tar.append_data(&mut h, name, bytes.as_slice())?;
                }
                Entry::Symlink { target } => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    tar.append_link(&mut h, name, target)?;
                }
                Entry::CharDev { .. } => bail!("{}: no device nodes in a layer", path.display()),
            }
        }
        tar.into_inner()?.flush()?;
        Ok(())
    }
}

/// The absolute paths in `ldd` output: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)`
/// and the loader's own `/lib64/ld-linux-x86-64.so.2 (0x…)`; `linux-vdso.so.1` has none.
fn ldd_paths(out: &str) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for line in out.lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!("ldd: {line}");
        }
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            paths.push(PathBuf::from(path));
        }
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            ldd_paths(out).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(ldd_paths("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn mirrors_symlink_chains_and_parents() {
        let tmp = std::env::temp_dir().join(format!("sluice-rootfs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(tmp.join("usr/lib")).unwrap();
        fs::write(tmp.join("usr/lib/libx.so.1.2"), b"x").unwrap();
        std::os::unix::fs::symlink("usr/lib", tmp.join("lib")).unwrap();
        std::os::unix::fs::symlink("libx.so.1.2", tmp.join("usr/lib/libx.so.1")).unwrap();

        let mut fs_ = Rootfs::default();
        let real = fs_.host_path(&tmp.join("lib/libx.so.1")).unwrap();
        assert_eq!(real, tmp.join("usr/lib/libx.so.1.2"));
        assert!(matches!(
            fs_.entries[&tmp.join("lib")],
            Entry::Symlink { .. }
        ));
        assert!(matches!(
            fs_.entries[&tmp.join("usr/lib/libx.so.1")],
            Entry::Symlink { .. }
        ));
        assert!(matches!(
            fs_.entries[&tmp.join("usr/lib/libx.so.1.2")],
            Entry::File { .. }
        ));
        assert!(matches!(fs_.entries[&tmp.join("usr")], Entry::Dir { .. }));

        // The archive lists every parent before its children and ends with the trailer.
        let out = tmp.join("out.cpio");
        fs_.write_cpio(&out).unwrap();
        let mut names = Vec::new();
        let mut r = File::open(&out).unwrap();
        loop {
            let entry = cpio::NewcReader::new(r).unwrap();
            if entry.entry().is_trailer() {
                break;
            }
            names.push(entry.entry().name().to_string());
            r = entry.finish().unwrap();
        }
        let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
        let rel = tmp
            .strip_prefix("/")
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(pos(&format!("{rel}/usr")) < pos(&format!("{rel}/usr/lib/libx.so.1.2")));
        fs::remove_dir_all(&tmp).unwrap();
    }
}
