//! Properties of the MetalModel file format, which standalone agents read from a directory
//! anyone with a shell may write into: no text makes the reader panic, every refusal says
//! where (file, document, field), and whatever the types write reads back as it was.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test states its assumptions by panicking

use std::collections::BTreeMap;

use metalkube_api::{
    AGENT_OWNED_FLAGS, AdmissionSpec, ApiError, AuthSpec, Duration, EnginePath, EngineSpec, MetalModel, MetalModelSpec,
    ModelSource, PulseSpec, RoutingMode, RoutingSpec, SecretKeyRef, parse_models_yaml, validate_model_spec,
};
use proptest::prelude::*;
use serde_json::{Value, json};

const FILE: &str = "models/some-file.yaml";

/// Any duration from a nanosecond to `Duration::MAX`, most of them in the range people write.
fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        4 => (1u64..10_000_000_000_000).prop_map(|n| Duration(std::time::Duration::from_nanos(n))),
        1 => (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration(std::time::Duration::new(s, n))),
    ]
    .prop_filter("positive", |d| !d.get().is_zero())
}

/// Three durations in increasing order.
fn ordered_durations() -> impl Strategy<Value = (Duration, Duration, Duration)> {
    prop::collection::btree_set(duration(), 3).prop_map(|set| {
        let v: Vec<_> = set.into_iter().collect();
        (v[0], v[1], v[2])
    })
}

fn is_owned_flag(arg: &str) -> bool {
    let flag = arg.split('=').next().unwrap_or(arg);
    AGENT_OWNED_FLAGS.iter().any(|(f, _)| *f == flag)
}

/// Specs `validate_model_spec` accepts, with free text wherever the format has free text.
fn valid_spec() -> impl Strategy<Value = MetalModelSpec> {
    let source = prop_oneof![
        "file:///[a-z0-9/_.-]{0,20}[a-z]\\.gguf",
        "file:[a-z0-9_.-][a-z0-9/_.-]{0,20}\\.gguf",
        "https://[a-z0-9.-]{1,20}/\\PC{1,20}",
        "hf://[a-z0-9]{1,8}/[a-zA-Z0-9_-][a-zA-Z0-9._-]{0,11}/([a-z0-9]{1,6}/)?[a-zA-Z0-9_-]{1,12}\\.gguf(@[a-z0-9]{1,10})?",
    ];
    let model = (source, prop::option::of("[0-9a-f]{64}")).prop_map(|(source, sha256)| ModelSource {
        source,
        sha256,
        token_secret_ref: None,
    });
    let engine = (
        64u32..=1_048_576,
        -1i32..=1000,
        1u32..=256,
        prop::collection::vec(".*".prop_filter("not an owned flag", |a| !is_owned_flag(a)), 0..4),
        duration(),
        prop::option::of(1u64..100_000).prop_map(|s| s.map(metalkube_api::Duration::from_secs)),
    )
        .prop_map(|(context_size, gpu_layers, parallel, extra_args, startup_timeout, sleep_after_idle)| {
            EngineSpec { context_size, gpu_layers, parallel, extra_args, startup_timeout, sleep_after_idle }
        });
    let admission = (
        prop::option::of(1u32..),
        0u32..=100_000,
        (duration(), duration(), duration()),
        1024u64..,
        prop::option::of(1u16..),
        prop::collection::vec(
            prop::sample::select(vec![
                EnginePath::Slots,
                EnginePath::Props,
                EnginePath::LoraAdapters,
                EnginePath::Metrics,
            ]),
            0..3,
        ),
    )
        .prop_map(
            |(
                max_concurrent,
                queue_depth,
                (queue_timeout, stall, request),
                max_request_bytes,
                serving_port,
                engine_paths,
            )| {
                AdmissionSpec {
                    max_concurrent,
                    queue_depth,
                    queue_timeout,
                    max_request_bytes,
                    serving_port,
                    stream_stall_timeout: stall,
                    request_timeout: request,
                    engine_paths,
                }
            },
        );
    let pulse = (duration(), ordered_durations(), 1u32..=100, any::<bool>(), 1.0f64..1e9, 1e-9f64..1e9, duration())
        .prop_map(|(interval, (yellow_after, red_after, timeout), red_streak, enabled, yellow, above, floor)| {
            let mut pulse = PulseSpec { interval, timeout, yellow_after, red_after, red_streak, ..Default::default() };
            pulse.drift.enabled = enabled;
            pulse.drift.yellow_factor = yellow;
            pulse.drift.red_factor = yellow + above.max(yellow * 1e-9);
            pulse.drift.floor = floor;
            pulse
        });
    let auth = prop::option::of(
        (
            "[a-z0-9]([-a-z0-9]{0,8}[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]{0,8}[a-z0-9])?){0,2}",
            "[-._a-zA-Z0-9]{1,20}".prop_filter("not a directory name", |k| k != "." && k != ".."),
        )
            .prop_map(|(name, key)| AuthSpec { api_key_secret_ref: SecretKeyRef { name, key } }),
    );
    let routing = prop::option::of(
        prop::sample::select(RoutingMode::ALL.to_vec())
            .prop_map(|mode| RoutingSpec { mode: Some(mode), aliases: vec![] }),
    );
    (model, engine, 0u32..=64, prop::collection::btree_map(".*", ".*", 0..3), admission, pulse, auth, routing).prop_map(
        |(model, engine, replicas, node_selector, admission, pulse, auth, routing)| MetalModelSpec {
            model,
            engine,
            replicas,
            node_selector,
            admission,
            pulse,
            auth,
            routing,
        },
    )
}

