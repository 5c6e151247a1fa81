//! A ZDS client: what ztunnel is from the agent's point of view, written from the wire
//! facts in docs/zds.md and sharing nothing with the agent, so it catches the agent's
//! mistakes instead of repeating them.
//!
//! - [`proto`]: the `istio.workload.zds` messages (prost derives, no build script).
//! - [`ZdsConn`]: one SOCK_SEQPACKET connection; receives requests exactly the way
//!   ztunnel does (1 KiB buffer, SCM_RIGHTS, truncation is fatal) and sends responses.
//! - [`Transcript`]: every request of one connection plus the protocol checker.
//! - [`ZdsClient`]: a scripted client loop driven by a [`Policy`] (ack, NACK, delay,
//!   go silent, disconnect).
//! - [`ZdsPeer`]: harness handle for `sluice-testkit peer --zds`, the ztunnel-like peer
//!   that starts listeners inside each added pod's netns.

mod client;
mod conn;
mod error;
mod nsfd;
mod peer_proc;
pub mod proto;
mod transcript;

pub use client::{Policy, TEST_NACK, ZdsClient};
pub use conn::{Kind, MAX_FDS, RECV_BUFFER_LEN, Received, ZdsConn};
pub use error::ZdsError;
pub use nsfd::{is_netns, namespace_type};
pub use peer_proc::{ZdsPeer, ZdsPeerOptions};
pub use transcript::{End, Entry, Response, Transcript, Violation, Violations};

/// Where the agent listens unless configured otherwise (Istio's default path).
pub const DEFAULT_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";
