//! Client-side commands: connect/hold/ping and the DNS queries.

use std::io::{BufReader, Read, Write};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpStream};

use serde_json::Value;
use socket2::{Domain, Socket, Type};

use super::command::{Dial, SocketOpts};
use super::reply::{Failure, Fields};
use crate::dns;
use crate::sockets::{canonical, from_sockaddr, read_line};

/// Longest line (banner or echo) read from a server.
const MAX_LINE: usize = 4096;

/// A connection that has passed the banner exchange.
pub struct Conn {
    pub reader: BufReader<TcpStream>,
}

/// Connects, sends `dial.preface` if given, reads the banner, and exchanges `dial.send`
/// if given.
/// Fields: peername, sockname, banner, echo (null when nothing was sent).
pub fn connect(dial: &Dial) -> Result<(Fields, Conn), Failure> {
    let mut stream = dial_tcp(dial.addr, &dial.opts)?;
    let mut fields = socket_names(&stream);
    if let Some(preface) = &dial.preface {
        stream
            .write_all(format!("{preface}\n").as_bytes())
            .map_err(|e| Failure::io("preface", &e).with_fields(fields.clone()))?;
    }
    let mut conn = Conn {
        reader: BufReader::new(stream),
    };
    let banner = read_banner(&mut conn).map_err(|f| f.with_fields(fields.clone()))?;
    fields.insert("banner".into(), banner.into());
    let echo = match &dial.send {
        Some(send) => {
            Value::from(exchange(&mut conn, send).map_err(|f| f.with_fields(fields.clone()))?)
        }
        None => Value::Null,
    };
    fields.insert("echo".into(), echo);
    Ok((fields, conn))
}

/// Reads the server's greeting line.
pub fn read_banner(conn: &mut Conn) -> Result<String, Failure> {
    read_reply_line(&mut conn.reader, "banner")
}

/// Sends `line` + "\n" and reads one line back.
pub fn exchange(conn: &mut Conn, line: &str) -> Result<String, Failure> {
    conn.reader
        .get_mut()
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| Failure::io("send", &e))?;
    read_reply_line(&mut conn.reader, "echo")
}

/// A TCP connection made with the requested mark, source and timeouts.
pub fn dial_tcp(addr: SocketAddr, opts: &SocketOpts) -> Result<TcpStream, Failure> {
    let sock = client_socket(addr, Type::STREAM, opts)?;
    sock.connect_timeout(&addr.into(), opts.timeout())
        .map_err(|e| Failure::io("connect", &e))?;
    Ok(sock.into())
}

/// A socket of `addr`'s family with timeouts set, marked and bound as requested.
fn client_socket(addr: SocketAddr, ty: Type, opts: &SocketOpts) -> Result<Socket, Failure> {
    let setup = |e: std::io::Error| Failure::io("socket", &e);
    let sock = Socket::new(Domain::for_address(addr), ty, None).map_err(setup)?;
    sock.set_read_timeout(Some(opts.timeout())).map_err(setup)?;
    sock.set_write_timeout(Some(opts.timeout()))
        .map_err(setup)?;
    if let Some(mark) = opts.mark {
        sock.set_mark(mark).map_err(setup)?;
    }
    if let Some(ip) = opts.bind {
        sock.bind(&SocketAddr::new(ip, 0).into())
            .map_err(|e| Failure::io("bind", &e))?;
    }
    if opts.fragmentable && addr.is_ipv4() {
        let dont: libc::c_int = libc::IP_PMTUDISC_DONT;
        // SAFETY: a valid int option on a socket we own.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                (&dont as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(setup(std::io::Error::last_os_error()));
        }
    }
    Ok(sock)
}

/// getpeername/getsockname of a connected socket, canonicalised.
pub fn socket_names(stream: &TcpStream) -> Fields {
    let mut f = Fields::new();
    f.insert("peername".into(), addr_json(stream.peer_addr().ok()));
    f.insert("sockname".into(), addr_json(stream.local_addr().ok()));
    f
}

fn addr_json(addr: Option<SocketAddr>) -> Value {
    addr.map(|a| canonical(a).to_string().into())
        .unwrap_or(Value::Null)
}

fn read_reply_line(
    reader: &mut BufReader<TcpStream>,
    stage: &'static str,
) -> Result<String, Failure> {
    match read_line(reader, MAX_LINE) {
        Ok(Some(line)) => Ok(line),
        Ok(None) => Err(Failure {
            stage: Some(stage),
            ..Failure::msg(format!("connection closed before {stage}"))
        }),
        Err(e) => Err(Failure::io(stage, &e)),
    }
}

