//! Getting the programs into the kernel: loading (verifier), and attaching with links that are
//! pinned (cgroup programs, TC programs inside a pod) or owned by a pinned map (sk_msg).
use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::Path,
};

use aya::{
    Ebpf,
    maps::SockHash,
    programs::{Program, SkMsg},
};
use sluice_common::{SockKey, maps, progs};
use tracing::info;

use super::{
    Error,
    bpf_sys::{self, BPF_TCX_INGRESS, link_create, obj_pin},
    error::io_err,
    object::CGROUP_PROGRAMS,
    pins::{self, PinLayout},
};

/// A loaded program's fd, by name.
pub(super) fn program_fd<'a>(
    ebpf: &'a Ebpf,
    name: &'static str,
) -> Result<&'a aya::programs::ProgramFd, Error> {
    let program = ebpf.program(name).ok_or(Error::Program {
        name,
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    program
        .fd()
        .map_err(|source| Error::Program { name, source })
}

/// Program names as `'static` for error messages.
pub(super) fn static_name(name: &str) -> &'static str {
    [
        progs::CONNECT4,
        progs::CONNECT6,
        progs::SENDMSG4,
        progs::SENDMSG6,
        progs::RECVMSG4,
        progs::RECVMSG6,
        progs::GETPEERNAME4,
        progs::GETPEERNAME6,
        progs::GETSOCKOPT,
        progs::SOCKOPS,
        progs::SK_MSG,
        progs::TC_POD_INGRESS,
        progs::TC_POD_INGRESS_L3,
        progs::TC_POD_INGRESS_V4,
        progs::TC_POD_INGRESS_V4_L3,
        progs::TC_LO_INGRESS,
    ]
    .into_iter()
    .find(|p| *p == name)
    .unwrap_or("unknown program")
}

pub(super) fn load_program(program: &mut Program) -> Result<(), aya::programs::ProgramError> {
    match program {
        Program::CgroupSockAddr(p) => p.load(),
        Program::CgroupSockopt(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::SkMsg(p) => p.load(),
        Program::SchedClassifier(p) => p.load(),
        _ => Ok(()),
    }
}

pub(super) fn take_map<V: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<V, Error> {
    let map = ebpf.take_map(name).ok_or(Error::Map {
        name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })?;
    V::try_from(map).map_err(|source| Error::Map { name, source })
}

/// Attaches (or adopts) this build's cgroup programs, then detaches other builds'.
pub(super) fn attach_cgroup_programs(
    ebpf: &Ebpf,
    layout: &PinLayout,
    object_id: &str,
    cgroup: &Path,
) -> Result<bool, Error> {
    let dir = layout.cgroup_links(object_id);
    std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let cgroup_dir =
        File::open(cgroup).map_err(io_err(format!("opening cgroup {}", cgroup.display())))?;
    let mut adopted = true;
    for (name, attach_type) in CGROUP_PROGRAMS {
        let pin = dir.join(name);
        if bpf_sys::obj_get(&pin).is_ok() {
            continue;
        }
        adopted = false;
        let fd = program_fd(ebpf, name)?;
        let link = link_create(fd.as_fd(), cgroup_dir.as_raw_fd() as u32, attach_type)
            .map_err(io_err(format!("attaching {name} to {}", cgroup.display())))?;
        // A stale non-link file in the way would make pinning fail.
        let _ = std::fs::remove_file(&pin);
        obj_pin(link.as_fd(), &pin).map_err(io_err(format!("pinning {}", pin.display())))?;
    }
    for entry in std::fs::read_dir(layout.cgroup_dir())
        .map_err(io_err("listing cgroup links"))?
        .flatten()
    {
        if entry.file_name() != *object_id {
            info!(build = ?entry.file_name(), "replacing the cgroup programs of another build");
            pins::detach_and_remove(&entry.path())
                .map_err(io_err(format!("removing {}", entry.path().display())))?;
        }
    }
    Ok(adopted)
}

/// Attaches the acceleration program to the sockhash. The attachment belongs to the (pinned)
/// map, so the link handle is deliberately leaked: dropping it would detach.
pub(super) fn attach_sk_msg(ebpf: &mut Ebpf) -> Result<(), Error> {
    let map_fd = {
        let map = ebpf.map(maps::SOCKS).ok_or(Error::Map {
            name: maps::SOCKS,
            source: aya::maps::MapError::InvalidName {
                name: maps::SOCKS.into(),
            },
        })?;
        let socks = SockHash::<_, SockKey>::try_from(map).map_err(|source| Error::Map {
            name: maps::SOCKS,
            source,
        })?;
        socks
            .fd()
            .try_clone()
            .map_err(io_err("duplicating the sockhash fd"))?
    };
    let name = progs::SK_MSG;
    let program: &mut SkMsg = ebpf
        .program_mut(name)
        .ok_or(Error::Program {
            name,
            source: aya::programs::ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(|source| Error::Program { name, source })?;
    let id = program
        .attach(&map_fd)
        .map_err(|source| Error::Program { name, source })?;
    let link = program
        .take_link(id)
        .map_err(|source| Error::Program { name, source })?;
    std::mem::forget(link);
    Ok(())
}

/// Attaches a TC ingress program to `ifindex` (in the calling thread's netns) with TCX and pins
/// the link in `pod_dir`.
pub(super) fn attach_tc(prog: BorrowedFd<'_>, ifindex: u32, pod_dir: &Path) -> Result<(), Error> {
    let link = link_create(prog, ifindex, BPF_TCX_INGRESS).map_err(|e| {
        let hint = if e.raw_os_error() == Some(libc::EINVAL) {
            " (TCX needs kernel ≥ 6.6)"
        } else {
            ""
        };
        Error::Io {
            what: format!("attaching TC ingress to ifindex {ifindex}{hint}"),
            source: e,
        }
    })?;
    let pin = pod_dir.join(format!("tc-{ifindex}"));
    obj_pin(link.as_fd(), &pin).map_err(io_err(format!("pinning {}", pin.display())))
}
