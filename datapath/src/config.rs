//! Datapath configuration: where things are pinned, how big the maps are, and the few rules
//! that are settings (IPv6, event rate, attach mode). Every setting has a `const` name for its
//! environment variable and a `const DEFAULT_…`.

use std::path::PathBuf;

use serde::Serialize;

/// Environment variable of [`DatapathConfig::pin_dir`].
pub const PIN_DIR: &str = "MESHAUTH_BPF_PIN_DIR";
/// Environment variable of [`DatapathConfig::auth_entries`].
pub const AUTH_ENTRIES: &str = "MESHAUTH_BPF_AUTH_ENTRIES";
/// Environment variable of [`DatapathConfig::endpoint_entries`].
pub const ENDPOINT_ENTRIES: &str = "MESHAUTH_BPF_ENDPOINT_ENTRIES";
/// Environment variable of [`DatapathConfig::policy_entries`].
pub const POLICY_ENTRIES: &str = "MESHAUTH_BPF_POLICY_ENTRIES";
/// Environment variable of [`DatapathConfig::conntrack_entries`].
pub const CONNTRACK_ENTRIES: &str = "MESHAUTH_BPF_CONNTRACK_ENTRIES";
/// Environment variable of [`DatapathConfig::events_per_sec_per_cpu`].
pub const EVENTS_PER_SEC: &str = "MESHAUTH_BPF_EVENTS_PER_SEC";
/// Environment variable of [`DatapathConfig::ipv6`]: `drop` or `pass`.
pub const IPV6: &str = "MESHAUTH_BPF_IPV6";
/// Environment variable of [`DatapathConfig::attach_mode`]: `auto`, `tcx` or `netlink`.
pub const ATTACH_MODE: &str = "MESHAUTH_BPF_ATTACH_MODE";
/// Environment variable of [`DatapathConfig::pass_sample_every`].
pub const PASS_SAMPLE_EVERY: &str = "MESHAUTH_BPF_PASS_SAMPLE_EVERY";
/// Environment variable of [`DatapathConfig::allow_host`]: `true` or `false`.
pub const ALLOW_HOST: &str = "MESHAUTH_BPF_ALLOW_HOST";
/// Environment variable of [`DatapathConfig::conntrack_timeouts`]' `tcp_s`.
pub const CT_TCP_TIMEOUT: &str = "MESHAUTH_BPF_CT_TCP_TIMEOUT_SECONDS";
/// Environment variable of [`DatapathConfig::conntrack_timeouts`]' `udp_s`.
pub const CT_UDP_TIMEOUT: &str = "MESHAUTH_BPF_CT_UDP_TIMEOUT_SECONDS";
/// Environment variable of [`DatapathConfig::conntrack_timeouts`]' `icmp_s`.
pub const CT_ICMP_TIMEOUT: &str = "MESHAUTH_BPF_CT_ICMP_TIMEOUT_SECONDS";
/// Environment variable of [`DatapathConfig::conntrack_timeouts`]' `closing_s`.
pub const CT_CLOSING_TIMEOUT: &str = "MESHAUTH_BPF_CT_CLOSING_TIMEOUT_SECONDS";
/// The node's own addresses reach its pods unless switched off (as Cilium's
/// `allow-localhost` and Calico do), so the kubelet's probes keep working.
pub const DEFAULT_ALLOW_HOST: bool = true;

/// Where the datapath pins its maps, programs and links.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/meshauth";
/// The bpffs mount the loader creates when nothing is mounted there.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// The least the auth map may hold: 512k pairs.
pub const MIN_AUTH_ENTRIES: u32 = 512 * 1024;
pub const DEFAULT_AUTH_ENTRIES: u32 = MIN_AUTH_ENTRIES;
pub const DEFAULT_ENDPOINT_ENTRIES: u32 = 65_536;
pub const DEFAULT_POLICY_ENTRIES: u32 = 65_536;
/// Preallocated (LRU): about 80 bytes of kernel memory per entry.
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 131_072;
pub const DEFAULT_FRAGMENT_ENTRIES: u32 = 8_192;
pub const DEFAULT_INTERFACE_ENTRIES: u32 = 4_096;
pub const DEFAULT_SPIFFE_NAME_ENTRIES: u32 = 65_536;
/// Ring buffer size in bytes (a power of two, a multiple of the page size).
pub const DEFAULT_EVENT_RING_BYTES: u32 = 256 * 1024;
/// Events per second per CPU before the program stops writing (and counts instead).
pub const DEFAULT_EVENTS_PER_SEC: u32 = 1_000;

