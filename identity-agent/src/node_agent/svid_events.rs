//! The SVID store's withdrawals and trust-bundle changes, forwarded to the auth manager.

use crate::auth_manager::AuthManagerHandle;
use crate::svid::SvidStore;

/// Tells `manager` of every SVID the store withdraws and of every change of the trust bundles
/// after the first ones (the first sync takes nothing away that was proven), until the store
/// goes.
pub fn forward_svid_events(store: &SvidStore, manager: AuthManagerHandle) -> tokio::task::JoinHandle<()> {
    use tokio::sync::broadcast::error::RecvError;
    let mut withdrawals = store.subscribe_withdrawals();
    let mut bundles = store.watch_bundles();
    let mut had_bundles = !bundles.borrow_and_update().is_empty();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                withdrawn = withdrawals.recv() => match withdrawn {
                    Ok(id) => manager.withdrawn(id.to_string()),
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "missed SVID withdrawals; their pairs' re-authentication fails and removes them");
                    }
                    Err(RecvError::Closed) => return,
                },
                changed = bundles.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if had_bundles {
                        manager.bundles_changed();
                    }
                    had_bundles = !bundles.borrow_and_update().is_empty();
                }
            }
        }
    })
}
