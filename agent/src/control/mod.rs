//! The control socket: a root-only unix stream socket speaking JSON lines, through which the
//! CLI and the CNI plugin ask the agent to enroll and unenroll pods.
pub mod api;
pub mod client;
pub mod server;
