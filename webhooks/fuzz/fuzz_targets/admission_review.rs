//! The request decoder and everything after it that needs no API: any bytes in, a 4xx reason
//! or an AdmissionResponse out, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshauth_policy::model::ModelConfig;
use meshauth_webhook::admission;

fuzz_target!(|data: &[u8]| {
    let content_type = match data.first() {
        Some(b) if b % 16 == 0 => Some("text/plain"),
        _ => Some("application/json"),
    };
    match admission::decode(content_type, data) {
        Ok(review) => {
            let findings = admission::check(&review.subject, &ModelConfig::default());
            let allowed = findings.errors.is_empty();
            let response = admission::respond(&review, &findings);
            assert_eq!(response.allowed, allowed);
            assert_eq!(response.uid, review.request.uid);
            let body = admission::encode(response).expect("a response always encodes");
            let _: serde_json::Value = serde_json::from_slice(&body).expect("and is JSON");
        }
        Err(err) => {
            let status = err.status().as_u16();
            assert!((400..500).contains(&status), "{status}");
            assert!(!err.to_string().is_empty());
        }
    }
});
