//! Raw `bpf(2)` calls for asserting on cgroup attachments, independent of the aya code
//! under test: load/attach a "foreign" program (someone else's, like Cilium's) and list
//! what is attached where.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result, bail};

use super::cgroup::Cgroup;

// enum bpf_cmd
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_int = 1;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_GET_FD_BY_ID: libc::c_int = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_int = 15;
const BPF_PROG_QUERY: libc::c_int = 16;
const BPF_LINK_CREATE: libc::c_int = 28;

// enum bpf_prog_type
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;

// enum bpf_attach_type
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
pub const BPF_SK_LOOKUP: u32 = 36;

const FOREIGN_PROG_NAME: &[u8] = b"foreign_test";

/// `union bpf_attr`, BPF_PROG_LOAD member, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// BPF_LINK_CREATE member, without the per-link-type tail.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// BPF_PROG_QUERY member.
#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// BPF_*_GET_FD_BY_ID member.
#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// BPF_OBJ_GET_INFO_BY_FD member.
#[repr(C)]
#[derive(Default)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_prog_info`; the kernel fills only `info_len` bytes.
#[repr(C)]
#[derive(Default)]
struct ProgInfoHead {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
    jited_prog_len: u32,
    xlated_prog_len: u32,
    jited_prog_insns: u64,
    xlated_prog_insns: u64,
    load_time: u64,
    created_by_uid: u32,
    nr_map_ids: u32,
    map_ids: u64,
    name: [u8; 16],
}

fn sys_bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a live, fully initialised #[repr(C)] prefix of union bpf_attr and
    // the size passed is its size; pointers inside it refer to live buffers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn sys_bpf_fd<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<OwnedFd> {
    let fd = sys_bpf(cmd, attr)?;
    // SAFETY: these commands return a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// A `cgroup/connect4` (or `connect6`) program named `foreign_test` that lets every connect
/// through and counts its runs, attached through a bpf_link: another eBPF user on the node.
/// Dropping the guard closes the link, which detaches it.
pub struct ForeignCgroupProg {
    // Declared first: the link is closed before the program.
    link: OwnedFd,
    prog: CountingProg,
    id: u32,
}

impl ForeignCgroupProg {
    /// Attaches to `cgroup` at BPF_CGROUP_INET4_CONNECT.
    pub fn attach(cgroup: &Cgroup) -> Result<ForeignCgroupProg> {
        Self::attach_to(cgroup.fd(), BPF_CGROUP_INET4_CONNECT)
    }

    /// Attaches to any cgroup directory fd at a connect4/connect6 attach type.
    pub fn attach_to(cgroup: BorrowedFd<'_>, attach_type: u32) -> Result<ForeignCgroupProg> {
        let prog = CountingProg::load(
            BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            attach_type,
            1,
            FOREIGN_PROG_NAME,
        )?;
        let link = link_create(prog.fd(), cgroup.as_raw_fd() as u32, attach_type)?;
        let id = prog_info(prog.fd().as_raw_fd())?.id;
        Ok(ForeignCgroupProg { link, prog, id })
    }

    /// The kernel's id of the loaded program.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// How many times it ran.
    pub fn runs(&self) -> Result<u64> {
        self.prog.count()
    }

    pub fn link_fd(&self) -> BorrowedFd<'_> {
        self.link.as_fd()
    }
}

/// An `sk_lookup` program named `foreign_lookup` that passes every lookup on (SK_PASS, no
/// socket) and counts its runs, linked to a network namespace after whatever is there:
/// another eBPF user inside a pod's netns. Dropping it detaches it.
pub struct ForeignSkLookupProg {
    _link: OwnedFd,
    prog: CountingProg,
}

impl ForeignSkLookupProg {
    pub fn attach(netns: &std::path::Path) -> Result<ForeignSkLookupProg> {
        const SK_PASS: i32 = 1;
        let prog = CountingProg::load(
            BPF_PROG_TYPE_SK_LOOKUP,
            BPF_SK_LOOKUP,
            SK_PASS,
            b"foreign_lookup",
        )?;
        let ns =
            std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        let link = link_create(prog.fd(), ns.as_raw_fd() as u32, BPF_SK_LOOKUP)?;
        Ok(ForeignSkLookupProg { _link: link, prog })
    }

    /// How many lookups it saw.
    pub fn runs(&self) -> Result<u64> {
        self.prog.count()
    }
}

fn link_create(prog: BorrowedFd<'_>, target: u32, attach_type: u32) -> Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: target,
        attach_type,
        flags: 0,
    };
    sys_bpf_fd(BPF_LINK_CREATE, &mut attr).context("BPF_LINK_CREATE")
}

/// `union bpf_attr`, BPF_MAP_CREATE member.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// BPF_MAP_*_ELEM member.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// A program that adds 1 to a one-slot array at each run, then returns a constant.
struct CountingProg {
    prog: OwnedFd,
    map: OwnedFd,
}

