//! Standalone mode: MetalModel YAML files in a directory are the desired state, like kubelet's
//! static pods. Changes are picked up as the filesystem reports them.
//!
//! A file that stops parsing keeps its models running on their last good spec (and the error is
//! reported), so a typo while editing never takes a serving model down. A model defined in two
//! files stays with the file that defined it first; the other is reported as ignored.
//!
//! API keys (`spec.auth.apiKeySecretRef {name, key}`) are read from `<secrets-dir>/<name>/<key>`,
//! the layout of a mounted Kubernetes Secret, hashed at once, and read again when they change. A
//! key file that is missing or unreadable lets nobody in, and says so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use metalkube_api::{DEFAULT_NAMESPACE, ModelKey, parse_models_yaml};
use notify::{RecursiveMode, Watcher};

use crate::agent::Agent;
use crate::confined_path::{PathOutside, inside};
use crate::model::DesiredModel;
use crate::model::api_keys::{ApiKeys, digests_of_key_lines};

/// Events often come in bursts (an editor writes, renames, chmods): wait this long for quiet.
const SETTLE: Duration = Duration::from_millis(150);

/// Why the models directory cannot be followed, or a model's API keys cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ModelsDirError {
    /// Reading or watching the directory (`--models-dir`, `--secrets-dir`) failed.
    #[error("models directory {}: {message}", path.display())]
    Unreadable { path: PathBuf, message: String },
    #[error("{model}: {} holds no API key; nobody is let in", path.display())]
    ApiKeysEmpty { model: ModelKey, path: PathBuf },
    #[error("{model}: cannot read its API keys from {}; nobody is let in until the file is there", path.display())]
    ApiKeysUnreadable {
        model: ModelKey,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A Secret name or key that would put the key file outside the secrets directory.
    #[error(transparent)]
    ApiKeysPath(#[from] PathOutside),
}

#[derive(Default)]
pub struct ModelsDir {
    dir: PathBuf,
    secrets_dir: PathBuf,
    last_good: BTreeMap<PathBuf, Vec<DesiredModel>>,
    /// Model key → the file whose definition of it is served.
    owners: BTreeMap<ModelKey, PathBuf>,
}

pub struct Scan {
    pub models: Vec<DesiredModel>,
    /// File name → what is wrong with it.
    pub errors: BTreeMap<String, String>,
}

impl ModelsDir {
    pub fn new(dir: &Path, secrets_dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            secrets_dir: secrets_dir.to_owned(),
            last_good: BTreeMap::new(),
            owners: BTreeMap::new(),
        }
    }

    /// The keys of `spec.auth` from the secrets directory; an error names the file.
    fn api_keys(&self, m: &DesiredModel) -> Result<ApiKeys, ModelsDirError> {
        let Some(auth) = &m.spec.auth else { return Ok(ApiKeys::Open) };
        let r = &auth.api_key_secret_ref;
        let path = inside(&self.secrets_dir, &[&r.name, &r.key])?;
        match std::fs::read(&path) {
            Ok(text) => {
                let digests = digests_of_key_lines(&text);
                if digests.is_empty() {
                    return Err(ModelsDirError::ApiKeysEmpty { model: m.key(), path });
                }
                Ok(ApiKeys::Digests(digests))
            }
            Err(e) => Err(ModelsDirError::ApiKeysUnreadable { model: m.key(), path, source: e }),
        }
    }

    /// Reads every `*.yaml` / `*.yml` file; files that fail keep their last good models.
    pub fn scan(&mut self) -> Result<Scan, ModelsDirError> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| ModelsDirError::Unreadable { path: self.dir.clone(), message: e.to_string() })?;
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        files.sort();
        let mut errors = BTreeMap::new();
        let mut current = BTreeMap::new();
        for file in files {
            let name = file_name(&file);
            let parsed = std::fs::read_to_string(&file)
                .map_err(|e| format!("{name}: {e}"))
                .and_then(|text| parse_models_yaml(&text, &name).map_err(|e| e.to_string()));
            match parsed {
                Ok(models) => {
                    let base = file.parent().map(Path::to_path_buf);
                    let desired = models
                        .into_iter()
                        .map(|m| {
                            let namespace = m.metadata.namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
                            let name = m.metadata.name.unwrap_or_default();
                            DesiredModel {
                                namespace,
                                name,
                                spec: m.spec,
                                base_dir: base.clone(),
                                api_keys: Default::default(),
                                hub_token: None,
                            }
                        })
                        .collect();
                    current.insert(file, desired);
                }
                Err(e) => {
                    errors.insert(name, e);
                    if let Some(prev) = self.last_good.get(&file) {
                        current.insert(file, prev.clone());
                    }
                }
            }
        }
        self.last_good = current;
        let defined: BTreeMap<&PathBuf, Vec<ModelKey>> =
            self.last_good.iter().map(|(file, ms)| (file, ms.iter().map(DesiredModel::key).collect())).collect();
        self.owners = owners_after(&self.owners, &defined);
        let mut models: Vec<DesiredModel> = Vec::new();
        for (file, ms) in &self.last_good {
            for m in ms {
                let key = m.key();
                let owner = self.owners.get(&key);
                if owner != Some(file) {
                    let owner = owner.map(|o| file_name(o)).unwrap_or_default();
                    let message = format!(
                        "MetalModel {key} is already defined in {owner}; this file's definition of it is ignored"
                    );
                    errors
                        .entry(file_name(file))
                        .and_modify(|e: &mut String| {
                            e.push_str("; ");
                            e.push_str(&message);
                        })
                        .or_insert(message);
                    continue;
                }
                let mut m = m.clone();
                m.api_keys = match self.api_keys(&m) {
                    Ok(keys) => keys,
                    Err(e) => {
                        errors.insert(format!("secrets for {key}"), metalkube_runtime::errors::chain(&e));
                        ApiKeys::Digests(Vec::new())
                    }
                };
                models.push(m);
            }
        }
        Ok(Scan { models, errors })
    }
}

