//! The webhook's settings: typed, with defaults, parsed from flags (or `MESHAUTH_WEBHOOK_*`
//! environment variables). A parse error names the setting, the value and the reason.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use meshauth_crds::TrustDomain;

pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
pub use meshauth_crds::DEFAULT_TRUST_DOMAIN;
pub use meshauth_policy::model::DEFAULT_MESH_NAMESPACE;
pub const DEFAULT_TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_CERT_SECRET: &str = "meshauth-system/meshauth-webhook-tls";
pub const DEFAULT_WEBHOOK_CONFIGURATION: &str = "meshauth-webhook";
pub const DEFAULT_CERT_DNS_NAME: &str = "meshauth-webhook.meshauth-system.svc";
pub const DEFAULT_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
pub const DEFAULT_CERT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
pub const DEFAULT_CA_OVERLAP: Duration = Duration::from_secs(120);
pub const DEFAULT_CERT_CHECK_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The API server keeps a few connections; 512 leaves room for replicas' probes and kubectl
/// while keeping the file descriptors a flood can take far below common limits.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longer than the API server's webhook timeout, shorter than Go's idle-connection timeout (90 s),
/// so the server rather than the client usually closes first and the client notices cleanly.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// An update carries the object twice, and an object may be up to ~1.5 MiB in etcd.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Why the settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{setting}: {value:?} is not valid: {reason}")]
    Invalid { setting: &'static str, value: String, reason: String },
    #[error("--tls-cert and --tls-key go together: {0} is missing")]
    HalfKeyPair(&'static str),
    #[error("--tls-cert/--tls-key and --cert-secret exclude each other: pick files or a self-managed certificate")]
    TwoCertSources,
    #[error("no serving certificate: give --tls-cert FILE --tls-key FILE, or --cert-secret NAMESPACE/NAME for a self-managed one")]
    NoCertSource,
    #[error("--kube-api off cannot be combined with --cert-secret: a self-managed certificate lives in the API")]
    SelfManagedWithoutApi,
}

fn invalid(setting: &'static str, value: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { setting, value: value.into(), reason: reason.into() }
}

/// Whether the webhook talks to the Kubernetes API (for warnings and self-managed certs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KubeApi {
    /// Use in-cluster config or kubeconfig when there is one; without, skip API-based warnings.
    Auto,
    /// Never: API-based warnings are skipped.
    Off,
}

/// Whether the warnings that need API lookups (pods a selector picks in the object's
/// namespace, MutualAuth ties there) are given. Anyone who reaches the webhook's port can send
/// it a review naming any namespace, and those warnings would answer what exists there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ApiWarnings {
    /// Only when `--client-ca` is set, so that only the API server can ask.
    Auto,
    /// Also to unauthenticated clients: for a port nobody but the API server can reach.
    Always,
    /// Never.
    Off,
}

impl ApiWarnings {
    /// Whether API-based warnings are given, with or without client certificates required.
    pub fn enabled(self, clients_authenticated: bool) -> bool {
        match self {
            Self::Auto => clients_authenticated,
            Self::Always => true,
            Self::Off => false,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// PEM files (cert-manager style), reloaded when they change.
    Files(FileCerts),
    /// A CA and serving certificate the webhook keeps in a Secret and rotates itself.
    SelfManaged(SelfManagedCerts),
}

/// `--tls-cert` / `--tls-key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCerts {
    /// The certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// How often the files are checked for changes.
    pub reload_interval: Duration,
}

impl FileCerts {
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        Self { cert: cert.into(), key: key.into(), reload_interval: DEFAULT_TLS_RELOAD_INTERVAL }
    }
}

/// Settings of the self-managed CA and serving certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfManagedCerts {
    /// Namespace of the Secret that holds the CA and serving certificate; `None`: the
    /// namespace the webhook runs in (the client's default namespace).
    pub secret_namespace: Option<String>,
    /// Name of that Secret.
    pub secret_name: String,
    /// The ValidatingWebhookConfiguration whose `caBundle` is kept matching.
    pub webhook_configuration: String,
    /// DNS names and IP addresses the serving certificate is valid for.
    pub dns_names: Vec<String>,
    /// Lifetime of each CA and serving certificate.
    pub validity: Duration,
    /// A new CA and certificate are made when the current ones have less than this left.
    pub renew_before: Duration,
    /// How long a new CA is in the `caBundle` before the webhook serves a certificate it signed,
    /// and how long the old CA stays after: time for the API server (and other replicas) to
    /// catch up, so that no admission call fails.
    pub overlap: Duration,
    /// How often the Secret, the `caBundle` and the expiry are checked.
    pub check_interval: Duration,
}