/// How long a conntrack entry lives without a packet, per protocol (Cilium's defaults: six
/// hours for TCP, a minute for other protocols, ten seconds after a FIN). An entry that idled
/// out is forgotten: the flow's next packet is checked in full, as a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ConntrackTimeouts {
    pub tcp_s: u32,
    pub udp_s: u32,
    pub icmp_s: u32,
    /// A TCP flow after either side's FIN or RST.
    pub closing_s: u32,
}

impl Default for ConntrackTimeouts {
    fn default() -> Self {
        ConntrackTimeouts { tcp_s: 21_600, udp_s: 60, icmp_s: 60, closing_s: 10 }
    }
}

/// What happens to IPv6 on pod interfaces. The tables are IPv4 only, so IPv6 cannot be
/// enforced: either it is dropped (except neighbour discovery) or it passes unchecked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ipv6Mode {
    /// Drop IPv6 other than ICMPv6 neighbour discovery (types 133–137), counted and reported.
    #[default]
    Drop,
    /// Pass all IPv6 unchecked, counted: for clusters that accept unenforced IPv6.
    Pass,
}

/// How programs are attached to interfaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// tcx links where the kernel has them (6.6+), the clsact qdisc otherwise.
    #[default]
    Auto,
    /// tcx links only.
    Tcx,
    /// clsact qdisc filters (netlink) only.
    Netlink,
}

/// Everything the loader needs to know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DatapathConfig {
    /// Pin directory on a bpffs: `maps/`, `programs/<version>/` and `links/` live under it.
    pub pin_dir: PathBuf,
    pub endpoint_entries: u32,
    pub policy_entries: u32,
    /// At least [`MIN_AUTH_ENTRIES`].
    pub auth_entries: u32,
    pub conntrack_entries: u32,
    pub fragment_entries: u32,
    pub interface_entries: u32,
    pub spiffe_name_entries: u32,
    pub event_ring_bytes: u32,
    pub events_per_sec_per_cpu: u32,
    pub ipv6: Ipv6Mode,
    pub attach_mode: AttachMode,
    /// Traffic from this node's own addresses to its pods passes, whatever the policy (the
    /// kubelet's probes). A hostNetwork process on the same node is the node.
    pub allow_host: bool,
    /// 1 in this many new flows that pass (and are not reported otherwise) is reported as a
    /// pass event, for `meshauthctl observe --verdict FORWARDED`; 0 (the default): none. The
    /// events share the per-CPU event budget with drops.
    pub pass_sample_every: u16,
    pub conntrack_timeouts: ConntrackTimeouts,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            endpoint_entries: DEFAULT_ENDPOINT_ENTRIES,
            policy_entries: DEFAULT_POLICY_ENTRIES,
            auth_entries: DEFAULT_AUTH_ENTRIES,
            conntrack_entries: DEFAULT_CONNTRACK_ENTRIES,
            fragment_entries: DEFAULT_FRAGMENT_ENTRIES,
            interface_entries: DEFAULT_INTERFACE_ENTRIES,
            spiffe_name_entries: DEFAULT_SPIFFE_NAME_ENTRIES,
            event_ring_bytes: DEFAULT_EVENT_RING_BYTES,
            events_per_sec_per_cpu: DEFAULT_EVENTS_PER_SEC,
            ipv6: Ipv6Mode::Drop,
            attach_mode: AttachMode::Auto,
            allow_host: DEFAULT_ALLOW_HOST,
            pass_sample_every: 0,
            conntrack_timeouts: ConntrackTimeouts::default(),
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{var}={value:?}: {reason}")]
    Invalid { var: &'static str, value: String, reason: String },
}

impl DatapathConfig {
    /// The default configuration with a different pin directory (tests, benchmarks).
    pub fn with_pin_dir(pin_dir: impl Into<PathBuf>) -> Self {
        DatapathConfig { pin_dir: pin_dir.into(), ..Self::default() }
    }

