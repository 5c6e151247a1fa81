//! `sluice-bench server`: the destination app, in a pod of its own. One tokio runtime with
//! ztunnel's default of two workers; one listener per behaviour (see `ports`), on `[::]`.
use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::process::ExitCode;

use serde_json::json;
use sluice_tests::testkit::output::Output;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::ports;

pub const WORKERS: usize = 2;

pub fn run() -> ExitCode {
    let out = Output::stdout();
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = out.emit(&json!({"event": "error", "error": e.to_string()}));
            return ExitCode::FAILURE;
        }
    };
    let started = rt.block_on(async {
        for port in ports::APP_PORTS {
            let listener = listen(port)?;
            tokio::spawn(accept_loop(listener, port));
        }
        io::Result::Ok(())
    });
    if let Err(e) = started {
        let _ = out.emit(&json!({"event": "error", "error": e.to_string()}));
        return ExitCode::FAILURE;
    }
    let _ = out.emit(&json!({"event": "ready"}));
    crate::wait_for_stdin_eof(|_| {});
    ExitCode::SUCCESS
}

pub fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .enable_all()
        .build()
}

fn listen(port: u16) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    sock.set_only_v6(false)?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    sock.listen(4096)?;
    TcpListener::from_std(sock.into())
}

async fn accept_loop(listener: TcpListener, port: u16) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = serve(stream, port).await;
        });
    }
}

async fn serve(mut s: TcpStream, port: u16) -> io::Result<()> {
    match port {
        ports::CLOSE => s.write_all(b"x").await,
        ports::WAIT_EOF => {
            s.write_all(b"x").await?;
            let mut buf = [0u8; 64];
            while s.read(&mut buf).await? > 0 {}
            Ok(())
        }
        ports::ECHO => {
            let (mut rd, mut wr) = s.split();
            tokio::io::copy(&mut rd, &mut wr).await.map(drop)
        }
        ports::SINK => {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            s.write_all(&total.to_be_bytes()).await
        }
        _ => Ok(()),
    }
}
