//! The workspace's one policy for a lock poisoned by a panic: its data is used, with an error
//! logged. Every structure behind these locks is changed by single inserts, removals or
//! replacements, so a panic elsewhere while the lock was held leaves it whole; treating it as
//! empty instead would make every agent look unreachable and pull every endpoint.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

fn recovered<G>(poisoned: PoisonError<G>) -> G {
    tracing::error!("a lock was poisoned by a panic while it was held; using the data it guards");
    poisoned.into_inner()
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(recovered)
}

pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(recovered)
}

pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(recovered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_gives_its_data() {
        let m = Mutex::new(vec![1, 2]);
        let l = RwLock::new(7);
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _held = m.lock();
            let _written = l.write();
            panic!("a bug while holding both");
        }));
        assert!(m.is_poisoned() && l.is_poisoned());
        assert_eq!(*lock(&m), [1, 2]);
        assert_eq!(*read(&l), 7);
        *write(&l) = 8;
        assert_eq!(*read(&l), 8);
    }
}
