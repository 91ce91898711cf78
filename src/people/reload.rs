//! Keeps the store's people in line with the `[people]` file: the first
//! mapping at start-up, then every mapping [`PeopleWatch`] publishes
//! (SIGHUP, a changed file), each reconciled off the async workers, and the
//! watcher's status copied for `GET /v1/people`.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{MappingStatus, ReloadError};
use crate::config::people::{Mapping, PeopleWatch, ReloadStatus};
use crate::presence::Store;

/// The status `GET /v1/people` shows for the watcher's.
fn status_of(status: &ReloadStatus, mapping: &Mapping) -> MappingStatus {
    MappingStatus {
        version: status.version,
        people: status.people,
        file: status.file.display().to_string(),
        loaded_at: Some(status.loaded_at),
        match_equal_principals: mapping.match_equal_principals,
        last_error: status.last_error.as_ref().map(|(message, at)| ReloadError {
            message: message.clone(),
            at: *at,
        }),
    }
}

/// Shows the watcher's status in `GET /v1/people` now (at start-up, before
/// the first request).
pub fn show_status(store: &Store, watch: &PeopleWatch) {
    store
        .people()
        .set_status(status_of(&watch.status(), &watch.current()));
}

/// Reconciles the store's people with `mapping` (off the async workers;
/// with Redis, once the mirror is loaded: see [`Store::reconcile_people_async`]).
async fn reconcile(store: &Arc<Store>, mapping: Arc<Mapping>) {
    let version = mapping.version;
    let done = store.reconcile_people_async(mapping).await;
    tracing::info!(
        version,
        people = done.people,
        changed = done.changed,
        removed = done.removed,
        "people mapping in use"
    );
}

/// Puts the watcher's current mapping in use, then follows it until
/// `shutdown`.
pub async fn follow(store: Arc<Store>, watch: PeopleWatch, shutdown: CancellationToken) {
    let mut mappings = watch.subscribe();
    let mut statuses = watch.subscribe_status();
    let current = Arc::clone(&mappings.borrow_and_update());
    store
        .people()
        .set_status(status_of(&statuses.borrow_and_update(), &current));
    reconcile(&store, current).await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = mappings.changed() => {
                if changed.is_err() {
                    return;
                }
                let mapping = Arc::clone(&mappings.borrow_and_update());
                reconcile(&store, Arc::clone(&mapping)).await;
                store.people().set_status(status_of(&watch.status(), &mapping));
            }
            changed = statuses.changed() => {
                if changed.is_err() {
                    return;
                }
                let status = statuses.borrow_and_update().clone();
                let mapping = watch.current();
                store.people().set_status(status_of(&status, &mapping));
            }
        }
    }
}
