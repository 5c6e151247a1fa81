//! `sluice-bench client`: the application inside a pod. Blocking sockets, one job at a time,
//! exactly the same code in every setup: only the addresses it is given differ (the floor
//! dials the peer itself).
//!
//! A blocking TCP read or write that fails with `EAGAIN` before its timeout is retried and
//! counted (`early_eagain` in each result): the kernel does that to sockets in a sockmap
//! (`tcp_bpf_recvmsg` returns `EAGAIN` whenever a blocking read is woken without data, e.g.
//! when the socket's own FIN is acknowledged), which is what `--accelerate` does to the app's
//! sockets. Retrying lets the figures measure acceleration; the count shows how often an
//! application that believes `EAGAIN` would have failed.
use std::io::{self, BufRead, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_tests::{dns, testkit::output::Output};
use socket2::{Domain, Socket, Type};

use crate::clock::mono_ns;
use crate::proto::{Job, JobResult};

/// Per-operation socket timeout: a lost connection fails one attempt, not the run.
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// A bulk write may wait on a slow reader longer than a short exchange should.
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);
const DNS_TIMEOUT: Duration = Duration::from_secs(1);
const CHUNK: usize = 64 * 1024;

pub fn run() -> ExitCode {
    let out = Output::stdout();
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let result = match serde_json::from_str::<Job>(&line) {
            Ok(job) => execute(job, &out),
            Err(e) => {
                let _ = out.emit(&json!({"event": "error", "error": format!("bad job: {e}")}));
                continue;
            }
        };
        let mut v = serde_json::to_value(&result).unwrap_or_default();
        v["event"] = json!("result");
        if out.emit(&v).is_err() {
            break;
        }
    }
    ExitCode::SUCCESS
}

/// Blocking calls that failed with `EAGAIN` before their timeout (see the module's doc).
static EARLY_EAGAIN: AtomicU64 = AtomicU64::new(0);

/// Runs one blocking socket call, retrying `EINTR` and an `EAGAIN` that came before
/// `timeout` had passed.
fn patient<T>(timeout: Duration, mut call: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let started = Instant::now();
    loop {
        match call() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && started.elapsed() < timeout => {
                EARLY_EAGAIN.fetch_add(1, Ordering::Relaxed);
            }
            other => return other,
        }
    }
}

fn read_exact(s: &mut TcpStream, buf: &mut [u8], timeout: Duration) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match patient(timeout, || s.read(&mut buf[got..]))? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    Ok(())
}

fn write_all(s: &mut TcpStream, buf: &[u8], timeout: Duration) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match patient(timeout, || s.write(&buf[done..]))? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => done += n,
        }
    }
    Ok(())
}

fn execute(job: Job, out: &Output) -> JobResult {
    let early = EARLY_EAGAIN.load(Ordering::Relaxed);
    let mut r = run_job(job, out);
    r.early_eagain = EARLY_EAGAIN.load(Ordering::Relaxed) - early;
    r
}

fn run_job(job: Job, out: &Output) -> JobResult {
    match job {
        Job::Connect {
            addrs,
            count,
            client_closes,
            deadline_ms,
        } => connect_job(&addrs, count, client_closes, deadline(deadline_ms)),
        Job::RequestResponse {
            addr,
            size,
            count,
            deadline_ms,
        } => rr_job(addr, size, count, deadline(deadline_ms)),
        Job::Stream {
            addr,
            bytes,
            parallel,
            repeats,
            deadline_ms,
        } => stream_job(addr, bytes, parallel, repeats, deadline(deadline_ms)),
        Job::Dns {
            server,
            count,
            connected,
            deadline_ms,
        } => dns_job(server, count, connected, deadline(deadline_ms)),
        Job::Probe {
            addr,
            interval_us,
            deadline_ms,
        } => {
            let _ = out.emit(&json!({"event": "probing"}));
            probe_job(
                addr,
                Duration::from_micros(interval_us),
                deadline(deadline_ms),
            )
        }
    }
}

