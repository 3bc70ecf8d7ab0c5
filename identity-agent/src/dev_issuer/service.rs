//! The hand-written tonic service `SpiffeWorkloadAPI` (what `tonic-build` would generate from
//! workload.proto, without needing `protoc`), served over a Unix socket.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tonic::body::Body;
use tonic::server::{Grpc, ServerStreamingService};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

use super::proto::{X509BundlesRequest, X509BundlesResponse, X509Svid, X509SvidRequest, X509SvidResponse};
use super::{DevIssuerError, Snapshot};

/// The header every Workload API call must carry (SPIFFE Workload Endpoint spec): it keeps
/// browsers and other SSRF-able clients from reaching the API.
const SECURITY_HEADER: &str = "workload.spiffe.io";
const SERVICE: &str = "SpiffeWorkloadAPI";

type BoxFuture<T> = futures::future::BoxFuture<'static, T>;
type BoxStream<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Clone)]
struct WorkloadApi {
    snapshots: watch::Receiver<Arc<Snapshot>>,
}

fn check_header<T>(request: &Request<T>) -> Result<(), Status> {
    match request.metadata().get(SECURITY_HEADER).map(|v| v.as_bytes()) {
        Some(b"true") => Ok(()),
        // SPIRE's wording, so clients that match on it behave the same.
        _ => Err(Status::invalid_argument("security header missing from request")),
    }
}

/// Every snapshot from now on: the current one first, then each change.
fn snapshots(rx: watch::Receiver<Arc<Snapshot>>) -> impl Stream<Item = Arc<Snapshot>> + Send {
    futures::stream::unfold((rx, true), |(mut rx, first)| async move {
        if !first && rx.changed().await.is_err() {
            return None;
        }
        let snapshot = rx.borrow_and_update().clone();
        Some((snapshot, (rx, false)))
    })
}

fn x509_response(snapshot: &Snapshot) -> Result<X509SvidResponse, Status> {
    if snapshot.svids.is_empty() {
        // What SPIRE answers when no registration entry matches the caller.
        return Err(Status::permission_denied("no identity issued"));
    }
    let svids = snapshot
        .svids
        .iter()
        .map(|svid| X509Svid {
            spiffe_id: svid.id.to_string(),
            x509_svid: svid.chain.iter().flat_map(|c| c.as_ref().iter().copied()).collect(),
            x509_svid_key: svid.key_pkcs8.clone(),
            bundle: snapshot.bundle.clone(),
            hint: String::new(),
        })
        .collect();
    Ok(X509SvidResponse { svids, crl: Vec::new(), federated_bundles: Default::default() })
}

fn bundles_response(snapshot: &Snapshot) -> X509BundlesResponse {
    let mut bundles = std::collections::HashMap::new();
    bundles.insert(format!("spiffe://{}", snapshot.trust_domain), snapshot.bundle.clone());
    X509BundlesResponse { crl: Vec::new(), bundles }
}

struct FetchX509Svid(WorkloadApi);

impl ServerStreamingService<X509SvidRequest> for FetchX509Svid {
    type Response = X509SvidResponse;
    type ResponseStream = BoxStream<X509SvidResponse>;
    type Future = BoxFuture<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<X509SvidRequest>) -> Self::Future {
        let rx = self.0.snapshots.clone();
        Box::pin(async move {
            check_header(&request)?;
            // No identity at all is an error status, not an empty stream (as SPIRE does).
            x509_response(&rx.borrow())?;
            // A response per change; an identity set that became empty ends the stream with
            // PermissionDenied, and the client reconnects.
            let stream = snapshots(rx).map(|snapshot| x509_response(&snapshot)).scan(false, |ended, item| {
                let out = if *ended { None } else { Some(item) };
                if matches!(out, Some(Err(_))) {
                    *ended = true;
                }
                futures::future::ready(out)
            });
            let stream: Self::ResponseStream = Box::pin(stream);
            Ok(Response::new(stream))
        })
    }
}

struct FetchX509Bundles(WorkloadApi);

