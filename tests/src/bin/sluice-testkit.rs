//! Helper processes for Sluice's integration tests; run inside test network namespaces.
//!
//! - `sluice-testkit peer [--tag NAME]`: ztunnel-like listeners (15001/15006/15008/15053),
//!   events as JSON lines on stdout.
//! - `sluice-testkit peer --zds SOCKET [--tag NAME] [--nack-uid UID]... [--retry-connect]`:
//!   ztunnel towards the agent: listeners inside every pod netns the agent adds over ZDS.
//! - `sluice-testkit app`: JSON command server (listen/connect/hold/dns/loops).
//!
//! All exit when stdin closes.

use std::io;
use std::process::ExitCode;
use std::sync::Arc;

use sluice_tests::testkit::{app, output::Output, peer_args, peer_cmd, peer_zds};

fn usage() -> ExitCode {
    eprintln!("usage: {} | sluice-testkit app", peer_args::USAGE);
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.split_first() {
        Some((cmd, rest)) if cmd == "peer" => match peer_args::parse(rest) {
            Ok(peer_args::PeerArgs {
                tag,
                zds: Some(zds),
            }) => peer_zds::run(tag, zds),
            Ok(peer_args::PeerArgs { tag, zds: None }) => peer_cmd::run(tag),
            Err(e) => {
                eprintln!("sluice-testkit peer: {e}");
                usage()
            }
        },
        Some((cmd, [])) if cmd == "app" => {
            app::run(io::stdin().lock(), Arc::new(Output::stdout()));
            ExitCode::SUCCESS
        }
        _ => usage(),
    }
}
