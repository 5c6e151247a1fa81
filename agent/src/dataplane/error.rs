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
    #[error(
        "refusing to enroll {0}: it is the node's network namespace (its connections are the \
         ones exempt from capture)"
    )]
    NodeNetns(PathBuf),
    #[error("refusing to enroll {0}: it is the agent's own network namespace")]
    AgentNetns(PathBuf),
    #[error("network namespace {0} is being enrolled or unenrolled by another request")]
    Busy(PathBuf),
    #[error(
        "this kernel ({kernel}) cannot load {what}: it needs {needs}; the kernel said: {source}"
    )]
    Unsupported {
        what: &'static str,
        needs: String,
        kernel: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
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

pub(super) fn is_enoent(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOENT)
}
