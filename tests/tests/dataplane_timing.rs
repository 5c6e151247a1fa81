//! An ad-hoc measurement, not a test (speed is measured by `cargo xtask bench`): how long
//! `Dataplane::enroll` takes from the 1st to the Nth pod, one at a time and several at once.
//!
//!     SLUICE_TIMING_PODS=1000 cargo test -p sluice-tests --test dataplane_timing -- --ignored --nocapture
use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::{Duration, Instant},
};

use sluice_agent::{dataplane::EnrollOptions, netns::Netns as AgentNetns};
use sluice_tests::{fixture::DataplaneFixture, harness::Netns};

const TESTKIT: &str = env!("CARGO_BIN_EXE_sluice-testkit");

/// A bare pod: a netns whose `lo` holds the pod's address.
fn pod(i: usize) -> (Netns, IpAddr) {
    let ns = Netns::new("sltime").unwrap();
    let ip = IpAddr::V4(Ipv4Addr::new(10, 200, (i / 250) as u8, (i % 250 + 1) as u8));
    ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])
        .unwrap();
    (ns, ip)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(what: &str, mut times: Vec<Duration>) {
    times.sort();
    eprintln!(
        "{what}: n={} p50={:?} p90={:?} max={:?}",
        times.len(),
        percentile(&times, 0.5),
        percentile(&times, 0.9),
        times[times.len() - 1]
    );
}

#[test]
#[ignore = "a measurement; run by hand"]
fn enrollment_time_from_the_first_to_the_nth_pod() {
    let n: usize = std::env::var("SLUICE_TIMING_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let fx = DataplaneFixture::new(Path::new(TESTKIT), 0, false).unwrap();
    let dp = fx.dp_shared();
    let pods: Vec<(Netns, IpAddr)> = (0..n).map(pod).collect();
    let mut times = Vec::with_capacity(n);
    for (ns, ip) in &pods[..n / 2] {
        let handle = AgentNetns::open(ns.path()).unwrap();
        let started = Instant::now();
        dp.enroll(&handle, &[*ip], EnrollOptions::default())
            .unwrap();
        times.push(started.elapsed());
    }
    let tenth = (n / 20).max(1);
    report("sequential, first pods", times[..tenth].to_vec());
    report(
        "sequential, last pods",
        times[times.len() - tenth..].to_vec(),
    );
    report("sequential, all", times.clone());

    // The other half, two at a time (this machine has 2 cores).
    let started = Instant::now();
    let concurrent: Vec<Duration> = std::thread::scope(|s| {
        let halves: Vec<_> = pods[n / 2..]
            .chunks(n.div_ceil(4))
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|(ns, ip)| {
                            let handle = AgentNetns::open(ns.path()).unwrap();
                            let t = Instant::now();
                            dp.enroll(&handle, &[*ip], EnrollOptions::default())
                                .unwrap();
                            t.elapsed()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        halves.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let wall = started.elapsed();
    let sum: Duration = concurrent.iter().sum();
    report("two threads", concurrent.clone());
    eprintln!(
        "two threads: {} pods in {wall:?} wall, {sum:?} summed ({:.2}x overlap)",
        concurrent.len(),
        sum.as_secs_f64() / wall.as_secs_f64()
    );
    assert_eq!(dp.enrolled().len(), n);
}