/// Which file serves each model, given the previous owners and what each file defines now
/// (files in name order). Decided once: the file that defined a model first keeps it on every
/// later scan, whatever the other files are called, so a running model never changes because a
/// file with a name sorting earlier appeared. Only when the owning file is gone or no longer
/// defines the model (a file that stops parsing keeps its last good models, and so its
/// ownership) does another file take it over: the first in name order of those defining it.
fn owners_after(
    before: &BTreeMap<ModelKey, PathBuf>,
    defined: &BTreeMap<&PathBuf, Vec<ModelKey>>,
) -> BTreeMap<ModelKey, PathBuf> {
    let mut owners: BTreeMap<ModelKey, PathBuf> = before
        .iter()
        .filter(|(key, file)| defined.get(file).is_some_and(|keys| keys.contains(key)))
        .map(|(key, file)| (key.clone(), file.clone()))
        .collect();
    for (file, keys) in defined {
        for key in keys {
            owners.entry(key.clone()).or_insert_with(|| (*file).clone());
        }
    }
    owners
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Applies the directory now and again after every change (of a model file or a key file),
/// until the task is dropped.
pub async fn follow_models_dir(dir: PathBuf, secrets_dir: PathBuf, agent: Arc<Agent>) -> Result<(), ModelsDirError> {
    let mut models_dir = ModelsDir::new(&dir, &secrets_dir);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if wakes_a_scan(&event) {
            let _ = tx.send(());
        }
    })
    .map_err(|e| ModelsDirError::Unreadable { path: dir.clone(), message: e.to_string() })?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| ModelsDirError::Unreadable { path: dir.clone(), message: e.to_string() })?;
    let mut watching_secrets = false;
    let mut reported = BTreeMap::new();
    loop {
        // The secrets directory may appear after the start (the default one inside the models
        // directory, whose creation wakes a scan): watch it from then on, before scanning, so a
        // key written in between is read by this scan or wakes the next. A mounted Secret swaps
        // a symlink in its directory when it changes, hence recursive.
        if !watching_secrets && secrets_dir.is_dir() {
            watcher
                .watch(&secrets_dir, RecursiveMode::Recursive)
                .map_err(|e| ModelsDirError::Unreadable { path: secrets_dir.clone(), message: e.to_string() })?;
            watching_secrets = true;
        }
        let scan = models_dir.scan()?;
        log_changed_errors(&reported, &scan.errors);
        reported.clone_from(&scan.errors);
        agent.set_source_errors(scan.errors);
        agent.apply(scan.models).await;
        if rx.recv().await.is_none() {
            return Ok(());
        }
        // Let the burst settle, then take one scan for all of it.
        while tokio::time::timeout(SETTLE, rx.recv()).await.is_ok_and(|e| e.is_some()) {}
    }
}

