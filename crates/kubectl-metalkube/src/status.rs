//! `kubectl metalkube status`: the fleet in one table, one row per model replica on a Mac, plus
//! a row for each Mac that serves nothing and each model placed nowhere, so that nothing is
//! left out of the picture.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use metalkube_api::{MetalModel, MetalNode};

const HEADER: [&str; 10] =
    ["MAC", "MAC-READY", "MODEL", "PHASE", "READY", "GRADE", "PULSE", "QUEUE", "RESTARTS", "LAST-ERROR"];

/// A download in one cell: "downloading 25% of 2.0 GB, 12 MB/s, ETA 2m 5s".
fn download_line(d: &metalkube_api::DownloadProgress) -> String {
    let gb = |b: u64| format!("{:.1} GB", b as f64 / 1e9);
    let mut text = match d.total_bytes.filter(|t| *t > 0) {
        Some(total) => format!("downloading {}% of {}", d.done_bytes.saturating_mul(100) / total, gb(total)),
        None => format!("downloading, {} so far", gb(d.done_bytes)),
    };
    if let Some(rate) = d.bytes_per_second {
        text.push_str(&format!(", {:.0} MB/s", rate / 1e6));
    }
    if let Some(eta) = d.eta_seconds.filter(|e| e.is_finite() && *e >= 0.0 && *e < 1e9) {
        text.push_str(&format!(", ETA {}", humantime::format_duration(std::time::Duration::from_secs(eta as u64))));
    }
    text
}

/// Renders the table (pure): Macs by name, each Mac's models by namespace/name.
pub fn render_status(nodes: &[MetalNode], models: &[MetalModel]) -> String {
    let mut rows: Vec<[String; 10]> = Vec::new();
    let mut nodes: Vec<&MetalNode> = nodes.iter().collect();
    nodes.sort_by_key(|n| n.name_any());
    let mut models: Vec<&MetalModel> = models.iter().collect();
    models.sort_by_key(|m| (m.namespace().unwrap_or_default(), m.name_any()));
    let dash = || "-".to_owned();
    for node in &nodes {
        let name = node.name_any();
        let ready = node.status.as_ref().and_then(|s| condition(&s.conditions, "Ready"));
        let node_ready = ready.map_or_else(|| "Unknown".to_owned(), |c| c.status.clone());
        let node_problem = ready.filter(|c| c.status != "True").map(|c| one_line(&c.message)).unwrap_or_else(dash);
        let mut served = false;
        for model in &models {
            let replicas = model.status.as_ref().map(|s| s.replicas.as_slice()).unwrap_or_default();
            for replica in replicas.iter().filter(|r| r.node == name) {
                served = true;
                rows.push([
                    name.clone(),
                    node_ready.clone(),
                    model_name(model),
                    replica.phase.as_str().to_owned(),
                    yes_no(replica.ready),
                    replica.pulse.grade.map_or_else(dash, |g| g.as_str().to_owned()),
                    replica.pulse.pulse_seconds.map_or_else(dash, |s| format!("{s:.2}s")),
                    replica.pulse.queue_depth.to_string(),
                    replica.pulse.restarts.to_string(),
                    replica
                        .download
                        .as_ref()
                        .map(download_line)
                        .or_else(|| replica.message.as_deref().map(one_line))
                        .unwrap_or_else(|| node_problem.clone()),
                ]);
            }
        }
        if !served {
            rows.push([name, node_ready, dash(), dash(), dash(), dash(), dash(), dash(), dash(), node_problem]);
        }
    }
    for model in models.iter().filter(|m| m.status.as_ref().is_none_or(|s| s.replicas.is_empty())) {
        // Why it is placed nowhere: the Scheduled condition says (no Mac fits, none matches).
        let why = model
            .status
            .as_ref()
            .and_then(|s| condition(&s.conditions, "Scheduled"))
            .filter(|c| c.status != "True")
            .map_or_else(|| "not placed yet".to_owned(), |c| one_line(&c.message));
        rows.push([
            dash(),
            dash(),
            model_name(model),
            "Pending".to_owned(),
            "no".to_owned(),
            dash(),
            dash(),
            dash(),
            dash(),
            why,
        ]);
    }
    table(&rows)
}

