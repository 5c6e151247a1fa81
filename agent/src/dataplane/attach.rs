//! Getting the programs into the kernel: loading (verifier), and attaching with links that are
//! pinned (cgroup programs, each pod's sk_lookup link) or owned by a pinned map (sk_msg).
use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
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
    bpf_sys::{self, BPF_SK_LOOKUP, link_create, obj_pin},
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
        progs::SK_LOOKUP,
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
        Program::SkLookup(p) => p.load(),
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

/// Attaches (or adopts) this build's cgroup programs. Returns whether all were there already.
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
    Ok(adopted)
}

/// The sk_lookup program every pod's link points at: the one this build pinned before (an
/// agent restart), else the one just loaded, pinned now. With its kernel id.
pub(super) fn sk_lookup_program(
    ebpf: &Ebpf,
    layout: &PinLayout,
    object_id: &str,
) -> Result<(OwnedFd, u32), Error> {
    let dir = layout.progs(object_id);
    std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let pin = dir.join(progs::SK_LOOKUP);
    let fd = match bpf_sys::obj_get(&pin) {
        Ok(fd) => fd,
        Err(_) => {
            let fd = program_fd(ebpf, progs::SK_LOOKUP)?
                .as_fd()
                .try_clone_to_owned()
                .map_err(io_err("duplicating the sk_lookup program fd"))?;
            let _ = std::fs::remove_file(&pin);
            obj_pin(fd.as_fd(), &pin).map_err(io_err(format!("pinning {}", pin.display())))?;
            fd
        }
    };
    let id = bpf_sys::prog_id(fd.as_fd()).map_err(io_err("reading the sk_lookup program id"))?;
    Ok((fd, id))
}

/// Detaches and removes what other builds attached and pinned (their cgroup links, their
/// programs), and maps of other layouts, once this build's are in place.
pub(super) fn remove_other_builds(layout: &PinLayout, object_id: &str) -> Result<(), Error> {
    for dir in [layout.cgroup_dir(), layout.progs_dir()] {
        for entry in std::fs::read_dir(&dir)
            .map_err(io_err(format!("listing {}", dir.display())))?
            .flatten()
        {
            if entry.file_name() != *object_id {
                info!(build = ?entry.file_name(), "replacing the programs of another build");
                pins::detach_and_remove(&entry.path())
                    .map_err(io_err(format!("removing {}", entry.path().display())))?;
            }
        }
    }
    let ours = layout.maps();
    for entry in std::fs::read_dir(layout.root())
        .map_err(io_err("listing the pin root"))?
        .flatten()
    {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with("maps-v") && entry.path() != ours {
            info!(maps = ?name, "removing maps of another layout");
            pins::remove_tree(&entry.path())
                .map_err(io_err(format!("removing {}", entry.path().display())))?;
        }
    }
    Ok(())
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

/// Attaches `prog` as the netns `netns`'s sk_lookup program (after any already there) and pins
/// the link at `pin`. No RCU grace period is waited for, unlike TC links.
pub(super) fn attach_sk_lookup(
    prog: BorrowedFd<'_>,
    netns: BorrowedFd<'_>,
    pin: &Path,
) -> Result<(), Error> {
    let link = link_create(prog, netns.as_raw_fd() as u32, BPF_SK_LOOKUP)
        .map_err(io_err("attaching sk_lookup to the pod netns"))?;
    obj_pin(link.as_fd(), pin).map_err(io_err(format!("pinning {}", pin.display())))
}
