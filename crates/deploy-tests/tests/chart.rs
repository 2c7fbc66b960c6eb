//! The Helm chart `charts/metalkube`: `helm lint --strict`, every rendered built-in object
//! against the Kubernetes schemas of the oldest supported and the newest available release,
//! ServiceMonitors and PrometheusRules against prometheus-operator's schemas, and the properties
//! the rest of metalkube relies on (CRDs in step with `crds/`, alerts and dashboard carried
//! verbatim, locked-down pods, no RBAC wildcards, TLS wiring, scrape labels, controller flags).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Ran, repo_root, run, succeed};
use metalkube_testkit::tools;
use serde_yaml::Value;

const RELEASE: &str = "mk";
const NAMESPACE: &str = "metalkube-system";
/// `include "metalkube.fullname"` for release "mk".
const FULLNAME: &str = "mk-metalkube";
/// The newest Kubernetes release whose schemas kubernetes-validate 1.37 bundles.
const NEWEST_KUBERNETES: &str = "1.37.0";

/// The default values with client TLS from existing Secrets, the controller's and the router's
/// (no generated CA, whose keys change on every render).
const DEFAULTS: &[&str] =
    &["--set", "tls.existingSecret=metalkube-tls", "--set", "router.tls.existingSecret=metalkube-router-tls"];
const ALL_ON: &[&str] = &["-f", "ci/all-on-values.yaml"];
const INSECURE: &[&str] = &["--set", "controller.insecure=true"];

fn chart_dir() -> PathBuf {
    repo_root().join("charts/metalkube")
}

fn helm() -> Command {
    let mut cmd = Command::new(tools::helm());
    // Relative -f paths (ci/...) resolve against the chart.
    cmd.current_dir(chart_dir());
    cmd
}

/// `helm template` of the chart (CRDs included) with `values`, whatever the outcome.
fn template(values: &[&str]) -> Ran {
    run(helm().args(["template", RELEASE, ".", "--namespace", NAMESPACE, "--include-crds"]).args(values))
}

/// One rendered document: its text exactly as helm printed it, and parsed.
struct Doc {
    text: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }
    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }
    fn api_version(&self) -> &str {
        self.value["apiVersion"].as_str().unwrap_or_default()
    }
}

struct Rendered {
    values: String,
    docs: Vec<Doc>,
}

impl Rendered {
    fn of_kind(&self, kind: &str) -> Vec<&Doc> {
        self.docs.iter().filter(|d| d.kind() == kind).collect()
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        let found: Vec<&Doc> = self.docs.iter().filter(|d| d.kind() == kind && d.name() == name).collect();
        assert_eq!(found.len(), 1, "expected one {kind} {name} rendered with {}, found {}", self.values, found.len());
        &found[0].value
    }

    fn deployment(&self) -> &Value {
        self.get("Deployment", FULLNAME)
    }

    fn container(&self) -> &Value {
        let containers = self.deployment()["spec"]["template"]["spec"]["containers"].as_sequence().unwrap();
        assert_eq!(containers.len(), 1, "the controller pod has one container");
        &containers[0]
    }

