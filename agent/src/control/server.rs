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

use super::api::{Request, Response, decode_request, encode_line};
use crate::{
    agent::{Agent, AgentError},
    reconcile::Reconciler,
    zds::wire::replace_stale_socket,
};

/// A request line longer than this is not one of ours.
const MAX_LINE: usize = 64 * 1024;

pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    /// Kubernetes mode: CNI requests go to the reconciler, and hand-made enrollments are
    /// refused.
    kube: Option<Arc<Reconciler>>,
}

impl Server {
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        replace_stale_socket(path, |p| std::os::unix::net::UnixStream::connect(p).is_ok())?;
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Server {
            listener,
            path: path.to_path_buf(),
            kube: None,
        })
    }

    /// Kubernetes mode: `reconciler` owns enrollment.
    pub fn with_reconciler(mut self, reconciler: Arc<Reconciler>) -> Self {
        self.kube = Some(reconciler);
        self
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
                        tokio::spawn(serve(stream, Arc::clone(&agent), self.kube.clone(), stop.clone()));
                    }
                    Err(e) => warn!(error = %e, "accepting a control connection"),
                }
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve(
    stream: UnixStream,
    agent: Arc<Agent>,
    kube: Option<Arc<Reconciler>>,
    stop: watch::Sender<bool>,
) {
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
    // Bytes, not a String: a line that is not UTF-8 gets an answer saying so, not a hang-up.
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut lines)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
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
        let resp = match decode_request(&line) {
            Ok(Request::Trace { pod }) => {
                // The connection becomes a stream; it ends when the client hangs up.
                trace(pod, &agent, lines, &mut write).await;
                return;
            }
            Ok(req) => handle(req, &agent, kube.as_deref(), &stop).await,
            Err(msg) => {
                agent.metrics.error("control_request");
                Response::err(msg)
            }
        };
        if reply(&mut write, &resp).await.is_err() {
            return;
        }
    }
}

async fn handle(
    req: Request,
    agent: &Arc<Agent>,
    kube: Option<&Reconciler>,
    stop: &watch::Sender<bool>,
) -> Response {
    match req {
        Request::Enroll(_) | Request::Unenroll { .. } if kube.is_some() => {
            Response::err(AgentError::KubernetesMode.to_string())
        }
        Request::Enroll(e) => match agent.enroll(e).await {
            Ok(r) => Response::ok(r),
            Err(e) => Response::err(e.to_string()),
        },
        Request::Unenroll { uid } => match agent.unenroll(uid).await {
            Ok(()) => Response::ok(()),
            Err(e) => Response::err(e.to_string()),
        },
        Request::Status => {
            let a = Arc::clone(agent);
            match tokio::task::spawn_blocking(move || crate::status::collect(&a)).await {
                Ok(status) => {
                    let mut resp = Response::ok(status);
                    // Kubernetes mode: what the reconciler concluded about each pod, and why.
                    if let (Some(r), Some(serde_json::Value::Object(o))) = (kube, &mut resp.result)
                        && let Ok(k) = serde_json::to_value(r.status())
                    {
                        o.insert("kubernetes".into(), k);
                    }
                    resp
                }
                Err(e) => Response::err(format!("collecting the status: {e}")),
            }
        }
        Request::Shutdown => {
            let _ = stop.send(true);
            Response::ok(())
        }
        Request::Ping => Response::ok("pong"),
        Request::Trace { .. } => Response::err("trace streams; it is handled by serve"),
        Request::CniAdd(r) => result(crate::cni_ops::add(agent, kube, r).await),
        Request::CniCheck(r) => result(crate::cni_ops::check(agent, kube, &r)),
        Request::CniDel(r) => result(crate::cni_ops::del(agent, kube, r).await),
        Request::CniGc {
            valid_container_ids,
        } => Response::ok(crate::cni_ops::gc(agent, kube, valid_container_ids).await),
        Request::CniStatus => Response::ok(crate::cni_ops::status(agent)),
    }
}

fn result<T: serde::Serialize>(r: Result<T, crate::agent::AgentError>) -> Response {
    match r {
        Ok(v) => Response::ok(v),
        Err(e) => Response::err(e.to_string()),
    }
}

/// Streams decisions to the client until it hangs up (or the agent stops).
async fn trace(
    pod: Option<String>,
    agent: &Arc<Agent>,
    mut from_client: BufReader<tokio::net::unix::OwnedReadHalf>,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) {
    let mut names = crate::trace::PodNames::new(Arc::clone(agent));
    if let Some(p) = &pod
        && !names.knows(p)
    {
        let _ = reply(write, &Response::err(format!("no enrolled pod {p}"))).await;
        return;
    }
    let mut sub = match crate::trace::subscribe(agent.dataplane()) {
        Ok(sub) => sub,
        Err(e) => {
            let _ = reply(write, &Response::err(format!("cannot trace: {e}"))).await;
            return;
        }
    };
    if reply(write, &Response::ok(serde_json::json!({ "pod": pod })))
        .await
        .is_err()
    {
        return;
    }
    let mut ignored = Vec::new();
    loop {
        tokio::select! {
            // Anything from the client, or its hanging up, ends the stream.
            _ = from_client.read_until(b'\n', &mut ignored) => return,
            rec = sub.rx.recv() => {
                let record = match rec {
                    Ok(r) => r,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        debug!(missed = n, "a trace client fell behind");
                        continue;
                    }
                    Err(_) => return,
                };
                let name = names.name(&record);
                if pod.is_some() && name != pod {
                    continue;
                }
                let line = crate::trace::TraceLine { pod: name, record };
                let Ok(mut bytes) = serde_json::to_vec(&line) else { continue };
                bytes.push(b'\n');
                if write.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn reply(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    resp: &Response,
) -> std::io::Result<()> {
    let bytes = encode_line(resp).map_err(std::io::Error::other)?;
    write.write_all(&bytes).await
}