impl CountingProg {
    fn load(prog_type: u32, expected_attach_type: u32, ret: i32, name: &[u8]) -> Result<Self> {
        const BPF_MAP_TYPE_ARRAY: u32 = 2;
        let mut attr = MapCreateAttr {
            map_type: BPF_MAP_TYPE_ARRAY,
            key_size: 4,
            value_size: 8,
            max_entries: 1,
            map_flags: 0,
        };
        let map = sys_bpf_fd(BPF_MAP_CREATE, &mut attr).context("BPF_MAP_CREATE")?;
        // struct bpf_insn { u8 code; u8 dst:4, src:4; s16 off; s32 imm; } as little-endian u64.
        let insn = |code: u8, dst: u8, src: u8, off: i16, imm: i32| -> u64 {
            u64::from(code)
                | (u64::from(dst | (src << 4)) << 8)
                | (u64::from(off as u16) << 16)
                | (u64::from(imm as u32) << 32)
        };
        let insns = [
            // r1 = map (ld_imm64, BPF_PSEUDO_MAP_FD)
            insn(0x18, 1, 1, 0, map.as_raw_fd()),
            0,
            // *(u32 *)(r10 - 4) = 0; r2 = r10 - 4
            insn(0x62, 10, 0, -4, 0),
            insn(0xbf, 2, 10, 0, 0),
            insn(0x07, 2, 0, 0, -4),
            // r0 = bpf_map_lookup_elem(r1, r2); if r0 == 0 goto out
            insn(0x85, 0, 0, 0, 1),
            insn(0x15, 0, 0, 2, 0),
            // lock *(u64 *)(r0 + 0) += 1
            insn(0xb7, 1, 0, 0, 1),
            insn(0xdb, 0, 1, 0, 0),
            // out: r0 = ret; exit
            insn(0xb7, 0, 0, 0, ret),
            insn(0x95, 0, 0, 0, 0),
        ];
        let prog = load_insns(prog_type, expected_attach_type, &insns, name)?;
        Ok(CountingProg { prog, map })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.prog.as_fd()
    }

    fn count(&self) -> Result<u64> {
        let key = 0u32;
        let mut value = 0u64;
        let mut attr = MapElemAttr {
            map_fd: self.map.as_raw_fd() as u32,
            key: &key as *const u32 as u64,
            value: &mut value as *mut u64 as u64,
            ..Default::default()
        };
        sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).context("BPF_MAP_LOOKUP_ELEM")?;
        Ok(value)
    }
}

/// Loads `insns` as a program of `prog_type` named `name`.
fn load_insns(
    prog_type: u32,
    expected_attach_type: u32,
    insns: &[u64],
    name: &[u8],
) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut prog_name = [0u8; 16];
    prog_name[..name.len()].copy_from_slice(name);
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name,
        expected_attach_type,
        ..Default::default()
    };
    sys_bpf_fd(BPF_PROG_LOAD, &mut attr).with_context(|| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        format!(
            "BPF_PROG_LOAD {}; verifier log: {}",
            String::from_utf8_lossy(name),
            String::from_utf8_lossy(&log[..end])
        )
    })
}

fn prog_info(fd: libc::c_int) -> Result<ProgInfoHead> {
    let mut info = ProgInfoHead::default();
    let mut attr = InfoByFdAttr {
        bpf_fd: fd as u32,
        info_len: size_of::<ProgInfoHead>() as u32,
        info: &mut info as *mut ProgInfoHead as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD")?;
    Ok(info)
}

/// Ids of the programs attached directly to `cgroup` at `attach_type` (not inherited).
pub fn cgroup_attached_prog_ids(cgroup: &Cgroup, attach_type: u32) -> Result<Vec<u32>> {
    prog_ids_attached_to(cgroup.fd(), attach_type)
}

/// Like [`cgroup_attached_prog_ids`] for any attach target fd (cgroup dir, netns, ...).
pub fn prog_ids_attached_to(target: BorrowedFd<'_>, attach_type: u32) -> Result<Vec<u32>> {
    query(target.as_raw_fd() as u32, attach_type)
}

/// Names of the sk_lookup programs linked to the netns at `netns`, in the order they run:
/// what the kernel has attached there, whoever attached it.
pub fn sk_lookup_prog_names(netns: &std::path::Path) -> Result<Vec<String>> {
    let ns = std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    query(ns.as_raw_fd() as u32, BPF_SK_LOOKUP)?
        .into_iter()
        .map(prog_name)
        .collect()
}

fn query(target: u32, attach_type: u32) -> Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    loop {
        let mut attr = ProgQueryAttr {
            target_fd: target,
            attach_type,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: ids.len() as u32,
            ..Default::default()
        };
        match sys_bpf(BPF_PROG_QUERY, &mut attr) {
            Ok(_) => {
                ids.truncate(attr.prog_cnt as usize);
                return Ok(ids);
            }
            // prog_cnt now holds the real count.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && ids.len() < 1 << 16 => {
                ids = vec![0; attr.prog_cnt.max(ids.len() as u32 * 2) as usize];
            }
            Err(e) => return Err(e).context("BPF_PROG_QUERY"),
        }
    }
}

/// The name a program was loaded with (at most 15 bytes), by program id.
pub fn prog_name(id: u32) -> Result<String> {
    let mut attr = GetFdByIdAttr {
        id,
        ..Default::default()
    };
    let fd = sys_bpf_fd(BPF_PROG_GET_FD_BY_ID, &mut attr)
        .with_context(|| format!("BPF_PROG_GET_FD_BY_ID {id}"))?;
    let info = prog_info(fd.as_raw_fd())?;
    if info.id != id {
        bail!("program {id} reported id {}", info.id);
    }
    let end = info
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(info.name.len());
    Ok(String::from_utf8_lossy(&info.name[..end]).into_owned())
}