    fn args(&self) -> Vec<String> {
        self.container()["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect()
    }
}

/// Renders the chart and splits helm's output on its `---` separators.
fn render(values: &[&str]) -> Rendered {
    let ran = template(values);
    assert!(ran.status.success(), "helm template failed\n{}", ran.report());
    let mut docs = Vec::new();
    let mut chunk = String::new();
    for line in ran.stdout.lines().chain(std::iter::once("---")) {
        if line == "---" {
            let value: Value = serde_yaml::from_str(&chunk)
                .unwrap_or_else(|e| panic!("helm printed invalid YAML ({e}):\n{chunk}\n{}", ran.report()));
            if !value.is_null() {
                docs.push(Doc { text: std::mem::take(&mut chunk), value });
            }
            chunk.clear();
        } else {
            chunk.push_str(line);
            chunk.push('\n');
        }
    }
    assert!(!docs.is_empty(), "helm rendered nothing\n{}", ran.report());
    Rendered { values: values.join(" "), docs }
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str().unwrap_or_else(|| panic!("{what} is not a string: {v:?}"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence().map(|s| s.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

/// Where each apiVersion's schema comes from; an unknown group fails the test so nothing the
/// chart renders escapes validation.
#[derive(Debug, PartialEq)]
enum Schema {
    Kubernetes,
    PrometheusOperator,
    /// No schema tool is installed for cert-manager; its objects are checked field by field below.
    CertManager,
}

fn schema_of(api_version: &str) -> Schema {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    match group {
        "monitoring.coreos.com" => Schema::PrometheusOperator,
        "cert-manager.io" => Schema::CertManager,
        g if !g.contains('.') || g.ends_with(".k8s.io") => Schema::Kubernetes,
        other => panic!("apiVersion {api_version}: group {other} has no known schema; add it to the tests"),
    }
}

fn write_tmp(name: &str, text: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The oldest Kubernetes release the chart supports, from Chart.yaml's `kubeVersion: ">=X.Y.Z-0"`.
fn oldest_kubernetes() -> String {
    let chart: Value = serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap()).unwrap();
    let constraint = str_of(&chart["kubeVersion"], "kubeVersion");
    let version = constraint.strip_prefix(">=").and_then(|v| v.strip_suffix("-0"));
    version.unwrap_or_else(|| panic!("kubeVersion {constraint:?} is not of the form >=X.Y.Z-0")).to_owned()
}

// ---------------------------------------------------------------------------------------------
// helm lint and values

#[test]
fn helm_lint_strict_passes_for_defaults_and_every_ci_values_file() {
    let mut value_sets: Vec<Vec<String>> = vec![DEFAULTS.iter().map(|s| s.to_string()).collect()];
    let mut ci_files: Vec<PathBuf> =
        std::fs::read_dir(chart_dir().join("ci")).unwrap().map(|e| e.unwrap().path()).collect();
    ci_files.sort();
    assert!(ci_files.len() >= 2, "expected ci/all-on-values.yaml and ci/existing-secret-values.yaml");
    for file in ci_files {
        value_sets.push(vec!["-f".into(), format!("ci/{}", file.file_name().unwrap().to_string_lossy())]);
    }
    for values in value_sets {
        let ran = succeed(helm().args(["lint", "--strict", ".", "--namespace", NAMESPACE]).args(&values));
        assert!(ran.stdout.contains("1 chart(s) linted, 0 chart(s) failed"), "lint did not pass\n{}", ran.report());
        assert!(!ran.output().contains("[WARNING]"), "lint warned\n{}", ran.report());
    }
}

#[test]
fn values_schema_rejects_misspelt_and_invalid_settings() {
    for (setting, complaint) in [
        ("controller.replica=2", "replica"),
        ("serviceMonitor.agents.discoveryRole=Pods", "discoveryRole"),
        ("controller.gracePeriod=soon", "gracePeriod"),
        ("tls.existingSecretName=x", "existingSecretName"),
        ("serviceMonitor.agents.scheme=ftp", "scheme"),
        ("serviceMonitor.agents.tls.ca=x", "ca"),
    ] {
        let ran = run(helm().args(["lint", "--strict", "."]).args(DEFAULTS).args(["--set", setting]));
        assert!(!ran.status.success(), "--set {setting} should fail the values schema\n{}", ran.report());
        assert!(ran.output().contains(complaint), "the error should name {complaint}\n{}", ran.report());
    }
}

#[test]
fn tls_sources_that_contradict_or_are_all_off_fail_naming_the_options() {
    let ran = template(&["--set", "tls.generated.enabled=false"]);
    assert!(!ran.status.success(), "rendering without any TLS source must fail\n{}", ran.report());
    for option in ["tls.generated.enabled", "tls.existingSecret", "certManager.enabled", "controller.insecure"] {
        assert!(ran.stderr.contains(option), "the error should name {option}\n{}", ran.report());
    }
    let both = template(&["--set", "tls.existingSecret=x", "--set", "certManager.enabled=true"]);
    assert!(!both.status.success(), "two TLS sources must fail\n{}", both.report());
    let contradiction = template(&["--set", "tls.existingSecret=x", "--set", "controller.insecure=true"]);
    assert!(!contradiction.status.success(), "insecure plus a TLS Secret must fail\n{}", contradiction.report());
}

// ---------------------------------------------------------------------------------------------
// schemas

#[test]
fn rendered_builtin_objects_pass_kubernetes_schemas_oldest_and_newest() {
    let oldest = oldest_kubernetes();
    for (label, values) in
        [("defaults", DEFAULTS), ("all-on", ALL_ON), ("insecure", INSECURE), ("generated-ca", &[][..])]
    {
        let rendered = render(values);
        let builtin: Vec<&Doc> =
            rendered.docs.iter().filter(|d| schema_of(d.api_version()) == Schema::Kubernetes).collect();
        let kinds: BTreeSet<&str> = builtin.iter().map(|d| d.kind()).collect();
        for expected in ["CustomResourceDefinition", "Deployment", "Service", "ServiceAccount", "ClusterRole", "Role"] {
            assert!(kinds.contains(expected), "{label}: no {expected} among {kinds:?}");
        }
        let text: String = builtin.iter().map(|d| format!("---\n{}", d.text)).collect();
        let file = write_tmp(&format!("builtin-{label}.yaml"), &text);
        let ran = run(Command::new(tools::kubernetes_validate())
            .args(["--strict", "--quiet", "-k", &oldest, "-k", NEWEST_KUBERNETES])
            .arg(&file));
        assert!(ran.status.success(), "{label}: kubernetes-validate failed\n{}", ran.report());
        // A WARN means a kind it has no schema for was skipped, i.e. not validated.
        assert!(ran.output().trim().is_empty(), "{label}: kubernetes-validate printed findings\n{}", ran.report());
    }
}

fn validate_monitoring(file: &Path) -> Ran {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("validate-monitoring.mjs");
    run(Command::new("node").arg(script).arg(tools::node_modules()).arg(file))
}

#[test]
fn servicemonitors_and_prometheusrule_pass_prometheus_operator_schemas() {
    for (label, values) in [
        ("all-on", ALL_ON),
        (
            "agents-endpoints-role",
            &["-f", "ci/all-on-values.yaml", "--set", "serviceMonitor.agents.discoveryRole=Endpoints"][..],
        ),
    ] {
        let rendered = render(values);
        let monitoring: Vec<&Doc> =
            rendered.docs.iter().filter(|d| schema_of(d.api_version()) == Schema::PrometheusOperator).collect();
        let kinds: Vec<&str> = monitoring.iter().map(|d| d.kind()).collect();
        // The controller's, the agents' and the router's.
        assert_eq!(kinds.iter().filter(|k| **k == "ServiceMonitor").count(), 3, "{label}: {kinds:?}");
        assert_eq!(kinds.iter().filter(|k| **k == "PrometheusRule").count(), 1, "{label}: {kinds:?}");
        let text: String = monitoring.iter().map(|d| format!("---\n{}", d.text)).collect();
        let ran = validate_monitoring(&write_tmp(&format!("monitoring-{label}.yaml"), &text));
        assert!(ran.status.success(), "{label}: prometheus-operator schema validation failed\n{}", ran.report());
        let ok = ran.stdout.lines().filter(|l| l.starts_with("OK ")).count();
        assert_eq!(ok, monitoring.len(), "{label}: every document should be reported OK\n{}", ran.report());
    }
}

#[test]
fn monitoring_validator_fails_invalid_and_unknown_documents() {
    let bad = "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata:\n  name: broken\n\
               spec:\n  endpoints:\n    - port: http-metrics\n      interval: soon\n\
               ---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: unknown\n";
    let ran = validate_monitoring(&write_tmp("monitoring-bad.yaml", bad));
    assert!(!ran.status.success(), "invalid documents must fail\n{}", ran.report());
    assert!(ran.stdout.contains("FAIL ServiceMonitor/broken"), "{}", ran.report());
    assert!(ran.stdout.contains("FAIL ConfigMap/unknown"), "{}", ran.report());
    let empty = validate_monitoring(&write_tmp("monitoring-empty.yaml", "# nothing\n"));
    assert!(!empty.status.success(), "a file with no documents must fail\n{}", empty.report());
}

// ---------------------------------------------------------------------------------------------
// what the chart carries verbatim

#[test]
fn chart_crds_are_byte_identical_to_the_top_level_crds() {
    let names = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
    };
    let top = repo_root().join("crds");
    let chart = chart_dir().join("crds");
    assert_eq!(names(&top), names(&chart), "chart crds/ and top-level crds/ hold different files");
    let rendered = render(DEFAULTS);
    for name in names(&top) {
        let expected = std::fs::read_to_string(top.join(&name)).unwrap();
        let copy = std::fs::read_to_string(chart.join(&name)).unwrap();
        assert!(copy == expected, "charts/metalkube/crds/{name} differs from crds/{name}");
        // helm prints each CRD file after a "# Source:" line, unchanged.
        let source = format!("# Source: metalkube/crds/{name}\n");
        let doc = rendered
            .docs
            .iter()
            .find(|d| d.text.starts_with(&source))
            .unwrap_or_else(|| panic!("helm template --include-crds did not print crds/{name}"));
        // helm 3 ends the document with one newline of its own after the file's content.
        let printed = &doc.text[source.len()..];
        assert!(
            printed == expected || printed.strip_suffix('\n') == Some(expected.as_str()),
            "rendered crds/{name} differs from the file"
        );
    }
}

#[test]
fn prometheusrule_carries_alerts_yaml_with_prometheus_templates_intact() {
    let source = std::fs::read_to_string(chart_dir().join("files/alerts.yaml")).unwrap();
    let alerts: Value = serde_yaml::from_str(&source).unwrap();
    let rendered = render(ALL_ON);
    let rule = rendered.get("PrometheusRule", FULLNAME);
    assert_eq!(rule["spec"], alerts, "the PrometheusRule spec differs from files/alerts.yaml");
    assert!(!alerts["groups"].as_sequence().unwrap().is_empty(), "files/alerts.yaml has no groups");
    assert_eq!(rule["metadata"]["labels"]["release"], "kube-prometheus-stack", "prometheusRule.labels");

    // Helm must not have expanded the alerts' own templates.
    let annotations: Vec<&str> = rule["spec"]["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap())
        .flat_map(|r| r["annotations"].as_mapping().into_iter().flat_map(|m| m.values()))
        .filter_map(Value::as_str)
        .collect();
    assert!(
        annotations.iter().any(|a| a.contains("{{ $labels.model }}")),
        "no annotation keeps {{{{ $labels.model }}}}: {annotations:#?}"
    );
}

#[test]
fn prometheusrule_points_each_alert_at_its_runbook_under_the_configured_base() {
    let rendered = render(
        &[ALL_ON, &["--set", "prometheusRule.runbookBaseUrl=https://wiki.example/metalkube/runbooks/"]].concat(),
    );
    let rule = rendered.get("PrometheusRule", FULLNAME);
    let mut alerts = 0;
    for r in rule["spec"]["groups"].as_sequence().unwrap().iter().flat_map(|g| g["rules"].as_sequence().unwrap()) {
        let Some(alert) = r["alert"].as_str() else { continue };
        alerts += 1;
        assert_eq!(
            r["annotations"]["runbook_url"].as_str(),
            Some(format!("https://wiki.example/metalkube/runbooks/{alert}.md").as_str()),
            "{alert}"
        );
    }
    assert!(alerts > 20, "only {alerts} alerts rendered");
}

/// One version number for everything: the chart's `version` and `appVersion` (the default
/// image tag) are the crates' (the workspace's), so a controller image and the agents built from
/// the same tag are the versions that are supported together (CHANGELOG.md).
#[test]
fn the_chart_version_and_app_version_are_the_crates_version() {
    let chart: Value = serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap()).unwrap();
    let crates = env!("CARGO_PKG_VERSION");
    assert_eq!(chart["version"].as_str(), Some(crates), "Chart.yaml version");
    assert_eq!(chart["appVersion"].as_str(), Some(crates), "Chart.yaml appVersion");
    let changelog = std::fs::read_to_string(repo_root().join("CHANGELOG.md")).unwrap();
    assert!(
        changelog.contains("## [Unreleased]") || changelog.contains(&format!("## [{crates}]")),
        "CHANGELOG.md has neither an Unreleased section nor one for {crates}"
    );
}

#[test]
fn dashboard_configmap_holds_the_dashboard_file_verbatim() {
    let file = std::fs::read_to_string(chart_dir().join("dashboards/metalkube.json")).unwrap();
    let rendered = render(ALL_ON);
    let cm = rendered.get("ConfigMap", &format!("{FULLNAME}-dashboard"));
    let data = str_of(&cm["data"]["metalkube.json"], "data.metalkube.json");
    assert!(data == file, "the ConfigMap's metalkube.json differs from dashboards/metalkube.json");
    let dashboard: serde_json::Value = serde_json::from_str(data).expect("the dashboard is valid JSON");
    assert_eq!(dashboard["uid"], "metalkube");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1", "the Grafana sidecar's label");
    assert_eq!(cm["metadata"]["namespace"], "monitoring", "dashboards.namespace");
    assert_eq!(cm["metadata"]["annotations"]["grafana_folder"], "metalkube", "dashboards.annotations");
    assert!(render(DEFAULTS).of_kind("ConfigMap").is_empty(), "dashboards are off by default");
}

// ---------------------------------------------------------------------------------------------
// the controller Deployment

#[test]
fn controller_pods_run_locked_down() {
    for values in [DEFAULTS, ALL_ON, INSECURE] {
        let rendered = render(values);
        let pod = &rendered.deployment()["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{}", rendered.values);
        assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault", "{}", rendered.values);
        for forbidden in ["hostNetwork", "hostPID", "hostIPC"] {
            assert!(pod[forbidden].is_null(), "{forbidden} set with {}", rendered.values);
        }
        let sc = &rendered.container()["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{}", rendered.values);
        assert_eq!(sc["runAsUser"], 65532, "the distroless nonroot user, {}", rendered.values);
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{}", rendered.values);
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{}", rendered.values);
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{}", rendered.values);
        assert!(sc["capabilities"]["add"].is_null(), "{}", rendered.values);
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{}", rendered.values);
        assert_ne!(sc["privileged"], true, "{}", rendered.values);
    }
}

#[test]
fn liveness_on_healthz_readiness_on_readyz() {
    let rendered = render(DEFAULTS);
    assert_eq!(rendered.deployment()["spec"]["replicas"], 2, "two replicas behind the Lease by default");
    let container = rendered.container();
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], "http-metrics", "{probe}");
    }
    let pdb = rendered.get("PodDisruptionBudget", FULLNAME);
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], rendered.deployment()["spec"]["selector"]["matchLabels"]);
}