impl ServerStreamingService<X509BundlesRequest> for FetchX509Bundles {
    type Response = X509BundlesResponse;
    type ResponseStream = BoxStream<X509BundlesResponse>;
    type Future = BoxFuture<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<X509BundlesRequest>) -> Self::Future {
        let rx = self.0.snapshots.clone();
        Box::pin(async move {
            check_header(&request)?;
            // Only send when the bundle changes, not on every SVID rotation.
            let stream = snapshots(rx)
                .map(|snapshot| bundles_response(&snapshot))
                .scan(None, |last: &mut Option<X509BundlesResponse>, response| {
                    let changed = last.as_ref() != Some(&response);
                    *last = Some(response.clone());
                    futures::future::ready(Some(changed.then_some(response)))
                })
                .filter_map(|item| futures::future::ready(item.map(Ok)));
            let stream: Self::ResponseStream = Box::pin(stream);
            Ok(Response::new(stream))
        })
    }
}

impl tonic::codegen::Service<http::Request<Body>> for WorkloadApi {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let api = self.clone();
        Box::pin(async move {
            let path = request.uri().path().to_owned();
            let method = path.strip_prefix('/').and_then(|p| p.strip_prefix(SERVICE)).unwrap_or("");
            let response = match method {
                "/FetchX509SVID" => {
                    Grpc::new(ProstCodec::<X509SvidResponse, X509SvidRequest>::default())
                        .server_streaming(FetchX509Svid(api), request)
                        .await
                }
                "/FetchX509Bundles" => {
                    Grpc::new(ProstCodec::<X509BundlesResponse, X509BundlesRequest>::default())
                        .server_streaming(FetchX509Bundles(api), request)
                        .await
                }
                "/FetchJWTSVID" | "/FetchJWTBundles" | "/ValidateJWTSVID" => {
                    Status::unimplemented("the meshauth dev issuer issues X.509-SVIDs only").into_http()
                }
                _ => Status::unimplemented(format!("unknown method {path}")).into_http(),
            };
            Ok(response)
        })
    }
}

/// Serves the Workload API on `socket` with the snapshots of `rx`.
pub(super) async fn serve(socket: &Path, rx: watch::Receiver<Arc<Snapshot>>) -> Result<(), DevIssuerError> {
    let io = |source: std::io::Error| DevIssuerError::Io { path: socket.to_owned(), reason: source.to_string() };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    // A socket file left by a previous run would make bind fail; anything else there is not
    // ours to delete.
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            std::fs::remove_file(socket).map_err(io)?;
        } else {
            return Err(DevIssuerError::Config(format!("{} exists and is not a socket", socket.display())));
        }
    }
    let listener = tokio::net::UnixListener::bind(socket).map_err(io)?;
    let incoming = futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    });
    tonic::transport::Server::builder()
        .serve_with_incoming(WorkloadApi { snapshots: rx }, incoming)
        .await
        .map_err(|e| DevIssuerError::Serve(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn api(svids: Vec<super::super::IssuedSvid>) -> WorkloadApi {
        let snapshot = Snapshot { svids, bundle: Vec::new(), trust_domain: Default::default() };
        let (tx, rx) = watch::channel(Arc::new(snapshot));
        // Keep the sender alive for the test's duration.
        std::mem::forget(tx);
        WorkloadApi { snapshots: rx }
    }

    #[tokio::test]
    async fn calls_without_the_security_header_are_refused() {
        let mut svc = FetchX509Svid(api(Vec::new()));
        match svc.call(Request::new(X509SvidRequest {})).await {
            Err(status) => assert_eq!(status.code(), Code::InvalidArgument),
            Ok(_) => panic!("accepted a call without the header"),
        }
        let mut request = Request::new(X509SvidRequest {});
        request.metadata_mut().insert(SECURITY_HEADER, "false".parse().expect("value"));
        match svc.call(request).await {
            Err(status) => assert_eq!(status.code(), Code::InvalidArgument),
            Ok(_) => panic!("accepted a wrong header"),
        }
        let mut request = Request::new(X509SvidRequest {});
        request.metadata_mut().insert(SECURITY_HEADER, "true".parse().expect("value"));
        match svc.call(request).await {
            Err(status) => {
                assert_eq!(status.code(), Code::PermissionDenied);
                assert_eq!(status.message(), "no identity issued");
            }
            Ok(_) => panic!("no identity must be PermissionDenied"),
        }
        let mut bundles = FetchX509Bundles(api(Vec::new()));
        match bundles.call(Request::new(X509BundlesRequest {})).await {
            Err(status) => assert_eq!(status.code(), Code::InvalidArgument),
            Ok(_) => panic!("accepted a call without the header"),
        }
    }
}
