//! The objects, kept in memory with Kubernetes' write semantics where the controller relies on
//! them: resource versions and optimistic concurrency, generation bumps on spec changes, status
//! as a subresource, finalizers and deletionTimestamp, merge patches, and an event history so a
//! watch can resume from any resource version.
//!
//! Simplifications (documented, deliberate): server-side apply is a JSON merge patch that
//! creates the object if missing, with no field ownership and no removal of fields a manager
//! stops applying, except on the status subresource, where the applied status replaces the old
//! one (right when one manager owns the whole status, as metalkube's controller does); strategic merge patch is treated as a merge patch; JSON patch is applied
//! whole (no resourceVersion precondition beyond its own `test` operations); no admission
//! webhooks, no garbage collection of owned objects.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use super::resources::Resource;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: String) -> Self {
        Self { code, reason, message }
    }
    pub fn not_found(r: &Resource, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{}.{} \"{name}\" not found", r.plural, r.group))
    }
    pub fn bad_request(message: String) -> Self {
        Self::new(400, "BadRequest", message)
    }
    pub fn invalid(message: String) -> Self {
        Self::new(422, "Invalid", message)
    }

    /// A `metav1.Status`, as the API server sends errors.
    pub fn status(&self) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "code": self.code})
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Main,
    Status,
}

/// The object a write is for, and which part of it: the main resource or its status.
#[derive(Debug, Clone, Copy)]
pub struct ObjectPart<'a> {
    pub resource: &'a Resource,
    pub namespace: Option<&'a str>,
    pub name: &'a str,
    pub part: Part,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WatchEvent {
    pub resource: Resource,
    pub namespace: Option<String>,
    pub kind: &'static str,
    pub object: Value,
    pub resource_version: u64,
}

type Key = (&'static str, &'static str, Option<String>, String);

struct Inner {
    resource_version: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<WatchEvent>,
}

/// Checks an object before it is stored; `Err` is the reason it is invalid.
pub type Validator = Box<dyn Fn(&Resource, &Value) -> Result<(), String> + Send + Sync>;

pub struct Store {
    inner: Mutex<Inner>,
    live: broadcast::Sender<WatchEvent>,
    validator: Option<Validator>,
}