#[test]
fn controller_gets_its_namespace_identity_and_log_level_from_the_pod() {
    let rendered = render(ALL_ON);
    let env = rendered.container()["env"].as_sequence().unwrap();
    let field = |name: &str| -> String {
        let var = env.iter().find(|e| e["name"] == name).unwrap_or_else(|| panic!("no env {name}: {env:?}"));
        str_of(&var["valueFrom"]["fieldRef"]["fieldPath"], name).to_owned()
    };
    assert_eq!(field("POD_NAMESPACE"), "metadata.namespace");
    assert_eq!(field("POD_NAME"), "metadata.name");
    let rust_log = env.iter().find(|e| e["name"] == "RUST_LOG").expect("RUST_LOG");
    assert_eq!(rust_log["value"], "info,metalkube_controller=debug", "controller.logLevel");
    assert_eq!(rendered.container()["image"], "ghcr.io/metalkube/metalkube-controller:0.1.0-test");
    let defaults = render(DEFAULTS);
    assert_eq!(
        defaults.container()["image"],
        "ghcr.io/metalkube/metalkube-controller:0.1.0",
        "tag defaults to appVersion"
    );
}

/// The long flags `metalkube-controller` declares, read from its clap `Args` struct.
fn declared_controller_flags() -> BTreeSet<String> {
    let main = std::fs::read_to_string(repo_root().join("crates/controller/src/main.rs")).unwrap();
    let body = main.split_once("struct Args {").expect("struct Args in the controller's main.rs").1;
    let body = body.split_once("\n}").expect("end of struct Args").0;
    let mut flags = BTreeSet::new();
    let mut long = false;
    for line in body.lines().map(str::trim) {
        if line.starts_with("#[arg(") {
            long = line.contains("long");
        } else if let Some((field, _)) = line.split_once(':').filter(|_| !line.starts_with("//")) {
            if long && field.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                flags.insert(format!("--{}", field.replace('_', "-")));
            }
            long = false;
        }
    }
    assert!(flags.contains("--listen"), "could not read the controller's flags: {flags:?}");
    flags
}

