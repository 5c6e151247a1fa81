//! `sluice-bench`: the driver of `cargo xtask bench` and the processes it runs inside the
//! pods. Every setup (floor, iptables, sluice, sluice+accel) uses the same pods, the same
//! peer, the same client and the same destination app; see `driver` for the figures.
//!
//! - `sluice-bench run [--quick] [--out DIR]`: everything, then `results.md`, `results.json`
//!   and one SVG per figure in DIR.
//! - `sluice-bench peer (--netns PATH... | --zds SOCKET) [--floor]`: the ztunnel-like peer.
//! - `sluice-bench server`: the destination app.
//! - `sluice-bench client`: the app inside a pod, driven by JSON jobs on stdin.
//!
//! Helpers exit when their stdin closes, so a dying driver takes them with it.
mod client;
mod clock;
mod driver;
mod floor;
mod peer;
mod ports;
mod proto;
mod report;
mod server;
mod stop;

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sluice-bench",
    about = "Sluice against iptables and no redirection"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every setup and figure, then write the results (needs root).
    Run {
        /// Far fewer samples and pods: a smoke check that every setup works (< 2 minutes).
        #[arg(long)]
        quick: bool,
        /// Where results.md, results.json and the SVG plots go.
        #[arg(long, default_value = "bench")]
        out: PathBuf,
    },
    /// The ztunnel-like peer.
    Peer {
        /// Serve this pod network namespace (repeatable).
        #[arg(long)]
        netns: Vec<PathBuf>,
        /// Learn pods from the agent over ZDS at this socket, as ztunnel does.
        #[arg(long)]
        zds: Option<PathBuf>,
        /// Connections without an original destination name it in their local address.
        #[arg(long)]
        floor: bool,
    },
    /// The destination app.
    Server,
    /// The app inside a pod: JSON jobs on stdin, results on stdout.
    Client,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run { quick, out } => match driver::run(quick, &out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluice-bench: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Peer { netns, zds, floor } => {
            pin_to_cpu(1);
            peer::run(peer::PeerArgs { netns, zds, floor })
        }
        Command::Server => {
            pin_to_cpu(2);
            server::run()
        }
        Command::Client => {
            pin_to_cpu(0);
            client::run()
        }
    }
}

/// The client, the peer and the destination app each keep to a CPU of their own (as far as
/// there are CPUs), the same in every setup: where the scheduler happens to put them would
/// otherwise weigh on a figure more than the setup does. Threads started later inherit it.
fn pin_to_cpu(want: usize) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        return;
    }
    let mut set = nix::sched::CpuSet::new();
    if set.set(want.min(cpus - 1)).is_ok() {
        // Best effort: unpinned, the figures are only noisier.
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// Blocks until stdin closes, handing each line to `on_line`.
pub fn wait_for_stdin_eof(mut on_line: impl FnMut(&str)) {
    for line in std::io::stdin().lock().lines() {
        match line {
            Ok(l) => on_line(&l),
            Err(_) => break,
        }
    }
}