/// Anything the types can hold, valid or not.
fn any_spec() -> impl Strategy<Value = MetalModelSpec> {
    let d = || any::<u64>().prop_map(|ms| Duration(std::time::Duration::from_millis(ms % 1_000_000_000)));
    (
        valid_spec(),
        ".{0,12}",
        prop::option::of(".{0,70}"),
        (
            any::<u32>(),
            any::<i32>(),
            any::<u32>(),
            prop::collection::vec(prop_oneof![".*", "--[a-z-]{1,12}(=.*)?"], 0..4),
            d(),
        ),
        (prop::option::of(any::<u32>()), any::<u32>(), d(), any::<u64>(), prop::option::of(any::<u16>()), d(), d()),
        (d(), d(), d(), d(), any::<u32>(), any::<bool>(), any::<f64>(), any::<f64>()),
    )
        .prop_map(|(mut s, source, sha, engine, admission, pulse)| {
            s.model = ModelSource { source, sha256: sha, token_secret_ref: None };
            (
                s.engine.context_size,
                s.engine.gpu_layers,
                s.engine.parallel,
                s.engine.extra_args,
                s.engine.startup_timeout,
            ) = engine;
            let a = &mut s.admission;
            (a.max_concurrent, a.queue_depth, a.queue_timeout, a.max_request_bytes, a.serving_port) =
                (admission.0, admission.1, admission.2, admission.3, admission.4);
            (a.stream_stall_timeout, a.request_timeout) = (admission.5, admission.6);
            let p = &mut s.pulse;
            (p.interval, p.timeout, p.yellow_after, p.red_after, p.red_streak) =
                (pulse.0, pulse.1, pulse.2, pulse.3, pulse.4);
            (p.drift.enabled, p.drift.yellow_factor, p.drift.red_factor) = (pulse.5, pulse.6, pulse.7);
            s
        })
}

fn model_name() -> impl Strategy<Value = String> {
    "[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?"
}

fn manifest(name: &str, spec: &MetalModelSpec) -> Value {
    serde_json::to_value(MetalModel::new(name, spec.clone())).unwrap()
}

/// Where each scalar sits in a JSON value: as error messages write it
/// (`spec.engine.extraArgs[2]`) and as a JSON pointer (`/spec/engine/extraArgs/2`), which
/// stays unambiguous when a map key holds dots or brackets.
fn leaves(v: &Value, path: &str, pointer: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let path = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                leaves(v, &path, &format!("{pointer}/{}", k.replace('~', "~0").replace('/', "~1")), out);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                leaves(v, &format!("{path}[{i}]"), &format!("{pointer}/{i}"), out);
            }
        }
        _ => out.push((path.to_owned(), pointer.to_owned())),
    }
}

/// The value at a field path as error messages write it (struct fields and indexes only).
fn at<'a>(v: &'a mut Value, path: &str) -> Option<&'a mut Value> {
    if path.is_empty() {
        return Some(v);
    }
    let pointer: String = path.split('.').map(|part| format!("/{}", part.replace('[', "/").replace(']', ""))).collect();
    v.pointer_mut(&pointer)
}

/// Objects that are resources' own structs (a map such as `nodeSelector` or `labels` takes
/// any key, so a stray key there is not an unknown field).
const STRUCT_PATHS: &[&str] = &[
    "",
    "metadata",
    "spec",
    "spec.model",
    "spec.engine",
    "spec.admission",
    "spec.pulse",
    "spec.pulse.drift",
    "spec.auth",
    "spec.auth.apiKeySecretRef",
];

