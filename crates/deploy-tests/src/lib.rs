//! Tests of the deployment artefacts, which have no Rust code of their own: the Helm chart in
//! `charts/metalkube` (lint, Kubernetes and prometheus-operator schemas, security settings, CRDs
//! in step with `crds/`), its alert rules (`promtool`) and the controller's `Dockerfile`
//! (`hadolint`). Everything lives in `tests/`; this library is intentionally empty.
