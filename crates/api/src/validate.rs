use crate::names::{
    DNS_LABEL_ALLOWED, DNS_SUBDOMAIN_ALLOWED, SECRET_KEY_ALLOWED, dns_label_problem, dns_subdomain_problem,
    secret_key_problem,
};
use crate::{FieldError, MetalModelSpec, SecretKeyRef};

/// The namespace of a MetalModel that names none (as `kubectl apply` without `-n` does).
pub const DEFAULT_NAMESPACE: &str = "default";

/// llama-server flags the agent sets itself; a spec that passes them in `extraArgs` would break
/// supervision (where the engine listens, which file it serves, which paths it answers).
pub const AGENT_OWNED_FLAGS: &[(&str, &str)] = &[
    ("--host", "the agent binds the engine to 127.0.0.1"),
    ("--port", "the agent picks the internal port"),
    ("-m", "use spec.model.source"),
    ("--model", "use spec.model.source"),
    ("-mu", "use spec.model.source"),
    ("--model-url", "use spec.model.source"),
    ("-hf", "use spec.model.source"),
    ("-hfr", "use spec.model.source"),
    ("--hf-repo", "use spec.model.source"),
    ("-hff", "use spec.model.source"),
    ("--hf-file", "use spec.model.source"),
    ("-c", "use spec.engine.contextSize"),
    ("--ctx-size", "use spec.engine.contextSize"),
    ("-np", "use spec.engine.parallel"),
    ("--parallel", "use spec.engine.parallel"),
    ("-ngl", "use spec.engine.gpuLayers"),
    ("--gpu-layers", "use spec.engine.gpuLayers"),
    ("--n-gpu-layers", "use spec.engine.gpuLayers"),
    ("--metrics", "the agent always enables it"),
    ("--api-key", "the pulse must reach the engine"),
    ("--api-key-file", "the pulse must reach the engine"),
    ("--api-prefix", "clients and the pulse use the standard paths"),
    ("--path", "the agent serves no static files through the engine"),
    ("--no-slots", "the agent reads /slots"),
    ("--slots", "the agent enables it"),
    ("--sleep-idle-seconds", "use spec.engine.sleepAfterIdle"),
    ("-a", "the agent names the model after the MetalModel"),
    ("--alias", "the agent names the model after the MetalModel"),
];

/// Checks a MetalModel's name and namespace as the API server would: the name an RFC 1123
/// subdomain, the namespace an RFC 1123 label. In a cluster the API server has done this; a
/// standalone file has met no API server, and the agent makes file names of both.
pub fn validate_model_meta(name: &str, namespace: Option<&str>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if let Some(problem) = dns_subdomain_problem(name) {
        errors.push(FieldError { field: "metadata.name".into(), problem, allowed: DNS_SUBDOMAIN_ALLOWED.into() });
    }
    if let Some(problem) = namespace.and_then(dns_label_problem) {
        errors.push(FieldError { field: "metadata.namespace".into(), problem, allowed: DNS_LABEL_ALLOWED.into() });
    }
    errors
}

/// A reference to a Secret key: a valid Secret name (an RFC 1123 subdomain) and data key. The
/// standalone agent reads `<secrets-dir>/<name>/<key>`: neither may leave that directory.
fn secret_ref_errors(field: &str, r: &SecretKeyRef, errors: &mut Vec<FieldError>) {
    if let Some(problem) = dns_subdomain_problem(&r.name) {
        errors.push(FieldError { field: format!("{field}.name"), problem, allowed: DNS_SUBDOMAIN_ALLOWED.into() });
    }
    if let Some(problem) = secret_key_problem(&r.key) {
        errors.push(FieldError { field: format!("{field}.key"), problem, allowed: SECRET_KEY_ALLOWED.into() });
    }
}

/// Checks what the schema cannot say (relations between fields, owned flags). Returns every
/// problem at once so a person fixes the file in one go.
/// What an alias may be: a name a client types in a request's `model` field.
pub const ALIAS_ALLOWED: &str = "1 to 128 printable ASCII characters without spaces, e.g. llama-3.2-1b or meta-llama/Llama-3.2-1B; at most 16, each once";