/// Small edits of a text: what a person's typo, a bad merge or a cut file does to YAML.
#[derive(Debug, Clone)]
enum Edit {
    Delete(prop::sample::Index, usize),
    Insert(prop::sample::Index, String),
    Cut(prop::sample::Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<prop::sample::Index>(), 1usize..6).prop_map(|(i, n)| Edit::Delete(i, n)),
        (
            any::<prop::sample::Index>(),
            prop_oneof![
                ".{1,3}",
                prop::sample::select(vec![
                    ":",
                    "- ",
                    "\n",
                    "  ",
                    "{",
                    "}",
                    "[",
                    "]",
                    "&a ",
                    "*a",
                    "!!binary ",
                    "---\n",
                    "'",
                    "\"",
                    "#",
                    "? ",
                    "|\n",
                    "<<: *a\n"
                ])
                .prop_map(String::from),
            ]
        )
            .prop_map(|(i, s)| Edit::Insert(i, s)),
        any::<prop::sample::Index>().prop_map(Edit::Cut),
    ]
}

fn apply(text: &str, edit: &Edit) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = chars.clone();
    match edit {
        Edit::Delete(i, n) => {
            let start = i.index(chars.len() + 1);
            out.drain(start..(start + n).min(chars.len()));
        }
        Edit::Insert(i, s) => {
            let at = i.index(chars.len() + 1);
            out.splice(at..at, s.chars());
        }
        Edit::Cut(i) => out.truncate(i.index(chars.len() + 1)),
    }
    out.into_iter().collect()
}

fn check_names_the_place(err: &ApiError) -> Result<(), TestCaseError> {
    let text = err.to_string();
    prop_assert!(text.starts_with(FILE), "does not name the file: {text}");
    match err {
        ApiError::Yaml { message, .. } => prop_assert!(message.starts_with("document "), "{text}"),
        ApiError::Invalid { errors, .. } => {
            prop_assert!(!errors.is_empty());
            prop_assert!(
                errors.iter().all(|e| e.field.starts_with("spec.") || e.field.starts_with("metadata.")),
                "{text}"
            );
        }
        ApiError::WrongKind { .. } => {}
        ApiError::Duration { .. } => prop_assert!(false, "a bare duration error names no field: {text}"),
        ApiError::BundleYaml { .. } | ApiError::Bundle { .. } => {
            prop_assert!(false, "a models file is never read as an agent bundle: {text}")
        }
    }
    Ok(())
}

