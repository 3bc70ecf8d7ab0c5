//! # meshauth-testenv: the real test environment
//!
//! This crate's job is to give integration tests (and people, through `tests/testenv`) a
//! throwaway cluster made of the real servers: etcd and kube-apiserver, a SPIRE server and one
//! SPIRE agent per "node", all running as plain processes on this machine, built from pinned
//! releases through the Go module proxy and cached outside the repository
//! (`scripts/testenv-build`, cache `$MESHAUTH_TESTENV_CACHE`, default
//! `/var/cache/meshauth-testenv`).
//!
//! What it must not do: replace any of those servers with a fake, depend on the product's
//! crates (tests use dynamic objects and JSON, so a broken `crds` crate cannot hide behind its
//! own types), or leave processes behind: every environment stops when its [`TestEnv`] is
//! dropped (also while a test panics), and a watchdog stops it when the owning test process
//! exits without unwinding.
//!
//! ## Requirements
//! Tests that use it must run **as root** on a machine like CI's (or with
//! `MESHAUTH_TESTENV_CACHE` pointing at a writable directory): the first start builds the
//! pinned Go binaries (about 10 minutes on 2 cores, needs Go at `/usr/local/go/bin/go` or on
//! `PATH` and the Go module proxy). `./scripts/test` builds the cache before `cargo test`. When
//! the cache is missing and cannot be built, [`TestEnv::start`] fails with the build's error
//! and this explanation; tests fail, they are not skipped.
//!
//! ## Use
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use meshauth_testenv::{EntrySpec, TestEnv, k8s, svid};
//! // One environment for the whole test binary (started on first use):
//! let env = TestEnv::shared().await?;
//! let client = env.client().await?;
//! k8s::install_crds(&client, &k8s::crd_dir(), std::time::Duration::from_secs(30)).await?;
//! let node = env.node("node-1")?;
//! let id = env.workload_id("shop", "order");
//! env.spire().create_entry(&EntrySpec::new(&id, &node.agent_id).selector(svid::uid_selector())).await?;
//! let (got, bundle) = svid::wait_for_svid(&node.workload_api_endpoint(), &id, std::time::Duration::from_secs(60)).await?;
//! svid::verify_svid(&got, &bundle)?;
//! # Ok(()) }
//! ```
//! Or a private one: `let env = TestEnv::start(Options::default()).await?;` (stopped on drop).
//!
//! A real cluster (kubelets, containerd, kube-proxy, CNI; one per machine):
//! `TestEnv::start(Options { kubelet: true, ..Default::default() })`, then
//! `env.load_image("target/images/meshauth.tar")` and [`Kubelet`] (`env.kubelet_node("node-1")`)
//! for each node's IP, pod subnet, namespaces and CNI directories.
//!
//! Set `MESHAUTH_TESTENV_KEEP=1` to keep the environment directories (logs under
//! `DIR/logs/`) after the tests.

pub mod env;
pub mod k8s;
pub mod spire;
pub mod svid;

pub use env::{EnvError, Kubelet, Node, Options, TestEnv};
pub use spire::{Entry, EntrySpec, SpireError, SpireServer};
pub use svid::{SvidError, SvidWatch, VerifiedSvid};

/// The Node annotation that carries the node's SPIRE agent SPIFFE ID.
pub const NODE_AGENT_ID_ANNOTATION: &str = "meshauth.io/spire-agent-id";

/// Installs rustls' `ring` provider as the process default unless one is installed already
/// (kube's client needs one, and several may be compiled in).
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // An error means another thread installed one in between: fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
