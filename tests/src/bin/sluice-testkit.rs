//! Helper processes for Sluice's integration tests; run inside test network namespaces.
//!
//! - `sluice-testkit peer [--tag NAME]`: ztunnel-like listeners (15001/15006/15008/15053),
//!   events as JSON lines on stdout.
//! - `sluice-testkit app`: JSON command server (listen/connect/hold/dns/loops).
//!
//! Both exit when stdin closes.

use std::io;
use std::process::ExitCode;
use std::sync::Arc;

use sluice_tests::testkit::{app, output::Output, peer_cmd};

const USAGE: &str = "usage: sluice-testkit peer [--tag NAME] | sluice-testkit app";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["peer"] => peer_cmd::run(None),
        ["peer", "--tag", tag] => peer_cmd::run(Some(tag.to_string())),
        ["app"] => {
            app::run(io::stdin().lock(), Arc::new(Output::stdout()));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}