impl Default for SelfManagedCerts {
    fn default() -> Self {
        let (ns, name) = DEFAULT_CERT_SECRET.split_once('/').unwrap_or(("meshauth-system", "meshauth-webhook-tls"));
        Self {
            secret_namespace: Some(ns.into()),
            secret_name: name.into(),
            webhook_configuration: DEFAULT_WEBHOOK_CONFIGURATION.into(),
            dns_names: vec![DEFAULT_CERT_DNS_NAME.into()],
            validity: DEFAULT_CERT_VALIDITY,
            renew_before: DEFAULT_CERT_RENEW_BEFORE,
            overlap: DEFAULT_CA_OVERLAP,
            check_interval: DEFAULT_CERT_CHECK_INTERVAL,
        }
    }
}

impl SelfManagedCerts {
    /// Checks that the timings allow a rotation to finish before the certificate expires.
    pub fn check(&self) -> Result<(), ConfigError> {
        let secs = |d: Duration| format!("{}s", d.as_secs_f64());
        if self.dns_names.is_empty() {
            return Err(invalid("--cert-dns-name", "", "at least one DNS name or IP address is needed"));
        }
        for name in &self.dns_names {
            if name.parse::<std::net::IpAddr>().is_err() {
                meshauth_policy::validate::check_dns_subdomain(name)
                    .map_err(|why| invalid("--cert-dns-name", name, format!("it {why}")))?;
            }
        }
        if self.renew_before >= self.validity {
            return Err(invalid("--cert-renew-before", secs(self.renew_before), "must be shorter than --cert-validity"));
        }
        // A rotation takes two overlaps (new CA published, then old CA retired) plus a check.
        let needed = self.overlap * 2 + self.check_interval * 2;
        if self.renew_before < needed {
            return Err(invalid(
                "--cert-renew-before",
                secs(self.renew_before),
                format!("must be at least twice --ca-overlap plus twice --cert-check-interval ({})", secs(needed)),
            ));
        }
        if self.check_interval.is_zero() {
            return Err(invalid("--cert-check-interval", "0s", "must be positive"));
        }
        Ok(())
    }
}

/// Everything the webhook needs to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// HTTPS address of `/validate`, `/healthz` and `/metrics`.
    pub listen: SocketAddr,
    /// An optional plain-HTTP address for `/metrics` and `/healthz` only.
    pub metrics_listen: Option<SocketAddr>,
    pub certs: CertSource,
    /// The mesh's trust domain: identities in rules must be in it.
    pub trust_domain: TrustDomain,
    /// Where mesh-wide MutualAuths live.
    pub mesh_namespace: String,
    pub kube_api: KubeApi,
    /// Bound on each API lookup made for warnings; past it the warning is skipped.
    pub lookup_timeout: Duration,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// Bound on a TLS handshake.
    pub handshake_timeout: Duration,
    /// Connections older than this are closed gracefully so clients reconnect; `None`: never.
    pub max_connection_age: Option<Duration>,
    /// Most open HTTPS connections; at the limit idle and slow ones make room for new ones.
    pub max_connections: usize,
    /// Bound on receiving a request's headers.
    pub header_timeout: Duration,
    /// Bound on receiving a request's body.
    pub body_timeout: Duration,
    /// Connections without a request in progress for this long are closed.
    pub idle_timeout: Duration,
    /// CAs whose client certificates are required; `None`: any client may connect.
    pub client_ca: Option<PathBuf>,
    pub api_warnings: ApiWarnings,
    pub log_format: LogFormat,
}

impl Config {
    /// Defaults for everything but the certificate source.
    pub fn new(certs: CertSource) -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            metrics_listen: None,
            certs,
            trust_domain: TrustDomain::default(),
            mesh_namespace: DEFAULT_MESH_NAMESPACE.into(),
            kube_api: KubeApi::Auto,
            lookup_timeout: DEFAULT_LOOKUP_TIMEOUT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_connection_age: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            client_ca: None,
            api_warnings: ApiWarnings::Auto,
            log_format: LogFormat::Text,
        }
    }
}

