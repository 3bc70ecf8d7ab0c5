//! [`Backend`] on the Kubernetes API: the state in a `kubernetes.io/tls` Secret (replaced with
//! its `resourceVersion`), the bundle in every webhook of one ValidatingWebhookConfiguration.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use tracing::{info, warn};

use super::{Backend, CertError, CertState, Stored, Version};
use crate::config::SelfManagedCerts;

/// The label that marks the Secret as the webhook's.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "meshauth-webhook");

pub struct KubeBackend {
    secrets: Api<Secret>,
    configurations: Api<ValidatingWebhookConfiguration>,
    secret_name: String,
    configuration_name: String,
}

impl KubeBackend {
    pub fn new(client: Client, config: &SelfManagedCerts) -> Self {
        Self {
            secrets: match &config.secret_namespace {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::default_namespaced(client.clone()),
            },
            configurations: Api::all(client),
            secret_name: config.secret_name.clone(),
            configuration_name: config.webhook_configuration.clone(),
        }
    }

    fn secret(&self, state: &CertState, version: Option<&Version>) -> Secret {
        let (data, annotations) = state.to_secret();
        Secret {
            metadata: ObjectMeta {
                name: Some(self.secret_name.clone()),
                labels: Some(BTreeMap::from([(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned())])),
                annotations: Some(annotations),
                resource_version: version.cloned(),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(data),
            ..Default::default()
        }
    }

    fn api_error(&self, what: &str, source: kube::Error) -> CertError {
        CertError::Api { what: format!("{what} {}", self.secret_name), source }
    }
}

fn is_conflict(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 409)
}

impl Backend for KubeBackend {
    async fn load(&self) -> Result<Stored, CertError> {
        let secret = self.secrets.get_opt(&self.secret_name).await.map_err(|e| self.api_error("reading Secret", e))?;
        Ok(secret.map(|s| {
            let version = s.resource_version().unwrap_or_default();
            let data = s.data.unwrap_or_default();
            let annotations = s.metadata.annotations.unwrap_or_default();
            (CertState::from_secret(&data, &annotations), version)
        }))
    }

    async fn create(&self, state: &CertState) -> Result<Option<Version>, CertError> {
        match self.secrets.create(&PostParams::default(), &self.secret(state, None)).await {
            Ok(s) => Ok(Some(s.resource_version().unwrap_or_default())),
            Err(e) if is_conflict(&e) => Ok(None),
            Err(e) => Err(self.api_error("creating Secret", e)),
        }
    }

    async fn replace(&self, state: &CertState, version: &Version) -> Result<Option<Version>, CertError> {
        match self.secrets.replace(&self.secret_name, &PostParams::default(), &self.secret(state, Some(version))).await {
            Ok(s) => Ok(Some(s.resource_version().unwrap_or_default())),
            Err(e) if is_conflict(&e) => Ok(None),
            Err(e) => Err(self.api_error("replacing Secret", e)),
        }
    }

    async fn publish_bundle(&self, bundle: &[u8]) -> Result<bool, CertError> {
        let what = || format!("ValidatingWebhookConfiguration {}", self.configuration_name);
        let Some(mut configuration) = self
            .configurations
            .get_opt(&self.configuration_name)
            .await
            .map_err(|source| CertError::Api { what: format!("reading {}", what()), source })?
        else {
            warn!(configuration = %self.configuration_name, "ValidatingWebhookConfiguration not found; its caBundle will be set once it exists");
            return Ok(false);
        };
        let webhooks = configuration.webhooks.get_or_insert_with(Vec::new);
        if webhooks.iter().all(|w| w.client_config.ca_bundle.as_ref().is_some_and(|b| b.0 == bundle)) {
            return Ok(true);
        }
        for webhook in webhooks.iter_mut() {
            webhook.client_config.ca_bundle = Some(ByteString(bundle.to_vec()));
        }
        match self.configurations.replace(&self.configuration_name, &PostParams::default(), &configuration).await {
            Ok(_) => {
                info!(configuration = %self.configuration_name, "caBundle updated");
                Ok(true)
            }
            Err(e) if is_conflict(&e) => Ok(false),
            Err(source) => Err(CertError::Api { what: format!("updating {}", what()), source }),
        }
    }
}
