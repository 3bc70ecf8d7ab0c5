//! Finds the host side of a pod's veth: the interface the node routes the pod's IP to.
//!
//! CNI plugins that give every pod a veth (Calico, the ptp plugin, the demo) install a host
//! route per pod address; the most specific route in `/proc/net/route` names the interface.

use std::net::Ipv4Addr;

/// A route of the IPv4 main table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Route {
    iface: String,
    destination: Ipv4Addr,
    mask: Ipv4Addr,
}

/// Why the route table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("cannot read /proc/net/route: {0}")]
    Read(#[from] std::io::Error),
}

/// The interface the most specific route to `ip` leaves through, in this network namespace.
pub fn route_interface(ip: Ipv4Addr) -> Result<Option<String>, RouteError> {
    let table = std::fs::read_to_string("/proc/net/route")?;
    Ok(best_route(&parse_routes(&table), ip))
}

fn parse_routes(table: &str) -> Vec<Route> {
    // Lines: Iface Destination Gateway Flags RefCnt Use Metric Mask ...; addresses are
    // little-endian hex of the network-order bytes.
    let hex_ip = |s: &str| u32::from_str_radix(s, 16).ok().map(|v| Ipv4Addr::from(v.to_le_bytes()));
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            Some(Route { iface: (*f.first()?).to_owned(), destination: hex_ip(f.get(1)?)?, mask: hex_ip(f.get(7)?)? })
        })
        .collect()
}

fn best_route(routes: &[Route], ip: Ipv4Addr) -> Option<String> {
    routes
        .iter()
        .filter(|r| u32::from(ip) & u32::from(r.mask) == u32::from(r.destination))
        .max_by_key(|r| u32::from(r.mask).count_ones())
        .map(|r| r.iface.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
        cni0\t0001F40A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
        vethpay\t0A02F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";

    #[test]
    fn the_most_specific_route_names_the_interface() {
        let routes = parse_routes(TABLE);
        assert_eq!(routes.len(), 3);
        assert_eq!(best_route(&routes, Ipv4Addr::new(10, 244, 2, 10)).as_deref(), Some("vethpay"));
        assert_eq!(best_route(&routes, Ipv4Addr::new(10, 244, 1, 7)).as_deref(), Some("cni0"));
        assert_eq!(best_route(&routes, Ipv4Addr::new(8, 8, 8, 8)).as_deref(), Some("eth0"));
        assert_eq!(best_route(&parse_routes("Iface\n"), Ipv4Addr::new(8, 8, 8, 8)), None);
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let routes = parse_routes("header\nbroken\neth0 zz 0 0 0 0 0 00000000\n");
        assert!(routes.is_empty());
    }
}
