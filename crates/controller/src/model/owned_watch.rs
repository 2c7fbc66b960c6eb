//! Mirrors what the controller writes for its models (their Services and EndpointSlices, found by
//! the managed-by label) into stores the reconciles compare against, and reconciles a model when
//! one of its objects changes or goes (someone edited or deleted it). With the mirror, a reconcile
//! that finds everything as wanted sends nothing: no apply "just in case", no list per model.

use futures::TryStreamExt;
use kube::runtime::reflector::{ObjectRef, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use metalkube_api::MetalModel;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

/// The model that owns `object`, by its owner reference.
fn owner_of<K: Resource>(object: &K) -> Option<ObjectRef<MetalModel>> {
    let ns = object.namespace()?;
    object
        .owner_references()
        .iter()
        .find(|o| o.kind == "MetalModel" && o.api_version.starts_with("metalkube.dev/"))
        .map(|o| ObjectRef::new(&o.name).within(&ns))
}

/// Follows `api` (with `config`'s label selector) into `writer`, and sends the owning model of
/// each object that changes or is deleted to `triggers`. Managed fields are dropped before the
/// store keeps an object: the controller never reads them, and on a real API server they are
/// often the larger part of a small object.
pub async fn watch_owned<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    triggers: mpsc::UnboundedSender<ObjectRef<MetalModel>>,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let kind = K::kind(&()).into_owned();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|o: &mut K| o.meta_mut().managed_fields = None)
        .reflect(writer)
        .touched_objects();
    let mut stream = std::pin::pin!(stream);
    loop {
        match stream.try_next().await {
            Ok(Some(object)) => {
                if let Some(model) = owner_of(&object) {
                    let _ = triggers.send(model);
                }
            }
            Ok(None) => return,
            Err(e) => tracing::warn!("watching the models' {kind}s: {e}"),
        }
    }
}