fn deadline(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// `EADDRNOTAVAIL`, `ECONNREFUSED`, ... (timeouts as `ETIMEDOUT`), else the error kind.
pub fn errno_name(e: &io::Error) -> String {
    match (e.raw_os_error(), e.kind()) {
        (_, io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => "ETIMEDOUT".into(),
        (Some(code), _) => format!("{:?}", nix::errno::Errno::from_raw(code)),
        (None, kind) => format!("{kind:?}"),
    }
}

fn tcp_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_tcp_nodelay(true)?;
    // A blocking connect() gives up after SO_SNDTIMEO.
    sock.set_write_timeout(Some(IO_TIMEOUT))?;
    sock.set_read_timeout(Some(IO_TIMEOUT))?;
    sock.connect(&addr.into())?;
    Ok(sock.into())
}

/// Connect, first byte, then close (or wait for the server's close). Returns the time the
/// first byte arrived.
fn short_connection(
    addr: SocketAddr,
    client_closes: bool,
    r: &mut JobResult,
) -> Result<Instant, String> {
    let mut s = tcp_connect(addr).map_err(|e| errno_name(&e))?;
    r.connections += 1;
    let mut byte = [0u8; 1];
    match patient(IO_TIMEOUT, || s.read(&mut byte)) {
        Ok(1) => {}
        Ok(_) => return Err("eof".into()),
        Err(e) => return Err(errno_name(&e)),
    }
    let first = Instant::now();
    if !client_closes {
        // The server closes first: wait for its FIN before closing our end.
        let mut sink = [0u8; 64];
        while let Ok(n) = patient(IO_TIMEOUT, || s.read(&mut sink)) {
            if n == 0 {
                break;
            }
        }
    }
    Ok(first)
}

fn connect_job(addrs: &[SocketAddr], count: u64, client_closes: bool, until: Instant) -> JobResult {
    let mut r = JobResult::default();
    let start = Instant::now();
    for i in 0..count {
        if Instant::now() >= until || addrs.is_empty() {
            r.timed_out = true;
            break;
        }
        r.attempts += 1;
        let addr = addrs[i as usize % addrs.len()];
        let t0 = Instant::now();
        match short_connection(addr, client_closes, &mut r) {
            Ok(first) => r.samples.push(us(first - t0)),
            Err(kind) => r.error(kind),
        }
    }
    r.elapsed_s = start.elapsed().as_secs_f64();
    r
}

fn rr_job(addr: SocketAddr, size: usize, count: u64, until: Instant) -> JobResult {
    let mut r = JobResult::default();
    let start = Instant::now();
    r.attempts = 1;
    let mut s = match tcp_connect(addr) {
        Ok(s) => s,
        Err(e) => {
            r.error(errno_name(&e));
            return r;
        }
    };
    r.connections = 1;
    r.attempts = 0;
    let msg = vec![0x5au8; size.max(1)];
    let mut back = vec![0u8; msg.len()];
    for _ in 0..count {
        if Instant::now() >= until {
            r.timed_out = true;
            break;
        }
        r.attempts += 1;
        let t0 = Instant::now();
        let res = write_all(&mut s, &msg, IO_TIMEOUT)
            .and_then(|()| read_exact(&mut s, &mut back, IO_TIMEOUT));
        match res {
            Ok(()) if back == msg => r.samples.push(us(t0.elapsed())),
            Ok(()) => r.error("bad_reply"),
            Err(e) => {
                r.error(errno_name(&e));
                break;
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    r.elapsed_s = start.elapsed().as_secs_f64();
    r
}

/// One connection of a stream repeat: send `bytes`, half-close, read the sink's count.
fn stream_one(addr: SocketAddr, bytes: u64) -> Result<(), String> {
    let mut s = tcp_connect(addr).map_err(|e| errno_name(&e))?;
    let longer = Some(STREAM_TIMEOUT);
    s.set_write_timeout(longer)
        .and_then(|()| s.set_read_timeout(longer))
        .map_err(|e| errno_name(&e))?;
    let chunk = vec![0u8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        write_all(&mut s, &chunk[..n], STREAM_TIMEOUT).map_err(|e| errno_name(&e))?;
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write).map_err(|e| errno_name(&e))?;
    let mut count = [0u8; 8];
    read_exact(&mut s, &mut count, STREAM_TIMEOUT).map_err(|e| errno_name(&e))?;
    if u64::from_be_bytes(count) != bytes {
        return Err("short".into());
    }
    Ok(())
}

fn stream_job(
    addr: SocketAddr,
    bytes: u64,
    parallel: usize,
    repeats: u32,
    until: Instant,
) -> JobResult {
    let mut r = JobResult::default();
    let start = Instant::now();
    let parallel = parallel.max(1);
    for _ in 0..repeats {
        if Instant::now() >= until {
            r.timed_out = true;
            break;
        }
        let t0 = Instant::now();
        let outcomes: Vec<Result<(), String>> = thread::scope(|s| {
            let handles: Vec<_> = (0..parallel)
                .map(|_| s.spawn(move || stream_one(addr, bytes)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("panic".into())))
                .collect()
        });
        let secs = t0.elapsed().as_secs_f64();
        // One attempt per repeat: a sample, or one error named after the first failure.
        r.attempts += 1;
        r.connections += outcomes.iter().filter(|o| o.is_ok()).count() as u64;
        match outcomes.into_iter().find_map(Result::err) {
            None => r
                .samples
                .push((bytes * parallel as u64) as f64 * 8.0 / secs / 1e9),
            Some(kind) => r.error(kind),
        }
    }
    r.elapsed_s = start.elapsed().as_secs_f64();
    r
}

fn dns_query(server: SocketAddr, connected: bool) -> Result<(), String> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let sock = UdpSocket::bind(bind).map_err(|e| errno_name(&e))?;
    sock.set_read_timeout(Some(DNS_TIMEOUT))
        .map_err(|e| errno_name(&e))?;
    let id = dns::random_id();
    let query = dns::query(id, "example.com", 1);
    let sent = if connected {
        sock.connect(server).and_then(|()| sock.send(&query))
    } else {
        sock.send_to(&query, server)
    };
    sent.map_err(|e| errno_name(&e))?;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).map_err(|e| errno_name(&e))?;
    if !dns::is_response_to(&buf[..n], id) {
        return Err("bad_reply".into());
    }
    Ok(())
}

fn dns_job(server: SocketAddr, count: u64, connected: bool, until: Instant) -> JobResult {
    let mut r = JobResult::default();
    let start = Instant::now();
    for _ in 0..count {
        if Instant::now() >= until {
            r.timed_out = true;
            break;
        }
        r.attempts += 1;
        let t0 = Instant::now();
        match dns_query(server, connected) {
            Ok(()) => r.samples.push(us(t0.elapsed())),
            Err(kind) => r.error(kind),
        }
    }
    r.elapsed_s = start.elapsed().as_secs_f64();
    r
}

/// How long one probe waits for its SYN to be answered. Sluice drops an app's SYN while the
/// pod's ztunnel has no listener yet (the kernel cannot reset it: its source would be the
/// destination, an address the pod does not have), and TCP would retransmit it only after a
/// second; a fresh connection per attempt measures when redirection works, not TCP's timer.
const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_millis(5);

fn probe_job(addr: SocketAddr, interval: Duration, until: Instant) -> JobResult {
    let mut r = JobResult::default();
    let start = Instant::now();
    while Instant::now() < until {
        r.attempts += 1;
        // Established is enough: in a pod with no route, only redirection gets that far.
        let attempt = Socket::new(Domain::for_address(addr), Type::STREAM, None)
            .and_then(|s| s.connect_timeout(&addr.into(), PROBE_CONNECT_TIMEOUT));
        match attempt {
            Ok(_) => {
                r.first_success_ns = Some(mono_ns());
                r.connections = 1;
                r.samples.push(us(start.elapsed()));
                break;
            }
            Err(e) => r.error(errno_name(&e)),
        }
        thread::sleep(interval);
    }
    r.timed_out = r.first_success_ns.is_none();
    r.elapsed_s = start.elapsed().as_secs_f64();
    r
}
