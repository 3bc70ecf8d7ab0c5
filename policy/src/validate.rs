//! Spec validation beyond what the CRD schema and CEL rules can say.
//!
//! This module is the single place the rules of a `MeshPolicy` or `MutualAuth` spec live: the
//! admission webhook denies what [`validate_mesh_policy`] and [`validate_mutual_auth`] report and
//! passes on what [`mesh_policy_warnings`] and [`mutual_auth_warnings`] report as warnings; the
//! policy model and the operator call the same functions, so no other crate keeps a copy.
//!
//! Errors are what can never be right: objects past a size limit (rules, peers, ports, the port
//! blocks they multiply into, selector requirements: the `MAX_*` constants below), malformed
//! label selectors (keys, values and operators per Kubernetes' rules), SPIFFE IDs that break the
//! SPIFFE ID specification, ports outside 1–65535, ranges that end before they start, `from`
//! entries with both selectors and an identity, and duplicate or contradictory entries and rules.
//! Warnings are legal but suspicious: selectors no pod can ever satisfy, identities no mesh
//! workload can have (other trust domains included: no peer can prove them until federation),
//! ports that another entry of the same rule already covers.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use meshauth_crds::{
    AuthenticationMode, IngressRule, MeshPolicySpec, MutualAuthSpec, PeerSelector, PortRule, Protocol, SpiffeId, TrustDomain,
};

/// The longest label name (the part after an optional prefix) and label value.
pub const MAX_LABEL_NAME_LEN: usize = 63;
/// The longest label value.
pub const MAX_LABEL_VALUE_LEN: usize = 63;
/// The longest DNS subdomain (label key prefixes, service account names).
pub const MAX_DNS_SUBDOMAIN_LEN: usize = 253;
/// The longest DNS label (namespace names).
pub const MAX_DNS_LABEL_LEN: usize = 63;
/// The lowest valid port.
pub const MIN_PORT: i32 = 1;
/// The highest valid port.
pub const MAX_PORT: i32 = 65535;

// Size limits of one MeshPolicy. Every rule, peer and port becomes policy-map entries on every
// node, so one tenant's object must not be able to fill the map (or the agent's memory) for
// everyone. The values sit far above what NetworkPolicy and Cilium users write (a handful of
// rules, peers and ports each) and the CRD's `maxItems` repeat the per-list ones.

/// Most ingress rules in one MeshPolicy.
pub const MAX_INGRESS_RULES: usize = 64;
/// Most `from` entries in one rule.
pub const MAX_PEERS_PER_RULE: usize = 64;
/// Most `ports` entries in one rule.
pub const MAX_PORTS_PER_RULE: usize = 64;
/// Most `from` entries over all rules of one MeshPolicy.
pub const MAX_PEERS_PER_POLICY: usize = 256;
/// Most `ports` entries over all rules of one MeshPolicy.
pub const MAX_PORTS_PER_POLICY: usize = 256;
/// Most port blocks one MeshPolicy can add for one (destination, source) identity pair: the sum,
/// over its rules, of the aligned power-of-two blocks its port ranges split into (how the
/// datapath's longest-prefix table stores them; a rule without ports is one block per protocol).
/// The policy map holds at most this many entries per pair from one object; how many pairs
/// there are depends on the pods its selectors match.
pub const MAX_PORT_BLOCKS_PER_POLICY: usize = 1024;
/// Most requirements (`matchLabels` entries plus `matchExpressions`) in one label selector.
pub const MAX_SELECTOR_REQUIREMENTS: usize = 64;
/// Most values in one `matchExpressions` requirement.
pub const MAX_SELECTOR_VALUES: usize = 256;

/// One problem in a spec: the field path (e.g. `spec.ingress[0].from[1].identity`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

// ---------------------------------------------------------------------------------------------
// MeshPolicy

/// Every problem of a MeshPolicy spec. No rule depends on the mesh's trust domain any more (an
/// identity of another trust domain is valid SPIFFE and only warned about); the parameter stays
/// so that the model and the webhook call both checks alike.
pub fn validate_mesh_policy(spec: &MeshPolicySpec, _trust_domain: &TrustDomain) -> Vec<FieldError> {
    let limits = mesh_policy_limits(spec);
    if !limits.is_empty() {
        // Past a limit the whole object is refused; the per-entry checks below (the duplicate
        // searches are quadratic) must not run on an object of any size a client sends.
        return limits;
    }
    let mut errors = validate_label_selector(&spec.selector, "spec.selector");
    for (ri, rule) in spec.ingress.iter().enumerate() {
        let field = format!("spec.ingress[{ri}]");
        validate_rule(rule, &field, &mut errors);
    }
    validate_rules_distinct(&spec.ingress, &mut errors);
    errors
}

/// The size limits a MeshPolicy breaks, each naming the limit and its value. Empty when the
/// object is within all of them; only then do [`validate_mesh_policy`] and
/// [`mesh_policy_warnings`] look at its entries.
pub fn mesh_policy_limits(spec: &MeshPolicySpec) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let over = |field: String, what: &str, count: usize, limit: usize, scope: &str| {
        FieldError::new(field, format!("has {count} {what}, more than the limit of {limit} {what} {scope}"))
    };
    if spec.ingress.len() > MAX_INGRESS_RULES {
        errors.push(over("spec.ingress".into(), "rules", spec.ingress.len(), MAX_INGRESS_RULES, "per MeshPolicy"));
    }
    selector_limits(&spec.selector, "spec.selector", &mut errors);
    let (mut peers, mut ports, mut blocks) = (0usize, 0usize, 0usize);
    for (ri, rule) in spec.ingress.iter().enumerate() {
        let field = format!("spec.ingress[{ri}]");
        if rule.from.len() > MAX_PEERS_PER_RULE {
            errors.push(over(format!("{field}.from"), "entries", rule.from.len(), MAX_PEERS_PER_RULE, "per rule"));
        }
        if rule.ports.len() > MAX_PORTS_PER_RULE {
            errors.push(over(format!("{field}.ports"), "entries", rule.ports.len(), MAX_PORTS_PER_RULE, "per rule"));
        }
        // Within the limits only: an oversized list gets one error, not one per entry.
        let checked_peers = if ri < MAX_INGRESS_RULES { MAX_PEERS_PER_RULE } else { 0 };
        for (fi, peer) in rule.from.iter().enumerate().take(checked_peers) {
            for (name, selector) in [("podSelector", &peer.pod_selector), ("namespaceSelector", &peer.namespace_selector)] {
                if let Some(selector) = selector {
                    selector_limits(selector, &format!("{field}.from[{fi}].{name}"), &mut errors);
                }
            }
        }
        peers += rule.from.len();
        ports += rule.ports.len();
        blocks += rule_port_blocks(rule);
    }
    if peers > MAX_PEERS_PER_POLICY {
        errors.push(over("spec.ingress".into(), "from entries", peers, MAX_PEERS_PER_POLICY, "over all rules of a MeshPolicy"));
    }
    if ports > MAX_PORTS_PER_POLICY {
        errors.push(over("spec.ingress".into(), "ports entries", ports, MAX_PORTS_PER_POLICY, "over all rules of a MeshPolicy"));
    }
    if blocks > MAX_PORT_BLOCKS_PER_POLICY {
        errors.push(FieldError::new(
            "spec.ingress",
            format!(
                "its ports split into {blocks} port blocks (aligned power-of-two ranges, as the datapath \
                 stores them; a rule without ports counts one per protocol), more than the limit of \
                 {MAX_PORT_BLOCKS_PER_POLICY} port blocks per MeshPolicy; use fewer ranges or ranges \
                 aligned to powers of two"
            ),
        ));
    }
    errors
}

