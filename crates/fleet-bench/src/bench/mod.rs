//! The fleet benchmark: the real controller binary against the test API server and a fleet of
//! simulated agents, through seven scenarios, each timed and counted.
//!
//! Three runtimes in this process, each with its own named threads, so their CPU is read apart:
//! the test API server (`fb-apiserver`), the simulated agents (`fb-agents`) and the driver that
//! applies models and checks convergence (`fb-driver`). The controllers are processes of their
//! own, measured from /proc.

pub mod measure;
pub mod plan;
pub mod report;
pub mod truth;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use metalkube_api::{MetalModel, MetalNode, ModelKey, Phase};
use metalkube_fleetbench::agent_server::{AgentPort, ServerPem, tls_config};
use metalkube_fleetbench::agent_sim::{ModelSizes, SimAgent, SimTiming};
use metalkube_testkit::apiserver::TestApiServer;
use metalkube_testkit::apiserver::resources::RESOURCES;
use metalkube_testkit::pki::TestCa;
use serde_json::json;

use plan::{MacPlan, ModelPlan};
use report::{Goal, Scenario};

/// What the command line chose.
#[derive(Debug, Clone, clap::Parser)]
#[command(about = "The controller at fleet scale: simulated Macs, real controller, test API server")]
pub struct Args {
    /// Simulated Macs (agents).
    #[arg(long, default_value_t = 100)]
    pub agents: usize,
    /// MetalModels.
    #[arg(long, default_value_t = 1000)]
    pub models: usize,
    /// Length of the steady-state window.
    #[arg(long, default_value = "300s", value_parser = humantime_secs)]
    pub steady: Duration,
    /// The controller binary to measure.
    #[arg(long)]
    pub controller: PathBuf,
    /// Where the Markdown and JSON results go.
    #[arg(long)]
    pub out: PathBuf,
    /// The controller's `--grace-period`.
    #[arg(long, default_value = "30s", value_parser = humantime_secs)]
    pub grace_period: Duration,
    /// The controller's `--lease-duration`.
    #[arg(long, default_value = "15s", value_parser = humantime_secs)]
    pub lease_duration: Duration,
    /// The name the report is written under (`fleet` or `fleet-quick`).
    #[arg(long, default_value = "fleet")]
    pub name: String,
    /// Keep the scratch directory (the controllers' logs) after the run.
    #[arg(long)]
    pub keep: bool,
}

/// `30s`, `500ms`, `2m`: the forms the controller's own flags take.
fn humantime_secs(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = number.parse().map_err(|_| format!("{text:?}: a whole number and a unit (500ms, 30s, 5m)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{text:?}: the unit must be ms, s or m")),
    }
}

const LEASE: &str = "metalkube-controller";
const POLL: Duration = Duration::from_millis(200);

fn runtime(name: &str, threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(threads).thread_name(name).enable_all().build()?)
}

/// One controller process and where its metrics are.
struct Controller {
    name: String,
    child: Child,
    port: u16,
}

impl Controller {
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn signal(&mut self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), signal);
    }
    fn stop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

/// Everything a scenario touches.
struct Bench {
    args: Args,
    dir: tempfile::TempDir,
    /// Carries the test API server's tasks: kept as long as the server.
    _api_rt: tokio::runtime::Runtime,
    agents_rt: tokio::runtime::Runtime,
    driver: tokio::runtime::Runtime,
    server: TestApiServer,
    client: kube::Client,
    macs: Vec<MacPlan>,
    ports: Vec<AgentPort>,
    models: Vec<ModelPlan>,
    /// Replicas asked of each model now (scenarios change some).
    replicas: BTreeMap<ModelKey, u32>,
    controllers: Vec<Controller>,
    started: usize,
    /// Controllers that exited without being told to (restarted, as the kubelet would).
    unexpected_exits: Vec<String>,
    /// Names of controllers the bench killed on purpose.
    killed: BTreeSet<String>,
    began: Instant,
    commands: Vec<String>,
}

/// The state of things at the start or end of a measured window.
struct Mark {
    at: Instant,
    requests: usize,
    resource_version: u64,
    controller_cpu: f64,
    apiserver_cpu: f64,
    agents_cpu: f64,
    metrics: String,
    /// The controller holding the lease then: counters of another process do not subtract.
    leader: Option<String>,
}