#[test]
fn chart_passes_only_flags_the_controller_declares_each_once() {
    let declared = declared_controller_flags();
    let main = std::fs::read_to_string(repo_root().join("crates/controller/src/main.rs")).unwrap();
    for env in ["POD_NAMESPACE", "POD_NAME"] {
        assert!(main.contains(&format!("env = \"{env}\"")), "the controller no longer reads {env}");
    }
    for values in [DEFAULTS, ALL_ON, INSECURE] {
        let rendered = render(values);
        let mut seen = BTreeSet::new();
        for arg in rendered.args() {
            let flag = arg.split_once('=').map_or(arg.as_str(), |(f, _)| f).to_owned();
            assert!(
                declared.contains(&flag),
                "{}: the controller has no flag {flag} (it has {declared:?})",
                rendered.values
            );
            assert!(seen.insert(flag.clone()), "{}: {flag} passed twice", rendered.values);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TLS

fn tls_volume_secret(rendered: &Rendered) -> Option<String> {
    let pod = &rendered.deployment()["spec"]["template"]["spec"];
    let volumes = pod["volumes"].as_sequence()?;
    let tls = volumes.iter().find(|v| v["name"] == "tls")?;
    Some(str_of(&tls["secret"]["secretName"], "tls secretName").to_owned())
}

fn assert_tls_mounted(rendered: &Rendered, secret: &str) {
    assert_eq!(tls_volume_secret(rendered).as_deref(), Some(secret), "{}", rendered.values);
    let mounts = rendered.container()["volumeMounts"].as_sequence().unwrap();
    let mount = mounts.iter().find(|m| m["name"] == "tls").expect("tls volumeMount");
    assert_eq!(mount["mountPath"], "/etc/metalkube/tls");
    assert_eq!(mount["readOnly"], true);
    assert!(mount["subPath"].is_null(), "subPath mounts never see renewed certificates");
    let args = rendered.args();
    for expected in [
        "--agent-ca=/etc/metalkube/tls/ca.crt",
        "--client-cert=/etc/metalkube/tls/tls.crt",
        "--client-key=/etc/metalkube/tls/tls.key",
    ] {
        assert!(args.iter().any(|a| a == expected), "{}: missing {expected} in {args:?}", rendered.values);
    }
    assert!(!args.iter().any(|a| a == "--insecure"), "{}", rendered.values);
}

#[test]
fn existing_secret_is_mounted_for_client_tls() {
    let rendered = render(&["-f", "ci/existing-secret-values.yaml"]);
    assert_tls_mounted(&rendered, "metalkube-controller-tls");
    assert!(rendered.docs.iter().all(|d| schema_of(d.api_version()) != Schema::CertManager));
}

#[test]
fn insecure_mode_passes_the_flag_and_mounts_nothing() {
    let rendered = render(INSECURE);
    assert!(rendered.args().iter().any(|a| a == "--insecure"));
    assert!(!rendered.args().iter().any(|a| a.starts_with("--agent-ca") || a.starts_with("--client-")));
    assert_eq!(tls_volume_secret(&rendered), None);
}

#[test]
fn cert_manager_makes_a_ca_and_a_client_certificate_that_the_controller_mounts() {
    let rendered = render(ALL_ON);
    let selfsigned = rendered.get("Issuer", &format!("{FULLNAME}-selfsigned"));
    assert!(selfsigned["spec"]["selfSigned"].is_mapping());

    let ca = rendered.get("Certificate", &format!("{FULLNAME}-ca"));
    assert_eq!(ca["spec"]["isCA"], true);
    assert_eq!(ca["spec"]["secretName"], format!("{FULLNAME}-ca").as_str());
    assert_eq!(ca["spec"]["privateKey"]["algorithm"], "ECDSA");
    assert_eq!(ca["spec"]["privateKey"]["size"], 256);
    assert_eq!(ca["spec"]["issuerRef"]["name"], format!("{FULLNAME}-selfsigned").as_str());

    let ca_issuer = rendered.get("Issuer", &format!("{FULLNAME}-ca"));
    assert_eq!(ca_issuer["spec"]["ca"]["secretName"], ca["spec"]["secretName"]);

    let client = rendered.get("Certificate", &format!("{FULLNAME}-client"));
    assert_eq!(client["spec"]["commonName"], "metalkube-controller");
    let usages: BTreeSet<&str> = strings(&client["spec"]["usages"]).into_iter().collect();
    assert_eq!(usages, BTreeSet::from(["client auth", "digital signature"]));
    assert_eq!(client["spec"]["duration"], "720h", "certManager.duration");
    assert_eq!(client["spec"]["renewBefore"], "240h", "certManager.renewBefore");
    assert_eq!(client["spec"]["issuerRef"]["name"], format!("{FULLNAME}-ca").as_str());
    assert_eq!(client["spec"]["issuerRef"]["kind"], "Issuer");
    let secret = str_of(&client["spec"]["secretName"], "client secretName");
    assert_eq!(secret, format!("{FULLNAME}-client-tls"));
    assert_tls_mounted(&rendered, secret);

    let kinds: BTreeSet<&str> = rendered
        .docs
        .iter()
        .filter(|d| schema_of(d.api_version()) == Schema::CertManager)
        .map(|d| {
            assert_eq!(d.api_version(), "cert-manager.io/v1", "{}", d.text);
            d.kind()
        })
        .collect();
    assert_eq!(kinds, BTreeSet::from(["Certificate", "Issuer"]));
}

#[test]
fn cert_manager_with_an_issuer_ref_issues_only_the_client_certificate() {
    let rendered = render(&[
        "--set",
        "certManager.enabled=true",
        "--set",
        "certManager.issuerRef.name=corp-ca",
        "--set",
        "certManager.issuerRef.kind=ClusterIssuer",
    ]);
    assert!(rendered.of_kind("Issuer").is_empty(), "no generated CA with an issuerRef");
    let certificates = rendered.of_kind("Certificate");
    let names: BTreeSet<&str> = certificates.iter().map(|c| c.name()).collect();
    assert_eq!(names, BTreeSet::from([format!("{FULLNAME}-client").as_str(), format!("{FULLNAME}-router").as_str()]));
    for certificate in certificates {
        let client = &certificate.value;
        assert_eq!(client["spec"]["issuerRef"]["name"], "corp-ca");
        assert_eq!(client["spec"]["issuerRef"]["kind"], "ClusterIssuer");
        assert_eq!(client["spec"]["issuerRef"]["group"], "cert-manager.io");
    }
    assert_tls_mounted(&rendered, &format!("{FULLNAME}-client-tls"));
}

// ---------------------------------------------------------------------------------------------
// RBAC

fn print_rules(kind: &str, role: &Value) {
    println!("{kind} {}:", role["metadata"]["name"].as_str().unwrap_or_default());
    for rule in role["rules"].as_sequence().unwrap() {
        println!(
            "  apiGroups {:?} resources {:?} verbs {:?}",
            strings(&rule["apiGroups"]),
            strings(&rule["resources"]),
            strings(&rule["verbs"])
        );
    }
}

#[test]
fn rbac_grants_named_resources_and_verbs_only() {
    let rendered = render(ALL_ON);
    let cluster_role = rendered.get("ClusterRole", FULLNAME);
    let role = rendered.get("Role", FULLNAME);
    assert_eq!(role["metadata"]["namespace"], NAMESPACE);
    for (kind, r) in [("ClusterRole", cluster_role), ("Role", role)] {
        print_rules(kind, r);
        let rules = r["rules"].as_sequence().unwrap();
        assert!(!rules.is_empty(), "{kind} has no rules");
        for rule in rules {
            for field in ["apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"] {
                assert!(
                    !strings(&rule[field]).iter().any(|s| s.contains('*')),
                    "{kind}: wildcard in {field}: {rule:?}"
                );
            }
            // One resource per rule, so each grant maps to the requests that need it.
            assert_eq!(strings(&rule["apiGroups"]).len(), 1, "{kind}: {rule:?}");
            assert_eq!(strings(&rule["resources"]).len(), 1, "{kind}: {rule:?}");
            assert!(!strings(&rule["verbs"]).is_empty(), "{kind}: {rule:?}");
        }
    }
    let sa = rendered.get("ServiceAccount", FULLNAME);
    assert_eq!(sa["automountServiceAccountToken"], true);
    for (kind, role_kind) in [("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")] {
        let binding = rendered.get(kind, FULLNAME);
        assert_eq!(binding["roleRef"]["kind"], role_kind);
        assert_eq!(binding["roleRef"]["name"], FULLNAME);
        let subjects = binding["subjects"].as_sequence().unwrap();
        assert_eq!(subjects.len(), 1);
        assert_eq!(subjects[0]["kind"], "ServiceAccount");
        assert_eq!(subjects[0]["name"], FULLNAME);
        assert_eq!(subjects[0]["namespace"], NAMESPACE);
    }
    let pod = &rendered.deployment()["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], FULLNAME);
}

// ---------------------------------------------------------------------------------------------
// scraping

#[test]
fn controller_servicemonitor_finds_the_metrics_service_with_a_fixed_job_name() {
    let rendered = render(ALL_ON);
    let service = rendered.get("Service", &format!("{FULLNAME}-metrics"));
    let monitor = rendered.get("ServiceMonitor", &format!("{FULLNAME}-controller"));
    assert_eq!(monitor["spec"]["jobLabel"], "app.kubernetes.io/name");
    assert_eq!(service["metadata"]["labels"]["app.kubernetes.io/name"], "metalkube-controller", "job label value");
    for (key, value) in monitor["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(&service["metadata"]["labels"][key.as_str().unwrap()], value, "selector label {key:?}");
    }
    assert_eq!(strings(&monitor["spec"]["namespaceSelector"]["matchNames"]), [NAMESPACE]);
    assert_eq!(monitor["metadata"]["labels"]["release"], "kube-prometheus-stack", "serviceMonitor.labels");
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], "http-metrics");
    assert_eq!(endpoint["path"], "/metrics");
    let port = &service["spec"]["ports"][0];
    assert_eq!(port["name"], "http-metrics");
    assert_eq!(port["targetPort"], "http-metrics");
    assert_eq!(rendered.container()["ports"][0]["name"], "http-metrics");
    for (key, value) in service["spec"]["selector"].as_mapping().unwrap() {
        let pod_labels = &rendered.deployment()["spec"]["template"]["metadata"]["labels"];
        assert_eq!(&pod_labels[key.as_str().unwrap()], value, "Service selector {key:?} does not match the pods");
    }
}

#[test]
fn agents_servicemonitor_names_each_target_after_its_metalnode_under_either_discovery_role() {
    let rendered = render(ALL_ON);
    let monitor = rendered.get("ServiceMonitor", &format!("{FULLNAME}-agents"));
    let spec = &monitor["spec"];
    assert_eq!(spec["serviceDiscoveryRole"], "EndpointSlice", "serviceMonitor.agents.discoveryRole");
    assert_eq!(spec["jobLabel"], "app.kubernetes.io/name", "job=metalkube-agents from the Service's label");
    assert_eq!(spec["selector"]["matchLabels"]["app.kubernetes.io/name"], "metalkube-agents");
    assert_eq!(spec["selector"]["matchLabels"]["app.kubernetes.io/managed-by"], "metalkube-controller");
    // The controller names and labels the Service after --agents-service.
    assert!(rendered.args().iter().any(|a| a == "--agents-service=metalkube-agents"), "{:?}", rendered.args());
    assert_eq!(strings(&spec["namespaceSelector"]["matchNames"]), [NAMESPACE]);
    let endpoints = spec["endpoints"].as_sequence().unwrap();
    assert_eq!(endpoints.len(), 1);
    let endpoint = &endpoints[0];
    assert_eq!(endpoint["port"], "http-metrics");
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(endpoint["interval"], "15s");

    let relabelings = endpoint["relabelings"].as_sequence().unwrap();
    let sources: Vec<Vec<&str>> = relabelings.iter().map(|r| strings(&r["sourceLabels"])).collect();
    assert_eq!(
        sources,
        [["__meta_kubernetes_endpoint_address_target_name"], ["__meta_kubernetes_endpointslice_address_target_name"]]
    );
    for relabeling in relabelings {
        assert_eq!(relabeling["targetLabel"], "node");
        // An absent (empty) source must not overwrite what the other role set.
        assert_eq!(relabeling["regex"], "(.+)");
        assert_eq!(relabeling["replacement"], "$1");
        assert_eq!(relabeling["action"], "replace");
    }
    // Unreachable Macs stay targets (up == 0 drives the agent-down alert): nothing filters on readiness.
    let text = serde_yaml::to_string(monitor).unwrap();
    assert!(!text.contains("ready"), "the agents ServiceMonitor filters on readiness:\n{text}");

    let default_role = render(&["-f", "ci/all-on-values.yaml", "--set", "serviceMonitor.agents.discoveryRole="]);
    let monitor = default_role.get("ServiceMonitor", &format!("{FULLNAME}-agents"));
    assert!(monitor["spec"]["serviceDiscoveryRole"].is_null(), "unset role: the Prometheus' own setting");

    let agents_off = render(&["-f", "ci/all-on-values.yaml", "--set", "serviceMonitor.agents.enabled=false"]);
    let names: Vec<&str> = agents_off.of_kind("ServiceMonitor").iter().map(|d| d.name()).collect();
    assert_eq!(
        names,
        [format!("{FULLNAME}-controller"), format!("{FULLNAME}-router")],
        "the controller's and the router's"
    );
}

/// The agents' scrape endpoint: plain HTTP by default; with scheme https, the metalkube CA to
/// check each agent's certificate and the scraper's credentials (a client certificate, a bearer
/// token); credentials over plain HTTP, or https without a CA, fail rendering naming the values.
#[test]
fn agents_servicemonitor_carries_the_scheme_ca_and_scraper_credentials() {
    let endpoint = |values: &[&str]| -> Value {
        let mut args = vec!["--set", "serviceMonitor.enabled=true"];
        args.extend_from_slice(values);
        let rendered = render(&args);
        rendered.get("ServiceMonitor", &format!("{FULLNAME}-agents"))["spec"]["endpoints"][0].clone()
    };
    let plain = endpoint(DEFAULTS);
    assert_eq!(plain["scheme"], "http");
    assert!(plain["tlsConfig"].is_null() && plain["authorization"].is_null(), "{plain:?}");

    let https = endpoint(&[
        "--set",
        "tls.existingSecret=metalkube-tls",
        "--set",
        "router.tls.existingSecret=metalkube-router-tls",
        "--set",
        "serviceMonitor.agents.scheme=https",
        "--set",
        "serviceMonitor.agents.tls.clientCertSecret=prom-client",
        "--set",
        "serviceMonitor.agents.bearerTokenSecret.name=prom-token",
    ]);
    assert_eq!(https["scheme"], "https");
    let tls = &https["tlsConfig"];
    assert_eq!(tls["ca"]["secret"]["name"], "metalkube-tls", "the controller's Secret holds the CA: {tls:?}");
    assert_eq!(tls["ca"]["secret"]["key"], "ca.crt");
    assert_eq!(tls["cert"]["secret"]["name"], "prom-client");
    assert_eq!(tls["cert"]["secret"]["key"], "tls.crt");
    assert_eq!(tls["keySecret"]["name"], "prom-client");
    assert_eq!(tls["keySecret"]["key"], "tls.key");
    assert!(tls["insecureSkipVerify"].is_null(), "certificates are verified: {tls:?}");
    assert_eq!(https["authorization"]["type"], "Bearer");
    assert_eq!(https["authorization"]["credentials"]["name"], "prom-token");
    assert_eq!(https["authorization"]["credentials"]["key"], "token");

    let generated = endpoint(&["--set", "serviceMonitor.agents.scheme=https"]);
    assert_eq!(generated["tlsConfig"]["ca"]["secret"]["name"], format!("{FULLNAME}-client-tls").as_str());
    let own_ca = endpoint(&[
        "--set",
        "controller.insecure=true",
        "--set",
        "serviceMonitor.agents.scheme=https",
        "--set",
        "serviceMonitor.agents.tls.caSecret=agents-ca",
    ]);
    assert_eq!(own_ca["tlsConfig"]["ca"]["secret"]["name"], "agents-ca");
    assert!(own_ca["tlsConfig"]["cert"].is_null() && own_ca["authorization"].is_null(), "{own_ca:?}");

    for (values, names) in [
        (
            &["--set", "serviceMonitor.agents.bearerTokenSecret.name=prom-token"][..],
            &["serviceMonitor.agents.scheme=https", "--http-tls"][..],
        ),
        (
            &["--set", "serviceMonitor.agents.tls.clientCertSecret=prom-client"][..],
            &["serviceMonitor.agents.scheme"][..],
        ),
        (
            &["--set", "controller.insecure=true", "--set", "serviceMonitor.agents.scheme=https"][..],
            &["serviceMonitor.agents.tls.caSecret"][..],
        ),
    ] {
        let ran = template(&[&["--set", "serviceMonitor.enabled=true"][..], values].concat());
        assert!(!ran.status.success(), "{values:?} must fail rendering\n{}", ran.report());
        for name in names {
            assert!(ran.stderr.contains(name), "the error should name {name}\n{}", ran.report());
        }
    }
}

#[test]
fn optional_monitoring_objects_are_off_by_default() {
    let rendered = render(DEFAULTS);
    let kinds: BTreeSet<&str> = rendered.docs.iter().map(Doc::kind).collect();
    for absent in ["ServiceMonitor", "PrometheusRule", "ConfigMap", "Certificate", "Issuer"] {
        assert!(!kinds.contains(absent), "{absent} rendered by default: {kinds:?}");
    }
}

/// The Secrets of the chart's own CA, decoded.
fn secret_data(rendered: &Rendered, name: &str) -> BTreeMap<String, Vec<u8>> {
    let secret = rendered.get("Secret", name);
    assert_eq!(secret["type"], "kubernetes.io/tls", "{name}");
    let data = secret["data"].as_mapping().unwrap_or_else(|| panic!("{name} has no data"));
    data.iter()
        .map(|(k, v)| {
            let key = k.as_str().unwrap().to_owned();
            let value = serde_json::from_value::<k8s_openapi::ByteString>(serde_json::Value::String(
                v.as_str().unwrap().to_owned(),
            ))
            .unwrap_or_else(|e| panic!("{name}.{key} is not base64: {e}"));
            (key, value.0)
        })
        .collect()
}

#[test]
fn by_default_the_chart_makes_a_ca_that_signs_the_controller_client_certificate() {
    let rendered = render(&[]);
    let ca_name = format!("{FULLNAME}-ca");
    let ca = secret_data(&rendered, &ca_name);
    assert_eq!(ca.keys().map(String::as_str).collect::<Vec<_>>(), ["ca.crt", "tls.crt", "tls.key"]);
    assert_eq!(ca["ca.crt"], ca["tls.crt"], "a root CA is its own ca.crt");
    let annotations = &rendered.get("Secret", &ca_name)["metadata"]["annotations"];
    assert_eq!(annotations["helm.sh/resource-policy"], "keep", "uninstalling must not orphan enrolled Macs");

    let client_name = format!("{FULLNAME}-client-tls");
    let client = secret_data(&rendered, &client_name);
    assert_eq!(client["ca.crt"], ca["tls.crt"], "the controller checks agents against the same CA");
    assert_tls_mounted(&rendered, &client_name);

    // The client certificate chains to the CA and is good for client auth, as an agent checks it.
    use rustls::pki_types::pem::PemObject as _;
    let der = |pem: &[u8]| rustls::pki_types::CertificateDer::from_pem_slice(pem).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(&ca["tls.crt"])).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(std::sync::Arc::new(roots), provider)
        .build()
        .unwrap();
    verifier.verify_client_cert(&der(&client["tls.crt"]), &[], rustls::pki_types::UnixTime::now()).unwrap();
    let stranger = render(&[]);
    let other = secret_data(&stranger, &client_name);
    assert!(
        verifier.verify_client_cert(&der(&other["tls.crt"]), &[], rustls::pki_types::UnixTime::now()).is_err(),
        "another render's certificate (another CA) is refused: the check can fail"
    );
}

// ---------------------------------------------------------------------------------------------
// the router

const ROUTER: &str = "mk-metalkube-router";

impl Rendered {
    fn router(&self) -> &Value {
        self.get("Deployment", ROUTER)
    }

    fn router_container(&self) -> &Value {
        let containers = self.router()["spec"]["template"]["spec"]["containers"].as_sequence().unwrap();
        assert_eq!(containers.len(), 1, "the router pod has one container");
        &containers[0]
    }

    fn router_args(&self) -> Vec<String> {
        self.router_container()["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect()
    }

    fn manifests(&self) -> String {
        self.docs.iter().map(|d| d.text.as_str()).collect::<Vec<_>>().join("---\n")
    }
}

/// Whether `selector` (matchLabels) selects `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector.as_mapping().unwrap().iter().all(|(k, v)| &labels[k.as_str().unwrap()] == v)
}

#[test]
fn the_router_runs_locked_down_in_two_replicas_behind_a_pdb() {
    for values in [DEFAULTS, ALL_ON, INSECURE] {
        let rendered = render(values);
        let router = rendered.router();
        assert_eq!(router["spec"]["replicas"], 2, "{}", rendered.values);
        let pod = &router["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{}", rendered.values);
        for forbidden in ["hostNetwork", "hostPID", "hostIPC"] {
            assert!(pod[forbidden].is_null(), "{forbidden} set with {}", rendered.values);
        }
        let sc = &rendered.router_container()["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{}", rendered.values);
        assert_eq!(sc["runAsUser"], 65532, "{}", rendered.values);
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{}", rendered.values);
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{}", rendered.values);
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{}", rendered.values);
        assert!(sc["capabilities"]["add"].is_null(), "{}", rendered.values);
        assert_eq!(pod["serviceAccountName"], ROUTER, "its own ServiceAccount, never the controller's");
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            assert_eq!(rendered.router_container()[probe]["httpGet"]["path"], path, "{probe}");
            assert_eq!(rendered.router_container()[probe]["httpGet"]["port"], "http-metrics", "{probe}");
        }
        let pdb = rendered.get("PodDisruptionBudget", ROUTER);
        assert_eq!(pdb["spec"]["minAvailable"], 1);
        let pod_labels = &router["spec"]["template"]["metadata"]["labels"];
        assert!(selects(&pdb["spec"]["selector"]["matchLabels"], pod_labels));
        // No selector of the controller's may take a router pod for one of its own.
        let controller_selectors = [
            rendered.deployment()["spec"]["selector"]["matchLabels"].clone(),
            rendered.get("PodDisruptionBudget", FULLNAME)["spec"]["selector"]["matchLabels"].clone(),
            rendered.get("Service", &format!("{FULLNAME}-metrics"))["spec"]["selector"].clone(),
        ];
        for selector in &controller_selectors {
            assert!(!selects(selector, pod_labels), "{selector:?} selects the router pods");
        }
    }
}

