//! The SPIRE Server Entry API over the server's Unix socket: a hand-written tonic client
//! (no protoc) on the messages of [`super::proto`].
//!
//! The channel is lazy: it connects on first use and reconnects on the next call after the
//! server went away, so callers retry by calling again. It must not retry by itself, nor
//! decide what to create or delete.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_prost::ProstCodec;

use super::proto;
use super::{AttestedAgent, EntryApi, EntrySpec, ItemResult, Registered, SpireError};

const SERVICE: &str = "/spire.api.server.entry.v1.Entry";
const AGENT_SERVICE: &str = "/spire.api.server.agent.v1.Agent";
/// Items per batch RPC.
const BATCH: usize = 200;
/// Entries per ListEntries page.
const PAGE: i32 = 500;

/// A client of one SPIRE server's Entry API.
#[derive(Clone, Debug)]
pub struct SpireClient {
    channel: Channel,
    socket: PathBuf,
}

impl SpireClient {
    /// A client for the server listening on `socket`; connects on first use. `timeout` bounds
    /// every call.
    pub fn new(socket: &Path, timeout: Duration) -> Result<Self, SpireError> {
        let socket = socket.to_owned();
        // The URI is never dialed: the connector below opens the Unix socket instead.
        let endpoint = Endpoint::try_from("http://spire-server.invalid")
            .map_err(|e| SpireError::Channel { socket: socket.display().to_string(), reason: e.to_string() })?
            .timeout(timeout)
            .connect_timeout(timeout);
        let path = socket.clone();
        let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
        }));
        Ok(Self { channel, socket })
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// One cheap call that proves the server answers on the socket.
    pub async fn probe(&self) -> Result<(), SpireError> {
        let req = proto::ListEntriesRequest {
            filter: None,
            output_mask: Some(proto::EntryMask::default()),
            page_size: 1,
            page_token: String::new(),
        };
        self.call::<_, proto::ListEntriesResponse>("ListEntries", req).await.map(|_| ())
    }

    async fn call<Req, Resp>(&self, method: &'static str, req: Req) -> Result<Resp, SpireError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.call_service(SERVICE, method, req).await
    }

    async fn call_service<Req, Resp>(&self, service: &str, method: &'static str, req: Req) -> Result<Resp, SpireError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        let call_err = |status: tonic::Status| SpireError::Call { operation: method, status: Box::new(status) };
        grpc.ready().await.map_err(|e| call_err(tonic::Status::unavailable(format!("connecting to {}: {e}", self.socket.display()))))?;
        let path = PathAndQuery::try_from(format!("{service}/{method}"))
            .map_err(|e| SpireError::Answer { operation: method, reason: e.to_string() })?;
        let codec: ProstCodec<Req, Resp> = ProstCodec::default();
        let resp = grpc.unary(tonic::Request::new(req), path, codec).await.map_err(call_err)?;
        Ok(resp.into_inner())
    }
}

fn check_count(operation: &'static str, sent: usize, got: usize) -> Result<(), SpireError> {
    if sent == got { Ok(()) } else { Err(SpireError::Answer { operation, reason: format!("{got} results for {sent} items") }) }
}

impl EntryApi for SpireClient {
    async fn list_owned(&self) -> Result<Vec<Registered>, SpireError> {
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            // Hints are per SPIFFE ID, so the server cannot filter on them (it matches hints
            // exactly): list everything and keep the marked ones.
            let req = proto::ListEntriesRequest { filter: None, output_mask: None, page_size: PAGE, page_token };
            let resp: proto::ListEntriesResponse = self.call("ListEntries", req).await?;
            out.extend(resp.entries.iter().filter_map(super::from_proto_entry));
            if resp.next_page_token.is_empty() {
                return Ok(out);
            }
            page_token = resp.next_page_token;
        }
    }

    async fn create(&self, specs: Vec<EntrySpec>) -> Result<Vec<ItemResult<Registered>>, SpireError> {
        let mut out = Vec::with_capacity(specs.len());
        for chunk in specs.chunks(BATCH) {
            let entries = chunk.iter().map(|s| super::to_proto_entry("", s)).collect::<Result<Vec<_>, _>>()?;
            let req = proto::BatchCreateEntryRequest { entries, output_mask: None };
            let resp: proto::BatchCreateEntryResponse = self.call("BatchCreateEntry", req).await?;
            check_count("BatchCreateEntry", chunk.len(), resp.results.len())?;
            out.extend(
                resp.results
                    .iter()
                    .map(|r| ItemResult::from_status(r.status.as_ref(), || r.entry.as_ref().and_then(super::from_proto_entry))),
            );
        }
        Ok(out)
    }

    async fn update(&self, entries: Vec<Registered>) -> Result<Vec<ItemResult<Registered>>, SpireError> {
        let mut out = Vec::with_capacity(entries.len());
        for chunk in entries.chunks(BATCH) {
            let protos = chunk.iter().map(|e| super::to_proto_entry(&e.id, &e.spec)).collect::<Result<Vec<_>, _>>()?;
            // Only these fields are written; SPIFFE ID and parent are the entry's identity.
            let mask = proto::EntryMask { selectors: true, x509_svid_ttl: true, hint: true, ..Default::default() };
            let req = proto::BatchUpdateEntryRequest { entries: protos, input_mask: Some(mask), output_mask: None };
            let resp: proto::BatchUpdateEntryResponse = self.call("BatchUpdateEntry", req).await?;
            check_count("BatchUpdateEntry", chunk.len(), resp.results.len())?;
            out.extend(
                resp.results
                    .iter()
                    .map(|r| ItemResult::from_status(r.status.as_ref(), || r.entry.as_ref().and_then(super::from_proto_entry))),
            );
        }
        Ok(out)
    }

    async fn list_agents(&self) -> Result<Vec<AttestedAgent>, SpireError> {
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let req = proto::ListAgentsRequest { page_size: PAGE, page_token };
            let resp: proto::ListAgentsResponse = self.call_service(AGENT_SERVICE, "ListAgents", req).await?;
            out.extend(resp.agents.iter().map(super::from_proto_agent));
            if resp.next_page_token.is_empty() {
                return Ok(out);
            }
            page_token = resp.next_page_token;
        }
    }

    async fn delete(&self, ids: Vec<String>) -> Result<Vec<ItemResult<String>>, SpireError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(BATCH) {
            let req = proto::BatchDeleteEntryRequest { ids: chunk.to_vec() };
            let resp: proto::BatchDeleteEntryResponse = self.call("BatchDeleteEntry", req).await?;
            check_count("BatchDeleteEntry", chunk.len(), resp.results.len())?;
            out.extend(resp.results.iter().map(|r| ItemResult::from_status(r.status.as_ref(), || Some(r.id.clone()))));
        }
        Ok(out)
    }
}
