//! `sluice-testkit peer [--tag NAME]`: runs the ztunnel-like [`Peer`] in the current
//! network namespace and prints its events as JSON lines until stdin closes.

use std::io::{self, Read};
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;

use serde_json::json;

use super::output::Output;
use crate::peer::Peer;

pub fn run(tag: Option<String>) -> ExitCode {
    let out = Output::stdout();
    let (tx, rx) = mpsc::channel();
    let peer = match Peer::start_in_current_netns(tx, tag) {
        Ok(peer) => peer,
        Err(e) => {
            let _ =
                out.emit(&json!({"event": "error", "context": "start", "error": e.to_string()}));
            return ExitCode::FAILURE;
        }
    };
    thread::spawn(move || {
        for event in rx {
            if out.emit(&event).is_err() {
                break;
            }
        }
    });
    wait_for_stdin_eof();
    drop(peer);
    ExitCode::SUCCESS
}

/// The harness keeps our stdin open for as long as it wants us running.
pub(crate) fn wait_for_stdin_eof() {
    let mut sink = [0u8; 256];
    let mut stdin = io::stdin().lock();
    while let Ok(n) = stdin.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
}