impl Bench {
    fn start_controller(&mut self) -> anyhow::Result<()> {
        self.started += 1;
        let name = format!("controller-{}", self.started);
        let kubeconfig = self.dir.path().join(format!("{name}.kubeconfig"));
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: bench\n  cluster:\n    server: {}\ncontexts:\n- name: bench\n  context:\n    cluster: bench\n    user: {name}\ncurrent-context: bench\nusers:\n- name: {name}\n  user:\n    token: {name}\n",
                self.server.url
            ),
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log")))?;
        let dir = self.dir.path();
        let mut command = Command::new(&self.args.controller);
        command
            .env("KUBECONFIG", &kubeconfig)
            // The controllers log warnings; METALKUBE_FLEET_CONTROLLER_LOG sets another filter
            // (the logs stay in the run's scratch directory, kept with --keep).
            .env("RUST_LOG", std::env::var("METALKUBE_FLEET_CONTROLLER_LOG").unwrap_or_else(|_| "warn".into()))
            .env("POD_NAME", &name)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--agent-ca")
            .arg(dir.join("agent-ca.crt"))
            .arg("--client-cert")
            .arg(dir.join("client.crt"))
            .arg("--client-key")
            .arg(dir.join("client.key"))
            .args(["--grace-period", &format!("{}s", self.args.grace_period.as_secs())])
            .args(["--lease-duration", &format!("{}s", self.args.lease_duration.as_secs())])
            .stdout(log.try_clone()?)
            .stderr(log);
        let shown = format!(
            "KUBECONFIG=<test API server> {} --listen 127.0.0.1:<port> --agent-ca <ca> --client-cert <crt> --client-key <key> --grace-period {}s --lease-duration {}s",
            self.args.controller.display(),
            self.args.grace_period.as_secs(),
            self.args.lease_duration.as_secs()
        );
        if !self.commands.contains(&shown) {
            self.commands.push(shown);
        }
        let child = command.spawn().with_context(|| format!("starting {}", self.args.controller.display()))?;
        self.controllers.push(Controller { name, child, port });
        Ok(())
    }

    /// Restarts controllers that exited on their own (a leader that lost its lease exits by
    /// design and comes back as a standby, as its pod would), and remembers that they did.
    fn revive(&mut self) -> anyhow::Result<()> {
        let mut exited = Vec::new();
        for c in &mut self.controllers {
            if !self.killed.contains(&c.name)
                && let Ok(Some(status)) = c.child.try_wait()
            {
                exited.push(format!("{} ({status})", c.name));
                self.killed.insert(c.name.clone());
            }
        }
        for e in exited {
            self.progress(&format!("{e} exited on its own; starting another"));
            self.unexpected_exits.push(e);
            self.start_controller()?;
        }
        Ok(())
    }

    fn progress(&self, what: &str) {
        eprintln!("[{:6.1} s] {what}", self.began.elapsed().as_secs_f64());
    }

    fn leader(&self) -> Option<&Controller> {
        let holder = truth::lease_holder(&self.server.store, "default", LEASE)?;
        self.controllers.iter().find(|c| c.name == holder)
    }

    fn leader_index(&self) -> Option<usize> {
        let holder = truth::lease_holder(&self.server.store, "default", LEASE)?;
        self.controllers.iter().position(|c| c.name == holder)
    }

    fn wait_leader(&self, within: Duration) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        while t0.elapsed() < within {
            if let Some(c) = self.leader()
                && measure::metric_sum(&measure::scrape(c.port), "metalkube_controller_leader") == 1.0
            {
                return Ok(t0.elapsed());
            }
            std::thread::sleep(POLL);
        }
        bail!("no controller led within {within:?}")
    }

    fn mark(&self) -> Mark {
        let leader = self.leader();
        Mark {
            at: Instant::now(),
            requests: self.server.requests().len(),
            resource_version: self.server.store.list(&RESOURCES[0], None).1,
            controller_cpu: leader.map_or(0.0, |c| measure::process_cpu(c.pid())),
            apiserver_cpu: measure::threads_cpu("fb-apiserver"),
            agents_cpu: measure::threads_cpu("fb-agents"),
            metrics: leader.map(|c| measure::scrape(c.port)).unwrap_or_default(),
            leader: leader.map(|c| c.name.clone()),
        }
    }

    fn truth(&self) -> truth::Truth {
        let mut t = truth::Truth::new();
        for (mac, port) in self.macs.iter().zip(&self.ports) {
            for r in port.agent().reports() {
                // A Mac that cannot be reached serves no one.
                let ready = r.ready && port.is_up();
                t.entry(r.model.clone()).or_default().push(truth::Held {
                    node: mac.name.clone(),
                    generation: r.generation,
                    ready,
                    settled: match r.phase {
                        Some(Phase::Pending) => r.last_error.is_some(),
                        Some(Phase::Starting | Phase::Restarting | Phase::Downloading) | None => false,
                        Some(_) => true,
                    },
                });
            }
        }
        t
    }

    fn check(&self) -> truth::Verdict {
        truth::check(&self.server.store, &self.models, &self.replicas, &self.truth(), &self.macs)
    }

    /// Time until every model is converged, from `t0`; None if not within `within`.
    fn wait_converged(&self, t0: Instant, within: Duration) -> Option<f64> {
        loop {
            let v = self.check();
            if v.converged() {
                return Some(t0.elapsed().as_secs_f64());
            }
            if t0.elapsed() > within {
                eprintln!("  not converged after {within:?}: {} models, e.g. {:?}", v.unconverged, v.examples);
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until nothing but leases has changed for two seconds (at most `within`): the
    /// writes a scenario caused (node statuses come after the models') must not count in the
    /// next one's window.
    fn settle(&self, within: Duration) {
        let t0 = Instant::now();
        let mut last = self.mark();
        while t0.elapsed() < within {
            std::thread::sleep(Duration::from_secs(2));
            let now = self.mark();
            if self.changed_objects(&last, &now).is_empty() {
                return;
            }
            last = now;
        }
        self.progress(&format!("still writing after {within:?}; going on"));
    }

    fn streams(&self) -> usize {
        self.ports.iter().map(|p| p.agent().watchers()).sum()
    }

    /// Objects whose content changed between two marks, by resource (leases left out).
    fn changed_objects(&self, from: &Mark, to: &Mark) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for r in RESOURCES.iter().filter(|r| r.plural != "leases") {
            let (events, _) = self.server.store.watch(r, None, from.resource_version);
            for e in events.iter().filter(|e| e.resource_version <= to.resource_version) {
                let name = e.object["metadata"]["name"].as_str().unwrap_or_default();
                let at = match &e.namespace {
                    Some(ns) => format!("{ns}/{name}"),
                    None => name.to_owned(),
                };
                out.entry(r.plural.to_owned()).or_default().insert(at);
            }
        }
        out
    }

    fn scenario(&self, name: &str, from: &Mark, to: &Mark, converge: Option<f64>) -> Scenario {
        // Another leader at the end: its counters and CPU count from its own start.
        let same = from.leader == to.leader;
        let (from_metrics, from_cpu) = if same { (from.metrics.as_str(), from.controller_cpu) } else { ("", 0.0) };
        let log = self.server.requests();
        let requests = measure::controller_requests(&log[from.requests.min(log.len())..to.requests.min(log.len())]);
        let seconds = to.at.duration_since(from.at).as_secs_f64();
        let reconcile = |m: &str| measure::metric_sum(m, "metalkube_controller_reconciles_total");
        let hist = |m: &str| measure::histogram(m, "metalkube_controller_reconcile_duration_seconds");
        let leader = self.leader();
        let (rss, peak) = leader.map_or((0.0, 0.0), |c| measure::rss_mib(c.pid()));
        Scenario {
            name: name.to_owned(),
            seconds,
            converge_seconds: converge,
            requests,
            models: self.models.len(),
            reconciles: reconcile(&to.metrics) - reconcile(from_metrics),
            reconcile_p50: measure::quantile(&hist(from_metrics), &hist(&to.metrics), 0.5),
            reconcile_p99: measure::quantile(&hist(from_metrics), &hist(&to.metrics), 0.99),
            controller_cpu_seconds: (to.controller_cpu - from_cpu).max(0.0),
            controller_rss_mib: rss,
            controller_peak_rss_mib: peak,
            apiserver_cpu_seconds: to.apiserver_cpu - from.apiserver_cpu,
            agents_cpu_seconds: to.agents_cpu - from.agents_cpu,
            streams: self.streams(),
            changed: self.changed_objects(from, to),
            extra: Vec::new(),
        }
    }

    fn model_api(&self, ns: &str) -> Api<MetalModel> {
        Api::namespaced(self.client.clone(), ns)
    }

    fn patch_replicas(&mut self, keys: &[ModelKey], replicas: u32) -> anyhow::Result<()> {
        let client = self.client.clone();
        let patches = keys.iter().map(|k| {
            let api: Api<MetalModel> = Api::namespaced(client.clone(), &k.namespace);
            let name = k.name.clone();
            async move {
                api.patch(&name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": replicas}}))).await
            }
        });
        let results: Vec<_> = self.driver.block_on(futures::stream::iter(patches).buffer_unordered(16).collect());
        for r in results {
            r.context("patching a MetalModel's replicas")?;
        }
        for k in keys {
            self.replicas.insert(k.clone(), replicas);
        }
        Ok(())
    }
}

/// Models with a ready replica on one of `nodes`, and where.
fn serving_on(b: &Bench, nodes: &BTreeSet<String>) -> Vec<(ModelKey, String)> {
    let address: BTreeMap<&str, &str> = b.macs.iter().map(|m| (m.name.as_str(), m.serving_address.as_str())).collect();
    let mut out = Vec::new();
    for (key, held) in b.truth() {
        for h in held.iter().filter(|h| h.ready && nodes.contains(&h.node)) {
            out.push((key.clone(), address[h.node.as_str()].to_owned()));
        }
    }
    out
}

/// Time from `t0` until `done` holds, polled; None past `within`.
fn time_until(t0: Instant, within: Duration, mut done: impl FnMut() -> bool) -> Option<f64> {
    loop {
        if done() {
            return Some(t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() > within {
            return None;
        }
        std::thread::sleep(POLL / 2);
    }
}

pub fn run(args: Args) -> anyhow::Result<bool> {
    let api_rt = runtime("fb-apiserver", 1)?;
    let agents_rt = runtime("fb-agents", 1)?;
    let driver = runtime("fb-driver", 1)?;
    let server = api_rt.block_on(TestApiServer::start());
    let client = driver.block_on(async { server.client() });
    let dir = tempfile::Builder::new().prefix("metalkube-fleet-").tempdir()?;
    eprintln!("fleet: scratch directory (controllers' logs) {}", dir.path().display());

    // Certificates as a real fleet has them: the agents' serving certificate from one CA, the
    // controller's client certificate from the CA the agents trust.
    let agent_ca = TestCa::new("metalkube agents (bench)");
    let controller_ca = TestCa::new("metalkube controller (bench)");
    let serving = agent_ca.server(&["127.0.0.1"]);
    let client_pem = controller_ca.client("metalkube-controller");
    std::fs::write(dir.path().join("agent-ca.crt"), &agent_ca.cert_pem)?;
    std::fs::write(dir.path().join("client.crt"), &client_pem.cert)?;
    std::fs::write(dir.path().join("client.key"), &client_pem.key)?;
    let tls =
        tls_config(&ServerPem { cert: serving.cert, key: serving.key, client_ca: controller_ca.cert_pem.clone() })?;

    let macs = plan::macs(args.agents);
    let models = plan::models(args.models);
    let sizes: BTreeMap<ModelKey, u64> = models.iter().map(|m| (m.key.clone(), m.bytes)).collect();
    let sizes = Arc::new(sizes);
    let sizes: ModelSizes = Arc::new(move |k: &ModelKey| sizes.get(k).copied().unwrap_or(4 << 30));
    eprintln!("fleet: {} simulated Macs, {} MetalModels", macs.len(), models.len());
    let ports = agents_rt.block_on(async {
        let mut ports = Vec::new();
        for mac in &macs {
            let agent = SimAgent::new(mac.chip, mac.budget_bytes, 9090, sizes.clone(), SimTiming::default());
            ports.push(AgentPort::start(agent, tls.clone()).await?);
        }
        anyhow::Ok(ports)
    })?;
    let nodes: Api<MetalNode> = Api::all(client.clone());
    for (mac, port) in macs.iter().zip(&ports) {
        let node: MetalNode = serde_json::from_value(plan::node_object(mac, &format!("https://{}", port.addr)))?;
        driver.block_on(nodes.create(&PostParams::default(), &node)).context("creating a MetalNode")?;
    }
    let replicas = models.iter().map(|m| (m.key.clone(), m.replicas)).collect();
    let mut b = Bench {
        args,
        dir,
        _api_rt: api_rt,
        agents_rt,
        driver,
        server,
        client,
        macs,
        ports,
        models,
        replicas,
        controllers: Vec::new(),
        started: 0,
        unexpected_exits: Vec::new(),
        killed: BTreeSet::new(),
        began: Instant::now(),
        commands: Vec::new(),
    };
    b.start_controller()?;
    b.start_controller()?;
    let led = b.wait_leader(Duration::from_secs(60))?;
    eprintln!("fleet: a leader in {:.1} s, its standby waiting", led.as_secs_f64());
    let connected = time_until(Instant::now(), Duration::from_secs(60), || b.streams() >= b.macs.len());
    if connected.is_none() {
        bail!("the leader did not open a Watch stream to every agent ({} of {})", b.streams(), b.macs.len());
    }

    let mut scenarios = Vec::new();
    let mut goals = Vec::new();

    // 1. Every model applied at once, from empty.
    b.progress(&format!("scenario: apply {} models", b.models.len()));
    let from = b.mark();
    let objects: Vec<MetalModel> = b
        .models
        .iter()
        .map(|m| serde_json::from_value(plan::model_object(m, m.replicas, "5s")))
        .collect::<Result<_, _>>()?;
    let client = b.client.clone();
    let creates = objects.into_iter().map(|o| {
        let api: Api<MetalModel> =
            Api::namespaced(client.clone(), o.metadata.namespace.as_deref().unwrap_or("default"));
        async move { api.create(&PostParams::default(), &o).await }
    });
    let created: Vec<_> = b.driver.block_on(futures::stream::iter(creates).buffer_unordered(16).collect());
    for c in created {
        c.context("creating a MetalModel")?;
    }
    let applied = from.at.elapsed().as_secs_f64();
    let converged = b.wait_converged(from.at, Duration::from_secs(300));
    let to = b.mark();
    let mut s = b.scenario("apply all from empty", &from, &to, converged);
    s.extra.push(("applied in".into(), format!("{applied:.1} s")));
    goals.push(Goal::time("converge from empty", converged, 30.0, "≤ 30 s"));
    goals.push(Goal::count("every model converged from empty", u64::from(converged.is_none()), 0));
    scenarios.push(s);

    // 2. Steady state with pulses flowing: nothing may be written.
    b.revive()?;
    b.progress(&format!("scenario: steady state for {:?}", b.args.steady));
    b.settle(Duration::from_secs(30));
    let from = b.mark();
    std::thread::sleep(b.args.steady);
    let still = b.check();
    let to = b.mark();
    let mut s = b.scenario("steady state", &from, &to, still.converged().then_some(0.0));
    let minutes = s.seconds / 60.0;
    let status_writes: u64 = s.requests.iter().filter(|(k, _)| measure::is_status_write(k)).map(|(_, n)| n).sum();
    let writes: u64 =
        s.requests.iter().filter(|(k, _)| measure::is_write(k) && !measure::is_lease(k)).map(|(_, n)| n).sum();
    let cpu_percent = 100.0 * s.controller_cpu_seconds / s.seconds;
    s.extra.push(("status writes per minute".into(), format!("{:.2}", status_writes as f64 / minutes)));
    s.extra.push(("writes per minute (leases aside)".into(), format!("{:.2}", writes as f64 / minutes)));
    s.extra.push(("controller CPU".into(), format!("{cpu_percent:.2}% of a core")));
    goals.push(Goal::count("steady: status writes", status_writes, 0));
    goals.push(Goal::count("steady: writes other than lease renewals", writes, 0));
    goals.push(Goal::count("steady: objects changed", s.changed.values().map(|v| v.len() as u64).sum(), 0));
    goals.push(Goal::count("steady: every model stays converged", u64::from(!still.converged()), 0));
    goals.push(Goal::at_most("steady: controller CPU", cpu_percent, 5.0, "% of a core"));
    scenarios.push(s);

    // 3. One Mac in ten lost at once, then back.
    b.revive()?;
    b.settle(Duration::from_secs(30));
    let lost: Vec<usize> = (0..b.macs.len()).filter(|i| i % 10 == 5).collect();
    let lost_names: BTreeSet<String> = lost.iter().map(|i| b.macs[*i].name.clone()).collect();
    let affected = serving_on(&b, &lost_names);
    b.progress(&format!("scenario: {} Macs lost ({} replicas on them), then back", lost.len(), affected.len()));
    let from = b.mark();
    for i in &lost {
        b.ports[*i].take_down();
    }
    let grace = b.args.grace_period.as_secs_f64();
    let out = time_until(from.at, b.args.grace_period + Duration::from_secs(30), || {
        affected.iter().all(|(key, address)| !truth::ready_addresses(&b.server.store, key).contains(address))
    });
    // Keep them away a little past the grace period, as a short outage would.
    std::thread::sleep(Duration::from_secs(2));
    let back_at = Instant::now();
    b.agents_rt.block_on(async {
        for i in &lost {
            b.ports[*i].bring_up().await?;
        }
        anyhow::Ok(())
    })?;
    let back = b.wait_converged(back_at, Duration::from_secs(120));
    let to = b.mark();
    let mut s = b.scenario(
        "10% of Macs lost, then back",
        &from,
        &to,
        back.map(|t| back_at.duration_since(from.at).as_secs_f64() + t),
    );
    s.extra.push(("replicas on the lost Macs".into(), affected.len().to_string()));
    s.extra.push(("their endpoints not ready after".into(), secs(out)));
    s.extra.push(("all back and converged after the return".into(), secs(back)));
    goals.push(Goal::time(
        "lost Macs' endpoints not ready",
        out,
        grace + 2.0,
        &format!("≤ grace ({grace:.0} s) + 2 s"),
    ));
    goals.push(Goal::time("back after the Macs return", back, 5.0, "≤ 5 s"));
    goals.push(Goal::count("every model converged after the return", u64::from(back.is_none()), 0));
    scenarios.push(s);

    // 4. One model's pulse goes red on one Mac, then green.
    let (red_key, red_node) = b
        .truth()
        .into_iter()
        .find_map(|(k, held)| {
            (held.len() == 1 && held[0].ready && !lost_names.contains(&held[0].node)).then(|| (k, held[0].node.clone()))
        })
        .context("no model serves on exactly one Mac")?;
    let red_mac = b.macs.iter().position(|m| m.name == red_node).context("the red model's Mac")?;
    b.revive()?;
    b.settle(Duration::from_secs(30));
    b.progress(&format!("scenario: {red_key} red on {red_node}, then green"));
    let from = b.mark();
    b.ports[red_mac].agent().set_red(&red_key, true);
    let red = b.wait_converged(from.at, Duration::from_secs(60));
    let mid = b.mark();
    let green_at = Instant::now();
    b.ports[red_mac].agent().set_red(&red_key, false);
    let green = b.wait_converged(green_at, Duration::from_secs(60));
    let to = b.mark();
    let mut s = b.scenario(
        "one model red, then green",
        &from,
        &to,
        green.map(|g| green_at.duration_since(from.at).as_secs_f64() + g),
    );
    let own = format!("{}/{}", red_key.namespace, red_key.name);
    let foreign: u64 = s
        .changed
        .iter()
        .filter(|(r, _)| r.as_str() != "events")
        .flat_map(|(_, names)| names.iter())
        .filter(|n| !n.starts_with(&own))
        .count() as u64;
    s.extra.push(("red seen (not ready, status) after".into(), secs(red)));
    s.extra.push(("green seen after".into(), secs(green)));
    s.extra.push((
        "objects changed in the red half".into(),
        b.changed_objects(&from, &mid).values().map(BTreeSet::len).sum::<usize>().to_string(),
    ));
    goals.push(Goal::count("red: objects changed other than the red model's", foreign, 0));
    goals.push(Goal::count("red and back: converged", u64::from(red.is_none() || green.is_none()), 0));
    scenarios.push(s);

    // 5. A spec change rolled across a model's replicas.
    let rolled = b
        .truth()
        .into_iter()
        .find(|(k, held)| held.len() == 3 && held.iter().all(|h| h.ready) && b.replicas.get(k) == Some(&3))
        .map(|(k, _)| k)
        .context("no model serves on three Macs")?;
    b.revive()?;
    b.settle(Duration::from_secs(30));
    b.progress(&format!("scenario: spec change of {rolled} (its engine's context size) across its 3 replicas"));
    let from = b.mark();
    let api = b.model_api(&rolled.namespace);
    b.driver
        .block_on(api.patch(
            &rolled.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"engine": {"contextSize": 8192}}})),
        ))
        .context("changing a MetalModel's spec")?;
    // Watch the roll: how many of its replicas restart at once (one at a time is the rule).
    let mut most_restarting = 0;
    let rolled_in = loop {
        let restarting = b.truth().get(&rolled).map_or(0, |held| held.iter().filter(|h| !h.ready).count());
        most_restarting = most_restarting.max(restarting);
        let v = b.check();
        if v.converged() && restarting == 0 {
            break Some(from.at.elapsed().as_secs_f64());
        }
        if from.at.elapsed() > Duration::from_secs(60) {
            b.progress(&format!("the spec change did not converge: {:?}", v.examples));
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let to = b.mark();
    let mut s = b.scenario("engine spec change rolled across 3 replicas", &from, &to, rolled_in);
    s.extra.push(("replicas restarting at once, at most".into(), most_restarting.to_string()));
    scenarios.push(s);
    goals.push(Goal::count(
        "spec change: serving replicas restarting at once beyond one",
        most_restarting.saturating_sub(1) as u64,
        0,
    ));
    goals.push(Goal::count("spec change: converged", u64::from(rolled_in.is_none()), 0));

    // 6. The leader killed with everything converged; a change made meanwhile must land.
    b.revive()?;
    b.wait_leader(Duration::from_secs(60))?;
    b.settle(Duration::from_secs(30));
    let leader = b.leader_index().context("no leader")?;
    let changed: Vec<ModelKey> = b
        .models
        .iter()
        .filter(|m| m.replicas == 1 && m.selector.is_empty() && m.bytes < (16 << 30))
        .take(10)
        .map(|m| m.key.clone())
        .collect();
    b.progress(&format!(
        "scenario: leader {} killed, {} models scaled to 2 meanwhile",
        b.controllers[leader].name,
        changed.len()
    ));
    let from = b.mark();
    b.killed.insert(b.controllers[leader].name.clone());
    b.controllers[leader].signal(nix::sys::signal::Signal::SIGKILL);
    let _ = b.controllers[leader].child.wait();
    b.patch_replicas(&changed, 2)?;
    let lease = b.args.lease_duration.as_secs_f64();
    let taken = time_until(from.at, Duration::from_secs(120), || {
        b.leader().is_some_and(|c| c.name != b.controllers[leader].name)
    });
    // Longer than the controller's reconcile time-out (120 s), so a reconcile cut short shows as a
    // time, not as a model that never converged.
    let failover = b.wait_converged(from.at, Duration::from_secs(300));
    let to = b.mark();
    let mut s = b.scenario("leader killed (SIGKILL)", &from, &to, failover);
    s.extra.push(("lease taken by the standby after".into(), secs(taken)));
    goals.push(Goal::time("failover converged", failover, lease + 5.0, &format!("≤ lease ({lease:.0} s) + 5 s")));
    goals.push(Goal::count("failover: converged", u64::from(failover.is_none()), 0));
    scenarios.push(s);

    // 7. The controller restarted cold: none running, a change made while it was down.
    b.revive()?;
    b.progress("scenario: cold restart");
    for c in &mut b.controllers {
        b.killed.insert(c.name.clone());
        if matches!(c.child.try_wait(), Ok(None)) {
            c.stop();
        }
    }
    b.patch_replicas(&changed, 1)?;
    let from = b.mark();
    b.start_controller()?;
    let cold = b.wait_converged(from.at, Duration::from_secs(300));
    let to = b.mark();
    scenarios.push(b.scenario("cold restart", &from, &to, cold));
    goals.push(Goal::count("cold restart: converged", u64::from(cold.is_none()), 0));

    b.revive()?;
    goals.push(Goal::count("controllers that exited on their own (a lost lease)", b.unexpected_exits.len() as u64, 0));
    let peak = scenarios.iter().map(|s| s.controller_peak_rss_mib).fold(0.0, f64::max);
    goals.push(Goal::at_most("controller peak RSS", peak, 150.0, " MiB"));

    let r = report::Report {
        name: b.args.name.clone(),
        agents: b.macs.len(),
        models: b.models.len(),
        replicas: b.models.iter().map(|m| m.replicas).sum(),
        machine: report::machine(),
        scenarios,
        goals,
        commands: b.commands.clone(),
    };
    let ok = r.write(&b.args.out)?;
    if b.args.keep {
        let kept = std::mem::replace(&mut b.dir, tempfile::tempdir()?).keep();
        eprintln!("fleet: kept {}", kept.display());
    }
    for c in &mut b.controllers {
        if matches!(c.child.try_wait(), Ok(None)) {
            c.stop();
        }
    }
    Ok(ok)
}

fn secs(t: Option<f64>) -> String {
    t.map_or_else(|| "never".to_owned(), |t| format!("{t:.1} s"))
}