/// The port blocks one rule adds per (destination, source) pair; invalid port entries (refused
/// elsewhere) count as one.
fn rule_port_blocks(rule: &IngressRule) -> usize {
    if rule.ports.is_empty() {
        return crate::tables::TableProtocol::ALL.len();
    }
    rule.ports
        .iter()
        .map(|p| {
            let end = p.end_port.unwrap_or(p.port);
            match (u16::try_from(p.port), u16::try_from(end)) {
                (Ok(start), Ok(end)) if start <= end => crate::tables::port_range_prefixes(start, end).len(),
                _ => 1,
            }
        })
        .sum()
}

fn selector_limits(selector: &LabelSelector, field: &str, errors: &mut Vec<FieldError>) {
    let labels = selector.match_labels.as_ref().map_or(0, BTreeMap::len);
    let expressions = selector.match_expressions.as_deref().unwrap_or_default();
    if labels + expressions.len() > MAX_SELECTOR_REQUIREMENTS {
        errors.push(FieldError::new(
            field,
            format!(
                "has {} requirements (matchLabels plus matchExpressions), more than the limit of \
                 {MAX_SELECTOR_REQUIREMENTS} requirements per selector",
                labels + expressions.len()
            ),
        ));
    }
    for (i, req) in expressions.iter().enumerate().take(MAX_SELECTOR_REQUIREMENTS) {
        let values = req.values.as_ref().map_or(0, Vec::len);
        if values > MAX_SELECTOR_VALUES {
            errors.push(FieldError::new(
                format!("{field}.matchExpressions[{i}].values"),
                format!("has {values} values, more than the limit of {MAX_SELECTOR_VALUES} values per requirement"),
            ));
        }
    }
}

fn validate_rule(rule: &IngressRule, field: &str, errors: &mut Vec<FieldError>) {
    let mut seen_peers: Vec<(PeerKey, usize)> = Vec::new();
    for (fi, peer) in rule.from.iter().enumerate() {
        let peer_field = format!("{field}.from[{fi}]");
        let before = errors.len();
        validate_peer(peer, &peer_field, errors);
        if errors.len() > before {
            continue;
        }
        let key = PeerKey::of(peer);
        if let Some((_, first)) = seen_peers.iter().find(|(k, _)| *k == key) {
            errors.push(FieldError::new(peer_field, format!("duplicates {field}.from[{first}]")));
        } else {
            seen_peers.push((key, fi));
        }
    }
    let mut seen_ports: Vec<(PortKey, usize)> = Vec::new();
    for (pi, port) in rule.ports.iter().enumerate() {
        let port_field = format!("{field}.ports[{pi}]");
        let before = errors.len();
        validate_port(port, &port_field, errors);
        if errors.len() > before {
            continue;
        }
        let key = PortKey::of(port);
        if let Some((_, first)) = seen_ports.iter().find(|(k, _)| *k == key) {
            errors.push(FieldError::new(port_field, format!("duplicates {field}.ports[{first}]")));
        } else {
            seen_ports.push((key, pi));
        }
    }
}

/// Problems of one `from` entry.
pub fn validate_peer(peer: &PeerSelector, field: &str, errors: &mut Vec<FieldError>) {
    let has_selector = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
    match (&peer.identity, has_selector) {
        (Some(_), true) => errors.push(FieldError::new(
            field,
            "has both an identity and a podSelector/namespaceSelector; a from entry names either \
             pods by labels or one SPIFFE ID, so put them in separate from entries",
        )),
        (None, false) => errors.push(FieldError::new(
            field,
            "names no podSelector, namespaceSelector or identity; omit the whole from list to \
             admit any source",
        )),
        _ => {}
    }
    if let Some(selector) = &peer.pod_selector {
        errors.extend(validate_label_selector(selector, &format!("{field}.podSelector")));
    }
    if let Some(selector) = &peer.namespace_selector {
        errors.extend(validate_label_selector(selector, &format!("{field}.namespaceSelector")));
    }
    if let Some(identity) = &peer.identity
        && let Err(reason) = validate_identity(identity)
    {
        errors.push(FieldError::new(format!("{field}.identity"), reason));
    }
}

/// Checks a source identity: a valid SPIFFE ID. One of another trust domain is valid (a
/// federated peer may hold it one day); [`mesh_policy_warnings`] says that nobody can prove it yet.
pub fn validate_identity(identity: &str) -> Result<SpiffeId, String> {
    SpiffeId::parse(identity).map_err(|e| format!("{:?} is not a valid SPIFFE ID: {e}", truncate(identity, 80)))
}

/// Problems of one port entry.
pub fn validate_port(port: &PortRule, field: &str, errors: &mut Vec<FieldError>) {
    if !(MIN_PORT..=MAX_PORT).contains(&port.port) {
        errors.push(FieldError::new(format!("{field}.port"), format!("must be between {MIN_PORT} and {MAX_PORT}, not {}", port.port)));
    }
    if let Some(end) = port.end_port {
        if !(MIN_PORT..=MAX_PORT).contains(&end) {
            errors.push(FieldError::new(format!("{field}.endPort"), format!("must be between {MIN_PORT} and {MAX_PORT}, not {end}")));
        } else if end < port.port {
            errors.push(FieldError::new(
                format!("{field}.endPort"),
                format!("must be greater than or equal to port ({}), not {end}", port.port),
            ));
        }
    }
}

/// Two rules with the same sources and ports are duplicates (same authentication) or
/// contradict each other (different authentication).
fn validate_rules_distinct(rules: &[IngressRule], errors: &mut Vec<FieldError>) {
    let mut seen: Vec<(RuleKey, AuthenticationMode, usize)> = Vec::new();
    for (ri, rule) in rules.iter().enumerate() {
        let key = RuleKey::of(rule);
        let mode = rule_mode(rule);
        match seen.iter().find(|(k, _, _)| *k == key) {
            Some((_, first_mode, first)) if *first_mode == mode => errors
                .push(FieldError::new(format!("spec.ingress[{ri}]"), format!("duplicates spec.ingress[{first}]: same sources and ports"))),
            Some((_, first_mode, first)) => errors.push(FieldError::new(
                format!("spec.ingress[{ri}]"),
                format!(
                    "contradicts spec.ingress[{first}]: same sources and ports, but authentication \
                     {} here and {} there; keep one rule",
                    mode.as_str(),
                    first_mode.as_str()
                ),
            )),
            None => seen.push((key, mode, ri)),
        }
    }
}

