//! Waiting for a reflector store's first list, safely from many tasks at once.
//!
//! kube-runtime's `Store::wait_until_ready` shares one oneshot receiver between every waiter, and
//! a oneshot receiver keeps only the waker of the last task that polled it: when the first list
//! lands, that task is woken and every other waiter sleeps on until something else wakes it. A new
//! leader starts up to sixteen reconciles at once, each waiting for the stores, and the ones not
//! woken hung until the reconcile time-out cut them short two minutes later (found by
//! `cargo xtask bench fleet`: failovers and cold restarts that took 120 s). Here each waiter looks
//! again on its own every `RECHECK`, so a lost wake-up costs at most that.

use std::time::Duration;

use kube::runtime::reflector::Store;
use kube::runtime::reflector::store::WriterDropped;

/// How often a waiter looks at the store again by itself.
const RECHECK: Duration = Duration::from_millis(100);

/// Resolves once `store` holds its first full list (at once when it already does), or with an
/// error when its writer is gone without one.
pub async fn until_ready<K>(store: &Store<K>) -> Result<(), WriterDropped>
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        if let Ok(ready) = tokio::time::timeout(RECHECK, store.wait_until_ready()).await {
            return ready;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::reflector;
    use kube::runtime::watcher::Event;

    /// Many tasks wait at once, as a new leader's reconciles do; every one of them must see the
    /// first list, not only the last to have waited.
    #[tokio::test]
    async fn every_waiter_sees_the_first_list() {
        let (store, mut writer) = reflector::store::<ConfigMap>();
        let waiters: Vec<_> = (0..16)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { until_ready(&store).await })
            })
            .collect();
        // Let every waiter poll (and register its waker) before the list lands.
        tokio::time::sleep(Duration::from_millis(50)).await;
        writer.apply_watcher_event(&Event::Init);
        writer.apply_watcher_event(&Event::InitDone);
        for w in waiters {
            let done = tokio::time::timeout(Duration::from_secs(5), w).await;
            assert!(matches!(done, Ok(Ok(Ok(())))), "a waiter was never woken: {done:?}");
        }
    }

    #[tokio::test]
    async fn a_ready_store_answers_at_once_and_a_dropped_writer_is_an_error() {
        let (store, mut writer) = reflector::store::<ConfigMap>();
        writer.apply_watcher_event(&Event::Init);
        writer.apply_watcher_event(&Event::InitDone);
        assert!(until_ready(&store).await.is_ok());

        let (never, writer) = reflector::store::<ConfigMap>();
        drop(writer);
        assert!(until_ready(&never).await.is_err());
    }
}