/// Reading the files is an event too (inotify reports opens and closes): a scan must not wake
/// the next one, or the agent rescans forever.
fn wakes_a_scan(event: &notify::Result<notify::Event>) -> bool {
    event.as_ref().is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_)))
}

/// Says each problem once, when it appears, and once more when it is fixed; `/api/v1/models`
/// shows the current ones all along.
fn log_changed_errors(before: &BTreeMap<String, String>, now: &BTreeMap<String, String>) {
    for (source, error) in now {
        if before.get(source) != Some(error) {
            tracing::error!("{error}");
        }
    }
    for source in before.keys().filter(|s| !now.contains_key(*s)) {
        tracing::info!("{source}: fixed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: metalkube.dev/v1alpha1\nkind: MetalModel\nmetadata: {name: tiny}\nspec:\n  model: {source: 'file:tiny.gguf'}\n";

    #[test]
    fn a_broken_edit_keeps_the_last_good_spec_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tiny.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let mut md = ModelsDir::new(dir.path(), &dir.path().join("secrets"));
        let scan = md.scan().unwrap();
        assert_eq!(scan.models.len(), 1);
        assert_eq!(scan.models[0].key().to_string(), "default/tiny");
        assert_eq!(scan.models[0].base_dir.as_deref(), Some(dir.path()));

        std::fs::write(dir.path().join("tiny.yaml"), "spec: [unclosed").unwrap();
        let scan = md.scan().unwrap();
        assert_eq!(scan.models.len(), 1, "the model keeps running");
        assert!(scan.errors["tiny.yaml"].contains("tiny.yaml"), "{:?}", scan.errors);

        std::fs::remove_file(dir.path().join("tiny.yaml")).unwrap();
        assert!(md.scan().unwrap().models.is_empty(), "a deleted file removes its models");
    }

    #[test]
    fn the_same_model_in_two_files_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("b.yaml"), GOOD).unwrap();
        let scan = ModelsDir::new(dir.path(), &dir.path().join("secrets")).scan().unwrap();
        assert_eq!(scan.models.len(), 1);
        assert!(scan.errors["b.yaml"].contains("already defined in a.yaml"), "{:?}", scan.errors);
    }

    /// A second file defining a running model is the one ignored, even when its name sorts
    /// first; the running model keeps its spec through later scans, and the other file takes
    /// over only when the first one is gone.
    #[test]
    fn a_duplicate_whose_name_sorts_first_does_not_take_over_a_running_model() {
        let dir = tempfile::tempdir().unwrap();
        let running = GOOD.replace("tiny.gguf", "running.gguf");
        let duplicate = GOOD.replace("tiny.gguf", "duplicate.gguf");
        std::fs::write(dir.path().join("z-running.yaml"), &running).unwrap();
        let mut md = ModelsDir::new(dir.path(), &dir.path().join("secrets"));
        assert_eq!(md.scan().unwrap().models[0].spec.model.source, "file:running.gguf");

        std::fs::write(dir.path().join("a-duplicate.yaml"), &duplicate).unwrap();
        for _ in 0..2 {
            let scan = md.scan().unwrap();
            let sources: Vec<_> = scan.models.iter().map(|m| m.spec.model.source.as_str()).collect();
            assert_eq!(sources, ["file:running.gguf"], "the running model was taken over");
            assert_eq!(
                scan.errors.get("a-duplicate.yaml").map(String::as_str),
                Some(
                    "MetalModel default/tiny is already defined in z-running.yaml; this file's definition of it is ignored"
                )
            );
            assert!(!scan.errors.contains_key("z-running.yaml"), "{:?}", scan.errors);
        }

        // A broken edit of the owner keeps its last good spec, and its ownership.
        std::fs::write(dir.path().join("z-running.yaml"), "spec: [unclosed").unwrap();
        let scan = md.scan().unwrap();
        assert_eq!(scan.models[0].spec.model.source, "file:running.gguf");
        assert!(scan.errors["a-duplicate.yaml"].contains("z-running.yaml"), "{:?}", scan.errors);

        std::fs::remove_file(dir.path().join("z-running.yaml")).unwrap();
        let scan = md.scan().unwrap();
        assert_eq!(scan.models[0].spec.model.source, "file:duplicate.gguf", "the owner gone, the other takes over");
        assert!(scan.errors.is_empty(), "{:?}", scan.errors);
    }

    proptest::proptest! {
        /// Whatever the files define, scan after scan: every model has exactly one owner, a file
        /// that defines it; an owner that still defines its model keeps it.
        #[test]
        fn an_owner_that_still_defines_its_model_keeps_it(
            scans in proptest::collection::vec(
                proptest::collection::btree_map(0u8..4, proptest::collection::btree_set(0u8..3, 0..3), 0..4),
                1..6,
            )
        ) {
            let mut owners = BTreeMap::new();
            for scan in scans {
                let files: BTreeMap<PathBuf, Vec<ModelKey>> = scan
                    .into_iter()
                    .map(|(f, keys)| (PathBuf::from(format!("{f}.yaml")), keys.into_iter().map(|k| ModelKey::new("ns", format!("m{k}"))).collect()))
                    .collect();
                let defined: BTreeMap<&PathBuf, Vec<ModelKey>> = files.iter().map(|(f, k)| (f, k.clone())).collect();
                let next = owners_after(&owners, &defined);
                for key in defined.values().flatten() {
                    let owner = &next[key];
                    proptest::prop_assert!(defined[owner].contains(key));
                    if let Some(old) = owners.get(key) && defined.get(old).is_some_and(|k| k.contains(key)) {
                        proptest::prop_assert_eq!(owner, old);
                    }
                }
                proptest::prop_assert!(next.iter().all(|(key, file)| defined.get(file).is_some_and(|k| k.contains(key))));
                owners = next;
            }
        }
    }

    #[test]
    fn api_keys_come_from_the_secrets_dir_and_a_missing_file_lets_nobody_in() {
        let dir = tempfile::tempdir().unwrap();
        let keyed = "apiVersion: metalkube.dev/v1alpha1\nkind: MetalModel\nmetadata: {name: tiny}\nspec:\n  model: {source: 'file:tiny.gguf'}\n  auth: {apiKeySecretRef: {name: tiny-keys, key: keys}}\n";
        std::fs::write(dir.path().join("tiny.yaml"), keyed).unwrap();
        let mut md = ModelsDir::new(dir.path(), &dir.path().join("secrets"));
        let scan = md.scan().unwrap();
        assert_eq!(scan.models[0].api_keys, ApiKeys::Digests(vec![]), "no key file: nobody");
        assert!(scan.errors["secrets for default/tiny"].contains("tiny-keys/keys"), "{:?}", scan.errors);

        std::fs::create_dir_all(dir.path().join("secrets/tiny-keys")).unwrap();
        std::fs::write(dir.path().join("secrets/tiny-keys/keys"), "k1\nk2\n").unwrap();
        let scan = md.scan().unwrap();
        assert!(scan.models[0].api_keys.accepts(Some(b"k2")));
        assert!(!scan.models[0].api_keys.accepts(Some(b"k3")));
        assert!(scan.errors.is_empty(), "{:?}", scan.errors);
    }

    /// The watcher wakes for edits but not for the agent's own reads of the files.
    #[test]
    fn a_scan_does_not_wake_the_next_scan_but_an_edit_does() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if wakes_a_scan(&event) {
                let _ = tx.send(());
            }
        })
        .unwrap();
        watcher.watch(dir.path(), RecursiveMode::NonRecursive).unwrap();
        let mut models_dir = ModelsDir::new(dir.path(), &dir.path().join("secrets"));
        assert_eq!(models_dir.scan().unwrap().models.len(), 1);
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "reading the files woke a scan");
        std::fs::write(dir.path().join("a.yaml"), GOOD.replace("tiny", "other")).unwrap();
        assert!(rx.recv_timeout(Duration::from_secs(5)).is_ok(), "an edit wakes a scan");
    }
}
