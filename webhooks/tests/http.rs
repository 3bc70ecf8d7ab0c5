//! The real server on loopback, over TLS: every kind of bad request gets its 4xx and a reason,
//! valid and invalid reviews get their answers, the certificate files reload without a restart.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meshauth_webhook::Webhook;
use meshauth_webhook::config::{CertSource, Config, FileCerts, KubeApi};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A CA and a leaf for localhost/127.0.0.1 it signed: (ca_pem, leaf_pem, key_pem).
fn ca_and_leaf() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "http test ca");
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("params");
    let leaf = params.signed_by(&key, &issuer).expect("leaf");
    (ca.pem(), leaf.pem(), key.serialize_pem())
}

fn write_pair(dir: &Path, cert: &str, key: &str) -> FileCerts {
    let files = FileCerts { reload_interval: Duration::from_millis(100), ..FileCerts::new(dir.join("tls.crt"), dir.join("tls.key")) };
    std::fs::write(dir.join("tls.key.new"), key).expect("write");
    std::fs::write(dir.join("tls.crt.new"), cert).expect("write");
    std::fs::rename(dir.join("tls.key.new"), &files.key).expect("rename");
    std::fs::rename(dir.join("tls.crt.new"), &files.cert).expect("rename");
    files
}

struct Server {
    webhook: Webhook,
    ca: String,
    dir: tempfile::TempDir,
}

async fn start(max_body_bytes: usize) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, leaf, key) = ca_and_leaf();
    let files = write_pair(dir.path(), &leaf, &key);
    let mut config = Config::new(CertSource::Files(files));
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config.kube_api = KubeApi::Off;
    config.max_body_bytes = max_body_bytes;
    let webhook = Webhook::start_with_client(config, None).await.expect("starts");
    Server { webhook, ca, dir }
}

fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

struct Reply {
    status: u16,
    headers: String,
    body: String,
    peer_cert: Vec<u8>,
}

/// Sends raw HTTP/1.1 bytes over TLS and reads the whole reply (the request says close).
async fn raw(addr: SocketAddr, ca: &str, request: &[u8]) -> Reply {
    let connector = tokio_rustls::TlsConnector::from(client_config(ca));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let peer_cert = tls.get_ref().1.peer_certificates().expect("peer certs")[0].to_vec();
    // The server may answer (413) and close before taking the whole body: a failed write is
    // fine, the reply is what counts.
    let _ = tls.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await.expect("reply in time");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Reply { status, headers: head.to_ascii_lowercase(), body: body.to_owned(), peer_cert }
}

async fn request(addr: SocketAddr, ca: &str, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Reply {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if let Some(ct) = content_type {
        req.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    raw(addr, ca, &bytes).await
}

fn review(operation: &str, object: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "e911857d-c318-11e8-bbad-025000000001",
            "kind": {"group": "meshauth.io", "version": "v1alpha1", "kind": object["kind"]},
            "resource": {"group": "meshauth.io", "version": "v1alpha1", "resource": "meshpolicies"},
            "name": object["metadata"]["name"],
            "namespace": object["metadata"]["namespace"],
            "operation": operation,
            "userInfo": {"username": "admin"},
            "object": object
        }
    })
}

fn policy(identity: &str) -> Value {
    json!({
        "apiVersion": "meshauth.io/v1alpha1",
        "kind": "MeshPolicy",
        "metadata": {"name": "payment-ingress", "namespace": "production"},
        "spec": {
            "selector": {"matchLabels": {"app": "payment-service"}},
            "ingress": [{"from": [{"identity": identity}], "ports": [{"port": 8080}], "authentication": {"mode": "Required"}}]
        }
    })
}

const JSON: Option<&str> = Some("application/json");