/// Seconds of a duration the chart writes in whole seconds (`30s`).
fn whole_seconds(value: &str) -> u64 {
    value.strip_suffix('s').and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{value:?} is not whole seconds"))
}

#[test]
fn a_stopping_router_finishes_its_drain_within_the_pods_grace_period() {
    for values in [DEFAULTS, ALL_ON, INSECURE] {
        let rendered = render(values);
        let flag = |name: &str| {
            let args = rendered.router_args();
            let prefix = format!("{name}=");
            let value = args.iter().find_map(|a| a.strip_prefix(&prefix).map(str::to_owned));
            whole_seconds(&value.unwrap_or_else(|| panic!("{}: no {name}", rendered.values)))
        };
        let drain = flag("--drain-delay") + flag("--drain-timeout");
        let grace = rendered.router()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(drain < grace, "{}: drain {drain} s is not within the grace period {grace} s", rendered.values);
    }
}

#[test]
fn the_controller_follows_the_router_service_whose_http_port_is_the_routers_listen_port() {
    let rendered = render(DEFAULTS);
    assert!(
        rendered.args().iter().any(|a| a == "--router-service=metalkube-system/metalkube-router"),
        "{:?}",
        rendered.args()
    );
    let service = rendered.get("Service", "metalkube-router");
    let ports: Vec<(&str, i64, &str)> = service["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["port"].as_i64().unwrap(), p["targetPort"].as_str().unwrap()))
        .collect();
    // The controller reads the port named "http" from this Service's EndpointSlices.
    assert_eq!(ports, [("http", 8080, "http"), ("http-metrics", 9090, "http-metrics")]);
    assert!(selects(&service["spec"]["selector"], &rendered.router()["spec"]["template"]["metadata"]["labels"]));
    let args = rendered.router_args();
    for expected in ["--listen=0.0.0.0:8080", "--http-listen=0.0.0.0:9090"] {
        assert!(args.iter().any(|a| a == expected), "missing {expected} in {args:?}");
    }
    assert!(!args.iter().any(|a| a.starts_with("--agent=")), "the router finds the agents from MetalNodes: {args:?}");

    let off = render(&[DEFAULTS, &["--set", "router.enabled=false"]].concat());
    assert!(!off.args().iter().any(|a| a.starts_with("--router-service")), "no router, no --router-service");
    assert!(
        off.docs.iter().all(|d| d.value["metadata"]["labels"]["app.kubernetes.io/name"] != "metalkube-router"),
        "router.enabled=false renders nothing of the router"
    );
}

#[test]
fn chart_passes_only_flags_the_router_declares_each_once() {
    let main = std::fs::read_to_string(repo_root().join("crates/router/src/main.rs")).unwrap();
    let body = main.split_once("struct Args {").expect("struct Args in the router's main.rs").1;
    let body = body.split_once("\n}").expect("end of struct Args").0;
    let declared: BTreeSet<String> = body
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("//") && !l.starts_with("#[") && l.ends_with(',') && l.contains(':'))
        .filter_map(|l| l.split_once(':').map(|(field, _)| format!("--{}", field.trim().replace('_', "-"))))
        .collect();
    assert!(declared.contains("--http-listen"), "could not read the router's flags: {declared:?}");
    for values in [DEFAULTS, ALL_ON, INSECURE] {
        let rendered = render(values);
        let mut seen = BTreeSet::new();
        for arg in rendered.router_args() {
            let flag = arg.split_once('=').map_or(arg.as_str(), |(f, _)| f).to_owned();
            assert!(declared.contains(&flag), "{}: the router has no flag {flag} ({declared:?})", rendered.values);
            assert!(seen.insert(flag.clone()), "{}: {flag} passed twice", rendered.values);
        }
    }
}

