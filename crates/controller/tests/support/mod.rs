//! What the end-to-end tests share: agents on their own loopback addresses ("Macs") with mTLS,
//! processes stopped when dropped, and a kubeconfig for the controller.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use metalkube_testkit::pki::TestCa;
use metalkube_testkit::processes::signal;
use nix::sys::signal::Signal;
use serde_json::Value;

/// Memory budget each test Mac's agent announces.
pub const BUDGET_BYTES: u64 = 400 << 20;

/// The identity the controller presents to the test API server, so its requests can be told
/// from the test's own when RBAC is checked against them.
pub const CONTROLLER_TOKEN: &str = "metalkube-controller";

pub fn write_kubeconfig(path: &Path, url: &str, token: &str) {
    let config = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: default\ncurrent-context: test\nusers:\n- name: test\n  user:\n    token: {token}\n"
    );
    std::fs::write(path, config).unwrap();
}

/// Writes the controller's TLS files into `dir`: the CA of the agents' serving certificates, and
/// a client certificate from the CA the agents trust.
pub fn write_controller_tls(dir: &Path, agent_ca: &TestCa, controller_ca: &TestCa) {
    let client_pem = controller_ca.client("metalkube-controller");
    std::fs::write(dir.join("agent-ca.crt"), &agent_ca.cert_pem).unwrap();
    std::fs::write(dir.join("client.crt"), client_pem.cert).unwrap();
    std::fs::write(dir.join("client.key"), client_pem.key).unwrap();
}

/// Controller timings for tests: an agent that stops answering is noticed, and called again,
/// within seconds rather than the production defaults' half minute.
pub const FAST_TIMINGS: &[&str] =
    &["--grace-period", "3s", "--heartbeat", "2s", "--keepalive", "2s", "--call-timeout", "3s"];

/// Starts `metalkube-controller` with the TLS files of `write_controller_tls` in `dir`, the API
/// server of `kubeconfig`, `/metrics` on 127.0.0.1:`metrics_port`, `args` added, and its output
/// appended to `dir`/controller.log.
pub fn start_controller(dir: &Path, kubeconfig: &Path, metrics_port: u16, args: &[&str]) -> Proc {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("controller.log")).unwrap();
    Proc {
        child: Command::new(env!("CARGO_BIN_EXE_metalkube-controller"))
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube_runtime=warn")
            .args(["--listen", &format!("127.0.0.1:{metrics_port}")])
            .arg("--agent-ca")
            .arg(dir.join("agent-ca.crt"))
            .arg("--client-cert")
            .arg(dir.join("client.crt"))
            .arg("--client-key")
            .arg(dir.join("client.key"))
            .args(args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
        name: "controller".into(),
    }
}

pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    /// SIGTERM, so an agent stops its engines; SIGKILL if it takes too long.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(self.pid(), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("{} did not stop on SIGTERM; killing it", self.name);
        }
        self.kill();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One Mac: an agent on its own loopback address.
pub struct Mac {
    pub name: String,
    pub ip: String,
    pub grpc_port: u16,
    pub http_port: u16,
    pub engine_ports: String,
    pub state: PathBuf,
    /// The agent's serving certificate, its key, and the CA of the controller's client
    /// certificate (`--tls-cert`, `--tls-key`, `--client-ca`).
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub client_ca: PathBuf,
    /// Memory the agent may give engines (`--memory-budget-bytes`).
    pub budget_bytes: u64,
    /// More `serve` flags (a hub endpoint, a download CA).
    pub extra_args: Vec<String>,
    /// The engine binary (`--engine`); None: the real llama-server.
    pub engine: Option<PathBuf>,
    pub proc: Option<Proc>,
}

impl Mac {
    pub fn new(name: &str, ip: &str, engine_ports: &str, dir: &Path, ca: &TestCa, client_ca: &TestCa) -> Self {
        let certs = dir.join(format!("{name}-certs"));
        std::fs::create_dir_all(&certs).unwrap();
        let pem = ca.server(&[ip]);
        std::fs::write(certs.join("tls.crt"), pem.cert).unwrap();
        std::fs::write(certs.join("tls.key"), pem.key).unwrap();
        std::fs::write(certs.join("client-ca.crt"), &client_ca.cert_pem).unwrap();
        Self {
            name: name.into(),
            ip: ip.into(),
            grpc_port: free_port(ip),
            http_port: free_port(ip),
            engine_ports: engine_ports.into(),
            state: dir.join(format!("{name}-state")),
            tls_cert: certs.join("tls.crt"),
            tls_key: certs.join("tls.key"),
            client_ca: certs.join("client-ca.crt"),
            budget_bytes: BUDGET_BYTES,
            extra_args: Vec::new(),
            engine: None,
            proc: None,
        }
    }