fn key(r: &Resource, ns: Option<&str>, name: &str) -> Key {
    (r.group, r.plural, ns.map(str::to_owned), name.to_owned())
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in patch {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn meta(obj: &Value, field: &str) -> Option<Value> {
    obj.get("metadata").and_then(|m| m.get(field)).cloned()
}

fn set_meta(obj: &mut Value, field: &str, value: Value) {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"][field] = value;
}

/// Now, serialized the way `metav1.Time` is.
fn now() -> Value {
    let t = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    serde_json::to_value(t).unwrap_or(Value::Null)
}

fn finalizers_empty(obj: &Value) -> bool {
    meta(obj, "finalizers").and_then(|f| f.as_array().map(Vec::is_empty)).unwrap_or(true)
}

impl Default for Store {
    fn default() -> Self {
        let (live, _) = broadcast::channel(4096);
        Self {
            inner: Mutex::new(Inner { resource_version: 1, objects: BTreeMap::new(), history: Vec::new() }),
            live,
            validator: None,
        }
    }
}

impl Store {
    pub fn with_validator(validator: Validator) -> Self {
        Self { validator: Some(validator), ..Self::default() }
    }

    fn check(&self, r: &Resource, obj: &Value) -> Result<(), ApiError> {
        match &self.validator {
            Some(v) => v(r, obj).map_err(ApiError::invalid),
            None => Ok(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, inner: &mut Inner, r: &Resource, ns: Option<&str>, kind: &'static str, object: Value) {
        let event = WatchEvent {
            resource: *r,
            namespace: ns.map(str::to_owned),
            kind,
            object,
            resource_version: inner.resource_version,
        };
        inner.history.push(event.clone());
        let _ = self.live.send(event);
    }

    fn bump(inner: &mut Inner, obj: &mut Value) {
        inner.resource_version += 1;
        set_meta(obj, "resourceVersion", Value::String(inner.resource_version.to_string()));
    }

    pub fn create(&self, r: &Resource, ns: Option<&str>, mut obj: Value) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let name = match (meta(&obj, "name"), meta(&obj, "generateName")) {
            (Some(Value::String(n)), _) if !n.is_empty() => n,
            (_, Some(Value::String(prefix))) => format!("{prefix}{:05x}", inner.resource_version % 0xfffff),
            _ => return Err(ApiError::invalid("metadata.name: Required value".into())),
        };
        let k = key(r, ns, &name);
        if inner.objects.contains_key(&k) {
            return Err(ApiError::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", r.plural)));
        }
        set_meta(&mut obj, "name", Value::String(name));
        if let Some(ns) = ns {
            set_meta(&mut obj, "namespace", Value::String(ns.to_owned()));
        }
        set_meta(&mut obj, "uid", Value::String(format!("uid-{}-{}", r.plural, inner.resource_version)));
        set_meta(&mut obj, "creationTimestamp", now());
        set_meta(&mut obj, "generation", json!(1));
        obj["apiVersion"] = Value::String(r.api_version());
        obj["kind"] = Value::String(r.kind.to_owned());
        if r.status_subresource
            && let Some(o) = obj.as_object_mut()
        {
            o.remove("status");
        }
        self.check(r, &obj)?;
        Self::bump(&mut inner, &mut obj);
        inner.objects.insert(k, obj.clone());
        self.record(&mut inner, r, ns, "ADDED", obj.clone());
        Ok(obj)
    }

    pub fn get(&self, r: &Resource, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        self.lock().objects.get(&key(r, ns, name)).cloned().ok_or_else(|| ApiError::not_found(r, name))
    }

    /// Objects of `r` (in `ns`, or everywhere), and the resource version of the list.
    pub fn list(&self, r: &Resource, ns: Option<&str>) -> (Vec<Value>, u64) {
        let inner = self.lock();
        let items = inner
            .objects
            .iter()
            .filter(|((g, p, n, _), _)| *g == r.group && *p == r.plural && (ns.is_none() || n.as_deref() == ns))
            .map(|(_, v)| v.clone())
            .collect();
        (items, inner.resource_version)
    }

    /// Writes `new` over the stored object, with the rules of a PUT on `part`.
    fn write(&self, at: ObjectPart<'_>, new: Value, check_version: bool) -> Result<Value, ApiError> {
        let ObjectPart { resource: r, namespace: ns, name, part } = at;
        let mut inner = self.lock();
        let k = key(r, ns, name);
        let old = inner.objects.get(&k).cloned().ok_or_else(|| ApiError::not_found(r, name))?;
        if check_version
            && let Some(Value::String(v)) = meta(&new, "resourceVersion")
            && Some(Value::String(v.clone())) != meta(&old, "resourceVersion")
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    r.plural
                ),
            ));
        }
        let obj = match part {
            Part::Status => {
                let mut o = old.clone();
                o["status"] = new.get("status").cloned().unwrap_or(Value::Null);
                o
            }
            Part::Main => {
                let mut o = new;
                if r.status_subresource {
                    o["status"] = old.get("status").cloned().unwrap_or(Value::Null);
                    if o["status"].is_null()
                        && let Some(m) = o.as_object_mut()
                    {
                        m.remove("status");
                    }
                }
                // Identity and server-owned fields stay the server's.
                for field in ["name", "namespace", "uid", "creationTimestamp", "deletionTimestamp", "generation"] {
                    match meta(&old, field) {
                        Some(v) => set_meta(&mut o, field, v),
                        None => {
                            if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
                                m.remove(field);
                            }
                        }
                    }
                }
                o["apiVersion"] = Value::String(r.api_version());
                o["kind"] = Value::String(r.kind.to_owned());
                if o.get("spec") != old.get("spec") {
                    let generation = meta(&old, "generation").and_then(|g| g.as_i64()).unwrap_or(1);
                    set_meta(&mut o, "generation", json!(generation + 1));
                }
                o
            }
        };
        if obj == old {
            return Ok(old);
        }
        self.check(r, &obj)?;
        Ok(self.commit(&mut inner, r, ns, k, obj))
    }

    /// Stores a changed object under a new resource version, or removes it when it is being
    /// deleted and no finalizer holds it any more, and tells the watchers which it was.
    fn commit(&self, inner: &mut Inner, r: &Resource, ns: Option<&str>, k: Key, mut obj: Value) -> Value {
        Self::bump(inner, &mut obj);
        if meta(&obj, "deletionTimestamp").is_some() && finalizers_empty(&obj) {
            inner.objects.remove(&k);
            self.record(inner, r, ns, "DELETED", obj.clone());
        } else {
            inner.objects.insert(k, obj.clone());
            self.record(inner, r, ns, "MODIFIED", obj.clone());
        }
        obj
    }

    pub fn replace(&self, at: ObjectPart<'_>, new: Value) -> Result<Value, ApiError> {
        self.write(at, new, true)
    }

    /// A merge patch; with `create`, a missing object is created from the patch (the server-side
    /// apply case).
    pub fn patch(&self, at: ObjectPart<'_>, patch: &Value, create: bool) -> Result<Value, ApiError> {
        let ObjectPart { resource: r, namespace: ns, name, part } = at;
        let current = match self.get(r, ns, name) {
            Ok(v) => v,
            Err(e) if e.code == 404 && create && part == Part::Main => {
                let mut obj = patch.clone();
                set_meta(&mut obj, "name", Value::String(name.to_owned()));
                return self.create(r, ns, obj);
            }
            Err(e) => return Err(e),
        };
        let mut merged = current.clone();
        if create && part == Part::Status {
            // Server-side apply of a status that one field manager owns whole: what it no
            // longer applies is gone, as a real API server would remove it.
            merged["status"] = patch.get("status").cloned().unwrap_or(Value::Null);
        } else {
            merge_patch(&mut merged, patch);
        }
        // A patch that names a resource version must match, as with a PUT.
        let check = meta(patch, "resourceVersion").is_some();
        self.write(at, merged, check)
    }

    /// An RFC 6902 JSON patch (kube-runtime's finalizer helper uses its `test` operation to
    /// make finalizer edits conditional).
    pub fn json_patch(&self, at: ObjectPart<'_>, ops: &Value) -> Result<Value, ApiError> {
        let ObjectPart { resource: r, namespace: ns, name, .. } = at;
        let current = self.get(r, ns, name)?;
        // Like the real API server, a `test` for null passes on a path that does not exist.
        let ops: Vec<Value> = ops
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|op| {
                        let absent_null_test = op["op"] == "test"
                            && op["value"].is_null()
                            && op["path"].as_str().is_some_and(|p| current.pointer(p).is_none());
                        !absent_null_test
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let ops: json_patch::Patch =
            serde_json::from_value(Value::Array(ops)).map_err(|e| ApiError::bad_request(format!("JSON patch: {e}")))?;
        let mut patched = current.clone();
        json_patch::patch(&mut patched, &ops).map_err(|e| ApiError::invalid(format!("JSON patch: {e}")))?;
        self.write(at, patched, false)
    }

    pub fn delete(&self, r: &Resource, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let k = key(r, ns, name);
        let mut obj = inner.objects.get(&k).cloned().ok_or_else(|| ApiError::not_found(r, name))?;
        if meta(&obj, "deletionTimestamp").is_some() {
            return Ok(obj);
        }
        set_meta(&mut obj, "deletionTimestamp", now());
        Ok(self.commit(&mut inner, r, ns, k, obj))
    }

    /// Events after `since` for `r` (in `ns`, or everywhere), then a live feed of later ones.
    pub fn watch(
        &self,
        r: &Resource,
        ns: Option<&str>,
        since: u64,
    ) -> (Vec<WatchEvent>, broadcast::Receiver<WatchEvent>) {
        let inner = self.lock();
        let past = inner
            .history
            .iter()
            .filter(|e| {
                e.resource == *r && (ns.is_none() || e.namespace.as_deref() == ns) && e.resource_version > since
            })
            .cloned()
            .collect();
        (past, self.live.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources::find;

    fn at(r: &Resource, part: Part) -> ObjectPart<'_> {
        ObjectPart { resource: r, namespace: Some("ns"), name: "m", part }
    }

    fn models() -> &'static Resource {
        find("metalkube.dev", "v1alpha1", "metalmodels").unwrap()
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut t = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge_patch(&mut t, &json!({"a": {"b": null, "e": 3}, "d": [2]}));
        assert_eq!(t, json!({"a": {"c": 2, "e": 3}, "d": [2]}));
    }

    #[test]
    fn versions_generation_status_and_finalizers() {
        let s = Store::default();
        let r = models();
        let created = s
            .create(
                r,
                Some("ns"),
                json!({"metadata": {"name": "m", "finalizers": ["x"]}, "spec": {"a": 1}, "status": {"z": 1}}),
            )
            .unwrap();
        assert!(created.get("status").is_none(), "status is not set on create");
        let rv = meta(&created, "resourceVersion").unwrap();

        let st = s.patch(at(r, Part::Status), &json!({"status": {"ready": 1}}), false).unwrap();
        assert_eq!(meta(&st, "generation"), Some(json!(1)), "status writes do not bump the generation");
        let spec = s.patch(at(r, Part::Main), &json!({"spec": {"a": 2}, "status": {"ready": 9}}), false).unwrap();
        assert_eq!(meta(&spec, "generation"), Some(json!(2)));
        assert_eq!(spec["status"], json!({"ready": 1}), "main writes leave status alone");

        let mut stale = created.clone();
        stale["spec"] = json!({"a": 3});
        assert_eq!(s.replace(at(r, Part::Main), stale).unwrap_err().code, 409, "rv {rv} is stale");

        let deleting = s.delete(r, Some("ns"), "m").unwrap();
        assert!(meta(&deleting, "deletionTimestamp").is_some());
        assert!(s.get(r, Some("ns"), "m").is_ok(), "a finalizer holds the object");
        s.patch(at(r, Part::Main), &json!({"metadata": {"finalizers": null}}), false).unwrap();
        assert_eq!(s.get(r, Some("ns"), "m").unwrap_err().code, 404, "gone once the last finalizer is removed");

        let (events, _) = s.watch(r, None, 0);
        let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["ADDED", "MODIFIED", "MODIFIED", "MODIFIED", "DELETED"]);
    }
}
