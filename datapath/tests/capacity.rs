//! A policy larger than the policy map: the loader must fail closed. Whole destinations that
//! do not fit accept nothing (never more than before), the rest is enforced as written, and the
//! pods stay attached. Real programs, real packets between pod namespaces. Run as root.

mod common;

use common::*;
use meshauth_datapath::netns::{tcp_echo_server, tcp_request};
use meshauth_policy::tables::{AuthRequirement as Auth, TableProtocol as P};

#[test]
fn a_policy_larger_than_the_map_denies_whole_destinations_and_enforces_the_rest() {
    let mut f = Fixture::with_config("cap", |c| c.policy_entries = 8);
    let _s2 = tcp_echo_server(f.pod(2), 8080).unwrap();
    let _s3 = tcp_echo_server(f.pod(3), 8080).unwrap();
    // Before: nobody isolated, pod 1 reaches both.
    let open = tables(vec![endpoint(1, false, Auth::None), endpoint(2, false, Auth::None), endpoint(3, false, Auth::None)], vec![]);
    assert!(f.dp().apply_tables(&open).unwrap().complete());
    assert!(tcp_request(f.pod(1), f.ip(3), 8080, LONG));

    // Pod 2's rules need 4 entries, pod 3's 10 (one per port): 14 do not fit in 8.
    let mut policy: Vec<_> = (0..4).map(|i| rule(2, 1, P::Tcp, 8080 + i, Auth::None)).collect();
    policy.extend((0..10).map(|i| rule(3, 1, P::Tcp, 8080 + 2 * i, Auth::None)));
    let oversized = tables(vec![endpoint(1, false, Auth::None), endpoint(2, true, Auth::None), endpoint(3, true, Auth::None)], policy);
    let stats = f.dp().apply_tables(&oversized).expect("an oversized policy is applied, not refused");
    assert!(!stats.complete());
    assert_eq!(stats.denied_destinations, vec![identity(3)], "{stats:?}");
    assert!(tcp_request(f.pod(1), f.ip(2), 8080, LONG), "the destination that fits is enforced as written");
    assert!(!tcp_request(f.pod(1), f.ip(3), 8080, SHORT), "the destination that does not fit accepts nothing");
    assert!(!tcp_request(f.pod(3), f.ip(2), 8080, SHORT), "pod 2's rules still deny pod 3");
    assert_eq!(f.dp().maps().interfaces().unwrap().len(), 3, "every pod is still attached");

    // The policy shrinks: everything fits again and pod 3 gets its rules.
    let mut policy: Vec<_> = (0..4).map(|i| rule(2, 1, P::Tcp, 8080 + i, Auth::None)).collect();
    policy.push(rule(3, 1, P::Tcp, 8080, Auth::None));
    let fits = tables(vec![endpoint(1, false, Auth::None), endpoint(2, true, Auth::None), endpoint(3, true, Auth::None)], policy);
    assert!(f.dp().apply_tables(&fits).unwrap().complete());
    assert!(tcp_request(f.pod(1), f.ip(3), 8080, LONG));
}
