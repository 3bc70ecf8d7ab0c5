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
    start_with(|config| {
        config.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        config.max_body_bytes = max_body_bytes;
    })
    .await
}

/// A standalone server on loopback with fresh certificate files, `adjust`ed.
async fn start_with(adjust: impl FnOnce(&mut Config)) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, leaf, key) = ca_and_leaf();
    let files = write_pair(dir.path(), &leaf, &key);
    let mut config = Config::new(CertSource::Files(files));
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.kube_api = KubeApi::Off;
    adjust(&mut config);
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
        (
            "wrong envelope",
            "POST",
            "/validate",
            JSON,
            br#"{"kind":"Pod","apiVersion":"v1"}"#.to_vec(),
            400,
            "expected kind \"AdmissionReview\"",
        ),
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
    let mut chunked =
        b"POST /validate HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
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

async fn tls_connect(addr: SocketAddr, ca: &str) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(client_config(ca));
    let tcp = TcpStream::connect(addr).await?;
    connector.connect(ServerName::try_from("127.0.0.1").expect("name"), tcp).await
}

/// Whether the server closes the connection (EOF or error) within `bound`, while `drip` bytes
/// are sent one at a time every 100 ms.
async fn closed_within(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, drip: &[u8], bound: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + bound;
    let mut next = 0;
    let mut buf = [0u8; 256];
    loop {
        tokio::select! {
            read = tls.read(&mut buf) => match read {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            },
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if next < drip.len() {
                    if tls.write_all(&drip[next..next + 1]).await.is_err() || tls.flush().await.is_err() {
                        return true;
                    }
                    next += 1;
                }
            }
            _ = tokio::time::sleep_until(deadline) => return false,
        }
    }
}

/// Slowloris: headers sent a byte at a time never finish, and a connection that sends nothing
/// after its handshake keeps its slot forever — unless the server cuts both off.
#[tokio::test]
async fn slow_headers_and_idle_connections_are_cut_off() {
    let server = start_with(|config| {
        config.header_timeout = Duration::from_secs(1);
        config.idle_timeout = Duration::from_secs(1);
    })
    .await;
    let (addr, ca) = (server.webhook.addr, server.ca.as_str());
    let drip = b"POST /validate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut slow = tls_connect(addr, ca).await.expect("TLS");
    // The drip lasts ~20 s; the header timeout is 1 s.
    assert!(closed_within(&mut slow, drip, Duration::from_secs(10)).await, "a connection dripping its headers was kept open");
    let mut idle = tls_connect(addr, ca).await.expect("TLS");
    assert!(closed_within(&mut idle, b"", Duration::from_secs(10)).await, "an idle connection was kept open");
    // A client that asks in time is answered.
    let good = serde_json::to_vec(&review("CREATE", policy("spiffe://cluster.local/ns/shop/sa/order"))).expect("json");
    assert_eq!(request(addr, ca, "POST", "/validate", JSON, &good).await.status, 200);
    server.webhook.shutdown().await;
}

/// A client CA and a client certificate it signed, as rustls wants them.
fn client_ca_and_cert() -> (String, Vec<CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>) {
    let (ca, leaf, key) = ca_and_leaf();
    let chain = CertificateDer::pem_slice_iter(leaf.as_bytes()).collect::<Result<Vec<_>, _>>().expect("pem");
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
    (ca, chain, key)
}

/// Anyone who reaches the port could send a forged review naming another namespace; with
/// `--client-ca` only a client holding a certificate of that CA (the API server) is served.
#[tokio::test]
async fn with_a_client_ca_only_clients_with_its_certificates_are_served() {
    let (client_ca, client_chain, client_key) = client_ca_and_cert();
    let ca_file = tempfile::NamedTempFile::new().expect("tempfile");
    std::fs::write(ca_file.path(), &client_ca).expect("write");
    let server = start_with(|config| config.client_ca = Some(ca_file.path().to_owned())).await;
    let (addr, ca) = (server.webhook.addr, server.ca.as_str());
    let good = serde_json::to_vec(&review("CREATE", policy("spiffe://cluster.local/ns/shop/sa/order"))).expect("json");
    let mut req = format!(
        "POST /validate HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        good.len()
    )
    .into_bytes();
    req.extend_from_slice(&good);

    let send = |config: Arc<rustls::ClientConfig>| {
        let req = req.clone();
        async move {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let mut tls =
                tokio_rustls::TlsConnector::from(config).connect(ServerName::try_from("127.0.0.1").expect("name"), tcp).await.ok()?;
            tls.write_all(&req).await.ok()?;
            let mut out = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await.ok()?.ok()?;
            Some(String::from_utf8_lossy(&out).into_owned())
        }
    };
    // Without a client certificate (TLS 1.3 reports the refusal on the first read).
    let reply = send(client_config(ca)).await;
    assert!(reply.as_deref().is_none_or(|r| !r.starts_with("HTTP/1.1 200")), "answered without a client certificate: {reply:?}");
    // With one of another CA.
    let (_, other_chain, other_key) = client_ca_and_cert();
    let with_cert = |chain: Vec<CertificateDer<'static>>, key: rustls::pki_types::PrivateKeyDer<'static>| {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots.add(cert.expect("pem")).expect("root");
        }
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
                .expect("client cert"),
        )
    };
    let reply = send(with_cert(other_chain, other_key)).await;
    assert!(reply.as_deref().is_none_or(|r| !r.starts_with("HTTP/1.1 200")), "answered with another CA's certificate: {reply:?}");
    // With the right one.
    let reply = send(with_cert(client_chain, client_key)).await.expect("answered with the CA's certificate");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"allowed\":true"), "{reply}");
    server.webhook.shutdown().await;
}