/// Legal but suspicious parts of a MeshPolicy spec: selectors no pod can satisfy, identities no
/// mesh workload can have, ports another entry of the same rule already covers. Only parts that
/// [`validate_mesh_policy`] finds valid are looked at.
pub fn mesh_policy_warnings(spec: &MeshPolicySpec, trust_domain: &TrustDomain) -> Vec<FieldError> {
    let mut warnings = Vec::new();
    if spec.enforcement == meshauth_crds::Enforcement::Audit {
        warnings.push(FieldError::new(
            "spec.enforcement",
            "Audit: the selected pods drop nothing for this policy; what it would deny passes, is counted (meshauth_agent_audit_would_deny_total) and shown as AUDIT by meshauthctl observe. Pods an enforced MeshPolicy selects too are isolated by that one alone",
        ));
    }
    if !mesh_policy_limits(spec).is_empty() {
        return warnings;
    }
    if validate_label_selector(&spec.selector, "spec.selector").is_empty()
        && let Some(why) = selector_contradiction(&spec.selector)
    {
        warnings.push(FieldError::new("spec.selector", format!("can never select a pod: {why}")));
    }
    for (ri, rule) in spec.ingress.iter().enumerate() {
        for (fi, peer) in rule.from.iter().enumerate() {
            let field = format!("spec.ingress[{ri}].from[{fi}]");
            let mut errors = Vec::new();
            validate_peer(peer, &field, &mut errors);
            if !errors.is_empty() {
                continue;
            }
            for (name, selector) in [("podSelector", &peer.pod_selector), ("namespaceSelector", &peer.namespace_selector)] {
                if let Some(why) = selector.as_ref().and_then(selector_contradiction) {
                    warnings.push(FieldError::new(format!("{field}.{name}"), format!("can never match: {why}")));
                }
            }
            if let Some(identity) = &peer.identity
                && let Some(why) = identity_never_matches(identity, trust_domain)
            {
                warnings.push(FieldError::new(format!("{field}.identity"), format!("can never match: {why}")));
            }
        }
        let valid: Vec<(usize, &PortRule)> = rule
            .ports
            .iter()
            .enumerate()
            .filter(|(pi, p)| {
                let mut errors = Vec::new();
                validate_port(p, &format!("spec.ingress[{ri}].ports[{pi}]"), &mut errors);
                errors.is_empty()
            })
            .collect();
        for &(pi, port) in &valid {
            let (start, end) = (port.port, port.end_port.unwrap_or(port.port));
            let covering = valid.iter().find(|&&(other, p)| {
                let (s, e) = (p.port, p.end_port.unwrap_or(p.port));
                let same = PortKey::of(p) == PortKey::of(port);
                other != pi && p.protocol == port.protocol && s <= start && end <= e && !same
            });
            if let Some((other, _)) = covering {
                warnings.push(FieldError::new(
                    format!("spec.ingress[{ri}].ports[{pi}]"),
                    format!("is already covered by spec.ingress[{ri}].ports[{other}]"),
                ));
            }
        }
    }
    warnings
}

/// Why a valid identity can never be a mesh workload's, if so.
fn identity_never_matches(identity: &str, trust_domain: &TrustDomain) -> Option<String> {
    let id = SpiffeId::parse(identity).ok()?;
    if id.trust_domain() != trust_domain.as_str() {
        // The agents hold no bundle for it, and the compiled tables give only pods of the mesh
        // a SPIFFE number: such an entry admits nobody, with or without authentication.
        return Some(format!(
            "{:?} is in trust domain {:?}, not in the mesh's trust domain {:?}: no peer can prove it \
             until that trust domain is federated",
            truncate(identity, 80),
            id.trust_domain(),
            trust_domain.as_str()
        ));
    }
    let shape = format!("mesh workloads have identities spiffe://{trust_domain}/ns/<namespace>/sa/<service account>");
    let Some((namespace, service_account)) = id.service_account() else {
        return Some(shape);
    };
    if let Err(why) = check_dns_label(namespace) {
        return Some(format!("{namespace:?} is not a valid namespace name: it {why}"));
    }
    if let Err(why) = check_dns_subdomain(service_account) {
        return Some(format!("{service_account:?} is not a valid service account name: it {why}"));
    }
    None
}

// ---------------------------------------------------------------------------------------------
// MutualAuth

/// Every problem of a MutualAuth spec.
pub fn validate_mutual_auth(spec: &MutualAuthSpec) -> Vec<FieldError> {
    spec.selector.as_ref().map(|s| validate_label_selector(s, "spec.selector")).unwrap_or_default()
}

/// Legal but suspicious parts of a MutualAuth spec: an empty selector (it makes the MutualAuth
/// namespace-wide, like an omitted one) and a selector no pod can satisfy.
pub fn mutual_auth_warnings(spec: &MutualAuthSpec) -> Vec<FieldError> {
    let Some(selector) = &spec.selector else {
        return Vec::new();
    };
    if !validate_label_selector(selector, "spec.selector").is_empty() {
        return Vec::new();
    }
    if SelectorKey::of(selector).is_empty() {
        return vec![FieldError::new(
            "spec.selector",
            "is empty, which selects every pod of the namespace: this MutualAuth is namespace-wide, \
             as if the selector were omitted",
        )];
    }
    selector_contradiction(selector)
        .map(|why| FieldError::new("spec.selector", format!("can never select a pod: {why}")))
        .into_iter()
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Label selectors

/// Every problem of a label selector per Kubernetes' rules: keys are qualified names (an optional
/// DNS-subdomain prefix and `/`, then a name of at most 63 characters), values are at most 63
/// characters, `In`/`NotIn` need values, `Exists`/`DoesNotExist` take none, no other operator.
/// `field` is the selector's path, e.g. `spec.selector`.
pub fn validate_label_selector(selector: &LabelSelector, field: &str) -> Vec<FieldError> {
    let mut errors = Vec::new();
    for (key, value) in selector.match_labels.iter().flatten() {
        if let Err(why) = check_label_key(key) {
            errors.push(FieldError::new(
                format!("{field}.matchLabels"),
                format!("key {:?} is not a valid label key: it {why}", truncate(key, 80)),
            ));
        }
        if let Err(why) = check_label_value(value) {
            errors.push(FieldError::new(
                format!("{field}.matchLabels[{:?}]", truncate(key, 80)),
                format!("{:?} is not a valid label value: it {why}", truncate(value, 80)),
            ));
        }
    }
    for (i, req) in selector.match_expressions.iter().flatten().enumerate() {
        let req_field = format!("{field}.matchExpressions[{i}]");
        if let Err(why) = check_label_key(&req.key) {
            errors.push(FieldError::new(
                format!("{req_field}.key"),
                format!("{:?} is not a valid label key: it {why}", truncate(&req.key, 80)),
            ));
        }
        let values = req.values.as_deref().unwrap_or_default();
        match req.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                errors.push(FieldError::new(format!("{req_field}.values"), format!("must not be empty when operator is {}", req.operator)))
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                errors.push(FieldError::new(format!("{req_field}.values"), format!("must be empty when operator is {}", req.operator)))
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => errors.push(FieldError::new(
                format!("{req_field}.operator"),
                format!("{:?} is not a label selector operator; use In, NotIn, Exists or DoesNotExist", truncate(other, 40)),
            )),
        }
        for (j, value) in values.iter().enumerate() {
            if let Err(why) = check_label_value(value) {
                errors.push(FieldError::new(
                    format!("{req_field}.values[{j}]"),
                    format!("{:?} is not a valid label value: it {why}", truncate(value, 80)),
                ));
            }
        }
    }
    errors
}

/// Why no set of labels can satisfy a (valid) selector, if none can: a key that must both exist
/// and not exist, or whose allowed values the other requirements exclude.
pub fn selector_contradiction(selector: &LabelSelector) -> Option<String> {
    #[derive(Default)]
    struct KeyRequirements<'a> {
        exists: bool,
        absent: bool,
        allowed: Option<BTreeSet<&'a str>>,
        excluded: BTreeSet<&'a str>,
    }
    let mut keys: BTreeMap<&str, KeyRequirements<'_>> = BTreeMap::new();
    fn allow<'a>(r: &mut KeyRequirements<'a>, values: BTreeSet<&'a str>) {
        r.exists = true;
        r.allowed = Some(match r.allowed.take() {
            Some(current) => current.intersection(&values).copied().collect(),
            None => values,
        });
    }
    for (key, value) in selector.match_labels.iter().flatten() {
        let r = keys.entry(key.as_str()).or_default();
        allow(r, BTreeSet::from([value.as_str()]));
    }
    for req in selector.match_expressions.iter().flatten() {
        let values: BTreeSet<&str> = req.values.iter().flatten().map(String::as_str).collect();
        let r = keys.entry(req.key.as_str()).or_default();
        match req.operator.as_str() {
            "In" => allow(r, values),
            "NotIn" => r.excluded.extend(values),
            "Exists" => r.exists = true,
            "DoesNotExist" => r.absent = true,
            _ => {}
        }
    }
    for (key, r) in keys {
        if r.exists && r.absent {
            return Some(format!("label {key:?} must both exist and not exist"));
        }
        if let Some(allowed) = &r.allowed
            && allowed.iter().all(|v| r.excluded.contains(v))
        {
            return Some(format!("no value of label {key:?} satisfies all of its requirements"));
        }
    }
    None
}

