//! The messages of the SPIFFE Workload API, declared by hand because there is no `protoc` at
//! build time. Source: `v2/proto/spiffe/workload/workload.proto` of github.com/spiffe/go-spiffe
//! at v2.6.0 (the one SPIRE serves); field numbers and types follow it exactly. JWT messages
//! are absent because the dev issuer answers those methods with `Unimplemented`.

use std::collections::HashMap;

/// `X509SVIDRequest {}`
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct X509SvidRequest {}

/// `X509SVIDResponse { repeated X509SVID svids = 1; repeated bytes crl = 2;
/// map<string, bytes> federated_bundles = 3; }`
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct X509SvidResponse {
    #[prost(message, repeated, tag = "1")]
    pub svids: Vec<X509Svid>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub crl: Vec<Vec<u8>>,
    #[prost(map = "string, bytes", tag = "3")]
    pub federated_bundles: HashMap<String, Vec<u8>>,
}

/// `X509SVID { string spiffe_id = 1; bytes x509_svid = 2; bytes x509_svid_key = 3;
/// bytes bundle = 4; string hint = 5; }`: the chain and bundle are concatenated DER
/// certificates, the key unencrypted PKCS#8 DER.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct X509Svid {
    #[prost(string, tag = "1")]
    pub spiffe_id: String,
    #[prost(bytes = "vec", tag = "2")]
    pub x509_svid: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub x509_svid_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub bundle: Vec<u8>,
    #[prost(string, tag = "5")]
    pub hint: String,
}

/// `X509BundlesRequest {}`
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct X509BundlesRequest {}

/// `X509BundlesResponse { repeated bytes crl = 1; map<string, bytes> bundles = 2; }`, keyed by
/// the trust domain's SPIFFE ID (`spiffe://td`).
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct X509BundlesResponse {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub crl: Vec<Vec<u8>>,
    #[prost(map = "string, bytes", tag = "2")]
    pub bundles: HashMap<String, Vec<u8>>,
}
