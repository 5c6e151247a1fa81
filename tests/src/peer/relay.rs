//! Bidirectional byte copying with TCP half-close, like a transparent proxy.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;

/// Copies `client_rx` → `upstream` and `upstream` → `client` until both directions hit
/// EOF. `client_rx` reads from `client` (it may hold bytes already buffered from it).
/// EOF in one direction becomes `shutdown(Write)` on the other side; an error ends both.
pub fn relay(client: TcpStream, client_rx: impl Read, upstream: TcpStream) {
    let (Ok(client_tx), Ok(upstream_rx)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let back = thread::spawn(move || pump(upstream_rx, client_tx));
    let _ = pump(client_rx, upstream);
    let _ = back.join();
}

/// Copies until EOF, then half-closes `to`. On error both sockets are shut down so the
/// opposite direction does not block forever.
fn pump(mut from: impl Read, to: TcpStream) -> io::Result<()> {
    let mut to_w = &to;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // No timeout is set, so this is the kernel waking a blocking read on a sockmap
            // socket without data (`tcp_bpf_recvmsg`, acceleration): wait again, as
            // ztunnel's event loop would.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                abort(&to);
                return Err(e);
            }
        };
        if let Err(e) = to_w.write_all(&buf[..n]) {
            abort(&to);
            return Err(e);
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    Ok(())
}

fn abort(sock: &TcpStream) {
    let _ = sock.shutdown(Shutdown::Both);
}
