//! An in-process [`SvidSource`] for unit tests: push updates, take the source down and up, and
//! count connection attempts.

use std::sync::{Arc, Mutex, PoisonError};

use futures::StreamExt;
use tokio::sync::mpsc;

use super::{BoxFuture, SourceError, SvidMaterial, SvidSource, UpdateStream, X509Update};
use crate::verify::test_certs::{TestCa, TestSvid};

#[derive(Default)]
struct State {
    down: bool,
    /// Answering "no identity issued" (connect and the open stream) until the next push.
    no_identity: bool,
    current: Option<X509Update>,
    stream: Option<mpsc::UnboundedSender<Result<X509Update, SourceError>>>,
    connects: usize,
}

#[derive(Clone, Default)]
pub(crate) struct FakeSource {
    state: Arc<Mutex<State>>,
}

impl FakeSource {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes `update` the current answer and sends it on the open stream, if any.
    pub fn push(&self, update: X509Update) {
        let mut state = self.lock();
        state.no_identity = false;
        state.current = Some(update.clone());
        if let Some(tx) = &state.stream {
            let _ = tx.send(Ok(update));
        }
    }

    /// Ends the open stream and refuses connections.
    pub fn go_down(&self) {
        let mut state = self.lock();
        state.down = true;
        state.stream = None;
    }

    /// Answers "no identity issued": the open stream ends with it, and so does every connect
    /// until the next [`Self::push`].
    pub fn issue_nothing(&self) {
        let mut state = self.lock();
        state.no_identity = true;
        if let Some(tx) = state.stream.take() {
            let _ = tx.send(Err(SourceError::NoIdentityIssued));
        }
    }

    pub fn go_up(&self) {
        self.lock().down = false;
    }

    pub fn connects(&self) -> usize {
        self.lock().connects
    }
}

impl SvidSource for FakeSource {
    fn connect(&self) -> BoxFuture<'_, Result<UpdateStream, SourceError>> {
        Box::pin(async move {
            let mut state = self.lock();
            state.connects += 1;
            if state.down {
                return Err(SourceError::Connect { endpoint: "fake".to_owned(), reason: "down".to_owned() });
            }
            if state.no_identity {
                return Err(SourceError::NoIdentityIssued);
            }
            let (tx, rx) = mpsc::unbounded_channel();
            if let Some(current) = &state.current {
                let _ = tx.send(Ok(current.clone()));
            }
            state.stream = Some(tx);
            let stream: UpdateStream =
                Box::pin(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }).boxed());
            Ok(stream)
        })
    }
}

/// The Workload API form of test SVIDs, each under the SPIFFE ID it is delivered for.
pub(crate) fn materials(svids: &[(&str, &TestSvid)]) -> Vec<SvidMaterial> {
    svids
        .iter()
        .map(|(id, svid)| SvidMaterial {
            spiffe_id: (*id).to_owned(),
            chain: svid.chain.clone(),
            key_pkcs8: svid.key_der.clone(),
            hint: None,
        })
        .collect()
}

/// An update carrying `svids` of `ca` and its bundle.
pub(crate) fn update(ca: &TestCa, svids: &[(&str, &TestSvid)]) -> X509Update {
    X509Update { svids: materials(svids), bundles: vec![(ca.trust_domain.clone(), vec![ca.root_cert()])] }
}
