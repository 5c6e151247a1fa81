//! The bpf(2) commands we issue ourselves: links (create, update, pin, inspect, detach), and
//! map updates through a shared fd.
//!
//! aya 0.14 creates the same links but cannot hand every one of them back as a pinnable fd
//! (cgroup sockopt links have no `FdLink` conversion), and it cannot replace the program of an
//! existing link (`BPF_LINK_UPDATE`), which is how a new build takes over running pods. Its map
//! writes take `&mut self`; writing through the fd here lets several enrollments proceed at once
//! (the kernel serialises each map operation itself).
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;

pub const BPF_CGROUP_SOCK_OPS: u32 = 3;
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
pub const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
pub const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;
pub const BPF_CGROUP_UDP4_RECVMSG: u32 = 19;
pub const BPF_CGROUP_UDP6_RECVMSG: u32 = 20;
pub const BPF_CGROUP_GETSOCKOPT: u32 = 21;
pub const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;
pub const BPF_CGROUP_INET6_GETPEERNAME: u32 = 30;
pub const BPF_SK_LOOKUP: u32 = 36;

/// `union bpf_attr` is at most this big for the commands we use; the kernel wants the tail zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a properly sized, zero-padded bpf_attr for `cmd`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            size_of::<Attr>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn put_u32(attr: &mut Attr, off: usize, v: u32) {
    attr.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

