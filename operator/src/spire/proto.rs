//! The few messages of SPIRE's server API (`spire.api.server.entry.v1`,
//! `spire.api.server.agent.v1` and `spire.api.types`) the operator uses, declared by hand with
//! prost. Source: `proto/spire/api/server/{entry,agent}/v1/*.proto` and
//! `proto/spire/api/types/{entry,agent,spiffeid,selector,status}.proto` of
//! github.com/spiffe/spire-api-sdk at commit 101d5e7de758 (the one SPIRE v1.13.3 builds with);
//! every field number checked against them.
//! Fields the operator never reads or writes are left out; protobuf skips unknown fields when
//! decoding, so answers from newer servers still decode.

/// `spire.api.types.SPIFFEID`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct SpiffeId {
    #[prost(string, tag = "1")]
    pub trust_domain: String,
    #[prost(string, tag = "2")]
    pub path: String,
}

/// `spire.api.types.Selector`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Selector {
    #[prost(string, tag = "1")]
    pub r#type: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `spire.api.types.Status` (a gRPC code and message per batch item).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Status {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

/// `spire.api.types.Entry` (the fields the operator uses).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Entry {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(message, optional, tag = "2")]
    pub spiffe_id: Option<SpiffeId>,
    #[prost(message, optional, tag = "3")]
    pub parent_id: Option<SpiffeId>,
    #[prost(message, repeated, tag = "4")]
    pub selectors: Vec<Selector>,
    #[prost(int32, tag = "5")]
    pub x509_svid_ttl: i32,
    #[prost(bool, tag = "7")]
    pub admin: bool,
    #[prost(bool, tag = "8")]
    pub downstream: bool,
    #[prost(string, tag = "14")]
    pub hint: String,
}

/// `spire.api.types.EntryMask`: which fields an update writes or an answer carries.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct EntryMask {
    #[prost(bool, tag = "2")]
    pub spiffe_id: bool,
    #[prost(bool, tag = "3")]
    pub parent_id: bool,
    #[prost(bool, tag = "4")]
    pub selectors: bool,
    #[prost(bool, tag = "5")]
    pub x509_svid_ttl: bool,
    #[prost(bool, tag = "7")]
    pub admin: bool,
    #[prost(bool, tag = "8")]
    pub downstream: bool,
    #[prost(bool, tag = "14")]
    pub hint: bool,
}

/// `spire.api.server.entry.v1.ListEntriesRequest.Filter` (only `by_hint` is used).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ListEntriesFilter {
    /// `google.protobuf.StringValue`: prost encodes a `String` message as that wrapper.
    #[prost(message, optional, tag = "5")]
    pub by_hint: Option<String>,
}

/// `spire.api.server.entry.v1.ListEntriesRequest`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ListEntriesRequest {
    #[prost(message, optional, tag = "1")]
    pub filter: Option<ListEntriesFilter>,
    #[prost(message, optional, tag = "2")]
    pub output_mask: Option<EntryMask>,
    #[prost(int32, tag = "3")]
    pub page_size: i32,
    #[prost(string, tag = "4")]
    pub page_token: String,
}

/// `spire.api.server.entry.v1.ListEntriesResponse`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ListEntriesResponse {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<Entry>,
    #[prost(string, tag = "2")]
    pub next_page_token: String,
}

/// `spire.api.server.entry.v1.BatchCreateEntryRequest`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct BatchCreateEntryRequest {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<Entry>,
    #[prost(message, optional, tag = "2")]
    pub output_mask: Option<EntryMask>,
}

/// One result of a batch create or update.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct EntryResult {
    #[prost(message, optional, tag = "1")]
    pub status: Option<Status>,
    #[prost(message, optional, tag = "2")]
    pub entry: Option<Entry>,
}

/// `spire.api.server.entry.v1.BatchCreateEntryResponse`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct BatchCreateEntryResponse {
    #[prost(message, repeated, tag = "1")]
    pub results: Vec<EntryResult>,
}

/// `spire.api.server.entry.v1.BatchUpdateEntryRequest`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct BatchUpdateEntryRequest {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<Entry>,
    #[prost(message, optional, tag = "2")]
    pub input_mask: Option<EntryMask>,
    #[prost(message, optional, tag = "3")]
    pub output_mask: Option<EntryMask>,
}

/// `spire.api.server.entry.v1.BatchUpdateEntryResponse`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct BatchUpdateEntryResponse {
    #[prost(message, repeated, tag = "1")]
    pub results: Vec<EntryResult>,
}

/// `spire.api.server.entry.v1.BatchDeleteEntryRequest`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct BatchDeleteEntryRequest {
    #[prost(string, repeated, tag = "1")]
    pub ids: Vec<String>,
}

/// One result of a batch delete.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct DeleteResult {
    #[prost(message, optional, tag = "1")]
    pub status: Option<Status>,
    #[prost(string, tag = "2")]
    pub id: String,
}

/// `spire.api.server.entry.v1.BatchDeleteEntryResponse`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct BatchDeleteEntryResponse {
    #[prost(message, repeated, tag = "1")]
    pub results: Vec<DeleteResult>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn entry_fields_have_the_numbers_of_the_spire_api() {
        let entry = Entry {
            id: String::new(),
            spiffe_id: Some(SpiffeId { trust_domain: "t".into(), path: "/p".into() }),
            parent_id: None,
            selectors: vec![Selector { r#type: "u".into(), value: "v".into() }],
            x509_svid_ttl: 60,
            admin: false,
            downstream: false,
            hint: "h".into(),
        };
        let bytes = entry.encode_to_vec();
        // field 2 (len) {1: "t", 2: "/p"}, field 4 (len) {1: "u", 2: "v"}, field 5 varint 60,
        // field 14 (len) "h".
        let want: &[u8] = &[
            0x12, 7, 0x0a, 1, b't', 0x12, 2, b'/', b'p', //
            0x22, 6, 0x0a, 1, b'u', 0x12, 1, b'v', //
            0x28, 60, //
            0x72, 1, b'h',
        ];
        assert_eq!(bytes, want);
        assert_eq!(Entry::decode(bytes.as_slice()).ok(), Some(entry));
    }

    #[test]
    fn list_filter_by_hint_is_a_string_value_wrapper() {
        let req = ListEntriesRequest {
            filter: Some(ListEntriesFilter { by_hint: Some("m".into()) }),
            output_mask: None,
            page_size: 2,
            page_token: String::new(),
        };
        // field 1 (len) { field 5 (len) { field 1 (len) "m" } }, field 3 varint 2.
        assert_eq!(req.encode_to_vec(), vec![0x0a, 5, 0x2a, 3, 0x0a, 1, b'm', 0x18, 2]);
    }
}

/// `spire.api.types.Agent` (the fields the operator reads).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Agent {
    #[prost(message, optional, tag = "1")]
    pub id: Option<SpiffeId>,
    #[prost(string, tag = "2")]
    pub attestation_type: String,
    #[prost(message, repeated, tag = "5")]
    pub selectors: Vec<Selector>,
    #[prost(bool, tag = "6")]
    pub banned: bool,
}

/// `spire.api.server.agent.v1.ListAgentsRequest` (no filter, no mask: every field).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ListAgentsRequest {
    #[prost(int32, tag = "3")]
    pub page_size: i32,
    #[prost(string, tag = "4")]
    pub page_token: String,
}

/// `spire.api.server.agent.v1.ListAgentsResponse`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ListAgentsResponse {
    #[prost(message, repeated, tag = "1")]
    pub agents: Vec<Agent>,
    #[prost(string, tag = "2")]
    pub next_page_token: String,
}