    /// The defaults, overridden by the `MESHAUTH_BPF_*` environment variables that are set.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`Self::from_env`] over any variable source (tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut c = DatapathConfig::default();
        if let Some(v) = get(PIN_DIR) {
            c.pin_dir = PathBuf::from(v);
        }
        let number = |var: &'static str, default: u32| -> Result<u32, ConfigError> {
            match get(var) {
                None => Ok(default),
                Some(v) => {
                    v.trim().parse().map_err(|e| ConfigError::Invalid { var, value: v.clone(), reason: format!("not a number: {e}") })
                }
            }
        };
        c.auth_entries = number(AUTH_ENTRIES, c.auth_entries)?;
        c.endpoint_entries = number(ENDPOINT_ENTRIES, c.endpoint_entries)?;
        c.policy_entries = number(POLICY_ENTRIES, c.policy_entries)?;
        c.conntrack_entries = number(CONNTRACK_ENTRIES, c.conntrack_entries)?;
        c.events_per_sec_per_cpu = number(EVENTS_PER_SEC, c.events_per_sec_per_cpu)?;
        let every = number(PASS_SAMPLE_EVERY, u32::from(c.pass_sample_every))?;
        c.pass_sample_every = u16::try_from(every).map_err(|_| ConfigError::Invalid {
            var: PASS_SAMPLE_EVERY,
            value: every.to_string(),
            reason: "at most 65535 (1 in N new flows; 0: none)".into(),
        })?;
        let t = &mut c.conntrack_timeouts;
        t.tcp_s = number(CT_TCP_TIMEOUT, t.tcp_s)?;
        t.udp_s = number(CT_UDP_TIMEOUT, t.udp_s)?;
        t.icmp_s = number(CT_ICMP_TIMEOUT, t.icmp_s)?;
        t.closing_s = number(CT_CLOSING_TIMEOUT, t.closing_s)?;
        if let Some(v) = get(IPV6) {
            c.ipv6 = match v.as_str() {
                "drop" => Ipv6Mode::Drop,
                "pass" => Ipv6Mode::Pass,
                _ => {
                    return Err(ConfigError::Invalid { var: IPV6, value: v, reason: "expected drop or pass".into() });
                }
            };
        }
        if let Some(v) = get(ATTACH_MODE) {
            c.attach_mode = match v.as_str() {
                "auto" => AttachMode::Auto,
                "tcx" => AttachMode::Tcx,
                "netlink" => AttachMode::Netlink,
                _ => {
                    return Err(ConfigError::Invalid { var: ATTACH_MODE, value: v, reason: "expected auto, tcx or netlink".into() });
                }
            };
        }
        if let Some(v) = get(ALLOW_HOST) {
            c.allow_host = match v.as_str() {
                "true" => true,
                "false" => false,
                _ => {
                    return Err(ConfigError::Invalid { var: ALLOW_HOST, value: v, reason: "expected true or false".into() });
                }
            };
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks the limits the kernel or the mission sets.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.auth_entries < MIN_AUTH_ENTRIES {
            return Err(ConfigError::Invalid {
                var: AUTH_ENTRIES,
                value: self.auth_entries.to_string(),
                reason: format!("the auth map holds at least {MIN_AUTH_ENTRIES} pairs"),
            });
        }
        for (var, value) in [
            (ENDPOINT_ENTRIES, self.endpoint_entries),
            (POLICY_ENTRIES, self.policy_entries),
            (CONNTRACK_ENTRIES, self.conntrack_entries),
            (CT_TCP_TIMEOUT, self.conntrack_timeouts.tcp_s),
            (CT_UDP_TIMEOUT, self.conntrack_timeouts.udp_s),
            (CT_ICMP_TIMEOUT, self.conntrack_timeouts.icmp_s),
            (CT_CLOSING_TIMEOUT, self.conntrack_timeouts.closing_s),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid { var, value: value.to_string(), reason: "must be at least 1".into() });
            }
        }
        if !self.event_ring_bytes.is_power_of_two() || self.event_ring_bytes < 4096 {
            return Err(ConfigError::Invalid {
                var: "event_ring_bytes",
                value: self.event_ring_bytes.to_string(),
                reason: "a ring buffer is a power of two of at least one page".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_hold_512k_pairs() {
        let c = DatapathConfig::default();
        c.validate().unwrap();
        assert!(c.auth_entries >= 512 * 1024);
    }

    #[test]
    fn env_errors_name_the_variable_and_value() {
        let err = DatapathConfig::from_lookup(|v| (v == AUTH_ENTRIES).then(|| "1000".into())).unwrap_err();
        assert!(err.to_string().contains("MESHAUTH_BPF_AUTH_ENTRIES=\"1000\""), "{err}");
        let err = DatapathConfig::from_lookup(|v| (v == IPV6).then(|| "maybe".into())).unwrap_err();
        assert!(err.to_string().contains("MESHAUTH_BPF_IPV6"), "{err}");
        let c = DatapathConfig::from_lookup(|v| (v == IPV6).then(|| "pass".into())).unwrap();
        assert_eq!(c.ipv6, Ipv6Mode::Pass);
    }

    #[test]
    fn passes_are_sampled_only_when_asked_and_the_rate_is_checked() {
        assert_eq!(DatapathConfig::default().pass_sample_every, 0, "off by default");
        let c = DatapathConfig::from_lookup(|v| (v == PASS_SAMPLE_EVERY).then(|| "100".into())).unwrap();
        assert_eq!(c.pass_sample_every, 100);
        let err = DatapathConfig::from_lookup(|v| (v == PASS_SAMPLE_EVERY).then(|| "70000".into())).unwrap_err();
        assert!(err.to_string().contains("MESHAUTH_BPF_PASS_SAMPLE_EVERY") && err.to_string().contains("65535"), "{err}");
    }
}
