//! The dataplane's errors.
use std::{io, path::PathBuf};

use sluice_common::MAX_POD_IPS;

use crate::netns::NetnsError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("network namespace {0} is already enrolled")]
    AlreadyEnrolled(PathBuf),
    #[error("network namespace {0} is not enrolled")]
    NotEnrolled(PathBuf),
    #[error("{0} pod IPs given; at most {MAX_POD_IPS} are supported")]
    TooManyIps(usize),
    #[error("network namespace {0} vanished during enrollment")]
    NetnsVanished(PathBuf),
    #[error("network namespace {0} has no loopback interface")]
    NoLoopback(PathBuf),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

pub(super) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

pub(super) fn is_not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}
