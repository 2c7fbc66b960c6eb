//! The committed CRDs must be what the Rust types generate: `cargo xtask crdgen` rewrites them.

#[test]
fn committed_crds_match_the_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds");
    for (file, generated) in metalkube_api::crd_manifests().unwrap() {
        let committed = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        assert!(
            committed == generated,
            "crds/{file} is stale or missing: run `cargo xtask crdgen` and commit the result"
        );
    }
}
