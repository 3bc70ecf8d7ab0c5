//! One request and one response per connection, each a JSON document in one `sendmsg`; the
//! request may carry the pod's network namespace as an `SCM_RIGHTS` descriptor.

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Where the agent listens unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/meshauth/cni.sock";
/// The largest request or response: a pod has a handful of addresses.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// What the runtime asked the plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
}

/// What the plugin asks the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentRequest {
    pub command: Command,
    pub container_id: String,
    /// The pod's interface in its network namespace (`CNI_IFNAME`, or the one `prevResult` names).
    pub ifname: String,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    /// The pod's IPv4 addresses from `prevResult`.
    pub ips: Vec<Ipv4Addr>,
}

/// The agent's answer: `error` is `None` when the request was carried out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentResponse {
    pub error: Option<String>,
}

impl AgentResponse {
    pub fn ok() -> Self {
        Self { error: None }
    }

    pub fn failed(reason: impl Into<String>) -> Self {
        Self { error: Some(reason.into()) }
    }
}

/// Why a request could not be exchanged.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("cannot reach the meshauth agent at {path}: {error}")]
    Connect { path: String, error: std::io::Error },
    #[error("socket i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("socket: {0}")]
    Socket(#[from] nix::Error),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("message larger than {MAX_MESSAGE} bytes")]
    TooLarge,
}

/// Sends `request` (and `netns`) to the agent at `socket` and waits up to `timeout` for its answer.
pub fn call(
    socket: &Path,
    request: &AgentRequest,
    netns: Option<BorrowedFd<'_>>,
    timeout: Duration,
) -> Result<AgentResponse, ProtocolError> {
    let mut stream = UnixStream::connect(socket).map_err(|error| ProtocolError::Connect { path: socket.display().to_string(), error })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let body = serde_json::to_vec(request).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    let fds: Vec<i32> = netns.iter().map(|fd| fd.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() { Vec::new() } else { vec![ControlMessage::ScmRights(&fds)] };
    sendmsg::<()>(stream.as_raw_fd(), &[IoSlice::new(&body)], &cmsgs, MsgFlags::empty(), None)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut answer = Vec::new();
    Read::by_ref(&mut stream).take(MAX_MESSAGE as u64 + 1).read_to_end(&mut answer)?;
    if answer.len() > MAX_MESSAGE {
        return Err(ProtocolError::TooLarge);
    }
    serde_json::from_slice(&answer).map_err(|e| ProtocolError::Malformed(e.to_string()))
}

/// Reads one request (and the descriptor it carries, if any) from an accepted connection.
/// The descriptor is owned by the caller; extra descriptors are closed.
pub fn read_request(stream: &UnixStream) -> Result<(AgentRequest, Option<OwnedFd>), ProtocolError> {
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    let mut cmsg_space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
    let (len, mut fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut cmsg_space), MsgFlags::MSG_CMSG_CLOEXEC)?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: the kernel just installed these descriptors in this process for us;
                // nothing else owns them.
                fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        (msg.bytes, fds)
    };
    if len > MAX_MESSAGE {
        return Err(ProtocolError::TooLarge);
    }
    let request = serde_json::from_slice(&buf[..len]).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    let netns = if fds.is_empty() { None } else { Some(fds.swap_remove(0)) };
    Ok((request, netns))
}

/// Writes the answer to an accepted connection.
pub fn write_response(mut stream: &UnixStream, response: &AgentResponse) -> Result<(), ProtocolError> {
    let body = serde_json::to_vec(response).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    stream.write_all(&body)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_request_and_its_namespace_descriptor_cross_the_socket() {
        let dir = std::env::temp_dir().join(format!("meshauth-cni-proto-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let (req, fd) = read_request(&stream).expect("request");
            let same = fd.map(|fd| {
                let a = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("stat");
                let b = std::fs::metadata("/proc/self/ns/net").expect("stat");
                use std::os::unix::fs::MetadataExt;
                (a.dev(), a.ino()) == (b.dev(), b.ino())
            });
            write_response(&stream, &AgentResponse::failed(format!("{:?} {:?}", req.command, same))).expect("answer");
        });
        let netns = std::fs::File::open("/proc/self/ns/net").expect("netns");
        let request = AgentRequest {
            command: Command::Add,
            container_id: "c1".into(),
            ifname: "eth0".into(),
            pod_namespace: Some("shop".into()),
            pod_name: Some("web".into()),
            ips: vec!["10.0.0.5".parse().expect("ip")],
        };
        let answer = call(&path, &request, Some(netns.as_fd()), Duration::from_secs(5)).expect("call");
        assert_eq!(answer.error.as_deref(), Some("Add Some(true)"));
        server.join().expect("server");
    }

    #[test]
    fn an_absent_agent_is_a_connect_error_naming_the_socket() {
        let err = call(
            Path::new("/nonexistent/meshauth.sock"),
            &AgentRequest {
                command: Command::Status,
                container_id: String::new(),
                ifname: String::new(),
                pod_namespace: None,
                pod_name: None,
                ips: vec![],
            },
            None,
            Duration::from_secs(1),
        )
        .expect_err("no agent");
        assert!(err.to_string().contains("cannot reach the meshauth agent at /nonexistent/meshauth.sock"), "{err}");
    }
}