/// Command-line flags; every one also reads `MESHAUTH_WEBHOOK_<NAME>`.
#[derive(Debug, Parser)]
#[command(name = "meshauth-webhook", version, about = "meshauth validating admission webhook for MeshPolicy and MutualAuth")]
pub struct Args {
    /// HTTPS listen address for /validate, /healthz and /metrics.
    #[arg(long, env = "MESHAUTH_WEBHOOK_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// Optional plain-HTTP listen address serving only /metrics and /healthz.
    #[arg(long, env = "MESHAUTH_WEBHOOK_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Serving certificate chain (PEM), reloaded when it changes.
    #[arg(long, env = "MESHAUTH_WEBHOOK_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Serving private key (PEM), reloaded when it changes.
    #[arg(long, env = "MESHAUTH_WEBHOOK_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// How often --tls-cert and --tls-key are checked for changes (e.g. 2s).
    #[arg(long, env = "MESHAUTH_WEBHOOK_TLS_RELOAD_INTERVAL", default_value = "2s")]
    pub tls_reload_interval: String,
    /// Self-managed certificate: the Secret ([NAMESPACE/]NAME; default namespace: the webhook's
    /// own) holding the CA and serving certificate.
    #[arg(long, env = "MESHAUTH_WEBHOOK_CERT_SECRET")]
    pub cert_secret: Option<String>,
    /// Self-managed certificate: the ValidatingWebhookConfiguration whose caBundle is patched.
    #[arg(long, env = "MESHAUTH_WEBHOOK_WEBHOOK_CONFIGURATION", default_value = DEFAULT_WEBHOOK_CONFIGURATION)]
    pub webhook_configuration: String,
    /// Self-managed certificate: a DNS name or IP address it is valid for (repeatable).
    #[arg(long = "cert-dns-name", env = "MESHAUTH_WEBHOOK_CERT_DNS_NAMES", value_delimiter = ',')]
    pub cert_dns_names: Vec<String>,
    /// Self-managed certificate: lifetime of each CA and serving certificate (e.g. 90d).
    #[arg(long, env = "MESHAUTH_WEBHOOK_CERT_VALIDITY", default_value = "90d")]
    pub cert_validity: String,
    /// Self-managed certificate: rotate when less than this is left (e.g. 30d).
    #[arg(long, env = "MESHAUTH_WEBHOOK_CERT_RENEW_BEFORE", default_value = "30d")]
    pub cert_renew_before: String,
    /// Self-managed certificate: how long old and new CA are both in the caBundle (e.g. 2m).
    #[arg(long, env = "MESHAUTH_WEBHOOK_CA_OVERLAP", default_value = "2m")]
    pub ca_overlap: String,
    /// Self-managed certificate: how often Secret, caBundle and expiry are checked (e.g. 30s).
    #[arg(long, env = "MESHAUTH_WEBHOOK_CERT_CHECK_INTERVAL", default_value = "30s")]
    pub cert_check_interval: String,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, env = "MESHAUTH_WEBHOOK_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// The namespace whose selector-less MutualAuth is mesh-wide.
    #[arg(long, env = "MESHAUTH_WEBHOOK_MESH_NAMESPACE", default_value = DEFAULT_MESH_NAMESPACE)]
    pub mesh_namespace: String,
    /// Use the Kubernetes API for warnings (auto: when a kubeconfig or in-cluster config exists).
    #[arg(long, env = "MESHAUTH_WEBHOOK_KUBE_API", value_enum, default_value = "auto")]
    pub kube_api: KubeApi,
    /// Bound on each API lookup made for a warning (e.g. 2s).
    #[arg(long, env = "MESHAUTH_WEBHOOK_LOOKUP_TIMEOUT", default_value = "2s")]
    pub lookup_timeout: String,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "MESHAUTH_WEBHOOK_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Bound on a TLS handshake (e.g. 10s).
    #[arg(long, env = "MESHAUTH_WEBHOOK_HANDSHAKE_TIMEOUT", default_value = "10s")]
    pub handshake_timeout: String,
    /// Close connections older than this (gracefully) so clients reconnect and spread over
    /// replicas, e.g. 10m; 0s: never.
    #[arg(long, env = "MESHAUTH_WEBHOOK_MAX_CONNECTION_AGE", default_value = "0s")]
    pub max_connection_age: String,
    /// Most open HTTPS connections; at the limit the oldest idle or slow one makes room.
    #[arg(long, env = "MESHAUTH_WEBHOOK_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Bound on receiving a request's headers (e.g. 10s).
    #[arg(long, env = "MESHAUTH_WEBHOOK_HEADER_TIMEOUT", default_value = "10s")]
    pub header_timeout: String,
    /// Bound on receiving a request's body (e.g. 10s).
    #[arg(long, env = "MESHAUTH_WEBHOOK_BODY_TIMEOUT", default_value = "10s")]
    pub body_timeout: String,
    /// Close connections with no request in progress for this long (e.g. 60s).
    #[arg(long, env = "MESHAUTH_WEBHOOK_IDLE_TIMEOUT", default_value = "60s")]
    pub idle_timeout: String,
    /// Require client certificates signed by these CAs (PEM): the API server's client
    /// certificate from its admission configuration.
    #[arg(long, env = "MESHAUTH_WEBHOOK_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// Warnings that need API lookups: auto (only with --client-ca), always, off.
    #[arg(long, env = "MESHAUTH_WEBHOOK_API_WARNINGS", value_enum, default_value = "auto")]
    pub api_warnings: ApiWarnings,
    /// Log format.
    #[arg(long, env = "MESHAUTH_WEBHOOK_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl Args {
    /// Checks and converts the flags.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let addr = |setting: &'static str, value: &str| value.parse::<SocketAddr>().map_err(|e| invalid(setting, value, e.to_string()));
        let certs = match (self.tls_cert, self.tls_key, self.cert_secret) {
            (Some(_), Some(_), Some(_)) | (Some(_), None, Some(_)) | (None, Some(_), Some(_)) => {
                return Err(ConfigError::TwoCertSources);
            }
            (Some(cert), Some(key), None) => {
                CertSource::Files(FileCerts { cert, key, reload_interval: positive("--tls-reload-interval", &self.tls_reload_interval)? })
            }
            (Some(_), None, None) => return Err(ConfigError::HalfKeyPair("--tls-key")),
            (None, Some(_), None) => return Err(ConfigError::HalfKeyPair("--tls-cert")),
            (None, None, Some(secret)) => {
                if self.kube_api == KubeApi::Off {
                    return Err(ConfigError::SelfManagedWithoutApi);
                }
                let (ns, name) =
                    parse_secret_ref(&secret).ok_or_else(|| invalid("--cert-secret", &secret, "must be NAME or NAMESPACE/NAME"))?;
                let managed = SelfManagedCerts {
                    secret_namespace: ns.map(str::to_owned),
                    secret_name: name.into(),
                    webhook_configuration: non_empty("--webhook-configuration", &self.webhook_configuration)?,
                    dns_names: if self.cert_dns_names.is_empty() { vec![DEFAULT_CERT_DNS_NAME.into()] } else { self.cert_dns_names },
                    validity: positive("--cert-validity", &self.cert_validity)?,
                    renew_before: positive("--cert-renew-before", &self.cert_renew_before)?,
                    overlap: parse_duration("--ca-overlap", &self.ca_overlap)?,
                    check_interval: positive("--cert-check-interval", &self.cert_check_interval)?,
                };
                managed.check()?;
                CertSource::SelfManaged(managed)
            }
            (None, None, None) => return Err(ConfigError::NoCertSource),
        };
        let max_body_bytes = match self.max_body_bytes {
            0 => return Err(invalid("--max-body-bytes", "0", "must be positive")),
            n => n,
        };
        let max_connections = match self.max_connections {
            0 => return Err(invalid("--max-connections", "0", "must be positive")),
            n => n,
        };
        Ok(Config {
            listen: addr("--listen", &self.listen)?,
            metrics_listen: self.metrics_listen.as_deref().map(|a| addr("--metrics-listen", a)).transpose()?,
            certs,
            trust_domain: TrustDomain::new(&self.trust_domain).map_err(|e| invalid("--trust-domain", &self.trust_domain, e.to_string()))?,
            mesh_namespace: {
                meshauth_policy::validate::check_dns_label(&self.mesh_namespace)
                    .map_err(|why| invalid("--mesh-namespace", &self.mesh_namespace, format!("it {why}")))?;
                self.mesh_namespace
            },
            kube_api: self.kube_api,
            lookup_timeout: positive("--lookup-timeout", &self.lookup_timeout)?,
            max_body_bytes,
            handshake_timeout: positive("--handshake-timeout", &self.handshake_timeout)?,
            max_connection_age: Some(parse_duration("--max-connection-age", &self.max_connection_age)?).filter(|d| !d.is_zero()),
            max_connections,
            header_timeout: positive("--header-timeout", &self.header_timeout)?,
            body_timeout: positive("--body-timeout", &self.body_timeout)?,
            idle_timeout: positive("--idle-timeout", &self.idle_timeout)?,
            client_ca: self.client_ca,
            api_warnings: self.api_warnings,
            log_format: self.log_format,
        })
    }
}