#[tokio::test]
#[allow(clippy::type_complexity)] // the case table
async fn answers_reviews_and_refuses_bad_requests_with_a_clear_4xx() {
    let server = start(64 * 1024).await;
    let (addr, ca) = (server.webhook.addr, server.ca.as_str());

    let good = serde_json::to_vec(&review("CREATE", policy("spiffe://cluster.local/ns/shop/sa/order"))).expect("json");
    let reply = request(addr, ca, "POST", "/validate", JSON, &good).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let v: Value = serde_json::from_str(&reply.body).expect("json reply");
    assert_eq!(v["response"]["allowed"], true, "{v}");
    assert_eq!(v["response"]["uid"], "e911857d-c318-11e8-bbad-025000000001");

    let bad = serde_json::to_vec(&review("UPDATE", policy("spiffe://cluster.local/ns/shop/sa/order?x"))).expect("json");
    let reply = request(addr, ca, "POST", "/validate", JSON, &bad).await;
    assert_eq!(reply.status, 200);
    let v: Value = serde_json::from_str(&reply.body).expect("json reply");
    assert_eq!(v["response"]["allowed"], false);
    let message = v["response"]["status"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("spec.ingress[0].from[0].identity"), "{message}");
    assert!(message.contains("character '?'"), "{message}");

    let mut no_object = review("CREATE", policy("spiffe://cluster.local/ns/a/sa/b"));
    no_object["request"].as_object_mut().map(|r| r.remove("object"));
    let mut pod = review("CREATE", policy("spiffe://cluster.local/ns/a/sa/b"));
    pod["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "Pod"});
    let mut v1beta1 = review("CREATE", policy("spiffe://cluster.local/ns/a/sa/b"));
    v1beta1["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let huge = vec![b' '; 100 * 1024];
    let cases: Vec<(&str, &str, &str, Option<&str>, Vec<u8>, u16, &str)> = vec![
        ("GET", "GET", "/validate", None, vec![], 405, "takes POST"),
        ("PUT", "PUT", "/validate", JSON, good.clone(), 405, "takes POST"),
        ("no content type", "POST", "/validate", None, good.clone(), 415, "Content-Type header is missing"),
        ("text/plain", "POST", "/validate", Some("text/plain"), good.clone(), 415, "\"text/plain\" is not supported"),
        ("malformed JSON", "POST", "/validate", JSON, b"{\"kind\":".to_vec(), 400, "not valid JSON"),
        ("wrong envelope", "POST", "/validate", JSON, br#"{"kind":"Pod","apiVersion":"v1"}"#.to_vec(), 400, "expected kind \"AdmissionReview\""),
        ("v1beta1", "POST", "/validate", JSON, serde_json::to_vec(&v1beta1).expect("json"), 400, "admission.k8s.io/v1beta1"),
        ("wrong kind", "POST", "/validate", JSON, serde_json::to_vec(&pod).expect("json"), 400, "not Pod of /v1"),
        ("missing object", "POST", "/validate", JSON, serde_json::to_vec(&no_object).expect("json"), 400, "must carry request.object"),
        ("oversized", "POST", "/validate", JSON, huge, 413, "larger than the limit of 65536 bytes"),
        ("unknown path", "POST", "/mutate", JSON, good.clone(), 404, "not found"),
    ];
    for (name, method, path, content_type, body, status, reason) in cases {
        let reply = request(addr, ca, method, path, content_type, &body).await;
        assert_eq!(reply.status, status, "{name}: {}", reply.body);
        assert!(reply.body.contains(reason), "{name}: {:?} lacks {reason:?}", reply.body);
        assert!(reply.headers.contains("content-type: text/plain"), "{name}: {}", reply.headers);
    }
    let reply = request(addr, ca, "GET", "/validate", None, &[]).await;
    assert!(reply.headers.contains("allow: post"), "{}", reply.headers);

    // An oversized chunked body (no Content-Length) is cut off at the limit too.
    let mut chunked = b"POST /validate HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..20 {
        chunked.extend_from_slice(format!("{:x}\r\n", 8192).as_bytes());
        chunked.extend_from_slice(&[b' '; 8192]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let reply = raw(addr, ca, &chunked).await;
    assert_eq!(reply.status, 413, "{}", reply.body);

    // Plain HTTP and garbage on the TLS port do not hurt the server.
    for junk in [&b"GET /healthz HTTP/1.1\r\n\r\n"[..], &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0][..]] {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let _ = tcp.write_all(junk).await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink)).await;
    }

    let reply = request(addr, ca, "GET", "/healthz", None, &[]).await;
    assert_eq!((reply.status, reply.body.trim()), (200, "ok"));
    let reply = request(addr, ca, "GET", "/metrics", None, &[]).await;
    assert_eq!(reply.status, 200);
    for line in [
        r#"meshauth_webhook_admissions_total{kind="MeshPolicy",operation="CREATE",result="Allowed"} 1"#,
        r#"meshauth_webhook_admissions_total{kind="MeshPolicy",operation="UPDATE",result="Denied"} 1"#,
        r#"meshauth_webhook_bad_requests_total{status="415"} 2"#,
        r#"meshauth_webhook_admission_duration_seconds_count{kind="MeshPolicy"}"#,
    ] {
        assert!(reply.body.contains(line), "metrics lack {line}:\n{}", reply.body);
    }

    // The plain-HTTP ops listener serves /metrics and /healthz only.
    let metrics_addr = server.webhook.metrics_addr.expect("metrics listener");
    let mut tcp = TcpStream::connect(metrics_addr).await.expect("connect");
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("write");
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.expect("read");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("meshauth_webhook_admissions_total"), "{out}");

    server.webhook.shutdown().await;
}

#[tokio::test]
async fn serves_renewed_certificate_files_without_a_restart() {
    let server = start(1024 * 1024).await;
    let addr = server.webhook.addr;
    let before = request(addr, &server.ca, "GET", "/healthz", None, &[]).await;
    assert_eq!(before.status, 200);

    let (ca2, leaf2, key2) = ca_and_leaf();
    write_pair(server.dir.path(), &leaf2, &key2);
    let new_leaf = CertificateDer::from_pem_slice(leaf2.as_bytes()).expect("pem").to_vec();
    let mut served = Vec::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Trust both CAs while waiting; check which certificate comes back.
        let both = format!("{}{}", server.ca, ca2);
        served = request(addr, &both, "GET", "/healthz", None, &[]).await.peer_cert;
        if served == new_leaf {
            break;
        }
    }
    assert_eq!(served, new_leaf, "the new certificate is served");
    assert_ne!(before.peer_cert, new_leaf);
    server.webhook.shutdown().await;
}
