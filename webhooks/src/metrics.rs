//! The webhook's Prometheus metrics: admissions by kind, operation and result, admission
//! latency, rejected HTTP requests, and the serving certificate (reloads, expiry).

use std::sync::atomic::AtomicI64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The kind an admission request was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum KindLabel {
    MeshPolicy,
    MutualAuth,
    /// The request could not be read far enough to know.
    Unknown,
}

/// The operation of an admission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(clippy::upper_case_acronyms)]
pub enum OperationLabel {
    CREATE,
    UPDATE,
    DELETE,
    CONNECT,
    Unknown,
}

/// What the webhook answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum ResultLabel {
    /// Allowed, with or without warnings.
    Allowed,
    /// Denied: the spec is invalid.
    Denied,
    /// Not an admission at all: the HTTP request was refused with a 4xx.
    BadRequest,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct AdmissionLabels {
    pub kind: KindLabel,
    pub operation: OperationLabel,
    pub result: ResultLabel,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: KindLabel,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: u16,
}

/// How a serving-certificate load ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum ReloadResult {
    Success,
    Failure,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: ReloadResult,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric of the webhook, registered in one registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    admissions: Family<AdmissionLabels, Counter>,
    admission_duration: HistogramFamily<KindLabels>,
    bad_requests: Family<StatusLabels, Counter>,
    cert_loads: Family<ReloadLabels, Counter>,
    cert_expiry: Gauge<i64, AtomicI64>,
    cert_rotations: Counter,
    connections_evicted: Counter,
    connections_refused: Counter,
}

fn latency_histogram() -> Histogram {
    // 250 µs .. ~4 s
    Histogram::new(exponential_buckets(0.000_25, 2.0, 15))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshauth_webhook");
        let admissions = Family::<AdmissionLabels, Counter>::default();
        registry.register("admissions", "Admission reviews answered, by kind, operation and result", admissions.clone());
        let admission_duration: HistogramFamily<KindLabels> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "admission_duration_seconds",
            "Time from request to response of an admission review, including API lookups",
            admission_duration.clone(),
        );
        let bad_requests = Family::<StatusLabels, Counter>::default();
        registry.register(
            "bad_requests",
            "HTTP requests refused with a 4xx before any admission decision, by status code",
            bad_requests.clone(),
        );
        let cert_loads = Family::<ReloadLabels, Counter>::default();
        registry.register("certificate_loads", "Serving certificate loads (from files or the Secret), by result", cert_loads.clone());
        let cert_expiry = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "Unix time at which the serving certificate now in use expires",
            cert_expiry.clone(),
        );
        let cert_rotations = Counter::default();
        registry.register("certificate_rotations", "Self-managed CA and serving certificate rotations completed", cert_rotations.clone());
        let connections_evicted = Counter::default();
        registry.register(
            "connections_evicted",
            "Idle or slow connections closed to make room for a new one at the connection limit",
            connections_evicted.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "New connections closed at the connection limit because every open one was answering a request",
            connections_refused.clone(),
        );
        Self {
            registry,
            admissions,
            admission_duration,
            bad_requests,
            cert_loads,
            cert_expiry,
            cert_rotations,
            connections_evicted,
            connections_refused,
        }
    }

    pub fn admission(&self, kind: KindLabel, operation: OperationLabel, result: ResultLabel, elapsed: Duration) {
        self.admissions.get_or_create(&AdmissionLabels { kind, operation, result }).inc();
        self.admission_duration.get_or_create(&KindLabels { kind }).observe(elapsed.as_secs_f64());
    }

    pub fn bad_request(&self, status: u16) {
        self.bad_requests.get_or_create(&StatusLabels { status }).inc();
    }

    pub fn certificate_loaded(&self, not_after: SystemTime) {
        self.cert_loads.get_or_create(&ReloadLabels { result: ReloadResult::Success }).inc();
        let secs = not_after.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        self.cert_expiry.set(i64::try_from(secs).unwrap_or(i64::MAX));
    }

    pub fn certificate_load_failed(&self) {
        self.cert_loads.get_or_create(&ReloadLabels { result: ReloadResult::Failure }).inc();
    }

    pub fn certificate_rotated(&self) {
        self.cert_rotations.inc();
    }

    pub fn connection_evicted(&self) {
        self.connections_evicted.inc();
    }

    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_admissions_with_typed_labels() {
        let m = Metrics::new();
        m.admission(KindLabel::MeshPolicy, OperationLabel::CREATE, ResultLabel::Denied, Duration::from_millis(3));
        m.bad_request(415);
        let text = m.encode().expect("encode");
        assert!(text.contains(r#"meshauth_webhook_admissions_total{kind="MeshPolicy",operation="CREATE",result="Denied"} 1"#), "{text}");
        assert!(text.contains(r#"meshauth_webhook_bad_requests_total{status="415"} 1"#), "{text}");
        assert!(text.contains("meshauth_webhook_admission_duration_seconds_bucket"), "{text}");
    }
}
