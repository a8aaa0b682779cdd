#![no_main]
//! NIXL agent metadata as a stock NIXL agent (or anyone on its side channel) sends it; what
//! decodes must re-encode to the same bytes.
use kvcore::nixl::NixlMetadata;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = NixlMetadata::decode(data) {
        assert_eq!(m.encode(), data);
    }
});
