//! The SNI of a handshake: the SPIFFE ID the client expects, hashed into one DNS label (a
//! SPIFFE ID may be longer than a DNS name holds).

use meshauth_crds::SpiffeId;

use super::SNI_SUFFIX;

/// The SNI that asks a peer for `id`'s SVID.
pub fn sni_for(id: &SpiffeId) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, id.as_str().as_bytes());
    format!("{}{SNI_SUFFIX}", base32_lower(digest.as_ref()))
}

fn base32_lower(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &byte in data {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((buffer >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buffer << (5 - bits)) & 31) as usize]));
    }
    out
}