#[test]
fn the_endpoint_picker_is_off_by_default_and_on_it_listens_on_its_named_port() {
    let off = render(DEFAULTS);
    assert!(!off.router_args().iter().any(|a| a.starts_with("--ext-proc")), "{:?}", off.router_args());
    let on = render(ALL_ON);
    assert!(on.router_args().iter().any(|a| a == "--ext-proc=0.0.0.0:9002"), "{:?}", on.router_args());
    let ports = on.router_container()["ports"].as_sequence().unwrap().clone();
    assert!(ports.iter().any(|p| p["name"] == "grpc-ext-proc" && p["containerPort"] == 9002), "{ports:?}");
    let service = on.get("Service", "metalkube-router");
    let port = service["spec"]["ports"].as_sequence().unwrap().iter().find(|p| p["name"] == "grpc-ext-proc").cloned();
    let port = port.expect("the Service names the picker's port for an InferencePool's endpointPickerRef");
    assert_eq!((port["port"].as_i64(), port["targetPort"].as_str()), (Some(9002), Some("grpc-ext-proc")));
}

fn router_tls_secret(rendered: &Rendered) -> Option<String> {
    let volumes = rendered.router()["spec"]["template"]["spec"]["volumes"].as_sequence()?;
    let tls = volumes.iter().find(|v| v["name"] == "tls")?;
    Some(str_of(&tls["secret"]["secretName"], "router tls secretName").to_owned())
}

