//! `sink_start`/`sink_stop`: the least a ztunnel outbound listener does per connection (accept,
//! read the original destination as ztunnel does, wait for the client to close, close), on one
//! thread, for churn tests where the client closes first. Holding, it closes only at the stop.

use std::io::{self, Read as _};
use std::net::{Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::reply::{Failure, Fields};
use crate::sockets::{OrigDstFrom, ZTUNNEL_MARK, canonical, original_dst};

#[derive(Default)]
struct Counts {
    accepted: u64,
    /// SO_ORIGINAL_DST answered (rather than the local-address fallback).
    answered: u64,
    /// Answers that were not the connection's own destination.
    wrong: u64,
    /// The first few of those: local address, answer, where it came from, peer.
    wrong_samples: Vec<String>,
    /// Connections reset before their destination was read (no longer connected after).
    gone: u64,
}

pub struct Sink {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Counts>,
}

impl Sink {
    pub fn start(port: u16, hold: bool) -> io::Result<Sink> {
        let sock = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
        sock.set_only_v6(false)?;
        sock.set_reuse_address(true)?;
        sock.set_ip_transparent_v4(true)?;
        sock.set_ip_transparent_v6(true)?;
        sock.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
        sock.listen(4096)?;
        sock.set_mark(ZTUNNEL_MARK)?;
        // accept() wakes up at least this often to notice a stop.
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let listener: TcpListener = sock.into();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::Builder::new()
            .name("sink".into())
            .spawn(move || serve(&listener, &flag, hold))?;
        Ok(Sink { stop, thread })
    }

    /// Fields: accepted, answered, wrong.
    pub fn stop(self) -> Result<Fields, Failure> {
        self.stop.store(true, Ordering::SeqCst);
        let c = self
            .thread
            .join()
            .map_err(|_| Failure::msg("sink panicked"))?;
        let mut f = Fields::new();
        f.insert("accepted".into(), c.accepted.into());
        f.insert("answered".into(), c.answered.into());
        f.insert("wrong".into(), c.wrong.into());
        f.insert("wrong_samples".into(), c.wrong_samples.into());
        f.insert("gone".into(), c.gone.into());
        Ok(f)
    }
}

/// Stops only once the accept queue is empty (an accept timed out), so that every connection
/// made before the stop is counted.
fn serve(listener: &TcpListener, stop: &AtomicBool, hold: bool) -> Counts {
    let mut c = Counts::default();
    // Closed when this returns.
    let mut held = Vec::new();
    loop {
        let Ok((conn, _)) = listener.accept() else {
            if stop.load(Ordering::SeqCst) {
                return c;
            }
            continue;
        };
        c.accepted += 1;
        // Closing before the client would race its connect() (a reset turns into EPIPE there);
        // the churn's clients close right after connecting.
        let _ = conn.set_read_timeout(Some(Duration::from_secs(3)));
        let mut conn = conn;
        let local = conn.local_addr().map(canonical);
        let answer = original_dst(conn.as_fd());
        // Asked after the answer: a connection reset by then (its client's kernel dropped it,
        // e.g. past tcp_max_orphans) has no destination left to report.
        let Ok(peer) = conn.peer_addr().map(canonical) else {
            c.gone += 1;
            continue;
        };
        if let Ok((orig, from)) = answer {
            if from != OrigDstFrom::Local {
                c.answered += 1;
            }
            if let Ok(l) = local
                && l != orig
            {
                c.wrong += 1;
                if c.wrong_samples.len() < 5 {
                    c.wrong_samples
                        .push(format!("local {l} answer {orig} ({from:?}) peer {peer}"));
                }
            }
        }
        let _ = conn.read(&mut [0u8; 64]);
        if hold {
            held.push(conn);
        }
    }
}
