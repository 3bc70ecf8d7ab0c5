//! `meshauthctl auth list`, `status` and `bench datapath` on a datapath loaded in the test's
//! own pin directory. Run as root.

use std::net::Ipv4Addr;
use std::time::Duration;

use meshauth_datapath::bench::{BenchOptions, ENTRY_COUNTS};
use meshauth_datapath::netns::{PinDir, endpoint, require_root};
use meshauth_datapath::{BootTime, Datapath, DatapathConfig};
use meshauth_policy::tables::{AuthRequirement as Auth, CompiledTables, PolicyEntry, TableProtocol as P};
use meshauthctl::datapath::{OutputFormat, auth_list, bench_datapath, status};

/// Pod 1 may reach the isolated pod 2, which requires authentication, on TCP port 80.
fn two_pods() -> CompiledTables {
    let pod = |i: u8, auth| endpoint(Ipv4Addr::new(10, 77, 0, i), 255 + u32::from(i), u32::from(i), auth, None);
    let mut server = pod(2, Auth::Required);
    server.isolated = true;
    let endpoints = vec![pod(1, Auth::None), server];
    let spiffe_ids = endpoints.iter().map(|e| (e.spiffe_id, format!("spiffe://cluster.local/ns/test/sa/pod-{}", e.spiffe_id))).collect();
    let rule = PolicyEntry { dst_identity: 257, src_identity: 256, protocol: P::Tcp, port_start: 80, port_end: 80, auth: Auth::None };
    CompiledTables { endpoints, policy: vec![rule], spiffe_ids, security_identities: Vec::new() }
}

#[test]
fn auth_list_and_status_read_the_pinned_maps() {
    require_root();
    let pins = PinDir::new("cli");
    let mut dp = Datapath::load_or_adopt(DatapathConfig::with_pin_dir(&pins.0)).unwrap();
    dp.apply_tables(&two_pods()).unwrap();
    // Proven by the agent of another node, with a connection key that must never be shown.
    let secret = meshauth_datapath::ConnectionKey([0x5ec2_e7ab_cdef_0123, 0x0fed_cba9_8765_4321]);
    let remote = meshauth_datapath::NodeId::At(std::net::Ipv4Addr::new(192, 0, 2, 7));
    dp.set_auth_keyed(2, 1, remote, BootTime::after(Duration::from_secs(3600)), secret).unwrap();
    dp.set_auth(1, 2, meshauth_datapath::NodeId::This, BootTime::now()).unwrap();

    let mut out = Vec::new();
    auth_list(&pins.0, OutputFormat::Json, &mut out).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let pairs = v["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 2);
    assert_eq!(pairs[0]["remaining_seconds"], serde_json::Value::Null, "expired pair");
    assert_eq!(pairs[1]["dst"], "spiffe://cluster.local/ns/test/sa/pod-2");
    assert!(pairs[1]["remaining_seconds"].as_f64().unwrap() > 3590.0);
    assert_eq!(pairs[1]["src_node"], "192.0.2.7");
    assert_eq!(pairs[0]["src_node"], "this node");
    let json = String::from_utf8(out.clone()).unwrap();
    for word in secret.0.iter().flat_map(|w| [w.to_string(), format!("{w:x}")]) {
        assert!(!json.contains(&word), "a connection key in the output: {json}");
    }
    assert!(!json.contains("key"), "{json}");

    let mut out = Vec::new();
    auth_list(&pins.0, OutputFormat::Table, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("spiffe://cluster.local/ns/test/sa/pod-1")
            && text.contains("expired")
            && text.contains("2 pair(s)")
            && text.contains("SOURCE NODE")
            && text.contains("192.0.2.7"),
        "{text}"
    );

    let mut out = Vec::new();
    status(&pins.0, OutputFormat::Json, &mut out).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["maps"]["auth_entries"], 2);
    assert_eq!(v["maps"]["auth_expired"], 1);
    assert_eq!(v["endpoints"].as_array().unwrap().len(), 2);
    assert_eq!(v["endpoints"][1]["mutual_auth"], "required");
    assert!(v["counters"]["drop_denied"]["packets"].is_u64());

    let mut out = Vec::new();
    status(&pins.0, OutputFormat::Table, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("ENDPOINTS") && text.contains("10.77.0.2") && text.contains("drop_spoofed"), "{text}");

    let missing = std::path::Path::new("/sys/fs/bpf/meshauth-test-no-such-dir");
    let err = status(missing, OutputFormat::Table, &mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("is the agent running"), "{err}");
}

#[test]
fn bench_reports_every_path_at_both_sizes_in_the_documented_shape() {
    require_root();
    let pins = PinDir::new("bench");
    let opts = BenchOptions { repeat: 1000, rounds: 1, pin_dir: pins.0.clone(), connections: 50 };
    let mut out = Vec::new();
    bench_datapath(&opts, OutputFormat::Json, &mut out).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert!(v["baseline_ns"].is_number());
    let paths = v["paths"].as_array().unwrap();
    let names = ["no-policy", "conntrack-hit", "auth-present", "auth-missing", "denied", "syn-tag-verified", "syn-untagged-dropped"];
    assert_eq!(paths.len(), names.len() * ENTRY_COUNTS.len());
    for n in names {
        for e in ENTRY_COUNTS {
            let p = paths.iter().find(|p| p["path"] == n && p["entries"] == e).unwrap_or_else(|| panic!("{n} at {e}"));
            assert!(p["ns_per_packet"].as_f64().unwrap() > 0.0);
            assert_eq!(p.as_object().unwrap().len(), 3);
        }
    }
    // The paths BPF_PROG_TEST_RUN cannot time, on real SYNs, each beside the empty program.
    let live = v["new_connections"].as_array().unwrap();
    let names: Vec<&str> = live.iter().map(|p| p["path"].as_str().unwrap()).collect();
    assert_eq!(names, ["tag-written", "syn-tag-verified", "syn-local-proof"]);
    for p in live {
        assert!(p["packets"].as_u64().unwrap() >= 50, "{p}");
        assert!(p["ns_per_packet"].as_f64().unwrap() > 0.0 && p["baseline_ns_per_packet"].as_f64().unwrap() > 0.0, "{p}");
    }
    assert!(!pins.0.exists(), "the bench removes its pins");
}