fn alias_errors(aliases: &[String], errors: &mut Vec<FieldError>) {
    let mut push = |field: String, problem: String| {
        errors.push(FieldError { field, problem, allowed: ALIAS_ALLOWED.to_owned() });
    };
    if aliases.len() > 16 {
        push("spec.routing.aliases".into(), format!("{} aliases", aliases.len()));
    }
    for (i, alias) in aliases.iter().enumerate() {
        let field = format!("spec.routing.aliases[{i}]");
        if alias.is_empty() || alias.len() > 128 {
            push(field, format!("{alias:?} is {} characters long", alias.len()));
        } else if let Some(c) = alias.chars().find(|c| !c.is_ascii_graphic()) {
            push(field, format!("{alias:?} holds {c:?}"));
        } else if aliases[..i].contains(alias) {
            push(field, format!("{alias:?} is listed twice"));
        }
    }
}

pub fn validate_model_spec(spec: &MetalModelSpec) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let mut err = |field: &str, problem: String, allowed: &str| {
        errors.push(FieldError { field: field.to_owned(), problem, allowed: allowed.to_owned() })
    };

    if let Err(e) = crate::parse_source(&spec.model.source) {
        err("spec.model.source", e.problem, crate::SUPPORTED_SOURCES);
    }
    if spec.model.token_secret_ref.is_some() && !spec.model.source.starts_with("hf://") {
        err(
            "spec.model.tokenSecretRef",
            "a hub token is only sent to the hub".into(),
            "tokenSecretRef with an hf:// source only",
        );
    }
    if let Some(sha) = &spec.model.sha256
        && !(sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    {
        err("spec.model.sha256", format!("{sha:?} is not a SHA-256 digest"), "64 lowercase hex characters");
    }

    if let Some(r) = &spec.model.token_secret_ref {
        secret_ref_errors("spec.model.tokenSecretRef", r, &mut errors);
    }
    if let Some(auth) = &spec.auth {
        secret_ref_errors("spec.auth.apiKeySecretRef", &auth.api_key_secret_ref, &mut errors);
    }
    alias_errors(spec.aliases(), &mut errors);

    let mut err = |field: &str, problem: String, allowed: &str| {
        errors.push(FieldError { field: field.to_owned(), problem, allowed: allowed.to_owned() })
    };
    let engine = &spec.engine;
    if engine.context_size < 64 {
        err("spec.engine.contextSize", format!("{} is too small", engine.context_size), "64 or more");
    }
    if !(1..=256).contains(&engine.parallel) {
        err("spec.engine.parallel", format!("{} slots", engine.parallel), "1 to 256");
    }
    if engine.gpu_layers < -1 {
        err("spec.engine.gpuLayers", format!("{}", engine.gpu_layers), "-1 (all) or 0 and more");
    }
    if let Some(idle) = engine.sleep_after_idle
        && idle.get() < std::time::Duration::from_secs(1)
    {
        err(
            "spec.engine.sleepAfterIdle",
            format!("{idle:?} is under a second"),
            "whole seconds, 1s or more (llama-server's --sleep-idle-seconds), or unset",
        );
    }
    if engine.startup_timeout.get().is_zero() {
        err("spec.engine.startupTimeout", "zero".into(), "a positive duration such as 5m");
    }
    for (i, arg) in engine.extra_args.iter().enumerate() {
        let flag = arg.split('=').next().unwrap_or(arg);
        if let Some((owned, why)) = AGENT_OWNED_FLAGS.iter().find(|(f, _)| *f == flag) {
            err(
                &format!("spec.engine.extraArgs[{i}]"),
                format!("{owned} is set by the agent ({why})"),
                "any llama-server flag except the ones the agent owns",
            );
        }
    }

    if let Some(max) = spec.admission.max_concurrent
        && max == 0
    {
        err("spec.admission.maxConcurrent", "0 would admit nothing".into(), "1 or more, or unset");
    }
    if spec.admission.queue_timeout.get().is_zero() && spec.admission.queue_depth > 0 {
        err("spec.admission.queueTimeout", "zero with a non-empty queue".into(), "a positive duration");
    }
    if spec.admission.serving_port == Some(0) {
        err("spec.admission.servingPort", "0".into(), "1 to 65535, or unset for the agent's serving range");
    }
    if spec.admission.stream_stall_timeout.get().is_zero() {
        err("spec.admission.streamStallTimeout", "zero".into(), "a positive duration such as 30s");
    }
    if spec.admission.request_timeout.get().is_zero() {
        err("spec.admission.requestTimeout", "zero".into(), "a positive duration such as 10m");
    }
    if spec.admission.max_request_bytes < 1024 {
        err("spec.admission.maxRequestBytes", format!("{}", spec.admission.max_request_bytes), "1024 or more");
    }

    let pulse = &spec.pulse;
    if pulse.interval.get().is_zero() {
        err("spec.pulse.interval", "zero".into(), "a positive duration such as 5s");
    }
    if pulse.yellow_after >= pulse.red_after {
        err(
            "spec.pulse.yellowAfter",
            format!("{} is not below redAfter {}", pulse.yellow_after, pulse.red_after),
            "yellowAfter < redAfter < timeout",
        );
    }
    if pulse.red_after >= pulse.timeout {
        err(
            "spec.pulse.redAfter",
            format!("{} is not below timeout {}", pulse.red_after, pulse.timeout),
            "yellowAfter < redAfter < timeout",
        );
    }
    if pulse.red_streak == 0 {
        err("spec.pulse.redStreak", "0".into(), "1 or more");
    }
    let drift = &pulse.drift;
    if drift.enabled && !(drift.yellow_factor >= 1.0 && drift.red_factor > drift.yellow_factor) {
        err(
            "spec.pulse.drift",
            format!("yellowFactor {} and redFactor {}", drift.yellow_factor, drift.red_factor),
            "1 <= yellowFactor < redFactor",
        );
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Duration;

    fn spec() -> MetalModelSpec {
        MetalModelSpec::for_source("file:///models/m.gguf")
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(validate_model_spec(&spec()), vec![]);
    }

    #[test]
    fn owned_flags_are_refused_with_the_field_and_the_reason() {
        let mut s = spec();
        s.engine.extra_args = vec!["--flash-attn".into(), "on".into(), "--port=9000".into()];
        let errors = validate_model_spec(&s);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field, "spec.engine.extraArgs[2]");
        assert!(errors[0].problem.contains("--port"), "{}", errors[0]);
    }

    #[test]
    fn aliases_are_names_a_client_can_type_each_once() {
        let mut s = spec();
        s.routing = Some(crate::RoutingSpec {
            mode: None,
            aliases: vec![
                "llama-3.2-1b".into(),
                "meta-llama/Llama-3.2-1B".into(),
                "two words".into(),
                "llama-3.2-1b".into(),
                String::new(),
            ],
        });
        let errors = validate_model_spec(&s);
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["spec.routing.aliases[2]", "spec.routing.aliases[3]", "spec.routing.aliases[4]"],
            "{errors:?}"
        );
        assert!(errors[0].problem.contains("' '"), "{}", errors[0]);
        assert!(errors[1].problem.contains("listed twice"), "{}", errors[1]);
    }

    #[test]
    fn thresholds_must_be_ordered() {
        let mut s = spec();
        s.pulse.yellow_after = Duration::from_secs(6);
        s.pulse.timeout = Duration::from_secs(4);
        let fields: Vec<_> = validate_model_spec(&s).into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["spec.pulse.yellowAfter", "spec.pulse.redAfter"]);
    }

    #[test]
    fn secret_refs_must_be_secret_names_and_keys() {
        let mut s = spec();
        s.auth =
            Some(crate::AuthSpec { api_key_secret_ref: SecretKeyRef { name: "/etc".into(), key: "hostname".into() } });
        s.model.source = "hf://org/repo/m.gguf".into();
        s.model.token_secret_ref = Some(SecretKeyRef { name: "hub".into(), key: "..".into() });
        let errors = validate_model_spec(&s);
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.model.tokenSecretRef.key", "spec.auth.apiKeySecretRef.name"]);
        assert!(errors[1].problem.contains("path separator"), "{}", errors[1]);
        assert!(errors[1].allowed.contains("RFC 1123 subdomain"), "{}", errors[1]);
    }

    #[test]
    fn names_and_namespaces_are_rfc1123() {
        assert_eq!(validate_model_meta("tiny", Some("team-a")), vec![]);
        assert_eq!(validate_model_meta("qwen2.5-0.5b", None), vec![]);
        let errors = validate_model_meta("a/b", Some("../../x"));
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["metadata.name", "metadata.namespace"]);
        assert!(errors[1].to_string().contains("\"../../x\" holds '/' (a path separator)"), "{}", errors[1]);
        assert!(errors[1].allowed.contains("RFC 1123 label"), "{}", errors[1]);
    }

    #[test]
    fn unknown_scheme_lists_the_supported_ones() {
        let mut s = spec();
        s.model.source = "s3://bucket/m.gguf".into();
        let errors = validate_model_spec(&s);
        assert!(errors[0].allowed.contains("https://"), "{}", errors[0]);
    }
}