/// One `example.com A` query over UDP, via sendto or connect+send.
/// Fields: reply_from, peername (connected only, else null), sockname, valid, id, len.
pub fn dns_udp(server: SocketAddr, connected: bool, opts: &SocketOpts) -> Result<Fields, Failure> {
    let sock = client_socket(server, Type::DGRAM, opts)?;
    let id = dns::random_id();
    let query = dns::query(id, "example.com", 1);
    let mut fields = Fields::new();
    fields.insert("id".into(), id.into());
    if connected {
        sock.connect(&server.into())
            .map_err(|e| Failure::io("connect", &e))?;
        sock.send(&query).map_err(|e| Failure::io("send", &e))?;
    } else {
        sock.send_to(&query, &server.into())
            .map_err(|e| Failure::io("send", &e))?;
    }
    let peer = if connected {
        sock.peer_addr().ok().and_then(|a| from_sockaddr(&a))
    } else {
        None
    };
    fields.insert("peername".into(), addr_json(peer));
    fields.insert(
        "sockname".into(),
        addr_json(sock.local_addr().ok().and_then(|a| from_sockaddr(&a))),
    );
    let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
    let (n, from) = sock
        .recv_from(&mut buf)
        .map_err(|e| Failure::io("recv", &e).with_fields(fields.clone()))?;
    // SAFETY: recv_from initialised the first n bytes.
    let reply: Vec<u8> = buf[..n]
        .iter()
        .map(|b| unsafe { b.assume_init() })
        .collect();
    fields.insert("reply_from".into(), addr_json(from_sockaddr(&from)));
    fields.insert("valid".into(), dns::is_response_to(&reply, id).into());
    fields.insert("len".into(), n.into());
    Ok(fields)
}

/// One `example.com A` query over TCP with 2-byte length framing.
/// Fields: peername, sockname, valid, id, len.
pub fn dns_tcp(server: SocketAddr, opts: &SocketOpts) -> Result<Fields, Failure> {
    let mut stream = dial_tcp(server, opts)?;
    let mut fields = socket_names(&stream);
    let id = dns::random_id();
    fields.insert("id".into(), id.into());
    let query = dns::query(id, "example.com", 1);
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&query);
    stream
        .write_all(&framed)
        .map_err(|e| Failure::io("send", &e).with_fields(fields.clone()))?;
    let mut len = [0u8; 2];
    let reply = stream.read_exact(&mut len).and_then(|()| {
        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
        stream.read_exact(&mut msg).map(|()| msg)
    });
    let reply = reply.map_err(|e| Failure::io("recv", &e).with_fields(fields.clone()))?;
    fields.insert("valid".into(), dns::is_response_to(&reply, id).into());
    fields.insert("len".into(), reply.len().into());
    Ok(fields)
}

/// One unconnected UDP socket queries each of `servers` (distinct ids), then reads as many
/// replies. Fields: sent `[{id, server}]`, replies `[{id, from, valid}]` in arrival order.
pub fn dns_udp_multi(servers: &[SocketAddr], opts: &SocketOpts) -> Result<Fields, Failure> {
    let first = *servers
        .first()
        .ok_or_else(|| Failure::msg("no servers given"))?;
    let sock = client_socket(first, Type::DGRAM, opts)?;
    let mut sent = Vec::new();
    let mut ids = Vec::new();
    for server in servers {
        let id = dns::random_id();
        sock.send_to(&dns::query(id, "example.com", 1), &(*server).into())
            .map_err(|e| Failure::io("send", &e))?;
        sent.push(serde_json::json!({"id": id, "server": server.to_string()}));
        ids.push(id);
    }
    let mut replies = Vec::new();
    for _ in servers {
        let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
        let (n, from) = sock
            .recv_from(&mut buf)
            .map_err(|e| Failure::io("recv", &e))?;
        // SAFETY: recv_from initialised the first n bytes.
        let reply: Vec<u8> = buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        let id = ids
            .iter()
            .copied()
            .find(|id| dns::is_response_to(&reply, *id));
        replies.push(serde_json::json!({
            "id": id,
            "from": from_sockaddr(&from).map(|a| a.to_string()),
        }));
    }
    let mut fields = Fields::new();
    fields.insert("sent".into(), sent.into());
    fields.insert("replies".into(), replies.into());
    Ok(fields)
}

/// `count` connects round-robin over `addrs`, each closed by the client right away.
/// Fields: attempts, failures, errnos (`{"<errno>": count}`), elapsed_ms.
pub fn churn(addrs: &[SocketAddr], count: u64, opts: &SocketOpts) -> Result<Fields, Failure> {
    if addrs.is_empty() {
        return Err(Failure::msg("no addresses given"));
    }
    let started = std::time::Instant::now();
    let mut failures = 0u64;
    let mut errnos: std::collections::BTreeMap<String, u64> = Default::default();
    for i in 0..count {
        let addr = addrs[(i % addrs.len() as u64) as usize];
        if let Err(f) = dial_tcp(addr, opts) {
            failures += 1;
            let key = f
                .to_json()
                .get("errno")
                .map(|e| e.to_string())
                .unwrap_or_else(|| "none".into());
            *errnos.entry(key).or_default() += 1;
        }
    }
    let mut fields = Fields::new();
    fields.insert("attempts".into(), count.into());
    fields.insert("failures".into(), failures.into());
    fields.insert(
        "errnos".into(),
        serde_json::to_value(errnos).unwrap_or_default(),
    );
    fields.insert(
        "elapsed_ms".into(),
        (started.elapsed().as_millis() as u64).into(),
    );
    Ok(fields)
}