proptest! {
    /// Whatever a file holds, the reader answers with models or an error that names the file
    /// and the document (and the field, for a spec that does not validate).
    #[test]
    fn any_text_gives_models_or_an_error_naming_file_and_document(
        spec in valid_spec(),
        name in model_name(),
        edits in prop::collection::vec(edit(), 0..4),
        noise in prop_oneof![Just(String::new()), ".{0,40}", "[\\[\\]{}:,&*!|>'\"#?\\- \n\ta-z0-9]{0,60}"],
    ) {
        let mut text = serde_yaml_ng::to_string(&manifest(&name, &spec)).unwrap();
        for e in &edits {
            text = apply(&text, e);
        }
        for input in [text, noise] {
            match parse_models_yaml(&input, FILE) {
                Ok(models) => prop_assert!(models.iter().all(|m| validate_model_spec(&m.spec).is_empty())),
                Err(e) => check_names_the_place(&e)?,
            }
        }
    }

    /// A valid spec, written as a MetalModel document, reads back equal: durations keep
    /// their nanoseconds, strings that look like numbers or booleans stay strings, floats
    /// keep every bit, and several documents in one file stay apart.
    #[test]
    fn any_valid_spec_written_as_yaml_reads_back_equal(specs in prop::collection::vec((model_name(), valid_spec()), 1..3)) {
        let mut text = String::new();
        for (name, spec) in &specs {
            prop_assert_eq!(validate_model_spec(spec), vec![]);
            text.push_str("---\n");
            text.push_str(&serde_yaml_ng::to_string(&MetalModel::new(name, spec.clone())).unwrap());
        }
        let models = parse_models_yaml(&text, FILE).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(models.len(), specs.len());
        for (m, (name, spec)) in models.iter().zip(&specs) {
            prop_assert_eq!(m.metadata.name.as_deref(), Some(name.as_str()));
            prop_assert_eq!(&m.spec, spec);
        }
    }

    /// A value of the wrong type anywhere (here a map where a scalar belongs) is refused with
    /// the path of that field, not only "invalid type".
    #[test]
    fn a_wrong_type_anywhere_is_refused_with_its_field_path(spec in valid_spec(), name in model_name(), pick in any::<prop::sample::Index>()) {
        let mut doc = manifest(&name, &spec);
        let mut paths = Vec::new();
        leaves(&doc, "", "", &mut paths);
        // kind and apiVersion decide whether the document is read at all.
        paths.retain(|(p, _)| p != "kind" && p != "apiVersion");
        let (path, pointer) = pick.get(&paths);
        *doc.pointer_mut(pointer).unwrap() = json!({"not": ["a", "scalar"]});
        let text = serde_yaml_ng::to_string(&doc).unwrap();
        let err = parse_models_yaml(&text, FILE).unwrap_err();
        check_names_the_place(&err)?;
        prop_assert!(err.to_string().contains(&format!("document 0: {path}: ")), "{path}: {err}");
    }

    /// A field the types do not have (a misspelling) is refused by its path, as kubectl's
    /// strict validation refuses it, rather than silently leaving the default in force.
    #[test]
    fn an_unknown_field_is_refused_by_its_path(spec in valid_spec(), name in model_name(), pick in any::<prop::sample::Index>(), key in "[a-zA-Z]{1,12}", value in prop_oneof![Just(json!("x")), Just(json!(1)), Just(json!({"a": 1}))]) {
        let mut doc = manifest(&name, &spec);
        let objects: Vec<_> = STRUCT_PATHS.iter().copied().filter(|p| at(&mut doc, p).is_some()).collect();
        let path = *pick.get(&objects);
        let object = at(&mut doc, path).unwrap();
        let key = format!("unknown{key}");
        object.as_object_mut().unwrap().insert(key.clone(), value);
        let text = serde_yaml_ng::to_string(&doc).unwrap();
        let err = parse_models_yaml(&text, FILE).unwrap_err();
        let field = if path.is_empty() { key } else { format!("{path}.{key}") };
        prop_assert!(err.to_string().contains(&format!("document 0: {field}: unknown field")), "{err}");
    }

    /// Every field a validation error names is a field of the spec as it is written, so a
    /// person can find it in the file.
    #[test]
    fn every_field_a_validation_error_names_is_in_the_written_spec(spec in any_spec()) {
        let mut doc = manifest("m", &spec);
        for e in validate_model_spec(&spec) {
            prop_assert!(at(&mut doc, &e.field).is_some(), "{} is not a field of {}", e.field, doc);
            prop_assert!(!e.problem.is_empty() && !e.allowed.is_empty(), "{e}");
        }
    }

    /// Durations are written only in the units the CRD's pattern allows (no days or years,
    /// which the API server would refuse) and read back to the nanosecond.
    #[test]
    fn written_durations_match_the_crd_pattern_and_read_back_exactly(secs in prop_oneof![0u64..100_000, any::<u64>()], nanos in prop_oneof![Just(0u32), 0u32..1_000_000_000]) {
        let d = Duration(std::time::Duration::new(secs, nanos));
        let written = serde_json::to_value(d).unwrap();
        let text = written.as_str().unwrap();
        prop_assert!(duration_pattern().is_match(text), "{text:?}");
        prop_assert_eq!(serde_json::from_value::<Duration>(written.clone()).unwrap(), d);
    }

    /// Whatever the CRD's pattern lets through `kubectl apply` the types read: a MetalModel
    /// the API server stores but the controller cannot deserialize would fail its whole list.
    /// The strings come from the schema's own pattern.
    #[test]
    fn durations_the_crd_pattern_accepts_are_read(text in pattern_strings()) {
        prop_assert!(duration_pattern().is_match(&text), "{text:?}");
        let parsed: Result<Duration, _> = serde_json::from_value(json!(text));
        prop_assert!(parsed.is_ok(), "{text:?}: {parsed:?}");
    }
}

fn schema_pattern() -> String {
    let schema = serde_json::to_value(schemars::schema_for!(Duration)).unwrap();
    schema["pattern"].as_str().unwrap().to_owned()
}

fn duration_pattern() -> regex::Regex {
    regex::Regex::new(&schema_pattern()).unwrap()
}

/// Strings of the schema's pattern (its anchors dropped: generation needs none).
fn pattern_strings() -> impl Strategy<Value = String> {
    let pattern = schema_pattern();
    let body = pattern.trim_start_matches('^').trim_end_matches('$');
    proptest::string::string_regex(body).unwrap()
}

#[test]
fn the_longest_duration_is_written_in_hours_and_read_back() {
    let d = Duration(std::time::Duration::MAX);
    let written = serde_json::to_value(d).unwrap();
    assert_eq!(written, "5124095576030431h15s999ms999us999ns");
    assert_eq!(serde_json::from_value::<Duration>(written).unwrap(), d);
}

#[test]
fn node_selector_keys_that_look_like_other_types_stay_strings() {
    let mut spec = valid_spec_example();
    spec.node_selector = BTreeMap::from([("0x10".into(), "yes".into()), ("~".into(), "1e3".into())]);
    let text = serde_yaml_ng::to_string(&MetalModel::new("m", spec.clone())).unwrap();
    assert_eq!(parse_models_yaml(&text, FILE).unwrap()[0].spec, spec);
}

fn valid_spec_example() -> MetalModelSpec {
    MetalModelSpec::for_source("file:///m.gguf")
}