fn condition<'a>(conditions: &'a [Condition], kind: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == kind)
}

fn model_name(model: &MetalModel) -> String {
    metalkube_api::ModelKey::of(model).to_string()
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_owned()
}

fn one_line(text: &str) -> String {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.is_empty() { "-".to_owned() } else { text }
}

/// Columns padded to their widest cell, three spaces apart, as kubectl prints; the last column
/// is not padded.
fn table(rows: &[[String; 10]]) -> String {
    let mut widths: Vec<usize> = HEADER.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(HEADER.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use metalkube_api::{DownloadProgress, MetalModelStatus, MetalNodeSpec, MetalNodeStatus};

    use super::*;

    fn node(name: &str, ready: &str, message: &str) -> MetalNode {
        let mut node = MetalNode::new(
            name,
            MetalNodeSpec {
                agent_endpoint: "https://x:9443".into(),
                serving_address: "x".into(),
                unschedulable: false,
            },
        );
        node.status = Some(MetalNodeStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: ready.into(),
                message: message.into(),
                reason: "R".into(),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()),
                observed_generation: None,
            }],
            ..Default::default()
        });
        node
    }

    fn model(name: &str, status: serde_json::Value) -> MetalModel {
        let mut model: MetalModel = serde_json::from_value(serde_json::json!({
            "apiVersion": "metalkube.dev/v1alpha1", "kind": "MetalModel",
            "metadata": {"name": name, "namespace": "llm"},
            "spec": {"model": {"source": "file:///m.gguf"}},
        }))
        .unwrap();
        model.status = Some(serde_json::from_value::<MetalModelStatus>(status).unwrap());
        model
    }

    #[test]
    fn one_row_per_replica_and_for_idle_macs_and_unplaced_models() {
        let nodes = [node("mac-02", "Unknown", "agent unreachable for 45s"), node("mac-01", "True", "")];
        let models = [
            model(
                "qwen",
                serde_json::json!({"replicas": [
                    {"node": "mac-01", "phase": "Serving", "ready": true, "grade": "Green", "pulseSeconds": 0.4321, "queueDepth": 2, "restarts": 1},
                ]}),
            ),
            model(
                "llama",
                serde_json::json!({"replicas": [
                    {"node": "mac-01", "phase": "CrashLoopBackOff", "ready": false, "restarts": 4, "message": "engine exited\nwith code 1"},
                ]}),
            ),
            model(
                "big",
                serde_json::json!({"conditions": [{"type": "Scheduled", "status": "False", "reason": "InsufficientMemory",
                "message": "no Mac has 80Gi free", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
            ),
        ];
        let table = render_status(&nodes, &models);
        let expected = "\
MAC      MAC-READY   MODEL       PHASE              READY   GRADE   PULSE   QUEUE   RESTARTS   LAST-ERROR
mac-01   True        llm/llama   CrashLoopBackOff   no      -       -       0       4          engine exited with code 1
mac-01   True        llm/qwen    Serving            yes     Green   0.43s   2       1          -
mac-02   Unknown     -           -                  -       -       -       -       -          agent unreachable for 45s
-        -           llm/big     Pending            no      -       -       -       -          no Mac has 80Gi free
";
        assert_eq!(table, expected, "\n{table}");
    }

    #[test]
    fn a_download_shows_how_far_it_has_come() {
        let models = [model(
            "qwen",
            serde_json::json!({"replicas": [
                {"node": "mac-01", "phase": "Downloading", "ready": false,
                 "download": {"doneBytes": 500_000_000u64, "totalBytes": 2_000_000_000u64, "bytesPerSecond": 12.0e6, "etaSeconds": 125.0}},
            ]}),
        )];
        let table = render_status(&[node("mac-01", "True", "")], &models);
        assert!(table.contains("downloading 25% of 2.0 GB, 12 MB/s, ETA 2m 5s"), "\n{table}");
        let unknown =
            DownloadProgress { done_bytes: 300_000_000, total_bytes: None, bytes_per_second: None, eta_seconds: None };
        assert_eq!(download_line(&unknown), "downloading, 0.3 GB so far");
    }

    #[test]
    fn an_empty_fleet_is_a_header() {
        assert_eq!(render_status(&[], &[]).lines().count(), 1);
    }
}
