//! `sluice-cni`, the chained CNI plugin, as a library: the binary (`src/bin/sluice-cni.rs`)
//! only reads its environment and stdin and prints what [`plugin::execute`] returns.
//!
//! - [`spec`]: versions, commands, error codes; [`env`]: the `CNI_*` variables;
//!   [`config`]: the network configuration and the plugin's options; [`result`]: prevResult
//!   conversion between versions and the pod's IPs;
//! - [`plugin`]: each command, asking the agent over the control socket; [`log`]: its log.
//!
//! Parsing is pure (`Env::parse`, `NetConf::parse`, `Invocation::parse`), so it can be fuzzed.
//! The plugin runs once per pod in the runtime's process tree: no async runtime, std and
//! serde_json only.
pub mod config;
pub mod env;
pub mod log;
pub mod plugin;
pub mod result;
pub mod spec;
