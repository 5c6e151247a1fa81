//! `loop_start`/`loop_stop`: a background connect+banner+close loop that counts failures,
//! used to show that enrolling or un-enrolling a pod never breaks new connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::client::{Conn, dial_tcp};
use super::command::SocketOpts;
use super::reply::{Failure, Fields};

/// A loop nobody stops still ends by itself, so traffic is bounded in time and count.
const MAX_RUNTIME: Duration = Duration::from_secs(300);
const MAX_ATTEMPTS: u64 = 1_000_000;
const DEFAULT_INTERVAL: Duration = Duration::from_millis(20);

pub struct ConnectLoop {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Stats>,
}

#[derive(Default)]
struct Stats {
    attempts: u64,
    failures: u64,
    first_error: Option<Value>,
    hit_limit: bool,
}

impl ConnectLoop {
    pub fn start(
        addr: SocketAddr,
        interval: Option<Duration>,
        opts: SocketOpts,
    ) -> std::io::Result<ConnectLoop> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let interval = interval.unwrap_or(DEFAULT_INTERVAL);
        let thread = thread::Builder::new()
            .name("connect-loop".into())
            .spawn(move || run(addr, interval, opts, &flag))?;
        Ok(ConnectLoop { stop, thread })
    }

    /// Stops the loop. Fields: attempts, failures, first_error (null or a failure object
    /// with errno/error/stage), hit_limit (true if the loop had already stopped itself).
    pub fn stop(self) -> Result<Fields, Failure> {
        self.stop.store(true, Ordering::SeqCst);
        let stats = self
            .thread
            .join()
            .map_err(|_| Failure::msg("connect loop panicked"))?;
        let mut f = Fields::new();
        f.insert("attempts".into(), stats.attempts.into());
        f.insert("failures".into(), stats.failures.into());
        f.insert(
            "first_error".into(),
            stats.first_error.unwrap_or(Value::Null),
        );
        f.insert("hit_limit".into(), stats.hit_limit.into());
        Ok(f)
    }
}

fn run(addr: SocketAddr, interval: Duration, opts: SocketOpts, stop: &AtomicBool) -> Stats {
    let started = Instant::now();
    let mut stats = Stats::default();
    while !stop.load(Ordering::SeqCst) {
        if stats.attempts >= MAX_ATTEMPTS || started.elapsed() >= MAX_RUNTIME {
            stats.hit_limit = true;
            break;
        }
        stats.attempts += 1;
        if let Err(f) = attempt(addr, &opts) {
            stats.failures += 1;
            stats.first_error.get_or_insert_with(|| f.to_json());
        }
        thread::sleep(interval);
    }
    stats
}

fn attempt(addr: SocketAddr, opts: &SocketOpts) -> Result<(), Failure> {
    let stream = dial_tcp(addr, opts)?;
    let mut conn = Conn {
        reader: std::io::BufReader::new(stream),
    };
    super::client::read_banner(&mut conn).map(|_| ())
}
