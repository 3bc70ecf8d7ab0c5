//! # meshauth-operator
//!
//! Reconciles `MeshPolicy` and `MutualAuth` (status: `Accepted`, `Ready`, `Conflicted`,
//! `selectedPods`, `observedGeneration`, Events) and the node-scoped SPIRE registration entries
//! of the identities that need authentication, while holding a leader Lease. Serves
//! `/metrics`, `/healthz`, `/readyz`.
//!
//! Policy decisions come from `meshauth-policy`; this crate must not keep rules of its own.

pub mod app;
pub mod config;
pub mod controller;
pub mod http;
pub mod metrics;
pub mod registration;
pub mod spire;
pub mod status;
