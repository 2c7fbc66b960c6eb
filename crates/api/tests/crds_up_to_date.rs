//! The committed CRDs must be what the Rust types generate: `cargo xtask crdgen` rewrites both
//! copies, the top-level `crds/` (for `kubectl apply -f crds/`) and the chart's (for Helm).

#[test]
fn committed_crds_match_the_types() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for dir in ["crds", "charts/metalkube/crds"] {
        for (file, generated) in metalkube_api::crd_manifests().unwrap() {
            let committed = std::fs::read_to_string(root.join(dir).join(file)).unwrap_or_default();
            assert!(
                committed == generated,
                "{dir}/{file} is stale or missing: run `cargo xtask crdgen` and commit the result"
            );
        }
    }
}
