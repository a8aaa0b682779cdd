#![no_main]
//! NIXL notification payloads (UCX active message 0); what decodes must re-encode to the same bytes.
use kvcore::nixl::NixlNotif;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(n) = NixlNotif::decode(data) {
        assert_eq!(n.encode(), data);
    }
});