/// Whether two selectors select the same pods, whatever the order or form (`matchLabels` or
/// `In` with one value) their requirements are written in.
pub fn same_selector(a: &LabelSelector, b: &LabelSelector) -> bool {
    SelectorKey::of(a) == SelectorKey::of(b)
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain, the name a label name.
pub fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            return Err("has an empty prefix before '/'".into());
        }
        check_dns_subdomain(prefix).map_err(|why| format!("has a prefix that {why}"))?;
        if name.contains('/') {
            return Err("has more than one '/'".into());
        }
    }
    check_label_name(name).map_err(|why| match prefix {
        Some(_) => format!("has a name part that {why}"),
        None => why,
    })
}

/// A label name (a key without prefix): 1–63 characters, alphanumerics, `-`, `_` and `.`,
/// beginning and ending with an alphanumeric.
pub fn check_label_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    check_label_chars(name, MAX_LABEL_NAME_LEN)
}

/// A label value: empty, or up to 63 characters like a label name.
pub fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    check_label_chars(value, MAX_LABEL_VALUE_LEN)
}

fn check_label_chars(s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!("is {} characters long, more than {max}", s.len()));
    }
    if let Some(c) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(format!("has character {c:?}; only letters, digits, '-', '_' and '.' are allowed"));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !alnum(s.chars().next()) || !alnum(s.chars().last()) {
        return Err("must begin and end with a letter or digit".into());
    }
    Ok(())
}

/// A lower-case RFC 1123 subdomain: dot-separated DNS labels, at most 253 characters.
pub fn check_dns_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("is empty".into());
    }
    if s.len() > MAX_DNS_SUBDOMAIN_LEN {
        return Err(format!("is {} characters long, more than {MAX_DNS_SUBDOMAIN_LEN}", s.len()));
    }
    for part in s.split('.') {
        check_dns_label_chars(part).map_err(|why| format!("is not a lower-case RFC 1123 subdomain: {why}"))?;
    }
    Ok(())
}

/// A lower-case RFC 1123 label (a namespace name): at most 63 characters.
pub fn check_dns_label(s: &str) -> Result<(), String> {
    if s.len() > MAX_DNS_LABEL_LEN {
        return Err(format!("is {} characters long, more than {MAX_DNS_LABEL_LEN}", s.len()));
    }
    check_dns_label_chars(s).map_err(|why| format!("is not a lower-case RFC 1123 label: {why}"))
}

fn check_dns_label_chars(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("a part is empty".into());
    }
    if let Some(c) = s.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')) {
        return Err(format!("character {c:?} is not a lower-case letter, digit or '-'"));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("a part begins or ends with '-'".into());
    }
    Ok(())
}

/// Cuts `s` to at most `max` bytes (on a character boundary), marking the cut: user input
/// quoted in a message stays bounded.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

// ---------------------------------------------------------------------------------------------
// Canonical forms, for duplicate detection

/// A selector's requirements as a set: `matchLabels` entries become `In` with one value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SelectorKey(BTreeSet<(String, String, BTreeSet<String>)>);

impl SelectorKey {
    fn of(selector: &LabelSelector) -> Self {
        let labels = selector.match_labels.iter().flatten().map(|(k, v)| (k.clone(), "In".to_owned(), BTreeSet::from([v.clone()])));
        let expressions = selector
            .match_expressions
            .iter()
            .flatten()
            .map(|r| (r.key.clone(), r.operator.clone(), r.values.iter().flatten().cloned().collect()));
        Self(labels.chain(expressions).collect())
    }

