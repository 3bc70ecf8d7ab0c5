//! Serving certificate from PEM files (cert-manager style): loaded at start, then reloaded when
//! either file changes (modification time, size or inode — a Secret volume swaps a symlink), so
//! a renewed certificate is served without a restart. A pair that does not load (e.g. the
//! certificate written, the key not yet) keeps the previous one in service and is retried.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;
use tracing::{info, warn};

use super::{CertStore, ServingCert, TlsError};
use crate::config::FileCerts;
use crate::metrics::Metrics;

/// What identifies one version of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp { modified: meta.modified().ok(), len: meta.len(), inode: meta.ino() })
}

/// Reads and checks the pair.
pub fn load(files: &FileCerts) -> Result<ServingCert, TlsError> {
    let read = |path: &Path| std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source });
    let cert = read(&files.cert)?;
    let key = read(&files.key)?;
    let what = format!("{} and {}", files.cert.display(), files.key.display());
    ServingCert::from_pem(&cert, &key, &what)
}

/// Watches the files and keeps `store` serving their latest good version.
pub struct FileWatcher {
    files: FileCerts,
    store: Arc<CertStore>,
    metrics: Arc<Metrics>,
    loaded: Option<(Option<Stamp>, Option<Stamp>)>,
    failed: Option<(Option<Stamp>, Option<Stamp>)>,
}

impl FileWatcher {
    /// Loads the pair once; fails when it cannot be used, so a bad start is loud.
    pub fn start(files: FileCerts, store: Arc<CertStore>, metrics: Arc<Metrics>) -> Result<Self, TlsError> {
        let stamps = (stamp(&files.cert), stamp(&files.key));
        let cert = load(&files).inspect_err(|_| metrics.certificate_load_failed())?;
        info!(cert = %files.cert.display(), key = %files.key.display(), not_after = ?cert.not_after, "serving certificate loaded");
        metrics.certificate_loaded(cert.not_after);
        store.set(cert);
        Ok(Self { files, store, metrics, loaded: Some(stamps), failed: None })
    }

    /// Reloads when the files changed since the last good load. Returns whether it reloaded.
    pub fn check(&mut self) -> bool {
        let stamps = (stamp(&self.files.cert), stamp(&self.files.key));
        if self.loaded.as_ref() == Some(&stamps) {
            return false;
        }
        match load(&self.files) {
            Ok(cert) => {
                info!(cert = %self.files.cert.display(), not_after = ?cert.not_after, "serving certificate reloaded");
                self.metrics.certificate_loaded(cert.not_after);
                self.store.set(cert);
                self.loaded = Some(stamps);
                self.failed = None;
                true
            }
            Err(err) => {
                // Warn once per version of the files; keep serving the previous certificate.
                if self.failed.as_ref() != Some(&stamps) {
                    warn!(error = %err, "changed serving certificate files do not load; still serving the previous certificate");
                    self.metrics.certificate_load_failed();
                    self.failed = Some(stamps);
                }
                false
            }
        }
    }

    /// Checks every `reload_interval` until `shutdown` turns true or its sender is gone.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.files.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => { self.check(); }
                _ = crate::wait_for_shutdown(&mut shutdown) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::testing::ca_and_leaf;

    fn write(dir: &Path, cert: &str, key: &str) -> FileCerts {
        // Write to temporary names and rename, as a careful writer would; the test of a torn
        // write below writes in place.
        let files = FileCerts::new(dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(dir.join("tls.crt.tmp"), cert).expect("write");
        std::fs::write(dir.join("tls.key.tmp"), key).expect("write");
        std::fs::rename(dir.join("tls.crt.tmp"), &files.cert).expect("rename");
        std::fs::rename(dir.join("tls.key.tmp"), &files.key).expect("rename");
        files
    }

    fn serial(store: &CertStore) -> Vec<u8> {
        store.current().expect("a certificate").key.cert[0].to_vec()
    }

    #[test]
    fn reloads_on_change_and_keeps_the_old_pair_when_the_new_one_is_broken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, cert1, key1) = ca_and_leaf(&["one"]);
        let files = write(dir.path(), &cert1, &key1);
        let store = Arc::new(CertStore::new());
        let metrics = Arc::new(Metrics::new());
        let mut watcher = FileWatcher::start(files.clone(), store.clone(), metrics.clone()).expect("start");
        let first = serial(&store);
        assert!(!watcher.check(), "nothing changed");

        let (_, cert2, key2) = ca_and_leaf(&["two"]);
        write(dir.path(), &cert2, &key2);
        assert!(watcher.check(), "changed files reload");
        let second = serial(&store);
        assert_ne!(first, second);

        // A torn update: new certificate, old key. The previous pair stays in service.
        let (_, cert3, key3) = ca_and_leaf(&["three"]);
        std::fs::write(&files.cert, &cert3).expect("write");
        assert!(!watcher.check());
        assert_eq!(serial(&store), second);
        std::fs::write(&files.key, &key3).expect("write");
        assert!(watcher.check(), "the completed update loads");
        assert_ne!(serial(&store), second);

        let text = metrics.encode().expect("encode");
        assert!(text.contains(r#"meshauth_webhook_certificate_loads_total{result="Failure"} 1"#), "{text}");
        assert!(text.contains(r#"meshauth_webhook_certificate_loads_total{result="Success"} 3"#), "{text}");
    }

    #[test]
    fn a_bad_start_is_an_error_that_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = FileCerts::new(dir.path().join("missing.crt"), dir.path().join("missing.key"));
        let err = FileWatcher::start(files, Arc::new(CertStore::new()), Arc::new(Metrics::new())).err().expect("fails");
        assert!(err.to_string().contains("missing.crt"), "{err}");
    }
}