    /// The agent's log (stdout and stderr, appended across restarts).
    pub fn log(&self) -> PathBuf {
        self.state.with_extension("log")
    }

    pub fn start(&mut self) {
        let agent = metalkube_testkit::workspace_binary("metalkube-agent", "metalkube-agent");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.state.with_extension("log")).unwrap();
        let child = Command::new(agent)
            .arg("serve")
            .args(["--grpc-listen", &format!("{}:{}", self.ip, self.grpc_port)])
            .arg("--tls-cert")
            .arg(&self.tls_cert)
            .arg("--tls-key")
            .arg(&self.tls_key)
            .arg("--client-ca")
            .arg(&self.client_ca)
            .args(["--memory-budget-bytes", &self.budget_bytes.to_string()])
            .arg("--engine")
            .arg(self.engine.clone().unwrap_or_else(metalkube_testkit::real_engine))
            .arg("--state-dir")
            .arg(&self.state)
            .args(["--listen", &format!("{}:{}", self.ip, self.http_port)])
            .args(["--serving-host", &self.ip, "--serving-ports", "23000-23009"])
            .args(["--engine-ports", &self.engine_ports])
            .args(["--backoff-min", "100ms", "--drain-grace", "1s", "--stop-grace", "2s"])
            .args(&self.extra_args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.proc = Some(Proc { child, name: format!("agent {}", self.name) });
    }

    /// Enrolls this Mac as a user does: `kubectl metalkube enroll` against the cluster of
    /// `kubeconfig` (the CA Secret `ca_secret` in `namespace`) applies its MetalNode `node` and
    /// writes a bundle; `metalkube-agent join --no-start` installs the bundle's key material in
    /// the state directory, and the agent then runs with those files.
    #[allow(dead_code)] // each test binary uses its own subset
    pub fn enroll(&mut self, node: &str, kubeconfig: &Path, namespace: &str, ca_secret: &str) {
        let bundle = self.state.with_extension("bundle");
        let plugin = metalkube_testkit::workspace_binary("kubectl-metalkube", "kubectl-metalkube");
        let enrolled = Command::new(plugin)
            .env("KUBECONFIG", kubeconfig)
            .args(["enroll", node, "--address", &self.ip, "--grpc-port", &self.grpc_port.to_string()])
            .args(["--namespace", namespace, "--ca-secret", ca_secret, "--output"])
            .arg(&bundle)
            .output()
            .unwrap();
        assert!(
            enrolled.status.success(),
            "kubectl metalkube enroll {node}: {}",
            String::from_utf8_lossy(&enrolled.stderr)
        );
        let agent = metalkube_testkit::workspace_binary("metalkube-agent", "metalkube-agent");
        // The service definition join writes lands in this Mac's own home, not the test runner's.
        let home = self.state.with_extension("home");
        let joined = Command::new(agent)
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .arg("join")
            .arg(&bundle)
            .arg("--no-start")
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--engine")
            .arg(metalkube_testkit::real_engine())
            .output()
            .unwrap();
        assert!(
            joined.status.success(),
            "metalkube-agent join {}: {}",
            bundle.display(),
            String::from_utf8_lossy(&joined.stderr)
        );
        let tls = self.state.join("tls");
        (self.tls_cert, self.tls_key, self.client_ca) =
            (tls.join("agent.crt"), tls.join("agent.key"), tls.join("client-ca.crt"));
        for file in [&self.tls_cert, &self.tls_key, &self.client_ca] {
            assert!(file.is_file(), "join wrote no {}", file.display());
        }
    }

    pub fn endpoint(&self) -> String {
        format!("https://{}:{}", self.ip, self.grpc_port)
    }

    /// The engine pid the agent reports for `model`.
    pub async fn engine_pid(&self, model: &str) -> Option<u32> {
        let body: Value = reqwest::get(format!("http://{}:{}/api/v1/models", self.ip, self.http_port))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        body["models"].as_array()?.iter().find(|m| m["name"] == model)?["pid"].as_u64().map(|p| p as u32)
    }
}