/// `NAME` (in the webhook's own namespace) or `NAMESPACE/NAME`.
fn parse_secret_ref(s: &str) -> Option<(Option<&str>, &str)> {
    let (ns, name) = match s.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, s),
    };
    let name_ok = meshauth_policy::validate::check_dns_subdomain(name).is_ok();
    let ns_ok = ns.is_none_or(|ns| meshauth_policy::validate::check_dns_label(ns).is_ok());
    (name_ok && ns_ok).then_some((ns, name))
}

fn non_empty(setting: &'static str, value: &str) -> Result<String, ConfigError> {
    if value.is_empty() {
        return Err(invalid(setting, value, "must not be empty"));
    }
    Ok(value.to_owned())
}

fn positive(setting: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let d = parse_duration(setting, value)?;
    if d.is_zero() {
        return Err(invalid(setting, value, "must be positive"));
    }
    Ok(d)
}

/// Parses `500ms`, `30s`, `5m`, `2h`, `90d` (a number and one unit).
pub fn parse_duration(setting: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let digits = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (number, unit) = value.split_at(digits);
    let n: u64 = number.parse().map_err(|_| invalid(setting, value, "must be a whole number followed by ms, s, m, h or d, e.g. 30s"))?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(invalid(setting, value, "unit must be ms, s, m, h or d, e.g. 30s")),
    };
    n.checked_mul(unit_ms).map(Duration::from_millis).ok_or_else(|| invalid(setting, value, "is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let args = Args::try_parse_from(std::iter::once("meshauth-webhook").chain(args.iter().copied()))
            .map_err(|e| invalid("args", args.join(" "), e.to_string()))?;
        args.into_config()
    }

    fn err(args: &[&str]) -> String {
        match parse(args) {
            Ok(c) => panic!("{args:?} parsed: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn standalone_with_files_has_defaults() {
        let c = parse(&["--listen", "127.0.0.1:9443", "--tls-cert", "c.pem", "--tls-key", "k.pem"]).expect("valid");
        assert_eq!(c.listen, "127.0.0.1:9443".parse().expect("addr"));
        assert_eq!(c.certs, CertSource::Files(FileCerts::new("c.pem", "k.pem")));
        let mut want = Config::new(CertSource::Files(FileCerts::new("c.pem", "k.pem")));
        want.listen = c.listen;
        assert_eq!(c, want);
    }

    #[test]
    fn self_managed_has_defaults() {
        let c = parse(&["--cert-secret", "ns/tls", "--cert-dns-name", "a.ns.svc", "--cert-dns-name", "127.0.0.1"]).expect("valid");
        let CertSource::SelfManaged(m) = c.certs else { panic!("not self-managed") };
        assert_eq!((m.secret_namespace.as_deref(), m.secret_name.as_str()), (Some("ns"), "tls"));
        assert_eq!(m.dns_names, ["a.ns.svc", "127.0.0.1"]);
        assert_eq!(m.validity, DEFAULT_CERT_VALIDITY);
    }

    #[test]
    fn a_bare_secret_name_is_in_the_webhooks_own_namespace() {
        // As the Helm chart passes it: MESHAUTH_WEBHOOK_CERT_SECRET=meshauth-webhook-tls.
        let c = parse(&["--cert-secret", "meshauth-webhook-tls", "--cert-dns-name", "a.b.svc,a.b.svc.cluster.local"]).expect("valid");
        let CertSource::SelfManaged(m) = c.certs else { panic!("not self-managed") };
        assert_eq!((m.secret_namespace, m.secret_name.as_str()), (None, "meshauth-webhook-tls"));
        assert_eq!(m.dns_names, ["a.b.svc", "a.b.svc.cluster.local"]);
    }

    #[test]
    fn errors_name_the_setting() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "no serving certificate"),
            (&["--tls-cert", "c"], "--tls-key is missing"),
            (&["--tls-key", "k"], "--tls-cert is missing"),
            (&["--tls-cert", "c", "--tls-key", "k", "--cert-secret", "a/b"], "exclude each other"),
            (&["--tls-cert", "c", "--tls-key", "k", "--listen", "nope"], "--listen: \"nope\" is not valid"),
            (&["--tls-cert", "c", "--tls-key", "k", "--tls-reload-interval", "5"], "--tls-reload-interval: \"5\""),
            (&["--tls-cert", "c", "--tls-key", "k", "--tls-reload-interval", "0s"], "must be positive"),
            (&["--tls-cert", "c", "--tls-key", "k", "--trust-domain", "Bad"], "--trust-domain: \"Bad\""),
            (&["--tls-cert", "c", "--tls-key", "k", "--mesh-namespace", "a_b"], "--mesh-namespace: \"a_b\""),
            (&["--tls-cert", "c", "--tls-key", "k", "--max-body-bytes", "0"], "--max-body-bytes"),
            (&["--tls-cert", "c", "--tls-key", "k", "--max-connection-age", "soon"], "--max-connection-age: \"soon\""),
            (&["--tls-cert", "c", "--tls-key", "k", "--max-connections", "0"], "--max-connections: \"0\" is not valid: must be positive"),
            (&["--tls-cert", "c", "--tls-key", "k", "--header-timeout", "0s"], "--header-timeout: \"0s\""),
            (&["--tls-cert", "c", "--tls-key", "k", "--body-timeout", "x"], "--body-timeout: \"x\""),
            (&["--tls-cert", "c", "--tls-key", "k", "--idle-timeout", "0ms"], "--idle-timeout: \"0ms\""),
            (&["--cert-secret", "a/b/c"], "--cert-secret: \"a/b/c\" is not valid: must be NAME or NAMESPACE/NAME"),
            (&["--cert-secret", "Bad"], "--cert-secret: \"Bad\""),
            (&["--cert-secret", "a/b", "--kube-api", "off"], "--kube-api off"),
            (&["--cert-secret", "a/b", "--cert-validity", "1d", "--cert-renew-before", "2d"], "--cert-renew-before: \"172800s\""),
            (&["--cert-secret", "a/b", "--cert-renew-before", "1m"], "at least twice --ca-overlap"),
            (&["--cert-secret", "a/b", "--cert-dns-name", "Bad_Name"], "--cert-dns-name: \"Bad_Name\""),
        ];
        for (args, want) in cases {
            let got = err(args);
            assert!(got.contains(want), "{args:?}: {got:?} lacks {want:?}");
        }
    }

    #[test]
    fn api_warnings_need_authenticated_clients_unless_told_otherwise() {
        let c = parse(&["--tls-cert", "c", "--tls-key", "k"]).expect("valid");
        assert_eq!((c.api_warnings, c.client_ca), (ApiWarnings::Auto, None));
        assert!(!ApiWarnings::Auto.enabled(false), "anyone may send a review: no lookups answer it");
        assert!(ApiWarnings::Auto.enabled(true));
        assert!(ApiWarnings::Always.enabled(false));
        assert!(!ApiWarnings::Off.enabled(true));
        let c = parse(&["--tls-cert", "c", "--tls-key", "k", "--client-ca", "ca.pem", "--api-warnings", "off"]).expect("valid");
        assert_eq!((c.api_warnings, c.client_ca.as_deref()), (ApiWarnings::Off, Some(std::path::Path::new("ca.pem"))));
    }

    #[test]
    fn durations() {
        for (input, want) in [("500ms", 500), ("30s", 30_000), ("5m", 300_000), ("2h", 7_200_000), ("1d", 86_400_000)] {
            assert_eq!(parse_duration("x", input).expect(input), Duration::from_millis(want));
        }
        for bad in ["", "s", "10", "1.5s", "-1s", "1w", "99999999999999999999d"] {
            assert!(parse_duration("x", bad).is_err(), "{bad}");
        }
    }
}
