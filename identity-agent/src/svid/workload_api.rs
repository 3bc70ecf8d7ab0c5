//! The production [`SvidSource`]: SPIRE's (or the dev issuer's) Workload API over its Unix
//! socket, through the `spiffe` crate's streaming client (which sends the
//! `workload.spiffe.io: true` header and parses the SVIDs and bundles).
//!
//! It does not retry or cache: reconnection and keeping the last SVIDs are the store's job.

use futures::StreamExt;
use rustls_pki_types::CertificateDer;
use spiffe::{WorkloadApiClient, WorkloadApiError, X509Context};

use super::{BoxFuture, SourceError, SvidMaterial, SvidSource, UpdateStream, X509Update};

/// The Workload API at an endpoint such as `unix:/run/spire/sockets/agent.sock`.
#[derive(Debug, Clone)]
pub struct WorkloadApiSource {
    endpoint: String,
}

impl WorkloadApiSource {
    /// `endpoint` is a socket path or a `unix:` URI.
    pub fn new(endpoint: impl Into<String>) -> Self {
        let endpoint = endpoint.into();
        let endpoint = if endpoint.starts_with('/') { format!("unix:{endpoint}") } else { endpoint };
        Self { endpoint }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

impl SvidSource for WorkloadApiSource {
    fn connect(&self) -> BoxFuture<'_, Result<UpdateStream, SourceError>> {
        Box::pin(async move {
            let connect_error = |e: WorkloadApiError| SourceError::Connect { endpoint: self.endpoint.clone(), reason: e.to_string() };
            let client = WorkloadApiClient::connect_to(&self.endpoint).await.map_err(connect_error)?;
            match client.stream_x509_contexts().await {
                Ok(stream) => {
                    let stream: UpdateStream = Box::pin(stream.map(|item| match item {
                        Ok(context) => Ok(from_context(&context)),
                        Err(e) if issued_nothing(&e) => Err(SourceError::NoIdentityIssued),
                        Err(e) => Err(SourceError::Stream(e.to_string())),
                    }));
                    Ok(stream)
                }
                // SPIRE answers "no identity issued" while no entry matches this agent, and also
                // while a restarted SPIRE agent has not synced yet: the store tells the two apart
                // (nothing held yet, or held past a grace period) and reconnects with backoff.
                Err(e) if issued_nothing(&e) => Err(SourceError::NoIdentityIssued),
                Err(e) => Err(connect_error(e)),
            }
        })
    }
}

fn issued_nothing(error: &WorkloadApiError) -> bool {
    matches!(error, WorkloadApiError::NoIdentityIssued | WorkloadApiError::PermissionDenied(_))
}

fn from_context(context: &X509Context) -> X509Update {
    let svids = context
        .svids()
        .iter()
        .map(|svid| SvidMaterial {
            spiffe_id: svid.spiffe_id().to_string(),
            chain: svid.cert_chain().iter().map(|cert| CertificateDer::from(cert.as_bytes().to_vec())).collect(),
            key_pkcs8: svid.private_key().as_bytes().to_vec(),
            hint: svid.hint().map(str::to_owned),
        })
        .collect();
    let bundles = context
        .bundle_set()
        .iter()
        .map(|(td, bundle)| {
            let certs = bundle.authorities().iter().map(|cert| CertificateDer::from(cert.as_bytes().to_vec())).collect();
            (td.to_string(), certs)
        })
        .collect();
    X509Update { svids, bundles }
}