/// Reads the webhook's JSON log until it names the address it serves on.
fn served_addr(stdout: impl std::io::Read) -> Option<SocketAddr> {
    use std::io::BufRead;
    for line in std::io::BufReader::new(stdout).lines() {
        let v: Value = serde_json::from_str(&line.ok()?).ok()?;
        if let Some(addr) = v["fields"]["addr"].as_str() {
            return addr.parse().ok();
        }
    }
    None
}

/// A connection flood against the real binary, run with 256 file descriptors: hundreds of
/// connections that never start TLS, TLS connections stuck in their headers and requests whose
/// bodies never arrive. Every timeout is set to a minute, so only the connection limit (the
/// oldest idle or slow connection makes room for a new one) can let a real AdmissionReview
/// through within the API server's 10 s webhook timeout. Without the limit the process runs
/// out of descriptors and stops accepting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_does_not_keep_a_review_from_being_answered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, leaf, key) = ca_and_leaf();
    let files = write_pair(dir.path(), &leaf, &key);
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 256 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_meshauth-webhook"))
        .args(["--listen", "127.0.0.1:0", "--kube-api", "off", "--log-format", "json", "--max-connections", "64"])
        .args(["--handshake-timeout", "60s", "--header-timeout", "60s", "--body-timeout", "60s", "--idle-timeout", "60s"])
        .arg("--tls-cert")
        .arg(&files.cert)
        .arg("--tls-key")
        .arg(&files.key)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start meshauth-webhook");
    let stdout = child.stdout.take().expect("stdout");
    let addr = tokio::task::spawn_blocking(move || served_addr(stdout)).await.expect("join").expect("the webhook logs its address");

    // Each wave runs at once with short bounds, so the whole attack takes seconds, far less
    // than the server's minute-long timeouts.
    let bounded = Duration::from_secs(2);
    let connect_many = |n: usize| futures::future::join_all((0..n).map(|_| tokio::time::timeout(bounded, TcpStream::connect(addr))));
    let mut held: Vec<TcpStream> = connect_many(300).await.into_iter().filter_map(|c| c.ok()?.ok()).collect();
    let slow = futures::future::join_all((0..60).map(|i| {
        let ca = ca.clone();
        async move {
            let mut tls = tokio::time::timeout(bounded, tls_connect(addr, &ca)).await.ok()?.ok()?;
            let partial: &[u8] = if i % 2 == 0 {
                b"POST /validate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            } else {
                b"POST /validate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"kind\":"
            };
            tls.write_all(partial).await.ok()?;
            tls.flush().await.ok()?;
            Some(tls)
        }
    }))
    .await;
    held.extend(connect_many(100).await.into_iter().filter_map(|c| c.ok()?.ok()));

    let good = serde_json::to_vec(&review("CREATE", policy("spiffe://cluster.local/ns/shop/sa/order"))).expect("json");
    let answered = tokio::time::timeout(Duration::from_secs(10), request(addr, &ca, "POST", "/validate", JSON, &good)).await;
    let _ = child.kill();
    let _ = child.wait();
    let reply = answered.expect("the review is answered within the API server's timeout despite the flood");
    assert_eq!(reply.status, 200, "{}", reply.body);
    let v: Value = serde_json::from_str(&reply.body).expect("json reply");
    assert_eq!(v["response"]["allowed"], true, "{v}");
    drop((held, slow));
}
