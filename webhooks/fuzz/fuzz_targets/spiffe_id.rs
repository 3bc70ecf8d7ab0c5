//! The SPIFFE ID parser: never panics, and what it accepts obeys the specification and parses
//! back to itself; `validate_identity` accepts exactly what the parser accepts, in any trust
//! domain.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshauth_crds::{SpiffeId, TrustDomain};
use meshauth_policy::validate::validate_identity;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let checked = validate_identity(s);
    match SpiffeId::parse(s) {
        Ok(id) => {
            assert_eq!(id.as_str(), s);
            assert!(s.len() <= 2048);
            assert!(s.starts_with("spiffe://"));
            let trust_domain = id.trust_domain();
            assert!(!trust_domain.is_empty());
            assert!(trust_domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)));
            assert!(TrustDomain::new(trust_domain).is_ok());
            let path = id.path();
            assert!(path.is_empty() || path.starts_with('/'));
            assert!(!path.ends_with('/'));
            for segment in path.split('/').skip(1) {
                assert!(!segment.is_empty() && segment != "." && segment != "..");
                assert!(segment.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
            }
            assert_eq!(SpiffeId::parse(&id.to_string()), Ok(id.clone()));
            if let Some((ns, sa)) = id.service_account() {
                assert_eq!(TrustDomain::new(trust_domain).map(|t| t.service_account_id(ns, sa)), Ok(id.clone()));
            }
            assert_eq!(checked, Ok(id.clone()));
        }
        Err(err) => {
            assert!(!err.to_string().is_empty());
            assert!(checked.is_err());
        }
    }
});
