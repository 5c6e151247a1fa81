//! Serves the control socket. Only root (or the agent's own user) may talk to it: the peer's
//! credentials are checked on every connection.
use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::watch,
};
use tracing::{debug, warn};

use super::api::{Request, Response};
use crate::{agent::Agent, zds::wire::replace_stale_socket};

/// A request line longer than this is not one of ours.
const MAX_LINE: usize = 64 * 1024;

pub struct Server {
    listener: UnixListener,
    path: PathBuf,
}

impl Server {
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        replace_stale_socket(path, |p| std::os::unix::net::UnixStream::connect(p).is_ok())?;
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Server {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Serves until `shutdown`; `stop` is how a `shutdown` request stops the agent.
    pub async fn run(
        self,
        agent: Arc<Agent>,
        mut shutdown: watch::Receiver<bool>,
        stop: watch::Sender<bool>,
    ) {
        loop {
            tokio::select! {
                _ = crate::shutdown::stopped(&mut shutdown) => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        tokio::spawn(serve(stream, Arc::clone(&agent), stop.clone()));
                    }
                    Err(e) => warn!(error = %e, "accepting a control connection"),
                }
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve(stream: UnixStream, agent: Arc<Agent>, stop: watch::Sender<bool>) {
    let allowed = match stream.peer_cred() {
        Ok(cred) => cred.uid() == 0 || cred.uid() == nix::unistd::geteuid().as_raw(),
        Err(_) => false,
    };
    let (read, mut write) = stream.into_split();
    if !allowed {
        agent.metrics.error("control_denied");
        let _ = reply(
            &mut write,
            &Response::err("permission denied: the control socket is root-only"),
        )
        .await;
        return;
    }
    let mut lines = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut lines)
            .take(MAX_LINE as u64 + 1)
            .read_line(&mut line)
            .await
        {
            Ok(0) => return,
            Ok(n) if n > MAX_LINE => {
                let _ = reply(&mut write, &Response::err("request too long")).await;
                return;
            }
            Ok(_) => {}
            Err(e) => {
                debug!(error = %e, "control connection");
                return;
            }
        }
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => handle(req, &agent, &stop).await,
            Err(e) => {
                agent.metrics.error("control_request");
                Response::err(format!("malformed request: {e}"))
            }
        };
        if reply(&mut write, &resp).await.is_err() {
            return;
        }
    }
}

async fn handle(req: Request, agent: &Arc<Agent>, stop: &watch::Sender<bool>) -> Response {
    match req {
        Request::Enroll(e) => match agent.enroll(e).await {
            Ok(r) => Response::ok(r),
            Err(e) => Response::err(e.to_string()),
        },
        Request::Unenroll { uid } => match agent.unenroll(uid).await {
            Ok(()) => Response::ok(()),
            Err(e) => Response::err(e.to_string()),
        },
        Request::Status => Response::ok(agent.status()),
        Request::Shutdown => {
            let _ = stop.send(true);
            Response::ok(())
        }
        Request::Ping => Response::ok("pong"),
        Request::CniAdd(r) => result(crate::cni_ops::add(agent, r).await),
        Request::CniCheck(r) => result(crate::cni_ops::check(agent, &r)),
        Request::CniDel(r) => result(crate::cni_ops::del(agent, r).await),
        Request::CniGc {
            valid_container_ids,
        } => Response::ok(crate::cni_ops::gc(agent, valid_container_ids).await),
        Request::CniStatus => Response::ok(crate::cni_ops::status(agent)),
    }
}

fn result<T: serde::Serialize>(r: Result<T, crate::agent::AgentError>) -> Response {
    match r {
        Ok(v) => Response::ok(v),
        Err(e) => Response::err(e.to_string()),
    }
}

async fn reply(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    resp: &Response,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(resp).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await
}
