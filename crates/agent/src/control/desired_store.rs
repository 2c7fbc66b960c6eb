//! Desired models the controller asked for, persisted under the state dir, so the agent keeps
//! serving them across its own restarts and through a controller or API-server outage
//! (static stability).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use metalkube_api::{MetalModelSpec, ModelKey};
use serde::{Deserialize, Serialize};

use crate::confined_path::{PathOutside, inside};
use crate::model::DesiredModel;
use crate::model::Token;
use crate::model::api_keys::{ApiKeys, KeyDigest};

/// A SHA-256 digest written as 64 hex characters.
pub fn hex_digest(hex: &str) -> Option<KeyDigest> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub generation: i64,
    pub spec: MetalModelSpec,
    /// SHA-256 digests (hex) of the accepted API keys when `spec.auth` asks for keys; never keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_key_sha256: Vec<String>,
    /// The hub token from spec.model.tokenSecretRef, kept so a download can resume after an
    /// agent restart without the controller (the store is the agent's, 0600 like its TLS key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_token: Option<Token>,
}

impl Record {
    pub fn key(&self) -> ModelKey {
        ModelKey::new(&self.namespace, &self.name)
    }

    pub fn desired(&self) -> DesiredModel {
        DesiredModel {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            spec: self.spec.clone(),
            base_dir: None,
            api_keys: self.api_keys(),
            hub_token: self.hub_token.clone(),
        }
    }

    /// The keys as the serving port checks them: open without `spec.auth`; with it, the digests
    /// recorded (none readable: nobody gets in).
    pub fn api_keys(&self) -> ApiKeys {
        if self.spec.auth.is_none() {
            return ApiKeys::Open;
        }
        ApiKeys::Digests(self.api_key_sha256.iter().filter_map(|h| hex_digest(h)).collect())
    }
}

/// Why the store cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DesiredStoreError {
    #[error("state directory {}: {source}", path.display())]
    StateDir { path: PathBuf, source: std::io::Error },
    /// A namespace or name that would put the record outside the store.
    #[error(transparent)]
    RecordPath(#[from] PathOutside),
}

pub struct DesiredStore {
    dir: PathBuf,
    records: Mutex<BTreeMap<ModelKey, Record>>,
}

impl DesiredStore {
    /// Opens (and reads) the store in `dir`. Unreadable records are reported and skipped: one
    /// corrupt file must not stop the others from being served.
    pub fn open(dir: &Path) -> Result<Self, DesiredStoreError> {
        let io = |source| DesiredStoreError::StateDir { path: dir.to_owned(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut records = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(io)?.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path).map(|b| serde_json::from_slice::<Record>(&b)) {
                Ok(Ok(r)) => {
                    records.insert(r.key(), r);
                }
                Ok(Err(e)) => tracing::error!("{}: not a desired-model record ({e}); skipped", path.display()),
                Err(e) => tracing::error!("{}: {e}; skipped", path.display()),
            }
        }
        Ok(Self { dir: dir.to_owned(), records: Mutex::new(records) })
    }

    /// The record's file; a name that would put it outside the store is refused.
    fn file(&self, namespace: &str, name: &str) -> Result<PathBuf, DesiredStoreError> {
        Ok(inside(&self.dir, &[&format!("{namespace}_{name}.json")])?)
    }

    pub fn all(&self) -> Vec<Record> {
        self.lock().values().cloned().collect()
    }

    pub fn get(&self, key: &ModelKey) -> Option<Record> {
        self.lock().get(key).cloned()
    }

    /// Writes the record (temp file and rename, so a crash never leaves half a record).
    pub fn put(&self, record: Record) -> Result<(), DesiredStoreError> {
        let path = self.file(&record.namespace, &record.name)?;
        let io = |source| DesiredStoreError::StateDir { path: path.clone(), source };
        let json = serde_json::to_vec_pretty(&record).map_err(|e| io(std::io::Error::other(e)))?;
        let tmp = path.with_extension("json.tmp");
        // Owner-only: a record may hold a hub token. A leftover temp file would keep its mode.
        let _ = std::fs::remove_file(&tmp);
        let mut file =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
        file.write_all(&json).map_err(io)?;
        // Durable in order: the record's bytes before the rename makes them the record, and the
        // directory after it, so a power cut leaves the old record or the new one, never an
        // empty file under the record's name.
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io)?;
        self.lock().insert(record.key(), record);
        Ok(())
    }

    pub fn remove(&self, key: &ModelKey) -> Result<bool, DesiredStoreError> {
        let path = self.file(&key.namespace, &key.name)?;
        match std::fs::remove_file(&path) {
            // The removal is durable once the directory is: a stopped model must not come back
            // after a power cut.
            Ok(()) => std::fs::File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|source| DesiredStoreError::StateDir { path: path.clone(), source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(DesiredStoreError::StateDir { path, source }),
        }
        Ok(self.lock().remove(key).is_some())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ModelKey, Record>> {
        metalkube_runtime::sync::lock(&self.records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, generation: i64) -> Record {
        let spec = serde_json::from_value(serde_json::json!({"model": {"source": "file:///m.gguf"}})).unwrap();
        Record {
            namespace: "ns".into(),
            name: name.into(),
            uid: "u1".into(),
            generation,
            spec,
            api_key_sha256: vec![],
            hub_token: None,
        }
    }

    #[test]
    fn survives_a_reopen_and_skips_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = DesiredStore::open(dir.path()).unwrap();
        store.put(record("a", 1)).unwrap();
        store.put(record("a", 2)).unwrap();
        store.put(record("b", 1)).unwrap();
        assert!(store.remove(&ModelKey::new("ns", "b")).unwrap());
        assert!(!store.remove(&ModelKey::new("ns", "b")).unwrap());
        std::fs::write(dir.path().join("junk.json"), "{").unwrap();
        let reopened = DesiredStore::open(dir.path()).unwrap();
        assert_eq!(reopened.all(), vec![record("a", 2)]);
    }

    /// A name that is a path never writes or removes a file outside the store.
    #[test]
    fn a_name_that_is_a_path_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let store = DesiredStore::open(&root.path().join("desired")).unwrap();
        let mut escaping = record("x", 1);
        escaping.namespace = "../..".into();
        let err = store.put(escaping).unwrap_err().to_string();
        assert!(err.contains("path separator"), "{err}");
        std::fs::write(root.path().join("x.json"), "{}").unwrap();
        assert!(store.remove(&ModelKey::new("..", "/../x")).is_err());
        assert!(root.path().join("x.json").exists(), "a file outside the store was removed");
        assert!(store.all().is_empty());
    }
}
