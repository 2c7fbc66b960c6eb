//! The `metalkube-agent` binary in standalone mode, as a user runs it: MetalModel YAML files in a
//! directory, edits picked up live, API keys from a secrets directory made after the start, and
//! no orphan engines after the agent itself is SIGKILLed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use support::{GUARD, is_running, processes_mentioning, signal};

struct AgentProc {
    child: Child,
    base: String,
}

impl Drop for AgentProc {
    /// SIGTERM, so the agent stops its engines even when a test fails half-way; SIGKILL only
    /// if it does not exit.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
            for _ in 0..100 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_agent(models: &Path, state: &Path) -> AgentProc {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_metalkube-agent"))
        .arg("run")
        .arg("--models-dir")
        .arg(models)
        .arg("--state-dir")
        .arg(state)
        .arg("--engine")
        .arg(metalkube_testkit::real_engine())
        .args(["--listen", &format!("127.0.0.1:{port}"), "--engine-ports", "21000-21999", "--backoff-min", "100ms"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    AgentProc { child, base: format!("http://127.0.0.1:{port}") }
}

/// Polls the agent's API: the agent is another process, so there is no event to await.
async fn wait_models(agent: &AgentProc, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + GUARD;
    let mut last = Vec::new();
    while tokio::time::Instant::now() < deadline {
        if let Ok(resp) = reqwest::get(format!("{}/api/v1/models", agent.base)).await
            && let Ok(body) = resp.json::<Value>().await
        {
            last = body["models"].as_array().cloned().unwrap_or_default();
            if pred(&last) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("agent: not {what} within {GUARD:?}; last: {last:#?}");
}

fn serving(models: &[Value], name: &str) -> Option<u32> {
    models
        .iter()
        .find(|m| m["name"] == name && m["phase"] == "Serving")
        .and_then(|m| m["pid"].as_u64())
        .map(|p| p as u32)
}

fn model_yaml(name: &str, model: &Path, interval: &str) -> String {
    format!(
        "apiVersion: metalkube.dev/v1alpha1\nkind: MetalModel\nmetadata: {{name: {name}}}\nspec:\n  model: {{source: 'file:{}'}}\n  engine: {{contextSize: 512, gpuLayers: 0, parallel: 2, startupTimeout: 60s, extraArgs: ['--threads', '1']}}\n  pulse: {{interval: {interval}, timeout: 2s, yellowAfter: 500ms, redAfter: 1s, redStreak: 2}}\n",
        model.file_name().unwrap().to_string_lossy()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_a_directory_follows_edits_and_leaves_no_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let model = metalkube_testkit::tiny_model(&models);
    let state = dir.path().join("state");
    std::fs::write(models.join("a.yaml"), model_yaml("alpha", &model, "300ms")).unwrap();

    let agent = start_agent(&models, &state);
    let list = wait_models(&agent, "serving alpha", |m| serving(m, "alpha").is_some()).await;
    let alpha = serving(&list, "alpha").unwrap();

    // A pulse-only edit is applied in place; a new file adds a model.
    std::fs::write(models.join("a.yaml"), model_yaml("alpha", &model, "500ms")).unwrap();
    std::fs::write(models.join("b.yaml"), model_yaml("beta", &model, "300ms")).unwrap();
    let list = wait_models(&agent, "serving beta", |m| serving(m, "beta").is_some()).await;
    assert_eq!(serving(&list, "alpha"), Some(alpha), "a pulse edit does not restart the engine");
    let beta = serving(&list, "beta").unwrap();

    // A broken edit keeps the model on its last good spec and says why.
    std::fs::write(models.join("b.yaml"), "kind: [").unwrap();
    let body: Value = loop {
        let body: Value = reqwest::get(format!("{}/api/v1/models", agent.base)).await.unwrap().json().await.unwrap();
        if body["sourceErrors"]["b.yaml"].is_string() {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(serving(body["models"].as_array().unwrap(), "beta"), Some(beta), "{body}");
    // Fixed again: same spec as before the typo, so the engine is untouched.
    std::fs::write(models.join("b.yaml"), model_yaml("beta", &model, "300ms")).unwrap();
    loop {
        let body: Value = reqwest::get(format!("{}/api/v1/models", agent.base)).await.unwrap().json().await.unwrap();
        if body["sourceErrors"].as_object().is_some_and(|e| e.is_empty()) {
            assert_eq!(serving(body["models"].as_array().unwrap(), "beta"), Some(beta), "{body}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The agent dies hard; its engines live on in their own process groups...
    let mut agent = agent;
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    assert!(is_running(alpha) && is_running(beta), "engines survive an agent crash");

    // ...until the next agent run finds them and replaces them.
    let agent = start_agent(&models, &state);
    let list = wait_models(&agent, "serving both again", |m| {
        serving(m, "alpha").is_some_and(|p| p != alpha) && serving(m, "beta").is_some_and(|p| p != beta)
    })
    .await;
    assert!(!is_running(alpha) && !is_running(beta), "the previous engines were stopped");
    let engines = processes_mentioning(&model);
    assert_eq!(engines.len(), 2, "exactly one engine per model: {engines:?} ({list:?})");

    // Deleting a file stops its model.
    let beta_now = serving(&list, "beta").unwrap();
    std::fs::remove_file(models.join("b.yaml")).unwrap();
    wait_models(&agent, "beta gone", |m| m.iter().all(|x| x["name"] != "beta")).await;
    assert!(!is_running(beta_now));

    // SIGTERM stops the agent and its engines.
    let alpha_now = serving(&wait_models(&agent, "alpha", |m| serving(m, "alpha").is_some()).await, "alpha").unwrap();
    let mut agent = agent;
    signal(agent.child.id(), Signal::SIGTERM);
    let status = agent.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!is_running(alpha_now), "engines stop with the agent");
}

/// What the serving port answers a chat request with this key (None: no key).
async fn status_with_key(port: u64, key: Option<&str>) -> u16 {
    let mut req = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .json(&serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}));
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    req.send().await.map(|r| r.status().as_u16()).unwrap_or(0)
}

/// Polls until the port answers `want` to `key`: key files are read on filesystem events.
async fn wait_status(port: u64, key: Option<&str>, want: u16) {
    let deadline = tokio::time::Instant::now() + GUARD;
    let mut last = 0;
    while tokio::time::Instant::now() < deadline {
        last = status_with_key(port, key).await;
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("key {key:?}: wanted {want}, last {last}");
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_written_after_the_start_guard_the_port() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let model = metalkube_testkit::tiny_model(&models);
    let yaml = format!("{}  auth: {{apiKeySecretRef: {{name: keys, key: keys}}}}\n", model_yaml("keyed", &model, "1s"));
    std::fs::write(models.join("k.yaml"), yaml).unwrap();
    let agent = start_agent(&models, &dir.path().join("state"));
    let list = wait_models(&agent, "serving keyed", |m| serving(m, "keyed").is_some()).await;
    let port = list.iter().find(|m| m["name"] == "keyed").and_then(|m| m["servingPort"].as_u64()).unwrap();
    // No secrets directory yet: nobody is let in (never everybody).
    assert_eq!(status_with_key(port, Some("k1")).await, 401);

    // The default secrets directory appears after the start, key file and all.
    let keys = models.join("secrets/keys");
    std::fs::create_dir_all(&keys).unwrap();
    std::fs::write(keys.join("keys"), "k1\n").unwrap();
    wait_status(port, Some("k1"), 200).await;
    assert_eq!(status_with_key(port, None).await, 401);

    // A rotation inside it is followed too.
    std::fs::write(keys.join("keys"), "k2\n").unwrap();
    wait_status(port, Some("k1"), 401).await;
    assert_eq!(status_with_key(port, Some("k2")).await, 200);
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// A standalone file gets the API server's name checks: a namespace that is a path and a
/// Secret reference that is an absolute path are refused by their field, and nothing is
/// written outside `--state-dir` (the namespace once put the engine's log and pidfile there).
#[tokio::test(flavor = "multi_thread")]
async fn names_that_are_paths_are_refused_and_nothing_is_written_outside_the_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let model = metalkube_testkit::tiny_model(&models);
    let state = dir.path().join("state");
    std::fs::write(models.join("a.yaml"), model_yaml("alpha", &model, "1s")).unwrap();
    let escaping = model_yaml("escape", &model, "1s").replace("{name: escape}", "{name: escape, namespace: ../../x}");
    std::fs::write(models.join("escape.yaml"), escaping).unwrap();
    let host_file =
        format!("{}  auth: {{apiKeySecretRef: {{name: /etc, key: hostname}}}}\n", model_yaml("keyed", &model, "1s"));
    std::fs::write(models.join("keyed.yaml"), host_file).unwrap();

    let agent = start_agent(&models, &state);
    let list = wait_models(&agent, "serving alpha", |m| serving(m, "alpha").is_some()).await;
    let names: Vec<_> = list.iter().map(|m| m["name"].as_str().unwrap_or_default()).collect();
    assert_eq!(names, ["alpha"], "{list:#?}");
    let body: Value = reqwest::get(format!("{}/api/v1/models", agent.base)).await.unwrap().json().await.unwrap();
    let errors = &body["sourceErrors"];
    let escape = errors["escape.yaml"].as_str().unwrap_or_default();
    assert!(
        escape.contains(
            "metadata.namespace: \"../../x\" holds '/' (a path separator) (allowed: 1 to 63 lowercase letters"
        ),
        "{body:#}"
    );
    let keyed = errors["keyed.yaml"].as_str().unwrap_or_default();
    assert!(
        keyed.contains("spec.auth.apiKeySecretRef.name: \"/etc\" holds '/' (a path separator) (allowed: 1 to 253"),
        "{body:#}"
    );
    for file in files_under(dir.path()) {
        assert!(file.starts_with(&models) || file.starts_with(&state), "written outside --state-dir: {file:?}");
    }
}
