use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use kube::{
    Client,
    config::{KubeConfigOptions, Kubeconfig},
};

use super::{bins::KubeBins, certs, launcher};
use crate::harness::unique;

/// How long a server gets to become ready (a loaded 2-core machine can be slow).
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(50);

/// Who a client authenticates as (static tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum User {
    /// `system:masters`: may do anything.
    Admin,
    /// The agent's service account, `system:serviceaccount:istio-system:sluice-agent`: only
    /// what RBAC grants it (nothing until a test applies the ClusterRole from `deploy/`).
    Agent,
}

impl User {
    pub const AGENT_NAMESPACE: &str = "istio-system";
    pub const AGENT_SERVICE_ACCOUNT: &str = "sluice-agent";

    fn name(self) -> &'static str {
        match self {
            User::Admin => "admin",
            User::Agent => "agent",
        }
    }
}

struct Server {
    child: Option<Child>,
    log: PathBuf,
    name: String,
}

impl Server {
    fn spawn(&mut self, mut cmd: Command) -> Result<()> {
        let log = fs::File::create(&self.log)?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(launcher::spawn(cmd).with_context(|| format!("starting {}", self.name))?);
        Ok(())
    }

    /// Fails (with the end of its log) if the process has exited.
    fn check_running(&mut self) -> Result<()> {
        let status = match self.child.as_mut() {
            Some(c) => c.try_wait()?,
            None => bail!("{} is stopped", self.name),
        };
        if let Some(status) = status {
            self.child = None;
            bail!(
                "{} exited ({status}); end of its log {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log)
            );
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// etcd and one or more kube-apiservers on loopback. Drop kills them and removes the data.
pub struct KubeServer {
    dir: PathBuf,
    bins: KubeBins,
    etcd: Server,
    etcd_port: u16,
    etcd_peer_port: u16,
    apiservers: Vec<(Server, u16)>,
}

impl KubeServer {
    /// etcd and one API server, ready. `None` (the test should return) when the binaries
    /// are missing outside CI; see [`KubeBins::locate`].
    pub async fn start() -> Result<Option<KubeServer>> {
        Self::start_with(1).await
    }

    /// etcd and `apiservers` API servers sharing it.
    pub async fn start_with(apiservers: usize) -> Result<Option<KubeServer>> {
        let Some(bins) = KubeBins::locate()? else {
            return Ok(None);
        };
        // tmpfs where there is one: etcd fsyncs every write, which costs seconds on a disk
        // shared with parallel builds and buys nothing for a throwaway cluster.
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(unique("sluice-kube-"));
        fs::create_dir_all(&dir)?;
        let mut server = KubeServer {
            etcd: Server {
                child: None,
                log: dir.join("etcd.log"),
                name: "etcd".into(),
            },
            etcd_port: free_port()?,
            etcd_peer_port: free_port()?,
            apiservers: Vec::new(),
            dir,
            bins,
        };
        server.write_credentials()?;
        server.spawn_etcd()?;
        for i in 0..apiservers {
            let log = server.dir.join(format!("apiserver-{i}.log"));
            let name = format!("kube-apiserver {i}");
            server.apiservers.push((
                Server {
                    child: None,
                    log,
                    name,
                },
                free_port()?,
            ));
            server.spawn_apiserver(i)?;
        }
        for i in 0..apiservers {
            server.wait_apiserver_ready(i).await?;
        }
        Ok(Some(server))
    }

    /// An admin client of the first API server.
    pub async fn client(&self) -> Result<Client> {
        self.client_as(User::Admin, 0).await
    }

    /// A client of API server `apiserver` authenticated as `user`.
    pub async fn client_as(&self, user: User, apiserver: usize) -> Result<Client> {
        let path = self.kubeconfig(user, apiserver)?;
        let kubeconfig = Kubeconfig::read_from(&path)?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    /// A kubeconfig file for `user` on API server `apiserver` (for a process under test).
    pub fn kubeconfig(&self, user: User, apiserver: usize) -> Result<PathBuf> {
        let port = self.port(apiserver)?;
        let path = self
            .dir
            .join(format!("{}-{apiserver}.kubeconfig", user.name()));
        self.write_kubeconfig(user, port, path)
    }

    /// API server `apiserver`'s address on loopback.
    pub fn addr(&self, apiserver: usize) -> Result<std::net::SocketAddr> {
        Ok((Ipv4Addr::LOCALHOST, self.port(apiserver)?).into())
    }

    /// A kubeconfig for `user` that reaches the server through `127.0.0.1:<port>` (a
    /// [`super::NetnsProxy`] in another namespace; the server's certificate is for
    /// 127.0.0.1 whatever the port).
    pub fn kubeconfig_via(&self, user: User, port: u16) -> Result<PathBuf> {
        let path = self
            .dir
            .join(format!("{}-via-{port}.kubeconfig", user.name()));
        self.write_kubeconfig(user, port, path)
    }

    fn port(&self, apiserver: usize) -> Result<u16> {
        Ok(self
            .apiservers
            .get(apiserver)
            .context("no such API server")?
            .1)
    }

    fn write_kubeconfig(&self, user: User, port: u16, path: PathBuf) -> Result<PathBuf> {
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {
                "server": format!("https://127.0.0.1:{port}"),
                "certificate-authority": self.dir.join("ca.crt"),
            }}],
            "users": [{"name": user.name(), "user": {"token": token(user)}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": user.name()}}],
            "current-context": "test",
        });
        // Tests of one binary share the server and ask for the same file at once: a reader
        // must never see it half-written, so it is replaced whole.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp{n}"));
        fs::write(&tmp, serde_json::to_vec_pretty(&config)?)?;
        fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// Kills API server `i` (an outage: clients see connections refused).
    pub fn stop_apiserver(&mut self, i: usize) {
        if let Some((s, _)) = self.apiservers.get_mut(i) {
            s.kill();
        }
    }

    /// Starts API server `i` again on its port, and waits until it is ready.
    pub async fn start_apiserver(&mut self, i: usize) -> Result<()> {
        self.spawn_apiserver(i)?;
        self.wait_apiserver_ready(i).await
    }

    /// Kills etcd: API servers stay up but cannot read or write.
    pub fn stop_etcd(&mut self) {
        self.etcd.kill();
    }

    /// Starts etcd again on its data, and waits until it answers `/health`.
    pub async fn start_etcd(&mut self) -> Result<()> {
        self.spawn_etcd()?;
        let port = self.etcd_port;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.etcd.check_running()?;
            let healthy = tokio::task::spawn_blocking(move || etcd_healthy(port)).await?;
            if healthy {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd not healthy after {READY_TIMEOUT:?}: {}",
                    log_tail(&self.etcd.log)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn write_credentials(&self) -> Result<()> {
        let c = certs::generate()?;
        let d = &self.dir;
        fs::write(d.join("ca.crt"), &c.ca_pem)?;
        fs::write(d.join("server.crt"), &c.server_pem)?;
        fs::write(d.join("server.key"), &c.server_key_pem)?;
        fs::write(d.join("sa.key"), &c.sa_key_pem)?;
        fs::write(d.join("sa.pub"), &c.sa_public_pem)?;
        let agent = format!(
            "system:serviceaccount:{}:{}",
            User::AGENT_NAMESPACE,
            User::AGENT_SERVICE_ACCOUNT
        );
        fs::write(
            d.join("tokens.csv"),
            format!(
                "{},admin,admin,\"system:masters\"\n{},{agent},{agent},\"system:serviceaccounts,system:serviceaccounts:{}\"\n",
                token(User::Admin),
                token(User::Agent),
                User::AGENT_NAMESPACE,
            ),
        )?;
        Ok(())
    }

    fn spawn_etcd(&mut self) -> Result<()> {
        let client = format!("http://127.0.0.1:{}", self.etcd_port);
        let peer = format!("http://127.0.0.1:{}", self.etcd_peer_port);
        let mut cmd = Command::new(&self.bins.etcd);
        cmd.arg("--name=test")
            .arg(format!("--data-dir={}", self.dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--log-level=warn");
        self.etcd.spawn(cmd)
    }

    fn spawn_apiserver(&mut self, i: usize) -> Result<()> {
        let d = &self.dir;
        let path = |f: &str| d.join(f).display().to_string();
        let port = self.apiservers[i].1;
        let mut cmd = Command::new(&self.bins.apiserver);
        cmd.arg(format!(
            "--etcd-servers=http://127.0.0.1:{}",
            self.etcd_port
        ))
        .arg("--bind-address=127.0.0.1")
        .arg("--advertise-address=127.0.0.1")
        .arg(format!("--secure-port={port}"))
        .arg("--insecure-port=0")
        .arg(format!("--cert-dir={}", path("certs")))
        .arg(format!("--tls-cert-file={}", path("server.crt")))
        .arg(format!("--tls-private-key-file={}", path("server.key")))
        .arg(format!("--client-ca-file={}", path("ca.crt")))
        .arg(format!("--token-auth-file={}", path("tokens.csv")))
        .arg("--authorization-mode=RBAC")
        // As every real cluster's: the agent's DaemonSet is privileged.
        .arg("--allow-privileged=true")
        .arg("--service-account-issuer=https://kubernetes.default.svc")
        .arg(format!("--service-account-key-file={}", path("sa.pub")))
        .arg(format!(
            "--service-account-signing-key-file={}",
            path("sa.key")
        ))
        // A range is required; nothing is ever routed there.
        .arg("--service-cluster-ip-range=10.96.0.0/16")
        // No controller-manager creates `default` service accounts, so pods could not be
        // admitted with this plugin on.
        .arg("--disable-admission-plugins=ServiceAccount")
        // No lease writes every 10 s: fewer background revisions.
        .arg("--endpoint-reconciler-type=none")
        .arg("--profiling=false")
        .arg("--logtostderr=true")
        .arg("--v=1");
        self.apiservers[i].0.spawn(cmd)
    }

    async fn wait_apiserver_ready(&mut self, i: usize) -> Result<()> {
        let client = self.client_as(User::Admin, i).await?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.apiservers[i].0.check_running()?;
            let req = http::Request::get("/readyz").body(Vec::new())?;
            match client.request_text(req).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                _ if Instant::now() > deadline => bail!(
                    "kube-apiserver {i} not ready after {READY_TIMEOUT:?}; end of its log:\n{}",
                    log_tail(&self.apiservers[i].0.log)
                ),
                _ => tokio::time::sleep(POLL).await,
            }
        }
    }
}

impl Drop for KubeServer {
    fn drop(&mut self) {
        for (s, _) in &mut self.apiservers {
            s.kill();
        }
        self.etcd.kill();
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("warning: could not remove {}: {e}", self.dir.display());
        }
    }
}

/// Static tokens; the servers only listen on loopback, for the life of one test.
fn token(user: User) -> String {
    format!("sluice-test-{}-token", user.name())
}

/// A port nothing listens on right now (the server binds it a moment later).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

fn etcd_healthy(port: u16) -> bool {
    let get = || -> std::io::Result<String> {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    get().is_ok_and(|r| r.contains("\"health\":\"true\""))
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
