//! `cargo xtask integration-test --vm`: the privileged test suite inside qemu on Debian's
//! cloud kernels (6.1 and 6.12), to prove the kernels Sluice supports besides the host's.
//!
//! 1. Build the workspace binaries and test executables (what `cargo test` runs) and list
//!    each executable's tests on the host.
//! 2. Fetch the newest kernel packages and busybox through a private apt configuration into
//!    a cache outside the clone ([`cache`]), keyed by version.
//! 3. Pack one initramfs per kernel ([`image`]) and boot it under TCG ([`qemu`]); its init
//!    runs every test executable with `CI=true` and reports over a serial port.
//! 4. Report pass or fail per test and per kernel ([`summary`]); fail if any test did not pass.
mod apt;
mod apt_sources;
mod artifacts;
mod cache;
mod guest_report;
mod image;
mod kernels;
mod qemu;
pub(crate) mod rootfs;
mod summary;

use std::{
    fs,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::target_dir;
use apt::Apt;
use guest_report::{Event, GuestReport};
pub use kernels::Series;
use kernels::{Kernel, ModuleSet};

pub struct Options {
    pub kernels: Vec<Series>,
    pub cpus: u32,
    pub memory_mib: u32,
    /// Per guest, from boot to power-off.
    pub timeout: Duration,
    pub run: image::RunConfig,
}

impl Options {
    pub fn new(kernels: Vec<Series>, test_args: Vec<String>) -> Options {
        Options {
            kernels,
            cpus: 2,
            memory_mib: 2048,
            timeout: Duration::from_secs(30 * 60),
            run: image::RunConfig {
                test_threads: 2,
                executable_timeout: Duration::from_secs(10 * 60),
                test_args,
            },
        }
    }
}

/// One kernel's run, for the summary.
pub struct KernelRun {
    pub kernel: Kernel,
    pub modules: ModuleSet,
    pub report: GuestReport,
    pub timed_out: bool,
    /// From qemu's start to its exit.
    pub guest_time: Duration,
    pub initramfs_bytes: u64,
}

pub fn run(opts: &Options) -> Result<()> {
    if opts.kernels.is_empty() {
        return Ok(());
    }
    let start = Instant::now();
    let artifacts = artifacts::build(&opts.run.test_args)?;
    let cache = cache::dir()?;
    let (busybox, kernels) = {
        let _lock = cache::Lock::acquire(&cache)?;
        let apt = Apt::open(&cache)?;
        let busybox_pkg = apt.newest("^busybox-static$")?;
        let busybox = apt.unpacked(&busybox_pkg, |_| Ok(()))?.join("bin/busybox");
        let mut kernels = Vec::new();
        for &series in &opts.kernels {
            let kernel = Kernel::fetch(&apt, series)?;
            let modules = kernel.modules(kernels::MODULES)?;
            kernels.push((kernel, modules));
        }
        (busybox, kernels)
    };
    let work = target_dir().join("sluice-vm");
    let base = image::base(&busybox, &artifacts, &opts.run, &work.join("stripped"))?;
    eprintln!("prepared in {:.1?}", start.elapsed());

    let mut runs = Vec::new();
    for (kernel, modules) in kernels {
        let label = kernel.series.label();
        let dir = work.join(label);
        fs::create_dir_all(&dir)?;
        let mut image = base.clone();
        image::add_modules(&mut image, &modules)?;
        let initrd = dir.join("initramfs.cpio");
        let initramfs_bytes = image.write_cpio(&initrd)?;
        if !modules.missing.is_empty() {
            eprintln!(
                "[{label}] kernel has no module {}",
                modules.missing.join(", ")
            );
        }
        let boot = qemu::Boot {
            kernel: &kernel.vmlinuz,
            initrd: &initrd,
            cpus: opts.cpus,
            memory_mib: opts.memory_mib,
            console_log: dir.join("console.log"),
            report_log: dir.join("report.log"),
            timeout: opts.timeout,
        };
        eprintln!(
            "[{label}] booting {} with a {} MiB initramfs ({} test executables)",
            kernel.package,
            initramfs_bytes >> 20,
            artifacts.tests.len()
        );
        let booted = Instant::now();
        let mut report = GuestReport::default();
        let ended = qemu::run(&boot, |line| {
            if let Some(event) = report.feed(line) {
                show(label, booted, &event);
            }
        })?;
        let guest_time = booted.elapsed();
        if !report.done {
            eprintln!(
                "[{label}] the guest did not finish; last console lines ({}):",
                boot.console_log.display()
            );
            summary::print_tail(&boot.console_log, 30);
        }
        runs.push(KernelRun {
            kernel,
            modules,
            report,
            timed_out: matches!(ended, qemu::Ended::TimedOut),
            guest_time,
            initramfs_bytes,
        });
    }
    let failed = summary::print(&artifacts, &runs);
    eprintln!(
        "VM suite finished in {}",
        summary::fmt_duration(start.elapsed())
    );
    if failed > 0 {
        bail!(
            "{failed} test(s) did not pass in the VM suite (logs under {})",
            work.display()
        );
    }
    Ok(())
}

fn show(label: &str, booted: Instant, event: &Event) {
    match event {
        Event::Kernel(release) => {
            eprintln!("[{label}] {release} is up after {:.1?}", booted.elapsed())
        }
        Event::Start(exe) => eprintln!("[{label}] running {exe}"),
        Event::Result {
            label: exe,
            test,
            outcome,
        } => eprintln!("[{label}] {exe}::{test} ... {outcome}"),
        Event::Exit { label: exe, status } if *status != 0 => {
            eprintln!("[{label}] {exe} exited with {status}")
        }
        Event::Exit { .. } => {}
        Event::ModuleFailed(file) => eprintln!("[{label}] warning: insmod {file} failed"),
        Event::Done => eprintln!(
            "[{label}] all test executables ran in {:.1?}; powering off",
            booted.elapsed()
        ),
    }
}
