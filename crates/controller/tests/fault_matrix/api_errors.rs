//! API errors (row 10): injected 409s on EndpointSlices and 500s on status writes are retried
//! (by backoff when nothing else happens, at once on events) until everything converges.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use metalkube_testkit::apiserver::FailNext;

use crate::clients::Load;
use crate::cluster::{Cluster, MODELS_NS, metric_sum};
use crate::row::{Row, bounded, chat_url, secs};
use crate::support::CONTROLLER_TOKEN;

pub async fn api_faults(row: Row) {
    let cluster = Cluster::start(&row, "127.0.0.10").await;
    let port = cluster.create_model("tiny").await;
    // A second model with no clients: once ready, nothing about it changes by itself.
    let quiet = cluster.create_model("quiet").await;
    cluster.wait_ready("tiny", port).await;
    cluster.wait_ready("quiet", quiet).await;
    let load = Load::start(&chat_url(&cluster.mac.ip, port), &row.tally, 2);
    row.tally.completions_since(Instant::now(), 5, "five completions before the fault").await;
    let metrics = || async { cluster.controller_metrics().await.unwrap() };
    let errors_before = metric_sum(&metrics().await, "metalkube_controller_reconcile_errors_total{");
    let injected_since = |t: Instant| -> Vec<(f64, u16)> {
        let served = cluster.server.injected();
        served.iter().filter(|f| f.at >= t).map(|f| (f.at.duration_since(t).as_secs_f64(), f.code)).collect()
    };

    // B: the quiet model's EndpointSlice is deleted and its next two writes fail with 409. With
    // nothing else happening to that model (no clients, so no agent event; no status change),
    // only the backoff brings the retries. (The loaded model would not do: under load its
    // in-flight count moves, the agent sends each move, and each retries the reconcile at once.)
    cluster
        .server
        .inject(FailNext::new("patch", "endpointslices", 409, 2).from_user(CONTROLLER_TOKEN).in_namespace(MODELS_NS));
    let slices: Api<EndpointSlice> = Api::namespaced(cluster.client.clone(), MODELS_NS);
    let lp = ListParams::default().labels("kubernetes.io/service-name=quiet");
    let deleted = Instant::now();
    for s in slices.list(&lp).await.unwrap().items {
        slices.delete(&s.name_any(), &Default::default()).await.unwrap();
    }
    bounded("both slice failures served", || async { (cluster.server.injections_pending() == 0).then_some(()) }).await;
    cluster.wait_ready("quiet", quiet).await;
    let b_converged = deleted.elapsed();
    let b = injected_since(deleted);
    let delays = retry_delays(&cluster.dir.join("controller.log"), "default/quiet");
    row.note(format!(
        "B: slice failures at {b:?} s; converged after {}; retries of default/quiet scheduled after {delays:?}",
        secs(b_converged)
    ));

    // A: the next two status writes fail with 500 while a new model is placed, started and
    // published. The agent's events about the starting model (and the controller's own status
    // writes) retry at once.
    cluster.server.inject(
        FailNext::new("patch", "metalmodels", 500, 2)
            .subresource("status")
            .from_user(CONTROLLER_TOKEN)
            .in_namespace(MODELS_NS),
    );
    let created = Instant::now();
    let third = cluster.create_model("third").await;
    cluster.wait_ready("third", third).await;
    bounded("both status failures served", || async { (cluster.server.injections_pending() == 0).then_some(()) }).await;
    let a = injected_since(created);
    let a_converged = created.elapsed();
    row.note(format!("A: status failures at {a:?} s; converged after {}", secs(a_converged)));
    assert_eq!(a.iter().map(|f| f.1).collect::<Vec<_>>(), [500, 500]);
    assert_eq!(b.iter().map(|f| f.1).collect::<Vec<_>>(), [409, 409]);
    let errors = metric_sum(&metrics().await, "metalkube_controller_reconcile_errors_total{") - errors_before;
    assert!(errors >= 4.0, "each injected failure failed a reconcile: {errors}");
    // The retries in B waited, longer each time (backoff from 0.5 s, doubling, jittered within
    // [d, 2d)); generous lower bounds, no upper one beyond the step bound.
    let b_delays = &delays[delays.len().saturating_sub(2)..];
    assert!(b_delays.len() == 2 && b_delays[1] > b_delays[0], "each retry waits longer: {delays:?}");
    assert!(b[1].0 - b[0].0 >= 0.4, "the first retry waited for the backoff: {b:?}");
    assert!(b_converged.as_secs_f64() - b[1].0 >= 0.8, "the second retry waited longer: {b:?}");

    cluster.wait_ready("tiny", port).await;
    row.tally.completions_since(Instant::now(), 5, "completions after convergence").await;
    load.stop().await;
    let counts = row.tally.counts();
    assert_eq!(counts.definite, 0, "no request failed: {:?}", counts.kinds);
    drop(cluster);
    let at = |fs: &[(f64, u16)]| fs.iter().map(|f| format!("{:.1}", f.0)).collect::<Vec<_>>().join("/");
    row.summarize(format!(
        "slice 409×2 at +{} s, retried by backoff, rewritten after {}; status 500×2 at +{} s, retried on events, written after {}",
        at(&b),
        secs(b_converged),
        at(&a),
        secs(a_converged)
    ));
}

/// The delays the controller scheduled for retrying `model`'s failed reconciles, from its log.
fn retry_delays(log: &Path, model: &str) -> Vec<Duration> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .map(strip_ansi)
        .filter(|l| l.contains("reconcile failed") && l.contains(&format!("model={model} ")))
        .filter_map(|l| parse_debug_duration(l.split("retry_in=").nth(1)?.split_whitespace().next()?))
        .collect()
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A `Duration` as `{:?}` prints it: `983.468413ms`, `1.337515622s`.
fn parse_debug_duration(text: &str) -> Option<Duration> {
    let (number, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic() || c == 'µ')?);
    let value: f64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => value,
        "ms" => value / 1e3,
        "µs" | "us" => value / 1e6,
        "ns" => value / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(seconds))
}
