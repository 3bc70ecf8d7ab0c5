//! The operator's Prometheus metrics, registered once with typed labels, and their text
//! encoding for `/metrics`. Only counting here: no decisions, no I/O.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Which part of a reconcile failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: String,
}

/// Which SPIRE operation failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: String,
}

/// Which kind a status patch was for.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// Every metric of the operator.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub reconciles: Counter,
    pub reconcile_failures: Family<StageLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub status_patches: Family<KindLabels, Counter>,
    pub spire_entries_managed: Gauge,
    pub spire_entry_changes: Family<OperationLabels, Counter>,
    pub spire_api_errors: Family<OperationLabels, Counter>,
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshauth_operator");
        let reconciles = Counter::default();
        registry.register("reconciles", "Reconcile passes over every MeshPolicy, MutualAuth and SPIRE entry", reconciles.clone());
        let reconcile_failures = Family::<StageLabels, Counter>::default();
        registry.register("reconcile_failures", "Reconcile passes that failed, by stage (spire, status)", reconcile_failures.clone());
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register("reconcile_duration_seconds", "Duration of reconcile passes", reconcile_duration.clone());
        let status_patches = Family::<KindLabels, Counter>::default();
        registry.register("status_patches", "Status patches written, by kind", status_patches.clone());
        let spire_entries_managed = Gauge::default();
        registry.register("spire_entries_managed", "SPIRE registration entries the operator owns", spire_entries_managed.clone());
        let spire_entry_changes = Family::<OperationLabels, Counter>::default();
        registry.register("spire_entry_changes", "SPIRE entries created, updated and deleted", spire_entry_changes.clone());
        let spire_api_errors = Family::<OperationLabels, Counter>::default();
        registry.register(
            "spire_api_errors",
            "Failed SPIRE server API calls and refused batch items, by operation",
            spire_api_errors.clone(),
        );
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica holds the leader lease", leader.clone());
        Self {
            registry: Arc::new(registry),
            reconciles,
            reconcile_failures,
            reconcile_duration,
            status_patches,
            spire_entries_managed,
            spire_entry_changes,
            spire_api_errors,
            leader,
        }
    }

    pub fn failure(&self, stage: &str) {
        self.reconcile_failures.get_or_create(&StageLabels { stage: stage.to_owned() }).inc();
    }

    pub fn spire_error(&self, operation: &str) {
        self.spire_api_errors.get_or_create(&OperationLabels { operation: operation.to_owned() }).inc();
    }

    pub fn entry_changes(&self, operation: &str, n: usize) {
        self.spire_entry_changes.get_or_create(&OperationLabels { operation: operation.to_owned() }).inc_by(n as u64);
    }

    pub fn status_patch(&self, kind: &str) {
        self.status_patches.get_or_create(&KindLabels { kind: kind.to_owned() }).inc();
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_the_issue_names_is_exported() {
        let m = Metrics::new();
        m.reconciles.inc();
        m.failure("spire");
        m.spire_error("BatchCreateEntry");
        m.spire_entries_managed.set(3);
        let text = m.encode();
        for name in [
            "meshauth_operator_reconciles_total 1",
            "meshauth_operator_reconcile_failures_total{stage=\"spire\"} 1",
            "meshauth_operator_reconcile_duration_seconds_bucket",
            "meshauth_operator_spire_entries_managed 3",
            "meshauth_operator_spire_api_errors_total{operation=\"BatchCreateEntry\"} 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
