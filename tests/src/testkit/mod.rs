//! The `sluice-testkit` helper binary's subcommands (the binary itself only dispatches).
//!
//! Both speak JSON lines on stdout and stop when stdin closes, so a test harness that
//! dies takes its helpers with it.

pub mod app;
pub mod output;
pub mod peer_args;
pub mod peer_cmd;
pub mod peer_zds;
