//! Starts server processes so that they die with the test process, however it ends.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process,
//! and a test may restart a server from a short-lived thread. So every server process is
//! forked by one launcher thread that lives as long as the test process; if the test process
//! is killed (a timeout, ^C), the kernel kills the servers too. Normal cleanup is
//! still `Drop`.
use std::{
    io,
    os::unix::process::CommandExt as _,
    process::{Child, Command},
    sync::{Mutex, OnceLock, mpsc},
    thread,
};

type Request = (Command, mpsc::Sender<io::Result<Child>>);

static LAUNCHER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();

pub fn spawn(mut cmd: Command) -> io::Result<Child> {
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let launcher = LAUNCHER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        thread::Builder::new()
            .name("kube-launcher".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawning the launcher thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    launcher
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("the launcher thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the launcher thread is gone"))?
}
