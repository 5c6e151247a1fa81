//! `sluice-bench peer`: the ztunnel-like peer. A tokio runtime with two workers (ztunnel's
//! default), one listener set per pod, sockets made inside each pod's namespace by entering it
//! for the syscall. The same code serves every setup; only how it learns its pods differs:
//! `--netns PATH` (floor, iptables: nobody tells ztunnel) or `--zds SOCKET` (Sluice: the agent
//! sends Adds over ZDS, as to the real ztunnel).
//!
//! Stdin: `stats` prints the counters as one JSON line; EOF stops the peer.
mod netns;
mod stats;
mod workload;
mod zds;

use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;

use serde_json::json;
use sluice_tests::testkit::output::Output;

use self::netns::PodNetns;
use self::workload::{Ctx, Workload};

pub struct PeerArgs {
    pub netns: Vec<PathBuf>,
    pub zds: Option<PathBuf>,
    pub floor: bool,
}

pub fn run(args: PeerArgs) -> ExitCode {
    let out = Arc::new(Output::stdout());
    let fail = |e: String| {
        let _ = out.emit(&json!({"event": "error", "error": e}));
        ExitCode::FAILURE
    };
    let rt = match crate::server::runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(e.to_string()),
    };
    let home = match netns::current() {
        Ok(h) => h,
        Err(e) => return fail(format!("opening our own netns: {e}")),
    };
    let ctx = Arc::new(Ctx {
        stats: Default::default(),
        floor: args.floor,
    });
    let mut fixed: Vec<Workload> = Vec::new();
    for path in &args.netns {
        let started = File::open(path).and_then(|f| {
            Workload::start(
                rt.handle(),
                PodNetns::new(f.into(), Arc::clone(&home)),
                &ctx,
            )
        });
        match started {
            Ok(w) => fixed.push(w),
            Err(e) => return fail(format!("serving {}: {e}", path.display())),
        }
    }
    if let Some(socket) = args.zds {
        let (handle, ctx, home, out) = (
            rt.handle().clone(),
            Arc::clone(&ctx),
            Arc::clone(&home),
            Arc::clone(&out),
        );
        thread::spawn(move || zds::serve(&socket, &handle, &ctx, &home, &out));
    }
    let _ = out.emit(&json!({"event": "ready"}));
    crate::wait_for_stdin_eof(|line| {
        if line.trim() == "stats" {
            let mut v = serde_json::to_value(ctx.stats.snapshot()).unwrap_or_default();
            v["event"] = json!("stats");
            let _ = out.emit(&v);
        }
    });
    drop(fixed);
    ExitCode::SUCCESS
}
