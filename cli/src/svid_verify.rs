//! `meshauthctl svid verify`: an X.509-SVID chain checked against a trust bundle, both from
//! PEM files, by the agent's own verifier (the library decides, this prints).

use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use meshauth_agent::verify::verify_svid_files;

/// Prints the SPIFFE ID on stdout and returns 0 when valid; prints the reason on stderr and
/// returns 1 when not.
pub fn svid_verify(bundle: &Path, chain: &Path, trust_domain: Option<&str>) -> u8 {
    match verify_svid_files(bundle, chain, trust_domain, SystemTime::now()) {
        Ok(verified) => {
            // A closed stdout (e.g. `| head -c0`) must not turn a valid SVID into a panic.
            let _ = writeln!(std::io::stdout(), "{}", verified.id);
            0
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "invalid X.509-SVID ({}): {e}", e.reason());
            1
        }
    }
}
