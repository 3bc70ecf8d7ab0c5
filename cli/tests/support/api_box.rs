//! The demo's mesh in a box with its agents reading the test environment's real API server:
//! the Node objects (address set as a kubelet would) and the box's node namespaces made from
//! one list. Shared by the propagation and agent-memory benches and their smoke tests.

use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use meshauth_testenv::TestEnv;
use meshauth_testenv::k8s;
use meshauthctl::demo::mesh::MeshBox;

/// `what: error`, for `map_err`.
pub fn err(what: &str) -> impl Fn(&dyn std::fmt::Display) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// The test environment (its CRDs installed), a runtime and a client of its API server, once
/// the agent binary the box will run is known to exist.
pub fn start_env() -> Result<(TestEnv, tokio::runtime::Runtime, kube::Client), String> {
    let bin = crate::agent_load::agent_bin();
    if !bin.exists() {
        return Err(format!("{} is missing: build it first (`cargo build [--release] -p meshauth-agent`)", bin.display()));
    }
    let env = TestEnv::start_blocking(meshauth_testenv::Options::default()).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| e.to_string())?;
    let client = rt.block_on(env.client()).map_err(|e| e.to_string())?;
    rt.block_on(k8s::install_crds(&client, &k8s::crd_dir(), Duration::from_secs(60))).map_err(|e| e.to_string())?;
    Ok((env, rt, client))
}

/// Creates a Node object per `(name, address)` and a box with a namespace per node whose
/// agents (started later) read `env`'s API server. `tag` keeps names unique.
pub fn build(
    env: &TestEnv,
    rt: &tokio::runtime::Runtime,
    client: &kube::Client,
    tag: &str,
    nodes: &[(String, Ipv4Addr)],
) -> Result<MeshBox, String> {
    let mut manifest = String::new();
    for (name, address) in nodes {
        manifest.push_str(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nstatus: {{addresses: [{{type: InternalIP, address: {address}}}]}}\n---\n"
        ));
    }
    rt.block_on(async {
        let api = Api::<Node>::all(client.clone());
        for (name, address) in nodes {
            let node: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).map_err(|e| e.to_string())?;
            api.create(&PostParams::default(), &node).await.map_err(|e| err(name)(&e))?;
            k8s::set_node_address(client, name, &address.to_string()).await.map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(())
    })?;
    let mut parsed = meshauth_cluster::manifests::Manifests::default();
    parsed.add_source("nodes.yaml", &manifest).map_err(|e| e.to_string())?;
    let dir = env.dir().join("box");
    let manifests_dir = dir.join("manifests");
    std::fs::create_dir_all(&manifests_dir).map_err(|e| e.to_string())?;
    std::fs::write(manifests_dir.join("nodes.yaml"), &manifest).map_err(|e| e.to_string())?;
    let mut mesh = MeshBox::build(tag, dir, manifests_dir, &parsed, crate::agent_load::agent_bin(), Duration::from_secs(3600))
        .map_err(|e| e.to_string())?;
    let port = env.api_port().ok_or("no port in the kubeconfig's server")?;
    mesh.use_api_server(env.kubeconfig(), port).map_err(|e| e.to_string())?;
    Ok(mesh)
}
