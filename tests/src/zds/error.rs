use std::io;

use super::conn::{MAX_FDS, RECV_BUFFER_LEN};

/// Why no request could be taken from a [`super::ZdsConn`]. Every variant except
/// [`ZdsError::Closed`], [`ZdsError::Timeout`] and [`ZdsError::Io`] is an agent bug that
/// real ztunnel answers by dropping the connection.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    /// The agent closed the connection (recvmsg returned 0 bytes, which is also what
    /// ztunnel concludes from an empty packet).
    #[error("the agent closed the connection")]
    Closed,
    #[error("no request arrived in time")]
    Timeout,
    /// `len` is the packet's real size; ztunnel would have seen only its first 1 KiB.
    #[error(
        "request of {len} bytes does not fit ztunnel's {RECV_BUFFER_LEN}-byte buffer ({fds} fds)"
    )]
    Truncated { len: usize, fds: usize },
    #[error(
        "ancillary data truncated: more than {MAX_FDS} fds or a foreign control message ({fds} fds kept)"
    )]
    ControlTruncated { fds: usize },
    #[error("undecodable WorkloadRequest ({} bytes, {fds} fds): {source}", raw.len())]
    Decode {
        raw: Vec<u8>,
        fds: usize,
        source: prost::DecodeError,
    },
    /// Seen while the client held back its response: the agent did not wait for it.
    #[error("a {len}-byte request arrived before the previous one was answered")]
    RequestBeforeResponse { len: usize },
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl ZdsError {
    /// True for the agent bugs that make ztunnel drop the connection.
    pub fn is_protocol_error(&self) -> bool {
        matches!(
            self,
            ZdsError::Truncated { .. }
                | ZdsError::ControlTruncated { .. }
                | ZdsError::Decode { .. }
        )
    }
}

impl From<nix::Error> for ZdsError {
    fn from(e: nix::Error) -> ZdsError {
        ZdsError::Io(e.into())
    }
}
