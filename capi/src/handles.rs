//! The handle registry. A handle is a number that names one live object of one kind; C
//! never holds a pointer into Rust memory. Numbers are never reused, so a freed handle stays
//! invalid forever, and every lookup checks that the handle is live and of the kind the call
//! expects: using a freed, never-issued or wrong-kind handle is an error code, not undefined
//! behaviour.

use crate::error::{AnetrainStatus, Res, fail};
use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

struct Entry {
    kind: &'static str,
    object: Arc<dyn Any + Send + Sync>,
}

struct Registry {
    /// The next handle to issue; every handle below it was issued once.
    next: u64,
    live: BTreeMap<u64, Entry>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { next: 1, live: BTreeMap::new() });

fn registry() -> MutexGuard<'static, Registry> {
    // The registry's own operations cannot panic midway, so a poisoned lock holds a
    // consistent map.
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// An object kind that can be named by a handle.
pub(crate) trait Kind: Send + 'static {
    /// The kind as the messages name it ("model", "trainer", …).
    const NAME: &'static str;
}

/// Registers `object` and returns its new handle.
pub(crate) fn insert<T: Kind>(object: T) -> u64 {
    let mut r = registry();
    let id = r.next;
    r.next += 1;
    r.live.insert(id, Entry { kind: T::NAME, object: Arc::new(Mutex::new(object)) });
    id
}

fn why_not_live(r: &Registry, id: u64, want: &str) -> String {
    if id == 0 || id >= r.next {
        format!("{want} handle {id} was never issued (initialise handles by a successful call that creates them)")
    } else {
        format!("{want} handle {id} was already freed")
    }
}

/// The live object of kind `T` behind `id`.
pub(crate) fn get<T: Kind>(id: u64) -> Res<Arc<Mutex<T>>> {
    let r = registry();
    let Some(entry) = r.live.get(&id) else {
        return Err(fail(AnetrainStatus::BadHandle, why_not_live(&r, id, T::NAME)));
    };
    entry
        .object
        .clone()
        .downcast::<Mutex<T>>()
        .map_err(|_| fail(AnetrainStatus::BadHandle, format!("handle {id} is a {}, not a {}", entry.kind, T::NAME)))
}

/// Locks an object for one call. A second call on the same object while the first runs
/// (another thread, or a callback re-entering) gets `BUSY` rather than a deadlock.
pub(crate) fn lock<T: Kind>(object: &Mutex<T>) -> Res<MutexGuard<'_, T>> {
    match object.try_lock() {
        Ok(g) => Ok(g),
        Err(TryLockError::WouldBlock) => Err(fail(
            AnetrainStatus::Busy,
            format!("the {} is in use by another call (another thread, or a callback of its own call)", T::NAME),
        )),
        Err(TryLockError::Poisoned(_)) => Err(fail(
            AnetrainStatus::Failed,
            format!("the {} was left unusable by an earlier internal error; free it", T::NAME),
        )),
    }
}

/// Removes `id` (of kind `T`) from the registry. A call still running on the object keeps it
/// alive until it returns; the handle is invalid from now on.
pub(crate) fn remove<T: Kind>(id: u64) -> Res<()> {
    let mut r = registry();
    match r.live.get(&id) {
        None => Err(fail(AnetrainStatus::BadHandle, why_not_live(&r, id, T::NAME))),
        Some(e) if e.kind != T::NAME => {
            Err(fail(AnetrainStatus::BadHandle, format!("handle {id} is a {}, not a {}", e.kind, T::NAME)))
        }
        Some(_) => {
            let entry = r.live.remove(&id);
            // A model's weights are freed outside the registry's lock.
            drop(r);
            drop(entry);
            Ok(())
        }
    }
}
