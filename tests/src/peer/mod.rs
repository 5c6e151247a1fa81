//! A ztunnel-like peer: the listener set ztunnel opens inside a pod's network namespace
//! in "inpod" mode, with just enough proxying to prove where traffic was steered.
//!
//! Listeners (see [`listeners`]): 15001 outbound, 15006 inbound plaintext, 15008 HBONE
//! on `[::]` (dual-stack, transparent), 15053 DNS on loopback — all marked 0x539.
//! Everything observable is reported as an [`Event`] on a channel; the
//! `sluice-testkit peer` binary prints them as JSON lines; in ZDS mode ([`workloads`])
//! each workload's listener set tags them with its uid.

pub mod event;
mod handlers;
pub mod listeners;
mod relay;
mod upstream;
pub mod workloads;

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use nix::sched::{CloneFlags, setns};

pub use event::{Accepted, Connected, Event, EventKind, Failed};
pub use listeners::{DNS_PORT, HBONE_PORT, INBOUND_PORT, ListenerSet, OUTBOUND_PORT};
pub use workloads::{Started, Workloads};

/// A running listener set. Dropping it (or [`Peer::stop`]) closes the listeners;
/// connections already being relayed carry on until their ends close.
pub struct Peer {
    ctx: Arc<Ctx>,
    /// Listening sockets, kept to wake the accept/recv threads on stop.
    wake_fds: Vec<RawFd>,
    threads: Vec<JoinHandle<()>>,
}

/// Copied into every event of a listener set, to tell sets apart.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Labels {
    /// Becomes `Event::netns`.
    pub netns: Option<String>,
    /// Becomes `Event::uid`: the ZDS workload the set serves.
    pub uid: Option<String>,
}

impl Labels {
    pub fn tag(tag: Option<String>) -> Labels {
        Labels {
            netns: tag,
            uid: None,
        }
    }
}

/// State shared by all threads of one listener set.
pub(crate) struct Ctx {
    events: Sender<Event>,
    labels: Labels,
    stopping: AtomicBool,
}

impl Ctx {
    fn emit(&self, kind: EventKind) {
        // A gone receiver only means nobody listens any more; keep serving.
        let _ = self.events.send(Event {
            kind,
            netns: self.labels.netns.clone(),
            uid: self.labels.uid.clone(),
        });
    }

    fn error(&self, context: &str, err: &io::Error) {
        self.emit(EventKind::Error {
            context: context.to_string(),
            error: err.to_string(),
        });
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

impl Peer {
    /// Binds the listener set in the calling thread's network namespace, emits
    /// [`EventKind::Ready`], then starts serving. `tag` is copied into every event.
    pub fn start_in_current_netns(events: Sender<Event>, tag: Option<String>) -> io::Result<Peer> {
        Peer::start_labelled_in_current_netns(events, Labels::tag(tag))
    }

    /// Like [`Peer::start_in_current_netns`] with every [`Labels`] field.
    pub fn start_labelled_in_current_netns(
        events: Sender<Event>,
        labels: Labels,
    ) -> io::Result<Peer> {
        let set = ListenerSet::bind()?;
        let ctx = Arc::new(Ctx {
            events,
            labels,
            stopping: AtomicBool::new(false),
        });
        // Ready goes out before any accept thread runs, so it is always the first event.
        ctx.emit(EventKind::Ready);

        let mut peer = Peer {
            ctx,
            wake_fds: Vec::new(),
            threads: Vec::new(),
        };
        peer.serve_tcp(set.outbound, handlers::outbound)?;
        peer.serve_tcp(set.inbound, handlers::inbound)?;
        peer.serve_tcp(set.hbone, handlers::hbone)?;
        for l in set.dns_tcp {
            peer.serve_tcp(l, handlers::dns_tcp)?;
        }
        for sock in set.dns_udp {
            peer.wake_fds.push(sock.as_raw_fd());
            let ctx = peer.ctx.clone();
            peer.threads.push(spawn_named("peer-dns-udp", move || {
                handlers::dns_udp(&ctx, &sock)
            })?);
        }
        Ok(peer)
    }

    /// Like [`Peer::start_in_current_netns`], in the network namespace `netns` (an open
    /// `/proc/<pid>/ns/net` or `/run/netns/<name>`), without changing the caller's netns.
    ///
    /// The sockets are created by a helper thread that joined `netns`; threads it spawns
    /// inherit that netns, so upstream sockets opened per connection are made there too.
    pub fn start_in_netns(
        netns: BorrowedFd<'_>,
        events: Sender<Event>,
        tag: Option<String>,
    ) -> io::Result<Peer> {
        Peer::start_labelled_in_netns(netns, events, Labels::tag(tag))
    }

    /// Like [`Peer::start_in_netns`] with every [`Labels`] field.
    pub fn start_labelled_in_netns(
        netns: BorrowedFd<'_>,
        events: Sender<Event>,
        labels: Labels,
    ) -> io::Result<Peer> {
        thread::scope(|s| {
            s.spawn(|| {
                setns(netns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                Peer::start_labelled_in_current_netns(events, labels)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("peer start thread panicked")))
        })
    }

    /// Closes the listeners and waits for their accept/recv threads to finish.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.ctx.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        for fd in &self.wake_fds {
            // Wakes a blocked accept()/recvfrom() on Linux; the fd is closed by its owner.
            // SAFETY: the fd stays open until the thread owning it returns, below.
            unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    fn serve_tcp(&mut self, listener: TcpListener, handle: fn(&Ctx, TcpStream)) -> io::Result<()> {
        self.wake_fds.push(listener.as_raw_fd());
        let ctx = self.ctx.clone();
        let t = spawn_named("peer-accept", move || accept_loop(&ctx, &listener, handle))?;
        self.threads.push(t);
        Ok(())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(ctx: &Arc<Ctx>, listener: &TcpListener, handle: fn(&Ctx, TcpStream)) {
    loop {
        match listener.accept() {
            Ok((stream, _)) if !ctx.stopping() => {
                let ctx = ctx.clone();
                // If no thread can be made the connection is dropped, as under overload.
                let _ = spawn_named("peer-conn", move || handle(&ctx, stream));
            }
            Ok(_) => return,
            Err(_) if ctx.stopping() => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                ctx.error("accept", &e);
                // Avoid spinning on e.g. EMFILE.
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn spawn_named(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    thread::Builder::new().name(name.to_string()).spawn(f)
}
