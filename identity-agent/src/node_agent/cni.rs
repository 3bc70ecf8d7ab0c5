//! The CNI plugin's requests: the socket they arrive on, their way to the apply loop, and how
//! the applier carries out ADD, DEL, CHECK and STATUS.

use super::{AgentError, Applier};
use crate::pod_net;
use meshauth_cni::protocol::{AgentRequest, AgentResponse, Command as CniCommand};
use meshauth_policy::model::ObjectRef;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

impl Applier {
    fn knows_local_pod(&self, pod: &ObjectRef) -> bool {
        let here = |p: &meshauth_policy::model::PodInfo| &p.object_ref() == pod && p.node.as_deref() == Some(self.node_name.as_str());
        self.last.inputs.pods.iter().any(here) || self.last.unaddressed.iter().any(here)
    }

    /// Carries out one request of the CNI plugin. `Err(Retry)` means "not yet": the caller
    /// asks again for a while before it gives up.
    pub fn cni(&mut self, request: &AgentRequest, netns: Option<OwnedFd>) -> Result<(), CniRefusal> {
        match request.command {
            CniCommand::Status => Ok(()),
            CniCommand::Add => {
                let ip = *request.ips.first().ok_or_else(|| CniRefusal::Final("the request has no IPv4 address".into()))?;
                let netns = netns.ok_or_else(|| CniRefusal::Final("the request carries no network namespace".into()))?;
                let pod = match (&request.pod_namespace, &request.pod_name) {
                    (Some(ns), Some(name)) => Some(ObjectRef::new(ns.clone(), name.clone())),
                    _ => None,
                };
                if let Some(pod) = &pod
                    && !self.knows_local_pod(pod)
                {
                    return Err(CniRefusal::Retry(format!("pod {pod} is not known to the agent of {} yet", self.node_name)));
                }
                // The plugins before this one may just have given the node a new address (a
                // bridge's or a ptp veth's gateway): probes from it must pass from the start.
                self.sync_host_addresses();
                let veth = pod_net::find_pod_veth(std::os::fd::AsFd::as_fd(&netns), &request.ifname, ip)
                    .map_err(|e| CniRefusal::Final(e.to_string()))?;
                self.register(ip, veth.clone(), pod, Some(request.container_id.clone())).map_err(CniRefusal::Final)?;
                self.reapply().map_err(|e| CniRefusal::Final(e.to_string()))?;
                if self.failed.contains(&ip) {
                    self.release(veth.ifindex);
                    return Err(CniRefusal::Final(format!("cannot attach the datapath to {}", veth.name)));
                }
                tracing::info!(%ip, iface = %veth.name, container = %request.container_id, "guarding pod interface (CNI ADD)");
                Ok(())
            }
            CniCommand::Del => {
                let gone: Vec<u32> = self
                    .registry
                    .iter()
                    .filter(|(ip, r)| r.container_id.as_deref() == Some(request.container_id.as_str()) || request.ips.contains(ip))
                    .map(|(_, r)| r.ifindex)
                    .collect();
                for ifindex in &gone {
                    self.release(*ifindex);
                }
                if !gone.is_empty() {
                    tracing::info!(container = %request.container_id, interfaces = ?gone, "pod interface released (CNI DEL)");
                    self.reapply().map_err(|e| CniRefusal::Final(e.to_string()))?;
                }
                Ok(())
            }
            CniCommand::Check => {
                if request.ips.is_empty() {
                    return Err(CniRefusal::Final("the request has no IPv4 address".into()));
                }
                let netns = netns.ok_or_else(|| CniRefusal::Final("the request carries no network namespace".into()))?;
                for ip in &request.ips {
                    let registration =
                        self.registry.get(ip).ok_or_else(|| CniRefusal::Final(format!("{ip} is not guarded on this node")))?;
                    if self.failed.contains(ip) {
                        return Err(CniRefusal::Final(format!("the datapath is not attached to {} ({ip})", registration.ifname)));
                    }
                    // The interface guarded for the address must be this pod's own veth, not
                    // one that a stale registration or another pod left.
                    let veth = pod_net::find_pod_veth(std::os::fd::AsFd::as_fd(&netns), &request.ifname, *ip)
                        .map_err(|e| CniRefusal::Final(e.to_string()))?;
                    if veth.ifindex != registration.ifindex {
                        return Err(CniRefusal::Final(format!(
                            "{ip} is guarded on {}, not on this pod's interface {}",
                            registration.ifname, veth.name
                        )));
                    }
                }
                Ok(())
            }
        }
    }
}

/// Why the agent did not carry out a CNI request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CniRefusal {
    /// Not yet (the pod is not in the agent's view): ask again shortly.
    Retry(String),
    Final(String),
}

/// One CNI request on its way to the apply loop.
pub struct CniCall {
    pub request: AgentRequest,
    pub netns: Option<OwnedFd>,
    pub reply: tokio::sync::oneshot::Sender<Result<(), CniRefusal>>,
}

/// How long ADD waits for the pod to appear in the agent's view before it fails.
const CNI_RETRY_FOR: Duration = Duration::from_secs(15);

/// Serves the CNI plugin on `path`: every request goes to the apply loop through `calls`.
pub fn serve_cni(path: &Path, calls: tokio::sync::mpsc::Sender<CniCall>) -> Result<tokio::task::JoinHandle<()>, AgentError> {
    let state_err = |error| AgentError::State { path: path.to_owned(), error };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(state_err)?;
    }
    // A socket left by an agent that died: nobody listens on it any more.
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).map_err(state_err)?;
    // Root only: the plugin runs as root, and a request can guard or release any interface.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(state_err)?;
    Ok(tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(conn) => conn,
                Err(error) => {
                    // Out of descriptors, say: wait rather than spin; the plugin retries.
                    tracing::warn!(%error, "cannot accept a CNI connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let calls = calls.clone();
            tokio::spawn(async move {
                let Ok(std_stream) = stream.into_std() else { return };
                if std_stream.set_nonblocking(false).is_err() {
                    return;
                }
                let _ = std_stream.set_read_timeout(Some(Duration::from_secs(5)));
                let Ok(Ok((std_stream, request, netns))) = tokio::task::spawn_blocking(move || {
                    meshauth_cni::protocol::read_request(&std_stream).map(|(r, fd)| (std_stream, r, fd))
                })
                .await
                else {
                    return;
                };
                let answer = call_with_retry(&calls, request, netns).await;
                let _ = tokio::task::spawn_blocking(move || meshauth_cni::protocol::write_response(&std_stream, &answer)).await;
            });
        }
    }))
}

async fn call_with_retry(calls: &tokio::sync::mpsc::Sender<CniCall>, request: AgentRequest, netns: Option<OwnedFd>) -> AgentResponse {
    let deadline = Instant::now() + CNI_RETRY_FOR;
    loop {
        let fd = match &netns {
            Some(fd) => match fd.try_clone() {
                Ok(c) => Some(c),
                Err(e) => return AgentResponse::failed(format!("cannot keep the namespace descriptor: {e}")),
            },
            None => None,
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        if calls.send(CniCall { request: request.clone(), netns: fd, reply }).await.is_err() {
            return AgentResponse::failed("the agent is stopping");
        }
        match answer.await {
            Ok(Ok(())) => return AgentResponse::ok(),
            Ok(Err(CniRefusal::Retry(reason))) if Instant::now() < deadline => {
                tracing::debug!(%reason, "CNI request waits");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(Err(CniRefusal::Retry(reason) | CniRefusal::Final(reason))) => return AgentResponse::failed(reason),
            Err(_) => return AgentResponse::failed("the agent is stopping"),
        }
    }
}