#[test]
fn the_router_mounts_a_client_certificate_of_its_own_from_every_tls_source() {
    let existing = render(DEFAULTS);
    assert_eq!(router_tls_secret(&existing).as_deref(), Some("metalkube-router-tls"));
    let args = existing.router_args();
    for expected in [
        "--agent-ca=/etc/metalkube/tls/ca.crt",
        "--client-cert=/etc/metalkube/tls/tls.crt",
        "--client-key=/etc/metalkube/tls/tls.key",
    ] {
        assert!(args.iter().any(|a| a == expected), "missing {expected} in {args:?}");
    }
    let without = template(&["--set", "tls.existingSecret=metalkube-tls"]);
    assert!(!without.status.success(), "the router must not borrow the controller's certificate");
    assert!(without.stderr.contains("router.tls.existingSecret"), "{}", without.report());

    let cert_manager = render(ALL_ON);
    let certificate = cert_manager.get("Certificate", ROUTER);
    assert_eq!(certificate["spec"]["commonName"], "metalkube-router");
    assert_eq!(
        certificate["spec"]["issuerRef"],
        cert_manager.get("Certificate", &format!("{FULLNAME}-client"))["spec"]["issuerRef"]
    );
    let usages: BTreeSet<&str> = strings(&certificate["spec"]["usages"]).into_iter().collect();
    assert_eq!(usages, BTreeSet::from(["client auth", "digital signature"]));
    assert_eq!(router_tls_secret(&cert_manager), certificate["spec"]["secretName"].as_str().map(str::to_owned));

    let insecure = render(INSECURE);
    assert!(insecure.router_args().iter().any(|a| a == "--insecure"));
    assert_eq!(router_tls_secret(&insecure), None);

    // The generated CA signs the router's certificate too, and it is not the controller's.
    let generated = render(&[]);
    let ca = secret_data(&generated, &format!("{FULLNAME}-ca"));
    let router = secret_data(&generated, &format!("{ROUTER}-tls"));
    let controller = secret_data(&generated, &format!("{FULLNAME}-client-tls"));
    assert_eq!(router["ca.crt"], ca["tls.crt"]);
    assert_ne!(router["tls.key"], controller["tls.key"]);
    assert_eq!(router_tls_secret(&generated), Some(format!("{ROUTER}-tls")));
    use rustls::pki_types::pem::PemObject as _;
    let der = |pem: &[u8]| rustls::pki_types::CertificateDer::from_pem_slice(pem).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(&ca["tls.crt"])).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(std::sync::Arc::new(roots), provider)
        .build()
        .unwrap();
    verifier.verify_client_cert(&der(&router["tls.crt"]), &[], rustls::pki_types::UnixTime::now()).unwrap();
}

