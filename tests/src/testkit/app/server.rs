//! `listen`: a banner-then-echo TCP server, reporting each accepted connection.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;

use serde_json::json;
use socket2::{Domain, Socket, Type};

use crate::sockets::canonical;
use crate::testkit::output::Output;

/// Binds `[::]:port` dual-stack (or `bind:port`) and serves it on a background thread.
pub fn listen(port: u16, bind: Option<IpAddr>, out: Arc<Output>) -> io::Result<()> {
    let ip = bind.unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    let addr = SocketAddr::new(ip, port);
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        sock.set_only_v6(false)?;
    }
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(128)?;
    let listener: TcpListener = sock.into();
    thread::Builder::new()
        .name(format!("listen-{port}"))
        .spawn(move || accept_loop(listener, port, out))?;
    Ok(())
}

fn accept_loop(listener: TcpListener, port: u16, out: Arc<Output>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let out = out.clone();
        let _ = thread::Builder::new()
            .name(format!("conn-{port}"))
            .spawn(move || serve(stream, port, &out));
    }
}

/// Reports the connection, greets with `HELLO peer=<peer> local=<local>`, echoes.
fn serve(mut stream: TcpStream, port: u16, out: &Output) {
    let (Ok(peer), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else {
        return;
    };
    let (peer, local) = (canonical(peer), canonical(local));
    let _ = out.emit(&json!({
        "event": "accepted",
        "port": port,
        "peer": peer.to_string(),
        "local": local.to_string(),
    }));
    if stream
        .write_all(format!("HELLO peer={peer} local={local}\n").as_bytes())
        .is_err()
    {
        return;
    }
    if let Ok(rx) = stream.try_clone() {
        let _ = echo(rx, &mut stream);
    }
    let _ = stream.shutdown(Shutdown::Write);
}

/// Copies `rx` to `tx` until EOF. The socket has no timeout, so `EAGAIN` can only be the
/// kernel waking a blocking read on an accelerated (sockmap) socket without data
/// (`tcp_bpf_recvmsg`): read again, as an application that survives acceleration must.
fn echo(mut rx: TcpStream, tx: &mut TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match rx.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => tx.write_all(&buf[..n])?,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => return Err(e),
        }
    }
}
