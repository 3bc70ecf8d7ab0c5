//! Pod deletions ahead of the apply: when the Pod watch reports another node's pod deleted,
//! its address stops naming its identity here at once (endpoint entry and conntrack), instead
//! of after the recompile the next snapshot brings, which at cluster size is a second or more.
//! Runs beside the agent's loop, so an apply under way does not hold it up; the addresses it
//! forgot stay out of every apply until a snapshot without the pod is applied.

use super::{SharedDatapath, lock};
use crate::inputs::{DeletedPod, Snapshot};
use meshauth_policy::model::ObjectRef;
use meshauth_policy::tables::EndpointEntry;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::{broadcast, watch};

/// Forgotten addresses and the pod (`namespace/name`) each was forgotten for.
pub type Forgotten = Arc<Mutex<BTreeMap<Ipv4Addr, String>>>;

/// Follows the deletions until their sender goes.
pub fn follow(
    mut deletions: broadcast::Receiver<DeletedPod>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    datapath: SharedDatapath,
    forgotten: Forgotten,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match deletions.recv().await {
                Ok(deleted) => forget(&deleted, &snapshots.borrow().clone(), &datapath, &forgotten),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(missed = n, "pod deletions told too fast to follow one by one; the next apply removes them");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    })
}

fn forget(deleted: &DeletedPod, latest: &Snapshot, datapath: &SharedDatapath, forgotten: &Forgotten) {
    for ip in &deleted.ips {
        if address_taken_by_another(latest, &deleted.pod, *ip) {
            continue;
        }
        // Under the datapath's lock, which an apply holds from leaving the forgotten out to
        // writing the maps: it sees the entry and the record both gone or both there.
        let mut dp = lock(datapath);
        match dp.forget_remote_endpoint(*ip) {
            Ok(true) => {
                forgotten.lock().unwrap_or_else(PoisonError::into_inner).insert(*ip, deleted.pod.to_string());
                tracing::debug!(%ip, pod = %deleted.pod, "deleted pod's address forgotten ahead of the apply");
            }
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, %ip, "cannot forget a deleted pod's address; the next apply removes it"),
        }
    }
}

/// Whether `snapshot` names a pod other than `deleted` at `ip`: then the address is that pod's.
fn address_taken_by_another(snapshot: &Snapshot, deleted: &ObjectRef, ip: Ipv4Addr) -> bool {
    snapshot.inputs.pods.iter().any(|p| p.ip == Some(ip) && &p.object_ref() != deleted)
}

/// Call with the datapath locked. Drops from `endpoints` the forgotten addresses still held by the pod they were forgotten
/// for (`snapshot` is older than the deletion), and forgets the records `snapshot` has caught
/// up with (it no longer lists the pod).
pub fn leave_out_forgotten(forgotten: &Forgotten, snapshot: &Snapshot, endpoints: &mut Vec<EndpointEntry>) {
    let mut forgotten = forgotten.lock().unwrap_or_else(PoisonError::into_inner);
    forgotten.retain(|_, pod| snapshot.inputs.pods.iter().any(|p| &p.object_ref().to_string() == pod));
    endpoints.retain(|e| forgotten.get(&e.ip) != Some(&e.pod));
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshauth_policy::model::PodInfo;
    use meshauth_policy::tables::{AuthRequirement, WORLD_IDENTITY};

    fn pod(name: &str, ip: [u8; 4]) -> PodInfo {
        PodInfo {
            namespace: "shop".into(),
            name: name.into(),
            labels: BTreeMap::new(),
            service_account: name.into(),
            ip: Some(Ipv4Addr::from(ip)),
            node: Some("node-2".into()),
        }
    }

    fn snapshot_of(pods: Vec<PodInfo>) -> Snapshot {
        let mut snapshot = Snapshot::default();
        snapshot.inputs.pods = pods;
        snapshot
    }

    fn entry(pod: &str, ip: [u8; 4]) -> EndpointEntry {
        EndpointEntry {
            ip: Ipv4Addr::from(ip),
            security_identity: WORLD_IDENTITY,
            spiffe_id: 7,
            isolated: false,
            audit: false,
            mutual_auth: AuthRequirement::None,
            pod: pod.into(),
            node: Some("node-2".into()),
            node_address: None,
        }
    }

    #[test]
    fn a_deletion_told_after_the_snapshot_that_gave_its_address_away_forgets_nothing() {
        let web = ObjectRef::new("shop", "web");
        let ip = Ipv4Addr::new(10, 0, 2, 5);
        // The snapshot still has the deleted pod (the deletion came first): forget it now.
        assert!(!address_taken_by_another(&snapshot_of(vec![pod("web", [10, 0, 2, 5])]), &web, ip));
        // The snapshot has dropped it: forget whatever is left.
        assert!(!address_taken_by_another(&Snapshot::default(), &web, ip));
        // A new pod already holds the address in the snapshot: its entry stays.
        assert!(address_taken_by_another(&snapshot_of(vec![pod("api", [10, 0, 2, 5])]), &web, ip));
    }

    #[test]
    fn an_apply_of_a_snapshot_older_than_the_deletion_does_not_bring_the_address_back() {
        let forgotten = Forgotten::default();
        forgotten.lock().expect("lock").insert(Ipv4Addr::new(10, 0, 2, 5), "shop/web".into());
        // Older snapshot: the pod is still there, its entry is left out and the record kept.
        let older = snapshot_of(vec![pod("web", [10, 0, 2, 5]), pod("db", [10, 0, 2, 6])]);
        let mut endpoints = vec![entry("shop/web", [10, 0, 2, 5]), entry("shop/db", [10, 0, 2, 6])];
        leave_out_forgotten(&forgotten, &older, &mut endpoints);
        assert_eq!(endpoints.iter().map(|e| e.pod.as_str()).collect::<Vec<_>>(), ["shop/db"]);
        assert_eq!(forgotten.lock().expect("lock").len(), 1);
        // A snapshot without the pod: the record goes, and a new pod on the address is written.
        let newer = snapshot_of(vec![pod("api", [10, 0, 2, 5])]);
        let mut endpoints = vec![entry("shop/api", [10, 0, 2, 5])];
        leave_out_forgotten(&forgotten, &newer, &mut endpoints);
        assert_eq!(endpoints.len(), 1, "the new pod's entry");
        assert!(forgotten.lock().expect("lock").is_empty());
    }
}