    fn empty() -> Self {
        Self(BTreeSet::new())
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum PeerKey {
    Identity(String),
    /// Pods by labels; `namespaces` `None` means the policy's own namespace.
    Pods {
        pods: SelectorKey,
        namespaces: Option<SelectorKey>,
    },
}

impl PeerKey {
    fn of(peer: &PeerSelector) -> Self {
        match &peer.identity {
            Some(id) => Self::Identity(id.clone()),
            None => Self::Pods {
                pods: peer.pod_selector.as_ref().map(SelectorKey::of).unwrap_or_else(SelectorKey::empty),
                namespaces: peer.namespace_selector.as_ref().map(SelectorKey::of),
            },
        }
    }
}

/// A port entry as `(protocol, first, last)`: `port: 80` and `port: 80, endPort: 80` are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct PortKey(Protocol, i32, i32);

impl PortKey {
    fn of(port: &PortRule) -> Self {
        Self(port.protocol, port.port, port.end_port.unwrap_or(port.port))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RuleKey {
    from: BTreeSet<PeerKey>,
    ports: BTreeSet<PortKey>,
}

impl RuleKey {
    fn of(rule: &IngressRule) -> Self {
        Self { from: rule.from.iter().map(PeerKey::of).collect(), ports: rule.ports.iter().map(PortKey::of).collect() }
    }
}

fn rule_mode(rule: &IngressRule) -> AuthenticationMode {
    rule.authentication.as_ref().map(|a| a.mode).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::type_complexity)] // the case tables
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
    use meshauth_crds::{Authentication, MutualAuthMode};

    fn td() -> TrustDomain {
        TrustDomain::default()
    }

    fn labels(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector { match_labels: Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()), match_expressions: None }
    }

    fn expr(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    fn exprs(reqs: Vec<LabelSelectorRequirement>) -> LabelSelector {
        LabelSelector { match_labels: None, match_expressions: Some(reqs) }
    }

    fn pods(pairs: &[(&str, &str)]) -> PeerSelector {
        PeerSelector { pod_selector: Some(labels(pairs)), ..Default::default() }
    }

    fn identity(id: &str) -> PeerSelector {
        PeerSelector { identity: Some(id.into()), ..Default::default() }
    }

    fn port(p: i32) -> PortRule {
        PortRule { port: p, end_port: None, protocol: Protocol::Tcp }
    }

    fn range(p: i32, end: i32) -> PortRule {
        PortRule { port: p, end_port: Some(end), protocol: Protocol::Tcp }
    }

    fn rule(from: Vec<PeerSelector>, ports: Vec<PortRule>) -> IngressRule {
        IngressRule { from, ports, authentication: None }
    }

    fn required(mut r: IngressRule) -> IngressRule {
        r.authentication = Some(Authentication { mode: AuthenticationMode::Required });
        r
    }

    fn policy(ingress: Vec<IngressRule>) -> MeshPolicySpec {
        MeshPolicySpec { selector: labels(&[("app", "payment")]), ingress, ..Default::default() }
    }

    fn fields(errors: &[FieldError]) -> Vec<&str> {
        errors.iter().map(|e| e.field.as_str()).collect()
    }

    /// Runs `validate_mesh_policy` and checks the errors' fields and that each reason contains
    /// the expected text.
    fn assert_errors(name: &str, spec: &MeshPolicySpec, want: &[(&str, &str)]) {
        let errors = validate_mesh_policy(spec, &td());
        assert_eq!(fields(&errors), want.iter().map(|(f, _)| *f).collect::<Vec<_>>(), "{name}: {errors:#?}");
        for (e, (_, reason)) in errors.iter().zip(want) {
            assert!(e.reason.contains(reason), "{name}: {:?} lacks {reason:?}", e.reason);
        }
    }

    #[test]
    fn label_keys() {
        let cases: &[(&str, Option<&str>)] = &[
            ("app", None),
            ("app.kubernetes.io/name", None),
            ("example.com/a_b-c.d", None),
            ("A1", None),
            (&"k".repeat(63), None),
            ("", Some("is empty")),
            (&"k".repeat(64), Some("64 characters long, more than 63")),
            ("-app", Some("must begin and end")),
            ("app_", Some("must begin and end")),
            ("app name", Some("character ' '")),
            ("/app", Some("empty prefix")),
            ("example.com/", Some("name part that is empty")),
            ("Example.com/app", Some("prefix that is not a lower-case RFC 1123 subdomain")),
            ("ex..com/app", Some("prefix that")),
            ("a/b/c", Some("more than one '/'")),
            (&format!("{}/app", "a".repeat(254)), Some("prefix that is 254 characters long")),
        ];
        for (key, want) in cases {
            match (check_label_key(key), want) {
                (Ok(()), None) => {}
                (Err(why), Some(want)) => assert!(why.contains(want), "{key:?}: {why:?} lacks {want:?}"),
                (got, want) => panic!("{key:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn label_values() {
        let cases: &[(&str, Option<&str>)] = &[
            ("", None),
            ("v1", None),
            ("a.b_c-d", None),
            (&"v".repeat(63), None),
            (&"v".repeat(64), Some("more than 63")),
            ("-v", Some("must begin and end")),
            ("v/1", Some("character '/'")),
            ("ünïcode", Some("character 'ü'")),
        ];
        for (value, want) in cases {
            match (check_label_value(value), want) {
                (Ok(()), None) => {}
                (Err(why), Some(want)) => assert!(why.contains(want), "{value:?}: {why:?} lacks {want:?}"),
                (got, want) => panic!("{value:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn label_selectors() {
        let cases: Vec<(&str, LabelSelector, Vec<(&str, &str)>)> = vec![
            ("empty selects all", LabelSelector::default(), vec![]),
            ("match labels", labels(&[("app", "a"), ("tier", "")]), vec![]),
            (
                "every operator",
                exprs(vec![
                    expr("a", "In", &["x"]),
                    expr("b", "NotIn", &["y", "z"]),
                    expr("c", "Exists", &[]),
                    expr("d", "DoesNotExist", &[]),
                ]),
                vec![],
            ),
            ("bad key", labels(&[("bad key", "a")]), vec![("s.matchLabels", "key \"bad key\" is not a valid label key")]),
            ("bad value", labels(&[("app", "a b")]), vec![("s.matchLabels[\"app\"]", "\"a b\" is not a valid label value")]),
            ("bad expression key", exprs(vec![expr("-a", "Exists", &[])]), vec![("s.matchExpressions[0].key", "not a valid label key")]),
            (
                "unknown operator",
                exprs(vec![expr("a", "Equals", &["x"])]),
                vec![("s.matchExpressions[0].operator", "\"Equals\" is not a label selector operator")],
            ),
            ("lower-case operator", exprs(vec![expr("a", "in", &["x"])]), vec![("s.matchExpressions[0].operator", "use In, NotIn")]),
            (
                "In without values",
                exprs(vec![expr("a", "In", &[])]),
                vec![("s.matchExpressions[0].values", "must not be empty when operator is In")],
            ),
            (
                "NotIn without values",
                exprs(vec![expr("a", "NotIn", &[])]),
                vec![("s.matchExpressions[0].values", "must not be empty when operator is NotIn")],
            ),
            (
                "Exists with values",
                exprs(vec![expr("a", "Exists", &["x"])]),
                vec![("s.matchExpressions[0].values", "must be empty when operator is Exists")],
            ),
            (
                "DoesNotExist with values",
                exprs(vec![expr("a", "DoesNotExist", &["x"])]),
                vec![("s.matchExpressions[0].values", "must be empty when operator is DoesNotExist")],
            ),
            (
                "bad expression value",
                exprs(vec![expr("a", "In", &["ok", "not ok"])]),
                vec![("s.matchExpressions[0].values[1]", "not a valid label value")],
            ),
        ];
        for (name, selector, want) in cases {
            let errors = validate_label_selector(&selector, "s");
            assert_eq!(fields(&errors), want.iter().map(|(f, _)| *f).collect::<Vec<_>>(), "{name}: {errors:#?}");
            for (e, (_, reason)) in errors.iter().zip(&want) {
                assert!(e.reason.contains(reason), "{name}: {:?} lacks {reason:?}", e.reason);
            }
        }
    }

    #[test]
    fn selector_contradictions() {
        let cases: Vec<(&str, LabelSelector, Option<&str>)> = vec![
            ("empty", LabelSelector::default(), None),
            ("labels", labels(&[("app", "a")]), None),
            ("In and NotIn overlap", exprs(vec![expr("a", "In", &["x", "y"]), expr("a", "NotIn", &["x"])]), None),
            ("NotIn and DoesNotExist", exprs(vec![expr("a", "NotIn", &["x"]), expr("a", "DoesNotExist", &[])]), None),
            (
                "Exists and DoesNotExist",
                exprs(vec![expr("a", "Exists", &[]), expr("a", "DoesNotExist", &[])]),
                Some("must both exist and not exist"),
            ),
            (
                "In and DoesNotExist",
                exprs(vec![expr("a", "In", &["x"]), expr("a", "DoesNotExist", &[])]),
                Some("must both exist and not exist"),
            ),
            ("In and NotIn the same", exprs(vec![expr("a", "In", &["x"]), expr("a", "NotIn", &["x"])]), Some("no value of label \"a\"")),
            ("disjoint In", exprs(vec![expr("a", "In", &["x"]), expr("a", "In", &["y"])]), Some("no value of label \"a\"")),
            (
                "matchLabels against NotIn",
                LabelSelector {
                    match_labels: labels(&[("a", "x")]).match_labels,
                    match_expressions: Some(vec![expr("a", "NotIn", &["x"])]),
                },
                Some("no value of label \"a\""),
            ),
        ];
        for (name, selector, want) in cases {
            match (selector_contradiction(&selector), want) {
                (None, None) => {}
                (Some(why), Some(want)) => assert!(why.contains(want), "{name}: {why:?} lacks {want:?}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn same_selector_ignores_form_and_order() {
        let a = LabelSelector {
            match_labels: labels(&[("app", "a")]).match_labels,
            match_expressions: Some(vec![expr("tier", "Exists", &[]), expr("env", "In", &["b", "a"])]),
        };
        let b = exprs(vec![expr("env", "In", &["a", "b"]), expr("app", "In", &["a"]), expr("tier", "Exists", &[])]);
        assert!(same_selector(&a, &b));
        assert!(!same_selector(&a, &labels(&[("app", "a")])));
    }

    #[test]
    fn mesh_policy_rules() {
        let id = "spiffe://cluster.local/ns/shop/sa/order";
        let both = PeerSelector { pod_selector: Some(labels(&[("app", "a")])), identity: Some(id.into()), ..Default::default() };
        let ns_and_id =
            PeerSelector { namespace_selector: Some(labels(&[("team", "a")])), identity: Some(id.into()), ..Default::default() };
        let ns_only = PeerSelector { namespace_selector: Some(labels(&[("team", "shop")])), ..Default::default() };
        let ns_with_empty_pods = PeerSelector {
            namespace_selector: Some(labels(&[("team", "shop")])),
            pod_selector: Some(LabelSelector::default()),
            ..Default::default()
        };
        let udp = PortRule { port: 53, end_port: None, protocol: Protocol::Udp };
        let cases: Vec<(&str, MeshPolicySpec, Vec<(&str, &str)>)> = vec![
            ("no rules (deny all)", policy(vec![]), vec![]),
            ("any source any port", policy(vec![rule(vec![], vec![])]), vec![]),
            (
                "the mission's example",
                policy(vec![required(rule(vec![pods(&[("app", "order")]), ns_only.clone(), identity(id)], vec![port(8080), udp.clone()]))]),
                vec![],
            ),
            (
                "bad policy selector",
                MeshPolicySpec { selector: labels(&[("app", "-x")]), ingress: vec![], ..Default::default() },
                vec![("spec.selector.matchLabels[\"app\"]", "not a valid label value")],
            ),
            (
                "bad pod selector",
                policy(vec![rule(vec![pods(&[("a b", "x")])], vec![])]),
                vec![("spec.ingress[0].from[0].podSelector.matchLabels", "not a valid label key")],
            ),
            (
                "bad namespace selector",
                policy(vec![rule(
                    vec![PeerSelector { namespace_selector: Some(exprs(vec![expr("team", "Has", &[])])), ..Default::default() }],
                    vec![],
                )]),
                vec![("spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].operator", "not a label selector operator")],
            ),
            (
                "selector and identity",
                policy(vec![rule(vec![both], vec![])]),
                vec![("spec.ingress[0].from[0]", "has both an identity and a podSelector/namespaceSelector")],
            ),
            ("namespace selector and identity", policy(vec![rule(vec![ns_and_id], vec![])]), vec![("spec.ingress[0].from[0]", "has both")]),
            (
                "empty from entry",
                policy(vec![rule(vec![PeerSelector::default()], vec![])]),
                vec![("spec.ingress[0].from[0]", "names no podSelector, namespaceSelector or identity")],
            ),
            (
                "identity wrong scheme",
                policy(vec![rule(vec![identity("https://cluster.local/ns/a/sa/b")], vec![])]),
                vec![("spec.ingress[0].from[0].identity", "is not a valid SPIFFE ID: must start with the scheme")],
            ),
            (
                "identity upper-case trust domain",
                policy(vec![rule(vec![identity("spiffe://Cluster.local/ns/a/sa/b")], vec![])]),
                vec![("spec.ingress[0].from[0].identity", "trust domain has character 'C'")],
            ),
            (
                "identity with port",
                policy(vec![rule(vec![identity("spiffe://cluster.local:443/ns/a")], vec![])]),
                vec![("spec.ingress[0].from[0].identity", "character ':'")],
            ),
            (
                "identity with user info",
                policy(vec![rule(vec![identity("spiffe://u@cluster.local/ns/a")], vec![])]),
                vec![("spec.ingress[0].from[0].identity", "character '@'")],
            ),
            (
                "identity empty segment",
                policy(vec![rule(vec![identity("spiffe://cluster.local/ns//sa/b")], vec![])]),
                vec![("spec.ingress[0].from[0].identity", "empty segment")],
            ),
            (
                "identity dot segment",
                policy(vec![rule(vec![identity("spiffe://cluster.local/ns/../sa/b")], vec![])]),
                vec![("spec.ingress[0].from[0].identity", "\".\" or \"..\" segment")],
            ),
            (
                "identity trailing slash",
                policy(vec![rule(vec![identity("spiffe://cluster.local/ns/a/sa/b/")], vec![])]),
                vec![("spec.ingress[0].from[0].identity", "ends with a slash")],
            ),
            (
                "identity query",
                policy(vec![rule(vec![identity("spiffe://cluster.local/ns/a/sa/b?x=1")], vec![])]),
                vec![("spec.ingress[0].from[0].identity", "character '?'")],
            ),
            (
                "identity fragment",
                policy(vec![rule(vec![identity("spiffe://cluster.local/ns/a/sa/b#f")], vec![])]),
                vec![("spec.ingress[0].from[0].identity", "character '#'")],
            ),
            (
                "identity percent-encoded",
                policy(vec![rule(vec![identity("spiffe://cluster.local/ns/a%2Fb")], vec![])]),
                vec![("spec.ingress[0].from[0].identity", "character '%'")],
            ),
            ("identity empty", policy(vec![rule(vec![identity("")], vec![])]), vec![("spec.ingress[0].from[0].identity", "is empty")]),
            (
                "identity too long",
                policy(vec![rule(vec![identity(&format!("spiffe://cluster.local/{}", "a".repeat(2048)))], vec![])]),
                vec![("spec.ingress[0].from[0].identity", "more than the 2048")],
            ),
            (
                "identity other trust domain is valid SPIFFE",
                policy(vec![rule(vec![identity("spiffe://example.org/ns/a/sa/b")], vec![])]),
                vec![],
            ),
            (
                "port zero",
                policy(vec![rule(vec![], vec![port(0)])]),
                vec![("spec.ingress[0].ports[0].port", "must be between 1 and 65535, not 0")],
            ),
            ("port too high", policy(vec![rule(vec![], vec![port(65536)])]), vec![("spec.ingress[0].ports[0].port", "not 65536")]),
            ("port negative", policy(vec![rule(vec![], vec![port(-1)])]), vec![("spec.ingress[0].ports[0].port", "not -1")]),
            ("port bounds", policy(vec![rule(vec![], vec![port(1), port(65535), range(1, 65535)])]), vec![]),
            (
                "endPort too high",
                policy(vec![rule(vec![], vec![range(80, 70000)])]),
                vec![("spec.ingress[0].ports[0].endPort", "not 70000")],
            ),
            (
                "endPort before port",
                policy(vec![rule(vec![], vec![range(8080, 80)])]),
                vec![("spec.ingress[0].ports[0].endPort", "greater than or equal to port (8080), not 80")],
            ),
            ("endPort equal to port", policy(vec![rule(vec![], vec![range(80, 80)])]), vec![]),
            (
                "duplicate peer",
                policy(vec![rule(vec![pods(&[("app", "a")]), identity(id), pods(&[("app", "a")])], vec![])]),
                vec![("spec.ingress[0].from[2]", "duplicates spec.ingress[0].from[0]")],
            ),
            (
                "duplicate identity",
                policy(vec![rule(vec![identity(id), identity(id)], vec![])]),
                vec![("spec.ingress[0].from[1]", "duplicates spec.ingress[0].from[0]")],
            ),
            (
                "duplicate peer, other form",
                policy(vec![rule(vec![ns_only.clone(), ns_with_empty_pods], vec![])]),
                vec![("spec.ingress[0].from[1]", "duplicates spec.ingress[0].from[0]")],
            ),
            (
                "same labels, other namespaces",
                policy(vec![rule(
                    vec![
                        pods(&[("app", "a")]),
                        PeerSelector { namespace_selector: Some(LabelSelector::default()), ..pods(&[("app", "a")]) },
                    ],
                    vec![],
                )]),
                vec![],
            ),
            (
                "duplicate port",
                policy(vec![rule(vec![], vec![port(80), port(443), port(80)])]),
                vec![("spec.ingress[0].ports[2]", "duplicates spec.ingress[0].ports[0]")],
            ),
            (
                "duplicate port, range form",
                policy(vec![rule(vec![], vec![port(80), range(80, 80)])]),
                vec![("spec.ingress[0].ports[1]", "duplicates spec.ingress[0].ports[0]")],
            ),
            (
                "same port, other protocol",
                policy(vec![rule(vec![], vec![port(53), PortRule { protocol: Protocol::Udp, ..port(53) }])]),
                vec![],
            ),
            (
                "duplicate rule",
                policy(vec![rule(vec![pods(&[("app", "a")])], vec![port(80)]), rule(vec![pods(&[("app", "a")])], vec![port(80)])]),
                vec![("spec.ingress[1]", "duplicates spec.ingress[0]: same sources and ports")],
            ),
            (
                "duplicate rule, any source",
                policy(vec![rule(vec![], vec![]), rule(vec![], vec![])]),
                vec![("spec.ingress[1]", "duplicates spec.ingress[0]")],
            ),
            (
                "duplicate rule, other order",
                policy(vec![
                    rule(vec![pods(&[("app", "a")]), identity(id)], vec![port(80), port(81)]),
                    rule(vec![identity(id), pods(&[("app", "a")])], vec![port(81), port(80)]),
                ]),
                vec![("spec.ingress[1]", "duplicates spec.ingress[0]")],
            ),
            (
                "contradictory rules",
                policy(vec![
                    rule(vec![pods(&[("app", "a")])], vec![port(80)]),
                    required(rule(vec![pods(&[("app", "a")])], vec![port(80)])),
                ]),
                vec![(
                    "spec.ingress[1]",
                    "contradicts spec.ingress[0]: same sources and ports, but authentication Required here and Disabled there",
                )],
            ),
            (
                "distinct rules",
                policy(vec![
                    rule(vec![pods(&[("app", "a")])], vec![port(80)]),
                    required(rule(vec![pods(&[("app", "a")])], vec![port(81)])),
                ]),
                vec![],
            ),
            (
                "several errors at once",
                policy(vec![rule(vec![identity("spiffe://example.org/x/"), PeerSelector::default()], vec![port(0), range(10, 5)])]),
                vec![
                    ("spec.ingress[0].from[0].identity", "ends with a slash"),
                    ("spec.ingress[0].from[1]", "names no"),
                    ("spec.ingress[0].ports[0].port", "not 0"),
                    ("spec.ingress[0].ports[1].endPort", "not 5"),
                ],
            ),
        ];
        for (name, spec, want) in cases {
            assert_errors(name, &spec, &want);
        }
    }

    #[test]
    fn an_identity_of_another_trust_domain_is_admitted_with_a_warning_that_nobody_can_prove_it() {
        let spec = policy(vec![required(rule(vec![identity("spiffe://example.org/ns/a/sa/b")], vec![port(80)]))]);
        let example = TrustDomain::new("example.org").expect("valid");
        for mesh in [&example, &td()] {
            assert_eq!(validate_mesh_policy(&spec, mesh), vec![], "valid SPIFFE in mesh {mesh}");
        }
        assert_eq!(mesh_policy_warnings(&spec, &example), vec![], "the mesh's own trust domain");
        let warnings = mesh_policy_warnings(&spec, &td());
        assert_eq!(fields(&warnings), ["spec.ingress[0].from[0].identity"]);
        assert!(
            warnings[0].reason.contains("in trust domain \"example.org\", not in the mesh's trust domain \"cluster.local\": no peer can prove it until that trust domain is federated"),
            "{}",
            warnings[0].reason
        );
        // Malformed IDs stay errors, whatever their trust domain.
        let bad = policy(vec![rule(vec![identity("spiffe://example.org/ns//sa/b")], vec![])]);
        assert_eq!(fields(&validate_mesh_policy(&bad, &td())), ["spec.ingress[0].from[0].identity"]);
    }

    fn any_namespace() -> PeerSelector {
        PeerSelector { namespace_selector: Some(LabelSelector::default()), ..Default::default() }
    }

    /// The attack of a tenant who wants to fill the policy map: every namespace as source, and
    /// so many rules, peers or ports that the entries they multiply into outgrow the map.
    #[test]
    fn oversized_policies_are_refused_naming_the_limit() {
        let ports = |n: i32| (0..n).map(|i| port(1000 + i)).collect::<Vec<_>>();
        let peers = |n: usize| (0..n).map(|i| pods(&[("app", &format!("a{i}"))])).collect::<Vec<_>>();
        // Odd ranges split into many blocks: 1..=65534 is 30 blocks.
        let odd_ranges = |n: i32| {
            (0..n)
                .map(|i| PortRule { protocol: if i % 2 == 0 { Protocol::Tcp } else { Protocol::Udp }, ..range(1 + i / 2, 65534 - i / 2) })
                .collect::<Vec<_>>()
        };
        let many_labels =
            LabelSelector { match_labels: Some((0..65).map(|i| (format!("k{i}"), "v".to_owned())).collect()), match_expressions: None };
        let many_values: Vec<String> = (0..257).map(|i| format!("v{i}")).collect();
        let many_values: Vec<&str> = many_values.iter().map(String::as_str).collect();
        let cases: Vec<(&str, MeshPolicySpec, Vec<(&str, &str)>)> = vec![
            ("at every per-rule limit", policy(vec![rule(peers(MAX_PEERS_PER_RULE), ports(MAX_PORTS_PER_RULE as i32))]), vec![]),
            (
                "at the rule limit",
                policy((0..MAX_INGRESS_RULES as i32).map(|i| rule(vec![any_namespace()], vec![port(1 + i)])).collect()),
                vec![],
            ),
            (
                "one namespaced policy, every namespace, 10,000 ports",
                policy(vec![rule(vec![any_namespace()], ports(10_000))]),
                vec![
                    ("spec.ingress[0].ports", "has 10000 entries, more than the limit of 64 entries per rule"),
                    ("spec.ingress", "has 10000 ports entries, more than the limit of 256 ports entries over all rules of a MeshPolicy"),
                    ("spec.ingress", "split into 10000 port blocks"),
                ],
            ),
            (
                "too many rules",
                policy((0..65).map(|i| rule(vec![], vec![port(1 + i)])).collect()),
                vec![("spec.ingress", "has 65 rules, more than the limit of 64 rules per MeshPolicy")],
            ),
            (
                "too many peers in a rule",
                policy(vec![rule(peers(65), vec![])]),
                vec![("spec.ingress[0].from", "has 65 entries, more than the limit of 64 entries per rule")],
            ),
            (
                "too many peers over the rules",
                policy((0..5).map(|i| rule(peers(60), vec![port(1 + i)])).collect()),
                vec![("spec.ingress", "has 300 from entries, more than the limit of 256 from entries over all rules of a MeshPolicy")],
            ),
            (
                "too many ports over the rules",
                policy((0..5).map(|i| rule(vec![pods(&[("app", &format!("a{i}"))])], ports(60))).collect()),
                vec![("spec.ingress", "has 300 ports entries, more than the limit of 256 ports entries over all rules of a MeshPolicy")],
            ),
            (
                "ranges that split into too many blocks",
                policy((0..2).map(|i| rule(vec![pods(&[("app", &format!("a{i}"))])], odd_ranges(20))).collect()),
                vec![("spec.ingress", "more than the limit of 1024 port blocks per MeshPolicy")],
            ),
            (
                "too many selector requirements",
                MeshPolicySpec { selector: many_labels.clone(), ingress: vec![], ..Default::default() },
                vec![("spec.selector", "has 65 requirements (matchLabels plus matchExpressions), more than the limit of 64")],
            ),
            (
                "too many peer selector requirements",
                policy(vec![rule(vec![PeerSelector { namespace_selector: Some(many_labels), ..Default::default() }], vec![])]),
                vec![("spec.ingress[0].from[0].namespaceSelector", "more than the limit of 64 requirements per selector")],
            ),
            (
                "too many values",
                policy(vec![rule(
                    vec![PeerSelector { pod_selector: Some(exprs(vec![expr("app", "In", &many_values)])), ..Default::default() }],
                    vec![],
                )]),
                vec![(
                    "spec.ingress[0].from[0].podSelector.matchExpressions[0].values",
                    "has 257 values, more than the limit of 256 values per requirement",
                )],
            ),
        ];
        for (name, spec, want) in cases {
            assert_errors(name, &spec, &want);
            if !want.is_empty() {
                assert_eq!(mesh_policy_warnings(&spec, &td()), vec![], "{name}: an oversized object gets no warnings");
            }
        }
    }

    #[test]
    fn the_crd_caps_each_list_at_the_same_limits() {
        let (_, crd) = meshauth_crds::all_crds().into_iter().find(|(file, _)| file.contains("meshpolicies")).expect("MeshPolicy CRD");
        let schema = crd.spec.versions[0].schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).expect("schema");
        let property = |s: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps, name: &str| {
            s.properties.as_ref().and_then(|p| p.get(name)).cloned().unwrap_or_else(|| panic!("no property {name}"))
        };
        let items = |s: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps| match &s.items {
            Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(item)) => {
                (**item).clone()
            }
            other => panic!("not a list schema: {other:?}"),
        };
        let ingress = property(&property(schema, "spec"), "ingress");
        assert_eq!(ingress.max_items, Some(MAX_INGRESS_RULES as i64));
        let rule = items(&ingress);
        assert_eq!(property(&rule, "from").max_items, Some(MAX_PEERS_PER_RULE as i64));
        assert_eq!(property(&rule, "ports").max_items, Some(MAX_PORTS_PER_RULE as i64));
        let rules: Vec<String> = ingress.x_kubernetes_validations.iter().flatten().map(|v| v.rule.clone()).collect();
        for (list, limit) in [("from", MAX_PEERS_PER_POLICY), ("ports", MAX_PORTS_PER_POLICY)] {
            let want = format!("self.map(r, has(r.{list}) ? size(r.{list}) : 0).sum() <= {limit}");
            assert!(rules.contains(&want), "no CEL rule {want:?} in {rules:?}");
        }
    }

    #[test]
    fn port_blocks_count_what_the_datapath_stores() {
        assert_eq!(rule_port_blocks(&rule(vec![], vec![])), 4, "every port of every protocol");
        assert_eq!(rule_port_blocks(&rule(vec![], vec![port(80), range(8080, 8083)])), 2);
        assert_eq!(rule_port_blocks(&rule(vec![], vec![range(1, 65535)])), 16);
        assert_eq!(rule_port_blocks(&rule(vec![], vec![range(1, 65534)])), 30);
        assert_eq!(rule_port_blocks(&rule(vec![], vec![port(0), range(9, 3)])), 2, "invalid entries count one each");
    }

    #[test]
    fn mesh_policy_warning_rules() {
        let never = exprs(vec![expr("app", "In", &["a"]), expr("app", "NotIn", &["a"])]);
        let cases: Vec<(&str, MeshPolicySpec, Vec<(&str, &str)>)> = vec![
            (
                "clean",
                policy(vec![rule(
                    vec![pods(&[("app", "a")]), identity("spiffe://cluster.local/ns/shop/sa/order")],
                    vec![port(80), range(8000, 8100)],
                )]),
                vec![],
            ),
            (
                "policy selector never selects",
                MeshPolicySpec { selector: never.clone(), ingress: vec![], ..Default::default() },
                vec![("spec.selector", "can never select a pod: no value of label \"app\"")],
            ),
            (
                "pod selector never matches",
                policy(vec![rule(vec![PeerSelector { pod_selector: Some(never.clone()), ..Default::default() }], vec![])]),
                vec![("spec.ingress[0].from[0].podSelector", "can never match")],
            ),
            (
                "namespace selector never matches",
                policy(vec![rule(vec![PeerSelector { namespace_selector: Some(never.clone()), ..Default::default() }], vec![])]),
                vec![("spec.ingress[0].from[0].namespaceSelector", "can never match")],
            ),
            (
                "identity not a service account",
                policy(vec![rule(vec![identity("spiffe://cluster.local/workload/x")], vec![])]),
                vec![(
                    "spec.ingress[0].from[0].identity",
                    "can never match: mesh workloads have identities spiffe://cluster.local/ns/<namespace>/sa/<service account>",
                )],
            ),
            (
                "identity of the trust domain itself",
                policy(vec![rule(vec![identity("spiffe://cluster.local")], vec![])]),
                vec![("spec.ingress[0].from[0].identity", "can never match")],
            ),
            (
                "identity with a bad namespace",
                policy(vec![rule(vec![identity("spiffe://cluster.local/ns/Shop/sa/order")], vec![])]),
                vec![("spec.ingress[0].from[0].identity", "\"Shop\" is not a valid namespace name")],
            ),
            (
                "identity with a bad service account",
                policy(vec![rule(vec![identity("spiffe://cluster.local/ns/shop/sa/Order_1")], vec![])]),
                vec![("spec.ingress[0].from[0].identity", "\"Order_1\" is not a valid service account name")],
            ),
            (
                "port inside a range",
                policy(vec![rule(vec![], vec![range(8000, 9000), port(8080)])]),
                vec![("spec.ingress[0].ports[1]", "is already covered by spec.ingress[0].ports[0]")],
            ),
            (
                "port inside a range of the other protocol",
                policy(vec![rule(vec![], vec![range(8000, 9000), PortRule { protocol: Protocol::Udp, ..port(8080) }])]),
                vec![],
            ),
            (
                "invalid parts get no warning",
                policy(vec![rule(
                    vec![PeerSelector { pod_selector: Some(never), identity: Some("x".into()), ..Default::default() }],
                    vec![port(0)],
                )]),
                vec![],
            ),
        ];
        for (name, spec, want) in cases {
            let warnings = mesh_policy_warnings(&spec, &td());
            assert_eq!(fields(&warnings), want.iter().map(|(f, _)| *f).collect::<Vec<_>>(), "{name}: {warnings:#?}");
            for (w, (_, reason)) in warnings.iter().zip(&want) {
                assert!(w.reason.contains(reason), "{name}: {:?} lacks {reason:?}", w.reason);
            }
        }
    }

    #[test]
    fn mutual_auth_rules() {
        let spec = |selector: Option<LabelSelector>| MutualAuthSpec { selector, mode: MutualAuthMode::Strict };
        let cases: Vec<(&str, MutualAuthSpec, Vec<&str>, Vec<&str>)> = vec![
            ("namespace-wide", spec(None), vec![], vec![]),
            ("selector", spec(Some(labels(&[("app", "payment")]))), vec![], vec![]),
            ("bad selector key", spec(Some(labels(&[("app!", "payment")]))), vec!["spec.selector.matchLabels"], vec![]),
            (
                "bad operator",
                spec(Some(exprs(vec![expr("app", "Is", &["x"])]))),
                vec!["spec.selector.matchExpressions[0].operator"],
                vec![],
            ),
            ("empty selector", spec(Some(LabelSelector::default())), vec![], vec!["spec.selector"]),
            (
                "empty maps",
                spec(Some(LabelSelector { match_labels: Some(Default::default()), match_expressions: Some(vec![]) })),
                vec![],
                vec!["spec.selector"],
            ),
            (
                "never selects",
                spec(Some(exprs(vec![expr("app", "Exists", &[]), expr("app", "DoesNotExist", &[])]))),
                vec![],
                vec!["spec.selector"],
            ),
        ];
        for (name, spec, want_errors, want_warnings) in cases {
            assert_eq!(fields(&validate_mutual_auth(&spec)), want_errors, "{name}");
            assert_eq!(fields(&mutual_auth_warnings(&spec)), want_warnings, "{name}");
        }
    }

    #[test]
    fn field_errors_display_field_and_reason() {
        let e = FieldError::new("spec.selector", "is wrong");
        assert_eq!(e.to_string(), "spec.selector: is wrong");
    }

    #[test]
    fn long_inputs_are_truncated_in_messages() {
        let key = "k".repeat(500);
        let errors = validate_label_selector(&labels(&[(&key, "v")]), "s");
        assert_eq!(errors.len(), 1);
        assert!(errors[0].reason.len() < 250, "{}", errors[0].reason);
    }
}
