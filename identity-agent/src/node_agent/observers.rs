//! The agent's metrics as the observers of the handshake server and the auth manager.

use crate::auth_manager::{AuthFailure, AuthObserver};
use crate::metrics::{AgentMetrics, HandshakeLabels};
use std::time::Duration;

impl crate::handshake::HandshakeObserver for AgentMetrics {
    fn served(&self, result: &Result<crate::handshake::Authenticated, crate::handshake::HandshakeError>, took: Duration) {
        let labels = match result {
            Ok(_) => HandshakeLabels { side: "server", result: "success", reason: "" },
            Err(e) => HandshakeLabels { side: "server", result: "failure", reason: e.reason() },
        };
        self.handshakes.get_or_create(&labels).inc();
        self.handshake_duration.observe(took.as_secs_f64());
    }

    fn turned_away(&self, reason: &'static str) {
        self.handshakes.get_or_create(&HandshakeLabels { side: "server", result: "turned_away", reason }).inc();
    }
}

impl AuthObserver for AgentMetrics {
    fn handshake(&self, result: Result<(), &AuthFailure>, duration: Duration) {
        let labels = match result {
            Ok(()) => HandshakeLabels { side: "client", result: "success", reason: "" },
            Err(f) => HandshakeLabels { side: "client", result: "failure", reason: f.reason },
        };
        self.handshakes.get_or_create(&labels).inc();
        self.handshake_duration.observe(duration.as_secs_f64());
    }

    fn entries(&self, count: usize) {
        self.auth_entries.set(i64::try_from(count).unwrap_or(i64::MAX));
    }
}
