//! `cargo xtask bench metrics`: what recording one request's metrics costs on the serving
//! port, with per-model handles resolved once (`ServingSeries`, what the proxy does) against
//! looking each series up by freshly built labels on every request (the baseline: the plain
//! prometheus-client family API). Both paths record the same series in one run.

use std::hint::black_box;
use std::time::Instant;

use metalkube_agent::observe::metrics::{AgentRegistry, ModelLabels};
use metalkube_agent::serving::metrics::{CodeLabels, ServingMetrics};

const REQUESTS: u32 = 1_000_000;
const ROUNDS: usize = 7;

/// One request's bookkeeping through the families, as the proxy did before: status code,
/// duration by code, time to first token (labels cloned into the body's callbacks), in-flight
/// up and down (by the model's stored labels).
fn by_labels(metrics: &ServingMetrics, labels: &ModelLabels) {
    metrics.in_flight.get_or_create(labels).set(1);
    metrics.time_to_first_token.get_or_create(&labels.clone()).observe(0.004);
    let code = CodeLabels { model: labels.model.clone(), code: 200.to_string() };
    metrics.request_duration.get_or_create(&code).observe(0.007);
    metrics.in_flight.get_or_create(labels).set(0);
    metrics.requests.get_or_create(&CodeLabels { model: labels.model.clone(), code: 200.to_string() }).inc();
}

fn median_ns_per_request(mut f: impl FnMut()) -> f64 {
    let mut rounds: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..REQUESTS {
                f();
            }
            started.elapsed().as_nanos() as f64 / f64::from(REQUESTS)
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[ROUNDS / 2]
}

fn main() {
    let registry = AgentRegistry::default();
    let metrics = registry.register(ServingMetrics::register);
    let model = metalkube_api::ModelKey::new("default", "tiny");
    let series = metrics.series(&model);
    let labels = ModelLabels::new(&model);
    let baseline = median_ns_per_request(|| by_labels(black_box(&metrics), black_box(&labels)));
    let handles = median_ns_per_request(|| {
        let s = black_box(&series);
        s.in_flight.set(1);
        s.time_to_first_token.observe(0.004);
        let code = s.code(200);
        code.duration.observe(0.007);
        s.in_flight.set(0);
        code.requests.inc();
    });
    println!("per-request metrics, {REQUESTS} requests x {ROUNDS} rounds (median), one thread");
    println!("{:<28} {:>12} {:>10}", "path", "ns/request", "ratio");
    println!("{:<28} {:>12.1} {:>10.2}", "labels per request (base)", baseline, 1.0);
    println!("{:<28} {:>12.1} {:>10.2}", "ServingSeries handles", handles, handles / baseline);
}