/// Least privilege for the router, proven on the rendered chart: what it needs (list and watch
/// MetalNodes, cluster-wide) is allowed, and reading Secrets or MetalModels, reading MetalNodes
/// one by one, or writing anything is not.
#[test]
fn the_router_may_list_and_watch_metalnodes_and_nothing_else() {
    use metalkube_testkit::apiserver::ApiRequest;
    use metalkube_testkit::rbac::{denied, grants, unused};
    let rendered = render(ALL_ON);
    let role = rendered.get("ClusterRole", ROUTER);
    print_rules("ClusterRole", role);
    let grants = grants(&rendered.manifests(), NAMESPACE, ROUTER);
    assert!(!grants.is_empty(), "the router's ServiceAccount is bound to nothing");
    let ask = |verb: &'static str, group: &'static str, resource: &'static str, sub: &'static str, ns: Option<&str>| {
        ApiRequest { verb, group, resource, subresource: sub, namespace: ns.map(str::to_owned), user: None }
    };
    let needed =
        [ask("list", "metalkube.dev", "metalnodes", "", None), ask("watch", "metalkube.dev", "metalnodes", "", None)];
    assert!(denied(&grants, &needed).is_empty(), "{:?}", denied(&grants, &needed));
    assert!(unused(&grants, &needed).is_empty(), "granted beyond what it needs: {:?}", unused(&grants, &needed));
    let forbidden = [
        ask("get", "", "secrets", "", Some(NAMESPACE)),
        ask("list", "", "secrets", "", None),
        ask("get", "metalkube.dev", "metalnodes", "", None),
        ask("list", "metalkube.dev", "metalmodels", "", None),
        ask("patch", "metalkube.dev", "metalnodes", "", None),
        ask("patch", "metalkube.dev", "metalnodes", "status", None),
        ask("create", "metalkube.dev", "metalnodes", "", None),
        ask("delete", "metalkube.dev", "metalnodes", "", None),
        ask("patch", "discovery.k8s.io", "endpointslices", "", Some("default")),
        ask("list", "discovery.k8s.io", "endpointslices", "", Some(NAMESPACE)),
        ask("create", "events.k8s.io", "events", "", Some(NAMESPACE)),
        ask("update", "coordination.k8s.io", "leases", "", Some(NAMESPACE)),
    ];
    assert_eq!(
        denied(&grants, &forbidden).len(),
        forbidden.len(),
        "the router may do more than list and watch MetalNodes"
    );
    // Bound to the router alone: the controller's account gets nothing from the router's role.
    let binding = rendered.get("ClusterRoleBinding", ROUTER);
    assert_eq!(binding["roleRef"]["name"], ROUTER);
    let subjects = binding["subjects"].as_sequence().unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!((subjects[0]["name"].as_str(), subjects[0]["namespace"].as_str()), (Some(ROUTER), Some(NAMESPACE)));
}

#[test]
fn router_servicemonitor_scrapes_the_metrics_port_as_job_metalkube_router() {
    let rendered = render(ALL_ON);
    let service = rendered.get("Service", "metalkube-router");
    let monitor = rendered.get("ServiceMonitor", ROUTER);
    assert_eq!(monitor["spec"]["jobLabel"], "app.kubernetes.io/name");
    assert_eq!(service["metadata"]["labels"]["app.kubernetes.io/name"], "metalkube-router", "job label value");
    assert!(selects(&monitor["spec"]["selector"]["matchLabels"], &service["metadata"]["labels"]));
    let controller_monitor = rendered.get("ServiceMonitor", &format!("{FULLNAME}-controller"));
    assert!(
        !selects(&controller_monitor["spec"]["selector"]["matchLabels"], &service["metadata"]["labels"]),
        "the controller's ServiceMonitor must not scrape the router as job metalkube-controller"
    );
    let endpoints = monitor["spec"]["endpoints"].as_sequence().unwrap();
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0]["port"], "http-metrics");
    assert!(render(DEFAULTS).of_kind("ServiceMonitor").is_empty());
}