/// A multi-attach link from `prog` to `target` (a cgroup fd, or a netns fd for sk_lookup).
/// Dropping the returned fd detaches unless it was pinned.
pub fn link_create(prog: BorrowedFd<'_>, target: u32, attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr([0; 128]);
    // struct { __u32 prog_fd; union { __u32 target_fd; __u32 target_ifindex; }; __u32 attach_type; __u32 flags; ... }
    put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 4, target);
    put_u32(&mut attr, 8, attach_type);
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins a bpf object (here: a link) at `path` on a bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pin path contains NUL"))?;
    let mut attr = Attr([0; 128]);
    // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; ... }
    attr.0[0..8].copy_from_slice(&(cpath.as_ptr() as u64).to_ne_bytes());
    put_u32(&mut attr, 8, fd.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// Opens the object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pin path contains NUL"))?;
    let mut attr = Attr([0; 128]);
    attr.0[0..8].copy_from_slice(&(cpath.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// What the kernel says about a link (`struct bpf_link_info`, the parts we use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// For netns links: the namespace's inode, 0 once the namespace is gone.
    pub netns_ino: u32,
}

pub const BPF_LINK_TYPE_CGROUP: u32 = 3;
pub const BPF_LINK_TYPE_NETNS: u32 = 5;

pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut info = [0u8; 96];
    let mut attr = Attr([0; 128]);
    // struct { __u32 bpf_fd; __u32 info_len; __aligned_u64 info; }
    put_u32(&mut attr, 0, fd.as_raw_fd() as u32);
    put_u32(&mut attr, 4, info.len() as u32);
    attr.0[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let u32_at = |off: usize| u32::from_ne_bytes(info[off..off + 4].try_into().expect("4 bytes"));
    // { __u32 type; __u32 id; __u32 prog_id; union { ... struct { __u32 netns_ino; __u32 attach_type; } netns; } }
    // The union is 8-byte aligned, at offset 16.
    let link_type = u32_at(0);
    Ok(LinkInfo {
        link_type,
        id: u32_at(4),
        prog_id: u32_at(8),
        netns_ino: if link_type == BPF_LINK_TYPE_NETNS {
            u32_at(16)
        } else {
            0
        },
    })
}

const BPF_LINK_DETACH: libc::c_long = 34;

/// Detaches a link now. Unpinning alone would detach only when the last reference goes, which
/// the kernel does asynchronously; uninstall and unenroll want it done when they return.
pub fn link_detach(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr([0; 128]);
    put_u32(&mut attr, 0, fd.as_raw_fd() as u32);
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

const BPF_LINK_UPDATE: libc::c_long = 29;

/// Replaces the program of a link in place: the hook never runs without one.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr([0; 128]);
    // struct { __u32 link_fd; __u32 new_prog_fd; __u32 flags; __u32 old_prog_fd; }
    put_u32(&mut attr, 0, link.as_raw_fd() as u32);
    put_u32(&mut attr, 4, new_prog.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// The id of a loaded program.
pub fn prog_id(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut info = [0u8; 64];
    let mut attr = Attr([0; 128]);
    put_u32(&mut attr, 0, fd.as_raw_fd() as u32);
    put_u32(&mut attr, 4, info.len() as u32);
    attr.0[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    // struct bpf_prog_info { __u32 type; __u32 id; ... }
    Ok(u32::from_ne_bytes(info[4..8].try_into().expect("4 bytes")))
}

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

fn map_attr<K>(map: BorrowedFd<'_>, key: &K) -> Attr {
    let mut attr = Attr([0; 128]);
    // struct { __u32 map_fd; __aligned_u64 key; union { __aligned_u64 value; ... }; __u64 flags; }
    put_u32(&mut attr, 0, map.as_raw_fd() as u32);
    attr.0[8..16].copy_from_slice(&(std::ptr::from_ref(key) as u64).to_ne_bytes());
    attr
}

/// `bpf_map_update_elem` with `BPF_ANY`. `K` and `V` must be the map's key and value layouts.
pub fn map_update<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
    value: &V,
) -> io::Result<()> {
    let mut attr = map_attr(map, key);
    attr.0[16..24].copy_from_slice(&(std::ptr::from_ref(value) as u64).to_ne_bytes());
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// `bpf_map_delete_elem`; a missing key is not an error.
pub fn map_delete<K: aya::Pod>(map: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    let mut attr = map_attr(map, key);
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other.map(drop),
    }
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// `bpf_map_lookup_elem`; `None` if the key is missing.
pub fn map_lookup<K: aya::Pod, V: aya::Pod>(map: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    let mut value = std::mem::MaybeUninit::<V>::zeroed();
    let mut attr = map_attr(map, key);
    attr.0[16..24].copy_from_slice(&(value.as_mut_ptr() as u64).to_ne_bytes());
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        // SAFETY: the kernel filled the value; V is plain data, valid for any bytes.
        Ok(_) => Ok(Some(unsafe { value.assume_init() })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Every key of a hash-like map (a snapshot: entries may come and go meanwhile).
pub fn map_keys<K: aya::Pod>(map: BorrowedFd<'_>) -> io::Result<Vec<K>> {
    let mut keys = Vec::new();
    let mut prev: Option<K> = None;
    loop {
        let mut next = std::mem::MaybeUninit::<K>::zeroed();
        let mut attr = Attr([0; 128]);
        // struct { __u32 map_fd; __aligned_u64 key; __aligned_u64 next_key; }
        put_u32(&mut attr, 0, map.as_raw_fd() as u32);
        let key_ptr = prev.as_ref().map_or(0, |k| std::ptr::from_ref(k) as u64);
        attr.0[8..16].copy_from_slice(&key_ptr.to_ne_bytes());
        attr.0[16..24].copy_from_slice(&(next.as_mut_ptr() as u64).to_ne_bytes());
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {
                // SAFETY: filled by the kernel; K is plain data.
                let k = unsafe { next.assume_init() };
                keys.push(k);
                prev = Some(k);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
            Err(e) => return Err(e),
        }
        if keys.len() > 1 << 22 {
            return Err(io::Error::other("map iteration does not end"));
        }
    }
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// The kernel-internal "not supported" errno, which map commands can return to userspace.
const ENOTSUPP: i32 = 524;
/// Entries read per `BPF_MAP_LOOKUP_BATCH` call when counting.
const COUNT_BATCH: usize = 4096;

/// How many entries a hash-like map holds, read `COUNT_BATCH` at a time with
/// `BPF_MAP_LOOKUP_BATCH` (hash maps, 5.6+): 200,000 entries cost ~50 syscalls, not 200,000.
/// `Ok(None)` if the map type has no batch lookup (sockhash).
pub fn map_count_batched<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
) -> io::Result<Option<usize>> {
    let mut keys = vec![std::mem::MaybeUninit::<K>::zeroed(); COUNT_BATCH];
    let mut values = vec![std::mem::MaybeUninit::<V>::zeroed(); COUNT_BATCH];
    // Hash maps' batch token is a bucket index (u32).
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut first = true;
    let mut total = 0usize;
    loop {
        let mut attr = Attr([0; 128]);
        // struct { __aligned_u64 in_batch, out_batch, keys, values; __u32 count, map_fd;
        //          __u64 elem_flags, flags; }
        let in_ptr = if first {
            0
        } else {
            &mut token_in as *mut u64 as u64
        };
        attr.0[0..8].copy_from_slice(&in_ptr.to_ne_bytes());
        attr.0[8..16].copy_from_slice(&(&mut token_out as *mut u64 as u64).to_ne_bytes());
        attr.0[16..24].copy_from_slice(&(keys.as_mut_ptr() as u64).to_ne_bytes());
        attr.0[24..32].copy_from_slice(&(values.as_mut_ptr() as u64).to_ne_bytes());
        put_u32(&mut attr, 32, COUNT_BATCH as u32);
        put_u32(&mut attr, 36, map.as_raw_fd() as u32);
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = u32::from_ne_bytes(attr.0[32..36].try_into().unwrap_or_default()) as usize;
        match result {
            Ok(_) => total += got,
            // The last batch: ENOENT with whatever it still found.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Some(total + got)),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
                ) && first =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        first = false;
        token_in = token_out;
        if total > 1 << 24 {
            return Err(io::Error::other("map batch iteration does not end"));
        }
    }
}
