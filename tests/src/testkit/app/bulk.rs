//! `bulk`: several connections at once to a banner+echo server (`listen`), each sending a
//! known byte pattern and reading the echo back in parallel, so that every byte is checked
//! on the way there and back. What the bytes take (a sockmap short-circuit, TCP) does not
//! matter: what comes back must be exactly what went out, in order.
//!
//! A blocking read or write that fails with `EAGAIN` before its timeout is retried (and
//! counted): on a socket in a sockmap the kernel's `tcp_bpf_recvmsg` returns `EAGAIN` from a
//! blocking read whenever the socket is woken without data (its own FIN acknowledged, the
//! other direction's write space), which only an application that treats `EAGAIN` as "try
//! again" survives. Only the socket timeout, measured here, ends a connection.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::client::{Conn, dial_tcp, read_banner};
use super::command::SocketOpts;
use super::reply::{Failure, Fields};

const CHUNK: usize = 64 * 1024;

/// Byte `offset` of connection `conn`'s stream: period 251 (prime, so a reordered or
/// repeated 64 KiB chunk never lines up), shifted per connection (crossed streams show).
pub fn pattern(conn: usize, offset: u64) -> u8 {
    ((offset % 251) as u8).wrapping_add((conn as u8).wrapping_mul(37))
}

/// What one connection saw.
struct Outcome {
    sent: u64,
    /// Echoed bytes that matched the pattern, up to the first that did not.
    verified: u64,
    /// Offset of the first echoed byte that was wrong.
    mismatch_at: Option<u64>,
    error: Option<Value>,
    /// Blocking calls that returned `EAGAIN` before their timeout (and were retried).
    early_eagain: u64,
}

/// Fields: `connections`, `sent`, `verified`, `early_eagain` (totals), and per connection in
/// `results`: `{sent, verified, mismatch_at, error, early_eagain}`. A read or write that makes
/// no progress for the socket timeout (`opts.timeout_ms`) fails its connection, so a stall is
/// an error, not a hang.
pub fn bulk(
    addr: SocketAddr,
    bytes: u64,
    parallel: usize,
    opts: &SocketOpts,
) -> Result<Fields, Failure> {
    let outcomes: Vec<Outcome> = thread::scope(|s| {
        let handles: Vec<_> = (0..parallel.max(1))
            .map(|conn| s.spawn(move || one(conn, addr, bytes, opts)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| Outcome {
                    sent: 0,
                    verified: 0,
                    mismatch_at: None,
                    error: Some("panicked".into()),
                    early_eagain: 0,
                })
            })
            .collect()
    });
    let mut f = Fields::new();
    f.insert("connections".into(), outcomes.len().into());
    f.insert(
        "sent".into(),
        outcomes.iter().map(|o| o.sent).sum::<u64>().into(),
    );
    f.insert(
        "verified".into(),
        outcomes.iter().map(|o| o.verified).sum::<u64>().into(),
    );
    f.insert(
        "early_eagain".into(),
        outcomes.iter().map(|o| o.early_eagain).sum::<u64>().into(),
    );
    let results: Vec<Value> = outcomes
        .iter()
        .map(|o| {
            json!({
                "sent": o.sent,
                "verified": o.verified,
                "mismatch_at": o.mismatch_at,
                "error": o.error,
                "early_eagain": o.early_eagain,
            })
        })
        .collect();
    f.insert("results".into(), results.into());
    Ok(f)
}

fn one(conn: usize, addr: SocketAddr, bytes: u64, opts: &SocketOpts) -> Outcome {
    let mut out = Outcome {
        sent: 0,
        verified: 0,
        mismatch_at: None,
        error: None,
        early_eagain: 0,
    };
    let stream = match dial_tcp(addr, opts) {
        Ok(s) => s,
        Err(f) => {
            out.error = Some(f.to_json());
            return out;
        }
    };
    let mut c = Conn {
        reader: BufReader::new(stream),
    };
    if let Err(f) = read_banner(&mut c) {
        out.error = Some(f.to_json());
        return out;
    }
    let writer = match c.reader.get_ref().try_clone() {
        Ok(w) => w,
        Err(e) => {
            out.error = Some(Failure::io("socket", &e).to_json());
            return out;
        }
    };
    let timeout = opts.timeout();
    let early = AtomicU64::new(0);
    let (sent, read) = thread::scope(|s| {
        let send = s.spawn(|| send_pattern(conn, writer, bytes, timeout, &early));
        let read = check_echo(conn, &mut c.reader, &mut out, timeout, &early);
        (
            send.join().unwrap_or(Err(Failure::msg("sender panicked"))),
            read,
        )
    });
    out.early_eagain = early.load(Ordering::Relaxed);
    match sent {
        Ok(n) => out.sent = n,
        Err(f) => out.error = Some(f.to_json()),
    }
    if let Err(f) = read {
        out.error.get_or_insert(f.to_json());
    } else if out.verified != out.sent && out.error.is_none() && out.mismatch_at.is_none() {
        out.error = Some(format!("echo ended after {} of {} bytes", out.verified, out.sent).into());
    }
    out
}

/// Runs a blocking socket call, retrying an `EAGAIN` that came before `timeout` had passed
/// (counted in `early`); `EINTR` is retried too.
fn retrying<T>(
    timeout: Duration,
    early: &AtomicU64,
    mut call: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    let started = Instant::now();
    loop {
        match call() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && started.elapsed() < timeout => {
                early.fetch_add(1, Ordering::Relaxed);
            }
            other => return other,
        }
    }
}

fn send_pattern(
    conn: usize,
    mut s: TcpStream,
    bytes: u64,
    timeout: Duration,
    early: &AtomicU64,
) -> Result<u64, Failure> {
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < bytes {
        let n = (bytes - off).min(CHUNK as u64) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern(conn, off + i as u64);
        }
        let mut done = 0;
        while done < n {
            let wrote = retrying(timeout, early, || s.write(&buf[done..n]))
                .map_err(|e| Failure::io("send", &e))?;
            done += wrote;
        }
        off += n as u64;
    }
    s.shutdown(Shutdown::Write)
        .map_err(|e| Failure::io("shutdown", &e))?;
    Ok(off)
}

/// Reads the echo to EOF, checking each byte; stops at the first wrong one.
fn check_echo(
    conn: usize,
    r: &mut impl Read,
    out: &mut Outcome,
    timeout: Duration,
    early: &AtomicU64,
) -> Result<(), Failure> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n =
            retrying(timeout, early, || r.read(&mut buf)).map_err(|e| Failure::io("recv", &e))?;
        if n == 0 {
            return Ok(());
        }
        for &b in &buf[..n] {
            if b != pattern(conn, out.verified) {
                out.mismatch_at = Some(out.verified);
                return Ok(());
            }
            out.verified += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pattern;

    #[test]
    fn the_pattern_differs_between_connections_and_chunks() {
        assert_ne!(pattern(0, 0), pattern(1, 0));
        // A 64 KiB chunk in the wrong place would not match.
        assert!((0..64).any(|i| pattern(0, i) != pattern(0, 65536 + i)));
    }
}
